//! The test guest: builds it through `guest/build.sh` (cached) and predicts the memory
//! content of its pattern workload, so tests can check a RAM dump page by page.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};

#[derive(Debug, Clone)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

pub(crate) fn repo_root() -> Result<PathBuf> {
    let mut d = Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf();
    loop {
        if d.join("guest/build.sh").exists() {
            return Ok(d);
        }
        if !d.pop() {
            bail!(
                "guest/build.sh not found above {}",
                env!("CARGO_MANIFEST_DIR")
            );
        }
    }
}

/// Builds (or finds in the cache) the test guest; once per process.
pub fn ensure_guest() -> Result<GuestImage> {
    static GUEST: OnceLock<Result<GuestImage, String>> = OnceLock::new();
    GUEST
        .get_or_init(|| build().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn build() -> Result<GuestImage> {
    let root = repo_root()?;
    let out = std::process::Command::new("bash")
        .arg(root.join("guest/build.sh"))
        .output()
        .context("running guest/build.sh")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "guest/build.sh failed:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(PathBuf::from)
            .with_context(|| format!("guest/build.sh printed no {k} line:\n{text}"))
    };
    Ok(GuestImage {
        kernel: get("kernel=")?,
        initrd: get("initrd=")?,
    })
}

/// QEMU 7.2 from the private prefix (`scripts/qemu72.sh`, cached): the wrapper's path.
pub fn qemu72() -> Result<PathBuf> {
    let out = std::process::Command::new("bash")
        .arg(repo_root()?.join("scripts/qemu72.sh"))
        .output()?;
    if !out.status.success() {
        bail!(
            "scripts/qemu72.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(PathBuf::from(text.trim().lines().last().unwrap_or("")))
}

/// Page `index` of the pattern workload with `seed`, exactly as guest/src/pattern.c writes it.
pub fn pattern_page(seed: u64, index: u64) -> [u8; 4096] {
    let mut pg = [0u8; 4096];
    pg[..8].copy_from_slice(b"TERNPAT1");
    pg[8..16].copy_from_slice(&seed.to_le_bytes());
    pg[16..24].copy_from_slice(&index.to_le_bytes());
    let mut s = seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    if s == 0 {
        s = 1;
    }
    for k in 0..509 {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        let w = s.wrapping_mul(0x2545_F491_4F6C_DD1D);
        pg[24 + 8 * k..32 + 8 * k].copy_from_slice(&w.to_le_bytes());
    }
    pg
}

/// Scans a RAM dump for pattern pages of `seed`: (pages whose content is right, pages
/// with the right header but wrong content). Each index counts once.
pub fn count_pattern_pages(ram: &[u8], seed: u64) -> (u64, u64) {
    let mut good = std::collections::HashSet::new();
    let mut bad = 0;
    for pg in ram.chunks_exact(4096) {
        if &pg[..8] != b"TERNPAT1" || pg[8..16] != seed.to_le_bytes() {
            continue;
        }
        let idx = u64::from_le_bytes(pg[16..24].try_into().expect("8 bytes"));
        if pg == pattern_page(seed, idx) {
            good.insert(idx);
        } else {
            bad += 1;
        }
    }
    (good.len() as u64, bad)
}

/// A raw disk image the firmware boots (no kernel in the VM's spec): a FAT filesystem
/// holding the test guest's kernel and initrd with SYSLINUX as its bootloader, built with
/// the distribution's tools (dosfstools, mtools, syslinux). SYSLINUX prints its banner on
/// the serial console (`SYSLINUX` in the console log), then boots the kernel with `append`.
pub fn boot_disk(g: &GuestImage, path: &Path, append: &str) -> Result<PathBuf> {
    use std::process::Command;
    let run = |cmd: &mut Command| {
        crate::run(cmd)
            .context("building the boot disk (bash scripts/setup.sh installs dosfstools, mtools, syslinux)")
            .map(drop)
    };
    let _ = std::fs::remove_file(path);
    let kib =
        (std::fs::metadata(&g.kernel)?.len() + std::fs::metadata(&g.initrd)?.len()) / 1024 + 8192;
    run(Command::new("mkfs.vfat")
        .args(["-C", "-n", "TERNBOOT"])
        .arg(path)
        .arg(kib.to_string()))?;
    let cfg = path.with_extension("syslinux.cfg");
    std::fs::write(
        &cfg,
        format!(
            "SERIAL 0 115200\nDEFAULT tern\nPROMPT 0\nTIMEOUT 0\nLABEL tern\n  KERNEL vmlinuz\n  INITRD initrd\n  APPEND {append}\n"
        ),
    )?;
    for (from, to) in [
        (&g.kernel, "::vmlinuz"),
        (&g.initrd, "::initrd"),
        (&cfg, "::syslinux.cfg"),
    ] {
        run(Command::new("mcopy").arg("-i").arg(path).arg(from).arg(to))?;
    }
    let _ = std::fs::remove_file(&cfg);
    run(Command::new("syslinux").arg("--install").arg(path))?;
    Ok(path.to_path_buf())
}

/// A raw disk image UEFI firmware (OVMF) boots: a FAT filesystem (the EFI system
/// partition, the whole disk) with systemd-boot as `\EFI\BOOT\BOOTX64.EFI` and one loader
/// entry for the test guest's kernel and initrd with `append`, built with the
/// distribution's tools (dosfstools, mtools, systemd-boot-efi).
pub fn uefi_disk(g: &GuestImage, path: &Path, append: &str) -> Result<PathBuf> {
    use std::process::Command;
    const SYSTEMD_BOOT: &str = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi";
    let run = |cmd: &mut Command| {
        crate::run(cmd)
            .context("building the UEFI disk (bash scripts/setup.sh installs dosfstools, mtools, systemd-boot-efi)")
            .map(drop)
    };
    let _ = std::fs::remove_file(path);
    let kib =
        (std::fs::metadata(&g.kernel)?.len() + std::fs::metadata(&g.initrd)?.len()) / 1024 + 8192;
    run(Command::new("mkfs.vfat")
        .args(["-C", "-F", "32", "-n", "TERNESP"])
        .arg(path)
        .arg(kib.max(34 << 10).to_string()))?;
    run(Command::new("mmd").arg("-i").arg(path).args([
        "::/EFI",
        "::/EFI/BOOT",
        "::/loader",
        "::/loader/entries",
    ]))?;
    let loader = path.with_extension("loader.conf");
    std::fs::write(&loader, "default tern.conf\ntimeout 0\n")?;
    let entry = path.with_extension("entry.conf");
    std::fs::write(
        &entry,
        format!("title tern\nlinux /vmlinuz\ninitrd /initrd\noptions {append}\n"),
    )?;
    for (from, to) in [
        (Path::new(SYSTEMD_BOOT), "::/EFI/BOOT/BOOTX64.EFI"),
        (g.kernel.as_path(), "::/vmlinuz"),
        (g.initrd.as_path(), "::/initrd"),
        (loader.as_path(), "::/loader/loader.conf"),
        (entry.as_path(), "::/loader/entries/tern.conf"),
    ] {
        run(Command::new("mcopy").arg("-i").arg(path).arg(from).arg(to))?;
    }
    let _ = std::fs::remove_file(&loader);
    let _ = std::fs::remove_file(&entry);
    Ok(path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_pages_are_deterministic_and_distinct() {
        let a = pattern_page(42, 7);
        assert_eq!(a, pattern_page(42, 7));
        assert_ne!(a, pattern_page(42, 8));
        assert_ne!(a, pattern_page(43, 7));
        assert_eq!(&a[..8], b"TERNPAT1");
        let mut ram = Vec::new();
        ram.extend_from_slice(&[0u8; 4096]);
        ram.extend_from_slice(&pattern_page(42, 0));
        let mut broken = pattern_page(42, 1);
        broken[4000] ^= 1;
        ram.extend_from_slice(&broken);
        assert_eq!(count_pattern_pages(&ram, 42), (1, 1));
        assert_eq!(count_pattern_pages(&ram, 41), (0, 0));
    }
}
