//! One test suite for both metadata store backends: SQLite (embedded) and PostgreSQL (a
//! throwaway server started from the machine's binaries; skipped with a message when they are
//! missing, a failure under CI=true).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use common::backends::{Postgres, skip_or_fail};

use pairdb::meta::{
    Hint, MetaError, MetadataStore, Migration, MigrationKind, MigrationState, NodeRecord,
    RangeRepair, Registry, SqlMetadataStore, StreamCheckpoint, registry_view,
};
use pairdb::ring::{HashRange, NodeState};

fn node(id: &str, state: NodeState) -> NodeRecord {
    NodeRecord {
        node_id: id.into(),
        host: "127.0.0.1".into(),
        port: 7101,
        virtual_nodes: 150,
        tokens: None,
        state,
    }
}

fn hint(target: &str, n: u8) -> Hint {
    Hint {
        id: 0,
        target_node: target.into(),
        tenant_id: "acme".into(),
        record: vec![n, 0, 255, n],
        created_at_ms: 1_700_000_000_000 + i64::from(n),
        attempts: 0,
    }
}

/// The registry's epoch (what storage nodes' ring fence compares): every change raises it,
/// a refused change does not, and concurrent changes from two connections each raise it once.
async fn registry_epochs(a: &dyn MetadataStore, b: &dyn MetadataStore) {
    let epoch = |r: Registry| r.epoch;
    let start = b.registry().await.expect("registry");
    assert!(start.epoch > 0);
    assert_eq!(start.nodes, a.list_nodes().await.expect("list"));
    a.add_node(&node("e1", NodeState::Bootstrapping))
        .await
        .expect("add");
    let added = b.registry().await.expect("registry");
    assert!(added.epoch > start.epoch, "an addition raises the epoch");
    assert_eq!(added.nodes, a.list_nodes().await.expect("list"));
    b.set_node_state("e1", NodeState::Active)
        .await
        .expect("state");
    let activated = epoch(a.registry().await.expect("registry"));
    assert!(activated > added.epoch, "a state change raises the epoch");
    let stale = registry_view(&start.nodes);
    assert!(
        b.set_node_state_if("e1", NodeState::Draining, &stale)
            .await
            .is_err()
    );
    assert!(a.remove_node("ghost").await.is_err());
    let seen = registry_view(&a.list_nodes().await.expect("list"));
    assert!(
        b.commit_node_changes(&seen, &[], &["ghost".to_owned()])
            .await
            .is_err()
    );
    assert_eq!(
        epoch(a.registry().await.expect("registry")),
        activated,
        "refused changes leave the epoch"
    );
    b.commit_node_changes(&seen, &[], &["e1".to_owned()])
        .await
        .expect("commit");
    let committed = epoch(a.registry().await.expect("registry"));
    assert!(committed > activated);
    let adds = (0..8).map(|i| {
        let store = if i % 2 == 0 { a } else { b };
        async move {
            store
                .add_node(&node(&format!("c{i}"), NodeState::Bootstrapping))
                .await
        }
    });
    for added in futures::future::join_all(adds).await {
        added.expect("concurrent add");
    }
    assert_eq!(
        epoch(b.registry().await.expect("registry")),
        committed + 8,
        "each of 8 concurrent additions raised the epoch once"
    );
    for i in 0..8 {
        a.remove_node(&format!("c{i}")).await.expect("remove");
    }
    // A replication-factor change places keys anew: it raises the epoch too, and a tenant read
    // carries the epoch of its read.
    let before = epoch(a.registry().await.expect("registry"));
    let created = a.create_tenant("epochs", 3).await.expect("create");
    assert!(created.registry_epoch >= before && created.registry_epoch > 0);
    b.update_replication_factor("epochs", 2)
        .await
        .expect("rf change");
    let changed = epoch(a.registry().await.expect("registry"));
    assert!(changed > before, "an RF change raises the epoch");
    let read = a.get_tenant("epochs").await.expect("get").expect("tenant");
    assert_eq!((read.replication_factor, read.registry_epoch), (2, changed));
}

/// The behaviour both backends must share. `a` and `b` are two connections to one store, as
/// two coordinators would have.
async fn suite(a: &dyn MetadataStore, b: &dyn MetadataStore) {
    a.ping().await.expect("ping");

    // Migrations: created by one coordinator, progress seen by the other.
    let m = Migration {
        migration_id: "m-1".into(),
        kind: MigrationKind::ReplicationFactorChange,
        subject: "acme".into(),
        state: MigrationState::Pending,
        keys_migrated: 0,
        total_keys: 0,
        target_rf: 3,
        started_at_ms: 1_700_000_000_000,
        updated_at_ms: 1_700_000_000_000,
        failure_reason: None,
        bytes_migrated: 0,
    };
    a.create_migration(&m).await.expect("create migration");
    assert!(matches!(
        a.create_migration(&m).await,
        Err(MetaError::Exists { .. })
    ));
    assert_eq!(b.get_migration("m-1").await.expect("get"), Some(m.clone()));
    b.update_migration("m-1", MigrationState::InProgress, 40, 100, 4096)
        .await
        .expect("progress");
    let seen = a
        .get_migration("m-1")
        .await
        .expect("get")
        .expect("migration");
    assert_eq!(seen.bytes_migrated, 4096);
    assert_eq!(
        (seen.state, seen.keys_migrated, seen.total_keys, seen.kind),
        (
            MigrationState::InProgress,
            40,
            100,
            MigrationKind::ReplicationFactorChange
        )
    );
    assert!(seen.updated_at_ms > m.updated_at_ms);
    assert_eq!(a.get_migration("m-2").await.expect("get"), None);
    let later = Migration {
        migration_id: "m-0".into(),
        started_at_ms: m.started_at_ms + 5,
        ..m.clone()
    };
    b.create_migration(&later).await.expect("create");
    b.fail_migration("m-0", "no streaming progress for 3s")
        .await
        .expect("fail");
    let failed = a
        .get_migration("m-0")
        .await
        .expect("get")
        .expect("migration");
    assert_eq!(failed.state, MigrationState::Failed);
    assert_eq!(
        failed.failure_reason.as_deref(),
        Some("no streaming progress for 3s")
    );
    let recent = a.recent_migrations(10).await.expect("recent");
    assert_eq!(
        recent
            .iter()
            .map(|m| m.migration_id.as_str())
            .collect::<Vec<_>>(),
        vec!["m-0", "m-1"],
        "newest first, failed ones too"
    );
    assert_eq!(a.recent_migrations(1).await.expect("recent").len(), 1);
    assert!(matches!(
        a.fail_migration("m-9", "x").await,
        Err(MetaError::NotFound { .. })
    ));
    let active = b.active_migrations().await.expect("active");
    assert_eq!(active.len(), 1);
    assert_eq!(
        (active[0].migration_id.as_str(), active[0].target_rf),
        ("m-1", 3)
    );
    // Leases: the first renewal takes an unowned migration; another coordinator's renewal is
    // refused; a claim needs the beat it saw; a cancel request reaches the owner's renewal.
    assert_eq!(
        a.renew_migration_lease("m-1", "c1").await.expect("renew"),
        Some(false)
    );
    assert_eq!(
        b.renew_migration_lease("m-1", "c2").await.expect("renew"),
        None,
        "c1 holds it"
    );
    let lease = b
        .migration_lease("m-1")
        .await
        .expect("lease")
        .expect("known");
    assert_eq!(lease.owner.as_deref(), Some("c1"));
    assert!(
        !b.claim_migration("m-1", "c2", lease.beat - 1)
            .await
            .expect("claim"),
        "a beat that moved on"
    );
    assert!(
        b.claim_migration("m-1", "c2", lease.beat)
            .await
            .expect("claim")
    );
    assert!(
        !a.claim_migration("m-1", "c1", lease.beat)
            .await
            .expect("claim"),
        "only one claim of a beat wins"
    );
    assert_eq!(
        a.renew_migration_lease("m-1", "c1").await.expect("renew"),
        None
    );
    assert!(a.request_cancel("m-1").await.expect("cancel"));
    assert_eq!(
        b.renew_migration_lease("m-1", "c2").await.expect("renew"),
        Some(true)
    );
    assert!(!a.request_cancel("m-0").await.expect("cancel"), "m-0 ended");
    assert_eq!(a.migration_lease("m-9").await.expect("lease"), None);
    a.update_migration("m-1", MigrationState::Completed, 100, 100, 8192)
        .await
        .expect("done");
    assert!(b.active_migrations().await.expect("active").is_empty());
    // An end is never written over (a late loop that lost its lease cannot undo it).
    assert!(matches!(
        b.update_migration("m-1", MigrationState::InProgress, 5, 5, 5)
            .await,
        Err(MetaError::Changed(_))
    ));
    assert!(matches!(
        b.fail_migration("m-1", "late").await,
        Err(MetaError::Changed(_))
    ));
    assert_eq!(
        a.get_migration("m-1").await.expect("get").map(|m| m.state),
        Some(MigrationState::Completed)
    );
    assert_eq!(
        b.renew_migration_lease("m-1", "c2").await.expect("renew"),
        None
    );
    assert!(matches!(
        a.update_migration("m-2", MigrationState::Failed, 0, 0, 0)
            .await,
        Err(MetaError::NotFound { .. })
    ));

    let t = a.create_tenant("acme", 3).await.expect("create");
    assert_eq!((t.tenant_id.as_str(), t.replication_factor), ("acme", 3));
    assert!(matches!(
        a.create_tenant("acme", 1).await,
        Err(MetaError::Exists { .. })
    ));
    let seen = b
        .get_tenant("acme")
        .await
        .expect("get")
        .expect("visible to the other coordinator");
    assert_eq!(seen, t);
    assert_eq!(a.get_tenant("nobody").await.expect("get"), None);
    // Pages of the tenant list: every tenant once, in one order, whatever the page size.
    for id in ["zeta", "Beta", "beta-2", "ünï"] {
        a.create_tenant(id, 1).await.expect("create");
    }
    let all: Vec<String> = b
        .list_tenants(None, 100)
        .await
        .expect("list")
        .into_iter()
        .map(|t| t.tenant_id)
        .collect();
    assert_eq!(all.len(), 5, "{all:?}");
    let mut paged = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = b.list_tenants(after.as_deref(), 2).await.expect("page");
        if page.is_empty() {
            break;
        }
        after = page.last().map(|t| t.tenant_id.clone());
        paged.extend(page.into_iter().map(|t| t.tenant_id));
    }
    assert_eq!(
        paged, all,
        "paging by the last id neither skips nor repeats"
    );
    // Deleting: the row goes, the incarnation is recorded (stamped by the store's clock, the
    // same for every coordinator), and the id comes back as the next incarnation.
    assert_eq!(b.ms_since_deleted("zeta").await.expect("ago"), None);
    let gone = a.delete_tenant("zeta").await.expect("delete");
    assert_eq!(
        (gone.incarnation, gone.storage_id()),
        (1, "zeta".to_owned())
    );
    assert!(matches!(
        a.delete_tenant("zeta").await,
        Err(MetaError::NotFound { .. })
    ));
    let ago = b
        .ms_since_deleted("zeta")
        .await
        .expect("ago")
        .expect("deleted");
    assert!((0..10_000).contains(&ago), "{ago} ms");
    let deleted = b.deleted_tenants().await.expect("deleted");
    assert_eq!(deleted.len(), 1);
    assert_eq!(deleted[0].storage_id, "zeta");
    let again = b.create_tenant("zeta", 1).await.expect("re-create");
    assert_eq!(
        (again.incarnation, again.storage_id()),
        (2, "zeta:2".to_owned())
    );
    // The update lands in a later millisecond than zeta's re-creation, so "updated since the
    // update" names acme alone (with write-ahead logging both commits fit in one millisecond).
    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    let before = a
        .update_replication_factor("acme", 5)
        .await
        .expect("update");
    assert_eq!(before.replication_factor, 3);
    let after = b.get_tenant("acme").await.expect("get").expect("tenant");
    assert_eq!(after.replication_factor, 5);
    assert!(after.updated_at_ms >= after.created_at_ms);
    let changed = b
        .tenants_updated_since(after.updated_at_ms)
        .await
        .expect("changed");
    assert_eq!(
        changed,
        vec![after.clone()],
        "the change is visible to other coordinators"
    );
    assert!(
        b.tenants_updated_since(after.updated_at_ms + 1)
            .await
            .expect("changed")
            .is_empty()
    );
    assert!(matches!(
        a.update_replication_factor("nobody", 2).await,
        Err(MetaError::NotFound { .. })
    ));

    // A first registry is seeded whole, once: a second seed (another coordinator starting at
    // the same time) changes nothing.
    a.seed_nodes(&[node("s2", NodeState::Active)])
        .await
        .expect("seed");
    assert!(matches!(
        b.seed_nodes(&[node("s7", NodeState::Active), node("s8", NodeState::Active)])
            .await,
        Err(MetaError::Changed(_))
    ));
    a.add_node(&node("s1", NodeState::Bootstrapping))
        .await
        .expect("add");
    assert!(matches!(
        b.add_node(&node("s1", NodeState::Active)).await,
        Err(MetaError::Exists { .. })
    ));
    let nodes = b.list_nodes().await.expect("list");
    assert_eq!(
        nodes,
        vec![
            node("s1", NodeState::Bootstrapping),
            node("s2", NodeState::Active)
        ]
    );
    b.set_node_state("s1", NodeState::Active)
        .await
        .expect("state");
    a.set_node_state("s2", NodeState::Down)
        .await
        .expect("state");
    assert_eq!(
        a.list_nodes().await.expect("list"),
        vec![node("s1", NodeState::Active), node("s2", NodeState::Down)]
    );
    assert!(matches!(
        a.set_node_state("s9", NodeState::Active).await,
        Err(MetaError::NotFound { .. })
    ));
    // Admission with stored tokens: only against the registry it was planned on.
    let admitted = NodeRecord {
        tokens: Some(vec![u64::MAX, 0, 1 << 63]),
        virtual_nodes: 3,
        ..node("s3", NodeState::Bootstrapping)
    };
    let before = registry_view(&a.list_nodes().await.expect("list"));
    let entry = |id: &str, state| (id.to_owned(), state);
    for stale in [
        vec![entry("s1", NodeState::Active)],
        // Same ids, another state: a change started meanwhile.
        vec![
            entry("s1", NodeState::Active),
            entry("s2", NodeState::Active),
        ],
    ] {
        assert!(matches!(
            b.admit_node(&admitted, &stale).await,
            Err(MetaError::Changed(_))
        ));
        assert!(matches!(
            b.set_node_state_if("s2", NodeState::Draining, &stale).await,
            Err(MetaError::Changed(_))
        ));
    }
    assert_eq!(
        registry_view(&a.list_nodes().await.expect("list")),
        before,
        "nothing changed"
    );
    b.admit_node(&admitted, &before).await.expect("admit");
    assert!(matches!(
        a.admit_node(&admitted, &before).await,
        Err(MetaError::Changed(_))
    ));
    let now = registry_view(&a.list_nodes().await.expect("list"));
    a.set_node_state_if("s2", NodeState::Draining, &now)
        .await
        .expect("state");
    a.set_node_state("s2", NodeState::Down)
        .await
        .expect("state");
    let listed = a.list_nodes().await.expect("list");
    assert_eq!(listed[2], admitted, "tokens come back exactly");
    a.remove_node("s3").await.expect("remove");
    let empty = NodeRecord {
        tokens: Some(Vec::new()),
        virtual_nodes: 0,
        ..node("s3", NodeState::Bootstrapping)
    };
    a.add_node(&empty).await.expect("add");
    assert_eq!(
        b.list_nodes().await.expect("list")[2],
        empty,
        "no tokens is not corrupt"
    );
    a.remove_node("s3").await.expect("remove");
    a.remove_node("s1").await.expect("remove");
    assert_eq!(b.list_nodes().await.expect("list").len(), 1);
    assert!(matches!(
        a.remove_node("s1").await,
        Err(MetaError::NotFound { .. })
    ));

    // Several node changes become final at once, or none of them.
    a.add_node(&node("j1", NodeState::Bootstrapping))
        .await
        .expect("add");
    a.add_node(&node("l1", NodeState::Draining))
        .await
        .expect("add");
    let stale = registry_view(&a.list_nodes().await.expect("list"));
    a.set_node_state("s2", NodeState::Active)
        .await
        .expect("state");
    let (joiners, leavers) = (vec!["j1".to_owned()], vec!["l1".to_owned()]);
    assert!(matches!(
        b.commit_node_changes(&stale, &joiners, &leavers).await,
        Err(MetaError::Changed(_))
    ));
    let seen = registry_view(&a.list_nodes().await.expect("list"));
    assert_eq!(seen.len(), 3, "nothing committed: {seen:?}");
    b.commit_node_changes(&seen, &joiners, &leavers)
        .await
        .expect("commit");
    let listed = registry_view(&a.list_nodes().await.expect("list"));
    assert_eq!(
        listed,
        vec![
            ("j1".to_owned(), NodeState::Active),
            ("s2".to_owned(), NodeState::Active)
        ]
    );
    a.add_node(&node("j2", NodeState::Bootstrapping))
        .await
        .expect("add");
    let seen = registry_view(&a.list_nodes().await.expect("list"));
    assert!(matches!(
        b.commit_node_changes(&seen, &["j2".to_owned()], &["ghost".to_owned()])
            .await,
        Err(MetaError::NotFound { .. })
    ));
    assert_eq!(
        registry_view(&a.list_nodes().await.expect("list")),
        seen,
        "a failed commit changes nothing"
    );
    a.remove_node("j1").await.expect("remove");
    a.remove_node("j2").await.expect("remove");

    registry_epochs(a, b).await;

    a.store_hints(&[hint("s2", 1), hint("s2", 2), hint("s3", 9), hint("s2", 3)])
        .await
        .expect("hints");
    let first = b.hints_for("s2", 2).await.expect("hints");
    assert_eq!(
        first.iter().map(|h| h.record[0]).collect::<Vec<_>>(),
        vec![1, 2],
        "oldest first"
    );
    assert_eq!(first[0].record, vec![1, 0, 255, 1], "bytes intact");
    assert_eq!(first[0].created_at_ms, 1_700_000_000_001);
    let paged = b.hints_after("s2", first[0].id, 10).await.expect("hints");
    assert_eq!(
        paged.iter().map(|h| h.record[0]).collect::<Vec<_>>(),
        vec![2, 3],
        "the page after an id, oldest first"
    );
    assert_eq!(
        a.hint_counts().await.expect("counts"),
        vec![("s2".to_owned(), 3), ("s3".to_owned(), 1)]
    );
    let ids: Vec<i64> = first.iter().map(|h| h.id).collect();
    a.record_hint_attempt(&ids).await.expect("attempt");
    assert!(
        a.hints_for("s2", 2)
            .await
            .expect("hints")
            .iter()
            .all(|h| h.attempts == 1)
    );
    b.delete_hints(&ids).await.expect("delete");
    let left = a.hints_for("s2", 10).await.expect("hints");
    assert_eq!(
        left.iter().map(|h| h.record[0]).collect::<Vec<_>>(),
        vec![3]
    );
    assert_eq!(a.hints_for("nobody", 10).await.expect("hints"), vec![]);

    // Stream checkpoints: replaced per stream, listed and forgotten per migration; the
    // fingerprint keeps all 64 bits.
    let checkpoint = |id: &str, m: &str, keys: u64| StreamCheckpoint {
        stream_id: id.to_owned(),
        migration_id: m.to_owned(),
        fingerprint: u64::MAX - 7,
        last_key: vec![0, 255, 1],
        keys,
        bytes: keys * 10,
    };
    for c in [
        checkpoint("m1-s1-s4", "m1", 500),
        checkpoint("m1-s2-s4", "m1", 1000),
        checkpoint("m2-s1-s5", "m2", 1),
    ] {
        a.store_stream_checkpoint(&c).await.expect("store");
    }
    b.store_stream_checkpoint(&checkpoint("m1-s1-s4", "m1", 1500))
        .await
        .expect("replace");
    assert_eq!(
        b.stream_checkpoints("m1").await.expect("list"),
        vec![
            checkpoint("m1-s1-s4", "m1", 1500),
            checkpoint("m1-s2-s4", "m1", 1000)
        ]
    );
    a.delete_stream_checkpoints("m1").await.expect("delete");
    assert_eq!(b.stream_checkpoints("m1").await.expect("list"), vec![]);
    assert_eq!(b.stream_checkpoints("m2").await.expect("list").len(), 1);

    assert_eq!(a.load_clock("c1").await.expect("clock"), 0);
    a.store_clock("c1", 500).await.expect("clock");
    b.store_clock("c1", 400)
        .await
        .expect("a lower mark is ignored");
    assert_eq!(b.load_clock("c1").await.expect("clock"), 500);
    b.store_clock("c1", 900).await.expect("clock");
    assert_eq!(a.load_clock("c1").await.expect("clock"), 900);
    assert_eq!(a.load_clock("c2").await.expect("clock"), 0);

    // Anti-entropy: the last repair of each range (replaced, positions above i64::MAX kept)
    // and each repair's counts.
    let range_repair = |start: u64, end: u64, at: i64, complete: bool| RangeRepair {
        range: HashRange::new(start, end),
        repaired_at_ms: at,
        keys_compared: 7,
        keys_fixed: 3,
        complete,
    };
    a.record_range_repairs(&[
        range_repair(u64::MAX - 9, 5, 100, false),
        range_repair(5, u64::MAX - 9, 100, true),
    ])
    .await
    .expect("record");
    b.record_range_repairs(&[range_repair(u64::MAX - 9, 5, 200, true)])
        .await
        .expect("replace");
    assert_eq!(
        a.range_repairs().await.expect("list"),
        vec![
            range_repair(5, u64::MAX - 9, 100, true),
            range_repair(u64::MAX - 9, 5, 200, true),
        ]
    );
    assert_eq!(a.repair_counts("r1").await.expect("counts"), (0, 0));
    a.record_repair_counts("r1", 10, 2).await.expect("counts");
    b.record_repair_counts("r1", 30, 4).await.expect("counts");
    assert_eq!(a.repair_counts("r1").await.expect("counts"), (30, 4));
    assert_eq!(b.repair_counts("r2").await.expect("counts"), (0, 0));

    leftovers_until_a_cleanup(a, b).await;
}

/// Leftovers (records of ranges a node gave away) may exist once a placement change completed
/// and the registry moved past the last complete cleanup; a cleanup's epoch only rises.
async fn leftovers_until_a_cleanup(a: &dyn MetadataStore, b: &dyn MetadataStore) {
    let change = Migration::begin(
        "leftovers-1".into(),
        MigrationKind::NodeAddition,
        "e9",
        MigrationState::InProgress,
    );
    a.create_migration(&change).await.expect("create");
    a.update_migration("leftovers-1", MigrationState::Completed, 0, 0, 0)
        .await
        .expect("complete");
    let now = b.leftovers().await.expect("leftovers");
    assert!(now.placement_changed);
    let epoch = b.registry().await.expect("registry").epoch;
    assert_eq!(now.registry_epoch, epoch);
    assert!(now.cleaned_epoch < epoch);
    assert!(now.may_exist(), "{now:?}");
    b.record_cleaned_epoch(epoch).await.expect("cleaned");
    a.record_cleaned_epoch(epoch - 1).await.expect("lower");
    let cleaned = a.leftovers().await.expect("leftovers");
    assert_eq!(cleaned.cleaned_epoch, epoch, "never lowered");
    assert!(!cleaned.may_exist(), "{cleaned:?}");
    a.add_node(&node("e9", NodeState::Bootstrapping))
        .await
        .expect("add");
    a.remove_node("e9").await.expect("remove");
    assert!(
        b.leftovers().await.expect("leftovers").may_exist(),
        "any registry change after the cleanup counts"
    );
    b.record_cleaned_epoch(b.registry().await.expect("registry").epoch)
        .await
        .expect("cleaned");
    assert!(!a.leftovers().await.expect("leftovers").may_exist());
}

/// Runs the suite over two connections to `url`, then checks that reconnecting (which applies
/// the schema again) keeps the data.
async fn suite_then_reconnect(url: &str) {
    let a = SqlMetadataStore::connect(url).await.expect("connect a");
    let b = SqlMetadataStore::connect(url).await.expect("connect b");
    suite(&a, &b).await;
    drop((a, b));
    let again = SqlMetadataStore::connect(url)
        .await
        .expect("reconnect applies the schema again");
    let tenant = again.get_tenant("acme").await.expect("get");
    assert_eq!(tenant.map(|t| t.replication_factor), Some(5));
}

/// A SQLite store made before token allocation (no `tokens` column) gains the column at
/// connect; its nodes keep their derived tokens.
#[tokio::test]
async fn an_old_sqlite_store_is_upgraded_and_keeps_derived_tokens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("meta.db");
    let url = format!("sqlite://{}", path.display());
    {
        use sqlx::Connection;
        let mut conn = sqlx::SqliteConnection::connect(&format!("{url}?mode=rwc"))
            .await
            .expect("sqlite");
        sqlx::raw_sql(
            "CREATE TABLE storage_nodes (node_id TEXT PRIMARY KEY, host TEXT NOT NULL, \
             port INTEGER NOT NULL, virtual_nodes INTEGER NOT NULL, state TEXT NOT NULL, \
             updated_at_ms BIGINT NOT NULL); \
             INSERT INTO storage_nodes VALUES ('s1', '127.0.0.1', 7101, 150, 'active', 1);",
        )
        .execute(&mut conn)
        .await
        .expect("old schema");
    }
    let store = SqlMetadataStore::connect(&url).await.expect("upgrade");
    assert_eq!(
        store.list_nodes().await.expect("list"),
        vec![node("s1", NodeState::Active)]
    );
    drop(store);
    SqlMetadataStore::connect(&url)
        .await
        .expect("a second connect finds the column and leaves it");
}

/// Coordinators opening one SQLite file at once all add the new columns or find them added:
/// none fails on the other's ALTER ("duplicate column name").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_stores_opened_together_all_start() {
    for round in 0..5 {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("meta.db").display());
        let opens: Vec<_> = (0..4)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move { SqlMetadataStore::connect(&url).await.map(|_| ()) })
            })
            .collect();
        for open in opens {
            open.await
                .expect("task")
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
        }
    }
}

/// A SQLite store logs ahead: its commits go to a long-lived `-wal` file, never through a
/// rollback journal created and deleted per commit (filesystem-journal commits that stall the
/// fsyncs of every other process on the disk); and the mode is the file's, so a plain
/// connection opened later sees it too.
#[tokio::test]
async fn a_sqlite_store_commits_through_a_write_ahead_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("meta.db");
    let url = format!("sqlite://{}", path.display());
    let store = SqlMetadataStore::connect(&url).await.expect("connect");
    store
        .add_node(&node("s1", NodeState::Active))
        .await
        .expect("a commit");
    assert!(
        dir.path().join("meta.db-wal").exists(),
        "commits go to the write-ahead log"
    );
    assert!(!dir.path().join("meta.db-journal").exists());
    use sqlx::Connection;
    let mut plain = sqlx::SqliteConnection::connect(&url).await.expect("sqlite");
    let (mode,): (String,) = sqlx::query_as("PRAGMA journal_mode")
        .fetch_one(&mut plain)
        .await
        .expect("journal mode");
    assert_eq!(mode, "wal");
    assert_eq!(
        store.list_nodes().await.expect("list"),
        vec![node("s1", NodeState::Active)]
    );
}

#[tokio::test]
async fn sqlite_store_passes_the_suite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("meta.db").display());
    suite_then_reconnect(&url).await;
}

/// A throwaway PostgreSQL server on a free port, stopped on drop.
#[tokio::test]
async fn postgres_store_passes_the_suite() {
    let Some(pg) = Postgres::start() else {
        skip_or_fail(
            "postgres_store_passes_the_suite",
            "PostgreSQL (apt-get install postgresql)",
        );
        return;
    };
    suite_then_reconnect(&pg.url()).await;
}

#[tokio::test]
async fn an_unreachable_store_is_unavailable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let err = SqlMetadataStore::connect(&format!("postgres://postgres@127.0.0.1:{port}/postgres"))
        .await
        .err()
        .expect("nothing listens there");
    assert!(matches!(err, MetaError::Unavailable(_)), "{err}");
}
