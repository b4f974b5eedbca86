//! Test fixtures for tern: the test guest image ([`guest`]), real agents on this machine
//! ([`agents`]), what sits on the wire between them ([`wire`]: TLS test peers, a relay
//! that alters bytes, packet capture), a hostile peer with a valid certificate
//! ([`hostile`]) and helpers to read guest consoles. Used by
//! integration tests and benchmarks only.
#![forbid(unsafe_code)]

pub mod agents;
pub mod guest;
pub mod hostile;
pub mod wire;
