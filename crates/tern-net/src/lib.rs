//! Host networking of tern's VMs: what a VM's network card needs on the host it runs on.
//! It owns the tap devices the agent creates for QEMU ([`tap`]) and each virtual
//! network's bridge (`tern-NETWORK`, [`bridge`]) and its VXLAN port to the other hosts
//! ([`vxlan`]), made and changed through netlink.

pub mod bridge;
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
}
