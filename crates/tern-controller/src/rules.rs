//! Placement rules beyond the authorisation policy: VMs kept together (moved as one),
//! VMs kept apart (never two on one host), VMs pinned to some hosts. Owns their file format
//! and the check of a proposed placement; conflicting rules are refused when read.
//!
//! ```toml
//! [[together]]            # on one host, moved as one
//! vms = ["web-1", "cache-1"]
//!
//! [[apart]]               # never two of them on one host
//! vms = ["db-1", "db-2"]
//!
//! [[pin]]                 # only on these hosts ("*" in vms matches any run of characters)
//! vms = "db-*"
//! hosts = ["a", "b"]
//! ```

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

/// Why a rules file was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RulesError {
    #[error("the placement rules are not valid TOML: {0}")]
    Toml(String),
    #[error("{kind} rule {n}: {why}")]
    Rule {
        kind: &'static str,
        n: usize,
        why: String,
    },
    #[error("conflicting rules: {0}")]
    Conflict(String),
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rules {
    #[serde(default)]
    pub together: Vec<Group>,
    #[serde(default)]
    pub apart: Vec<Group>,
    #[serde(default)]
    pub pin: Vec<Pin>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    pub vms: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pin {
    pub vms: String,
    pub hosts: Vec<String>,
}

impl Rules {
    /// Reads and checks rules (see the module doc).
    pub fn parse(text: &str) -> Result<Rules, RulesError> {
        let r: Rules = toml::from_str(text).map_err(|e| RulesError::Toml(e.to_string()))?;
        r.check()?;
        Ok(r)
    }

    /// Refuses rules that contradict each other or say nothing.
    pub fn check(&self) -> Result<(), RulesError> {
        let mut in_group: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, g) in self.together.iter().enumerate() {
            if g.vms.len() < 2 {
                return Err(RulesError::Rule {
                    kind: "together",
                    n: i + 1,
                    why: "needs at least two VMs".into(),
                });
            }
            for v in &g.vms {
                if let Some(j) = in_group.insert(v, i) {
                    if j != i {
                        return Err(RulesError::Conflict(format!(
                            "VM {v} is in together rules {} and {}: merge them into one",
                            j + 1,
                            i + 1
                        )));
                    }
                }
            }
        }
        for (i, g) in self.apart.iter().enumerate() {
            if g.vms.len() < 2 {
                return Err(RulesError::Rule {
                    kind: "apart",
                    n: i + 1,
                    why: "needs at least two VMs".into(),
                });
            }
            for (a, b) in pairs(&g.vms) {
                if a == b {
                    return Err(RulesError::Rule {
                        kind: "apart",
                        n: i + 1,
                        why: format!("VM {a} is listed twice"),
                    });
                }
                if let (Some(x), Some(y)) = (in_group.get(a.as_str()), in_group.get(b.as_str())) {
                    if x == y {
                        return Err(RulesError::Conflict(format!(
                            "VMs {a} and {b} must be together (together rule {}) and apart (apart rule {})",
                            x + 1,
                            i + 1
                        )));
                    }
                }
            }
        }
        for (i, p) in self.pin.iter().enumerate() {
            if p.vms.is_empty() || p.hosts.is_empty() {
                return Err(RulesError::Rule {
                    kind: "pin",
                    n: i + 1,
                    why: "needs vms and at least one host".into(),
                });
            }
        }
        // members of one together group must have a host in common
        for (i, g) in self.together.iter().enumerate() {
            let mut common: Option<BTreeSet<&str>> = None;
            for v in &g.vms {
                if let Some(hosts) = self.pinned_hosts(v) {
                    common = Some(match common {
                        None => hosts,
                        Some(c) => c.intersection(&hosts).copied().collect(),
                    });
                }
            }
            if common.is_some_and(|c| c.is_empty()) {
                return Err(RulesError::Conflict(format!(
                    "together rule {}: its VMs are pinned to hosts they do not share",
                    i + 1
                )));
            }
        }
        Ok(())
    }

    /// The hosts `vm` is pinned to (the intersection of every pin that matches), or None.
    fn pinned_hosts(&self, vm: &str) -> Option<BTreeSet<&str>> {
        let mut out: Option<BTreeSet<&str>> = None;
        for p in self
            .pin
            .iter()
            .filter(|p| tern_agent::policy::glob(&p.vms, vm))
        {
            let hs: BTreeSet<&str> = p.hosts.iter().map(String::as_str).collect();
            out = Some(match out {
                None => hs,
                Some(o) => o.intersection(&hs).copied().collect(),
            });
        }
        out
    }

    /// The VMs that move with `vm` (itself included).
    pub fn unit_of(&self, vm: &str) -> Vec<String> {
        self.together
            .iter()
            .find(|g| g.vms.iter().any(|v| v == vm))
            .map(|g| g.vms.clone())
            .unwrap_or_else(|| vec![vm.to_string()])
    }

    /// Whether `vm` may be on `host`, given where the others are (`where_is`); the reason
    /// if not. `moving` are the VMs that move with it (not counted where they were).
    pub fn allows(
        &self,
        vm: &str,
        host: &str,
        moving: &[String],
        where_is: impl Fn(&str) -> Option<String>,
    ) -> Result<(), String> {
        if let Some(hosts) = self.pinned_hosts(vm) {
            if !hosts.contains(host) {
                return Err(format!("{vm} is pinned to {hosts:?}"));
            }
        }
        for g in self.apart.iter().filter(|g| g.vms.iter().any(|v| v == vm)) {
            for other in g.vms.iter().filter(|o| *o != vm && !moving.contains(o)) {
                if where_is(other).as_deref() == Some(host) {
                    return Err(format!(
                        "{vm} must be apart from {other}, which runs on {host}"
                    ));
                }
            }
        }
        Ok(())
    }
}

fn pairs(v: &[String]) -> impl Iterator<Item = (&String, &String)> {
    v.iter()
        .enumerate()
        .flat_map(move |(i, a)| v[i + 1..].iter().map(move |b| (a, b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_are_read_and_checked() {
        let r = Rules::parse(
            r#"
            [[together]]
            vms = ["web", "cache"]
            [[apart]]
            vms = ["db-1", "db-2"]
            [[pin]]
            vms = "db-*"
            hosts = ["a", "b"]
            "#,
        )
        .unwrap();
        assert_eq!(r.unit_of("cache"), vec!["web", "cache"]);
        assert_eq!(r.unit_of("db-1"), vec!["db-1"]);
        let at = |n: &str| match n {
            "db-2" => Some("a".to_string()),
            _ => None,
        };
        assert!(r
            .allows("db-1", "c", &[], at)
            .unwrap_err()
            .contains("pinned"));
        assert!(r
            .allows("db-1", "a", &[], at)
            .unwrap_err()
            .contains("apart from db-2"));
        assert!(r.allows("db-1", "b", &[], at).is_ok());
        assert!(r.allows("web", "c", &[], at).is_ok());
    }

    #[test]
    fn conflicting_rules_are_refused_with_what_conflicts() {
        let e =
            Rules::parse("[[together]]\nvms = [\"x\", \"y\"]\n[[apart]]\nvms = [\"y\", \"x\"]\n")
                .unwrap_err();
        assert!(
            matches!(&e, RulesError::Conflict(m) if m.contains("y and x")),
            "{e}"
        );
        let e = Rules::parse(
            "[[together]]\nvms = [\"x\", \"y\"]\n[[together]]\nvms = [\"y\", \"z\"]\n",
        )
        .unwrap_err();
        assert!(
            matches!(&e, RulesError::Conflict(m) if m.contains("merge")),
            "{e}"
        );
        let e = Rules::parse(
            "[[together]]\nvms = [\"x\", \"y\"]\n[[pin]]\nvms = \"x\"\nhosts = [\"a\"]\n[[pin]]\nvms = \"y\"\nhosts = [\"b\"]\n",
        )
        .unwrap_err();
        assert!(
            matches!(&e, RulesError::Conflict(m) if m.contains("do not share")),
            "{e}"
        );
        assert!(matches!(
            Rules::parse("[[apart]]\nvms = [\"x\"]\n"),
            Err(RulesError::Rule { kind: "apart", .. })
        ));
        assert!(matches!(
            Rules::parse("[[nonsense]]\n"),
            Err(RulesError::Toml(_))
        ));
    }
}
