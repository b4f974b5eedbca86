//! `tern controller --config FILE`: the controller's settings, in TOML. Owns their format,
//! defaults and checks (every mistake refused at start with what to change).
//!
//! ```toml
//! state_dir = "/var/lib/tern-controller"   # the embedded state (one file, locked)
//! api = "/run/tern/controller.sock"        # `tern cluster`, `tern host` talk to this
//! tls_dir = "/etc/tern/controller"         # ca.pem, agent.pem, agent.key: a certificate
//!                                          # with the label `controller`
//! interval_s = 10                          # how often it polls the agents and decides
//! dead_after_s = 30                        # an agent silent this long is unreachable
//! dry_run = false                          # decide and log, move nothing
//! restart_after_s = 60                     # restart a dead host's VMs from snapshots
//!                                          # (>= the agents' --fence-after + 5 s)
//! policy = "/etc/tern/policy.toml"         # the agents' authorisation policy (optional)
//! rules = "/etc/tern/placement.toml"       # together / apart / pin (optional)
//!
//! [[host]]
//! name = "a"                  # the agent's name (`tern agent --name`)
//! control = "10.0.0.1:7790"   # its `--control-listen`
//! peer = "10.0.0.1:7788"      # where migrations to it go (its `--listen`)
//!
//! [params]                    # the policy's knobs (docs/controller.md)
//! high = 0.8
//!
//! [etcd]                      # optional: the state and a leader lease in etcd
//! endpoints = ["https://10.0.0.9:2379"]
//! prefix = "/tern/controller"
//! ttl_s = 10
//! ca = "/etc/tern/etcd-ca.pem"  # mutual TLS (all three, or none for http://)
//! cert = "/etc/tern/etcd-client.pem"
//! key = "/etc/tern/etcd-client.key"
//! ```

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::decide::Params;
use crate::rules::Rules;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{0} is not a valid controller configuration: {1}")]
    Toml(PathBuf, String),
    #[error("{0}: {1}")]
    Invalid(PathBuf, String),
    #[error("the placement rules in {0}")]
    Rules(PathBuf, #[source] crate::rules::RulesError),
    #[error("the authorisation policy")]
    Policy(#[source] tern_agent::policy::PolicyError),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    pub state_dir: PathBuf,
    pub api: PathBuf,
    pub tls_dir: PathBuf,
    #[serde(default = "default_interval")]
    pub interval_s: f64,
    #[serde(default = "default_dead_after")]
    pub dead_after_s: f64,
    #[serde(default)]
    pub dry_run: bool,
    /// A host unreachable this long has its VMs restarted from their snapshots elsewhere
    /// (None: never). Only the VMs of hosts whose `--fence-after` plus
    /// [`crate::failover::FENCE_SLACK_S`] is at most this restart.
    pub restart_after_s: Option<f64>,
    pub policy: Option<PathBuf>,
    pub rules: Option<PathBuf>,
    #[serde(default, rename = "host")]
    pub hosts: Vec<HostEntry>,
    #[serde(default)]
    pub params: Params,
    pub etcd: Option<EtcdConfig>,
    /// This controller's name in the leader lease (default: the machine's host name).
    pub name: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HostEntry {
    pub name: String,
    pub control: String,
    pub peer: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    #[serde(default = "default_prefix")]
    pub prefix: String,
    #[serde(default = "default_ttl")]
    pub ttl_s: u64,
    /// Mutual TLS to etcd (all three, or none): the CA of etcd's certificates, and this
    /// controller's certificate and key.
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

fn default_interval() -> f64 {
    10.0
}
fn default_dead_after() -> f64 {
    30.0
}
fn default_prefix() -> String {
    "/tern/controller".into()
}
fn default_ttl() -> u64 {
    10
}

impl ControllerConfig {
    pub fn load(path: &Path) -> Result<ControllerConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.into(), e))?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Toml(_, m) => ConfigError::Toml(path.into(), m),
            ConfigError::Invalid(_, m) => ConfigError::Invalid(path.into(), m),
            e => e,
        })
    }

    pub fn parse(text: &str) -> Result<ControllerConfig, ConfigError> {
        let c: ControllerConfig =
            toml::from_str(text).map_err(|e| ConfigError::Toml(PathBuf::new(), e.to_string()))?;
        let bad = |m: String| ConfigError::Invalid(PathBuf::new(), m);
        if c.hosts.is_empty() {
            return Err(bad(
                "no [[host]]: name the agents the controller manages".into()
            ));
        }
        let mut names = BTreeSet::new();
        for h in &c.hosts {
            if h.name.is_empty() || !names.insert(h.name.as_str()) {
                return Err(bad(format!(
                    "host name {:?} is empty or given twice",
                    h.name
                )));
            }
            for (what, a) in [("control", &h.control), ("peer", &h.peer)] {
                if !a
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
                {
                    return Err(bad(format!(
                        "host {}: {what} = {a:?} is not HOST:PORT",
                        h.name
                    )));
                }
            }
        }
        if !(c.interval_s.is_finite() && c.interval_s >= 0.1) {
            return Err(bad(format!("interval_s = {}: at least 0.1", c.interval_s)));
        }
        if !(c.dead_after_s.is_finite() && c.dead_after_s >= c.interval_s) {
            return Err(bad(format!(
                "dead_after_s = {}: at least interval_s ({})",
                c.dead_after_s, c.interval_s
            )));
        }
        if let Some(r) = c.restart_after_s {
            if !(r.is_finite() && r >= c.dead_after_s) {
                return Err(bad(format!(
                    "restart_after_s = {r}: at least dead_after_s ({})",
                    c.dead_after_s
                )));
            }
        }
        c.params
            .check()
            .map_err(|m| bad(format!("[params]: {m}")))?;
        // a plan must still be fresh in the round after it comes in (asked in the
        // background, up to PLAN_WITHIN), or no move that waits for one ever starts
        let p = c.params.plan_max_age_s;
        let least = c.interval_s * 2.0 + crate::service::PLAN_WITHIN.as_secs_f64();
        if p > 0.0 && p < least {
            return Err(bad(format!(
                "[params] plan_max_age_s = {p}: at least {least} (twice interval_s plus the {} s a plan may take), or 0 to never ask the agents' model",
                crate::service::PLAN_WITHIN.as_secs()
            )));
        }
        if let Some(e) = &c.etcd {
            if e.endpoints.is_empty() || e.ttl_s < 2 {
                return Err(bad("[etcd] needs endpoints and ttl_s >= 2".into()));
            }
            let given = [&e.ca, &e.cert, &e.key]
                .iter()
                .filter(|x| x.is_some())
                .count();
            if given != 0 && given != 3 {
                return Err(bad(
                    "[etcd]: give ca, cert and key together (mutual TLS), or none".into(),
                ));
            }
        }
        Ok(c)
    }

    /// The placement rules (none if no file is named).
    pub fn load_rules(&self) -> Result<Rules, ConfigError> {
        let Some(p) = &self.rules else {
            return Ok(Rules::default());
        };
        let text = std::fs::read_to_string(p).map_err(|e| ConfigError::Read(p.clone(), e))?;
        Rules::parse(&text).map_err(|e| ConfigError::Rules(p.clone(), e))
    }

    /// The authorisation policy the agents apply (the built-in one if no file is named).
    pub fn load_policy(&self) -> Result<tern_agent::policy::Policy, ConfigError> {
        match &self.policy {
            Some(p) => tern_agent::policy::Policy::load(p).map_err(ConfigError::Policy),
            None => Ok(tern_agent::policy::Policy::default()),
        }
    }

    pub fn host(&self, name: &str) -> Option<&HostEntry> {
        self.hosts.iter().find(|h| h.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"
        state_dir = "/tmp/s"
        api = "/tmp/c.sock"
        tls_dir = "/tmp/tls"
        [[host]]
        name = "a"
        control = "127.0.0.1:7790"
        peer = "127.0.0.1:7788"
        [params]
        high = 0.9
    "#;

    #[test]
    fn a_configuration_is_read_with_defaults() {
        let c = ControllerConfig::parse(OK).unwrap();
        assert_eq!(c.interval_s, 10.0);
        assert_eq!(c.params.high, 0.9);
        assert_eq!(c.params.target, Params::default().target);
        assert!(c.etcd.is_none());
        assert_eq!(c.host("a").unwrap().peer, "127.0.0.1:7788");
    }

    #[test]
    fn mistakes_are_refused_with_what_to_change() {
        let e = |t: &str| ControllerConfig::parse(t).unwrap_err().to_string();
        assert!(e(&OK.replace("7790", "x")).contains("not HOST:PORT"));
        assert!(e(&OK.replace("high = 0.9", "high = 0.5")).contains("target"));
        assert!(
            e(&OK.replace("high = 0.9", "high = 0.9\nplan_max_age_s = 20"))
                .contains("plan_max_age_s = 20: at least 50")
        );
        assert!(ControllerConfig::parse(
            &OK.replace("high = 0.9", "high = 0.9\nplan_max_age_s = 0")
        )
        .is_ok());
        assert!(e(&OK.replace("[[host]]", "[[hosts]]")).contains("unknown field"));
        let twice = format!("{OK}\n[[host]]\nname = \"a\"\ncontrol = \"h:1\"\npeer = \"h:2\"\n");
        assert!(e(&twice).contains("twice"));
    }
}
