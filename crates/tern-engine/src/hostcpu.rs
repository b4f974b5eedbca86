//! The host's CPU, as the prediction needs it: how many cores are busy over a window
//! (everything on the host, from `/proc/stat`), how many of them one process took (a
//! guest's QEMU, from `/proc/PID/stat`), and what a migration's data path cost per GiB of
//! QEMU's stream. Linux only; elsewhere (or when `/proc` cannot be read) nothing is known.
//! Window ratios of clock ticks, so `USER_HZ` is never needed.

use std::time::Instant;

/// One reading of the host's and one process's CPU clock ticks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuReading {
    at: Instant,
    /// Ticks of all cores together: busy (not idle, not waiting on I/O), and in all.
    busy: u64,
    total: u64,
    /// The process's own ticks (user and system), when one was asked for and readable.
    process: Option<u64>,
    cores: u32,
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
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let (busy, total, cores) = parse_stat(&stat)?;
    let process = pid
        .and_then(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .and_then(|t| parse_pid_ticks(&t));
    Some(CpuReading {
        at: Instant::now(),
        busy,
        total,
        process,
        cores,
    })
}

/// The window from `a` to `b` (None when no tick passed, or the readings disagree: a
/// counter went backwards, or cores came or went between them).
pub fn window(a: &CpuReading, b: &CpuReading) -> Option<CpuWindow> {
    if a.cores != b.cores {
        return None;
    }
    let total = b.total.checked_sub(a.total).filter(|t| *t > 0)? as f64;
    let busy = b.busy.checked_sub(a.busy)? as f64;
    let cores = b.cores.max(1);
    let per_core = total / f64::from(cores);
    Some(CpuWindow {
        secs: b.at.saturating_duration_since(a.at).as_secs_f64(),
        cores,
        busy_cores: (busy / per_core).clamp(0.0, f64::from(cores)),
        // a process whose ticks went backwards is another one (the pid was reused)
        process_cores: match (a.process, b.process) {
            (Some(x), Some(y)) => y
                .checked_sub(x)
                .map(|t| (t as f64 / per_core).min(f64::from(cores))),
            _ => None,
        },
    })
}

/// The aggregate `cpu` line of `/proc/stat`: busy ticks, all ticks, and the number of
/// `cpuN` lines (cores online).
fn parse_stat(text: &str) -> Option<(u64, u64, u32)> {
    let mut lines = text.lines();
    let first = lines.next()?;
    let mut fields = first.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest time is inside user)
    let v: Vec<u64> = fields
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    if v.len() < 5 {
        return None;
    }
    let idle = v[3] + v[4];
    let total: u64 = v.iter().sum();
    let cores = lines
        .take_while(|l| l.starts_with("cpu"))
        .filter(|l| l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count() as u32;
    Some((total - idle, total, cores.max(1)))
}

/// utime + stime of `/proc/PID/stat` (fields 14 and 15; the command name in parentheses
/// may hold spaces, so fields count from its closing parenthesis).
fn parse_pid_ticks(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // after ")": state is field 3, so utime (14) is index 11 and stime (15) index 12
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
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
        assert_eq!(parse_stat(STAT), Some((200, 1000, 2)));
        assert_eq!(parse_stat("intr 1\n"), None);
        assert_eq!(parse_stat("cpu  1 2\n"), None);
    }

    #[test]
    fn a_process_s_ticks_count_from_the_parenthesis() {
        let t = "42 (qemu system x86) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 100";
        assert_eq!(parse_pid_ticks(t), Some(300));
        assert_eq!(parse_pid_ticks("42 (x) S 1"), None);
    }

    #[test]
    fn windows_are_ratios_of_ticks() {
        let at = Instant::now();
        let a = CpuReading {
            at,
            busy: 200,
            total: 1000,
            process: Some(10),
            cores: 2,
        };
        // 1 s later: 200 ticks in all (2 cores at 100 Hz), 150 of them busy, 80 the process's
        let b = CpuReading {
            at: at + Duration::from_secs(1),
            busy: 350,
            total: 1200,
            process: Some(90),
            cores: 2,
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
        let more = CpuReading { cores: 3, ..b };
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
        assert!(a.cores >= 1 && a.process.is_some());
    }
}
