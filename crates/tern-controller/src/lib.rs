//! tern's cluster controller (docs/controller.md). It watches the agents of a cluster,
//! decides which VM to move where (load balance, drains) and starts the moves through the
//! agents' control listeners.
//!
//! - `view`: the cluster as measured (hosts, VMs, load windows);
//! - `rules`: placement rules beyond the authorisation policy (together, apart, pinned);
//! - `decide`: the decision, sans-I/O, with its cost-benefit test and hysteresis;
//! - `failover`: restarts from snapshots when a host dies, and releasing a fenced host;
//! - `state`: what survives a restart (one locked file, or etcd with a leader lease);
//! - `config`: `tern controller --config FILE`;
//! - `service`: the loop that polls the agents, decides and starts moves;
//! - `api`: the local socket `tern cluster` and `tern host` talk to.
//!
//! Owns decisions and the controller's own state; must not move a byte of a VM itself (the
//! agents do) or bypass an agent's authorisation policy (the source agent checks it again).

pub mod api;
pub mod config;
pub mod decide;
pub mod etcd;
pub mod failover;
pub mod rules;
pub mod service;
pub mod state;
pub mod view;

pub use decide::{Controller, Decisions, Move, MoveCost, Note, Params, Reason};
pub use rules::Rules;
pub use view::{Cluster, Host, Vm};
