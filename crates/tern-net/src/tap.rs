//! Tap devices: the agent (root) creates a VM card's tap and hands QEMU its descriptor, so
//! QEMU, which runs unprivileged, never opens `/dev/net/tun` itself. A tap is not
//! persistent: it goes away when its last descriptor closes (the QEMU's, once the VM
//! stops or left), so nothing is left to clean up. A same-host upgrade gives the new
//! QEMU new taps: two QEMUs sharing one tap would share its header size and offloads,
//! which the new one resets while the old one still runs the guest.

#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::NetError;

/// The kernel numbers tern's taps `terntap0`, `terntap1`, ... (the first free number).
pub const TAP_PATTERN: &str = "terntap%d";

/// A tap device this process holds open.
#[derive(Debug)]
pub struct Tap {
    pub fd: OwnedFd,
    /// Its interface name, as the kernel gave it.
    pub name: String,
}

/// Creates a tap (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, as QEMU's own `-netdev tap` opens
/// one), named from [`TAP_PATTERN`].
pub fn create() -> Result<Tap, NetError> {
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|source| NetError::Io {
            what: "open /dev/net/tun (the agent runs as root; is the tun module loaded?)".into(),
            source,
        })?;
    let fd: OwnedFd = tun.into();
    let mut req = ifreq_named(TAP_PATTERN);
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF copies `sizeof(struct ifreq)` (40 bytes, the size of
    // `libc::ifreq`) from the pointer and writes the chosen name back into the same
    // struct; `req` is a valid, initialised `ifreq` that lives across the call. The
    // descriptor is open.
    let rc = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNSETIFF,
            &mut req as *mut libc::ifreq,
        )
    };
    if rc != 0 {
        return Err(NetError::Io {
            what: "create a tap device (TUNSETIFF)".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    let name = name_of(&req);
    Ok(Tap { fd, name })
}

/// The name of the tap behind descriptor `fd` of process `pid`, as its `fdinfo` says
/// (`iff:`); None if that is not a tap or cannot be read.
pub fn name_in(pid: u32, fd: RawFd) -> Option<String> {
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("iff:"))
        .map(|n| n.trim().to_string())
}

/// The interface index of `name` in this network namespace, if it exists.
pub fn index_of(name: &str) -> Option<u32> {
    std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn ifreq_named(name: &str) -> libc::ifreq {
    // SAFETY: `ifreq` is a name and a union of integers, sockaddrs, an `ifmap` and a raw
    // pointer: all zero is a valid value of each (the pointer null).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *d = s as libc::c_char;
    }
    req
}

fn name_of(req: &libc::ifreq) -> String {
    req.ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8 as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_names_are_cut_at_the_kernel_limit_and_read_back() {
        let r = ifreq_named("terntap%d");
        assert_eq!(name_of(&r), "terntap%d");
        let long = ifreq_named("a-name-longer-than-sixteen");
        assert_eq!(name_of(&long).len(), libc::IFNAMSIZ - 1);
    }
}
