//! How the admin tools show a migration's progress: one line per migration for
//! `pairdb admin migrations`, a live bar for `--wait`. Both read the API's migration JSON.

use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use serde_json::Value;

/// Width of the text bar.
const BAR: usize = 24;

/// What a migration has done: keys, the estimated total, bytes, and keys per second since the
/// start (when the start parses).
struct Progress {
    done: u64,
    total: u64,
    bytes: u64,
    rate: Option<f64>,
}

fn progress(m: &Value) -> Progress {
    let done = m["progress"]["keys_migrated"].as_u64().unwrap_or(0);
    let total = m["progress"]["total_keys"].as_u64().unwrap_or(0);
    let bytes = m["progress"]["bytes_migrated"].as_u64().unwrap_or(0);
    let started = m["started_at"]
        .as_str()
        .and_then(|s| humantime::parse_rfc3339_weak(s).ok());
    let rate = started
        .and_then(|t| std::time::SystemTime::now().duration_since(t).ok())
        .filter(|elapsed| !elapsed.is_zero())
        .map(|elapsed| done as f64 / elapsed.as_secs_f64());
    Progress {
        done,
        total,
        bytes,
        rate,
    }
}

/// `[#########---------------]  37%  1200/3200 keys  1.17 MiB  410 keys/s  ETA 5s`.
fn bar_text(p: &Progress, state: &str) -> String {
    let Progress {
        done,
        total,
        bytes,
        rate,
    } = *p;
    let share = if total == 0 {
        if state == "completed" { 1.0 } else { 0.0 }
    } else {
        (done as f64 / total as f64).min(1.0)
    };
    let filled = (share * BAR as f64).round() as usize;
    let mut text = format!(
        "[{}{}] {:>3.0}%  {done}/{total} keys  {}",
        "#".repeat(filled),
        "-".repeat(BAR - filled),
        share * 100.0,
        HumanBytes(bytes)
    );
    if let Some(r) = rate.filter(|r| *r > 0.0) {
        text.push_str(&format!("  {r:.0} keys/s"));
        if state == "in_progress" && total > done {
            text.push_str(&format!("  ETA {:.0}s", (total - done) as f64 / r));
        }
    }
    text
}

/// One line for a migration: id, type, node, state, the bar, and the reason of a failure.
pub fn migration_line(m: &Value) -> String {
    let state = m["state"].as_str().unwrap_or("?");
    let mut p = progress(m);
    if state != "in_progress" {
        p.rate = None;
    }
    let mut line = format!(
        "{}  {:<25} {:<8} {:<11} {}",
        m["migration_id"].as_str().unwrap_or("?"),
        m["type"].as_str().unwrap_or("?"),
        m["node_id"].as_str().unwrap_or("?"),
        state,
        bar_text(&p, state)
    );
    if let Some(reason) = m["failure_reason"].as_str() {
        line.push_str(&format!("\n    failed: {reason}"));
    }
    line
}

/// A live bar on stderr (hidden when stderr is not a terminal).
pub fn bar(migration_id: &str) -> ProgressBar {
    let bar = ProgressBar::new(1);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:24}] {pos}/{len} keys  {per_sec}  ETA {eta}  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_prefix(migration_id.to_owned());
    bar
}

/// Moves the bar to a migration's latest progress.
pub fn update(bar: &ProgressBar, m: &Value) {
    let p = progress(m);
    bar.set_length(p.total.max(p.done).max(1));
    bar.set_position(p.done);
    let state = m["state"].as_str().unwrap_or("");
    bar.set_message(format!("{}  {state}", HumanBytes(p.bytes)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_line_shows_progress_rate_eta_and_failures() {
        let running = json!({
            "migration_id": "add-1", "type": "node_addition", "node_id": "s4",
            "state": "in_progress", "started_at": "2000-01-01T00:00:00Z",
            "progress": {"keys_migrated": 250, "total_keys": 1000, "bytes_migrated": 3_145_728}
        });
        let line = migration_line(&running);
        assert!(
            line.contains("[######------------------]  25%  250/1000 keys  3.00 MiB"),
            "{line}"
        );
        assert!(line.contains("keys/s") && line.contains("ETA"), "{line}");
        let failed = json!({
            "migration_id": "add-2", "type": "node_addition", "node_id": "s5",
            "state": "failed", "failure_reason": "no stream progressed for 3 s",
            "progress": {"keys_migrated": 0, "total_keys": 0}
        });
        let line = migration_line(&failed);
        assert!(
            line.contains("failed: no stream progressed for 3 s"),
            "{line}"
        );
        assert!(!line.contains("ETA"), "{line}");
        let done = Progress {
            done: 5,
            total: 5,
            bytes: 0,
            rate: None,
        };
        assert_eq!(
            bar_text(&done, "completed"),
            format!("[{}] 100%  5/5 keys  0 B", "#".repeat(24))
        );
    }
}
