//! Prometheus metrics for every role: one process-wide recorder (the `metrics` facade with the
//! Prometheus exporter), rendered by each role's `/metrics`.
//!
//! Invariant: histogram samples are folded into their summaries every `UPKEEP_EVERY` by a
//! thread of their own, so memory stays bounded whether or not anything scrapes `/metrics`
//! (the recorder alone keeps every sample until the next render).

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// How often pending histogram samples are folded into their summaries.
const UPKEEP_EVERY: Duration = Duration::from_secs(1);

/// Installs the recorder on first use; `None` if another recorder was installed first.
pub fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| match PrometheusBuilder::new().install_recorder() {
            Ok(h) => {
                start_upkeep(h.clone());
                Some(h)
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics recorder not installed");
                None
            }
        })
        .as_ref()
}

fn start_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".to_owned())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_EVERY);
                handle.run_upkeep();
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "metrics upkeep thread not started: histograms grow until scraped");
    }
}

/// Registers counters at 0: those that alert rules and dashboards (deploy/prometheus,
/// deploy/grafana) watch for rare events are exported from the start, since a series that
/// appears only with its first event has no `increase()` to alert on, and an absent one looks
/// like a renamed metric. Each is `(name, label)`, the label pair it is registered under if it
/// has one. Idempotent.
pub fn register_counters(names: &[(&'static str, Option<(&'static str, &'static str)>)]) {
    for (name, label) in names {
        match label {
            Some((key, value)) => metrics::counter!(*name, *key => *value).increment(0),
            None => metrics::counter!(*name).increment(0),
        }
    }
}

/// The Prometheus text exposition of everything recorded so far.
pub fn render() -> String {
    handle().map(PrometheusHandle::render).unwrap_or_default()
}
