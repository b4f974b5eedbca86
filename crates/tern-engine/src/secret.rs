//! Secrets on disk: keys are written with their mode from the start, through an exclusive,
//! freshly named temporary file (no stale or planted file with looser permissions is ever
//! written through), and read only when nobody but their owner may read them (a key others
//! could read must be considered leaked; silently using it would hide that).

use std::path::{Path, PathBuf};

/// Why a secret could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("cannot write {0}")]
    Write(PathBuf, #[source] std::io::Error),
    #[error("{path} holds a secret key but other users may read it (mode {mode:04o}): chmod 600 {path}, and treat the key as leaked (make a new one)")]
    LooseMode { path: PathBuf, mode: u32 },
}

/// Reads a secret key file, refusing one that users other than its owner may read or write.
pub fn read_secret(path: &Path) -> Result<Vec<u8>, SecretError> {
    use std::os::unix::fs::PermissionsExt;
    let md = std::fs::metadata(path).map_err(|e| SecretError::Read(path.into(), e))?;
    let mode = md.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(SecretError::LooseMode {
            path: path.into(),
            mode,
        });
    }
    std::fs::read(path).map_err(|e| SecretError::Read(path.into(), e))
}

/// 32 random bytes from the kernel.
pub fn random_key() -> std::io::Result<[u8; 32]> {
    let mut k = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut k))?;
    Ok(k)
}

/// Writes `data` to `p` atomically (a new temporary file of its own, fsync, rename) with
/// `mode` from the start.
pub fn write_file(p: &Path, data: &[u8], mode: u32) -> Result<(), SecretError> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let werr = |e| SecretError::Write(p.into(), e);
    let dir = p.parent().unwrap_or(Path::new("."));
    let base = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (tmp, mut f) = loop {
        let tag = random_key().map_err(werr)?;
        let tmp = dir.join(format!(".{base}.{}.tmp", hex::encode(&tag[..6])));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
        {
            Ok(f) => break (tmp, f),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(werr(e)),
        }
    };
    let written = f
        .set_permissions(std::fs::Permissions::from_mode(mode)) // (the umask narrowed it)
        .and_then(|_| f.write_all(data))
        .and_then(|_| f.sync_all())
        .and_then(|_| std::fs::rename(&tmp, p));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(werr(e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keys_are_written_private_and_loose_ones_refused() {
        let d = tempfile::tempdir().unwrap();
        let k = d.path().join("k.key");
        // a stale temporary of the old fixed name, world-readable, is not written through
        std::fs::write(d.path().join("k.tmp"), b"old").unwrap();
        write_file(&k, b"secret", 0o600).unwrap();
        assert_eq!(
            std::fs::metadata(&k).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(read_secret(&k).unwrap(), b"secret");
        assert_eq!(std::fs::read(d.path().join("k.tmp")).unwrap(), b"old");
        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = read_secret(&k).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
    }
}
