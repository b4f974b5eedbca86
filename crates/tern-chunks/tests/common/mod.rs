//! Shared helpers for the tern-chunks tests: images made with qemu-img, content written
//! with qemu-io from generated per-block data, and a process-tree check for leaked
//! qemu-nbd children. Tier: crate `tests/`, real qemu-img / qemu-io / qemu-nbd, no guests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use tern_chunks::{ContentHasher, Hash, BLOCK_BYTES};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;
pub const BLOCK: u64 = 4096;

pub fn hasher() -> ContentHasher {
    ContentHasher::new([7u8; 32])
}

pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `qemu-img create -f FMT PATH SIZE [-b BACKING -F qcow2]`.
pub fn create(path: &Path, fmt: &str, size: u64, backing: Option<&Path>) -> Result<()> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", fmt]);
    if let Some(b) = backing {
        cmd.arg("-b").arg(b).args(["-F", "qcow2"]);
    }
    cmd.arg(path).arg(size.to_string());
    run(&mut cmd).map(drop)
}

pub fn qemu_io(img: &Path, fmt: &str, commands: &[String]) -> Result<()> {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", fmt]);
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(img);
    run(&mut cmd).map(drop)
}

/// Block content for (seed, n): 4 KiB of pseudo-random bytes, distinct per pair.
pub fn block(seed: u64, n: u64) -> Vec<u8> {
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.update(&n.to_le_bytes());
    let mut out = vec![0u8; BLOCK_BYTES];
    h.finalize_xof().fill(&mut out);
    out
}

/// Blocks `first..first + count` of `seed`, concatenated.
pub fn blocks(seed: u64, first: u64, count: u64) -> Vec<u8> {
    (first..first + count)
        .flat_map(|n| block(seed, n))
        .collect()
}

/// Writes `data` at `offset` of the image with qemu-io (`write -s FILE`); `extra` are
/// flags such as `-c` (compressed, qcow2).
pub fn write(img: &Path, fmt: &str, offset: u64, data: &[u8], extra: &str) -> Result<()> {
    let src = tempfile::NamedTempFile::new()?;
    std::fs::write(src.path(), data)?;
    qemu_io(
        img,
        fmt,
        &[format!(
            "write -q {extra} -s {} {offset} {}",
            src.path().display(),
            data.len()
        )],
    )
}

/// The image's guest-visible bytes, as qemu-img sees them.
pub fn guest_content(img: &Path, fmt: &str) -> Result<Vec<u8>> {
    let dir = tempfile::tempdir()?;
    let raw = dir.path().join("content.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", fmt, "-O", "raw"])
        .arg(img)
        .arg(&raw))?;
    Ok(std::fs::read(&raw)?)
}

/// `qemu-img compare` exit status 0: identical guest content.
pub fn qemu_img_compare(a: &Path, a_fmt: &str, b: &Path, b_fmt: &str) -> Result<()> {
    run(Command::new("qemu-img")
        .args(["compare", "-f", a_fmt, "-F", b_fmt])
        .arg(a)
        .arg(b))
    .map(drop)
}

/// The hash of every non-zero block of `content`, by offset.
pub fn block_hashes(content: &[u8], h: &ContentHasher) -> Vec<(u64, Hash)> {
    content
        .chunks(BLOCK_BYTES)
        .enumerate()
        .filter(|(_, b)| b.iter().any(|x| *x != 0))
        .map(|(i, b)| {
            let mut padded = [0u8; BLOCK_BYTES];
            padded[..b.len()].copy_from_slice(b);
            (i as u64 * BLOCK, h.hash(&padded))
        })
        .collect()
}

/// qemu-nbd processes whose parent is this test process.
pub fn qemu_nbd_children() -> Vec<u32> {
    let me = std::process::id();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let comm = &stat[stat.find('(').map_or(0, |i| i + 1)..close];
        let ppid = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u32>().ok());
        if comm == "qemu-nbd" && ppid == Some(me) {
            out.push(pid);
        }
    }
    out
}

pub fn path_of(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}
