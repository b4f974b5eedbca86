//! The durable mark of the switchover on a destination: written and fsynced before the
//! incoming VM runs, read by a restarted agent (to answer the source's Query, and to
//! finish a switchover its predecessor began) and by the registry (an id is used once).

/// File in a run directory while its QEMU is an incoming migration not yet switched over.
pub const INCOMING_MARKER: &str = "incoming";
/// File in a run directory naming the migration that brought the VM here
/// ([`SwitchRecord`]).
pub const SWITCHED_IN: &str = "switched-in";

/// What a destination writes, durably, before an incoming VM runs: the VM is this host's
/// from then on. A restarted agent reads it to answer the source's Query and to finish a
/// switchover its predecessor began (a run directory with both this and
/// [`INCOMING_MARKER`] died between this record and `cont`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SwitchRecord {
    pub migration_id: String,
    /// The certificate of the source agent (only it may ask about the migration).
    pub peer: String,
    /// The VM ran on the source: it must run here.
    pub source_running: bool,
    /// When it resumed here (0: not yet, or it was paused).
    #[serde(default)]
    pub resumed_unix_us: u64,
}

impl SwitchRecord {
    /// Writes the record into `run_dir` and makes it durable (file and directory synced).
    pub fn write(&self, run_dir: &std::path::Path) -> std::io::Result<()> {
        write_durably(
            run_dir,
            SWITCHED_IN,
            &serde_json::to_vec(self).map_err(std::io::Error::other)?,
        )
    }

    /// The record in `run_dir`, if there is a readable one.
    pub fn read(run_dir: &std::path::Path) -> Option<SwitchRecord> {
        let b = std::fs::read(run_dir.join(SWITCHED_IN)).ok()?;
        serde_json::from_slice(&b).ok()
    }
}

/// Writes `dir/name` so that it is there whole or not at all after a crash: a temporary
/// file written and synced, renamed into place, the directory synced.
pub(crate) fn write_durably(
    dir: &std::path::Path,
    name: &str,
    bytes: &[u8],
) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!("{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}
