//! Dropped tenants: the storage namespaces of deleted tenants (SEMANTICS.md, "Tenants";
//! docs/coordinator.md, "Tenant deletion") this node was told about, and the fence that keeps
//! them empty.
//!
//! A namespace is recorded here before its records are dropped (`DropTenants`), and when a
//! coordinator starting a stream names it (`StartStreaming`). From then on this node applies
//! no record of it, whatever sends it: a coordinator whose tenant cache still holds the
//! deleted incarnation (its client write is refused with `TENANT_DELETED`, so it is not
//! acknowledged), a hint stored in the instant of the delete, a stream or a repair. Streams
//! this node sends skip the namespace too. A deleted namespace never becomes live again (a
//! re-created tenant gets a new one), so the set only grows, by one name per deleted tenant.
//!
//! Stored in `<data dir>/dropped-tenants.json` (`json_file`: a crash leaves the old or the new
//! set). Invariant: `contains` is true for every namespace a successful `add` named, also after
//! a restart.
//!
//! A node that was down (or not yet started) when a tenant was deleted does not know it: until
//! it is told, a coordinator whose tenant cache is stale could write the dead namespace
//! through it and acknowledge the write, which the next purge then removes. So the set also
//! says whether it is *confirmed*: a coordinator sent, since this process started, a complete
//! list of the deleted namespaces read from the metadata store (`DropTenants` with
//! `complete`). Before that, the node refuses client writes (`TENANTS_UNCONFIRMED`); the
//! coordinator confirms it and resends. Confirmation is not stored: every start begins
//! unconfirmed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::RwLock;

pub const FILE_NAME: &str = "dropped-tenants.json";

#[derive(Debug)]
pub struct DroppedTenants {
    path: PathBuf,
    names: RwLock<BTreeSet<String>>,
    /// A complete list arrived since this process started (see the module doc).
    confirmed: AtomicBool,
}

impl DroppedTenants {
    /// Opens (or starts) the set in `dir`.
    pub fn open(dir: &Path) -> std::io::Result<DroppedTenants> {
        let path = dir.join(FILE_NAME);
        let names = super::json_file::load(&path)?;
        Ok(DroppedTenants {
            path,
            names: RwLock::new(names),
            confirmed: AtomicBool::new(false),
        })
    }

    /// Records `namespaces` as dropped; durable on return. Returns how many were new.
    pub fn add(&self, namespaces: &[String]) -> std::io::Result<usize> {
        let mut names = self.names.write();
        let new: Vec<&String> = namespaces.iter().filter(|n| !names.contains(*n)).collect();
        if new.is_empty() {
            return Ok(0);
        }
        let mut next = names.clone();
        next.extend(new.iter().map(|n| (*n).clone()));
        super::json_file::store(&self.path, &next)?;
        let added = next.len() - names.len();
        *names = next;
        Ok(added)
    }

    /// Records that every deleted namespace is in the set: call after a successful `add` of a
    /// complete list (and of the ones sent before it in the same pass).
    pub fn confirm(&self) {
        if !self.confirmed.swap(true, Ordering::AcqRel) {
            tracing::info!("deleted tenants confirmed; client writes are taken");
        }
    }

    /// Whether the set is known complete since this process started: client writes may be
    /// taken.
    pub fn is_confirmed(&self) -> bool {
        self.confirmed.load(Ordering::Acquire)
    }

    /// Whether `namespace` was dropped: no record of it may be applied or sent.
    pub fn contains(&self, namespace: &str) -> bool {
        let names = self.names.read();
        !names.is_empty() && names.contains(namespace)
    }

    /// Which of `namespaces` were dropped, by position (all false in the common case of none).
    pub fn fenced<'a>(&self, namespaces: impl Iterator<Item = &'a str>) -> Vec<bool> {
        let names = self.names.read();
        namespaces
            .map(|n| !names.is_empty() && names.contains(n))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_namespaces_stay_dropped_across_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let set = DroppedTenants::open(dir.path()).expect("open");
        assert!(!set.contains("acme"));
        assert_eq!(set.add(&["acme".to_owned()]).expect("add"), 1);
        assert_eq!(
            set.add(&["acme".to_owned(), "beta:2".to_owned()])
                .expect("add"),
            1,
            "only beta:2 is new"
        );
        assert!(set.contains("acme") && set.contains("beta:2"));
        assert!(!set.contains("acme:2"), "the next incarnation is live");
        let reopened = DroppedTenants::open(dir.path()).expect("reopen");
        assert_eq!(
            reopened.fenced(["acme", "acme:2", "beta:2"].into_iter()),
            vec![true, false, true]
        );
    }

    #[test]
    fn every_start_begins_unconfirmed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let set = DroppedTenants::open(dir.path()).expect("open");
        assert!(!set.is_confirmed());
        set.add(&["acme".to_owned()]).expect("add");
        set.confirm();
        assert!(set.is_confirmed());
        let reopened = DroppedTenants::open(dir.path()).expect("reopen");
        assert!(
            !reopened.is_confirmed(),
            "deletes made while the node was down must be learned again"
        );
        assert!(reopened.contains("acme"));
    }

    #[test]
    fn a_damaged_file_is_an_error_not_an_empty_set() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(FILE_NAME), b"{not json").expect("write");
        assert!(DroppedTenants::open(dir.path()).is_err());
    }
}
