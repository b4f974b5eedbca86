//! The Debian package, the way an operator meets it: `scripts/package.sh` builds it with
//! cargo-deb; it installs with apt into a clean Debian 12 root (debootstrap) with QEMU 10
//! from bookworm-backports; the agent runs exactly as its systemd unit says (the unit's
//! `ExecStart`, reading the packaged /etc/tern/agent.toml), a second one with flags over
//! that file, and a VM migrates between them with the packaged binary and the root's QEMU.
//! Then libvirt as an operator's libvirt host has it: installed with apt in the same root,
//! two libvirtd there (each in a mount namespace of its own, with its agent), and a
//! libvirt domain moves from one to the other with one `tern migrate --libvirt` command.
//! Systemd itself does not run on this machine (its PID 1 is not systemd), so the unit
//! is checked by `systemd-analyze verify` and its `ExecStart` run, not started by systemd.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use tern_testkit::agents::{checker_clean, e2e_lock, wait_for_text};
use tern_testkit::guest::{ensure_guest, GuestImage};
use tern_testkit::libvirt::{test_domain, LibvirtHost};
use tern_testkit::run;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A clean Debian root with /proc mounted; unmounted and removed when dropped (never
/// across a mount: `rm --one-file-system`).
struct Root {
    dir: tempfile::TempDir,
    agents: Vec<Child>,
}

impl Root {
    fn new() -> Result<Root> {
        let dir = tempfile::Builder::new().prefix("tern-debroot-").tempdir()?;
        let p = dir.path();
        run(Command::new("debootstrap")
            .args(["--variant=minbase", "bookworm"])
            .arg(p)
            .arg("http://deb.debian.org/debian"))
        .context("debootstrap (a clean Debian root)")?;
        // the host's apt sources: bookworm, its security updates and backports
        let _ = std::fs::remove_file(p.join("etc/apt/sources.list"));
        for e in std::fs::read_dir("/etc/apt/sources.list.d")? {
            let e = e?;
            std::fs::copy(
                e.path(),
                p.join("etc/apt/sources.list.d").join(e.file_name()),
            )?;
        }
        run(Command::new("mount")
            .args(["-t", "proc", "proc"])
            .arg(p.join("proc")))?;
        Ok(Root {
            dir,
            agents: Vec::new(),
        })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn run(&self, args: &[&str]) -> Result<String> {
        run(Command::new("chroot")
            .arg(self.path())
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"))
    }

    /// `apt-get install` in the root, without recommended packages.
    fn apt_install(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["apt-get", "install", "-y", "-qq", "--no-install-recommends"];
        all.extend_from_slice(args);
        self.run(&all)
    }

    /// Starts `tern agent ARGS` in the root and in mount namespace `mnt` (its libvirt
    /// host's), its log in the root's /var/log.
    fn agent(&mut self, mnt: &Path, args: &[String], log: &str) -> Result<()> {
        let out = std::fs::File::create(self.path().join("var/log").join(log))?;
        let child = Command::new("nsenter")
            .arg(format!("--mount={}", mnt.display()))
            .arg("chroot")
            .arg(self.path())
            .args(args)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?;
        self.agents.push(child);
        Ok(())
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path().join("var/log").join(name)).unwrap_or_default()
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        for c in &mut self.agents {
            // the agents' VMs first (they outlive their agent), then the agents
            let _ = c.kill();
            let _ = c.wait();
        }
        // whatever still runs in the root (its QEMUs): by the root their /proc entry shows
        let pids: Vec<String> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| std::fs::read_link(e.path().join("root")).is_ok_and(|r| r == self.path()))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|p| p.parse::<u32>().is_ok())
            .collect();
        for pid in &pids {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
        let _ = wait_for("the root's processes gone", Duration::from_secs(10), || {
            pids.iter()
                .all(|p| !tern_testkit::agents::pid_alive(p.parse().unwrap_or(0)))
        });
        let root = self.path().to_string_lossy().into_owned();
        let _ = Command::new("umount")
            .arg(self.path().join("proc"))
            .status();
        let mounted = std::fs::read_to_string("/proc/mounts")
            .unwrap_or_default()
            .contains(&root);
        if !mounted {
            let _ = Command::new("rm")
                .args(["-rf", "--one-file-system"])
                .arg(self.path())
                .status();
        }
    }
}

fn wait_for(what: &str, within: Duration, mut ok: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + within;
    while !ok() {
        if Instant::now() > deadline {
            bail!("{what} within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

#[test]
#[ignore = "tier vm: needs root, debootstrap, the Debian mirrors and QEMU (bash scripts/test.sh runs it)"]
fn the_package_installs_into_a_clean_debian_and_its_agents_migrate_a_vm() -> Result<()> {
    let _l = e2e_lock();
    let g = ensure_guest()?;
    // build (the debug binary this suite built: what this test checks is the package, not
    // the optimiser, and a release build of the workspace would double the suite's build
    // time)
    let out = run(Command::new("bash")
        .arg(repo().join("scripts/package.sh"))
        .env("TERN_PACKAGE_PROFILE", "dev")
        .current_dir(repo()))?;
    let deb = repo().join(
        out.lines()
            .last()
            .context("package.sh printed no path")?
            .trim(),
    );
    let listing = run(Command::new("dpkg-deb").arg("-c").arg(&deb))?;
    for f in [
        "./usr/bin/tern",
        "tern-agent.service",
        "./etc/tern/agent.toml",
        "./usr/share/bash-completion/completions/tern",
        "./usr/share/zsh/vendor-completions/_tern",
        "./usr/share/man/man1/tern-agent.1.gz",
        "./usr/share/man/man1/tern-migrate.1.gz",
        "./usr/lib/udev/rules.d/70-tern-userfaultfd.rules",
    ] {
        ensure!(listing.contains(f), "{f} is not in the package:\n{listing}");
    }
    let depends = run(Command::new("dpkg-deb")
        .args(["-f"])
        .arg(&deb)
        .arg("Depends"))?;
    ensure!(depends.contains("qemu-system-x86 (>= 1:10.0)"), "{depends}");

    // install into a clean root, as an operator would: apt, with backports for QEMU 10
    let mut root = Root::new()?;
    std::fs::copy(&deb, root.path().join("tmp/tern.deb"))?;
    root.run(&["apt-get", "update", "-qq"])?;
    root.apt_install(&["-t", "bookworm-backports", "/tmp/tern.deb"])
        .context("apt-get install ./tern.deb")?;
    root.run(&["id", "tern-qemu"])
        .context("the package made QEMU's user")?;
    let version = root.run(&["tern", "--version"])?;
    ensure!(version.starts_with("tern "), "{version}");
    let unit = std::fs::read_to_string(root.path().join("lib/systemd/system/tern-agent.service"))
        .or_else(|_| {
            std::fs::read_to_string(
                root.path()
                    .join("usr/lib/systemd/system/tern-agent.service"),
            )
        })
        .context("the unit file")?;
    let exec: Vec<String> = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .context("ExecStart")?
        .split_whitespace()
        .map(String::from)
        .collect();
    ensure!(
        exec.join(" ") == "/usr/bin/tern agent --config /etc/tern/agent.toml",
        "{exec:?}"
    );
    ensure!(
        unit.contains("KillMode=process"),
        "VMs outlive the agent: {unit}"
    );
    // systemd's own check of the unit as installed (systemd does not run here: see above)
    root.apt_install(&["systemd"])?;
    let verify = Command::new("chroot")
        .arg(root.path())
        // (the man pages are checked in the package above; man-db is not in the root)
        .args([
            "systemd-analyze",
            "verify",
            "--man=no",
            "tern-agent.service",
        ])
        .output()?;
    let said = String::from_utf8_lossy(&verify.stderr).into_owned()
        + &String::from_utf8_lossy(&verify.stdout);
    ensure!(
        verify.status.success() && !said.contains("tern-agent.service:"),
        "systemd-analyze verify: {said}"
    );

    // libvirt, as an operator's libvirt host has it (11 from backports, as
    // scripts/setup.sh installs it), and two libvirt hosts running it in the root
    root.apt_install(&[
        "libvirt-daemon/bookworm-backports",
        "libvirt-daemon-driver-qemu/bookworm-backports",
        "libvirt-clients/bookworm-backports",
    ])
    .context("apt-get install libvirt")?;
    let lv_a = LibvirtHost::start_rooted("pkg-a", root.path())?;
    let lv_b = LibvirtHost::start_rooted("pkg-b", root.path())?;

    // the operator's steps: a CA, each host's credentials, its config file
    root.run(&["tern", "ca", "init", "--dir", "/etc/tern/ca"])?;
    for (host, dir) in [
        ("127.0.0.1", "/etc/tern/tls"),
        ("127.0.0.1", "/etc/tern/tls-b"),
    ] {
        root.run(&[
            "tern",
            "cert",
            "issue",
            host,
            "--ca",
            "/etc/tern/ca",
            "--out",
            dir,
            "--ip",
            host,
        ])?;
    }
    for f in ["vmlinuz", "initrd"] {
        let src = if f == "vmlinuz" { &g.kernel } else { &g.initrd };
        std::fs::copy(src, root.path().join("var/lib/tern/boot").join(f))?;
    }
    let conf = root.path().join("etc/tern/agent.toml");
    let packaged = std::fs::read_to_string(&conf)?;
    std::fs::write(
        &conf,
        format!("{packaged}\nname = \"host-a\"\nlisten = \"127.0.0.1:17701\"\nstall-timeout-secs = 30\n"),
    )?;

    // host A: exactly the unit's command; host B: the same file, flags over it
    root.agent(&lv_a.mount_ns(), &exec, "agent-a.log")?;
    let mut b = exec.clone();
    b.extend(
        [
            "--name",
            "host-b",
            "--listen",
            "127.0.0.1:17702",
            "--state-dir",
            "/var/lib/tern-b",
            "--api",
            "unix:/run/tern/b.sock",
            "--tls-dir",
            "/etc/tern/tls-b",
            "--boot-dir",
            "/var/lib/tern/boot",
        ]
        .map(String::from),
    );
    root.agent(&lv_b.mount_ns(), &b, "agent-b.log")?;
    for log in ["agent-a.log", "agent-b.log"] {
        wait_for_text(
            &root.path().join("var/log").join(log),
            "tern agent ready",
            Duration::from_secs(30),
        )
        .with_context(|| root.log(log))?;
    }
    ensure!(
        root.log("agent-a.log").contains("agent=host-a"),
        "agent A took its name from the config file:\n{}",
        root.log("agent-a.log")
    );

    // a VM on A, migrated to B with the packaged CLI
    std::fs::write(
        root.path().join("tmp/vm.toml"),
        "name = \"pkg1\"\nmemory_mib = 128\nvcpus = 1\naccel = \"tcg\"\nkernel = \"/var/lib/tern/boot/vmlinuz\"\ninitrd = \"/var/lib/tern/boot/initrd\"\nappend = \"console=ttyS0 panic=-1 tern.workload=dirty tern.mib=16 tern.rate=2\"\n",
    )?;
    root.run(&["tern", "vm", "start", "/tmp/vm.toml"])
        .with_context(|| root.log("agent-a.log"))?;
    let console_a = std::fs::read_dir(root.path().join("var/lib/tern/run"))?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("console.log"))
        .find(|p| p.exists())
        .context("A's console log")?;
    wait_for_text(&console_a, "TERN-READY", Duration::from_secs(120)).context("guest boot")?;
    let report = root
        .run(&[
            "tern",
            "migrate",
            "pkg1",
            "--to",
            "127.0.0.1:17702",
            "--json",
        ])
        .with_context(|| format!("{}\n{}", root.log("agent-a.log"), root.log("agent-b.log")))?;
    let r: serde_json::Value = serde_json::from_str(&report)?;
    ensure!(r["outcome"] == "succeeded", "{report}");
    let on_b = root.run(&[
        "tern",
        "--agent",
        "unix:/run/tern/b.sock",
        "vm",
        "list",
        "--json",
    ])?;
    ensure!(
        on_b.contains("\"pkg1\"") && on_b.contains("running"),
        "{on_b}"
    );
    let console_b = std::fs::read_dir(root.path().join("var/lib/tern-b/run"))?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("console.log"))
        .find(|p| p.exists())
        .context("B's console log")?;
    checker_clean(&console_b, 0)?;
    root.run(&[
        "tern",
        "--agent",
        "unix:/run/tern/b.sock",
        "vm",
        "stop",
        "pkg1",
    ])?;

    // a libvirt domain on A, migrated to B with one command: the packaged agents' default
    // libvirt settings (the packaged agent.toml's) find each host's libvirt
    let boot = GuestImage {
        kernel: "/var/lib/tern/boot/vmlinuz".into(),
        initrd: "/var/lib/tern/boot/initrd".into(),
    };
    let console = lv_a.dir().join("web.console");
    let xml = lv_a.dir().join("web.xml");
    std::fs::write(
        &xml,
        test_domain(
            "web",
            &boot,
            128,
            "tern.workload=dirty tern.mib=16 tern.rate=2",
            &lv_a.inside(&console),
            None,
        ),
    )?;
    lv_a.virsh(&["create", &xml.display().to_string()])
        .with_context(|| lv_a.log())?;
    wait_for_text(&console, "tern-dirty pass 1", Duration::from_secs(90))
        .with_context(|| format!("the domain did not boot:\n{}", lv_a.log()))?;
    let since = std::fs::read(&console)?.len();
    let report = root
        .run(&[
            "tern",
            "migrate",
            "web",
            "--libvirt",
            "--to",
            "127.0.0.1:17702",
            "--libvirt-to",
            &lv_b.peer_uri(),
            "--json",
        ])
        .with_context(|| format!("{}\n{}", root.log("agent-a.log"), root.log("agent-b.log")))?;
    let r: serde_json::Value = serde_json::from_str(&report)?;
    ensure!(
        r["outcome"] == "succeeded" && r["digest_ok"] == true,
        "{report}"
    );
    ensure!(lv_b.running()? == vec!["web".to_string()], "{report}");
    ensure!(lv_a.running()?.is_empty(), "{:?}", lv_a.running());
    checker_clean(&console, since)?;
    Ok(())
}
