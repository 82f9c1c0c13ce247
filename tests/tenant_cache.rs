//! The tenant cache over a real (SQLite) metadata store: fresh entries, TTL expiry, local
//! invalidation, and stale entries served while the store is down.

use std::sync::Arc;
use std::time::Duration;

use pairdb::coordinator::tenant_cache::TenantCache;
use pairdb::meta::{MetaError, MetadataStore, SqlMetadataStore};

#[tokio::test]
async fn cache_serves_fresh_then_refreshes_and_survives_an_outage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("meta.db").display());
    let store = Arc::new(SqlMetadataStore::connect(&url).await.expect("connect"));
    let other_coordinator = SqlMetadataStore::connect(&url).await.expect("connect");
    store.create_tenant("acme", 3).await.expect("create");
    let cache = TenantCache::new(store.clone(), Duration::from_millis(300));

    assert_eq!(
        cache
            .get("acme")
            .await
            .expect("get")
            .map(|t| t.replication_factor),
        Some(3)
    );
    assert_eq!(cache.get("nobody").await.expect("get"), None);

    // Another coordinator changes the RF: this one sees it once the entry is older than the TTL.
    other_coordinator
        .update_replication_factor("acme", 5)
        .await
        .expect("update");
    assert_eq!(
        cache
            .get("acme")
            .await
            .expect("get")
            .map(|t| t.replication_factor),
        Some(3)
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        cache
            .get("acme")
            .await
            .expect("get")
            .map(|t| t.replication_factor),
        Some(5)
    );

    // A local change replaces the entry at once.
    let before = store
        .update_replication_factor("acme", 2)
        .await
        .expect("update");
    let mut changed = before.clone();
    changed.replication_factor = 2;
    cache.put(changed);
    assert_eq!(
        cache
            .get("acme")
            .await
            .expect("get")
            .map(|t| t.replication_factor),
        Some(2)
    );

    // The store goes down: the known tenant keeps working past its TTL, an unknown one fails.
    store.close().await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        cache
            .get("acme")
            .await
            .expect("stale but served")
            .map(|t| t.replication_factor),
        Some(2)
    );
    assert!(matches!(
        cache.get("globex").await,
        Err(MetaError::Unavailable(_))
    ));
}
