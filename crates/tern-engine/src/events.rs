//! What happens on this agent, for the API's event stream (`GET /v1/events`): each
//! event numbered in order, the last [`KEPT`] kept so a listener that reconnects with the
//! last number it saw gets what it missed, and progress ticks of running migrations that
//! go only to who listens now (they are neither numbered nor kept: the next tick says the
//! same, newer). Sans-I/O apart from a tokio broadcast channel; the API turns it into
//! server-sent events.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tern_api::events::AgentEvent;
use tokio::sync::broadcast;

use crate::handle::MigrationHandle;

/// Numbered events kept for listeners that reconnect.
pub const KEPT: usize = 256;

/// How often a running migration's progress goes to the listeners.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// An event as a listener gets it: `seq` is its number (None for progress ticks).
#[derive(Debug, Clone)]
pub struct Numbered {
    pub seq: Option<u64>,
    pub event: AgentEvent,
}

/// What a new listener starts with.
pub struct Follow {
    /// Kept events after the number it gave, oldest first.
    pub replay: Vec<Numbered>,
    /// Events after that number it can no longer get (no longer kept).
    pub missed: u64,
    /// The number of the last event so far (0: none yet).
    pub last: u64,
    /// Everything from here on.
    pub live: broadcast::Receiver<Numbered>,
}

pub struct EventLog {
    inner: Mutex<Kept>,
    tx: broadcast::Sender<Numbered>,
}

struct Kept {
    last: u64,
    recent: VecDeque<Numbered>,
}

impl Default for EventLog {
    fn default() -> Self {
        EventLog {
            inner: Mutex::new(Kept {
                last: 0,
                recent: VecDeque::with_capacity(KEPT),
            }),
            tx: broadcast::channel(1024).0,
        }
    }
}

impl EventLog {
    /// Numbers, keeps and sends `event`.
    pub fn emit(&self, event: AgentEvent) {
        let mut k = self.inner.lock();
        k.last += 1;
        let n = Numbered {
            seq: Some(k.last),
            event,
        };
        if k.recent.len() == KEPT {
            k.recent.pop_front();
        }
        k.recent.push_back(n.clone());
        // under the lock: listeners get events in number order, and `follow` sees each
        // one either in its replay or live, never both, never neither
        let _ = self.tx.send(n);
    }

    /// Sends `event` to who listens now, unnumbered and not kept.
    pub fn tick(&self, event: AgentEvent) {
        let _ = self.tx.send(Numbered { seq: None, event });
    }

    /// Whether anybody listens.
    pub fn listened(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    /// A listener from now on, after the kept events numbered above `since` (None: only
    /// from now on).
    pub fn follow(&self, since: Option<u64>) -> Follow {
        let k = self.inner.lock();
        let live = self.tx.subscribe();
        let Some(since) = since else {
            return Follow {
                replay: Vec::new(),
                missed: 0,
                last: k.last,
                live,
            };
        };
        let oldest = k.recent.front().and_then(|n| n.seq).unwrap_or(k.last + 1);
        Follow {
            replay: k
                .recent
                .iter()
                .filter(|n| n.seq.is_some_and(|s| s > since))
                .cloned()
                .collect(),
            // kept from `oldest` on (nothing kept: it would be the next one)
            missed: oldest.saturating_sub(since.saturating_add(1)),
            last: k.last,
            live,
        }
    }

    /// Sends `m`'s progress every [`PROGRESS_EVERY`] while it runs and somebody listens.
    pub fn tick_while_running(self: &Arc<Self>, m: &Arc<MigrationHandle>) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let m = Arc::downgrade(m);
        let log = self.clone();
        rt.spawn(async move {
            let mut every = tokio::time::interval(PROGRESS_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            every.tick().await;
            loop {
                every.tick().await;
                let Some(m) = m.upgrade() else { return };
                if m.is_finished() {
                    return;
                }
                if log.listened() {
                    log.tick(AgentEvent::Progress {
                        status: Box::new(m.status()),
                    });
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str) -> AgentEvent {
        AgentEvent::Vm {
            name: name.into(),
            what: "started".into(),
            pid: None,
        }
    }

    fn name(n: &Numbered) -> String {
        match &n.event {
            AgentEvent::Vm { name, .. } => name.clone(),
            e => format!("{e:?}"),
        }
    }

    #[test]
    fn a_listener_that_comes_back_gets_what_it_missed_then_what_follows_in_order() {
        let log = EventLog::default();
        for i in 1..=5 {
            log.emit(vm(&format!("v{i}")));
        }
        let mut f = log.follow(Some(3));
        assert_eq!(f.missed, 0);
        assert_eq!(f.last, 5);
        let replayed: Vec<_> = f.replay.iter().map(|n| (n.seq, name(n))).collect();
        assert_eq!(
            replayed,
            vec![(Some(4), "v4".into()), (Some(5), "v5".into())]
        );
        log.emit(vm("v6"));
        log.tick(vm("tick"));
        let live = f.live.try_recv().unwrap();
        assert_eq!((live.seq, name(&live)), (Some(6), "v6".into()));
        let tick = f.live.try_recv().unwrap();
        assert_eq!(tick.seq, None, "ticks are not numbered");
        assert!(f.live.try_recv().is_err(), "nothing twice");

        let fresh = log.follow(None);
        assert!(fresh.replay.is_empty());
        assert_eq!(fresh.last, 6);
        let all = log.follow(Some(0));
        assert_eq!(all.replay.len(), 6, "ticks are not kept");
    }

    #[test]
    fn what_is_no_longer_kept_is_counted_as_missed() {
        let log = EventLog::default();
        for i in 0..(KEPT as u64 + 10) {
            log.emit(vm(&format!("v{i}")));
        }
        let f = log.follow(Some(4));
        // kept: 11..=266; asked from 5
        assert_eq!(f.missed, 6);
        assert_eq!(f.replay.len(), KEPT);
        assert_eq!(f.replay[0].seq, Some(11));
        let none = log.follow(Some(KEPT as u64 + 10));
        assert_eq!((none.missed, none.replay.len()), (0, 0));
        // a number from the future (another agent's, or before a restart): nothing missed
        let future = log.follow(Some(10_000));
        assert_eq!((future.missed, future.replay.len()), (0, 0));
    }
}
