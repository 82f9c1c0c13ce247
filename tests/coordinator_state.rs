//! Coordinator state over a real (SQLite) metadata store. Tenant cache: fresh entries, TTL expiry, local
//! invalidation, stale entries served while the store is down. Clock: durable across restarts.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

use std::sync::Arc;
use std::time::Duration;

use pairdb::coordinator::tenant_cache::TenantCache;
use pairdb::meta::{MetaError, MetadataStore, SqlMetadataStore};

/// The replication factor the cache answers for a tenant.
async fn rf(cache: &TenantCache, tenant: &str) -> Option<u32> {
    cache
        .get(tenant)
        .await
        .expect("get")
        .map(|t| t.replication_factor)
}

#[tokio::test]
async fn cache_serves_fresh_then_refreshes_and_survives_an_outage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("meta.db").display());
    let store = Arc::new(SqlMetadataStore::connect(&url).await.expect("connect"));
    let other_coordinator = SqlMetadataStore::connect(&url).await.expect("connect");
    store.create_tenant("acme", 3).await.expect("create");
    let cache = TenantCache::new(store.clone(), Duration::from_millis(300));

    assert_eq!(rf(&cache, "acme").await, Some(3));
    assert_eq!(cache.get("nobody").await.expect("get"), None);

    // Another coordinator changes the RF: this one sees it once the entry is older than the TTL.
    other_coordinator
        .update_replication_factor("acme", 5)
        .await
        .expect("update");
    assert_eq!(rf(&cache, "acme").await, Some(3));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(rf(&cache, "acme").await, Some(5));

    // A local change replaces the entry at once.
    let before = store
        .update_replication_factor("acme", 2)
        .await
        .expect("update");
    let mut changed = before.clone();
    changed.replication_factor = 2;
    cache.put(changed);
    assert_eq!(rf(&cache, "acme").await, Some(2));

    // The store goes down: the known tenant keeps working past its TTL, an unknown one fails.
    store.close().await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(rf(&cache, "acme").await, Some(2));
    assert!(matches!(
        cache.get("globex").await,
        Err(MetaError::Unavailable(_))
    ));
}

#[tokio::test]
async fn a_restarted_coordinator_never_reissues_a_counter() {
    use pairdb::coordinator::clock::CoordinatorClock;
    use pairdb::vclock::CLOCK_EPOCH_MS;
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("meta.db").display());
    let store: Arc<dyn MetadataStore> =
        Arc::new(SqlMetadataStore::connect(&url).await.expect("connect"));
    let now = CLOCK_EPOCH_MS + 200_000_000;
    let clock = CoordinatorClock::resume("c1", store.clone(), 60_000)
        .await
        .expect("resume");
    let mut last = 0;
    for i in 0..100 {
        let c = clock.next_at(now + i, 0).await.expect("next");
        assert!(c > last);
        last = c;
    }
    drop(clock);
    // Restart with the wall clock an hour behind: still above everything issued.
    let restarted = CoordinatorClock::resume("c1", store.clone(), 60_000)
        .await
        .expect("resume");
    let after = restarted.next_at(now - 3_600_000, 0).await.expect("next");
    assert!(after > last, "{after} <= {last}");
    // Another coordinator's clock is independent, and a counter is always above what it observed.
    let other = CoordinatorClock::resume("c2", store.clone(), 60_000)
        .await
        .expect("resume");
    assert!(other.next_at(now, after + 10).await.expect("next") > after + 10);
    // A counter whose reservation the store cannot hold (beyond i64) fails that one request and
    // leaves the clock where it was: the next counter is the ordinary next one.
    let before = other.last().await;
    assert!(other.next_at(now, i64::MAX as u64).await.is_err());
    let next = other
        .next_at(now, 0)
        .await
        .expect("next after a failed reservation");
    assert_eq!(
        next,
        before + 1,
        "the clock moved although its mark was not stored"
    );
    assert!(store.load_clock("c2").await.expect("load") < i64::MAX as u64);
}
