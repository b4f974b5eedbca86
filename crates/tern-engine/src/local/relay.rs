//! The hand-over's device-state stream, carried through tern: the old QEMU connects to a
//! socket tern listens on (only the old QEMU's process is taken: its pid is checked), tern parses every byte ([`tern_qemu::stream::Parser`]) before it
//! forwards it to the new QEMU's listening socket, and counts what crossed. With shared
//! memory the stream holds no RAM page; the counts prove it rather than assume it.
//! Anything the return direction carries (QEMU's return path, when a capability turned it
//! on) is copied back unparsed.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tern_qemu::stream::{Item, Parser, RamRecord, StreamError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// What crossed from the old QEMU to the new one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Carried {
    /// Every byte of the stream.
    pub bytes: u64,
    /// RAM pages whose contents crossed, and their bytes (0 when memory is shared).
    pub ram_pages: u64,
    pub ram_page_bytes: u64,
    /// RAM pages sent as "all one byte" records.
    pub zero_pages: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("the old QEMU did not connect to tern's socket within {0} s")]
    NoSource(u64),
    #[error("process {got:?} connected to the hand-over socket, not the old QEMU (pid {want:?}): refused")]
    Stranger { got: Option<i32>, want: Option<u32> },
    #[error("the new QEMU did not open its migration socket {path} within {secs} s")]
    NoListener { path: String, secs: u64 },
    #[error("the new QEMU's migration socket {path} refuses connections (the new QEMU is gone)")]
    Refused {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the device-state stream is not one tern carries")]
    Stream(#[from] StreamError),
    #[error("copying the device-state stream failed")]
    Io(#[from] std::io::Error),
    #[error("fault injection: the device-state stream was cut after {0} bytes")]
    Cut(u64),
}

/// How long the new QEMU may take to listen once it has the memory.
const LISTEN_WITHIN: Duration = Duration::from_secs(30);

/// Carries the stream from the old QEMU (process `old_pid`, connecting to `listener`) to
/// the new QEMU listening on `new_listener`, until both directions ended. `cut_after`: a
/// test's fault (stop after that many bytes).
pub async fn carry(
    listener: &UnixListener,
    old_pid: Option<u32>,
    new_listener: &Path,
    cut_after: Option<u64>,
) -> Result<Carried, RelayError> {
    let (old, _) = tokio::time::timeout(LISTEN_WITHIN, listener.accept())
        .await
        .map_err(|_| RelayError::NoSource(LISTEN_WITHIN.as_secs()))??;
    let got = old.peer_cred()?.pid();
    if old_pid.is_none() || got.map(|p| p as i64) != old_pid.map(|p| p as i64) {
        return Err(RelayError::Stranger { got, want: old_pid });
    }
    let deadline = Instant::now() + LISTEN_WITHIN;
    let new = loop {
        match UnixStream::connect(new_listener).await {
            Ok(s) => break s,
            // the socket exists and nobody listens: the new QEMU is gone
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                return Err(RelayError::Refused {
                    path: new_listener.display().to_string(),
                    source: e,
                })
            }
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            Err(_) => {
                return Err(RelayError::NoListener {
                    path: new_listener.display().to_string(),
                    secs: LISTEN_WITHIN.as_secs(),
                })
            }
        }
    };
    let (mut old_rd, mut old_wr) = old.into_split();
    let (mut new_rd, mut new_wr) = new.into_split();
    let forward = async {
        let mut parser = Parser::new();
        let mut buf = BytesMut::with_capacity(1 << 20);
        let mut c = Carried::default();
        loop {
            let n = old_rd.read_buf(&mut buf).await?;
            if n == 0 {
                parser.finish()?;
                new_wr.shutdown().await?;
                return Ok::<_, RelayError>(c);
            }
            // forward only what parsed
            let mut parsed = 0;
            while let Some((item, used)) = parser.parse(&buf[parsed..])? {
                parsed += used;
                if let Item::Ram(r) = item {
                    match r {
                        RamRecord::Page { data, .. } => {
                            c.ram_pages += 1;
                            c.ram_page_bytes += data.len() as u64;
                        }
                        RamRecord::Zero { .. } => c.zero_pages += 1,
                        RamRecord::MemSize { .. } | RamRecord::Eos => {}
                    }
                }
                if parsed == buf.len() {
                    break;
                }
            }
            if let Some(limit) = cut_after {
                if c.bytes + parsed as u64 > limit {
                    return Err(RelayError::Cut(c.bytes));
                }
            }
            new_wr.write_all(&buf[..parsed]).await?;
            c.bytes += parsed as u64;
            buf.advance(parsed);
        }
    };
    let back = async {
        tokio::io::copy(&mut new_rd, &mut old_wr).await?;
        let _ = old_wr.shutdown().await;
        Ok::<_, RelayError>(())
    };
    let (c, ()) = tokio::try_join!(forward, back)?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn setup() -> (tempfile::TempDir, UnixListener, UnixListener) {
        let d = tempfile::tempdir().unwrap();
        let src = UnixListener::bind(d.path().join("src.sock")).unwrap();
        let new = UnixListener::bind(d.path().join("main.sock")).unwrap();
        (d, src, new)
    }

    #[tokio::test]
    async fn only_the_old_qemus_process_may_send_the_device_state() {
        let (d, src, _new) = setup().await;
        let _me = UnixStream::connect(d.path().join("src.sock"))
            .await
            .unwrap();
        // pid 1 is not us
        let e = carry(&src, Some(1), &d.path().join("main.sock"), None)
            .await
            .unwrap_err();
        assert!(
            matches!(e, RelayError::Stranger { want: Some(1), .. }),
            "{e}"
        );
    }

    /// A small stream as QEMU writes it: the header, RAM's START naming one 4-page block,
    /// a PART with one page of data and one zero page, an empty END, EOF.
    fn stream_with_one_page() -> Vec<u8> {
        let be32 = |v: u32| v.to_be_bytes();
        let mut v = Vec::new();
        v.extend_from_slice(&be32(0x5145_564d)); // QEVM
        v.extend_from_slice(&be32(3));
        v.push(0x07); // configuration
        v.extend_from_slice(&be32(6));
        v.extend_from_slice(b"pc-10x");
        v.push(0x01); // START of section 2, "ram"
        v.extend_from_slice(&be32(2));
        v.push(3);
        v.extend_from_slice(b"ram");
        v.extend_from_slice(&be32(0));
        v.extend_from_slice(&be32(4));
        v.extend_from_slice(&((4 * 4096u64) | 0x04).to_be_bytes()); // MEM_SIZE
        v.push(6);
        v.extend_from_slice(b"pc.ram");
        v.extend_from_slice(&(4 * 4096u64).to_be_bytes());
        let eos = |v: &mut Vec<u8>| {
            v.extend_from_slice(&0x10u64.to_be_bytes()); // EOS
            v.push(0x7e); // footer
            v.extend_from_slice(&be32(2));
        };
        eos(&mut v);
        v.push(0x02); // PART
        v.extend_from_slice(&be32(2));
        v.extend_from_slice(&0x08u64.to_be_bytes()); // PAGE at 0
        v.push(6);
        v.extend_from_slice(b"pc.ram");
        v.extend_from_slice(&[7; 4096]);
        v.extend_from_slice(&(4096u64 | 0x02 | 0x20).to_be_bytes()); // ZERO, CONTINUE
        v.push(0);
        eos(&mut v);
        v.push(0x03); // END
        v.extend_from_slice(&be32(2));
        eos(&mut v);
        v.push(0x00); // EOF
        v
    }

    #[tokio::test]
    async fn a_ram_page_in_the_stream_is_counted_and_every_byte_forwarded() {
        let (d, src, new) = setup().await;
        let stream = stream_with_one_page();
        let mut me = UnixStream::connect(d.path().join("src.sock"))
            .await
            .unwrap();
        let sent = stream.clone();
        let writer = crate::spawn(async move {
            me.write_all(&sent).await.unwrap();
            me.shutdown().await.unwrap();
            me
        });
        let received = crate::spawn(async move {
            let (mut s, _) = new.accept().await.unwrap();
            let mut v = Vec::new();
            s.read_to_end(&mut v).await.unwrap();
            v
        });
        let carried = carry(
            &src,
            Some(std::process::id()),
            &d.path().join("main.sock"),
            None,
        )
        .await
        .unwrap();
        drop(writer.await.unwrap());
        assert_eq!(
            carried,
            Carried {
                bytes: stream.len() as u64,
                ram_pages: 1,
                ram_page_bytes: 4096,
                zero_pages: 1,
            }
        );
        assert_eq!(received.await.unwrap(), stream);
    }

    #[tokio::test]
    async fn bytes_that_are_not_a_migration_stream_are_refused_and_never_forwarded() {
        let (d, src, new) = setup().await;
        let mut me = UnixStream::connect(d.path().join("src.sock"))
            .await
            .unwrap();
        me.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        me.shutdown().await.unwrap();
        let received = crate::spawn(async move {
            let (mut s, _) = new.accept().await.unwrap();
            let mut v = Vec::new();
            let _ = s.read_to_end(&mut v).await;
            v
        });
        let e = carry(
            &src,
            Some(std::process::id()),
            &d.path().join("main.sock"),
            None,
        )
        .await
        .unwrap_err();
        assert!(
            matches!(e, RelayError::Stream(StreamError::BadMagic(_))),
            "{e}"
        );
        assert!(
            received.await.unwrap().is_empty(),
            "nothing reached the new QEMU"
        );
    }
}
