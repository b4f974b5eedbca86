//! tern-nbd against a tiny scripted NBD server on loopback TCP: failure modes qemu-nbd
//! will not produce on demand (closing mid-reply, refusing an option, stalling).

use std::future::Future;
use std::time::Duration;

use anyhow::Result;
use tern_nbd::{BlockStatusError, ConnectError, ConnectOptions, NbdClient, ReadError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const STRUCTURED_MAGIC: u32 = 0x668e_33ef;
const SIZE: u64 = 1 << 20;

/// Every test must finish well within this, proving "error, not hang".
const NO_HANG: Duration = Duration::from_secs(10);

async fn opt_reply(s: &mut TcpStream, option: u32, ty: u32, data: &[u8]) -> Result<()> {
    let mut v = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&ty.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    s.write_all(&v).await?;
    Ok(())
}

/// Server side of the handshake: acks structured replies, grants every requested meta
/// context (ids from 1), answers GO with a 1 MiB export, or refuses GO if `refuse_go`.
async fn serve_handshake(s: &mut TcpStream, refuse_go: Option<(u32, &str)>) -> Result<bool> {
    s.write_all(&NBDMAGIC.to_be_bytes()).await?;
    s.write_all(&IHAVEOPT.to_be_bytes()).await?;
    s.write_all(&3u16.to_be_bytes()).await?;
    assert_eq!(
        s.read_u32().await?,
        3,
        "client flags FIXED_NEWSTYLE | NO_ZEROES"
    );
    loop {
        assert_eq!(s.read_u64().await?, IHAVEOPT);
        let option = s.read_u32().await?;
        let len = s.read_u32().await?;
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await?;
        match option {
            8 => opt_reply(s, 8, 1, &[]).await?,
            10 => {
                let name_len = u32::from_be_bytes(data[0..4].try_into()?) as usize;
                let mut p = 4 + name_len;
                let n = u32::from_be_bytes(data[p..p + 4].try_into()?);
                p += 4;
                for id in 1..=n {
                    let ql = u32::from_be_bytes(data[p..p + 4].try_into()?) as usize;
                    let mut reply = id.to_be_bytes().to_vec();
                    reply.extend_from_slice(&data[p + 4..p + 4 + ql]);
                    opt_reply(s, 10, 4, &reply).await?;
                    p += 4 + ql;
                }
                opt_reply(s, 10, 1, &[]).await?;
            }
            7 => {
                if let Some((code, msg)) = refuse_go {
                    opt_reply(s, 7, code, msg.as_bytes()).await?;
                    return Ok(false);
                }
                let mut info = 0u16.to_be_bytes().to_vec();
                info.extend_from_slice(&SIZE.to_be_bytes());
                info.extend_from_slice(&(1u16 | 1 << 2).to_be_bytes());
                opt_reply(s, 7, 3, &info).await?;
                opt_reply(s, 7, 1, &[]).await?;
                return Ok(true);
            }
            other => panic!("unexpected option {other}"),
        }
    }
}

/// Reads one 28-byte request; returns (command, cookie, offset, length).
async fn read_request(s: &mut TcpStream) -> Result<(u16, u64, u64, u32)> {
    assert_eq!(s.read_u32().await?, 0x2560_9513);
    let _flags = s.read_u16().await?;
    let cmd = s.read_u16().await?;
    Ok((
        cmd,
        s.read_u64().await?,
        s.read_u64().await?,
        s.read_u32().await?,
    ))
}

fn chunk_header(flags: u16, ty: u16, cookie: u64, len: u32) -> Vec<u8> {
    let mut v = STRUCTURED_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&ty.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v
}

/// Spawns a one-connection server running `script` and returns its address.
async fn fake_server<F, Fut>(script: F) -> Result<String>
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = Result<()>> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    tokio::spawn(async move {
        if let Ok((s, _)) = listener.accept().await {
            let _ = script(s).await;
        }
    });
    Ok(addr)
}

#[tokio::test]
async fn server_closing_mid_read_reply_is_an_error_not_a_hang() -> Result<()> {
    let addr = fake_server(|mut s| async move {
        serve_handshake(&mut s, None).await?;
        let (cmd, cookie, offset, len) = read_request(&mut s).await?;
        assert_eq!((cmd, offset, len), (0, 4096, 65536));
        // Promise 64 KiB of data, send 100 bytes, hang up.
        s.write_all(&chunk_header(1, 1, cookie, 8 + 65536)).await?;
        s.write_all(&offset.to_be_bytes()).await?;
        s.write_all(&[7u8; 100]).await?;
        Ok(())
    })
    .await?;
    tokio::time::timeout(NO_HANG, async {
        let mut c = NbdClient::connect_tcp(addr.as_str(), &ConnectOptions::new("")).await?;
        let r = c.read(4096, 65536).await;
        match r {
            Err(ReadError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof),
            other => panic!("expected an I/O error, got {other:?}"),
        }
        assert!(!c.is_usable());
        assert!(matches!(c.read(0, 1).await, Err(ReadError::Broken)));
        anyhow::Ok(())
    })
    .await?
}

#[tokio::test]
async fn server_closing_mid_chunk_header_of_block_status_is_an_error() -> Result<()> {
    let addr = fake_server(|mut s| async move {
        serve_handshake(&mut s, None).await?;
        let (cmd, cookie, _, _) = read_request(&mut s).await?;
        assert_eq!(cmd, 7);
        s.write_all(&chunk_header(0, 5, cookie, 12)[..11]).await?;
        Ok(())
    })
    .await?;
    tokio::time::timeout(NO_HANG, async {
        let opts = ConnectOptions::new("").with_dirty_bitmap("b0");
        let mut c = NbdClient::connect_tcp(addr.as_str(), &opts).await?;
        let id = c.meta_context_id("qemu:dirty-bitmap:b0").unwrap();
        let r = c.dirty_ranges(id, 0..SIZE).await;
        assert!(matches!(r, Err(BlockStatusError::Io(_))), "{r:?}");
        anyhow::Ok(())
    })
    .await?
}

#[tokio::test]
async fn server_closing_during_handshake_is_an_error() -> Result<()> {
    let addr = fake_server(|mut s| async move {
        s.write_all(&NBDMAGIC.to_be_bytes()).await?;
        Ok(())
    })
    .await?;
    let r = tokio::time::timeout(
        NO_HANG,
        NbdClient::connect_tcp(addr.as_str(), &ConnectOptions::new("")),
    )
    .await?;
    assert!(matches!(r, Err(ConnectError::Io(_))), "{r:?}");
    Ok(())
}

#[tokio::test]
async fn refused_go_carries_the_server_message() -> Result<()> {
    let addr = fake_server(|mut s| async move {
        serve_handshake(
            &mut s,
            Some((0x8000_0002, "exports are closed for maintenance")),
        )
        .await?;
        Ok(())
    })
    .await?;
    let r = tokio::time::timeout(
        NO_HANG,
        NbdClient::connect_tcp(addr.as_str(), &ConnectOptions::new("x")),
    )
    .await?;
    match r {
        Err(e @ ConnectError::OptionRefused { .. }) => {
            let text = e.to_string();
            assert!(text.contains("NBD_OPT_GO"), "{text}");
            assert!(text.contains("NBD_REP_ERR_POLICY"), "{text}");
            assert!(
                text.contains("exports are closed for maintenance"),
                "{text}"
            );
        }
        other => panic!("expected OptionRefused, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn not_an_nbd_server_is_a_typed_error() -> Result<()> {
    let addr = fake_server(|mut s| async move {
        s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await?;
        Ok(())
    })
    .await?;
    let r = tokio::time::timeout(
        NO_HANG,
        NbdClient::connect_tcp(addr.as_str(), &ConnectOptions::new("")),
    )
    .await?;
    assert!(matches!(r, Err(ConnectError::NotNbd(_))), "{r:?}");
    Ok(())
}

#[tokio::test]
async fn cancelled_read_leaves_the_client_broken_not_desynchronised() -> Result<()> {
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let addr = fake_server(|mut s| async move {
        serve_handshake(&mut s, None).await?;
        let _ = read_request(&mut s).await?;
        // Stall until the test is done.
        let _ = release_rx.await;
        Ok(())
    })
    .await?;
    let mut c = NbdClient::connect_tcp(addr.as_str(), &ConnectOptions::new("")).await?;
    let r = tokio::time::timeout(Duration::from_millis(200), c.read(0, 512)).await;
    assert!(r.is_err(), "the stalled read timed out");
    assert!(!c.is_usable());
    assert!(matches!(c.read(0, 512).await, Err(ReadError::Broken)));
    let _ = release_tx.send(());
    Ok(())
}
