//! tern-nbd against the real server: qemu-nbd 10 exporting a qcow2 with a persistent dirty
//! bitmap (`-B b0`) and allocation depth (`-A`), over unix sockets and TCP.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use common::*;
use tern_nbd::{
    dirty_bitmap_context, BlockStatusError, ConnectError, ConnectOptions, NbdClient, ReadError,
    WriteError, BASE_ALLOCATION, QEMU_ALLOCATION_DEPTH,
};

fn assert_bytes_eq(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i}: got {:#04x}, want {:#04x}",
            got[i], want[i]
        );
    }
}

#[tokio::test]
#[ignore = "tier qemu: needs QEMU 10 and its tools (bash scripts/test.sh runs it)"]
async fn whole_disk_read_equals_qemu_img_convert_raw() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let img = make_test_image(dir.path())?;
    let raw = raw_content(&img.path, dir.path())?;
    assert_bytes_eq(&raw, &img.expected, "qemu-img convert vs. expected pattern");

    let (mut server, sock) = spawn_qemu_nbd(dir.path(), &img.path, &["-r"])?;
    let mut client = connect_when_ready(&mut server, &sock, &ConnectOptions::new(EXPORT)).await?;
    assert_eq!(client.size(), IMAGE_SIZE);
    assert!(client.info().flags.read_only());
    assert!(client.info().structured_replies);
    let bs = client
        .info()
        .block_size
        .expect("qemu-nbd sends NBD_INFO_BLOCK_SIZE");
    assert_eq!(bs.maximum, 32 << 20);

    let mut buf = vec![0x5au8; IMAGE_SIZE as usize];
    client.read_into(&mut buf, 0).await?;
    assert_bytes_eq(&buf, &raw, "NBD read vs. qemu-img convert");
    client.disconnect().await?;
    Ok(())
}

#[tokio::test]
#[ignore = "tier qemu: needs QEMU 10 and its tools (bash scripts/test.sh runs it)"]
async fn small_pipelined_requests_and_unaligned_reads_equal_the_image() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let img = make_test_image(dir.path())?;
    let (mut server, sock) = spawn_qemu_nbd(dir.path(), &img.path, &["-r"])?;
    let opts = ConnectOptions::new(EXPORT)
        .with_max_request_bytes(64 * 1024)
        .with_pipeline_depth(8);
    let mut client = connect_when_ready(&mut server, &sock, &opts).await?;
    assert_eq!(client.max_request_bytes(), 64 * 1024);

    // 128 requests of 64 KiB, 8 in flight.
    let mut buf = vec![0u8; IMAGE_SIZE as usize];
    client.read_into(&mut buf, 0).await?;
    assert_bytes_eq(&buf, &img.expected, "pipelined read");

    // Unaligned ranges, across cluster, data/hole and request-split boundaries.
    let e = &img.expected;
    for (offset, len) in [
        (3 * MIB + 50, 1100usize),
        (MIB - 7, 20),
        (2 * MIB + 64 * KIB - 1, 2),
        (IMAGE_SIZE - 1, 1),
        (12345, 200_000),
        (0, 0),
    ] {
        let got = client.read(offset, len).await?;
        assert_bytes_eq(
            &got,
            &e[offset as usize..offset as usize + len],
            &format!("read {offset}+{len}"),
        );
    }
    client.disconnect().await?;
    Ok(())
}

#[tokio::test]
#[ignore = "tier qemu: needs QEMU 10 and its tools (bash scripts/test.sh runs it)"]
async fn dirty_bitmap_reports_exactly_the_written_clusters() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let img = make_test_image(dir.path())?;
    let (mut server, sock) = spawn_qemu_nbd(dir.path(), &img.path, &["-r", "-B", BITMAP])?;
    let opts = ConnectOptions::new(EXPORT).with_dirty_bitmap(BITMAP);
    let mut client = connect_when_ready(&mut server, &sock, &opts).await?;
    let b0 = client
        .meta_context_id(&dirty_bitmap_context(BITMAP))
        .expect("negotiated");

    assert_eq!(client.dirty_ranges(b0, 0..IMAGE_SIZE).await?, img.dirty);

    // Extents tile the whole disk, alternate dirty / clean, and agree with dirty_ranges.
    let extents = client.extents(b0, 0..IMAGE_SIZE).await?;
    assert_eq!(extents.first().map(|e| e.offset), Some(0));
    assert_eq!(extents.last().map(|e| e.end()), Some(IMAGE_SIZE));
    for w in extents.windows(2) {
        assert_eq!(w[0].end(), w[1].offset);
        assert_ne!(w[0].is_dirty(), w[1].is_dirty());
    }
    let dirty: Vec<_> = extents
        .iter()
        .filter(|e| e.is_dirty())
        .map(|e| e.range())
        .collect();
    assert_eq!(dirty, img.dirty);

    // A sub-range is clipped to the query, at byte (not cluster) precision.
    let sub = client
        .dirty_ranges(b0, 2 * MIB + 4 * KIB..3 * MIB + 10)
        .await?;
    assert_eq!(
        sub,
        vec![2 * MIB + 4 * KIB..2 * MIB + 64 * KIB, 3 * MIB..3 * MIB + 10]
    );

    // The dirty data reads back as written, via the same connection.
    for r in &img.dirty {
        let got = client.read(r.start, (r.end - r.start) as usize).await?;
        assert_bytes_eq(
            &got,
            &img.expected[r.start as usize..r.end as usize],
            "dirty range data",
        );
    }
    client.disconnect().await?;
    Ok(())
}

#[tokio::test]
#[ignore = "tier qemu: needs QEMU 10 and its tools (bash scripts/test.sh runs it)"]
async fn base_allocation_reports_unwritten_areas_as_holes_reading_zero() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let img = make_test_image(dir.path())?;
    let (mut server, sock) = spawn_qemu_nbd(dir.path(), &img.path, &["-r", "-A", "-B", BITMAP])?;
    let opts = ConnectOptions::new(EXPORT)
        .with_base_allocation()
        .with_meta_context(QEMU_ALLOCATION_DEPTH)
        .with_dirty_bitmap(BITMAP);
    let mut client = connect_when_ready(&mut server, &sock, &opts).await?;
    assert_eq!(client.info().meta_contexts.len(), 3);
    let alloc = client.meta_context_id(BASE_ALLOCATION).expect("negotiated");
    let depth = client
        .meta_context_id(QEMU_ALLOCATION_DEPTH)
        .expect("negotiated");

    let extents = client.extents(alloc, 0..IMAGE_SIZE).await?;
    let covering = |r: &std::ops::Range<u64>| {
        extents
            .iter()
            .filter(move |e| e.offset < r.end && e.end() > r.start)
            .copied()
            .collect::<Vec<_>>()
    };
    for r in &img.unwritten {
        for e in covering(r) {
            assert!(
                e.is_hole() && e.is_zero(),
                "unwritten {r:?} has extent {e:?}"
            );
        }
    }
    for e in covering(&(0..MIB)) {
        assert!(
            !e.is_hole() && !e.is_zero(),
            "data at [0, 1M) has extent {e:?}"
        );
    }
    for e in covering(&img.zeroed) {
        assert!(e.is_zero(), "write-zeroes range has extent {e:?}");
    }

    // allocation depth: 0 = unallocated in the whole chain, 1 = allocated in the top image.
    let depths = client.extents(depth, 0..IMAGE_SIZE).await?;
    assert_eq!(
        depths.first().map(|e| (e.range(), e.flags)),
        Some((0..MIB, 1))
    );
    assert!(depths.iter().any(|e| e.offset == MIB && e.flags == 0));

    // One block status request answers every negotiated context.
    let status = client.block_status(0, (2 * MIB) as u32).await?;
    assert_eq!(status.contexts.len(), 3);
    client.disconnect().await?;
    Ok(())
}

#[tokio::test]
#[ignore = "tier qemu: needs QEMU 10 and its tools (bash scripts/test.sh runs it)"]
async fn unknown_export_name_is_a_typed_error_with_the_server_message() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let img = make_test_image(dir.path())?;
    let (mut server, sock) = spawn_qemu_nbd(dir.path(), &img.path, &["-r"])?;
    // Without meta contexts the error comes from NBD_OPT_GO ...
    let err = connect_when_ready(&mut server, &sock, &ConnectOptions::new("nope"))
        .await
        .unwrap_err();
    match err.downcast::<ConnectError>()? {
        ConnectError::ExportNotFound { name, message } => {
            assert_eq!(name, "nope");
            assert!(
                message.contains("nope"),
                "server message {message:?} names the export"
            );
        }
        other => bail!("expected ExportNotFound, got {other:?}"),
    }
    // ... with them, from NBD_OPT_SET_META_CONTEXT, mapped the same way.
    let opts = ConnectOptions::new("nope").with_base_allocation();
    match NbdClient::connect_unix(&sock, &opts).await {
        Err(ConnectError::ExportNotFound { message, .. }) => assert!(!message.is_empty()),
        other => bail!("expected ExportNotFound, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
#[ignore = "tier qemu: needs QEMU 10 and its tools (bash scripts/test.sh runs it)"]
async fn unexported_bitmap_is_a_typed_error_naming_the_context() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let img = make_test_image(dir.path())?;
    // The bitmap exists in the image but is not exported (no -B).
    let (mut server, sock) = spawn_qemu_nbd(dir.path(), &img.path, &["-r"])?;
    let opts = ConnectOptions::new(EXPORT).with_dirty_bitmap(BITMAP);
    let err = connect_when_ready(&mut server, &sock, &opts)
        .await
        .unwrap_err();
    match err.downcast::<ConnectError>()? {
        ConnectError::MetaContextNotFound { name, export } => {
            assert_eq!(name, "qemu:dirty-bitmap:b0");
            assert_eq!(export, EXPORT);
        }
        other => bail!("expected MetaContextNotFound, got {other:?}"),
    }
    // Block status without any negotiated context is refused client-side.
    let mut client = NbdClient::connect_unix(&sock, &ConnectOptions::new(EXPORT)).await?;
    assert!(matches!(
        client.block_status(0, 4096).await,
        Err(BlockStatusError::NoMetaContexts)
    ));
    Ok(())
}

#[tokio::test]
#[ignore = "tier qemu: needs QEMU 10 and its tools (bash scripts/test.sh runs it)"]
async fn writes_and_flush_reach_the_image_and_mark_the_bitmap() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let img = make_test_image(dir.path())?;
    let (mut server, sock) = spawn_qemu_nbd(dir.path(), &img.path, &["-B", BITMAP])?;
    let opts = ConnectOptions::new(EXPORT)
        .with_dirty_bitmap(BITMAP)
        .with_max_request_bytes(4096);
    let mut client = connect_when_ready(&mut server, &sock, &opts).await?;
    assert!(!client.info().flags.read_only());
    assert!(client.info().flags.can_flush());

    // Unaligned, spanning two clusters, split into 4 KiB requests.
    let offset = 7 * MIB - 1000;
    let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    client.write(&data, offset).await?;
    client.flush().await?;
    assert_eq!(client.read(offset, data.len()).await?, data);

    let b0 = client
        .meta_context_id(&dirty_bitmap_context(BITMAP))
        .expect("negotiated");
    let mut want = img.dirty.clone();
    want.push(7 * MIB - 64 * KIB..7 * MIB + 64 * KIB);
    assert_eq!(client.dirty_ranges(b0, 0..IMAGE_SIZE).await?, want);
    client.disconnect().await?;
    drop(server);

    let mut expected = img.expected.clone();
    expected[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
    assert_bytes_eq(
        &raw_content(&img.path, dir.path())?,
        &expected,
        "image after NBD write",
    );
    Ok(())
}

#[tokio::test]
#[ignore = "tier qemu: needs QEMU 10 and its tools (bash scripts/test.sh runs it)"]
async fn writes_to_read_only_export_and_out_of_bounds_requests_are_refused_client_side(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let img = make_test_image(dir.path())?;
    let (mut server, sock) = spawn_qemu_nbd(dir.path(), &img.path, &["-r", "-B", BITMAP])?;
    let opts = ConnectOptions::new(EXPORT).with_dirty_bitmap(BITMAP);
    let mut client = connect_when_ready(&mut server, &sock, &opts).await?;
    assert!(matches!(
        client.write(&[1, 2, 3], 0).await,
        Err(WriteError::ReadOnly)
    ));
    assert!(matches!(
        client.read(IMAGE_SIZE - 10, 11).await,
        Err(ReadError::OutOfBounds { offset, len: 11, size: IMAGE_SIZE }) if offset == IMAGE_SIZE - 10
    ));
    assert!(matches!(
        client.read(u64::MAX, 2).await,
        Err(ReadError::OutOfBounds { .. })
    ));
    assert!(matches!(
        client.block_status(IMAGE_SIZE, 1).await,
        Err(BlockStatusError::OutOfBounds { .. })
    ));
    // Nothing was sent, so the connection is still good.
    assert!(client.is_usable());
    assert_eq!(client.read(0, 4).await?, vec![0xab; 4]);
    client.disconnect().await?;
    Ok(())
}

#[tokio::test]
#[ignore = "tier qemu: needs QEMU 10 and its tools (bash scripts/test.sh runs it)"]
async fn tcp_transport_reads_the_same_bytes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let img = make_test_image(dir.path())?;
    // qemu-nbd has no "port 0": pick a free port, then poll until qemu-nbd owns it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut cmd = Command::new("qemu-nbd");
    cmd.args([
        "-t",
        "-r",
        "-f",
        "qcow2",
        "-x",
        EXPORT,
        "-b",
        "127.0.0.1",
        "-p",
    ])
    .arg(port.to_string())
    .args(["-B", BITMAP])
    .arg(&img.path);
    let mut server = KillOnDrop::spawn("qemu-nbd (tcp)", &mut cmd, dir.path().join("stderr"))?;
    let opts = ConnectOptions::new(EXPORT).with_dirty_bitmap(BITMAP);
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + STARTUP_DEADLINE;
    let mut client = loop {
        server.check_alive()?;
        match NbdClient::connect_tcp(addr.as_str(), &opts).await {
            Ok(c) => break c,
            Err(ConnectError::Connect { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(e) => return Err(e.into()),
        }
    };
    let mut buf = vec![0u8; IMAGE_SIZE as usize];
    client.read_into(&mut buf, 0).await?;
    assert_bytes_eq(&buf, &img.expected, "read over TCP");
    let b0 = client
        .meta_context_id(&dirty_bitmap_context(BITMAP))
        .expect("negotiated");
    assert_eq!(client.dirty_ranges(b0, 0..IMAGE_SIZE).await?, img.dirty);
    client.disconnect().await?;
    Ok(())
}
