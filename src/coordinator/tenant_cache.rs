//! Tenant config cache (SEMANTICS.md, "Tenant config"): entries are fresh for a TTL (5 min by
//! default), replaced when this coordinator changes a tenant, and kept past their TTL while
//! the metadata store is unreachable, so known tenants keep working through an outage. An
//! unknown tenant during an outage is an error (the caller answers 503).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use tokio::time::Instant;

use crate::meta::{MetaError, MetadataStore, Tenant};

pub const DEFAULT_TTL: Duration = Duration::from_secs(300);

pub struct TenantCache {
    store: Arc<dyn MetadataStore>,
    ttl: Duration,
    entries: RwLock<HashMap<String, (Tenant, Instant)>>,
    /// The storage namespaces of deleted incarnations, as of the last `forget_deleted`.
    deleted: RwLock<Vec<String>>,
}

impl TenantCache {
    pub fn new(store: Arc<dyn MetadataStore>, ttl: Duration) -> Self {
        Self {
            store,
            ttl,
            entries: RwLock::new(HashMap::new()),
            deleted: RwLock::new(Vec::new()),
        }
    }

    /// The tenant, from the cache while fresh, else from the store (stale when the store fails).
    pub async fn get(&self, tenant_id: &str) -> Result<Option<Tenant>, MetaError> {
        let cached = self.entries.read().get(tenant_id).cloned();
        if let Some((tenant, at)) = &cached {
            if at.elapsed() < self.ttl {
                return Ok(Some(tenant.clone()));
            }
        }
        match self.store.get_tenant(tenant_id).await {
            Ok(Some(tenant)) => {
                self.put(tenant.clone());
                Ok(Some(tenant))
            }
            Ok(None) => {
                self.invalidate(tenant_id);
                Ok(None)
            }
            Err(e) => match cached {
                Some((tenant, _)) => {
                    tracing::warn!(tenant = tenant_id, error = %e, "metadata store unavailable; serving cached tenant");
                    metrics::counter!("pairdb_tenant_cache_stale_served_total").increment(1);
                    Ok(Some(tenant))
                }
                None => Err(e),
            },
        }
    }

    /// Records a tenant this coordinator just created or changed.
    pub fn put(&self, tenant: Tenant) {
        self.entries
            .write()
            .insert(tenant.tenant_id.clone(), (tenant, Instant::now()));
    }

    /// The storage namespaces of deleted incarnations this cache knows of (streams skip them).
    pub fn deleted_namespaces(&self) -> Vec<String> {
        self.deleted.read().clone()
    }

    /// Drops every cached tenant whose incarnation is one of `deleted`, and remembers their
    /// namespaces.
    pub fn forget_deleted(&self, deleted: &[crate::meta::DeletedTenant]) {
        *self.deleted.write() = deleted.iter().map(|d| d.storage_id.clone()).collect();
        let gone: std::collections::HashSet<(&str, u32)> = deleted
            .iter()
            .map(|d| (d.tenant_id.as_str(), d.incarnation))
            .collect();
        self.entries
            .write()
            .retain(|id, (t, _)| !gone.contains(&(id.as_str(), t.incarnation)));
    }

    pub fn invalidate(&self, tenant_id: &str) {
        self.entries.write().remove(tenant_id);
    }
}
