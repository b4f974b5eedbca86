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
/// kernel = "/var/lib/tern/guest/vmlinuz"
/// initrd = "/var/lib/tern/guest/initrd.gz"
/// append = "console=ttyS0 tern.workload=dirty tern.mib=64"
/// tpm = true    # optional: a TPM 2.0 (swtpm, see crate::swtpm)
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub name: String,
    pub memory_mib: u32,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default)]
    pub accel: Accel,
    pub kernel: PathBuf,
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
}

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
    #[error("memory_mib must be between 16 and 1048576, got {0}")]
    BadMemory(u32),
    #[error("vcpus must be between 1 and 256, got {0}")]
    BadVcpus(u32),
    #[error("{what} {path} does not exist on this host")]
    MissingFile { what: &'static str, path: PathBuf },
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
        Ok(())
    }

    /// The files QEMU will need must exist on this host.
    pub fn check_files(&self) -> Result<(), SpecError> {
        if !self.kernel.exists() {
            return Err(SpecError::MissingFile {
                what: "kernel",
                path: self.kernel.clone(),
            });
        }
        if let Some(i) = &self.initrd {
            if !i.exists() {
                return Err(SpecError::MissingFile {
                    what: "initrd",
                    path: i.clone(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
