//! Cluster snapshots (API.md, "Admin additions"): one name taken on every storage node of the
//! ring, listed and deleted across them.
//!
//! Decisions:
//! - All or none. A snapshot is taken only when every storage node (but `failed` ones) is up;
//!   when one of them fails to take it, the nodes that took it delete theirs again and the
//!   call fails (503 UNAVAILABLE, or 409 SNAPSHOT_EXISTS when the name was taken). A snapshot
//!   that misses a node would restore that node to nothing.
//! - Not a point in time across nodes: each node's snapshot holds what it acknowledged before
//!   it was asked. Together they hold every write acknowledged before the call began, and a
//!   repair after a restore brings replicas to the newest version (like Cassandra's
//!   `nodetool snapshot`).
//! - Deleting needs every node up too (else 503 and nothing deleted), so a name is never
//!   half-deleted by the API; 404 SNAPSHOT_NOT_FOUND when no node holds it.

use std::collections::BTreeMap;
use std::time::Duration;

use tonic::Code;

use crate::limits::valid_snapshot_name as valid_name;
use crate::meta::NodeRecord;
use crate::ring::NodeState;
use crate::rpc::coordinator as pb;
use crate::rpc::detail;
use crate::rpc::storage as spb;

use super::Coordinator;
use super::admin::rfc3339;
use super::errors::CoordError;
use super::fan_out::NodeAnswer;

/// A flush and a link per table: seconds at most, unless the disk is in trouble.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);
const LIST_TIMEOUT: Duration = Duration::from_secs(10);

impl Coordinator {
    pub async fn create_snapshot(&self, name: &str) -> Result<pb::ClusterSnapshot, CoordError> {
        check_name(name)?;
        let nodes = self.snapshot_nodes()?;
        let answers = self
            .each_node(&nodes, SNAPSHOT_TIMEOUT, |mut client| {
                let request = spb::SnapshotRequest {
                    name: name.to_owned(),
                };
                async move { client.create_snapshot(request).await }
            })
            .await;
        let (taken, failed): (Vec<_>, Vec<_>) = answers.into_iter().partition(|(_, r)| r.is_ok());
        let taken: Vec<(NodeRecord, spb::SnapshotInfo)> = taken
            .into_iter()
            .filter_map(|(n, r)| r.ok().map(|info| (n, info)))
            .collect();
        if failed.is_empty() {
            return Ok(cluster_snapshot(
                name,
                taken.into_iter().map(|(_, info)| info).collect(),
                Vec::new(),
            ));
        }
        // Undo: the nodes that took it delete theirs (those that had the name already keep it).
        let undo: Vec<NodeRecord> = taken.into_iter().map(|(n, _)| n).collect();
        let undone = self
            .each_node(&undo, SNAPSHOT_TIMEOUT, |mut client| {
                let request = spb::SnapshotRequest {
                    name: name.to_owned(),
                };
                async move { client.delete_snapshot(request).await }
            })
            .await;
        for (node, result) in undone {
            if let Err(e) = result {
                tracing::error!(node = %node.node_id, snapshot = name, error = %e.message(), "could not delete a partial snapshot; delete it again");
            }
        }
        let exists = failed
            .iter()
            .any(|(_, r)| r.as_ref().is_err_and(|s| s.code() == Code::AlreadyExists));
        if exists {
            return Err(CoordError::SnapshotExists(name.to_owned()));
        }
        Err(CoordError::Unavailable(format!(
            "snapshot {name:?} not taken: {}",
            describe_failures(&failed)
        )))
    }

    pub async fn list_snapshots(&self) -> Result<pb::ListClusterSnapshotsResponse, CoordError> {
        let nodes = self.data_nodes();
        let answers = self
            .each_node(&nodes, LIST_TIMEOUT, |mut client| async move {
                client.list_snapshots(spb::ListSnapshotsRequest {}).await
            })
            .await;
        let mut unreachable_nodes = Vec::new();
        let mut answered = Vec::new();
        let mut by_name: BTreeMap<String, Vec<spb::SnapshotInfo>> = BTreeMap::new();
        for (node, result) in answers {
            match result {
                Ok(list) => {
                    answered.push(node.node_id);
                    for info in list.snapshots {
                        by_name.entry(info.name.clone()).or_default().push(info);
                    }
                }
                Err(_) => unreachable_nodes.push(node.node_id),
            }
        }
        let snapshots = by_name
            .into_iter()
            .map(|(name, infos)| {
                let missing = answered
                    .iter()
                    .filter(|n| !infos.iter().any(|i| &i.node_id == *n))
                    .cloned()
                    .collect();
                cluster_snapshot(&name, infos, missing)
            })
            .collect();
        Ok(pb::ListClusterSnapshotsResponse {
            snapshots,
            unreachable_nodes,
        })
    }

    pub async fn delete_snapshot(&self, name: &str) -> Result<pb::ClusterSnapshot, CoordError> {
        check_name(name)?;
        let nodes = self.snapshot_nodes()?;
        let answers = self
            .each_node(&nodes, SNAPSHOT_TIMEOUT, |mut client| {
                let request = spb::SnapshotRequest {
                    name: name.to_owned(),
                };
                async move { client.delete_snapshot(request).await }
            })
            .await;
        let mut deleted = Vec::new();
        let mut failed: Vec<NodeAnswer<spb::SnapshotInfo>> = Vec::new();
        for (node, result) in answers {
            match result {
                Ok(info) => deleted.push(info),
                Err(s) if s.code() == Code::NotFound => {}
                Err(s) => failed.push((node, Err(s))),
            }
        }
        if !failed.is_empty() {
            return Err(CoordError::Unavailable(format!(
                "snapshot {name:?} deleted from {} node(s) only: {}",
                deleted.len(),
                describe_failures(&failed)
            )));
        }
        if deleted.is_empty() {
            return Err(CoordError::SnapshotNotFound(name.to_owned()));
        }
        Ok(cluster_snapshot(name, deleted, Vec::new()))
    }

    /// The nodes that hold data: every registered node but failed ones.
    fn data_nodes(&self) -> Vec<NodeRecord> {
        let ring = self.ring.snapshot();
        ring.nodes
            .iter()
            .filter(|n| n.state != NodeState::Failed)
            .cloned()
            .collect()
    }

    /// [`Self::data_nodes`], refused when one of them is down (all or none).
    fn snapshot_nodes(&self) -> Result<Vec<NodeRecord>, CoordError> {
        let nodes = self.data_nodes();
        let down: Vec<&str> = nodes
            .iter()
            .filter(|n| self.ring.is_down(&n.node_id))
            .map(|n| n.node_id.as_str())
            .collect();
        if !down.is_empty() {
            return Err(CoordError::Unavailable(format!(
                "storage node(s) {} down: a snapshot must cover every node",
                down.join(", ")
            )));
        }
        if nodes.is_empty() {
            return Err(CoordError::Unavailable("no storage nodes".to_owned()));
        }
        Ok(nodes)
    }
}

fn check_name(name: &str) -> Result<(), CoordError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(CoordError::InvalidRequest(format!(
            "invalid snapshot name {name:?}: 1 to 64 of A-Z a-z 0-9 . _ -, not starting with a dot"
        )))
    }
}

fn describe_failures<T>(failed: &[NodeAnswer<T>]) -> String {
    failed
        .iter()
        .filter_map(|(node, r)| r.as_ref().err().map(|s| (node, s)))
        .map(|(node, s)| {
            let code = detail::storage_code(s);
            format!("{}: {} ({})", node.node_id, s.message(), code.as_str_name())
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn cluster_snapshot(
    name: &str,
    infos: Vec<spb::SnapshotInfo>,
    missing_nodes: Vec<String>,
) -> pb::ClusterSnapshot {
    let created = infos.iter().map(|i| i.created_at_ms).min().unwrap_or(0);
    let mut nodes: Vec<pb::NodeSnapshot> = infos
        .into_iter()
        .map(|i| pb::NodeSnapshot {
            node_id: i.node_id,
            created_at: rfc3339(i.created_at_ms),
            tables: i.tables,
            bytes: i.bytes,
            entries: i.entries,
        })
        .collect();
    nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    pb::ClusterSnapshot {
        name: name.to_owned(),
        created_at: rfc3339(created),
        nodes,
        missing_nodes,
    }
}
