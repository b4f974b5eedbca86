//! The overlay's control plane on this host, "the agents tell each other" (ADR 0007): it
//! owns where the other hosts' VMs' network cards live (the newest claim per card, as
//! their agents told it) and writes it into each network's VXLAN forwarding table (a
//! static entry per remote MAC; the port learns nothing). It tells every peer when a VM
//! starts running here (a start, an incoming switchover) and, at the agent's start,
//! everything that runs here; a told peer answers with everything that runs there.
//!
//! A peer is authenticated, not trusted: a claim names a network of this host, a unicast
//! MAC, one of this agent's configured VTEP peers (`--vxlan-peer`), never a card of a VM
//! that runs here and is not leaving; claims per network are bounded. A peer that is
//! compromised can still point another host's MAC at a peer VTEP, as a BGP EVPN peer
//! could; see docs/network.md.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tern_proto::Location;
use tern_qemu::spec::VmSpec;

use crate::Agent;

/// Where other hosts' cards live: (network, MAC) -> (VTEP, claim's seq).
pub(crate) type Remote = HashMap<(String, [u8; 6]), (Ipv4Addr, u64)>;

/// Now, in microseconds since the epoch (a claim's seq).
pub(crate) fn now_us() -> u64 {
    tern_engine::handle::unix_us(std::time::SystemTime::now())
}

/// Why a peer's claim is not taken (before anything on this host is looked at).
pub(crate) fn vet(e: &Location, overlay: &tern_net::vxlan::Overlay) -> Result<(), &'static str> {
    if !tern_qemu::spec::valid_network_name(&e.network) {
        return Err("not a network name");
    }
    if e.mac[0] & 1 == 1 || e.mac == [0; 6] {
        return Err("not a unicast MAC");
    }
    if e.vtep == overlay.local {
        return Err("it names this host's own VTEP");
    }
    if !overlay.peers.contains(&e.vtep) {
        return Err("its VTEP is not one of this agent's --vxlan-peer");
    }
    Ok(())
}

/// The locations of `spec`'s cards at `vtep` as of `seq`.
fn cards(spec: &VmSpec, vtep: Ipv4Addr, seq: u64) -> Vec<Location> {
    spec.nics
        .iter()
        .filter_map(|n| {
            Some(Location {
                network: n.network.clone(),
                mac: n.mac?.0,
                vtep,
                seq,
            })
        })
        .collect()
}

impl Agent {
    /// This host's overlay when the agents program it (None: no overlay, or learning).
    fn controlled_overlay(&self) -> Option<&tern_net::vxlan::Overlay> {
        self.config.overlay.as_ref().filter(|o| !o.learning)
    }

    /// Where the cards of the VMs running here live.
    pub(crate) fn local_locations(&self) -> Vec<Location> {
        let Some(o) = self.controlled_overlay() else {
            return Vec::new();
        };
        self.vms()
            .iter()
            .flat_map(|vm| cards(&vm.spec, o.local, vm.since_us))
            .collect()
    }

    /// `spec`'s cards run here from now: no remote entry is kept for them, and every peer
    /// is told (in the background).
    pub(crate) fn cards_here(self: &Arc<Self>, spec: &VmSpec) {
        let Some(o) = self.controlled_overlay() else {
            return;
        };
        let mine = cards(spec, o.local, now_us());
        if mine.is_empty() {
            return;
        }
        let agent = self.clone();
        tokio::spawn(async move {
            {
                let mut remote = agent.remote_cards.lock().await;
                if let Ok(nl) = tern_net::bridge::Netlink::open() {
                    for c in &mine {
                        remote.remove(&(c.network.clone(), c.mac));
                        if let Err(e) = nl.forget_mac(&c.network, c.mac).await {
                            tracing::warn!("{}", tern_engine::error_chain(&e));
                        }
                    }
                }
            }
            agent.tell_peers(mine).await;
        });
    }

    /// Tells every peer `entries` at once, and takes what each answers.
    pub(crate) async fn tell_peers(self: &Arc<Self>, entries: Vec<Location>) {
        let Some(o) = self.controlled_overlay() else {
            return;
        };
        if tern_engine::overlay::silent(&self.engine) {
            tracing::warn!("fault injection: not telling the peers where cards live");
            return;
        }
        let port = self.config.peer_listen.port();
        let tells = o.peers.iter().map(|peer| {
            let to = format!("{peer}:{port}");
            let entries = entries.clone();
            let agent = self.clone();
            async move {
                // a peer that is down or unreachable is tried again a few times (1, 4, 16
                // s later); past that it learns at the next exchange either side opens
                for (attempt, wait) in [0u64, 1, 4, 16].into_iter().enumerate() {
                    tokio::time::sleep(std::time::Duration::from_secs(wait)).await;
                    match tern_engine::overlay::tell(&agent.engine, &to, entries.clone()).await {
                        Ok(theirs) => return agent.take_locations(&to, theirs).await,
                        Err(e) => tracing::warn!(
                            peer = %to,
                            attempt = attempt + 1,
                            "could not tell a peer where cards live (it forwards to where it knew them meanwhile): {}",
                            tern_engine::error_chain(&e)
                        ),
                    }
                }
            }
        });
        futures_util::future::join_all(tells).await;
    }

    /// Takes what peer `peer` told: each claim that passes [`vet`], is newer than what
    /// this host knows and is not for a card running here goes into the forwarding table.
    pub(crate) async fn take_locations(&self, peer: &str, entries: Vec<Location>) {
        let Some(o) = self.controlled_overlay() else {
            return;
        };
        let nl = match tern_net::bridge::Netlink::open() {
            Ok(nl) => nl,
            Err(e) => {
                tracing::warn!("{}", tern_engine::error_chain(&e));
                return;
            }
        };
        let mut remote = self.remote_cards.lock().await;
        for e in entries {
            let mac = tern_net::vxlan::mac_text(e.mac);
            if let Err(why) = vet(&e, o) {
                tracing::warn!(%peer, network = %e.network, %mac, vtep = %e.vtep, "ignored a card's location: {why}");
                continue;
            }
            if let Some(vm) = self.vms().into_iter().find(|vm| {
                !vm.migrating.load(Ordering::SeqCst)
                    && vm
                        .spec
                        .nics
                        .iter()
                        .any(|n| n.network == e.network && n.mac.map(|m| m.0) == Some(e.mac))
            }) {
                tracing::warn!(%peer, network = %e.network, %mac, vm = %vm.spec.name, "ignored a peer's claim on a card of a VM that runs here");
                continue;
            }
            let key = (e.network.clone(), e.mac);
            match remote.get(&key) {
                Some(&(vtep, seq)) if seq > e.seq || (seq == e.seq && vtep == e.vtep) => continue,
                None if remote.keys().filter(|(n, _)| *n == e.network).count()
                    >= tern_proto::limits::MAX_LOCATIONS =>
                {
                    tracing::warn!(%peer, network = %e.network, "ignored a card's location: {} remote cards known on this network already", tern_proto::limits::MAX_LOCATIONS);
                    continue;
                }
                _ => {}
            }
            match nl.point_mac(&e.network, e.mac, e.vtep).await {
                Ok(true) => {
                    tracing::info!(%peer, network = %e.network, %mac, vtep = %e.vtep, "a card lives there now");
                    remote.insert(key, (e.vtep, e.seq));
                }
                // a network this host does not serve
                Ok(false) => {}
                Err(err) => tracing::warn!("{}", tern_engine::error_chain(&err)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_names_a_served_kind_of_network_a_unicast_mac_and_a_configured_peer() {
        let o = tern_net::vxlan::Overlay {
            local: Ipv4Addr::new(198, 18, 1, 1),
            peers: vec![Ipv4Addr::new(198, 18, 2, 1)],
            learning: false,
        };
        let good = Location {
            network: "lab".into(),
            mac: [0x52, 0x54, 0, 1, 2, 3],
            vtep: Ipv4Addr::new(198, 18, 2, 1),
            seq: 1,
        };
        assert_eq!(vet(&good, &o), Ok(()));
        let bad = |f: &dyn Fn(&mut Location)| {
            let mut e = good.clone();
            f(&mut e);
            vet(&e, &o).unwrap_err()
        };
        assert!(bad(&|e| e.network = "Lab/../x".into()).contains("network"));
        assert!(bad(&|e| e.mac = [1, 0, 0x5e, 0, 0, 1]).contains("unicast"));
        assert!(bad(&|e| e.mac = [0; 6]).contains("unicast"));
        assert!(bad(&|e| e.vtep = o.local).contains("own VTEP"));
        assert!(bad(&|e| e.vtep = Ipv4Addr::new(8, 8, 8, 8)).contains("--vxlan-peer"));
    }
}
