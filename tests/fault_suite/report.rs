//! The report of a run: JSON (every figure, fault and anomaly) and a self-contained HTML page
//! with a timeline of faults and operations (throughput, latency and errors per second, faults
//! as bars, anomalies marked), written under `target/fault-suite/`.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use crate::admin::RepairCounts;
use crate::checker::{Anomaly, ConditionalStats, conditional_stats};
use crate::history::{FaultEvent, Op, Outcome};

/// The anti-entropy repair the suite runs after healing, before the replicas are compared, and
/// the topology changes and cleanups the run made.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AfterHealing {
    /// Keys whose natural replicas disagreed before it (after hints and read repair).
    pub keys_divergent_before: usize,
    /// The first few of them, with what each replica held.
    pub divergent_before: Vec<String>,
    /// What the repair reported.
    pub repair: RepairCounts,
    /// The cluster's migrations by type and final state, the repair included.
    pub migrations: std::collections::BTreeMap<String, usize>,
    /// Why the failed ones failed (type and reason, with how many).
    pub migration_failures: std::collections::BTreeMap<String, usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub seed: u64,
    pub duration_s: u64,
    pub backends: &'static str,
    pub operations_attempted: usize,
    pub operations_acknowledged: usize,
    pub writes_unknown: usize,
    pub faults_by_kind: BTreeMap<String, usize>,
    pub faults_refused: Vec<(String, String)>,
    pub anomalies_by_kind: BTreeMap<String, usize>,
    /// What the conditional writers got.
    pub conditional: ConditionalStats,
    /// What the final phase found: divergence before the repair, the repair, the migrations
    /// (set by the caller once the final state is read).
    pub after_healing: AfterHealing,
    pub anomalies: Vec<Anomaly>,
    pub faults: Vec<FaultEvent>,
    /// Per second: (acknowledged, failed or unknown, p99 latency ms).
    pub timeline: Vec<(usize, usize, u64)>,
}

impl RunReport {
    pub fn new(
        seed: u64,
        duration_s: u64,
        backends: &'static str,
        ops: &[Op],
        faults: Vec<FaultEvent>,
        refused: Vec<(String, String)>,
        anomalies: Vec<Anomaly>,
    ) -> RunReport {
        let mut faults_by_kind = BTreeMap::new();
        for f in &faults {
            *faults_by_kind.entry(f.kind.clone()).or_insert(0) += 1;
        }
        let mut anomalies_by_kind = BTreeMap::new();
        for a in &anomalies {
            *anomalies_by_kind.entry(a.kind.to_owned()).or_insert(0) += 1;
        }
        let seconds = ops.iter().map(|o| o.complete_ms / 1000).max().unwrap_or(0) as usize + 1;
        let mut buckets: Vec<(usize, usize, Vec<u64>)> = vec![(0, 0, Vec::new()); seconds];
        for o in ops {
            let b = &mut buckets[(o.complete_ms / 1000) as usize];
            if o.acked() {
                b.0 += 1;
            } else {
                b.1 += 1;
            }
            b.2.push(o.complete_ms - o.invoke_ms);
        }
        let timeline = buckets
            .into_iter()
            .map(|(ok, bad, mut lat)| {
                lat.sort_unstable();
                let p99 = lat
                    .get((lat.len() * 99 / 100).min(lat.len().saturating_sub(1)))
                    .copied()
                    .unwrap_or(0);
                (ok, bad, p99)
            })
            .collect();
        RunReport {
            seed,
            duration_s,
            backends,
            operations_attempted: ops.len(),
            operations_acknowledged: ops.iter().filter(|o| o.acked()).count(),
            writes_unknown: ops
                .iter()
                .filter(|o| o.is_write() && matches!(o.outcome, Outcome::Unknown { .. }))
                .count(),
            faults_by_kind,
            faults_refused: refused,
            anomalies_by_kind,
            conditional: conditional_stats(ops),
            after_healing: AfterHealing::default(),
            anomalies,
            faults,
            timeline,
        }
    }

    pub fn summary(&self) -> String {
        format!(
            "seed {}: {} s, {} ops attempted, {} acknowledged, {} writes unknown; faults {:?}; refused {:?}; conditional writes {:?}; {:?}; anomalies {:?}",
            self.seed,
            self.duration_s,
            self.operations_attempted,
            self.operations_acknowledged,
            self.writes_unknown,
            self.faults_by_kind,
            self.faults_refused
                .iter()
                .map(|(k, _)| k)
                .collect::<Vec<_>>(),
            self.conditional,
            self.after_healing,
            self.anomalies_by_kind
        )
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// One run's timeline as an SVG: ops/s (green), errors/s (red), p99 latency (blue line, right
/// scale), fault bars under the chart, anomalies as red marks on top.
fn timeline_svg(run: &RunReport) -> String {
    let width = 1000.0;
    let chart_h = 180.0;
    let seconds = run.timeline.len().max(1) as f64;
    let x = |ms: u64| 40.0 + (ms as f64 / 1000.0) / seconds * (width - 60.0);
    let max_ops = run
        .timeline
        .iter()
        .map(|(a, b, _)| a + b)
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let max_lat = run.timeline.iter().map(|t| t.2).max().unwrap_or(1).max(1) as f64;
    let kinds: Vec<&String> = run.faults_by_kind.keys().collect();
    let height = chart_h + 40.0 + 16.0 * kinds.len() as f64;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let bar_w = (width - 60.0) / seconds;
    for (s, (ok, bad, _)) in run.timeline.iter().enumerate() {
        let x0 = x(s as u64 * 1000);
        let h_ok = *ok as f64 / max_ops * chart_h;
        let h_bad = *bad as f64 / max_ops * chart_h;
        let _ = write!(
            svg,
            r##"<rect x="{x0:.1}" y="{:.1}" width="{bar_w:.1}" height="{h_ok:.1}" fill="#7c7"/>"##,
            10.0 + chart_h - h_ok
        );
        let _ = write!(
            svg,
            r##"<rect x="{x0:.1}" y="{:.1}" width="{bar_w:.1}" height="{h_bad:.1}" fill="#e66"/>"##,
            10.0 + chart_h - h_ok - h_bad
        );
    }
    let points: Vec<String> = run
        .timeline
        .iter()
        .enumerate()
        .map(|(s, t)| {
            format!(
                "{:.1},{:.1}",
                x(s as u64 * 1000) + bar_w / 2.0,
                10.0 + chart_h - t.2 as f64 / max_lat * chart_h
            )
        })
        .collect();
    let _ = write!(
        svg,
        r##"<polyline points="{}" fill="none" stroke="#36c" stroke-width="1.5"/>"##,
        points.join(" ")
    );
    let _ = write!(
        svg,
        r##"<text x="2" y="20">{max_ops:.0}/s</text><text x="{:.0}" y="20" fill="#36c">p99 {max_lat:.0} ms</text>"##,
        width - 90.0
    );
    let step = if seconds > 300.0 { 60 } else { 10 };
    for t in (0..run.timeline.len()).step_by(step) {
        let _ = write!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" fill="#666">{t}s</text>"##,
            x(t as u64 * 1000),
            chart_h + 22.0
        );
    }
    for a in &run.anomalies {
        let _ = write!(
            svg,
            r##"<line x1="{0:.1}" x2="{0:.1}" y1="4" y2="{1:.1}" stroke="#d00" stroke-width="2"><title>{2}</title></line>"##,
            x(a.at_ms),
            10.0 + chart_h,
            escape(&format!("{}: {}", a.kind, a.what))
        );
    }
    for (row, kind) in kinds.iter().enumerate() {
        let y = chart_h + 30.0 + 16.0 * row as f64;
        let _ = write!(
            svg,
            r#"<text x="2" y="{:.1}">{}</text>"#,
            y + 10.0,
            escape(kind)
        );
        for f in run.faults.iter().filter(|f| &&f.kind == kind) {
            let _ = write!(
                svg,
                r##"<rect x="{:.1}" y="{y:.1}" width="{:.1}" height="12" fill="#889"><title>{}</title></rect>"##,
                x(f.start_ms).max(60.0),
                (x(f.end_ms) - x(f.start_ms)).max(2.0),
                escape(&f.target)
            );
        }
    }
    svg.push_str("</svg>");
    svg
}

/// The HTML page for every run of an invocation.
pub fn html(runs: &[RunReport]) -> String {
    let mut page = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>pairdb fault suite</title>\
         <style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}\
         td,th{border:1px solid #ccc;padding:2px 8px}code{font-size:11px}</style></head><body>\
         <h1>pairdb fault suite</h1><p>Green: acknowledged operations per second; red: failed or \
         unknown; blue: p99 latency; bars: faults; red marks on top: anomalies (hover for \
         details).</p>",
    );
    for run in runs {
        let _ = write!(
            page,
            "<h2>seed {} ({} s, {})</h2><p>{} operations, {} acknowledged, {} writes with unknown outcome</p>",
            run.seed,
            run.duration_s,
            run.backends,
            run.operations_attempted,
            run.operations_acknowledged,
            run.writes_unknown
        );
        page.push_str(&timeline_svg(run));
        page.push_str("<table><tr><th>fault</th><th>injected</th></tr>");
        for (k, n) in &run.faults_by_kind {
            let _ = write!(page, "<tr><td>{}</td><td>{n}</td></tr>", escape(k));
        }
        for (k, why) in &run.faults_refused {
            let _ = write!(
                page,
                "<tr><td>{}</td><td>refused: {}</td></tr>",
                escape(k),
                escape(why)
            );
        }
        page.push_str("</table><h3>anomalies</h3><ul>");
        if run.anomalies.is_empty() {
            page.push_str("<li>none</li>");
        }
        for a in &run.anomalies {
            let _ = write!(
                page,
                "<li><b>{}</b> {}/{}: <code>{}</code></li>",
                a.kind,
                escape(&a.tenant),
                escape(&a.key),
                escape(&a.what)
            );
        }
        page.push_str("</ul>");
    }
    page.push_str("</body></html>");
    page
}
