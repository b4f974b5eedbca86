//! What a source's `--plan` asks of this host (v9), on a connection of its own: how many
//! of a sample of the VM's pages this host's page store holds, and of its disks' blocks
//! this host's chunk index holds (counts: no hash, no prefix goes back), then a link probe, whose filler is read and dropped, answered with
//! what arrived in the later half of its time (after TCP's slow start). Nothing of a VM is
//! started or kept. Bounded against a hostile peer: at most [`MAX_PLANS`] plans answered
//! at once, one question of at most
//! [`MAX_PLAN_HASHES`](tern_proto::limits::MAX_PLAN_HASHES) hashes of each kind (the
//! decoder's limit), a bounded wait for the chunk index, at most [`MAX_PROBE_BYTES`] of
//! filler, all within [`MAX_PROBE_TIME`], and a bounded record of arrivals.
//!
//! What the counts tell a peer: whether this host holds content whose hash it knows. A
//! peer learns more from a Prepare (the Summary: the 64-bit prefix of every page held), so
//! this adds no kind of knowledge a cluster certificate does not already give.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use tern_proto::limits::{MAX_PROBE_BYTES, MAX_PROBE_TIME};
use tern_proto::{ContentHash, ErrorCode, Message};
use tern_store::PageStore;

use super::{refuse, Conn, Incoming, IncomingError};

/// Most arrival times kept: past it every other one is dropped (the split point then
/// comes from a coarser record, never from more memory).
const MAX_ARRIVALS: usize = 4096;
/// Most plans answered at once (each holds a connection and, while it waits for the chunk
/// index, a blocking thread); more are refused (`resource-exhausted`).
const MAX_PLANS: usize = 4;
/// The longest a plan waits for the chunk index (held briefly by image imports and disk
/// rebuilds); past it the disk blocks are answered as not held.
const INDEX_WAIT: Duration = Duration::from_secs(5);

static PLANS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_PLANS);

pub(super) async fn answer(
    inc: &Incoming,
    conn: &mut Conn,
    key_id: u64,
    hashes: Vec<ContentHash>,
    chunks: Vec<ContentHash>,
) -> Result<(), IncomingError> {
    let Ok(_slot) = PLANS.try_acquire() else {
        return Err(refuse(
            ErrorCode::ResourceExhausted,
            format!("{MAX_PLANS} plans are being answered already: try again shortly"),
        ));
    };
    // made with another cluster key: nothing here can match; each hash counts once
    let ours = key_id == inc.engine.hasher.key_id();
    let asked = hashes.len();
    let hashes: HashSet<ContentHash> = hashes.into_iter().collect();
    let chunks: HashSet<ContentHash> = chunks.into_iter().collect();
    let held = if ours {
        let st = inc.engine.store.lock();
        hashes.iter().filter(|h| st.contains(h)).count() as u32
    } else {
        0
    };
    let chunks_held = if ours && !chunks.is_empty() {
        let engine = inc.engine.clone();
        // (the index's lock is a blocking one, held by imports and rebuilds)
        let count = tokio::task::spawn_blocking(move || {
            let index = engine.chunks.lock().unwrap_or_else(|p| p.into_inner());
            chunks.iter().filter(|h| index.contains(h)).count() as u32
        });
        match tokio::time::timeout(INDEX_WAIT, count).await {
            Ok(Ok(n)) => n,
            _ => {
                tracing::warn!("a plan's disk blocks answered as not held: the chunk index was busy for {INDEX_WAIT:?}");
                0
            }
        }
    } else {
        0
    };
    conn.send(&Message::PlanHeld { held, chunks_held }).await?;
    let started = Instant::now();
    let mut arrivals = Arrivals::default();
    loop {
        let left = MAX_PROBE_TIME.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Err(refuse(
                ErrorCode::ResourceExhausted,
                format!("a plan's link probe may take at most {MAX_PROBE_TIME:?}"),
            ));
        }
        match conn.next(left, "ProbeBytes").await? {
            Message::ProbeBytes(b) => {
                if !arrivals.add(Instant::now(), b.len() as u64) {
                    return Err(refuse(
                        ErrorCode::ResourceExhausted,
                        format!("a plan's link probe may send at most {MAX_PROBE_BYTES} bytes"),
                    ));
                }
            }
            Message::ProbeEnd => break,
            m => {
                return Err(refuse(
                    ErrorCode::Protocol,
                    format!("expected ProbeBytes, got {}", m.name()),
                ))
            }
        }
    }
    let (bytes, micros) = arrivals.later_half();
    tracing::info!(
        held,
        of = asked,
        chunks_held,
        bytes,
        micros,
        "answered a plan"
    );
    conn.send(&Message::ProbeResult { bytes, micros }).await
}

/// When the probe's filler arrived: (time, bytes so far), coarsened to at most
/// [`MAX_ARRIVALS`] entries.
#[derive(Default)]
struct Arrivals {
    at: Vec<(Instant, u64)>,
    total: u64,
    /// Keep every `stride`-th arrival (doubles each time the record is halved).
    stride: u64,
    seen: u64,
    last: Option<(Instant, u64)>,
}

impl Arrivals {
    /// One frame of `len` bytes at `t`; false past [`MAX_PROBE_BYTES`].
    fn add(&mut self, t: Instant, len: u64) -> bool {
        self.total += len;
        if self.total > MAX_PROBE_BYTES {
            return false;
        }
        self.stride = self.stride.max(1);
        if self.seen.is_multiple_of(self.stride) {
            if self.at.len() == MAX_ARRIVALS {
                let kept: Vec<_> = self.at.iter().copied().step_by(2).collect();
                self.at = kept;
                self.stride *= 2;
            }
            self.at.push((t, self.total));
        }
        self.seen += 1;
        self.last = Some((t, self.total));
        true
    }

    /// Bytes that arrived after the middle of the probe's time, and over how many µs
    /// (from the last arrival at or before the middle to the last arrival). (0, 0) with
    /// fewer than two arrivals.
    fn later_half(&self) -> (u64, u64) {
        self.last
            .and_then(|end| crate::transport::probe::later_half(&self.at, end))
            .map_or((0, 0), |(bytes, d)| (bytes, d.as_micros() as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_later_half_of_a_probe_is_what_counts() {
        let t0 = Instant::now();
        let mut a = Arrivals::default();
        assert_eq!(a.later_half(), (0, 0));
        // slow start: 10 KB in the first 100 ms, then 1 MB per 100 ms for 900 ms
        assert!(a.add(t0, 10_000));
        for i in 1..=9u32 {
            assert!(a.add(t0 + Duration::from_millis(100) * i, 1_000_000));
        }
        // the middle is at 450 ms: from the arrival at 400 ms to the one at 900 ms
        assert_eq!(a.later_half(), (5_000_000, 500_000));
    }

    #[test]
    fn a_probe_is_bounded_in_bytes_and_in_what_is_kept() {
        let t0 = Instant::now();
        let mut a = Arrivals::default();
        // a peer sending tiny frames: the record stays bounded, the answer stays right
        for i in 0..100_000u32 {
            assert!(a.add(t0 + Duration::from_micros(u64::from(i)), 10));
        }
        assert!(a.at.len() <= MAX_ARRIVALS, "{}", a.at.len());
        let (bytes, micros) = a.later_half();
        assert!((499_000..=501_000).contains(&bytes), "{bytes}");
        assert!((49_900..=50_100).contains(&micros), "{micros}");
        // past the byte limit: refused
        let mut b = Arrivals::default();
        assert!(b.add(t0, MAX_PROBE_BYTES));
        assert!(!b.add(t0, 1));
    }
}
