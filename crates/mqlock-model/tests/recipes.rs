//! The recipes on the mutex (src/recipes): the semaphore and the read-write lock keep their
//! properties on every reachable state of small configurations, and the negative controls
//! (a semaphore without its turn or without abandoning, writers that skip the gate, a reader
//! that releases the gate early, a writer that takes one slot) are caught.
//!
//! Bounds and measured state counts are in docs/model.md, "Recipes". Run with
//! `cargo test -p mqlock-model --test recipes -- --nocapture` to see the paths.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::hash::Hash;
use std::time::Instant;

use mqlock_model::explore::explore_all;
use mqlock_model::recipes::rwlock::{self, RwLock};
use mqlock_model::recipes::semaphore::{self, Semaphore};
use mqlock_model::recipes::{Action, Lock, graph};
use stateright::{Checker, HasDiscoveries, Model};

/// Checks every property of `m` on every reachable state; returns the number of states.
fn exhaustive<M>(label: &str, m: &M) -> usize
where
    M: Model + Clone + Send + Sync + 'static,
    M::State: Clone + Debug + Hash + Send + Sync + PartialEq,
    M::Action: Clone + Debug + Send + Sync + PartialEq,
{
    let t = Instant::now();
    let checker = explore_all(m);
    let states = checker.unique_state_count();
    println!(
        "{label}: {states} states, depth {}, {:?}",
        checker.max_depth(),
        t.elapsed()
    );
    for (name, path) in checker.discoveries() {
        if !name.starts_with("sanity") {
            let names: Vec<String> = path
                .into_actions()
                .iter()
                .map(|a| m.format_action(a))
                .collect();
            println!("counterexample to \"{name}\": {}", names.join(" "));
        }
    }
    checker.assert_properties();
    states
}

/// Runs the checker on `m` until `property` has a discovery and returns its path (actions).
fn counterexample<M>(label: &str, m: &M, property: &'static str) -> Vec<M::Action>
where
    M: Model + Clone + Send + Sync + 'static,
    M::State: Clone + Debug + Hash + Send + Sync + PartialEq,
    M::Action: Clone + Debug + Send + Sync + PartialEq,
{
    let t = Instant::now();
    let checker = m
        .clone()
        .checker()
        .finish_when(HasDiscoveries::AnyOf(BTreeSet::from([property])))
        .spawn_bfs()
        .join();
    let actions = checker
        .discovery(property)
        .unwrap_or_else(|| panic!("{label}: the checker found no counterexample to {property}"))
        .into_actions();
    println!(
        "{label}: the checker found a counterexample to \"{property}\" after {} states in {:?} \
         ({} steps)",
        checker.unique_state_count(),
        t.elapsed(),
        actions.len(),
    );
    let cond = m.property(property).condition;
    let shortest = graph::shortest(m, |s| !cond(m, s)).expect("a shortest path");
    println!(
        "shortest ({} steps): {}",
        shortest.len(),
        shortest
            .iter()
            .map(|a| m.format_action(a))
            .collect::<Vec<_>>()
            .join(" ")
    );
    shortest
}

fn names(path: &[Action]) -> String {
    path.iter().map(Action::name).collect::<Vec<_>>().join(" ")
}

// ---------------------------------------------------------------------------------------------
// Semaphore

/// The semaphore configurations checked exhaustively, with a floor on their state counts:
/// 2 permits, 3 clients, 2 acquisitions each (a client can hold a permit and acquire another),
/// 1 crash, 1 give-up; 3 permits, 3 clients, 1 acquisition each, 1 crash; 3 permits, 2
/// clients, 2 acquisitions each, 1 crash, 1 give-up.
fn sem_configs() -> [(semaphore::Config, usize); 3] {
    let a = semaphore::Config {
        permits: 2,
        clients: 3,
        acquisitions: 2,
        crashes: 1,
        give_ups: 1,
    };
    let b = semaphore::Config {
        permits: 3,
        acquisitions: 1,
        give_ups: 0,
        ..a
    };
    let c = semaphore::Config {
        permits: 3,
        clients: 2,
        ..a
    };
    [(a, 300_000), (b, 100_000), (c, 80_000)]
}

/// The small configuration of the negative controls: 2 permits, 2 clients, 2 acquisitions
/// each, 1 crash, 1 give-up.
fn sem_small() -> semaphore::Config {
    semaphore::Config {
        clients: 2,
        ..sem_configs()[0].0
    }
}

/// S3 as no stuck wait: from every state with a waiter, a grant or a state without waiters is
/// reachable, waiters not crashing.
fn sem_no_stuck_wait(m: &Semaphore) -> graph::Report<Action> {
    let t = Instant::now();
    let r = graph::check(
        m,
        |s: &semaphore::State| s.clients.iter().any(|c| c.waiting()),
        |s| !s.clients.iter().any(|c| c.waiting()),
        |_, a, _| semaphore::grants(a),
        |s, a| !semaphore::waiter_crashes(s, a),
    );
    println!(
        "{:?} no stuck wait: {} states, {} edges, {} with a waiter, {} stuck, {:?}",
        m.variant,
        r.states,
        r.edges,
        r.from,
        r.stuck,
        t.elapsed()
    );
    r
}

/// S3 as no stuck permit: from every state in which a slot has no holder while an acquisition
/// waits that acquires it (`any`: while any acquisition waits), a grant is reachable without
/// any holder releasing or crashing.
fn sem_no_stuck_permit(m: &Semaphore, any: bool) -> graph::Report<Action> {
    let n = m.cfg.permits;
    let t = Instant::now();
    let r = graph::check(
        m,
        |s: &semaphore::State| s.free_permit_while_waiting(n, any),
        |_| false,
        |_, a, _| semaphore::grants(a),
        |_, a| !semaphore::frees_by_holder(a),
    );
    println!(
        "{:?} no stuck permit (any waiter: {any}): {} states, {} edges, {} with a free permit, \
         {} stuck, {:?}",
        m.variant,
        r.states,
        r.edges,
        r.from,
        r.stuck,
        t.elapsed()
    );
    r
}

/// The recipe keeps S1, S2, S4 and FIFO on every reachable state, and no wait and no permit
/// (of the slots the waiter acquires) is stuck.
#[test]
fn semaphore_keeps_every_invariant() {
    for (cfg, floor) in sem_configs() {
        let m = Semaphore::new(semaphore::Variant::Recipe, cfg);
        let states = exhaustive(&format!("semaphore {cfg:?}"), &m);
        assert!(states > floor, "only {states} states: the check is vacuous");
        let r = sem_no_stuck_wait(&m);
        assert_eq!(
            r.stuck,
            0,
            "a stuck wait: {:?}",
            r.stuck_path.map(|p| names(&p))
        );
        let r = sem_no_stuck_permit(&m, true);
        assert!(r.from > 0);
        assert_eq!(
            r.stuck,
            0,
            "a stuck permit: {:?}",
            r.stuck_path.map(|p| names(&p))
        );
    }
}

/// Negative control, and the finding that changed the implementation: an acquisition that
/// registers only on the slots its client did not hold when it started, and not on one the
/// client releases while it waits, waits for the others although that permit is free (until a
/// holder of its slots lets go). The recipe adds the released slot (`semaphore.rs`'s
/// `returned`), which `semaphore_keeps_every_invariant` checks.
#[test]
fn semaphore_without_retarget_ignores_its_own_released_permit() {
    let m = Semaphore::new(semaphore::Variant::NoRetarget, sem_small());
    let r = sem_no_stuck_permit(&m, true);
    let path = r
        .stuck_path
        .expect("a waiter next to a free permit it does not acquire");
    println!(
        "no retarget: {} stuck, first after: {}",
        r.stuck,
        names(&path)
    );
}

/// Negative control: without the per-acquisition turn, two grants of one acquisition run at
/// once and both complete (S2).
#[test]
fn semaphore_without_turn_grants_two_permits() {
    let m = Semaphore::new(semaphore::Variant::NoTurn, sem_small());
    counterexample("semaphore without turn", &m, semaphore::S2);
}

/// Negative control: a granted acquisition that keeps its other registrations until it
/// releases blocks a free permit for a waiter behind it (stuck permit), although every wait
/// still ends once holders release.
#[test]
fn semaphore_without_abandon_strands_a_permit() {
    let m = Semaphore::new(semaphore::Variant::NoAbandon, sem_small());
    let r = sem_no_stuck_permit(&m, false);
    let path = r.stuck_path.expect("a stranded permit");
    println!(
        "no abandon: {} stuck, first after: {}",
        r.stuck,
        names(&path)
    );
    assert_eq!(sem_no_stuck_wait(&m).stuck, 0);
}

/// FIFO: c1 registers on both slots after c0 did, so c0 is ahead in both queues and is granted
/// first. Its exception: an acquisition registered on a subset (c0 holds s0 and acquires s1
/// only) can be passed by a later one (c1 gets s0 when c0 releases it).
#[test]
fn semaphore_fifo_order() {
    use Action::*;
    let m = Semaphore::new(semaphore::Variant::Recipe, sem_configs()[0].0);
    let s0 = Lock::Slot(0);
    let s1 = Lock::Slot(1);
    let full = [
        Register(2, s0),
        Turn(2, 0),
        Grant(2, s0), // c2 holds s0
        Register(0, s0),
        Register(0, s1), // c0 on both slots: head of s1
        Register(1, s0),
        Register(1, s1), // c1 behind c0 in both
        Turn(0, 1),
        Grant(0, s1),
    ];
    let states = graph::replay(&m, &full);
    let end = states.last().unwrap();
    assert_eq!(end.clients[1].acq.as_ref().unwrap().ahead, 0);
    let mid = &states[6];
    assert_eq!(
        mid.clients[1].acq.as_ref().unwrap().ahead,
        1,
        "c0 is ahead of c1"
    );
    // c1 can be granted only once c0 is: in no reachable state of the whole graph is it
    // otherwise (FIFO), checked exhaustively above.

    let subset = [
        Register(0, s0),
        Turn(0, 0),
        Grant(0, s0), // c0 holds s0
        Register(2, s0),
        Register(2, s1),
        Turn(2, 1),
        Grant(2, s1), // c2 holds s1
        Abandon(2, 0),
        Register(0, s1), // c0's second acquisition: s1 only, behind c2
        Register(1, s0),
        Register(1, s1), // c1 on both: behind c0 in s0 and in s1
        Release(0, s0),  // c0 releases s0: c1 is its head
        Turn(1, 0),
        Grant(1, s0), // c1 granted while c0, which waited before it, still waits
    ];
    let states = graph::replay(&m, &subset);
    let end = states.last().unwrap();
    assert!(end.clients[0].waiting() && !end.clients[1].waiting());
    assert!(!end.fifo_broken, "a subset registration is not ahead");
}

// ---------------------------------------------------------------------------------------------
// Read-write lock

/// The read-write lock configurations checked exhaustively, with a floor on their state
/// counts: 2 reader slots; readers c0, c1 and writer c2 with 2 acquisitions each; readers c0,
/// c1 and writers c2, c3 with 1 acquisition each; both with 1 crash and 1 give-up.
fn rw_configs() -> [(rwlock::Config, usize); 2] {
    let a = rwlock::Config {
        slots: 2,
        clients: 3,
        writers: 0b100,
        acquisitions: 2,
        crashes: 1,
        give_ups: 1,
    };
    let b = rwlock::Config {
        clients: 4,
        writers: 0b1100,
        acquisitions: 1,
        ..a
    };
    [(a, 100_000), (b, 30_000)]
}

/// RW2: from every state with a waiter, a grant or a state without waiters is reachable,
/// waiters not crashing.
fn rw_no_stuck_wait(m: &RwLock) -> graph::Report<Action> {
    let t = Instant::now();
    let r = graph::check(
        m,
        |s: &rwlock::State| s.clients.iter().any(|c| c.waiting()),
        |s| !s.clients.iter().any(|c| c.waiting()),
        |s, _, t| rwlock::grants(s, t),
        |s, a| !rwlock::waiter_crashes(s, a),
    );
    println!(
        "{:?} writers {:#b} no stuck wait: {} states, {} edges, {} with a waiter, {} stuck, {:?}",
        m.variant,
        m.cfg.writers,
        r.states,
        r.edges,
        r.from,
        r.stuck,
        t.elapsed()
    );
    r
}

/// The recipe keeps RW1, RW3, RW4 on every reachable state, two readers do overlap, and no
/// wait is stuck (RW2), with a crash and a give-up.
#[test]
fn rwlock_keeps_every_invariant() {
    for (cfg, floor) in rw_configs() {
        let m = RwLock::new(rwlock::Variant::Recipe, cfg);
        let states = exhaustive(&format!("rwlock {cfg:?}"), &m);
        assert!(states > floor, "only {states} states: the check is vacuous");
        let r = rw_no_stuck_wait(&m);
        assert_eq!(
            r.stuck,
            0,
            "a stuck wait: {:?}",
            r.stuck_path.map(|p| names(&p))
        );
    }
}

/// Negative control: writers that take the slots without the gate deadlock (each holds a slot
/// the other waits for).
#[test]
fn rwlock_writers_without_gate_deadlock() {
    // Reader c0, writers c1 and c2, 1 acquisition each, no crash, no give-up.
    let cfg = rwlock::Config {
        writers: 0b110,
        acquisitions: 1,
        crashes: 0,
        give_ups: 0,
        ..rw_configs()[0].0
    };
    let m = RwLock::new(rwlock::Variant::WriterSkipsGate, cfg);
    let r = rw_no_stuck_wait(&m);
    let path = r.stuck_path.expect("a deadlock");
    println!(
        "writers without gate: {} stuck, first after: {}",
        r.stuck,
        names(&path)
    );
}

/// Negative control: a reader that releases the gate before it has its slot lets a writer that
/// reached the gate after it write first (RW3).
#[test]
fn rwlock_reader_releasing_gate_early_breaks_fifo() {
    use Action::*;
    let m = RwLock::new(rwlock::Variant::ReaderEarlyGateRelease, rw_configs()[0].0);
    counterexample("reader releases the gate early", &m, rwlock::RW3);
    // The writer's case: reader c0 passes the gate and lets it go before it has a slot; writer
    // c2, at the gate after it, takes both slots and writes first.
    let path = [
        Register(0, Lock::Gate),
        Grant(0, Lock::Gate),
        Release(0, Lock::Gate),
        Register(2, Lock::Gate),
        Grant(2, Lock::Gate),
        Register(2, Lock::Slot(0)),
        Register(2, Lock::Slot(1)),
        Register(0, Lock::Slot(0)),
        Grant(2, Lock::Slot(0)),
        Grant(2, Lock::Slot(1)),
    ];
    let states = graph::replay(&m, &path);
    let end = states.last().unwrap();
    assert_eq!(end.clients[2].phase, rwlock::Phase::Hold, "c2 writes");
    assert_eq!(
        end.clients[0].phase,
        rwlock::Phase::Acquire,
        "c0, ahead of it, waits"
    );
    assert!(end.rw3_broken);
    // With the recipe, c0 cannot release the gate before it holds a slot.
    let m = RwLock::new(rwlock::Variant::Recipe, rw_configs()[0].0);
    let mut enabled = Vec::new();
    m.actions(&graph::replay(&m, &path[..2])[1], &mut enabled);
    assert!(!enabled.contains(&Release(0, Lock::Gate)));
}

/// Negative control: a writer that takes one slot only overlaps a reader (RW1), so RW1 is not
/// vacuous; that reader holds with a token below the writer's (RW4).
#[test]
fn rwlock_writer_with_one_slot_overlaps_readers() {
    let m = RwLock::new(rwlock::Variant::WriterOneSlot, rw_configs()[0].0);
    counterexample("writer takes one slot", &m, rwlock::RW1);
    // The reader it overlaps has a token below the writer's: a stale reader (RW4's state part
    // is not vacuous either).
    counterexample("writer takes one slot", &m, rwlock::RW4);
}
