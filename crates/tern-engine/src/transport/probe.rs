//! What the kernel knows of a connection's path: TCP's smoothed round trip, the least
//! round trip it saw, and the bytes the peer acknowledged (`TCP_INFO`). The bandwidth
//! controller (`crate::pace`) reads the data connections through this: queueing delay
//! (round trip above the least) is the sign of other traffic on a shared link, and
//! acknowledged bytes are what the link delivered.
//!
//! Owns the `TCP_INFO` read (the crate's one `unsafe`), and the later half of a link
//! probe's samples ([`later_half`]), which both ends of a plan's probe measure.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// The later half of a link probe, after TCP's slow start: from `samples` ((time, bytes so
/// far), in time order, from the first) and the last one, `end`: the bytes after the last
/// sample at or before the middle of the probe's time, and the time from that sample to
/// `end`. None without samples.
pub fn later_half(samples: &[(Instant, u64)], end: (Instant, u64)) -> Option<(u64, Duration)> {
    let &(first, _) = samples.first()?;
    let mid = first + (end.0 - first) / 2;
    let &(t, before) = samples.iter().rev().find(|(t, _)| *t <= mid)?;
    Some((
        end.1.saturating_sub(before),
        end.0.saturating_duration_since(t),
    ))
}

/// A handle on one TCP connection's kernel state, valid while the socket lives (it holds
/// a duplicate of the descriptor, so reading it never touches a reused number).
#[derive(Debug)]
pub struct TcpProbe {
    fd: OwnedFd,
}

/// One look at a connection.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TcpStats {
    /// Smoothed round trip.
    pub srtt: Duration,
    /// The least round trip in the kernel's window (minutes).
    pub min_rtt: Duration,
    /// Bytes the peer acknowledged, since the connection began.
    pub bytes_acked: u64,
}

/// `struct tcp_info` of linux/tcp.h, as far as tern reads it (the kernel copies at most
/// what is asked for, so a shorter struct is fine; every field used is from Linux 4.10 or
/// older).
#[repr(C)]
#[derive(Default)]
struct TcpInfo {
    state: u8,
    ca_state: u8,
    retransmits: u8,
    probes: u8,
    backoff: u8,
    options: u8,
    wscale: u8,
    flags: u8,
    rto: u32,
    ato: u32,
    snd_mss: u32,
    rcv_mss: u32,
    unacked: u32,
    sacked: u32,
    lost: u32,
    retrans: u32,
    fackets: u32,
    last_data_sent: u32,
    last_ack_sent: u32,
    last_data_recv: u32,
    last_ack_recv: u32,
    pmtu: u32,
    rcv_ssthresh: u32,
    rtt_us: u32,
    rttvar_us: u32,
    snd_ssthresh: u32,
    snd_cwnd: u32,
    advmss: u32,
    reordering: u32,
    rcv_rtt: u32,
    rcv_space: u32,
    total_retrans: u32,
    pacing_rate: u64,
    max_pacing_rate: u64,
    bytes_acked: u64,
    bytes_received: u64,
    segs_out: u32,
    segs_in: u32,
    notsent_bytes: u32,
    min_rtt_us: u32,
}

/// Bytes up to and including `min_rtt_us`: a kernel that returns less is too old.
const NEEDED: usize = std::mem::size_of::<TcpInfo>();

impl TcpProbe {
    /// A probe on `s` (a TCP socket).
    pub fn of(s: &impl AsFd) -> std::io::Result<TcpProbe> {
        Ok(TcpProbe {
            fd: s.as_fd().try_clone_to_owned()?,
        })
    }

    /// Reads the connection's state now.
    pub fn read(&self) -> std::io::Result<TcpStats> {
        let mut info = TcpInfo::default();
        let mut len = NEEDED as libc::socklen_t;
        // SAFETY: `info` is a plain-old-data #[repr(C)] struct of `len` bytes that lives
        // across the call; the kernel writes at most `len` bytes into it and sets `len` to
        // what it wrote. The descriptor is owned by `self` and open.
        #[allow(unsafe_code)]
        let rc = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut info as *mut TcpInfo).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if (len as usize) < NEEDED {
            return Err(std::io::Error::other(format!(
                "TCP_INFO: the kernel gave {len} bytes, tern needs {NEEDED} (Linux 4.10 or newer)"
            )));
        }
        Ok(TcpStats {
            srtt: Duration::from_micros(info.rtt_us.into()),
            min_rtt: Duration::from_micros(info.min_rtt_us.into()),
            bytes_acked: info.bytes_acked,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn a_loopback_connection_shows_its_round_trip_and_the_bytes_acknowledged() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let probe = TcpProbe::of(&c).unwrap();
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0; 1 << 16];
            let mut n = 0;
            while n < 4 << 20 {
                n += s.read(&mut buf).unwrap();
            }
            n
        });
        c.write_all(&vec![7u8; 4 << 20]).unwrap();
        assert_eq!(reader.join().unwrap(), 4 << 20);
        // the last ACKs may still be on their way: the kernel counts them as they come
        let mut st = probe.read().unwrap();
        for _ in 0..100 {
            if st.bytes_acked >= 4 << 20 {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
            st = probe.read().unwrap();
        }
        assert!(st.bytes_acked >= 4 << 20, "{st:?}");
        assert!(
            st.srtt > Duration::ZERO && st.srtt < Duration::from_millis(50),
            "{st:?}"
        );
        assert!(st.min_rtt <= st.srtt, "{st:?}");
        // the probe holds its own descriptor: the stream may go, the probe still reads
        // the socket (which stays open until the probe goes too)
        drop(c);
        assert!(probe.read().is_ok());
    }
}
