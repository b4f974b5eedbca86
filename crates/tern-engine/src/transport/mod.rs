//! Everything between two agents' migration logic and the network: mutual TLS and who
//! the peer is ([`tls`], [`cert`]), framed connections with copy-free output ([`conn`]),
//! the parallel data connections and their reordering ([`links`]), flow control between
//! the two QEMUs ([`flow`]), batching records into frames and compressing them
//! ([`batch`]), the migration's rate limit ([`rate`]) and what the kernel knows of each connection's
//! path ([`probe`]). Frame sizes and bounds come
//! from `tern_proto`, never as literals here. Must not know migration phases.

pub mod batch;
pub mod cert;
pub mod conn;
pub mod flow;
pub mod links;
pub mod probe;
pub mod rate;
pub mod tls;
