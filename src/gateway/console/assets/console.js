// pairdb operator console. Plain JavaScript, no dependencies, nothing fetched from outside this
// gateway. Every figure comes from the admin API (the same endpoints as the CLI) and every
// action asks for confirmation first. Data is only ever put into the page as text (never as
// HTML), so node ids, tenant names and error messages cannot inject markup.
'use strict';

const POLL_MS = 1000;
const HISTORY_MS = 2000;
const TENANTS_MS = 5000;
const LOAD_SAMPLES = 300;
const PALETTE = ['#2f6fdb', '#1f9d55', '#d68910', '#8e44ad', '#c0392b', '#16a085', '#7f8c8d',
  '#e67e22', '#2c3e50', '#d35400', '#27ae60', '#9b59b6'];
const TOKEN_KEY = 'pairdb.console.token';

const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || '',
  nodes: [],
  migrations: [],
  tenants: [],
  history: null,
  // Bytes and keys of each migration at the previous poll, for its rate.
  seen: {},
  // Storage load per node over time, sampled at every poll: {node: [[t, load], ...]}.
  load: {},
  colors: {},
  series: 'gateway',
  running: false,
};

// ---- small DOM helpers (text only) ----
const $ = (id) => document.getElementById(id);
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === 'class') e.className = v;
    else if (k.startsWith('data-')) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}
const SVG = 'http://www.w3.org/2000/svg';
function svg(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}
// Updates a table body to `fresh` rows (each with a `key` attribute) in place: a row whose
// cells did not change is left alone, a changed cell is replaced alone. So a button is not
// replaced under the pointer by a refresh, and the page does not flicker.
function patchRows(tbody, fresh, key) {
  const old = new Map([...tbody.rows].map((r) => [r.getAttribute(key), r]));
  const rows = fresh.map((row) => {
    const prev = old.get(row.getAttribute(key));
    if (!prev || prev.cells.length !== row.cells.length) return row;
    [...row.cells].forEach((c, i) => {
      if (prev.cells[i].outerHTML !== c.outerHTML) prev.cells[i].replaceWith(c);
    });
    return prev;
  });
  rows.forEach((r, i) => {
    if (tbody.rows[i] !== r) tbody.insertBefore(r, tbody.rows[i] || null);
  });
  while (tbody.rows.length > rows.length) tbody.deleteRow(rows.length);
}
function badge(text) { return el('span', { class: 'badge ' + text }, text); }
function cell(field, ...children) { return el('td', { 'data-field': field }, ...children); }
function num(field, value) { return el('td', { 'data-field': field, class: 'num' }, value); }

function human(n) {
  if (n === null || n === undefined || Number.isNaN(n)) return '-';
  const units = ['', 'k', 'M', 'G', 'T'];
  let i = 0;
  while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return (i === 0 ? Math.round(n * 10) / 10 : n.toFixed(1)) + units[i];
}
function bytes(n) {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n : n.toFixed(1)) + ' ' + units[i];
}
function colorOf(node) {
  if (!state.colors[node]) {
    const used = Object.keys(state.colors).length;
    state.colors[node] = PALETTE[used % PALETTE.length];
  }
  return state.colors[node];
}

// ---- API ----
class Unauthorized extends Error {}
async function api(method, path, body) {
  const headers = { Accept: 'application/json' };
  if (state.token) headers.Authorization = 'Bearer ' + state.token;
  const init = { method, headers };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  let data = null;
  try { data = await response.json(); } catch (_) { /* not JSON */ }
  if (response.status === 401 || response.status === 403) {
    throw new Unauthorized(data ? data.error_code + ': ' + data.message : 'not allowed');
  }
  if (!response.ok) {
    throw new Error(data ? data.error_code + ': ' + data.message : 'HTTP ' + response.status);
  }
  return data;
}

function showBanner(message) {
  const b = $('banner');
  b.textContent = message;
  b.classList.toggle('hidden', !message);
}

// ---- confirmation ----
function confirmAction(text) {
  return new Promise((resolve) => {
    $('confirm-text').textContent = text;
    $('confirm').classList.remove('hidden');
    const done = (answer) => {
      $('confirm').classList.add('hidden');
      $('confirm-yes').removeEventListener('click', yes);
      $('confirm-no').removeEventListener('click', no);
      resolve(answer);
    };
    const yes = () => done(true);
    const no = () => done(false);
    $('confirm-yes').addEventListener('click', yes);
    $('confirm-no').addEventListener('click', no);
  });
}
async function act(question, method, path, body) {
  if (!(await confirmAction(question))) return;
  try {
    await api(method, path, body);
    showBanner('');
    await refresh();
  } catch (e) {
    showBanner(e.message);
  }
}

// ---- ring ----
function ringArcs(nodes) {
  const tokens = [];
  for (const n of nodes) for (const t of n.tokens) tokens.push({ t: BigInt(t), node: n.node_id });
  tokens.sort((a, b) => (a.t < b.t ? -1 : a.t > b.t ? 1 : 0));
  const full = 1n << 64n;
  const arcs = [];
  for (let i = 0; i < tokens.length; i++) {
    const prev = tokens[(i + tokens.length - 1) % tokens.length].t;
    const cur = tokens[i].t;
    // A token owns the positions after its predecessor, up to itself.
    let span = (cur - prev + full) % full;
    if (tokens.length === 1) span = full;
    arcs.push({ node: tokens[i].node, start: Number(prev) / 2 ** 64, span: Number(span) / 2 ** 64 });
  }
  return arcs;
}
function arcPath(start, span, r0, r1) {
  const a0 = start * 2 * Math.PI - Math.PI / 2;
  const a1 = (start + Math.min(span, 0.9999)) * 2 * Math.PI - Math.PI / 2;
  const large = span > 0.5 ? 1 : 0;
  const p = (r, a) => (r * Math.cos(a)).toFixed(2) + ' ' + (r * Math.sin(a)).toFixed(2);
  return `M ${p(r1, a0)} A ${r1} ${r1} 0 ${large} 1 ${p(r1, a1)} L ${p(r0, a1)} A ${r0} ${r0} 0 ${large} 0 ${p(r0, a0)} Z`;
}
function renderRing() {
  const ring = $('ring');
  ring.replaceChildren();
  const moving = new Set(state.migrations
    .filter((m) => m.state === 'in_progress' || m.state === 'pending')
    .map((m) => m.node_id));
  const arcs = ringArcs(state.nodes);
  const owned = {};
  for (const a of arcs) {
    owned[a.node] = (owned[a.node] || 0) + a.span;
    const path = svg('path', {
      d: arcPath(a.start, a.span, 95, 140),
      fill: colorOf(a.node),
      'data-node': a.node,
    });
    if (moving.has(a.node)) path.classList.add('moving');
    ring.append(path);
  }
  const label = svg('text', { 'text-anchor': 'middle', y: 5 });
  label.textContent = arcs.length + ' vnodes';
  ring.append(label);
  const legend = $('ring-legend');
  legend.replaceChildren(...state.nodes.map((n) => el('li', { 'data-node': n.node_id },
    el('span', { class: 'swatch' }), n.node_id, ' ',
    el('span', { class: 'muted' }, ((owned[n.node_id] || 0) * 100).toFixed(1) + '%'),
    n.status === 'active' ? null : el('span', { class: 'muted' }, ' ' + n.status),
    moving.has(n.node_id) ? el('span', { class: 'muted' }, ' (ranges moving)') : null)));
  legend.querySelectorAll('.swatch').forEach((s, i) => {
    s.style.background = colorOf(state.nodes[i].node_id);
  });
  return owned;
}

// ---- nodes ----
function renderNodes(owned) {
  const rows = state.nodes.map((n) => {
    const reasons = (n.health && n.health.reasons) || [];
    const health = (n.health && n.health.status) || 'unknown';
    return el('tr', { 'data-node': n.node_id },
      cell('node', n.node_id),
      cell('address', n.host + ':' + n.port),
      cell('status', badge(n.status)),
      cell('health', badge(health), reasons.length ? el('div', { class: 'reasons' }, reasons.join('; ')) : null),
      num('disk', (n.disk_usage_percent || 0).toFixed(1) + '%'),
      num('keys', human(n.keys_count)),
      num('load', human(n.load)),
      num('ownership', ((owned[n.node_id] || 0) * 100).toFixed(1) + '%'),
      el('td', {}, el('button', { class: 'danger', 'data-action': 'remove' }, 'Remove')));
  });
  patchRows($('nodes').tBodies[0], rows, 'data-node');
  const active = state.nodes.filter((n) => n.status === 'active').length;
  const down = state.nodes.filter((n) => n.status === 'down' || n.status === 'failed').length;
  $('summary').textContent = `${state.nodes.length} nodes, ${active} active` + (down ? `, ${down} down` : '');
}

// ---- migrations ----
function renderMigrations() {
  const now = Date.now();
  const rows = state.migrations.map((m) => {
    const p = m.progress || {};
    const before = state.seen[m.migration_id];
    let rate = null;
    if (before && now > before.at && p.bytes_migrated >= before.bytes) {
      rate = ((p.bytes_migrated - before.bytes) * 1000) / (now - before.at);
    }
    if (!before || now - before.at >= 3000) {
      state.seen[m.migration_id] = { at: now, bytes: p.bytes_migrated || 0, rate };
    } else if (rate === null) {
      rate = before.rate;
    }
    const bar = el('div', { class: 'bar' }, el('div'));
    bar.firstChild.style.width = Math.min(100, p.percentage || 0).toFixed(1) + '%';
    const running = m.state === 'in_progress' || m.state === 'pending';
    let eta = '-';
    if (running && m.estimated_completion) {
      const left = (Date.parse(m.estimated_completion) - now) / 1000;
      eta = left > 0 ? Math.round(left) + ' s' : 'soon';
    }
    return el('tr', { 'data-migration': m.migration_id },
      cell('id', m.migration_id.slice(0, 8)),
      cell('type', m.type),
      cell('node', m.node_id),
      cell('state', badge(m.state), m.failure_reason ? el('div', { class: 'reasons' }, m.failure_reason) : null),
      el('td', { 'data-field': 'progress', 'data-percentage': (p.percentage || 0).toFixed(2) },
        bar, ' ', (p.percentage || 0).toFixed(1) + '%'),
      el('td', { 'data-field': 'keys', 'data-keys': String(p.keys_migrated || 0), class: 'num' },
        human(p.keys_migrated) + ' / ' + (p.total_keys ? human(p.total_keys) : '?')),
      el('td', { 'data-field': 'bytes', 'data-bytes': String(p.bytes_migrated || 0), class: 'num' },
        bytes(p.bytes_migrated || 0)),
      num('rate', rate === null ? '-' : bytes(rate) + '/s'),
      num('eta', eta),
      el('td', {}, running
        ? el('button', { class: 'danger', 'data-action': 'cancel' }, 'Cancel') : null));
  });
  patchRows($('migrations').tBodies[0], rows, 'data-migration');
}

// ---- tenants ----
function lastPoint(name) {
  const s = state.history && state.history.series.find((x) => x.name === name);
  if (!s) return null;
  const step = state.history.step_seconds;
  // The newest finished step, if it is the last one: older means no traffic now.
  const done = s.points.filter((p) => p.t + step <= state.history.now);
  const p = done[done.length - 1];
  return p && state.history.now - p.t <= 3 * step ? p : null;
}
function errorsOf(p) {
  return Object.entries(p.codes).filter(([c]) => c !== 'OK').reduce((a, [, n]) => a + n, 0);
}
function renderTenants() {
  const limits = (state.history && state.history.rate_limits) || { default: {}, tenants: {} };
  const rows = state.tenants.map((t) => {
    const p = lastPoint('tenant:' + t.tenant_id);
    const l = limits.tenants[t.tenant_id] || limits.default;
    return el('tr', { 'data-tenant': t.tenant_id },
      cell('tenant', t.tenant_id),
      num('rf', t.replication_factor),
      num('rate', p ? human(p.rate) : '0'),
      num('p99', p ? p.p99_ms.toFixed(1) + ' ms' : '-'),
      num('errors', p ? human(errorsOf(p) / state.history.step_seconds) : '0'),
      num('write-limit', l.write === undefined ? '-' : human(l.write) + '/min'),
      num('read-limit', l.read === undefined ? '-' : human(l.read) + '/min'));
  });
  patchRows($('tenants').tBodies[0], rows, 'data-tenant');
}

// ---- charts ----
function lineChart(target, lines, now, spanSeconds, unit) {
  const chart = $(target);
  chart.replaceChildren();
  const W = 400, H = 140, L = 34, B = 16;
  let max = 0;
  for (const l of lines) for (const [, v] of l.points) max = Math.max(max, v);
  max = max > 0 ? max * 1.1 : 1;
  chart.append(svg('line', { class: 'axis', x1: L, y1: H - B, x2: W, y2: H - B }));
  chart.append(svg('line', { class: 'axis', x1: L, y1: 4, x2: L, y2: H - B }));
  const top = svg('text', { x: 2, y: 12 });
  top.textContent = human(max) + unit;
  chart.append(top);
  const span = svg('text', { x: L, y: H - 3 });
  span.textContent = '-' + Math.round(spanSeconds / 60) + ' min';
  chart.append(span);
  const x = (t) => L + ((t - (now - spanSeconds)) / spanSeconds) * (W - L);
  const y = (v) => H - B - (v / max) * (H - B - 6);
  lines.forEach((l, i) => {
    if (!l.points.length) return;
    const pl = svg('polyline', {
      points: l.points.map(([t, v]) => x(t).toFixed(1) + ',' + y(v).toFixed(1)).join(' '),
      stroke: l.color || PALETTE[i % PALETTE.length],
      'data-line': l.name,
    });
    chart.append(pl);
    // The newest point as a dot: a series of one point is visible too.
    const [lt, lv] = l.points[l.points.length - 1];
    chart.append(svg('circle', {
      cx: x(lt).toFixed(1), cy: y(lv).toFixed(1), r: 2.5, fill: l.color || PALETTE[i % PALETTE.length],
    }));
    const tag = svg('text', { x: W - 4, y: 12 + 11 * i, 'text-anchor': 'end', fill: l.color || PALETTE[i % PALETTE.length] });
    tag.textContent = l.name;
    chart.append(tag);
  });
  chart.setAttribute('data-max', String(max));
}
function renderCharts() {
  const h = state.history;
  if (!h) return;
  const select = $('series');
  const names = h.series.map((s) => s.name);
  for (const base of ['gateway', 'coordinator']) if (!names.includes(base)) names.unshift(base);
  const current = [...select.options].map((o) => o.value).join('|');
  if (current !== names.join('|')) {
    select.replaceChildren(...names.map((n) => el('option', { value: n }, n)));
    select.value = state.series;
  }
  const step = h.step_seconds;
  // Only finished steps: the current one is still counting, its rate would dip.
  const all = h.series.find((x) => x.name === state.series) || { points: [] };
  const s = { points: all.points.filter((p) => p.t + step <= h.now) };
  const span = 300;
  lineChart('chart-rate', [{ name: 'requests/s', points: s.points.map((p) => [p.t, p.rate]) }], h.now, span, '/s');
  lineChart('chart-latency', [
    { name: 'p50', points: s.points.map((p) => [p.t, p.p50_ms]) },
    { name: 'p99', points: s.points.map((p) => [p.t, p.p99_ms]) },
  ], h.now, span, ' ms');
  const codes = new Set();
  for (const p of s.points) for (const c of Object.keys(p.codes)) if (c !== 'OK') codes.add(c);
  lineChart('chart-errors', [...codes].map((c) => ({
    name: c, points: s.points.map((p) => [p.t, (p.codes[c] || 0) / step]),
  })), h.now, span, '/s');
  const nowS = Date.now() / 1000;
  lineChart('chart-load', Object.entries(state.load).map(([node, pts]) => ({
    name: node, color: colorOf(node), points: pts,
  })), nowS, span, '/s');
}

// ---- polling ----
async function refresh() {
  const [nodes, migrations] = await Promise.all([
    api('GET', '/v1/admin/storage-nodes'),
    api('GET', '/v1/admin/migrations?limit=20'),
  ]);
  state.nodes = nodes.nodes.slice().sort((a, b) => a.node_id.localeCompare(b.node_id));
  state.migrations = migrations.migrations;
  const t = Date.now() / 1000;
  for (const n of state.nodes) {
    const pts = state.load[n.node_id] || (state.load[n.node_id] = []);
    pts.push([t, n.load || 0]);
    if (pts.length > LOAD_SAMPLES) pts.shift();
  }
  const owned = renderRing();
  renderNodes(owned);
  renderMigrations();
  $('updated').textContent = 'updated ' + new Date().toLocaleTimeString();
}
async function refreshHistory() {
  state.history = await api('GET', '/v1/admin/console/history?seconds=600');
  renderCharts();
  renderTenants();
}
async function refreshTenants() {
  const page = await api('GET', '/v1/tenants?limit=100');
  state.tenants = page.tenants;
  renderTenants();
}

function every(ms, task) {
  const run = async () => {
    if (!state.running) return;
    try {
      await task();
      showBanner('');
    } catch (e) {
      if (e instanceof Unauthorized) { signOut(e.message); return; }
      showBanner(e.message);
    }
    setTimeout(run, ms);
  };
  run();
}

function start() {
  $('login').classList.add('hidden');
  $('app').classList.remove('hidden');
  $('logout').classList.toggle('hidden', !state.token);
  state.running = true;
  every(POLL_MS, refresh);
  every(HISTORY_MS, refreshHistory);
  every(TENANTS_MS, refreshTenants);
}
function signOut(message) {
  state.running = false;
  state.token = '';
  sessionStorage.removeItem(TOKEN_KEY);
  $('app').classList.add('hidden');
  $('logout').classList.add('hidden');
  $('login').classList.remove('hidden');
  $('login-error').textContent = message || '';
}

async function boot() {
  $('login-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    state.token = $('token').value.trim();
    try {
      await api('GET', '/v1/admin/storage-nodes');
      sessionStorage.setItem(TOKEN_KEY, state.token);
      $('token').value = '';
      start();
    } catch (e) {
      $('login-error').textContent = e.message;
    }
  });
  $('logout').addEventListener('click', () => signOut(''));
  // Row actions, delegated: the rows are patched in place by every refresh.
  $('nodes').tBodies[0].addEventListener('click', (ev) => {
    const button = ev.target.closest('button[data-action=remove]');
    if (!button) return;
    const node = button.closest('tr').dataset.node;
    act(`Remove storage node ${node}? Its ranges are streamed to the others first.`,
      'DELETE', '/v1/admin/storage-nodes/' + encodeURIComponent(node));
  });
  $('migrations').tBodies[0].addEventListener('click', (ev) => {
    const button = ev.target.closest('button[data-action=cancel]');
    if (!button) return;
    const id = button.closest('tr').dataset.migration;
    const m = state.migrations.find((x) => x.migration_id === id) || { type: 'change', node_id: '?' };
    const what = m.type === 'repair'
      ? `Cancel repair ${id}? What it fixed stays fixed.`
      : `Cancel the ${m.type} of ${m.node_id} (${id})? It is rolled back.`;
    act(what,
      'DELETE', '/v1/admin/migrations/' + encodeURIComponent(id));
  });
  $('series').addEventListener('change', (ev) => { state.series = ev.target.value; renderCharts(); });
  $('start-repair').addEventListener('click', () =>
    act('Start a repair of every range of every tenant? It runs in the background, rate-limited.',
      'POST', '/v1/admin/repair', {}));
  $('add-node').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const node = { node_id: $('add-node-id').value.trim(), host: $('add-node-host').value.trim(), port: Number($('add-node-port').value) };
    act(`Add storage node ${node.node_id} at ${node.host}:${node.port}? Ranges are streamed to it.`,
      'POST', '/v1/admin/storage-nodes', node);
  });
  try {
    await api('GET', '/v1/admin/storage-nodes');
    start();
  } catch (e) {
    signOut(e instanceof Unauthorized ? '' : e.message);
  }
}

document.addEventListener('DOMContentLoaded', boot);
