//! The agent's control API as types, in one place: what `tern agent` serves
//! (`tern_agent::api` maps routes to them), what the `tern` CLI and the test kit send and
//! read, and the blocking [`client`] they use. JSON on the wire is these types' serde
//! form; docs/architecture.md lists the routes.
//!
//! Owns the shapes and their parsing (a compression name is parsed here, once); must not
//! do any work of the agent's or depend on it.
#![forbid(unsafe_code)]

pub mod client;
pub mod events;
pub mod image;
pub mod load;
pub mod migration;
pub mod snapshot;
pub mod vm;

pub use load::{HostLoad, VmLoad};
pub use migration::{
    Compression, ConvergenceReport, Direction, DiskReport, EncodingReport, FailureInfo,
    HostCpuReport, LibvirtMigrateRequest, LinkOutage, MigrateRequest, MigrateStarted,
    MigrationPlan, MigrationReport, MigrationStatus, Objective, PacingReport, PageCounts, Phase,
    PhaseSpan, PlanInputs, PlanPrediction, PostcopyFaults, Progress, SwitchoverTimes, Timeline,
};
pub use snapshot::{
    FenceRelease, FenceReleased, FenceStatus, RestartReport, SnapshotDisk, SnapshotInfo,
    SnapshotMeta,
};
