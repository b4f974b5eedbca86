//! Faults a test can inject into an agent (`TERN_FAULT`), to prove what happens when a
//! host dies, hangs or has a bug at the worst moment. Compiled in only with the
//! `fault-injection` feature, which the `tern` crate's tests turn on (a test build); a
//! release binary has no faults, and [`fault!`] is a constant `false` there.

use std::sync::atomic::Ordering;

/// Faults a test can inject (never set in production).
#[cfg(feature = "fault-injection")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The destination flips one byte of the first non-zero page it receives, as a
    /// decoding bug would: the digest comparison must catch it before the VM runs there.
    CorruptPage,
    /// The destination resumes the VM after Commit but drops the connection instead of
    /// answering Resumed: the source must find out by asking (Query), not guess.
    DropAfterCommit,
    /// The destination copies each disk image to `PATH.at-switchover` after the last disk
    /// round, just before the VM runs there: a test's witness of the images at the
    /// switchover (the running guest changes them right after).
    DiskCopyAtSwitchover,
    /// The source agent exits (as if killed) when its QEMU pauses before the switchover:
    /// the VM is left paused, migrating into a dead socket, with tern's NBD state in it.
    ExitAtPreSwitchover,
    /// The destination agent exits right after it recorded the switchover, before `cont`:
    /// the VM is paused there, the source committed and waiting.
    ExitAtSwitchover,
    /// The destination (of a migration, or a hand-over's new QEMU) cannot write its
    /// switchover record: it must not run the VM (a hand-over's old QEMU runs it on).
    FailSwitchRecord,
    /// The destination panics (a bug) on the first page frame of its first incoming
    /// migration, holding the page store's lock: it must clean up like an error does and
    /// take the next migration.
    PanicInTransfer,
    /// The destination takes 35 s more to finish after its QEMU loaded the stream (as a
    /// large disk's last flush would): the source must wait, not declare doubt.
    SlowFinish,
    /// An upgrade's relay cuts the device-state stream after 4 KiB: the old QEMU must run
    /// the VM again.
    UpgradeCutStream,
    /// An upgrade kills the new QEMU as soon as it answers QMP (it holds the memory, has
    /// not loaded the device state): the old QEMU must run the VM again.
    UpgradeKillNewQemu,
    /// The agent exits when the new QEMU loaded the VM, before the upgrade's commit: a
    /// restarted agent must run the VM in the old QEMU.
    UpgradeExitBeforeCommit,
    /// The agent exits right after the upgrade's commit, before `cont`: a restarted agent
    /// must run the VM in the new QEMU and stop the old one.
    UpgradeExitAfterCommit,
    /// The new QEMU of a hand-over is killed right after the commit was recorded, so its
    /// `cont` fails: the record must be taken back and the old QEMU run the VM again.
    UpgradeKillBeforeCont,
    /// The agent that sent a hand-over's device state exits before it asks for the commit:
    /// the receiver must give up by itself and a restarted sender run the VM again.
    MoveExitBeforeCommit,
    /// The agent never tells its peers where its VMs' network cards live (it still
    /// answers them): the overlay as it would be without its control plane.
    OverlaySilent,
    /// Frames for a card that left go on to its new host for 1 s only (not 30).
    OverlayForwardBriefly,
}

/// Without the `fault-injection` feature there is no fault to name.
#[cfg(not(feature = "fault-injection"))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {}

/// Whether a once-per-process fault fires now (the first time it is asked).
pub fn fault_once() -> bool {
    static FIRED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    !FIRED.swap(true, Ordering::SeqCst)
}

#[cfg(feature = "fault-injection")]
impl std::str::FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "corrupt-page" => Ok(Fault::CorruptPage),
            "drop-after-commit" => Ok(Fault::DropAfterCommit),
            "disk-copy-at-switchover" => Ok(Fault::DiskCopyAtSwitchover),
            "exit-at-pre-switchover" => Ok(Fault::ExitAtPreSwitchover),
            "exit-at-switchover" => Ok(Fault::ExitAtSwitchover),
            "fail-switch-record" => Ok(Fault::FailSwitchRecord),
            "panic-in-transfer" => Ok(Fault::PanicInTransfer),
            "slow-finish" => Ok(Fault::SlowFinish),
            "upgrade-cut-stream" => Ok(Fault::UpgradeCutStream),
            "upgrade-kill-new-qemu" => Ok(Fault::UpgradeKillNewQemu),
            "upgrade-exit-before-commit" => Ok(Fault::UpgradeExitBeforeCommit),
            "upgrade-exit-after-commit" => Ok(Fault::UpgradeExitAfterCommit),
            "upgrade-kill-before-cont" => Ok(Fault::UpgradeKillBeforeCont),
            "move-exit-before-commit" => Ok(Fault::MoveExitBeforeCommit),
            "overlay-silent" => Ok(Fault::OverlaySilent),
            "overlay-forward-briefly" => Ok(Fault::OverlayForwardBriefly),
            _ => Err(format!(
                "unknown fault {s:?} (known: corrupt-page, drop-after-commit, disk-copy-at-switchover, exit-at-pre-switchover, exit-at-switchover, fail-switch-record, panic-in-transfer, slow-finish, upgrade-cut-stream, upgrade-kill-new-qemu, upgrade-exit-before-commit, upgrade-exit-after-commit, upgrade-kill-before-cont, move-exit-before-commit, overlay-silent, overlay-forward-briefly)"
            )),
        }
    }
}

#[cfg(not(feature = "fault-injection"))]
impl std::str::FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Err(format!(
            "fault {s:?}: this tern was built without fault injection (test builds have it)"
        ))
    }
}

/// Whether fault `$f` is set in `$set` (an `Option<Fault>`): always false in a build
/// without fault injection.
macro_rules! fault {
    ($set:expr, $f:ident) => {{
        #[cfg(feature = "fault-injection")]
        {
            $set == Some($crate::fault::Fault::$f)
        }
        #[cfg(not(feature = "fault-injection"))]
        {
            let _ = &$set;
            false
        }
    }};
}
pub(crate) use fault;
