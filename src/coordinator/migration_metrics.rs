//! Migration progress as metrics, for dashboards and alerts: every coordinator reads the
//! recent migrations from the metadata store every few seconds and sets, per migration type
//! (`node_addition`, `node_removal`, `replication_factor_change`, `cleanup`, `repair`):
//!
//! - `pairdb_migrations_in_progress{type}`: migrations pending or in progress;
//! - `pairdb_migration_keys_migrated{type}`, `pairdb_migration_keys_total{type}` and
//!   `pairdb_migration_bytes_migrated{type}`: their progress, summed;
//! - `pairdb_migrations_failed_last_hour{type}`: migrations that failed in the last hour.
//!
//! Gauges, not counters: they describe the shared store, so every coordinator exports the same
//! values (aggregate with `max`, not `sum`).

use std::sync::Arc;
use std::time::Duration;

use crate::meta::{MetaError, Migration, MigrationKind, MigrationState};

use super::Coordinator;

/// Migrations read per pass (the newest first; older ones are finished).
const RECENT: u32 = 200;
const HOUR_MS: i64 = 3_600_000;

const KINDS: [MigrationKind; 5] = [
    MigrationKind::NodeAddition,
    MigrationKind::NodeRemoval,
    MigrationKind::ReplicationFactorChange,
    MigrationKind::Cleanup,
    MigrationKind::Repair,
];

fn kind_name(kind: MigrationKind) -> &'static str {
    match kind {
        MigrationKind::NodeAddition => "node_addition",
        MigrationKind::NodeRemoval => "node_removal",
        MigrationKind::ReplicationFactorChange => "replication_factor_change",
        MigrationKind::Cleanup => "cleanup",
        MigrationKind::Repair => "repair",
    }
}

/// Exports the gauges every `every` until the role stops.
pub fn spawn_export(core: Arc<Coordinator>, every: Duration) {
    let tasks = core.tasks.clone();
    super::periodic::spawn_every(every, &tasks, move || {
        let core = core.clone();
        async move {
            if let Err(e) = export(&core).await {
                tracing::debug!(error = %e, "cannot read migrations for the metrics");
            }
        }
    });
}

async fn export(core: &Coordinator) -> Result<(), MetaError> {
    let recent = core.meta.recent_migrations(RECENT).await?;
    let now = crate::wallclock::now_ms() as i64;
    for kind in KINDS {
        let totals = Totals::of(recent.iter().filter(|m| m.kind == kind), now);
        let name = kind_name(kind);
        metrics::gauge!("pairdb_migrations_in_progress", "type" => name).set(totals.running as f64);
        metrics::gauge!("pairdb_migration_keys_migrated", "type" => name).set(totals.keys as f64);
        metrics::gauge!("pairdb_migration_keys_total", "type" => name).set(totals.total as f64);
        metrics::gauge!("pairdb_migration_bytes_migrated", "type" => name).set(totals.bytes as f64);
        metrics::gauge!("pairdb_migrations_failed_last_hour", "type" => name)
            .set(totals.failed_last_hour as f64);
    }
    Ok(())
}

#[derive(Debug, Default, PartialEq)]
struct Totals {
    running: u64,
    keys: u64,
    total: u64,
    bytes: u64,
    failed_last_hour: u64,
}

impl Totals {
    fn of<'a>(migrations: impl Iterator<Item = &'a Migration>, now_ms: i64) -> Totals {
        let mut t = Totals::default();
        for m in migrations {
            match m.state {
                MigrationState::Pending | MigrationState::InProgress => {
                    t.running += 1;
                    t.keys += m.keys_migrated;
                    t.total += m.total_keys;
                    t.bytes += m.bytes_migrated;
                }
                MigrationState::Failed if now_ms - m.updated_at_ms <= HOUR_MS => {
                    t.failed_last_hour += 1;
                }
                _ => {}
            }
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_running_migrations_count_toward_progress_and_only_recent_failures() {
        let at = |state, keys, updated_at_ms| Migration {
            keys_migrated: keys,
            total_keys: 100,
            bytes_migrated: keys * 10,
            updated_at_ms,
            ..Migration::begin("m".into(), MigrationKind::NodeAddition, "s4", state)
        };
        let now = 10 * HOUR_MS;
        let all = [
            at(MigrationState::InProgress, 40, now),
            at(MigrationState::Pending, 0, now),
            at(MigrationState::Completed, 100, now),
            at(MigrationState::Failed, 5, now - HOUR_MS / 2),
            at(MigrationState::Failed, 5, now - 2 * HOUR_MS),
        ];
        assert_eq!(
            Totals::of(all.iter(), now),
            Totals {
                running: 2,
                keys: 40,
                total: 200,
                bytes: 400,
                failed_last_hour: 1,
            }
        );
    }
}
