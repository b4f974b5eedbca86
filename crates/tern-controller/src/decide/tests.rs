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
    let (guess, src) = c.memory.costs.estimate(&v, "a", "b");
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
    let (est, src) = c.memory.costs.estimate(&v, "b", "a");
    assert_eq!(src, CostSource::History);
    // a link never crossed: the rate of those that were
    let (other, _) = c.memory.costs.estimate(&v, "a", "z");
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
