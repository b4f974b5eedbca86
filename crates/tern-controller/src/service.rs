//! The running controller (`tern controller`): every `interval_s` it polls each agent's
//! load over its control listener (mutual TLS, a certificate with the label
//! `controller`), follows the moves in flight, decides ([`crate::decide`]) when it leads,
//! asks the source agents' model for the plans of moves not costed on a fresh one (in the
//! background: the move waits, the round does not), starts the moves through the source
//! agents and saves its state before and after each start. Serves `tern cluster` and `tern host` on a local socket ([`crate::api`]).
//!
//! Owns the loop and the bookkeeping between the agents' answers and the decision; must
//! not decide (that is `decide`) or move VM data (the agents do).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use tern_api::client::Client;
use tern_api::load::HostLoad;
use tern_api::migration::{MigrateRequest, MigrationPlan};

use crate::api::{ClusterStatus, HostStatus, LogLine, VmStatus};
use crate::config::ControllerConfig;
use crate::decide::{Controller, Decisions, Move, MoveCost, PlanState};
use crate::state::{StateError, Store};
use crate::view::{Host, Vm};

/// Why the controller could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("the controller's state")]
    State(#[from] StateError),
    #[error("cannot make a client for host {0}'s control listener")]
    Client(String, #[source] tern_agent::control::ControlClientError),
    #[error("cannot serve the controller's API on {0}")]
    Api(std::path::PathBuf, #[source] std::io::Error),
}

/// How long a restart from a snapshot may take at the agent before the controller stops
/// waiting (the agent allows 60 s plus the stream's size at 50 MiB/s).
const RESTART_WITHIN_S: u64 = 900;
/// How long a poll of an agent's load may take: a slow agent must not hold up the round
/// (the rounds are what keeps fenced hosts from fencing).
const POLL_WITHIN: Duration = Duration::from_secs(5);
/// How long a round waits for a source agent to say how a move goes (it asks again next
/// round).
const FOLLOW_WITHIN: Duration = Duration::from_secs(10);

/// How long after a move the VM's old host's reports of it are not believed (the agents
/// sample every 2 s; a poll may read a sample from before the move ended).
const SETTLE_S: f64 = 6.0;

/// Lines of decisions kept for `tern cluster status`.
const LOG_LINES: usize = 200;
/// How long a move may be recorded as started without a migration id before the
/// controller decides it never started (the controller stopped between the two).
const START_GRACE_S: f64 = 60.0;
/// How long the model's plan of a move may take at the source agent (usually a few
/// seconds: a 1 s dirty-rate sample, up to 2 s of link probe). The move waits for it (the
/// round does not): a plan that takes longer is given up and the move goes on history's
/// estimate.
pub(crate) const PLAN_WITHIN: Duration = Duration::from_secs(30);

/// Seconds since the Unix epoch: the controller's clock (saved times stay meaningful
/// across restarts and between a leader and its standby).
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// (VM, from, to): one VM's move, as the model is asked about it.
type PlanKey = (String, String, String);

/// The model's plans asked in the background ([`Service::weigh_plans`]), and what came
/// back.
#[derive(Default)]
struct Planning {
    /// Asked, no answer yet: when, and the move as decided then.
    asked: BTreeMap<PlanKey, (f64, Move)>,
    /// The model could not plan these (an error, a timeout, no prediction), when: their
    /// moves go on history's estimate for `plan_max_age_s`.
    failed: BTreeMap<PlanKey, f64>,
    /// Answers the next round takes.
    answers: Vec<PlanAnswer>,
}

/// The source agent's answer to a plan of one VM's move.
struct PlanAnswer {
    vm: String,
    from: String,
    to: String,
    /// When it came (unix seconds).
    at: f64,
    plan: Result<MigrationPlan, String>,
}

/// The source agent's plan of moving `vm` as `req` asks (`POST /v1/vms/{vm}/plan`,
/// what `tern migrate --plan` shows; nothing of the VM moves).
fn plan_of(client: &Client, vm: &str, req: &MigrateRequest) -> Result<MigrationPlan, String> {
    let body = serde_json::to_value(req).map_err(|e| e.to_string())?;
    let v = client
        .call_within(
            "POST",
            &format!("/v1/vms/{vm}/plan"),
            Some(&body),
            Some(PLAN_WITHIN),
        )
        .map_err(|e| error_text(&e))?;
    serde_json::from_value(v).map_err(|e| format!("its plan is not what this tern expects: {e}"))
}

/// A move's cost as the model predicts it (None: it predicts nothing, the link's rate
/// unknown): its total time, the bytes memory and disks put on the wire, its downtime.
fn cost_of_plan(plan: &MigrationPlan) -> Option<MoveCost> {
    let p = plan.prediction.as_ref()?;
    Some(MoveCost {
        time_s: p.total_s,
        bytes: p.memory_wire_bytes + p.disk_wire_bytes,
        downtime_s: p.downtime_ms / 1000.0,
    })
}

pub struct Service {
    pub config: ControllerConfig,
    policy: tern_agent::policy::Policy,
    clients: BTreeMap<String, Arc<Client>>,
    pub(crate) inner: Mutex<Inner>,
    /// The model's plans asked in the background, and their answers (locked after
    /// `inner`, never before it).
    planning: Arc<Mutex<Planning>>,
    /// A failover pass runs (in the background: a restart can take minutes, and the
    /// rounds must go on, since the leader's polls keep the agents' fences from falling).
    failing_over: std::sync::atomic::AtomicBool,
}

pub(crate) struct Inner {
    pub ctl: Controller,
    pub store: Box<dyn Store>,
    pub last: Decisions,
    pub leading: bool,
    seen: BTreeMap<String, Seen>,
    /// VM -> (host, agent uptime ms, cumulative CPU s) at the previous poll.
    prev_cpu: BTreeMap<String, (String, u64, f64)>,
    /// VM -> (the host it just left, until when): an agent's load is a sample up to
    /// [`SETTLE_S`] old, so for a while the old host may still list the VM and the new one
    /// not yet.
    settling: BTreeMap<String, (String, f64)>,
    log: VecDeque<LogLine>,
    /// Notes of the previous round (only new ones are logged): the decision's, the
    /// failover's, and VMs that several hosts report.
    said: BTreeSet<String>,
    said_failover: BTreeSet<String>,
    said_conflicts: BTreeSet<String>,
    /// `ctl.memory.placed` or `.fences` changed since the state was last saved.
    placed_dirty: bool,
}

impl Inner {
    fn new(ctl: Controller, store: Box<dyn Store>) -> Inner {
        Inner {
            ctl,
            store,
            last: Decisions::default(),
            leading: false,
            seen: BTreeMap::new(),
            prev_cpu: BTreeMap::new(),
            settling: BTreeMap::new(),
            log: VecDeque::new(),
            said: BTreeSet::new(),
            said_failover: BTreeSet::new(),
            said_conflicts: BTreeSet::new(),
            placed_dirty: false,
        }
    }
}

/// Why an agent's poll gave no load, and whether the host was reached all the same.
struct PollError {
    text: String,
    /// Its agent answered, not what was expected (an error, another version's load): the
    /// agent heard the leader's poll and will not fence, so the host is not dead and its
    /// VMs must not restart elsewhere.
    reached: bool,
}

/// Whether a failed call reached the host (see [`PollError::reached`]).
fn reached(e: &tern_api::client::ClientError) -> bool {
    use tern_api::client::ClientError as E;
    match e {
        E::BadResponse(_) | E::NotJson { .. } | E::Api { .. } | E::Shape(..) => true,
        E::Dial(..) | E::Connect(..) | E::BadEndpoint(_) | E::Io(_) | E::NonUtf8Path(_) => false,
    }
}

#[derive(Default, Clone)]
struct Seen {
    /// The last poll that gave its load.
    last_ok: Option<f64>,
    /// The last poll that reached the host without giving its load ([`PollError`]).
    last_reached: Option<f64>,
    error: Option<String>,
    load: Option<HostLoad>,
}

impl Service {
    /// Reads the policy, rules and state; does not contact the agents yet.
    pub fn new(
        config: ControllerConfig,
        store: Box<dyn Store>,
    ) -> Result<Arc<Service>, ServiceError> {
        let policy = config.load_policy()?;
        let rules = config.load_rules()?;
        let mut clients = BTreeMap::new();
        for h in &config.hosts {
            let c = tern_agent::control::client_for(&h.control, &config.tls_dir)
                .map_err(|e| ServiceError::Client(h.name.clone(), e))?;
            clients.insert(h.name.clone(), Arc::new(c));
        }
        let mut ctl = Controller::new(config.params.clone(), rules);
        let mut store = store;
        if let Some(m) = store.load()? {
            ctl.memory = m;
        }
        Ok(Arc::new(Service {
            config,
            policy,
            clients,
            planning: Arc::default(),
            failing_over: std::sync::atomic::AtomicBool::new(false),
            inner: Mutex::new(Inner::new(ctl, store)),
        }))
    }

    /// Polls, decides and acts every `interval_s`, forever.
    pub async fn run(self: Arc<Self>) {
        let every = Duration::from_secs_f64(self.config.interval_s);
        loop {
            let started = tokio::time::Instant::now();
            self.clone().tick().await;
            tokio::time::sleep_until(started + every).await;
        }
    }

    /// Whether the authorisation policy lets `vm` run on `host`.
    pub fn may_run(&self, vm: &Vm, host: &Host) -> Result<(), String> {
        let facts = tern_agent::policy::VmFacts {
            name: &vm.name,
            tpm: vm.tpm,
        };
        self.policy
            .check(&facts, &host.name, &host.labels)
            .map_err(|e| e.to_string())
    }

    /// One round: poll, follow the moves in flight, decide, start.
    pub async fn tick(self: Arc<Self>) {
        // a standby stays silent (the leader's poll is the word for the agents' fences,
        // `tern_api::load::LEADER_POLL`; a standby has nothing to say)
        let leading_now = {
            let mut g = self.inner.lock();
            g.store.leading().unwrap_or(false)
        };
        let polls = if leading_now {
            self.poll_agents().await
        } else {
            Vec::new()
        };
        // only the leader follows moves (a standby's state is read afresh when it leads)
        let follow = if self.inner.lock().leading {
            self.follow_moves().await
        } else {
            Vec::new()
        };
        let now = unix_now();
        let to_start = {
            let mut g = self.inner.lock();
            let inner = &mut *g;
            self.observe(inner, now, polls);
            for (vm, outcome) in follow {
                self.note_finished(inner, now, &vm, outcome);
            }
            match inner.store.leading() {
                Ok(true) => {
                    if !inner.leading {
                        // a new leader: the state may have moved on under another one
                        match inner.store.load() {
                            Ok(Some(m)) => inner.ctl.memory = m,
                            Ok(None) => {}
                            Err(e) => {
                                self.log(
                                    inner,
                                    now,
                                    format!("cannot read the state as the new leader: {e}"),
                                );
                                return;
                            }
                        }
                        self.log(inner, now, format!("leading ({})", inner.store.describe()));
                        inner.leading = true;
                        take_over(inner, &self.config, now);
                    }
                    if inner.placed_dirty {
                        match inner.store.save(&inner.ctl.memory) {
                            Ok(()) => inner.placed_dirty = false,
                            Err(e) => {
                                self.log(inner, now, format!("cannot save where the VMs run: {e}"))
                            }
                        }
                    }
                }
                Ok(false) => {
                    if inner.leading {
                        self.log(
                            inner,
                            now,
                            "no longer leading: another controller acts".into(),
                        );
                    }
                    inner.leading = false;
                    return;
                }
                Err(e) => {
                    inner.leading = false;
                    self.log(
                        inner,
                        now,
                        format!("cannot tell whether this controller leads: {e}"),
                    );
                    return;
                }
            }
            // the plans that came in count in this round's decision; moves costed
            // without a fresh plan wait for one
            let answered = self.take_plans(inner, now);
            let d = inner.ctl.decide(now, &|v, h| self.may_run(v, h));
            let d = self.weigh_plans(inner, now, d, &answered);
            match self.commit(inner, now, d) {
                Some(moves) => moves,
                None => return,
            }
        };
        for m in to_start {
            self.start(m).await;
        }
        if !self.config.dry_run
            && !self
                .failing_over
                .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            let me = self.clone();
            tokio::spawn(async move {
                // cleared however the pass ends (a panic included)
                struct Done<'a>(&'a std::sync::atomic::AtomicBool);
                impl Drop for Done<'_> {
                    fn drop(&mut self) {
                        self.0.store(false, std::sync::atomic::Ordering::SeqCst);
                    }
                }
                let _done = Done(&me.failing_over);
                me.failover().await;
            });
        }
    }

    /// Restarts the VMs of hosts unreachable for `restart_after_s` from their snapshots,
    /// and releases hosts that come back fenced.
    async fn failover(&self) {
        let now = unix_now();
        let (dead, live): (Vec<String>, Vec<String>) = {
            let g = self.inner.lock();
            let Some(after) = self.config.restart_after_s else {
                return;
            };
            let mut dead = Vec::new();
            let mut live = Vec::new();
            for h in &self.config.hosts {
                let seen = g.seen.get(&h.name);
                let alive = g.ctl.cluster.hosts.get(&h.name).is_some_and(|x| x.alive);
                if alive {
                    live.push(h.name.clone());
                } else if seen
                    .and_then(|s| s.last_ok.into_iter().chain(s.last_reached).reduce(f64::max))
                    .is_some_and(|t| now - t >= after)
                {
                    dead.push(h.name.clone());
                }
            }
            (dead, live)
        };
        // hosts that came back fenced: stop what restarted elsewhere, resume the rest
        for h in &live {
            let Some(client) = self.clients.get(h).cloned() else {
                continue;
            };
            let fence = tokio::task::spawn_blocking({
                let client = client.clone();
                move || client.call("GET", "/v1/fence", None)
            })
            .await;
            let Ok(Ok(f)) = fence else { continue };
            if f["fenced"].as_bool() != Some(true) {
                continue;
            }
            let vms = strings(&f["vms"]);
            let (stop, resume) = {
                let g = self.inner.lock();
                crate::failover::release(h, &vms, &g.ctl.memory.restarted)
            };
            let body = serde_json::json!({ "stop": stop, "resume": resume });
            let r = tokio::task::spawn_blocking(move || {
                client.call("POST", "/v1/fence/release", Some(&body))
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| error_text(&e)));
            let mut g = self.inner.lock();
            let inner = &mut *g;
            match r {
                Ok(answer) => {
                    // only a copy the agent stopped is done with; one it could not stop
                    // stays recorded (the agent keeps the host fenced; asked again next
                    // pass)
                    let stopped = strings(&answer["stopped"]);
                    let failed = strings(&answer["failed"]);
                    inner
                        .ctl
                        .memory
                        .restarted
                        .retain(|vm, x| &x.from != h || !stopped.contains(vm));
                    let _ = inner.store.save(&inner.ctl.memory);
                    let text = if failed.is_empty() {
                        format!("host {h} is back and was fenced: stopped {stop:?} (restarted elsewhere), resumed {resume:?}")
                    } else {
                        format!("host {h} is back and fenced: stopped {stopped:?}, but {failed:?}; it stays fenced, asked again next round")
                    };
                    self.log(inner, now, text);
                }
                Err(e) => self.log(
                    inner,
                    now,
                    format!("host {h} is back fenced, but releasing it failed: {e}"),
                ),
            }
        }
        if dead.is_empty() {
            self.inner.lock().said_failover.clear();
            return;
        }
        // what the live hosts hold
        let mut snapshots = BTreeMap::new();
        for h in &live {
            let Some(client) = self.clients.get(h).cloned() else {
                continue;
            };
            let r = tokio::task::spawn_blocking(move || client.call("GET", "/v1/snapshots", None))
                .await;
            if let Ok(Ok(v)) = r {
                let list: Vec<crate::failover::Snapshot> =
                    serde_json::from_value(v).unwrap_or_default();
                snapshots.insert(h.clone(), list);
            }
        }
        let plan = {
            let mut g = self.inner.lock();
            let inner = &mut *g;
            if !inner.leading {
                return;
            }
            let after = self.config.restart_after_s.unwrap_or(f64::INFINITY);
            let unfenced: BTreeMap<String, String> = dead
                .iter()
                .filter_map(|h| {
                    let f = inner.ctl.memory.fences.get(h).copied();
                    crate::failover::fences_in_time(h, f, after)
                        .err()
                        .map(|why| (h.clone(), why))
                })
                .collect();
            let (plan, notes) = crate::failover::plan_restarts(
                now,
                &crate::failover::Situation {
                    cluster: &inner.ctl.cluster,
                    dead: &dead,
                    drained: &inner.ctl.memory.drained,
                    snapshots: &snapshots,
                    done: &inner.ctl.memory.restarted,
                    rules: &inner.ctl.rules,
                    unfenced: &unfenced,
                },
                &|v, h| self.may_run(v, h),
            );
            for n in new_notes(&mut inner.said_failover, notes) {
                self.log(inner, now, n);
            }
            plan
        };
        for r in plan {
            let Some(client) = self.clients.get(&r.on).cloned() else {
                continue;
            };
            // recorded (and saved, as the leader) before the agent is asked: whatever
            // happens to this controller, the host that comes back stops its copy
            {
                let mut g = self.inner.lock();
                let inner = &mut *g;
                inner.ctl.memory.restarted.insert(
                    r.vm.clone(),
                    crate::failover::Restarted {
                        from: r.from.clone(),
                        on: r.on.clone(),
                        at: now,
                        age_s: r.age_s,
                    },
                );
                if let Err(e) = inner.store.save(&inner.ctl.memory) {
                    inner.ctl.memory.restarted.remove(&r.vm);
                    self.log(
                        inner,
                        now,
                        format!("{}: not restarted: cannot save the state: {e}", r.vm),
                    );
                    continue;
                }
            }
            let vm = r.vm.clone();
            let res = tokio::task::spawn_blocking(move || {
                client.call_within(
                    "POST",
                    &format!("/v1/snapshots/{vm}/restart"),
                    None,
                    Some(Duration::from_secs(RESTART_WITHIN_S)),
                )
            })
            .await
            .map_err(|e| (None, e.to_string()))
            .and_then(|r| {
                r.map_err(|e| {
                    let status = match &e {
                        tern_api::client::ClientError::Api { status, .. } => Some(*status),
                        _ => None,
                    };
                    (status, error_text(&e))
                })
            });
            let now = unix_now();
            let mut g = self.inner.lock();
            let inner = &mut *g;
            match res {
                Ok(_) => {
                    if let Some(v) = inner.ctl.cluster.vms.get_mut(&r.vm) {
                        v.host = r.on.clone();
                    }
                    self.log(inner, now, format!(
                        "{}: restarted on {} from its snapshot of {:.0} s ago (host {} unreachable)",
                        r.vm, r.on, r.age_s, r.from
                    ));
                }
                // the agent answered no (no snapshot, not restartable, fenced, a failed
                // start it cleaned up): nothing runs there. A VM of that name already
                // running there (a retry after an answer that was lost) stays recorded.
                Err((Some(_), e)) if !e.contains("runs (or is arriving) on this host") => {
                    inner.ctl.memory.restarted.remove(&r.vm);
                    let _ = inner.store.save(&inner.ctl.memory);
                    self.log(inner, now, format!("{}: restarting on {} failed: {e}", r.vm, r.on));
                }
                Err((_, e)) => self.log(
                    inner,
                    now,
                    format!(
                        "{}: restarting on {} gave no clear answer ({e}): counted as restarted there, so its old host stops its copy",
                        r.vm, r.on
                    ),
                ),
            }
        }
    }

    /// Each agent's load, or why it did not answer.
    async fn poll_agents(&self) -> Vec<(String, Result<HostLoad, PollError>)> {
        // the leader's poll is its word for the agents' fences; a dry run's is not
        let path = if self.config.dry_run {
            "/v1/load"
        } else {
            tern_api::load::LEADER_POLL
        };
        let mut jobs = Vec::new();
        for (name, c) in &self.clients {
            let c = c.clone();
            jobs.push((
                name.clone(),
                tokio::task::spawn_blocking(move || {
                    c.call_within("GET", path, None, Some(POLL_WITHIN))
                        .map_err(|e| PollError {
                            text: error_text(&e),
                            reached: reached(&e),
                        })
                        .and_then(|v| {
                            serde_json::from_value::<HostLoad>(v).map_err(|e| PollError {
                                text: format!("its load is not what this tern expects: {e}"),
                                reached: true,
                            })
                        })
                }),
            ));
        }
        let mut out = Vec::new();
        for (name, j) in jobs {
            out.push((
                name,
                j.await.unwrap_or_else(|e| {
                    Err(PollError {
                        text: format!("poll failed: {e}"),
                        reached: false,
                    })
                }),
            ));
        }
        out
    }

    /// How the moves in flight that have a migration id ended (only those that did), and
    /// those that never started.
    async fn follow_moves(&self) -> Vec<(String, Result<MoveCost, String>)> {
        let now = unix_now();
        let flights: Vec<(String, crate::decide::InFlight)> = {
            let g = self.inner.lock();
            g.ctl
                .memory
                .in_flight
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        let mut out = Vec::new();
        for (vm, f) in flights {
            let Some(client) = self.clients.get(&f.mv.from).cloned() else {
                out.push((
                    vm,
                    Err(format!("host {} is no longer configured", f.mv.from)),
                ));
                continue;
            };
            let id = f.ids.get(&vm).cloned();
            let vm2 = vm.clone();
            let started_at = f.started_at;
            // bounded: an agent that does not answer holds up no round (the next asks again)
            let r = tokio::time::timeout(FOLLOW_WITHIN, tokio::task::spawn_blocking(move || -> Option<Result<MoveCost, String>> {
                match id {
                    Some(id) => {
                        let s = match client.migration(&id) {
                            Ok(s) => s,
                            Err(tern_api::client::ClientError::Api { status: 404, .. }) => {
                                return Some(Err(format!(
                                    "the source agent no longer knows migration {id} (it restarted): where the VM runs is read from the agents"
                                )))
                            }
                            Err(_) => return None,
                        };
                        if !s.finished {
                            return None;
                        }
                        Some(match (&s.report, &s.error) {
                            (Some(r), None) => Ok(MoveCost {
                                time_s: r.total_time_ms as f64 / 1000.0,
                                bytes: r.bytes_on_wire,
                                downtime_s: r.downtime_ms as f64 / 1000.0,
                            }),
                            (_, Some(e)) => Err(format!("{}: {}", e.code, e.message)),
                            (None, None) => Err("the migration ended without a report".into()),
                        })
                    }
                    None => {
                        // started in the state, but no id came back: the controller stopped
                        // between the two, or the agent did not answer
                        let ms = client.migrations().ok()?;
                        if let Some(m) = ms.iter().find(|m| m.vm == vm2 && !m.finished) {
                            // adopt it: never start a second one
                            return Some(Err(format!("adopt:{}", m.id)));
                        }
                        if now - started_at < START_GRACE_S {
                            return None;
                        }
                        Some(Err("the move was recorded but its migration never started (the controller stopped in between)".into()))
                    }
                }
            }))
            .await
            .ok()
            .and_then(|r| r.ok())
            .flatten();
            if let Some(r) = r {
                out.push((vm, r));
            }
        }
        out
    }

    fn note_finished(
        &self,
        inner: &mut Inner,
        now: f64,
        vm: &str,
        outcome: Result<MoveCost, String>,
    ) {
        if let Err(e) = &outcome {
            if let Some(id) = e.strip_prefix("adopt:") {
                if let Some(f) = inner.ctl.memory.in_flight.get_mut(vm) {
                    f.ids.insert(vm.into(), id.into());
                }
                self.log(
                    inner,
                    now,
                    format!("{vm}: found its migration {id} under way: following it"),
                );
                let _ = inner.store.save(&inner.ctl.memory);
                return;
            }
        }
        let Some(f) = inner.ctl.memory.in_flight.get(vm).cloned() else {
            return;
        };
        let text = match &outcome {
            Ok(c) => format!(
                "{vm}: moved from {} to {} in {:.1} s, {} MiB on the wire, {:.0} ms down (predicted {:.1} s, {} MiB, {:.0} ms)",
                f.mv.from,
                f.mv.to,
                c.time_s,
                c.bytes >> 20,
                c.downtime_s * 1000.0,
                f.mv.cost.time_s,
                f.mv.cost.bytes >> 20,
                f.mv.cost.downtime_s * 1000.0
            ),
            Err(e) => format!("{vm}: the move from {} to {} failed: {e}", f.mv.from, f.mv.to),
        };
        if outcome.is_ok() {
            inner
                .settling
                .insert(vm.to_string(), (f.mv.from.clone(), now + SETTLE_S));
        }
        inner.ctl.finished(vm, now, outcome);
        self.log(inner, now, text);
        if let Err(e) = inner.store.save(&inner.ctl.memory) {
            self.log(inner, now, format!("cannot save the state: {e}"));
        }
    }

    /// Folds the agents' answers into the cluster view.
    fn observe(
        &self,
        inner: &mut Inner,
        now: f64,
        polls: Vec<(String, Result<HostLoad, PollError>)>,
    ) {
        let keep = inner.ctl.params.window_s.max(60.0) * 2.0;
        let mut reported: BTreeMap<String, (String, bool)> = BTreeMap::new();
        // VM -> the hosts that report it: (host, migrating it away, agent uptime, its load)
        #[allow(clippy::type_complexity)]
        let mut claims: BTreeMap<String, Vec<(String, bool, u64, tern_api::VmLoad)>> =
            BTreeMap::new();
        for (name, r) in polls {
            let seen = inner.seen.entry(name.clone()).or_default();
            match r {
                Ok(load) => {
                    seen.last_ok = Some(now);
                    seen.error = None;
                    seen.load = Some(load);
                }
                Err(PollError { text: e, reached }) => {
                    if reached {
                        seen.last_reached = Some(now);
                    }
                    if seen.error.as_deref() != Some(e.as_str()) {
                        seen.error = Some(e.clone());
                        self.log(inner, now, format!("host {name} did not answer: {e}"));
                    }
                }
            }
        }
        for h in &self.config.hosts {
            let seen = inner.seen.get(&h.name).cloned().unwrap_or_default();
            let alive = seen
                .last_ok
                .is_some_and(|t| now - t <= self.config.dead_after_s);
            let old = inner.ctl.cluster.hosts.get(&h.name).cloned();
            let load = seen.load.as_ref();
            inner.ctl.cluster.set_host(Host {
                name: h.name.clone(),
                labels: load
                    .map(|l| l.labels.clone())
                    .or(old.as_ref().map(|o| o.labels.clone()))
                    .unwrap_or_default(),
                capacity_cores: load
                    .map(|l| l.capacity_cores)
                    .or(old.as_ref().map(|o| o.capacity_cores))
                    .unwrap_or(1.0),
                mem_bytes: load
                    .map(|l| l.mem_total_bytes)
                    .or(old.as_ref().map(|o| o.mem_bytes))
                    .unwrap_or(0),
                alive,
            });
            if !alive || seen.last_ok != Some(now) {
                continue;
            }
            let Some(load) = load else { continue };
            for v in &load.vms {
                if inner
                    .ctl
                    .memory
                    .restarted
                    .get(&v.name)
                    .is_some_and(|r| r.from == h.name)
                {
                    // a fenced copy whose VM restarted elsewhere: it is about to be stopped
                    continue;
                }
                if inner
                    .settling
                    .get(&v.name)
                    .is_some_and(|(from, until)| from == &h.name && now < *until)
                {
                    // a sample from before the VM left this host
                    continue;
                }
                // Where a VM is: a QEMU running or paused (by its owner), or the source
                // of a migration under way. A migration's destination (`inmigrate`) and a
                // source that is done (`postmigrate`, until its agent quits it) are not
                // where the VM is: counting them would put its load on a host it left.
                if !matches!(v.state.as_str(), "running" | "paused" | "migrating") {
                    continue;
                }
                let migrating = v.migrating || v.state == "migrating";
                claims.entry(v.name.clone()).or_default().push((
                    h.name.clone(),
                    migrating,
                    load.uptime_ms,
                    v.clone(),
                ));
            }
        }
        // the same name on several hosts: one runs it (crate::view::owner)
        let mut conflicts = Vec::new();
        for (name, cs) in claims {
            let hosts: Vec<(String, bool)> = cs.iter().map(|c| (c.0.clone(), c.1)).collect();
            let was_on = inner.ctl.cluster.vms.get(&name).map(|v| v.host.clone());
            let (host, conflict) = crate::view::owner(&hosts, was_on.as_deref());
            if let Some(c) = conflict {
                conflicts.push(format!("VM {name}: {c} (a host that reports another's VM is misconfigured or compromised)"));
            }
            let Some((h, migrating, uptime_ms, v)) = cs.into_iter().find(|c| c.0 == host) else {
                continue;
            };
            reported.insert(name.clone(), (h.clone(), migrating));
            let cores = match inner.prev_cpu.get(&name) {
                Some((host, up, cpu)) if host == &h && uptime_ms > *up && v.cpu_seconds >= *cpu => {
                    (v.cpu_seconds - cpu) / ((uptime_ms - up) as f64 / 1000.0)
                }
                _ => v.cpu_cores,
            };
            inner
                .prev_cpu
                .insert(name.clone(), (h.clone(), uptime_ms, v.cpu_seconds));
            inner.ctl.cluster.observe_vm(
                Vm {
                    name,
                    host: h,
                    mem_bytes: v.mem_bytes,
                    tpm: v.tpm,
                    migrating,
                },
                now,
                cores,
                keep,
            );
        }
        // said once while it lasts
        for c in new_notes(&mut inner.said_conflicts, conflicts) {
            self.log(inner, now, c);
        }
        // VMs an agent that answered did not report are gone (stopped); those of hosts
        // that did not answer this round stay as last seen
        let answered: BTreeSet<String> = inner
            .seen
            .iter()
            .filter(|(_, s)| s.last_ok == Some(now))
            .map(|(h, _)| h.clone())
            .collect();
        inner.ctl.cluster.retain_vms(|v| {
            reported.contains_key(&v.name)
                || !answered.contains(&v.host)
                || inner_settling(&inner.settling, &v.name, now)
        });
        inner.settling.retain(|_, (_, until)| now < *until);
        inner.prev_cpu.retain(|n, _| reported.contains_key(n));
        sync_placed(inner);
    }

    /// Reports a round's decisions and records its moves as started (none in a dry run),
    /// saving the state first: the moves to start, or None when the state could not be
    /// saved (nothing must run that a standby cannot see).
    fn commit(&self, inner: &mut Inner, now: f64, d: Decisions) -> Option<Vec<Move>> {
        self.report(inner, now, &d);
        let moves = if self.config.dry_run {
            Vec::new()
        } else {
            d.moves.clone()
        };
        inner.last = d;
        for m in &moves {
            inner.ctl.started(m, now);
        }
        if !moves.is_empty() {
            if let Err(e) = inner.store.save(&inner.ctl.memory) {
                for m in &moves {
                    for v in &m.vms {
                        inner.ctl.memory.in_flight.remove(v);
                    }
                }
                self.log(
                    inner,
                    now,
                    format!("moves not started: cannot save the state: {e}"),
                );
                return None;
            }
        }
        Some(moves)
    }

    /// The request that moves a VM to `host`; the plan of a move is asked with the same
    /// request (the agent plans what that very request would do).
    fn migrate_request(&self, host: &str) -> Option<MigrateRequest> {
        Some(MigrateRequest {
            to: self.config.host(host)?.peer.clone(),
            ..Default::default()
        })
    }

    /// Records the model's plans that came in since the last round, and logs them (or why
    /// there is none); returns the moves they were asked for, as decided then.
    fn take_plans(&self, inner: &mut Inner, now: f64) -> Vec<Move> {
        let mut pl = self.planning.lock();
        let answers = std::mem::take(&mut pl.answers);
        let p = inner.ctl.params.clone();
        let mut moves: Vec<Move> = Vec::new();
        for a in answers {
            let key = (a.vm.clone(), a.from.clone(), a.to.clone());
            if let Some((_, mv)) = pl.asked.remove(&key) {
                if !moves.contains(&mv) {
                    moves.push(mv);
                }
            }
            let (vm, from, to) = (&a.vm, &a.from, &a.to);
            let text = match a.plan.map(|plan| (cost_of_plan(&plan), plan)) {
                Ok((Some(cost), plan)) => {
                    inner.ctl.planned(vm, from, to, a.at, cost);
                    format!(
                        "{vm}: the model's plan of the move from {from} to {to}: {:.0} core-s ({:.1} s, {} MiB, {:.0} ms down); {}",
                        cost.weighted(&p),
                        cost.time_s,
                        cost.bytes >> 20,
                        cost.downtime_s * 1000.0,
                        plan.prediction.map(|x| x.summary).unwrap_or_default()
                    )
                }
                Ok((None, plan)) => {
                    pl.failed.insert(key, a.at);
                    format!(
                        "{vm}: the model predicts nothing for the move from {from} to {to} ({}): it goes on history's estimate",
                        plan.notes.join("; ")
                    )
                }
                Err(e) => {
                    pl.failed.insert(key, a.at);
                    format!(
                        "{vm}: no plan from the model for the move from {from} to {to} ({e}): it goes on history's estimate"
                    )
                }
            };
            self.log(inner, now, text);
        }
        moves
    }

    /// This round's decisions with the model's plans weighed ([`Controller::after_plans`]):
    /// a move costed without a fresh plan waits, and its plan is asked of the source agent
    /// in the background. The round never waits for a model (its polls are the agents'
    /// word for their fences); the next round after the answer decides with it. A dry run
    /// asks too: a plan moves nothing, and what the dry run says it would do is then what
    /// the real run would act on.
    fn weigh_plans(
        &self,
        inner: &mut Inner,
        now: f64,
        d: Decisions,
        answered: &[Move],
    ) -> Decisions {
        let mut pl = self.planning.lock();
        let max_age_s = inner.ctl.params.plan_max_age_s;
        pl.failed.retain(|_, at| now - *at <= max_age_s);
        // no answer long after the plan's timeout (its task died): given up
        let lost: Vec<PlanKey> = pl
            .asked
            .iter()
            .filter(|(_, (at, _))| now - at > 2.0 * PLAN_WITHIN.as_secs_f64())
            .map(|(k, _)| k.clone())
            .collect();
        for k in lost {
            pl.asked.remove(&k);
            pl.failed.insert(k, now);
        }
        let state = |vm: &str, m: &Move| {
            let k = (vm.to_string(), m.from.clone(), m.to.clone());
            if pl.asked.contains_key(&k) {
                PlanState::Asked
            } else if pl.failed.contains_key(&k) {
                PlanState::Failed
            } else {
                PlanState::NotAsked
            }
        };
        let (d, ask) = inner.ctl.after_plans(d, answered, now, &state);
        for (mv, vms) in ask {
            let key = |v: &str| (v.to_string(), mv.from.clone(), mv.to.clone());
            let (Some(client), Some(req)) = (
                self.clients.get(&mv.from).cloned(),
                self.migrate_request(&mv.to),
            ) else {
                // no agent to ask: the move goes on history's estimate (and `start` says why
                // it cannot start)
                for v in &vms {
                    pl.failed.insert(key(v), now);
                }
                continue;
            };
            for v in &vms {
                pl.asked.insert(key(v), (now, mv.clone()));
            }
            let planning = self.planning.clone();
            let (from, to) = (mv.from.clone(), mv.to.clone());
            // a group's VMs one after the other: their link is probed by one at a time
            tokio::task::spawn_blocking(move || {
                for vm in vms {
                    let plan = plan_of(&client, &vm, &req);
                    planning.lock().answers.push(PlanAnswer {
                        vm,
                        from: from.clone(),
                        to: to.clone(),
                        at: unix_now(),
                        plan,
                    });
                }
            });
        }
        d
    }

    /// Starts one move's migrations at its source agent.
    async fn start(&self, mv: Move) {
        let Some(client) = self.clients.get(&mv.from).cloned() else {
            return;
        };
        let Some(req) = self.migrate_request(&mv.to) else {
            return;
        };
        for vm in &mv.vms {
            let client = client.clone();
            let req = req.clone();
            let name = vm.clone();
            let r = tokio::task::spawn_blocking(move || {
                client.migrate(&name, &req).map_err(|e| error_text(&e))
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            let now = unix_now();
            let mut g = self.inner.lock();
            let inner = &mut *g;
            match r {
                Ok(started) => {
                    if let Some(f) = inner.ctl.memory.in_flight.get_mut(vm) {
                        f.ids.insert(vm.clone(), started.id.clone());
                    }
                    let text = format!(
                        "{vm}: moving from {} to {} (migration {}): {}",
                        mv.from,
                        mv.to,
                        started.id,
                        mv.numbers()
                    );
                    self.log(inner, now, text);
                    if let Err(e) = inner.store.save(&inner.ctl.memory) {
                        self.log(inner, now, format!("cannot save the state: {e}"));
                    }
                }
                Err(e) => {
                    inner.ctl.finished(vm, now, Err(e.clone()));
                    self.log(
                        inner,
                        now,
                        format!(
                            "{vm}: the source agent {} refused the move to {}: {e}",
                            mv.from, mv.to
                        ),
                    );
                    let _ = inner.store.save(&inner.ctl.memory);
                }
            }
        }
    }

    /// Logs this round's moves and the notes that are new since the last round.
    fn report(&self, inner: &mut Inner, now: f64, d: &Decisions) {
        for n in new_notes(&mut inner.said, d.notes.iter().map(|n| n.text.clone())) {
            self.log(inner, now, n);
        }
        if self.config.dry_run {
            for m in &d.moves {
                let text = format!(
                    "dry run: would move {} from {} to {}: {}",
                    m.vms.join("+"),
                    m.from,
                    m.to,
                    m.numbers()
                );
                self.log(inner, now, text);
            }
        }
    }

    fn log(&self, inner: &mut Inner, now: f64, text: String) {
        tracing::info!(target: "tern_controller", "{text}");
        inner.log.push_back(LogLine { at: now, text });
        while inner.log.len() > LOG_LINES {
            inner.log.pop_front();
        }
    }

    /// What `tern cluster status` shows.
    pub fn status(&self) -> ClusterStatus {
        let now = unix_now();
        let g = self.inner.lock();
        let c = &g.ctl.cluster;
        let p = &g.ctl.params;
        let loads = c.host_loads(now, p.window_s.max(1e-9));
        let hosts = self
            .config
            .hosts
            .iter()
            .map(|h| {
                let v = c.hosts.get(&h.name);
                let seen = g.seen.get(&h.name);
                let load = loads.get(&h.name).copied().unwrap_or(0.0);
                let cap = v.map_or(0.0, |v| v.capacity_cores);
                HostStatus {
                    name: h.name.clone(),
                    alive: v.is_some_and(|v| v.alive),
                    drained: g.ctl.memory.drained.contains(&h.name),
                    labels: v.map(|v| v.labels.clone()).unwrap_or_default(),
                    capacity_cores: cap,
                    load_cores: load,
                    utilisation: if cap > 0.0 { load / cap } else { 0.0 },
                    vms: c.vms.values().filter(|x| x.host == h.name).count(),
                    hot_for_s: g.ctl.hot_since.get(&h.name).map(|t| now - t),
                    error: seen.and_then(|s| s.error.clone()),
                    answered_at: seen.and_then(|s| s.last_ok),
                }
            })
            .collect();
        let vms = c
            .vms
            .values()
            .map(|v| VmStatus {
                name: v.name.clone(),
                host: v.host.clone(),
                load_cores: c.vm_load(&v.name, now, p.window_s.max(1e-9)),
                mem_bytes: v.mem_bytes,
                moving: g.ctl.memory.in_flight.get(&v.name).map(|f| f.mv.to.clone()),
                last_move: g.ctl.memory.last_move.get(&v.name).cloned(),
            })
            .collect();
        ClusterStatus {
            leading: g.leading,
            store: g.store.describe(),
            dry_run: self.config.dry_run,
            hosts,
            vms,
            in_flight: g
                .ctl
                .memory
                .in_flight
                .values()
                .map(|f| f.mv.clone())
                .collect(),
            restarted: g.ctl.memory.restarted.clone(),
            last: g.last.clone(),
            log: g.log.iter().cloned().collect(),
            params: p.clone(),
        }
    }

    /// What the controller would do now, and why (moves nothing).
    pub fn plan(&self) -> Decisions {
        let mut ctl = self.inner.lock().ctl.clone();
        ctl.decide(unix_now(), &|v, h| self.may_run(v, h))
    }

    /// Drains or undrains a host; refuses unknown hosts and draining the last host VMs
    /// could go to.
    pub fn set_drained(&self, host: &str, drained: bool) -> Result<(), (u16, String)> {
        if self.config.host(host).is_none() {
            let known: Vec<&str> = self.config.hosts.iter().map(|h| h.name.as_str()).collect();
            return Err((
                404,
                format!("unknown host {host:?}: the controller manages {known:?}"),
            ));
        }
        let now = unix_now();
        let mut g = self.inner.lock();
        let inner = &mut *g;
        if !inner.leading {
            return Err((
                503,
                "this controller does not lead now (a standby, or not started): ask the leader"
                    .into(),
            ));
        }
        if drained {
            if inner.ctl.memory.drained.contains(host) {
                return Ok(());
            }
            let others = inner
                .ctl
                .cluster
                .hosts
                .values()
                .filter(|h| {
                    h.name != host && h.alive && !inner.ctl.memory.drained.contains(&h.name)
                })
                .count();
            if others == 0 {
                return Err((409, format!("cannot drain {host}: no other host is up and undrained, so its VMs would have nowhere to go")));
            }
            inner.ctl.memory.drained.insert(host.into());
        } else if !inner.ctl.memory.drained.remove(host) {
            return Ok(());
        }
        if let Err(e) = inner.store.save(&inner.ctl.memory) {
            if drained {
                inner.ctl.memory.drained.remove(host);
            } else {
                inner.ctl.memory.drained.insert(host.into());
            }
            return Err((500, format!("cannot save the state: {e}")));
        }
        let text = if drained {
            format!("host {host} drained: its VMs leave")
        } else {
            format!("host {host} undrained: it takes VMs again")
        };
        self.log(inner, now, text);
        Ok(())
    }
}

/// This round's notes that the last round did not say (in their order, once each);
/// `said` becomes this round's.
fn new_notes(said: &mut BTreeSet<String>, notes: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut fresh = Vec::new();
    let mut seen = BTreeSet::new();
    for n in notes {
        if !said.contains(&n) && !seen.contains(&n) {
            fresh.push(n.clone());
        }
        seen.insert(n);
    }
    *said = seen;
    fresh
}

/// Copies where the VMs run and the hosts' fences into the state's memory (marks it to be
/// saved when that changes).
fn sync_placed(inner: &mut Inner) {
    let placed: BTreeMap<String, crate::failover::Placed> = inner
        .ctl
        .cluster
        .vms
        .values()
        .map(|v| {
            (
                v.name.clone(),
                crate::failover::Placed {
                    host: v.host.clone(),
                    mem_bytes: v.mem_bytes,
                    tpm: v.tpm,
                },
            )
        })
        .collect();
    let mut fences = inner.ctl.memory.fences.clone();
    for (h, seen) in &inner.seen {
        if let Some(load) = &seen.load {
            match load.fence_after_s {
                Some(f) => fences.insert(h.clone(), f),
                None => fences.remove(h),
            };
        }
    }
    let m = &mut inner.ctl.memory;
    if m.placed != placed || m.fences != fences {
        m.placed = placed;
        m.fences = fences;
        inner.placed_dirty = true;
    }
}

/// A controller that starts to lead: the hosts it has not heard from yet count as last
/// heard now (their silence is timed from here), and the VMs the state places on them are
/// in its view (so they restart if those hosts turn out dead).
fn take_over(inner: &mut Inner, config: &ControllerConfig, now: f64) {
    for h in &config.hosts {
        let seen = inner.seen.entry(h.name.clone()).or_default();
        if seen.last_ok == Some(now) {
            continue; // it answered this round: what it said stands
        }
        // (also when this controller led before: another led since, so what it
        // remembers of the silence is stale)
        seen.last_ok = Some(now);
        for (vm, p) in &inner.ctl.memory.placed {
            if p.host == h.name && !inner.ctl.cluster.vms.contains_key(vm) {
                inner.ctl.cluster.vms.insert(
                    vm.clone(),
                    Vm {
                        name: vm.clone(),
                        host: p.host.clone(),
                        mem_bytes: p.mem_bytes,
                        tpm: p.tpm,
                        migrating: false,
                    },
                );
            }
        }
    }
    sync_placed(inner);
}

/// Whether `vm` just moved (its new host's sample may not list it yet).
fn inner_settling(settling: &BTreeMap<String, (String, f64)>, vm: &str, now: f64) -> bool {
    settling.get(vm).is_some_and(|(_, until)| now < *until)
}

/// The strings of a JSON array (none if it is not one).
fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn error_text(e: &tern_api::client::ClientError) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inner(dir: &std::path::Path) -> Inner {
        Inner::new(
            Controller::default(),
            Box::new(crate::state::FileStore::open(dir).unwrap()),
        )
    }

    #[test]
    fn a_note_is_logged_when_it_first_appears_and_again_only_after_it_went_away() {
        let mut said = BTreeSet::new();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(new_notes(&mut said, s(&["a", "b", "a"])), s(&["a", "b"]));
        assert_eq!(new_notes(&mut said, s(&["b", "c"])), s(&["c"]));
        // a went away last round: said again
        assert_eq!(new_notes(&mut said, s(&["a", "b"])), s(&["a"]));
        assert!(new_notes(&mut said, Vec::new()).is_empty() && said.is_empty());
    }

    #[test]
    fn a_new_leader_knows_the_vms_of_hosts_it_never_heard_and_times_their_silence_from_now() {
        let dir = tempfile::tempdir().unwrap();
        let config = ControllerConfig::parse(
            r#"
            state_dir = "/tmp/s"
            api = "/tmp/c.sock"
            tls_dir = "/tmp/tls"
            [[host]]
            name = "a"
            control = "127.0.0.1:7790"
            peer = "127.0.0.1:7788"
            [[host]]
            name = "b"
            control = "127.0.0.1:7791"
            peer = "127.0.0.1:7789"
            "#,
        )
        .unwrap();
        let mut i = inner(dir.path());
        // the state a previous leader saved: v on a (which has since died), w on b
        for (vm, host) in [("v", "a"), ("w", "b")] {
            i.ctl.memory.placed.insert(
                vm.into(),
                crate::failover::Placed {
                    host: host.into(),
                    mem_bytes: 1 << 30,
                    tpm: false,
                },
            );
        }
        i.ctl.memory.fences.insert("a".into(), 4.0);
        // this round only b answered, without w (stopped while no one led)
        let now = 1000.0;
        i.seen.insert(
            "b".into(),
            Seen {
                last_ok: Some(now),
                ..Seen::default()
            },
        );
        take_over(&mut i, &config, now);
        assert_eq!(i.seen["a"].last_ok, Some(now), "a's silence starts now");
        assert_eq!(i.ctl.cluster.vms["v"].host, "a");
        assert!(
            !i.ctl.cluster.vms.contains_key("w"),
            "b answered: w is gone"
        );
        // what the view holds is what the state keeps; a's fence is remembered
        assert_eq!(i.ctl.memory.placed.keys().collect::<Vec<_>>(), vec!["v"]);
        assert_eq!(i.ctl.memory.fences.get("a"), Some(&4.0));
        assert!(i.placed_dirty);
    }
}
