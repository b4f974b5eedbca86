//! libvirt hosts on this machine: a `libvirtd` (the distribution's) per host, each in a
//! mount namespace of its own where its state, configuration and the carrier-socket
//! directory are private bind mounts, so the same paths (`/run/libvirt`,
//! `/run/tern/libvirt`) mean a different host's files in each, as on two machines. A
//! test agent joins its host's namespace ([`LibvirtHost::mount_ns`] for
//! `AgentOptions::mountns`). QEMU runs as root without confinement, cgroups or
//! namespaces of libvirt's (none of which a test host here has), and libvirt brings up no
//! network of its own (no network driver is installed). A rooted host
//! ([`LibvirtHost::start_rooted`]) runs the libvirtd installed in a Debian root (the
//! package test's), with the same private mounts inside that root.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::agents::{AgentOptions, TestAgent};
use crate::run;

/// The directories libvirt's QEMU driver uses, each a private bind mount per host.
const PRIVATE: &[(&str, &str)] = &[
    ("run", "/run/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("log", "/var/log/libvirt"),
    ("cache", "/var/cache/libvirt"),
    ("etc", "/etc/libvirt"),
    ("carrier", "/run/tern/libvirt"),
    ("images", IMAGES),
];

/// Where a host's disk images are, as its libvirt sees them (a private bind mount of
/// [`LibvirtHost::images`]): the same path on every host, a different file on each.
pub const IMAGES: &str = "/var/lib/tern-test/images";

/// This host's libvirt as its own agent reaches it, from inside its namespace.
pub const URI_INSIDE: &str = "qemu+unix:///system?socket=/run/libvirt/libvirt-sock";

pub struct LibvirtHost {
    pub name: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
    pid: u32,
    /// The root directory libvirtd runs in (`chroot`), when not `/`.
    root: Option<PathBuf>,
}

impl LibvirtHost {
    /// Starts this host's libvirtd and waits until it answers.
    pub fn start(name: &str) -> Result<LibvirtHost> {
        Self::start_in(name, None)
    }

    /// The same, with libvirtd (and so its QEMUs) in network namespace `netns` (a
    /// [`crate::agents::WanLab`] host).
    pub fn start_in(name: &str, netns: Option<&str>) -> Result<LibvirtHost> {
        which("libvirtd").context("libvirt is not installed: run scripts/setup.sh")?;
        Self::start_full(name, netns, None)
    }

    /// A host whose libvirtd is the one installed in the Debian root `root` and runs
    /// there (`chroot`), as the package test's agents do; its files (console, images)
    /// are under the root's /tmp.
    pub fn start_rooted(name: &str, root: &Path) -> Result<LibvirtHost> {
        if !root.join("usr/sbin/libvirtd").exists() {
            bail!("libvirt is not installed in {}", root.display());
        }
        Self::start_full(name, None, Some(root))
    }

    fn start_full(name: &str, netns: Option<&str>, root: Option<&Path>) -> Result<LibvirtHost> {
        let top = root.unwrap_or(Path::new("/"));
        let dir = tempfile::Builder::new()
            .prefix(&format!("tern-libvirt-{name}-"))
            .tempdir_in(top.join("tmp"))?;
        let d = dir.path();
        let under = |target: &str| top.join(target.trim_start_matches('/'));
        for (sub, target) in PRIVATE {
            std::fs::create_dir_all(d.join(sub))?;
            std::fs::create_dir_all(under(target))?;
        }
        run(Command::new("cp")
            .arg("-a")
            .arg(under("/etc/libvirt/."))
            .arg(d.join("etc")))?;
        append(
            &d.join("etc/qemu.conf"),
            "user = \"root\"\ngroup = \"root\"\ndynamic_ownership = 0\nremember_owner = 0\n\
             security_driver = \"none\"\ncgroup_controllers = [ ]\nnamespaces = [ ]\n\
             stdio_handler = \"file\"\n",
        )?;
        append(
            &d.join("etc/libvirtd.conf"),
            "auth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\n",
        )?;
        let mut script = String::from("set -e\n");
        for (sub, target) in PRIVATE {
            script.push_str(&format!(
                "mount --bind {} {}\n",
                d.join(sub).display(),
                under(target).display()
            ));
        }
        if let Some(r) = root {
            // the host's devices and sysfs, as libvirt and QEMU find them on a host
            for fs in ["dev", "sys"] {
                script.push_str(&format!("mount --rbind /{fs} {}\n", r.join(fs).display()));
            }
        }
        let pidfile = d.join("libvirtd.pid");
        match root {
            Some(r) => script.push_str(&format!(
                "exec chroot {} /usr/sbin/libvirtd --pid-file {}\n",
                r.display(),
                inside(r, &pidfile).display()
            )),
            None => script.push_str(&format!("exec libvirtd --pid-file {}\n", pidfile.display())),
        }
        let log = std::fs::File::create(d.join("libvirtd.log"))?;
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "unshare"]);
                c
            }
            None => Command::new("unshare"),
        };
        let child = cmd
            .args(["--mount", "--propagation", "private", "bash", "-c", &script])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting libvirtd")?;
        let mut h = LibvirtHost {
            name: name.into(),
            pid: 0,
            child: Some(child),
            dir,
            root: root.map(Path::to_path_buf),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(p) = std::fs::read_to_string(&pidfile) {
                if let Ok(pid) = p.trim().parse() {
                    h.pid = pid;
                    if h.virsh(&["version"]).is_ok() {
                        return Ok(h);
                    }
                }
            }
            if let Some(st) = h.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("libvirtd of {name} exited ({st}):\n{}", h.log());
            }
            if Instant::now() > deadline {
                bail!(
                    "libvirtd of {name} did not answer within 30 s:\n{}",
                    h.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// This host's libvirt as `virsh -c` reaches it from outside its namespace.
    pub fn uri(&self) -> String {
        format!(
            "qemu+unix:///system?socket={}",
            self.dir.path().join("run/libvirt-sock").display()
        )
    }

    /// The same as another host's agent reaches it (what it is told as the destination):
    /// [`Self::uri`], or inside the root for a rooted host.
    pub fn peer_uri(&self) -> String {
        format!(
            "qemu+unix:///system?socket={}",
            self.inside(&self.dir.path().join("run/libvirt-sock"))
                .display()
        )
    }

    /// `path` (under this host's root) as processes in the root see it.
    pub fn inside(&self, path: &Path) -> PathBuf {
        match &self.root {
            Some(r) => inside(r, path),
            None => path.to_path_buf(),
        }
    }

    /// [`IMAGES`] of this host, as seen from outside its namespace.
    pub fn images(&self) -> PathBuf {
        self.dir.path().join("images")
    }

    /// Its mount namespace, for its agent.
    pub fn mount_ns(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/mnt", self.pid))
    }

    /// A directory of its own for files both it and the test read (consoles).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn virsh(&self, args: &[&str]) -> Result<String> {
        run(Command::new("virsh").arg("-c").arg(self.uri()).args(args))
    }

    /// The names of the domains it runs.
    pub fn running(&self) -> Result<Vec<String>> {
        Ok(self
            .virsh(&["list", "--name", "--state-running"])?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect())
    }

    /// This host's agent (`bin`), in its mount namespace and, when given, network
    /// namespace `netns`, talking to this libvirt.
    pub fn start_agent(
        &self,
        bin: &Path,
        netns: Option<&str>,
        listen: Option<std::net::SocketAddr>,
        env: &[(&str, &str)],
    ) -> Result<TestAgent> {
        let mnt = self.mount_ns();
        TestAgent::start_with(
            bin,
            &self.name,
            AgentOptions {
                env,
                netns,
                listen,
                mountns: Some(&mnt),
                args: &["--libvirt-uri", URI_INSIDE, "--qemu-user", "root"],
                ..Default::default()
            },
        )
    }

    /// `tern migrate DOMAIN --libvirt --json` through the CLI (`bin`) at `from`, to agent
    /// `to` and this host's libvirt as the destination: its exit status, its JSON (the
    /// report, or null) and its stderr.
    pub fn migrate_here(
        &self,
        bin: &Path,
        from: &TestAgent,
        to: &TestAgent,
        domain: &str,
    ) -> Result<(bool, serde_json::Value, String)> {
        self.migrate_here_with(bin, from, to, domain, &[])
    }

    /// The same with further `tern migrate` arguments (`--copy-storage`).
    pub fn migrate_here_with(
        &self,
        bin: &Path,
        from: &TestAgent,
        to: &TestAgent,
        domain: &str,
        extra: &[&str],
    ) -> Result<(bool, serde_json::Value, String)> {
        let out = Command::new(bin)
            .args(["--agent", &format!("unix:{}", from.api.display())])
            .args(["migrate", domain, "--libvirt", "--to"])
            .arg(to.peer_addr.to_string())
            .arg("--libvirt-to")
            .arg(self.peer_uri())
            .args(extra)
            .arg("--json")
            .output()?;
        let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        Ok((
            out.status.success(),
            json,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// libvirtd's log, and the QEMU logs of its domains.
    pub fn log(&self) -> String {
        let mut text =
            std::fs::read_to_string(self.dir.path().join("libvirtd.log")).unwrap_or_default();
        for e in std::fs::read_dir(self.dir.path().join("log/qemu"))
            .into_iter()
            .flatten()
            .flatten()
        {
            text.push_str(&format!("\n--- {}:\n", e.path().display()));
            text.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
        }
        text
    }
}

impl Drop for LibvirtHost {
    fn drop(&mut self) {
        // libvirt's QEMUs outlive libvirtd: destroy them first
        if let Ok(names) = self.virsh(&["list", "--name"]) {
            for n in names.lines().map(str::trim).filter(|n| !n.is_empty()) {
                let _ = self.virsh(&["destroy", n]);
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A transient domain booting the test guest (kernel and initrd, serial console to
/// `console`), TCG; with `disk`, a raw image (a path as libvirt sees it) as its virtio disk.
pub fn test_domain(
    name: &str,
    g: &crate::guest::GuestImage,
    mib: u32,
    append: &str,
    console: &Path,
    disk: Option<&Path>,
) -> String {
    let disk = disk.map_or_else(String::new, |d| {
        format!(
            "    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/>\
             <target dev='vda' bus='virtio'/></disk>\n",
            d.display()
        )
    });
    format!(
        "<domain type='qemu'>\n  <name>{name}</name>\n  <memory unit='MiB'>{mib}</memory>\n  <vcpu>1</vcpu>\n  \
         <os>\n    <type arch='x86_64' machine='pc'>hvm</type>\n    <kernel>{}</kernel>\n    <initrd>{}</initrd>\n    \
         <cmdline>console=ttyS0 panic=-1 {append}</cmdline>\n  </os>\n  <on_crash>destroy</on_crash>\n  \
         <devices>\n    <emulator>/usr/bin/qemu-system-x86_64</emulator>\n    <controller type='usb' model='none'/>\n    \
         <serial type='file'><source path='{}' append='on'/></serial>\n{disk}    <memballoon model='none'/>\n  </devices>\n</domain>\n",
        g.kernel.display(),
        g.initrd.display(),
        console.display()
    )
}

/// `path`, which is under `root`, as seen from inside it.
fn inside(root: &Path, path: &Path) -> PathBuf {
    Path::new("/").join(path.strip_prefix(root).unwrap_or(path))
}

fn append(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

fn which(tool: &str) -> Result<PathBuf> {
    for d in ["/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
        let p = Path::new(d).join(tool);
        if p.exists() {
            return Ok(p);
        }
    }
    bail!("{tool} not found")
}
