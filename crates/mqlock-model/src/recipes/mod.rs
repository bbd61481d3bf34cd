//! A model check of two recipes built on the mutex: the counting **semaphore** (N slot locks)
//! and the **read-write lock** (a gate lock plus a semaphore of reader slots).
//!
//! Each lock the recipes use (a semaphore slot, the gate, a reader slot) is modelled as an
//! abstract v2 mutex: a FIFO queue of registered consumers whose head (the single active
//! consumer) is the only one that can be granted, and which moves on only when the head's
//! channel closes (release, crash, abandoned registration, a grant that gives up). Those are
//! the guarantees the v2 model (`crate::v2`, `tests/protocols.rs`) checks for one lock (M1, F1,
//! L2, LV), so leases, registers and partitions are not modelled again here; this model checks
//! how the recipes compose those mutexes.
//!
//! See docs/model.md, "Recipes", for the actions, properties and bounds.

/// The liveness analysis, shared with the mutex's (`crate::liveness`).
pub use crate::graph;
pub mod rwlock;
pub mod semaphore;

/// A lock a recipe uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Lock {
    /// The read-write lock's gate (lock `L`).
    Gate,
    /// Slot `i`: a semaphore's slot (`S` for 0, `S#i`), or a reader slot (`L#r{i}`).
    Slot(u8),
}

/// One step of a recipe model. The first field is the client (process) that takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// `recipes::Register`: the client's acquisition registers a consumer on the lock (opens a
    /// channel, declares, consumes); it joins the back of the lock's queue.
    Register(u8, Lock),
    /// `recipes::Turn`: the acquisition is the head (active consumer) of the slot and takes its
    /// one turn: the slot's grant starts (semaphore, reader).
    Turn(u8, u8),
    /// `recipes::Grant`: the lock's grant completes: the client holds it.
    Grant(u8, Lock),
    /// `recipes::GiveUp`: the lock's grant gives up (v2: a grant that completes too late): the
    /// registration's channel closes, the acquisition may register again at the back.
    GiveUp(u8, Lock),
    /// `recipes::Abandon`: after a grant, the acquisition closes a registration it no longer
    /// needs (another slot).
    Abandon(u8, u8),
    /// `recipes::Release`: the holder releases (closes) one lock.
    Release(u8, Lock),
    /// `recipes::ReleaseAll`: a writer releases the gate and every reader slot.
    ReleaseAll(u8),
    /// `recipes::Crash`: the client process dies: every channel it has closes.
    Crash(u8),
}

impl Action {
    /// The stable name of the action, e.g. `recipes::Register(c0,s1)` or
    /// `recipes::Grant(c2,gate)`; `sI` is slot I (semaphore: lock `S` for 0, `S#I`; read-write
    /// lock: reader slot `L#rI`).
    pub fn name(&self) -> String {
        fn lock(l: Lock) -> String {
            match l {
                Lock::Gate => "gate".into(),
                Lock::Slot(i) => format!("s{i}"),
            }
        }
        match *self {
            Action::Register(c, l) => format!("recipes::Register(c{c},{})", lock(l)),
            Action::Turn(c, i) => format!("recipes::Turn(c{c},s{i})"),
            Action::Grant(c, l) => format!("recipes::Grant(c{c},{})", lock(l)),
            Action::GiveUp(c, l) => format!("recipes::GiveUp(c{c},{})", lock(l)),
            Action::Abandon(c, i) => format!("recipes::Abandon(c{c},s{i})"),
            Action::Release(c, l) => format!("recipes::Release(c{c},{})", lock(l)),
            Action::ReleaseAll(c) => format!("recipes::ReleaseAll(c{c})"),
            Action::Crash(c) => format!("recipes::Crash(c{c})"),
        }
    }

    /// The client that takes the step.
    pub fn client(&self) -> u8 {
        match *self {
            Action::Register(c, _)
            | Action::Turn(c, _)
            | Action::Grant(c, _)
            | Action::GiveUp(c, _)
            | Action::Abandon(c, _)
            | Action::Release(c, _)
            | Action::ReleaseAll(c)
            | Action::Crash(c) => c,
        }
    }
}

/// The lock queue of one abstract mutex: the registered consumers (clients), head first. The
/// head is the single active consumer; it is the holder once granted.
pub type Queue = Vec<u8>;

/// The head (active consumer) of `q`.
pub fn head(q: &Queue) -> Option<u8> {
    q.first().copied()
}

/// Client `c`'s consumer leaves `q` (its channel closed); the next one is the head at once.
pub fn leave(q: &mut Queue, c: u8) {
    q.retain(|x| *x != c);
}

/// The slots of a bit set, lowest first.
pub fn bits(mask: u8) -> impl Iterator<Item = u8> {
    (0..8u8).filter(move |i| mask & (1 << i) != 0)
}

/// The bit set of `n` slots.
pub fn all(n: u8) -> u8 {
    ((1u16 << n) - 1) as u8
}
