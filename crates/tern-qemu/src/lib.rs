//! The QEMU side of tern.
//!
//! Owns everything that speaks QEMU's languages: the migration-stream codec
//! ([`stream`], sans-IO: bytes in, items out, items in, bytes out), the return-path
//! messages ([`rp`]), the QMP client ([`qmp`]), the VM spec ([`spec`]), turning a spec
//! into a QEMU process ([`launch`]), the VM's software TPM beside it ([`swtpm`]) and the
//! QMP side of live disk migration ([`disk`]: node names, dirty-bitmap rounds, NBD
//! exports, pause-before-switchover). It must not know about tern's wire protocol or about
//! other hosts.
#![forbid(unsafe_code)]

pub mod disk;
pub mod launch;
pub mod memdump;
pub mod qmp;
pub mod ramsample;
pub mod rp;
pub mod spec;
pub mod stream;
pub mod swtpm;
