//! ARP suppression on a network's bridge: the bridge answers an ARP request from one of
//! this host's ports for a remote card's address itself, instead of flooding it to every
//! peer. It needs, per remote card, a neighbour entry on the bridge (IP -> MAC) and a
//! static bridge entry placing the MAC behind the VXLAN port, and `neigh_suppress` on
//! that port (the kernel answers only for MACs behind a port that has it).

use std::net::Ipv4Addr;

use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use rtnetlink::packet_route::link::{InfoBridgePort, InfoPortData, InfoPortKind};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::LinkUnspec;

use crate::bridge::Netlink;
use crate::vxlan::mac_text;
use crate::NetError;

/// The neighbour entry `ip` -> `mac` on bridge `bridge` (`mac` empty: the key only).
fn neighbour(bridge: u32, ip: Ipv4Addr, mac: Option<[u8; 6]>) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.ifindex = bridge;
    m.header.state = NeighbourState::Permanent;
    m.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
    if let Some(mac) = mac {
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    }
    m
}

/// The bridge's own static entry: `mac` is behind port `port`.
fn pinned(port: u32, mac: [u8; 6]) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Bridge;
    m.header.ifindex = port;
    m.header.state = NeighbourState::Noarp;
    m.header.flags = NeighbourFlags::Controller;
    m.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    m
}

impl Netlink {
    /// Turns ARP suppression on for VXLAN port `vxlan` (on its bridge).
    pub async fn suppress_arp(&self, vxlan: u32) -> Result<(), NetError> {
        // (RTM_NEWLINK: the kernel takes a port's settings only from it, not from
        // RTM_SETLINK)
        self.handle()
            .link()
            .set_port(
                LinkUnspec::new_with_index(vxlan)
                    .set_port_kind(InfoPortKind::Bridge)
                    .set_port_data(InfoPortData::BridgePort(vec![
                        InfoBridgePort::NeighSupress(true),
                    ]))
                    .build(),
            )
            .execute()
            .await
            .map_err(|source| NetError::Netlink {
                what: "turn ARP suppression on for the VXLAN port".into(),
                source,
            })
    }

    /// The remote card `mac` has address `ip`: bridge `bridge` answers ARP for it, and
    /// knows `mac` behind VXLAN port `vxlan`.
    pub async fn point_ip(
        &self,
        bridge: u32,
        vxlan: u32,
        ip: Ipv4Addr,
        mac: [u8; 6],
    ) -> Result<(), NetError> {
        // never in place of an entry the bridge has (a local card's tap, its own
        // address): only made where there is none
        self.request(
            RouteNetlinkMessage::NewNeighbour(pinned(vxlan, mac)),
            NLM_F_CREATE | NLM_F_EXCL,
            &[-libc::EEXIST],
            || format!("place {} behind the VXLAN port", mac_text(mac)),
        )
        .await?;
        self.request(
            RouteNetlinkMessage::NewNeighbour(neighbour(bridge, ip, Some(mac))),
            NLM_F_CREATE | NLM_F_REPLACE,
            &[],
            || format!("answer ARP for {ip} with {}", mac_text(mac)),
        )
        .await
    }

    /// Removes every ARP answer of tern's from bridge `bridge` (its permanent neighbour
    /// entries) and every MAC pinned behind its VXLAN port `vxlan` (static entries on
    /// that port): an agent's start, when what its last run knew is over.
    pub async fn clear_arp_answers(&self, bridge: u32, vxlan: u32) -> Result<(), NetError> {
        use futures_util::TryStreamExt;
        let dump = |family| {
            self.handle()
                .neighbours()
                .get()
                .set_address_family(family)
                .execute()
        };
        let list = |what: &'static str| {
            move |source| NetError::Netlink {
                what: format!("list {what}"),
                source,
            }
        };
        let mut gone: Vec<NeighbourMessage> = Vec::new();
        let mut n = dump(AddressFamily::Inet);
        while let Some(m) = n
            .try_next()
            .await
            .map_err(list("the bridge's neighbours"))?
        {
            if m.header.ifindex == bridge && m.header.state == NeighbourState::Permanent {
                gone.push(m);
            }
        }
        let mut f = dump(AddressFamily::Bridge);
        while let Some(m) = f
            .try_next()
            .await
            .map_err(list("the bridge's forwarding"))?
        {
            // (a dump shows the bridge's own entries without NTF_MASTER: static ones on
            // the port that are not the port's own, NTF_SELF)
            if m.header.ifindex == vxlan
                && m.header.state == NeighbourState::Noarp
                && !m.header.flags.contains(NeighbourFlags::Own)
            {
                gone.push(m);
            }
        }
        for mut m in gone {
            if m.header.family == AddressFamily::Bridge {
                m.header.flags = NeighbourFlags::Controller;
            }
            m.attributes.retain(|a| {
                matches!(
                    a,
                    NeighbourAttribute::Destination(_) | NeighbourAttribute::LinkLayerAddress(_)
                )
            });
            self.request(
                RouteNetlinkMessage::DelNeighbour(m),
                0,
                &[-libc::ENOENT],
                || "remove an ARP answer left by the agent's last run".into(),
            )
            .await?;
        }
        Ok(())
    }

    /// Bridge `bridge` no longer answers ARP for `ip` (none there is fine).
    pub async fn forget_ip(&self, bridge: u32, ip: Ipv4Addr) -> Result<(), NetError> {
        self.request(
            RouteNetlinkMessage::DelNeighbour(neighbour(bridge, ip, None)),
            0,
            &[-libc::ENOENT],
            || format!("stop answering ARP for {ip}"),
        )
        .await
    }

    /// The bridge no longer keeps `mac` behind VXLAN port `vxlan` (its card is here now;
    /// none there is fine).
    pub async fn unpin_mac(&self, vxlan: u32, mac: [u8; 6]) -> Result<(), NetError> {
        self.request(
            RouteNetlinkMessage::DelNeighbour(pinned(vxlan, mac)),
            0,
            &[-libc::ENOENT],
            || format!("take {} from behind the VXLAN port", mac_text(mac)),
        )
        .await
    }
}
