//! The host's CPU, as the prediction needs it: how many cores are busy over a window
//! (everything on the host, from `/proc/stat`), how many of them one process took (a
//! guest's QEMU, from `/proc/PID/stat`), and what a migration's data path cost per GiB of
//! QEMU's stream. Linux only; elsewhere (or when `/proc` cannot be read) nothing is known.
//! Window ratios of clock ticks, so `USER_HZ` is never needed. The parsers of `/proc/stat`
//! and `/proc/PID/stat` are the agent's load report's too (`tern_agent::load`).

use std::time::Instant;

/// One reading of the host's and one process's CPU clock ticks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuReading {
    at: Instant,
    cpu: CpuTimes,
    /// The process's own ticks (user and system), when one was asked for and readable.
    process: Option<u64>,
}

/// Busy cores over a window between two readings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuWindow {
    pub secs: f64,
    pub cores: u32,
    /// Cores busy on the host, all of them counted.
    pub busy_cores: f64,
    /// Cores the process took (None: not read).
    pub process_cores: Option<f64>,
}

impl CpuWindow {
    /// Cores nobody used over the window.
    pub fn free_cores(&self) -> f64 {
        (f64::from(self.cores) - self.busy_cores).max(0.0)
    }
}

/// Reads the host's CPU ticks now, and `pid`'s if given.
pub fn read(pid: Option<u32>) -> Option<CpuReading> {
    let cpu = parse_proc_stat(&std::fs::read_to_string("/proc/stat").ok()?)?;
    let process = pid
        .and_then(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .and_then(|t| parse_pid_stat(&t))
        .and_then(|(utime, stime)| utime.checked_add(stime));
    Some(CpuReading {
        at: Instant::now(),
        cpu,
        process,
    })
}

/// The window from `a` to `b` (None when no tick passed, or the readings disagree: a
/// counter went backwards, or cores came or went between them).
pub fn window(a: &CpuReading, b: &CpuReading) -> Option<CpuWindow> {
    let (x, y) = (a.cpu, b.cpu);
    if x.cores != y.cores {
        return None;
    }
    let busy = y.busy.checked_sub(x.busy)?;
    let total = busy
        .checked_add(y.idle.checked_sub(x.idle)?)
        .filter(|t| *t > 0)? as f64;
    let cores = y.cores.max(1);
    let per_core = total / f64::from(cores);
    Some(CpuWindow {
        secs: b.at.saturating_duration_since(a.at).as_secs_f64(),
        cores,
        busy_cores: busy_cores(x, y),
        // a process whose ticks went backwards is another one (the pid was reused)
        process_cores: match (a.process, b.process) {
            (Some(p), Some(q)) => q
                .checked_sub(p)
                .map(|t| (t as f64 / per_core).min(f64::from(cores))),
            _ => None,
        },
    })
}

/// The host's CPU time from `/proc/stat`'s aggregate `cpu` line, clock ticks, and the
/// cores it sums (its `cpuN` lines).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTimes {
    /// user, nice, system, irq, softirq, steal (guest time is inside user already).
    pub busy: u64,
    /// idle and iowait.
    pub idle: u64,
    pub cores: u32,
}

/// The aggregate `cpu` line of `/proc/stat`, and how many `cpuN` lines follow it.
pub fn parse_proc_stat(text: &str) -> Option<CpuTimes> {
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some("cpu"))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    if v.len() < 4 {
        return None;
    }
    let busy = [0, 1, 2, 5, 6, 7]
        .iter()
        .try_fold(0u64, |s, &i| s.checked_add(at(i)))?;
    let cores = text
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.strip_prefix("cpu"))
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .count();
    Some(CpuTimes {
        busy,
        idle: at(3).checked_add(at(4))?,
        cores: cores.max(1) as u32,
    })
}

/// Cores busy between two `/proc/stat` samples: the busy share of all ticks counted,
/// times the cores counted (no clock needed, so no error from when the files were read).
pub fn busy_cores(before: CpuTimes, now: CpuTimes) -> f64 {
    let busy = now.busy.saturating_sub(before.busy) as f64;
    let idle = now.idle.saturating_sub(before.idle) as f64;
    if busy + idle <= 0.0 {
        return 0.0;
    }
    busy / (busy + idle) * f64::from(now.cores)
}

/// `utime` and `stime` (clock ticks, all threads) of a `/proc/PID/stat`. The command
/// name (field 2) may hold spaces and parentheses: the fields start after its last `)`.
pub fn parse_pid_stat(text: &str) -> Option<(u64, u64)> {
    let (_, rest) = text.rsplit_once(')')?;
    // rest: " STATE PPID ..."; utime and stime are fields 14 and 15 of the line
    let mut f = rest.split_whitespace().skip(11);
    let utime = f.next()?.parse().ok()?;
    let stime = f.next()?.parse().ok()?;
    Some((utime, stime))
}

/// The least the cores busy over a transfer must rise above those busy before it to say
/// what the migration cost (below, a slow migration's cost is lost in the host's noise).
pub const MIN_MIGRATION_CORES: f64 = 0.2;
/// The most CPU seconds per GiB taken as a measurement (above: something else ran).
pub const MAX_CORE_S_PER_GIB: f64 = 120.0;

/// CPU seconds a migration's data path took on this host per GiB of QEMU's stream: the
/// cores busy over the transfer beyond those busy before it, over the stream's bytes
/// (None: too short, too little crossed, or too little CPU taken, to say).
pub fn core_seconds_per_gib(
    before: &CpuWindow,
    during: &CpuWindow,
    stream_bytes: u64,
) -> Option<f64> {
    if during.secs < 1.0 || stream_bytes < 16 << 20 || before.cores != during.cores {
        return None;
    }
    // the guest's QEMU is in both windows (a throttled guest takes less during: the
    // agent learns only from migrations that were not throttled)
    let migration_cores = during.busy_cores - before.busy_cores;
    if migration_cores < MIN_MIGRATION_CORES {
        return None;
    }
    Some(migration_cores * during.secs / (stream_bytes as f64 / (1u64 << 30) as f64))
        .filter(|c| *c <= MAX_CORE_S_PER_GIB)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const STAT: &str = "cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 50 0 50 350 50 0 0 0 0 0\ncpu1 50 0 50 350 50 0 0 0 0 0\nintr 1 2 3\n";

    #[test]
    fn busy_is_all_but_idle_and_iowait_and_cores_are_the_cpu_n_lines() {
        assert_eq!(
            parse_proc_stat(STAT),
            Some(CpuTimes {
                busy: 200,
                idle: 800,
                cores: 2
            })
        );
        assert_eq!(parse_proc_stat("intr 1\n"), None);
        assert_eq!(parse_proc_stat("cpu  1 2\n"), None);
    }

    #[test]
    fn a_process_s_ticks_count_from_the_parenthesis() {
        let t = "42 (qemu system x86) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 100";
        assert_eq!(parse_pid_stat(t), Some((250, 50)));
        assert_eq!(parse_pid_stat("42 (x) S 1"), None);
    }

    #[test]
    fn a_stat_line_is_read_after_the_last_parenthesis_of_its_command_name() {
        // comm with spaces and parentheses, as a thread may name itself
        let line = "4242 (qemu (x) ) y) S 1 4242 4242 0 -1 4194560 9000 0 3 0 1234 567 0 0 20 0 5 0 100 2000000 3000 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0\n";
        assert_eq!(parse_pid_stat(line), Some((1234, 567)));
        let plain = "1 (qemu-system-x86) R 0 1 1 0 -1 0 0 0 0 0 10 20 0 0";
        assert_eq!(parse_pid_stat(plain), Some((10, 20)));
        for bad in [
            "",
            "4242 qemu S 1",
            "4242 (qemu) S 1 2 3",
            "4242 (qemu) S 1 4242 4242 0 -1 0 0 0 0 0 x 5",
            "4242 (qemu) S 1 4242 4242 0 -1 0 0 0 0 0 -3 5",
            ")",
        ] {
            assert_eq!(parse_pid_stat(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_host_cpu_line_and_busy_cores_between_two_samples() {
        let a = "cpu  100 10 50 1000 40 5 5 0 7 0\ncpu0 50 5 25 500 20 2 3 0 0 0\nintr 1 2 3\n";
        let t = parse_proc_stat(a).unwrap();
        assert_eq!(
            t,
            CpuTimes {
                busy: 170,
                idle: 1040,
                cores: 1
            }
        );
        // an old kernel's shorter line (no cpuN lines: one core assumed)
        assert_eq!(
            parse_proc_stat("cpu 1 2 3 4\n"),
            Some(CpuTimes {
                busy: 6,
                idle: 4,
                cores: 1
            })
        );
        assert_eq!(
            parse_proc_stat("cpu0 1 2 3 4\n"),
            None,
            "only the aggregate line"
        );
        assert_eq!(parse_proc_stat("cpu 1 2\n"), None);
        assert_eq!(parse_proc_stat("cpu 1 x 3 4\n"), None);
        assert_eq!(parse_proc_stat(""), None);
        // four cores, half busy
        let four = |busy, idle| CpuTimes {
            busy,
            idle,
            cores: 4,
        };
        assert_eq!(
            parse_proc_stat(
                "cpu 4 0 0 4\ncpu0 1 0 0 1\ncpu1 1 0 0 1\ncpu2 1 0 0 1\ncpu3 1 0 0 1\ncpufreq 9\n"
            )
            .map(|c| c.cores),
            Some(4)
        );
        assert!((busy_cores(four(170, 1040), four(270, 1140)) - 2.0).abs() < 1e-9);
        assert_eq!(busy_cores(t, t), 0.0, "no time passed");
        assert_eq!(
            busy_cores(four(270, 1140), four(170, 1040)),
            0.0,
            "counters that went back"
        );
    }

    #[test]
    fn windows_are_ratios_of_ticks() {
        let at = Instant::now();
        let times = |busy, idle| CpuTimes {
            busy,
            idle,
            cores: 2,
        };
        let a = CpuReading {
            at,
            cpu: times(200, 800),
            process: Some(10),
        };
        // 1 s later: 200 ticks in all (2 cores at 100 Hz), 150 of them busy, 80 the process's
        let b = CpuReading {
            at: at + Duration::from_secs(1),
            cpu: times(350, 850),
            process: Some(90),
        };
        let w = window(&a, &b).unwrap();
        assert!((w.busy_cores - 1.5).abs() < 1e-9 && (w.free_cores() - 0.5).abs() < 1e-9);
        assert!((w.process_cores.unwrap() - 0.8).abs() < 1e-9);
        assert_eq!(window(&b, &a), None);
        // before: 0.5 core busy; during 4 s: 1.5 busy; 2 GiB crossed: 1 core x 4 s / 2 GiB
        let before = CpuWindow {
            busy_cores: 0.5,
            ..w
        };
        let during = CpuWindow { secs: 4.0, ..w };
        assert_eq!(core_seconds_per_gib(&before, &during, 2 << 30), Some(2.0));
        // too little crossed, too short, or too little CPU taken, says nothing
        assert_eq!(core_seconds_per_gib(&before, &during, 1 << 20), None);
        let short = CpuWindow { secs: 0.5, ..w };
        assert_eq!(core_seconds_per_gib(&before, &short, 2 << 30), None);
        let quiet = CpuWindow {
            busy_cores: 0.6,
            ..during
        };
        assert_eq!(core_seconds_per_gib(&before, &quiet, 2 << 30), None);
        // 1 core for 4 s over 32 MiB: 128 s per GiB, more than is believable
        assert_eq!(core_seconds_per_gib(&before, &during, 32 << 20), None);
        // cores that came or went, or a process that went backwards
        let more = CpuReading {
            cpu: CpuTimes { cores: 3, ..b.cpu },
            ..b
        };
        assert_eq!(window(&a, &more), None);
        let reused = CpuReading {
            process: Some(5),
            ..b
        };
        assert_eq!(window(&a, &reused).unwrap().process_cores, None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_host_can_be_read() {
        let a = read(Some(std::process::id())).expect("/proc/stat");
        assert!(a.cpu.cores >= 1 && a.process.is_some());
    }
}
