//! The local control API: HTTP/JSON on a unix socket only root can use. The `tern` CLI is
//! a thin client of it. Owns request/response shapes and mapping errors to HTTP statuses;
//! all real work is in [`crate::Agent`] and [`crate::migrate`].
//!
//! | method | path | does |
//! |---|---|---|
//! | GET | /v1/agent | agent name, addresses, labels, protocol, pages in the page store |
//! | GET | /v1/load | what the host and its VMs use ([`tern_api::HostLoad`], [`crate::load`]) |
//! | GET, POST | /v1/vms | list VMs; start one (`{"spec_toml": "..."}`) |
//! | GET, DELETE | /v1/vms/{name} | show; stop and remove |
//! | POST | /v1/vms/{name}/qmp | pass one QMP command (`{"execute", "arguments"}`): `query-*` and [`QMP_ALLOWED`] only |
//! | POST | /v1/vms/{name}/memory | save the guest's physical memory to a file (`{"path", "size"}`) |
//! | POST | /v1/vms/{name}/migrate | start a migration ([`MigrateRequest`]); 202 + id |
//! | POST | /v1/vms/{name}/plan | what that migration would cost ([`tern_api::MigrationPlan`]); nothing moves |
//! | POST | /v1/vms/{name}/migration/cancel | cancel the VM's running migration |
//! | GET | /v1/migrations, /v1/migrations/{id} | migration status, progress and report |
//! | POST | /v1/migrations/{id}/cancel | cancel by id |
//! | GET, POST, DELETE | /v1/images | the chunk index: list; import (`{"path", "format"}`); remove (`{"path"}`) |
//! | POST | /v1/images/index | re-read changed images, drop those whose file is gone |
//! | GET | /v1/snapshots | the departure snapshots kept here ([`tern_api::SnapshotInfo`], [`crate::snapshots`]) |
//! | DELETE | /v1/snapshots/{vm} | drop one |
//! | POST | /v1/snapshots/{vm}/restart | run the VM here again from it ([`tern_api::RestartReport`]) |
//! | GET | /v1/fence | whether the agent fenced itself ([`tern_api::FenceStatus`], [`crate::fence`]) |
//! | POST | /v1/fence/release | stop and resume the fenced VMs named ([`tern_api::FenceRelease`]), lift the fence |
//!
//! [`control_router`] is the part of it the cluster controller gets over TLS
//! ([`crate::control`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tern_qemu::spec::VmSpec;

use crate::images::ImportError;
use crate::vm::{StartVmError, StopVmError, UpgradeVmError};
use crate::{Agent, AgentError, ApiAddr};
use tern_api::image::{
    ImageInfo, ImportImageRequest, ImportReport, RefreshSummary, RemoveImageRequest,
};
use tern_api::vm::{QmpRequest, SaveMemoryRequest, StartVmRequest, VmInfo};
use tern_api::MigrateStarted;
use tern_api::{Direction, MigrateRequest, MigrationStatus};
use tern_engine::{new_migration_id, MigrationHandle};
use tracing::Instrument;

/// An error as the API returns it: an HTTP status and `{"error": ..., "kind": ...}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, e: impl std::fmt::Display) -> Self {
        ApiError {
            status,
            kind,
            message: e.to_string(),
        }
    }
    fn not_found(what: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", what)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({ "error": self.message, "kind": self.kind })),
        )
            .into_response()
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    tern_engine::error_chain(e)
}

/// A JSON body; one that does not parse is a 400 with a JSON error, like every other
/// refusal of this API.
pub struct Body<T>(pub T);

impl<St: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequest<St> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &St) -> Result<Self, ApiError> {
        match <Json<T> as axum::extract::FromRequest<St>>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(r) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad-request",
                r.body_text(),
            )),
        }
    }
}

type S = State<Arc<Agent>>;

fn find_vm(a: &Agent, name: &str) -> Result<Arc<crate::vm::Vm>, ApiError> {
    a.vm(name)
        .ok_or_else(|| ApiError::not_found(format!("no VM named {name:?} on this host")))
}

fn find_migration(a: &Agent, id: &str) -> Result<Arc<MigrationHandle>, ApiError> {
    a.engine
        .registry
        .migration(id)
        .ok_or_else(|| ApiError::not_found(format!("no migration {id:?}")))
}

pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/v1/agent", get(agent_info))
        .route("/v1/load", get(load))
        .route("/v1/vms", get(list_vms).post(start_vm))
        .route("/v1/vms/{name}", get(show_vm).delete(stop_vm))
        .route("/v1/vms/{name}/qmp", post(qmp))
        .route("/v1/vms/{name}/memory", post(save_memory))
        .route("/v1/vms/{name}/migrate", post(migrate))
        .route("/v1/vms/{name}/upgrade", post(upgrade_vm))
        .route("/v1/vms/{name}/move", post(move_vm))
        .route("/v1/handover", post(receive_handover))
        .route("/v1/handover/{id}/commit", post(commit_handover))
        .route("/v1/handover/{id}/abort", post(abort_handover))
        .route("/v1/vms/{name}/plan", post(plan))
        .route("/v1/libvirt/{domain}/migrate", post(migrate_libvirt))
        .route("/v1/vms/{name}/migration/cancel", post(cancel_vm_migration))
        .route("/v1/events", get(events))
        .route("/v1/migrations", get(list_migrations))
        .route("/v1/migrations/{id}", get(show_migration))
        .route("/v1/migrations/{id}/cancel", post(cancel_migration))
        .route(
            "/v1/images",
            get(list_images).post(import_image).delete(remove_image),
        )
        .route("/v1/images/index", post(refresh_images))
        .route("/v1/snapshots", get(list_snapshots))
        .route("/v1/snapshots/{vm}", axum::routing::delete(delete_snapshot))
        .route("/v1/snapshots/{vm}/restart", post(restart_snapshot))
        .route("/v1/fence", get(fence_status))
        .route("/v1/fence/release", post(release_fence))
        .with_state(agent)
}

/// The routes the cluster controller may use ([`crate::control`]): what the agent and its
/// VMs are and use, migrations (start, plan, follow, cancel), and its failover: the
/// snapshots (list, restart, drop) and the fence (read, release: stops and resumes the
/// fenced VMs it names). Nothing that starts a VM from a spec, reaches its QEMU or its
/// memory, or reads files on this host. Every request is the controller's word for the
/// fence ([`crate::fence::Fence::heard`]).
pub fn control_router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/v1/agent", get(agent_info))
        .route("/v1/load", get(load))
        .route("/v1/vms", get(list_vms))
        .route("/v1/vms/{name}", get(show_vm))
        .route("/v1/vms/{name}/migrate", post(migrate))
        .route("/v1/vms/{name}/plan", post(plan))
        .route("/v1/migrations", get(list_migrations))
        .route("/v1/migrations/{id}", get(show_migration))
        .route("/v1/migrations/{id}/cancel", post(cancel_migration))
        .route("/v1/snapshots", get(list_snapshots))
        .route("/v1/snapshots/{vm}", axum::routing::delete(delete_snapshot))
        .route("/v1/snapshots/{vm}/restart", post(restart_snapshot))
        .route("/v1/fence", get(fence_status))
        .route("/v1/fence/release", post(release_fence))
        .layer(axum::middleware::from_fn_with_state(
            agent.clone(),
            controller_heard,
        ))
        .with_state(agent)
}

/// The leading controller's poll on the control listener: the controller is there (its
/// word for the fence; other requests are not).
async fn controller_heard(
    State(a): S,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let leader =
        req.uri().path_and_query().map(|p| p.as_str()) == Some(tern_api::load::LEADER_POLL);
    let r = next.run(req).await;
    if leader && r.status().is_success() {
        a.fence.heard();
    }
    r
}

async fn list_snapshots(State(a): S) -> Json<Vec<tern_api::SnapshotInfo>> {
    Json(a.snapshots.list())
}

async fn delete_snapshot(State(a): S, Path(vm): Path<String>) -> Result<StatusCode, ApiError> {
    if vm.starts_with('.') || vm.contains('/') || !a.snapshots.remove(&vm) {
        return Err(ApiError::not_found(format!(
            "no snapshot of VM {vm:?} on this host"
        )));
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn restart_snapshot(
    State(a): S,
    Path(vm): Path<String>,
) -> Result<Json<tern_api::RestartReport>, ApiError> {
    use crate::snapshots::RestartError as E;
    crate::snapshots::restart(&a, &vm)
        .await
        .map(Json)
        .map_err(|e| match &e {
            E::NotFound(_) => ApiError::not_found(&e),
            E::Exists(_) => ApiError::new(StatusCode::CONFLICT, "vm-exists", &e),
            E::NotRestartable { .. } => ApiError::new(StatusCode::CONFLICT, "not-restartable", &e),
            E::Fenced(_) => ApiError::new(StatusCode::CONFLICT, "fenced", &e),
            E::Timeout(_) => {
                ApiError::new(StatusCode::GATEWAY_TIMEOUT, "restart-failed", chain(&e))
            }
            E::Unreadable { .. }
            | E::Overlay { .. }
            | E::RunDir(..)
            | E::Launch(_)
            | E::Qmp { .. }
            | E::Load(_) => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "restart-failed",
                chain(&e),
            ),
        })
}

async fn fence_status(State(a): S) -> Json<tern_api::FenceStatus> {
    Json(a.fence.status())
}

async fn release_fence(
    State(a): S,
    Body(req): Body<tern_api::FenceRelease>,
) -> Json<tern_api::FenceReleased> {
    Json(crate::fence::release(&a, req).await)
}

/// Binds the API listener and returns the serving future.
pub async fn serve(
    agent: Arc<Agent>,
) -> Result<impl std::future::Future<Output = ()> + Send, AgentError> {
    let addr = agent.config.api.clone();
    let app = router(agent);
    match addr.clone() {
        ApiAddr::Unix(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| AgentError::Api(addr.clone(), e))?;
            }
            let _ = std::fs::remove_file(&path);
            let l = tokio::net::UnixListener::bind(&path)
                .map_err(|e| AgentError::Api(addr.clone(), e))?;
            // The API can start VMs and pass QMP commands: owner only.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| AgentError::Api(addr, e))?;
            Ok(futures_either(async move {
                let _ = axum::serve(l, app).await;
            }))
        }
    }
}

fn futures_either(
    f: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(f)
}

async fn agent_info(State(a): S) -> Json<Value> {
    use tern_store::PageStore;
    // pages the page store holds (what dedup can refer to, here and in summaries)
    let held = a.engine.store.lock().len();
    Json(json!({
        "name": a.config.name,
        "peer_listen": a.config.peer_listen.to_string(),
        "state_dir": a.config.state_dir,
        "version": env!("CARGO_PKG_VERSION"),
        "protocol": tern_proto::PROTOCOL_VERSION,
        "peer_security": if a.engine.security.is_tls() { "mutual-tls" } else { "plaintext (test only)" },
        "labels": a.engine.security.own_labels(),
        "page_store_pages": held,
    }))
}

async fn load(State(a): S) -> Json<tern_api::HostLoad> {
    let mut l = a.load().await;
    l.fence_after_s = a.config.fence_after.map(|d| d.as_secs_f64());
    Json(l)
}

async fn list_vms(State(a): S) -> Json<Vec<VmInfo>> {
    let mut out = Vec::new();
    for vm in a.vms() {
        out.push(vm.info().await);
    }
    Json(out)
}

async fn start_vm(
    State(a): S,
    Body(req): Body<StartVmRequest>,
) -> Result<(StatusCode, Json<VmInfo>), ApiError> {
    let spec = VmSpec::from_toml(&req.spec_toml)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad-spec", chain(&e)))?;
    if let Some(why) = a.fence.refuses_arrival(&spec.name) {
        return Err(ApiError::new(StatusCode::CONFLICT, "fenced", why));
    }
    let vm = a.start_vm(spec).await.map_err(|e| {
        let status = match e {
            StartVmError::Spec(_) | StartVmError::LibvirtDomain | StartVmError::SharedDisk(_) => {
                StatusCode::BAD_REQUEST
            }
            StartVmError::Exists(_) | StartVmError::MacInUse { .. } => StatusCode::CONFLICT,
            StartVmError::Launch(_)
            | StartVmError::Tpm(_)
            | StartVmError::Mac(_)
            | StartVmError::Net(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, "start-failed", chain(&e))
    })?;
    Ok((StatusCode::CREATED, Json(vm.info().await)))
}

async fn show_vm(State(a): S, Path(name): Path<String>) -> Result<Json<VmInfo>, ApiError> {
    let vm = find_vm(&a, &name)?;
    Ok(Json(vm.info().await))
}

async fn stop_vm(State(a): S, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    a.stop_vm(&name).await.map_err(|e| match e {
        StopVmError::NotFound(_) => ApiError::not_found(&e),
        StopVmError::Migrating(_) => ApiError::new(StatusCode::CONFLICT, "busy", &e),
    })?;
    Ok(StatusCode::NO_CONTENT)
}

async fn upgrade_vm(
    State(a): S,
    Path(name): Path<String>,
    Body(req): Body<tern_api::vm::UpgradeRequest>,
) -> Result<Json<tern_api::vm::UpgradeReport>, ApiError> {
    if let Some(q) = req.qemu.as_ref().filter(|q| !q.is_absolute()) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad-request",
            format!(
                "QEMU binary {} is not absolute: name the binary on the agent's host by its absolute path",
                q.display()
            ),
        ));
    }
    a.upgrade_vm(&name, req)
        .await
        .map(Json)
        .map_err(|e| match &e {
            UpgradeVmError::NotFound(_) => ApiError::not_found(&e),
            UpgradeVmError::Busy(_) => ApiError::new(StatusCode::CONFLICT, "busy", &e),
            UpgradeVmError::Failed { .. } => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "upgrade-failed",
                chain(&e),
            ),
        })
}

/// `GET /v1/events`: server-sent events, one [`tern_api::events::AgentEvent`] as JSON per
/// `data:` line, each numbered in its `id:` line (progress ticks are not). A listener that
/// sends `Last-Event-ID: N` (or asks `?since=N`) first gets the kept events after N, and a
/// `lagged` event counting those no longer kept; else it starts from now. A keep-alive
/// comment every 15 s.
async fn events(
    State(a): S,
    headers: axum::http::HeaderMap,
    uri: axum::http::Uri,
) -> axum::response::sse::Sse<
    impl futures_util::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use tern_api::events::AgentEvent;
    use tern_engine::events::Numbered;
    use tokio::sync::broadcast::error::RecvError;
    let since = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .or_else(|| {
            uri.query()?
                .split('&')
                .find_map(|kv| kv.strip_prefix("since="))?
                .parse()
                .ok()
        });
    let follow = a.engine.registry.follow(since);
    let sse = |n: &Numbered| {
        let e = Event::default().data(serde_json::to_string(&n.event).unwrap_or_default());
        Ok(match n.seq {
            Some(seq) => e.id(seq.to_string()),
            None => e,
        })
    };
    let mut first = vec![Numbered {
        seq: None,
        event: AgentEvent::Open {
            agent: a.config.name.clone(),
        },
    }];
    if follow.missed > 0 {
        first.push(Numbered {
            seq: None,
            event: AgentEvent::Lagged {
                missed: follow.missed,
            },
        });
    }
    first.extend(follow.replay);
    let first: Vec<_> = first.iter().map(sse).collect();
    let stream = futures_util::stream::unfold(follow.live, move |mut rx| async move {
        let n = match rx.recv().await {
            Ok(n) => n,
            Err(RecvError::Lagged(missed)) => Numbered {
                seq: None,
                event: AgentEvent::Lagged { missed },
            },
            Err(RecvError::Closed) => return None,
        };
        Some((sse(&n), rx))
    });
    Sse::new(futures_util::StreamExt::chain(
        futures_util::stream::iter(first),
        stream,
    ))
    .keep_alive(KeepAlive::default())
}

fn upgrade_error(e: UpgradeVmError) -> ApiError {
    match &e {
        UpgradeVmError::NotFound(_) => ApiError::not_found(&e),
        UpgradeVmError::Busy(_) => ApiError::new(StatusCode::CONFLICT, "busy", &e),
        UpgradeVmError::Failed { .. } => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "upgrade-failed",
            chain(&e),
        ),
    }
}

async fn move_vm(
    State(a): S,
    Path(name): Path<String>,
    Body(req): Body<tern_api::vm::MoveLocalRequest>,
) -> Result<Json<tern_api::vm::UpgradeReport>, ApiError> {
    a.move_vm_local(&name, req)
        .await
        .map(Json)
        .map_err(upgrade_error)
}

fn receive_error(e: crate::handover::ReceiveError) -> ApiError {
    use crate::handover::ReceiveError as R;
    let status = match &e {
        R::Exists(_) => StatusCode::CONFLICT,
        R::Unknown(_) => StatusCode::NOT_FOUND,
        R::Spec(_) | R::NotShared(_) | R::TpmKey(_) => StatusCode::BAD_REQUEST,
        R::Upgrade(_) | R::Failed { .. } => StatusCode::UNPROCESSABLE_ENTITY,
    };
    ApiError::new(status, "handover-failed", chain(&e))
}

async fn receive_handover(
    State(a): S,
    Body(req): Body<tern_api::vm::HandOverRequest>,
) -> Result<Json<tern_api::vm::HandOverReady>, ApiError> {
    a.receive_handover(req)
        .await
        .map(Json)
        .map_err(receive_error)
}

async fn commit_handover(
    State(a): S,
    Path(id): Path<String>,
) -> Result<Json<tern_api::vm::HandOverDone>, ApiError> {
    a.handover_command(&id, true)
        .await
        .map(Json)
        .map_err(receive_error)
}

async fn abort_handover(State(a): S, Path(id): Path<String>) -> StatusCode {
    let _ = a.handover_command(&id, false).await;
    StatusCode::NO_CONTENT
}

/// QMP commands the pass-through takes besides `query-*`: none of them can run a
/// program, open a file or reconfigure migration or storage.
pub const QMP_ALLOWED: &[&str] = &[
    "stop",
    "cont",
    "system_reset",
    "system_powerdown",
    "system_wakeup",
    "inject-nmi",
    "qom-list",
    "qom-get",
];

/// Whether the QMP pass-through takes `command`.
pub fn qmp_allowed(command: &str) -> bool {
    (command.starts_with("query-") && command.len() > "query-".len())
        || QMP_ALLOWED.contains(&command)
}

async fn qmp(
    State(a): S,
    Path(name): Path<String>,
    Body(req): Body<QmpRequest>,
) -> Result<Json<Value>, ApiError> {
    if !qmp_allowed(&req.execute) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "qmp-refused",
            format!(
                "QMP command {:?} is not passed through (it could run programs, open files or change migration or storage): allowed are query-* and {}",
                req.execute,
                QMP_ALLOWED.join(", ")
            ),
        ));
    }
    if req.execute == "cont" {
        if let Some(why) = a.fence.refuses(&name) {
            return Err(ApiError::new(StatusCode::CONFLICT, "fenced", why));
        }
    }
    let vm = find_vm(&a, &name)?;
    let r = vm
        .qmp
        .execute_within(
            &req.execute,
            req.arguments,
            std::time::Duration::from_secs(60),
        )
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, "qmp", chain(&e)))?;
    Ok(Json(r))
}

async fn save_memory(
    State(a): S,
    Path(name): Path<String>,
    Body(req): Body<SaveMemoryRequest>,
) -> Result<StatusCode, ApiError> {
    if !req.path.is_absolute() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad-request",
            format!("{} is not an absolute path", req.path.display()),
        ));
    }
    let vm = find_vm(&a, &name)?;
    let scratch = vm.run_dir.join("memdump.core");
    tern_qemu::memdump::save_guest_ram(&vm.qmp, &scratch, &req.path, req.size)
        .await
        .map_err(|e| {
            let status = match e {
                tern_qemu::memdump::SaveRamError::Create { .. } => StatusCode::BAD_REQUEST,
                _ => StatusCode::BAD_GATEWAY,
            };
            ApiError::new(status, "memory", chain(&e))
        })?;
    Ok(StatusCode::NO_CONTENT)
}

/// `--plan`: what migrating the VM would cost; nothing of it moves.
async fn plan(
    State(a): S,
    Path(name): Path<String>,
    Body(req): Body<MigrateRequest>,
) -> Result<Json<tern_api::MigrationPlan>, ApiError> {
    let vm = vm_to_move(&a, &name, &req)?;
    if vm.migrating.load(Ordering::SeqCst) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "busy",
            format!("VM {name:?} is migrating: plan it once that is over"),
        ));
    }
    let source = crate::outgoing::source_vm(&a, &vm)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e))?;
    let link = crate::links::memory_of(&a.config.state_dir, &req.to);
    let to = req.to.clone();
    let plan = tern_engine::source::plan::plan(a.engine.clone(), a.host(), source, req, link)
        .await
        .map_err(|e| {
            let code = e.code();
            ApiError::new(StatusCode::BAD_GATEWAY, code.name(), chain(&e))
        })?;
    if let Some(mibps) = plan.inputs.probe_mibps {
        // the next migration's prediction starts from it
        if let Err(e) = crate::links::record_probe(&a.config.state_dir, &to, mibps * 1048576.0) {
            tracing::warn!(destination = %to, "could not keep the link's probe: {e}");
        }
    }
    Ok(Json(plan))
}

/// The VM a migration or plan request names, once the request is valid and the VM runs.
fn vm_to_move(a: &Agent, name: &str, req: &MigrateRequest) -> Result<Arc<crate::vm::Vm>, ApiError> {
    req.validate()
        .map_err(|why| ApiError::new(StatusCode::BAD_REQUEST, "bad-request", why))?;
    let vm = find_vm(a, name)?;
    if vm.exit_reason().is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not-running",
            format!("VM {name:?} has exited"),
        ));
    }
    Ok(vm)
}

async fn migrate(
    State(a): S,
    Path(name): Path<String>,
    Body(req): Body<MigrateRequest>,
) -> Result<(StatusCode, Json<MigrateStarted>), ApiError> {
    let vm = vm_to_move(&a, &name, &req)?;
    if let Some(why) = a.fence.refuses(&name) {
        return Err(ApiError::new(StatusCode::CONFLICT, "fenced", why));
    }
    if vm
        .migrating
        .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "busy",
            format!("VM {name:?} is already migrating (tern migrate --cancel {name})"),
        ));
    }
    let id = new_migration_id();
    let handle = Arc::new(MigrationHandle::new(
        id.clone(),
        name,
        Direction::Outgoing,
        req.to.clone(),
    ));
    a.engine.registry.add_migration(handle.clone());
    tokio::spawn(async move {
        let span = tracing::info_span!("migration", migration = %handle.id, vm = %vm.spec.name);
        let task = tokio::spawn(
            crate::outgoing::run(a.clone(), vm.clone(), req, handle.clone()).instrument(span),
        );
        if let Err(e) = task.await {
            // A bug, not an outcome: say so, and leave the VM as it is (the commit may
            // have gone out: resuming could run it twice).
            tracing::error!(migration = %handle.id, "migration task failed: {e}");
            vm.migrating.store(false, Ordering::SeqCst);
            handle.finish_err(
                tern_proto::ErrorCode::Internal,
                format!("tern failed internally ({e}); the VM was left as it was"),
                "unknown: check `tern vm list` on both hosts".into(),
            );
        }
    });
    Ok((StatusCode::ACCEPTED, Json(MigrateStarted { id })))
}

/// A libvirt domain's migration, carried (`crate::libvirt`).
async fn migrate_libvirt(
    State(a): S,
    Path(domain): Path<String>,
    Body(req): Body<tern_api::LibvirtMigrateRequest>,
) -> Result<(StatusCode, Json<MigrateStarted>), ApiError> {
    req.validate()
        .map_err(|why| ApiError::new(StatusCode::BAD_REQUEST, "bad-request", why))?;
    if a.engine.registry.active_migration_of(&domain).is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "busy",
            format!("libvirt domain {domain:?} is already migrating"),
        ));
    }
    let d = crate::libvirt::domain(&a.config.libvirt_uri, &domain)
        .await
        .map_err(|e| {
            use crate::libvirt::LibvirtError as E;
            let status = match e {
                E::NotRunning { .. } | E::BadMemory { .. } | E::Carrier(_) => StatusCode::CONFLICT,
                E::Failed { .. } => StatusCode::NOT_FOUND,
                _ => StatusCode::BAD_GATEWAY,
            };
            ApiError::new(status, "libvirt", chain(&e))
        })?;
    let id = new_migration_id();
    let handle = Arc::new(MigrationHandle::new(
        id.clone(),
        domain,
        Direction::Outgoing,
        req.migrate.to.clone(),
    ));
    a.engine.registry.add_migration(handle.clone());
    tokio::spawn(async move {
        let span = tracing::info_span!("migration", migration = %handle.id, vm = %d.name);
        let task = tokio::spawn(crate::libvirt::run(a, d, req, handle.clone()).instrument(span));
        if let Err(e) = task.await {
            // a bug: the stream closed with the task, so libvirt's migration fails
            tracing::error!(migration = %handle.id, "libvirt migration task failed: {e}");
            handle.finish_err(
                tern_proto::ErrorCode::Internal,
                format!("tern failed internally ({e}); tern's stream closed, so libvirt's migration fails"),
                "as libvirt says: virsh domstate".into(),
            );
        }
    });
    Ok((StatusCode::ACCEPTED, Json(MigrateStarted { id })))
}

async fn cancel_vm_migration(
    State(a): S,
    Path(name): Path<String>,
) -> Result<Json<MigrationStatus>, ApiError> {
    let m = a
        .engine
        .registry
        .active_migration_of(&name)
        .ok_or_else(|| {
            ApiError::not_found(format!("VM {name:?} has no migration in progress here"))
        })?;
    m.cancel();
    Ok(Json(m.status()))
}

async fn list_migrations(State(a): S) -> Json<Vec<MigrationStatus>> {
    Json(
        a.engine
            .registry
            .migrations()
            .iter()
            .map(|m| m.status())
            .collect(),
    )
}

async fn show_migration(
    State(a): S,
    Path(id): Path<String>,
) -> Result<Json<MigrationStatus>, ApiError> {
    let m = find_migration(&a, &id)?;
    Ok(Json(m.status()))
}

async fn cancel_migration(
    State(a): S,
    Path(id): Path<String>,
) -> Result<Json<MigrationStatus>, ApiError> {
    let m = find_migration(&a, &id)?;
    m.cancel();
    Ok(Json(m.status()))
}

/// The agent reads images on its own host, with its own working directory: a relative
/// path would name some other file.
fn absolute_image_path(p: &std::path::Path) -> Result<(), ApiError> {
    if p.is_absolute() {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad-request",
            format!(
                "image path {} is not absolute: send the absolute path of the image on the agent's host (`tern image` does)",
                p.display()
            ),
        ))
    }
}

/// Maps an image-library error to a status, with what the operator can do about it.
fn image_error(e: ImportError) -> ApiError {
    use std::io::ErrorKind;
    use tern_chunks::{AddImageError, OpenImageError, RemoveImageError};
    let why = chain(&e);
    let missing = |k: ErrorKind| {
        if k == ErrorKind::NotFound {
            ApiError::not_found(format!(
                "{why}: check the path (the agent indexes the file in place, on its own host)"
            ))
        } else if k == ErrorKind::IsADirectory {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "unreadable",
                format!("{why}: give the image file, not a directory"),
            )
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "unreadable",
                format!("{why}: the agent must be able to read the file (check its permissions)"),
            )
        }
    };
    let internal = |kind| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, kind, &why);
    match &e {
        ImportError::Probe(_, io) => missing(io.kind()),
        ImportError::Format(_) => ApiError::new(StatusCode::BAD_REQUEST, "bad-format", &why),
        ImportError::Add(AddImageError::Stat { source, .. }) => missing(source.kind()),
        ImportError::Add(AddImageError::Open { source, .. }) => match source {
            OpenImageError::Open { source, .. } => missing(source.kind()),
            OpenImageError::QemuImgInfo { .. }
            | OpenImageError::FormatMismatch { .. }
            | OpenImageError::QemuNbdExited { .. } => ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad-image",
                format!("{why}: check the file with `qemu-img info`, or give its format (--format raw|qcow2)"),
            ),
            OpenImageError::SpawnQemuNbd(_) => internal("qemu-nbd"),
            OpenImageError::Runtime(_)
            | OpenImageError::QemuNbdTimeout { .. }
            | OpenImageError::Connect { .. } => internal("read-failed"),
        },
        ImportError::Add(AddImageError::Read { .. }) => internal("read-failed"),
        ImportError::Add(AddImageError::TooManyImages) => ApiError::new(
            StatusCode::CONFLICT,
            "index-full",
            format!("{why}: remove images no longer needed (tern image remove FILE)"),
        ),
        ImportError::Add(AddImageError::Persist { .. })
        | ImportError::Remove(RemoveImageError::Persist { .. }) => internal("index-write"),
        ImportError::Remove(RemoveImageError::NotIndexed(_)) => {
            ApiError::not_found(format!("{why} (`tern image list` shows what is)"))
        }
        ImportError::Task(_) => internal("internal"),
    }
}

async fn list_images(State(a): S) -> Result<Json<Vec<ImageInfo>>, ApiError> {
    // The index's lock is held through whole imports: wait for it off the runtime.
    let list = tokio::task::spawn_blocking(move || crate::images::list(&a.engine.chunks))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e))?;
    Ok(Json(list))
}

async fn import_image(
    State(a): S,
    Body(req): Body<ImportImageRequest>,
) -> Result<Json<ImportReport>, ApiError> {
    absolute_image_path(&req.path)?;
    let r = crate::images::import(&a.engine.chunks, req.path, req.format)
        .await
        .map_err(image_error)?;
    Ok(Json(r))
}

async fn refresh_images(State(a): S) -> Result<Json<RefreshSummary>, ApiError> {
    let r = crate::images::refresh(&a.engine.chunks)
        .await
        .map_err(image_error)?;
    Ok(Json(r))
}

async fn remove_image(
    State(a): S,
    Body(req): Body<RemoveImageRequest>,
) -> Result<StatusCode, ApiError> {
    absolute_image_path(&req.path)?;
    crate::images::remove(&a.engine.chunks, req.path)
        .await
        .map_err(image_error)?;
    Ok(StatusCode::NO_CONTENT)
}
