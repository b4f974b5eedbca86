//! `tern-bench tls`: what mutual TLS costs. Two measurements in one run, on loopback:
//! 1. the agents' connection alone: 1 GiB through one [`PeerSecurity`] connection, TLS vs
//!    the test-only plaintext mode: throughput and the process's CPU seconds per GiB;
//! 2. the same live migration through two agents with TLS and with
//!    `TERN_INSECURE_PLAINTEXT=1`, alternating, median of N: QEMU's transfer throughput,
//!    downtime, and whole-machine CPU seconds.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use tern_engine::transport::tls::PeerSecurity;
use tern_testkit::agents::{issue_cert, test_ca, TEST_CA};
use tern_testkit::guest::GuestImage;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{median, via_tern, Sample};

const PLAIN: &[(&str, &str)] = &[("TERN_INSECURE_PLAINTEXT", "1")];

/// CPU seconds (user + system) of this process so far.
fn self_cpu_seconds() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // fields after the command: state is [0]; utime [11], stime [12] in clock ticks
    let t = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / 100.0
}

/// Sends `bytes` through one connection secured as `sec`; (Gbit/s, CPU s per GiB).
async fn stream(sec: &PeerSecurity, bytes: u64) -> Result<(f64, f64)> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let server = sec.clone();
    let rx = tokio::spawn(async move {
        let (tcp, a) = l.accept().await?;
        let (mut s, _) = server
            .accept(tcp, a, Duration::from_secs(5), Duration::from_secs(20))
            .await?;
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            let k = s.read(&mut buf).await?;
            if k == 0 {
                break;
            }
            n += k as u64;
        }
        anyhow::Ok(n)
    });
    let (mut s, _) = sec
        .connect(
            &addr.to_string(),
            Duration::from_secs(5),
            Duration::from_secs(20),
        )
        .await?;
    // page-like data (not all zero, so nothing could shortcut it)
    let chunk: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let cpu0 = self_cpu_seconds();
    let t0 = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        s.write_all(&chunk).await?;
        sent += chunk.len() as u64;
    }
    s.shutdown().await?;
    let got = rx.await??;
    let secs = t0.elapsed().as_secs_f64();
    let cpu = self_cpu_seconds() - cpu0;
    anyhow::ensure!(got == sent, "received {got} of {sent} bytes");
    Ok((
        sent as f64 * 8.0 / 1e9 / secs,
        cpu / (sent as f64 / (1u64 << 30) as f64),
    ))
}

pub fn bench(bin: &Path, g: &GuestImage, rounds: usize, only: Option<&str>) -> Result<String> {
    let mut out = String::new();
    out.push_str(&format!(
        "TLS vs the test-only plaintext mode, loopback, same run, median of {rounds}.\n\n"
    ));

    // 1. the connection alone
    let dir = tempfile::tempdir()?;
    issue_cert(
        &test_ca(Path::new(TEST_CA))?,
        "bench",
        "127.0.0.1".parse()?,
        &[],
        dir.path(),
    )?;
    let tls = PeerSecurity::load(dir.path())?;
    let rt = tokio::runtime::Runtime::new()?;
    let (mut t_thr, mut t_cpu, mut p_thr, mut p_cpu) = (vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        let (a, b) = rt.block_on(stream(&PeerSecurity::Plaintext, 1 << 30))?;
        p_thr.push(a);
        p_cpu.push(b);
        let (a, b) = rt.block_on(stream(&tls, 1 << 30))?;
        t_thr.push(a);
        t_cpu.push(b);
    }
    out.push_str("One agent connection, 1 GiB, sender and receiver in one process (both ends' CPU):\n\n| mode | Gbit/s | CPU s per GiB |\n|---|---|---|\n");
    let (pt, pc, tt, tc) = (median(p_thr), median(p_cpu), median(t_thr), median(t_cpu));
    out.push_str(&format!(
        "| plaintext | {pt:.2} | {pc:.2} |\n| TLS 1.3 (rustls, ring) | {tt:.2} | {tc:.2} |\n\n"
    ));

    // 2. a live migration
    let workloads = [
        ("idle 512 MiB", "tern.workload=idle"),
        (
            "dirtier 512 MiB, 64 MiB hot",
            "tern.workload=dirty tern.mib=64 tern.rate=0",
        ),
    ];
    out.push_str("Live migration through two agents (whole machine: both QEMUs, both agents):\n\n| workload | mode | QEMU transfer ms | throughput Mbit/s | downtime ms | CPU s |\n|---|---|---|---|---|---|\n");
    let mut ratios = format!(
        "- connection alone: TLS throughput {:.2}x plaintext, CPU per GiB {:.2}x\n",
        tt / pt.max(1e-9),
        tc / pc.max(1e-9)
    );
    for (label, append) in workloads {
        if only.is_some_and(|o| !label.contains(o)) {
            continue;
        }
        let (mut plain, mut tls) = (Vec::<Sample>::new(), Vec::<Sample>::new());
        for i in 0..rounds {
            eprintln!("[{label}] round {}: plaintext", i + 1);
            plain.push(via_tern(bin, g, append, PLAIN)?);
            eprintln!("[{label}] round {}: TLS", i + 1);
            tls.push(via_tern(bin, g, append, &[])?);
        }
        let m = |v: &[Sample], f: fn(&Sample) -> f64| median(v.iter().map(f).collect());
        for (name, v) in [("plaintext", &plain), ("TLS", &tls)] {
            out.push_str(&format!(
                "| {label} | {name} | {:.0} | {:.0} | {:.0} | {:.2} |\n",
                m(v, |s| s.qemu_ms),
                m(v, |s| s.throughput_mbps),
                m(v, |s| s.downtime_ms),
                m(v, |s| s.cpu_s),
            ));
        }
        ratios.push_str(&format!(
            "- {label}: TLS throughput {:.2}x plaintext (target >= 0.90x), CPU {:.2}x, downtime {:+.0} ms\n",
            m(&tls, |s| s.throughput_mbps) / m(&plain, |s| s.throughput_mbps).max(1e-9),
            m(&tls, |s| s.cpu_s) / m(&plain, |s| s.cpu_s).max(1e-9),
            m(&tls, |s| s.downtime_ms) - m(&plain, |s| s.downtime_ms),
        ));
    }
    out.push('\n');
    out.push_str(&ratios);
    Ok(out)
}
