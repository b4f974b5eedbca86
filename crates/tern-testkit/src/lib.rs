//! Test fixtures for tern: the test guest image ([`guest`]), real agents on this machine
//! ([`agents`]) and helpers to read guest consoles. Used by integration tests only.
#![forbid(unsafe_code)]

pub mod agents;
pub mod guest;
