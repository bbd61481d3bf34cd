//! The model checks: v1's known holes (H1, H4) are found, so is the hole of the rejected
//! confirm-based lease, and v2 (the protocol as implemented) is checked exhaustively.
//!
//! Bounds and measured state counts are in docs/model.md. Run with
//! `cargo test -p mqlock-model -- --nocapture` to see the counterexample paths.

use std::collections::BTreeSet;
use std::time::Instant;

use mqlock_model::explore::explore_all;
use mqlock_model::liveness;
use mqlock_model::properties::{F1, L2, Z1};
use mqlock_model::types::Token;
use mqlock_model::{Action, Config, LockModel, Version};
use stateright::{Checker, HasDiscoveries, Model};

use Action::*;

/// The v1 configuration: 2 clients, clock 1..=4, D = 3, M = 2, 2 acquisitions each, 1
/// partition, no nudges.
fn v1_config() -> Config {
    Config {
        clients: 2,
        horizon: 4,
        d: 3,
        m: 2,
        acquisitions: 2,
        nudges: 0,
        renewals: 0,
        partitions: 1,
        losses: 0,
        park: None,
    }
}

/// Runs the checker on `m` until `property` has a discovery (or everything was explored),
/// prints stateright's path and our shortest one, and returns the checker's path length.
fn find_counterexample(m: &LockModel, property: &'static str) -> usize {
    let t = Instant::now();
    let checker = m
        .clone()
        .checker()
        .finish_when(HasDiscoveries::AnyOf(BTreeSet::from([property])))
        .spawn_bfs()
        .join();
    let path = checker
        .discovery(property)
        .unwrap_or_else(|| panic!("the checker found no counterexample to {property}"));
    let actions = path.into_actions();
    println!(
        "{:?}: counterexample to \"{property}\" after {} states in {:?}:\n  {}",
        m.version,
        checker.unique_state_count(),
        t.elapsed(),
        actions
            .iter()
            .map(|a| m.action_name(a))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let shortest = liveness::shortest_counterexample(m, property).expect("a shortest path");
    println!(
        "shortest counterexample ({} steps):\n{}",
        shortest.len(),
        liveness::describe(m, &shortest)
    );
    actions.len()
}

/// H1: a holder whose node is cut off keeps renewing its lease through its own node (H3),
/// the leader hands the token to the next consumer, and after the heal the old holder is
/// re-activated, receives the token again and acks it away: a zombie with a lower token and
/// a lock nobody can get.
#[test]
fn v1_has_a_zombie_holder() {
    let m = LockModel::new(Version::V1, v1_config());
    find_counterexample(&m, Z1);
    find_counterexample(&m, L2);

    // The review's H1 scenario, step by step.
    let h1 = [
        Acquire(0),
        Deliver,
        Receive(0),
        ReadFence(0),
        StartEpoch(0),
        EpochConfirmed(0),
        Grant(0), // c0 holds 1.0 at t=1
        Acquire(1),
        Partition(0),
        Tick,
        Probe(0), // answered by c0's own node
        Tick,
        Probe(0),
        Tick,
        ReturnConsumers(0), // t=4: the leader declares c0's node down, returns the token
        Deliver,
        Receive(1),
        ReadFence(1),
        Grant(1), // c1 granted 1.1 while c0 believes it holds 1.0
        Heal(0),  // c0's consumer rejoins the waiting list
        Close(1), // c1 releases: the token goes to c0 ...
        Deliver,
        Receive(0), // ... which acks it away
    ];
    let path = liveness::replay(&m, &h1);
    println!("H1 scenario:\n{}", liveness::describe(&m, &path));
    let grant1 = &path[18].1;
    assert!(grant1.l2_broken, "c1 was granted while c0 believed it held");
    let end = &path.last().unwrap().1;
    assert!(end.clients[0].believes(end.clock));
    assert_eq!(end.clients[0].token(), Some(Token::start(1)));
    assert_eq!(end.max_grant, Some(Token::start(1).next()));
    assert!(!(m.property(Z1).condition)(&m, end), "c0 is a zombie");
    assert!(
        end.broker.ready.is_empty() && end.broker.consumers.iter().all(|k| k.unacked.is_empty()),
        "the token is gone: the lock is stuck"
    );
}

/// H4: the register keeps the last value written, not the largest: a fence write that lands
/// late (after a heal) lowers it below a token granted meanwhile, and the next grant's token is
/// not above that earlier grant's.
#[test]
fn v1_register_can_go_down() {
    let m = LockModel::new(Version::V1, v1_config());
    find_counterexample(&m, F1);

    let h4 = [
        Acquire(0),
        Deliver,
        Receive(0),
        ReadFence(0),
        StartEpoch(0), // epoch 1, confirmed at once
        Acquire(1),
        Partition(0),
        EpochConfirmed(0), // c0's fence write of 1.0 waits in its node
        Tick,
        Tick,
        Tick,
        ReturnConsumers(0),
        Deliver,
        Receive(1),
        ReadFence(1), // empty
        StartEpoch(1),
        EpochConfirmed(1),
        Grant(1), // c1 granted 4.0, the register holds 4.0
        Heal(0),
        Land(0),
        Land(0), // c0's late write of 1.0: drop-head keeps it
        Close(0),
        Close(1),
        Acquire(1),
        Deliver,
        Receive(1),
        ReadFence(1), // reads 1.0
        Grant(1),     // granted 1.1 < 4.0
    ];
    let path = liveness::replay(&m, &h4);
    println!("H4 scenario:\n{}", liveness::describe(&m, &path));
    assert_eq!(path[17].1.broker.fence.ready, vec![Token::start(4).0]);
    assert_eq!(
        path[20].1.broker.fence.ready,
        vec![Token::start(1).0],
        "the late write lowered the register"
    );
    let end = &path.last().unwrap().1;
    assert_eq!(end.clients[1].token(), Some(Token::start(1).next()));
    assert!(end.f1_broken, "1.1 was granted after 4.0");
}

/// Checks every property of `version` on every reachable state of `cfg`, and the
/// no-stuck-lock liveness (LV), and returns the number of states.
fn check_exhaustively(version: Version, cfg: Config) -> usize {
    let m = LockModel::new(version, cfg);
    let t = Instant::now();
    let checker = explore_all(&m);
    let states = checker.unique_state_count();
    println!(
        "{version:?} {cfg:?}: {states} states, depth {}, {:?}",
        checker.max_depth(),
        t.elapsed()
    );
    for (name, path) in checker.discoveries() {
        if !name.starts_with('S') {
            println!(
                "counterexample to \"{name}\":\n{}",
                liveness::describe(&m, &liveness::replay(&m, &path.into_actions()))
            );
        }
    }
    checker.assert_properties();
    let t = Instant::now();
    let live = liveness::check(&m);
    println!(
        "{version:?} liveness: {} states, {} edges, {} stuck, {:?}",
        live.states,
        live.edges,
        live.stuck,
        t.elapsed()
    );
    assert_eq!(
        live.stuck, 0,
        "a waiter can be stuck: {:?}",
        live.stuck_path
    );
    states
}

/// The configurations v2 (and the rejected confirm-based design) are checked on.
fn v2_configs() -> [(Config, usize); 2] {
    let [two, three] = Config::checked();
    [(two, 100_000), (three, 500_000)]
}

/// The rejected design that takes the lease from publisher confirms: the checker finds that a
/// grantee whose consumer was returned while its node was cut off completes its grant after the
/// heal, believing it holds while the real holder is granted (L2), with tokens out of grant
/// order (F1). This is what the implemented protocol's delivery rule is for.
#[test]
fn leasing_on_confirms_is_unsound() {
    let m = LockModel::new(Version::V2Confirm, v2_configs()[0].0);
    for p in [F1, L2, Z1] {
        find_counterexample(&m, p);
    }
}

/// The protocol as implemented (docs/protocol.md, crates/mqlock): every property holds on every
/// reachable state of 2 and 3 clients, and no waiter can be stuck.
#[test]
fn v2_keeps_every_invariant() {
    for (cfg, floor) in v2_configs() {
        let states = check_exhaustively(Version::V2, cfg);
        assert!(states > floor, "only {states} states: the check is vacuous");
    }
}

/// v1's lock can get stuck for good (H1): without a nudge, a waiter never gets the lock
/// after the re-activated old holder acked the token away.
#[test]
fn v1_lock_can_get_stuck() {
    let m = LockModel::new(Version::V1, v1_config());
    let live = liveness::check(&m);
    let path = live.stuck_path.expect("a stuck waiter");
    println!(
        "v1: {} of {} states have a stuck waiter; the first one after:\n  {}",
        live.stuck,
        live.states,
        path.join(" ")
    );
}
