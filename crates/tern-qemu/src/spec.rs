//! The VM spec: what an operator writes in TOML to describe a VM, and what the source
//! agent sends to the destination in `Prepare`. Validation lives here so both ends apply
//! the same rules.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Hardware acceleration for a VM. `tcg` is software emulation (works everywhere);
/// `kvm` needs /dev/kvm with hardware virtualization (production hosts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    #[default]
    Tcg,
    Kvm,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        }
    }
}

/// A VM as tern launches it.
///
/// ```toml
/// name = "web1"
/// memory_mib = 512
/// vcpus = 1
/// accel = "tcg"
/// kernel = "/var/lib/tern/guest/vmlinuz"   # optional: without it the VM boots its first
/// initrd = "/var/lib/tern/guest/initrd.gz"  # disk with the firmware (SeaBIOS), as a cloud
/// append = "console=ttyS0 tern.workload=dirty tern.mib=64"   # image expects
/// tpm = true    # optional: a TPM 2.0 (swtpm, see crate::swtpm)
/// memory = "shared"  # optional: RAM a new QEMU can take over (`tern vm upgrade`); default "private"
///
/// [[disk]]       # optional, any number up to 16: virtio-blk disks /dev/vda, /dev/vdb, ...
/// path = "/var/lib/tern/disks/web1.qcow2"
/// format = "qcow2"   # or "raw"; a qcow2 may have a backing file (QEMU opens it itself)
/// shared = true      # optional: on storage every host mounts at the same path (NFS):
///                    # not copied by a migration, checked at the destination (--shared-dir)
///
/// [[nic]]        # optional, up to 8: virtio-net cards eth0, eth1, ... (see NicSpec)
/// network = "blue"
/// mac = "52:54:00:12:34:56"   # optional: made once when the VM starts, then kept
/// ```
///
/// QEMU addresses disk N (from 0, in this order) by the node names in [`crate::disk`]:
/// format node `diskN`, protocol node `diskN-file`, device `virtio-diskN`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub name: String,
    pub memory_mib: u32,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default)]
    pub accel: Accel,
    /// A kernel QEMU loads directly (with `initrd` and `append`). None: the firmware
    /// (SeaBIOS) boots disk 0, whose bootloader takes it from there. Left out of the TOML
    /// when absent; an agent older than this reads such a spec as missing its kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub append: String,
    /// QEMU machine type; `pc` (i440fx) unless set.
    #[serde(default = "default_machine")]
    pub machine: String,
    /// Extra migration capabilities to switch on in QEMU at launch (for testing refusal of
    /// unsupported ones, e.g. `["xbzrle"]`). tern refuses to migrate with those tern cannot
    /// carry, and says which one to turn off.
    #[serde(default)]
    pub migration_capabilities: Vec<String>,
    /// A TPM 2.0 for the guest: swtpm beside QEMU (state encrypted at rest), a TIS device
    /// in the guest, TPM state carried in QEMU's migration stream. Off unless set, and left
    /// out of the TOML when off, so a spec without a TPM still reads on an agent that does
    /// not know this key.
    #[serde(default, skip_serializing_if = "is_false")]
    pub tpm: bool,
    /// Disks, in guest order (`/dev/vda` first). None unless set, and left out of the TOML
    /// when empty, so a spec without disks still reads on an agent that does not know
    /// this key.
    #[serde(default, rename = "disk", skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskSpec>,
    /// Network cards, in guest order (`eth0` first). None unless set, and left out of the
    /// TOML when empty, so a spec without NICs still reads on an agent that does not know
    /// this key (and one with NICs is refused by such an agent).
    #[serde(default, rename = "nic", skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<NicSpec>,
    /// Guest RAM private (default) or shared (can be upgraded in place): [`GuestMemory`].
    /// Left out of the TOML when private, so such a spec reads on an agent that does not
    /// know this key.
    #[serde(default, skip_serializing_if = "GuestMemory::is_private")]
    pub memory: GuestMemory,
    /// The firmware the guest starts with: `bios` (SeaBIOS, the default) or `uefi` (OVMF
    /// from the host's `ovmf` package: its code read-only, its variable store copied for
    /// the VM into its run directory). It matters only without a kernel (the firmware then
    /// boots disk 0). Left out of the TOML when `bios`, so such a spec reads on an agent
    /// that does not know this key.
    #[serde(default, skip_serializing_if = "Firmware::is_bios")]
    pub firmware: Firmware,
    /// Set only on the wire, for a libvirt domain whose stream tern carries: libvirt runs
    /// both QEMUs, the destination connects to the one libvirt started for the domain
    /// instead of launching its own. Never in a spec file (an agent refuses to start one);
    /// an agent that does not know this key refuses such a migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt: Option<LibvirtDomain>,
}

/// The guest's firmware ([`VmSpec::firmware`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// SeaBIOS, QEMU's default.
    #[default]
    Bios,
    /// OVMF (UEFI).
    Uefi,
}

impl Firmware {
    fn is_bios(&self) -> bool {
        *self == Firmware::Bios
    }
}

/// A libvirt domain, as a migration carried for libvirt names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LibvirtDomain {
    /// The domain's name (libvirt's `<name>`), which names the carrier socket.
    pub domain: String,
}

impl LibvirtDomain {
    /// Whether `name` may name a domain tern carries: it becomes a file name
    /// (`DIR/NAME.sock`), so letters, digits, `-`, `_` and `.` only, not starting with `.`,
    /// at most 64 bytes.
    pub fn valid_name(name: &str) -> bool {
        !name.is_empty()
            && name.len() <= 64
            && !name.starts_with('.')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    }
}

/// Where guest RAM lives.
///
/// `private` (the default): anonymous memory. Pages the guest never touched take no host
/// memory, also while QEMU reads them for a migration (they read as the zero page), and
/// KSM can merge pages across VMs; but it cannot be handed to another QEMU: such a VM is
/// upgraded only by a restart or by migrating it. `shared`: a memfd that QEMU maps shared
/// (`memory-backend-memfd,share=on` with `aux-ram-share=on`), so a second QEMU on the same
/// host can take over the very same memory without copying a page (`tern vm upgrade`,
/// QEMU's `cpr-transfer`). Its cost: reading a page of shared memory allocates it, so a
/// migration fills all of the guest's RAM on both hosts (measured: an idle 4 GiB guest's
/// QEMU went from 0.25 to 4.2 GB resident while it migrated); the source checks the room
/// before it starts. The RAM block is `tern-ram` when shared, `pc.ram` when private; the
/// spec travels with a migration, so both ends agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum GuestMemory {
    Shared,
    #[default]
    Private,
}

impl GuestMemory {
    fn is_private(&self) -> bool {
        *self == GuestMemory::Private
    }
}

/// The id of the memory backend of a VM with [`GuestMemory::Shared`] (also its RAM block's
/// name in the migration stream).
pub const SHARED_RAM_ID: &str = "tern-ram";

/// Most disks a VM may have.
pub const MAX_DISKS: usize = 16;

/// How QEMU reads a disk image. Always stated, never probed: a raw image whose guest
/// wrote a qcow2 header must stay raw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl DiskFormat {
    /// The QEMU block driver name (`-blockdev driver=...`, `qemu-img -f ...`).
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// One `[[disk]]` of a [`VmSpec`]: an image file on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// Absolute path of the image (for a qcow2, the top of its backing chain).
    pub path: PathBuf,
    pub format: DiskFormat,
    /// On storage every host sees at the same path (NFS, a cluster filesystem): a
    /// migration does not copy it, and the destination opens the same image once it
    /// checked that it sees the same one (`sample`). Default false: the disk is this
    /// host's and travels with the VM.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared: bool,
    /// Set by a migration's source on a shared disk: the image's size and a sample of its
    /// content as the source reads them, for the destination to compare with what it
    /// reads at `path`. Not for spec files (a migration replaces it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample: Option<String>,
}

/// Most network cards a VM may have.
pub const MAX_NICS: usize = 8;

/// One `[[nic]]` of a [`VmSpec`]: a virtio-net card on a tap device that the agent
/// creates and puts on the host's bridge of `network` (`tern-NETWORK`, see
/// `tern_net`). The card's MAC and its network travel with the VM; the destination
/// creates its tap before its QEMU starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    /// The virtual network: 1-10 characters from [a-z0-9-], not starting with '-'.
    pub network: String,
    /// The card's address. Absent in a spec file: the agent makes one (QEMU's `52:54:00`
    /// prefix, the rest random) when the VM starts and keeps it in the spec, so the VM
    /// keeps it wherever it moves. A migrating spec always has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<Mac>,
    /// The guest's IPv4 address on this card, when known: the overlay's agents answer ARP
    /// requests for it on every host (ARP suppression), so they do not flood the network.
    /// The guest itself must use it (tern does not configure the guest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<std::net::Ipv4Addr>,
}

/// Whether `ip` can be a card's own address ([`NicSpec::ip`]): unicast, not the
/// unspecified address, loopback, link-local, broadcast or multicast.
pub fn valid_card_ip(ip: std::net::Ipv4Addr) -> bool {
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.octets()[0] >= 240)
}

/// Longest network name: `tern-` and it make a Linux interface name (15 bytes at most).
pub const MAX_NETWORK_NAME: usize = 10;

/// Whether `name` may name a virtual network ([`NicSpec::network`]).
pub fn valid_network_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NETWORK_NAME
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// A unicast Ethernet address, written `52:54:00:12:34:56` (lower or upper case).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// A new address with QEMU's prefix `52:54:00` and three random bytes.
    pub fn random() -> std::io::Result<Mac> {
        use std::io::Read;
        let mut r = [0u8; 3];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut r)?;
        Ok(Mac([0x52, 0x54, 0x00, r[0], r[1], r[2]]))
    }

    /// Unicast and not all zero: an address a card may have.
    pub fn is_unicast(&self) -> bool {
        self.0[0] & 1 == 0 && self.0 != [0; 6]
    }
}

impl std::fmt::Display for Mac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl std::fmt::Debug for Mac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

impl std::str::FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Mac, String> {
        let bad = || format!("{s:?} is not a MAC address (six hex bytes: 52:54:00:12:34:56)");
        let mut b = [0u8; 6];
        let mut parts = s.split(':');
        for x in b.iter_mut() {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *x = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Mac(b))
    }
}

impl Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Mac, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The first bytes of every qcow2 image.
const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

fn is_false(b: &bool) -> bool {
    !*b
}

fn default_vcpus() -> u32 {
    1
}

fn default_machine() -> String {
    "pc".to_string()
}

/// Why a VM spec was refused.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("VM spec is not valid TOML")]
    Toml(#[from] toml::de::Error),
    #[error("VM name {0:?} is invalid: use 1-64 characters from [A-Za-z0-9._-], not starting with '.' or '-'")]
    BadName(String),
    #[error("libvirt domain {0:?} cannot be carried: tern carries domains named with 1-64 characters from [A-Za-z0-9._-], not starting with '.', and names the VM after it")]
    BadLibvirtDomain(String),
    #[error("a libvirt domain's spec says nothing of what to launch (no kernel, disks, TPM or firmware): libvirt runs its QEMU")]
    LibvirtWithLaunch,
    #[error("memory_mib must be between 16 and 1048576, got {0}")]
    BadMemory(u32),
    #[error("vcpus must be between 1 and 256, got {0}")]
    BadVcpus(u32),
    #[error("machine type {0:?} is invalid: a QEMU machine type name (1-64 characters from [A-Za-z0-9._-]), without options")]
    BadMachine(String),
    #[error("{what} {path} does not exist on this host")]
    MissingFile { what: &'static str, path: PathBuf },
    #[error("at most {MAX_DISKS} disks, got {0}")]
    TooManyDisks(usize),
    #[error("disk {0}: a shared disk is raw (a qcow2's header names other files, which a destination would open)")]
    SharedNotRaw(usize),
    #[error("disk {index}: path {path:?} must be absolute and UTF-8")]
    BadDiskPath { index: usize, path: PathBuf },
    #[error("disk {index} and disk {other} are the same file {path}")]
    DuplicateDisk {
        index: usize,
        other: usize,
        path: PathBuf,
    },
    #[error("disk {index}: cannot read {path}")]
    UnreadableDisk {
        index: usize,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk {index}: {path} is not a qcow2 image (no qcow2 header) but the spec says format = \"qcow2\"")]
    NotQcow2 { index: usize, path: PathBuf },
    #[error("the VM has neither a kernel nor a disk to boot from: give it kernel = \"...\" or a [[disk]] holding a bootloader")]
    NothingToBoot,
    #[error("at most {MAX_NICS} network cards, got {0}")]
    TooManyNics(usize),
    #[error("nic {index}: network name {name:?} is invalid: use 1-{MAX_NETWORK_NAME} characters from [a-z0-9-], not starting with '-'")]
    BadNetwork { index: usize, name: String },
    #[error("nic {index}: {mac} is not a unicast address (the first byte must be even, and not all zero)")]
    BadMac { index: usize, mac: Mac },
    #[error("nic {index}: {ip} cannot be a card's address (it must be unicast: not 0.0.0.0, loopback, link-local, broadcast, multicast or reserved)")]
    BadNicIp {
        index: usize,
        ip: std::net::Ipv4Addr,
    },
    #[error("nic {index} and nic {other} are on one network with the same address {ip}")]
    DuplicateNicIp {
        index: usize,
        other: usize,
        ip: std::net::Ipv4Addr,
    },
    #[error("nic {index} and nic {other} have the same MAC {mac}")]
    DuplicateMac {
        index: usize,
        other: usize,
        mac: Mac,
    },
    #[error("nic {0} has no MAC: a migrating VM's cards keep the address they started with")]
    NicWithoutMac(usize),
    #[error("{0} without kernel: initrd and append go with a kernel QEMU loads; a VM booting its disk takes them from its bootloader's configuration")]
    WithoutKernel(&'static str),
}

impl VmSpec {
    /// Parses and validates a spec (file existence is checked by [`VmSpec::check_files`]).
    pub fn from_toml(text: &str) -> Result<VmSpec, SpecError> {
        let spec: VmSpec = toml::from_str(text)?;
        spec.validate()?;
        Ok(spec)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a VmSpec always serializes")
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        let n = &self.name;
        let ok = !n.is_empty()
            && n.len() <= 64
            && !n.starts_with('.')
            && !n.starts_with('-')
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        if !ok {
            return Err(SpecError::BadName(n.clone()));
        }
        if !(16..=1_048_576).contains(&self.memory_mib) {
            return Err(SpecError::BadMemory(self.memory_mib));
        }
        if !(1..=256).contains(&self.vcpus) {
            return Err(SpecError::BadVcpus(self.vcpus));
        }
        let m = &self.machine;
        if m.is_empty()
            || m.len() > 64
            || !m
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        {
            return Err(SpecError::BadMachine(m.clone()));
        }
        if self.disks.len() > MAX_DISKS {
            return Err(SpecError::TooManyDisks(self.disks.len()));
        }
        if let Some(i) = self
            .disks
            .iter()
            .position(|d| d.shared && d.format != DiskFormat::Raw)
        {
            return Err(SpecError::SharedNotRaw(i));
        }
        if self.nics.len() > MAX_NICS {
            return Err(SpecError::TooManyNics(self.nics.len()));
        }
        for (index, n) in self.nics.iter().enumerate() {
            if !valid_network_name(&n.network) {
                return Err(SpecError::BadNetwork {
                    index,
                    name: n.network.clone(),
                });
            }
            if let Some(ip) = n.ip {
                if !valid_card_ip(ip) {
                    return Err(SpecError::BadNicIp { index, ip });
                }
                if let Some(other) = self.nics[..index]
                    .iter()
                    .position(|o| o.ip == Some(ip) && o.network == n.network)
                {
                    return Err(SpecError::DuplicateNicIp { index, other, ip });
                }
            }
            if let Some(mac) = n.mac {
                if !mac.is_unicast() {
                    return Err(SpecError::BadMac { index, mac });
                }
                if let Some(other) = self.nics[..index].iter().position(|o| o.mac == Some(mac)) {
                    return Err(SpecError::DuplicateMac { index, other, mac });
                }
            }
        }
        if let Some(lv) = &self.libvirt {
            // libvirt's QEMU: nothing of it is launched from this spec
            if lv.domain != self.name || !LibvirtDomain::valid_name(&lv.domain) {
                return Err(SpecError::BadLibvirtDomain(lv.domain.clone()));
            }
            if self.tpm
                || !self.disks.is_empty()
                || !self.nics.is_empty()
                || self.kernel.is_some()
                || self.firmware != Firmware::Bios
            {
                return Err(SpecError::LibvirtWithLaunch);
            }
        } else if self.kernel.is_none() {
            if self.disks.is_empty() {
                return Err(SpecError::NothingToBoot);
            }
            if self.initrd.is_some() {
                return Err(SpecError::WithoutKernel("initrd"));
            }
            if !self.append.is_empty() {
                return Err(SpecError::WithoutKernel("append"));
            }
        }
        for (index, d) in self.disks.iter().enumerate() {
            if !d.path.is_absolute() || d.path.to_str().is_none() {
                return Err(SpecError::BadDiskPath {
                    index,
                    path: d.path.clone(),
                });
            }
            if let Some(other) = self.disks[..index].iter().position(|o| o.path == d.path) {
                return Err(SpecError::DuplicateDisk {
                    index,
                    other,
                    path: d.path.clone(),
                });
            }
        }
        Ok(())
    }

    /// Gives every card without a MAC a new one (made once, when the VM first starts).
    pub fn assign_macs(&mut self) -> std::io::Result<()> {
        for i in 0..self.nics.len() {
            while self.nics[i].mac.is_none() {
                let m = Mac::random()?;
                if !self.nics.iter().any(|o| o.mac == Some(m)) {
                    self.nics[i].mac = Some(m);
                }
            }
        }
        Ok(())
    }

    /// A migrating spec: valid, and every card has its MAC.
    pub fn validate_migrating(&self) -> Result<(), SpecError> {
        self.validate()?;
        match self.nics.iter().position(|n| n.mac.is_none()) {
            Some(i) => Err(SpecError::NicWithoutMac(i)),
            None => Ok(()),
        }
    }

    /// The files QEMU will need must exist on this host.
    pub fn check_files(&self) -> Result<(), SpecError> {
        if let Some(k) = &self.kernel {
            if !k.exists() {
                return Err(SpecError::MissingFile {
                    what: "kernel",
                    path: k.clone(),
                });
            }
        }
        if let Some(i) = &self.initrd {
            if !i.exists() {
                return Err(SpecError::MissingFile {
                    what: "initrd",
                    path: i.clone(),
                });
            }
        }
        // (a shared disk is not opened by path: whoever runs the VM opens it without
        // following links and hands QEMU the descriptor)
        for (index, d) in self.disks.iter().enumerate().filter(|(_, d)| !d.shared) {
            check_disk_file(index, d)?;
        }
        Ok(())
    }
}

/// The image exists and, if the spec says qcow2, starts with a qcow2 header. A raw image is
/// not checked for a qcow2 header: its content belongs to the guest.
fn check_disk_file(index: usize, d: &DiskSpec) -> Result<(), SpecError> {
    use std::io::Read;
    let unreadable = |source: std::io::Error| SpecError::UnreadableDisk {
        index,
        path: d.path.clone(),
        source,
    };
    let mut f = match std::fs::File::open(&d.path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SpecError::MissingFile {
                what: "disk image",
                path: d.path.clone(),
            })
        }
        Err(e) => return Err(unreadable(e)),
    };
    if d.format == DiskFormat::Qcow2 {
        let mut magic = [0u8; 4];
        match f.read_exact(&mut magic) {
            Ok(()) if magic == QCOW2_MAGIC => {}
            Ok(()) => {
                return Err(SpecError::NotQcow2 {
                    index,
                    path: d.path.clone(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(SpecError::NotQcow2 {
                    index,
                    path: d.path.clone(),
                })
            }
            Err(e) => return Err(unreadable(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn nics_read_from_toml_get_a_kept_mac_and_bad_ones_are_refused() {
        let base = "name='n1'\nmemory_mib=128\nkernel='/k'\n";
        let mut s = VmSpec::from_toml(&format!(
            "{base}[[nic]]\nnetwork='blue'\n[[nic]]\nnetwork='red-2'\nmac='52:54:00:AB:cd:01'\n"
        ))
        .unwrap();
        assert_eq!(s.nics[1].mac, Some(Mac([0x52, 0x54, 0, 0xab, 0xcd, 1])));
        assert!(s.nics[0].mac.is_none());
        assert!(matches!(
            s.validate_migrating(),
            Err(SpecError::NicWithoutMac(0))
        ));
        s.assign_macs().unwrap();
        let mac = s.nics[0].mac.unwrap();
        assert_eq!(&mac.0[..3], &[0x52, 0x54, 0]);
        assert_ne!(Some(mac), s.nics[1].mac);
        s.validate_migrating().unwrap();
        // kept: the spec written out reads back with the same addresses
        let again = VmSpec::from_toml(&s.to_toml()).unwrap();
        assert_eq!(again, s);
        assert!(s.to_toml().contains(&format!("mac = \"{mac}\"")));
        // a card's address, kept too; bad ones refused
        let with_ip = VmSpec::from_toml(&format!(
            "{base}[[nic]]\nnetwork='blue'\nip='198.19.0.2'\n[[nic]]\nnetwork='red'\nip='198.19.0.2'\n"
        ))
        .unwrap();
        assert_eq!(with_ip.nics[0].ip, Some([198, 19, 0, 2].into()));
        with_ip.validate().unwrap();
        assert_eq!(VmSpec::from_toml(&with_ip.to_toml()).unwrap(), with_ip);
        for bad in [
            "0.0.0.0",
            "127.0.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "169.254.1.1",
            "240.0.0.1",
        ] {
            let s = VmSpec::from_toml(&format!("{base}[[nic]]\nnetwork='blue'\nip='{bad}'\n"));
            assert!(
                matches!(s, Err(SpecError::BadNicIp { index: 0, .. })),
                "{bad}"
            );
        }
        let twice = VmSpec::from_toml(&format!(
            "{base}[[nic]]\nnetwork='blue'\nip='198.19.0.2'\n[[nic]]\nnetwork='blue'\nip='198.19.0.2'\n"
        ));
        assert!(matches!(
            twice,
            Err(SpecError::DuplicateNicIp {
                index: 1,
                other: 0,
                ..
            })
        ));
        // and a spec without NICs says nothing of them
        assert!(!VmSpec::from_toml(base).unwrap().to_toml().contains("nic"));

        for (nic, want) in [
            ("network='Blue'", "network name"),
            ("network='a-very-long-net'", "network name"),
            ("network=''", "network name"),
            ("network='-x'", "network name"),
            ("network='b'\nmac='01:00:5e:00:00:01'", "not a unicast"),
            ("network='b'\nmac='00:00:00:00:00:00'", "not a unicast"),
            ("network='b'\nmac='52:54:00:00:01'", "not a MAC"),
            ("network='b'\nmac='52:54:00:00:01:0g'", "not a MAC"),
            ("network='b'\nbridge='br0'", "unknown field"),
        ] {
            let e = VmSpec::from_toml(&format!("{base}[[nic]]\n{nic}\n")).unwrap_err();
            assert!(
                e.to_string().contains(want) || format!("{e:?}").contains(want),
                "{nic}: {e} / {e:?}"
            );
        }
        let twice = "[[nic]]\nnetwork='a'\nmac='52:54:00:00:00:01'\n".repeat(2);
        assert!(matches!(
            VmSpec::from_toml(&format!("{base}{twice}")),
            Err(SpecError::DuplicateMac {
                index: 1,
                other: 0,
                ..
            })
        ));
        let many = "[[nic]]\nnetwork='a'\n".repeat(MAX_NICS + 1);
        assert!(matches!(
            VmSpec::from_toml(&format!("{base}{many}")),
            Err(SpecError::TooManyNics(9))
        ));
    }

    #[test]
    fn spec_roundtrips_through_toml() {
        let s = VmSpec::from_toml(
            "name='a1'\nmemory_mib=128\nkernel='/k'\ninitrd='/i'\nappend='console=ttyS0'\naccel='kvm'",
        )
        .unwrap();
        assert_eq!(s.accel, Accel::Kvm);
        assert_eq!(s.vcpus, 1);
        assert_eq!(VmSpec::from_toml(&s.to_toml()).unwrap(), s);
    }

    #[test]
    fn tpm_is_off_by_default_and_only_written_when_on() {
        let base = "name='a1'\nmemory_mib=128\nkernel='/k'\n";
        let s = VmSpec::from_toml(base).unwrap();
        assert!(!s.tpm);
        assert!(!s.to_toml().contains("tpm"), "{}", s.to_toml());
        let t = VmSpec::from_toml(&format!("{base}tpm = true\n")).unwrap();
        assert!(t.tpm);
        assert!(t.to_toml().contains("tpm = true"), "{}", t.to_toml());
        assert_eq!(VmSpec::from_toml(&t.to_toml()).unwrap(), t);
        assert!(matches!(
            VmSpec::from_toml(&format!("{base}tpm = \"2.0\"\n")),
            Err(SpecError::Toml(_))
        ));
    }

    #[test]
    fn disks_are_optional_and_only_written_when_present() {
        let base = "name='a1'\nmemory_mib=128\nkernel='/k'\n";
        let s = VmSpec::from_toml(base).unwrap();
        assert!(s.disks.is_empty());
        assert!(!s.to_toml().contains("disk"), "{}", s.to_toml());
        let t = VmSpec::from_toml(&format!(
            "{base}[[disk]]\npath = '/d/a.qcow2'\nformat = 'qcow2'\n[[disk]]\npath = '/d/b.img'\nformat = 'raw'\n"
        ))
        .unwrap();
        assert_eq!(
            t.disks,
            vec![
                DiskSpec {
                    path: "/d/a.qcow2".into(),
                    format: DiskFormat::Qcow2,
                    shared: false,
                    sample: None,
                },
                DiskSpec {
                    path: "/d/b.img".into(),
                    format: DiskFormat::Raw,
                    shared: false,
                    sample: None,
                },
            ]
        );
        assert_eq!(VmSpec::from_toml(&t.to_toml()).unwrap(), t);
        for bad in [
            "[[disk]]\npath = '/d/a'\nformat = 'vmdk'\n",
            "[[disk]]\npath = '/d/a'\n",
            "[[disk]]\npath = '/d/a'\nformat = 'raw'\ncache = 'none'\n",
        ] {
            assert!(
                matches!(
                    VmSpec::from_toml(&format!("{base}{bad}")),
                    Err(SpecError::Toml(_))
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            VmSpec::from_toml(&format!("{base}[[disk]]\npath = 'd/a'\nformat = 'raw'\n")),
            Err(SpecError::BadDiskPath { index: 0, .. })
        ));
        assert!(matches!(
            VmSpec::from_toml(&format!(
                "{base}[[disk]]\npath = '/a'\nformat = 'raw'\n[[disk]]\npath = '/a'\nformat = 'qcow2'\n"
            )),
            Err(SpecError::DuplicateDisk { index: 1, other: 0, .. })
        ));
        let many = "[[disk]]\nformat = 'raw'\npath = '/d/".to_string();
        let text: String = (0..=MAX_DISKS).map(|i| format!("{many}{i}'\n")).collect();
        assert!(matches!(
            VmSpec::from_toml(&format!("{base}{text}")),
            Err(SpecError::TooManyDisks(17))
        ));
    }

    #[test]
    fn check_files_wants_disks_present_and_qcow2_headers_where_stated() {
        let d = tempfile::tempdir().unwrap();
        let k = d.path().join("k");
        std::fs::write(&k, b"kernel").unwrap();
        let raw = d.path().join("a.img");
        std::fs::write(&raw, vec![0u8; 4096]).unwrap();
        let fake = d.path().join("fake.qcow2");
        std::fs::write(&fake, b"QF").unwrap();
        let real = d.path().join("b.qcow2");
        let mut hdr = b"QFI\xfb".to_vec();
        hdr.resize(512, 0);
        std::fs::write(&real, hdr).unwrap();
        let mut s = VmSpec::from_toml("name='a1'\nmemory_mib=128\nkernel='/k'\n").unwrap();
        s.kernel = Some(k);
        let disk = |p: &Path, format| DiskSpec {
            path: p.to_path_buf(),
            format,
            shared: false,
            sample: None,
        };
        s.disks = vec![disk(&raw, DiskFormat::Raw), disk(&real, DiskFormat::Qcow2)];
        s.check_files().unwrap();
        // a raw image may hold anything, even a qcow2 header
        s.disks = vec![disk(&real, DiskFormat::Raw)];
        s.check_files().unwrap();
        s.disks = vec![
            disk(&raw, DiskFormat::Raw),
            disk(&raw.with_extension("gone"), DiskFormat::Raw),
        ];
        assert!(matches!(
            s.check_files(),
            Err(SpecError::MissingFile {
                what: "disk image",
                ..
            })
        ));
        for p in [&raw, &fake] {
            s.disks = vec![disk(p, DiskFormat::Qcow2)];
            assert!(
                matches!(s.check_files(), Err(SpecError::NotQcow2 { index: 0, .. })),
                "{p:?}"
            );
        }
    }

    #[test]
    fn spec_rejects_bad_names_and_unknown_keys() {
        assert!(matches!(
            VmSpec::from_toml("name='../x'\nmemory_mib=128\nkernel='/k'"),
            Err(SpecError::BadName(_))
        ));
        assert!(matches!(
            VmSpec::from_toml("name='x'\nmemory_mib=128\nkernel='/k'\nbogus=1"),
            Err(SpecError::Toml(_))
        ));
        assert!(matches!(
            VmSpec::from_toml("name='x'\nmemory_mib=1\nkernel='/k'"),
            Err(SpecError::BadMemory(1))
        ));
        // a machine type is a name: no QEMU options smuggled after a comma
        for bad in ["pc,accel=kvm", "", "pc memory-backend=m"] {
            assert!(
                matches!(
                    VmSpec::from_toml(&format!(
                        "name='x'\nmemory_mib=64\nkernel='/k'\nmachine={bad:?}"
                    )),
                    Err(SpecError::BadMachine(_))
                ),
                "{bad}"
            );
        }
        VmSpec::from_toml("name='x'\nmemory_mib=64\nkernel='/k'\nmachine='pc-i440fx-10.0'")
            .unwrap();
    }

    #[test]
    fn memory_is_private_unless_the_spec_says_shared_and_private_is_left_out_of_the_toml() {
        let s = VmSpec::from_toml("name='x'\nmemory_mib=64\nkernel='/k'").unwrap();
        assert_eq!(s.memory, GuestMemory::Private);
        assert!(!s.to_toml().contains("memory ="), "{}", s.to_toml());
        let p = VmSpec::from_toml("name='x'\nmemory_mib=64\nkernel='/k'\nmemory='shared'").unwrap();
        assert_eq!(p.memory, GuestMemory::Shared);
        assert_eq!(VmSpec::from_toml(&p.to_toml()).unwrap(), p);
        assert!(VmSpec::from_toml("name='x'\nmemory_mib=64\nkernel='/k'\nmemory='huge'").is_err());
    }

    #[test]
    fn a_vm_without_a_kernel_boots_its_first_disk_and_says_what_is_missing_otherwise() {
        let disk = "[[disk]]\npath = '/d/a.img'\nformat = 'raw'\n";
        let s = VmSpec::from_toml(&format!("name='x'\nmemory_mib=64\n{disk}")).unwrap();
        assert_eq!(s.kernel, None);
        assert!(
            !s.to_toml().contains("kernel"),
            "no kernel key for agents that would read it as a path"
        );
        assert!(matches!(
            VmSpec::from_toml("name='x'\nmemory_mib=64\n"),
            Err(SpecError::NothingToBoot)
        ));
        assert!(matches!(
            VmSpec::from_toml(&format!("name='x'\nmemory_mib=64\ninitrd='/i'\n{disk}")),
            Err(SpecError::WithoutKernel("initrd"))
        ));
        assert!(matches!(
            VmSpec::from_toml(&format!("name='x'\nmemory_mib=64\nappend='quiet'\n{disk}")),
            Err(SpecError::WithoutKernel("append"))
        ));
    }
}
