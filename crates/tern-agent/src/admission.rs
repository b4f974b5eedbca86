//! What the agent's TLS listeners (the peer listener, [`crate::run`], and the control
//! listener, [`crate::control`]) share to keep connections they have not authenticated
//! yet from taking what authenticated ones need: their accept loop ([`accept`]), the
//! handshakes in progress, counted in all and by source ([`HandshakeSlots`], a source
//! being [`source_of`] an address), and how often a refusal anyone can provoke is worth
//! a warning ([`WarnEvery`]).
//!
//! Owns that loop, those counts and that rate; must not pick a listener's budgets
//! ([`Limits`]: each listener has its own numbers and its own budget of authenticated
//! connections), its words in the log ([`Names`]) nor whom it serves (the listener's
//! `vet` and `admit`).

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tern_engine::transport::tls::{PeerIdentity, PeerSecurity, PeerStream};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A listener's budgets (its constants; smaller in tests).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Connections in their TLS handshake at once, from all sources.
    pub(crate) handshakes: usize,
    /// Of `handshakes`, those from one source ([`source_of`]).
    pub(crate) handshakes_per_source: usize,
    /// Authenticated connections at once (handshakes in progress do not count).
    pub(crate) authenticated: usize,
    /// A handshake not done by then is dropped.
    pub(crate) handshake_within: Duration,
}

/// What a listener calls things in its log (each the start of a message).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Names {
    /// Accepting a TCP connection failed: "control accept failed".
    pub(crate) accept_failed: &'static str,
    /// No handshake slot for it: "refused a control connection".
    pub(crate) refused: &'static str,
    /// Its handshake failed: "control connection refused".
    pub(crate) failed: &'static str,
    /// Authenticated, but the authenticated budget is full: "controller connection closed".
    pub(crate) over_budget: &'static str,
}

/// How long a refused, authenticated connection gets to be closed cleanly.
const CLOSE_WITHIN: Duration = Duration::from_secs(1);

/// A listener's accept loop: accepts connections on `tcp`, authenticates them with
/// `security` (each handshake within `limits.handshake_within`) and gives each one
/// `vet` lets in to `admit`, with its slot of the authenticated budget (free again when
/// the slot is dropped). Anyone who can reach the port can open connections, so the
/// budgets are kept apart: at most `limits.handshakes` connections in their handshake at
/// once, of them at most `limits.handshakes_per_source` from one source, and at most
/// `limits.authenticated` authenticated ones, a budget no handshake takes from (a
/// connection takes its slot there once its handshake is done and `vet` let it in, then
/// gives up its handshake slot). A connection over a budget is closed; refusals are
/// logged at warn level at most once per [`crate::control::REFUSALS_WARNED_EVERY`]
/// ([`WarnEvery`]), at debug otherwise.
///
/// `vet` sees an authenticated connection before it takes a slot: false (it says why
/// in the log) closes it. Without TLS (`PeerSecurity::Plaintext`) there is no
/// handshake to wait for: a connection takes a slot of the authenticated budget as it
/// is accepted.
pub(crate) async fn accept<V, A, F>(
    tcp: TcpListener,
    security: PeerSecurity,
    dead_after: Duration,
    limits: Limits,
    names: Names,
    vet: V,
    admit: A,
) where
    V: Fn(SocketAddr, &PeerIdentity) -> bool + Send + Sync + 'static,
    A: Fn(PeerStream, SocketAddr, PeerIdentity, OwnedSemaphorePermit) -> F + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let (vet, admit) = (Arc::new(vet), Arc::new(admit));
    let handshakes = HandshakeSlots::new(limits.handshakes, limits.handshakes_per_source);
    let budget = Arc::new(Semaphore::new(limits.authenticated));
    let every = crate::control::REFUSALS_WARNED_EVERY;
    let mut refused = WarnEvery::new(every);
    let failed = Arc::new(Mutex::new(WarnEvery::new(every)));
    let overflowed = Arc::new(Mutex::new(WarnEvery::new(every)));
    loop {
        let (conn, addr) = match tcp.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("{}: {e}", names.accept_failed);
                // (out of descriptors, say: not a busy loop)
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let slot = if security.is_tls() {
            match handshakes.try_take(addr.ip()) {
                Ok(s) => Some(s),
                Err(full) => {
                    drop(conn);
                    let why = handshakes.why(full);
                    match refused.say(Instant::now(), "refused") {
                        Some(more) => {
                            tracing::warn!(remote = %addr, "{}: {why}{more}", names.refused)
                        }
                        None => tracing::debug!(remote = %addr, "{}: {why}", names.refused),
                    }
                    continue;
                }
            }
        } else {
            None
        };
        let security = security.clone();
        let (vet, admit, budget) = (vet.clone(), admit.clone(), budget.clone());
        let (failed, overflowed) = (failed.clone(), overflowed.clone());
        tokio::spawn(async move {
            let (mut stream, id) = match security
                .accept(conn, addr, limits.handshake_within, dead_after)
                .await
            {
                Ok(s) => s,
                Err(e) => {
                    let e = tern_engine::error_chain(&e);
                    match failed.lock().say(Instant::now(), "failed handshakes") {
                        Some(more) => tracing::warn!(remote = %addr, "{}: {e}{more}", names.failed),
                        None => tracing::debug!(remote = %addr, "{}: {e}", names.failed),
                    }
                    return;
                }
            };
            use tokio::io::AsyncWriteExt;
            if !vet(addr, &id) {
                let _ = tokio::time::timeout(CLOSE_WITHIN, stream.shutdown()).await;
                return;
            }
            let Ok(permit) = budget.try_acquire_owned() else {
                let n = limits.authenticated;
                match overflowed.lock().say(Instant::now(), "closed") {
                    Some(more) => tracing::warn!(
                        remote = %addr, names = ?id.names,
                        "{}: {n} are open{more}", names.over_budget
                    ),
                    None => tracing::debug!(
                        remote = %addr, names = ?id.names,
                        "{}: {n} are open", names.over_budget
                    ),
                }
                let _ = tokio::time::timeout(CLOSE_WITHIN, stream.shutdown()).await;
                return;
            };
            // authenticated: out of the handshake pool, into the authenticated budget
            drop(slot);
            admit(stream, addr, id, permit).await;
        });
    }
}

/// Which budget of handshakes a connection found full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HandshakesFull {
    /// The handshakes from all sources.
    All,
    /// The handshakes from the connection's source.
    Source,
}

/// The handshakes in progress, in all and by source ([`source_of`]): each holds a
/// [`HandshakeSlot`], given back when it is dropped.
#[derive(Clone)]
pub(crate) struct HandshakeSlots {
    counts: Arc<Mutex<HandshakeCounts>>,
    max: usize,
    max_per_source: usize,
}

#[derive(Default)]
struct HandshakeCounts {
    total: usize,
    /// Only sources with a handshake in progress (never a zero).
    by_source: HashMap<IpAddr, usize>,
}

impl HandshakeSlots {
    /// At most `max` handshakes at once, of them at most `max_per_source` from a source.
    pub(crate) fn new(max: usize, max_per_source: usize) -> HandshakeSlots {
        HandshakeSlots {
            counts: Arc::default(),
            max,
            max_per_source,
        }
    }

    /// A slot for a handshake from `peer`, unless a budget is full.
    pub(crate) fn try_take(&self, peer: IpAddr) -> Result<HandshakeSlot, HandshakesFull> {
        let source = source_of(peer);
        let mut c = self.counts.lock();
        if c.total >= self.max {
            return Err(HandshakesFull::All);
        }
        let n = c.by_source.entry(source).or_insert(0);
        if *n >= self.max_per_source {
            return Err(HandshakesFull::Source);
        }
        *n += 1;
        c.total += 1;
        Ok(HandshakeSlot {
            counts: self.counts.clone(),
            source,
        })
    }

    /// Why a connection was refused a slot, for the log.
    pub(crate) fn why(&self, full: HandshakesFull) -> String {
        match full {
            HandshakesFull::Source => format!(
                "{} handshakes from its source are in progress",
                self.max_per_source
            ),
            HandshakesFull::All => format!("{} handshakes are in progress", self.max),
        }
    }

    /// (handshakes in progress, sources they come from)
    #[cfg(test)]
    pub(crate) fn in_progress(&self) -> (usize, usize) {
        let c = self.counts.lock();
        (c.total, c.by_source.len())
    }
}

/// A handshake's place in [`HandshakeSlots`], free again when dropped.
pub(crate) struct HandshakeSlot {
    counts: Arc<Mutex<HandshakeCounts>>,
    source: IpAddr,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut c = self.counts.lock();
        c.total -= 1;
        if let Some(n) = c.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                c.by_source.remove(&self.source);
            }
        }
    }
}

/// The source a per-source budget counts a peer under: its IPv4 address (also when
/// written as IPv4-mapped IPv6), or its IPv6 /64 (one host commonly holds a whole /64).
pub(crate) fn source_of(peer: IpAddr) -> IpAddr {
    match peer {
        IpAddr::V4(_) => peer,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
    }
}

/// Whether an event repeated by anyone who can connect is worth a warning now: at most
/// one per `every`, the others at debug level, counted.
pub(crate) struct WarnEvery {
    every: Duration,
    last: Option<Instant>,
    quiet: u64,
}

impl WarnEvery {
    pub(crate) fn new(every: Duration) -> WarnEvery {
        WarnEvery {
            every,
            last: None,
            quiet: 0,
        }
    }

    /// Some(how many were not warned since the last warning) if this one is to be a
    /// warning; None if it is to be quiet.
    pub(crate) fn warn_now(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.saturating_duration_since(t) < self.every => {
                self.quiet += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.quiet))
            }
        }
    }

    /// [`Self::warn_now`] as the end of a message: Some("") or Some(" (N more `what`
    /// since the last warning)") if this one is to be a warning, None if it is to be
    /// quiet (debug).
    pub(crate) fn say(&mut self, now: Instant, what: &str) -> Option<String> {
        self.warn_now(now).map(|n| match n {
            0 => String::new(),
            n => format!(" ({n} more {what} since the last warning)"),
        })
    }
}

/// For the listeners' tests: connections that never start a handshake.
#[cfg(test)]
pub(crate) mod held {
    use std::net::SocketAddr;
    use std::time::Duration;

    /// A raw TCP connection from `from` to `to` that never starts a handshake.
    pub(crate) async fn raw_from(from: &str, to: SocketAddr) -> tokio::net::TcpStream {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(format!("{from}:0").parse().unwrap()).unwrap();
        s.connect(to).await.unwrap()
    }

    /// Opens `share + over` raw connections from `from` to `to`: checks that the first
    /// `share` are held (in their handshake) and the rest closed at once; returns the
    /// held ones.
    pub(crate) async fn hold_share(
        from: &str,
        to: SocketAddr,
        share: usize,
        over: usize,
    ) -> Vec<tokio::net::TcpStream> {
        let mut held = Vec::new();
        for _ in 0..share {
            held.push(raw_from(from, to).await);
        }
        let mut extra = Vec::new();
        for _ in 0..over {
            extra.push(raw_from(from, to).await);
        }
        for c in &mut extra {
            assert!(
                closed(c, Duration::from_secs(5)).await,
                "a connection over the source's share was held"
            );
        }
        for c in &mut held {
            assert!(
                !closed(c, Duration::from_millis(300)).await,
                "a handshake within the share was closed"
            );
        }
        held
    }

    /// Whether the listener closed `c` (within a while) rather than holding it.
    pub(crate) async fn closed(c: &mut tokio::net::TcpStream, within: Duration) -> bool {
        use tokio::io::AsyncReadExt;
        let mut b = [0u8; 16];
        match tokio::time::timeout(within, c.read(&mut b)).await {
            Err(_) => false,
            Ok(Ok(0) | Err(_)) => true,
            Ok(Ok(n)) => panic!("{n} bytes from a listener that has not seen a ClientHello"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn one_source_holds_only_its_share_of_the_handshakes() {
        let slots = HandshakeSlots::new(5, 2);
        let a1 = slots.try_take(ip("10.0.0.1")).unwrap();
        let a2 = slots.try_take(ip("10.0.0.1")).unwrap();
        // its share is taken: refused, and the refusal takes nothing
        assert_eq!(
            slots.try_take(ip("10.0.0.1")).err(),
            Some(HandshakesFull::Source)
        );
        assert_eq!(slots.in_progress(), (2, 1));
        // other sources still get in, up to the total
        let b1 = slots.try_take(ip("10.0.0.2")).unwrap();
        let _b2 = slots.try_take(ip("10.0.0.2")).unwrap();
        let _c1 = slots.try_take(ip("10.0.0.3")).unwrap();
        assert_eq!(slots.in_progress(), (5, 3));
        assert_eq!(
            slots.try_take(ip("10.0.0.4")).err(),
            Some(HandshakesFull::All)
        );
        // a handshake that ends gives its slot back, to anyone
        drop(b1);
        let _d1 = slots.try_take(ip("10.0.0.4")).unwrap();
        assert_eq!(
            slots.try_take(ip("10.0.0.2")).err(),
            Some(HandshakesFull::All)
        );
        drop(a1);
        let a3 = slots.try_take(ip("10.0.0.1")).unwrap();
        drop((a2, a3));
        assert_eq!(
            slots.in_progress(),
            (3, 3),
            "a source without handshakes is forgotten"
        );
    }

    #[test]
    fn an_ipv6_source_is_its_64_and_a_mapped_ipv4_its_address() {
        assert_eq!(source_of(ip("192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(source_of(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(source_of(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        let slots = HandshakeSlots::new(10, 2);
        let _x = slots.try_take(ip("2001:db8:1:2::1")).unwrap();
        let _y = slots
            .try_take(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"))
            .unwrap();
        // a new address of the same /64 is the same source
        assert_eq!(
            slots.try_take(ip("2001:db8:1:2::3")).err(),
            Some(HandshakesFull::Source)
        );
        let _z = slots.try_take(ip("2001:db8:1:3::1")).unwrap();
        let _v4 = slots.try_take(ip("::ffff:192.0.2.7")).unwrap();
        let _v4b = slots.try_take(ip("192.0.2.7")).unwrap();
        assert_eq!(
            slots.try_take(ip("192.0.2.7")).err(),
            Some(HandshakesFull::Source)
        );
    }

    #[test]
    fn refusals_are_warned_once_per_interval_with_the_count_of_the_quiet_ones() {
        let t0 = Instant::now();
        let mut w = WarnEvery::new(Duration::from_secs(10));
        assert_eq!(w.warn_now(t0), Some(0));
        for s in 1..=5 {
            assert_eq!(w.warn_now(t0 + Duration::from_secs(s)), None);
        }
        assert_eq!(w.warn_now(t0 + Duration::from_secs(10)), Some(5));
        assert_eq!(w.warn_now(t0 + Duration::from_secs(11)), None);
        assert_eq!(w.warn_now(t0 + Duration::from_secs(25)), Some(1));
        // a clock that went back is not a reason to warn
        assert_eq!(w.warn_now(t0), None);
        // as the end of a message
        assert_eq!(
            w.say(t0 + Duration::from_secs(40), "refused").as_deref(),
            Some(" (1 more refused since the last warning)")
        );
        assert_eq!(w.say(t0 + Duration::from_secs(41), "refused"), None);
        assert_eq!(
            w.say(t0 + Duration::from_secs(60), "refused").as_deref(),
            Some(" (1 more refused since the last warning)")
        );
        assert_eq!(
            w.say(t0 + Duration::from_secs(80), "refused").as_deref(),
            Some("")
        );
    }
}
