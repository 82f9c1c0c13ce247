//! Self-join (`[storage] join`, `--join`): a storage node registers itself through the
//! coordinators on its first start, as `pairdb admin add-node` would (the same checks, the same
//! bootstrap migration), so a new pod of the StatefulSet needs no hand step.
//!
//! Invariants:
//! - Once registered, the node writes `<data-dir>/JOINED` (fsynced): a restart with its data
//!   never registers again. A node whose id the registry knows is fine too when it kept its
//!   data (a crash between the registration and the marker).
//! - A node whose id the registry knows but whose data dir was empty at start has lost its data
//!   (a pod that lost its volume): it is refused and the process exits 2, with the commands to
//!   replace it. It never serves as the node it was. Unless an earlier attempt of this very
//!   start may have registered it (the call was sent and its answer lost: a timeout, a cut
//!   connection): then the registration is its own.
//! - Until registered the node serves (coordinators check it answers) but is not ready
//!   (`/readyz`); it retries every coordinator with backoff (0.5 s doubling to 10 s): none
//!   reachable yet, another change in progress (NODE_IN_USE), or its address not resolvable by
//!   them yet.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::rpc::auth::InternalAuth;
use crate::rpc::coordinator as pb;
use crate::rpc::coordinator::coordinator_client::CoordinatorClient;

const MARKER: &str = "JOINED";
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// What a joining node registers, and through whom.
pub struct Join {
    pub node_id: String,
    pub host: String,
    pub port: u16,
    pub coordinators: Vec<String>,
    pub data_dir: PathBuf,
    /// Whether the data dir held no engine when the process started.
    pub fresh: bool,
}

/// Whether `data_dir` holds no engine yet (no manifest, no commit-log segment): read before
/// the engine opens it.
pub fn is_fresh(data_dir: &Path) -> bool {
    let wal_empty =
        std::fs::read_dir(data_dir.join("wal")).map_or(true, |mut d| d.next().is_none());
    !data_dir.join("MANIFEST").exists() && !data_dir.join("MANIFEST.mirror").exists() && wal_empty
}

/// Whether this data dir was registered by an earlier start.
pub fn already_joined(data_dir: &Path) -> bool {
    data_dir.join(MARKER).exists()
}

/// Registers the node (see the module doc); sets `joined` once done. Exits the process when
/// the node must not serve.
pub async fn run(join: Join, auth: InternalAuth, joined: Arc<AtomicBool>, stop: CancellationToken) {
    if already_joined(&join.data_dir) {
        joined.store(true, Ordering::Release);
        return;
    }
    let mut backoff = FIRST_BACKOFF;
    // An attempt whose outcome is unknown may have registered this node.
    let mut maybe_registered = false;
    while !stop.is_cancelled() {
        for coordinator in &join.coordinators {
            match register(&join, &auth, coordinator, maybe_registered).await {
                Ok(outcome) => {
                    if let Err(e) = write_marker(&join.data_dir) {
                        tracing::error!(error = %e, "cannot write the JOINED marker; a restart will ask the registry again");
                    }
                    tracing::info!(node = %join.node_id, coordinator = %coordinator, %outcome, "storage node joined the cluster");
                    joined.store(true, Ordering::Release);
                    return;
                }
                Err(Refusal::LostData) => {
                    let id = &join.node_id;
                    tracing::error!(node = %id, "refusing to serve: registered, but the data dir was empty at start");
                    eprintln!(
                        "pairdb: storage node {id} is registered, but its data dir {} was empty at \
                         start: its data is lost. Replace it: `pairdb admin remove-node {id} \
                         --force --wait`, then start it again with --join (or start it with its \
                         old data dir).",
                        join.data_dir.display()
                    );
                    std::process::exit(2);
                }
                Err(Refusal::Unknown(why)) => {
                    maybe_registered = true;
                    tracing::warn!(node = %join.node_id, coordinator = %coordinator, reason = %why, "join outcome unknown; retrying");
                }
                Err(Refusal::NotYet(why)) => {
                    tracing::warn!(node = %join.node_id, coordinator = %coordinator, reason = %why, "not joined yet; retrying");
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = stop.cancelled() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

enum Refusal {
    /// Registered under this id, but this start had no data.
    LostData,
    /// Try again later (no coordinator, another change, address not checked yet...).
    NotYet(String),
    /// The call may have been carried out (sent, no answer): try again, and take a NODE_EXISTS
    /// as this registration.
    Unknown(String),
}

async fn register(
    join: &Join,
    auth: &InternalAuth,
    coordinator: &str,
    maybe_registered: bool,
) -> Result<String, Refusal> {
    let endpoint = auth
        .endpoint(coordinator)
        .map_err(|e| Refusal::NotYet(format!("bad coordinator address {coordinator}: {e}")))?;
    let mut client = CoordinatorClient::new(auth.channel(&endpoint));
    let request = pb::AddStorageNodeRequest {
        node_id: join.node_id.clone(),
        host: join.host.clone(),
        port: u32::from(join.port),
        virtual_nodes: 0,
    };
    let answer = tokio::time::timeout(CALL_TIMEOUT, client.add_storage_node(request))
        .await
        .map_err(|_| Refusal::Unknown("no answer in time".to_owned()))?;
    match answer {
        Ok(accepted) => Ok(format!("migration {}", accepted.into_inner().migration_id)),
        Err(status) => verdict(
            join.fresh,
            maybe_registered,
            crate::rpc::detail::coordinator_detail(&status).map(|d| d.code()),
            status.code(),
            status.message(),
        ),
    }
}

/// What a refused registration means: `code` is the coordinator's, `grpc` the status code.
fn verdict(
    fresh: bool,
    maybe_registered: bool,
    code: Option<pb::ErrorCode>,
    grpc: tonic::Code,
    message: &str,
) -> Result<String, Refusal> {
    match code {
        Some(pb::ErrorCode::NodeExists) if fresh && !maybe_registered => Err(Refusal::LostData),
        Some(pb::ErrorCode::NodeExists) => Ok("already registered".to_owned()),
        // A coordinator's own answer: the change was refused, nothing happened.
        Some(_) => Err(Refusal::NotYet(message.to_owned())),
        // No coordinator answer: refused before sending (cannot connect), or cut after.
        None if grpc == tonic::Code::Unavailable && message.contains("connect") => {
            Err(Refusal::NotYet(message.to_owned()))
        }
        None => Err(Refusal::Unknown(message.to_owned())),
    }
}

fn write_marker(data_dir: &Path) -> std::io::Result<()> {
    let path = data_dir.join(MARKER);
    let file = std::fs::File::create(&path)?;
    file.sync_all()?;
    std::fs::File::open(data_dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registered_id_is_refused_only_when_no_attempt_of_this_start_may_have_made_it() {
        let exists = Some(pb::ErrorCode::NodeExists);
        let refused = tonic::Code::AlreadyExists;
        assert!(matches!(
            verdict(true, false, exists, refused, ""),
            Err(Refusal::LostData)
        ));
        // The first call was sent and its answer lost: the registration is this node's.
        assert!(verdict(true, true, exists, refused, "").is_ok());
        // A restart with its data.
        assert!(verdict(false, false, exists, refused, "").is_ok());
        // A call cut after it was sent makes the next NODE_EXISTS this node's own.
        let cut = verdict(true, false, None, tonic::Code::Unknown, "connection reset");
        assert!(matches!(cut, Err(Refusal::Unknown(_))));
        let refused_connect = verdict(
            true,
            false,
            None,
            tonic::Code::Unavailable,
            "tcp connect error: Connection refused",
        );
        assert!(matches!(refused_connect, Err(Refusal::NotYet(_))));
        let busy = verdict(
            true,
            false,
            Some(pb::ErrorCode::NodeInUse),
            tonic::Code::InvalidArgument,
            "busy",
        );
        assert!(matches!(busy, Err(Refusal::NotYet(_))));
    }
}
