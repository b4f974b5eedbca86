//! The overlay's control plane on this host, "the agents tell each other" (ADR 0007): it
//! owns where the other hosts' VMs' network cards live (the newest claim per card, as
//! their agents told it) and writes it into each network's VXLAN forwarding table (a
//! static entry per remote MAC; the VXLAN port learns nothing). It tells every peer when
//! a VM starts running here (a start, an incoming switchover, a source VM running again
//! after a failed migration), and everything that runs here at the agent's start and
//! every minute; a told peer answers with everything that runs there.
//!
//! A peer is authenticated, not trusted. Only configured peers (`--vxlan-peer`) are
//! answered, and a peer's claims may name only its own VTEP (the address it connects
//! from, or the one dialled), a valid network name and a unicast MAC, with a seq not
//! ahead of this host's clock by more than [`CLOCK_SLACK_US`]; never a card of a VM that
//! runs here and is not leaving; at most `MAX_LOCATIONS` remote cards per network. A
//! compromised peer can still claim another host's card for itself, as a BGP EVPN peer
//! could; see docs/network.md.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tern_proto::limits::MAX_LOCATIONS;
use tern_proto::{CardAddress, Location};
use tern_qemu::spec::VmSpec;

use crate::Agent;

/// Where other hosts' cards live: (network, MAC) -> (VTEP, claim's seq).
pub(crate) type Remote = HashMap<(String, [u8; 6]), (Ipv4Addr, u64)>;

/// How far a claim's seq may be ahead of this host's clock (hosts' clocks differ a
/// little; a claim from far in the future would win over every real one).
pub const CLOCK_SLACK_US: u64 = 60_000_000;

/// How often every peer is told again what runs here (a peer that missed a claim, or
/// restarted, is repaired by then).
pub const RESYNC_EVERY: Duration = Duration::from_secs(60);

/// How long frames for a card that left this host go on to its new host: its peers hear
/// where it went within a few round trips (one that missed it is told again after 1, 4
/// and 16 s).
pub const FORWARD_FOR: Duration = Duration::from_secs(30);

/// The cards that left this host and whose frames still go on to their new host.
#[derive(Default)]
pub(crate) struct Departed {
    /// (network, MAC) -> (the forwarding filter's preference on the network's VXLAN
    /// port, the generation that took it).
    map: HashMap<(String, [u8; 6]), (u16, u64)>,
    /// The last preference given out (they go round, so one given back is not reused
    /// before its filter is deleted).
    next: u16,
    generation: u64,
}

/// The addresses other hosts told for their cards, both ways: a card's address, and the
/// cards that claim an address. This host answers ARP for an address only while exactly
/// one remote card claims it (a clash: nobody answers, requests flood as without
/// suppression).
#[derive(Default)]
pub(crate) struct RemoteIps {
    by_card: HashMap<(String, [u8; 6]), Ipv4Addr>,
    by_ip: HashMap<(String, Ipv4Addr), HashSet<[u8; 6]>>,
}

impl RemoteIps {
    /// Card `key` has `ip` now: the address it had before, if another.
    fn set(&mut self, key: (String, [u8; 6]), ip: Ipv4Addr) -> Option<Ipv4Addr> {
        let old = self.remove(&key).filter(|o| *o != ip);
        self.by_ip
            .entry((key.0.clone(), ip))
            .or_default()
            .insert(key.1);
        self.by_card.insert(key, ip);
        old
    }

    /// Card `key` has no address known here any more: the one it had.
    fn remove(&mut self, key: &(String, [u8; 6])) -> Option<Ipv4Addr> {
        let ip = self.by_card.remove(key)?;
        let k = (key.0.clone(), ip);
        if let Some(cards) = self.by_ip.get_mut(&k) {
            cards.remove(&key.1);
            if cards.is_empty() {
                self.by_ip.remove(&k);
            }
        }
        Some(ip)
    }

    /// The one card that claims `ip` on `network`, if exactly one does.
    fn owner(&self, network: &str, ip: Ipv4Addr) -> Option<[u8; 6]> {
        match self.by_ip.get(&(network.to_string(), ip)) {
            Some(cards) if cards.len() == 1 => cards.iter().next().copied(),
            _ => None,
        }
    }
}

/// What changed in [`RemoteIps`]: the addresses whose answer may change, and the cards
/// whose MAC may no longer be pinned behind the VXLAN port.
type AddressChanges = (HashSet<(String, Ipv4Addr)>, Vec<(String, [u8; 6])>);

/// Now, in microseconds since the epoch (a claim's seq).
pub(crate) fn now_us() -> u64 {
    tern_engine::handle::unix_us(std::time::SystemTime::now())
}

/// Why a claim from the peer at `from` is not taken (before anything on this host is
/// looked at).
pub(crate) fn vet(
    e: &Location,
    overlay: &tern_net::vxlan::Overlay,
    from: Ipv4Addr,
    now: u64,
) -> Result<(), &'static str> {
    if !tern_qemu::spec::valid_network_name(&e.network) {
        return Err("not a network name");
    }
    if e.mac[0] & 1 == 1 || e.mac == [0; 6] {
        return Err("not a unicast MAC");
    }
    if !overlay.peers.contains(&e.vtep) {
        return Err("its VTEP is not one of this agent's --vxlan-peer");
    }
    if e.vtep != from {
        return Err("a peer may claim cards only for its own VTEP");
    }
    if e.seq > now.saturating_add(CLOCK_SLACK_US) {
        return Err("its seq is ahead of this host's clock");
    }
    Ok(())
}

/// Whether a claim (`seq`, `vtep`) replaces the one known (the newest wins; equal ones
/// go to the higher VTEP address, so every host decides alike).
fn newer(claim: (u64, Ipv4Addr), known: Option<&(Ipv4Addr, u64)>) -> bool {
    match known {
        None => true,
        Some(&(vtep, seq)) => claim > (seq, vtep),
    }
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

/// The addresses of `spec`'s cards that have one.
fn addresses(spec: &VmSpec) -> Vec<CardAddress> {
    spec.nics
        .iter()
        .filter_map(|n| {
            Some(CardAddress {
                network: n.network.clone(),
                mac: n.mac?.0,
                ip: n.ip?,
            })
        })
        .collect()
}

impl Agent {
    /// This host's overlay when the agents program it (None: no overlay, or learning).
    fn controlled_overlay(&self) -> Option<&tern_net::vxlan::Overlay> {
        self.config.overlay.as_ref().filter(|o| !o.learning)
    }

    /// Where the cards of the VMs running here live (not those of VMs a migration owns:
    /// they may be leaving), at most `MAX_LOCATIONS`.
    pub(crate) fn local_locations(&self) -> Vec<Location> {
        let Some(o) = self.controlled_overlay() else {
            return Vec::new();
        };
        if tern_engine::overlay::silent(&self.engine) {
            return Vec::new();
        }
        let mut all: Vec<Location> = self
            .vms()
            .iter()
            .filter(|vm| !vm.migrating.load(Ordering::SeqCst))
            .flat_map(|vm| cards(&vm.spec, o.local, vm.since_us))
            .collect();
        if all.len() > MAX_LOCATIONS {
            tracing::warn!(
                "{} cards run here; peers are told of the first {MAX_LOCATIONS}",
                all.len()
            );
            all.truncate(MAX_LOCATIONS);
        }
        all
    }

    /// The addresses of the cards of the VMs here that have one.
    pub(crate) fn local_addresses(&self) -> Vec<CardAddress> {
        if self.controlled_overlay().is_none() || tern_engine::overlay::silent(&self.engine) {
            return Vec::new();
        }
        // (every VM's, leaving or not: a card's address does not change when it moves,
        // and an answer that left one out would drop it on the peers)
        let mut all: Vec<CardAddress> = self
            .vms()
            .iter()
            .flat_map(|vm| addresses(&vm.spec))
            .collect();
        all.truncate(MAX_LOCATIONS);
        all
    }

    /// `spec`'s cards run here from now: every peer is told (in the background), then no
    /// remote entry is kept here for them. Each claim is newer than any this host knows
    /// for the card (a destination whose clock is behind still wins).
    pub(crate) fn cards_here(self: &Arc<Self>, spec: &VmSpec) {
        let Some(o) = self.controlled_overlay() else {
            return;
        };
        let now = now_us();
        let mine: Vec<Location> = {
            let mut remote = self.remote_cards.lock();
            cards(spec, o.local, now)
                .into_iter()
                .map(|mut c| {
                    if let Some((_, seq)) = remote.remove(&(c.network.clone(), c.mac)) {
                        c.seq = c.seq.max(seq.saturating_add(1));
                    }
                    c
                })
                .collect()
        };
        if mine.is_empty() {
            return;
        }
        // (a source running again after a failed switchover forwarded them): no
        // forwarding of them starts from now
        let departed = self.take_departed(spec);
        let addrs = addresses(spec);
        let unaddressed = self.take_remote_addresses(spec);
        let agent = self.clone();
        tokio::spawn(async move {
            agent.unforward_taken(departed).await;
            let told = agent.tell_peers(mine.clone(), addrs);
            let forget = async {
                let Ok(nl) = tern_net::bridge::Netlink::open() else {
                    return;
                };
                agent.write_addresses("here", unaddressed).await;
                for c in &mine {
                    if let Ok(Some(vx)) = nl.vxlan_index(&c.network).await {
                        if let Err(e) = nl.forget_mac(vx, c.mac).await {
                            tracing::warn!("{}", tern_engine::error_chain(&e));
                        }
                    }
                }
            };
            tokio::join!(told, forget);
        });
    }

    /// `spec`'s VM stopped here for its switchover to the host at `to`: for
    /// [`FORWARD_FOR`], frames for its cards that still reach this host through the
    /// overlay (sent by a peer that has not heard yet) go on to `to`, where they wait for
    /// the guest. Only to an overlay peer. Stopped early when a card is plugged in here
    /// again or its VM runs here again ([`Agent::stop_forwarding`]), so two hosts never
    /// send a card's frames to each other. The cards are taken into [`Departed`] at once;
    /// the netlink work follows in order with every other forwarding change.
    pub(crate) fn cards_left(self: &Arc<Self>, spec: &VmSpec, to: IpAddr) {
        let Some(o) = self.controlled_overlay() else {
            return;
        };
        let to = match to {
            IpAddr::V4(v) if o.peers.contains(&v) => v,
            _ => {
                tracing::info!(vm = %spec.name, %to, "the destination is not an overlay peer: frames for the VM's cards are not forwarded there");
                return;
            }
        };
        let mut taken = Vec::new();
        {
            let mut d = self.departed.lock();
            for c in cards(spec, to, 0) {
                let key = (c.network, c.mac);
                if d.map.contains_key(&key) {
                    continue;
                }
                // the next free preference, never one just given back (its filter may
                // not be deleted yet)
                let used: HashSet<u16> = d.map.values().map(|v| v.0).collect();
                let Some(pref) = (1..=u16::MAX)
                    .map(|k| (d.next.wrapping_add(k) % u16::MAX) + 1)
                    .find(|p| !used.contains(p))
                else {
                    continue;
                };
                d.next = pref;
                d.generation += 1;
                let entry = (pref, d.generation);
                d.map.insert(key.clone(), entry);
                taken.push((key, entry));
            }
        }
        if taken.is_empty() {
            return;
        }
        let agent = self.clone();
        tokio::spawn(async move {
            let Ok(nl) = tern_net::bridge::Netlink::open() else {
                return;
            };
            {
                let _order = agent.forwarding.lock().await;
                for ((network, mac), entry) in &taken {
                    // (a card plugged in here meanwhile took it back: nothing to do)
                    if agent.departed.lock().map.get(&(network.clone(), *mac)) != Some(entry) {
                        continue;
                    }
                    let Ok(Some(vx)) = nl.vxlan_index(network).await else {
                        continue;
                    };
                    if let Err(e) = nl.forward_mac(vx, *mac, to, entry.0).await {
                        tracing::warn!("{}", tern_engine::error_chain(&e));
                    }
                }
            }
            tokio::time::sleep(tern_engine::overlay::forward_for(
                &agent.engine,
                FORWARD_FOR,
            ))
            .await;
            let _order = agent.forwarding.lock().await;
            for (key, entry) in taken {
                let ours = {
                    let mut d = agent.departed.lock();
                    let ours = d.map.get(&key) == Some(&entry);
                    if ours {
                        d.map.remove(&key);
                    }
                    ours
                };
                if ours {
                    if let Ok(Some(vx)) = nl.vxlan_index(&key.0).await {
                        if let Err(e) = nl.unforward(vx, entry.0).await {
                            tracing::warn!("{}", tern_engine::error_chain(&e));
                        }
                    }
                }
            }
        });
    }

    /// Takes `spec`'s cards out of [`Departed`] (at once: no forwarding of them starts
    /// after this) and removes their filters, in order with every other forwarding
    /// change. Done before a card's tap is made, and when its VM runs here again.
    pub(crate) fn take_departed(&self, spec: &VmSpec) -> Vec<(String, u16)> {
        let mut d = self.departed.lock();
        spec.nics
            .iter()
            .filter_map(|n| {
                let key = (n.network.clone(), n.mac?.0);
                d.map.remove(&key).map(|(pref, _)| (key.0, pref))
            })
            .collect()
    }

    /// Removes the filters of cards [`Agent::take_departed`] took.
    pub(crate) async fn unforward_taken(&self, gone: Vec<(String, u16)>) {
        if gone.is_empty() {
            return;
        }
        let Ok(nl) = tern_net::bridge::Netlink::open() else {
            return;
        };
        let _order = self.forwarding.lock().await;
        for (network, pref) in gone {
            if let Ok(Some(vx)) = nl.vxlan_index(&network).await {
                if let Err(e) = nl.unforward(vx, pref).await {
                    tracing::warn!("{}", tern_engine::error_chain(&e));
                }
            }
        }
    }

    /// Frames for `spec`'s cards are no longer sent away from here.
    pub(crate) async fn stop_forwarding(&self, spec: &VmSpec) {
        let gone = self.take_departed(spec);
        self.unforward_taken(gone).await;
    }

    /// Tells every peer `entries` at once, and takes what each answers.
    pub(crate) async fn tell_peers(
        self: &Arc<Self>,
        entries: Vec<Location>,
        addresses: Vec<CardAddress>,
    ) {
        let Some(o) = self.controlled_overlay() else {
            return;
        };
        if tern_engine::overlay::silent(&self.engine) {
            tracing::warn!("fault injection: not telling the peers where cards live");
            return;
        }
        let port = self.config.peer_listen.port();
        let tells = o.peers.iter().map(|&peer| {
            let to = format!("{peer}:{port}");
            let entries = entries.clone();
            let addresses = addresses.clone();
            let agent = self.clone();
            async move {
                // a peer that is down or unreachable is tried again a few times (1, 4, 16
                // s later); past that it learns at the next exchange
                for (attempt, wait) in [0u64, 1, 4, 16].into_iter().enumerate() {
                    tokio::time::sleep(Duration::from_secs(wait)).await;
                    match tern_engine::overlay::tell(
                        &agent.engine,
                        &to,
                        entries.clone(),
                        addresses.clone(),
                    )
                    .await
                    {
                        Ok(theirs) => {
                            agent.take_locations(&to, peer, theirs.locations).await;
                            // (an answer names every card the peer runs)
                            return agent
                                .take_addresses(&to, peer, theirs.addresses, true)
                                .await;
                        }
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

    /// Whether the agent at `from` is one of this host's overlay peers (only they are
    /// answered).
    pub(crate) fn overlay_peer(&self, from: IpAddr) -> Result<Ipv4Addr, String> {
        let Some(o) = self.controlled_overlay() else {
            return Err(format!(
                "{} does not program its overlay from its peers (no --vtep, or --overlay-control learn)",
                self.config.name
            ));
        };
        match from {
            IpAddr::V4(v) if o.peers.contains(&v) => Ok(v),
            _ => Err(format!(
                "{from} is not one of {}'s overlay peers (--vxlan-peer)",
                self.config.name
            )),
        }
    }

    /// Takes what the peer at `from` (`peer` in logs) told: each claim that passes
    /// [`vet`], is newer than what this host knows and is not for a card running here
    /// goes into the forwarding table.
    pub(crate) async fn take_locations(&self, peer: &str, from: Ipv4Addr, entries: Vec<Location>) {
        let Some(o) = self.controlled_overlay() else {
            return;
        };
        let now = now_us();
        let here: HashSet<(String, [u8; 6])> = self
            .vms()
            .iter()
            .filter(|vm| !vm.migrating.load(Ordering::SeqCst))
            .flat_map(|vm| cards(&vm.spec, o.local, 0))
            .map(|c| (c.network, c.mac))
            .collect();
        let (mut refused, mut taken) = (0usize, Vec::new());
        {
            let mut remote = self.remote_cards.lock();
            let mut counts: HashMap<String, usize> = HashMap::new();
            for (n, _) in remote.keys() {
                *counts.entry(n.clone()).or_default() += 1;
            }
            for e in entries {
                let key = (e.network.clone(), e.mac);
                let why = vet(&e, o, from, now).err().or_else(|| {
                    if here.contains(&key) {
                        Some("the card's VM runs here")
                    } else if !remote.contains_key(&key)
                        && counts.get(&e.network).copied().unwrap_or(0) >= MAX_LOCATIONS
                    {
                        Some("this network has as many remote cards as it may")
                    } else {
                        None
                    }
                });
                if let Some(why) = why {
                    refused += 1;
                    if refused <= 3 {
                        tracing::warn!(%peer, network = %e.network, mac = %tern_net::vxlan::mac_text(e.mac), vtep = %e.vtep, "ignored a card's location: {why}");
                    }
                    continue;
                }
                if !newer((e.seq, e.vtep), remote.get(&key)) {
                    continue;
                }
                if !remote.contains_key(&key) {
                    *counts.entry(e.network.clone()).or_default() += 1;
                }
                remote.insert(key.clone(), (e.vtep, e.seq));
                taken.push(key);
            }
        }
        if refused > 3 {
            tracing::warn!(%peer, "ignored {refused} card locations in all");
        }
        if !taken.is_empty() {
            self.write_locations(peer, taken).await;
        }
    }

    /// Takes the addresses the peer at `from` (`peer` in logs) told for its cards: each
    /// for a card whose location this host has from that peer and that is no card of a
    /// VM here (leaving or not), a valid card address that no card here has on that
    /// network. `full`: the peer's answer, naming every card it has, so its cards'
    /// addresses it no longer names are dropped. The bridge then answers ARP for each
    /// address this changed that exactly one remote card claims, and for no other
    /// ([`Agent::write_addresses`]).
    pub(crate) async fn take_addresses(
        &self,
        peer: &str,
        from: Ipv4Addr,
        entries: Vec<CardAddress>,
        full: bool,
    ) {
        if self.controlled_overlay().is_none() {
            return;
        }
        let mine: HashSet<(String, Ipv4Addr)> = self
            .vms()
            .iter()
            .flat_map(|vm| addresses(&vm.spec))
            .map(|a| (a.network, a.ip))
            .collect();
        let local_macs: HashSet<(String, [u8; 6])> = self
            .vms()
            .iter()
            .flat_map(|vm| {
                vm.spec
                    .nics
                    .iter()
                    .filter_map(|n| Some((n.network.clone(), n.mac?.0)))
                    .collect::<Vec<_>>()
            })
            .collect();
        let complete = full && entries.len() < MAX_LOCATIONS;
        // the addresses whose answer may change, and the cards no longer known here
        let (mut touched, mut unpinned, mut refused) = (HashSet::new(), Vec::new(), 0usize);
        {
            let remote = self.remote_cards.lock();
            let mut ips = self.remote_ips.lock();
            let mut named = HashSet::new();
            for a in entries.into_iter().take(MAX_LOCATIONS) {
                let key = (a.network.clone(), a.mac);
                let why = if !matches!(remote.get(&key), Some((vtep, _)) if *vtep == from) {
                    Some("the card does not live at that peer")
                } else if local_macs.contains(&key) {
                    Some("the card is one of this host's")
                } else if !tern_qemu::spec::valid_card_ip(a.ip) {
                    Some("not a card's address")
                } else if mine.contains(&(a.network.clone(), a.ip)) {
                    Some("a card here has that address")
                } else {
                    None
                };
                if let Some(why) = why {
                    refused += 1;
                    if refused <= 3 {
                        tracing::warn!(%peer, network = %a.network, mac = %tern_net::vxlan::mac_text(a.mac), ip = %a.ip, "ignored a card's address: {why}");
                    }
                    continue;
                }
                named.insert(key.clone());
                let unchanged = ips.by_card.get(&key) == Some(&a.ip);
                if let Some(old) = ips.set(key, a.ip) {
                    touched.insert((a.network.clone(), old));
                }
                // (an unchanged one only on this host's own exchanges, which are full:
                // written again in case the bridge flushed it; a peer that keeps
                // connecting does not make this host rewrite its table)
                if !unchanged || full {
                    touched.insert((a.network, a.ip));
                }
            }
            if complete {
                // the peer's cards whose address it no longer names (stopped, moved
                // away, or their address gone from the spec)
                let gone: Vec<(String, [u8; 6])> = ips
                    .by_card
                    .keys()
                    .filter(|k| !named.contains(*k))
                    .filter(|k| matches!(remote.get(*k), Some((vtep, _)) if *vtep == from))
                    .cloned()
                    .collect();
                for k in gone {
                    if let Some(ip) = ips.remove(&k) {
                        touched.insert((k.0.clone(), ip));
                        unpinned.push(k);
                    }
                }
            }
        }
        if refused > 3 {
            tracing::warn!(%peer, "ignored {refused} card addresses in all");
        }
        self.write_addresses(peer, (touched, unpinned)).await;
    }

    /// Brings the bridges in step with the table for the addresses in `touched`: ARP is
    /// answered for one that exactly one remote card claims (its MAC pinned behind the
    /// VXLAN port), for no other; the cards in `unpinned` are no longer pinned unless
    /// the table has them again. In order with every other such change, each checked
    /// against the table just before it is written.
    async fn write_addresses(&self, peer: &str, (touched, unpinned): AddressChanges) {
        if touched.is_empty() && unpinned.is_empty() {
            return;
        }
        let nl = match tern_net::bridge::Netlink::open() {
            Ok(nl) => nl,
            Err(e) => return tracing::warn!("{}", tern_engine::error_chain(&e)),
        };
        let _order = self.addressing.lock().await;
        for (network, mac) in unpinned {
            if self
                .remote_ips
                .lock()
                .by_card
                .contains_key(&(network.clone(), mac))
            {
                continue;
            }
            if let Ok(Some(vx)) = nl.vxlan_index(&network).await {
                if let Err(e) = nl.unpin_mac(vx, mac).await {
                    tracing::warn!("{}", tern_engine::error_chain(&e));
                }
            }
        }
        for (network, ip) in touched {
            let (Ok(Some(bridge)), Ok(Some(vx))) = (
                nl.bridge_index(&network).await,
                nl.vxlan_index(&network).await,
            ) else {
                continue;
            };
            let owner = self.remote_ips.lock().owner(&network, ip);
            let done = match owner {
                Some(mac) => nl.point_ip(bridge, vx, ip, mac).await.map(|()| {
                    tracing::debug!(%peer, %network, mac = %tern_net::vxlan::mac_text(mac), %ip, "ARP for this address is answered here");
                }),
                // nobody, or two cards: requests flood as without suppression
                None => nl.forget_ip(bridge, ip).await,
            };
            if let Err(e) = done {
                tracing::warn!("{}", tern_engine::error_chain(&e));
            }
        }
    }

    /// `spec`'s cards run here now: the table forgets their addresses (by MAC) at once,
    /// and the addresses they have here are no longer answered for other cards; what
    /// [`Agent::write_addresses`] then needs.
    fn take_remote_addresses(&self, spec: &VmSpec) -> AddressChanges {
        let mut ips = self.remote_ips.lock();
        let (mut touched, mut unpinned) = (HashSet::new(), Vec::new());
        for n in &spec.nics {
            let Some(mac) = n.mac else { continue };
            let key = (n.network.clone(), mac.0);
            if let Some(ip) = ips.remove(&key) {
                touched.insert((key.0.clone(), ip));
            }
            unpinned.push(key);
        }
        for a in addresses(spec) {
            let claimants: Vec<[u8; 6]> = ips
                .by_ip
                .get(&(a.network.clone(), a.ip))
                .map(|c| c.iter().copied().collect())
                .unwrap_or_default();
            for mac in claimants {
                ips.remove(&(a.network.clone(), mac));
                unpinned.push((a.network.clone(), mac));
            }
            touched.insert((a.network, a.ip));
        }
        (touched, unpinned)
    }

    /// Writes the table's current entry for each of `keys` into the VXLAN ports (again
    /// if another exchange changed it meanwhile, so the kernel ends with the newest).
    async fn write_locations(&self, peer: &str, keys: Vec<(String, [u8; 6])>) {
        let nl = match tern_net::bridge::Netlink::open() {
            Ok(nl) => nl,
            Err(e) => return tracing::warn!("{}", tern_engine::error_chain(&e)),
        };
        let mut ports: HashMap<String, Option<u32>> = HashMap::new();
        for key in keys {
            let vx = match ports.get(&key.0) {
                Some(v) => *v,
                None => {
                    let v = nl.vxlan_index(&key.0).await.ok().flatten();
                    ports.insert(key.0.clone(), v);
                    v
                }
            };
            // a network this host does not serve
            let Some(vx) = vx else { continue };
            let mut written = None;
            loop {
                let want = self.remote_cards.lock().get(&key).copied();
                if want == written {
                    break;
                }
                let Some((vtep, _)) = want else { break };
                match nl.point_mac(vx, key.1, vtep).await {
                    Ok(()) => {
                        tracing::info!(%peer, network = %key.0, mac = %tern_net::vxlan::mac_text(key.1), %vtep, "a card lives there now")
                    }
                    Err(e) => {
                        tracing::warn!("{}", tern_engine::error_chain(&e));
                        break;
                    }
                }
                written = want;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_names_a_network_a_unicast_mac_and_the_claiming_peers_own_vtep() {
        let b = Ipv4Addr::new(198, 18, 2, 1);
        let c = Ipv4Addr::new(198, 18, 3, 1);
        let o = tern_net::vxlan::Overlay {
            local: Ipv4Addr::new(198, 18, 1, 1),
            peers: vec![b, c],
            learning: false,
        };
        let now = 1_000_000_000_000;
        let good = Location {
            network: "lab".into(),
            mac: [0x52, 0x54, 0, 1, 2, 3],
            vtep: b,
            seq: now,
        };
        assert_eq!(vet(&good, &o, b, now), Ok(()));
        let bad = |f: &dyn Fn(&mut Location)| {
            let mut e = good.clone();
            f(&mut e);
            vet(&e, &o, b, now).unwrap_err()
        };
        assert!(bad(&|e| e.network = "Lab/../x".into()).contains("network"));
        assert!(bad(&|e| e.mac = [1, 0, 0x5e, 0, 0, 1]).contains("unicast"));
        assert!(bad(&|e| e.mac = [0; 6]).contains("unicast"));
        assert!(bad(&|e| e.vtep = o.local).contains("--vxlan-peer"));
        assert!(bad(&|e| e.vtep = Ipv4Addr::new(8, 8, 8, 8)).contains("--vxlan-peer"));
        // B may not point a card at C, though C is a peer
        assert!(bad(&|e| e.vtep = c).contains("own VTEP"));
        assert!(bad(&|e| e.seq = u64::MAX).contains("clock"));
        assert!(vet(
            &Location {
                seq: now + CLOCK_SLACK_US,
                ..good.clone()
            },
            &o,
            b,
            now
        )
        .is_ok());
    }

    #[test]
    fn an_address_is_answered_for_only_while_exactly_one_remote_card_claims_it() {
        let (x, y) = (Ipv4Addr::new(198, 19, 0, 2), Ipv4Addr::new(198, 19, 0, 3));
        let (m1, m2) = ([0x52, 0x54, 0, 0, 0, 1], [0x52, 0x54, 0, 0, 0, 2]);
        let mut t = RemoteIps::default();
        assert_eq!(t.set(("lab".into(), m1), x), None);
        assert_eq!(t.owner("lab", x), Some(m1));
        assert_eq!(t.owner("red", x), None, "another network");
        // a second card claims it: a clash, nobody answers
        t.set(("lab".into(), m2), x);
        assert_eq!(t.owner("lab", x), None);
        // the second moves to another address: the first answers again
        assert_eq!(t.set(("lab".into(), m2), y), Some(x));
        assert_eq!((t.owner("lab", x), t.owner("lab", y)), (Some(m1), Some(m2)));
        assert_eq!(t.remove(&("lab".into(), m1)), Some(x));
        assert_eq!(t.owner("lab", x), None);
        assert!(
            !t.by_ip.contains_key(&("lab".to_string(), x)),
            "nothing left behind"
        );
    }

    #[test]
    fn the_newest_claim_wins_and_equal_ones_go_to_the_higher_vtep_everywhere() {
        let (b, c) = (Ipv4Addr::new(198, 18, 2, 1), Ipv4Addr::new(198, 18, 3, 1));
        assert!(newer((5, b), None));
        assert!(newer((6, b), Some(&(c, 5))));
        assert!(!newer((4, c), Some(&(b, 5))));
        assert!(
            !newer((5, b), Some(&(b, 5))),
            "the same claim again changes nothing"
        );
        assert!(newer((5, c), Some(&(b, 5))));
        assert!(!newer((5, b), Some(&(c, 5))));
    }
}
