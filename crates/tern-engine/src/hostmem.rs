//! This host's memory as far as a guest with shared memory (`memory = "shared"`, a memfd)
//! is concerned: reading a page of shared memory allocates it (a shmem read fault fills
//! the page; anonymous memory reads as the zero page), so migrating such a guest fills all
//! of its RAM on the source (QEMU reads every page) and on the destination (QEMU checks
//! each zero page before it writes it). Both ends check the room before they start. Also
//! this host's total memory, which no incoming VM may exceed.

/// Host memory kept free beside a shared-memory guest's RAM filling up (MiB).
pub const ROOM_MARGIN_MIB: u64 = 256;

/// `MemAvailable` of /proc/meminfo, MiB.
pub fn available_mib() -> Option<u64> {
    meminfo_mib("MemAvailable:")
}

/// `MemTotal` of /proc/meminfo, MiB.
pub fn total_mib() -> Option<u64> {
    meminfo_mib("MemTotal:")
}

fn meminfo_mib(key: &str) -> Option<u64> {
    kib_field(&std::fs::read_to_string("/proc/meminfo").ok()?, key).map(|k| k >> 10)
}

/// The shared memory process `pid` holds resident (`RssShmem`), MiB.
pub fn shared_resident_mib(pid: u32) -> Option<u64> {
    kib_field(
        &std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?,
        "RssShmem:",
    )
    .map(|k| k >> 10)
}

/// `Err(MiB still to be filled)` when filling a `total_mib` guest that holds
/// `resident_mib` leaves less than [`ROOM_MARGIN_MIB`] of `available_mib`.
pub fn room_for(total_mib: u64, resident_mib: u64, available_mib: u64) -> Result<(), u64> {
    let need = total_mib.saturating_sub(resident_mib);
    if need + ROOM_MARGIN_MIB > available_mib {
        Err(need)
    } else {
        Ok(())
    }
}

/// `KEY   123 kB` in /proc's text as a number of KiB.
fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_memory_guest_moves_only_when_the_rest_of_its_ram_fits() {
        // 16 GiB guest holding 1 GiB: 15 GiB more to come
        assert_eq!(room_for(16384, 1024, 15000), Err(15360));
        assert_eq!(room_for(16384, 1024, 15360 + 256), Ok(()));
        // a guest that touched all of its memory needs nothing more
        assert_eq!(room_for(4096, 4100, 300), Ok(()));
        assert_eq!(
            kib_field(
                "MemTotal:  24000000 kB\nMemAvailable:   1234 kB\n",
                "MemAvailable:"
            ),
            Some(1234)
        );
        assert_eq!(kib_field("RssAnon: x kB\n", "RssShmem:"), None);
        assert!(available_mib().is_some_and(|m| m > 0));
        assert!(total_mib() >= available_mib());
        assert!(total_mib() >= available_mib());
    }
}
