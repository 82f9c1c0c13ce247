//! [`MetadataStore`] on SQL through sqlx's `Any` driver: the same queries for PostgreSQL and
//! SQLite (integers are BIGINT, times are epoch milliseconds, placeholders `$n` in order). The
//! schema (`migrations/<backend>/`) is applied at connect; it is idempotent.

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

use crate::ring::NodeState;

use super::{
    DeletedTenant, Hint, Leftovers, MetaError, MetadataStore, Migration, MigrationKind,
    MigrationLease, MigrationState, NodeRecord, RangeRepair, Registry, RegistryEntry,
    StreamCheckpoint, Tenant,
};

const POSTGRES_SCHEMA: &str = include_str!("../../migrations/postgres/0001_init.sql");
/// Advisory lock key held while the PostgreSQL schema is applied ("pairdb" in ASCII).
const SCHEMA_LOCK: i64 = 0x7061_6972_6462;
const SQLITE_SCHEMA: &str = include_str!("../../migrations/sqlite/0001_init.sql");
/// `(table, column, definition)` of the columns added to the SQLite schema after
/// `0001_init.sql` (PostgreSQL's schema adds them with `ADD COLUMN IF NOT EXISTS`).
const SQLITE_ADDED_COLUMNS: [(&str, &str, &str); 7] = [
    ("tenants", "incarnation", "BIGINT NOT NULL DEFAULT 1"),
    ("storage_nodes", "tokens", "TEXT"),
    ("migrations", "failure_reason", "TEXT"),
    ("migrations", "bytes_migrated", "BIGINT NOT NULL DEFAULT 0"),
    ("migrations", "owner", "TEXT"),
    ("migrations", "beat", "BIGINT NOT NULL DEFAULT 0"),
    (
        "migrations",
        "cancel_requested",
        "BIGINT NOT NULL DEFAULT 0",
    ),
];

/// Advisory lock key held while a node is admitted ("pdbnodes" in ASCII).
const ADMISSION_LOCK: i64 = 0x7064_626e_6f64_6573;

pub struct SqlMetadataStore {
    pool: AnyPool,
    postgres: bool,
}

/// Tokens as stored: decimal, comma-separated; NULL for derived tokens.
fn encode_tokens(tokens: Option<&Vec<u64>>) -> Option<String> {
    tokens.map(|t| t.iter().map(u64::to_string).collect::<Vec<_>>().join(","))
}

fn decode_tokens(row: &AnyRow) -> Result<Option<Vec<u64>>, MetaError> {
    let stored: Option<String> = row
        .try_get("tokens")
        .map_err(|e| MetaError::Corrupt(e.to_string()))?;
    stored
        .map(|s| {
            s.split(',')
                .filter(|t| !t.is_empty())
                .map(|t| {
                    t.parse::<u64>()
                        .map_err(|_| MetaError::Corrupt(format!("node token {t:?}")))
                })
                .collect::<Result<Vec<u64>, MetaError>>()
        })
        .transpose()
}

fn now_ms() -> i64 {
    crate::wallclock::now_ms() as i64
}

fn unavailable(e: sqlx::Error) -> MetaError {
    MetaError::Unavailable(e.to_string())
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.kind() == sqlx::error::ErrorKind::UniqueViolation)
}

/// `NotFound` (a `what` called `id`) when a statement about one row touched none.
fn found(rows: u64, what: &'static str, id: &str) -> Result<(), MetaError> {
    if rows == 0 {
        return Err(MetaError::NotFound {
            what,
            id: id.to_owned(),
        });
    }
    Ok(())
}

fn migration_found(rows: u64, migration_id: &str) -> Result<(), MetaError> {
    found(rows, "migration", migration_id)
}

fn node_found(rows: u64, node_id: &str) -> Result<(), MetaError> {
    found(rows, "storage node", node_id)
}

fn state_name(s: NodeState) -> &'static str {
    s.as_str()
}

fn parse_state(s: &str) -> Result<NodeState, MetaError> {
    match s {
        "active" => Ok(NodeState::Active),
        "bootstrapping" => Ok(NodeState::Bootstrapping),
        "draining" => Ok(NodeState::Draining),
        "down" => Ok(NodeState::Down),
        "failed" => Ok(NodeState::Failed),
        other => Err(MetaError::Corrupt(format!("unknown node state {other:?}"))),
    }
}

fn int<T: TryFrom<i64>>(row: &AnyRow, col: &str) -> Result<T, MetaError> {
    let v: i64 = row
        .try_get(col)
        .map_err(|e| MetaError::Corrupt(e.to_string()))?;
    T::try_from(v).map_err(|_| MetaError::Corrupt(format!("{col} = {v} out of range")))
}

fn text(row: &AnyRow, col: &str) -> Result<String, MetaError> {
    row.try_get(col)
        .map_err(|e| MetaError::Corrupt(e.to_string()))
}

/// The columns of `migrations`, in the order [`migration`] and inserts use.
/// The condition of a migration that has not ended: only those move on.
const ACTIVE: &str = "state IN ('pending', 'in_progress')";

const MIGRATION_COLUMNS: &str = "migration_id, kind, subject, state, keys_migrated, total_keys, target_rf, started_at_ms, updated_at_ms, failure_reason, bytes_migrated";

/// A count as the database stores it.
fn count(n: u64) -> Result<i64, MetaError> {
    i64::try_from(n).map_err(|_| MetaError::Corrupt(format!("count {n} out of range")))
}

fn migration(row: &AnyRow) -> Result<Migration, MetaError> {
    let kind = text(row, "kind")?;
    let state = text(row, "state")?;
    Ok(Migration {
        migration_id: text(row, "migration_id")?,
        kind: MigrationKind::parse(&kind)
            .ok_or_else(|| MetaError::Corrupt(format!("migration kind {kind:?}")))?,
        subject: text(row, "subject")?,
        state: MigrationState::parse(&state)
            .ok_or_else(|| MetaError::Corrupt(format!("migration state {state:?}")))?,
        keys_migrated: int(row, "keys_migrated")?,
        total_keys: int(row, "total_keys")?,
        target_rf: int(row, "target_rf")?,
        started_at_ms: int(row, "started_at_ms")?,
        updated_at_ms: int(row, "updated_at_ms")?,
        failure_reason: row
            .try_get("failure_reason")
            .map_err(|e| MetaError::Corrupt(e.to_string()))?,
        bytes_migrated: int(row, "bytes_migrated")?,
    })
}

/// The columns of `tenants`, in the order [`tenant`] reads them, and the registry epoch of the
/// same snapshot (one statement).
const TENANT_COLUMNS: &str = "tenant_id, replication_factor, created_at_ms, updated_at_ms, incarnation, (SELECT epoch FROM registry_epoch WHERE id = 1) AS registry_epoch";

fn tenant(row: &AnyRow) -> Result<Tenant, MetaError> {
    Ok(Tenant {
        tenant_id: text(row, "tenant_id")?,
        replication_factor: int(row, "replication_factor")?,
        created_at_ms: int(row, "created_at_ms")?,
        updated_at_ms: int(row, "updated_at_ms")?,
        incarnation: int(row, "incarnation")?,
        registry_epoch: int(row, "registry_epoch")?,
    })
}

/// The tenant row of `tenant_id`, read inside `tx`; NotFound when there is none.
async fn tenant_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    tenant_id: &str,
) -> Result<Tenant, MetaError> {
    let row = sqlx::query(&format!(
        "SELECT {TENANT_COLUMNS} FROM tenants WHERE tenant_id = $1"
    ))
    .bind(tenant_id)
    .fetch_optional(&mut **tx)
    .await
    .map_err(unavailable)?;
    match row {
        Some(row) => tenant(&row),
        None => Err(MetaError::NotFound {
            what: "tenant",
            id: tenant_id.to_owned(),
        }),
    }
}

/// Every SQLite connection logs ahead: a commit appends to (and syncs) one long-lived
/// `-wal` file instead of creating, syncing and deleting a rollback journal. Creating and
/// deleting files are filesystem-journal commits, which stall every other process's fsync on
/// the same disk (the storage nodes' commit logs in `pairdb dev` and single-machine clusters;
/// docs/benchmarks.md, "Anti-entropy"). `synchronous = FULL`: a commit is durable when it
/// returns, as before. The journal mode is kept in the file; setting it again is a no-op.
async fn sqlite_settings(conn: &mut sqlx::AnyConnection) -> Result<(), sqlx::Error> {
    for pragma in ["PRAGMA journal_mode = WAL", "PRAGMA synchronous = FULL"] {
        sqlx::query(pragma).execute(&mut *conn).await?;
    }
    Ok(())
}

/// Whether a SQLite table has a column.
async fn sqlite_has_column(pool: &AnyPool, table: &str, column: &str) -> Result<bool, MetaError> {
    let present: i64 = sqlx::query_scalar(&format!(
        "SELECT COUNT(*) FROM pragma_table_info('{table}') WHERE name = '{column}'"
    ))
    .fetch_one(pool)
    .await
    .map_err(unavailable)?;
    Ok(present > 0)
}

/// `INSERT` of one registry record; `Exists` when the id is taken.
async fn insert_node(conn: &mut sqlx::AnyConnection, node: &NodeRecord) -> Result<(), MetaError> {
    let result = sqlx::query(
        "INSERT INTO storage_nodes (node_id, host, port, virtual_nodes, tokens, state, updated_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&node.node_id)
    .bind(&node.host)
    .bind(i64::from(node.port))
    .bind(i64::from(node.virtual_nodes))
    .bind(encode_tokens(node.tokens.as_ref()))
    .bind(state_name(node.state))
    .bind(now_ms())
    .execute(&mut *conn)
    .await;
    inserted(result, "storage node", &node.node_id)?;
    raise_epoch(conn).await
}

/// Raises the registry's epoch, in the transaction that changes `storage_nodes`. PostgreSQL's
/// row lock orders concurrent changes: the one that commits later has the higher epoch, so a
/// snapshot that sees an epoch sees every change with a lower one.
async fn raise_epoch(conn: &mut sqlx::AnyConnection) -> Result<(), MetaError> {
    let done = sqlx::query("UPDATE registry_epoch SET epoch = epoch + 1 WHERE id = 1")
        .execute(conn)
        .await
        .map_err(unavailable)?;
    if done.rows_affected() == 1 {
        Ok(())
    } else {
        Err(MetaError::Corrupt(
            "the registry epoch row is missing".to_owned(),
        ))
    }
}

/// Every registered node, by id.
async fn nodes_in(conn: &mut sqlx::AnyConnection) -> Result<Vec<NodeRecord>, MetaError> {
    let rows = sqlx::query(
        "SELECT node_id, host, port, virtual_nodes, tokens, state FROM storage_nodes ORDER BY node_id",
    )
    .fetch_all(conn)
    .await
    .map_err(unavailable)?;
    rows.iter()
        .map(|row| {
            Ok(NodeRecord {
                node_id: text(row, "node_id")?,
                host: text(row, "host")?,
                port: int(row, "port")?,
                virtual_nodes: int(row, "virtual_nodes")?,
                tokens: decode_tokens(row)?,
                state: parse_state(&text(row, "state")?)?,
            })
        })
        .collect()
}

/// The outcome of an `INSERT` of one `what` called `id`: `Exists` when the key is taken.
fn inserted<T>(
    result: Result<T, sqlx::Error>,
    what: &'static str,
    id: &str,
) -> Result<(), MetaError> {
    match result {
        Ok(_) => Ok(()),
        Err(e) if is_unique_violation(&e) => Err(MetaError::Exists {
            what,
            id: id.to_owned(),
        }),
        Err(e) => Err(unavailable(e)),
    }
}

impl SqlMetadataStore {
    /// After a write to an active migration changed `rows`: fine when one did; `Changed` when
    /// the migration exists but had ended (its end is never overwritten); `NotFound` otherwise.
    async fn still_active(&self, rows: u64, migration_id: &str) -> Result<(), MetaError> {
        if rows > 0 {
            return Ok(());
        }
        match self.get_migration(migration_id).await? {
            Some(_) => Err(MetaError::Changed("the migration (it had ended)")),
            None => migration_found(0, migration_id),
        }
    }

    /// A transaction in which the registry is still `seen` (ids and states), holding the
    /// registry lock until it ends; `Changed` otherwise. PostgreSQL: an advisory lock. SQLite:
    /// `BEGIN IMMEDIATE`, the write lock taken up front (waiting out other writers); a deferred
    /// transaction that reads, then writes, fails at once with "database is locked" when
    /// another process wrote meanwhile (two coordinators seeding one file at start).
    async fn registry_unchanged(
        &self,
        seen: &[RegistryEntry],
    ) -> Result<sqlx::Transaction<'static, sqlx::Any>, MetaError> {
        let mut tx = if self.postgres {
            let mut tx = self.pool.begin().await.map_err(unavailable)?;
            sqlx::query(&format!("SELECT pg_advisory_xact_lock({ADMISSION_LOCK})"))
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
            tx
        } else {
            self.pool
                .begin_with("BEGIN IMMEDIATE")
                .await
                .map_err(unavailable)?
        };
        let rows = sqlx::query("SELECT node_id, state FROM storage_nodes ORDER BY node_id")
            .fetch_all(&mut *tx)
            .await
            .map_err(unavailable)?;
        let mut now = rows
            .iter()
            .map(|row| Ok((text(row, "node_id")?, parse_state(&text(row, "state")?)?)))
            .collect::<Result<Vec<RegistryEntry>, MetaError>>()?;
        // Compared in Rust's order on both sides: the database's collation may differ.
        now.sort_by(|a, b| a.0.cmp(&b.0));
        if now != seen {
            return Err(MetaError::Changed("the node registry"));
        }
        Ok(tx)
    }

    /// The registry epoch now.
    async fn registry_epoch(&self) -> Result<u64, MetaError> {
        let row = sqlx::query("SELECT epoch FROM registry_epoch WHERE id = 1")
            .fetch_one(&self.pool)
            .await
            .map_err(unavailable)?;
        int(&row, "epoch")
    }

    /// Connects to `postgres://...` or `sqlite://path` and applies the schema. A SQLite file is
    /// created if missing.
    pub async fn connect(url: &str) -> Result<SqlMetadataStore, MetaError> {
        sqlx::any::install_default_drivers();
        let postgres = !url.starts_with("sqlite:");
        let (url, schema, max) = if url.starts_with("sqlite:") {
            let url = if url.contains('?') {
                url.to_owned()
            } else {
                format!("{url}?mode=rwc")
            };
            (url, SQLITE_SCHEMA, 1)
        } else {
            (url.to_owned(), POSTGRES_SCHEMA, 8)
        };
        let mut options = AnyPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(std::time::Duration::from_secs(5));
        if !postgres {
            options = options.after_connect(|conn, _| Box::pin(sqlite_settings(conn)));
        }
        let pool = options.connect(&url).await.map_err(unavailable)?;
        if schema == POSTGRES_SCHEMA {
            // Coordinators starting together apply the schema one at a time: concurrent
            // `CREATE TABLE IF NOT EXISTS` race in PostgreSQL's catalog.
            let serialized =
                format!("BEGIN; SELECT pg_advisory_xact_lock({SCHEMA_LOCK}); {schema}\nCOMMIT;");
            sqlx::raw_sql(&serialized)
                .execute(&pool)
                .await
                .map_err(unavailable)?;
        } else {
            sqlx::raw_sql(schema)
                .execute(&pool)
                .await
                .map_err(unavailable)?;
            // Columns added after the first schema: stores made before lack them (SQLite
            // has no `ADD COLUMN IF NOT EXISTS`).
            for (table, column, definition) in SQLITE_ADDED_COLUMNS {
                if sqlite_has_column(&pool, table, column).await? {
                    continue;
                }
                let alter = format!("ALTER TABLE {table} ADD COLUMN {column} {definition}");
                if let Err(e) = sqlx::raw_sql(&alter).execute(&pool).await {
                    // Another coordinator opening the same file added it first.
                    if !sqlite_has_column(&pool, table, column).await? {
                        return Err(unavailable(e));
                    }
                }
            }
        }
        Ok(SqlMetadataStore { pool, postgres })
    }

    /// Runs `sql` (with `$1` = id) for every id, in one transaction.
    async fn for_each_id(&self, sql: &str, ids: &[i64]) -> Result<(), MetaError> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        for id in ids {
            sqlx::query(sql)
                .bind(*id)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)
    }

    /// Closes every connection; later calls fail with `Unavailable`.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

impl SqlMetadataStore {
    /// The store's own clock, in ms since the epoch, as SQL: one clock for every coordinator,
    /// where a comparison of two coordinators' wall clocks would be off by their skew.
    fn store_now_ms(&self) -> &'static str {
        if self.postgres {
            "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)"
        } else {
            "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)"
        }
    }
}

#[tonic::async_trait]
impl MetadataStore for SqlMetadataStore {
    async fn ping(&self) -> Result<(), MetaError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn create_tenant(
        &self,
        tenant_id: &str,
        replication_factor: u32,
    ) -> Result<Tenant, MetaError> {
        let now = now_ms();
        // A new incarnation after every deleted one: its storage namespace is its own.
        let previous: i64 = sqlx::query_scalar(
            "SELECT COALESCE(MAX(incarnation), 0) FROM deleted_tenants WHERE tenant_id = $1",
        )
        .bind(tenant_id)
        .fetch_one(&self.pool)
        .await
        .map_err(unavailable)?;
        let incarnation = u32::try_from(previous + 1).map_err(|_| {
            MetaError::Corrupt(format!("tenant {tenant_id:?}: incarnation {previous}"))
        })?;
        // Read before the tenant exists: any RF change of it commits later, at a higher epoch.
        let registry_epoch = self.registry_epoch().await?;
        let result = sqlx::query(
            "INSERT INTO tenants (tenant_id, replication_factor, created_at_ms, updated_at_ms, incarnation) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(tenant_id)
        .bind(i64::from(replication_factor))
        .bind(now)
        .bind(now)
        .bind(i64::from(incarnation))
        .execute(&self.pool)
        .await;
        match result {
            Ok(_) => Ok(Tenant {
                tenant_id: tenant_id.to_owned(),
                replication_factor,
                created_at_ms: now,
                updated_at_ms: now,
                incarnation,
                registry_epoch,
            }),
            Err(e) if is_unique_violation(&e) => Err(MetaError::Exists {
                what: "tenant",
                id: tenant_id.to_owned(),
            }),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn get_tenant(&self, tenant_id: &str) -> Result<Option<Tenant>, MetaError> {
        let row = sqlx::query(&format!(
            "SELECT {TENANT_COLUMNS} FROM tenants WHERE tenant_id = $1"
        ))
        .bind(tenant_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?;
        row.as_ref().map(tenant).transpose()
    }

    async fn list_tenants(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Tenant>, MetaError> {
        let rows = sqlx::query(&format!(
            "SELECT {TENANT_COLUMNS} FROM tenants WHERE tenant_id > $1 ORDER BY tenant_id LIMIT $2"
        ))
        .bind(after.unwrap_or(""))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter().map(tenant).collect()
    }

    async fn delete_tenant(&self, tenant_id: &str) -> Result<Tenant, MetaError> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        let gone = tenant_in(&mut tx, tenant_id).await?;
        let deleted = sqlx::query("DELETE FROM tenants WHERE tenant_id = $1 AND incarnation = $2")
            .bind(tenant_id)
            .bind(i64::from(gone.incarnation))
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        if deleted.rows_affected() != 1 {
            return Err(MetaError::Changed("tenant"));
        }
        sqlx::query(
            &format!(
                "INSERT INTO deleted_tenants (storage_id, tenant_id, incarnation, deleted_at_ms) VALUES ($1, $2, $3, {})",
                self.store_now_ms()
            ),
        )
        .bind(gone.storage_id())
        .bind(tenant_id)
        .bind(i64::from(gone.incarnation))
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        // Its hints would only be dropped at replay: they go with it.
        sqlx::query("DELETE FROM hints WHERE tenant_id = $1")
            .bind(gone.storage_id())
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(gone)
    }

    async fn deleted_tenants(&self) -> Result<Vec<DeletedTenant>, MetaError> {
        let rows = sqlx::query(
            "SELECT storage_id, tenant_id, incarnation, deleted_at_ms FROM deleted_tenants ORDER BY deleted_at_ms",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter()
            .map(|row| {
                Ok(DeletedTenant {
                    storage_id: text(row, "storage_id")?,
                    tenant_id: text(row, "tenant_id")?,
                    incarnation: int(row, "incarnation")?,
                    deleted_at_ms: int(row, "deleted_at_ms")?,
                })
            })
            .collect()
    }

    async fn ms_since_deleted(&self, tenant_id: &str) -> Result<Option<i64>, MetaError> {
        let ago: Option<i64> = sqlx::query_scalar(&format!(
            "SELECT {} - MAX(deleted_at_ms) FROM deleted_tenants WHERE tenant_id = $1",
            self.store_now_ms()
        ))
        .bind(tenant_id)
        .fetch_one(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(ago)
    }

    async fn tenants_updated_since(&self, since_ms: i64) -> Result<Vec<Tenant>, MetaError> {
        let rows = sqlx::query(&format!(
            "SELECT {TENANT_COLUMNS} FROM tenants WHERE updated_at_ms >= $1"
        ))
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter().map(tenant).collect()
    }

    async fn update_replication_factor(
        &self,
        tenant_id: &str,
        replication_factor: u32,
    ) -> Result<Tenant, MetaError> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        let before = tenant_in(&mut tx, tenant_id).await?;
        sqlx::query(
            "UPDATE tenants SET replication_factor = $1, updated_at_ms = $2 WHERE tenant_id = $3",
        )
        .bind(i64::from(replication_factor))
        .bind(now_ms())
        .bind(tenant_id)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        // The RF places keys: a change of it is a change of placement, like the registry's.
        raise_epoch(&mut tx).await?;
        tx.commit().await.map_err(unavailable)?;
        Ok(before)
    }

    async fn list_nodes(&self) -> Result<Vec<NodeRecord>, MetaError> {
        let mut conn = self.pool.acquire().await.map_err(unavailable)?;
        nodes_in(&mut conn).await
    }

    async fn leftovers(&self) -> Result<Leftovers, MetaError> {
        let row = sqlx::query(
            "SELECT (SELECT epoch FROM registry_epoch WHERE id = 1) AS registry, \
             (SELECT epoch FROM cleanup_epoch WHERE id = 1) AS cleaned, \
             (SELECT COUNT(*) FROM (SELECT 1 FROM migrations WHERE state = 'completed' \
              AND kind IN ('node_addition', 'node_removal', 'replication_factor_change') \
              LIMIT 1) AS changed) AS changed",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(Leftovers {
            registry_epoch: int(&row, "registry")?,
            cleaned_epoch: int(&row, "cleaned")?,
            placement_changed: int::<i64>(&row, "changed")? > 0,
        })
    }

    async fn record_cleaned_epoch(&self, epoch: u64) -> Result<(), MetaError> {
        sqlx::query("UPDATE cleanup_epoch SET epoch = $1 WHERE id = 1 AND epoch < $1")
            .bind(count(epoch)?)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn registry(&self) -> Result<Registry, MetaError> {
        // One snapshot for both reads: PostgreSQL's repeatable read, SQLite's read transaction.
        let begin = if self.postgres {
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
        } else {
            "BEGIN"
        };
        let mut tx = self.pool.begin_with(begin).await.map_err(unavailable)?;
        let row = sqlx::query("SELECT epoch FROM registry_epoch WHERE id = 1")
            .fetch_one(&mut *tx)
            .await
            .map_err(unavailable)?;
        let epoch: u64 = int(&row, "epoch")?;
        let nodes = nodes_in(&mut tx).await?;
        tx.commit().await.map_err(unavailable)?;
        Ok(Registry { epoch, nodes })
    }

    async fn add_node(&self, node: &NodeRecord) -> Result<(), MetaError> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        insert_node(&mut tx, node).await?;
        tx.commit().await.map_err(unavailable)
    }

    async fn admit_node(&self, node: &NodeRecord, seen: &[RegistryEntry]) -> Result<(), MetaError> {
        let mut tx = self.registry_unchanged(seen).await?;
        insert_node(&mut tx, node).await?;
        tx.commit().await.map_err(unavailable)
    }

    async fn seed_nodes(&self, nodes: &[NodeRecord]) -> Result<(), MetaError> {
        let mut tx = self.registry_unchanged(&[]).await?;
        for node in nodes {
            insert_node(&mut tx, node).await?;
        }
        tx.commit().await.map_err(unavailable)
    }

    async fn set_node_state_if(
        &self,
        node_id: &str,
        state: NodeState,
        seen: &[RegistryEntry],
    ) -> Result<(), MetaError> {
        let mut tx = self.registry_unchanged(seen).await?;
        let done = sqlx::query(
            "UPDATE storage_nodes SET state = $1, updated_at_ms = $2 WHERE node_id = $3",
        )
        .bind(state_name(state))
        .bind(now_ms())
        .bind(node_id)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        node_found(done.rows_affected(), node_id)?;
        raise_epoch(&mut tx).await?;
        tx.commit().await.map_err(unavailable)
    }

    async fn commit_node_changes(
        &self,
        seen: &[RegistryEntry],
        activate: &[String],
        remove: &[String],
    ) -> Result<(), MetaError> {
        let mut tx = self.registry_unchanged(seen).await?;
        let at = now_ms();
        for node_id in activate {
            let done = sqlx::query(
                "UPDATE storage_nodes SET state = $1, updated_at_ms = $2 WHERE node_id = $3",
            )
            .bind(state_name(NodeState::Active))
            .bind(at)
            .bind(node_id)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
            node_found(done.rows_affected(), node_id)?;
        }
        for node_id in remove {
            let done = sqlx::query("DELETE FROM storage_nodes WHERE node_id = $1")
                .bind(node_id)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
            node_found(done.rows_affected(), node_id)?;
        }
        raise_epoch(&mut tx).await?;
        tx.commit().await.map_err(unavailable)
    }

    async fn set_node_state(&self, node_id: &str, state: NodeState) -> Result<(), MetaError> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        let done = sqlx::query(
            "UPDATE storage_nodes SET state = $1, updated_at_ms = $2 WHERE node_id = $3",
        )
        .bind(state_name(state))
        .bind(now_ms())
        .bind(node_id)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        node_found(done.rows_affected(), node_id)?;
        raise_epoch(&mut tx).await?;
        tx.commit().await.map_err(unavailable)
    }

    async fn remove_node(&self, node_id: &str) -> Result<(), MetaError> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        let done = sqlx::query("DELETE FROM storage_nodes WHERE node_id = $1")
            .bind(node_id)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        node_found(done.rows_affected(), node_id)?;
        raise_epoch(&mut tx).await?;
        tx.commit().await.map_err(unavailable)
    }

    async fn store_hints(&self, hints: &[Hint]) -> Result<(), MetaError> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        for h in hints {
            sqlx::query(
                "INSERT INTO hints (target_node, tenant_id, record, created_at_ms, attempts) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(&h.target_node)
            .bind(&h.tenant_id)
            .bind(h.record.clone())
            .bind(h.created_at_ms)
            .bind(i64::from(h.attempts))
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)
    }

    async fn hints_for(&self, target_node: &str, limit: u32) -> Result<Vec<Hint>, MetaError> {
        self.hints_after(target_node, i64::MIN, limit).await
    }

    async fn hints_after(
        &self,
        target_node: &str,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<Hint>, MetaError> {
        let rows = sqlx::query(
            "SELECT id, target_node, tenant_id, record, created_at_ms, attempts FROM hints WHERE target_node = $1 AND id > $2 ORDER BY id LIMIT $3",
        )
        .bind(target_node)
        .bind(after_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter()
            .map(|row| {
                Ok(Hint {
                    id: int(row, "id")?,
                    target_node: text(row, "target_node")?,
                    tenant_id: text(row, "tenant_id")?,
                    record: row
                        .try_get("record")
                        .map_err(|e| MetaError::Corrupt(e.to_string()))?,
                    created_at_ms: int(row, "created_at_ms")?,
                    attempts: int(row, "attempts")?,
                })
            })
            .collect()
    }

    async fn delete_hints(&self, ids: &[i64]) -> Result<(), MetaError> {
        self.for_each_id("DELETE FROM hints WHERE id = $1", ids)
            .await
    }

    async fn record_hint_attempt(&self, ids: &[i64]) -> Result<(), MetaError> {
        self.for_each_id(
            "UPDATE hints SET attempts = attempts + 1 WHERE id = $1",
            ids,
        )
        .await
    }

    async fn hint_counts(&self) -> Result<Vec<(String, u64)>, MetaError> {
        let rows = sqlx::query("SELECT target_node, COUNT(*) AS n FROM hints GROUP BY target_node ORDER BY target_node")
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        rows.iter()
            .map(|row| Ok((text(row, "target_node")?, int(row, "n")?)))
            .collect()
    }

    async fn create_migration(&self, m: &Migration) -> Result<(), MetaError> {
        let result = sqlx::query(
            &format!(
                "INSERT INTO migrations ({MIGRATION_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
            ),
        )
        .bind(&m.migration_id)
        .bind(m.kind.as_str())
        .bind(&m.subject)
        .bind(m.state.as_str())
        .bind(count(m.keys_migrated)?)
        .bind(count(m.total_keys)?)
        .bind(i64::from(m.target_rf))
        .bind(m.started_at_ms)
        .bind(m.updated_at_ms)
        .bind(m.failure_reason.as_deref())
        .bind(count(m.bytes_migrated)?)
        .execute(&self.pool)
        .await;
        inserted(result, "migration", &m.migration_id)
    }

    async fn get_migration(&self, migration_id: &str) -> Result<Option<Migration>, MetaError> {
        let row = sqlx::query(&format!(
            "SELECT {MIGRATION_COLUMNS} FROM migrations WHERE migration_id = $1"
        ))
        .bind(migration_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?;
        row.as_ref().map(migration).transpose()
    }

    async fn active_migrations(&self) -> Result<Vec<Migration>, MetaError> {
        let rows = sqlx::query(&format!(
            "SELECT {MIGRATION_COLUMNS} FROM migrations WHERE state IN ('pending', 'in_progress') ORDER BY started_at_ms"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter().map(migration).collect()
    }

    async fn fail_migration(&self, migration_id: &str, reason: &str) -> Result<(), MetaError> {
        let done = sqlx::query(&format!(
            "UPDATE migrations SET state = $1, failure_reason = $2, updated_at_ms = $3 WHERE migration_id = $4 AND {ACTIVE}"
        ))
        .bind(MigrationState::Failed.as_str())
        .bind(reason)
        .bind(now_ms())
        .bind(migration_id)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        self.still_active(done.rows_affected(), migration_id).await
    }

    async fn recent_migrations(&self, limit: u32) -> Result<Vec<Migration>, MetaError> {
        let rows = sqlx::query(&format!(
            "SELECT {MIGRATION_COLUMNS} FROM migrations ORDER BY started_at_ms DESC, migration_id LIMIT $1"
        ))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter().map(migration).collect()
    }

    async fn update_migration(
        &self,
        migration_id: &str,
        state: MigrationState,
        keys_migrated: u64,
        total_keys: u64,
        bytes_migrated: u64,
    ) -> Result<(), MetaError> {
        let done = sqlx::query(&format!(
            "UPDATE migrations SET state = $1, keys_migrated = $2, total_keys = $3, bytes_migrated = $4, updated_at_ms = $5 WHERE migration_id = $6 AND {ACTIVE}"
        ))
        .bind(state.as_str())
        .bind(count(keys_migrated)?)
        .bind(count(total_keys)?)
        .bind(count(bytes_migrated)?)
        .bind(now_ms())
        .bind(migration_id)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        self.still_active(done.rows_affected(), migration_id).await
    }

    async fn migration_lease(
        &self,
        migration_id: &str,
    ) -> Result<Option<MigrationLease>, MetaError> {
        let row = sqlx::query(
            "SELECT owner, beat, cancel_requested FROM migrations WHERE migration_id = $1",
        )
        .bind(migration_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?;
        row.as_ref()
            .map(|r| {
                Ok(MigrationLease {
                    owner: r
                        .try_get("owner")
                        .map_err(|e| MetaError::Corrupt(e.to_string()))?,
                    beat: int(r, "beat")?,
                    cancel_requested: int::<i64>(r, "cancel_requested")? != 0,
                })
            })
            .transpose()
    }

    async fn renew_migration_lease(
        &self,
        migration_id: &str,
        owner: &str,
    ) -> Result<Option<bool>, MetaError> {
        let done = sqlx::query(&format!(
            "UPDATE migrations SET beat = beat + 1, owner = $1 WHERE migration_id = $2 AND {ACTIVE} AND (owner IS NULL OR owner = $1)"
        ))
        .bind(owner)
        .bind(migration_id)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        if done.rows_affected() == 0 {
            return Ok(None);
        }
        Ok(self
            .migration_lease(migration_id)
            .await?
            .map(|l| l.cancel_requested))
    }

    async fn claim_migration(
        &self,
        migration_id: &str,
        owner: &str,
        seen_beat: i64,
    ) -> Result<bool, MetaError> {
        let done = sqlx::query(&format!(
            "UPDATE migrations SET owner = $1, beat = beat + 1 WHERE migration_id = $2 AND beat = $3 AND {ACTIVE}"
        ))
        .bind(owner)
        .bind(migration_id)
        .bind(seen_beat)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(done.rows_affected() == 1)
    }

    async fn request_cancel(&self, migration_id: &str) -> Result<bool, MetaError> {
        let done = sqlx::query(&format!(
            "UPDATE migrations SET cancel_requested = 1 WHERE migration_id = $1 AND {ACTIVE}"
        ))
        .bind(migration_id)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(done.rows_affected() == 1)
    }

    async fn load_clock(&self, coordinator_id: &str) -> Result<u64, MetaError> {
        let row =
            sqlx::query("SELECT high_water FROM coordinator_clocks WHERE coordinator_id = $1")
                .bind(coordinator_id)
                .fetch_optional(&self.pool)
                .await
                .map_err(unavailable)?;
        row.as_ref().map_or(Ok(0), |r| int(r, "high_water"))
    }

    async fn store_stream_checkpoint(
        &self,
        checkpoint: &StreamCheckpoint,
    ) -> Result<(), MetaError> {
        sqlx::query(
            "INSERT INTO stream_checkpoints (stream_id, migration_id, fingerprint, last_key, keys, bytes) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (stream_id) DO UPDATE SET migration_id = excluded.migration_id, \
             fingerprint = excluded.fingerprint, last_key = excluded.last_key, \
             keys = excluded.keys, bytes = excluded.bytes",
        )
        .bind(&checkpoint.stream_id)
        .bind(&checkpoint.migration_id)
        // A bit pattern, not a count: stored as the signed integer with the same bits.
        .bind(checkpoint.fingerprint as i64)
        .bind(checkpoint.last_key.clone())
        .bind(count(checkpoint.keys)?)
        .bind(count(checkpoint.bytes)?)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn stream_checkpoints(
        &self,
        migration_id: &str,
    ) -> Result<Vec<StreamCheckpoint>, MetaError> {
        let rows = sqlx::query(
            "SELECT stream_id, migration_id, fingerprint, last_key, keys, bytes \
             FROM stream_checkpoints WHERE migration_id = $1 ORDER BY stream_id",
        )
        .bind(migration_id)
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter()
            .map(|row| {
                let fingerprint: i64 = int(row, "fingerprint")?;
                Ok(StreamCheckpoint {
                    stream_id: text(row, "stream_id")?,
                    migration_id: text(row, "migration_id")?,
                    fingerprint: fingerprint as u64,
                    last_key: row
                        .try_get("last_key")
                        .map_err(|e| MetaError::Corrupt(e.to_string()))?,
                    keys: int(row, "keys")?,
                    bytes: int(row, "bytes")?,
                })
            })
            .collect()
    }

    async fn record_range_repairs(&self, repairs: &[RangeRepair]) -> Result<(), MetaError> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        for r in repairs {
            sqlx::query(
                "INSERT INTO range_repairs (range_start, range_end, repaired_at_ms, keys_compared, keys_fixed, complete) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (range_start, range_end) DO UPDATE SET repaired_at_ms = excluded.repaired_at_ms, \
                 keys_compared = excluded.keys_compared, keys_fixed = excluded.keys_fixed, complete = excluded.complete",
            )
            // Ring positions are bit patterns: stored as the signed integers with the same bits.
            .bind(r.range.start as i64)
            .bind(r.range.end as i64)
            .bind(r.repaired_at_ms)
            .bind(count(r.keys_compared)?)
            .bind(count(r.keys_fixed)?)
            .bind(i64::from(r.complete))
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)
    }

    async fn range_repairs(&self) -> Result<Vec<RangeRepair>, MetaError> {
        let rows = sqlx::query(
            "SELECT range_start, range_end, repaired_at_ms, keys_compared, keys_fixed, complete \
             FROM range_repairs",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        // Sorted here: the database orders the stored (signed) bits, not ring positions.
        let mut repairs = rows
            .iter()
            .map(|row| {
                let start: i64 = int(row, "range_start")?;
                let end: i64 = int(row, "range_end")?;
                let complete: i64 = int(row, "complete")?;
                Ok(RangeRepair {
                    range: crate::ring::HashRange::new(start as u64, end as u64),
                    repaired_at_ms: int(row, "repaired_at_ms")?,
                    keys_compared: int(row, "keys_compared")?,
                    keys_fixed: int(row, "keys_fixed")?,
                    complete: complete != 0,
                })
            })
            .collect::<Result<Vec<RangeRepair>, MetaError>>()?;
        repairs.sort_by_key(|r| r.range);
        Ok(repairs)
    }

    async fn record_repair_counts(
        &self,
        repair_id: &str,
        keys_compared: u64,
        keys_fixed: u64,
    ) -> Result<(), MetaError> {
        sqlx::query(
            "INSERT INTO repair_runs (repair_id, keys_compared, keys_fixed) VALUES ($1, $2, $3) \
             ON CONFLICT (repair_id) DO UPDATE SET keys_compared = excluded.keys_compared, \
             keys_fixed = excluded.keys_fixed",
        )
        .bind(repair_id)
        .bind(count(keys_compared)?)
        .bind(count(keys_fixed)?)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn repair_counts(&self, repair_id: &str) -> Result<(u64, u64), MetaError> {
        let row =
            sqlx::query("SELECT keys_compared, keys_fixed FROM repair_runs WHERE repair_id = $1")
                .bind(repair_id)
                .fetch_optional(&self.pool)
                .await
                .map_err(unavailable)?;
        match row {
            Some(row) => Ok((int(&row, "keys_compared")?, int(&row, "keys_fixed")?)),
            None => Ok((0, 0)),
        }
    }

    async fn delete_stream_checkpoints(&self, migration_id: &str) -> Result<(), MetaError> {
        sqlx::query("DELETE FROM stream_checkpoints WHERE migration_id = $1")
            .bind(migration_id)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn store_clock(&self, coordinator_id: &str, high_water: u64) -> Result<(), MetaError> {
        let value = i64::try_from(high_water).map_err(|_| {
            MetaError::Corrupt(format!("clock high-water {high_water} out of range"))
        })?;
        sqlx::query(
            "INSERT INTO coordinator_clocks (coordinator_id, high_water) VALUES ($1, $2) \
             ON CONFLICT (coordinator_id) DO UPDATE SET high_water = excluded.high_water \
             WHERE coordinator_clocks.high_water < excluded.high_water",
        )
        .bind(coordinator_id)
        .bind(value)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(())
    }
}
