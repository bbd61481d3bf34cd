//! The broker: one lock queue with single active consumer (rabbit_fifo semantics), the two
//! registers, the partition of a client's node from the queues' leader, and the operations a
//! client's node buffers while it is cut off.
//!
//! All queues are led by one leader node; each client is connected to its own node, which can
//! be cut off from the leader (`broker::Partition`) and healed (`broker::Heal`).

use crate::types::{ChanId, Delivery, Msg, MsgKind, Reg};

/// A register queue (`fence:` or `epoch:`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct Register {
    /// Ready values, head first. v1 (`x-max-length = 1`, drop-head) keeps at most one; v2 keeps
    /// every value, sorted (the order is irrelevant to a client that takes them all).
    pub ready: Vec<u16>,
    /// Values taken by `basic.get` and not acknowledged yet, with the channel that took them.
    pub taken: Vec<(ChanId, u16)>,
}

impl Register {
    /// Puts `v` back (a requeue or a publish); `drop_head` is v1's `x-max-length = 1` with
    /// `x-overflow = drop-head`.
    fn put(&mut self, v: u16, front: bool, drop_head: bool) {
        if drop_head {
            if front {
                self.ready.insert(0, v);
            } else {
                self.ready.push(v);
            }
            while self.ready.len() > 1 {
                self.ready.remove(0);
            }
        } else {
            let at = self.ready.partition_point(|x| *x <= v);
            self.ready.insert(at, v);
        }
    }

    /// Requeues what `pred` selects among the taken values (a closed channel, a node down).
    fn requeue(&mut self, pred: impl Fn(ChanId) -> bool, drop_head: bool) {
        let mut back = Vec::new();
        self.taken.retain(|(c, v)| {
            if pred(*c) {
                back.push(*v);
                false
            } else {
                true
            }
        });
        for v in back.into_iter().rev() {
            self.put(v, true, drop_head);
        }
    }

    /// v1 `basic.get`: takes the head, unacknowledged.
    pub fn get(&mut self, chan: ChanId) -> Option<u16> {
        if self.ready.is_empty() {
            return None;
        }
        let v = self.ready.remove(0);
        self.taken.push((chan, v));
        Some(v)
    }

    /// v2: `basic.get` until empty, every value unacknowledged; returns them.
    pub fn take_all(&mut self, chan: ChanId) -> Vec<u16> {
        let all = std::mem::take(&mut self.ready);
        self.taken.extend(all.iter().map(|v| (chan, *v)));
        all
    }
}

/// A consumer of the lock queue.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Consumer {
    /// Its channel.
    pub chan: ChanId,
    /// Incremented each time it rejoins after its node was declared down.
    pub inc: u8,
    /// Deliveries not acknowledged yet, in delivery order (prefetch 2).
    pub unacked: Vec<Msg>,
}

/// An operation a client sends to the leader. It lands at once while the client's node is
/// connected and nothing is buffered before it; otherwise it waits in the node's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// Publish to the lock queue, with a publisher confirm for `chan` (bit `confirm`, 0 = none).
    PublishLock {
        /// What.
        kind: MsgKind,
        /// The publishing channel.
        chan: ChanId,
        /// Confirm bit to set on landing (0 = none).
        confirm: u8,
    },
    /// Publish `value` to a register, confirmed.
    PublishReg {
        /// Which register.
        reg: Reg,
        /// The value (a raw token or an epoch).
        value: u16,
        /// The publishing channel.
        chan: ChanId,
        /// Confirm bit to set on landing.
        confirm: u8,
    },
    /// Ack a lock-queue delivery (the delivery tag is `chan` + `inc` + the message).
    AckLock {
        /// The consumer's channel.
        chan: ChanId,
        /// The consumer incarnation the delivery was made to.
        inc: u8,
        /// The message.
        kind: MsgKind,
    },
    /// Ack everything `chan` took from a register.
    AckTaken {
        /// Which register.
        reg: Reg,
        /// The channel.
        chan: ChanId,
    },
    /// Close a channel (release, crash, giving up, loss).
    Close {
        /// The channel.
        chan: ChanId,
    },
}

/// The broker's state.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Broker {
    /// Ready messages of the lock queue, head first.
    pub ready: Vec<Msg>,
    /// Consumers in activation order; the first one is the single active consumer.
    pub consumers: Vec<Consumer>,
    /// Consumers of nodes declared down (not active); they rejoin at the back on heal.
    pub suspected: Vec<Consumer>,
    /// `fence:`.
    pub fence: Register,
    /// `epoch:`.
    pub epoch: Register,
    /// Per client: `Some(t)` while its node is cut off from the leader since time `t`.
    pub cut: Vec<Option<u8>>,
    /// Per client: operations its node holds back, oldest first.
    pub buffer: Vec<Vec<Op>>,
}

impl Broker {
    /// An empty broker for `n` clients.
    pub fn new(n: usize) -> Self {
        Broker {
            ready: Vec::new(),
            consumers: Vec::new(),
            suspected: Vec::new(),
            fence: Register::default(),
            epoch: Register::default(),
            cut: vec![None; n],
            buffer: vec![Vec::new(); n],
        }
    }

    /// The register `reg`.
    pub fn reg(&mut self, reg: Reg) -> &mut Register {
        match reg {
            Reg::Fence => &mut self.fence,
            Reg::Epoch => &mut self.epoch,
        }
    }

    /// Whether a request of client `c` that needs an answer (declare, consume, get) can be
    /// served now: its node is connected and nothing it sent earlier is still buffered.
    pub fn reachable(&self, c: usize) -> bool {
        self.cut[c].is_none() && self.buffer[c].is_empty()
    }

    /// Whether the leader has anything of client `c` to return when declaring its node down.
    pub fn has_anything_of(&self, c: usize) -> bool {
        let mine = |ch: &ChanId| usize::from(ch.client) == c;
        self.consumers.iter().any(|k| mine(&k.chan))
            || self.fence.taken.iter().any(|(ch, _)| mine(ch))
            || self.epoch.taken.iter().any(|(ch, _)| mine(ch))
    }

    /// Client `c` sends `op`: it lands now if `c`'s node is connected and has nothing buffered,
    /// otherwise it is buffered. Returns the confirm to hand to the client, if it landed.
    pub fn send(&mut self, c: usize, op: Op, drop_head: bool) -> Option<(ChanId, u8)> {
        if self.cut[c].is_some() || !self.buffer[c].is_empty() {
            self.buffer[c].push(op);
            None
        } else {
            self.apply(op, drop_head)
        }
    }

    /// `broker::Land`: the oldest buffered operation of client `c` lands (after a heal).
    pub fn land(&mut self, c: usize, drop_head: bool) -> Option<(ChanId, u8)> {
        let op = self.buffer[c].remove(0);
        self.apply(op, drop_head)
    }

    /// Whether the lock queue is idle as a declaration reports it: no consumer, no message.
    pub fn idle(&self) -> bool {
        self.consumers.is_empty() && self.suspected.is_empty() && self.ready.is_empty()
    }

    /// Registers a consumer on `chan` (basic.consume; needs a connected node).
    pub fn consume(&mut self, chan: ChanId) {
        self.consumers.push(Consumer {
            chan,
            inc: 0,
            unacked: Vec::new(),
        });
    }

    /// Returns `msgs` (in delivery order) to the front of the lock queue, redelivered.
    fn return_front(&mut self, msgs: Vec<Msg>) {
        for m in msgs.into_iter().rev() {
            self.ready.insert(
                0,
                Msg {
                    kind: m.kind,
                    redelivered: true,
                },
            );
        }
    }

    /// Applies a landed operation.
    pub fn apply(&mut self, op: Op, drop_head: bool) -> Option<(ChanId, u8)> {
        match op {
            Op::PublishLock {
                kind,
                chan,
                confirm,
            } => {
                self.ready.push(Msg {
                    kind,
                    redelivered: false,
                });
                (confirm != 0).then_some((chan, confirm))
            }
            Op::PublishReg {
                reg,
                value,
                chan,
                confirm,
            } => {
                self.reg(reg).put(value, false, drop_head);
                (confirm != 0).then_some((chan, confirm))
            }
            Op::AckLock { chan, inc, kind } => {
                if let Some(c) = self
                    .consumers
                    .iter_mut()
                    .find(|c| c.chan == chan && c.inc == inc)
                    && let Some(i) = c.unacked.iter().position(|m| m.kind == kind)
                {
                    c.unacked.remove(i);
                }
                None
            }
            Op::AckTaken { reg, chan } => {
                self.reg(reg).taken.retain(|(c, _)| *c != chan);
                None
            }
            Op::Close { chan } => {
                if let Some(i) = self.consumers.iter().position(|c| c.chan == chan) {
                    let c = self.consumers.remove(i);
                    self.return_front(c.unacked);
                }
                self.suspected.retain(|c| c.chan != chan);
                self.fence.requeue(|c| c == chan, drop_head);
                self.epoch.requeue(|c| c == chan, drop_head);
                None
            }
        }
    }

    /// Whether `broker::Deliver` is enabled.
    pub fn can_deliver(&self) -> bool {
        self.consumers.first().is_some_and(|c| {
            c.unacked.len() < 2
                && !self.ready.is_empty()
                && self.cut[usize::from(c.chan.client)].is_none()
        })
    }

    /// `broker::Deliver`: the active consumer gets the head of the queue if it has fewer than
    /// two unacknowledged deliveries and its node is connected. Returns the receiving channel
    /// and the delivery.
    pub fn deliver(&mut self) -> Option<(ChanId, Delivery)> {
        if !self.can_deliver() {
            return None;
        }
        let c = self.consumers.first_mut()?;
        let msg = self.ready.remove(0);
        c.unacked.push(msg);
        Some((c.chan, Delivery { msg, inc: c.inc }))
    }

    /// `broker::ReturnConsumers`: the leader declares client `c`'s node down: its consumers'
    /// unacknowledged messages go back to the queue front (redelivered), the consumers are
    /// suspected (no longer active), and what it took from the registers is requeued.
    pub fn return_consumers(&mut self, c: usize, drop_head: bool) {
        let mut i = 0;
        while i < self.consumers.len() {
            if usize::from(self.consumers[i].chan.client) == c {
                let mut k = self.consumers.remove(i);
                let unacked = std::mem::take(&mut k.unacked);
                self.return_front(unacked);
                self.suspected.push(k);
            } else {
                i += 1;
            }
        }
        let mine = |ch: ChanId| usize::from(ch.client) == c;
        self.fence.requeue(mine, drop_head);
        self.epoch.requeue(mine, drop_head);
    }

    /// `broker::Heal`: client `c`'s node reaches the leader again. Its suspected consumers whose
    /// channel is still open rejoin the waiting list at the back (a new incarnation); those
    /// whose channel its node closed meanwhile are removed.
    pub fn heal(&mut self, c: usize) {
        self.cut[c] = None;
        let mut i = 0;
        while i < self.suspected.len() {
            if usize::from(self.suspected[i].chan.client) == c {
                let mut k = self.suspected.remove(i);
                let closed = self.buffer[c]
                    .iter()
                    .any(|op| matches!(op, Op::Close { chan } if *chan == k.chan));
                if !closed {
                    k.inc += 1;
                    self.consumers.push(k);
                }
            } else {
                i += 1;
            }
        }
    }
}
