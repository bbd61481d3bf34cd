//! The semaphore recipe: a semaphore `S` with `N` permits is `N` slot locks (slot 0 is the lock
//! `S`, slot `i` the lock `S#i`), each an abstract v2 mutex (a FIFO queue of consumers).
//!
//! An acquisition registers a consumer on every slot its client does not already hold (the
//! lowest first, the others in any order); the first slot on which it is the head and takes
//! the acquisition's one turn starts its grant; a grant either completes (the client holds that
//! slot, and the acquisition abandons its other registrations) or gives up (that registration
//! closes; the acquisition may register there again, at the back). A holder releases its slot
//! at any time; a crash closes every channel of the client.

use stateright::{Model, Property};

use super::{Action, Lock, Queue, all, bits, head, leave};

/// Which semaphore the clients run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Variant {
    /// The recipe as the implementation does it: a slot its client releases while the client's
    /// acquisition waits is added to that acquisition's slots (it registers there too).
    Recipe,
    /// Negative control: no per-acquisition turn; every slot on which the acquisition is the
    /// head starts its grant, and grants already running complete after the first one.
    NoTurn,
    /// Negative control: a granted acquisition abandons its other registrations only once it
    /// released its permit.
    NoAbandon,
    /// Negative control, the first implementation: a slot its client releases while the
    /// client's acquisition waits is not added to that acquisition's slots.
    NoRetarget,
}

/// The bounds of one semaphore model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Config {
    /// Permits (slot locks), `N` ≤ 8.
    pub permits: u8,
    /// Client processes (≤ 8).
    pub clients: u8,
    /// Acquisitions per client over the whole run.
    pub acquisitions: u8,
    /// Crashes over the whole run.
    pub crashes: u8,
    /// Grants that give up over the whole run.
    pub give_ups: u8,
}

/// The model of a semaphore under one configuration.
#[derive(Clone, Debug)]
pub struct Semaphore {
    /// Recipe or negative control.
    pub variant: Variant,
    /// The bounds.
    pub cfg: Config,
}

/// A client's acquisition in progress (at most one per client; it may hold permits of earlier
/// acquisitions).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Acq {
    /// The slots it acquires: those its client did not hold when it started.
    pub targets: u8,
    /// The slots it has a consumer registered on (not granted yet).
    pub reg: u8,
    /// The slots whose grant is running (the turn: at most one, except in `NoTurn`).
    pub turn: u8,
    /// The slot it was granted, once it was.
    pub granted: Option<u8>,
    /// One of its grants gave up (it lost its place in that slot's queue).
    pub gave_up: bool,
    /// Ghost (FIFO): the clients whose acquisition was registered on every slot when this one
    /// started and has not been granted, crashed or given up since.
    pub ahead: u8,
}

/// A client process.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Client {
    /// Acquisitions started.
    pub acqs: u8,
    /// The slots it holds (each from a separate acquisition).
    pub holds: u8,
    /// Its acquisition in progress (waiting, or granted with registrations left to abandon).
    pub acq: Option<Acq>,
}

impl Client {
    /// Whether it waits: an acquisition not granted yet.
    pub fn waiting(&self) -> bool {
        self.acq.as_ref().is_some_and(|a| a.granted.is_none())
    }
}

/// The global state.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct State {
    /// One queue per slot.
    pub queues: Vec<Queue>,
    /// The clients.
    pub clients: Vec<Client>,
    /// Crashes still allowed.
    pub crashes_left: u8,
    /// Give-ups still allowed.
    pub give_ups_left: u8,
    /// Ghost: an acquisition was granted a second slot (S2 broken).
    pub s2_broken: bool,
    /// Ghost: an acquisition was granted while an acquisition registered on every slot before
    /// it started still waited without having given up (FIFO broken).
    pub fifo_broken: bool,
}

impl State {
    /// The holder of slot `i`, if any.
    pub fn holder(&self, i: u8) -> Option<u8> {
        (0..self.clients.len() as u8).find(|c| self.clients[usize::from(*c)].holds & (1 << i) != 0)
    }

    /// Whether client `c`'s acquisition is registered on every slot and never gave up.
    fn full(&self, c: usize, n: u8) -> bool {
        self.clients[c]
            .acq
            .as_ref()
            .is_some_and(|a| a.granted.is_none() && !a.gave_up && a.reg == all(n))
    }

    /// Client `c` loses its place: it is no longer ahead of anyone.
    fn forget_ahead(&mut self, c: u8) {
        for o in &mut self.clients {
            if let Some(a) = &mut o.acq {
                a.ahead &= !(1 << c);
            }
        }
    }

    /// A slot without holder that some waiting acquisition acquires (`targets` only: `any`
    /// = false) or that some client waits while it is free (`any` = true).
    pub fn free_permit_while_waiting(&self, n: u8, any: bool) -> bool {
        (0..n).any(|i| {
            self.holder(i).is_none()
                && self.clients.iter().any(|c| {
                    c.acq
                        .as_ref()
                        .is_some_and(|a| a.granted.is_none() && (any || a.targets & (1 << i) != 0))
                })
        })
    }
}

/// S1: at most one holder per slot, and it is the slot's head (so at most N holders).
pub const S1: &str = "S1 one holder per slot, at most N";
/// S2: no acquisition is granted two slots.
pub const S2: &str = "S2 one permit per acquisition";
/// S4: every consumer in a slot queue belongs to a live holder or acquisition, and vice versa
/// (a crashed client leaves nothing behind).
pub const S4: &str = "S4 no leaked permit";
/// FIFO: an acquisition registered on every slot is granted before any acquisition that
/// started after that, unless it gave up a grant.
pub const FIFO: &str = "FIFO full registrations first";
/// Sanity: every permit is held.
pub const ALL_HELD: &str = "sanity: all permits held";
/// Sanity: a client holds two permits (two acquisitions; checked with 2 acquisitions per client).
pub const TWO_HELD: &str = "sanity: a client holds two permits";
/// Sanity: an acquisition waits behind one that was registered on every slot when it started.
pub const QUEUED: &str = "sanity: a full waiter ahead of another waiter";

impl Semaphore {
    /// A model of `variant` under `cfg`.
    pub fn new(variant: Variant, cfg: Config) -> Self {
        Semaphore { variant, cfg }
    }

    fn n(&self) -> u8 {
        self.cfg.permits
    }
}

/// S1 on one state.
pub fn s1(s: &State) -> bool {
    s.queues.iter().enumerate().all(|(i, q)| {
        let holders: Vec<u8> = (0..s.clients.len() as u8)
            .filter(|c| s.clients[usize::from(*c)].holds & (1 << i) != 0)
            .collect();
        holders.is_empty() || (holders.len() == 1 && head(q) == Some(holders[0]))
    })
}

/// S4 on one state: the queues and the clients agree.
pub fn s4(s: &State) -> bool {
    s.queues.iter().enumerate().all(|(i, q)| {
        let bit = 1u8 << i;
        s.clients.iter().enumerate().all(|(c, cl)| {
            let reg = cl.acq.as_ref().map_or(0, |a| a.reg);
            let owns = (cl.holds | reg) & bit != 0;
            let n = q.iter().filter(|x| usize::from(**x) == c).count();
            n == usize::from(owns) && (cl.holds & reg & bit == 0)
        })
    })
}

impl Model for Semaphore {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        let n = usize::from(self.cfg.clients);
        vec![State {
            queues: vec![Vec::new(); usize::from(self.n())],
            clients: vec![
                Client {
                    acqs: 0,
                    holds: 0,
                    acq: None,
                };
                n
            ],
            crashes_left: self.cfg.crashes,
            give_ups_left: self.cfg.give_ups,
            s2_broken: false,
            fifo_broken: false,
        }]
    }

    fn actions(&self, s: &State, out: &mut Vec<Action>) {
        let n = self.n();
        for (c, cl) in s.clients.iter().enumerate() {
            let ci = c as u8;
            match &cl.acq {
                None => {
                    let free = all(n) & !cl.holds;
                    if cl.acqs < self.cfg.acquisitions && free != 0 {
                        out.push(Action::Register(
                            ci,
                            Lock::Slot(free.trailing_zeros() as u8),
                        ));
                    }
                }
                Some(a) => {
                    if a.granted.is_none() {
                        for i in bits(a.targets & !a.reg) {
                            out.push(Action::Register(ci, Lock::Slot(i)));
                        }
                        let may_turn = a.turn == 0 || self.variant == Variant::NoTurn;
                        for i in bits(a.reg & !a.turn) {
                            if may_turn && head(&s.queues[usize::from(i)]) == Some(ci) {
                                out.push(Action::Turn(ci, i));
                            }
                        }
                    }
                    for i in bits(a.turn) {
                        out.push(Action::Grant(ci, Lock::Slot(i)));
                        if s.give_ups_left > 0 {
                            out.push(Action::GiveUp(ci, Lock::Slot(i)));
                        }
                    }
                    if let Some(g) = a.granted {
                        let may_abandon =
                            self.variant != Variant::NoAbandon || cl.holds & (1 << g) == 0;
                        if may_abandon {
                            for i in bits(a.reg & !a.turn) {
                                out.push(Action::Abandon(ci, i));
                            }
                        }
                    }
                }
            }
            for i in bits(cl.holds) {
                out.push(Action::Release(ci, Lock::Slot(i)));
            }
            if s.crashes_left > 0 && (cl.acq.is_some() || cl.holds != 0) {
                out.push(Action::Crash(ci));
            }
        }
    }

    fn next_state(&self, last: &State, a: Action) -> Option<State> {
        let n = self.n();
        let mut s = last.clone();
        let c = a.client();
        let cu = usize::from(c);
        match a {
            Action::Register(_, Lock::Slot(i)) => {
                if s.clients[cu].acq.is_none() {
                    let ahead = (0..s.clients.len())
                        .filter(|o| *o != cu && s.full(*o, n))
                        .fold(0u8, |m, o| m | (1 << o));
                    let cl = &mut s.clients[cu];
                    cl.acqs += 1;
                    cl.acq = Some(Acq {
                        targets: all(n) & !cl.holds,
                        reg: 0,
                        turn: 0,
                        granted: None,
                        gave_up: false,
                        ahead,
                    });
                }
                s.clients[cu].acq.as_mut()?.reg |= 1 << i;
                s.queues[usize::from(i)].push(c);
            }
            Action::Turn(_, i) => s.clients[cu].acq.as_mut()?.turn |= 1 << i,
            Action::Grant(_, Lock::Slot(i)) => {
                let acq = s.clients[cu].acq.as_mut()?;
                acq.turn &= !(1 << i);
                acq.reg &= !(1 << i);
                let first = acq.granted.is_none();
                acq.granted.get_or_insert(i);
                let ahead = acq.ahead;
                s.clients[cu].holds |= 1 << i;
                if first {
                    s.fifo_broken |= ahead != 0;
                    s.forget_ahead(c);
                } else {
                    s.s2_broken = true;
                }
            }
            Action::GiveUp(_, Lock::Slot(i)) => {
                let acq = s.clients[cu].acq.as_mut()?;
                acq.turn &= !(1 << i);
                acq.reg &= !(1 << i);
                acq.gave_up = true;
                s.give_ups_left -= 1;
                leave(&mut s.queues[usize::from(i)], c);
                s.forget_ahead(c);
            }
            Action::Abandon(_, i) => {
                s.clients[cu].acq.as_mut()?.reg &= !(1 << i);
                leave(&mut s.queues[usize::from(i)], c);
            }
            Action::Release(_, Lock::Slot(i)) => {
                let cl = &mut s.clients[cu];
                cl.holds &= !(1 << i);
                if self.variant != Variant::NoRetarget
                    && let Some(acq) = &mut cl.acq
                    && acq.granted.is_none()
                {
                    acq.targets |= 1 << i;
                }
                leave(&mut s.queues[usize::from(i)], c);
            }
            Action::Crash(_) => {
                s.crashes_left -= 1;
                let cl = &mut s.clients[cu];
                cl.holds = 0;
                cl.acq = None;
                for q in &mut s.queues {
                    leave(q, c);
                }
                s.forget_ahead(c);
            }
            _ => return None,
        }
        // An acquisition is over once it was granted and closed every other registration.
        let cl = &mut s.clients[cu];
        if cl
            .acq
            .as_ref()
            .is_some_and(|a| a.granted.is_some() && a.reg == 0 && a.turn == 0)
        {
            cl.acq = None;
        }
        Some(s)
    }

    fn format_action(&self, a: &Action) -> String {
        a.name()
    }

    fn properties(&self) -> Vec<Property<Self>> {
        let mut ps = vec![
            Property::always(S1, |_, s: &State| s1(s)),
            Property::always(S2, |_, s: &State| !s.s2_broken),
            Property::always(S4, |_, s: &State| s4(s)),
            Property::always(FIFO, |_, s: &State| !s.fifo_broken),
            Property::sometimes(ALL_HELD, |m: &Semaphore, s: &State| {
                (0..m.n()).all(|i| s.holder(i).is_some())
            }),
            Property::sometimes(QUEUED, |_, s: &State| {
                s.clients
                    .iter()
                    .any(|c| c.acq.as_ref().is_some_and(|a| a.ahead != 0))
            }),
        ];
        if self.cfg.acquisitions >= 2 {
            ps.push(Property::sometimes(TWO_HELD, |_, s: &State| {
                s.clients.iter().any(|c| c.holds.count_ones() >= 2)
            }));
        }
        ps
    }
}

/// Whether step `a` from `s` is a grant (a client's acquisition gets its permit).
pub fn grants(a: &Action) -> bool {
    matches!(a, Action::Grant(..))
}

/// Whether step `a` from `s` is a waiting client's crash (the wait ends without a grant).
pub fn waiter_crashes(s: &State, a: &Action) -> bool {
    matches!(a, Action::Crash(c) if s.clients[usize::from(*c)].waiting())
}

/// Whether step `a` frees a permit by a holder's release or crash.
pub fn frees_by_holder(a: &Action) -> bool {
    matches!(a, Action::Release(..) | Action::Crash(..))
}
