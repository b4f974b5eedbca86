//! A hostile peer with a valid cluster certificate (a compromised host) against real
//! agents: every malformed or oversized message the protocol allows, one case each. After
//! each case the attacked agent still answers its API, the VM it runs still runs, nothing
//! of the attack is left on it, and its memory stays bounded. Also the same peer as a
//! destination, against a source: it cannot read pages of other VMs, nor exhaust or hold
//! the source.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use serde_json::json;
use tern_proto::{limits, DiskInfo, ErrorCode, Message, Page, PageBody, RamBlock};
use tern_testkit::agents::{
    e2e_lock, pid_alive, wait_for_text, AgentOptions, TestAgent, TEST_CLUSTER_KEY,
};
use tern_testkit::guest::{ensure_guest, pattern_page, GuestImage};
use tern_testkit::hostile::{rss_kib, Ended, HostilePeer};

const BIN: &str = env!("CARGO_BIN_EXE_tern");
const WITHIN: Duration = Duration::from_secs(60);

fn spec_with(name: &str, kernel: &Path, initrd: &Path, mem_mib: u32, extra: &str) -> String {
    format!(
        "name = {name:?}\nmemory_mib = {mem_mib}\nvcpus = 1\naccel = \"tcg\"\nkernel = {:?}\ninitrd = {:?}\nappend = \"console=ttyS0 panic=-1 tern.workload=idle\"\n{extra}",
        kernel.display().to_string(),
        initrd.display().to_string()
    )
}

fn spec(name: &str, g: &GuestImage, mem_mib: u32, extra: &str) -> String {
    spec_with(name, &g.kernel, &g.initrd, mem_mib, extra)
}

fn boot(a: &TestAgent, spec_toml: &str) -> Result<()> {
    let info = a.start_vm(spec_toml)?;
    let console = PathBuf::from(info["console_log"].as_str().context("console path")?);
    wait_for_text(&console, "TERN-READY", Duration::from_secs(90))?;
    Ok(())
}

/// The attacked destination: an agent with a VM of its own running, and what it looked
/// like before the attacks.
struct Victim {
    agent: TestAgent,
    resident: String,
    rss0_kib: u64,
    pid: u32,
}

impl Victim {
    /// After an attack: the API answers, the resident VM runs, no run directory or QEMU
    /// of the attack is left, memory within `slack_mib` of where it started.
    fn still_fine(&self, case: &str, slack_mib: u64) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let vms = self.agent.vms().with_context(|| format!("{case}: API"))?;
            let status = self.agent.vm_status(&self.resident)?;
            let dirs: Vec<PathBuf> = self
                .agent
                .run_dirs()
                .into_iter()
                .filter(|d| {
                    !d.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(&self.resident))
                })
                .collect();
            let qemus: Vec<u32> = self
                .agent
                .migrations()?
                .iter()
                .filter_map(|m| m.dest_qemu_pid)
                .filter(|p| pid_alive(*p))
                .collect();
            let running = self
                .agent
                .migrations()?
                .iter()
                .filter(|m| !m.finished)
                .count();
            if vms.len() == 1
                && status == "running"
                && dirs.is_empty()
                && qemus.is_empty()
                && running == 0
            {
                break;
            }
            if Instant::now() > deadline {
                bail!("{case}: the attacked agent is not back to normal: vms {vms:?}, resident {status}, run dirs {dirs:?}, QEMUs {qemus:?}, migrations running {running}\n{}", self.agent.log_text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let rss = rss_kib(self.pid)?;
        anyhow::ensure!(
            rss < self.rss0_kib + (slack_mib << 10),
            "{case}: the agent's memory grew from {} MiB to {} MiB",
            self.rss0_kib >> 10,
            rss >> 10
        );
        Ok(())
    }
}

fn victim(g: &GuestImage, boot_dir: Option<&Path>) -> Result<Victim> {
    let mut args = vec!["--stall-timeout-secs", "5"];
    let bd;
    if let Some(d) = boot_dir {
        bd = d.display().to_string();
        args.extend(["--boot-dir", &bd]);
    }
    let agent = TestAgent::start_with(
        Path::new(BIN),
        "host-b",
        AgentOptions {
            args: &args,
            ..Default::default()
        },
    )?;
    boot(&agent, &spec("resident", g, 96, ""))?;
    let pid = agent.pid().context("agent pid")?;
    let rss0_kib = rss_kib(pid)?;
    Ok(Victim {
        agent,
        resident: "resident".into(),
        rss0_kib,
        pid,
    })
}

/// A hostile source that got as far as Prepared for migration `id` (protocol `version`).
fn prepared(
    v: &Victim,
    who: &str,
    version: u16,
    id: &str,
    spec_toml: &str,
    before: &[Message],
) -> Result<HostilePeer> {
    let mut p = HostilePeer::connect(v.agent.peer_addr, who, &[])?;
    p.hello(version)?;
    match p.prepare(id, spec_toml, before)? {
        Ok(()) => Ok(p),
        Err(e) => bail!("{id}: Prepare refused: {e:?}\n{}", v.agent.log_text()),
    }
}

fn expect_abort(p: &mut HostilePeer, code: ErrorCode, words: &str, case: &str) -> Result<String> {
    match p.ended(WITHIN)? {
        Ended::Aborted(c, m) if c == code && m.contains(words) => Ok(m),
        other => bail!("{case}: expected Abort {code:?} saying {words:?}, got {other:?}"),
    }
}

/// A Pages frame of one record.
fn one_page(block: u16, offset: u64, body: PageBody) -> Message {
    Message::Pages {
        block,
        pages: vec![Page { offset, body }],
    }
}

/// Whether the attacked agent ended the exchange with `code` and `words`: in the Abort the
/// peer read, or, when the peer was still writing as the agent closed (its Abort lost in
/// the reset), in the agent's own record of the failed migration.
fn ended_as(agent: &TestAgent, ended: &Ended, code: ErrorCode, words: &str) -> Result<bool> {
    Ok(match ended {
        Ended::Aborted(c, m) => *c == code && m.contains(words),
        Ended::Closed => agent.migrations()?.iter().any(|m| {
            m.error
                .as_ref()
                .is_some_and(|e| e.code == code.name() && e.message.contains(words))
        }),
    })
}

fn ram_blocks(len: u64) -> Message {
    Message::RamBlocks {
        page_size: 4096,
        blocks: vec![RamBlock {
            name: "pc.ram".into(),
            used_length: len,
        }],
    }
}

#[test]
#[ignore = "tier vm: needs QEMU 10, the test guest and root (bash scripts/test.sh runs it)"]
fn a_hostile_source_cannot_crash_exhaust_or_mislead_a_destination() -> Result<()> {
    let _l = e2e_lock();
    let g = ensure_guest()?;
    let v = victim(&g, None)?;
    let vm = spec("hv", &g, 64, "");
    let mut n = 0;
    let mut id = || {
        n += 1;
        format!("m-hostile-{n}")
    };

    // RAM blocks: sizes past the VM's memory, other page sizes, twice, too many
    let v2_cases: Vec<(&str, Vec<Message>, &str)> = vec![
        ("huge RAM block", vec![ram_blocks(1 << 50)], "RamBlocks"),
        (
            "1 GiB pages",
            vec![Message::RamBlocks {
                page_size: 1 << 30,
                blocks: vec![RamBlock {
                    name: "pc.ram".into(),
                    used_length: 64 << 20,
                }],
            }],
            "page size",
        ),
        (
            "RamBlocks twice",
            vec![ram_blocks(64 << 20), ram_blocks(64 << 20)],
            "twice",
        ),
        (
            "200 RAM blocks",
            vec![Message::RamBlocks {
                page_size: 4096,
                blocks: (0..200)
                    .map(|i| RamBlock {
                        name: format!("b{i}"),
                        used_length: 4096,
                    })
                    .collect(),
            }],
            "RAM blocks",
        ),
        (
            "page past its block",
            vec![
                ram_blocks(64 << 20),
                one_page(0, 64 << 20, PageBody::Zero { fill: 0 }),
            ],
            "outside",
        ),
        (
            "page not aligned",
            vec![
                ram_blocks(64 << 20),
                one_page(0, 100, PageBody::Zero { fill: 0 }),
            ],
            "aligned",
        ),
        (
            "page of an unknown block",
            vec![
                ram_blocks(64 << 20),
                one_page(7, 0, PageBody::Zero { fill: 0 }),
            ],
            "unknown block",
        ),
        (
            "a page of 8 KiB",
            vec![
                ram_blocks(64 << 20),
                one_page(0, 0, PageBody::Raw(Bytes::from(vec![1u8; 8192]))),
            ],
            "page of 8192 bytes",
        ),
        (
            "content nobody asked for",
            vec![
                ram_blocks(64 << 20),
                Message::Content {
                    pages: vec![([9; 16], Bytes::from(vec![1u8; 4096]))],
                },
            ],
            "did not ask",
        ),
    ];
    // the lean path's page kinds (v5): runs of zero pages that do not fit, and a v5 kind
    // in a migration of an older version
    let zero_run =
        |offset: u64, pages: u32| one_page(0, offset, PageBody::ZeroRun { fill: 0, pages });
    let mut cases: Vec<(&str, u16, Vec<Message>, &str)> =
        v2_cases.into_iter().map(|(c, m, w)| (c, 2, m, w)).collect();
    cases.extend([
        (
            "a zero run past its block",
            5,
            vec![ram_blocks(64 << 20), zero_run((64 << 20) - 4096, 2)],
            "does not fit",
        ),
        (
            "a zero run of 2^32-1 pages",
            5,
            vec![ram_blocks(64 << 20), zero_run(0, u32::MAX)],
            "does not fit",
        ),
        (
            "a zero run of no pages",
            5,
            vec![ram_blocks(64 << 20), zero_run(0, 0)],
            "does not fit",
        ),
        (
            "a plain page in a v2 migration",
            2,
            vec![
                ram_blocks(64 << 20),
                one_page(0, 0, PageBody::Plain(Bytes::from(vec![1u8; 4096]))),
            ],
            "protocol v5",
        ),
    ]);
    for (case, version, msgs, words) in cases {
        let mut p = prepared(&v, "evil-src", version, &id(), &vm, &[])?;
        for m in &msgs {
            p.send(m)?;
        }
        expect_abort(&mut p, ErrorCode::Protocol, words, case)?;
        v.still_fine(case, 256)?;
    }

    // References the source never backs with content, while the destination asks (the
    // peer keeps reading, so it is the reference limit that ends it, not a write stall)
    {
        let mut p = prepared(&v, "evil-src", 2, &id(), &vm, &[])?;
        p.send(&ram_blocks(64 << 20))?;
        let mut ended = None;
        for f in 0u64..400 {
            let pages = (0..1024u64)
                .map(|i| {
                    let mut h = [0u8; 16];
                    h[..8].copy_from_slice(&(f * 1024 + i).to_le_bytes());
                    h[8] = 0xee;
                    Page {
                        offset: (i % 16384) * 4096,
                        body: PageBody::Ref(h),
                    }
                })
                .collect();
            if p.send(&Message::Pages { block: 0, pages }).is_err() {
                break;
            }
            if let Some(e) = p.drain()? {
                ended = Some(e);
                break;
            }
        }
        let e = match ended {
            Some(e) => e,
            None => p.ended(WITHIN)?,
        };
        anyhow::ensure!(
            ended_as(&v.agent, &e, ErrorCode::Protocol, "did not send")?,
            "reference flood: {e:?}"
        );
        v.still_fine("reference flood", 256)?;
    }

    // Parallel streams: a frame far ahead, then a flood of frames that never come in order
    {
        let mid = id();
        let mut p = prepared(&v, "evil-src", 2, &mid, &vm, &[])?;
        let mut d = HostilePeer::connect(v.agent.peer_addr, "evil-src", &[])?;
        d.hello(2)?;
        d.send(&Message::Attach {
            migration_id: mid.clone(),
            index: 1,
        })?;
        d.send(&Message::Seq { seq: 1_000_000 })?;
        d.send(&Message::QemuBytes(Bytes::from_static(b"x")))?;
        expect_abort(&mut p, ErrorCode::Protocol, "ahead", "a frame far ahead")?;
        v.still_fine("a frame far ahead", 256)?;

        let mid = id();
        let mut p = prepared(&v, "evil-src", 2, &mid, &vm, &[])?;
        let mut d = HostilePeer::connect(v.agent.peer_addr, "evil-src", &[])?;
        d.hello(2)?;
        d.send(&Message::Attach {
            migration_id: mid.clone(),
            index: 1,
        })?;
        // 1 GiB of frames numbered 1.., frame 0 never sent
        let chunk = Bytes::from(vec![0x42u8; 4 << 20]);
        for seq in 1..=256u64 {
            if d.send(&Message::Seq { seq }).is_err()
                || d.send(&Message::QemuBytes(chunk.clone())).is_err()
            {
                break;
            }
        }
        expect_abort(
            &mut p,
            ErrorCode::Protocol,
            "wait for #0",
            "a reorder flood",
        )?;
        v.still_fine("a reorder flood", 512)?;

        // more data connections than allowed, and one number twice
        for (index, case) in [
            (limits::MAX_DATA_STREAMS + 1, "data connection 17"),
            (0, "data connection 0"),
        ] {
            let mid = id();
            let mut p = prepared(&v, "evil-src", 2, &mid, &vm, &[])?;
            let mut d = HostilePeer::connect(v.agent.peer_addr, "evil-src", &[])?;
            d.hello(2)?;
            d.send(&Message::Attach {
                migration_id: mid,
                index,
            })?;
            expect_abort(&mut p, ErrorCode::Protocol, "data connection", case)?;
            v.still_fine(case, 512)?;
        }
    }

    // Migration ids: one per migration, bound to the certificate that prepared it
    {
        let mid = id();
        let _owner = prepared(&v, "evil-src", 2, &mid, &vm, &[])?;
        let mut other = HostilePeer::connect(v.agent.peer_addr, "other-src", &[])?;
        other.hello(2)?;
        match other.prepare(&mid, &spec("hv2", &g, 64, ""), &[])? {
            Err(Ended::Aborted(ErrorCode::Protocol, m)) if m.contains("already known") => {}
            r => bail!("a reused id: {r:?}"),
        }
        let mut other = HostilePeer::connect(v.agent.peer_addr, "other-src", &[])?;
        other.hello(2)?;
        other.send(&Message::Query {
            migration_id: mid.clone(),
        })?;
        expect_abort(
            &mut other,
            ErrorCode::NotAuthorized,
            "another peer",
            "Query from another certificate",
        )?;
        let mut other = HostilePeer::connect(v.agent.peer_addr, "other-src", &[])?;
        other.hello(2)?;
        other.send(&Message::Attach {
            migration_id: mid.clone(),
            index: 1,
        })?;
        expect_abort(
            &mut other,
            ErrorCode::NotAuthorized,
            "another peer",
            "Attach from another certificate",
        )?;
        // its own certificate gets an answer
        let mut same = HostilePeer::connect(v.agent.peer_addr, "evil-src", &[])?;
        same.hello(2)?;
        same.send(&Message::Query {
            migration_id: mid.clone(),
        })?;
        match same.recv(WITHIN)? {
            Some(Message::QueryAnswer {
                state: tern_proto::MigrationState::InProgress,
                ..
            }) => {}
            other => bail!("Query from the owner: {other:?}"),
        }
    }
    v.still_fine("ids", 512)?;

    // Storage tunnels (v6) reach only the NBD server of a domain libvirt migrates in here
    for (version, domain, code, words, case) in [
        (
            6,
            "nope",
            ErrorCode::QemuFailed,
            "cannot connect",
            "a tunnel to no domain",
        ),
        (
            6,
            "../../etc/x",
            ErrorCode::QemuFailed,
            "cannot be carried",
            "a tunnel to a path",
        ),
        (5, "nope", ErrorCode::Protocol, "Tunnel", "a tunnel on v5"),
    ] {
        let mut t = HostilePeer::connect(v.agent.peer_addr, "evil-src", &[])?;
        t.hello(version)?;
        t.send(&Message::Tunnel {
            domain: domain.into(),
        })?;
        expect_abort(&mut t, code, words, case)?;
    }
    v.still_fine("tunnels", 512)?;

    // A plan (v9): one question of bounded size, a probe of bounded bytes
    let mut q = HostilePeer::connect(v.agent.peer_addr, "evil-src", &[])?;
    q.hello(9)?;
    q.send(&Message::PlanQuery {
        key_id: 1,
        hashes: vec![],
        chunks: vec![[9; 16]; tern_proto::limits::MAX_PLAN_HASHES + 1],
    })?;
    expect_abort(
        &mut q,
        ErrorCode::Protocol,
        "plan's hashes",
        "a plan of 4097 hashes",
    )?;
    let mut q = HostilePeer::connect(v.agent.peer_addr, "evil-src", &[])?;
    q.hello(9)?;
    q.send(&Message::PlanQuery {
        key_id: 1,
        hashes: vec![[9; 16]; 16],
        chunks: vec![[9; 16]; 16],
    })?;
    match q.recv(WITHIN)? {
        Some(Message::PlanHeld {
            held: 0,
            chunks_held: 0,
        }) => {}
        other => bail!("a plan's question: expected PlanHeld 0, got {other:?}"),
    }
    let filler = Bytes::from(vec![0u8; 1 << 20]);
    let mut sent = 0u64;
    while sent <= tern_proto::limits::MAX_PROBE_BYTES {
        if q.send(&Message::ProbeBytes(filler.clone())).is_err() {
            break; // refused and closed
        }
        sent += 1 << 20;
    }
    expect_abort(
        &mut q,
        ErrorCode::ResourceExhausted,
        "at most",
        "a probe past its bytes",
    )?;
    v.still_fine("plans", 512)?;

    // Disks: pieces tied to byte ranges, rounds in order, sizes sane
    let disk_vm = spec(
        "hd",
        &g,
        64,
        "[[disk]]\npath = \"/nonexistent/hd.qcow2\"\nformat = \"qcow2\"\n",
    );
    let offer = |size: u64, allocated: u64| Message::DiskOffer {
        disks: vec![DiskInfo {
            virtual_size: size,
            allocated,
        }],
    };
    let hasher =
        tern_store::ContentHasher::new(tern_agent::load_cluster_key(Path::new(TEST_CLUSTER_KEY))?);
    let manifest = |range: std::ops::Range<u64>| -> Bytes {
        let mut m = tern_chunks::Manifest::new(range.clone()).expect("aligned");
        let block = vec![7u8; 4096];
        let mut at = range.start;
        while at < range.end {
            m.push_block(at, &block, &hasher).expect("in order");
            at += 4096;
        }
        Bytes::from(m.encode())
    };
    let disk_cases: Vec<(&str, Vec<Message>, &str)> = vec![
        (
            "a piece past the disk",
            vec![Message::DiskManifest {
                disk: 0,
                piece: 5,
                manifest: manifest(0..4 << 20),
            }],
            "past the end",
        ),
        (
            "a piece whose manifest covers another range",
            vec![Message::DiskManifest {
                disk: 0,
                piece: 1,
                manifest: manifest(0..4 << 20),
            }],
            "covers",
        ),
        (
            "data past the disk",
            vec![Message::DiskData {
                disk: 0,
                piece: tern_proto::DISK_DIRECT,
                offset: 8 << 20,
                data: Bytes::from(vec![1u8; 4096]),
            }],
            "beyond",
        ),
        (
            "a round out of order",
            vec![Message::DiskRoundEnd {
                disk: 0,
                round: 3,
                last: false,
            }],
            "was due",
        ),
        (
            "data for a disk the VM lacks",
            vec![Message::DiskData {
                disk: 4,
                piece: tern_proto::DISK_DIRECT,
                offset: 0,
                data: Bytes::from(vec![1u8; 4096]),
            }],
            "disks",
        ),
    ];
    for (case, msgs, words) in disk_cases {
        let mut p = prepared(&v, "evil-src", 3, &id(), &disk_vm, &[offer(8 << 20, 0)])?;
        for m in &msgs {
            p.send(m)?;
        }
        expect_abort(&mut p, ErrorCode::Protocol, words, case)?;
        v.still_fine(case, 512)?;
    }
    for (case, o) in [
        ("a disk of 2^60 bytes", offer(1 << 60, 0)),
        (
            "more allocated than the disk holds",
            offer(8 << 20, 9 << 20),
        ),
    ] {
        let mut p = HostilePeer::connect(v.agent.peer_addr, "evil-src", &[])?;
        p.hello(3)?;
        match p.prepare(&id(), &disk_vm, &[o])? {
            Err(Ended::Aborted(ErrorCode::Protocol, m)) if m.contains("DiskOffer") => {}
            r => bail!("{case}: {r:?}"),
        }
        v.still_fine(case, 512)?;
    }

    // What the destination launches: machine types it knows, a VM that fits
    for (case, spec_toml, code, words) in [
        (
            "an unknown machine type",
            spec("hm", &g, 64, "machine = \"pc-bogus-9.9\"\n"),
            ErrorCode::SpecRejected,
            "machine type",
        ),
        (
            "options after the machine type",
            spec("hm", &g, 64, "machine = \"pc,accel=kvm\"\n"),
            ErrorCode::SpecRejected,
            "machine type",
        ),
        (
            "more memory than the host has",
            spec("hm", &g, 1_048_576, ""),
            ErrorCode::ResourceExhausted,
            "memory",
        ),
        (
            "a vTPM without its key",
            spec("hm", &g, 64, "tpm = true\n"),
            ErrorCode::SpecRejected,
            "TpmKey",
        ),
        (
            "a network card on a network this host does not serve",
            spec(
                "hm",
                &g,
                64,
                "[[nic]]\nnetwork = \"evil\"\nmac = \"52:54:00:00:00:01\"\n",
            ),
            ErrorCode::SpecRejected,
            "not served by this host",
        ),
        (
            "a network card without its MAC",
            spec("hm", &g, 64, "[[nic]]\nnetwork = \"evil\"\n"),
            ErrorCode::SpecRejected,
            "no MAC",
        ),
    ] {
        let mut p = HostilePeer::connect(v.agent.peer_addr, "evil-src", &[])?;
        p.hello(4)?;
        match p.prepare(&id(), &spec_toml, &[])? {
            Err(Ended::Aborted(c, m)) if c == code && m.contains(words) => {}
            r => bail!("{case}: {r:?}"),
        }
        v.still_fine(case, 512)?;
    }
    // a peer's network name made no bridge here
    ensure!(
        !std::process::Command::new("ip")
            .args(["link", "show", "tern-evil"])
            .output()?
            .status
            .success(),
        "a hostile source's network name became a bridge"
    );

    // Incoming migrations at once: 4, then refused
    {
        let peers: Vec<HostilePeer> = (0..4)
            .map(|i| {
                prepared(
                    &v,
                    "evil-src",
                    2,
                    &id(),
                    &spec(&format!("hc{i}"), &g, 32, ""),
                    &[],
                )
            })
            .collect::<Result<_>>()?;
        let mut p = HostilePeer::connect(v.agent.peer_addr, "evil-src", &[])?;
        p.hello(2)?;
        match p.prepare(&id(), &spec("hc4", &g, 32, ""), &[])? {
            Err(Ended::Aborted(ErrorCode::ResourceExhausted, m)) if m.contains("at once") => {}
            r => bail!("a fifth incoming migration: {r:?}"),
        }
        drop(peers);
        v.still_fine("too many at once", 512)?;
    }
    Ok(())
}

#[test]
#[ignore = "tier vm: needs QEMU 10, the test guest and root (bash scripts/test.sh runs it)"]
fn a_destination_launches_only_boot_files_from_its_boot_directories() -> Result<()> {
    let _l = e2e_lock();
    let g = ensure_guest()?;
    // the victim's own boot directory: copies of the test guest, and a link that leads out
    let boot = tempfile::Builder::new()
        .prefix("tern-boot-")
        .tempdir_in("/tmp")?;
    let (k, i) = (boot.path().join("vmlinuz"), boot.path().join("initrd.gz"));
    std::fs::copy(&g.kernel, &k)?;
    std::fs::copy(&g.initrd, &i)?;
    std::os::unix::fs::symlink("/etc/shadow", boot.path().join("shadow-link"))?;
    let v = victim(&g, Some(boot.path()))?;
    let key = v.agent.dir.path().join("tls/agent.key");
    let outside = |initrd: &Path| spec_with("hb", &k, initrd, 64, "");
    let mut words = Vec::new();
    for (n, initrd) in [
        Path::new("/etc/shadow").to_path_buf(),
        Path::new("/etc/no-such-file-anywhere").to_path_buf(),
        key.clone(),
        boot.path().join("../../etc/shadow"),
        boot.path().join("shadow-link"),
        g.initrd.clone(), // a real guest initrd, but not in this agent's boot directory
    ]
    .iter()
    .enumerate()
    {
        let mut p = HostilePeer::connect(v.agent.peer_addr, "evil-src", &[])?;
        p.hello(4)?;
        match p.prepare(&format!("m-boot-{n}"), &outside(initrd), &[])? {
            Err(Ended::Aborted(ErrorCode::SpecRejected, m)) => {
                words.push(m.replace(&initrd.display().to_string(), "PATH"))
            }
            r => bail!("initrd {}: {r:?}", initrd.display()),
        }
        v.still_fine("a boot file outside", 256)?;
    }
    // the same words whether the file exists or not: the refusal tells nothing
    anyhow::ensure!(
        words.windows(2).all(|w| w[0] == w[1]),
        "refusals differ: {words:#?}"
    );
    anyhow::ensure!(words[0].contains("boot directories"), "{}", words[0]);
    // files inside the boot directory are taken
    let mut p = HostilePeer::connect(v.agent.peer_addr, "evil-src", &[])?;
    p.hello(4)?;
    match p.prepare("m-boot-ok", &spec_with("hb", &k, &i, 64, ""), &[])? {
        Ok(()) => {}
        Err(e) => bail!("boot files inside the boot directory: {e:?}"),
    }
    drop(p);
    v.still_fine("boot files inside", 256)?;
    Ok(())
}

/// A hostile destination: accepts one agent connection as `name` with `labels`, answers
/// Hello with the agent's own newest version and reads up to its Prepare.
fn hostile_destination(
    l: &TcpListener,
    name: &str,
    labels: &[&str],
) -> Result<(HostilePeer, Vec<Message>)> {
    let mut h = HostilePeer::accept(l, name, labels)?;
    let version = match h.recv(WITHIN)? {
        Some(Message::Hello { max_version, .. }) => max_version.min(tern_proto::PROTOCOL_VERSION),
        other => bail!("expected Hello, got {other:?}"),
    };
    h.send(&Message::HelloAck {
        version,
        agent: name.into(),
    })?;
    let mut before = Vec::new();
    loop {
        match h.recv(WITHIN)? {
            Some(m @ Message::Prepare { .. }) => {
                before.push(m);
                return Ok((h, before));
            }
            Some(m) => before.push(m),
            None => bail!("the source closed before Prepare (it sent {before:?})"),
        }
    }
}

#[test]
#[ignore = "tier vm: needs QEMU 10, the test guest and root (bash scripts/test.sh runs it)"]
fn a_hostile_destination_cannot_read_other_pages_nor_exhaust_the_source() -> Result<()> {
    let _l = e2e_lock();
    let g = ensure_guest()?;
    let a = TestAgent::start_with(
        Path::new(BIN),
        "host-a",
        AgentOptions {
            args: &["--stall-timeout-secs", "5"],
            ..Default::default()
        },
    )?;
    let b = TestAgent::start(Path::new(BIN), "host-b", &[])?;
    // A's page store gets another VM's pages: it migrates a pattern guest to B
    let seed = 77u64;
    boot(
        &a,
        &spec_with_workload(
            "pat",
            &g,
            96,
            &format!("tern.workload=pattern tern.mib=16 tern.seed={seed}"),
        ),
    )?;
    let id = a.start_migration("pat", &b.peer_addr.to_string(), json!({}))?;
    let st = a.wait_migration(&id, Duration::from_secs(180))?;
    anyhow::ensure!(st.report.is_some(), "pat to B: {:?}", st.error);
    boot(&a, &spec("v", &g, 96, ""))?;
    let pid = a.pid().context("pid")?;
    let rss0 = rss_kib(pid)?;
    let hasher =
        tern_store::ContentHasher::new(tern_agent::load_cluster_key(Path::new(TEST_CLUSTER_KEY))?);
    let l = TcpListener::bind("127.0.0.1:0")?;
    let to = l.local_addr()?.to_string();

    // 1. Want for pages of the other VM: refused, nothing of them sent
    let mig = a.start_migration("v", &to, json!({ "streams": 0 }))?;
    let (mut h, _) = hostile_destination(&l, "evil-dst", &[])?;
    h.send(&Message::Summary {
        key_id: hasher.key_id(),
        prefixes: vec![],
    })?;
    h.send(&Message::Prepared {
        qemu_version: "10.0.2".into(),
    })?;
    let wanted: Vec<[u8; 16]> = (0..8)
        .map(|i| hasher.hash(&pattern_page(seed, i)))
        .collect();
    h.send(&Message::Want {
        hashes: wanted.clone(),
    })?;
    let ended = h.ended(WITHIN)?;
    let leaked = h.seen.iter().any(|m| matches!(m, Message::Content { pages } if pages.iter().any(|(k, _)| wanted.contains(k))));
    anyhow::ensure!(!leaked, "the source sent pages of another VM to a Want");
    anyhow::ensure!(
        matches!(&ended, Ended::Aborted(ErrorCode::Protocol, m) if m.contains("never sent or referred to")),
        "Want probing: {ended:?}"
    );
    let st = a.wait_migration(&mig, WITHIN)?;
    anyhow::ensure!(
        st.error.as_ref().is_some_and(|e| e.code == "protocol"),
        "{st:?}"
    );
    anyhow::ensure!(a.vm_status("v")? == "running");

    // 2. A summary far larger than the source keeps: bounded memory, then an abort
    let mig = a.start_migration("v", &to, json!({ "streams": 0 }))?;
    let (mut h, _) = hostile_destination(&l, "evil-dst", &[])?;
    // (as large as a frame may be)
    let per_frame = ((tern_proto::MAX_PAYLOAD - 12) / 8) as u64;
    for f in 0..12u64 {
        let prefixes: Vec<u64> = (0..per_frame).map(|i| (f << 40) | i | 1).collect();
        h.send(&Message::Summary {
            key_id: hasher.key_id(),
            prefixes,
        })?;
    }
    h.send(&Message::Prepared {
        qemu_version: "10.0.2".into(),
    })?;
    std::thread::sleep(Duration::from_millis(500));
    let grown = rss_kib(pid)?.saturating_sub(rss0) >> 10;
    h.send(&Message::Abort {
        code: ErrorCode::Internal,
        message: "bye".into(),
    })?;
    let st = a.wait_migration(&mig, WITHIN)?;
    anyhow::ensure!(st.error.is_some(), "{st:?}");
    anyhow::ensure!(
        grown < 400,
        "48M summary prefixes grew the source by {grown} MiB"
    );
    anyhow::ensure!(a.vm_status("v")? == "running");
    Ok(())
}

fn spec_with_workload(name: &str, g: &GuestImage, mem_mib: u32, workload: &str) -> String {
    spec(name, g, mem_mib, "").replace("tern.workload=idle", workload)
}

#[test]
#[ignore = "tier vm: needs QEMU 10, the test guest and root (bash scripts/test.sh runs it)"]
fn a_hostile_destination_cannot_flood_a_source_with_disk_replies() -> Result<()> {
    let _l = e2e_lock();
    let g = ensure_guest()?;
    let a = TestAgent::start_with(
        Path::new(BIN),
        "host-a",
        AgentOptions {
            args: &["--stall-timeout-secs", "5"],
            ..Default::default()
        },
    )?;
    // a disk with data in its first pieces, so round 0 sends manifests
    let disk = a.dir.path().join("d.raw");
    let mut data = vec![0u8; 16 << 20];
    for (i, b) in data.iter_mut().enumerate().take(9 << 20) {
        *b = (i * 7 % 251) as u8;
    }
    std::fs::write(&disk, &data)?;
    boot(
        &a,
        &spec(
            "dv",
            &g,
            96,
            &format!(
                "[[disk]]\npath = {:?}\nformat = \"raw\"\n",
                disk.display().to_string()
            ),
        ),
    )?;
    let l = TcpListener::bind("127.0.0.1:0")?;
    let to = l.local_addr()?.to_string();
    let key_id =
        tern_store::ContentHasher::new(tern_agent::load_cluster_key(Path::new(TEST_CLUSTER_KEY))?)
            .key_id();

    // replies nobody asked for
    let mig = a.start_migration("dv", &to, json!({ "streams": 0 }))?;
    let (mut h, _) = hostile_destination(&l, "evil-dst", &[])?;
    h.send(&Message::Summary {
        key_id,
        prefixes: vec![],
    })?;
    h.send(&Message::Prepared {
        qemu_version: "10.0.2".into(),
    })?;
    for round in 0..2000u32 {
        if h.send(&Message::DiskRoundDone {
            disk: 0,
            round,
            written: 0,
        })
        .is_err()
        {
            break;
        }
    }
    let st = a.wait_migration(&mig, WITHIN)?;
    // (the inbox bound, or the disk copy meeting a reply it did not ask for: either way
    // a protocol error, not memory)
    anyhow::ensure!(
        st.error.as_ref().is_some_and(|e| e.code == "protocol"),
        "{st:?}"
    );
    anyhow::ensure!(a.vm_status("dv")? == "running");
    anyhow::ensure!(
        a.qmp("dv", "query-block-exports", None)?
            .as_array()
            .is_some_and(|e| e.is_empty()),
        "tern's exports left in the source QEMU"
    );

    // one DiskWant asking for the same piece a thousand times over
    let mig = a.start_migration("dv", &to, json!({ "streams": 0 }))?;
    let (mut h, _) = hostile_destination(&l, "evil-dst", &[])?;
    h.send(&Message::Summary {
        key_id,
        prefixes: vec![],
    })?;
    h.send(&Message::Prepared {
        qemu_version: "10.0.2".into(),
    })?;
    let piece = loop {
        match h.recv(WITHIN)? {
            Some(Message::DiskManifest { disk: 0, piece, .. }) => break piece,
            Some(_) => continue,
            None => bail!("the source closed before a manifest"),
        }
    };
    h.send(&Message::DiskWant {
        disk: 0,
        piece,
        runs: vec![(u64::from(piece) * limits::DISK_PIECE_BYTES, 1024); 1000],
    })?;
    let mut data_bytes = 0u64;
    let ended = loop {
        match h.recv(WITHIN)? {
            Some(Message::DiskData { data, .. }) => data_bytes += data.len() as u64,
            Some(Message::Abort { code, message }) => break Ended::Aborted(code, message),
            Some(_) => {}
            None => break Ended::Closed,
        }
    };
    anyhow::ensure!(
        data_bytes == 0,
        "the source sent {data_bytes} bytes for a DiskWant it refused"
    );
    anyhow::ensure!(
        matches!(&ended, Ended::Aborted(ErrorCode::Protocol, m) if m.contains("overlaps")),
        "{ended:?}"
    );
    let st = a.wait_migration(&mig, WITHIN)?;
    anyhow::ensure!(st.error.is_some(), "{st:?}");
    anyhow::ensure!(a.vm_status("dv")? == "running");
    Ok(())
}

#[test]
#[ignore = "tier vm: needs QEMU 10, the test guest and root (bash scripts/test.sh runs it)"]
fn a_vtpm_key_reaches_only_an_authorised_destination_and_is_the_vms_own() -> Result<()> {
    let _l = e2e_lock();
    let g = ensure_guest()?;
    let a = TestAgent::start_with(
        Path::new(BIN),
        "host-a",
        AgentOptions {
            args: &["--stall-timeout-secs", "5"],
            ..Default::default()
        },
    )?;
    boot(&a, &spec("t1", &g, 96, "tpm = true\n"))?;
    boot(&a, &spec("t2", &g, 96, "tpm = true\n"))?;
    let l = TcpListener::bind("127.0.0.1:0")?;
    let to = l.local_addr()?.to_string();
    // an unlabelled destination: refused before anything of the VM, the key included
    let mig = a.start_migration("t1", &to, json!({}))?;
    let mut h = HostilePeer::accept(&l, "plain-dst", &[])?;
    if let Some(Message::Hello { max_version, .. }) = h.recv(WITHIN)? {
        h.send(&Message::HelloAck {
            version: max_version,
            agent: "plain-dst".into(),
        })?;
    }
    let ended = h.ended(WITHIN)?;
    anyhow::ensure!(
        !h.seen
            .iter()
            .any(|m| matches!(m, Message::TpmKey { .. } | Message::Prepare { .. })),
        "sent to an unauthorised host: {:?}",
        h.seen
    );
    anyhow::ensure!(
        matches!(
            ended,
            Ended::Aborted(ErrorCode::NotAuthorized, _) | Ended::Closed
        ),
        "{ended:?}"
    );
    let st = a.wait_migration(&mig, WITHIN)?;
    anyhow::ensure!(
        st.error
            .as_ref()
            .is_some_and(|e| e.code == "not-authorized"),
        "{st:?}"
    );
    // a trusted one gets each VM's own key, which no cluster secret derives
    let cluster = tern_agent::load_cluster_key(Path::new(TEST_CLUSTER_KEY))?;
    let derived = blake3::derive_key("tern vTPM migration key v1", &cluster);
    let mut keys = Vec::new();
    for vm in ["t1", "t2"] {
        let mig = a.start_migration(vm, &to, json!({ "streams": 0 }))?;
        let (mut h, before) = hostile_destination(&l, "trusted-dst", &["trusted"])?;
        let key = before.iter().find_map(|m| match m {
            Message::TpmKey { key } => Some(*key),
            _ => None,
        });
        let key = key.context("no TpmKey before Prepare")?;
        h.send(&Message::Abort {
            code: ErrorCode::Internal,
            message: "enough".into(),
        })?;
        a.wait_migration(&mig, WITHIN)?;
        anyhow::ensure!(key != derived, "the vTPM key is the cluster-derived one");
        keys.push(key);
        anyhow::ensure!(a.vm_status(vm)? == "running");
    }
    anyhow::ensure!(keys[0] != keys[1], "two VMs share a vTPM migration key");
    Ok(())
}

#[test]
#[ignore = "tier vm: needs QEMU 10, the test guest and root (bash scripts/test.sh runs it)"]
fn a_source_that_understates_its_disks_cannot_fill_the_destinations_filesystem() -> Result<()> {
    let _l = e2e_lock();
    let g = ensure_guest()?;
    let small = tempfile::Builder::new()
        .prefix("tern-small-")
        .tempdir_in("/tmp")?;
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64m", "tern-test-room"])
        .arg(small.path())
        .status()?;
    anyhow::ensure!(mounted.success(), "mount tmpfs");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(small.path().to_path_buf());
    let b = TestAgent::start_with(
        Path::new(BIN),
        "host-b",
        AgentOptions {
            state_dir: Some(small.path()),
            args: &["--store-file-mib", "0", "--stall-timeout-secs", "5"],
            ..Default::default()
        },
    )?;
    let free = || -> Result<u64> {
        let out = std::process::Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(small.path())
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .context("df")?
            .trim()
            .parse()?)
    };
    // a 128 MiB disk that "holds 1 MiB": the room check passes, then the data keeps coming
    let mut p = HostilePeer::connect(b.peer_addr, "evil-src", &[])?;
    p.hello(3)?;
    let vm = spec(
        "room",
        &g,
        32,
        "[[disk]]\npath = \"/x/room.raw\"\nformat = \"raw\"\n",
    );
    let offer = Message::DiskOffer {
        disks: vec![DiskInfo {
            virtual_size: 128 << 20,
            allocated: 1 << 20,
        }],
    };
    if let Err(e) = p.prepare("m-room", &vm, &[offer])? {
        bail!("Prepare: {e:?}\n{}", b.log_text());
    }
    let mut noise = vec![0u8; 1 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut ended = None;
    let mut min_free = u64::MAX;
    for i in 0..128u64 {
        for b in noise.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let m = Message::DiskData {
            disk: 0,
            piece: tern_proto::DISK_DIRECT,
            offset: i << 20,
            data: Bytes::from(noise.clone()),
        };
        if p.send(&m).is_err() {
            break;
        }
        min_free = min_free.min(free()?);
        if let Some(e) = p.drain()? {
            ended = Some(e);
            break;
        }
    }
    let ended = match ended {
        Some(e) => e,
        None => p.ended(WITHIN)?,
    };
    min_free = min_free.min(free()?);
    // the copy stopped with the reserve still free (everything else on the host can still
    // write), not when the filesystem was full
    anyhow::ensure!(
        min_free > 8 << 20,
        "free space went down to {min_free} bytes"
    );
    anyhow::ensure!(
        ended_as(&b, &ended, ErrorCode::ResourceExhausted, "disk space")?,
        "{ended:?}\n{}",
        b.log_text()
    );
    // and then it gave it all back
    let deadline = Instant::now() + Duration::from_secs(20);
    while !b.run_dirs().is_empty() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the destination kept the partial disk"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::ensure!(free()? > 48 << 20, "free space after cleanup: {}", free()?);
    anyhow::ensure!(b.vms()?.is_empty());
    Ok(())
}
