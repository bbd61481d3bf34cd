//! How a holder learns that its lock is gone: [`LossReason`] and [`LossSignal`]
//! (docs/protocol.md, "Hold" and "Lease").

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::lease::Lease;

/// Why a held lock was lost.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LossReason {
    /// The connection to the broker failed (I/O error, missed heartbeats, broker shutdown), or
    /// the client closed it ([`crate::LockClient::close`]).
    ConnectionLost(String),
    /// The broker closed the lock's channel (e.g. 406 PRECONDITION_FAILED on consumer timeout).
    ChannelClosed(String),
    /// The broker cancelled the holder's consumer (e.g. the lock queue was deleted).
    ConsumerCancelled,
    /// The lease ran out: no renewal of this lock came back from its lock queue (through the
    /// queue's Raft quorum, on a cluster) within the lease margin, which is shorter than the time after
    /// which the broker may hand the lock to another client (docs/protocol.md, L2). Also the
    /// reason of every lock on a connection whose liveness probe went unanswered for
    /// `1.5 × heartbeat`.
    LeaseExpired {
        /// For a lock's own lease: how long past the lease's deadline the loss was noticed. For
        /// the connection's probe: how long the broker had been silent, the margin included.
        silent_for: Duration,
    },
    /// The broker took the lock back and handed it on: a message this holder had already
    /// been given came back to it redelivered (a quorum queue returns a consumer's messages
    /// when its node is cut off, and re-activates the consumer after the partition heals).
    TakenBack,
    /// A message stamped by a later holder reached this one: the lock was granted to the
    /// fencing token `token`, above this holder's.
    GrantedElsewhere {
        /// The later holder's fencing token.
        token: u64,
    },
    /// An operator broke the lock (`mqlock break`, [`crate::LockClient::break_lock`]): the
    /// holder was asked to give it up, and did.
    Broken {
        /// Who broke it: `user@host pid N`.
        by: String,
        /// When (the breaker's wall clock).
        at: std::time::SystemTime,
    },
    /// The lock was taken away in process: [`crate::MemoryLocker::revoke`].
    Revoked,
    /// The hold reached its limit ([`crate::LockOptions::max_hold`]): the holder gave the lock
    /// up by itself, as it does on a loss (its channel closed), and the next waiter was granted.
    HoldLimit {
        /// The limit that was reached.
        limit: Duration,
    },
}

impl fmt::Display for LossReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LossReason::ConnectionLost(d) => write!(f, "connection to the broker lost ({d})"),
            LossReason::ChannelClosed(d) => write!(f, "the broker closed the lock's channel ({d})"),
            LossReason::ConsumerCancelled => {
                write!(f, "the broker cancelled the holder's consumer")
            }
            LossReason::LeaseExpired { silent_for } => write!(
                f,
                "no lease renewal came back from the lock queue in time ({silent_for:?} past the lease)"
            ),
            LossReason::TakenBack => write!(
                f,
                "the broker took the lock back (its token was redelivered to this holder)"
            ),
            LossReason::GrantedElsewhere { token } => {
                write!(f, "the lock was granted to a later holder (token {token})")
            }
            LossReason::Broken { by, at } => write!(
                f,
                "the lock was broken by {by} at {}",
                humantime::format_rfc3339_seconds(*at)
            ),
            LossReason::Revoked => write!(f, "revoked"),
            LossReason::HoldLimit { limit } => {
                write!(
                    f,
                    "the hold reached its limit of {limit:?} and was given up"
                )
            }
        }
    }
}

/// The loss signal of one grant: fired once, observed by any number of watchers.
///
/// The holder fires it when it learns of a loss; an expired lease counts as fired without any
/// task running, since [`LossSignal::reason`] reads the lease's clock itself. A
/// [`crate::Locker`] implementation creates one per grant, gives a clone to
/// [`LockGuard::new`], and fires it when the grant is lost.
#[derive(Debug, Clone)]
pub struct LossSignal {
    tx: Arc<watch::Sender<Option<LossReason>>>,
    lease: Option<Arc<Lease>>,
}

impl LossSignal {
    /// A signal for one grant, not fired. With `lease`, the grant also counts as lost
    /// ([`LossReason::LeaseExpired`]) once the lease runs out; without, only
    /// [`LossSignal::fire`] ends it.
    pub fn new(lease: Option<Arc<Lease>>) -> Self {
        LossSignal {
            tx: Arc::new(watch::channel(None).0),
            lease,
        }
    }

    /// Marks the grant as lost with `reason` and wakes every watcher. Only the first reason is
    /// kept: returns whether this call set it. A fired reason takes precedence over an expired
    /// lease in [`LossSignal::reason`].
    pub fn fire(&self, reason: LossReason) -> bool {
        self.tx.send_if_modified(|current| {
            if current.is_none() {
                *current = Some(reason);
                true
            } else {
                false
            }
        })
    }

    /// The loss reason, if the grant was lost: the fired reason, or
    /// [`LossReason::LeaseExpired`] when the lease ran out. Needs no runtime.
    pub fn reason(&self) -> Option<LossReason> {
        if let Some(r) = self.tx.borrow().clone() {
            return Some(r);
        }
        match &self.lease {
            Some(lease) if !lease.is_valid() => Some(LossReason::LeaseExpired {
                silent_for: lease.overdue(),
            }),
            _ => None,
        }
    }

    /// Resolves when the grant is lost, with the reason [`LossSignal::reason`] gives. When the
    /// lease runs out it fires [`LossReason::LeaseExpired`] itself, so every watcher sees the
    /// same reason. The lease is checked at least every 250 ms, so a suspend of the host (which
    /// tokio's timers do not count) is noticed at most that late.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the loss is kept in the signal, so a new call after a dropped one misses
    /// nothing.
    ///
    /// # Panics
    ///
    /// With a lease, if polled outside a tokio runtime with its time driver (it sleeps until
    /// the lease's deadline).
    pub async fn lost(&self) -> LossReason {
        let mut rx = self.tx.subscribe();
        loop {
            if let Some(r) = rx.borrow_and_update().clone() {
                return r;
            }
            let lease_sleep = async {
                match &self.lease {
                    Some(lease) => lease.expired().await,
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        return LossReason::ConnectionLost("lock client dropped".into());
                    }
                }
                _ = lease_sleep => {
                    if let Some(r) = self.reason() {
                        self.fire(r.clone());
                        return r;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_expired_lease_reads_as_lost_without_any_task_running() {
        let clock = Arc::new(crate::ManualClock::new(Duration::from_secs(1)));
        let lease = Arc::new(Lease::with_clock(clock.clone(), Duration::from_millis(30)));
        let signal = LossSignal::new(Some(lease.clone()));
        assert!(signal.reason().is_none());
        // A frozen process: no task ran while the deadline passed.
        clock.advance(Duration::from_millis(40));
        assert!(matches!(
            signal.reason(),
            Some(LossReason::LeaseExpired { .. })
        ));
        // Extending never revives an expired lease, and the first fired reason wins.
        lease.extend_to(lease.now() + Duration::from_secs(10));
        assert!(signal.reason().is_some());
        assert!(signal.fire(LossReason::Revoked));
        assert_eq!(signal.reason(), Some(LossReason::Revoked));
        assert!(!signal.fire(LossReason::ConsumerCancelled));
    }

    #[tokio::test(start_paused = true)]
    async fn lost_resolves_when_the_lease_runs_out() {
        let clock = Arc::new(crate::ManualClock::new(Duration::from_secs(1)));
        let lease = Arc::new(Lease::with_clock(clock.clone(), Duration::from_millis(20)));
        let signal = LossSignal::new(Some(lease));
        let waiter = tokio::spawn(async move { signal.lost().await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiter.is_finished(), "the lease has not run out yet");
        clock.advance(Duration::from_millis(20));
        let r = tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .expect("lost() resolved within a recheck of the deadline")
            .unwrap();
        assert!(matches!(r, LossReason::LeaseExpired { .. }));
    }
}
