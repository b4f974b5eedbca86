//! The migrations an agent knows, in both directions: what the API lists, what a peer's
//! Query is answered from, which incoming migration takes which data connection, and the
//! admission of incoming migrations (an id is used once per host and bound to the
//! certificate that prepared it; at most so many come in at once).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;
use tern_proto::MigrationState;

use crate::dest::SwitchRecord;
use crate::handle::{Direction, MigrationHandle};
use crate::transport::conn::FrameReader;
use crate::transport::tls::PeerRead;

/// Where an incoming migration takes its extra data connections.
pub type StreamSlot = tokio::sync::mpsc::UnboundedSender<(u16, FrameReader<PeerRead>)>;

/// Where an incoming post-copy migration takes the connection its source resumes on after
/// the link broke (protocol v11, PostcopyResume).
pub(crate) type ResumeSlot = tokio::sync::mpsc::Sender<crate::dest::Conn>;

/// Why a peer's data connection was not taken.
#[derive(Debug, PartialEq, Eq)]
pub enum AttachRefused {
    /// No incoming migration of that id takes data connections here.
    Unknown,
    /// The migration belongs to another peer's certificate.
    OtherPeer,
}

/// Why an incoming migration was not registered.
#[derive(Debug, PartialEq, Eq)]
pub enum AddIncomingError {
    /// Its id is known here already.
    KnownId,
    /// This many incoming migrations run already (the configured maximum).
    Busy(usize),
}

/// Why a peer's Query about a migration is not answered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("migration {0} was prepared by another peer's certificate")]
pub struct QueryRefused(pub String);

/// The migrations of one agent.
pub struct Registry {
    migrations: Mutex<HashMap<String, Arc<MigrationHandle>>>,
    /// Incoming migrations that accept extra data connections, with the certificate that
    /// may attach them.
    streams: Mutex<HashMap<String, (String, StreamSlot)>>,
    /// Incoming post-copy migrations (the VM runs here) that a source may resume on a new
    /// connection, with the certificate that may.
    resumes: Mutex<HashMap<String, (String, ResumeSlot)>>,
    /// Where VMs' run directories are (switchover records live there).
    run_root: PathBuf,
    max_incoming: usize,
    /// What happens here, for the API's event stream (`GET /v1/events`).
    events: Arc<crate::events::EventLog>,
    /// Which certificate may tunnel to (and carry the stream of) each libvirt domain
    /// migrating in.
    pub tunnel_claims: crate::tunnel::Claims,
}

/// Stops accepting a resumed post-copy connection for a migration when dropped.
pub struct ResumeGuard {
    registry: Arc<Registry>,
    id: String,
}

impl Drop for ResumeGuard {
    fn drop(&mut self) {
        self.registry.resumes.lock().remove(&self.id);
    }
}

/// Stops accepting data connections for a migration when dropped.
pub struct StreamsGuard {
    registry: Arc<Registry>,
    id: String,
}

impl Drop for StreamsGuard {
    fn drop(&mut self) {
        self.registry.streams.lock().remove(&self.id);
    }
}

impl Registry {
    pub fn new(run_root: PathBuf, max_incoming: usize) -> Registry {
        Registry {
            migrations: Mutex::new(HashMap::new()),
            streams: Mutex::new(HashMap::new()),
            resumes: Mutex::new(HashMap::new()),
            run_root,
            max_incoming,
            events: Arc::default(),
            tunnel_claims: Default::default(),
        }
    }

    /// The agent's events: kept ones after `since`, then live ones
    /// ([`crate::events::EventLog::follow`]).
    pub fn follow(&self, since: Option<u64>) -> crate::events::Follow {
        self.events.follow(since)
    }

    /// Tells the event stream's listeners (and keeps it for those that come back).
    pub fn emit(&self, e: tern_api::events::AgentEvent) {
        self.events.emit(e);
    }

    pub fn add_migration(&self, m: Arc<MigrationHandle>) {
        m.tell(self.events.clone());
        self.events.tick_while_running(&m);
        self.migrations.lock().insert(m.id.clone(), m);
    }

    pub fn migration(&self, id: &str) -> Option<Arc<MigrationHandle>> {
        self.migrations.lock().get(id).cloned()
    }

    /// Every migration, oldest first.
    pub fn migrations(&self) -> Vec<Arc<MigrationHandle>> {
        let mut v: Vec<_> = self.migrations.lock().values().cloned().collect();
        v.sort_by_key(|m| m.started);
        v
    }

    /// The migration of `vm` that is still in progress, if any.
    pub fn active_migration_of(&self, vm: &str) -> Option<Arc<MigrationHandle>> {
        self.migrations()
            .into_iter()
            .rev()
            .find(|m| m.vm == vm && !m.is_finished())
    }

    /// Registers an incoming migration unless its id is known here already (from either
    /// direction, or a VM that arrived with it) or the configured number of incoming
    /// migrations run already. A reused id could make a source believe a VM runs here
    /// that it did not send.
    pub fn add_incoming(&self, m: Arc<MigrationHandle>) -> Result<(), AddIncomingError> {
        if self.switch_record_of(&m.id).is_some() {
            return Err(AddIncomingError::KnownId);
        }
        let mut all = self.migrations.lock();
        if all.contains_key(&m.id) {
            return Err(AddIncomingError::KnownId);
        }
        let busy = all
            .values()
            .filter(|m| m.direction == Direction::Incoming && !m.is_finished())
            .count();
        if busy >= self.max_incoming {
            return Err(AddIncomingError::Busy(busy));
        }
        m.tell(self.events.clone());
        all.insert(m.id.clone(), m);
        Ok(())
    }

    /// The switchover record of migration `id` in one of this host's run directories.
    pub fn switch_record_of(&self, id: &str) -> Option<SwitchRecord> {
        let dirs = std::fs::read_dir(&self.run_root).ok()?;
        dirs.flatten()
            .filter_map(|e| SwitchRecord::read(&e.path()))
            .find(|r| r.migration_id == id)
    }

    /// What this agent knows of a migration it received (answers a source's Query), for
    /// the certificate `peer` that asks: only the one that prepared it gets an answer.
    pub fn incoming_state(
        &self,
        id: &str,
        peer: &str,
    ) -> Result<(MigrationState, u64), QueryRefused> {
        use MigrationState as S;
        let Some(m) = self
            .migration(id)
            .filter(|m| m.direction == Direction::Incoming)
        else {
            // an agent restarted after the switchover still knows from the VM's run dir
            return match self.switch_record_of(id) {
                Some(r) if r.peer != peer => Err(QueryRefused(id.into())),
                Some(r) => Ok((S::Running, r.resumed_unix_us)),
                None => Ok((S::Unknown, 0)),
            };
        };
        if m.peer_fingerprint() != peer {
            return Err(QueryRefused(id.into()));
        }
        let st = m.status();
        Ok(match (st.finished, st.report) {
            (true, Some(r)) => (S::Running, r.resumed_unix_us),
            // failed after its switchover record (post-copy: the VM ran here from
            // POSTCOPY_RUN on): it is here, never "discarded" (the source would resume)
            (true, None) => match self.switch_record_of(id) {
                Some(r) => (S::Running, r.resumed_unix_us),
                None => (S::Discarded, 0),
            },
            (false, _) => (S::InProgress, 0),
        })
    }

    /// Lets data connections for incoming migration `id` reach it until the guard drops;
    /// only from the certificate `peer` (the one that prepared it).
    pub fn accept_streams(
        self: &Arc<Self>,
        id: &str,
        peer: &str,
        slot: StreamSlot,
    ) -> StreamsGuard {
        self.streams
            .lock()
            .insert(id.to_string(), (peer.to_string(), slot));
        StreamsGuard {
            registry: self.clone(),
            id: id.to_string(),
        }
    }

    /// Lets the source of post-copy migration `id` resume it on a new connection until the
    /// guard drops; only from the certificate `peer` (the one that prepared it).
    pub(crate) fn accept_resume(
        self: &Arc<Self>,
        id: &str,
        peer: &str,
        slot: ResumeSlot,
    ) -> ResumeGuard {
        self.resumes
            .lock()
            .insert(id.to_string(), (peer.to_string(), slot));
        ResumeGuard {
            registry: self.clone(),
            id: id.to_string(),
        }
    }

    /// Hands a connection from certificate `peer` on which post-copy migration `id` goes on
    /// to that migration (a second one while the first waits is refused: busy).
    pub(crate) fn resume(
        &self,
        id: &str,
        peer: &str,
        conn: crate::dest::Conn,
    ) -> Result<(), AttachRefused> {
        let slot = match self.resumes.lock().get(id) {
            Some((owner, _)) if owner != peer => return Err(AttachRefused::OtherPeer),
            Some((_, slot)) => slot.clone(),
            None => return Err(AttachRefused::Unknown),
        };
        slot.try_send(conn).map_err(|_| AttachRefused::Unknown)
    }

    /// Hands a data connection from certificate `peer` to its migration.
    pub fn attach_stream(
        &self,
        id: &str,
        peer: &str,
        index: u16,
        reader: FrameReader<PeerRead>,
    ) -> Result<(), AttachRefused> {
        match self.streams.lock().get(id) {
            Some((owner, _)) if owner != peer => Err(AttachRefused::OtherPeer),
            Some((_, slot)) => slot
                .send((index, reader))
                .map_err(|_| AttachRefused::Unknown),
            None => Err(AttachRefused::Unknown),
        }
    }
}
