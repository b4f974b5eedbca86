//! Authorisation: which VMs may go to which hosts. A host's labels come from its
//! certificate (only the cluster CA can grant them, see [`crate::pki`]); the policy says
//! which labels a destination needs for a VM. The source checks before anything of the VM
//! moves; the destination checks its own labels again when it learns the VM's spec.
//!
//! ```toml
//! # a VM must satisfy every rule that matches it
//! [[rule]]
//! vms = "tpm"            # "all", "tpm" (VMs with a virtual TPM) or a name pattern: "db-*"
//! hosts = ["trusted"]    # labels the destination must all have
//! ```
//!
//! The built-in rule always applies: VMs with a vTPM go only to hosts labelled `trusted`.
//! A policy file's rules add to it, unless the file says plainly that it replaces it:
//!
//! ```toml
//! replace_builtin = true   # the built-in vTPM rule no longer applies; say what does
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Why a policy file was refused.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{0} is not a valid policy")]
    Toml(PathBuf, #[source] toml::de::Error),
    #[error("{0}: rule {1}: {2}")]
    Rule(PathBuf, usize, String),
}

/// A migration the policy does not allow.
#[derive(Debug, Clone, thiserror::Error)]
#[error("policy refuses VM {vm} on host {host}: rule {rule} needs label(s) {missing:?}, and the host's certificate has {labels:?}")]
pub struct Refusal {
    pub vm: String,
    pub host: String,
    pub rule: String,
    pub missing: Vec<String>,
    pub labels: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub vms: String,
    pub hosts: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    /// The file's rules replace the built-in one (vTPM VMs only to `trusted` hosts)
    /// instead of adding to it.
    #[serde(default)]
    replace_builtin: bool,
    #[serde(default)]
    rule: Vec<Rule>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            rules: vec![Rule {
                vms: "tpm".into(),
                hosts: vec!["trusted".into()],
            }],
        }
    }
}

/// What the policy needs to know of a VM.
pub struct VmFacts<'a> {
    pub name: &'a str,
    pub tpm: bool,
}

impl<'a> VmFacts<'a> {
    pub fn of(spec: &'a tern_qemu::spec::VmSpec) -> Self {
        VmFacts {
            name: &spec.name,
            tpm: spec.tpm,
        }
    }
}

impl Policy {
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError::Read(path.into(), e))?;
        Self::parse(&text).map_err(|e| match e {
            PolicyError::Toml(_, t) => PolicyError::Toml(path.into(), t),
            PolicyError::Rule(_, n, m) => PolicyError::Rule(path.into(), n, m),
            e => e,
        })
    }

    pub fn parse(text: &str) -> Result<Policy, PolicyError> {
        let f: File = toml::from_str(text).map_err(|e| PolicyError::Toml(PathBuf::new(), e))?;
        for (i, r) in f.rule.iter().enumerate() {
            if r.vms.is_empty() {
                return Err(PolicyError::Rule(
                    PathBuf::new(),
                    i + 1,
                    "vms is empty".into(),
                ));
            }
            if let Some(l) = r.hosts.iter().find(|l| !crate::pki::valid_label(l)) {
                return Err(PolicyError::Rule(
                    PathBuf::new(),
                    i + 1,
                    format!("label {l:?} is invalid: use 1-63 characters from [a-z0-9_-]"),
                ));
            }
        }
        let mut rules = if f.replace_builtin {
            Vec::new()
        } else {
            Policy::default().rules
        };
        rules.extend(f.rule);
        Ok(Policy { rules })
    }

    /// Whether `vm` may run on `host`, whose certificate carries `labels`.
    pub fn check(&self, vm: &VmFacts<'_>, host: &str, labels: &[String]) -> Result<(), Refusal> {
        for r in &self.rules {
            if !r.matches(vm) {
                continue;
            }
            let missing: Vec<String> = r
                .hosts
                .iter()
                .filter(|l| !labels.contains(l))
                .cloned()
                .collect();
            if !missing.is_empty() {
                return Err(Refusal {
                    vm: vm.name.into(),
                    host: host.into(),
                    rule: format!("vms = {:?}", r.vms),
                    missing,
                    labels: labels.to_vec(),
                });
            }
        }
        Ok(())
    }
}

impl Rule {
    fn matches(&self, vm: &VmFacts<'_>) -> bool {
        match self.vms.as_str() {
            "all" => true,
            "tpm" => vm.tpm,
            pat => glob(pat, vm.name),
        }
    }
}

/// `*` matches any run of characters; everything else matches itself (the policy's VM
/// patterns, and the controller's placement rules).
pub fn glob(pat: &str, s: &str) -> bool {
    match pat.split_once('*') {
        None => pat == s,
        Some((head, rest)) => {
            let Some(tail) = s.strip_prefix(head) else {
                return false;
            };
            (0..=tail.len())
                .filter(|&i| tail.is_char_boundary(i))
                .any(|i| glob(rest, &tail[i..]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(l: &[&str]) -> Vec<String> {
        l.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn builtin_policy_keeps_tpm_vms_on_trusted_hosts() {
        let p = Policy::default();
        let tpm = VmFacts {
            name: "v",
            tpm: true,
        };
        let plain = VmFacts {
            name: "v",
            tpm: false,
        };
        let e = p.check(&tpm, "b", &labels(&["zone-a"])).unwrap_err();
        assert_eq!(e.missing, labels(&["trusted"]));
        assert!(
            e.to_string().contains("needs label(s) [\"trusted\"]"),
            "{e}"
        );
        p.check(&tpm, "b", &labels(&["zone-a", "trusted"])).unwrap();
        p.check(&plain, "b", &[]).unwrap();
    }

    #[test]
    fn rules_match_by_name_pattern_and_all_must_hold() {
        let p = Policy::parse(
            r#"
            [[rule]]
            vms = "db-*"
            hosts = ["ssd"]
            [[rule]]
            vms = "all"
            hosts = ["prod"]
            "#,
        )
        .unwrap();
        let db = VmFacts {
            name: "db-1",
            tpm: false,
        };
        let web = VmFacts {
            name: "web",
            tpm: false,
        };
        assert!(p.check(&db, "h", &labels(&["prod"])).is_err());
        p.check(&db, "h", &labels(&["prod", "ssd"])).unwrap();
        p.check(&web, "h", &labels(&["prod"])).unwrap();
        assert!(p.check(&web, "h", &[]).is_err());
        // a file's rules add to the built-in one: TPM VMs still need `trusted`...
        let tpm = VmFacts {
            name: "t",
            tpm: true,
        };
        assert!(p.check(&tpm, "h", &labels(&["prod"])).is_err());
        p.check(&tpm, "h", &labels(&["prod", "trusted"])).unwrap();
        // ...unless it says plainly that it replaces it
        let r =
            Policy::parse("replace_builtin = true\n[[rule]]\nvms = \"all\"\nhosts = [\"prod\"]\n")
                .unwrap();
        r.check(&tpm, "h", &labels(&["prod"])).unwrap();
        // an empty file is the built-in policy
        assert_eq!(Policy::parse("").unwrap(), Policy::default());
    }

    #[test]
    fn bad_policies_are_refused() {
        assert!(Policy::parse("[[rule]]\nvms = \"all\"\nhosts = [\"Bad!\"]\n").is_err());
        assert!(Policy::parse("[[rule]]\nvms = \"all\"\n").is_err());
        assert!(Policy::parse("[[rule]]\nvms = \"all\"\nhosts = []\nextra = 1\n").is_err());
        assert!(glob("a*b*c", "aXbYc") && !glob("a*b", "ab-") && glob("*", ""));
    }
}
