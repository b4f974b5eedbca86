//! Where the controller keeps what must survive a restart (drained hosts, moves in flight,
//! each VM's last move, what moves cost): [`Memory`]. Owns the stores and the leadership
//! that decides which controller may act:
//! - [`FileStore`], the default: one JSON file, written whole (temporary file, fsync,
//!   rename), and an exclusive lock on it so that two controllers never act on one state;
//! - `crate::etcd`: the same document in etcd, with a leader lease, for a standby to
//!   take over.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::decide::Memory;

/// Why the controller's state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not a controller state this tern can read (move it aside to start afresh)")]
    Corrupt(PathBuf, #[source] serde_json::Error),
    #[error("another controller holds {0} (one state, one controller; use etcd for a standby)")]
    Locked(PathBuf),
    #[error("etcd: {0}")]
    Etcd(String),
    #[error("this controller is no longer the leader (another took over)")]
    NotLeader,
}

/// A place for the controller's [`Memory`].
pub trait Store: Send {
    /// The state last saved (None: never saved).
    fn load(&mut self) -> Result<Option<Memory>, StateError>;
    /// Saves the state whole; returns only once it is durable.
    fn save(&mut self, m: &Memory) -> Result<(), StateError>;
    /// Whether this controller may act now (always for a file: its lock is held).
    fn leading(&mut self) -> Result<bool, StateError> {
        Ok(true)
    }
    /// Where the state lives, for logs and `tern cluster status`.
    fn describe(&self) -> String;
}

/// The embedded store: `DIR/controller.json`, locked by `DIR/controller.lock`.
pub struct FileStore {
    path: PathBuf,
    _lock: File,
}

impl FileStore {
    /// Opens (creating `dir`) and takes the lock; fails if another controller holds it.
    pub fn open(dir: &Path) -> Result<FileStore, StateError> {
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| StateError::Io { what, path, source }
        };
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        let lock_path = dir.join("controller.lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io("open", &lock_path))?;
        match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
                return Err(StateError::Locked(lock_path))
            }
            Err(e) => return Err(io("lock", &lock_path)(e.into())),
        }
        Ok(FileStore {
            path: dir.join("controller.json"),
            _lock: lock,
        })
    }
}

impl Store for FileStore {
    fn load(&mut self) -> Result<Option<Memory>, StateError> {
        match std::fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| StateError::Corrupt(self.path.clone(), e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Io {
                what: "read",
                path: self.path.clone(),
                source,
            }),
        }
    }

    fn save(&mut self, m: &Memory) -> Result<(), StateError> {
        let tmp = self.path.with_extension("json.new");
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| StateError::Io { what, path, source }
        };
        let body = serde_json::to_vec_pretty(m).expect("the state serialises");
        let mut f = File::create(&tmp).map_err(io("create", &tmp))?;
        f.write_all(&body).map_err(io("write", &tmp))?;
        f.sync_all().map_err(io("sync", &tmp))?;
        std::fs::rename(&tmp, &self.path).map_err(io("rename into", &self.path))?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io("sync", dir))?;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_store_keeps_the_state_and_admits_one_controller() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = FileStore::open(dir.path()).unwrap();
        assert!(s.load().unwrap().is_none());
        let mut m = Memory::default();
        m.drained.insert("a".into());
        s.save(&m).unwrap();
        assert!(matches!(
            FileStore::open(dir.path()),
            Err(StateError::Locked(_))
        ));
        drop(s);
        let mut s = FileStore::open(dir.path()).unwrap();
        assert!(s.load().unwrap().unwrap().drained.contains("a"));
        std::fs::write(dir.path().join("controller.json"), b"{not json").unwrap();
        assert!(matches!(s.load(), Err(StateError::Corrupt(..))));
    }
}
