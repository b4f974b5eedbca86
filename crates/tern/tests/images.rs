//! The host's disk-image library through the operator's commands: a real `tern agent`
//! process, real images made with `qemu-img` (read by the agent through qemu-nbd), and the
//! `tern image import|index|list|remove` CLI. No VMs run here.

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tern_agent::images::{ImageInfo, ImportReport, RefreshSummary};
use tern_api::client::ClientError;
use tern_testkit::agents::TestAgent;

const BIN: &str = env!("CARGO_BIN_EXE_tern");

/// The chunk index's block size (tern_chunks::BLOCK_SIZE).
const BLOCK: u64 = 4096;
const MIB: u64 = 1 << 20;

/// qemu-img makes the images, qemu-nbd is how the agent reads them.
fn qemu_tools_missing() -> Option<&'static str> {
    ["qemu-img", "qemu-nbd"].into_iter().find(|t| {
        !Command::new(t)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// Runs a tool; its output is not needed.
fn run(cmd: &mut Command) -> Result<()> {
    tern_testkit::run(cmd).map(drop)
}

/// 4 KiB of pseudo-random bytes, different for each (tag, block): every block written is
/// a distinct chunk, and none reads as zero.
fn block(tag: u64, i: u64) -> Vec<u8> {
    let mut x = (tag << 32 | i).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(BLOCK as usize);
    while out.len() < BLOCK as usize {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// Writes `count` distinct blocks of `tag` at `offset` of a file, in place.
fn write_blocks(path: &Path, offset: u64, count: u64, tag: u64) -> Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    for i in 0..count {
        f.write_all(&block(tag, i))?;
    }
    f.sync_all()?;
    Ok(())
}

/// Runs `tern --agent A ARGS...` in `cwd`.
fn tern(a: &TestAgent, cwd: &Path, args: &[&str]) -> Result<Output> {
    Ok(Command::new(BIN)
        .arg("--agent")
        .arg(format!("unix:{}", a.api.display()))
        .args(args)
        .current_dir(cwd)
        .output()?)
}

/// Runs a `tern` command that must succeed; its stdout.
fn tern_ok(a: &TestAgent, cwd: &Path, args: &[&str]) -> Result<String> {
    let out = tern(a, cwd, args)?;
    if !out.status.success() {
        bail!(
            "tern {args:?} failed ({}): {}{}\nagent log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tern_testkit::agents::tail(&a.log_text(), 4000)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn list(a: &TestAgent, cwd: &Path) -> Result<Vec<ImageInfo>> {
    let out = tern_ok(a, cwd, &["image", "list", "--json"])?;
    serde_json::from_str(&out).with_context(|| format!("tern image list --json said {out}"))
}

fn find<'a>(list: &'a [ImageInfo], p: &Path) -> Option<&'a ImageInfo> {
    list.iter().find(|i| i.path == p)
}

struct Images {
    dir: tempfile::TempDir,
    raw: PathBuf,
    base: PathBuf,
    overlay: PathBuf,
}

/// raw.img: 16 MiB, 4 MiB of data at 1 MiB (1024 distinct blocks); overlay.qcow2: an
/// empty qcow2 overlay of base.qcow2, which holds 2 MiB of data at 0 (512 blocks).
fn make_images() -> Result<Images> {
    let dir = tempfile::Builder::new()
        .prefix("tern-images-")
        .tempdir_in("/tmp")?;
    let d = dir.path().canonicalize()?;
    let raw = d.join("raw.img");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(&raw)
        .arg("16M"))?;
    write_blocks(&raw, MIB, 1024, 1)?;
    let src = d.join("base-src.raw");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(&src)
        .arg("16M"))?;
    write_blocks(&src, 0, 512, 2)?;
    let base = d.join("base.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&src)
        .arg(&base))?;
    let overlay = d.join("overlay.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&base)
        .arg(&overlay))?;
    Ok(Images {
        dir,
        raw,
        base,
        overlay,
    })
}

#[test]
#[ignore = "tier vm: needs QEMU 10, the test guest and root (bash scripts/test.sh runs it)"]
fn image_commands_import_list_index_and_remove() -> Result<()> {
    if let Some(t) = qemu_tools_missing() {
        bail!("{t} is not installed (qemu-utils): bash scripts/setup.sh installs it");
    }
    let img = make_images()?;
    let cwd = img.dir.path();
    let a = TestAgent::start(Path::new(BIN), "host-img", &[])?;

    // Import by a relative path: the CLI makes it absolute; the format is told from the
    // file.
    let out = tern_ok(&a, cwd, &["image", "import", "raw.img", "--json"])?;
    let r: ImportReport = serde_json::from_str(&out)?;
    assert_eq!(r.path, img.raw, "{out}");
    assert_eq!(r.format, "raw", "{out}");
    assert_eq!(r.virtual_size, 16 * MIB, "{out}");
    assert_eq!(r.data_blocks, 1024, "4 MiB of data: {out}");
    assert_eq!(r.new_chunks, 1024, "every block differs: {out}");

    // The overlay, human-readable: its data is its backing file's.
    let ov = img.overlay.display().to_string();
    let out = tern_ok(&a, cwd, &["image", "import", &ov])?;
    assert!(
        out.starts_with(&format!(
            "indexed {ov}: qcow2, 16.0 MiB, 512 data blocks, 512 new chunks"
        )),
        "{out}"
    );
    assert!(out.contains("MiB/s"), "{out}");

    // Both listed, the overlay with its backing file.
    let l = list(&a, cwd)?;
    assert_eq!(l.len(), 2, "{l:?}");
    let raw = find(&l, &img.raw).context("raw.img not listed")?;
    assert_eq!(
        (raw.format.as_str(), raw.data_blocks),
        ("raw", 1024),
        "{raw:?}"
    );
    assert!(raw.backing_files.is_empty(), "{raw:?}");
    let o = find(&l, &img.overlay).context("overlay.qcow2 not listed")?;
    assert_eq!((o.format.as_str(), o.data_blocks), ("qcow2", 512), "{o:?}");
    assert_eq!(o.backing_files, vec![img.base.clone()], "{o:?}");
    assert!(!raw.needs_reindex && !o.needs_reindex, "{l:?}");
    let human = tern_ok(&a, cwd, &["image", "list"])?;
    let line = human
        .lines()
        .find(|l| l.contains(&ov))
        .with_context(|| format!("no line for the overlay in:\n{human}"))?;
    assert!(
        line.contains(&format!("(backing {})", img.base.display())),
        "{human}"
    );
    assert!(
        human
            .lines()
            .any(|l| l.starts_with("raw ") && l.ends_with(&*img.raw.display().to_string())),
        "{human}"
    );

    // Nothing changed: nothing is read again.
    let s: RefreshSummary =
        serde_json::from_str(&tern_ok(&a, cwd, &["image", "index", "--json"])?)?;
    assert!(s.reindexed.is_empty() && s.dropped.is_empty(), "{s:?}");
    assert_eq!(s.unchanged.len(), 2, "{s:?}");

    // New content in the first MiB of raw.img's data: re-read, 256 new chunks; the
    // qcow2 is left alone.
    write_blocks(&img.raw, MIB, 256, 3)?;
    let out = tern_ok(&a, cwd, &["image", "index", "--json"])?;
    let s: RefreshSummary = serde_json::from_str(&out)?;
    let re: Vec<&Path> = s.reindexed.iter().map(|r| r.path.as_path()).collect();
    assert_eq!(re, vec![img.raw.as_path()], "{out}");
    assert_eq!(s.reindexed[0].new_chunks, 256, "{out}");
    assert_eq!(s.reindexed[0].data_blocks, 1024, "{out}");
    assert_eq!(s.unchanged, vec![img.overlay.clone()], "{out}");
    assert!(s.dropped.is_empty() && s.failed.is_empty(), "{out}");

    // raw.img deleted: dropped by the next index, gone from the list.
    std::fs::remove_file(&img.raw)?;
    let out = tern_ok(&a, cwd, &["image", "index"])?;
    assert!(
        out.lines()
            .any(|l| l.starts_with("dropped") && l.contains(&*img.raw.display().to_string())),
        "{out}"
    );
    assert!(
        out.contains("0 reindexed, 1 unchanged, 1 dropped, 0 failed"),
        "{out}"
    );
    let l = list(&a, cwd)?;
    assert!(find(&l, &img.raw).is_none(), "{l:?}");
    assert!(find(&l, &img.overlay).is_some(), "{l:?}");

    // A missing file: non-zero exit, naming the path (the CLI made it absolute).
    let out = tern(&a, cwd, &["image", "import", "no-such.img"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "importing a missing file succeeded: {err}"
    );
    assert!(
        err.contains(&*cwd.join("no-such.img").display().to_string()),
        "{err}"
    );
    assert!(err.contains("check the path"), "{err}");
    let out = tern(&a, cwd, &["image", "import", "raw.img", "--format", "raw"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(&*img.raw.display().to_string()),
        "{err}"
    );

    // Remove: the file stays, the index forgets it; removing it again fails.
    let out = tern_ok(&a, cwd, &["image", "remove", "overlay.qcow2"])?;
    assert!(out.contains(&ov), "{out}");
    assert!(img.overlay.exists());
    assert!(list(&a, cwd)?.is_empty(), "still listed after remove");
    let human = tern_ok(&a, cwd, &["image", "list"])?;
    assert!(!human.contains(&ov), "{human}");
    let out = tern(&a, cwd, &["image", "remove", "overlay.qcow2"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("is not indexed"),
        "{err}"
    );
    Ok(())
}

/// The API's answers to requests it cannot do: status codes and messages.
#[test]
#[ignore = "tier vm: needs QEMU 10, the test guest and root (bash scripts/test.sh runs it)"]
fn image_api_refuses_bad_requests_with_statuses() -> Result<()> {
    if let Some(t) = qemu_tools_missing() {
        bail!("{t} is not installed (qemu-utils): bash scripts/setup.sh installs it");
    }
    let img = make_images()?;
    let a = TestAgent::start(Path::new(BIN), "host-img-api", &[])?;
    let status = |method: &str, path: &str, body: Value| -> Result<(u16, String)> {
        match a.client.call(method, path, Some(&body)) {
            Err(ClientError::Api { status, message }) => Ok((status, message)),
            other => bail!("{method} {path} {body}: expected an API error, got {other:?}"),
        }
    };
    let raw = img.raw.display().to_string();

    let (s, m) = status(
        "POST",
        "/v1/images",
        json!({ "path": raw, "format": "vmdk" }),
    )?;
    assert_eq!(s, 400, "{m}");
    assert!(m.contains("vmdk") && m.contains("raw or qcow2"), "{m}");

    let (s, m) = status("POST", "/v1/images", json!({ "path": "raw.img" }))?;
    assert_eq!(s, 400, "{m}");
    assert!(m.contains("not absolute"), "{m}");

    let missing = img.dir.path().join("missing.img").display().to_string();
    for format in [Value::Null, json!("raw"), json!("qcow2")] {
        let (s, m) = status(
            "POST",
            "/v1/images",
            json!({ "path": missing, "format": format }),
        )?;
        assert_eq!(s, 404, "format {format}: {m}");
        assert!(m.contains(&missing), "{m}");
    }

    // A raw file imported as qcow2: refused, with what to do.
    let (s, m) = status(
        "POST",
        "/v1/images",
        json!({ "path": raw, "format": "qcow2" }),
    )?;
    assert_eq!(s, 400, "{m}");
    assert!(m.contains("--format"), "{m}");

    let (s, m) = status("DELETE", "/v1/images", json!({ "path": raw }))?;
    assert_eq!(s, 404, "{m}");
    assert!(m.contains("not indexed"), "{m}");

    // And the typed client methods work against the same agent.
    let r = a.client.import_image(&img.raw, None)?;
    assert_eq!((r.format.as_str(), r.data_blocks), ("raw", 1024));
    assert_eq!(a.client.images()?.len(), 1);
    a.client.remove_image(&img.raw)?;
    assert!(a.client.images()?.is_empty());
    let s = a.client.index_images()?;
    assert!(s.unchanged.is_empty() && s.reindexed.is_empty(), "{s:?}");
    Ok(())
}
