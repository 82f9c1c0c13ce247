//! Tenant administration and the storage-node list (API.md, "Tenants" and "Storage nodes").
//!
//! Decisions: RF 0 in a request means the default (3); valid RFs are 1..=10. Lowering a
//! replication factor takes effect at once (the remaining replicas are a prefix of the old
//! ones, so they hold every key). Raising it starts a migration ([`super::rf_change`]): the
//! tenant keeps its RF for reads until existing keys are copied to the new replicas. One change
//! per tenant at a time. Node list
//! entries combine the registry (state, address, vnodes) with gossip (down) and each node's
//! HealthCheck (key estimate, disk %), asked in parallel with a short timeout.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use crate::limits::check_tenant;
use crate::meta::{MetaError, Migration, MigrationKind, MigrationState, NodeRecord, Tenant};
use crate::ring::NodeState;
use crate::ring::plan::{Proposed, Refusal};
use crate::rpc::coordinator as pb;
use crate::rpc::storage as spb;

use super::Coordinator;
use super::admission::{self, AdmitError};
use super::errors::CoordError;

pub const DEFAULT_RF: u32 = 3;
pub const MAX_RF: u32 = 10;
const HEALTH_TIMEOUT: Duration = Duration::from_millis(500);

/// RFC 3339 UTC with milliseconds.
pub fn rfc3339(ms: i64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(at).to_string()
}

pub fn check_tenant_id(tenant_id: &str) -> Result<(), CoordError> {
    Ok(check_tenant(tenant_id)?)
}

fn check_rf(rf: u32) -> Result<u32, CoordError> {
    match rf {
        0 => Ok(DEFAULT_RF),
        1..=MAX_RF => Ok(rf),
        other => Err(CoordError::InvalidReplicationFactor(other)),
    }
}

pub(super) fn tenant_to_proto(t: &Tenant) -> pb::Tenant {
    pb::Tenant {
        tenant_id: t.tenant_id.clone(),
        replication_factor: t.replication_factor,
        created_at: rfc3339(t.created_at_ms),
        updated_at: rfc3339(t.updated_at_ms),
    }
}

impl Coordinator {
    pub async fn create_tenant(&self, tenant_id: &str, rf: u32) -> Result<pb::Tenant, CoordError> {
        check_tenant_id(tenant_id)?;
        let rf = check_rf(rf)?;
        self.check_not_just_deleted(tenant_id).await?;
        let tenant = self
            .meta
            .create_tenant(tenant_id, rf)
            .await
            .map_err(|e| match e {
                MetaError::Exists { .. } => CoordError::TenantExists(tenant_id.to_owned()),
                other => other.into(),
            })?;
        self.tenants.put(tenant.clone());
        Ok(tenant_to_proto(&tenant))
    }

    /// One page of the tenants after `after` (empty: from the first), in id order.
    pub async fn list_tenants(
        &self,
        after: &str,
        limit: u32,
    ) -> Result<pb::ListTenantsResponse, CoordError> {
        let limit = match limit {
            0 => 100,
            n if n <= 1000 => n,
            n => {
                return Err(CoordError::InvalidRequest(format!(
                    "limit {n} is outside 1..=1000"
                )));
            }
        };
        let after = (!after.is_empty()).then_some(after);
        // One more than asked: whether another page follows.
        let mut page = self.meta.list_tenants(after, limit + 1).await?;
        let more = page.len() > limit as usize;
        page.truncate(limit as usize);
        Ok(pb::ListTenantsResponse {
            tenants: page.iter().map(tenant_to_proto).collect(),
            more,
        })
    }

    pub async fn get_tenant(&self, tenant_id: &str) -> Result<pb::Tenant, CoordError> {
        check_tenant_id(tenant_id)?;
        Ok(tenant_to_proto(&self.tenant(tenant_id).await?))
    }

    pub async fn update_replication_factor(
        self: &Arc<Self>,
        tenant_id: &str,
        rf: u32,
    ) -> Result<pb::UpdateReplicationFactorResponse, CoordError> {
        check_tenant_id(tenant_id)?;
        if !(1..=MAX_RF).contains(&rf) {
            return Err(CoordError::InvalidReplicationFactor(rf));
        }
        let current = self
            .meta
            .get_tenant(tenant_id)
            .await?
            .ok_or_else(|| CoordError::TenantNotFound(tenant_id.to_owned()))?;
        if self.pending_rf.is_pending(tenant_id) {
            return Err(CoordError::InvalidRequest(format!(
                "a replication-factor change of tenant {tenant_id:?} is in progress"
            )));
        }
        if rf != current.replication_factor {
            let registered = self.meta.list_nodes().await?;
            let proposed = Proposed::RfChange { tenant: tenant_id };
            match admission::may_start(self.meta.as_ref(), &registered, proposed).await {
                Ok(()) => {}
                Err(AdmitError::Busy(same @ Refusal::SameTenant { .. })) => {
                    return Err(CoordError::InvalidRequest(same.to_string()));
                }
                Err(AdmitError::Busy(why)) => return Err(CoordError::NodeInUse(why.to_string())),
                Err(AdmitError::Meta(e)) => return Err(e.into()),
            }
            let migration_id = self.change_replication_factor(&current, rf).await?;
            return Ok(pb::UpdateReplicationFactorResponse {
                tenant_id: tenant_id.to_owned(),
                old_replication_factor: current.replication_factor,
                new_replication_factor: rf,
                updated_at: rfc3339(crate::wallclock::now_ms() as i64),
                migration_id,
            });
        }
        // The same RF: nothing to change.
        Ok(pb::UpdateReplicationFactorResponse {
            tenant_id: tenant_id.to_owned(),
            old_replication_factor: rf,
            new_replication_factor: rf,
            updated_at: rfc3339(current.updated_at_ms),
            migration_id: String::new(),
        })
    }

    /// A migration's record and progress.
    pub async fn get_migration(&self, migration_id: &str) -> Result<pb::Migration, CoordError> {
        let m = self
            .meta
            .get_migration(migration_id)
            .await?
            .ok_or_else(|| CoordError::MigrationNotFound(migration_id.to_owned()))?;
        Ok(migration_to_pb(m))
    }

    /// Asks for migration `id` to be cancelled: the coordinator running it rolls it back at
    /// its next step (state `cancelled`); one past its last step completes anyway. INVALID_REQUEST
    /// once it ended.
    pub async fn cancel_migration(&self, migration_id: &str) -> Result<pb::Migration, CoordError> {
        let m = self
            .meta
            .get_migration(migration_id)
            .await?
            .ok_or_else(|| CoordError::MigrationNotFound(migration_id.to_owned()))?;
        let ended = |state: MigrationState| {
            CoordError::InvalidRequest(format!(
                "migration {migration_id} already ended: {}",
                state.as_str()
            ))
        };
        if !matches!(
            m.state,
            MigrationState::Pending | MigrationState::InProgress
        ) {
            return Err(ended(m.state));
        }
        if !self.meta.request_cancel(migration_id).await? {
            let now = self.meta.get_migration(migration_id).await?;
            return Err(ended(now.map_or(m.state, |n| n.state)));
        }
        tracing::warn!(
            migration = migration_id,
            kind = m.kind.as_str(),
            "cancel requested"
        );
        Ok(migration_to_pb(m))
    }

    /// The `limit` (0 = 100, at most 1000) most recently started migrations, newest first.
    pub async fn list_migrations(&self, limit: u32) -> Result<Vec<pb::Migration>, CoordError> {
        let limit = match limit {
            0 => 100,
            n => n.min(1000),
        };
        let recent = self.meta.recent_migrations(limit).await?;
        Ok(recent.into_iter().map(migration_to_pb).collect())
    }

    /// Every node of this coordinator's ring (the registry as last read) with its HealthCheck
    /// answer, asked in parallel (`None`: no answer within the timeout).
    pub async fn node_health(&self) -> Vec<(NodeRecord, Option<spb::HealthCheckResponse>)> {
        let nodes = self.ring.snapshot().nodes.clone();
        self.each_node(&nodes, HEALTH_TIMEOUT, |mut client| async move {
            client.health_check(spb::HealthCheckRequest {}).await
        })
        .await
        .into_iter()
        .map(|(node, answer)| (node, answer.ok()))
        .collect()
    }

    /// Every node of this coordinator's ring with its state, key estimate and disk use.
    pub async fn list_nodes(&self) -> Result<pb::ListStorageNodesResponse, CoordError> {
        let nodes = self
            .node_health()
            .await
            .into_iter()
            .map(|(n, health)| {
                let unreachable = health.is_none() || self.ring.is_down(&n.node_id);
                let state = match n.state {
                    NodeState::Active if unreachable => NodeState::Down,
                    s => s,
                };
                let (health_name, health_reasons) = match &health {
                    None => ("unknown", Vec::new()),
                    Some(h) => (
                        match h.status() {
                            spb::HealthStatus::Healthy => "healthy",
                            spb::HealthStatus::Degraded => "degraded",
                            _ => "unhealthy",
                        },
                        h.problems.clone(),
                    ),
                };
                let health = health.unwrap_or_default();
                let load = self.ring.membership().load(&n.node_id);
                let mut tokens = n.ring_node().tokens();
                tokens.sort_unstable();
                pb::StorageNodeInfo {
                    tokens,
                    node_id: n.node_id,
                    host: n.host,
                    port: u32::from(n.port),
                    state: crate::rpc::common::NodeState::from(state) as i32,
                    virtual_nodes: n.virtual_nodes,
                    keys_count: health.key_estimate,
                    disk_usage_percent: health.disk_usage_percent,
                    load,
                    health: health_name.to_owned(),
                    health_reasons,
                }
            })
            .collect();
        Ok(pb::ListStorageNodesResponse { nodes })
    }
}

/// A migration record as the API shows it, with a completion estimate extrapolated from the
/// rate so far.
pub(super) fn migration_to_pb(m: Migration) -> pb::Migration {
    let kind = match m.kind {
        MigrationKind::NodeAddition => pb::MigrationType::NodeAddition,
        MigrationKind::NodeRemoval => pb::MigrationType::NodeRemoval,
        MigrationKind::ReplicationFactorChange => pb::MigrationType::ReplicationFactorChange,
        MigrationKind::Cleanup => pb::MigrationType::Cleanup,
        MigrationKind::Repair => pb::MigrationType::Repair,
    };
    let state = match m.state {
        MigrationState::Pending => pb::MigrationState::Pending,
        MigrationState::InProgress => pb::MigrationState::InProgress,
        MigrationState::Completed => pb::MigrationState::Completed,
        MigrationState::Failed => pb::MigrationState::Failed,
        MigrationState::Cancelled => pb::MigrationState::Cancelled,
    };
    let estimated_completion = match m.state {
        MigrationState::Completed | MigrationState::Failed | MigrationState::Cancelled => {
            rfc3339(m.updated_at_ms)
        }
        _ if m.keys_migrated > 0 && m.total_keys >= m.keys_migrated => {
            // The rate so far, extrapolated to the estimated total.
            let elapsed = (m.updated_at_ms - m.started_at_ms).max(0) as f64;
            let share = m.keys_migrated as f64 / m.total_keys as f64;
            rfc3339(m.started_at_ms + (elapsed / share) as i64)
        }
        _ => String::new(),
    };
    pb::Migration {
        migration_id: m.migration_id,
        r#type: kind as i32,
        node_id: m.subject,
        state: state as i32,
        keys_migrated: m.keys_migrated,
        total_keys: m.total_keys,
        started_at: rfc3339(m.started_at_ms),
        estimated_completion,
        failure_reason: m.failure_reason.unwrap_or_default(),
        bytes_migrated: m.bytes_migrated,
    }
}
