//! The read-write lock recipe: a lock `L` with at most `R` readers is a gate (the lock `L`)
//! and `R` reader slots (`L#r0` .. `L#r{R-1}`), each an abstract v2 mutex.
//!
//! A reader acquires the gate, then one reader slot as the semaphore does (registers on every
//! slot, takes its one turn on the first slot it heads, grants or gives up, abandons the rest),
//! then releases the gate, and holds its slot while it reads. Its token is the gate's grant
//! token. A writer acquires the gate, then every reader slot (each on its own, concurrently),
//! holds the gate and every slot while it writes, and releases them all.

use stateright::{Model, Property};

use super::{Action, Lock, Queue, all, bits, head, leave};

/// Which read-write lock the clients run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Variant {
    /// The recipe as the implementation does it.
    Recipe,
    /// Negative control: writers do not take the gate; they register on the slots directly.
    WriterSkipsGate,
    /// Negative control: a reader releases the gate as soon as it is granted, before it has a
    /// slot (it may register on slots before or after).
    ReaderEarlyGateRelease,
    /// Negative control: a writer takes the gate and slot 0 only.
    WriterOneSlot,
}

/// The bounds of one read-write lock model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Config {
    /// Reader slots `R` (≤ 8).
    pub slots: u8,
    /// Client processes (≤ 8).
    pub clients: u8,
    /// The clients that write (bit `c` for client `c`); the others read.
    pub writers: u8,
    /// Acquisitions (reads or writes) per client over the whole run.
    pub acquisitions: u8,
    /// Crashes over the whole run.
    pub crashes: u8,
    /// Grants (of the gate or of a slot) that give up over the whole run.
    pub give_ups: u8,
}

/// The model of a read-write lock under one configuration.
#[derive(Clone, Debug)]
pub struct RwLock {
    /// Recipe or negative control.
    pub variant: Variant,
    /// The bounds.
    pub cfg: Config,
}

/// Where a client is in one acquisition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// No acquisition.
    Idle,
    /// Registered at the gate, not granted.
    Gate,
    /// Granted the gate (unless it skipped or released it), acquiring slots.
    Acquire,
    /// Granted: a reader holds a slot (and may still hold the gate and have registrations to
    /// abandon), a writer holds the gate and every slot (it writes).
    Hold,
}

/// A client process: one acquisition at a time.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Client {
    /// Acquisitions started.
    pub acqs: u8,
    /// Its phase.
    pub phase: Phase,
    /// It holds the gate.
    pub gate: bool,
    /// The slots it has a consumer registered on (not granted).
    pub reg: u8,
    /// The slots it holds.
    pub held: u8,
    /// A reader's turn: the slot whose grant is running.
    pub turn: Option<u8>,
    /// Its gate grant's token (0 before the gate grant, and for a writer skipping the gate).
    pub token: u8,
    /// Ghost (RW3): the clients that reached the gate before it and were not granted (nor
    /// crashed or gave up the gate) since.
    pub ahead: u8,
}

impl Client {
    /// Whether it waits (at the gate or for slots).
    pub fn waiting(&self) -> bool {
        matches!(self.phase, Phase::Gate | Phase::Acquire)
    }
}

/// The global state.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct State {
    /// The gate's queue.
    pub gate: Queue,
    /// One queue per reader slot.
    pub slots: Vec<Queue>,
    /// The clients.
    pub clients: Vec<Client>,
    /// Crashes still allowed.
    pub crashes_left: u8,
    /// Give-ups still allowed.
    pub give_ups_left: u8,
    /// Gate grants so far: the gate's last token (tokens increase per grant, F1 of the gate).
    pub tokens: u8,
    /// The token of the last writer granted (0: none).
    pub last_write: u8,
    /// Ghost: a client was granted while one that reached the gate before it waited (RW3).
    pub rw3_broken: bool,
    /// Ghost: a writer was granted the gate with a token not above a reader's (RW4).
    pub rw4_broken: bool,
}

/// RW1: a writer that writes overlaps no reader and no other writer; every lock has at most one
/// holder, its head.
pub const RW1: &str = "RW1 writers exclusive";
/// RW3: no acquisition is granted while one that reached the gate before it still waits.
pub const RW3: &str = "RW3 FIFO at the gate";
/// RW4: writers' tokens are above the tokens of readers granted the gate before them, and a
/// reader that holds a slot has a token above the last writer's.
pub const RW4: &str = "RW4 reader tokens below later writers'";
/// The queues and the clients agree (no leaked registration after a crash).
pub const NO_LEAK: &str = "RW no leaked lock";
/// Sanity: two readers hold slots at once (checked with 2 readers and 2 slots).
pub const TWO_READERS: &str = "sanity: two readers overlap";
/// Sanity: a writer writes (checked with a writer).
pub const WRITES: &str = "sanity: a writer writes";

impl RwLock {
    /// A model of `variant` under `cfg`.
    pub fn new(variant: Variant, cfg: Config) -> Self {
        RwLock { variant, cfg }
    }

    /// Whether client `c` writes.
    pub fn writer(&self, c: usize) -> bool {
        self.cfg.writers & (1 << c) != 0
    }

    /// The slots client `c` needs: one of all for a reader, all of them for a writer.
    fn wanted(&self, c: usize) -> u8 {
        if self.writer(c) && self.variant == Variant::WriterOneSlot {
            1
        } else {
            all(self.cfg.slots)
        }
    }

    fn skips_gate(&self, c: usize) -> bool {
        self.writer(c) && self.variant == Variant::WriterSkipsGate
    }
}

impl State {
    /// The clients waiting at the gate or acquiring slots, other than `c`.
    fn arrived_before(&self, c: usize) -> u8 {
        (0..self.clients.len())
            .filter(|o| *o != c && self.clients[*o].waiting())
            .fold(0, |m, o| m | (1 << o))
    }

    fn forget_ahead(&mut self, c: u8) {
        for o in &mut self.clients {
            o.ahead &= !(1 << c);
        }
    }
}

/// RW1 on one state.
pub fn rw1(m: &RwLock, s: &State) -> bool {
    let one_holder = |q: &Queue, holders: Vec<usize>| {
        holders.is_empty() || (holders.len() == 1 && head(q) == Some(holders[0] as u8))
    };
    let n = s.clients.len();
    let gate_ok = one_holder(&s.gate, (0..n).filter(|c| s.clients[*c].gate).collect());
    let slots_ok = s.slots.iter().enumerate().all(|(i, q)| {
        one_holder(
            q,
            (0..n)
                .filter(|c| s.clients[*c].held & (1 << i) != 0)
                .collect(),
        )
    });
    let writers_alone = (0..n).all(|w| {
        !(m.writer(w) && s.clients[w].phase == Phase::Hold)
            || (0..n).all(|o| o == w || s.clients[o].held == 0)
    });
    gate_ok && slots_ok && writers_alone
}

/// RW4's state part: a reader that holds a slot has a token above the last writer's.
pub fn rw4(m: &RwLock, s: &State) -> bool {
    !s.rw4_broken
        && s.clients
            .iter()
            .enumerate()
            .all(|(c, cl)| m.writer(c) || cl.held == 0 || cl.token > s.last_write)
}

/// The queues and the clients agree.
pub fn no_leak(s: &State) -> bool {
    let gate_ok = s.clients.iter().enumerate().all(|(c, cl)| {
        let owns = cl.gate || cl.phase == Phase::Gate;
        s.gate.iter().filter(|x| usize::from(**x) == c).count() == usize::from(owns)
    });
    gate_ok
        && s.slots.iter().enumerate().all(|(i, q)| {
            let bit = 1u8 << i;
            s.clients.iter().enumerate().all(|(c, cl)| {
                let owns = (cl.held | cl.reg) & bit != 0;
                q.iter().filter(|x| usize::from(**x) == c).count() == usize::from(owns)
                    && cl.held & cl.reg & bit == 0
            })
        })
}

impl Model for RwLock {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        vec![State {
            gate: Vec::new(),
            slots: vec![Vec::new(); usize::from(self.cfg.slots)],
            clients: vec![
                Client {
                    acqs: 0,
                    phase: Phase::Idle,
                    gate: false,
                    reg: 0,
                    held: 0,
                    turn: None,
                    token: 0,
                    ahead: 0,
                };
                usize::from(self.cfg.clients)
            ],
            crashes_left: self.cfg.crashes,
            give_ups_left: self.cfg.give_ups,
            tokens: 0,
            last_write: 0,
            rw3_broken: false,
            rw4_broken: false,
        }]
    }

    fn actions(&self, s: &State, out: &mut Vec<Action>) {
        for (c, cl) in s.clients.iter().enumerate() {
            let ci = c as u8;
            let writer = self.writer(c);
            let give_up = s.give_ups_left > 0;
            match cl.phase {
                Phase::Idle if cl.acqs < self.cfg.acquisitions => {
                    if self.skips_gate(c) {
                        for i in bits(self.wanted(c)) {
                            out.push(Action::Register(ci, Lock::Slot(i)));
                        }
                    } else {
                        out.push(Action::Register(ci, Lock::Gate));
                    }
                }
                Phase::Idle => {}
                Phase::Gate => {
                    if head(&s.gate) == Some(ci) {
                        out.push(Action::Grant(ci, Lock::Gate));
                        if give_up {
                            out.push(Action::GiveUp(ci, Lock::Gate));
                        }
                    }
                }
                Phase::Acquire => {
                    let early = !writer && self.variant == Variant::ReaderEarlyGateRelease;
                    if early && cl.gate {
                        out.push(Action::Release(ci, Lock::Gate));
                    }
                    for i in bits(self.wanted(c) & !cl.reg & !cl.held) {
                        out.push(Action::Register(ci, Lock::Slot(i)));
                    }
                    for i in bits(cl.reg) {
                        let is_head = head(&s.slots[usize::from(i)]) == Some(ci);
                        if writer {
                            if is_head {
                                out.push(Action::Grant(ci, Lock::Slot(i)));
                                if give_up {
                                    out.push(Action::GiveUp(ci, Lock::Slot(i)));
                                }
                            }
                        } else if cl.turn.is_none() && is_head {
                            out.push(Action::Turn(ci, i));
                        }
                    }
                    if let Some(i) = cl.turn {
                        out.push(Action::Grant(ci, Lock::Slot(i)));
                        if give_up {
                            out.push(Action::GiveUp(ci, Lock::Slot(i)));
                        }
                    }
                }
                Phase::Hold if writer => out.push(Action::ReleaseAll(ci)),
                Phase::Hold => {
                    for i in bits(cl.reg) {
                        out.push(Action::Abandon(ci, i));
                    }
                    if cl.gate {
                        out.push(Action::Release(ci, Lock::Gate));
                    } else {
                        for i in bits(cl.held) {
                            out.push(Action::Release(ci, Lock::Slot(i)));
                        }
                    }
                }
            }
            if s.crashes_left > 0 && cl.phase != Phase::Idle {
                out.push(Action::Crash(ci));
            }
        }
    }

    fn next_state(&self, last: &State, a: Action) -> Option<State> {
        let mut s = last.clone();
        let c = a.client();
        let cu = usize::from(c);
        let writer = self.writer(cu);
        match a {
            Action::Register(_, Lock::Gate) => {
                let ahead = s.arrived_before(cu);
                let cl = &mut s.clients[cu];
                cl.acqs += 1;
                cl.phase = Phase::Gate;
                cl.ahead = ahead;
                s.gate.push(c);
            }
            Action::Register(_, Lock::Slot(i)) => {
                let cl = &mut s.clients[cu];
                if cl.phase == Phase::Idle {
                    // A writer that skips the gate.
                    cl.acqs += 1;
                    cl.phase = Phase::Acquire;
                    cl.token = 0;
                    cl.ahead = 0;
                }
                cl.reg |= 1 << i;
                s.slots[usize::from(i)].push(c);
            }
            Action::Grant(_, Lock::Gate) => {
                s.tokens += 1;
                let token = s.tokens;
                if writer
                    && s.clients
                        .iter()
                        .enumerate()
                        .any(|(o, r)| !self.writer(o) && r.phase != Phase::Idle && r.token >= token)
                {
                    s.rw4_broken = true;
                }
                let cl = &mut s.clients[cu];
                cl.gate = true;
                cl.phase = Phase::Acquire;
                cl.token = token;
            }
            Action::GiveUp(_, Lock::Gate) => {
                s.give_ups_left -= 1;
                // The gate's grant gave up: the mutex acquisition registers again, at the back.
                leave(&mut s.gate, c);
                s.gate.push(c);
                s.forget_ahead(c);
                // Everyone waiting now arrived before it.
                s.clients[cu].ahead = s.arrived_before(cu);
            }
            Action::Turn(_, i) => s.clients[cu].turn = Some(i),
            Action::Grant(_, Lock::Slot(i)) => {
                let wanted = self.wanted(cu);
                let cl = &mut s.clients[cu];
                cl.reg &= !(1 << i);
                cl.held |= 1 << i;
                cl.turn = None;
                if !writer || cl.held == wanted {
                    cl.phase = Phase::Hold;
                    let (ahead, token) = (cl.ahead, cl.token);
                    if writer {
                        s.last_write = token;
                    }
                    s.rw3_broken |= ahead != 0;
                    s.forget_ahead(c);
                }
            }
            Action::GiveUp(_, Lock::Slot(i)) => {
                s.give_ups_left -= 1;
                let cl = &mut s.clients[cu];
                cl.reg &= !(1 << i);
                cl.turn = None;
                leave(&mut s.slots[usize::from(i)], c);
            }
            Action::Abandon(_, i) => {
                s.clients[cu].reg &= !(1 << i);
                leave(&mut s.slots[usize::from(i)], c);
            }
            Action::Release(_, Lock::Gate) => {
                s.clients[cu].gate = false;
                leave(&mut s.gate, c);
            }
            Action::Release(_, Lock::Slot(i)) => {
                s.clients[cu].held &= !(1 << i);
                leave(&mut s.slots[usize::from(i)], c);
            }
            Action::ReleaseAll(_) | Action::Crash(_) => {
                if matches!(a, Action::Crash(_)) {
                    s.crashes_left -= 1;
                    s.forget_ahead(c);
                }
                leave(&mut s.gate, c);
                for q in &mut s.slots {
                    leave(q, c);
                }
                let cl = &mut s.clients[cu];
                cl.phase = Phase::Idle;
                cl.gate = false;
                cl.reg = 0;
                cl.held = 0;
                cl.turn = None;
                cl.ahead = 0;
            }
        }
        let cl = &mut s.clients[cu];
        if cl.phase == Phase::Hold && cl.held == 0 && cl.reg == 0 && !cl.gate {
            cl.phase = Phase::Idle;
        }
        if cl.phase == Phase::Idle {
            cl.token = 0;
        }
        Some(s)
    }

    fn format_action(&self, a: &Action) -> String {
        a.name()
    }

    fn properties(&self) -> Vec<Property<Self>> {
        let readers = self.cfg.clients - self.cfg.writers.count_ones() as u8;
        let mut ps = vec![
            Property::always(RW1, rw1),
            Property::always(RW3, |_, s: &State| !s.rw3_broken),
            Property::always(RW4, rw4),
            Property::always(NO_LEAK, |_, s: &State| no_leak(s)),
        ];
        if readers >= 2 && self.cfg.slots >= 2 {
            ps.push(Property::sometimes(TWO_READERS, |m: &RwLock, s: &State| {
                (0..s.clients.len())
                    .filter(|c| !m.writer(*c) && s.clients[*c].held != 0)
                    .count()
                    >= 2
            }));
        }
        if self.cfg.writers != 0 {
            ps.push(Property::sometimes(WRITES, |m: &RwLock, s: &State| {
                (0..s.clients.len()).any(|c| m.writer(c) && s.clients[c].phase == Phase::Hold)
            }));
        }
        ps
    }
}

/// Whether the step from `s` to `t` grants an acquisition (a reader its slot, a writer its last
/// slot).
pub fn grants(s: &State, t: &State) -> bool {
    s.clients
        .iter()
        .zip(&t.clients)
        .any(|(a, b)| a.phase != Phase::Hold && b.phase == Phase::Hold)
}

/// Whether step `a` from `s` is a waiting client's crash (the wait ends without a grant).
pub fn waiter_crashes(s: &State, a: &Action) -> bool {
    matches!(a, Action::Crash(c) if s.clients[usize::from(*c)].waiting())
}
