//! Lock kinds (docs/protocol.md, "Lock kinds"): what a lock queue was declared as — a plain
//! mutex, a permit of a semaphore, or part of a read-write lock — written into the queue's
//! arguments, where the broker compares it on every declaration. Two clients that disagree on
//! the kind of a name, or on its number of permits, therefore cannot both use it: the later
//! declaration is refused (406) before it registers anything, and the client reports
//! [`crate::Error::KindMismatch`].

use std::fmt;

use lapin::types::{AMQPValue, FieldTable};

/// The argument that carries the kind. A byte limit that can never be reached: every message
/// of a lock queue (wake-ups, renewals, break requests) has an empty body, so the broker's
/// length-in-bytes limit stays at zero and never drops one. It is one of the arguments the
/// broker compares on redeclaration (a different value, or a value against none, is refused).
pub(crate) const KIND_ARG: &str = "x-max-length-bytes";

/// Marks stay far above any byte limit a queue could reach: `2^51 + kind << 32 + count`. The
/// base is the protocol's version too: mqlock's protocol 2 (a fence register per lock) marked
/// only semaphores and read-write locks, with base `2^50`; protocol 3 marks every lock queue,
/// so that the broker refuses a client of the other protocol on the same lock
/// (docs/protocol.md, "Upgrading from protocol 2").
const MARK_BASE: i64 = 1 << 51;
const EARLIER_MARK_BASE: i64 = 1 << 50;
const MUTEX: i64 = 0;
const SEMAPHORE: i64 = 1;
const READ_WRITE: i64 = 2;

/// The most permits of a semaphore, and readers of a read-write lock. Each permit is a lock
/// queue with its register and epoch queue, and a waiter registers a consumer (a channel) on
/// every permit, so the count bounds what one waiter costs the broker.
pub const MAX_PERMITS: u32 = 128;

/// What kind of lock a name is, as its queues record it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockKind {
    /// A plain lock ([`crate::LockClient::lock`]).
    Mutex,
    /// A semaphore of `permits` permits ([`crate::LockClient::semaphore`]).
    Semaphore {
        /// Number of permits.
        permits: u32,
    },
    /// A read-write lock admitting up to `max_readers` readers at once
    /// ([`crate::LockClient::rw_lock`]).
    ReadWrite {
        /// Number of reader permits.
        max_readers: u32,
    },
}

impl LockKind {
    /// Adds the kind's mark, with the protocol's, to a lock queue's arguments.
    pub(crate) fn mark(self, args: &mut FieldTable) {
        let (kind, count) = match self {
            LockKind::Mutex => (MUTEX, 0),
            LockKind::Semaphore { permits } => (SEMAPHORE, permits),
            LockKind::ReadWrite { max_readers } => (READ_WRITE, max_readers),
        };
        args.insert(
            KIND_ARG.into(),
            AMQPValue::LongLongInt(MARK_BASE + (kind << 32) + i64::from(count)),
        );
    }

    fn from_mark(mark: i64) -> Option<LockKind> {
        let rest = mark.checked_sub(MARK_BASE)?;
        let count = u32::try_from(rest & 0xffff_ffff).ok()?;
        match rest >> 32 {
            MUTEX if count == 0 => Some(LockKind::Mutex),
            SEMAPHORE => Some(LockKind::Semaphore { permits: count }),
            READ_WRITE => Some(LockKind::ReadWrite { max_readers: count }),
            _ => None,
        }
    }

    /// What the broker's refusal of a declaration says the queue is, if the refusal is about
    /// the kind's argument.
    ///
    /// The broker's text reads "inequivalent arg 'x-max-length-bytes' for queue '…' in vhost
    /// '…': received … but current is the value '<mark>' of type '…'" (or "current is none"
    /// for a queue declared by protocol 2 as a plain lock).
    pub(crate) fn from_refusal(detail: &str) -> Option<Found> {
        if !detail.contains(&format!("'{KIND_ARG}'")) {
            return None;
        }
        let Some((_, current)) = detail.split_once("current is ") else {
            return Some(Found::Unknown);
        };
        if current.starts_with("none") {
            return Some(Found::EarlierProtocol);
        }
        // The first number after "current is" ("the value '<mark>' of type 'long'", or the
        // bare value, depending on the broker version).
        let mark = current
            .split(|c: char| !c.is_ascii_digit())
            .find(|s| !s.is_empty())
            .and_then(|v| v.parse::<i64>().ok());
        Some(match mark {
            Some(m) if (EARLIER_MARK_BASE..MARK_BASE).contains(&m) => Found::EarlierProtocol,
            Some(m) => LockKind::from_mark(m).map_or(Found::Unknown, Found::Kind),
            None => Found::Unknown,
        })
    }
}

/// What a refused declaration found on the broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Found {
    /// A lock queue of this protocol, of this kind.
    Kind(LockKind),
    /// A lock queue declared by mqlock's protocol 2 (or earlier): no mark, or one below
    /// `2^51`.
    EarlierProtocol,
    /// A mark this version cannot read (a later version's, or not mqlock's).
    Unknown,
}

impl fmt::Display for LockKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockKind::Mutex => f.write_str("a plain lock"),
            LockKind::Semaphore { permits } => write!(f, "a semaphore of {permits} permits"),
            LockKind::ReadWrite { max_readers } => {
                write!(f, "a read-write lock of {max_readers} readers")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark_of(kind: LockKind) -> Option<i64> {
        let mut args = FieldTable::default();
        kind.mark(&mut args);
        match args.inner().get(KIND_ARG) {
            Some(AMQPValue::LongLongInt(v)) => Some(*v),
            _ => None,
        }
    }

    #[test]
    fn marks_round_trip_through_the_brokers_refusal_text() {
        for kind in [
            LockKind::Mutex,
            LockKind::Semaphore { permits: 1 },
            LockKind::Semaphore {
                permits: MAX_PERMITS,
            },
            LockKind::ReadWrite { max_readers: 8 },
        ] {
            let mark = mark_of(kind).unwrap();
            let text = format!(
                "PRECONDITION_FAILED - inequivalent arg 'x-max-length-bytes' for queue 'mqlock.lock:a' in vhost '/': received none but current is the value '{mark}' of type 'long'"
            );
            assert_eq!(LockKind::from_refusal(&text), Some(Found::Kind(kind)));
        }
        // Protocol 2: a plain lock's queue had no mark, a semaphore's a mark based at 2^50.
        let plain = "PRECONDITION_FAILED - inequivalent arg 'x-max-length-bytes' for queue 'mqlock.lock:a' in vhost '/': received the value '2251799813685248' of type 'long' but current is none";
        assert_eq!(LockKind::from_refusal(plain), Some(Found::EarlierProtocol));
        let semaphore2 = "inequivalent arg 'x-max-length-bytes' for queue 'q' in vhost '/': received the value '2251799813685248' of type 'long' but current is the value '1125904201809923' of type 'long'";
        assert_eq!(
            LockKind::from_refusal(semaphore2),
            Some(Found::EarlierProtocol)
        );
        let other = "PRECONDITION_FAILED - inequivalent arg 'x-expires' for queue 'q'";
        assert_eq!(LockKind::from_refusal(other), None);
        let foreign = "inequivalent arg 'x-max-length-bytes' for queue 'q' in vhost '/': received none but current is the value '4096' of type 'long'";
        assert_eq!(LockKind::from_refusal(foreign), Some(Found::Unknown));
    }

    #[test]
    fn marks_are_far_above_any_reachable_byte_count() {
        let low = mark_of(LockKind::Mutex).unwrap();
        assert!(low > 1 << 50, "{low}");
        assert_ne!(
            mark_of(LockKind::Semaphore { permits: 3 }),
            mark_of(LockKind::ReadWrite { max_readers: 3 })
        );
    }
}
