//! Shared by tern-qemu's integration tests: the test guest's kernel and initrd.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// Builds (or finds cached) the test guest with guest/build.sh: (kernel, initrd).
pub fn guest() -> Result<(PathBuf, PathBuf)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = std::process::Command::new("bash")
        .arg(root.join("guest/build.sh"))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(PathBuf::from)
    };
    match (get("kernel="), get("initrd=")) {
        (Some(k), Some(i)) => Ok((k, i)),
        _ => bail!(
            "guest/build.sh failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}
