//! Values that travel between clients and the broker: tokens, channel ids, messages.

use std::fmt;

/// A fencing token, abstracted as `(epoch, counter)` packed into 16 bits so that the integer
/// order is the lexicographic order (the real token is `epoch << 32 | counter`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Token(pub u16);

impl Token {
    /// The first token of epoch `epoch` (`epoch << 32` in the real protocol).
    pub fn start(epoch: u8) -> Self {
        Token(u16::from(epoch) << 8)
    }
    /// The epoch part.
    pub fn epoch(self) -> u8 {
        (self.0 >> 8) as u8
    }
    /// The counter part.
    pub fn counter(self) -> u8 {
        (self.0 & 0xff) as u8
    }
    /// `self + 1` (the counter is never exhausted in the model).
    pub fn next(self) -> Self {
        Token(self.0 + 1)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.epoch(), self.counter())
    }
}

/// A channel: the `acq`-th acquisition of client `client` (each acquisition opens a fresh one).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChanId {
    /// The client (0-based).
    pub client: u8,
    /// The client's acquisition number (1-based).
    pub acq: u8,
}

impl fmt::Debug for ChanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "c{}#{}", self.client, self.acq)
    }
}

/// What a lock-queue message says.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MsgKind {
    /// An unstamped wake-up (v1: every message; v2: published by waiters). `from`: its
    /// publisher (`wanted_in_grant`; anonymous in the first implementation).
    Wake {
        /// The publishing client, if wake-ups carry it.
        from: Option<u8>,
    },
    /// A v2 lease renewal `R<n>`, stamped with the holder's token and an id unique to the
    /// holder: its channel plus the renewal's number (0 for the grant's `R0`).
    Renewal {
        /// The holder's fencing token.
        stamp: Token,
        /// The holder's channel.
        chan: ChanId,
        /// The renewal's number within that holding.
        n: u8,
    },
}

impl MsgKind {
    /// The stamp of a renewal, `None` for a wake-up.
    pub fn stamp(self) -> Option<Token> {
        match self {
            MsgKind::Wake { .. } => None,
            MsgKind::Renewal { stamp, .. } => Some(stamp),
        }
    }
}

impl fmt::Debug for MsgKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MsgKind::Wake { from: None } => write!(f, "wake"),
            MsgKind::Wake { from: Some(c) } => write!(f, "wake(c{c})"),
            MsgKind::Renewal { stamp, chan, n } => write!(f, "R{n}[{stamp:?} {chan:?}]"),
        }
    }
}

/// A message in the lock queue, with the broker's `redelivered` flag.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Msg {
    /// Its content.
    pub kind: MsgKind,
    /// Set when the broker returned it after a delivery (channel close, node down).
    pub redelivered: bool,
}

impl fmt::Debug for Msg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.redelivered {
            write!(f, "{:?}*", self.kind)
        } else {
            write!(f, "{:?}", self.kind)
        }
    }
}

/// A delivery as the client sees it: the message and the incarnation of the consumer it was
/// delivered to (an ack carries it, like a delivery tag, so a stale ack cannot settle a later
/// delivery of the same message).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Delivery {
    /// The message.
    pub msg: Msg,
    /// The consumer's incarnation at delivery time.
    pub inc: u8,
}

/// Which register a register operation addresses.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum Reg {
    /// `fence:`, the tokens.
    Fence,
    /// `epoch:`, the epochs.
    Epoch,
}

/// The publisher confirms a client waits for, as bits of [`crate::client::Client::confirms`].
pub mod confirm {
    /// The token written to `fence:`.
    pub const FENCE: u8 = 1;
    /// v2: the grant's renewal `R0` in the lock queue.
    pub const R0: u8 = 2;
    /// The new epoch written to `epoch:`.
    pub const EPOCH: u8 = 4;
    /// v2: the pending renewal `Rn`.
    pub const RENEW: u8 = 8;
    /// v2: the grant's own `R0` was delivered back, not redelivered (not a confirm).
    pub const R0_SEEN: u8 = 16;
}
