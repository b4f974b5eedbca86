//! The codec against REAL streams: boot the test guest under QEMU 10 (and QEMU 7.2 from a
//! private prefix), capture its migration stream with `exec:cat > FILE`, then parse it in
//! random chunks, re-encode it byte for byte, re-encode it with our own block-name state,
//! and compare record counts with the Python oracle in ../shared when it is there.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;
use tern_qemu::launch::{LaunchOptions, QemuProcess};
use tern_qemu::spec::VmSpec;
use tern_qemu::stream::{parse_all, Encoder, Item, NameMode, Parser, RamRecord};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn guest() -> Result<(PathBuf, PathBuf)> {
    let out = Command::new("bash")
        .arg(repo().join("guest/build.sh"))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("guest/build.sh failed: {text}");
    }
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(PathBuf::from)
            .context("guest path")
    };
    Ok((get("kernel=")?, get("initrd=")?))
}

fn qemu72() -> Result<PathBuf> {
    let out = Command::new("bash")
        .arg(repo().join("scripts/qemu72.sh"))
        .output()?;
    if !out.status.success() {
        bail!(
            "scripts/qemu72.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .lines()
            .last()
            .unwrap_or(""),
    ))
}

/// Boots the pattern guest, migrates it into a file, returns the file's bytes.
async fn capture(binary: Option<PathBuf>, paused: bool, dir: &Path) -> Result<Vec<u8>> {
    let (kernel, initrd) = guest()?;
    let spec = VmSpec {
        name: "cap".into(),
        memory_mib: 128,
        vcpus: 1,
        accel: tern_qemu::spec::Accel::Tcg,
        kernel: Some(kernel),
        initrd: Some(initrd),
        append: "console=ttyS0 panic=-1 tern.workload=pattern tern.mib=8 tern.seed=5".into(),
        machine: "pc".into(),
        migration_capabilities: vec![],
        tpm: false,
        disks: vec![],
        memory: Default::default(),
        libvirt: None,
        firmware: Default::default(),
        nics: vec![],
    };
    let mut opts = LaunchOptions::new(dir.join("run"));
    if let Some(b) = binary {
        opts.qemu_binary = b;
    }
    let mut q = QemuProcess::launch(&spec, &opts).await?;
    let deadline = Instant::now() + Duration::from_secs(90);
    while !q.console_text().contains("TERN-READY") {
        if Instant::now() > deadline {
            bail!("guest did not boot: {}", q.console_text());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if paused {
        q.qmp.execute("stop", None).await?;
    }
    let file = dir.join("stream.bin");
    q.qmp
        .set_migrate_parameters(json!({ "max-bandwidth": 1u64 << 40 }))
        .await?;
    let mut ev = q.qmp.subscribe();
    q.qmp
        .execute(
            "migrate",
            Some(json!({ "uri": format!("exec:cat > {}", file.display()) })),
        )
        .await?;
    loop {
        let info = q.qmp.query_migrate().await?;
        match info.status.as_str() {
            "completed" => break,
            "failed" | "cancelled" => {
                bail!("capture migration {}: {:?}", info.status, info.error_desc)
            }
            _ => {
                let _ = q
                    .qmp
                    .wait_event(&mut ev, "MIGRATION", Duration::from_millis(500))
                    .await;
            }
        }
    }
    q.quit(Duration::from_secs(5)).await;
    Ok(std::fs::read(&file)?)
}

struct Counts {
    page: u64,
    zero: u64,
    eos: u64,
    named: u64,
    cont: u64,
}

fn counts(items: &[Item]) -> Counts {
    let mut c = Counts {
        page: 0,
        zero: 0,
        eos: 0,
        named: 0,
        cont: 0,
    };
    for i in items {
        match i {
            Item::Ram(RamRecord::Page { named, .. }) | Item::Ram(RamRecord::Zero { named, .. }) => {
                if matches!(i, Item::Ram(RamRecord::Page { .. })) {
                    c.page += 1
                } else {
                    c.zero += 1
                }
                if *named {
                    c.named += 1
                } else {
                    c.cont += 1
                }
            }
            Item::Ram(RamRecord::Eos) => c.eos += 1,
            _ => {}
        }
    }
    c
}

/// Every property the data path relies on, checked on one real stream.
fn check_stream(data: &[u8], label: &str, expect_switchover_start: bool) -> Result<()> {
    let (items, end) = parse_all(data).with_context(|| format!("{label}: parse"))?;
    // byte-identical re-encoding
    let mut enc = Encoder::new(4096);
    let mut out = Vec::with_capacity(data.len());
    for i in &items {
        enc.encode(i, NameMode::AsInput, &mut out);
    }
    assert!(
        out == data,
        "{label}: AsInput re-encoding differs (len {} vs {})",
        out.len(),
        data.len()
    );
    // random chunking gives the same items (tail merged)
    let mut p = Parser::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut pos = 0;
    let mut seed = 0x1234_5678_u64;
    let mut again = Vec::new();
    loop {
        while let Some((it, n)) = p.parse(&buf)? {
            again.push(it);
            buf.drain(..n);
        }
        if pos == data.len() {
            break;
        }
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let k = (1 + seed % 70_000) as usize;
        let k = k.min(data.len() - pos);
        buf.extend_from_slice(&data[pos..pos + k]);
        pos += k;
    }
    p.finish()?;
    let non_tail = |v: &[Item]| {
        v.iter()
            .filter(|i| !matches!(i, Item::Tail(_)))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert!(
        non_tail(&again) == non_tail(&items),
        "{label}: chunked parse differs"
    );
    // our own CONTINUE state re-parses to the same page records
    let mut enc = Encoder::new(4096);
    let mut auto = Vec::new();
    for i in &items {
        enc.encode(i, NameMode::Auto, &mut auto);
    }
    let (items2, _) = parse_all(&auto)?;
    let recs = |v: &[Item]| -> Vec<(String, u64)> {
        v.iter()
            .filter_map(|i| match i {
                Item::Ram(RamRecord::Page { block, offset, .. })
                | Item::Ram(RamRecord::Zero { block, offset, .. }) => {
                    Some((block.to_string(), *offset))
                }
                _ => None,
            })
            .collect()
    };
    assert!(
        recs(&items2) == recs(&items),
        "{label}: Auto re-encoding changes the records"
    );
    let c = counts(&items);
    assert!(
        c.page >= 8 * 256,
        "{label}: at least the 8 MiB pattern travels as PAGE records ({})",
        c.page
    );
    assert!(
        end.vmdesc_devices.unwrap_or(0) > 0,
        "{label}: vmdesc lists the devices"
    );
    let has_sws = items
        .iter()
        .any(|i| matches!(i, Item::Command { cmd: 11, .. }));
    assert_eq!(
        has_sws, expect_switchover_start,
        "{label}: SWITCHOVER_START presence"
    );
    eprintln!(
        "{label}: {} bytes, {} PAGE, {} ZERO, {} EOS, {} named / {} CONTINUE, tail {} bytes (vmdesc {:?} bytes, {:?} devices)",
        data.len(), c.page, c.zero, c.eos, c.named, c.cont, end.tail_bytes, end.vmdesc_bytes, end.vmdesc_devices
    );
    oracle(data, &c, label)
}

/// The Python tools in ../shared/reference are a working oracle: same counts.
fn oracle(data: &[u8], c: &Counts, label: &str) -> Result<()> {
    let tool = repo().join("../shared/reference/qemu-stream-tools/analyze.py");
    if !tool.exists() {
        eprintln!(
            "{label}: {} not found; oracle comparison skipped",
            tool.display()
        );
        return Ok(());
    }
    let f = tempfile::NamedTempFile::new()?;
    std::fs::write(f.path(), data)?;
    let out = Command::new("python3")
        .arg(&tool)
        .arg(f.path())
        .arg("--roundtrip")
        .output()?;
    if !out.status.success() {
        bail!(
            "{label}: oracle failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let n = |k: &str| v["ram_records"][k].as_u64().unwrap_or(0);
    assert_eq!(
        (n("PAGE"), n("ZERO"), n("EOS")),
        (c.page, c.zero, c.eos),
        "{label}: record counts vs the Python oracle"
    );
    assert_eq!(
        v["page_headers_with_name"].as_u64(),
        Some(c.named),
        "{label}: named headers vs oracle"
    );
    assert_eq!(
        v["roundtrip_identical"], true,
        "{label}: the oracle round-trips too"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "tier qemu: needs QEMU 10 and its tools (bash scripts/test.sh runs it)"]
async fn qemu10_captured_streams_roundtrip_byte_identically() -> Result<()> {
    for paused in [true, false] {
        let dir = tempfile::tempdir()?;
        let data = capture(None, paused, dir.path()).await?;
        check_stream(
            &data,
            if paused {
                "qemu10 paused"
            } else {
                "qemu10 live"
            },
            true,
        )?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "tier qemu: needs QEMU 10 and its tools (bash scripts/test.sh runs it)"]
async fn qemu72_captured_streams_roundtrip_byte_identically() -> Result<()> {
    let bin = qemu72()?;
    for paused in [true, false] {
        let dir = tempfile::tempdir()?;
        let data = capture(Some(bin.clone()), paused, dir.path()).await?;
        check_stream(
            &data,
            if paused {
                "qemu7.2 paused"
            } else {
                "qemu7.2 live"
            },
            false,
        )?;
    }
    Ok(())
}
