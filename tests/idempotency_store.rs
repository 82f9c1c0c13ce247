//! One test suite for both idempotency stores: in-process and Redis (a throwaway redis-server
//! on a free port; skipped with a message when the binary is missing, a failure under CI=true).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use common::backends::{Redis, skip_or_fail};
use std::sync::Arc;
use std::time::Duration;

use pairdb::idempotency::{
    Claim, IdempotencyStore, LockToken, MemoryIdempotencyStore, RedisIdempotencyStore,
    StoredResponse, store_key,
};

/// The token of a claim that must have acquired the lock.
fn acquired(claim: Claim) -> LockToken {
    match claim {
        Claim::Acquired(token) => token,
        other => panic!("expected the lock, got {other:?}"),
    }
}

fn response(fp: &str, body: &[u8]) -> StoredResponse {
    StoredResponse {
        fingerprint: fp.into(),
        response: body.to_vec(),
    }
}

async fn suite(store: Arc<dyn IdempotencyStore>) {
    store.ping().await.expect("ping");
    let long = Duration::from_secs(30);

    // The first request takes the lock; a duplicate waits; after completion it replays.
    let k1 = store_key("acme", b"user:1", "req-1");
    let lock1 = acquired(store.claim(&k1, long).await.expect("claim"));
    assert_eq!(store.claim(&k1, long).await.expect("claim"), Claim::Busy);
    store
        .complete(&k1, &lock1, &response("fp-a", b"{\"ok\":1}\x00\xff"), long)
        .await
        .expect("complete");
    assert_eq!(
        store.claim(&k1, long).await.expect("claim"),
        Claim::Done(response("fp-a", b"{\"ok\":1}\x00\xff"))
    );

    // Keys are per tenant, key and idempotency key.
    for other in [
        store_key("globex", b"user:1", "req-1"),
        store_key("acme", b"user:2", "req-1"),
        store_key("acme", b"user:1", "req-2"),
    ] {
        acquired(store.claim(&other, long).await.expect("claim"));
    }

    // A deleted tenant's responses go, and only its own: not a later incarnation's ("t:2"),
    // nor those of a tenant whose id merely starts alike, glob characters and all.
    let namespaced = |ns: &str, req: &str| store_key(ns, b"user:1", req);
    for ns in ["t*", "t*:2", "t*x", "u"] {
        let k = namespaced(ns, "r:1");
        let lock = acquired(store.claim(&k, long).await.expect("claim"));
        store
            .complete(&k, &lock, &response("fp", ns.as_bytes()), long)
            .await
            .expect("complete");
    }
    assert_eq!(store.forget_namespace("t*").await.expect("forget"), 1);
    acquired(
        store
            .claim(&namespaced("t*", "r:1"), long)
            .await
            .expect("claim"),
    );
    for ns in ["t*:2", "t*x", "u"] {
        assert_eq!(
            store
                .claim(&namespaced(ns, "r:1"), long)
                .await
                .expect("claim"),
            Claim::Done(response("fp", ns.as_bytes())),
            "{ns}"
        );
    }
    assert_eq!(store.forget_namespace("nobody").await.expect("forget"), 0);

    // A failed write releases the lock: a retry may try again.
    let k2 = store_key("acme", b"k2", "r");
    let lock2 = acquired(store.claim(&k2, long).await.expect("claim"));
    store.release(&k2, &lock2).await.expect("release");
    acquired(store.claim(&k2, long).await.expect("claim"));

    // A lock expires (a crashed coordinator does not block the key forever)...
    let k3 = store_key("acme", b"k3", "r");
    let outlived = acquired(
        store
            .claim(&k3, Duration::from_millis(200))
            .await
            .expect("claim"),
    );
    assert_eq!(store.claim(&k3, long).await.expect("claim"), Claim::Busy);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let successor = acquired(store.claim(&k3, long).await.expect("claim"));
    assert_ne!(outlived, successor, "every lock gets its own token");
    // ... and a holder that outlived its lock does not release its successor's lock.
    store.release(&k3, &outlived).await.expect("release");
    assert_eq!(
        store.claim(&k3, long).await.expect("claim"),
        Claim::Busy,
        "a stale owner released its successor's lock"
    );
    // Its late response is still kept (the write happened), but the lock stays the
    // successor's until the successor completes.
    store
        .complete(&k3, &outlived, &response("fp", b"late"), long)
        .await
        .expect("complete");
    assert_eq!(
        store.claim(&k3, long).await.expect("claim"),
        Claim::Done(response("fp", b"late"))
    );
    store.release(&k3, &successor).await.expect("release");

    // ... and so does a stored response, after its TTL.
    let k4 = store_key("acme", b"k4", "r");
    let lock4 = acquired(store.claim(&k4, long).await.expect("claim"));
    store
        .complete(
            &k4,
            &lock4,
            &response("fp", b"r"),
            Duration::from_millis(300),
        )
        .await
        .expect("complete");
    assert!(matches!(
        store.claim(&k4, long).await.expect("claim"),
        Claim::Done(_)
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    acquired(store.claim(&k4, long).await.expect("claim"));

    // Twenty concurrent duplicates: exactly one may write.
    let k5 = store_key("acme", b"k5", "r");
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let store = store.clone();
            let k5 = k5.clone();
            tokio::spawn(async move {
                store
                    .claim(&k5, Duration::from_secs(30))
                    .await
                    .expect("claim")
            })
        })
        .collect();
    let mut winners = 0;
    for t in tasks {
        if matches!(t.await.expect("task"), Claim::Acquired(_)) {
            winners += 1;
        }
    }
    assert_eq!(winners, 1);
}

#[tokio::test]
async fn the_memory_store_drops_expired_entries() {
    let store = MemoryIdempotencyStore::new();
    let short = Duration::from_millis(100);
    for i in 0..1000 {
        let key = store_key("acme", format!("k{i}").as_bytes(), "r");
        let lock = acquired(store.claim(&key, short).await.expect("claim"));
        if i % 2 == 0 {
            store
                .complete(&key, &lock, &response("fp", b"r"), short)
                .await
                .expect("complete");
        }
    }
    assert_eq!(store.len(), 1000);
    tokio::time::sleep(Duration::from_millis(250)).await;
    acquired(store.claim("another", short).await.expect("claim"));
    assert_eq!(store.len(), 1, "expired locks and responses must go");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_passes_the_suite() {
    suite(Arc::new(MemoryIdempotencyStore::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_passes_the_suite() {
    let Some(redis) = Redis::start() else {
        skip_or_fail(
            "redis_store_passes_the_suite",
            "redis-server (apt-get install redis-server)",
        );
        return;
    };
    let store = RedisIdempotencyStore::connect(&redis.url())
        .await
        .expect("connect");
    suite(Arc::new(store)).await;
}

#[tokio::test]
async fn an_unreachable_redis_is_unavailable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let result = tokio::time::timeout(
        Duration::from_secs(20),
        RedisIdempotencyStore::connect(&format!("redis://127.0.0.1:{port}")),
    )
    .await
    .expect("connect gives up by itself");
    assert!(result.is_err());
}
