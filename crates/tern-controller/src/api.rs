//! The controller's local API (HTTP/JSON on a unix socket, owner only), what `tern
//! cluster status`, `tern cluster plan` and `tern host drain|undrain` use:
//! - `GET /v1/cluster`: hosts, load, VMs, moves in flight, drained hosts, recent decisions;
//! - `GET /v1/plan`: what the controller would do now and why (moves nothing);
//! - `POST /v1/hosts/{name}/drain`, `POST /v1/hosts/{name}/undrain`.
//!
//! Owns these types and routes; the work is [`crate::service::Service`]'s.

use std::path::Path;
use std::sync::Arc;

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::decide::{Decisions, LastMove, Move, Params};
use crate::service::Service;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// This controller acts (false: a standby, or it cannot reach its store).
    pub leading: bool,
    /// Where its state is.
    pub store: String,
    pub dry_run: bool,
    pub hosts: Vec<HostStatus>,
    pub vms: Vec<VmStatus>,
    pub in_flight: Vec<Move>,
    /// VMs restarted from a snapshot while their host was unreachable (until it is back).
    #[serde(default)]
    pub restarted: std::collections::BTreeMap<String, crate::failover::Restarted>,
    /// The last round's decisions.
    pub last: Decisions,
    /// Recent decisions and events, oldest first.
    pub log: Vec<LogLine>,
    pub params: Params,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostStatus {
    pub name: String,
    pub alive: bool,
    pub drained: bool,
    pub labels: Vec<String>,
    pub capacity_cores: f64,
    /// Sustained load (the mean over the window), cores.
    pub load_cores: f64,
    pub utilisation: f64,
    pub vms: usize,
    /// Seconds it has been above `high`.
    pub hot_for_s: Option<f64>,
    /// Why its agent did not answer the last poll.
    pub error: Option<String>,
    /// When its agent last answered, seconds since the Unix epoch.
    #[serde(default)]
    pub answered_at: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmStatus {
    pub name: String,
    pub host: String,
    pub load_cores: f64,
    pub mem_bytes: u64,
    /// Where it is moving to.
    pub moving: Option<String>,
    pub last_move: Option<LastMove>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LogLine {
    /// Seconds since the Unix epoch.
    pub at: f64,
    pub text: String,
}

type S = State<Arc<Service>>;

struct ApiError(u16, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(json!({ "error": self.1 }))).into_response()
    }
}

pub fn router(s: Arc<Service>) -> Router {
    Router::new()
        .route("/v1/cluster", get(cluster))
        .route("/v1/plan", get(plan))
        .route("/v1/hosts/{name}/drain", post(drain))
        .route("/v1/hosts/{name}/undrain", post(undrain))
        .with_state(s)
}

async fn cluster(State(s): S) -> Json<ClusterStatus> {
    Json(s.status())
}

async fn plan(State(s): S) -> Json<Decisions> {
    Json(s.plan())
}

async fn drain(
    State(s): S,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    s.set_drained(&name, true)
        .map_err(|(c, m)| ApiError(c, m))?;
    Ok(Json(json!({ "host": name, "drained": true })))
}

async fn undrain(
    State(s): S,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    s.set_drained(&name, false)
        .map_err(|(c, m)| ApiError(c, m))?;
    Ok(Json(json!({ "host": name, "drained": false })))
}

/// Binds the API socket (owner only) and returns the serving future.
pub async fn serve(
    s: Arc<Service>,
    path: &Path,
) -> std::io::Result<impl std::future::Future<Output = ()> + Send> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let l = tokio::net::UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let app = router(s);
    Ok(async move {
        let _ = axum::serve(l, app).await;
    })
}
