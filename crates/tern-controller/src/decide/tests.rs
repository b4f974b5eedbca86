use super::*;

const GIB: u64 = 1 << 30;

fn host(n: &str, cores: f64) -> Host {
    Host {
        name: n.into(),
        labels: if n == "t" {
            vec!["trusted".into()]
        } else {
            vec![]
        },
        capacity_cores: cores,
        mem_bytes: 64 * GIB,
        alive: true,
    }
}

fn vm(n: &str, h: &str, mem_gib: u64) -> Vm {
    Vm {
        name: n.into(),
        host: h.into(),
        mem_bytes: mem_gib * GIB,
        tpm: n.starts_with("tpm"),
        migrating: false,
    }
}

/// A controller over hosts of 4 cores and VMs with a steady load, sampled for `secs`.
fn cluster(p: Params, hosts: &[&str], vms: &[(&str, &str, u64, f64)], secs: u32) -> Controller {
    let mut c = Controller::new(p, Rules::default());
    for h in hosts {
        c.cluster.set_host(host(h, 4.0));
    }
    for t in 0..=secs {
        for &(n, h, mem, load) in vms {
            c.cluster
                .observe_vm(vm(n, h, mem), t as f64, load, c.params.window_s);
        }
        // the controller decides every second (what it chooses is not started here): it
        // learns since when each host is hot
        if t < secs {
            c.decide(t as f64, &allow_all);
        }
    }
    c
}

/// Samples every second from `from` to `to` (the VMs' loads given), deciding each second.
fn run(c: &mut Controller, from: u32, to: u32, vms: &[(&str, &str, f64)]) {
    for t in from..to {
        for &(n, h, load) in vms {
            let mem = c.cluster.vms.get(n).map_or(GIB, |v| v.mem_bytes);
            let mut v = vm(n, h, 1);
            v.mem_bytes = mem;
            c.cluster.observe_vm(v, t as f64, load, c.params.window_s);
        }
        c.decide(t as f64, &allow_all);
    }
}

fn allow_all(_: &Vm, _: &Host) -> Result<(), String> {
    Ok(())
}

fn builtin(v: &Vm, h: &Host) -> Result<(), String> {
    tern_agent::policy::Policy::default()
        .check(
            &tern_agent::policy::VmFacts {
                name: &v.name,
                tpm: v.tpm,
            },
            &h.name,
            &h.labels,
        )
        .map_err(|e| e.to_string())
}

fn fast() -> Params {
    Params {
        window_s: 20.0,
        hot_for_s: 10.0,
        ..Params::default()
    }
}

/// Runs rounds until nothing moves; every move finishes at once, costing what was predicted.
fn settle(c: &mut Controller, mut now: f64, may_run: MayRun<'_>) -> Vec<Move> {
    let mut all = Vec::new();
    for _ in 0..20 {
        let d = c.decide(now, may_run);
        if d.moves.is_empty() {
            return all;
        }
        for m in d.moves {
            c.started(&m, now);
            for v in &m.vms {
                c.finished(v, now, Ok(m.cost));
            }
            all.push(m);
        }
        now += 1.0;
    }
    panic!("did not settle: {all:?}");
}

#[test]
fn a_hot_host_sheds_the_vm_that_pays_most_to_the_coolest_host_and_stops_once_balanced() {
    // a: 4.0 of 4 cores (100%); b: 1.0; c: 2.0
    let mut c = cluster(
        fast(),
        &["a", "b", "c"],
        &[
            ("big-mem", "a", 32, 1.5), // relieves as much as "small" but costs far more
            ("small", "a", 1, 1.5),
            ("tiny", "a", 1, 1.0),
            ("b1", "b", 1, 1.0),
            ("c1", "c", 1, 2.0),
        ],
        30,
    );
    let d = c.decide(30.0, &allow_all);
    assert_eq!(d.moves.len(), 1, "{d:#?}");
    let m = &d.moves[0];
    assert_eq!(
        (m.vms.as_slice(), m.from.as_str(), m.to.as_str()),
        (&["small".to_string()][..], "a", "b")
    );
    assert_eq!(m.reason, Reason::Balance);
    assert!(m.benefit >= 2.0 * m.cost_weighted, "{m:?}");
    assert!((m.from_util.0 - 1.0).abs() < 1e-9 && (m.from_util.1 - 0.625).abs() < 1e-9);
    assert!((m.to_util.1 - 0.625).abs() < 1e-9);
    c.started(m, 30.0);
    c.finished("small", 31.0, Ok(m.cost));
    // a is now at 62.5%: balanced, nothing more moves
    let rest = settle(&mut c, 32.0, &allow_all);
    assert!(rest.is_empty(), "{rest:?}");
    assert_eq!(c.cluster.vms["small"].host, "b");
}

#[test]
fn a_spike_shorter_than_hot_for_moves_nothing_and_says_so() {
    let mut c = cluster(
        fast(),
        &["a", "b"],
        &[("x", "a", 1, 1.2), ("y", "a", 1, 1.2)],
        30,
    );
    // a burst: both VMs at 3 cores for the last 6 s
    run(&mut c, 30, 36, &[("x", "a", 3.0), ("y", "a", 3.0)]);
    let d = c.decide(36.0, &allow_all);
    assert!(d.moves.is_empty(), "{d:#?}");
    // the window's mean is about (15 x 1.2 + 6 x 3) / 21 per VM: 86% of the host
    let n = d
        .notes
        .iter()
        .find(|n| n.subject == "a")
        .expect("a note on a");
    assert!(n.text.contains("acts after 10 s"), "{}", n.text);

    // the baseline moves at once on the same samples
    let mut b = c.clone();
    b.params = Params::threshold_only();
    let d = b.decide(36.0, &allow_all);
    assert_eq!(d.moves.len(), 1, "{d:#?}");
}

#[test]
fn a_move_that_costs_more_than_it_relieves_is_not_made_and_the_numbers_are_logged() {
    // a at 85%: 0.2 cores of excess; the VMs to move have 60 GiB of memory each
    let mut c = cluster(
        fast(),
        &["a", "b"],
        &[("huge", "a", 60, 1.7), ("huge-2", "a", 60, 1.7)],
        30,
    );
    c.cluster.hosts.get_mut("b").unwrap().mem_bytes = 128 * GIB;
    let d = c.decide(30.0, &allow_all);
    assert!(d.moves.is_empty(), "{d:#?}");
    let n = d.notes.iter().find(|n| n.subject == "a").unwrap();
    assert!(
        n.text.contains("no move pays") && n.text.contains("huge to b"),
        "{}",
        n.text
    );
}

#[test]
fn a_moved_vm_is_not_moved_back_within_the_cooldown_unless_its_host_is_over_the_hard_limit() {
    let mut c = cluster(
        fast(),
        &["a", "b"],
        &[("x", "a", 1, 2.0), ("y", "a", 1, 1.6)],
        30,
    );
    let moved = settle(&mut c, 30.0, &allow_all);
    assert_eq!(moved.len(), 1);
    let gone = moved[0].vms[0].clone();
    let stayed = if gone == "x" { "y" } else { "x" };
    // the load turns: the moved VM's new host gets hot (its VM busier), the old one idle
    run(&mut c, 40, 80, &[(&gone, "b", 3.5), (stayed, "a", 0.2)]);
    let d = c.decide(80.0, &allow_all);
    assert!(d.moves.is_empty(), "{d:#?}");
    assert!(
        d.notes
            .iter()
            .any(|n| n.subject == gone && n.text.contains("cooldown")),
        "{:#?}",
        d.notes
    );
    // over the hard limit (a second VM arrives on b), the cooldown yields
    run(
        &mut c,
        81,
        110,
        &[(&gone, "b", 3.5), ("z", "b", 1.0), (stayed, "a", 0.2)],
    );
    let d = c.decide(110.0, &allow_all);
    assert_eq!(d.moves.len(), 1, "{d:#?}");
    assert_eq!(d.moves[0].from, "b");
}

#[test]
fn a_drain_moves_every_vm_only_where_the_policy_allows_and_reports_what_cannot_go() {
    let mut c = cluster(
        fast(),
        &["a", "b", "t"],
        &[
            ("tpm-1", "a", 1, 0.5),
            ("plain", "a", 1, 0.5),
            ("b1", "b", 1, 0.1),
        ],
        30,
    );
    c.memory.drained.insert("a".into());
    let moved = settle(&mut c, 30.0, &builtin);
    assert_eq!(moved.len(), 2, "{moved:#?}");
    for m in &moved {
        assert_eq!(m.reason, Reason::Drain);
        if m.vms[0] == "tpm-1" {
            assert_eq!(m.to, "t", "a vTPM VM only to a trusted host");
        }
    }
    assert!(c.cluster.vms.values().all(|v| v.host != "a"));

    // the trusted host drained too: a vTPM VM there can go nowhere
    c.memory.drained.insert("t".into());
    let d = c.decide(60.0, &builtin);
    let stuck = d
        .notes
        .iter()
        .find(|n| n.subject == "tpm-1")
        .expect("tpm-1 reported");
    assert!(stuck.text.contains("no host may take"), "{}", stuck.text);
    assert!(d
        .moves
        .iter()
        .all(|m| !m.vms.contains(&"tpm-1".to_string())));
    assert!(d
        .notes
        .iter()
        .any(|n| n.text.contains("drained host a runs no VM")));
}

#[test]
fn a_together_group_moves_as_one_and_apart_vms_never_share_a_host() {
    let mut c = cluster(
        fast(),
        &["a", "b", "c"],
        &[
            ("web", "a", 1, 1.2),
            ("cache", "a", 1, 1.2),
            ("db-1", "a", 1, 1.0),
            ("db-2", "b", 1, 0.1),
        ],
        30,
    );
    c.rules = Rules::parse(
        "[[together]]\nvms = [\"web\", \"cache\"]\n[[apart]]\nvms = [\"db-1\", \"db-2\"]\n",
    )
    .unwrap();
    c.memory.drained.insert("a".into());
    let moved = settle(&mut c, 30.0, &allow_all);
    let web = moved
        .iter()
        .find(|m| m.vms.contains(&"web".to_string()))
        .unwrap();
    assert_eq!(web.vms, vec!["web", "cache"]);
    let db = moved.iter().find(|m| m.vms == vec!["db-1"]).unwrap();
    assert_ne!(db.to, "b", "db-1 must stay apart from db-2");
}

#[test]
fn moves_respect_the_concurrency_limits() {
    let mut c = cluster(
        fast(),
        &["a", "b", "c"],
        &[("x", "a", 1, 0.1), ("y", "a", 1, 0.1), ("z", "a", 1, 0.1)],
        30,
    );
    c.memory.drained.insert("a".into());
    let d = c.decide(30.0, &allow_all);
    assert_eq!(d.moves.len(), 1, "one move out of a at once: {d:#?}");
    assert!(
        d.notes.iter().any(|n| n.text.contains("limit 1")),
        "{:#?}",
        d.notes
    );
    c.params.per_host = 2;
    let d = c.decide(30.0, &allow_all);
    assert_eq!(d.moves.len(), 2);
    assert_ne!(d.moves[0].to, d.moves[1].to, "one move per link");
}

#[test]
fn an_unreachable_host_takes_nothing_and_its_vms_stay_put() {
    let mut c = cluster(
        fast(),
        &["a", "b", "c"],
        &[("x", "a", 1, 1.9), ("x2", "a", 1, 1.9), ("y", "b", 1, 0.1)],
        30,
    );
    c.cluster.hosts.get_mut("b").unwrap().alive = false;
    c.memory.drained.insert("b".into());
    let d = c.decide(30.0, &allow_all);
    assert_eq!(d.moves.len(), 1, "{d:#?}");
    assert_eq!(d.moves[0].to, "c");
    assert!(
        d.moves.iter().all(|m| m.from != "b"),
        "a drained but unreachable host's VMs stay"
    );
    assert!(d
        .notes
        .iter()
        .any(|n| n.subject == "b" && n.text.contains("unreachable")));
}

#[test]
fn costs_are_learnt_from_finished_moves() {
    let mut c = cluster(fast(), &["a", "b"], &[("x", "a", 4, 3.8)], 30);
    let v = c.cluster.vms["x"].clone();
    let (guess, src) = c.memory.costs.estimate(&v, "a", "b", 30.0, 600.0);
    assert_eq!(src, CostSource::Default);
    assert_eq!(guess.bytes, 4 * GIB);
    c.memory.costs.learn(
        &v,
        "a",
        "b",
        MoveCost {
            time_s: 2.0,
            bytes: GIB,
            downtime_s: 0.05,
        },
    );
    let (est, src) = c.memory.costs.estimate(&v, "b", "a", 30.0, 600.0);
    assert_eq!(src, CostSource::History);
    // a link never crossed: the rate of those that were
    let (other, _) = c.memory.costs.estimate(&v, "a", "z", 30.0, 600.0);
    assert!((other.time_s - 2.0).abs() < 1e-9, "{other:?}");
    assert_eq!(est.bytes, GIB);
    assert!((est.time_s - 2.0).abs() < 1e-9);
    assert_eq!(est.downtime_s, 0.05);
    c.started(
        &Move {
            vms: vec!["x".into()],
            from: "a".into(),
            to: "b".into(),
            reason: Reason::Balance,
            benefit: 1.0,
            cost: est,
            cost_weighted: 1.0,
            cost_source: src,
            from_util: (1.0, 0.0),
            to_util: (0.0, 1.0),
        },
        30.0,
    );
    c.finished("x", 31.0, Err("destination refused".into()));
    let d = c.decide(32.0, &allow_all);
    assert!(d.moves.is_empty());
    assert!(d
        .notes
        .iter()
        .any(|n| n.subject == "x" && n.text.contains("destination refused")));
}

#[test]
fn params_that_make_no_sense_are_refused() {
    assert!(Params::default().check().is_ok());
    assert!(Params::threshold_only().check().is_ok());
    let bad = Params {
        target: 0.9,
        ..Params::default()
    };
    assert!(bad.check().unwrap_err().contains("target"));
    let bad = Params {
        window_s: f64::NAN,
        ..Params::default()
    };
    assert!(bad.check().unwrap_err().contains("window_s"));
}

#[test]
fn the_baseline_moves_the_biggest_vm_to_the_coolest_host() {
    let mut c = cluster(
        Params::threshold_only(),
        &["a", "b", "c", "d"],
        &[
            ("small", "a", 1, 0.8),
            ("big", "a", 1, 1.4),
            ("mid", "a", 1, 1.2),
            ("b1", "b", 1, 1.0),
            ("d1", "d", 1, 0.4),
        ],
        2,
    );
    let d = c.decide(2.0, &allow_all);
    assert_eq!(d.moves.len(), 1, "{d:#?}");
    assert_eq!(d.moves[0].vms, vec!["big"]);
    assert_eq!(
        d.moves[0].to, "c",
        "the coolest host, not the last in name order"
    );
}

/// a at 90% (x 2.0 + y 1.6 of 4 cores), b empty: moving either relieves 240 core-s, and
/// without a plan both cost the same (the defaults), so x (first by name) goes.
fn hot_a_with_two_equal_vms() -> Controller {
    cluster(
        fast(),
        &["a", "b"],
        &[("x", "a", 1, 2.0), ("y", "a", 1, 1.6)],
        30,
    )
}

fn cost(time_s: f64, bytes: u64, downtime_s: f64) -> MoveCost {
    MoveCost {
        time_s,
        bytes,
        downtime_s,
    }
}

#[test]
fn a_fresh_plan_of_the_model_is_the_cost_and_an_old_one_or_another_links_is_not() {
    let mut c = hot_a_with_two_equal_vms();
    let x = c.cluster.vms["x"].clone();
    let planned = cost(2.5, GIB / 2, 0.02);
    c.planned("x", "a", "b", 30.0, planned);
    let age = c.params.plan_max_age_s;
    let costs = &c.memory.costs;
    assert_eq!(
        costs.estimate(&x, "a", "b", 30.0 + age, age),
        (planned, CostSource::Model),
        "a plan as old as plan_max_age_s still counts"
    );
    let (old, src) = costs.estimate(&x, "a", "b", 31.0 + age, age);
    assert_eq!(src, CostSource::Default, "an old plan is not the cost");
    assert_eq!(old.bytes, GIB);
    for (from, to) in [("b", "a"), ("a", "c"), ("c", "b")] {
        let (_, src) = costs.estimate(&x, from, to, 30.0, age);
        assert_eq!(
            src,
            CostSource::Default,
            "a plan of a>b is not {from}>{to}'s"
        );
    }
    let (_, src) = costs.estimate(&c.cluster.vms["y"], "a", "b", 30.0, age);
    assert_eq!(src, CostSource::Default, "a plan is one VM's");
    let (_, src) = costs.estimate(&x, "a", "b", 30.0, 0.0);
    assert_eq!(src, CostSource::Default, "plan_max_age_s 0 turns plans off");

    // the service asks for what has no fresh plan
    let d = c.decide(30.0, &allow_all);
    assert_eq!(d.moves.len(), 1, "{d:#?}");
    assert_eq!(d.moves[0].cost_source, CostSource::Model);
    assert!(d.moves[0]
        .numbers()
        .contains("Model: 2.5 s, 512 MiB, 20 ms down"));
    assert!(c.unplanned(&d.moves[0], 30.0).is_empty());
    assert_eq!(c.unplanned(&d.moves[0], 31.0 + age), vec!["x".to_string()]);

    // planned moves are forgotten once old, and a VM's once it moved
    c.planned("y", "a", "b", 32.0 + age, cost(1.0, GIB, 0.1));
    assert!(
        !c.memory.costs.plans.contains_key("x"),
        "{:?}",
        c.memory.costs.plans
    );
    let y = c.cluster.vms["y"].clone();
    c.memory.costs.learn(&y, "a", "b", cost(1.0, GIB, 0.1));
    assert!(c.memory.costs.plans.is_empty());
}

fn not_asked(_: &str, _: &Move) -> PlanState {
    PlanState::NotAsked
}

#[test]
fn a_move_without_a_fresh_plan_waits_for_one_and_a_plan_that_makes_it_dear_drops_it() {
    let mut c = hot_a_with_two_equal_vms();
    // round 1: x would go on the defaults; it waits, and its plan is asked for
    let d = c.decide(30.0, &allow_all);
    assert_eq!(d.moves.len(), 1, "{d:#?}");
    let x_move = d.moves[0].clone();
    assert_eq!(x_move.vms, vec!["x"]);
    assert_eq!(x_move.cost_source, CostSource::Default);
    let (d, ask) = c.after_plans(d, &[], 30.0, &not_asked);
    assert!(d.moves.is_empty(), "{d:#?}");
    assert_eq!(ask, vec![(x_move.clone(), vec!["x".to_string()])]);
    let waits = d.notes.iter().find(|n| n.subject == "x").unwrap();
    assert_eq!(
        waits.text,
        "x: the move from a to b waits for the model's plan (the default estimate says 32 core-s)"
    );
    // round 2: asked, no answer yet: it still waits, and is not asked again
    let d = c.decide(31.0, &allow_all);
    let (d, ask) = c.after_plans(d, &[], 31.0, &|_, _| PlanState::Asked);
    assert!(d.moves.is_empty() && ask.is_empty(), "{d:#?} {ask:?}");

    // round 3: the model says 10 s of downtime (625 core-s for 240 of relief): x does not
    // go; y pays most now, and waits for its own plan
    c.planned("x", "a", "b", 31.5, cost(20.0, GIB, 10.0));
    let d = c.decide(32.0, &allow_all);
    assert_eq!(d.moves.len(), 1, "{d:#?}");
    assert_eq!(d.moves[0].vms, vec!["y"], "y now pays most");
    let (d, ask) = c.after_plans(d, std::slice::from_ref(&x_move), 32.0, &not_asked);
    assert!(d.moves.is_empty(), "{d:#?}");
    assert_eq!(ask.len(), 1);
    assert_eq!(ask[0].1, vec!["y".to_string()]);
    let dropped = d.notes.iter().find(|n| n.subject == "x").unwrap();
    assert_eq!(
        dropped.text,
        "x: not moved from a to b: the model says 625 core-s (20.0 s, 1024 MiB, 10000 ms down), the default estimate said 32 core-s: not worth it (relieves 240 core-s, needs 2.0x)"
    );

    // round 4: y's plan is cheap: it goes, on the model's numbers
    c.planned("y", "a", "b", 32.5, cost(3.0, GIB / 4, 0.05));
    let d = c.decide(33.0, &allow_all);
    let y_move = ask[0].0.clone();
    let (d, ask) = c.after_plans(d, &[y_move], 33.0, &not_asked);
    assert!(ask.is_empty());
    assert_eq!(d.moves.len(), 1, "{d:#?}");
    assert_eq!(d.moves[0].vms, vec!["y"]);
    assert_eq!(d.moves[0].cost_source, CostSource::Model);
    assert!(d.notes.iter().all(|n| n.subject != "y"), "{d:#?}");
}

#[test]
fn a_move_whose_plan_failed_goes_on_historys_estimate() {
    let mut c = hot_a_with_two_equal_vms();
    let d = c.decide(30.0, &allow_all);
    let before = d.moves.clone();
    let (d, ask) = c.after_plans(d, &before, 30.0, &|_, _| PlanState::Failed);
    assert!(ask.is_empty());
    assert_eq!(d.moves, before);
    assert!(d.notes.is_empty(), "{d:#?}");
}

#[test]
fn with_plan_max_age_0_the_model_is_never_asked() {
    let mut c = hot_a_with_two_equal_vms();
    c.params.plan_max_age_s = 0.0;
    let d = c.decide(30.0, &allow_all);
    let before = d.moves.clone();
    let (d, ask) = c.after_plans(d, &[], 30.0, &not_asked);
    assert!(ask.is_empty());
    assert_eq!(d.moves, before);
}

#[test]
fn a_cost_book_saved_before_plans_existed_still_reads() {
    let b: CostBook =
        serde_json::from_str(r#"{"link_rate":{"a>b":1e8},"vm":{"x":[0.5,0.1]}}"#).unwrap();
    assert!(b.plans.is_empty());
    let p: Params = serde_json::from_str(r#"{"high":0.8}"#).unwrap();
    assert_eq!(p.plan_max_age_s, 600.0);
}

#[test]
fn a_drain_does_not_wait_for_the_model() {
    let mut c = cluster(fast(), &["a", "b"], &[("x", "a", 1, 0.5)], 30);
    c.memory.drained.insert("a".into());
    let d = c.decide(30.0, &allow_all);
    let before = d.moves.clone();
    assert_eq!(before.len(), 1);
    assert_eq!(before[0].reason, Reason::Drain);
    let (d, ask) = c.after_plans(d, &[], 30.0, &not_asked);
    assert!(ask.is_empty(), "{ask:?}");
    assert_eq!(d.moves, before);
}
