//! What the wire says about outcomes: the stable error codes an `Abort` carries (and
//! whether a retry may help), and the states a `QueryAnswer` reports.

/// What a destination agent knows of a migration, answering [`Message::Query`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationState {
    /// No such migration here (never seen, or the agent restarted: no VM from it runs).
    Unknown,
    /// Switched over: the VM runs here.
    Running,
    /// Failed before the switchover: everything of it was removed here.
    Discarded,
    /// Still going; ask again.
    InProgress,
}

impl MigrationState {
    pub fn to_u8(self) -> u8 {
        match self {
            MigrationState::Unknown => 0,
            MigrationState::Running => 1,
            MigrationState::Discarded => 2,
            MigrationState::InProgress => 3,
        }
    }
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => MigrationState::Unknown,
            1 => MigrationState::Running,
            2 => MigrationState::Discarded,
            3 => MigrationState::InProgress,
            _ => return None,
        })
    }
}

/// Why a migration was aborted, as carried on the wire. Codes are stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// A bug or an unexpected local failure.
    Internal,
    /// The peer broke the protocol (bad frame, message out of order).
    Protocol,
    /// No common protocol version.
    VersionMismatch,
    /// The destination already has a VM of that name.
    VmExists,
    /// The destination refused the VM spec (invalid, or files missing there).
    SpecRejected,
    /// The destination could not start QEMU.
    QemuLaunchFailed,
    /// A QEMU process failed during the migration.
    QemuFailed,
    /// The source QEMU's stream uses a feature tern does not carry.
    StreamUnsupported,
    /// The source QEMU's stream could not be parsed.
    StreamMalformed,
    /// The memory digests of the two sides differ.
    DigestMismatch,
    /// An operator cancelled the migration.
    Cancelled,
    /// A step took too long.
    Timeout,
    /// The destination lacks a resource (disk, memory).
    ResourceExhausted,
    /// The authorisation policy does not allow this VM on that host.
    NotAuthorized,
    /// Peer authentication or integrity failed (certificate refused, data altered).
    Security,
    /// Pre-copy did not converge within what the request allowed (throttle, downtime).
    NotConverging,
    /// A code this build does not know (a newer peer).
    Unknown(u16),
}

impl ErrorCode {
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::Internal => 1,
            ErrorCode::Protocol => 2,
            ErrorCode::VersionMismatch => 3,
            ErrorCode::VmExists => 4,
            ErrorCode::SpecRejected => 5,
            ErrorCode::QemuLaunchFailed => 6,
            ErrorCode::QemuFailed => 7,
            ErrorCode::StreamUnsupported => 8,
            ErrorCode::StreamMalformed => 9,
            ErrorCode::DigestMismatch => 10,
            ErrorCode::Cancelled => 11,
            ErrorCode::Timeout => 12,
            ErrorCode::ResourceExhausted => 13,
            ErrorCode::NotAuthorized => 14,
            ErrorCode::Security => 15,
            ErrorCode::NotConverging => 16,
            ErrorCode::Unknown(c) => c,
        }
    }

    pub fn from_u16(c: u16) -> ErrorCode {
        match c {
            1 => ErrorCode::Internal,
            2 => ErrorCode::Protocol,
            3 => ErrorCode::VersionMismatch,
            4 => ErrorCode::VmExists,
            5 => ErrorCode::SpecRejected,
            6 => ErrorCode::QemuLaunchFailed,
            7 => ErrorCode::QemuFailed,
            8 => ErrorCode::StreamUnsupported,
            9 => ErrorCode::StreamMalformed,
            10 => ErrorCode::DigestMismatch,
            11 => ErrorCode::Cancelled,
            12 => ErrorCode::Timeout,
            13 => ErrorCode::ResourceExhausted,
            14 => ErrorCode::NotAuthorized,
            15 => ErrorCode::Security,
            16 => ErrorCode::NotConverging,
            c => ErrorCode::Unknown(c),
        }
    }

    /// Whether trying the same migration again may succeed without operator action.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::Internal
                | ErrorCode::QemuFailed
                | ErrorCode::DigestMismatch
                | ErrorCode::Cancelled
                | ErrorCode::Timeout
                | ErrorCode::Unknown(_)
        )
    }

    /// A short stable name, for logs and JSON reports.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::Internal => "internal",
            ErrorCode::Protocol => "protocol",
            ErrorCode::VersionMismatch => "version-mismatch",
            ErrorCode::VmExists => "vm-exists",
            ErrorCode::SpecRejected => "spec-rejected",
            ErrorCode::QemuLaunchFailed => "qemu-launch-failed",
            ErrorCode::QemuFailed => "qemu-failed",
            ErrorCode::StreamUnsupported => "stream-unsupported",
            ErrorCode::StreamMalformed => "stream-malformed",
            ErrorCode::DigestMismatch => "digest-mismatch",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::Timeout => "timeout",
            ErrorCode::ResourceExhausted => "resource-exhausted",
            ErrorCode::NotAuthorized => "not-authorized",
            ErrorCode::Security => "security",
            ErrorCode::NotConverging => "not-converging",
            ErrorCode::Unknown(_) => "unknown",
        }
    }
}
