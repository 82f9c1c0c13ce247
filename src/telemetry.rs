//! Logging and, optionally, OpenTelemetry export of spans (OTLP over gRPC) for the server
//! roles. Off unless `[node] otlp_endpoint` (`--otlp-endpoint`, `PAIRDB_NODE_OTLP_ENDPOINT`) is
//! set: then every span a role records (each call runs in a `request` span carrying its
//! `request_id`, see `rpc::trace`; a storage node's batch calls in a `batch` span naming their
//! `request_ids`) is also exported, in batches, to that collector, with the
//! service name `pairdb-<roles>` and the node id as resource attributes. Spans of the hops of
//! one request are tied together by their `request_id` attribute (no trace-context
//! propagation between roles).
//!
//! The exporter is built inside the runtime (its gRPC channel spawns a task there); batches
//! leave from the SDK's own thread. [`Telemetry`]'s drop flushes what is pending.

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::config::LogFormat;

/// Keeps the exporter alive; flushes pending spans when dropped.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(e) = provider.shutdown() {
                eprintln!("pairdb: flushing spans to the OTLP collector failed: {e}");
            }
        }
    }
}

/// What the spans say about their origin.
pub struct Origin<'a> {
    /// e.g. "pairdb-storage", "pairdb-coordinator+gateway".
    pub service: String,
    pub node_id: Option<&'a str>,
}

/// Installs the global subscriber: logs on stderr (`format`, filtered by `level`), and spans
/// to `otlp_endpoint` when set. Must run inside a Tokio runtime when `otlp_endpoint` is set.
pub fn init(
    format: LogFormat,
    level: &str,
    otlp_endpoint: Option<&str>,
    origin: Origin<'_>,
) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: log files and collectors get plain `key=value` text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs: Box<dyn Layer<Registry> + Send + Sync> = match format {
        LogFormat::Human => tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let provider = match otlp_endpoint {
        None => None,
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .map_err(|e| {
                    anyhow::anyhow!("cannot set up the OTLP exporter to {endpoint}: {e}")
                })?;
            let mut resource = Resource::builder().with_service_name(origin.service);
            if let Some(id) = origin.node_id {
                resource =
                    resource.with_attribute(KeyValue::new("service.instance.id", id.to_owned()));
            }
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource.build())
                    .build(),
            )
        }
    };
    // The log level filters the logs only: pairdb's spans are exported at info whatever it
    // is (a node logging at warn still exports its `request` spans).
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("pairdb"))
            .with_filter(Targets::new().with_target("pairdb", Level::INFO))
    });
    tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(otel)
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot install the log subscriber: {e}"))?;
    Ok(Telemetry { provider })
}
