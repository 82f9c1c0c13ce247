//! The coordinator's gRPC service (proto/coordinator.proto), called by gateways: input checks,
//! then the request paths of [`Coordinator`], with one metrics/log wrapper per call.
//!
//! Input rules (API.md): tenant ids as the engine's; keys 1..=1024 bytes without NUL; encoded
//! values at most 10 MiB; a client `context` of at most 1000 clock entries. Checks run before
//! anything is read or written.

use std::sync::Arc;
use std::time::Instant;

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use bytes::Bytes;

use crate::limits::{check_client_key, check_value_len};
use crate::meta::Tenant;
use crate::quorum::Consistency;
use crate::rpc::coordinator as pb;
use crate::rpc::coordinator::coordinator_server::Coordinator as CoordinatorRpc;
use crate::rpc::{clock_from_proto, common};
use crate::vclock::{Causality, VectorClock, Version};

use super::Coordinator;
use super::admin::check_tenant_id;
use super::clock::Source;
use super::conditional::Condition;
use super::errors::CoordError;
use super::expiry::{Payload, check_ttl, expires_at_text, live_value};
use super::idempotent::{Operation, fingerprint};
use super::topology::NewNode;

/// Largest causal context a client may send.
const MAX_CONTEXT_ENTRIES: usize = 1000;

#[derive(Clone)]
pub struct CoordinatorService {
    core: Arc<Coordinator>,
}

/// Calls of one key-value stream running at once (and answers waiting to be sent back).
const STREAM_RESULTS_QUEUE: usize = 1024;

impl CoordinatorService {
    pub fn new(core: Arc<Coordinator>) -> Self {
        Self { core }
    }

    /// One call of a key-value stream: the same handlers as the unary RPCs; an error becomes
    /// the answer's `ErrorDetail` directly.
    async fn run_call(&self, call: pb::KeyValueCall) -> pb::KeyValueResult {
        let request_id = call.request_id.clone();
        crate::rpc::trace::scope(&request_id, self.run_call_in_scope(call)).await
    }

    async fn run_call_in_scope(&self, call: pb::KeyValueCall) -> pb::KeyValueResult {
        use pb::key_value_call::Call;
        use pb::key_value_result::Result as Answer;
        let answer = match call.call {
            Some(Call::Write(req)) => self.write(req).await.map(Answer::Write),
            Some(Call::Read(req)) => self.read(req).await.map(Answer::Read),
            Some(Call::Delete(req)) => self.delete(req).await.map(Answer::Delete),
            Some(Call::List(req)) => self.list(req).await.map(Answer::List),
            None => Err(CoordError::InvalidRequest(
                "empty key-value call".to_owned(),
            )),
        };
        pb::KeyValueResult {
            id: call.id,
            result: Some(answer.unwrap_or_else(|e| Answer::Error(e.detail()))),
        }
    }

    /// `WriteKeyValue`, unary or on a stream.
    async fn write(
        &self,
        req: pb::WriteKeyValueRequest,
    ) -> Result<pb::WriteKeyValueResponse, CoordError> {
        let (tenant, key) = (req.tenant_id.clone(), req.key.clone());
        key_value("write", req.consistency, &tenant, &key, |level| {
            self.core.write_key_value(req, level)
        })
        .await
    }

    /// `ReadKeyValue`, unary or on a stream.
    async fn read(
        &self,
        req: pb::ReadKeyValueRequest,
    ) -> Result<pb::ReadKeyValueResponse, CoordError> {
        key_value("read", req.consistency, &req.tenant_id, &req.key, |level| {
            self.core.read_key_value(&req, level)
        })
        .await
    }

    /// `DeleteKeyValue`, unary or on a stream.
    async fn delete(
        &self,
        req: pb::DeleteKeyValueRequest,
    ) -> Result<pb::DeleteKeyValueResponse, CoordError> {
        key_value(
            "delete",
            req.consistency,
            &req.tenant_id,
            &req.key,
            |level| self.core.delete_key_value(&req, level),
        )
        .await
    }

    /// `ListKeys`, unary or on a stream.
    async fn list(&self, req: pb::ListKeysRequest) -> Result<pb::ListKeysResponse, CoordError> {
        key_value(
            "list",
            req.consistency,
            &req.tenant_id,
            &req.prefix,
            |level| self.core.list_keys(&req, level),
        )
        .await
    }
}

/// A handler's result as a unary RPC's: the error is encoded into a status here, once.
fn reply<T>(result: Result<T, CoordError>) -> Result<Response<T>, Status> {
    result.map(Response::new).map_err(CoordError::into_status)
}

fn consistency(raw: i32) -> Result<Consistency, CoordError> {
    common::Consistency::try_from(raw)
        .map(Consistency::from)
        .map_err(|_| CoordError::InvalidRequest(format!("unknown consistency {raw}")))
}

/// Records the call's latency and outcome; logs failures with tenant, key hash and code.
fn observe<T>(
    op: &'static str,
    level: Option<Consistency>,
    tenant: &str,
    key: &[u8],
    started: Instant,
    result: Result<T, CoordError>,
) -> Result<T, CoordError> {
    let level = level.map_or("none", Consistency::as_str);
    metrics::histogram!("pairdb_coordinator_request_seconds", "op" => op, "consistency" => level)
        .record(started.elapsed().as_secs_f64());
    let code = match &result {
        Ok(_) => "OK",
        Err(e) => e.code_name(),
    };
    metrics::counter!("pairdb_coordinator_requests_total", "op" => op, "consistency" => level, "code" => code)
        .increment(1);
    if let Err(e) = &result {
        if !matches!(e, CoordError::KeyNotFound | CoordError::TenantNotFound(_)) {
            let key_hash = xxhash_rust::xxh3::xxh3_64(key);
            tracing::info!(op, tenant, key_hash = format_args!("{key_hash:016x}"), code, error = %e, "request failed");
        }
    }
    result
}

/// One key-value RPC: parses the consistency, runs `run`, records and logs the outcome.
async fn key_value<T, Fut>(
    op: &'static str,
    raw_consistency: i32,
    tenant: &str,
    key: &[u8],
    run: impl FnOnce(Consistency) -> Fut,
) -> Result<T, CoordError>
where
    Fut: std::future::Future<Output = Result<T, CoordError>>,
{
    let started = Instant::now();
    let level = consistency(raw_consistency);
    let known = level.as_ref().ok().copied();
    let result = match level {
        Ok(level) => run(level).await,
        Err(e) => Err(e),
    };
    observe(op, known, tenant, key, started, result)
}

/// One administration RPC (no key, no consistency), recorded and logged like the others.
async fn administration<T>(
    op: &'static str,
    tenant: &str,
    call: impl std::future::Future<Output = Result<T, CoordError>>,
) -> Result<Response<T>, Status> {
    let started = Instant::now();
    let result = call.await;
    reply(observe(op, None, tenant, b"", started, result))
}

impl Coordinator {
    async fn write_key_value(
        &self,
        req: pb::WriteKeyValueRequest,
        level: Consistency,
    ) -> Result<pb::WriteKeyValueResponse, CoordError> {
        check_tenant_id(&req.tenant_id)?;
        check_client_key(&req.key)?;
        check_value_len(req.value.len())?;
        check_idempotency_key(&req.idempotency_key)?;
        check_ttl(req.ttl_seconds)?;
        let context = if req.has_context {
            let clock = clock_from_proto(&req.context);
            clock
                .validate(MAX_CONTEXT_ENTRIES)
                .map_err(|e| CoordError::InvalidRequest(format!("context: {e}")))?;
            Some(clock)
        } else {
            None
        };
        let condition = Condition::of_write(
            req.has_if_match.then_some(req.if_match.as_slice()),
            req.if_absent,
            MAX_CONTEXT_ENTRIES,
        )?;
        if condition != Condition::Always && context.is_some() {
            return Err(CoordError::InvalidRequest(
                "a conditional write takes no context: its condition is the context".to_owned(),
            ));
        }
        let tenant = self.tenant(&req.tenant_id).await?;
        if let Some(context) = &context {
            self.check_context(&tenant, &req.key, context, level)
                .await?;
        }
        let (key, value, ttl_seconds) = (&req.key, &req.value, req.ttl_seconds);
        let write = |idempotency_key: String| async {
            let written = self
                .write_if(
                    &tenant,
                    key,
                    Payload::Value {
                        bytes: value,
                        ttl_seconds,
                    },
                    context.as_ref(),
                    &condition,
                    level,
                )
                .await?;
            Ok(pb::WriteKeyValueResponse {
                key: key.clone(),
                idempotency_key,
                version: Some((&written.version).into()),
                replica_count: written.acks as u32,
                consistency: common::Consistency::from(level) as i32,
                is_duplicate: false,
                replication_capped: written.rf_capped,
                idempotency_skipped: false,
                detail: Some(written.detail),
                expires_at: expires_at_text(written.expires_at_ms),
            })
        };
        if req.idempotency_key.is_empty() {
            return write(uuid::Uuid::new_v4().to_string()).await;
        }
        let fingerprint = fingerprint(
            Operation::Put { ttl_seconds },
            key,
            value,
            context.as_ref(),
            &condition,
        );
        // Keyed by the incarnation's namespace: a re-created tenant never sees its
        // predecessor's answers.
        self.idempotent(
            &tenant.storage_id(),
            key,
            &req.idempotency_key,
            fingerprint,
            || write(req.idempotency_key.clone()),
        )
        .await
    }

    /// A client context whose counters lie further ahead than `max_clock_skew` is refused,
    /// unless the replicas hold that very version (or one that dominates it): the client read
    /// it, e.g. from a key written before the bound was enforced, and must be able to write
    /// after it. Such counters never move this coordinator's clock (see `new_version`).
    async fn check_context(
        &self,
        tenant: &Tenant,
        key: &[u8],
        context: &VectorClock,
        level: Consistency,
    ) -> Result<(), CoordError> {
        let bound = self.clock.bound();
        let Some((id, counter)) = context.iter().find(|(_, c)| *c > bound) else {
            return Ok(());
        };
        let held = self
            .read_winner(tenant, key, level)
            .await?
            .and_then(|r| r.version)
            .map(|v| Version::from(&v));
        if held.is_some_and(|v| {
            matches!(
                v.clock.compare(context),
                Causality::Equal | Causality::After
            )
        }) {
            return Ok(());
        }
        self.clock.trusts(counter, Source::Context);
        Err(CoordError::InvalidRequest(format!(
            "context: the counter of {id:?} ({counter}) lies further ahead of this \
             coordinator's clock than max_clock_skew ({} ms) allows, and no replica holds \
             that version",
            self.options.max_clock_skew.as_millis()
        )))
    }

    /// The tenant and the key's live value (not a tombstone, not expired by this coordinator's
    /// clock), read at `level`.
    async fn read_live(
        &self,
        tenant_id: &str,
        key: &[u8],
        level: Consistency,
    ) -> Result<(Tenant, Option<LiveValue>), CoordError> {
        let (tenant, live, _) = self.read_live_detailed(tenant_id, key, level).await?;
        Ok((tenant, live))
    }

    /// [`Self::read_live`], with what the replicas said.
    async fn read_live_detailed(
        &self,
        tenant_id: &str,
        key: &[u8],
        level: Consistency,
    ) -> Result<(Tenant, Option<LiveValue>, pb::ReadDetail), CoordError> {
        check_tenant_id(tenant_id)?;
        check_client_key(key)?;
        let tenant = self.tenant(tenant_id).await?;
        let (winner, detail) = self.read_winner_detailed(&tenant, key, level).await?;
        let now = crate::wallclock::now_ms();
        let live = winner.and_then(|record| {
            Some(LiveValue {
                value: live_value(&record, now)?.clone(),
                version: record.version?,
                expires_at_ms: record.expires_at_ms,
            })
        });
        Ok((tenant, live, detail))
    }

    async fn read_key_value(
        &self,
        req: &pb::ReadKeyValueRequest,
        level: Consistency,
    ) -> Result<pb::ReadKeyValueResponse, CoordError> {
        let (_, live, detail) = self
            .read_live_detailed(&req.tenant_id, &req.key, level)
            .await?;
        let live = live.ok_or(CoordError::KeyNotFound)?;
        Ok(pb::ReadKeyValueResponse {
            key: req.key.clone(),
            value: live.value,
            version: Some(live.version),
            detail: Some(detail),
            expires_at: expires_at_text(live.expires_at_ms),
        })
    }

    async fn delete_key_value(
        &self,
        req: &pb::DeleteKeyValueRequest,
        level: Consistency,
    ) -> Result<pb::DeleteKeyValueResponse, CoordError> {
        check_idempotency_key(&req.idempotency_key)?;
        let condition = Condition::of_write(
            req.has_if_match.then_some(req.if_match.as_slice()),
            false,
            MAX_CONTEXT_ENTRIES,
        )?;
        let delete = || async {
            let written = if condition == Condition::Always {
                let (tenant, live) = self.read_live(&req.tenant_id, &req.key, level).await?;
                let current = live.ok_or(CoordError::KeyNotFound)?;
                let context = Version::from(&current.version).clock;
                self.write(&tenant, &req.key, Payload::Tombstone, Some(&context), level)
                    .await?
            } else {
                check_tenant_id(&req.tenant_id)?;
                check_client_key(&req.key)?;
                let tenant = self.tenant(&req.tenant_id).await?;
                // The condition reads the key itself; a missing key is a conflict, not a 404.
                self.write_if(
                    &tenant,
                    &req.key,
                    Payload::Tombstone,
                    None,
                    &condition,
                    level,
                )
                .await?
            };
            Ok(pb::DeleteKeyValueResponse {
                key: req.key.clone(),
                version: Some((&written.version).into()),
                replica_count: written.acks as u32,
                consistency: common::Consistency::from(level) as i32,
                is_duplicate: false,
                idempotency_skipped: false,
                detail: Some(written.detail),
            })
        };
        if req.idempotency_key.is_empty() {
            return delete().await;
        }
        check_tenant_id(&req.tenant_id)?;
        check_client_key(&req.key)?;
        // Keyed by the incarnation's namespace, like writes.
        let namespace = self.tenant(&req.tenant_id).await?.storage_id();
        let fingerprint = fingerprint(Operation::Delete, &req.key, b"", None, &condition);
        self.idempotent(
            &namespace,
            &req.key,
            &req.idempotency_key,
            fingerprint,
            delete,
        )
        .await
    }
}

/// A key's live value as a read found it.
struct LiveValue {
    value: Bytes,
    version: common::Version,
    /// 0: never expires.
    expires_at_ms: u64,
}

fn check_idempotency_key(key: &str) -> Result<(), CoordError> {
    if key.len() > 256 {
        return Err(CoordError::InvalidRequest(
            "idempotency key is longer than 256 bytes".to_owned(),
        ));
    }
    Ok(())
}

#[tonic::async_trait]
impl CoordinatorRpc for CoordinatorService {
    async fn write_key_value(
        &self,
        request: Request<pb::WriteKeyValueRequest>,
    ) -> Result<Response<pb::WriteKeyValueResponse>, Status> {
        reply(self.write(request.into_inner()).await)
    }

    async fn list_keys(
        &self,
        request: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        reply(self.list(request.into_inner()).await)
    }

    async fn read_key_value(
        &self,
        request: Request<pb::ReadKeyValueRequest>,
    ) -> Result<Response<pb::ReadKeyValueResponse>, Status> {
        reply(self.read(request.into_inner()).await)
    }

    async fn delete_key_value(
        &self,
        request: Request<pb::DeleteKeyValueRequest>,
    ) -> Result<Response<pb::DeleteKeyValueResponse>, Status> {
        reply(self.delete(request.into_inner()).await)
    }

    async fn create_tenant(
        &self,
        request: Request<pb::CreateTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let req = request.into_inner();
        let call = self
            .core
            .create_tenant(&req.tenant_id, req.replication_factor);
        administration("create_tenant", &req.tenant_id, call).await
    }

    async fn update_replication_factor(
        &self,
        request: Request<pb::UpdateReplicationFactorRequest>,
    ) -> Result<Response<pb::UpdateReplicationFactorResponse>, Status> {
        let req = request.into_inner();
        let call = self
            .core
            .update_replication_factor(&req.tenant_id, req.replication_factor);
        administration("update_rf", &req.tenant_id, call).await
    }

    async fn get_tenant(
        &self,
        request: Request<pb::GetTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let req = request.into_inner();
        administration(
            "get_tenant",
            &req.tenant_id,
            self.core.get_tenant(&req.tenant_id),
        )
        .await
    }

    async fn add_storage_node(
        &self,
        request: Request<pb::AddStorageNodeRequest>,
    ) -> Result<Response<pb::MigrationAccepted>, Status> {
        let req = request.into_inner();
        let node = NewNode {
            node_id: req.node_id,
            host: req.host,
            port: req.port,
            virtual_nodes: req.virtual_nodes,
        };
        let id = node.node_id.clone();
        administration("add_node", &id, self.core.add_storage_node(node)).await
    }

    async fn remove_storage_node(
        &self,
        request: Request<pb::RemoveStorageNodeRequest>,
    ) -> Result<Response<pb::MigrationAccepted>, Status> {
        let req = request.into_inner();
        let call = self.core.remove_storage_node(&req.node_id, req.force);
        administration("remove_node", &req.node_id, call).await
    }

    async fn get_migration_status(
        &self,
        request: Request<pb::GetMigrationStatusRequest>,
    ) -> Result<Response<pb::Migration>, Status> {
        let req = request.into_inner();
        administration(
            "get_migration",
            "",
            self.core.get_migration(&req.migration_id),
        )
        .await
    }

    async fn list_migrations(
        &self,
        request: Request<pb::ListMigrationsRequest>,
    ) -> Result<Response<pb::ListMigrationsResponse>, Status> {
        let limit = request.into_inner().limit;
        let call = async move {
            let migrations = self.core.list_migrations(limit).await?;
            Ok(pb::ListMigrationsResponse { migrations })
        };
        administration("list_migrations", "", call).await
    }

    async fn cancel_migration(
        &self,
        request: Request<pb::GetMigrationStatusRequest>,
    ) -> Result<Response<pb::Migration>, Status> {
        let id = request.into_inner().migration_id;
        let call = async move { self.core.cancel_migration(&id).await };
        administration("cancel_migration", "", call).await
    }

    async fn start_cleanup(
        &self,
        request: Request<pb::StartCleanupRequest>,
    ) -> Result<Response<pb::CleanupAccepted>, Status> {
        let req = request.into_inner();
        let call = async move {
            let node = (!req.node_id.is_empty()).then_some(req.node_id.as_str());
            self.core.start_cleanup(node, req.force).await
        };
        administration("start_cleanup", "", call).await
    }

    async fn start_repair(
        &self,
        request: Request<pb::StartRepairRequest>,
    ) -> Result<Response<pb::RepairAccepted>, Status> {
        let req = request.into_inner();
        let scope = crate::coordinator::anti_entropy::RepairScope {
            tenant: (!req.tenant_id.is_empty()).then_some(req.tenant_id),
            node: (!req.node_id.is_empty()).then_some(req.node_id),
            range: req.range.as_ref().map(crate::ring::HashRange::from),
        };
        let call = async move { self.core.start_repair(scope).await };
        administration("start_repair", "", call).await
    }

    async fn get_repair_status(
        &self,
        _request: Request<pb::RepairStatusRequest>,
    ) -> Result<Response<pb::RepairStatus>, Status> {
        administration("repair_status", "", self.core.repair_status()).await
    }

    async fn get_repair(
        &self,
        request: Request<pb::GetMigrationStatusRequest>,
    ) -> Result<Response<pb::RepairRun>, Status> {
        let id = request.into_inner().migration_id;
        let call = async move { self.core.get_repair(&id).await };
        administration("get_repair", "", call).await
    }

    type KeyValueStreamStream = ReceiverStream<Result<pb::KeyValueResult, Status>>;

    /// Runs every call of the stream as its own task; results go back as they complete.
    async fn key_value_stream(
        &self,
        request: Request<Streaming<pb::KeyValueCall>>,
    ) -> Result<Response<Self::KeyValueStreamStream>, Status> {
        let service = self.clone();
        Ok(Response::new(crate::mux::serve(
            request.into_inner(),
            STREAM_RESULTS_QUEUE,
            &self.core.tasks,
            move |call| {
                let service = service.clone();
                async move { service.run_call(call).await }
            },
        )))
    }

    async fn health(
        &self,
        _request: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        let problems = super::http::readiness(&self.core).await.err();
        let idempotency_store = match self.core.idempotency.shared_id() {
            Some(id) => format!("shared:{id}"),
            None => format!("local:{}", self.core.id),
        };
        Ok(Response::new(pb::HealthResponse {
            ready: problems.is_none(),
            problems: problems.map(|p| p.to_string()).unwrap_or_default(),
            idempotency_store,
        }))
    }

    async fn create_snapshot(
        &self,
        request: Request<pb::SnapshotName>,
    ) -> Result<Response<pb::ClusterSnapshot>, Status> {
        let name = request.into_inner().name;
        let call = async move { self.core.create_snapshot(&name).await };
        administration("create_snapshot", "", call).await
    }

    async fn list_snapshots(
        &self,
        _request: Request<pb::ListClusterSnapshotsRequest>,
    ) -> Result<Response<pb::ListClusterSnapshotsResponse>, Status> {
        administration("list_snapshots", "", self.core.list_snapshots()).await
    }

    async fn delete_snapshot(
        &self,
        request: Request<pb::SnapshotName>,
    ) -> Result<Response<pb::ClusterSnapshot>, Status> {
        let name = request.into_inner().name;
        let call = async move { self.core.delete_snapshot(&name).await };
        administration("delete_snapshot", "", call).await
    }

    async fn delete_tenant(
        &self,
        request: Request<pb::GetTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let tenant_id = request.into_inner().tenant_id;
        let call = async { self.core.delete_tenant(&tenant_id).await };
        administration("delete_tenant", &tenant_id, call).await
    }

    async fn list_tenants(
        &self,
        request: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsResponse>, Status> {
        let req = request.into_inner();
        let call = async move { self.core.list_tenants(&req.after, req.limit).await };
        administration("list_tenants", "", call).await
    }

    async fn list_storage_nodes(
        &self,
        _request: Request<pb::ListStorageNodesRequest>,
    ) -> Result<Response<pb::ListStorageNodesResponse>, Status> {
        administration("list_nodes", "", self.core.list_nodes()).await
    }
}
