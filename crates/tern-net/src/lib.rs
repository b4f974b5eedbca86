//! Host networking of tern's VMs: what a VM's network card needs on the host it runs on.
//! It owns the tap devices the agent creates for QEMU ([`tap`]) and each virtual
//! network's bridge (`tern-NETWORK`, [`bridge`]) and its VXLAN port to the other hosts
//! ([`vxlan`]), with what it forwards on for a card that just left ([`forward`]) and the
//! ARP answers for remote cards ([`suppress`]), made and changed through netlink.

pub mod bridge;
pub mod forward;
pub mod suppress;
pub mod tap;
pub mod vxlan;

/// Why a host-networking step failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("netlink: cannot {what}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{0} exists but is not a bridge: tern uses tern-NETWORK for the network's bridge; rename or remove that interface")]
    NotABridge(String),
    /// Two networks this host serves have the same VNI ([`vxlan::vni`] of their names).
    #[error("networks {first:?} and {second:?} have the same VNI {vni} (a network's VNI is a hash of its name), so the overlay cannot keep them apart: rename one of them, on every host")]
    VniClash {
        first: String,
        second: String,
        vni: u32,
    },
    /// Another VXLAN device here already has `network`'s VNI on the same UDP port, so
    /// the kernel refuses `network`'s port.
    #[error("network {network:?} needs VNI {vni} on UDP port {port} for its VXLAN port {}, but VXLAN device {device} on this host already uses that VNI and port (the kernel allows one device per VNI and port): {}", vxlan::vxlan_name(network), vni_in_use_remedy(device, network))]
    VniInUse {
        network: String,
        vni: u32,
        port: u16,
        /// The device that has the VNI.
        device: String,
    },
}

/// What to do when `device` holds the VNI `network` needs.
fn vni_in_use_remedy(device: &str, network: &str) -> String {
    match device.strip_prefix("tvx-") {
        // another network's port, made by tern: two names hash to one VNI
        Some(other) => format!(
            "it is network {other:?}'s port, and {other:?} and {network:?} have the same VNI (a hash of the name): rename one of the two networks, on every host"
        ),
        None => format!(
            "remove {device} if nothing needs it (ip link del {device}), or rename network {network:?}, on every host (its VNI is a hash of its name)"
        ),
    }
}
