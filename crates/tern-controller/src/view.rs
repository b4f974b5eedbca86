//! The cluster as the controller sees it: hosts and their VMs, with the load measured over a
//! window so that a spike is not mistaken for a trend. Owns the windows and the arithmetic
//! of load (utilisation, excess over a threshold); knows nothing of agents or sockets.
//!
//! Time is seconds on the caller's clock (`now: f64`), so the simulation and the service
//! drive the same code.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

/// One host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Host {
    pub name: String,
    /// Labels from its certificate (what the authorisation policy matches).
    pub labels: Vec<String>,
    /// CPU the VMs may use, in cores.
    pub capacity_cores: f64,
    /// Memory the VMs may use, in bytes.
    pub mem_bytes: u64,
    /// Whether the controller hears from its agent.
    pub alive: bool,
}

/// One VM, where it runs and what it costs to move.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Vm {
    pub name: String,
    pub host: String,
    /// Guest memory, in bytes (what the destination must have room for).
    pub mem_bytes: u64,
    /// Whether it has a virtual TPM (the authorisation policy's built-in rule).
    pub tpm: bool,
    /// A migration of it is under way (not a candidate; its load counts at both ends).
    pub migrating: bool,
}

/// Recent CPU samples of one VM: (time, cores).
#[derive(Debug, Clone, Default)]
pub struct Window {
    samples: VecDeque<(f64, f64)>,
}

impl Window {
    /// Adds a sample and forgets those older than `keep_s`.
    pub fn push(&mut self, now: f64, cores: f64, keep_s: f64) {
        if !cores.is_finite() || cores < 0.0 {
            return;
        }
        self.samples.push_back((now, cores));
        while self.samples.front().is_some_and(|&(t, _)| t < now - keep_s) {
            self.samples.pop_front();
        }
    }

    /// Mean over the samples of the last `over_s` seconds (0 without samples).
    pub fn mean(&self, now: f64, over_s: f64) -> f64 {
        let (n, sum) = self
            .samples
            .iter()
            .filter(|&&(t, _)| t >= now - over_s)
            .fold((0usize, 0.0), |(n, s), &(_, c)| (n + 1, s + c));
        if n == 0 {
            0.0
        } else {
            sum / n as f64
        }
    }

    /// The latest sample.
    pub fn last(&self) -> f64 {
        self.samples.back().map_or(0.0, |&(_, c)| c)
    }

    /// How many seconds the samples span.
    pub fn span(&self) -> f64 {
        match (self.samples.front(), self.samples.back()) {
            (Some(a), Some(b)) => b.0 - a.0,
            _ => 0.0,
        }
    }
}

/// The cluster: hosts, VMs and their load windows.
#[derive(Debug, Clone, Default)]
pub struct Cluster {
    pub hosts: BTreeMap<String, Host>,
    pub vms: BTreeMap<String, Vm>,
    pub load: BTreeMap<String, Window>,
}

impl Cluster {
    /// Sets a host's facts (its VMs come through [`Cluster::observe_vm`]).
    pub fn set_host(&mut self, h: Host) {
        self.hosts.insert(h.name.clone(), h);
    }

    /// Records what a host's agent said of one VM, with its CPU use now.
    pub fn observe_vm(&mut self, vm: Vm, now: f64, cores: f64, keep_s: f64) {
        self.load
            .entry(vm.name.clone())
            .or_default()
            .push(now, cores, keep_s);
        self.vms.insert(vm.name.clone(), vm);
    }

    /// Forgets VMs no agent reported (stopped, or gone with their host).
    pub fn retain_vms(&mut self, keep: impl Fn(&Vm) -> bool) {
        self.vms.retain(|_, v| keep(v));
        let vms = &self.vms;
        self.load.retain(|n, _| vms.contains_key(n));
    }

    /// A VM's sustained load: its mean over `window_s`.
    pub fn vm_load(&self, vm: &str, now: f64, window_s: f64) -> f64 {
        self.load.get(vm).map_or(0.0, |w| w.mean(now, window_s))
    }

    /// The sustained load of each host (sum of its VMs'), in cores.
    pub fn host_loads(&self, now: f64, window_s: f64) -> BTreeMap<String, f64> {
        let mut m: BTreeMap<String, f64> = self.hosts.keys().map(|h| (h.clone(), 0.0)).collect();
        for v in self.vms.values() {
            if let Some(l) = m.get_mut(&v.host) {
                *l += self.vm_load(&v.name, now, window_s);
            }
        }
        m
    }

    /// Memory the VMs of each host take, in bytes.
    pub fn host_mem(&self) -> BTreeMap<String, u64> {
        let mut m: BTreeMap<String, u64> = self.hosts.keys().map(|h| (h.clone(), 0)).collect();
        for v in self.vms.values() {
            if let Some(x) = m.get_mut(&v.host) {
                *x += v.mem_bytes;
            }
        }
        m
    }
}

/// Imbalance of a cluster: the spread of utilisation, max - min over live hosts (0 to
/// 1+). What the simulation reports as "final imbalance".
pub fn imbalance(loads: &BTreeMap<String, f64>, hosts: &BTreeMap<String, Host>) -> f64 {
    let us: Vec<f64> = hosts
        .values()
        .filter(|h| h.alive && h.capacity_cores > 0.0)
        .map(|h| loads.get(&h.name).copied().unwrap_or(0.0) / h.capacity_cores)
        .collect();
    if us.is_empty() {
        return 0.0;
    }
    let max = us.iter().cloned().fold(f64::MIN, f64::max);
    let min = us.iter().cloned().fold(f64::MAX, f64::min);
    max - min
}

/// Which of the hosts that report a VM (`claims`: host, and whether it is migrating the
/// VM away) runs it, given the host the view had it on (`was_on`): a host not migrating
/// it over one that is (the end of a migration: the destination runs it); of several
/// that say they run it, the host it was on, else the first. Several such claims are a
/// conflict (returned, to be logged): a host that reports another's VM, by mistake or
/// compromised, does not take it from the host that runs it, so it cannot have it
/// restarted elsewhere by going silent.
pub fn owner<'a>(claims: &'a [(String, bool)], was_on: Option<&str>) -> (&'a str, Option<String>) {
    let running: Vec<&str> = claims
        .iter()
        .filter(|(_, migrating)| !migrating)
        .map(|(h, _)| h.as_str())
        .collect();
    match running.as_slice() {
        [] => (claims[0].0.as_str(), None),
        [one] => (one, None),
        several => {
            let pick = several
                .iter()
                .find(|h| Some(**h) == was_on)
                .unwrap_or(&several[0]);
            (
                pick,
                Some(format!(
                    "hosts {} all report running it: counted on {pick}{}",
                    several.join(", "),
                    if Some(*pick) == was_on {
                        ", where it was"
                    } else {
                        ""
                    }
                )),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_that_claims_another_hosts_vm_does_not_take_it() {
        let c = |v: &[(&str, bool)]| -> Vec<(String, bool)> {
            v.iter().map(|(h, m)| (h.to_string(), *m)).collect()
        };
        let (ba, ab) = (
            c(&[("b", false), ("a", false)]),
            c(&[("a", false), ("b", false)]),
        );
        // one claim
        assert_eq!(owner(&c(&[("a", false)]), None), ("a", None));
        // the end of a migration: the destination runs it
        assert_eq!(
            owner(&c(&[("a", true), ("b", false)]), Some("a")),
            ("b", None)
        );
        assert_eq!(owner(&c(&[("a", true)]), Some("a")), ("a", None));
        // two say they run it: the host it was on keeps it, whatever the order
        let (o, conflict) = owner(&ba, Some("a"));
        assert_eq!(o, "a");
        assert!(conflict.is_some_and(|t| t.contains("b, a") && t.contains("where it was")));
        let (o, conflict) = owner(&ab, Some("a"));
        assert_eq!(o, "a");
        assert!(conflict.is_some());
        // never seen before: the first, still a conflict
        let (o, conflict) = owner(&ba, None);
        assert_eq!(o, "b");
        assert!(conflict.is_some());
    }

    #[test]
    fn a_window_forgets_old_samples_and_averages_the_rest() {
        let mut w = Window::default();
        for t in 0..10 {
            w.push(t as f64, if t < 5 { 4.0 } else { 0.0 }, 6.0);
        }
        // kept: t = 3..=9 (>= 9 - 6)
        assert_eq!(w.span(), 6.0);
        assert!((w.mean(9.0, 6.0) - 8.0 / 7.0).abs() < 1e-9);
        assert!((w.mean(9.0, 2.0) - 0.0).abs() < 1e-9);
        assert_eq!(w.last(), 0.0);
        w.push(10.0, f64::NAN, 6.0);
        w.push(10.0, -1.0, 6.0);
        assert_eq!(w.last(), 0.0, "nonsense samples are dropped");
    }

    #[test]
    fn host_load_sums_its_vms_and_imbalance_spans_live_hosts() {
        let mut c = Cluster::default();
        for (n, alive) in [("a", true), ("b", true), ("dead", false)] {
            c.set_host(Host {
                name: n.into(),
                labels: vec![],
                capacity_cores: 4.0,
                mem_bytes: 1 << 30,
                alive,
            });
        }
        let vm = |n: &str, h: &str| Vm {
            name: n.into(),
            host: h.into(),
            mem_bytes: 1 << 28,
            tpm: false,
            migrating: false,
        };
        c.observe_vm(vm("x", "a"), 0.0, 2.0, 60.0);
        c.observe_vm(vm("y", "a"), 0.0, 1.0, 60.0);
        c.observe_vm(vm("z", "b"), 0.0, 1.0, 60.0);
        c.observe_vm(vm("w", "dead"), 0.0, 4.0, 60.0);
        let l = c.host_loads(0.0, 60.0);
        assert_eq!(l["a"], 3.0);
        assert_eq!(l["b"], 1.0);
        assert!((imbalance(&l, &c.hosts) - 0.5).abs() < 1e-9);
        assert_eq!(c.host_mem()["a"], 1 << 29);
        c.retain_vms(|v| v.host != "dead");
        assert!(!c.load.contains_key("w"));
    }
}
