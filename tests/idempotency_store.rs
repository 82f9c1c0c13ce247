//! One test suite for both idempotency stores: in-process and Redis (a throwaway redis-server
//! on a free port; skipped with a message when the binary is missing, a failure under CI=true).

mod common;

use common::backends::{Redis, skip_or_fail};
use std::sync::Arc;
use std::time::Duration;

use pairdb::idempotency::{
    Claim, IdempotencyStore, MemoryIdempotencyStore, RedisIdempotencyStore, StoredResponse,
    store_key,
};

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
    assert_eq!(
        store.claim(&k1, long).await.expect("claim"),
        Claim::Acquired
    );
    assert_eq!(store.claim(&k1, long).await.expect("claim"), Claim::Busy);
    store
        .complete(&k1, &response("fp-a", b"{\"ok\":1}\x00\xff"), long)
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
        assert_eq!(
            store.claim(&other, long).await.expect("claim"),
            Claim::Acquired
        );
    }

    // A failed write releases the lock: a retry may try again.
    let k2 = store_key("acme", b"k2", "r");
    assert_eq!(
        store.claim(&k2, long).await.expect("claim"),
        Claim::Acquired
    );
    store.release(&k2).await.expect("release");
    assert_eq!(
        store.claim(&k2, long).await.expect("claim"),
        Claim::Acquired
    );

    // A lock expires (a crashed coordinator does not block the key forever)...
    let k3 = store_key("acme", b"k3", "r");
    assert_eq!(
        store
            .claim(&k3, Duration::from_millis(200))
            .await
            .expect("claim"),
        Claim::Acquired
    );
    assert_eq!(store.claim(&k3, long).await.expect("claim"), Claim::Busy);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        store.claim(&k3, long).await.expect("claim"),
        Claim::Acquired
    );

    // ... and so does a stored response, after its TTL.
    let k4 = store_key("acme", b"k4", "r");
    assert_eq!(
        store.claim(&k4, long).await.expect("claim"),
        Claim::Acquired
    );
    store
        .complete(&k4, &response("fp", b"r"), Duration::from_millis(300))
        .await
        .expect("complete");
    assert!(matches!(
        store.claim(&k4, long).await.expect("claim"),
        Claim::Done(_)
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        store.claim(&k4, long).await.expect("claim"),
        Claim::Acquired
    );

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
    let mut acquired = 0;
    for t in tasks {
        if t.await.expect("task") == Claim::Acquired {
            acquired += 1;
        }
    }
    assert_eq!(acquired, 1);
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
    let store = RedisIdempotencyStore::connect(&format!("redis://127.0.0.1:{}", redis.port))
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
