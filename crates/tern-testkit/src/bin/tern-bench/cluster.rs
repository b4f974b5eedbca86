//! `tern-bench cluster`: the cluster controller's real decision code (`tern-controller`)
//! on a simulated cluster, against the threshold-only baseline on the same load trace. No
//! VM, agent or socket: hosts, VMs, their CPU over time and the migrations are simulated;
//! `Controller::decide` is the one the service runs.
//!
//! The trace is generated from `--seed` (or read with `--trace`): per VM a steady base, a
//! diurnal sine (24 h; three "time zones" of phases), bursts of 20-240 s (a good policy
//! does not react), sustained shifts of 2-8 h up or down (it should), and 5% of VMs busy
//! and idle in turns of 10 minutes (ping-pong bait); a VM's CPU is never above its vCPUs.
//! The first 15% of hosts start hot: VMs are placed first-fit on them up to 105% of their
//! cores in expected load, the rest on the least-loaded host. 5% of VMs have a vTPM and may
//! run only on the 20% of hosts labelled `trusted` (the agents' built-in policy); 20 groups
//! of 3 VMs are kept apart.
//!
//! Every `--step` seconds each VM is sampled, `decide` is called once, and the moves it
//! returns start at once. A move carries memory x (1 + 0.6 x the VM's CPU share) bytes at
//! `--link-gbps`; its downtime is 30 ms + 300 ms x the CPU share; while it runs the VM's
//! load counts on both hosts and the migration's own CPU (`Params::move_cpu_cores`) on
//! both; its measured cost is given back through `finished`, so the CostBook learns.
//!
//! Usage: tern-bench cluster [--hosts 100] [--vms 2000] [--hours 24] [--seed 1] [--step 30]
//!        [--link-gbps 10] [--params PARAMS.json] [--out FILE]
//!        [--trace LOAD.csv --inventory INVENTORY.csv [--rules RULES.toml]]
//!        [--dump-trace DIR]
//!
//! Recorded traces: `LOAD.csv` has lines `t_s,vm,cores` (a header line is skipped; a VM's
//! CPU is its last sample at or before t, its first before that; the run lasts until one
//! `--step` after the last sample unless `--hours` says otherwise); `INVENTORY.csv` has lines
//! `host,NAME,CORES,MEM_GIB[,LABEL;LABEL...]` and `vm,NAME,HOST,VCPUS,MEM_GIB[,tpm]` (HOST:
//! where it starts); `RULES.toml` is the controller's placement rules file. `--dump-trace
//! DIR` writes the generated scenario in that form (`load.csv`, `inventory.csv`,
//! `rules.toml`) for replay. `--params` gives the controller's knobs as JSON (the fields of
//! `tern_controller::Params`; those not given keep their default) to try another policy.

use std::collections::{BTreeMap, HashMap};
use std::f64::consts::TAU;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use tern_agent::policy::{Policy, VmFacts};
use tern_controller::rules::Group;
use tern_controller::{view, Controller, Host, MoveCost, Params, Rules, Vm};

const GIB: u64 = 1 << 30;
const DAY_S: f64 = 86_400.0;
/// Imbalance (max - min utilisation of the 5-minute host loads) below which the cluster
/// counts as balanced, once no host is above `high` either.
const BALANCED_IMBALANCE: f64 = 0.50;
/// A VM moved back to a host it left within this many seconds is a ping-pong.
const PING_PONG_S: f64 = 3600.0;
/// Seconds of host load the balance and imbalance figures are the mean of.
const SMOOTH_S: f64 = 300.0;

pub struct Options {
    hosts: usize,
    vms: usize,
    hours: Option<f64>,
    seed: u64,
    step_s: f64,
    link_gbps: f64,
    trace: Option<(PathBuf, PathBuf)>,
    rules: Option<PathBuf>,
    dump: Option<PathBuf>,
    params: Params,
}

impl Options {
    /// From the command line (`arg("--hosts")` gives the value after `--hosts`).
    pub fn parse(arg: impl Fn(&str) -> Option<String>) -> Result<Options> {
        fn num<T: std::str::FromStr>(v: Option<String>, k: &str) -> Result<Option<T>>
        where
            T::Err: std::error::Error + Send + Sync + 'static,
        {
            v.map(|x| x.parse::<T>()).transpose().context(k.to_string())
        }
        let o = Options {
            hosts: num(arg("--hosts"), "--hosts")?.unwrap_or(100),
            vms: num(arg("--vms"), "--vms")?.unwrap_or(2000),
            hours: num(arg("--hours"), "--hours")?,
            seed: num(arg("--seed"), "--seed")?.unwrap_or(1),
            step_s: num(arg("--step"), "--step")?.unwrap_or(30.0),
            link_gbps: num(arg("--link-gbps"), "--link-gbps")?.unwrap_or(10.0),
            trace: match (arg("--trace"), arg("--inventory")) {
                (Some(t), Some(i)) => Some((t.into(), i.into())),
                (None, None) => None,
                _ => bail!("--trace and --inventory go together"),
            },
            rules: arg("--rules").map(PathBuf::from),
            dump: arg("--dump-trace").map(PathBuf::from),
            params: match arg("--params") {
                None => Params::default(),
                Some(p) => {
                    let text =
                        std::fs::read_to_string(&p).with_context(|| format!("reading {p}"))?;
                    serde_json::from_str(&text)
                        .with_context(|| format!("{p}: controller parameters"))?
                }
            },
        };
        o.params
            .check()
            .map_err(|e| anyhow::anyhow!("--params: {e}"))?;
        ensure!(
            o.hosts >= 2 && o.vms >= 1,
            "--hosts 2 or more, --vms 1 or more"
        );
        ensure!(o.step_s >= 1.0, "--step: seconds, 1 or more");
        ensure!(o.link_gbps > 0.0, "--link-gbps: more than 0");
        ensure!(o.hours.is_none_or(|h| h > 0.0), "--hours: more than 0");
        Ok(o)
    }
}

/// splitmix64: small, deterministic, good enough for a simulation.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, stream: u64) -> Rng {
        let mut r = Rng(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
        r.next();
        r
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn range(&mut self, a: f64, b: f64) -> f64 {
        a + (b - a) * self.unit()
    }

    /// Exponentially distributed, with this mean (gaps of a Poisson process).
    fn exp(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.unit()).ln()
    }

    fn pick<T: Copy>(&mut self, w: &[(T, f64)]) -> T {
        let total: f64 = w.iter().map(|x| x.1).sum();
        let mut r = self.unit() * total;
        for &(v, p) in w {
            if r < p {
                return v;
            }
            r -= p;
        }
        w[w.len() - 1].0
    }
}

struct HostSpec {
    name: String,
    cores: f64,
    mem_bytes: u64,
    labels: Vec<String>,
}

struct VmSpec {
    name: String,
    vcpus: f64,
    mem_bytes: u64,
    tpm: bool,
    /// Index of the host it starts on.
    host0: usize,
}

/// One generated VM's load over time.
struct GenLoad {
    base: f64,
    diurnal: f64,
    /// Phase of the diurnal sine, in days.
    phase: f64,
    /// Busy and idle in turns: (busy cores, idle cores, seconds each, offset s).
    osc: Option<(f64, f64, f64, f64)>,
    /// (from s, to s, cores added).
    bursts: Vec<(f64, f64, f64)>,
    shifts: Vec<(f64, f64, f64)>,
}

enum Load {
    Generated {
        seed: u64,
        vms: Vec<GenLoad>,
    },
    /// Per VM, samples (t, cores) in time order.
    Recorded(Vec<Vec<(f64, f64)>>),
}

struct Scenario {
    hosts: Vec<HostSpec>,
    vms: Vec<VmSpec>,
    load: Load,
    rules: Rules,
    hours: f64,
    what: String,
}

impl Scenario {
    /// VM `i`'s CPU at `t`, in cores.
    fn cores(&self, i: usize, t: f64) -> f64 {
        let vcpus = self.vms[i].vcpus;
        let c = match &self.load {
            Load::Recorded(s) => {
                let s = &s[i];
                match s.partition_point(|x| x.0 <= t) {
                    0 => s.first().map_or(0.0, |x| x.1),
                    n => s[n - 1].1,
                }
            }
            Load::Generated { seed, vms } => {
                let g = &vms[i];
                let mut c = match g.osc {
                    Some((busy, idle, each_s, off)) => {
                        if ((t + off) / each_s).floor() as i64 % 2 == 0 {
                            busy
                        } else {
                            idle
                        }
                    }
                    None => g.base + g.diurnal * (TAU * (t / DAY_S - g.phase)).sin(),
                };
                for &(a, b, d) in g.shifts.iter().chain(&g.bursts) {
                    if a <= t && t < b {
                        c += d;
                    }
                }
                // +-10% noise, a pure function of (seed, VM, t)
                let mut r = Rng::new(*seed ^ 0x5EED, (i as u64) << 32 ^ t.to_bits());
                c * (1.0 + 0.1 * (2.0 * r.unit() - 1.0))
            }
        };
        c.clamp(0.0, vcpus)
    }
}

fn may_run(policy: &Policy, v: &Vm, h: &Host) -> Result<(), String> {
    policy
        .check(
            &VmFacts {
                name: &v.name,
                tpm: v.tpm,
            },
            &h.name,
            &h.labels,
        )
        .map_err(|e| e.to_string())
}

fn ctl_host(h: &HostSpec) -> Host {
    Host {
        name: h.name.clone(),
        labels: h.labels.clone(),
        capacity_cores: h.cores,
        mem_bytes: h.mem_bytes,
        alive: true,
    }
}

fn ctl_vm(v: &VmSpec, host: &HostSpec, migrating: bool) -> Vm {
    Vm {
        name: v.name.clone(),
        host: host.name.clone(),
        mem_bytes: v.mem_bytes,
        tpm: v.tpm,
        migrating,
    }
}

/// The generated scenario (module doc).
fn generate(o: &Options) -> Result<Scenario> {
    let hours = o.hours.unwrap_or(24.0);
    let end_s = hours * 3600.0;
    let hosts: Vec<HostSpec> = (0..o.hosts)
        .map(|i| {
            let big = i % 4 == 3;
            HostSpec {
                name: format!("h{i:03}"),
                cores: if big { 32.0 } else { 16.0 },
                mem_bytes: if big { 512 } else { 256 } * GIB,
                labels: if i % 5 == 1 {
                    vec!["trusted".into()]
                } else {
                    vec![]
                },
            }
        })
        .collect();
    let mut specs = Vec::with_capacity(o.vms);
    let mut loads = Vec::with_capacity(o.vms);
    let mut expected = Vec::with_capacity(o.vms);
    for i in 0..o.vms {
        let mut r = Rng::new(o.seed, i as u64 + 1);
        let mut vcpus: f64 = r.pick(&[(1.0, 0.30), (2.0, 0.35), (4.0, 0.25), (8.0, 0.10)]);
        let mem_gib: u64 = r.pick(&[
            (1, 0.20),
            (2, 0.20),
            (4, 0.25),
            (8, 0.20),
            (16, 0.10),
            (32, 0.05),
        ]);
        let tpm = r.unit() < 0.05;
        let osc = if r.unit() < 0.05 {
            vcpus = vcpus.max(4.0);
            Some((
                vcpus * r.range(0.6, 0.9),
                vcpus * 0.05,
                600.0,
                r.range(0.0, 1200.0),
            ))
        } else {
            None
        };
        let base = vcpus * r.range(0.08, 0.30);
        let zone: f64 = r.pick(&[(0.0, 0.60), (1.0 / 3.0, 0.25), (2.0 / 3.0, 0.15)]);
        let mut bursts = Vec::new();
        let mut t = r.exp(3.0 * 3600.0);
        while t < end_s {
            let d = r.range(20.0, 240.0);
            bursts.push((t, t + d, vcpus * r.range(0.3, 0.9)));
            t += d + r.exp(3.0 * 3600.0);
        }
        let mut shifts = Vec::new();
        let mut t = r.exp(96.0 * 3600.0);
        while t < end_s {
            let d = r.range(2.0, 8.0) * 3600.0;
            let delta = if r.unit() < 0.6 {
                vcpus * r.range(0.2, 0.5)
            } else {
                -base * r.range(0.3, 0.8)
            };
            shifts.push((t, t + d, delta));
            t += d + r.exp(96.0 * 3600.0);
        }
        expected.push(osc.map_or(base, |(b, i, _, _)| (b + i) / 2.0));
        loads.push(GenLoad {
            base,
            diurnal: base * r.range(0.2, 0.6),
            phase: zone + r.range(-0.05, 0.05),
            osc,
            bursts,
            shifts,
        });
        specs.push(VmSpec {
            name: format!("vm{i:04}"),
            vcpus,
            mem_bytes: mem_gib * GIB,
            tpm,
            host0: 0,
        });
    }
    let rules = Rules {
        apart: (0..20.min(o.vms / 3))
            .map(|g| Group {
                vms: (0..3).map(|k| specs[g * 3 + k].name.clone()).collect(),
            })
            .collect(),
        ..Rules::default()
    };
    rules.check().map_err(|e| anyhow::anyhow!("{e}"))?;

    // placement: skewed first-fit (module doc)
    let policy = Policy::default();
    let ctl_hosts: Vec<Host> = hosts.iter().map(ctl_host).collect();
    let hot = (o.hosts * 15 / 100).max(1);
    let mut used = vec![0.0f64; o.hosts];
    let mut mem = vec![0u64; o.hosts];
    let mut at: HashMap<String, usize> = HashMap::new();
    for i in 0..o.vms {
        let v = &specs[i];
        let vm = ctl_vm(v, &hosts[0], false);
        let ok = |h: usize, fill: f64| {
            mem[h] + v.mem_bytes <= hosts[h].mem_bytes * 9 / 10
                && used[h] + expected[i] <= fill * hosts[h].cores
                && may_run(&policy, &vm, &ctl_hosts[h]).is_ok()
                && rules
                    .allows(&v.name, &hosts[h].name, &[], |n| {
                        at.get(n).map(|&x| hosts[x].name.clone())
                    })
                    .is_ok()
        };
        let h = (0..hot).find(|&h| ok(h, 1.05)).or_else(|| {
            (hot..o.hosts)
                .filter(|&h| ok(h, f64::INFINITY))
                .min_by(|&a, &b| (used[a] / hosts[a].cores).total_cmp(&(used[b] / hosts[b].cores)))
        });
        let Some(h) = h else {
            bail!("cannot place {}: the cluster is full", v.name);
        };
        used[h] += expected[i];
        mem[h] += v.mem_bytes;
        at.insert(v.name.clone(), h);
        specs[i].host0 = h;
    }
    Ok(Scenario {
        what: format!(
            "generated, seed {}: first {hot} hosts filled to 105% of their cores in expected load",
            o.seed
        ),
        hosts,
        vms: specs,
        load: Load::Generated {
            seed: o.seed,
            vms: loads,
        },
        rules,
        hours,
    })
}

fn csv_lines(p: &Path) -> Result<Vec<(usize, Vec<String>)>> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    Ok(text
        .lines()
        .enumerate()
        .map(|(n, l)| (n + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
        .map(|(n, l)| (n, l.split(',').map(|f| f.trim().to_string()).collect()))
        .collect())
}

/// A recorded scenario (module doc).
fn read_trace(o: &Options, trace: &Path, inventory: &Path) -> Result<Scenario> {
    let mut hosts = Vec::new();
    let mut vms = Vec::new();
    let mut vm_host = Vec::new();
    for (n, f) in csv_lines(inventory)? {
        let at = || format!("{}:{n}", inventory.display());
        match f.first().map(String::as_str) {
            Some("host") if f.len() >= 4 => hosts.push(HostSpec {
                name: f[1].clone(),
                cores: f[2].parse().with_context(at)?,
                mem_bytes: (f[3].parse::<f64>().with_context(at)? * GIB as f64) as u64,
                labels: f
                    .get(4)
                    .map(|l| {
                        l.split(';')
                            .filter(|x| !x.is_empty())
                            .map(String::from)
                            .collect()
                    })
                    .unwrap_or_default(),
            }),
            Some("vm") if f.len() >= 5 => {
                vms.push(VmSpec {
                    name: f[1].clone(),
                    vcpus: f[3].parse().with_context(at)?,
                    mem_bytes: (f[4].parse::<f64>().with_context(at)? * GIB as f64) as u64,
                    tpm: f.get(5).is_some_and(|x| x == "tpm"),
                    host0: 0,
                });
                vm_host.push(f[2].clone());
            }
            _ => bail!(
                "{}: expected host,NAME,CORES,MEM_GIB[,LABELS] or vm,NAME,HOST,VCPUS,MEM_GIB[,tpm]",
                at()
            ),
        }
    }
    let host_ix: HashMap<&str, usize> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| (h.name.as_str(), i))
        .collect();
    for (v, h) in vms.iter_mut().zip(&vm_host) {
        v.host0 = *host_ix
            .get(h.as_str())
            .with_context(|| format!("VM {} on unknown host {h}", v.name))?;
    }
    ensure!(
        hosts.len() >= 2 && !vms.is_empty(),
        "the inventory needs 2 hosts and a VM"
    );
    let vm_ix: HashMap<&str, usize> = vms
        .iter()
        .enumerate()
        .map(|(i, v)| (v.name.as_str(), i))
        .collect();
    let mut samples: Vec<Vec<(f64, f64)>> = vec![Vec::new(); vms.len()];
    let mut last_t: f64 = 0.0;
    for (n, f) in csv_lines(trace)? {
        if f.len() != 3 {
            bail!("{}:{n}: expected t_s,vm,cores", trace.display());
        }
        let Ok(t) = f[0].parse::<f64>() else {
            if n == 1 {
                continue; // a header
            }
            bail!("{}:{n}: t_s is not a number", trace.display());
        };
        let i = *vm_ix.get(f[1].as_str()).with_context(|| {
            format!("{}:{n}: VM {} not in the inventory", trace.display(), f[1])
        })?;
        let c: f64 = f[2]
            .parse()
            .with_context(|| format!("{}:{n}: cores", trace.display()))?;
        samples[i].push((t, c));
        last_t = last_t.max(t);
    }
    for s in &mut samples {
        s.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    let rules = match &o.rules {
        Some(p) => Rules::parse(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )
        .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?,
        None => Rules::default(),
    };
    Ok(Scenario {
        what: format!("recorded: {} and {}", trace.display(), inventory.display()),
        hours: o.hours.unwrap_or((last_t + o.step_s) / 3600.0),
        hosts,
        vms,
        load: Load::Recorded(samples),
        rules,
    })
}

/// Writes a scenario in the recorded form, sampled every `step_s`.
fn dump(sc: &Scenario, dir: &Path, step_s: f64) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut inv =
        String::from("# host,NAME,CORES,MEM_GIB,LABELS / vm,NAME,HOST,VCPUS,MEM_GIB,tpm\n");
    for h in &sc.hosts {
        let _ = writeln!(
            inv,
            "host,{},{},{},{}",
            h.name,
            h.cores,
            h.mem_bytes / GIB,
            h.labels.join(";")
        );
    }
    for v in &sc.vms {
        let _ = writeln!(
            inv,
            "vm,{},{},{},{},{}",
            v.name,
            sc.hosts[v.host0].name,
            v.vcpus,
            v.mem_bytes as f64 / GIB as f64,
            if v.tpm { "tpm" } else { "" }
        );
    }
    std::fs::write(dir.join("inventory.csv"), inv)?;
    let mut rules = String::new();
    for g in &sc.rules.apart {
        let _ = writeln!(rules, "[[apart]]\nvms = {:?}", g.vms);
    }
    std::fs::write(dir.join("rules.toml"), rules)?;
    let mut load = String::from("t_s,vm,cores\n");
    for k in 0..steps(sc, step_s) {
        let t = k as f64 * step_s;
        for (i, v) in sc.vms.iter().enumerate() {
            let _ = writeln!(load, "{t},{},{}", v.name, sc.cores(i, t));
        }
    }
    std::fs::write(dir.join("load.csv"), load)?;
    Ok(())
}

fn steps(sc: &Scenario, step_s: f64) -> usize {
    (sc.hours * 3600.0 / step_s).round() as usize
}

/// A migration under way in the simulation.
struct Flight {
    vm: usize,
    from: usize,
    to: usize,
    start: f64,
    end: f64,
    cost: MoveCost,
}

#[derive(Default)]
struct Outcome {
    moves: usize,
    /// Moves started after the first two hours.
    moves_late: usize,
    bytes: u64,
    downtime_s: f64,
    /// First time every host's 5-minute load is at or below `high` and the imbalance below
    /// BALANCED_IMBALANCE.
    balanced_at: Option<f64>,
    imbalance_last_hour: f64,
    imbalance_end: f64,
    /// Core-seconds above `high`, and above capacity.
    over_high: f64,
    over_cap: f64,
    /// The same after the first two hours.
    over_high_late: f64,
    over_cap_late: f64,
    /// Rounds in which a hot host was not relieved, by the controller's reason.
    unrelieved: BTreeMap<&'static str, usize>,
    ping_pong: usize,
    decide_s: Vec<f64>,
    /// Moves the sim would refuse (policy, memory): should stay 0.
    violations: usize,
}

/// Runs the scenario with `params` (None: nothing moves, the reference).
fn simulate(sc: &Scenario, params: Option<Params>, step_s: f64, link_gbps: f64) -> Outcome {
    let high = Params::default().high;
    let move_cpu = params.as_ref().map_or(0.0, |p| p.move_cpu_cores);
    let policy = Policy::default();
    let rate = link_gbps * 1e9 / 8.0;
    let nh = sc.hosts.len();
    let ctl_hosts: Vec<Host> = sc.hosts.iter().map(ctl_host).collect();
    let host_map: BTreeMap<String, Host> = ctl_hosts
        .iter()
        .map(|h| (h.name.clone(), h.clone()))
        .collect();
    let vm_ix: HashMap<&str, usize> = sc
        .vms
        .iter()
        .enumerate()
        .map(|(i, v)| (v.name.as_str(), i))
        .collect();
    let host_ix: HashMap<&str, usize> = sc
        .hosts
        .iter()
        .enumerate()
        .map(|(i, h)| (h.name.as_str(), i))
        .collect();
    let mut ctl = params.clone().map(|p| {
        let mut c = Controller::new(p, sc.rules.clone());
        for h in &ctl_hosts {
            c.cluster.set_host(h.clone());
        }
        c
    });
    let keep_s = params.as_ref().map_or(0.0, |p| p.window_s.max(step_s));
    let may = |v: &Vm, h: &Host| may_run(&policy, v, h);

    let mut at: Vec<usize> = sc.vms.iter().map(|v| v.host0).collect();
    let mut moving = vec![false; sc.vms.len()];
    let mut left: Vec<Vec<(f64, usize)>> = vec![Vec::new(); sc.vms.len()];
    let mut flights: Vec<Flight> = Vec::new();
    let mut cores = vec![0.0; sc.vms.len()];
    let mut recent: std::collections::VecDeque<Vec<f64>> = Default::default();
    let smooth_n = ((SMOOTH_S / step_s).round() as usize).max(1);
    let n = steps(sc, step_s);
    let last_hour = n.saturating_sub((3600.0 / step_s).round() as usize);
    let mut imb_sum = 0.0;
    let mut imb_n = 0usize;
    let mut out = Outcome::default();

    for k in 0..n {
        let now = k as f64 * step_s;
        // moves that ended before now
        flights.retain(|f| {
            if f.end > now {
                return true;
            }
            at[f.vm] = f.to;
            moving[f.vm] = false;
            if let Some(c) = ctl.as_mut() {
                c.finished(&sc.vms[f.vm].name, f.end, Ok(f.cost));
            }
            false
        });
        for (i, v) in sc.vms.iter().enumerate() {
            cores[i] = sc.cores(i, now);
            if let Some(c) = ctl.as_mut() {
                c.cluster.observe_vm(
                    ctl_vm(v, &sc.hosts[at[i]], moving[i]),
                    now,
                    cores[i],
                    keep_s,
                );
            }
        }
        if let Some(c) = ctl.as_mut() {
            let t0 = Instant::now();
            let d = c.decide(now, &may);
            out.decide_s.push(t0.elapsed().as_secs_f64());
            for note in d
                .notes
                .iter()
                .filter(|n| sc.hosts.iter().any(|h| h.name == n.subject))
            {
                let why = if note.text.contains("acts after") {
                    "waiting (hot_for_s)"
                } else if note.text.contains("no move pays") {
                    "no move pays (cost-benefit)"
                } else if note.text.contains("no VM can go anywhere") {
                    "no VM can go anywhere"
                } else if note.text.contains("would move to") {
                    "concurrency limits"
                } else {
                    "other"
                };
                *out.unrelieved.entry(why).or_default() += 1;
            }
            for mv in &d.moves {
                c.started(mv, now);
                let (from, to) = (host_ix[mv.from.as_str()], host_ix[mv.to.as_str()]);
                let mut t = now;
                for name in &mv.vms {
                    let i = vm_ix[name.as_str()];
                    let v = &sc.vms[i];
                    if at[i] != from || moving[i] {
                        out.violations += 1;
                    }
                    if may(&ctl_vm(v, &sc.hosts[at[i]], false), &ctl_hosts[to]).is_err() {
                        out.violations += 1;
                    }
                    let share = cores[i] / v.vcpus.max(1e-9);
                    let bytes = (v.mem_bytes as f64 * (1.0 + 0.6 * share)) as u64;
                    let cost = MoveCost {
                        time_s: bytes as f64 / rate,
                        bytes,
                        downtime_s: 0.03 + 0.3 * share,
                    };
                    let start = t;
                    t += cost.time_s;
                    flights.push(Flight {
                        vm: i,
                        from,
                        to,
                        start,
                        end: t,
                        cost,
                    });
                    moving[i] = true;
                    out.moves += 1;
                    if now >= 7200.0 {
                        out.moves_late += 1;
                    }
                    out.bytes += bytes;
                    out.downtime_s += cost.downtime_s;
                    if left[i]
                        .iter()
                        .any(|&(tl, h)| h == to && now - tl <= PING_PONG_S)
                    {
                        out.ping_pong += 1;
                    }
                    left[i].push((now, from));
                }
            }
        }
        // what the hosts carry over [now, now + step): VMs where they are, a moving VM on
        // both ends while it moves and at the destination once moved, the moves' own CPU
        let mut load = vec![0.0; nh];
        for i in 0..sc.vms.len() {
            load[at[i]] += cores[i];
        }
        let next = now + step_s;
        for f in &flights {
            let during = (f.end.min(next) - f.start.max(now)).max(0.0) / step_s;
            let after = (next - f.end).clamp(0.0, step_s) / step_s;
            load[f.to] += (during + after) * cores[f.vm] + during * move_cpu;
            load[f.from] += during * move_cpu - after * cores[f.vm];
        }
        let mut mem = vec![0u64; nh];
        for i in 0..sc.vms.len() {
            mem[at[i]] += sc.vms[i].mem_bytes;
        }
        for f in &flights {
            mem[f.to] += sc.vms[f.vm].mem_bytes;
        }
        for h in 0..nh {
            let cap = sc.hosts[h].cores;
            out.over_high += (load[h] - high * cap).max(0.0) * step_s;
            if now >= 7200.0 {
                out.over_high_late += (load[h] - high * cap).max(0.0) * step_s;
                out.over_cap_late += (load[h] - cap).max(0.0) * step_s;
            }
            out.over_cap += (load[h] - cap).max(0.0) * step_s;
            if mem[h] > sc.hosts[h].mem_bytes {
                out.violations += 1;
            }
        }
        recent.push_back(load);
        if recent.len() > smooth_n {
            recent.pop_front();
        }
        let smooth: BTreeMap<String, f64> = (0..nh)
            .map(|h| {
                let m = recent.iter().map(|l| l[h]).sum::<f64>() / recent.len() as f64;
                (sc.hosts[h].name.clone(), m)
            })
            .collect();
        let imb = view::imbalance(&smooth, &host_map);
        let max_u = sc
            .hosts
            .iter()
            .map(|h| smooth[&h.name] / h.cores)
            .fold(0.0, f64::max);
        if out.balanced_at.is_none()
            && recent.len() == smooth_n
            && max_u <= high
            && imb < BALANCED_IMBALANCE
        {
            out.balanced_at = Some(next);
        }
        if k >= last_hour {
            imb_sum += imb;
            imb_n += 1;
        }
        out.imbalance_end = imb;
    }
    out.imbalance_last_hour = imb_sum / imb_n.max(1) as f64;
    out
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn ratio(a: f64, b: f64) -> String {
    if b == 0.0 {
        if a == 0.0 {
            "-".into()
        } else {
            "inf".into()
        }
    } else {
        format!("{:.2}x", a / b)
    }
}

pub fn bench(o: &Options) -> Result<String> {
    let sc = match &o.trace {
        Some((t, i)) => read_trace(o, t, i)?,
        None => generate(o)?,
    };
    if let Some(d) = &o.dump {
        dump(&sc, d, o.step_s)?;
        eprintln!("wrote the scenario to {}", d.display());
    }
    let cap: f64 = sc.hosts.iter().map(|h| h.cores).sum();
    let n = steps(&sc, o.step_s);
    let (mut sum, mut peak) = (0.0, 0.0f64);
    for k in 0..n {
        let t = k as f64 * o.step_s;
        let l: f64 = (0..sc.vms.len()).map(|i| sc.cores(i, t)).sum();
        sum += l;
        peak = peak.max(l);
    }
    let hot0 = {
        let mut l = vec![0.0; sc.hosts.len()];
        for (i, v) in sc.vms.iter().enumerate() {
            l[v.host0] += sc.cores(i, 0.0);
        }
        let hi = Params::default().high;
        (0..sc.hosts.len())
            .filter(|&h| l[h] > hi * sc.hosts[h].cores)
            .count()
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Simulated cluster: {} hosts ({:.0} cores, {:.1} TiB), {} VMs ({:.0} vCPUs, {:.1} TiB, {} with a vTPM, {} hosts `trusted`, {} apart groups), {:.1} h in steps of {} s, links {} Gbit/s. Trace: {}. Mean cluster utilisation {:.0}%, peak {:.0}%; {} hosts above 80% at the start.\n",
        sc.hosts.len(),
        cap,
        sc.hosts.iter().map(|h| h.mem_bytes).sum::<u64>() as f64 / (GIB as f64 * 1024.0),
        sc.vms.len(),
        sc.vms.iter().map(|v| v.vcpus).sum::<f64>(),
        sc.vms.iter().map(|v| v.mem_bytes).sum::<u64>() as f64 / (GIB as f64 * 1024.0),
        sc.vms.iter().filter(|v| v.tpm).count(),
        sc.hosts.iter().filter(|h| h.labels.iter().any(|l| l == "trusted")).count(),
        sc.rules.apart.len(),
        sc.hours,
        o.step_s,
        o.link_gbps,
        sc.what,
        100.0 * sum / n.max(1) as f64 / cap,
        100.0 * peak / cap,
        hot0,
    );
    let runs = [
        ("no moves (reference)", None),
        ("threshold only (baseline)", Some(Params::threshold_only())),
        ("controller", Some(o.params.clone())),
    ];
    let mut res = Vec::new();
    for (name, p) in runs {
        eprintln!("cluster: simulating {name}");
        let t0 = Instant::now();
        let r = simulate(&sc, p, o.step_s, o.link_gbps);
        eprintln!(
            "  {} moves, {:.1} s wall clock, {} violations",
            r.moves,
            t0.elapsed().as_secs_f64(),
            r.violations
        );
        ensure!(
            r.violations == 0,
            "{name}: {} moves the simulation would refuse",
            r.violations
        );
        res.push((name, r));
    }
    s.push_str("| policy | moves | moves/h | moves/h after 2 h | GiB moved | downtime s (sum) | time to balance | imbalance, last hour | imbalance at the end | overload above 80%, core-h | overload above 80% after 2 h, core-h | overload above 100%, core-h | overload above 100% after 2 h, core-h | ping-pong | decide ms, mean | decide ms, max |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    let late_h = (sc.hours - 2.0).max(1e-9);
    let ttb = |r: &Outcome| {
        r.balanced_at
            .map_or("never".into(), |t| format!("{:.0} min", t / 60.0))
    };
    for (name, r) in &res {
        let max = r.decide_s.iter().cloned().fold(0.0, f64::max);
        let _ = writeln!(
            s,
            "| {name} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {:.3} | {:.3} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {} |",
            r.moves,
            r.moves as f64 / sc.hours,
            r.moves_late as f64 / late_h,
            r.bytes as f64 / GIB as f64,
            r.downtime_s,
            ttb(r),
            r.imbalance_last_hour,
            r.imbalance_end,
            r.over_high / 3600.0,
            r.over_high_late / 3600.0,
            r.over_cap / 3600.0,
            r.over_cap_late / 3600.0,
            r.ping_pong,
            if r.decide_s.is_empty() { "-".into() } else { format!("{:.2}", mean(&r.decide_s) * 1e3) },
            if r.decide_s.is_empty() { "-".into() } else { format!("{:.1}", max * 1e3) },
        );
    }
    let (b, c) = (&res[1].1, &res[2].1);
    let _ = writeln!(
        s,
        "| controller / baseline | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        ratio(c.moves as f64, b.moves as f64),
        ratio(c.moves as f64, b.moves as f64),
        ratio(c.moves_late as f64, b.moves_late as f64),
        ratio(c.bytes as f64, b.bytes as f64),
        ratio(c.downtime_s, b.downtime_s),
        match (c.balanced_at, b.balanced_at) {
            (Some(x), Some(y)) => ratio(x, y),
            _ => "-".into(),
        },
        ratio(c.imbalance_last_hour, b.imbalance_last_hour),
        ratio(c.imbalance_end, b.imbalance_end),
        ratio(c.over_high, b.over_high),
        ratio(c.over_high_late, b.over_high_late),
        ratio(c.over_cap, b.over_cap),
        ratio(c.over_cap_late, b.over_cap_late),
        ratio(c.ping_pong as f64, b.ping_pong as f64),
        ratio(mean(&c.decide_s), mean(&b.decide_s)),
        ratio(
            c.decide_s.iter().cloned().fold(0.0, f64::max),
            b.decide_s.iter().cloned().fold(0.0, f64::max)
        ),
    );
    for (name, r) in &res[1..] {
        let _ = writeln!(
            s,
            "\n{name}: rounds in which a hot host was not relieved, by the decision's note: {}.",
            if r.unrelieved.is_empty() {
                "none".to_string()
            } else {
                r.unrelieved
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        );
    }
    if o.params != Params::default() {
        let _ = writeln!(
            s,
            "\nController parameters (--params): {}",
            serde_json::to_string(&o.params)?
        );
    }
    let _ = writeln!(
        s,
        "\nTime to balance: from the start to the first time every host's load (mean of the last {SMOOTH_S:.0} s) is at or below 80% of its cores and the imbalance (max - min utilisation, `view::imbalance`, of those means) is below {BALANCED_IMBALANCE:.2}. Imbalance columns: the same 5-minute means, averaged over the last hour and at the end. Overload: the sum over hosts and time of the cores a host carries above 80% (above 100%) of its cores, moves' own CPU and a moving VM's load at both ends included. Ping-pong: a VM moved back to a host it left within {:.0} min. Decide: wall-clock time of one `Controller::decide` call (one per step).",
        PING_PONG_S / 60.0
    );
    Ok(s)
}
