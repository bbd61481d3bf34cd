//! The stateright [`Model`]: global state, the actions, and the steps shared by both
//! protocols (time, partitions, the broker's own steps, acquiring, nudging, closing).

use stateright::{Model, Property};

use crate::broker::{Broker, Op};
use crate::client::{Client, Phase};
use crate::types::{ChanId, MsgKind, Token};
use crate::{properties, v1, v2};

/// Which protocol the clients run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Version {
    /// mqlock 0.1's protocol: extras acked away, a drop-head register, a lease renewed by a probe
    /// that the client's own node answers (cluster-safety review, H1, H3, H4).
    V1,
    /// A rejected design of v2: everything as v2, but the grant and every renewal take the
    /// lease from the *publisher confirm* of the renewal. Kept so that a test shows the checker
    /// finds why it is unsound (a confirm after a heal does not prove the client is still the
    /// active consumer).
    V2Confirm,
    /// The protocol as docs/protocol.md specifies it and crates/mqlock implements it: stamped
    /// renewals, max-registers, and a lease that starts and is extended only when the client's
    /// own renewal is *delivered* back to it, not redelivered.
    V2,
    /// The grant without the fence register (what the core implements next): v2's delivered
    /// lease, renewals, holding and parking rules, but the token comes from the lock queue
    /// alone. A first delivery stamped `s` makes the candidate `s + 1`; an unstamped one (a
    /// wake-up) starts a new epoch. The candidate is published as the grant's renewal and
    /// granted when that renewal is delivered back; another channel's renewal stamped at or
    /// above the candidate, delivered meanwhile, makes a new candidate above it (see
    /// [`crate::v3`]).
    V3,
}

/// A rule of [`Version::V3`] turned off, to show that the checker finds why it is needed
/// (the negative controls of `tests/v3.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum V3Fault {
    /// (a) During the grant, another channel's renewal stamped at or above the candidate makes
    /// the grantee give up (close its channel) instead of making a new candidate.
    GiveUpOnHigher,
    /// (b) The grant completes at once with the candidate, without waiting for the grantee's
    /// own renewal to be delivered back.
    GrantAtOnce,
    /// (c) A new epoch reuses the largest stored epoch (`max(e, clock)`, no `+ 1`).
    ReuseEpoch,
    /// (d) The held delivery is acked as soon as the candidate's renewal is published, before
    /// that renewal comes back.
    AckHeldEarly,
}

/// The bounds and timing constants of one model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Config {
    /// Number of clients.
    pub clients: u8,
    /// The clock starts at 1 and stops at `horizon`.
    pub horizon: u8,
    /// The leader declares a node down only `d` ticks after it last heard from it.
    pub d: u8,
    /// The lease margin `M` (`M < D`).
    pub m: u8,
    /// Acquisitions per client (each one opens a fresh channel).
    pub acquisitions: u8,
    /// Nudges (extra wake-ups) per client over the whole run.
    pub nudges: u8,
    /// v2: renewals per client over the whole run.
    pub renewals: u8,
    /// Partitions over the whole run.
    pub partitions: u8,
    /// Times over the whole run that the lock queue loses its ready messages while it has no
    /// consumer (`broker::LoseMessages`: an unused lock queue that expired and is declared
    /// again, or a broker restart that drops transient messages while nobody is connected);
    /// the `epoch:` register keeps its values (persistent).
    pub losses: u8,
    /// v2: keeping a lock until it is wanted (`None`: holders never park).
    pub park: Option<Parking>,
}

/// Keeping a lock until it is wanted (crates/mqlock `park.rs`, `hold.rs`): a holder that lets
/// go parks instead of closing, stays the holder (renewing, fenced), takes the lock back with no
/// broker step, and closes when a waiter's wake-up reaches it, or at the idle limit.
///
/// [`Parking::implemented`] is what crates/mqlock does; [`Parking::first`] lacks the two rules
/// the check found missing (`wanted_in_grant`, `count_at_park`); the negative controls each
/// turn one rule off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Parking {
    /// The idle limit: `v2::ParkExpire` is enabled once `clock >= parked_at + idle`.
    pub idle: u8,
    /// A waiter publishes a wake-up at `Acquire` also when the queue has a consumer
    /// (`consumer_count() > 0 || message_count() == 0`, as `acquire.rs` does now); off: the old
    /// rule, only when the queue is idle (no consumer, no message).
    pub wake_behind_consumer: bool,
    /// A parked holder that receives a wake-up closes; off: it acks it and stays parked.
    pub release_when_parked: bool,
    /// A holder that received a wake-up while in use closes at `v2::Park`; off: it parks.
    pub release_when_wanted: bool,
    /// Wake-ups carry their publisher, and a grantee that gets another client's wake-up before
    /// its own `R0` (its first delivery included) is wanted; a holder ignores its own wake-ups.
    /// Off (the first implementation): wake-ups are anonymous, the grant acks every wake-up it
    /// sees before `R0`, and the holder takes any wake-up (its own nudge too) as wanted.
    pub wanted_in_grant: bool,
    /// At `v2::Park`, the holder asks the queue for its consumers (a passive declare, which
    /// needs its node connected) and closes instead of parking when another client has an up
    /// consumer. Off: the first implementation.
    pub count_at_park: bool,
}

impl Parking {
    /// The rules crates/mqlock implements, with idle limit `idle`: every rule on. (The core
    /// also counts the consumers every renewal period while parked, which the model leaves out;
    /// see docs/model.md.)
    pub fn implemented(idle: u8) -> Self {
        Parking {
            idle,
            wake_behind_consumer: true,
            release_when_parked: true,
            release_when_wanted: true,
            wanted_in_grant: true,
            count_at_park: true,
        }
    }

    /// The first implementation, kept as a control: wake-ups anonymous and acked by the grant
    /// unseen, no consumer count at park. The checker strands a waiter behind it until the
    /// idle limit.
    pub fn first(idle: u8) -> Self {
        Parking {
            wanted_in_grant: false,
            count_at_park: false,
            ..Parking::implemented(idle)
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            clients: 2,
            horizon: 6,
            d: 3,
            m: 2,
            acquisitions: 2,
            nudges: 0,
            renewals: 1,
            partitions: 1,
            losses: 0,
            park: None,
        }
    }
}

impl Config {
    /// The configurations every version since v2 is checked on (tests/protocols.rs, tests/v3.rs):
    /// 2 clients with the clock to 6, and 3 clients with the clock to 4; D 3, M 2, one
    /// acquisition and one renewal each, one partition.
    pub fn checked() -> [Config; 2] {
        let two = Config {
            clients: 2,
            horizon: 6,
            acquisitions: 1,
            renewals: 1,
            partitions: 1,
            ..Config::default()
        };
        let three = Config {
            clients: 3,
            horizon: 4,
            ..two
        };
        [two, three]
    }
}

/// The model of one protocol under one configuration.
#[derive(Clone, Debug)]
pub struct LockModel {
    /// The protocol.
    pub version: Version,
    /// The bounds.
    pub cfg: Config,
    /// A V3 rule turned off (a negative control); `None`: V3 as specified.
    pub fault: Option<V3Fault>,
}

/// The global state: the clock, the broker, the clients, and the grant history the
/// properties need.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct State {
    /// The global discrete clock.
    pub clock: u8,
    /// Partitions still allowed.
    pub partitions_left: u8,
    /// Message losses still allowed.
    pub losses_left: u8,
    /// The broker.
    pub broker: Broker,
    /// The clients.
    pub clients: Vec<Client>,
    /// The largest token granted so far.
    pub max_grant: Option<Token>,
    /// A grant got a token not above an earlier grant's (F1 broken).
    pub f1_broken: bool,
    /// A grant happened while another client believed it held (L2 broken).
    pub l2_broken: bool,
}

/// One step of the model. Client actions carry the client's index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// `env::Tick`: the clock advances by one.
    Tick,
    /// `broker::Partition`: the client's node is cut off from the leader.
    Partition(u8),
    /// `broker::Heal`: the client's node reaches the leader again.
    Heal(u8),
    /// `broker::ReturnConsumers`: the leader declares the client's node down.
    ReturnConsumers(u8),
    /// `broker::Land`: the oldest buffered operation of the client lands.
    Land(u8),
    /// `broker::Deliver`: the active consumer gets the head of the lock queue.
    Deliver,
    /// `broker::LoseMessages`: the lock queue, with no consumer, loses its ready messages.
    LoseMessages,
    /// `vN::Acquire`: open a channel, declare, register a consumer, wake an idle queue.
    Acquire(u8),
    /// `vN::Nudge`: a waiter publishes another wake-up.
    Nudge(u8),
    /// `vN::Receive`: the client handles the oldest delivery it received.
    Receive(u8),
    /// `vN::ReadFence`: read the fence register.
    ReadFence(u8),
    /// `vN::StartEpoch`: read the epoch register and publish a new epoch.
    StartEpoch(u8),
    /// `vN::EpochConfirmed`: the new epoch is confirmed: ack the old ones, publish the token.
    EpochConfirmed(u8),
    /// `vN::Grant`: the token write is confirmed: the client is granted (v2: or gives up).
    Grant(u8),
    /// `v2::Renew`: the holder publishes a renewal.
    Renew(u8),
    /// `v2::RenewConfirmed`: a renewal's confirm extends the lease.
    RenewConfirmed(u8),
    /// `v1::Probe`: the probe, answered by the client's own node, extends the lease.
    Probe(u8),
    /// `vN::Expire`: the lease deadline passed: loss, close the channel.
    Expire(u8),
    /// `client::Close`: release, crash or abandon: the client closes its channel.
    Close(u8),
    /// `v2::Park`: the holder's user lets go of a kept lock: the holder parks (or closes, if a
    /// wake-up reached it while in use).
    Park(u8),
    /// `v2::Unpark`: the holder's own client takes the parked lock back (no broker step).
    Unpark(u8),
    /// `v2::ParkExpire`: the parked holder's idle limit passed: it closes its channel.
    ParkExpire(u8),
}

impl LockModel {
    /// A model of `version` under `cfg`.
    pub fn new(version: Version, cfg: Config) -> Self {
        LockModel {
            version,
            cfg,
            fault: None,
        }
    }

    /// The same model with the V3 rule `fault` turned off (a negative control).
    pub fn with_fault(self, fault: V3Fault) -> Self {
        LockModel {
            fault: Some(fault),
            ..self
        }
    }

    /// Whether the clients run V3.
    pub fn v3(&self) -> bool {
        self.version == Version::V3
    }

    /// Whether the V3 rule `f` is turned off.
    pub fn faulty(&self, f: V3Fault) -> bool {
        self.v3() && self.fault == Some(f)
    }

    /// v1's registers have `x-max-length = 1` with drop-head; v2's have no limit.
    pub fn drop_head(&self) -> bool {
        self.version == Version::V1
    }

    /// The stable name of an action, e.g. `v2::Grant(c0)`.
    pub fn action_name(&self, a: &Action) -> String {
        let v = match self.version {
            Version::V1 => "v1",
            Version::V2Confirm => "v2-confirm",
            Version::V2 => "v2",
            Version::V3 => "v3",
        };
        match a {
            Action::Tick => "env::Tick".to_string(),
            Action::Deliver => "broker::Deliver".to_string(),
            Action::LoseMessages => "broker::LoseMessages".to_string(),
            Action::Partition(c) => format!("broker::Partition(c{c})"),
            Action::Heal(c) => format!("broker::Heal(c{c})"),
            Action::ReturnConsumers(c) => format!("broker::ReturnConsumers(c{c})"),
            Action::Land(c) => format!("broker::Land(c{c})"),
            Action::Close(c) => format!("client::Close(c{c})"),
            Action::Acquire(c) => format!("{v}::Acquire(c{c})"),
            Action::Nudge(c) => format!("{v}::Nudge(c{c})"),
            Action::Receive(c) => format!("{v}::Receive(c{c})"),
            Action::ReadFence(c) => format!("{v}::ReadFence(c{c})"),
            Action::StartEpoch(c) => format!("{v}::StartEpoch(c{c})"),
            Action::EpochConfirmed(c) => format!("{v}::EpochConfirmed(c{c})"),
            Action::Grant(c) => format!("{v}::Grant(c{c})"),
            Action::Renew(c) => format!("{v}::Renew(c{c})"),
            Action::RenewConfirmed(c) => format!("{v}::RenewConfirmed(c{c})"),
            Action::Probe(c) => format!("v1::Probe(c{c})"),
            Action::Expire(c) => format!("{v}::Expire(c{c})"),
            Action::Park(c) => format!("{v}::Park(c{c})"),
            Action::Unpark(c) => format!("{v}::Unpark(c{c})"),
            Action::ParkExpire(c) => format!("{v}::ParkExpire(c{c})"),
        }
    }

    /// The parking rules, if holders park (v2 and v3 only).
    pub fn parking(&self) -> Option<Parking> {
        self.cfg
            .park
            .filter(|_| matches!(self.version, Version::V2 | Version::V3))
    }

    /// Whether a waiter publishes a wake-up at `Acquire`. Without parking (and with
    /// `wake_behind_consumer` off) only when the queue is idle: no consumer, no message. With
    /// parking, as crates/mqlock `acquire.rs` does now, also when the queue has a consumer
    /// (`consumer_count() > 0 || message_count() == 0`): the holder must learn that it is wanted.
    /// A consumer of a node declared down is not counted (rabbit_fifo's `query_consumer_count`
    /// leaves out a `suspected_down` consumer), which publishes fewer wake-ups.
    pub fn publishes_wake(&self, b: &Broker) -> bool {
        match self.parking() {
            Some(p) if p.wake_behind_consumer => !b.consumers.is_empty() || b.ready.is_empty(),
            _ => b.idle(),
        }
    }

    /// A wake-up published by client `c`: tagged with `c` if wake-ups carry their publisher.
    pub fn wake(&self, c: usize) -> MsgKind {
        let tagged = self.parking().is_some_and(|p| p.wanted_in_grant);
        MsgKind::Wake {
            from: tagged.then_some(c as u8),
        }
    }

    /// Client `c` sends `op`; a confirm that results at once is handed to its channel.
    pub fn send(&self, s: &mut State, c: usize, op: Op) {
        if let Some((chan, bit)) = s.broker.send(c, op, self.drop_head()) {
            s.confirm(chan, bit);
        }
    }

    /// Records a grant of `token` to client `c` (after its phase became `Holding`).
    pub fn record_grant(&self, s: &mut State, c: usize, token: Token) {
        if s.max_grant.is_some_and(|m| token <= m) {
            s.f1_broken = true;
        }
        s.max_grant = Some(s.max_grant.map_or(token, |m| m.max(token)));
        let clock = s.clock;
        if s.clients
            .iter()
            .enumerate()
            .any(|(i, o)| i != c && o.believes(clock))
        {
            s.l2_broken = true;
        }
    }

    /// Client `c` closes its channel and forgets it (release, crash, loss, giving up).
    pub fn close(&self, s: &mut State, c: usize) {
        let chan = s.chan(c);
        self.send(s, c, Op::Close { chan });
        s.clients[c].reset();
    }

    /// Client `c` publishes `kind` to the lock queue with confirm bit `confirm` (0: none).
    pub fn publish_lock(&self, s: &mut State, c: usize, kind: MsgKind, confirm: u8) {
        let chan = s.chan(c);
        self.send(
            s,
            c,
            Op::PublishLock {
                kind,
                chan,
                confirm,
            },
        );
    }
}

impl State {
    /// Client `c`'s current channel.
    pub fn chan(&self, c: usize) -> ChanId {
        ChanId {
            client: c as u8,
            acq: self.clients[c].acq,
        }
    }

    /// A publisher confirm for `chan` arrives (ignored if that channel is gone).
    pub fn confirm(&mut self, chan: ChanId, bit: u8) {
        let cl = &mut self.clients[usize::from(chan.client)];
        if cl.acq == chan.acq && cl.open() {
            cl.confirms |= bit;
        }
    }
}

impl Model for LockModel {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        let n = usize::from(self.cfg.clients);
        vec![State {
            clock: 1,
            partitions_left: self.cfg.partitions,
            losses_left: self.cfg.losses,
            broker: Broker::new(n),
            clients: vec![Client::new(self.cfg.nudges, self.cfg.renewals); n],
            max_grant: None,
            f1_broken: false,
            l2_broken: false,
        }]
    }

    fn actions(&self, s: &State, out: &mut Vec<Action>) {
        if s.clock < self.cfg.horizon {
            out.push(Action::Tick);
        }
        if s.broker.can_deliver() {
            out.push(Action::Deliver);
        }
        if s.losses_left > 0
            && s.broker.consumers.is_empty()
            && s.broker.suspected.is_empty()
            && !s.broker.ready.is_empty()
        {
            out.push(Action::LoseMessages);
        }
        for c in 0..usize::from(self.cfg.clients) {
            let i = c as u8;
            match s.broker.cut[c] {
                None if s.partitions_left > 0 => out.push(Action::Partition(i)),
                None => {}
                Some(t) => {
                    out.push(Action::Heal(i));
                    if s.clock >= t + self.cfg.d && s.broker.has_anything_of(c) {
                        out.push(Action::ReturnConsumers(i));
                    }
                }
            }
            if s.broker.cut[c].is_none() && !s.broker.buffer[c].is_empty() {
                out.push(Action::Land(i));
            }
            let cl = &s.clients[c];
            if cl.phase == Phase::Idle && cl.acq < self.cfg.acquisitions && s.broker.reachable(c) {
                out.push(Action::Acquire(i));
            }
            if cl.phase == Phase::Waiting && cl.nudges_left > 0 {
                out.push(Action::Nudge(i));
            }
            if let Phase::Holding { deadline, .. } = cl.phase
                && s.clock >= deadline
            {
                out.push(Action::Expire(i));
            }
            match self.version {
                Version::V1 => v1::actions(self, s, c, out),
                Version::V2Confirm | Version::V2 | Version::V3 => v2::actions(self, s, c, out),
            }
            if cl.open() {
                out.push(Action::Close(i));
            }
        }
    }

    fn next_state(&self, last: &State, a: Action) -> Option<State> {
        let mut s = last.clone();
        let dh = self.drop_head();
        match a {
            Action::Tick => s.clock += 1,
            Action::Partition(c) => {
                s.partitions_left -= 1;
                s.broker.cut[usize::from(c)] = Some(s.clock);
            }
            Action::Heal(c) => s.broker.heal(usize::from(c)),
            Action::LoseMessages => {
                s.losses_left -= 1;
                s.broker.ready.clear();
            }
            Action::ReturnConsumers(c) => s.broker.return_consumers(usize::from(c), dh),
            Action::Land(c) => {
                if let Some((chan, bit)) = s.broker.land(usize::from(c), dh) {
                    s.confirm(chan, bit);
                }
            }
            Action::Deliver => {
                let (chan, d) = s.broker.deliver()?;
                let cl = &mut s.clients[usize::from(chan.client)];
                if cl.acq == chan.acq && cl.open() {
                    cl.inbox.push(d);
                }
            }
            Action::Acquire(c) => {
                let c = usize::from(c);
                let wake = self.publishes_wake(&s.broker);
                let cl = &mut s.clients[c];
                cl.acq += 1;
                cl.reset();
                cl.phase = Phase::Waiting;
                let chan = s.chan(c);
                s.broker.consume(chan);
                if wake {
                    let wake = self.wake(c);
                    self.publish_lock(&mut s, c, wake, 0);
                }
            }
            Action::Nudge(c) => {
                let c = usize::from(c);
                s.clients[c].nudges_left -= 1;
                let wake = self.wake(c);
                self.publish_lock(&mut s, c, wake, 0);
            }
            Action::Expire(c) | Action::Close(c) | Action::ParkExpire(c) => {
                self.close(&mut s, usize::from(c))
            }
            _ => match self.version {
                Version::V1 => v1::step(self, &mut s, a),
                Version::V2Confirm | Version::V2 | Version::V3 => v2::step(self, &mut s, a),
            },
        }
        Some(s)
    }

    fn format_action(&self, a: &Action) -> String {
        self.action_name(a)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        properties::all()
    }
}
