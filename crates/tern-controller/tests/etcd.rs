//! `EtcdStore` against a real etcd (Debian's `etcd-server`, started per test on free
//! loopback ports with its own data directory; never the packaged service): the state
//! round trip, one leader among two controllers, a standby taking over after a clean stop,
//! a crash and a stall, and mutual TLS.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tern_controller::decide::Memory;
use tern_controller::etcd::{EtcdStore, EtcdTls};
use tern_controller::state::{StateError, Store};
use tern_testkit::etcd::{make_certs, Etcd};

const TTL_S: u64 = 3;
const TTL: Duration = Duration::from_secs(TTL_S);

fn store(etcd: &Etcd, prefix: &str, me: &str) -> EtcdStore {
    EtcdStore::open(std::slice::from_ref(&etcd.url), prefix, me, TTL_S).unwrap()
}

fn memory(drained: &str) -> Memory {
    let mut m = Memory::default();
    m.drained.insert(drained.into());
    m
}

fn drained(s: &mut EtcdStore) -> Vec<String> {
    s.load()
        .unwrap()
        .map(|m| m.drained.into_iter().collect())
        .unwrap_or_default()
}

/// Polls `s.leading()` until it is true; the instant it first was.
fn wait_leading(s: &mut EtcdStore, within: Duration) -> Instant {
    let deadline = Instant::now() + within;
    loop {
        if s.leading().unwrap() {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "{} never led", s.describe());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
#[ignore = "tier vm: needs etcd-server (scripts/setup.sh installs it)"]
fn etcd_store_keeps_the_state_across_stores() {
    let etcd = Etcd::start();
    let mut a = store(&etcd, "/tern/t1", "a");
    assert!(a.load().unwrap().is_none());
    assert!(
        matches!(a.save(&memory("x")), Err(StateError::NotLeader)),
        "saves before leading"
    );
    assert!(a.leading().unwrap());
    assert!(a.describe().contains("leader: yes"), "{}", a.describe());
    a.save(&memory("h1")).unwrap();
    assert_eq!(drained(&mut a), ["h1"]);
    drop(a);
    let mut b = store(&etcd, "/tern/t1/", "b");
    assert_eq!(drained(&mut b), ["h1"], "the state outlives the store");
    assert!(b.describe().contains("leader: no"), "{}", b.describe());
    let mut other = store(&etcd, "/tern/elsewhere", "c");
    assert!(other.load().unwrap().is_none(), "prefixes are separate");
    assert!(
        EtcdStore::open(&["http://127.0.0.1:1".into()], "/p", "a", 3).is_err(),
        "no etcd there"
    );
    let failover = EtcdStore::open(
        &["http://127.0.0.1:1".into(), etcd.url.clone()],
        "/p",
        "a",
        3,
    );
    assert!(failover.is_ok(), "the second endpoint answers");
}

#[test]
#[ignore = "tier vm: needs etcd-server (scripts/setup.sh installs it)"]
fn etcd_one_of_two_controllers_leads_and_a_resign_hands_over_at_once() {
    let etcd = Etcd::start();
    let mut a = store(&etcd, "/tern/t2", "a");
    let mut b = store(&etcd, "/tern/t2", "b");
    let (la, lb) = (a.leading().unwrap(), b.leading().unwrap());
    assert!(la ^ lb, "exactly one leads: a {la}, b {lb}");
    let (mut leader, mut standby) = if la { (a, b) } else { (b, a) };
    assert!(leader.leading().unwrap() && !standby.leading().unwrap());
    leader.save(&memory("from-leader")).unwrap();
    assert!(matches!(
        standby.save(&memory("from-standby")),
        Err(StateError::NotLeader)
    ));
    assert_eq!(
        drained(&mut standby),
        ["from-leader"],
        "the standby wrote nothing"
    );
    let t = Instant::now();
    leader.resign().unwrap();
    assert!(!leader.describe().contains("leader: yes"));
    assert!(matches!(
        leader.save(&memory("after-resign")),
        Err(StateError::NotLeader)
    ));
    assert!(
        standby.leading().unwrap(),
        "the standby leads on its next call"
    );
    eprintln!("handover after resign: {:?}", t.elapsed());
    assert!(
        !leader.leading().unwrap(),
        "the old leader is now the standby"
    );
    standby.save(&memory("from-new-leader")).unwrap();
    assert_eq!(drained(&mut leader), ["from-new-leader"]);
    // A clean stop (drop) hands over at once too.
    drop(standby);
    assert!(leader.leading().unwrap());
}

#[test]
#[ignore = "tier vm: needs etcd-server (scripts/setup.sh installs it)"]
fn etcd_standby_takes_over_a_crashed_leader_after_its_lease_expires() {
    let etcd = Etcd::start();
    let mut a = store(&etcd, "/tern/t3", "a");
    let mut b = store(&etcd, "/tern/t3", "b");
    assert!(a.leading().unwrap());
    // Let a few keepalives go by, so the lease lives on renewals, not on its grant.
    std::thread::sleep(TTL + Duration::from_secs(1));
    assert!(a.leading().unwrap(), "the keepalive holds the lease");
    a.save(&memory("before-crash")).unwrap();
    let crashed = Instant::now();
    let renewed = a.crash().expect("a led");
    assert!(
        !b.leading().unwrap(),
        "the crashed leader's lease still holds"
    );
    let took_over = wait_leading(&mut b, TTL + Duration::from_secs(5));
    eprintln!(
        "takeover {:?} after the crash, {:?} after the last renewal (TTL {TTL:?})",
        took_over - crashed,
        took_over - renewed
    );
    assert!(
        took_over >= renewed + TTL,
        "took over before the lease could expire: {:?} after its last renewal",
        took_over - renewed
    );
    assert!(took_over - crashed <= TTL + Duration::from_secs(3));
    assert_eq!(drained(&mut b), ["before-crash"]);
    b.save(&memory("after-takeover")).unwrap();
}

#[test]
#[ignore = "tier vm: needs etcd-server (scripts/setup.sh installs it)"]
fn etcd_stalled_leader_stops_leading_and_cannot_save() {
    let etcd = Etcd::start();
    let mut a = store(&etcd, "/tern/t4", "a");
    let mut b = store(&etcd, "/tern/t4", "b");
    assert!(a.leading().unwrap());
    a.save(&memory("a1")).unwrap();
    a.pause_keepalive(true);
    // Past TTL minus the margin, a refuses to act on its own, before etcd expires it.
    std::thread::sleep(TTL * 4 / 5);
    assert!(matches!(
        a.save(&memory("stale")),
        Err(StateError::NotLeader)
    ));
    assert!(a.describe().contains("leader: no"), "{}", a.describe());
    wait_leading(&mut b, TTL + Duration::from_secs(5));
    b.save(&memory("b1")).unwrap();
    assert!(!a.leading().unwrap(), "b holds the leadership now");
    assert!(matches!(a.save(&memory("a2")), Err(StateError::NotLeader)));
    a.pause_keepalive(false);
    assert!(!a.leading().unwrap());
    assert!(matches!(a.save(&memory("a3")), Err(StateError::NotLeader)));
    assert_eq!(drained(&mut a), ["b1"], "the stalled leader wrote nothing");
}

#[test]
#[ignore = "tier vm: needs etcd-server (scripts/setup.sh installs it)"]
fn etcd_over_mutual_tls() {
    let etcd = Etcd::start_tls();
    let urls = [etcd.url.clone()];
    let mut a = EtcdStore::open_tls(&urls, "/tern/t5", "a", TTL_S, &etcd.tls()).unwrap();
    assert!(a.leading().unwrap());
    a.save(&memory("tls")).unwrap();
    assert_eq!(drained(&mut a), ["tls"]);
    assert!(
        EtcdStore::open(&urls, "/tern/t5", "b", TTL_S).is_err(),
        "https without TLS files is refused"
    );
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let stranger = EtcdTls {
        ca: etcd.tls().ca,
        cert: dir.path().join("client.pem"),
        key: dir.path().join("client.key"),
    };
    let refused = EtcdStore::open_tls(&urls, "/tern/t5", "c", TTL_S, &stranger);
    assert!(
        refused.is_err(),
        "a client certificate from another CA is refused"
    );
    let missing = EtcdTls {
        ca: PathBuf::from("/nonexistent/ca.pem"),
        ..etcd.tls()
    };
    let err = EtcdStore::open_tls(&urls, "/tern/t5", "d", TTL_S, &missing)
        .err()
        .unwrap();
    assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
}
