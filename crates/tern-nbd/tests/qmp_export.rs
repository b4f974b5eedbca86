//! tern-nbd against a running QEMU (`qemu-system-x86_64 -machine none`, no guest): the
//! source-side QMP sequence for live disk migration. Writes come from HMP `qemu-io`, which
//! goes through the same block layer (and dirty bitmaps) as guest writes.
//!
//! Sequence that works on QEMU 10.0 (see `running_qemu_exports_a_frozen_dirty_bitmap`):
//!   blockdev-add {driver: qcow2, node-name: disk0, file: {driver: file, filename}}
//!   block-dirty-bitmap-add {node: disk0, name: b0}                (tracking starts)
//!   ... guest writes ...
//!   transaction [block-dirty-bitmap-add {disk0, b1}, block-dirty-bitmap-disable {disk0, b0}]
//!   nbd-server-start {addr: {type: unix, data: {path}}}
//!   block-export-add {type: nbd, id: e0, node-name: disk0, name: disk0, writable: false,
//!                     bitmaps: [b0], allocation-depth: true}
//!   (NBD: qemu:dirty-bitmap:b0 = writes before the freeze; later writes go to b1)
//!   block-export-del {id: e0}  (after the NBD client disconnected), then rotate again.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use common::*;
use serde_json::{json, Value};
use tern_nbd::{dirty_bitmap_context, ConnectOptions, NbdClient, BASE_ALLOCATION};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// Minimal QMP line client for this test (tern-qemu owns the real one).
struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Qmp {
    async fn connect(server: &mut KillOnDrop, sock: &Path) -> Result<Self> {
        let stream = wait_for_unix_socket(server, sock).await?;
        let (r, writer) = stream.into_split();
        let mut qmp = Self {
            reader: BufReader::new(r),
            writer,
        };
        let greeting = qmp.next_message().await?;
        if greeting.get("QMP").is_none() {
            bail!("not a QMP greeting: {greeting}");
        }
        qmp.execute("qmp_capabilities", json!({})).await?;
        Ok(qmp)
    }

    async fn next_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).await? == 0 {
            bail!("QMP connection closed");
        }
        Ok(serde_json::from_str(&line)?)
    }

    /// Runs a command; `Err` carries QMP's error description.
    async fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let mut msg = serde_json::to_vec(&json!({"execute": command, "arguments": arguments}))?;
        msg.push(b'\n');
        self.writer.write_all(&msg).await?;
        loop {
            let reply = self.next_message().await?;
            if reply.get("event").is_some() {
                continue;
            }
            if let Some(r) = reply.get("return") {
                return Ok(r.clone());
            }
            let desc = reply["error"]["desc"].as_str().unwrap_or("?").to_owned();
            return Err(anyhow!("{command}: {desc}"));
        }
    }

    async fn qemu_io(&mut self, node: &str, cmd: &str) -> Result<()> {
        let out = self
            .execute(
                "human-monitor-command",
                json!({"command-line": format!("qemu-io {node} \"{cmd}\"")}),
            )
            .await?;
        let out = out.as_str().unwrap_or_default();
        if !out.is_empty() {
            bail!("qemu-io {cmd}: {out}");
        }
        Ok(())
    }
}

#[tokio::test]
#[ignore = "tier qemu: needs QEMU 10 and its tools (bash scripts/test.sh runs it)"]
async fn running_qemu_exports_a_frozen_dirty_bitmap() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let img = dir.path().join("disk.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg(IMAGE_SIZE.to_string()))?;
    qemu_io(&img, &["write -q -P 0xab 0 1M"])?;

    let qmp_sock = dir.path().join("qmp.sock");
    let nbd_sock = dir.path().join("nbd.sock");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-nodefaults",
        "-machine",
        "none",
        "-display",
        "none",
        "-qmp",
    ])
    .arg(format!("unix:{},server=on,wait=off", qmp_sock.display()));
    let mut qemu = KillOnDrop::spawn(
        "qemu-system-x86_64",
        &mut cmd,
        dir.path().join("qemu.stderr"),
    )?;
    let mut qmp = Qmp::connect(&mut qemu, &qmp_sock).await.context("QMP")?;

    qmp.execute(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "disk0",
               "file": {"driver": "file", "filename": img.to_str().unwrap()}}),
    )
    .await?;
    qmp.execute(
        "block-dirty-bitmap-add",
        json!({"node": "disk0", "name": "b0"}),
    )
    .await?;
    // "Guest" writes while b0 tracks.
    qmp.qemu_io("disk0", "write -q -P 0xcd 2M 64k").await?;
    qmp.qemu_io("disk0", "write -q -P 0xef 3145828 1000")
        .await?;

    qmp.execute(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": nbd_sock.to_str().unwrap()}}}),
    )
    .await?;
    // Gotcha: an enabled bitmap cannot go into a read-only export of a writable node.
    let err = qmp
        .execute(
            "block-export-add",
            json!({"type": "nbd", "id": "e0", "node-name": "disk0", "name": "disk0",
                   "writable": false, "bitmaps": ["b0"]}),
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("incompatible with readonly export"),
        "{err}"
    );

    // Freeze b0 and start b1 atomically, then export the frozen one.
    qmp.execute(
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "b1"}},
            {"type": "block-dirty-bitmap-disable", "data": {"node": "disk0", "name": "b0"}}]}),
    )
    .await?;
    qmp.execute(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "disk0", "name": "disk0",
               "writable": false, "bitmaps": ["b0"], "allocation-depth": true}),
    )
    .await?;
    // A write after the freeze: visible in reads, not in b0.
    qmp.qemu_io("disk0", "write -q -P 0x77 6M 64k").await?;

    let opts = ConnectOptions::new("disk0")
        .with_dirty_bitmap("b0")
        .with_base_allocation();
    // nbd-server-start has returned, so the socket is already listening.
    let mut client = NbdClient::connect_unix(&nbd_sock, &opts).await?;
    assert_eq!(client.size(), IMAGE_SIZE);
    assert!(client.info().flags.read_only());

    let b0 = client
        .meta_context_id(&dirty_bitmap_context("b0"))
        .expect("negotiated");
    assert_eq!(
        client.dirty_ranges(b0, 0..IMAGE_SIZE).await?,
        vec![2 * MIB..2 * MIB + 64 * KIB, 3 * MIB..3 * MIB + 64 * KIB]
    );

    let mut expected = vec![0u8; IMAGE_SIZE as usize];
    expected[..MIB as usize].fill(0xab);
    expected[2 * MIB as usize..(2 * MIB + 64 * KIB) as usize].fill(0xcd);
    expected[3 * MIB as usize + 100..3 * MIB as usize + 1100].fill(0xef);
    expected[6 * MIB as usize..(6 * MIB + 64 * KIB) as usize].fill(0x77);
    let mut buf = vec![0u8; IMAGE_SIZE as usize];
    client.read_into(&mut buf, 0).await?;
    assert!(
        buf == expected,
        "NBD read of the running QEMU's disk differs from what was written"
    );

    let alloc = client.meta_context_id(BASE_ALLOCATION).expect("negotiated");
    let holes = client.extents(alloc, 4 * MIB..5 * MIB).await?;
    assert!(
        holes.iter().all(|e| e.is_hole() && e.is_zero()),
        "{holes:?}"
    );

    // While exported, the bitmap is busy: it cannot be removed or re-enabled.
    assert!(qmp
        .execute(
            "block-dirty-bitmap-remove",
            json!({"node": "disk0", "name": "b0"})
        )
        .await
        .is_err());

    client.disconnect().await?;
    qmp.execute("block-export-del", json!({"id": "e0"})).await?;
    // Next round: b1 holds exactly the post-freeze write.
    let deadline = Instant::now() + STARTUP_DEADLINE;
    while qmp
        .execute("query-block-exports", json!({}))
        .await?
        .as_array()
        .is_some_and(|a| !a.is_empty())
    {
        if Instant::now() > deadline {
            bail!("export e0 was not deleted");
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    qmp.execute(
        "block-dirty-bitmap-remove",
        json!({"node": "disk0", "name": "b0"}),
    )
    .await?;
    qmp.execute(
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "b2"}},
            {"type": "block-dirty-bitmap-disable", "data": {"node": "disk0", "name": "b1"}}]}),
    )
    .await?;
    qmp.execute(
        "block-export-add",
        json!({"type": "nbd", "id": "e1", "node-name": "disk0", "name": "disk0",
               "writable": false, "bitmaps": ["b1"]}),
    )
    .await?;
    let opts = ConnectOptions::new("disk0").with_dirty_bitmap("b1");
    let mut client = NbdClient::connect_unix(&nbd_sock, &opts).await?;
    let b1 = client
        .meta_context_id(&dirty_bitmap_context("b1"))
        .expect("negotiated");
    assert_eq!(
        client.dirty_ranges(b1, 0..IMAGE_SIZE).await?,
        vec![6 * MIB..6 * MIB + 64 * KIB]
    );
    client.disconnect().await?;

    let _ = qmp.execute("quit", json!({})).await;
    Ok(())
}
