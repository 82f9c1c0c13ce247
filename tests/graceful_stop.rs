//! Ordered stops under load, over real processes (3 storage nodes, 2 coordinators, 2 gateways):
//! SIGTERM to a gateway, then a coordinator, then a storage node while writers keep sending
//! writes without an Idempotency-Key. Each process exits 0; no write that was in flight comes
//! back failed or OUTCOME_UNKNOWN (a coordinator answers the calls it read and hands back the
//! others, which the gateway sends to the other coordinator); every acknowledged write reads
//! back, and after the stopped storage node returned, every replica holds every write.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::cluster::{RoleProcess, start_storage};
use common::coord::{create_tenant, eventually, sqlite_url, stored, wait_all_active};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// Gateways without auth, with rate limits out of the writers' way.
const FLAGS: [&str; 3] = [
    "--auth=none",
    "--write-rate-limit=1000000",
    "--read-rate-limit=1000000",
];

/// What one write got.
#[derive(Debug)]
enum Outcome {
    /// An HTTP answer: status and body.
    Answered(StatusCode, Value),
    /// No answer: the connection was refused (the gateway no longer listens).
    Refused,
    /// The connection was closed under the request before any answer (reset, or closed
    /// before the response): the gateway closed an idle kept-alive connection at the end of
    /// its lame duck as the request arrived. It never read the request, so it must not have
    /// been carried out (checked), and the client may safely send it again.
    ClosedUnread(String),
    /// No answer for another reason (the request may have been sent).
    Lost(String),
}

/// `writers` tasks writing distinct keys `{prefix}-{w}-{i}` through `gateway` until `stop`.
fn start_writers(
    gateway: String,
    prefix: &'static str,
    writers: usize,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<(String, Outcome)>>> {
    (0..writers)
        .map(|w| {
            let (gateway, stop) = (gateway.clone(), stop.clone());
            tokio::spawn(async move {
                let client = pairdb::tools::client::http_builder(None)
                    .expect("http client")
                    .build()
                    .expect("http client");
                let mut outcomes = Vec::new();
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    let key = format!("{prefix}-{w}-{i}");
                    i += 1;
                    let sent = client
                        .post(format!("{gateway}/v1/key-value"))
                        .header("x-tenant-id", "acme")
                        .header("content-type", "application/json")
                        .timeout(Duration::from_secs(30))
                        .body(
                            json!({"key": key, "value": key, "consistency": "quorum"}).to_string(),
                        )
                        .send()
                        .await;
                    let outcome = match sent {
                        Ok(response) => {
                            let status = response.status();
                            let body = response.json().await.unwrap_or(Value::Null);
                            Outcome::Answered(status, body)
                        }
                        Err(e) if e.is_connect() => Outcome::Refused,
                        Err(e) => {
                            let why = format!("{e:?}");
                            if why.contains("ConnectionReset") || why.contains("IncompleteMessage")
                            {
                                Outcome::ClosedUnread(why)
                            } else {
                                Outcome::Lost(why)
                            }
                        }
                    };
                    let refused = matches!(outcome, Outcome::Refused | Outcome::ClosedUnread(_));
                    outcomes.push((key, outcome));
                    if refused {
                        break; // this gateway is gone
                    }
                }
                outcomes
            })
        })
        .collect()
}

/// Runs writers through `gateway` for a while, calls `stop_one` in the middle (it returns the
/// stopped process's exit status), and returns every write's outcome.
async fn writes_around_a_stop(
    gateway: String,
    prefix: &'static str,
    stop_one: impl FnOnce() -> std::process::ExitStatus,
) -> Vec<(String, Outcome)> {
    let stop = Arc::new(AtomicBool::new(false));
    let writers = start_writers(gateway, prefix, 8, stop.clone());
    tokio::time::sleep(Duration::from_millis(800)).await;
    let started = Instant::now();
    let status = tokio::task::block_in_place(stop_one);
    assert_eq!(status.code(), Some(0), "{prefix}: SIGTERM exits 0");
    eprintln!("{prefix}: stopped in {:?}", started.elapsed());
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    let mut all = Vec::new();
    for w in writers {
        all.extend(w.await.expect("writer"));
    }
    all
}

/// Keys of the writes acknowledged with 200, and of those whose connection the stopping
/// gateway closed unread (only when `gateway_stops`); panics on any other answer or a lost
/// call.
fn acknowledged(
    prefix: &str,
    outcomes: &[(String, Outcome)],
    gateway_stops: bool,
) -> (Vec<String>, Vec<String>) {
    let (mut ok, mut unread) = (Vec::new(), Vec::new());
    for (key, outcome) in outcomes {
        match outcome {
            Outcome::Answered(StatusCode::OK, body) if body["key"] == json!(key) => {
                ok.push(key.clone());
            }
            Outcome::Answered(status, body) => panic!("{prefix}: write {key}: {status} {body}"),
            Outcome::Refused if gateway_stops => {}
            Outcome::Refused => panic!("{prefix}: write {key}: the gateway refused the connection"),
            Outcome::ClosedUnread(_) if gateway_stops => unread.push(key.clone()),
            Outcome::ClosedUnread(why) | Outcome::Lost(why) => {
                panic!("{prefix}: write {key} got no answer: {why}")
            }
        }
    }
    assert!(ok.len() > 40, "{prefix}: too few writes ran: {}", ok.len());
    (ok, unread)
}

async fn read(gateway: &RoleProcess, key: &str, level: &str) -> (StatusCode, Value) {
    let response = pairdb::tools::client::http_builder(None)
        .expect("http client")
        .build()
        .expect("http client")
        .get(format!(
            "{}/v1/key-value?key={key}&consistency={level}",
            gateway.url()
        ))
        .header("x-tenant-id", "acme")
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("read");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_stops_under_load_without_dropping_what_is_in_flight() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut storage = start_storage(3, dir.path());
    let env = [("PAIRDB_COORDINATOR_HINT_REPLAY_INTERVAL_MS", "300")];
    let meta = sqlite_url(dir.path());
    let c1 = RoleProcess::coordinator("c1", &meta, "memory://", &storage, &env, dir.path());
    let c2 = RoleProcess::coordinator("c2", &meta, "memory://", &storage, &env, dir.path());
    let mut c = c2.client().await;
    wait_all_active(&c, 3).await;
    create_tenant(&mut c, "acme", 3).await;
    let mut c1 = c1;
    let mut gw1 = RoleProcess::gateway("gw1", &[&c1, &c2], &FLAGS, &[], dir.path());
    let gw2 = RoleProcess::gateway("gw2", &[&c1, &c2], &FLAGS, &[], dir.path());

    // 1. The gateway: requests it took are answered; afterwards it refuses connections.
    let outcomes = writes_around_a_stop(gw1.url(), "gateway", || gw1.terminate()).await;
    let (mut written, unread) = acknowledged("gateway", &outcomes, true);
    assert!(
        outcomes
            .iter()
            .any(|(_, o)| matches!(o, Outcome::Refused | Outcome::ClosedUnread(_))),
        "the writers never saw the gateway gone"
    );
    for key in &unread {
        let (status, body) = read(&gw2, key, "all").await;
        assert_eq!(
            (status, body["error_code"].as_str()),
            (StatusCode::NOT_FOUND, Some("KEY_NOT_FOUND")),
            "{key}: its connection was closed unread, yet it was written: {body}"
        );
    }

    // 2. A coordinator: the gateway's calls on it are answered or handed back and resent to
    //    the other coordinator, none OUTCOME_UNKNOWN (these writes carry no Idempotency-Key).
    let outcomes = writes_around_a_stop(gw2.url(), "coordinator", || c1.terminate()).await;
    written.extend(acknowledged("coordinator", &outcomes, false).0);
    let log = std::fs::read_to_string(&c1.log).expect("c1 log");
    assert!(log.contains("coordinator stopped cleanly"), "{log}");

    // 3. A storage node: quorum writes go on; the node answers what it took and closes its
    //    engine.
    let outcomes = writes_around_a_stop(gw2.url(), "storage", || storage[2].terminate()).await;
    written.extend(acknowledged("storage", &outcomes, false).0);

    for key in &written {
        let (status, body) = read(&gw2, key, "quorum").await;
        assert_eq!(status, StatusCode::OK, "{key}: {body}");
        assert_eq!(body["value"], json!(key), "{key}: {body}");
    }
    storage[2].restart();
    for node in &storage {
        for key in &written {
            let node_ref = node;
            eventually(
                &format!("{} holds {key}", node.id),
                Duration::from_secs(60),
                || async move { stored(node_ref, "acme", key).await.is_some() },
            )
            .await;
        }
    }
    for key in written.iter().step_by(7) {
        let (status, body) = read(&gw2, key, "all").await;
        assert_eq!(status, StatusCode::OK, "{key}: {body}");
        assert_eq!(body["value"], json!(key), "{key}: {body}");
    }
}
