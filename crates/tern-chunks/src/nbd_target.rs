//! [`NbdTarget`]: a [`BlockTarget`] that writes through NBD, so a [`crate::Rebuild`] fills
//! an image that a QEMU holds open, e.g. the incoming destination's disk exported writable
//! (`tern_qemu::disk::export_writable`): the image keeps its format (qcow2 included) and
//! QEMU's caches stay coherent, since every write goes through QEMU itself.
//!
//! Owns one NBD connection and the current-thread tokio runtime that drives it (like
//! `image`'s reader), so it is blocking: use it from a plain thread or `spawn_blocking`,
//! never from inside an async task. Must not set up the export (the agent does that over
//! QMP) or decide when the image is complete.

use std::path::{Path, PathBuf};

use tern_nbd::{ConnectOptions, NbdClient};
use tokio::net::UnixStream;

use crate::rebuild::BlockTarget;

/// Why an NBD target could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenNbdTargetError {
    #[error("cannot start a runtime for the NBD connection")]
    Runtime(#[source] std::io::Error),
    #[error("cannot connect to NBD export {export:?} at {socket}")]
    Connect {
        socket: PathBuf,
        export: String,
        #[source]
        source: Box<tern_nbd::ConnectError>,
    },
    #[error("NBD export {export:?} at {socket} is read-only")]
    ReadOnly { socket: PathBuf, export: String },
}

/// A writable NBD export as a [`BlockTarget`]. `flush` sends `NBD_CMD_FLUSH` (the server
/// then persists what it acknowledged, qcow2 metadata included); drop disconnects hard,
/// [`NbdTarget::close`] cleanly.
pub struct NbdTarget {
    client: Option<NbdClient<UnixStream>>,
    rt: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for NbdTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdTarget")
            .field("size", &self.size())
            .finish()
    }
}

impl Drop for NbdTarget {
    fn drop(&mut self) {
        // The connection first, then the runtime without blocking (so that a target may be
        // dropped inside async code).
        drop(self.client.take());
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl NbdTarget {
    /// Connects to `export` on the unix socket `socket` (QEMU's `nbd-server-start`, or
    /// `qemu-nbd -k`). The export must be writable.
    pub fn connect_unix(socket: &Path, export: &str) -> Result<Self, OpenNbdTargetError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(OpenNbdTargetError::Runtime)?;
        let client = rt
            .block_on(NbdClient::connect_unix(
                socket,
                &ConnectOptions::new(export),
            ))
            .map_err(|source| OpenNbdTargetError::Connect {
                socket: socket.to_path_buf(),
                export: export.to_string(),
                source: Box::new(source),
            })?;
        if client.info().flags.read_only() {
            return Err(OpenNbdTargetError::ReadOnly {
                socket: socket.to_path_buf(),
                export: export.to_string(),
            });
        }
        Ok(Self {
            client: Some(client),
            rt: Some(rt),
        })
    }

    /// Size of the export in bytes.
    pub fn size(&self) -> u64 {
        self.client.as_ref().map_or(0, NbdClient::size)
    }

    fn parts(&mut self) -> (&tokio::runtime::Runtime, &mut NbdClient<UnixStream>) {
        (
            self.rt.as_ref().expect("runtime lives until drop"),
            self.client
                .as_mut()
                .expect("client lives until close or drop"),
        )
    }

    /// Flushes, then ends the session with `NBD_CMD_DISC`, so the export can be removed
    /// in QEMU's safe mode right after.
    pub fn close(mut self) -> std::io::Result<()> {
        self.flush()?;
        let rt = self.rt.take().expect("runtime lives until drop");
        let client = self.client.take().expect("client lives until close");
        let r = rt
            .block_on(client.disconnect())
            .map_err(std::io::Error::other);
        rt.shutdown_background();
        r
    }
}

impl BlockTarget for NbdTarget {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let (rt, client) = self.parts();
        rt.block_on(client.write(data, offset))
            .map_err(std::io::Error::other)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let (rt, client) = self.parts();
        if !client.info().flags.can_flush() {
            return Ok(());
        }
        rt.block_on(client.flush()).map_err(std::io::Error::other)
    }
}
