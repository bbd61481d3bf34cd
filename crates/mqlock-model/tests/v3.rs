//! V3, the grant without the fence register (docs/model.md, "V3"): checked exhaustively on
//! v2's configurations and with parking, and the negative controls, each one rule turned off
//! (`V3Fault`), for which the checker must find a counterexample.
//!
//! `cargo test -p mqlock-model --test v3 -- --nocapture` prints the paths.

use std::collections::BTreeSet;
use std::time::Instant;

use mqlock_model::client::Phase;
use mqlock_model::explore::explore_all;
use mqlock_model::liveness::{self, Liveness};
use mqlock_model::properties::{F1, L2};
use mqlock_model::{Config, LockModel, Parking, State, V3Fault, Version};
use stateright::{Checker, HasDiscoveries, Model};

/// v2's configurations (`tests/protocols.rs`): 2 clients, clock to 6, and 3 clients, clock to
/// 4; D 3, M 2, 1 acquisition and 1 renewal each, 1 partition; with the state floors.
fn v2_configs() -> [(Config, usize); 2] {
    let [two, three] = Config::checked();
    [(two, 200_000), (three, 800_000)]
}

/// 3 clients, clock to 3, 1 acquisition each, no renewal, no partition: enough for controls
/// (a) and (b).
fn three_small() -> Config {
    Config {
        clients: 3,
        horizon: 3,
        renewals: 0,
        partitions: 0,
        ..v2_configs()[0].0
    }
}

/// 2 clients, clock to 3, no renewal, no partition, and one loss of the lock queue's
/// messages: enough for control (c).
fn lossy_small() -> Config {
    Config {
        clients: 2,
        horizon: 3,
        renewals: 0,
        partitions: 0,
        losses: 1,
        ..v2_configs()[0].0
    }
}

/// v2's parking configuration (`tests/parking.rs`): 2 clients, clock to 4, 1 acquisition,
/// 1 renewal, no nudges, 1 partition, idle limit 2, the implemented rules.
fn parking_config() -> Config {
    Config {
        clients: 2,
        horizon: 4,
        d: 3,
        m: 2,
        acquisitions: 1,
        nudges: 0,
        renewals: 1,
        partitions: 1,
        losses: 0,
        park: Some(Parking::implemented(2)),
    }
}

/// Every state property on every reachable state of `m` (printing any counterexample);
/// returns the number of states and whether they all hold.
fn check_invariants(m: &LockModel) -> (usize, bool) {
    let t = Instant::now();
    let checker = explore_all(m);
    let states = checker.unique_state_count();
    println!(
        "{:?} {:?} {:?}: {states} states, depth {}, {:?}",
        m.version,
        m.fault,
        m.cfg,
        checker.max_depth(),
        t.elapsed()
    );
    let mut ok = true;
    for (name, path) in checker.discoveries() {
        if !name.starts_with('S') {
            ok = false;
            println!(
                "counterexample to \"{name}\":\n{}",
                liveness::describe(m, &liveness::replay(m, &path.into_actions()))
            );
        }
    }
    (states, ok)
}

/// LV (`lv_w == false`) or LV-W over the whole graph of `m`.
fn live(m: &LockModel, lv_w: bool) -> Liveness {
    let t = Instant::now();
    let l = if lv_w {
        liveness::check_wanted(m)
    } else {
        liveness::check(m)
    };
    let name = if lv_w { "LV-W" } else { "LV" };
    println!(
        "{:?} {:?} {name}: {} stuck of {} states, {:?}",
        m.version,
        m.fault,
        l.stuck,
        l.states,
        t.elapsed()
    );
    if let Some(path) = &l.stuck_path {
        println!("  first stuck state after: {}", path.join(" "));
        println!("  {:?}", l.stuck_state);
    }
    l
}

/// Runs the checker on `m` until `property` has a discovery; `None` if it has none on the
/// whole graph. Prints the shortest counterexample step by step.
fn counterexample(m: &LockModel, property: &'static str) -> Option<usize> {
    let t = Instant::now();
    let checker = m
        .clone()
        .checker()
        .threads(2)
        .finish_when(HasDiscoveries::AnyOf(BTreeSet::from([property])))
        .spawn_bfs()
        .join();
    let Some(path) = checker.discovery(property) else {
        println!(
            "{:?}: no counterexample to \"{property}\" in {} states ({:?})",
            m.fault,
            checker.unique_state_count(),
            t.elapsed()
        );
        return None;
    };
    println!(
        "{:?}: counterexample to \"{property}\" after {} states in {:?}: {} steps",
        m.fault,
        checker.unique_state_count(),
        t.elapsed(),
        path.into_actions().len()
    );
    let shortest = liveness::shortest_counterexample(m, property).expect("a shortest path");
    println!(
        "shortest counterexample ({} steps):\n{}",
        shortest.len(),
        liveness::describe(m, &shortest)
    );
    Some(shortest.len())
}

/// LV-G (`liveness::check_grantable`): a newcomer can always be granted.
fn grantable(m: &LockModel) -> Liveness {
    let t = Instant::now();
    let l = liveness::check_grantable(m);
    println!(
        "{:?} {:?} LV-G: {} stuck of {} states, {:?}",
        m.version,
        m.fault,
        l.stuck,
        l.states,
        t.elapsed()
    );
    l
}

/// V3 as specified: M1, F1, L2, Z1 on every reachable state and LV, on v2's configurations
/// and on v2's 2-client configuration with one loss of the lock queue's messages; LV-G on the
/// 2-client configuration.
#[test]
fn v3_keeps_every_invariant() {
    let lossy = Config {
        losses: 1,
        ..v2_configs()[0].0
    };
    for (cfg, floor) in v2_configs().into_iter().chain([(lossy, 300_000)]) {
        let m = LockModel::new(Version::V3, cfg);
        let (states, ok) = check_invariants(&m);
        assert!(ok, "an invariant fails");
        assert!(states > floor, "only {states} states: the check is vacuous");
        let l = live(&m, false);
        assert_eq!(l.stuck, 0, "a waiter can be stuck: {:?}", l.stuck_path);
    }
    let l = grantable(&LockModel::new(Version::V3, v2_configs()[0].0));
    assert_eq!(l.stuck, 0, "a newcomer can be stuck: {:?}", l.stuck_path);
}

/// V3 with parking (v2's parking configuration, the implemented rules): M1, F1, L2, Z1, LV
/// and LV-W.
#[test]
fn v3_with_parking_keeps_every_invariant() {
    let m = LockModel::new(Version::V3, parking_config());
    let (states, ok) = check_invariants(&m);
    assert!(ok, "an invariant fails");
    assert!(
        states > 150_000,
        "only {states} states: the check is vacuous"
    );
    let l = live(&m, false);
    assert_eq!(l.stuck, 0, "a waiter can be stuck: {:?}", l.stuck_path);
    let l = live(&m, true);
    assert_eq!(
        l.stuck, 0,
        "a waiter needs the idle limit: {:?}",
        l.stuck_path
    );
}

/// The number of re-candidates client `i` made in its current acquisition (its renewal
/// numbers not used by `v3::Renew`; one acquisition per client in these configurations).
fn recandidates(m: &LockModel, s: &State, i: usize) -> u8 {
    let c = &s.clients[i];
    c.renewal_n - (m.cfg.renewals - c.renewals_left)
}

/// The re-candidate rule is exercised: a grant after a re-candidate is reachable (a stale
/// candidate from an epoch started by a client that was no longer the active consumer).
#[test]
fn v3_grants_after_a_recandidate() {
    let m = LockModel::new(Version::V3, v2_configs()[0].0);
    let path = liveness::shortest_path_to(&m, |s| {
        (0..s.clients.len()).any(|i| s.clients[i].believes(s.clock) && recandidates(&m, s, i) > 0)
    })
    .expect("a grant after a re-candidate");
    println!("{}", liveness::describe(&m, &path));
}

/// Control (a): a grantee that gives up (closes) on another channel's renewal stamped at or
/// above its candidate. LV still holds (a give-up ends the wait, and the acquisitions are
/// bounded), but LV-G fails: the held delivery and the higher renewal go back to the queue
/// front together, and every later grantee gives up on them in turn.
#[test]
fn control_v3_give_up_on_a_higher_stamp() {
    let cfg = three_small();
    let l = grantable(&LockModel::new(Version::V3, cfg));
    assert_eq!(l.stuck, 0, "V3 itself: {:?}", l.stuck_path);
    let m = LockModel::new(Version::V3, cfg).with_fault(V3Fault::GiveUpOnHigher);
    assert_eq!(live(&m, false).stuck, 0, "LV holds");
    let l = grantable(&m);
    assert!(l.stuck > 0, "the checker must find a dead lock");
    let stuck = l.stuck_state.expect("a stuck state");
    let path = liveness::shortest_path_to(&m, |s| *s == stuck).expect("a path");
    println!(
        "shortest path to a dead lock ({} steps):\n{}",
        path.len(),
        liveness::describe(&m, &path)
    );
    assert!(stuck.clients.iter().any(|c| c.phase == Phase::Waiting));
    assert!(
        stuck.broker.ready.len() >= 2,
        "the two messages are requeued"
    );
}

/// Control (b): granted at once with the candidate made from a stamp, without waiting for its
/// own renewal to come back. Needs 3 clients (two later consumers of one stamped message); on
/// v2's 2-client configuration nothing fails (452,440 states, checked by hand).
#[test]
fn control_v3_grant_at_once() {
    let m = LockModel::new(Version::V3, three_small()).with_fault(V3Fault::GrantAtOnce);
    assert!(counterexample(&m, F1).is_some(), "no counterexample to F1");
    // L2 needs a holder cut off whose consumer is returned while it believes it holds.
    let cfg = Config {
        horizon: 4,
        partitions: 1,
        ..three_small()
    };
    let m = LockModel::new(Version::V3, cfg).with_fault(V3Fault::GrantAtOnce);
    assert!(counterexample(&m, L2).is_some(), "no counterexample to L2");
}

/// Control (c): a new epoch reuses the stored one (`max(e, clock)`). F1 fails only when the
/// lock queue can lose its messages: without a loss the queue always holds a renewal stamped
/// at or above the last grant ahead of any wake-up, so no grant after the first one starts
/// from a wake-up (the model finds nothing on v2's 2-client configuration).
#[test]
fn control_v3_reuse_epoch() {
    let m = LockModel::new(Version::V3, lossy_small()).with_fault(V3Fault::ReuseEpoch);
    assert!(counterexample(&m, F1).is_some(), "no counterexample to F1");
    let m = LockModel::new(Version::V3, v2_configs()[0].0).with_fault(V3Fault::ReuseEpoch);
    let (_, ok) = check_invariants(&m);
    assert!(ok, "without a loss, reusing the epoch breaks nothing");
}

/// Control (d): the held delivery acked as soon as the candidate is published. F1 fails with
/// 3 clients after a grantee that acked a higher renewal early crashes: a stale candidate's
/// own renewal is then the queue's head. On v2's 2-client configuration nothing fails.
#[test]
fn control_v3_ack_held_early() {
    let cfg = Config {
        renewals: 0,
        ..v2_configs()[1].0
    };
    let m = LockModel::new(Version::V3, cfg).with_fault(V3Fault::AckHeldEarly);
    assert!(counterexample(&m, F1).is_some(), "no counterexample to F1");
}
