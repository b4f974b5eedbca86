//! Postcopy through a parsing proxy, with real QEMUs (tier qemu): two QEMU 10 under TCG with
//! `postcopy-ram` on, and between them a proxy that parses the source's stream with
//! [`tern_qemu::stream::Parser`] and writes the destination the [`Encoder`]'s output (checked
//! byte for byte against what it parsed), and relays the return path message by message
//! with [`tern_qemu::rp`] (page requests included). `migrate-start-postcopy` is issued
//! during the first pass; the migration must complete, with the guest running on the
//! destination and its memory checker clean.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bytes::BytesMut;
use serde_json::json;
use tern_qemu::launch::{LaunchOptions, QemuProcess};
use tern_qemu::rp::{encode_rp, parse_rp, RpMessage};
use tern_qemu::spec::VmSpec;
use tern_qemu::stream::{Encoder, Item, NameMode, Parser, PostcopyCommand, RamRecord};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

fn spec(kernel: &Path, initrd: &Path) -> VmSpec {
    VmSpec {
        name: "pc".into(),
        memory_mib: 128,
        vcpus: 1,
        accel: tern_qemu::spec::Accel::Tcg,
        kernel: Some(kernel.to_path_buf()),
        initrd: Some(initrd.to_path_buf()),
        append: "console=ttyS0 panic=-1 tern.workload=dirty tern.mib=32 tern.rate=8".into(),
        machine: "pc".into(),
        migration_capabilities: vec![],
        tpm: false,
        disks: vec![],
        memory: Default::default(),
        libvirt: None,
        firmware: Default::default(),
        nics: vec![],
    }
}

/// What went through the proxy.
#[derive(Debug, Default)]
struct Seen {
    main_bytes: u64,
    advise: u32,
    discards: u32,
    package_bytes: u64,
    package_devices: u32,
    listen_first_run_last: bool,
    pages_after_package: u64,
    rp_bytes: u64,
    req_pages: u32,
    shut: Option<u32>,
}

/// Source -> destination: parse, re-encode, check the bytes, write them.
async fn forward(
    mut from: tokio::net::unix::OwnedReadHalf,
    mut to: tokio::net::unix::OwnedWriteHalf,
) -> Result<Seen> {
    let mut p = Parser::new();
    let mut enc = Encoder::new(tern_qemu::stream::DEFAULT_PAGE_SIZE);
    let mut buf = BytesMut::with_capacity(1 << 20);
    let mut out = Vec::with_capacity(1 << 20);
    let mut s = Seen::default();
    let mut in_package_done = false;
    loop {
        let n = from.read_buf(&mut buf).await?;
        if n == 0 {
            ensure!(buf.is_empty(), "{} bytes left unparsed", buf.len());
            p.finish()?;
            to.shutdown().await?;
            return Ok(s);
        }
        let mut used = 0;
        out.clear();
        while let Some((item, k)) = p.parse(&buf[used..])? {
            let at = out.len();
            enc.encode(&item, NameMode::AsInput, &mut out);
            ensure!(
                out[at..] == buf[used..used + k],
                "re-encoding of {item:?} differs at byte {}",
                p.offset()
            );
            used += k;
            match &item {
                Item::Postcopy(PostcopyCommand::Advise { .. }) => s.advise += 1,
                Item::Postcopy(PostcopyCommand::RamDiscard { .. }) => s.discards += 1,
                Item::Packaged(pkg) => {
                    s.package_bytes = k as u64;
                    s.package_devices = pkg
                        .items
                        .iter()
                        .filter(|i| matches!(i, Item::DeviceState(_)))
                        .count() as u32;
                    s.listen_first_run_last = pkg.items.first()
                        == Some(&Item::Postcopy(PostcopyCommand::Listen))
                        && pkg.items.last() == Some(&Item::Postcopy(PostcopyCommand::Run));
                    in_package_done = true;
                }
                Item::Ram(RamRecord::Page { .. } | RamRecord::Zero { .. }) if in_package_done => {
                    s.pages_after_package += 1
                }
                _ => {}
            }
            if used == buf.len() {
                break;
            }
        }
        let _ = buf.split_to(used);
        s.main_bytes += out.len() as u64;
        // write at once: the source may be waiting for a PONG or page request about it
        to.write_all(&out).await?;
    }
}

/// Destination -> source: the return path, message by message, re-encoded.
async fn backward(
    mut from: tokio::net::unix::OwnedReadHalf,
    mut to: tokio::net::unix::OwnedWriteHalf,
) -> Result<Seen> {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    let mut s = Seen::default();
    loop {
        let n = from.read(&mut chunk).await?;
        if n == 0 {
            ensure!(
                buf.is_empty(),
                "{} return-path bytes left unparsed",
                buf.len()
            );
            return Ok(s);
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut used = 0;
        let mut out = Vec::new();
        while let Some((msg, k)) = parse_rp(&buf[used..])? {
            let at = out.len();
            encode_rp(&msg, &mut out);
            ensure!(
                out[at..] == buf[used..used + k],
                "re-encoding of {msg:?} differs"
            );
            match msg {
                RpMessage::ReqPages { .. } | RpMessage::ReqPagesId { .. } => s.req_pages += 1,
                RpMessage::Shut(v) => s.shut = Some(v),
                _ => {}
            }
            used += k;
        }
        buf.drain(..used);
        s.rp_bytes += out.len() as u64;
        // the source may already have closed after SHUT
        if to.write_all(&out).await.is_err() && s.shut.is_none() {
            bail!("source closed the return path before SHUT");
        }
    }
}

async fn proxy(listener: UnixListener, incoming: PathBuf) -> Result<Seen> {
    let (src, _) = listener.accept().await?;
    let dst = UnixStream::connect(&incoming).await?;
    let (src_rd, src_wr) = src.into_split();
    let (dst_rd, dst_wr) = dst.into_split();
    let (f, b) = tokio::join!(forward(src_rd, dst_wr), backward(dst_rd, src_wr));
    let (mut s, b) = (f.context("main channel")?, b.context("return path")?);
    s.rp_bytes = b.rp_bytes;
    s.req_pages = b.req_pages;
    s.shut = b.shut;
    Ok(s)
}

async fn boot(
    name: &str,
    dir: &Path,
    spec: &VmSpec,
    incoming: bool,
    binary: Option<&Path>,
) -> Result<QemuProcess> {
    let mut opts = LaunchOptions::new(dir.join(name));
    opts.incoming_defer = incoming;
    if let Some(b) = binary {
        opts.qemu_binary = b.to_path_buf();
    }
    let q = QemuProcess::launch(spec, &opts)
        .await
        .with_context(|| format!("QEMU {name}"))?;
    q.qmp
        .set_migrate_capabilities(&[("postcopy-ram", true)])
        .await?;
    Ok(q)
}

async fn wait_console(q: &QemuProcess, needle: &str, limit: Duration) -> Result<()> {
    let t0 = Instant::now();
    while !q.console_text().contains(needle) {
        if t0.elapsed() > limit {
            bail!("no {needle:?} in {limit:?}; console:\n{}", q.console_text());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// QEMU 7.2 from its private prefix (scripts/qemu72.sh).
fn qemu72() -> Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = std::process::Command::new("bash")
        .arg(root.join("scripts/qemu72.sh"))
        .output()?;
    ensure!(
        out.status.success(),
        "scripts/qemu72.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(PathBuf::from(text.trim().lines().last().unwrap_or("")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "tier qemu: needs QEMU 10 and the test guest (bash scripts/test.sh runs it)"]
async fn qemu10_postcopy_migration_through_a_reencoding_proxy_completes() -> Result<()> {
    postcopy_through_proxy(None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "tier qemu: needs QEMU 7.2 (scripts/qemu72.sh) and the test guest"]
async fn qemu72_postcopy_migration_through_a_reencoding_proxy_completes() -> Result<()> {
    postcopy_through_proxy(Some(&qemu72()?)).await
}

async fn postcopy_through_proxy(binary: Option<&Path>) -> Result<()> {
    let (kernel, initrd) = common::guest()?;
    let dir = tempfile::tempdir()?;
    let spec = spec(&kernel, &initrd);
    let mut src = boot("src", dir.path(), &spec, false, binary).await?;
    let mut dst = boot("dst", dir.path(), &spec, true, binary).await?;
    wait_console(&src, "TERN-READY", Duration::from_secs(90)).await?;
    // let the checker run a pass on the source
    wait_console(&src, "tern-dirty pass", Duration::from_secs(30)).await?;

    let incoming = dir.path().join("in.sock");
    dst.qmp
        .execute(
            "migrate-incoming",
            Some(json!({ "uri": format!("unix:{}", incoming.display()) })),
        )
        .await?;
    let proxy_path = dir.path().join("proxy.sock");
    let listener = UnixListener::bind(&proxy_path)?;
    let relay = tokio::spawn(proxy(listener, incoming));
    // slow enough that the first pass is still running when postcopy starts
    src.qmp
        .set_migrate_parameters(json!({ "max-bandwidth": 16u64 << 20 }))
        .await?;
    src.qmp
        .execute(
            "migrate",
            Some(json!({ "uri": format!("unix:{}", proxy_path.display()) })),
        )
        .await?;
    let t0 = Instant::now();
    loop {
        let info = src.qmp.query_migrate().await?;
        if info.status == "active" && t0.elapsed() > Duration::from_millis(1500) {
            break;
        }
        ensure!(
            !matches!(info.status.as_str(), "failed" | "cancelled" | "completed"),
            "migration {} before postcopy started",
            info.status
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    src.qmp.execute("migrate-start-postcopy", None).await?;
    let t0 = Instant::now();
    let mut saw_postcopy = false;
    loop {
        let info = src.qmp.query_migrate().await?;
        match info.status.as_str() {
            "completed" => break,
            "postcopy-active" => saw_postcopy = true,
            "failed" | "cancelled" | "postcopy-paused" => {
                bail!("migration {}: {:?}", info.status, info.error_desc)
            }
            _ => {}
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(120),
            "migration still {} after 120 s",
            info.status
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seen = tokio::time::timeout(Duration::from_secs(30), relay)
        .await
        .context("proxy did not finish")???;
    eprintln!("postcopy proxy: {seen:?} (saw postcopy-active: {saw_postcopy})");

    let t0 = Instant::now();
    while !dst.qmp.query_status().await?.running {
        ensure!(
            t0.elapsed() < Duration::from_secs(30),
            "destination did not run"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // the guest goes on at the destination, its checker finding every page intact
    wait_console(&dst, "tern-dirty pass", Duration::from_secs(60)).await?;
    let text = dst.console_text();
    ensure!(!text.contains("TERN-CORRUPT"), "memory corrupted:\n{text}");
    ensure!(!text.contains("tern-guest:"), "guest booted again:\n{text}");

    ensure!(seen.advise == 1, "one POSTCOPY_ADVISE: {seen:?}");
    ensure!(
        seen.listen_first_run_last,
        "package: LISTEN .. RUN: {seen:?}"
    );
    ensure!(
        seen.package_devices > 10,
        "device sections in the package: {seen:?}"
    );
    ensure!(seen.pages_after_package > 0, "postcopy pages: {seen:?}");
    ensure!(
        seen.req_pages > 0,
        "page requests on the return path: {seen:?}"
    );
    ensure!(seen.shut == Some(0), "SHUT 0 on the return path: {seen:?}");
    src.quit(Duration::from_secs(5)).await;
    dst.quit(Duration::from_secs(5)).await;
    Ok(())
}
