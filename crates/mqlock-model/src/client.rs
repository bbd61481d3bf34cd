//! A client's local state, shared by the v1 and v2 state machines.

use crate::types::{Delivery, Token};

/// Where a client is in its acquire / grant / hold cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// No channel open.
    Idle,
    /// Consumer registered, waiting for the first delivery.
    Waiting,
    /// First delivery received: the registers must be read.
    ReadFence,
    /// The register had no value: an epoch must be started.
    NeedEpoch,
    /// The new epoch `e` was published; waiting for its confirm.
    AwaitEpoch {
        /// The new epoch.
        e: u8,
    },
    /// The token was published (v2: with `R0`); waiting for the confirm(s).
    AwaitFence {
        /// The token being granted.
        token: Token,
        /// v2: when `R0` was sent (0 in v1).
        t0: u8,
    },
    /// Granted (the client returned the guard).
    Holding {
        /// Its fencing token.
        token: Token,
        /// Its lease deadline: it believes it holds while `clock < deadline`.
        deadline: u8,
    },
}

/// One client: at most one lock channel at a time.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Client {
    /// Acquisitions started so far; the current channel is `(client, acq)`.
    pub acq: u8,
    /// Its phase.
    pub phase: Phase,
    /// Deliveries received and not processed yet (processed in the waiting and holding phases).
    pub inbox: Vec<Delivery>,
    /// The delivery it keeps unacknowledged (the first delivery, then v2's latest own renewal).
    pub held: Option<Delivery>,
    /// Publisher confirms received in the current phase (bits of [`crate::types::confirm`]).
    pub confirms: u8,
    /// Wake-ups it may still publish as nudges (a bound of the model).
    pub nudges_left: u8,
    /// v2: renewals it may still publish (a bound of the model).
    pub renewals_left: u8,
    /// v2: the number of renewals published in the current holding (the next renewal's `n`).
    pub renewal_n: u8,
    /// v2: a published renewal waiting for its confirm, with the time it was sent.
    pub renew_sent: Option<u8>,
    /// v2 with parking: the holder is parked since this time (`None`: in use, or not holding).
    pub parked: Option<u8>,
    /// v2 with parking: a waiter's wake-up reached the holder while in use, so `v2::Park`
    /// closes instead of parking.
    pub wanted: bool,
}

impl Client {
    /// A fresh idle client.
    pub fn new(nudges: u8, renewals: u8) -> Self {
        Client {
            acq: 0,
            phase: Phase::Idle,
            inbox: Vec::new(),
            held: None,
            confirms: 0,
            nudges_left: nudges,
            renewals_left: renewals,
            renewal_n: 0,
            renew_sent: None,
            parked: None,
            wanted: false,
        }
    }

    /// Whether it has a lock channel open.
    pub fn open(&self) -> bool {
        self.phase != Phase::Idle
    }

    /// Whether it is trying to get the lock (consumer registered, not granted yet).
    pub fn waiting(&self) -> bool {
        !matches!(self.phase, Phase::Idle | Phase::Holding { .. })
    }

    /// Belief: granted, not lost (still holding) and `clock < deadline`. A parked holder
    /// believes it holds too: its client takes the lock back with no broker step.
    pub fn believes(&self, clock: u8) -> bool {
        matches!(self.phase, Phase::Holding { deadline, .. } if clock < deadline)
    }

    /// The token it holds, if it is in the holding phase.
    pub fn token(&self) -> Option<Token> {
        match self.phase {
            Phase::Holding { token, .. } => Some(token),
            _ => None,
        }
    }

    /// Forgets everything about the closed channel and goes idle.
    pub fn reset(&mut self) {
        self.phase = Phase::Idle;
        self.inbox.clear();
        self.held = None;
        self.confirms = 0;
        self.renewal_n = 0;
        self.renew_sent = None;
        self.parked = None;
        self.wanted = false;
    }
}
