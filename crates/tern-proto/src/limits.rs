//! The bounds both ends of a migration keep to. A peer is authenticated, not trusted: a
//! receiver checks every size, count and offset a peer sends against these before it
//! allocates anything, and ends the migration (`protocol` error) when a peer goes past
//! one. A well-behaved sender never comes near them; docs/protocol.md states them.

/// Page size of the VMs tern carries (x86-64 target pages). A RamBlocks frame with any
/// other page size is refused.
pub const PAGE_SIZE: u64 = 4096;

/// Most RAM blocks a VM may announce (a `pc` machine has about eight: RAM, BIOS, option
/// ROMs, ACPI tables).
pub const MAX_RAM_BLOCKS: usize = 128;

/// RAM blocks may add up to the spec's `memory_mib` plus this much (firmware, option
/// ROMs, ACPI tables, video memory).
pub const RAM_SLACK_BYTES: u64 = 256 << 20;

/// Longest RAM block name (QEMU's own limit is 256 bytes).
pub const MAX_RAM_BLOCK_NAME: usize = 256;

/// Most extra data connections (parallel streams) one migration may attach.
pub const MAX_DATA_STREAMS: u16 = 16;

/// Most stream units (see `Applied`) a source keeps in flight beyond what the destination
/// has applied (the flow-control window's ceiling).
pub const MAX_FLOW_WINDOW: u64 = 256 << 20;

/// Data frames a destination holds back while it waits for an earlier sequence number
/// (parallel streams deliver out of order): at most this many frames...
pub const MAX_REORDER_FRAMES: usize = 16384;
/// ...and at most this many bytes of them. Past either, the migration ends.
pub const MAX_REORDER_BYTES: u64 = MAX_FLOW_WINDOW + (64 << 20);

/// Page records a destination holds back behind a reference it had to ask for (`Want`)
/// (the flow window in pages, twice over).
pub const MAX_PENDING_RECORDS: usize = 2 * (MAX_FLOW_WINDOW / PAGE_SIZE) as usize;
/// Bytes of page data and QEMU bytes held back behind such a reference.
pub const MAX_PENDING_BYTES: u64 = MAX_FLOW_WINDOW + (64 << 20);

/// Most hashes in one `Want`, and most pages in one `Content`.
pub const MAX_WANT_HASHES: usize = 1024;

/// Most hash prefixes a source keeps from a destination's `Summary` (a hint: what goes
/// past it is dropped, costing references, never correctness).
pub const MAX_SUMMARY_PREFIXES: usize = 1 << 22;

/// Round 0 of a disk travels in pieces of this many bytes: piece N is the byte range
/// `N * DISK_PIECE_BYTES .. min((N + 1) * DISK_PIECE_BYTES, disk size)`.
pub const DISK_PIECE_BYTES: u64 = 4 << 20;

/// Pieces of one disk a destination keeps open (manifest received, data pending).
pub const MAX_OPEN_PIECES: usize = 64;

/// Largest disk a VM may bring (64 TiB).
pub const MAX_DISK_BYTES: u64 = 64 << 40;

/// Disk replies (DiskWant, DiskRoundDone) a source holds unread; a destination that sends
/// more than were asked for ends the migration.
pub const MAX_DISK_REPLIES: usize = 64;

/// Flow control (v2): the destination tells the source how much its QEMU took at least
/// every this many stream units (and, since 2026-12-07, whenever its queue to QEMU
/// empties). A source never waits for less than this to be in flight: an older
/// destination may hold back up to this much of its count.
pub const APPLIED_EVERY: u64 = 256 << 10;

/// How often a destination that is busy finishing (loading QEMU's stream, flushing disks,
/// resuming the VM) tells the source it is alive (`Applied` with unchanged units).
pub const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// The byte range of disk piece `piece` on a disk of `size` bytes; None past the end.
pub fn disk_piece_range(piece: u32, size: u64) -> Option<std::ops::Range<u64>> {
    let start = u64::from(piece).checked_mul(DISK_PIECE_BYTES)?;
    (start < size).then(|| start..(start + DISK_PIECE_BYTES).min(size))
}

/// Most network cards one `Locations` message may name (a host's VMs' cards; the
/// receiver also keeps at most this many remote cards per network).
pub const MAX_LOCATIONS: usize = 4096;

/// Most page hashes one `PlanQuery` may carry (a plan samples 1024 pages).
pub const MAX_PLAN_HASHES: usize = 4096;

/// Most filler a plan's link probe may send (`ProbeBytes` in all), and the longest it may
/// take from PlanHeld to ProbeEnd (a source sends for 2 s and keeps at most about as much
/// in flight as was acknowledged, so a slow link drains it well within): the destination
/// refuses a probe past either.
pub const MAX_PROBE_BYTES: u64 = 64 << 20;
pub const MAX_PROBE_TIME: std::time::Duration = std::time::Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn piece_ranges_tile_the_disk() {
        let size = 3 * DISK_PIECE_BYTES + 4096;
        assert_eq!(disk_piece_range(0, size), Some(0..DISK_PIECE_BYTES));
        assert_eq!(disk_piece_range(3, size), Some(3 * DISK_PIECE_BYTES..size));
        assert_eq!(disk_piece_range(4, size), None);
        assert_eq!(
            disk_piece_range(u32::MAX, u64::MAX),
            Some(
                u64::from(u32::MAX) * DISK_PIECE_BYTES
                    ..u64::from(u32::MAX) * DISK_PIECE_BYTES + DISK_PIECE_BYTES
            )
        );
    }
}
