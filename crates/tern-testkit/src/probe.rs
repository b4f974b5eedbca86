//! What a client sees of a guest while it moves: [`Pings`] (ICMP echo at a fixed interval,
//! every answer timed) and [`Echo`] (a TCP connection that streams both ways through the
//! guest's echo server, every byte checked). Both run from inside a network namespace.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

/// `ping` from namespace `netns` to one address every `interval`, its output kept in a
/// file (a pipe nobody reads until the end would fill).
pub struct Pings {
    child: Child,
    out: tempfile::NamedTempFile,
}

/// What [`Pings`] saw.
#[derive(Debug, Clone, PartialEq)]
pub struct PingsSeen {
    pub sent: u64,
    /// Distinct echo requests answered.
    pub answered: u64,
    /// Answers to a request already answered.
    pub duplicates: u64,
    /// The longest time between two answers (the times ping printed them, `-D`), the
    /// outage as the client saw it, to about one interval.
    pub longest_gap: Duration,
    /// When the longest gap began, after the first answer.
    pub gap_began: Duration,
    /// Pings sent after the last answer (a guest still out of reach at the end).
    pub unanswered_at_end: u64,
}

impl Pings {
    pub fn start(netns: &str, to: IpAddr, interval: Duration) -> Result<Pings> {
        let out = tempfile::NamedTempFile::new()?;
        let child = Command::new("ip")
            .args(["netns", "exec", netns, "ping", "-n", "-D", "-i"])
            .arg(format!("{:.3}", interval.as_secs_f64()))
            .arg(to.to_string())
            .stdout(out.reopen()?)
            .stderr(Stdio::null())
            .spawn()
            .context("start ping")?;
        Ok(Pings { child, out })
    }

    /// Where the output goes (to show it while it runs).
    pub fn output_path(&self) -> PathBuf {
        self.out.path().to_path_buf()
    }

    /// Stops ping (SIGINT: it prints its summary) and reads what it saw.
    pub fn stop(mut self) -> Result<PingsSeen> {
        crate::run(Command::new("kill").args(["-INT", &self.child.id().to_string()]))?;
        self.child.wait()?;
        let text = std::fs::read_to_string(self.out.path())?;
        parse_pings(&text)
    }
}

/// `ping -D` output: one line per answer (`[EPOCH.US] 64 bytes from ...: icmp_seq=N ...`,
/// `(DUP!)` at the end of a repeat), then the summary (`N packets transmitted, ...`).
pub fn parse_pings(text: &str) -> Result<PingsSeen> {
    let summary = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .with_context(|| format!("no summary in ping's output: {text}"))?;
    let sent: u64 = summary
        .split_whitespace()
        .next()
        .and_then(|w| w.parse().ok())
        .with_context(|| format!("ping's summary: {summary}"))?;
    let (mut answered, mut duplicates) = (0u64, 0u64);
    let mut times: Vec<f64> = Vec::new();
    let mut last_seq = 0u64;
    // (an error line, "From ... icmp_seq=N Destination Host Unreachable", is no answer)
    for line in text
        .lines()
        .filter(|l| l.contains("icmp_seq=") && l.contains(" bytes from "))
    {
        if line.contains("(DUP!)") {
            duplicates += 1;
            continue;
        }
        let at: f64 = line
            .strip_prefix('[')
            .and_then(|l| l.split(']').next())
            .and_then(|t| t.parse().ok())
            .with_context(|| format!("no timestamp in {line:?}"))?;
        answered += 1;
        times.push(at);
        last_seq = line
            .split("icmp_seq=")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .map_or(last_seq, |n: u64| n.max(last_seq));
    }
    let (mut longest, mut began) = (0.0f64, 0.0f64);
    for w in times.windows(2) {
        if w[1] - w[0] > longest {
            longest = w[1] - w[0];
            began = w[0] - times[0];
        }
    }
    ensure!(
        answered > 0 || sent == 0,
        "none of {sent} pings was answered"
    );
    Ok(PingsSeen {
        sent,
        answered,
        duplicates,
        longest_gap: Duration::from_secs_f64(longest),
        gap_began: Duration::from_secs_f64(began),
        unanswered_at_end: sent.saturating_sub(last_seq),
    })
}

/// A TCP connection from inside a network namespace to a guest's echo server (guest
/// `tern.echo=PORT`), streaming both ways until stopped: 1 KiB every 10 ms out,
/// everything checked as it comes back.
pub struct Echo {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<EchoSeen>>,
}

/// What an [`Echo`] saw.
#[derive(Debug)]
pub struct EchoSeen {
    /// Bytes sent, and the same bytes came back unchanged.
    pub bytes: u64,
    pub longest_silence: Duration,
}

/// Byte `i` of the echo stream.
fn echo_byte(i: u64) -> u8 {
    (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8
}

impl Echo {
    pub fn start(netns: &str, to: SocketAddr) -> Result<Echo> {
        use std::io::{Read, Write};
        let stop = Arc::new(AtomicBool::new(false));
        let (name, halt) = (netns.to_string(), stop.clone());
        let thread = std::thread::spawn(move || -> Result<EchoSeen> {
            crate::enter_netns(&name)?;
            let mut out = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(10))
                .context("connect to the guest's echo server")?;
            let mut back = out.try_clone()?;
            let writer = std::thread::spawn(move || -> Result<u64> {
                let mut sent = 0u64;
                while !halt.load(Ordering::SeqCst) {
                    let chunk: Vec<u8> = (sent..sent + 1024).map(echo_byte).collect();
                    out.write_all(&chunk)
                        .context("the TCP connection broke (sending)")?;
                    sent += 1024;
                    std::thread::sleep(Duration::from_millis(10));
                }
                out.shutdown(std::net::Shutdown::Write)?;
                Ok(sent)
            });
            back.set_read_timeout(Some(Duration::from_secs(60)))?;
            let (mut got, mut last, mut longest) = (0u64, Instant::now(), Duration::ZERO);
            let mut buf = vec![0u8; 65536];
            loop {
                let n = match back.read(&mut buf) {
                    // a signal to this process (a child's end), not the connection
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    r => r.context("the TCP connection broke (receiving)")?,
                };
                if n == 0 {
                    break;
                }
                longest = longest.max(last.elapsed());
                last = Instant::now();
                for (k, b) in buf[..n].iter().enumerate() {
                    let i = got + k as u64;
                    ensure!(*b == echo_byte(i), "byte {i} came back changed");
                }
                got += n as u64;
            }
            let sent = writer
                .join()
                .map_err(|_| anyhow::anyhow!("writer panicked"))??;
            ensure!(got == sent, "sent {sent} bytes, {got} came back");
            Ok(EchoSeen {
                bytes: got,
                longest_silence: longest,
            })
        });
        Ok(Echo { stop, thread })
    }

    /// Stops sending and leaves the connection to its end without waiting (the guest is
    /// out of reach: it would wait for the read timeout).
    pub fn abandon(self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Stops sending, waits for everything sent to come back: what it saw, or how the
    /// connection failed.
    pub fn stop(self) -> Result<EchoSeen> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("echo thread panicked"))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pings_count_answers_duplicates_and_the_longest_gap() {
        let text = "PING 198.19.0.2 (198.19.0.2) 56(84) bytes of data.\n\
            [1000.000] 64 bytes from 198.19.0.2: icmp_seq=1 ttl=64 time=50.1 ms\n\
            [1000.010] 64 bytes from 198.19.0.2: icmp_seq=2 ttl=64 time=50.2 ms\n\
            [1000.011] 64 bytes from 198.19.0.2: icmp_seq=2 ttl=64 time=51.0 ms (DUP!)\n\
            [1000.250] 64 bytes from 198.19.0.2: icmp_seq=26 ttl=64 time=50.0 ms\n\
            [1000.260] 64 bytes from 198.19.0.2: icmp_seq=27 ttl=64 time=50.0 ms\n\
            [1000.270] From 198.19.0.1 icmp_seq=28 Destination Host Unreachable\n\
            \n--- 198.19.0.2 ping statistics ---\n\
            30 packets transmitted, 4 received, +1 duplicates, 86.6667% packet loss, time 290ms\n";
        let s = parse_pings(text).unwrap();
        assert_eq!((s.sent, s.answered, s.duplicates), (30, 4, 1));
        assert!((s.longest_gap.as_secs_f64() - 0.240).abs() < 1e-6);
        assert!((s.gap_began.as_secs_f64() - 0.010).abs() < 1e-6);
        assert_eq!(s.unanswered_at_end, 3);
        assert!(parse_pings("garbage").is_err());
        assert!(parse_pings("5 packets transmitted, 0 received, 100% packet loss").is_err());
    }

    #[test]
    fn the_echo_stream_is_not_a_constant() {
        let b: std::collections::HashSet<u8> = (0..4096).map(echo_byte).collect();
        assert!(b.len() > 200);
    }
}
