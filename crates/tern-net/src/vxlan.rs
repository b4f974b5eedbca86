//! A virtual network across hosts: each host's bridge `tern-NETWORK` gets a VXLAN port
//! `tvx-NETWORK` (VNI from the network's name, UDP 4789, this host's VTEP address), and
//! frames for every address it does not know yet (broadcast, unknown unicast, multicast)
//! go to every peer VTEP (an all-zeros forwarding entry per peer, "head-end
//! replication"). Where a MAC lives comes from one of two places:
//! - programmed (the default): the agents tell each other where their VMs' cards are, and
//!   each host writes a static entry per remote MAC ([`Netlink::point_mac`]); the VXLAN
//!   port learns nothing from the frames it receives, so a forged frame cannot send a
//!   remote VM's traffic to another host (the bridge still learns which of its own ports
//!   a MAC is behind);
//! - learned (`learning`): each VTEP learns from the frames it receives, so a VM that
//!   moved is found again as soon as it speaks (the RARP announce after its switchover).
//!
//! Hosts may sit in different IP subnets: VXLAN is UDP over the routed underlay.

use std::net::{IpAddr, Ipv4Addr};

use futures_util::{StreamExt, TryStreamExt};
use rtnetlink::packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REPLACE,
    NLM_F_REQUEST,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{LinkUnspec, LinkVxlan};

use crate::bridge::Netlink;
use crate::NetError;

/// Most addresses a network's VXLAN port learns (its forwarding table's cap: a flood of
/// forged source addresses fills no more).
pub const MAX_LEARNED: u32 = 4096;

/// Whether link `m` is a VXLAN port with `vni` from `local` on [`VXLAN_PORT`], learning
/// or not as `learning` says.
fn is_vxlan_of(
    m: &rtnetlink::packet_route::link::LinkMessage,
    vni: u32,
    local: Ipv4Addr,
    learning: bool,
) -> bool {
    use rtnetlink::packet_route::link::{InfoData, InfoVxlan, LinkAttribute, LinkInfo};
    m.attributes.iter().any(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().any(|i| match i {
            LinkInfo::Data(InfoData::Vxlan(v)) => {
                v.contains(&InfoVxlan::Id(vni))
                    && v.contains(&InfoVxlan::Local(local))
                    && v.contains(&InfoVxlan::Port(VXLAN_PORT))
                    && v.contains(&InfoVxlan::Learning(learning))
            }
            _ => false,
        }),
        _ => false,
    })
}

/// The IANA VXLAN port.
pub const VXLAN_PORT: u16 = 4789;

/// The VXLAN port of `network`'s bridge.
pub fn vxlan_name(network: &str) -> String {
    format!("tvx-{network}")
}

/// `network`'s VNI: the same on every host without configuration (FNV-1a of the name, 24
/// bits, never 0).
pub fn vni(network: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in network.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h & 0x00ff_ffff).max(1)
}

/// Refuses a list of networks (`--network`) in which two different names have the same
/// VNI: their VXLAN ports could not both be made, and their frames would mix between
/// hosts. A name given twice is one network.
pub fn check_vnis<S: AsRef<str>>(networks: &[S]) -> Result<(), NetError> {
    let mut seen: std::collections::HashMap<u32, &str> = std::collections::HashMap::new();
    for n in networks.iter().map(AsRef::as_ref) {
        match seen.insert(vni(n), n) {
            Some(first) if first != n => {
                return Err(NetError::VniClash {
                    first: first.to_string(),
                    second: n.to_string(),
                    vni: vni(n),
                })
            }
            _ => {}
        }
    }
    Ok(())
}

/// Whether link `m` is a VXLAN device that keeps the kernel from making this agent's
/// port with `vni` on [`VXLAN_PORT`]: the kernel refuses a second device with the same
/// VNI and UDP port, the same address family and the same receive flags (tern's ports
/// are IPv4 and set none of them), whatever their local addresses.
fn holds_vni(m: &rtnetlink::packet_route::link::LinkMessage, vni: u32) -> bool {
    use rtnetlink::packet_route::link::{InfoData, InfoVxlan, LinkAttribute, LinkInfo};
    m.attributes.iter().any(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().any(|i| match i {
            LinkInfo::Data(InfoData::Vxlan(v)) => {
                v.contains(&InfoVxlan::Id(vni))
                    && v.contains(&InfoVxlan::Port(VXLAN_PORT))
                    && !v.iter().any(|x| {
                        matches!(
                            x,
                            InfoVxlan::Local6(_)
                                | InfoVxlan::Group6(_)
                                | InfoVxlan::Gbp
                                | InfoVxlan::Gpe
                                | InfoVxlan::RemCsumNoPartial
                                | InfoVxlan::CollectMetadata(true)
                                | InfoVxlan::RemCsumRX(true)
                                | InfoVxlan::UDPZeroCsumRX(true)
                        )
                    })
            }
            _ => false,
        }),
        _ => false,
    })
}

/// Link `m`'s name.
fn link_name(m: &rtnetlink::packet_route::link::LinkMessage) -> Option<&str> {
    use rtnetlink::packet_route::link::LinkAttribute;
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

/// Where this host's end of the overlay is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    /// This host's VTEP address (its address in the underlay).
    pub local: Ipv4Addr,
    /// The other hosts' VTEP addresses.
    pub peers: Vec<Ipv4Addr>,
    /// Learn where MACs live from received frames (flood and learn), instead of entries
    /// programmed by the agents.
    pub learning: bool,
}

impl Netlink {
    /// Gives the bridge with index `bridge` of `network` its VXLAN port (made if missing,
    /// learning as `overlay` says, up) and a flooding entry for each peer of `overlay`.
    pub async fn ensure_vxlan(
        &self,
        network: &str,
        bridge: u32,
        overlay: &Overlay,
    ) -> Result<(), NetError> {
        let name = vxlan_name(network);
        let old = self.link(&name).await?;
        if !old
            .as_ref()
            .is_some_and(|m| is_vxlan_of(m, vni(network), overlay.local, overlay.learning))
        {
            // another device with this VNI: the kernel would refuse the port (checked
            // before an old port is taken away)
            self.refuse_vni_in_use(network).await?;
        }
        if let Some(old) = old {
            // made for another VNI or VTEP address (or not VXLAN at all): made again
            if !is_vxlan_of(&old, vni(network), overlay.local, overlay.learning) {
                tracing::warn!(port = %name, "replacing a VXLAN port whose settings are not this agent's");
                self.delete(old.header.index).await?;
            }
        }
        if self.index(&name).await?.is_none() {
            let made = self
                .handle()
                .link()
                .add(if overlay.learning {
                    LinkVxlan::new(&name, vni(network))
                        .local(overlay.local)
                        .port(VXLAN_PORT)
                        .learning(true)
                        .limit(MAX_LEARNED)
                        .build()
                } else {
                    // (no kernel cap: static entries count against it, and the agent
                    // bounds what it writes)
                    LinkVxlan::new(&name, vni(network))
                        .local(overlay.local)
                        .port(VXLAN_PORT)
                        .learning(false)
                        .build()
                })
                .execute()
                .await;
            // (or made at the same time by another VM's start)
            if let (Err(e), None) = (made, self.index(&name).await?) {
                // (or another device with the VNI made since the check)
                self.refuse_vni_in_use(network).await?;
                return Err(NetError::Netlink {
                    what: format!("create VXLAN port {name} (VNI {})", vni(network)),
                    source: e,
                });
            }
        }
        let index = self.index(&name).await?.ok_or_else(|| NetError::Io {
            what: format!("find VXLAN port {name}"),
            source: std::io::ErrorKind::NotFound.into(),
        })?;
        crate::bridge::host_only_ipv4(&name)?;
        self.handle()
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .controller(bridge)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(|source| NetError::Netlink {
                what: format!("put {name} on its bridge"),
                source,
            })?;
        for peer in &overlay.peers {
            self.flood_to(index, *peer).await?;
        }
        if !overlay.learning {
            // the agents know the remote cards' addresses: the bridge answers ARP for
            // them (crate::suppress)
            self.suppress_arp(index).await?;
        }
        Ok(())
    }

    /// [`NetError::VniInUse`] if a VXLAN device other than `network`'s own port holds its
    /// VNI on [`VXLAN_PORT`] (one tern did not make, or another network's whose name has
    /// the same VNI). That device is left alone.
    async fn refuse_vni_in_use(&self, network: &str) -> Result<(), NetError> {
        let (own, vni) = (vxlan_name(network), vni(network));
        let mut links = self.handle().link().get().execute();
        while let Some(m) = links.try_next().await.map_err(|source| NetError::Netlink {
            what: format!("list interfaces (to find a VXLAN device with VNI {vni})"),
            source,
        })? {
            let Some(device) = link_name(&m) else {
                continue;
            };
            if device != own && holds_vni(&m, vni) {
                return Err(NetError::VniInUse {
                    network: network.to_string(),
                    vni,
                    port: VXLAN_PORT,
                    device: device.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Removes `network`'s VXLAN port, if any (an agent started without an overlay keeps
    /// its networks on this host).
    pub async fn remove_vxlan(&self, network: &str) -> Result<(), NetError> {
        match self.index(&vxlan_name(network)).await? {
            Some(i) => self.delete(i).await,
            None => Ok(()),
        }
    }

    /// `bridge fdb append 00:00:00:00:00:00 dev VXLAN dst PEER`: unknown and broadcast
    /// frames also go to `peer` (the kernel answers 0 for an entry already there).
    async fn flood_to(&self, vxlan: u32, peer: Ipv4Addr) -> Result<(), NetError> {
        let req = fdb_entry(vxlan, [0; 6], Some(peer));
        self.request(
            RouteNetlinkMessage::NewNeighbour(req),
            NLM_F_CREATE | NLM_F_APPEND,
            &[-libc::EEXIST],
            || format!("flood to VTEP {}", IpAddr::V4(peer)),
        )
        .await
    }

    /// The networks that have a VXLAN port of tern's here (`tvx-NETWORK`), configured or
    /// made for a VM.
    pub async fn overlay_networks(&self) -> Result<Vec<String>, NetError> {
        use rtnetlink::packet_route::link::LinkAttribute;
        let mut names = Vec::new();
        let mut links = self.handle().link().get().execute();
        while let Some(m) = links.try_next().await.map_err(|source| NetError::Netlink {
            what: "list interfaces (to find tern's VXLAN ports)".into(),
            source,
        })? {
            for a in &m.attributes {
                if let LinkAttribute::IfName(n) = a {
                    if let Some(network) = n.strip_prefix("tvx-") {
                        names.push(network.to_string());
                    }
                }
            }
        }
        Ok(names)
    }

    /// The index of `network`'s VXLAN port here, if it has one.
    pub async fn vxlan_index(&self, network: &str) -> Result<Option<u32>, NetError> {
        self.index(&vxlan_name(network)).await
    }

    /// `bridge fdb replace MAC dev VXLAN dst VTEP self permanent`: frames for `mac` go
    /// through VXLAN port `vxlan` ([`Netlink::vxlan_index`]) to the host at `vtep`.
    pub async fn point_mac(
        &self,
        vxlan: u32,
        mac: [u8; 6],
        vtep: Ipv4Addr,
    ) -> Result<(), NetError> {
        self.request(
            RouteNetlinkMessage::NewNeighbour(fdb_entry(vxlan, mac, Some(vtep))),
            NLM_F_CREATE | NLM_F_REPLACE,
            &[],
            || format!("point {} at VTEP {vtep}", mac_text(mac)),
        )
        .await
    }

    /// Removes VXLAN port `vxlan`'s own entry for `mac` (its VM runs here now); none there
    /// is fine.
    pub async fn forget_mac(&self, vxlan: u32, mac: [u8; 6]) -> Result<(), NetError> {
        self.request(
            RouteNetlinkMessage::DelNeighbour(fdb_entry(vxlan, mac, None)),
            0,
            &[-libc::ENOENT],
            || format!("forget {}", mac_text(mac)),
        )
        .await
    }

    /// Sends one netlink request (forwarding table, traffic control); `fine` lists error
    /// codes that mean done.
    pub(crate) async fn request(
        &self,
        msg: RouteNetlinkMessage,
        flags: u16,
        fine: &[i32],
        what: impl Fn() -> String,
    ) -> Result<(), NetError> {
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        let mut h = self.handle().clone();
        let mut answers = h.request(req).map_err(|source| NetError::Netlink {
            what: what(),
            source,
        })?;
        while let Some(a) = answers.next().await {
            if let NetlinkPayload::Error(e) = a.payload {
                if fine.contains(&e.raw_code()) {
                    return Ok(());
                }
                return Err(NetError::Netlink {
                    what: what(),
                    source: rtnetlink::Error::NetlinkError(e),
                });
            }
        }
        Ok(())
    }
}

/// A static entry of VXLAN port `vxlan`'s own forwarding table: `mac` (all zeros: flood)
/// reached through `vtep`.
fn fdb_entry(vxlan: u32, mac: [u8; 6], vtep: Option<Ipv4Addr>) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Bridge;
    m.header.ifindex = vxlan;
    m.header.state = NeighbourState::Permanent;
    m.header.flags = NeighbourFlags::Own;
    m.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    if let Some(v) = vtep {
        m.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(v)));
    }
    m
}

/// `52:54:00:12:34:56`
pub fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_networks_vni_is_fixed_by_its_name_and_never_zero() {
        assert_eq!(vni("blue"), vni("blue"));
        assert_ne!(vni("blue"), vni("red"));
        for n in ["a", "lab", "blue", "x-1", "0123456789"] {
            assert!((1..1 << 24).contains(&vni(n)), "{n}");
        }
        assert!(vxlan_name("0123456789").len() <= 15);
    }

    // Found by brute force over valid names (1-10 of [a-z0-9-]): FNV-1a's 24 bits meet.
    const CLASHING: [(&str, &str); 2] = [("lab", "s67tc"), ("blue", "olhde")];

    #[test]
    fn two_network_names_with_one_vni_are_refused_naming_both_and_the_vni() {
        for (a, b) in CLASHING {
            assert_eq!(vni(a), vni(b), "{a} {b}");
            let e = check_vnis(&["red", a, "green", b]).expect_err(b);
            let text = e.to_string();
            assert!(
                matches!(&e, NetError::VniClash { first, second, vni: v }
                    if first == a && second == b && *v == vni(a)),
                "{e:?}"
            );
            for part in [
                format!("{a:?}"),
                format!("{b:?}"),
                format!("VNI {}", vni(a)),
                "rename one".into(),
            ] {
                assert!(text.contains(&part), "{part} not in {text}");
            }
        }
        // a name given twice is one network; different VNIs are fine
        check_vnis(&["lab", "blue", "lab", "red"]).unwrap();
        check_vnis::<&str>(&[]).unwrap();
    }

    /// A VXLAN link as the kernel describes it: `name`, VNI `id`, then `more`.
    fn vxlan_link(
        name: &str,
        id: u32,
        more: Vec<rtnetlink::packet_route::link::InfoVxlan>,
    ) -> rtnetlink::packet_route::link::LinkMessage {
        use rtnetlink::packet_route::link::{
            InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage,
        };
        let mut data = vec![InfoVxlan::Id(id), InfoVxlan::Learning(true)];
        data.extend(more);
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.into()));
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Vxlan),
            LinkInfo::Data(InfoData::Vxlan(data)),
        ]));
        m
    }

    #[test]
    fn a_device_holds_the_vni_as_the_kernel_counts_it() {
        use rtnetlink::packet_route::link::InfoVxlan::*;
        let lab = vni("lab");
        let local = Local("192.0.2.1".parse().unwrap());
        // the same VNI and port: any local address, or none, takes it
        assert!(holds_vni(
            &vxlan_link("vx9", lab, vec![local.clone(), Port(4789)]),
            lab
        ));
        assert!(holds_vni(
            &vxlan_link("vx9", lab, vec![Port(4789), UDPZeroCsumRX(false)]),
            lab
        ));
        assert_eq!(link_name(&vxlan_link("vx9", lab, vec![])), Some("vx9"));
        // another VNI, another port, IPv6, or flags the kernel keeps apart: no clash
        for (why, more, id) in [
            ("other VNI", vec![local.clone(), Port(4789)], lab + 1),
            ("other port", vec![local.clone(), Port(8472)], lab),
            (
                "IPv6",
                vec![Local6("2001:db8::1".parse().unwrap()), Port(4789)],
                lab,
            ),
            ("GBP", vec![Port(4789), Gbp], lab),
            ("external", vec![Port(4789), CollectMetadata(true)], lab),
        ] {
            assert!(!holds_vni(&vxlan_link("vx9", id, more), lab), "{why}");
        }
        // not VXLAN at all
        let mut dummy = rtnetlink::packet_route::link::LinkMessage::default();
        dummy
            .attributes
            .push(rtnetlink::packet_route::link::LinkAttribute::IfName(
                "d0".into(),
            ));
        assert!(!holds_vni(&dummy, lab));
    }

    #[test]
    fn a_vni_in_use_says_which_device_and_what_to_do() {
        let e = NetError::VniInUse {
            network: "lab".into(),
            vni: vni("lab"),
            port: VXLAN_PORT,
            device: "vx9".into(),
        }
        .to_string();
        for part in [
            "\"lab\"",
            "vx9",
            &vni("lab").to_string(),
            "4789",
            "ip link del vx9",
            "rename network \"lab\"",
        ] {
            assert!(e.contains(part), "{part} not in {e}");
        }
        // another network's port: rename, not remove
        let e = NetError::VniInUse {
            network: "s67tc".into(),
            vni: vni("s67tc"),
            port: VXLAN_PORT,
            device: "tvx-lab".into(),
        }
        .to_string();
        assert!(
            e.contains("network \"lab\"'s port")
                && e.contains("rename one")
                && !e.contains("ip link del"),
            "{e}"
        );
    }
}
