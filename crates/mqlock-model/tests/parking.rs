//! Keeping a lock until it is wanted (crates/mqlock `park.rs`, `hold.rs`; docs/model.md,
//! "Keeping a lock until it is wanted"): v2 with `v2::Park`, `v2::Unpark` and `v2::ParkExpire`.
//!
//! - As implemented, M1, F1, L2, Z1 and LV hold, but LV-W (every waiter is granted while parked
//!   holders never resume use and have no idle limit) does **not**: a waiter's wake-up that
//!   reaches the holder before its `R0` is acked by the grant, and the holder parks unwanted.
//! - With the implemented rules (wake-ups name their publisher, and another client's wake-up seen
//!   by the grant makes the holder wanted; a holder that lets go parks only if no other client
//!   has a consumer on the queue) every property and LV-W hold.
//! - Negative controls, each the implemented rules minus one: the checker finds a stuck waiter.
//!
//! `cargo test -p mqlock-model --test parking -- --nocapture` prints the paths.

use std::time::Instant;

use mqlock_model::client::Phase;
use mqlock_model::explore::explore_all;
use mqlock_model::liveness::{self, Liveness};
use mqlock_model::{Action, Config, LockModel, Parking, State, Version};
use stateright::Checker;

use Action::*;

/// 2 clients, clock 1..=4, D = 3, M = 2, one acquisition each, one renewal, no nudges (the
/// wake-up at `Acquire` alone must do), idle limit 2, `partitions` partitions.
fn config(park: Parking, partitions: u8) -> Config {
    Config {
        clients: 2,
        horizon: 4,
        d: 3,
        m: 2,
        acquisitions: 1,
        nudges: 0,
        renewals: 1,
        partitions,
        losses: 0,
        park: Some(park),
    }
}

/// 3 clients, clock 1..=4, no renewal, no partition.
fn three_clients(park: Parking) -> Config {
    Config {
        clients: 3,
        renewals: 0,
        ..config(park, 0)
    }
}

/// M1, F1, L2, Z1 (and the sanity examples) on every reachable state; returns the number of
/// states.
fn check_invariants(m: &LockModel) -> usize {
    let t = Instant::now();
    let checker = explore_all(m);
    let states = checker.unique_state_count();
    println!("{:?}: {states} states, {:?}", m.cfg, t.elapsed());
    for (name, path) in checker.discoveries() {
        if !name.starts_with('S') {
            println!(
                "counterexample to \"{name}\":\n{}",
                liveness::describe(m, &liveness::replay(m, &path.into_actions()))
            );
        }
    }
    checker.assert_properties();
    states
}

/// LV (`lv_w == false`) or LV-W (no idle limit, parked holders never resume use or crash).
fn live(m: &LockModel, lv_w: bool) -> Liveness {
    let t = Instant::now();
    let l = if lv_w {
        liveness::check_wanted(m)
    } else {
        liveness::check(m)
    };
    let name = if lv_w { "LV-W" } else { "LV" };
    println!(
        "{name}: {} stuck of {} states, {:?}",
        l.stuck,
        l.states,
        t.elapsed()
    );
    if let Some(path) = &l.stuck_path {
        println!("  first stuck state after: {}", path.join(" "));
    }
    l
}

/// The stuck waiter a control must lead to: `holder` is parked and still the holder, `waiter`
/// waits, and (with the idle limit, `Unpark` and the parked holder's crash left out) it never
/// gets the lock.
fn assert_stuck_behind_parked(l: &Liveness, holder: usize, waiter: usize) -> &State {
    assert!(l.stuck > 0, "the checker must find a stuck waiter");
    let s = l.stuck_state.as_ref().expect("a stuck state");
    assert!(s.clients[holder].parked.is_some() && s.clients[holder].believes(s.clock));
    assert!(s.clients[waiter].waiting());
    s
}

/// Parking as implemented keeps M1, F1, L2, Z1 (a parked holder believes it holds, so Z1 also
/// says that a parked lock is never a zombie of a later grant) and LV.
#[test]
fn parking_keeps_every_invariant() {
    let m = LockModel::new(Version::V2, config(Parking::implemented(2), 1));
    let states = check_invariants(&m);
    assert!(
        states > 150_000,
        "only {states} states: the check is vacuous"
    );
    let l = live(&m, false);
    assert_eq!(l.stuck, 0, "a waiter can be stuck: {:?}", l.stuck_path);

    // Parking is reachable: the holder parks, takes the lock back (no broker step), parks
    // again, and a waiter's wake-up releases it.
    let path = liveness::replay(
        &m,
        &[
            Acquire(0),
            Deliver,
            Receive(0),
            ReadFence(0),
            StartEpoch(0),
            EpochConfirmed(0),
            Deliver,
            Receive(0), // R0 back
            Grant(0),
            Park(0),
            Unpark(0),
            Park(0),
            Acquire(1), // c0 has a consumer: c1 publishes a wake-up
            Deliver,
            Receive(0), // parked and wanted: released
            Deliver,
            Receive(1),
            ReadFence(1),
            Deliver,
            Receive(1),
            Grant(1),
        ],
    );
    println!("{}", liveness::describe(&m, &path));
    let parked = &path[9].1;
    assert_eq!(parked.clients[0].parked, Some(1));
    assert!(parked.clients[0].believes(parked.clock));
    assert_eq!(path[10].1.broker, parked.broker, "Unpark: no broker step");
    assert_eq!(path[14].1.clients[0].phase, Phase::Idle);
    let end = &path.last().unwrap().1;
    assert!(end.clients[1].believes(end.clock) && end.max_grant > parked.max_grant);
}

/// The finding, on the first implementation: a waiter that registers while the holder's grant reads the
/// registers (after its first delivery, before its `R0` is published) has its wake-up acked by
/// the grant (`own_delivery` in acquire.rs); the holder then parks unwanted, and only the idle
/// limit (or the waiter's next nudge, `nudge_interval`) releases the lock.
#[test]
fn the_first_parking_can_strand_a_waiter_until_the_idle_limit() {
    let m = LockModel::new(Version::V2, config(Parking::first(2), 0));
    let l = live(&m, true);
    let s = assert_stuck_behind_parked(&l, 0, 1);
    assert!(!s.clients[0].wanted);
    let path = liveness::replay(
        &m,
        &[
            Acquire(0),
            Deliver,
            Receive(0),   // c0's own wake-up: its grant starts
            ReadFence(0), // empty
            Acquire(1),   // c0 has a consumer: c1's wake-up lands before c0's R0
            StartEpoch(0),
            EpochConfirmed(0), // token and R0 published
            Deliver,
            Receive(0), // c1's wake-up: acked by the grant
            Deliver,
            Receive(0), // R0 back
            Grant(0),
            Park(0), // not wanted: parked
        ],
    );
    println!("{}", liveness::describe(&m, &path));
    let end = &path.last().unwrap().1;
    assert!(end.clients[0].parked.is_some() && !end.clients[0].wanted);
    assert!(end.clients[1].waiting());
    assert!(end.broker.ready.is_empty(), "the wake-up is gone");
}

/// The implemented rules: M1, F1, L2, Z1 and LV-W hold (LV-W implies LV: same states, fewer
/// edges), so a waiter is granted without the idle limit and without the parked holder doing
/// anything but receive.
#[test]
fn parking_releases_as_soon_as_wanted() {
    let m = LockModel::new(Version::V2, config(Parking::implemented(2), 1));
    let states = check_invariants(&m);
    assert!(
        states > 150_000,
        "only {states} states: the check is vacuous"
    );
    let l = live(&m, true);
    assert_eq!(
        l.stuck, 0,
        "a waiter needs the idle limit: {:?}",
        l.stuck_path
    );
}

/// The implemented rules with 3 clients: two waiters behind one holder.
#[test]
fn parking_releases_as_soon_as_wanted_three_clients() {
    let m = LockModel::new(Version::V2, three_clients(Parking::implemented(2)));
    let l = live(&m, true);
    assert!(l.states > 150_000, "only {} states", l.states);
    assert_eq!(
        l.stuck, 0,
        "a waiter needs the idle limit: {:?}",
        l.stuck_path
    );
}

/// Control (1): a parked holder that ignores wake-ups.
#[test]
fn control_parked_holder_deaf_to_wake_ups() {
    let p = Parking {
        release_when_parked: false,
        ..Parking::implemented(2)
    };
    let l = live(&LockModel::new(Version::V2, config(p, 0)), true);
    assert_stuck_behind_parked(&l, 0, 1);
}

/// Control (2): waiters that publish a wake-up only to an idle queue (the rule before parking)
/// never tell a parked holder that they wait.
#[test]
fn control_no_wake_up_behind_a_consumer() {
    let p = Parking {
        wake_behind_consumer: false,
        ..Parking::implemented(2)
    };
    let l = live(&LockModel::new(Version::V2, config(p, 0)), true);
    let s = assert_stuck_behind_parked(&l, 0, 1);
    assert!(s.broker.ready.is_empty(), "no wake-up was published");
}

/// Control (3): a holder that parks although a waiter's wake-up reached it while in use. With
/// the consumer count at `Park` this needs the holder's node cut off when it parks.
#[test]
fn control_parks_although_wanted() {
    let p = Parking {
        release_when_wanted: false,
        ..Parking::implemented(2)
    };
    let l = live(&LockModel::new(Version::V2, config(p, 1)), true);
    let s = assert_stuck_behind_parked(&l, 0, 1);
    assert!(s.clients[0].wanted, "it parked although wanted");
}

/// Why the proposal keeps the wake-ups the grant sees: with the consumer count at `Park` only,
/// a holder whose grant acked a waiter's wake-up and whose node is cut off when it parks (the
/// count cannot be asked) parks unwanted, and after the heal nothing tells it.
#[test]
fn parking_needs_wake_ups_seen_by_the_grant() {
    let p = Parking {
        wanted_in_grant: false,
        ..Parking::implemented(2)
    };
    let l = live(&LockModel::new(Version::V2, config(p, 1)), true);
    assert_stuck_behind_parked(&l, 0, 1);
}

/// Why the proposal counts consumers at `Park`: a holder that two waiters' wake-ups reached
/// hands the lock to one of them, which learns nothing of the other and parks.
#[test]
fn parking_needs_the_consumer_count_at_park() {
    let p = Parking {
        count_at_park: false,
        ..Parking::implemented(2)
    };
    let l = live(&LockModel::new(Version::V2, three_clients(p)), true);
    assert!(l.stuck > 0, "the checker must find a stuck waiter");
    let s = l.stuck_state.as_ref().unwrap();
    let parked = s.clients.iter().filter(|c| c.parked.is_some()).count();
    let waiting = s.clients.iter().filter(|c| c.waiting()).count();
    assert_eq!((parked, waiting), (1, 1), "{s:?}");
}
