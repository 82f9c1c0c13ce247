//! OpenTelemetry export over real processes: a storage node, a coordinator and a gateway started
//! with `PAIRDB_NODE_OTLP_ENDPOINT` pointing at a collector this test runs (the OTLP gRPC trace
//! service, from opentelemetry-proto): one request with a known `X-Request-ID` yields a span
//! carrying that id from each role (`request`; a storage node's `batch` names the requests of
//! the batch it serves), under each role's service name.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::RoleProcess;
use common::coord::{create_tenant, sqlite_url, wait_all_active};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use parking_lot::Mutex;
use serde_json::json;

/// (service name, span name, request_id attribute) of every span received.
type Received = Arc<Mutex<Vec<(String, String, Option<String>)>>>;

struct Collector(Received);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let string = |v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>| match v
            .as_ref()
            .and_then(|v| v.value.as_ref())
        {
            Some(AnyValue::StringValue(s)) => Some(s.clone()),
            _ => None,
        };
        let mut received = self.0.lock();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| string(&a.value))
                .unwrap_or_default();
            for span in resource_spans.scope_spans.iter().flat_map(|s| &s.spans) {
                // A `request` span names its request; a storage node's `batch` span the
                // requests of the batch it serves.
                let request_id = span
                    .attributes
                    .iter()
                    .find(|a| a.key == "request_id" || a.key == "request_ids")
                    .and_then(|a| string(&a.value));
                received.push((service.clone(), span.name.clone(), request_id));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn start_collector() -> (SocketAddr, Received) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received: Received = Arc::default();
    let service = TraceServiceServer::new(Collector(received.clone()));
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (addr, received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_exports_its_span_of_a_request_to_the_collector() {
    let (collector, received) = start_collector().await;
    let endpoint = format!("http://{collector}");
    let env = [
        ("PAIRDB_NODE_OTLP_ENDPOINT", endpoint.as_str()),
        // Batches leave every 100 ms instead of 5 s.
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let dir = tempfile::tempdir().unwrap();
    let storage = common::cluster::start_storage_with_env(1, dir.path(), &env);
    let c1 = RoleProcess::coordinator(
        "c1",
        &sqlite_url(dir.path()),
        "memory://",
        &storage,
        &env,
        dir.path(),
    );
    let gw = RoleProcess::gateway("gw", &[&c1], &["--auth=none"], &env, dir.path());
    let mut c = c1.client().await;
    wait_all_active(&c, 1).await;
    create_tenant(&mut c, "acme", 1).await;

    let id = "otlp-trace-check-1";
    let response = common::http_client()
        .post(format!("{}/v1/key-value", gw.url()))
        .header("X-Tenant-ID", "acme")
        .header("X-Request-ID", id)
        .json(&json!({"key": "k", "value": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let want = ["pairdb-gateway", "pairdb-coordinator", "pairdb-storage"];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let seen: Vec<String> = received
            .lock()
            .iter()
            .filter(|(_, name, rid)| match name.as_str() {
                "request" => rid.as_deref() == Some(id),
                "batch" => rid
                    .as_deref()
                    .is_some_and(|ids| ids.split(',').any(|i| i == id)),
                _ => false,
            })
            .map(|(service, _, _)| service.clone())
            .collect();
        if want.iter().all(|w| seen.iter().any(|s| s == w)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "spans of request {id} from {want:?}; got {seen:?} (all: {:?})",
            received.lock().len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
