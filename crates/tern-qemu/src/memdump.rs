//! A guest's physical memory as raw bytes (what `pmemsave` writes), taken without QEMU
//! opening any path: QEMU runs unprivileged and cannot write where the caller can, and
//! `pmemsave` cannot take a descriptor. QEMU dumps an ELF core into a file the caller
//! opened and hands over (`dump-guest-memory` to `fd:`); its `PT_LOAD` segments are then
//! copied to their guest-physical addresses.
//! Owns the ELF reading; must not decide when memory is dumped.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

use crate::qmp::{QmpClient, QmpError};

/// Why guest memory could not be saved.
#[derive(Debug, thiserror::Error)]
pub enum SaveRamError {
    #[error("cannot create {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU's dump-guest-memory failed")]
    Dump(#[source] QmpError),
    #[error("reading QEMU's memory dump failed")]
    Read(#[source] std::io::Error),
    #[error("QEMU's memory dump is not an ELF core tern can read: {0}")]
    Elf(&'static str),
    #[error("writing {path} failed")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One loadable segment of the core: `len` bytes at file offset `offset` hold guest
/// memory from physical address `paddr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub paddr: u64,
    pub len: u64,
}

/// The `PT_LOAD` segments of a 64-bit little-endian ELF core, from its first bytes
/// (`head` must hold the program headers).
pub fn load_segments(head: &[u8]) -> Result<Vec<Segment>, SaveRamError> {
    let u16_at = |o: usize| -> Option<u16> {
        Some(u16::from_le_bytes(head.get(o..o + 2)?.try_into().ok()?))
    };
    let u32_at = |o: usize| -> Option<u32> {
        Some(u32::from_le_bytes(head.get(o..o + 4)?.try_into().ok()?))
    };
    let u64_at = |o: usize| -> Option<u64> {
        Some(u64::from_le_bytes(head.get(o..o + 8)?.try_into().ok()?))
    };
    if head.get(..4) != Some(b"\x7fELF") || head.get(4) != Some(&2) || head.get(5) != Some(&1) {
        return Err(SaveRamError::Elf("not a 64-bit little-endian ELF file"));
    }
    let phoff = u64_at(0x20).ok_or(SaveRamError::Elf("short header"))? as usize;
    let phentsize = u16_at(0x36).ok_or(SaveRamError::Elf("short header"))? as usize;
    let phnum = u16_at(0x38).ok_or(SaveRamError::Elf("short header"))? as usize;
    if phnum == 0xffff {
        return Err(SaveRamError::Elf(
            "more program headers than the header counts",
        ));
    }
    if phentsize < 48 {
        return Err(SaveRamError::Elf("program headers too small"));
    }
    let mut out = Vec::new();
    for i in 0..phnum {
        let at = phoff
            .checked_add(i * phentsize)
            .ok_or(SaveRamError::Elf("program header offset"))?;
        let ty = u32_at(at).ok_or(SaveRamError::Elf("program headers past the end"))?;
        if ty != 1 {
            continue; // not PT_LOAD
        }
        let (Some(offset), Some(paddr), Some(len)) =
            (u64_at(at + 8), u64_at(at + 24), u64_at(at + 32))
        else {
            return Err(SaveRamError::Elf("program headers past the end"));
        };
        out.push(Segment { offset, paddr, len });
    }
    Ok(out)
}

/// Writes guest-physical memory `[0, size)` of the VM behind `qmp` to `out` (a new file,
/// mode 0600; what no segment covers reads as zeros). `scratch` is a path in a directory
/// only the caller can reach, for the core (removed afterwards).
pub async fn save_guest_ram(
    qmp: &QmpClient,
    scratch: &Path,
    out: &Path,
    size: u64,
) -> Result<(), SaveRamError> {
    use std::os::unix::fs::OpenOptionsExt;
    let create = |p: &Path| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(p)
            .map_err(|source| SaveRamError::Create {
                path: p.to_path_buf(),
                source,
            })
    };
    let _ = std::fs::remove_file(scratch);
    let mut core = create(scratch)?;
    let result = async {
        let handed = core.try_clone().map_err(SaveRamError::Read)?;
        qmp.getfd("tern-memdump", handed.into())
            .await
            .map_err(SaveRamError::Dump)?;
        qmp.execute_within(
            "dump-guest-memory",
            Some(json!({ "paging": false, "protocol": "fd:tern-memdump" })),
            Duration::from_secs(300),
        )
        .await
        .map_err(SaveRamError::Dump)?;
        let mut head = vec![0u8; 64 << 10];
        core.seek(SeekFrom::Start(0)).map_err(SaveRamError::Read)?;
        let n = read_full(&mut core, &mut head).map_err(SaveRamError::Read)?;
        head.truncate(n);
        let segments = load_segments(&head)?;
        let mut dst = create(out)?;
        let werr = |source| SaveRamError::Write {
            path: out.to_path_buf(),
            source,
        };
        dst.set_len(size).map_err(werr)?;
        let mut buf = vec![0u8; 1 << 20];
        for s in segments {
            if s.paddr >= size {
                continue;
            }
            let len = s.len.min(size - s.paddr);
            core.seek(SeekFrom::Start(s.offset))
                .map_err(SaveRamError::Read)?;
            dst.seek(SeekFrom::Start(s.paddr)).map_err(werr)?;
            let mut left = len;
            while left > 0 {
                let k = (left as usize).min(buf.len());
                core.read_exact(&mut buf[..k]).map_err(SaveRamError::Read)?;
                dst.write_all(&buf[..k]).map_err(werr)?;
                left -= k as u64;
            }
        }
        dst.sync_all().map_err(werr)
    }
    .await;
    let _ = std::fs::remove_file(scratch);
    result
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn core(segments: &[(u64, u64, u64)]) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2;
        h[5] = 1;
        h[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        h[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        h[0x38..0x3a].copy_from_slice(&(segments.len() as u16 + 1).to_le_bytes());
        // a PT_NOTE first, then the loads
        let mut note = vec![0u8; 56];
        note[..4].copy_from_slice(&4u32.to_le_bytes());
        h.extend_from_slice(&note);
        for &(offset, paddr, len) in segments {
            let mut p = vec![0u8; 56];
            p[..4].copy_from_slice(&1u32.to_le_bytes());
            p[8..16].copy_from_slice(&offset.to_le_bytes());
            p[24..32].copy_from_slice(&paddr.to_le_bytes());
            p[32..40].copy_from_slice(&len.to_le_bytes());
            h.extend_from_slice(&p);
        }
        h
    }

    #[test]
    fn loads_are_found_and_bad_headers_refused() {
        let c = core(&[(4096, 0, 0xa0000), (0xa1000, 0xc0000, 0x100)]);
        assert_eq!(
            load_segments(&c).unwrap(),
            vec![
                Segment {
                    offset: 4096,
                    paddr: 0,
                    len: 0xa0000
                },
                Segment {
                    offset: 0xa1000,
                    paddr: 0xc0000,
                    len: 0x100
                },
            ]
        );
        assert!(load_segments(&c[..100]).is_err(), "headers cut short");
        assert!(load_segments(b"not an elf").is_err());
        let mut big = c.clone();
        big[0x38..0x3a].copy_from_slice(&0xffffu16.to_le_bytes());
        assert!(load_segments(&big).is_err());
    }
}
