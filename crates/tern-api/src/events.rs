//! What `GET /v1/events` streams (server-sent events; each `data:` line is one
//! [`AgentEvent`] as JSON): tools follow an agent instead of polling it.

use serde::{Deserialize, Serialize};

use crate::migration::MigrationStatus;

/// One thing that happened on an agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum AgentEvent {
    /// The first event of every stream: the listener is subscribed from here on.
    Open { agent: String },
    /// A migration (either direction) entered a phase; `done` and `failed` end it, with the
    /// report or the error in the status.
    Migration { status: Box<MigrationStatus> },
    /// A VM's life here: `started`, `stopped`, `arrived` (by a migration or a hand-over),
    /// `left` (it runs elsewhere now), `upgraded` (a new QEMU on this host).
    Vm {
        name: String,
        what: String,
        #[serde(default)]
        pid: Option<u32>,
    },
    /// A running migration's progress (about once a second while somebody listens; not
    /// numbered, not replayed: the next one is newer).
    Progress { status: Box<MigrationStatus> },
    /// The stream fell behind, or the listener asked for events no longer kept: `missed`
    /// events it will not get.
    Lagged { missed: u64 },
}
