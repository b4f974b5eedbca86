//! When a host dies: which of its VMs restart where, from which snapshot (sans-I/O), and
//! what a host that comes back must do with the copies it paused (fencing). Owns these
//! two decisions; the service asks the agents and acts.
//!
//! A VM that left a host leaves a snapshot there (its memory and disks as at the
//! switchover: the agent's `GET /v1/snapshots`). When a host has been unreachable for
//! `restart_after_s`, each VM last seen there restarts from its most recent restartable
//! snapshot, on the host that holds it, if that host is up, not drained, and may run it
//! (policy, placement rules, memory). Hosts fence themselves (`tern agent --fence-after`:
//! no word from the controller for that long pauses every VM), so a host that was only
//! cut off has paused its copy before the restart. The controller checks it
//! ([`fences_in_time`]): each agent says its `fence_after` in its load, and the VMs of a
//! host that does not fence, or not [`FENCE_SLACK_S`] before `restart_after_s`, are not
//! restarted (the log says so; an operator who knows the host is off restarts them by
//! hand). When it comes back, the copies restarted elsewhere are stopped there and the
//! others resumed.
//!
//! Where each VM last ran ([`Placed`]) and each host's fence are kept in the state, so a
//! controller that takes over knows the VMs of a host that died before it led.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::rules::Rules;
use crate::view::{Cluster, Host, Vm};

/// A snapshot an agent holds (the part of `GET /v1/snapshots` the controller reads).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Snapshot {
    pub vm: String,
    /// When the VM left that host (the switchover), ms since the Unix epoch.
    pub taken_unix_ms: u64,
    #[serde(default)]
    pub restartable: bool,
    #[serde(default)]
    pub mem_bytes: u64,
}

/// Where a VM last ran, as the leader saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placed {
    pub host: String,
    pub mem_bytes: u64,
    #[serde(default)]
    pub tpm: bool,
}

/// The longest from an agent's fence timer running out to its VMs paused, seconds: its
/// check every second, up to [`tern_agent::fence::CANCEL_WAIT`] for outgoing migrations
/// to stop, and the pause itself.
pub const FENCE_SLACK_S: f64 = 1.0 + tern_agent::fence::CANCEL_WAIT.as_secs() as f64 + 1.0;

/// Whether the VMs of `host`, silent for `restart_after_s`, may restart elsewhere: only
/// if its agent has paused them by then (`fence_after_s`: what it said of its
/// `--fence-after`; None: it does not fence, or never said).
pub fn fences_in_time(
    host: &str,
    fence_after_s: Option<f64>,
    restart_after_s: f64,
) -> Result<(), String> {
    match fence_after_s {
        None => Err(format!(
            "host {host}'s agent does not fence itself (tern agent --fence-after), so if it is only cut off it still runs them"
        )),
        Some(f) if f + FENCE_SLACK_S > restart_after_s => Err(format!(
            "host {host}'s agent pauses its VMs only {f:.0} s (+ up to {FENCE_SLACK_S:.0} s) after the controller's last word, not before restart_after_s = {restart_after_s:.0} s"
        )),
        Some(_) => Ok(()),
    }
}

/// A restart to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Restart {
    pub vm: String,
    /// The dead host it ran on.
    pub from: String,
    /// The host holding the snapshot, where it restarts.
    pub on: String,
    /// How old the state is, seconds.
    pub age_s: f64,
}

/// A VM restarted elsewhere while its host was away: that host must stop its copy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Restarted {
    pub from: String,
    pub on: String,
    pub at: f64,
    pub age_s: f64,
}

/// What [`plan_restarts`] decides from.
pub struct Situation<'a> {
    pub cluster: &'a Cluster,
    /// Hosts unreachable for long enough.
    pub dead: &'a [String],
    pub drained: &'a std::collections::BTreeSet<String>,
    /// What each live host holds.
    pub snapshots: &'a BTreeMap<String, Vec<Snapshot>>,
    /// VMs already restarted.
    pub done: &'a BTreeMap<String, Restarted>,
    pub rules: &'a Rules,
    /// Dead hosts whose VMs must not restart elsewhere, and why ([`fences_in_time`]).
    pub unfenced: &'a BTreeMap<String, String>,
}

/// What to restart now, and a note for every VM of a dead host that cannot be.
pub fn plan_restarts(
    now: f64,
    s: &Situation<'_>,
    may_run: &dyn Fn(&Vm, &Host) -> Result<(), String>,
) -> (Vec<Restart>, Vec<String>) {
    let Situation {
        cluster,
        dead,
        drained,
        snapshots,
        done,
        rules,
        unfenced,
    } = *s;
    let mut out = Vec::new();
    let mut notes = Vec::new();
    // memory taken on each host, as restarts are planned
    let mut mem = cluster.host_mem();
    let mut at: BTreeMap<String, String> = cluster
        .vms
        .values()
        .map(|v| (v.name.clone(), v.host.clone()))
        .collect();
    for v in cluster.vms.values().filter(|v| dead.contains(&v.host)) {
        if done.get(&v.name).is_some_and(|r| r.from == v.host) {
            continue;
        }
        if let Some(why) = unfenced.get(&v.host) {
            notes.push(format!(
                "{} is down with host {}: not restarted elsewhere: {why}; once you know that host is off, restart it by hand (POST /v1/snapshots/{}/restart on a host holding its snapshot)",
                v.name, v.host, v.name
            ));
            continue;
        }
        // the most recent restartable snapshot on a host that may run it
        let mut best: Option<(&str, &Snapshot)> = None;
        let mut why: Vec<String> = Vec::new();
        for (holder, snaps) in snapshots {
            let Some(s) = snaps
                .iter()
                .filter(|s| s.vm == v.name)
                .max_by_key(|s| s.taken_unix_ms)
            else {
                continue;
            };
            let Some(h) = cluster.hosts.get(holder) else {
                continue;
            };
            let refusal = if !s.restartable {
                Some("its snapshot there cannot restart (a shared disk moved on)".to_string())
            } else if !h.alive {
                Some("unreachable".into())
            } else if drained.contains(holder) {
                Some("drained".into())
            } else if let Err(e) = may_run(v, h) {
                Some(e)
            } else if let Err(e) = rules.allows(&v.name, holder, &[], |o| at.get(o).cloned()) {
                Some(e)
            } else if mem.get(holder).copied().unwrap_or(0) + v.mem_bytes > h.mem_bytes {
                Some("not enough memory".into())
            } else {
                None
            };
            match refusal {
                Some(r) => why.push(format!("{holder}: {r}")),
                None => {
                    if best.is_none_or(|(_, b)| s.taken_unix_ms > b.taken_unix_ms) {
                        best = Some((holder, s));
                    }
                }
            }
        }
        match best {
            Some((holder, s)) => {
                *mem.entry(holder.to_string()).or_default() += v.mem_bytes;
                at.insert(v.name.clone(), holder.to_string());
                out.push(Restart {
                    vm: v.name.clone(),
                    from: v.host.clone(),
                    on: holder.to_string(),
                    age_s: (now - s.taken_unix_ms as f64 / 1000.0).max(0.0),
                });
            }
            None if why.is_empty() => notes.push(format!(
                "{} is down with host {}: no host holds a snapshot of it; it comes back with its host",
                v.name, v.host
            )),
            None => notes.push(format!(
                "{} is down with host {}: its snapshots cannot restart ({})",
                v.name,
                v.host,
                why.join("; ")
            )),
        }
    }
    (out, notes)
}

/// What a host that comes back fenced must do: stop the copies restarted elsewhere, resume
/// the others it paused.
pub fn release(
    host: &str,
    fenced: &[String],
    done: &BTreeMap<String, Restarted>,
) -> (Vec<String>, Vec<String>) {
    let stop: Vec<String> = fenced
        .iter()
        .filter(|v| done.get(*v).is_some_and(|r| r.from == host))
        .cloned()
        .collect();
    let resume = fenced
        .iter()
        .filter(|v| !stop.contains(v))
        .cloned()
        .collect();
    (stop, resume)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn setup() -> Cluster {
        let mut c = Cluster::default();
        for (n, alive) in [("a", false), ("b", true), ("c", true)] {
            c.set_host(Host {
                name: n.into(),
                labels: vec![],
                capacity_cores: 2.0,
                mem_bytes: 4 << 30,
                alive,
            });
        }
        for (n, h) in [("x", "a"), ("y", "a"), ("z", "a"), ("w", "b")] {
            c.observe_vm(
                Vm {
                    name: n.into(),
                    host: h.into(),
                    mem_bytes: 1 << 30,
                    tpm: false,
                    migrating: false,
                },
                0.0,
                0.1,
                60.0,
            );
        }
        c
    }

    fn snap(vm: &str, at_s: u64, restartable: bool) -> Snapshot {
        Snapshot {
            vm: vm.into(),
            taken_unix_ms: at_s * 1000,
            restartable,
            mem_bytes: 1 << 30,
        }
    }

    fn allow(_: &Vm, _: &Host) -> Result<(), String> {
        Ok(())
    }

    #[test]
    fn each_vm_of_a_dead_host_restarts_from_its_newest_snapshot_and_the_rest_is_reported() {
        let c = setup();
        let snapshots = BTreeMap::from([
            (
                "b".to_string(),
                vec![snap("x", 100, true), snap("y", 50, false)],
            ),
            ("c".to_string(), vec![snap("x", 200, true)]),
        ]);
        let dead = ["a".to_string()];
        let none = BTreeSet::new();
        let nothing = BTreeMap::new();
        let nothing_unfenced = BTreeMap::new();
        let rules = Rules::default();
        let at = |drained, done| Situation {
            cluster: &c,
            dead: &dead,
            drained,
            snapshots: &snapshots,
            done,
            rules: &rules,
            unfenced: &nothing_unfenced,
        };
        let (r, notes) = plan_restarts(300.0, &at(&none, &nothing), &allow);
        assert_eq!(
            r,
            vec![Restart {
                vm: "x".into(),
                from: "a".into(),
                on: "c".into(),
                age_s: 100.0
            }]
        );
        assert!(
            notes
                .iter()
                .any(|n| n.starts_with("y ") && n.contains("cannot restart")),
            "{notes:?}"
        );
        assert!(
            notes
                .iter()
                .any(|n| n.starts_with("z ") && n.contains("no host holds")),
            "{notes:?}"
        );

        // the newest holder drained: the older snapshot on b serves
        let drained = BTreeSet::from(["c".to_string()]);
        let (r, _) = plan_restarts(300.0, &at(&drained, &nothing), &allow);
        assert_eq!(r[0].on, "b");
        assert_eq!(r[0].age_s, 200.0);

        // a restart already done is not planned again
        let done = BTreeMap::from([(
            "x".to_string(),
            Restarted {
                from: "a".into(),
                on: "c".into(),
                at: 300.0,
                age_s: 100.0,
            },
        )]);
        let (r, _) = plan_restarts(301.0, &at(&none, &done), &allow);
        assert!(r.is_empty());

        // a dead host that does not fence in time: nothing of it restarts
        let unfenced = BTreeMap::from([("a".to_string(), "it does not fence".to_string())]);
        let (r, notes) = plan_restarts(
            300.0,
            &Situation {
                unfenced: &unfenced,
                ..at(&none, &nothing)
            },
            &allow,
        );
        assert!(r.is_empty());
        assert!(
            notes.iter().any(|n| n.starts_with("x ")
                && n.contains("it does not fence")
                && n.contains("by hand")),
            "{notes:?}"
        );

        // what the host does when it comes back
        let (stop, resume) = release("a", &["x".into(), "y".into()], &done);
        assert_eq!(stop, vec!["x"]);
        assert_eq!(resume, vec!["y"]);
    }

    #[test]
    fn only_a_host_that_fences_before_the_restart_has_its_vms_restarted() {
        assert!(fences_in_time("a", Some(4.0), 4.0 + FENCE_SLACK_S).is_ok());
        let late = fences_in_time("a", Some(4.0), 4.0 + FENCE_SLACK_S - 0.5).unwrap_err();
        assert!(late.contains("restart_after_s"), "{late}");
        let never = fences_in_time("a", None, 1e6).unwrap_err();
        assert!(never.contains("--fence-after"), "{never}");
    }

    #[test]
    fn a_restart_respects_the_policy_and_memory() {
        let c = setup();
        let snapshots = BTreeMap::from([("b".to_string(), vec![snap("x", 100, true)])]);
        let (dead, none, nothing, rules) = (
            ["a".to_string()],
            BTreeSet::new(),
            BTreeMap::new(),
            Rules::default(),
        );
        let unfenced = BTreeMap::new();
        let at = |c| Situation {
            cluster: c,
            dead: &dead,
            drained: &none,
            snapshots: &snapshots,
            done: &nothing,
            rules: &rules,
            unfenced: &unfenced,
        };
        let refuse = |_: &Vm, h: &Host| Err(format!("policy refuses {}", h.name));
        let (r, notes) = plan_restarts(300.0, &at(&c), &refuse);
        assert!(r.is_empty());
        assert!(
            notes.iter().any(|n| n.contains("policy refuses b")),
            "{notes:?}"
        );
        let mut small = c.clone();
        small.hosts.get_mut("b").unwrap().mem_bytes = 1 << 30; // w already takes it
        let (r, notes) = plan_restarts(300.0, &at(&small), &allow);
        assert!(
            r.is_empty() && notes.iter().any(|n| n.contains("memory")),
            "{notes:?}"
        );
    }
}
