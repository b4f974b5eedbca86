//! Live disk migration QEMU to QEMU on this machine, with real parts and no tern agents:
//! `tern_qemu::disk` drives both QEMUs over QMP, tern-nbd carries the disk (reads from the
//! source's read-only export of a frozen dirty bitmap, writes into the incoming
//! destination's writable export), QEMU migrates the memory over a unix socket with
//! pause-before-switchover, and the last disk round runs while the source is paused.
//!
//! The guest (guest/init `tern.disk=1`, guest/src/disk.c) rewrites files on an ext4
//! filesystem with O_DIRECT + fsync the whole time and verifies them with O_DIRECT reads,
//! so after the switchover it reads what tern wrote into the destination's image.
//! Proves: the images are identical at the switchover (`qemu-img compare`, a qcow2 overlay
//! on a backing file against a flat qcow2), the guest goes on writing and reading on the
//! destination without a mismatch, and the filesystem checks clean afterwards.

mod common;
use common::guest;
use std::ops::Range;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use serde_json::json;
use tern_nbd::{dirty_bitmap_context, ConnectOptions, NbdClient, BASE_ALLOCATION};
use tern_qemu::disk::{self, DirtyTracker, NbdExport, RemoveMode};
use tern_qemu::launch::{LaunchOptions, QemuProcess};
use tern_qemu::spec::{Accel, DiskFormat, DiskSpec, VmSpec};
use tokio::net::UnixStream;

const DISK_BYTES: u64 = 64 << 20;
/// Dirty-bitmap granularity: tern-chunks' block size, so bytes per round are exact.
const GRANULARITY: u32 = 4096;
/// Largest read (and write) of one copy step.
const PIECE: u64 = 1 << 20;
/// Live rounds stop once a round finds at most this much dirty...
const CONVERGED_BYTES: u64 = 256 << 10;
/// ...or after this many rounds.
const MAX_LIVE_ROUNDS: u64 = 12;
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// The guest's write rate (tern.disk_rate), KiB/s.
const RATE_KIBPS: u32 = 1024;
/// QEMU's bandwidth cap for RAM: about 2 s of RAM migration, so disk rounds go on
/// beside it for a while.
const RAM_BYTES_PER_SEC: u64 = 32 << 20;
/// While RAM moves, disk rounds start at most this often.
const RAM_PHASE_ROUND_INTERVAL: Duration = Duration::from_millis(100);

type Nbd = NbdClient<UnixStream>;

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs a command; returns (exit code, stdout + stderr).
fn run(cmd: &mut Command) -> Result<(i32, String)> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.code().unwrap_or(-1), text))
}

fn run_ok(cmd: &mut Command) -> Result<String> {
    let (code, text) = run(cmd)?;
    ensure!(code == 0, "{cmd:?} exited with {code}: {text}");
    Ok(text)
}

/// The guest's last `TERN-DISK ok|bad seq=K full=P verified=V bad=E` line: (K, P, E).
fn disk_status(console: &str) -> Option<(u64, u64, u64)> {
    let complete = &console[..console.rfind('\n').map_or(0, |i| i + 1)];
    complete.lines().rev().find_map(|l| {
        let rest = l
            .trim_end_matches('\r')
            .strip_prefix("TERN-DISK ok ")
            .or_else(|| l.strip_prefix("TERN-DISK bad "))?;
        let field = |k: &str| {
            rest.split(' ')
                .find_map(|f| f.strip_prefix(k))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        Some((field("seq=")?, field("full=")?, field("bad=")?))
    })
}

fn disk_trouble(console: &str) -> Vec<&str> {
    console
        .lines()
        .filter(|l| {
            l.contains("TERN-DISK-CORRUPT")
                || l.contains("TERN-DISK-ERROR")
                || l.starts_with("TERN-DISK bad")
        })
        .collect()
}

async fn wait_console(q: &QemuProcess, needle: &str, limit: Duration) -> Result<()> {
    let t0 = Instant::now();
    loop {
        let text = q.console_text();
        if text.contains(needle) {
            return Ok(());
        }
        let trouble = disk_trouble(&text);
        ensure!(trouble.is_empty(), "guest: {trouble:?}");
        if t0.elapsed() > limit {
            bail!("no {needle:?} on the console after {limit:?}:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits for a `TERN-DISK ok` line whose (seq, full, bad) satisfies `want`.
async fn wait_disk_status(
    q: &QemuProcess,
    want: impl Fn((u64, u64, u64)) -> bool,
    limit: Duration,
) -> Result<(u64, u64, u64)> {
    let t0 = Instant::now();
    loop {
        let text = q.console_text();
        let trouble = disk_trouble(&text);
        ensure!(trouble.is_empty(), "guest: {trouble:?}\n{text}");
        if let Some(s) = disk_status(&text).filter(|s| want(*s)) {
            return Ok(s);
        }
        ensure!(
            t0.elapsed() < limit,
            "no TERN-DISK line as wanted after {limit:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Copies `ranges` from the source's export to the destination's, in pieces of at most
/// [`PIECE`]. With `skip_zero`, 64 KiB pieces that read as zero are not written (the
/// destination image is new, so they read as zero there already). Returns bytes written.
async fn copy_ranges(
    src: &mut Nbd,
    dst: &mut Nbd,
    ranges: &[Range<u64>],
    skip_zero: bool,
) -> Result<u64> {
    let mut written = 0;
    let mut buf = vec![0u8; PIECE as usize];
    for r in ranges {
        let mut at = r.start;
        while at < r.end {
            let n = (r.end - at).min(PIECE) as usize;
            src.read_into(&mut buf[..n], at).await?;
            if skip_zero {
                for (i, piece) in buf[..n].chunks(64 << 10).enumerate() {
                    if piece.iter().any(|b| *b != 0) {
                        dst.write(piece, at + (i as u64) * (64 << 10)).await?;
                        written += piece.len() as u64;
                    }
                }
            } else {
                dst.write(&buf[..n], at).await?;
                written += n as u64;
            }
            at += n as u64;
        }
    }
    Ok(written)
}

/// What one round moved.
#[derive(Debug, Clone, Copy)]
struct Round {
    round: u64,
    dirty_bytes: u64,
    written_bytes: u64,
    elapsed: Duration,
    /// QMP time: freeze + export + export removal + bitmap removal.
    qmp: Duration,
}

/// One round on the source: freeze the recording bitmap, export it, copy what it marks
/// dirty (round 0: everything allocated) to the destination, remove the export, drop
/// the bitmap.
async fn round(
    src: &QemuProcess,
    tracker: &mut DirtyTracker,
    src_sock: &Path,
    dst: &mut Nbd,
) -> Result<Round> {
    let t0 = Instant::now();
    let frozen = tracker.freeze(&src.qmp).await?;
    let export: NbdExport = disk::export_frozen(&src.qmp, &frozen).await?;
    let mut qmp_time = t0.elapsed();
    let ctx = dirty_bitmap_context(&frozen.bitmap);
    let opts = ConnectOptions::new(export.name.clone())
        .with_dirty_bitmap(&frozen.bitmap)
        .with_base_allocation();
    let mut client = NbdClient::connect_unix(src_sock, &opts).await?;
    ensure!(client.info().flags.read_only(), "source export is writable");
    ensure!(
        client.size() == DISK_BYTES,
        "source export size {}",
        client.size()
    );
    let (dirty_bytes, written_bytes) = if frozen.round == 0 {
        // Full copy: everything that does not read as zero.
        let alloc = client
            .meta_context_id(BASE_ALLOCATION)
            .context("base:allocation not negotiated")?;
        let data: Vec<Range<u64>> = client
            .extents(alloc, 0..DISK_BYTES)
            .await?
            .into_iter()
            .filter(|e| !e.is_zero())
            .map(|e| e.range())
            .collect();
        let bytes = data.iter().map(|r| r.end - r.start).sum();
        (bytes, copy_ranges(&mut client, dst, &data, true).await?)
    } else {
        let id = client
            .meta_context_id(&ctx)
            .with_context(|| format!("{ctx} not negotiated"))?;
        let dirty = client.dirty_ranges(id, 0..DISK_BYTES).await?;
        let bytes = dirty.iter().map(|r| r.end - r.start).sum();
        (bytes, copy_ranges(&mut client, dst, &dirty, false).await?)
    };
    client.disconnect().await?;
    let t1 = Instant::now();
    disk::remove_export(&src.qmp, &export, RemoveMode::Safe, EXPORT_TIMEOUT).await?;
    tracker.release(&src.qmp, frozen.clone()).await?;
    qmp_time += t1.elapsed();
    Ok(Round {
        round: frozen.round,
        dirty_bytes,
        written_bytes,
        elapsed: t0.elapsed(),
        qmp: qmp_time,
    })
}

fn print_round(what: &str, r: &Round) {
    eprintln!(
        "  {what} round {:>2}: dirty {:>9} B, written {:>9} B, {:>6.1} ms (QMP {:.1} ms)",
        r.round,
        r.dirty_bytes,
        r.written_bytes,
        r.elapsed.as_secs_f64() * 1e3,
        r.qmp.as_secs_f64() * 1e3
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn event_gap(from: SystemTime, to: SystemTime) -> f64 {
    to.duration_since(from)
        .map(ms)
        .unwrap_or_else(|e| -ms(e.duration()))
}

async fn wait_migration(q: &QemuProcess, want: &str, limit: Duration) -> Result<()> {
    let t0 = Instant::now();
    loop {
        let info = q.qmp.query_migrate().await?;
        if info.status == want {
            return Ok(());
        }
        ensure!(
            !matches!(info.status.as_str(), "failed" | "cancelled"),
            "migration {}: {:?}",
            info.status,
            info.error_desc
        );
        ensure!(
            t0.elapsed() < limit,
            "migration still {} after {limit:?}",
            info.status
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "tier vm: needs QEMU 10, the test guest and root (bash scripts/test.sh runs it)"]
async fn disk_migrates_live_while_the_guest_writes_and_stays_consistent() -> Result<()> {
    for tool in ["mkfs.ext4", "e2fsck", "qemu-img"] {
        ensure!(
            have(tool),
            "{tool} is not installed: bash scripts/setup.sh installs it"
        );
    }
    let (kernel, initrd) = guest()?;
    let d = tempfile::tempdir()?;
    let dir = d.path();
    let t_all = Instant::now();

    // Source disk: ext4 in a base qcow2, with an overlay the source VM writes to.
    let base_raw = dir.join("base.raw");
    std::fs::File::create(&base_raw)?.set_len(DISK_BYTES)?;
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(&base_raw),
    )?;
    let base = dir.join("base.qcow2");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(&base_raw)
            .arg(&base),
    )?;
    std::fs::remove_file(&base_raw)?;
    let src_img = dir.join("src.qcow2");
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&base)
            .arg(&src_img),
    )?;

    let spec = |img: &Path| {
        VmSpec {
        name: "disk".into(),
        memory_mib: 128,
        vcpus: 1,
        accel: Accel::Tcg,
        kernel: Some(kernel.clone()),
        initrd: Some(initrd.clone()),
        append: format!(
            "console=ttyS0 panic=-1 tern.workload=idle tern.disk=1 tern.disk_rate={RATE_KIBPS} tern.seed=7"
        ),
        machine: "pc".into(),
        migration_capabilities: vec![],
        tpm: false,
        disks: vec![DiskSpec {
            path: img.to_path_buf(),
            format: DiskFormat::Qcow2,
            shared: false,
            sample: None,
        }],
        memory: Default::default(),
        libvirt: None,
        firmware: Default::default(),
        nics: vec![],
    }
    };
    let node = disk::node_name(0);

    let mut src = QemuProcess::launch(&spec(&src_img), &LaunchOptions::new(dir.join("src")))
        .await
        .context("source QEMU")?;
    let t = Instant::now();
    wait_console(&src, "TERN-DISK-READY", Duration::from_secs(180)).await?;
    let boot = t.elapsed();
    // Steady state: the guest has rewritten files for a while (one full pass).
    let seq_at_start = wait_disk_status(&src, |s| s.1 >= 1, Duration::from_secs(60))
        .await?
        .0;
    let info = disk::query_node(&src.qmp, &node).await?;
    ensure!(
        info.virtual_size == DISK_BYTES && info.driver == "qcow2" && info.active,
        "{info:?}"
    );
    ensure!(
        info.backing_file.as_deref() == Some(base.as_path()),
        "{info:?}"
    );

    // Destination: a flat qcow2 of the same size, QEMU incoming and paused, its disk
    // exported writable.
    let dst_img = dir.join("dst.qcow2");
    disk::create_image(&dst_img, DiskFormat::Qcow2, info.virtual_size).await?;
    let mut dst_opts = LaunchOptions::new(dir.join("dst"));
    dst_opts.incoming_defer = true;
    dst_opts.start_paused = true;
    let mut dst = QemuProcess::launch(&spec(&dst_img), &dst_opts)
        .await
        .context("destination QEMU")?;
    ensure!(
        !disk::query_node(&dst.qmp, &node).await?.active,
        "an incoming QEMU's disk should start inactive"
    );
    let dst_sock = dir.join("dst-nbd.sock");
    disk::start_nbd_server(&dst.qmp, &dst_sock).await?;
    let dst_export = disk::export_writable(&dst.qmp, &node).await?;
    ensure!(
        disk::query_node(&dst.qmp, &node).await?.active,
        "block-export-add should have activated the incoming disk"
    );
    let mut dst_nbd =
        NbdClient::connect_unix(&dst_sock, &ConnectOptions::new(node.clone())).await?;
    ensure!(
        !dst_nbd.info().flags.read_only(),
        "destination export is read-only"
    );
    ensure!(dst_nbd.size() == DISK_BYTES);

    // Source: dirty tracking, NBD server, round 0 = full copy.
    let src_sock = dir.join("src-nbd.sock");
    disk::start_nbd_server(&src.qmp, &src_sock).await?;
    let mut tracker = DirtyTracker::start(&src.qmp, &node, Some(GRANULARITY)).await?;
    let t = Instant::now();
    let full = round(&src, &mut tracker, &src_sock, &mut dst_nbd).await?;
    let full_copy = t.elapsed();
    eprintln!(
        "disk migration (64 MiB ext4 disk, guest rewriting 32 files of 32 KiB at {RATE_KIBPS} KiB/s):"
    );
    print_round("full", &full);
    ensure!(
        full.written_bytes > 1 << 20,
        "the full copy wrote only {} bytes",
        full.written_bytes
    );

    // Live rounds until the dirty set is small.
    let t = Instant::now();
    let mut rounds = vec![full];
    loop {
        let r = round(&src, &mut tracker, &src_sock, &mut dst_nbd).await?;
        print_round("live", &r);
        rounds.push(r);
        if r.dirty_bytes <= CONVERGED_BYTES || r.round >= MAX_LIVE_ROUNDS {
            break;
        }
    }
    let live_rounds = t.elapsed();
    let live_before_ram = rounds.len() - 1;

    // Memory: QEMU to QEMU over a unix socket, pausing before the switchover. Disk rounds
    // go on while RAM moves.
    let mig_sock = dir.join("mig.sock");
    dst.qmp
        .execute(
            "migrate-incoming",
            Some(json!({ "uri": format!("unix:{}", mig_sock.display()) })),
        )
        .await?;
    disk::enable_pause_before_switchover(&src.qmp).await?;
    src.qmp
        .set_migrate_parameters(
            json!({ "max-bandwidth": RAM_BYTES_PER_SEC, "downtime-limit": 300 }),
        )
        .await?;
    let mut src_events = src.qmp.subscribe();
    let mut dst_events = dst.qmp.subscribe();
    let t_mig = Instant::now();
    src.qmp
        .execute(
            "migrate",
            Some(json!({ "uri": format!("unix:{}", mig_sock.display()) })),
        )
        .await?;
    let mut during = 0;
    let mut last_ram_round = Instant::now();
    loop {
        let st = src.qmp.query_migrate().await?;
        match st.status.as_str() {
            "pre-switchover" => break,
            "failed" | "cancelled" | "completed" => bail!("memory migration {}", st.status),
            _ => {}
        }
        if last_ram_round.elapsed() >= RAM_PHASE_ROUND_INTERVAL {
            last_ram_round = Instant::now();
            let r = round(&src, &mut tracker, &src_sock, &mut dst_nbd).await?;
            print_round("ram ", &r);
            rounds.push(r);
            during += 1;
        } else {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let mig_info = disk::wait_for_pre_switchover(&src.qmp, Duration::from_secs(1)).await?;
    let t_pre = Instant::now();
    let ram_phase = t_pre - t_mig;
    let stop = src
        .qmp
        .wait_event(&mut src_events, "STOP", Duration::from_secs(5))
        .await?;
    ensure!(
        !src.qmp.query_status().await?.running,
        "source vCPUs run at pre-switchover"
    );
    let seq_at_pause = disk_status(&src.console_text()).map_or(0, |s| s.0);

    // The last round, with the guest stopped and its disk quiescent.
    let last = round(&src, &mut tracker, &src_sock, &mut dst_nbd).await?;
    print_round("last", &last);
    rounds.push(last);
    dst_nbd.flush().await?;
    tracker.stop(&src.qmp).await?;
    disk::stop_nbd_server(&src.qmp).await?;
    ensure!(
        disk::query_node(&src.qmp, &node)
            .await?
            .dirty_bitmaps
            .is_empty(),
        "tern bitmaps left on the source"
    );
    let last_round_at_pause = t_pre.elapsed();
    disk::continue_switchover(&src.qmp).await?;
    wait_migration(&src, "completed", Duration::from_secs(60)).await?;
    wait_migration(&dst, "completed", Duration::from_secs(60)).await?;
    let t_done = Instant::now();
    let qemu_downtime = src.qmp.query_migrate().await?.downtime_ms;

    // The destination: the export goes before the guest may run.
    dst_nbd.disconnect().await?;
    disk::finish_incoming(&dst.qmp, &dst_export, EXPORT_TIMEOUT).await?;
    disk::stop_nbd_server(&dst.qmp).await?;
    let handover = t_done.elapsed();

    // At the switchover: the source quits, the images must be identical.
    let t_checks = Instant::now();
    let src_console = src.console_text();
    src.quit(Duration::from_secs(10)).await;
    let t = Instant::now();
    let (code, text) = run(Command::new("qemu-img")
        .args(["compare", "-U", "-f", "qcow2", "-F", "qcow2"])
        .arg(&src_img)
        .arg(&dst_img))?;
    let compare = t.elapsed();
    ensure!(
        code == 0 && text.contains("Images are identical"),
        "qemu-img compare source/destination at the switchover: exit {code}: {text}"
    );

    let checks = t_checks.elapsed();
    dst.qmp.execute("cont", None).await?;
    let resume = dst
        .qmp
        .wait_event(&mut dst_events, "RESUME", Duration::from_secs(5))
        .await?;

    // The guest goes on: writes and O_DIRECT reads on the destination, no mismatch, and at
    // least one full verification pass entirely after the switchover.
    let (src_seq, src_full, src_bad) =
        disk_status(&src_console).context("no TERN-DISK line from the source")?;
    ensure!(src_bad == 0, "source guest saw mismatches:\n{src_console}");
    let dirty_after_full: u64 = rounds.iter().skip(1).map(|r| r.dirty_bytes).sum();
    ensure!(
        dirty_after_full >= 128 << 10,
        "the guest wrote too little during the migration: {dirty_after_full} B dirty after the full copy"
    );
    let dst_status =
        wait_disk_status(&dst, |s| s.1 >= src_full + 2, Duration::from_secs(60)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let dst_console = dst.console_text();
    ensure!(
        disk_trouble(&dst_console).is_empty(),
        "destination guest: {:?}",
        disk_trouble(&dst_console)
    );
    ensure!(
        !dst_console.contains("tern-guest:") && !dst_console.contains("TERN-DISK-READY"),
        "the guest booted again on the destination:\n{dst_console}"
    );
    ensure!(dst_status.0 > src_seq, "no writes on the destination");

    // The destination stops; its filesystem (after journal replay) checks clean.
    dst.quit(Duration::from_secs(10)).await;
    let dst_raw = dir.join("dst.raw");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-q", "-f", "qcow2", "-O", "raw"])
            .arg(&dst_img)
            .arg(&dst_raw),
    )?;
    // QEMU stopped a mounted filesystem: replay its journal and refresh the superblock's
    // summary counters (preen, what a boot does); anything beyond that is an error.
    let (code, text) = run(Command::new("e2fsck").args(["-f", "-p"]).arg(&dst_raw))?;
    ensure!(
        code <= 1 && !text.contains("UNEXPECTED INCONSISTENCY"),
        "e2fsck -fp (journal replay) exit {code}: {text}"
    );
    let preen = format!("exit {code}: {}", text.trim().replace('\n', " | "));
    let (code, text) = run(Command::new("e2fsck").args(["-f", "-n"]).arg(&dst_raw))?;
    ensure!(
        code == 0,
        "e2fsck -fn of the destination's disk: exit {code}: {text}"
    );

    let live: Vec<&Round> = rounds.iter().skip(1).collect();
    let live_bytes: u64 = live.iter().map(|r| r.written_bytes).sum();
    eprintln!("timings:");
    eprintln!("  guest boot to TERN-DISK-READY   {:>8.1} ms", ms(boot));
    eprintln!(
        "  full copy (round 0)             {:>8.1} ms, {} B written of {} B allocated",
        ms(full_copy),
        full.written_bytes,
        full.dirty_bytes
    );
    eprintln!(
        "  live rounds before RAM          {:>8.1} ms, {} rounds",
        ms(live_rounds),
        live_before_ram
    );
    eprintln!(
        "  RAM migration to pre-switchover {:>8.1} ms, {during} disk rounds meanwhile, RAM {} B",
        ms(ram_phase),
        mig_info.ram_transferred.unwrap_or(0)
    );
    eprintln!(
        "  last round at pre-switchover    {:>8.1} ms ({} B dirty; guest seq {seq_at_start} at start, {seq_at_pause} at pause)",
        ms(last_round_at_pause),
        last.dirty_bytes
    );
    eprintln!(
        "  continue to both completed      {:>8.1} ms",
        ms(t_done - t_pre - last_round_at_pause)
    );
    eprintln!("  export removal on destination   {:>8.1} ms", ms(handover));
    eprintln!(
        "  downtime (source STOP -> destination RESUME, less the test's quit + compare of {:.1} ms) {:.1} ms, of which the last disk round {:.1} ms",
        ms(checks),
        event_gap(stop.timestamp, resume.timestamp) - ms(checks),
        ms(last.elapsed)
    );
    eprintln!("  QEMU's own downtime figure: {qemu_downtime:?} ms");
    eprintln!("  qemu-img compare                {:>8.1} ms", ms(compare));
    eprintln!("  e2fsck -fp on the destination's disk: {preen}; e2fsck -fn: clean");
    eprintln!(
        "  bytes after the full copy: {live_bytes} B in {} rounds",
        live.len()
    );
    eprintln!(
        "  guest: source seq {src_seq} full {src_full}; destination seq {} full {} (no mismatch)",
        dst_status.0, dst_status.1
    );
    eprintln!(
        "  whole test                      {:>8.1} ms",
        ms(t_all.elapsed())
    );
    Ok(())
}
