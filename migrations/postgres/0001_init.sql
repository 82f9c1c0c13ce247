-- pairdb metadata (PostgreSQL). Applied at coordinator start; idempotent.
CREATE TABLE IF NOT EXISTS tenants (
    tenant_id TEXT PRIMARY KEY,
    replication_factor BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS storage_nodes (
    node_id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    port BIGINT NOT NULL,
    virtual_nodes BIGINT NOT NULL,
    state TEXT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);
-- Tokens chosen at admission (decimal, comma-separated); NULL: derived by the xxh3 rule.
ALTER TABLE storage_nodes ADD COLUMN IF NOT EXISTS tokens TEXT;
CREATE TABLE IF NOT EXISTS hints (
    id BIGSERIAL PRIMARY KEY,
    target_node TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    record BYTEA NOT NULL,
    created_at_ms BIGINT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS hints_by_target ON hints (target_node, id);
-- Durable high-water mark of each coordinator's hybrid logical clock (vclock::HybridClock).
CREATE TABLE IF NOT EXISTS coordinator_clocks (
    coordinator_id TEXT PRIMARY KEY,
    high_water BIGINT NOT NULL
);
-- Topology and replication-factor changes with their progress (API.md, migrations).
CREATE TABLE IF NOT EXISTS migrations (
    migration_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    subject TEXT NOT NULL,
    state TEXT NOT NULL,
    keys_migrated BIGINT NOT NULL,
    total_keys BIGINT NOT NULL,
    -- For replication_factor_change: the RF the tenant moves to (0 otherwise).
    target_rf BIGINT NOT NULL,
    started_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);
-- Why a failed migration failed (NULL otherwise).
ALTER TABLE migrations ADD COLUMN IF NOT EXISTS failure_reason TEXT;
-- Bytes streamed so far (node additions and removals).
ALTER TABLE migrations ADD COLUMN IF NOT EXISTS bytes_migrated BIGINT NOT NULL DEFAULT 0;
-- The coordinator carrying a migration out, its lease renewals, and a cancel request.
ALTER TABLE migrations ADD COLUMN IF NOT EXISTS owner TEXT;
ALTER TABLE migrations ADD COLUMN IF NOT EXISTS beat BIGINT NOT NULL DEFAULT 0;
ALTER TABLE migrations ADD COLUMN IF NOT EXISTS cancel_requested BIGINT NOT NULL DEFAULT 0;
-- Where each stream of a node change got (the last record its target acknowledged), mirrored
-- from the senders' status by the coordinator driving it: a sender that lost its own
-- checkpoint resumes from here.
CREATE TABLE IF NOT EXISTS stream_checkpoints (
    stream_id TEXT PRIMARY KEY,
    migration_id TEXT NOT NULL,
    fingerprint BIGINT NOT NULL,
    last_key BYTEA NOT NULL,
    keys BIGINT NOT NULL,
    bytes BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS stream_checkpoints_by_migration ON stream_checkpoints (migration_id);
-- Anti-entropy: the last repair of each ring range (over every tenant), for
-- `GET /v1/admin/repair` and the age of the oldest unrepaired range. Range bounds are u64 ring
-- positions stored as the signed integers with the same bits.
CREATE TABLE IF NOT EXISTS range_repairs (
    range_start BIGINT NOT NULL,
    range_end BIGINT NOT NULL,
    repaired_at_ms BIGINT NOT NULL,
    keys_compared BIGINT NOT NULL,
    keys_fixed BIGINT NOT NULL,
    -- 1 when every replica of every tenant answered and every difference was fixed.
    complete BIGINT NOT NULL,
    PRIMARY KEY (range_start, range_end)
);
-- Anti-entropy: what each repair (a migration of type repair) compared and fixed so far.
CREATE TABLE IF NOT EXISTS repair_runs (
    repair_id TEXT PRIMARY KEY,
    keys_compared BIGINT NOT NULL,
    keys_fixed BIGINT NOT NULL
);
-- Deleted tenants: each incarnation's storage namespace, purged from every storage node
-- (tenant deletion; a re-created id is a new incarnation with a namespace of its own).
ALTER TABLE tenants ADD COLUMN IF NOT EXISTS incarnation BIGINT NOT NULL DEFAULT 1;
CREATE TABLE IF NOT EXISTS deleted_tenants (
    storage_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    incarnation BIGINT NOT NULL,
    deleted_at_ms BIGINT NOT NULL
);
-- The registry's epoch: raised in the same transaction as every change of storage_nodes, so
-- a ring read with its epoch is ordered against every other (storage nodes' ring fence,
-- STALE_RING). One row.
CREATE TABLE IF NOT EXISTS registry_epoch (
    id BIGINT PRIMARY KEY,
    epoch BIGINT NOT NULL
);
INSERT INTO registry_epoch (id, epoch) VALUES (1, 1) ON CONFLICT (id) DO NOTHING;
-- The registry epoch the last cleanup of every node verified against, without skipping a
-- node: up to it, no node holds records of ranges it gave away (which a later change could
-- give back to it after their tombstones were purged elsewhere). One row; only rises.
CREATE TABLE IF NOT EXISTS cleanup_epoch (
    id BIGINT PRIMARY KEY,
    epoch BIGINT NOT NULL
);
INSERT INTO cleanup_epoch (id, epoch) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;
