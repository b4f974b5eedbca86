//! What a host keeps for a cluster controller's failover: the snapshot a VM leaves behind
//! when it migrates away (`GET /v1/snapshots`, restarted by
//! `POST /v1/snapshots/{vm}/restart`), and the agent's fence (`GET /v1/fence`,
//! `POST /v1/fence/release`): VMs paused because the controller has not been heard from.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A departure snapshot as the agent keeps it (`STATE_DIR/snapshots/VM/meta.json`): the
/// VM's memory and device state at the switchover (the stream its QEMU sent, recorded)
/// and its disks as they were then.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub vm: String,
    /// The migration that took the VM away.
    pub migration_id: String,
    /// Where it went (the migration's `to`).
    pub destination: String,
    /// When its stream ended at the switchover: the state is the VM's as of then, ms
    /// since the Unix epoch.
    pub taken_unix_ms: u64,
    /// The VM's memory, bytes.
    pub mem_bytes: u64,
    /// The recorded stream's size on this host's disk, bytes (0: none kept).
    pub file_bytes: u64,
    /// The VM's local disks as kept at the switchover (in the spec's order; a restart
    /// runs on an overlay of each, the kept image unchanged).
    #[serde(default)]
    pub disks: Vec<SnapshotDisk>,
    /// Whether `POST /v1/snapshots/{vm}/restart` can run it.
    pub restartable: bool,
    /// Why not, when it cannot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why_not: Option<String>,
    /// The VM ran when it left (a restart resumes it; one that was paused stays paused).
    #[serde(default = "yes")]
    pub was_running: bool,
}

fn yes() -> bool {
    true
}

/// One kept disk of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotDisk {
    pub path: PathBuf,
    /// `raw` or `qcow2`.
    pub format: String,
}

/// One entry of `GET /v1/snapshots`: the meta and how old its state is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    #[serde(flatten)]
    pub meta: SnapshotMeta,
    /// Seconds from `taken_unix_ms` to the answer.
    pub age_s: f64,
}

/// What `POST /v1/snapshots/{vm}/restart` answers: the VM runs here again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestartReport {
    pub vm: String,
    /// The snapshot's `taken_unix_ms`: the VM's state is as of then.
    pub restarted_from_unix_ms: u64,
    /// How old that state was when the VM ran again, seconds.
    pub age_s: f64,
    pub run_dir: PathBuf,
}

/// `GET /v1/fence`: whether this agent paused its VMs because the controller went silent
/// (`tern agent --fence-after`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FenceStatus {
    pub fenced: bool,
    /// When it fenced, ms since the Unix epoch.
    pub since_unix_ms: Option<u64>,
    /// The VMs it paused (they stay paused until released).
    pub vms: Vec<String>,
    /// `--fence-after`, seconds; None: this agent never fences.
    pub fence_after_s: Option<f64>,
}

/// `POST /v1/fence/release`: what becomes of the fenced VMs; the fence is lifted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FenceRelease {
    /// Run again (QMP `cont`).
    #[serde(default)]
    pub resume: Vec<String>,
    /// Stopped for good (their QEMU quit, as `DELETE /v1/vms/{name}`): they run elsewhere.
    #[serde(default)]
    pub stop: Vec<String>,
}

/// What `POST /v1/fence/release` did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceReleased {
    pub stopped: Vec<String>,
    pub resumed: Vec<String>,
    /// What could not be done, one line per VM.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> SnapshotMeta {
        SnapshotMeta {
            vm: "web1".into(),
            migration_id: "m-1".into(),
            destination: "10.0.0.2:7701".into(),
            taken_unix_ms: 1_700_000_000_123,
            mem_bytes: 128 << 20,
            file_bytes: 102 << 20,
            disks: vec![SnapshotDisk {
                path: "/var/lib/tern/images/web1-disk0.qcow2".into(),
                format: "qcow2".into(),
            }],
            restartable: true,
            why_not: None,
            was_running: true,
        }
    }

    #[test]
    fn a_snapshot_reads_back_as_written_and_lists_flat_with_its_age() {
        let m = meta();
        let text = serde_json::to_string(&m).unwrap();
        assert!(!text.contains("why_not"), "{text}");
        assert_eq!(serde_json::from_str::<SnapshotMeta>(&text).unwrap(), m);
        let info = SnapshotInfo {
            meta: m.clone(),
            age_s: 2.5,
        };
        let v = serde_json::to_value(&info).unwrap();
        // what the controller reads, at the top level
        assert_eq!(v["vm"], "web1");
        assert_eq!(v["taken_unix_ms"], 1_700_000_000_123u64);
        assert_eq!(v["restartable"], true);
        assert_eq!(v["mem_bytes"], 128u64 << 20);
        assert_eq!(v["age_s"], 2.5);
        assert_eq!(serde_json::from_value::<SnapshotInfo>(v).unwrap(), info);
        let not = SnapshotMeta {
            restartable: false,
            why_not: Some("a shared disk moved on with the VM".into()),
            disks: Vec::new(),
            ..m
        };
        let back: SnapshotMeta =
            serde_json::from_str(&serde_json::to_string(&not).unwrap()).unwrap();
        assert_eq!(back, not);
    }

    #[test]
    fn a_release_takes_either_list_and_nothing_else() {
        let r: FenceRelease = serde_json::from_str(r#"{"resume": ["a"]}"#).unwrap();
        assert_eq!((r.resume, r.stop), (vec!["a".to_string()], vec![]));
        let r: FenceRelease = serde_json::from_str(r#"{"stop": ["b"], "resume": []}"#).unwrap();
        assert_eq!(r.stop, vec!["b".to_string()]);
        assert!(serde_json::from_str::<FenceRelease>(r#"{"resume": [], "kill": []}"#).is_err());
        let s = FenceStatus {
            fenced: true,
            since_unix_ms: Some(5),
            vms: vec!["a".into()],
            fence_after_s: Some(3.0),
        };
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["fenced"], true);
        assert_eq!(v["vms"][0], "a");
        let off = serde_json::to_value(FenceStatus {
            fenced: false,
            since_unix_ms: None,
            vms: vec![],
            fence_after_s: None,
        })
        .unwrap();
        assert!(off["since_unix_ms"].is_null() && off["fence_after_s"].is_null());
    }
}
