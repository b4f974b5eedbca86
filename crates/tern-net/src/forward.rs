//! Frames in flight for a card that left this host: sent on to the host it went to.
//! During a switchover other hosts still forward the card's frames here until they hear
//! where it went; the bridge would drop them (it never sends a frame back out of the port
//! it came in by). One tc filter per departed card on the ingress of the network's VXLAN
//! port matches the card's MAC and redirects the frame to the port's egress, where the
//! port's own forwarding entry for the MAC (written first) names the new VTEP.

use std::net::Ipv4Addr;

use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use rtnetlink::packet_route::tc::{
    TcAction, TcActionAttribute, TcActionGeneric, TcActionMirror, TcActionMirrorOption,
    TcActionOption, TcActionType, TcAttribute, TcFilterU32, TcFilterU32Option, TcHandle, TcMessage,
    TcMirror, TcMirrorActionType, TcOption, TcU32Key, TcU32Selector, TcU32SelectorFlags,
};
use rtnetlink::packet_route::RouteNetlinkMessage;

use crate::bridge::Netlink;
use crate::vxlan::mac_text;
use crate::NetError;

/// ETH_P_ALL: the filter sees every frame.
const ALL_PROTOCOLS: u16 = 0x0003;

/// The ingress qdisc's handle (`ffff:`), the filters' parent.
fn ingress() -> TcHandle {
    TcHandle {
        major: 0xffff,
        minor: TcHandle::MIN_INGRESS,
    }
}

/// The u32 keys that match destination MAC `mac` (the frame's first 6 bytes: at ingress
/// u32 offsets count from the network header, 14 bytes further).
fn dst_mac_keys(mac: [u8; 6]) -> Vec<TcU32Key> {
    let key = |mask: u32, val: [u8; 4], off: i32| {
        let mut k = TcU32Key::default();
        k.mask = mask;
        k.val = u32::from_be_bytes(val);
        k.off = off;
        k
    };
    vec![
        key(0xffff_ffff, [mac[0], mac[1], mac[2], mac[3]], -14),
        key(0xffff_0000, [mac[4], mac[5], 0, 0], -10),
    ]
}

/// The ingress qdisc (`ffff:`) of link `index`.
fn ingress_qdisc(index: u32) -> TcMessage {
    let mut q = TcMessage::with_index(index as i32);
    q.header.parent = TcHandle::INGRESS;
    q.header.handle = TcHandle {
        major: 0xffff,
        minor: 0,
    };
    q.attributes = vec![TcAttribute::Kind("ingress".into())];
    q
}

/// Filter `pref` on `port`'s ingress: frames to `mac` go out of `port` again.
fn redirect_filter(port: u32, pref: u16, mac: [u8; 6]) -> TcMessage {
    let mut m = TcMessage::with_index(port as i32);
    m.header.parent = ingress();
    m.header.info = u32::from(TcHandle {
        major: pref,
        minor: ALL_PROTOCOLS.to_be(),
    });
    let keys = dst_mac_keys(mac);
    let mut sel = TcU32Selector::default();
    sel.flags = TcU32SelectorFlags::Terminal;
    sel.nkeys = keys.len() as u8;
    sel.keys = keys;
    let mut mirror = TcMirror::default();
    mirror.generic = TcActionGeneric::default();
    mirror.generic.action = TcActionType::Stolen;
    mirror.eaction = TcMirrorActionType::EgressRedir;
    mirror.ifindex = port;
    let mut action = TcAction::default();
    action.attributes = vec![
        TcActionAttribute::Kind(TcActionMirror::KIND.to_string()),
        TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
            mirror,
        ))]),
    ];
    m.attributes = vec![
        TcAttribute::Kind(TcFilterU32::KIND.to_string()),
        TcAttribute::Options(vec![
            TcOption::U32(TcFilterU32Option::Selector(sel)),
            TcOption::U32(TcFilterU32Option::Action(vec![action])),
        ]),
    ];
    m
}

impl Netlink {
    /// Frames that reach VXLAN port `vxlan` for `mac` go on to VTEP `to`: the port's own
    /// entry for `mac` names `to`, and filter `pref` (unique per departed card on this
    /// port) sends them back out.
    pub async fn forward_mac(
        &self,
        vxlan: u32,
        mac: [u8; 6],
        to: Ipv4Addr,
        pref: u16,
    ) -> Result<(), NetError> {
        self.point_mac(vxlan, mac, to).await?;
        // the port's ingress qdisc (one there already is fine)
        self.request(
            RouteNetlinkMessage::NewQueueDiscipline(ingress_qdisc(vxlan)),
            NLM_F_CREATE | NLM_F_EXCL,
            &[-libc::EEXIST],
            || "add the VXLAN port's ingress qdisc".into(),
        )
        .await?;
        self.request(
            RouteNetlinkMessage::NewTrafficFilter(redirect_filter(vxlan, pref, mac)),
            NLM_F_CREATE | NLM_F_EXCL,
            &[],
            || format!("forward {} to VTEP {to}", mac_text(mac)),
        )
        .await
    }

    /// Removes every forwarding filter from VXLAN port `vxlan` (its ingress qdisc, which
    /// only they use); none there is fine.
    pub async fn clear_forwards(&self, vxlan: u32) -> Result<(), NetError> {
        self.request(
            RouteNetlinkMessage::DelQueueDiscipline(ingress_qdisc(vxlan)),
            0,
            &[-libc::ENOENT, -libc::EINVAL],
            || "remove the VXLAN port's ingress qdisc".into(),
        )
        .await
    }

    /// Removes filter `pref` from VXLAN port `vxlan`'s ingress; none there is fine.
    pub async fn unforward(&self, vxlan: u32, pref: u16) -> Result<(), NetError> {
        let mut m = TcMessage::with_index(vxlan as i32);
        m.header.parent = ingress();
        m.header.info = u32::from(TcHandle {
            major: pref,
            minor: ALL_PROTOCOLS.to_be(),
        });
        self.request(
            RouteNetlinkMessage::DelTrafficFilter(m),
            0,
            &[-libc::ENOENT, -libc::EINVAL],
            || format!("remove forwarding filter {pref}"),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_keys_match_the_destination_mac_at_the_frames_start() {
        let k = dst_mac_keys([0x52, 0x54, 0x00, 0xab, 0xcd, 0xef]);
        assert_eq!(k[0].val.to_be_bytes(), [0x52, 0x54, 0x00, 0xab]);
        assert_eq!((k[0].off, k[0].mask), (-14, 0xffff_ffff));
        assert_eq!(k[1].val.to_be_bytes(), [0xcd, 0xef, 0, 0]);
        assert_eq!((k[1].off, k[1].mask), (-10, 0xffff_0000));
    }
}
