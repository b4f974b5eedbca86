//! The bridge of a virtual network on this host, `tern-NETWORK`: the agent creates it the
//! first time a VM card on that network needs it (and leaves it: other VMs, the host's own
//! address or, later, the network's VXLAN port may be on it), and puts each card's tap on
//! it. All through netlink (rtnetlink), never by running `ip`.

use futures_util::TryStreamExt;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::{Handle, LinkBridge, LinkUnspec};

use crate::NetError;

/// The bridge of virtual network `network` (`tern-blue` for `blue`).
pub fn bridge_name(network: &str) -> String {
    format!("tern-{network}")
}

/// A netlink connection to this network namespace's links; closed when dropped.
pub struct Netlink {
    handle: Handle,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn netlink(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Netlink { what, source }
}

/// A link found by name: its index and whether it is a bridge.
struct Found {
    index: u32,
    bridge: bool,
}

impl Netlink {
    /// Opens the connection (inside a tokio runtime).
    pub fn open() -> Result<Netlink, NetError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|source| NetError::Io {
            what: "open a netlink socket".into(),
            source,
        })?;
        let task = tokio::spawn(conn);
        Ok(Netlink { handle, task })
    }

    pub(crate) fn handle(&self) -> &Handle {
        &self.handle
    }

    /// The index of interface `name`, if it exists.
    pub(crate) async fn index(&self, name: &str) -> Result<Option<u32>, NetError> {
        Ok(self.find(name).await?.map(|f| f.index))
    }

    /// Interface `name`'s description, if it exists.
    pub(crate) async fn link(&self, name: &str) -> Result<Option<LinkMessage>, NetError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(m) => Ok(m),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(netlink(format!("look up interface {name}"))(e)),
        }
    }

    async fn find(&self, name: &str) -> Result<Option<Found>, NetError> {
        Ok(self.link(name).await?.map(|m| Found {
            index: m.header.index,
            bridge: is_bridge(&m),
        }))
    }

    /// The index of `network`'s bridge, created (and up) if it is not there yet.
    pub async fn ensure_bridge(&self, network: &str) -> Result<u32, NetError> {
        let name = bridge_name(network);
        if let Some(f) = self.find(&name).await? {
            if !f.bridge {
                return Err(NetError::NotABridge(name));
            }
            if let Err(e) = self.fix_address(f.index, &name).await {
                // (its ARP answers may be flushed when a port comes or goes; the
                // agents write them again every minute)
                tracing::warn!("{e}");
            }
            return Ok(f.index);
        }
        // made down, without IPv6, then up: the host takes no address on it (an
        // IPv6 link-local one would let guests reach the host's services, and accept
        // router advertisements from them); an operator who wants one adds it
        let made = self
            .handle
            .link()
            .add(LinkBridge::new(&name).address(own_mac(network)).build())
            .execute()
            .await;
        if made.is_ok() {
            host_only_ipv4(&name)?;
            if let Some(f) = self.find(&name).await? {
                self.up(f.index, &name).await?;
            }
        }
        match (made, self.find(&name).await?) {
            // (or made at the same time by another VM's start)
            (_, Some(f)) if f.bridge => Ok(f.index),
            (_, Some(_)) => Err(NetError::NotABridge(name)),
            (Err(e), None) => Err(netlink(format!("create bridge {name}"))(e)),
            (Ok(()), None) => Err(NetError::Io {
                what: format!("find bridge {name} after creating it"),
                source: std::io::ErrorKind::NotFound.into(),
            }),
        }
    }

    /// The index of `network`'s bridge here, if it has one.
    pub async fn bridge_index(&self, network: &str) -> Result<Option<u32>, NetError> {
        self.index(&bridge_name(network)).await
    }

    /// Gives bridge `index` (`name`) its own address for good, if it still follows its
    /// ports' (a bridge made before tern set one): the address it has now.
    async fn fix_address(&self, index: u32, name: &str) -> Result<(), NetError> {
        let sys = |f: &str| std::fs::read_to_string(format!("/sys/class/net/{name}/{f}"));
        // 3: NET_ADDR_SET (sysfs unreadable: nothing to go by, left alone)
        let (Ok(kind), Ok(addr)) = (sys("addr_assign_type"), sys("address")) else {
            return Ok(());
        };
        if kind.trim() == "3" {
            return Ok(());
        }
        let mac: Vec<u8> = addr
            .trim()
            .split(':')
            .filter_map(|x| u8::from_str_radix(x, 16).ok())
            .collect();
        if mac.len() != 6 {
            return Ok(());
        }
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).address(mac).build())
            .execute()
            .await
            .map_err(netlink(format!("give bridge {name} an address of its own")))
    }

    /// Whether `network`'s bridge exists here.
    pub async fn has_bridge(&self, network: &str) -> Result<bool, NetError> {
        Ok(self
            .find(&bridge_name(network))
            .await?
            .is_some_and(|f| f.bridge))
    }

    /// Deletes the interface with index `index` if it is still there (an index is not
    /// given to another interface, unlike a name).
    pub async fn delete(&self, index: u32) -> Result<(), NetError> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(()),
            Err(e) => Err(netlink(format!("delete interface {index}"))(e)),
        }
    }

    async fn up(&self, index: u32, name: &str) -> Result<(), NetError> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(netlink(format!("set {name} up")))
    }

    /// Puts interface `port` on the bridge with index `bridge` and sets it up (without
    /// IPv6 of its own, as the bridge).
    pub async fn attach(&self, port: &str, bridge: u32) -> Result<(), NetError> {
        let Some(f) = self.find(port).await? else {
            return Err(NetError::Io {
                what: format!("find interface {port}"),
                source: std::io::ErrorKind::NotFound.into(),
            });
        };
        host_only_ipv4(port)?;
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(f.index)
                    .controller(bridge)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(netlink(format!("put {port} on its bridge")))
    }
}

/// A bridge's own address, set when it is made so that it never follows its ports': a
/// bridge whose address changes flushes its neighbour entries, and with them the ARP
/// answers for remote cards (crate::suppress). Locally administered, from the network's
/// name and this moment.
fn own_mac(network: &str) -> Vec<u8> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    for b in network
        .bytes()
        .chain(now.to_le_bytes())
        .chain(std::process::id().to_le_bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let b = h.to_le_bytes();
    vec![0x02, b[0], b[1], b[2], b[3], b[4]]
}

/// No IPv6 on interface `name` (its sysctls: `disable_ipv6`, and `accept_ra` off should
/// an operator turn IPv6 on again).
pub(crate) fn host_only_ipv4(name: &str) -> Result<(), NetError> {
    for (key, value) in [("accept_ra", "0"), ("disable_ipv6", "1")] {
        let path = format!("/proc/sys/net/ipv6/conf/{name}/{key}");
        match std::fs::write(&path, value) {
            Ok(()) => {}
            // a kernel without IPv6 has nothing to turn off
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(NetError::Io {
                    what: format!("write {path}"),
                    source,
                })
            }
        }
    }
    Ok(())
}

fn is_bridge(m: &LinkMessage) -> bool {
    m.attributes.iter().any(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos
            .iter()
            .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Bridge))),
        _ => false,
    })
}
