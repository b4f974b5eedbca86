//! Which VM to move where, now: the controller's decision, sans-I/O. Given the cluster
//! (hosts, VMs, load windows), the moves in flight, the drained hosts and what past moves
//! cost, [`Controller::decide`] returns the moves to start and a note for every decision
//! not to move, with its numbers. The service (`crate::service`) and the simulation
//! (`tern-bench cluster`) drive the same code.
//!
//! The policy (docs/controller.md has the equations):
//! - a host is **hot** when its sustained load (the mean over `window_s` of its VMs' CPU)
//!   is above `high` of its capacity, and has been (not dropping to `target`) for
//!   `hot_for_s`: a spike moves nothing;
//! - a move off a hot host is taken only when its **benefit** (the overload it relieves, in
//!   cores, times `horizon_s`) is at least `min_gain` times its **cost** (the migration's
//!   time times the CPU it takes, its downtime weighted, its bytes weighted; in
//!   core-seconds: the agent's model's plan of that move when one is younger than
//!   `plan_max_age_s`, else the history of finished moves, else defaults) and the target
//!   stays at or below `target` of its capacity afterwards (**hysteresis**: the band
//!   between `target` and `high` keeps a host that took a VM from being hot at once);
//! - among the moves that pass, the one with the most benefit beyond its cost;
//! - a VM moved in the last `cooldown_s` stays where it is (**no ping-pong**) unless its
//!   host is above `hard` of its capacity;
//! - a drained host's VMs go to the host where they leave the least utilisation, up to
//!   `hard`; a VM no host may take is reported, not moved;
//! - at most `per_host` moves in or out of one host, `per_link` between two hosts and
//!   `cluster` in all at once.
//!
//! A move costed without a fresh plan ([`Controller::unplanned`]) waits: the service asks
//! the source agent's model (a plan moves nothing) and records the answer
//! ([`Controller::planned`]); the next round decides with it. [`Controller::after_plans`]
//! says which moves go, which wait and what to ask.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::rules::Rules;
use crate::view::{Cluster, Host, Vm};

/// The policy's knobs. [`Params::default`] is the controller's policy;
/// [`Params::threshold_only`] the baseline the benchmark compares against.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// Seconds of samples a VM's sustained load is the mean of.
    pub window_s: f64,
    /// Seconds a host must stay above `high` before it is relieved.
    pub hot_for_s: f64,
    /// Utilisation (load / capacity) above which a host is hot.
    pub high: f64,
    /// Utilisation a balance move may fill its target up to.
    pub target: f64,
    /// Utilisation above which recently moved VMs may move again, and up to which a drain
    /// may fill a host.
    pub hard: f64,
    /// Share of a host's memory its VMs may take.
    pub mem_limit: f64,
    /// Seconds a moved VM stays where it went.
    pub cooldown_s: f64,
    /// Seconds a VM whose move failed is left alone.
    pub retry_after_s: f64,
    /// Seconds a relief is counted for (how long the load is expected to last).
    pub horizon_s: f64,
    /// Benefit / cost a move needs; 0 turns the cost-benefit test off.
    pub min_gain: f64,
    /// Cores a migration takes while it runs (both ends).
    pub move_cpu_cores: f64,
    /// Core-seconds one second of downtime costs.
    pub downtime_weight: f64,
    /// Core-seconds one GiB on the wire costs (the link's other traffic).
    pub gib_weight: f64,
    /// Seconds a plan of the agent's model (`POST /v1/vms/{name}/plan`) stands for a
    /// move's cost; the service asks for one before it starts a balance move without a
    /// fresh one. 0: the model is never asked, costs come from history.
    pub plan_max_age_s: f64,
    /// Moves in or out of one host at once.
    pub per_host: usize,
    /// Moves between two hosts (either way) at once.
    pub per_link: usize,
    /// Moves in the whole cluster at once.
    pub cluster: usize,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            window_s: 300.0,
            hot_for_s: 120.0,
            high: 0.80,
            target: 0.65,
            hard: 1.0,
            mem_limit: 0.95,
            cooldown_s: 1800.0,
            retry_after_s: 300.0,
            horizon_s: 600.0,
            min_gain: 2.0,
            move_cpu_cores: 1.0,
            downtime_weight: 60.0,
            gib_weight: 5.0,
            plan_max_age_s: 600.0,
            per_host: 1,
            per_link: 1,
            cluster: 8,
        }
    }
}

impl Params {
    /// The baseline: move the biggest VM off any host above `high` as soon as a sample says
    /// so, to the coolest host it fits on below `high`; no window, no cost-benefit test, no
    /// hysteresis band, no cooldown.
    pub fn threshold_only() -> Params {
        let d = Params::default();
        Params {
            window_s: 0.0,
            hot_for_s: 0.0,
            target: d.high,
            cooldown_s: 0.0,
            min_gain: 0.0,
            ..d
        }
    }

    /// Refuses knobs that make no sense, saying which.
    pub fn check(&self) -> Result<(), String> {
        let nonneg = [
            ("window_s", self.window_s),
            ("hot_for_s", self.hot_for_s),
            ("cooldown_s", self.cooldown_s),
            ("retry_after_s", self.retry_after_s),
            ("horizon_s", self.horizon_s),
            ("min_gain", self.min_gain),
            ("move_cpu_cores", self.move_cpu_cores),
            ("downtime_weight", self.downtime_weight),
            ("gib_weight", self.gib_weight),
            ("plan_max_age_s", self.plan_max_age_s),
        ];
        for (n, v) in nonneg {
            if !v.is_finite() || v < 0.0 {
                return Err(format!("{n} = {v}: must be a number >= 0"));
            }
        }
        if !(0.0 < self.target && self.target <= self.high && self.high <= self.hard) {
            return Err(format!(
                "need 0 < target ({}) <= high ({}) <= hard ({})",
                self.target, self.high, self.hard
            ));
        }
        if !(0.0 < self.mem_limit && self.mem_limit <= 1.0) {
            return Err(format!("mem_limit = {}: must be in (0, 1]", self.mem_limit));
        }
        if self.per_host == 0 || self.per_link == 0 || self.cluster == 0 {
            return Err("per_host, per_link and cluster must be at least 1".into());
        }
        Ok(())
    }

    /// A VM's load for decisions: the mean over the window, or the last sample without one.
    fn load(&self, c: &Cluster, vm: &str, now: f64) -> f64 {
        if self.window_s > 0.0 {
            c.vm_load(vm, now, self.window_s)
        } else {
            c.load.get(vm).map_or(0.0, |w| w.last())
        }
    }
}

/// What a move is predicted (or was measured) to cost.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MoveCost {
    pub time_s: f64,
    pub bytes: u64,
    pub downtime_s: f64,
}

impl MoveCost {
    /// In core-seconds, with the policy's weights.
    pub fn weighted(&self, p: &Params) -> f64 {
        self.time_s * p.move_cpu_cores
            + self.downtime_s * p.downtime_weight
            + self.bytes as f64 / (1u64 << 30) as f64 * p.gib_weight
    }

    fn add(self, o: MoveCost) -> MoveCost {
        MoveCost {
            time_s: self.time_s + o.time_s,
            bytes: self.bytes + o.bytes,
            downtime_s: self.downtime_s.max(o.downtime_s),
        }
    }
}

/// Where a cost estimate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CostSource {
    /// The agent's model (`tern migrate --plan`), asked within `plan_max_age_s`.
    Model,
    /// This VM's past moves, on links of known rate.
    History,
    /// Its memory size at the default rate: nothing measured yet.
    Default,
}

impl CostSource {
    /// Of a group's members' sources, the one that knows least.
    fn weakest(self, o: CostSource) -> CostSource {
        let rank = |s: CostSource| match s {
            CostSource::Default => 0,
            CostSource::History => 1,
            CostSource::Model => 2,
        };
        if rank(o) < rank(self) {
            o
        } else {
            self
        }
    }
}

/// Where the model's plan of one VM's move stands, as the caller that asks knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanState {
    /// Not asked (or its answer is in the [`CostBook`]).
    NotAsked,
    /// Asked, no answer yet: the move waits.
    Asked,
    /// The model could not plan it: the move goes on history's estimate.
    Failed,
}

/// What the agent's model predicted one move would cost, and when it was asked.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Planned {
    /// Unix seconds.
    pub at: f64,
    pub cost: MoveCost,
}

/// What moves cost: per link the rate past moves reached, per VM the share of its memory
/// that crossed and its downtime (learnt from every finished move), and the plans the
/// agents' model made for moves not started yet.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CostBook {
    /// "FROM>TO" -> bytes per second of the last move on that link.
    pub link_rate: BTreeMap<String, f64>,
    /// VM -> (bytes / memory, downtime seconds) of its last move.
    pub vm: BTreeMap<String, (f64, f64)>,
    /// VM -> "FROM>TO" -> the model's prediction for that move.
    #[serde(default)]
    pub plans: BTreeMap<String, BTreeMap<String, Planned>>,
}

/// Rate assumed for a link no move has crossed yet (bytes/s): 1 Gbit/s.
pub const DEFAULT_RATE: f64 = 125e6;
/// Downtime assumed for a VM never moved.
pub const DEFAULT_DOWNTIME_S: f64 = 0.3;

impl CostBook {
    fn link(from: &str, to: &str) -> String {
        format!("{from}>{to}")
    }

    /// The predicted cost of moving `vm` from `from` to `to` at `now`: the model's plan of
    /// that very move when one is at most `plan_max_age_s` old, else history, else the
    /// defaults.
    pub fn estimate(
        &self,
        vm: &Vm,
        from: &str,
        to: &str,
        now: f64,
        plan_max_age_s: f64,
    ) -> (MoveCost, CostSource) {
        if let Some(c) = self.fresh_plan(&vm.name, from, to, now, plan_max_age_s) {
            return (c, CostSource::Model);
        }
        let rate = self
            .link_rate
            .get(&Self::link(from, to))
            .or_else(|| self.link_rate.get(&Self::link(to, from)))
            .copied()
            // a link never crossed: the median of those that were (one network, mostly)
            .or_else(|| self.median_rate());
        let (share, downtime, known) = match self.vm.get(&vm.name) {
            Some(&(s, d)) => (s, d, true),
            None => (1.0, DEFAULT_DOWNTIME_S, false),
        };
        let bytes = (vm.mem_bytes as f64 * share) as u64;
        let cost = MoveCost {
            time_s: bytes as f64 / rate.unwrap_or(DEFAULT_RATE),
            bytes,
            downtime_s: downtime,
        };
        let source = if known && rate.is_some() {
            CostSource::History
        } else {
            CostSource::Default
        };
        (cost, source)
    }

    /// The model's prediction for moving `vm` from `from` to `to`, if it was made within
    /// `max_age_s` of `now` (either way: a clock that stepped back does not keep a plan
    /// forever). 0 turns plans off.
    pub fn fresh_plan(
        &self,
        vm: &str,
        from: &str,
        to: &str,
        now: f64,
        max_age_s: f64,
    ) -> Option<MoveCost> {
        let p = self.plans.get(vm)?.get(&Self::link(from, to))?;
        (max_age_s > 0.0 && (now - p.at).abs() <= max_age_s).then_some(p.cost)
    }

    /// Records the model's prediction for moving `vm` from `from` to `to`, made at `at`.
    pub fn record_plan(&mut self, vm: &str, from: &str, to: &str, at: f64, cost: MoveCost) {
        self.plans
            .entry(vm.into())
            .or_default()
            .insert(Self::link(from, to), Planned { at, cost });
    }

    /// Forgets the plans made before `before` (they no longer count).
    pub fn forget_plans_before(&mut self, before: f64) {
        for links in self.plans.values_mut() {
            links.retain(|_, p| p.at >= before);
        }
        self.plans.retain(|_, links| !links.is_empty());
    }

    /// The median of the learnt link rates.
    fn median_rate(&self) -> Option<f64> {
        let mut r: Vec<f64> = self.link_rate.values().copied().collect();
        if r.is_empty() {
            return None;
        }
        r.sort_by(f64::total_cmp);
        Some(r[r.len() / 2])
    }

    /// Learns from a finished move (the VM's plans, made where it was, are dropped).
    pub fn learn(&mut self, vm: &Vm, from: &str, to: &str, measured: MoveCost) {
        self.plans.remove(&vm.name);
        if measured.time_s > 0.0 && measured.bytes > 0 {
            self.link_rate.insert(
                Self::link(from, to),
                measured.bytes as f64 / measured.time_s,
            );
        }
        if vm.mem_bytes > 0 {
            self.vm.insert(
                vm.name.clone(),
                (
                    measured.bytes as f64 / vm.mem_bytes as f64,
                    measured.downtime_s,
                ),
            );
        }
    }
}

/// Why a move was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// Its host was hot.
    Balance,
    /// Its host is drained.
    Drain,
}

/// A move to start (one VM, or a `together` group, one migration each).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Move {
    pub vms: Vec<String>,
    pub from: String,
    pub to: String,
    pub reason: Reason,
    /// Core-seconds of overload relieved (0 for a drain).
    pub benefit: f64,
    /// The predicted cost, and in core-seconds.
    pub cost: MoveCost,
    pub cost_weighted: f64,
    pub cost_source: CostSource,
    /// Utilisation of both hosts before and (predicted) after.
    pub from_util: (f64, f64),
    pub to_util: (f64, f64),
}

impl Move {
    /// Its numbers in words: benefit, cost and where it came from, both hosts' utilisation
    /// before and after (what the log, `tern cluster plan` and the dry run print).
    pub fn numbers(&self) -> String {
        format!(
            "{:?}: relieves {:.0} core-s for a cost of {:.0} core-s ({:?}: {:.1} s, {} MiB, {:.0} ms down); {} {:.0}% -> {:.0}%, {} {:.0}% -> {:.0}%",
            self.reason,
            self.benefit,
            self.cost_weighted,
            self.cost_source,
            self.cost.time_s,
            self.cost.bytes >> 20,
            self.cost.downtime_s * 1000.0,
            self.from,
            self.from_util.0 * 100.0,
            self.from_util.1 * 100.0,
            self.to,
            self.to_util.0 * 100.0,
            self.to_util.1 * 100.0
        )
    }
}

/// A decision not to move, or a state worth saying, with its numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Note {
    /// The host or VM it is about.
    pub subject: String,
    pub text: String,
}

/// One round of decisions.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Decisions {
    pub moves: Vec<Move>,
    pub notes: Vec<Note>,
}

/// A move the controller started and has not seen end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InFlight {
    pub mv: Move,
    pub started_at: f64,
    /// The migrations' ids at the source agent, once started.
    #[serde(default)]
    pub ids: BTreeMap<String, String>,
}

/// The last move of a VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastMove {
    pub at: f64,
    pub from: String,
    pub to: String,
}

/// What the controller remembers between rounds (and, through `crate::state`, restarts).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Memory {
    pub drained: BTreeSet<String>,
    pub in_flight: BTreeMap<String, InFlight>,
    pub last_move: BTreeMap<String, LastMove>,
    /// VM -> (when, why) its last move failed.
    pub failed: BTreeMap<String, (f64, String)>,
    pub costs: CostBook,
    /// VMs restarted from a snapshot while their host was unreachable: that host stops its
    /// copy when it comes back (`crate::failover`).
    #[serde(default)]
    pub restarted: BTreeMap<String, crate::failover::Restarted>,
    /// Where each VM last ran, as the leader saw it (a new leader restarts the VMs of a
    /// host that died before it ever answered that leader).
    #[serde(default)]
    pub placed: BTreeMap<String, crate::failover::Placed>,
    /// Each host's `--fence-after` as its agent last said it, seconds (absent: it does
    /// not fence, or never answered).
    #[serde(default)]
    pub fences: BTreeMap<String, f64>,
}

/// The decision side of the controller.
#[derive(Debug, Clone, Default)]
pub struct Controller {
    pub params: Params,
    pub rules: Rules,
    pub cluster: Cluster,
    pub memory: Memory,
    /// Host -> since when it has been above `high`.
    pub hot_since: BTreeMap<String, f64>,
}

/// Whether the authorisation policy lets a VM run on a host (the reason if not).
pub type MayRun<'a> = &'a dyn Fn(&Vm, &Host) -> Result<(), String>;

/// Projected state while a round decides: loads and memory with the moves in flight and
/// those chosen so far.
struct Projection {
    load: BTreeMap<String, f64>,
    mem: BTreeMap<String, u64>,
    busy_host: BTreeMap<String, usize>,
    busy_link: BTreeMap<(String, String), usize>,
    busy: usize,
    /// VM -> host it is projected on.
    at: BTreeMap<String, String>,
}

impl Projection {
    fn link(a: &str, b: &str) -> (String, String) {
        if a <= b {
            (a.into(), b.into())
        } else {
            (b.into(), a.into())
        }
    }

    fn slots(&self, p: &Params, from: &str, to: &str) -> Result<(), String> {
        if self.busy >= p.cluster {
            return Err(format!(
                "{} moves in flight (cluster limit {})",
                self.busy, p.cluster
            ));
        }
        for h in [from, to] {
            let n = self.busy_host.get(h).copied().unwrap_or(0);
            if n >= p.per_host {
                return Err(format!(
                    "host {h} has {n} moves in flight (limit {})",
                    p.per_host
                ));
            }
        }
        let n = self
            .busy_link
            .get(&Self::link(from, to))
            .copied()
            .unwrap_or(0);
        if n >= p.per_link {
            return Err(format!(
                "{n} moves between {from} and {to} (limit {})",
                p.per_link
            ));
        }
        Ok(())
    }

    fn apply(&mut self, vms: &[(String, f64, u64)], from: &str, to: &str, in_flight: bool) {
        for (name, load, mem) in vms {
            *self.load.entry(to.into()).or_default() += load;
            *self.mem.entry(to.into()).or_default() += mem;
            if !in_flight {
                // a chosen move: the source is relieved once it is done
                *self.load.entry(from.into()).or_default() -= load;
                *self.mem.entry(from.into()).or_default() -= mem;
            }
            self.at.insert(name.clone(), to.into());
        }
        *self.busy_host.entry(from.into()).or_default() += 1;
        *self.busy_host.entry(to.into()).or_default() += 1;
        *self.busy_link.entry(Self::link(from, to)).or_default() += 1;
        self.busy += 1;
    }
}

fn excess(load: f64, cap: f64, high: f64) -> f64 {
    (load - high * cap).max(0.0)
}

/// A candidate target for a unit, scored.
struct Candidate {
    to: String,
    /// The sustained load that moves, cores.
    load: f64,
    benefit: f64,
    cost: MoveCost,
    source: CostSource,
    weighted: f64,
    to_util_after: f64,
}

impl Controller {
    pub fn new(params: Params, rules: Rules) -> Controller {
        Controller {
            params,
            rules,
            ..Default::default()
        }
    }

    /// Decides this round's moves. `may_run` is the authorisation policy. The moves are not
    /// recorded as started: call [`Controller::started`] for each one the caller starts.
    pub fn decide(&mut self, now: f64, may_run: MayRun<'_>) -> Decisions {
        let p = self.params.clone();
        let c = &self.cluster;
        let mut out = Decisions::default();
        let load_of = |vm: &str| p.load(c, vm, now);

        let mut pr = Projection {
            load: c.hosts.keys().map(|h| (h.clone(), 0.0)).collect(),
            mem: c.host_mem(),
            busy_host: BTreeMap::new(),
            busy_link: BTreeMap::new(),
            busy: 0,
            at: c
                .vms
                .values()
                .map(|v| (v.name.clone(), v.host.clone()))
                .collect(),
        };
        for v in c.vms.values() {
            *pr.load.entry(v.host.clone()).or_default() += load_of(&v.name);
        }
        // one entry per VM; a `together` group's move counts once
        let mut counted: Vec<&Move> = Vec::new();
        for f in self.memory.in_flight.values() {
            if counted.contains(&&f.mv) {
                continue;
            }
            counted.push(&f.mv);
            let vms: Vec<(String, f64, u64)> =
                f.mv.vms
                    .iter()
                    .filter_map(|n| c.vms.get(n))
                    .map(|v| (v.name.clone(), load_of(&v.name), v.mem_bytes))
                    .collect();
            pr.apply(&vms, &f.mv.from, &f.mv.to, true);
        }
        let util = |pr: &Projection, h: &str| {
            let cap = c.hosts.get(h).map_or(0.0, |h| h.capacity_cores);
            if cap > 0.0 {
                pr.load.get(h).copied().unwrap_or(0.0) / cap
            } else {
                f64::INFINITY
            }
        };

        // hot hosts: above `high` on sustained load, for `hot_for_s`; the clock keeps
        // running while the load stays above `target` (a host hovering about `high` is
        // not restarted at every dip), and stops below it
        for h in c.hosts.values() {
            let u = util(&pr, &h.name);
            if h.alive && u > p.high {
                self.hot_since.entry(h.name.clone()).or_insert(now);
            } else if !h.alive || u <= p.target {
                self.hot_since.remove(&h.name);
            }
        }
        for h in c.hosts.values().filter(|h| !h.alive) {
            out.notes.push(Note {
                subject: h.name.clone(),
                text: format!(
                    "host {} is unreachable: its VMs are not moved and nothing moves to it",
                    h.name
                ),
            });
        }

        // units (a VM or a together group) by host, skipping VMs that cannot move now
        let movable = |v: &Vm, forced: bool, notes: &mut Vec<Note>| -> bool {
            if v.migrating
                || self.memory.in_flight.contains_key(&v.name)
                || !c.hosts.get(&v.host).is_some_and(|h| h.alive)
            {
                return false;
            }
            if let Some((at, why)) = self.memory.failed.get(&v.name) {
                if now - at < p.retry_after_s {
                    notes.push(Note {
                        subject: v.name.clone(),
                        text: format!(
                            "stays: its last move failed {:.0} s ago ({why}); retried after {:.0} s",
                            now - at,
                            p.retry_after_s
                        ),
                    });
                    return false;
                }
            }
            if !forced {
                if let Some(m) = self.memory.last_move.get(&v.name) {
                    if now - m.at < p.cooldown_s {
                        notes.push(Note {
                            subject: v.name.clone(),
                            text: format!(
                                "stays: moved from {} to {} {:.0} s ago (cooldown {:.0} s)",
                                m.from,
                                m.to,
                                now - m.at,
                                p.cooldown_s
                            ),
                        });
                        return false;
                    }
                }
            }
            true
        };
        let unit = |v: &Vm| -> Option<Vec<&Vm>> {
            let names = self.rules.unit_of(&v.name);
            // a unit is considered once, from its first member present here
            let members: Vec<&Vm> = names.iter().filter_map(|n| c.vms.get(n)).collect();
            if members.first().map(|m| &m.name) != Some(&v.name) {
                return None;
            }
            if members.iter().any(|m| m.host != v.host) {
                return None; // scattered: moved as they are, not as a unit
            }
            Some(members)
        };
        let fits = |pr: &Projection,
                    members: &[&Vm],
                    to: &Host,
                    limit: f64|
         -> Result<(f64, u64), String> {
            if !to.alive {
                return Err("unreachable".into());
            }
            if self.memory.drained.contains(&to.name) {
                return Err("drained".into());
            }
            let moving: Vec<String> = members.iter().map(|m| m.name.clone()).collect();
            for m in members {
                may_run(m, to)?;
                self.rules
                    .allows(&m.name, &to.name, &moving, |o| pr.at.get(o).cloned())?;
            }
            let l: f64 = members.iter().map(|m| load_of(&m.name)).sum();
            let mem: u64 = members.iter().map(|m| m.mem_bytes).sum();
            let mem_after = pr.mem.get(&to.name).copied().unwrap_or(0) + mem;
            if mem_after as f64 > to.mem_bytes as f64 * p.mem_limit {
                return Err(format!(
                    "memory: {} MiB of {} MiB would be taken",
                    mem_after >> 20,
                    to.mem_bytes >> 20
                ));
            }
            let after = (pr.load.get(&to.name).copied().unwrap_or(0.0) + l) / to.capacity_cores;
            if after > limit {
                return Err(format!(
                    "CPU: {:.0}% after (limit {:.0}%)",
                    after * 100.0,
                    limit * 100.0
                ));
            }
            Ok((l, mem))
        };
        let estimate = |members: &[&Vm], from: &str, to: &str| {
            let mut total = MoveCost {
                time_s: 0.0,
                bytes: 0,
                downtime_s: 0.0,
            };
            let mut source = CostSource::Model;
            for m in members {
                let (c, s) = self
                    .memory
                    .costs
                    .estimate(m, from, to, now, p.plan_max_age_s);
                total = total.add(c);
                source = source.weakest(s);
            }
            (total, source)
        };

        // 1. drains: every VM leaves, to where it leaves the least utilisation
        for h in self.memory.drained.iter() {
            let mut any = false;
            for v in c.vms.values().filter(|v| &v.host == h) {
                any = true;
                if !movable(v, true, &mut out.notes) {
                    continue;
                }
                let Some(members) = unit(v) else { continue };
                let mut best: Option<(String, f64)> = None;
                let mut why: Vec<String> = Vec::new();
                for t in c.hosts.values().filter(|t| &t.name != h) {
                    match fits(&pr, &members, t, p.hard) {
                        Ok((l, _)) => {
                            let after = (pr.load[&t.name] + l) / t.capacity_cores;
                            if best.as_ref().is_none_or(|b| after < b.1) {
                                best = Some((t.name.clone(), after));
                            }
                        }
                        Err(e) => why.push(format!("{}: {e}", t.name)),
                    }
                }
                let names: Vec<String> = members.iter().map(|m| m.name.clone()).collect();
                let Some((to, after)) = best else {
                    out.notes.push(Note {
                        subject: v.name.clone(),
                        text: format!(
                            "cannot leave drained host {h}: no host may take {} ({})",
                            names.join(", "),
                            if why.is_empty() {
                                "no other host".into()
                            } else {
                                why.join("; ")
                            }
                        ),
                    });
                    continue;
                };
                if let Err(e) = pr.slots(&p, h, &to) {
                    out.notes.push(Note {
                        subject: v.name.clone(),
                        text: format!("waits to leave drained host {h} for {to}: {e}"),
                    });
                    continue;
                }
                let (cost, source) = estimate(&members, h, &to);
                let before_from = util(&pr, h);
                let before_to = util(&pr, &to);
                let vms: Vec<(String, f64, u64)> = members
                    .iter()
                    .map(|m| (m.name.clone(), load_of(&m.name), m.mem_bytes))
                    .collect();
                pr.apply(&vms, h, &to, false);
                out.moves.push(Move {
                    vms: names,
                    from: h.clone(),
                    to: to.clone(),
                    reason: Reason::Drain,
                    benefit: 0.0,
                    cost,
                    cost_weighted: cost.weighted(&p),
                    cost_source: source,
                    from_util: (before_from, util(&pr, h)),
                    to_util: (before_to, after),
                });
            }
            if !any {
                out.notes.push(Note {
                    subject: h.clone(),
                    text: format!("drained host {h} runs no VM"),
                });
            }
        }

        // 2. balance: relieve hot hosts, hottest first
        let mut hot: Vec<(String, f64)> = self
            .hot_since
            .iter()
            .filter(|(h, _)| !self.memory.drained.contains(*h))
            .map(|(h, _)| (h.clone(), util(&pr, h)))
            .filter(|(_, u)| *u > p.high)
            .collect();
        hot.sort_by(|a, b| b.1.total_cmp(&a.1));
        for (h, u) in hot {
            let since = self.hot_since[&h];
            if now - since < p.hot_for_s {
                out.notes.push(Note {
                    subject: h.clone(),
                    text: format!(
                        "host {h} at {:.0}% (above {:.0}%) for {:.0} s: acts after {:.0} s",
                        u * 100.0,
                        p.high * 100.0,
                        now - since,
                        p.hot_for_s
                    ),
                });
                continue;
            }
            let host = &c.hosts[&h];
            let forced = u > p.hard;
            let mut best: Option<(Vec<&Vm>, Candidate)> = None;
            let mut refused: Option<(String, Candidate)> = None;
            let mut blocked: Vec<String> = Vec::new();
            for v in c.vms.values().filter(|v| v.host == h) {
                if !movable(v, forced, &mut out.notes) {
                    continue;
                }
                let Some(members) = unit(v) else { continue };
                let names: Vec<String> = members.iter().map(|m| m.name.clone()).collect();
                for t in c.hosts.values().filter(|t| t.name != h) {
                    if self.hot_since.contains_key(&t.name) {
                        continue;
                    }
                    let limit = if forced { p.high } else { p.target };
                    let (l, _) = match fits(&pr, &members, t, limit) {
                        Ok(x) => x,
                        Err(e) => {
                            blocked.push(format!("{} to {}: {e}", names.join("+"), t.name));
                            continue;
                        }
                    };
                    let from_load = pr.load[&h];
                    let to_load = pr.load[&t.name];
                    let relief = excess(from_load, host.capacity_cores, p.high)
                        + excess(to_load, t.capacity_cores, p.high)
                        - excess(from_load - l, host.capacity_cores, p.high)
                        - excess(to_load + l, t.capacity_cores, p.high);
                    let (cost, source) = estimate(&members, &h, &t.name);
                    let weighted = cost.weighted(&p);
                    let cand = Candidate {
                        to: t.name.clone(),
                        load: l,
                        benefit: relief * p.horizon_s,
                        cost,
                        source,
                        weighted,
                        to_util_after: (to_load + l) / t.capacity_cores,
                    };
                    let passes = cand.benefit > 0.0
                        && (p.min_gain == 0.0 || cand.benefit >= p.min_gain * weighted);
                    let better = |b: &Candidate| {
                        if p.min_gain == 0.0 {
                            // the baseline: the biggest VM, to the coolest host
                            (cand.load, -cand.to_util_after) > (b.load, -b.to_util_after)
                        } else {
                            cand.benefit - weighted > b.benefit - b.weighted
                        }
                    };
                    if passes {
                        if best.as_ref().is_none_or(|(_, b)| better(b)) {
                            best = Some((members.clone(), cand));
                        }
                    } else if refused
                        .as_ref()
                        .is_none_or(|(_, r)| cand.benefit - weighted > r.benefit - r.weighted)
                    {
                        refused = Some((names.join("+"), cand));
                    }
                }
            }
            let Some((members, cand)) = best else {
                let text = match refused {
                    Some((vm, r)) => format!(
                        "host {h} at {:.0}%: no move pays; the best, {vm} to {}, relieves {:.0} core-s for a cost of {:.0} core-s ({:?}: {:.1} s, {} MiB, {:.2} s down; needs {:.1}x)",
                        u * 100.0,
                        r.to,
                        r.benefit,
                        r.weighted,
                        r.source,
                        r.cost.time_s,
                        r.cost.bytes >> 20,
                        r.cost.downtime_s,
                        p.min_gain
                    ),
                    None => format!(
                        "host {h} at {:.0}%: no VM can go anywhere{}",
                        u * 100.0,
                        if blocked.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", blocked.iter().take(4).cloned().collect::<Vec<_>>().join("; "))
                        }
                    ),
                };
                out.notes.push(Note {
                    subject: h.clone(),
                    text,
                });
                continue;
            };
            if let Err(e) = pr.slots(&p, &h, &cand.to) {
                out.notes.push(Note {
                    subject: h.clone(),
                    text: format!(
                        "host {h} at {:.0}%: would move to {}, but {e}",
                        u * 100.0,
                        cand.to
                    ),
                });
                continue;
            }
            let vms: Vec<(String, f64, u64)> = members
                .iter()
                .map(|m| (m.name.clone(), load_of(&m.name), m.mem_bytes))
                .collect();
            let before_to = util(&pr, &cand.to);
            pr.apply(&vms, &h, &cand.to, false);
            out.moves.push(Move {
                vms: members.iter().map(|m| m.name.clone()).collect(),
                from: h.clone(),
                to: cand.to.clone(),
                reason: Reason::Balance,
                benefit: cand.benefit,
                cost: cand.cost,
                cost_weighted: cand.weighted,
                cost_source: cand.source,
                from_util: (u, util(&pr, &h)),
                to_util: (before_to, cand.to_util_after),
            });
        }
        out
    }

    /// The VMs of `mv` whose cost no fresh plan of the model gives at `now`: those to ask
    /// the source agent's model about before the move starts (none with
    /// `plan_max_age_s` 0).
    pub fn unplanned(&self, mv: &Move, now: f64) -> Vec<String> {
        if self.params.plan_max_age_s <= 0.0 {
            return Vec::new();
        }
        mv.vms
            .iter()
            .filter(|v| {
                self.memory
                    .costs
                    .fresh_plan(v, &mv.from, &mv.to, now, self.params.plan_max_age_s)
                    .is_none()
            })
            .cloned()
            .collect()
    }

    /// Records what the agent's model predicts moving `vm` from `from` to `to` costs,
    /// asked at `at`; forgets the plans too old to count.
    pub fn planned(&mut self, vm: &str, from: &str, to: &str, at: f64, cost: MoveCost) {
        let costs = &mut self.memory.costs;
        costs.record_plan(vm, from, to, at, cost);
        costs.forget_plans_before(at - self.params.plan_max_age_s);
    }

    /// A round's decisions weighed against the model's plans. `answered`: the moves whose
    /// plans came in since the last round (as decided when they were asked for); a move
    /// among them this round does not take becomes a note with both costs ("the model says
    /// X core-s, history said Y: not worth it"). A balance move (with `min_gain` > 0: where
    /// the cost decides) with a VM costed without a fresh plan waits (a note), unless
    /// `plan` says the model could not plan it (it then goes on history's estimate); what
    /// to ask the model is returned with the decisions: per move, its VMs neither planned
    /// nor asked yet. A drain never waits: it moves at any cost.
    pub fn after_plans(
        &self,
        mut d: Decisions,
        answered: &[Move],
        now: f64,
        plan: &dyn Fn(&str, &Move) -> PlanState,
    ) -> (Decisions, Vec<(Move, Vec<String>)>) {
        let p = &self.params;
        let same = |a: &Move, b: &Move| a.vms == b.vms && a.from == b.from && a.to == b.to;
        let said = |s: CostSource| match s {
            CostSource::Model => "an older plan",
            CostSource::History => "history",
            CostSource::Default => "the default estimate",
        };
        for b in answered {
            if d.moves.iter().any(|m| same(m, b)) {
                continue;
            }
            let names = b.vms.join("+");
            // the model's cost of the very move, when every member has a fresh plan
            let model = b.vms.iter().try_fold(None::<MoveCost>, |acc, v| {
                let c = self
                    .memory
                    .costs
                    .fresh_plan(v, &b.from, &b.to, now, p.plan_max_age_s)?;
                Some(Some(acc.map_or(c, |a| a.add(c))))
            });
            let text = match model.flatten() {
                Some(c) => {
                    let k = c.weighted(p);
                    let pays = b.reason == Reason::Drain
                        || (b.benefit > 0.0 && (p.min_gain == 0.0 || b.benefit >= p.min_gain * k));
                    format!(
                        "{names}: not moved from {} to {}: the model says {:.0} core-s ({:.1} s, {} MiB, {:.0} ms down), {} said {:.0} core-s: {}",
                        b.from,
                        b.to,
                        k,
                        c.time_s,
                        c.bytes >> 20,
                        c.downtime_s * 1000.0,
                        said(b.cost_source),
                        b.cost_weighted,
                        if pays {
                            "this round takes another move, or none".to_string()
                        } else {
                            format!(
                                "not worth it (relieves {:.0} core-s, needs {:.1}x)",
                                b.benefit, p.min_gain
                            )
                        }
                    )
                }
                None => format!(
                    "{names}: not moved from {} to {}: this round, decided with the model's answer, takes another move, or none",
                    b.from, b.to
                ),
            };
            d.notes.push(Note {
                subject: names,
                text,
            });
        }
        let mut ask = Vec::new();
        let mut go = Vec::new();
        for m in std::mem::take(&mut d.moves) {
            // only where the cost decides: a drain (or the baseline) moves at any cost
            let costed = m.reason == Reason::Balance && p.min_gain > 0.0;
            let want: Vec<String> = self
                .unplanned(&m, now)
                .into_iter()
                .filter(|v| costed && plan(v, &m) != PlanState::Failed)
                .collect();
            if want.is_empty() {
                go.push(m);
                continue;
            }
            if !want.iter().any(|v| plan(v, &m) == PlanState::Asked) {
                ask.push((m.clone(), want));
            }
            d.notes.push(Note {
                subject: m.vms.join("+"),
                text: format!(
                    "{}: the move from {} to {} waits for the model's plan ({} says {:.0} core-s)",
                    m.vms.join("+"),
                    m.from,
                    m.to,
                    said(m.cost_source),
                    m.cost_weighted
                ),
            });
        }
        d.moves = go;
        (d, ask)
    }

    /// Records that the caller started `mv` (its migrations are running).
    pub fn started(&mut self, mv: &Move, now: f64) {
        for v in &mv.vms {
            self.memory.in_flight.insert(
                v.clone(),
                InFlight {
                    mv: mv.clone(),
                    started_at: now,
                    ids: BTreeMap::new(),
                },
            );
        }
    }

    /// Records how one VM's migration ended: on success where it is now and what it
    /// cost (learnt for later estimates); on failure, why (left alone `retry_after_s`).
    pub fn finished(&mut self, vm: &str, now: f64, outcome: Result<MoveCost, String>) {
        let Some(f) = self.memory.in_flight.remove(vm) else {
            return;
        };
        match outcome {
            Ok(cost) => {
                if let Some(v) = self.cluster.vms.get_mut(vm) {
                    v.host = f.mv.to.clone();
                    let v = v.clone();
                    self.memory.costs.learn(&v, &f.mv.from, &f.mv.to, cost);
                }
                self.memory.last_move.insert(
                    vm.into(),
                    LastMove {
                        at: now,
                        from: f.mv.from,
                        to: f.mv.to,
                    },
                );
                self.memory.failed.remove(vm);
            }
            Err(why) => {
                self.memory.failed.insert(vm.into(), (now, why));
            }
        }
    }
}

#[cfg(test)]
mod tests;
