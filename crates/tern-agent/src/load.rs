//! What this host and its VMs use (`GET /v1/load`, [`tern_api::HostLoad`]): a sampler
//! the agent runs every [`SAMPLE_EVERY`] and the latest sample it keeps. Per VM it reads
//! its QEMU process: CPU time (its own cgroup v2's `cpu.stat` when QEMU sits alone in
//! one, else `/proc/PID/stat`, all threads), resident memory (`/proc/PID/status`),
//! storage I/O (`/proc/PID/io`) and its taps' counters (`/sys/class/net/TAP/statistics`);
//! for the host `/proc/meminfo` and `/proc/stat`. Rates are the change over the
//! interval between two samples.
//!
//! Owns the parsing of those files (pure functions, tested with sample text: input that
//! does not parse gives None, never a panic) and the arithmetic of rates. Must not act on
//! what it measures (placement is the cluster controller's) nor touch a VM: it only reads.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tern_api::{HostLoad, VmLoad};
pub use tern_engine::hostcpu::{busy_cores, parse_pid_stat, parse_proc_stat, CpuTimes};

use crate::Agent;

/// How often the agent samples.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);

/// Where cgroup v2 is mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The sampler's memory between samples, and the latest sample.
pub struct Sampler {
    /// The agent's start: `uptime_ms` counts from it.
    started: Instant,
    /// The previous sample's raw counters; held through a whole sample (one at a time).
    previous: tokio::sync::Mutex<Previous>,
    latest: parking_lot::Mutex<Option<HostLoad>>,
}

impl Default for Sampler {
    fn default() -> Self {
        Sampler {
            started: Instant::now(),
            previous: Default::default(),
            latest: Default::default(),
        }
    }
}

#[derive(Default)]
struct Previous {
    at: Option<Instant>,
    host_cpu: Option<CpuTimes>,
    /// By VM name.
    vms: HashMap<String, VmCounters>,
}

/// A VM's raw counters at one sample.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct VmCounters {
    pid: u32,
    cpu_seconds: f64,
    rss_bytes: u64,
    disk_read_bytes: u64,
    disk_write_bytes: u64,
    net_rx_bytes: u64,
    net_tx_bytes: u64,
}

/// What the sampler needs of one VM, taken from the registry before the files are read.
struct VmFacts {
    name: String,
    state: String,
    pid: Option<u32>,
    vcpus: u32,
    mem_bytes: u64,
    tpm: bool,
    migrating: bool,
    /// (path, is qcow2) of each disk that is not shared.
    local_disks: Vec<(PathBuf, bool)>,
    nics: usize,
}

impl Sampler {
    /// The latest sample, if one was taken.
    pub fn latest(&self) -> Option<HostLoad> {
        self.latest.lock().clone()
    }
}

impl Agent {
    /// The latest load sample, or one taken now when there is none yet.
    pub async fn load(&self) -> HostLoad {
        match self.load_sampler.latest() {
            Some(l) => l,
            None => self.sample_load().await,
        }
    }

    /// Samples this host and its VMs now and keeps the result as the latest.
    pub async fn sample_load(&self) -> HostLoad {
        let mut facts = Vec::new();
        for vm in self.vms() {
            let state = vm.info().await.state;
            facts.push(VmFacts {
                name: vm.spec.name.clone(),
                state,
                pid: vm.pid,
                vcpus: vm.spec.vcpus,
                mem_bytes: u64::from(vm.spec.memory_mib) << 20,
                tpm: vm.spec.tpm,
                migrating: vm.migrating.load(Ordering::SeqCst),
                local_disks: vm
                    .spec
                    .disks
                    .iter()
                    .filter(|d| !d.shared)
                    .map(|d| {
                        (
                            d.path.clone(),
                            d.format == tern_qemu::spec::DiskFormat::Qcow2,
                        )
                    })
                    .collect(),
                nics: vm.spec.nics.len(),
            });
        }
        let capacity_cores = self.config.capacity_cores.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64)
        });
        let host = self.config.name.clone();
        let labels = self.engine.security.own_labels().to_vec();
        let mut previous = self.load_sampler.previous.lock().await;
        let prev = std::mem::take(&mut *previous);
        let started = self.load_sampler.started;
        // /proc and /sys, and disk images' headers: off the runtime
        let (load, next) = match tokio::task::spawn_blocking(move || {
            sample(host, labels, capacity_cores, started, facts, prev)
        })
        .await
        {
            Ok(s) => s,
            Err(e) => {
                // a bug; the next sample starts afresh (no rates)
                tracing::error!("the load sample failed: {e}");
                *previous = Previous::default();
                return self.load_sampler.latest().unwrap_or_else(|| HostLoad {
                    host: self.config.name.clone(),
                    labels: self.engine.security.own_labels().to_vec(),
                    capacity_cores,
                    mem_total_bytes: 0,
                    mem_available_bytes: 0,
                    cpu_busy_cores: 0.0,
                    uptime_ms: self.load_sampler.started.elapsed().as_millis() as u64,
                    interval_ms: 0,
                    vms: Vec::new(),
                    fence_after_s: None,
                });
            }
        };
        *previous = next;
        *self.load_sampler.latest.lock() = Some(load.clone());
        load
    }
}

/// Samples every [`SAMPLE_EVERY`] until the agent stops (the task is the agent's).
pub async fn run_sampler(agent: std::sync::Arc<Agent>) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        agent.sample_load().await;
    }
}

/// One sample: reads the files, computes the rates against `prev`.
fn sample(
    host: String,
    labels: Vec<String>,
    capacity_cores: f64,
    started: Instant,
    facts: Vec<VmFacts>,
    prev: Previous,
) -> (HostLoad, Previous) {
    let now = Instant::now();
    let hz = clock_ticks_per_second();
    let interval = prev.at.map(|at| now.duration_since(at));
    let secs = interval.map_or(0.0, |d| d.as_secs_f64());
    let rate = |now: u64, before: u64| match secs > 0.0 {
        true => now.saturating_sub(before) as f64 / secs,
        false => 0.0,
    };
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let (mem_total_bytes, mem_available_bytes) = read("/proc/meminfo")
        .and_then(|t| parse_meminfo(&t))
        .unwrap_or((0, 0));
    let host_cpu = read("/proc/stat").and_then(|t| parse_proc_stat(&t));
    let cpu_busy_cores = match (prev.host_cpu, host_cpu) {
        (Some(a), Some(b)) => busy_cores(a, b),
        _ => 0.0,
    };
    let own_cgroup = read("/proc/self/cgroup").and_then(|t| parse_cgroup(&t));
    let mut next = Previous {
        at: Some(now),
        host_cpu,
        vms: HashMap::new(),
    };
    let mut vms = Vec::new();
    for f in facts {
        let counters = f
            .pid
            .and_then(|pid| vm_counters(pid, f.nics, hz, own_cgroup.as_deref()))
            .unwrap_or_default();
        let before = prev
            .vms
            .get(&f.name)
            .filter(|b| b.pid == counters.pid && counters.pid != 0);
        let (cpu_cores, disk_read_bps, disk_write_bps, net_rx_bps, net_tx_bps) = match before {
            Some(b) if secs > 0.0 => (
                (counters.cpu_seconds - b.cpu_seconds).max(0.0) / secs,
                rate(counters.disk_read_bytes, b.disk_read_bytes),
                rate(counters.disk_write_bytes, b.disk_write_bytes),
                rate(counters.net_rx_bytes, b.net_rx_bytes),
                rate(counters.net_tx_bytes, b.net_tx_bytes),
            ),
            _ => (0.0, 0.0, 0.0, 0.0, 0.0),
        };
        vms.push(VmLoad {
            name: f.name.clone(),
            state: f.state,
            vcpus: f.vcpus,
            mem_bytes: f.mem_bytes,
            rss_bytes: counters.rss_bytes,
            cpu_cores,
            cpu_seconds: counters.cpu_seconds,
            disk_read_bps,
            disk_write_bps,
            net_rx_bps,
            net_tx_bps,
            disk_read_bytes: counters.disk_read_bytes,
            disk_write_bytes: counters.disk_write_bytes,
            net_rx_bytes: counters.net_rx_bytes,
            net_tx_bytes: counters.net_tx_bytes,
            tpm: f.tpm,
            local_disk_bytes: f
                .local_disks
                .iter()
                .map(|(p, qcow2)| disk_virtual_size(p, *qcow2).unwrap_or(0))
                .sum(),
            migrating: f.migrating,
        });
        next.vms.insert(f.name, counters);
    }
    let load = HostLoad {
        host,
        labels,
        capacity_cores,
        mem_total_bytes,
        mem_available_bytes,
        cpu_busy_cores,
        uptime_ms: now.duration_since(started).as_millis() as u64,
        interval_ms: interval.map_or(0, |d| d.as_millis() as u64),
        vms,
        fence_after_s: None,
    };
    (load, next)
}

/// Clock ticks per second of `/proc/PID/stat` and `/proc/stat` (`USER_HZ`).
fn clock_ticks_per_second() -> u64 {
    rustix::param::clock_ticks_per_second().max(1)
}

/// QEMU `pid`'s counters; None when its /proc entry is gone.
fn vm_counters(pid: u32, nics: usize, hz: u64, own_cgroup: Option<&str>) -> Option<VmCounters> {
    let proc = |f: &str| std::fs::read_to_string(format!("/proc/{pid}/{f}")).ok();
    let (utime, stime) = parse_pid_stat(&proc("stat")?)?;
    let from_proc = (utime + stime) as f64 / hz as f64;
    let cpu_seconds = proc("cgroup")
        .and_then(|t| parse_cgroup(&t))
        .filter(|c| Some(c.as_str()) != own_cgroup)
        .and_then(|c| own_cgroup_usage_usec(pid, &c))
        .map_or(from_proc, |usec| usec as f64 / 1e6);
    let rss_bytes = proc("status")
        .and_then(|t| parse_status_rss(&t))
        .unwrap_or(0);
    let (disk_read_bytes, disk_write_bytes) =
        proc("io").and_then(|t| parse_io(&t)).unwrap_or((0, 0));
    let (mut net_rx_bytes, mut net_tx_bytes) = (0, 0);
    for i in 0..nics {
        let Some(tap) = tern_net::tap::name_in(pid, tern_qemu::launch::NIC_FD_BASE + i as i32)
        else {
            continue;
        };
        let stat = |f: &str| {
            std::fs::read_to_string(format!("/sys/class/net/{tap}/statistics/{f}"))
                .ok()
                .and_then(|t| t.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        // a tap's rx is what the guest sent, its tx what the guest received
        net_tx_bytes += stat("rx_bytes");
        net_rx_bytes += stat("tx_bytes");
    }
    Some(VmCounters {
        pid,
        cpu_seconds,
        rss_bytes,
        disk_read_bytes,
        disk_write_bytes,
        net_rx_bytes,
        net_tx_bytes,
    })
}

/// `usage_usec` of cgroup `path` when QEMU `pid` is the only process in it (a cgroup it
/// shares, with the agent or other VMs, says nothing of this VM alone).
fn own_cgroup_usage_usec(pid: u32, path: &str) -> Option<u64> {
    let dir = Path::new(CGROUP_ROOT).join(path.trim_start_matches('/'));
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).ok()?;
    if !only_pid(&procs, pid) {
        return None;
    }
    parse_cpu_stat_usage_usec(&std::fs::read_to_string(dir.join("cpu.stat")).ok()?)
}

/// Whether a `cgroup.procs` lists `pid` and nothing else.
fn only_pid(procs: &str, pid: u32) -> bool {
    let mut listed = procs.split_whitespace();
    listed.next().and_then(|p| p.parse::<u32>().ok()) == Some(pid) && listed.next().is_none()
}

/// A disk image's virtual size: a raw file's length, a qcow2's `size` header field.
fn disk_virtual_size(path: &Path, qcow2: bool) -> Option<u64> {
    if !qcow2 {
        return std::fs::metadata(path).ok().map(|m| m.len());
    }
    use std::io::Read;
    let mut header = [0u8; 32];
    std::fs::File::open(path)
        .and_then(|f| f.take(32).read_exact(&mut header))
        .ok()?;
    qcow2_virtual_size(&header)
}

/// The virtual size in a qcow2 header (big-endian at offset 24), None if it is not one.
fn qcow2_virtual_size(header: &[u8]) -> Option<u64> {
    if header.get(..4)? != b"QFI\xfb" {
        return None;
    }
    Some(u64::from_be_bytes(header.get(24..32)?.try_into().ok()?))
}

/// The cgroup v2 path (`0::PATH`) of a `/proc/PID/cgroup`, unless it is the root.
pub fn parse_cgroup(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::trim)
        .filter(|p| p.starts_with('/') && *p != "/")
        .map(str::to_string)
}

/// `usage_usec` of a cgroup's `cpu.stat`.
pub fn parse_cpu_stat_usage_usec(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
}

/// A `N kB` value of `/proc/PID/status` or `/proc/meminfo`, in bytes.
fn kib_field(text: &str, key: &str) -> Option<u64> {
    let v = text.lines().find_map(|l| l.strip_prefix(key))?;
    let v = v.strip_prefix(':')?.trim();
    let n: u64 = v.strip_suffix("kB").unwrap_or(v).trim().parse().ok()?;
    n.checked_mul(1024)
}

/// `VmRSS` of a `/proc/PID/status`, bytes.
pub fn parse_status_rss(text: &str) -> Option<u64> {
    kib_field(text, "VmRSS")
}

/// `MemTotal` and `MemAvailable` of `/proc/meminfo`, bytes.
pub fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    Some((
        kib_field(text, "MemTotal")?,
        kib_field(text, "MemAvailable")?,
    ))
}

/// `read_bytes` and `write_bytes` of a `/proc/PID/io` (what reached the storage layer).
pub fn parse_io(text: &str) -> Option<(u64, u64)> {
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    Some((field("read_bytes")?, field("write_bytes")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_io_and_meminfo_give_bytes() {
        let status =
            "Name:\tqemu-system-x86\nVmPeak:\t 2000000 kB\nVmRSS:\t  123456 kB\nThreads:\t5\n";
        assert_eq!(parse_status_rss(status), Some(123456 * 1024));
        assert_eq!(parse_status_rss("VmRSS:\t lots kB\n"), None);
        assert_eq!(parse_status_rss("VmRSSx: 1 kB\n"), None);
        assert_eq!(parse_status_rss("Name: q\n"), None);
        // a kernel thread has no VmRSS; a huge value does not overflow
        assert_eq!(parse_status_rss("VmRSS: 18446744073709551615 kB\n"), None);

        let io = "rchar: 100\nwchar: 200\nsyscr: 3\nsyscw: 4\nread_bytes: 4096\nwrite_bytes: 8192\ncancelled_write_bytes: 0\n";
        assert_eq!(parse_io(io), Some((4096, 8192)));
        assert_eq!(parse_io("read_bytes: 1\n"), None);
        assert_eq!(parse_io("read_bytes: x\nwrite_bytes: 2\n"), None);
        assert_eq!(parse_io(""), None);

        let meminfo = "MemTotal:       16303224 kB\nMemFree:         1000000 kB\nMemAvailable:   12000000 kB\nBuffers:          100 kB\n";
        assert_eq!(
            parse_meminfo(meminfo),
            Some((16303224 * 1024, 12000000 * 1024))
        );
        assert_eq!(parse_meminfo("MemTotal: 5 kB\n"), None);
        assert_eq!(parse_meminfo("garbage\n\0\u{fffd}"), None);
    }

    #[test]
    fn a_cgroup_is_the_vms_own_only_when_it_is_not_the_root_and_holds_only_its_qemu() {
        assert_eq!(
            parse_cgroup("0::/machine.slice/tern-vm1.scope\n"),
            Some("/machine.slice/tern-vm1.scope".into())
        );
        // cgroup v1 lines first, then the unified one
        assert_eq!(
            parse_cgroup("12:cpu,cpuacct:/x\n0::/system.slice/tern.service\n"),
            Some("/system.slice/tern.service".into())
        );
        assert_eq!(parse_cgroup("0::/\n"), None);
        assert_eq!(parse_cgroup("12:cpu:/x\n"), None, "v1 only");
        assert_eq!(parse_cgroup("0::relative\n"), None);
        assert_eq!(parse_cgroup(""), None);
        assert!(only_pid("4242\n", 4242));
        assert!(!only_pid("4242\n4243\n", 4242));
        assert!(!only_pid("17\n", 4242));
        assert!(!only_pid("", 4242));
        let stat = "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\nnr_periods 0\n";
        assert_eq!(parse_cpu_stat_usage_usec(stat), Some(2_500_000));
        assert_eq!(parse_cpu_stat_usage_usec("usage_usec -1\n"), None);
        assert_eq!(parse_cpu_stat_usage_usec("user_usec 5\n"), None);
    }

    #[test]
    fn a_qcow2_header_gives_its_virtual_size() {
        let mut h = b"QFI\xfb".to_vec();
        h.resize(24, 0);
        h.extend_from_slice(&(16u64 << 30).to_be_bytes());
        assert_eq!(qcow2_virtual_size(&h), Some(16 << 30));
        assert_eq!(qcow2_virtual_size(&h[..20]), None, "cut short");
        h[0] = b'X';
        assert_eq!(qcow2_virtual_size(&h), None, "not a qcow2");
        assert_eq!(qcow2_virtual_size(&[]), None);
    }

    #[test]
    fn a_vm_whose_process_is_gone_gives_zeros_and_rates_need_two_samples() {
        let started = Instant::now();
        let gone = VmFacts {
            name: "gone".into(),
            state: "exited".into(),
            // beyond pid_max: no such process
            pid: Some(u32::MAX - 1),
            vcpus: 2,
            mem_bytes: 256 << 20,
            tpm: true,
            migrating: false,
            local_disks: vec![(PathBuf::from("/nonexistent/disk.img"), false)],
            nics: 1,
        };
        let me = VmFacts {
            name: "me".into(),
            state: "running".into(),
            // the test process stands in for a QEMU
            pid: Some(std::process::id()),
            vcpus: 1,
            mem_bytes: 1 << 30,
            tpm: false,
            migrating: true,
            local_disks: Vec::new(),
            nics: 0,
        };
        let (first, prev) = sample(
            "h".into(),
            vec!["l".into()],
            3.0,
            started,
            vec![gone, me],
            Previous::default(),
        );
        assert_eq!(first.interval_ms, 0);
        assert_eq!(first.cpu_busy_cores, 0.0);
        let g = &first.vms[0];
        assert_eq!(
            (g.cpu_seconds, g.rss_bytes, g.local_disk_bytes, g.tpm),
            (0.0, 0, 0, true)
        );
        let m = &first.vms[1];
        assert!(m.rss_bytes > 0 && m.migrating, "{m:?}");
        assert_eq!(m.cpu_cores, 0.0, "no rate in a first sample");
        // burn some CPU, then a second sample has an interval and a rate
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(200) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let again = VmFacts {
            name: "me".into(),
            state: "running".into(),
            pid: Some(std::process::id()),
            vcpus: 1,
            mem_bytes: 1 << 30,
            tpm: false,
            migrating: false,
            local_disks: Vec::new(),
            nics: 0,
        };
        let (second, _) = sample("h".into(), vec![], 3.0, started, vec![again], prev);
        assert!(second.interval_ms >= 200, "{second:?}");
        assert!(second.uptime_ms >= second.interval_ms);
        let m = &second.vms[0];
        assert!(m.cpu_seconds >= first.vms[1].cpu_seconds);
        assert!(m.cpu_cores > 0.0, "{m:?}");
        assert!(second.mem_total_bytes >= second.mem_available_bytes && second.mem_total_bytes > 0);
    }
}
