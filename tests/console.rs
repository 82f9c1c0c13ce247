//! The operator console in a real browser: Debian's chromium, headless, driven over the
//! DevTools protocol (headless_chrome) against a running cluster of real processes (three
//! storage nodes, a coordinator, a gateway in token mode). The console signs in with an admin
//! token (a wrong one is refused), shows the three nodes and the ring, charts the gateway's
//! traffic by tenant and error code, shows a node going down within seconds, adds a node
//! through its form after a confirmation, shows the migration's progress advancing, cancels
//! it after another, and starts a repair. Screenshots of each step are saved as test artifacts under
//! `target/tmp/console-screenshots/`.
//!
//! Needs chromium (`apt-get install chromium`); under CI=true a missing browser fails the test.
//! Its share of CI: about 80 s (most of it the throttled migration).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::backends::skip_or_fail;
use common::cluster::{RoleProcess, join_storage, start_storage_with_env};
use common::coord::{Client, create_tenant, put, sqlite_url, wait_all_active};
use headless_chrome::protocol::cdp::Page::CaptureScreenshotFormatOption;
use headless_chrome::{Browser, LaunchOptions, Tab};
use pairdb::gateway::auth::{TokenRole, issue};
use pairdb::rpc::common::Consistency;
use serde_json::{Value, json};

const SECRET: &str = "console-test-secret";

fn chromium() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("PAIRDB_CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn screenshots() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    dir
}

fn screenshot(tab: &Tab, name: &str) {
    let png = tab
        .capture_screenshot(CaptureScreenshotFormatOption::Png, None, None, true)
        .expect("screenshot");
    std::fs::write(screenshots().join(format!("{name}.png")), png).expect("save screenshot");
}

/// The value of a JavaScript expression in the page.
fn js(tab: &Tab, expression: &str) -> Value {
    tab.evaluate(expression, false)
        .unwrap_or_else(|e| panic!("evaluate {expression}: {e}"))
        .value
        .unwrap_or(Value::Null)
}

/// Waits until `expression` is true in the page; on timeout saves a screenshot and fails.
fn wait_js(tab: &Tab, what: &str, expression: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        if js(tab, expression) == Value::Bool(true) {
            return;
        }
        if Instant::now() > deadline {
            screenshot(tab, &format!("failed-{}", what.replace(' ', "-")));
            panic!(
                "{what}: not within {within:?}; banner: {}",
                js(tab, "document.getElementById('banner').textContent")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits for the console's confirmation dialog and confirms (`yes`) or declines it.
fn answer_dialog(tab: &Tab, what: &str, yes: bool) {
    wait_js(
        tab,
        what,
        "!document.getElementById('confirm').classList.contains('hidden')",
        Duration::from_secs(5),
    );
    click(tab, if yes { "#confirm-yes" } else { "#confirm-no" });
}

fn click(tab: &Tab, selector: &str) {
    tab.wait_for_element(selector)
        .unwrap_or_else(|e| panic!("{selector}: {e}"))
        .click()
        .unwrap_or_else(|e| panic!("click {selector}: {e}"));
}

fn type_into(tab: &Tab, selector: &str, text: &str) {
    js(
        tab,
        &format!("document.querySelector({selector:?}).value = ''; true"),
    );
    click(tab, selector);
    tab.type_str(text).expect("type");
}

/// The text of a node row's field.
fn node_field(tab: &Tab, node: &str, field: &str) -> String {
    js(
        tab,
        &format!(
            "(() => {{ const c = document.querySelector('#nodes tr[data-node={node:?}] [data-field={field:?}]'); \
             return c ? c.textContent : ''; }})()"
        ),
    )
    .as_str()
    .unwrap_or_default()
    .to_owned()
}

/// The first addition row of `node` as (id, state, keys migrated).
fn migration_of(tab: &Tab, node: &str) -> Option<(String, String, f64)> {
    let v = js(
        tab,
        &format!(
            "(() => {{ for (const r of document.querySelectorAll('#migrations tbody tr')) {{ \
               if (r.querySelector('[data-field=node]').textContent === {node:?} && \
                   r.querySelector('[data-field=type]').textContent === 'node_addition') \
                 return JSON.stringify([r.dataset.migration, \
                         r.querySelector('[data-field=state]').textContent, \
                         Number(r.querySelector('[data-field=keys]').dataset.keys)]); }} \
               return null; }})()"
        ),
    );
    // Objects come back by reference: the row travels as JSON text.
    let row: Value = serde_json::from_str(v.as_str()?).ok()?;
    let row = row.as_array()?;
    Some((
        row.first()?.as_str()?.to_owned(),
        row.get(1)?.as_str()?.to_owned(),
        row.get(2)?.as_f64()?,
    ))
}

/// An admin GET's JSON answer.
async fn admin_json(url: &str, token: &str) -> Value {
    common::http_client()
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .expect("admin call")
        .json()
        .await
        .expect("json")
}

async fn http(method: reqwest::Method, url: &str, token: &str, body: Option<Value>) -> u16 {
    let mut request = common::http_client()
        .request(method, url)
        .bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    request.send().await.expect("http").status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_console_shows_the_cluster_and_acts_on_it_in_a_real_browser() {
    let Some(chromium) = chromium() else {
        skip_or_fail(
            "the_console_shows_the_cluster_and_acts_on_it_in_a_real_browser",
            "chromium (apt-get install chromium)",
        );
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    // Streams are throttled on the senders, so the migration is caught in the middle.
    // The disk "degraded" mark at 1%: every node is degraded, and the console says why.
    let slow = [
        ("PAIRDB_STORAGE_STREAM_RATE_LIMIT", "30000"),
        ("PAIRDB_STORAGE_DISK_WARN_PERCENT", "1"),
    ];
    let mut storage = start_storage_with_env(3, dir.path(), &slow);
    let s4 = join_storage("s4", dir.path(), &storage);
    let coordinator = RoleProcess::coordinator(
        "c1",
        &sqlite_url(dir.path()),
        "memory://",
        &storage,
        &[],
        dir.path(),
    );
    let gateway = RoleProcess::gateway(
        "gw",
        &[&coordinator],
        &["--auth=token"],
        &[("PAIRDB_GATEWAY_AUTH_SECRET", SECRET)],
        dir.path(),
    );
    let mut c: Client = coordinator.client().await;
    wait_all_active(&c, 3).await;
    create_tenant(&mut c, "acme", 3).await;
    // Small values, many keys: a throttled stream sends several 500-record batches, so its
    // progress moves in steps a poll can see.
    let value = format!("\"{}\"", "v".repeat(300));
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let (mut c, value) = (c.clone(), value.clone());
            tokio::spawn(async move {
                for i in (w..9000).step_by(8) {
                    put(&mut c, "acme", &format!("k{i}"), &value, Consistency::All)
                        .await
                        .expect("preload");
                }
            })
        })
        .collect();
    for w in writers {
        w.await.expect("writer");
    }
    let token = |tenant: &str, role| {
        issue(SECRET.as_bytes(), tenant, role, Duration::from_secs(3600)).expect("token")
    };
    let (admin, acme) = (
        token("ops", TokenRole::Admin),
        token("acme", TokenRole::Tenant),
    );
    let url = gateway.url();

    let browser = Browser::new(
        LaunchOptions::default_builder()
            .path(Some(chromium))
            .headless(true)
            .sandbox(false)
            .window_size(Some((1400, 1250)))
            .idle_browser_timeout(Duration::from_secs(600))
            // A container's /dev/shm can be too small for the renderer.
            .args(vec![std::ffi::OsStr::new("--disable-dev-shm-usage")])
            .build()
            .expect("launch options"),
    )
    .expect("start chromium");
    let tab = browser.new_tab().expect("tab");
    tab.navigate_to(&format!("{url}/console"))
        .expect("navigate")
        .wait_until_navigated()
        .expect("loaded");

    // Sign in: a wrong token is refused, the admin token opens the console and stays in the
    // tab's session storage.
    let visible =
        |id: &str| format!("!document.getElementById({id:?}).classList.contains('hidden')");
    wait_js(
        &tab,
        "login form shown",
        &visible("login"),
        Duration::from_secs(10),
    );
    type_into(&tab, "#token", "not-a-token");
    click(&tab, "#login-submit");
    wait_js(
        &tab,
        "wrong token refused",
        "document.getElementById('login-error').textContent.includes('UNAUTHORIZED')",
        Duration::from_secs(10),
    );
    type_into(&tab, "#token", &admin);
    click(&tab, "#login-submit");
    wait_js(
        &tab,
        "console shown",
        &visible("app"),
        Duration::from_secs(10),
    );
    assert_eq!(
        js(&tab, "sessionStorage.getItem('pairdb.console.token')"),
        json!(admin)
    );

    // Three nodes, all active, and the ring drawn from their tokens.
    wait_js(
        &tab,
        "three active nodes",
        "[...document.querySelectorAll('#nodes tbody tr [data-field=status]')]\
           .filter(c => c.textContent === 'active').length === 3",
        Duration::from_secs(20),
    );
    // Why a node is degraded: its health and the reason gossip carries.
    wait_js(
        &tab,
        "degraded with its reason",
        "(() => { const c = document.querySelector('#nodes tr[data-node=\"s1\"] [data-field=health]'); \
           return !!c && c.textContent.includes('degraded') && c.textContent.includes('disk'); })()",
        Duration::from_secs(20),
    );
    let vnodes = js(&tab, "document.querySelectorAll('#ring path').length")
        .as_u64()
        .expect("count");
    let nodes = admin_json(&format!("{url}/v1/admin/storage-nodes"), &admin).await;
    let tokens: usize = nodes["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| n["tokens"].as_array().map_or(0, Vec::len))
        .sum();
    assert_eq!(vnodes as usize, tokens, "one arc per vnode");
    assert!(node_field(&tab, "s1", "ownership").ends_with('%'));
    screenshot(&tab, "1-nodes-and-ring");

    // Traffic: the tenant's requests and errors show in its row and in the charts.
    let kv = format!("{url}/v1/key-value");
    for i in 0..40 {
        let status = http(
            reqwest::Method::POST,
            &kv,
            &acme,
            Some(json!({"key": format!("t{i}"), "value": i})),
        )
        .await;
        assert_eq!(status, 200);
        let status = http(
            reqwest::Method::GET,
            &format!("{kv}?key=missing{i}"),
            &acme,
            None,
        )
        .await;
        assert_eq!(status, 404);
    }
    // Steady traffic from here on, so the charts draw lines (writes, reads, and misses).
    let traffic = {
        let (kv, acme) = (kv.clone(), acme.clone());
        tokio::spawn(async move {
            for i in 0u64.. {
                let key = format!("steady{}", i % 50);
                http(
                    reqwest::Method::POST,
                    &kv,
                    &acme,
                    Some(json!({"key": key, "value": i})),
                )
                .await;
                http(
                    reqwest::Method::GET,
                    &format!("{kv}?key={key}"),
                    &acme,
                    None,
                )
                .await;
                if i % 4 == 0 {
                    http(
                        reqwest::Method::GET,
                        &format!("{kv}?key=nope{i}"),
                        &acme,
                        None,
                    )
                    .await;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    wait_js(
        &tab,
        "tenant traffic shown",
        "(() => { const r = document.querySelector('#tenants tr[data-tenant=\"acme\"] [data-field=rate]'); \
           return !!r && r.textContent !== '0'; })()",
        Duration::from_secs(20),
    );
    wait_js(
        &tab,
        "errors charted by code",
        "!!document.querySelector('#chart-errors polyline[data-line=\"KEY_NOT_FOUND\"]') && \
         !!document.querySelector('#chart-rate polyline') && \
         !!document.querySelector('#chart-latency polyline[data-line=\"p99\"]')",
        Duration::from_secs(20),
    );
    // The tenant's row has its RF and limits; its own series charts like the gateway's.
    assert_eq!(
        js(
            &tab,
            "document.querySelector('#tenants tr[data-tenant=\"acme\"] [data-field=rf]').textContent"
        ),
        json!("3")
    );
    assert_eq!(
        js(
            &tab,
            "document.querySelector('#tenants tr[data-tenant=\"acme\"] [data-field=write-limit]').textContent"
        ),
        json!("1.0k/min")
    );
    js(
        &tab,
        "(() => { const s = document.getElementById('series'); s.value = 'tenant:acme'; \
           s.dispatchEvent(new Event('change')); return true; })()",
    );
    wait_js(
        &tab,
        "tenant series charted",
        "document.getElementById('series').value === 'tenant:acme' && \
         !!document.querySelector('#chart-errors polyline[data-line=\"KEY_NOT_FOUND\"]')",
        Duration::from_secs(10),
    );
    screenshot(&tab, "2-traffic");

    // A node going down shows within seconds, and coming back too.
    storage[2].kill9();
    let killed = Instant::now();
    wait_js(
        &tab,
        "s3 shown down",
        "document.querySelector('#nodes tr[data-node=\"s3\"] [data-field=status]').textContent === 'down'",
        Duration::from_secs(20),
    );
    eprintln!("s3 shown down {:?} after kill -9", killed.elapsed());
    screenshot(&tab, "3-node-down");
    storage[2].restart();
    wait_js(
        &tab,
        "s3 shown active again",
        "document.querySelector('#nodes tr[data-node=\"s3\"] [data-field=status]').textContent === 'active'",
        Duration::from_secs(30),
    );

    // An action asks first: declining a removal changes nothing.
    click(
        &tab,
        "#nodes tr[data-node=\"s1\"] button[data-action=remove]",
    );
    answer_dialog(&tab, "removal asked", false);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(node_field(&tab, "s1", "status"), "active");
    assert!(
        js(
            &tab,
            "document.querySelectorAll('#migrations tbody tr').length"
        ) == json!(0),
        "no change was started"
    );

    // Adding a node through the form, confirmed: the migration's progress advances.
    type_into(&tab, "#add-node-id", "s4");
    type_into(&tab, "#add-node-host", &s4.grpc.ip().to_string());
    type_into(&tab, "#add-node-port", &s4.grpc.port().to_string());
    click(&tab, "#add-node button[type=submit]");
    answer_dialog(&tab, "addition asked", true);
    let deadline = Instant::now() + Duration::from_secs(60);
    let (id, first) = loop {
        if let Some((id, state, keys)) = migration_of(&tab, "s4") {
            if state == "in_progress" && keys > 0.0 {
                break (id, keys);
            }
        }
        if Instant::now() > deadline {
            screenshot(&tab, "failed-addition");
            panic!(
                "the addition never showed progress; banner: {}; migrations: {}",
                js(&tab, "document.getElementById('banner').textContent"),
                js(&tab, "document.getElementById('migrations').textContent")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    wait_js(
        &tab,
        "ranges moving on the ring",
        "document.querySelectorAll('#ring path.moving').length > 0",
        Duration::from_secs(5),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let advanced = loop {
        let (_, state, keys) = migration_of(&tab, "s4").expect("row");
        if keys > first {
            break keys;
        }
        assert!(
            state == "in_progress" && Instant::now() < deadline,
            "progress stayed at {first} keys ({state})"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("migration {id}: {first} keys, then {advanced}");
    assert!(
        js(
            &tab,
            &format!(
                "document.querySelector('#migrations tr[data-migration={id:?}] [data-field=rate]').textContent.endsWith('/s')"
            )
        ) == json!(true),
        "a rate is shown"
    );
    let eta = js(
        &tab,
        &format!(
            "document.querySelector('#migrations tr[data-migration={id:?}] [data-field=eta]').textContent"
        ),
    );
    assert!(
        eta.as_str()
            .is_some_and(|t| t == "soon" || t.ends_with(" s")),
        "an ETA is shown: {eta}"
    );
    screenshot(&tab, "4-migration-progress");

    // Cancelling it from the console, confirmed: rolled back.
    click(
        &tab,
        &format!("#migrations tr[data-migration={id:?}] button[data-action=cancel]"),
    );
    answer_dialog(&tab, "cancel asked", true);
    wait_js(
        &tab,
        "migration cancelled",
        &format!(
            "document.querySelector('#migrations tr[data-migration={id:?}] [data-field=state]').textContent === 'cancelled'"
        ),
        Duration::from_secs(60),
    );
    screenshot(&tab, "5-migration-cancelled");
    let status = admin_json(&format!("{url}/v1/admin/migrations/{id}"), &admin).await;
    assert_eq!(status["state"], "cancelled", "{status}");

    // Starting a repair from the console, confirmed: it shows as a repair migration.
    click(&tab, "#start-repair");
    answer_dialog(&tab, "repair asked", true);
    wait_js(
        &tab,
        "repair shown",
        "[...document.querySelectorAll('#migrations tbody [data-field=type]')]\
           .some(c => c.textContent === 'repair')",
        Duration::from_secs(30),
    );
    screenshot(&tab, "6-repair");
    traffic.abort();
    drop(s4);
}
