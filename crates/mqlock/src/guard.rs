//! The held lock: [`LockGuard`], its fencing token and its loss signal.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::error::Result;
use crate::lease::Lease;

/// Why a held lock was lost.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LossReason {
    /// The connection to the broker failed (I/O error, missed heartbeats, broker shutdown).
    ConnectionLost(String),
    /// The broker closed the lock's channel (e.g. 406 PRECONDITION_FAILED on consumer timeout).
    ChannelClosed(String),
    /// The broker cancelled the holder's consumer (e.g. the lock queue was deleted).
    ConsumerCancelled,
    /// The lease ran out: no renewal of this lock came back from its lock queue (through the
    /// queue's Raft quorum, on a cluster) within the lease margin, which is shorter than the time after
    /// which the broker may hand the lock to another client (docs/protocol.md, L2).
    LeaseExpired {
        /// How long past the lease's deadline the loss was noticed.
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
    /// The lock was taken away by its owner in process (the in-memory locker's `revoke`).
    Revoked,
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
        }
    }
}

/// The loss signal of one grant: fired once, observed by any number of watchers.
#[derive(Debug, Clone)]
pub struct LossSignal {
    tx: Arc<watch::Sender<Option<LossReason>>>,
    lease: Option<Arc<Lease>>,
}

impl LossSignal {
    /// A signal that fires only when [`LossSignal::fire`] is called or, if given, the lease runs out.
    pub fn new(lease: Option<Arc<Lease>>) -> Self {
        LossSignal {
            tx: Arc::new(watch::channel(None).0),
            lease,
        }
    }

    /// Marks the grant as lost. Only the first reason is kept; later calls return `false`.
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

    /// The loss reason, if the grant was lost (including by an expired lease).
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

    /// Resolves when the grant is lost. Cancel safe.
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

/// Boxed future used by the object-safe parts of the API.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How a guard gives its lock back. Implemented by each [`crate::Locker`].
pub trait Release: Send + Sync + 'static {
    /// Releases the lock and resolves when the release has been sent to (and, where the
    /// protocol allows, acknowledged by) the lock service.
    fn release(self: Box<Self>) -> BoxFuture<'static, Result<()>>;
    /// Releases without waiting; used by `Drop`. Must not block.
    fn release_in_background(self: Box<Self>);
}

/// A held lock.
///
/// The guard carries the grant's [fencing token](LockGuard::fencing_token) and a
/// [loss signal](LockGuard::lost). Dropping the guard releases the lock in the background;
/// [`LockGuard::release`] releases it and waits.
///
/// Holding a guard does **not** prove that no one else holds the lock: a holder that was cut off
/// from the broker or frozen may still have its guard while the broker has granted the lock to
/// the next waiter. Pass [`LockGuard::fencing_token`] to the protected resource and let it reject
/// writes with a token lower than the highest it has seen; that is what keeps the resource safe.
#[must_use = "dropping the guard releases the lock"]
pub struct LockGuard {
    name: Arc<str>,
    token: u64,
    signal: LossSignal,
    release: Option<Box<dyn Release>>,
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("name", &self.name)
            .field("fencing_token", &self.token)
            .field("held", &self.is_held())
            .finish()
    }
}

impl LockGuard {
    /// Builds a guard; used by [`crate::Locker`] implementations.
    pub fn new(
        name: impl Into<Arc<str>>,
        token: u64,
        signal: LossSignal,
        release: Box<dyn Release>,
    ) -> Self {
        LockGuard {
            name: name.into(),
            token,
            signal,
            release: Some(release),
        }
    }

    /// Drops the release hook without running it (the locker has already taken the grant back).
    pub(crate) fn disarm(&mut self) {
        self.release = None;
    }

    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The fencing token of this grant: strictly greater than the token of every earlier grant
    /// of the same lock. Send it with every write to the protected resource.
    pub fn fencing_token(&self) -> u64 {
        self.token
    }

    /// Whether the lock is still believed held: no loss has been signalled and the broker has
    /// been heard from within the safety margin. `false` is final.
    pub fn is_held(&self) -> bool {
        self.signal.reason().is_none()
    }

    /// Why the lock was lost, if it was.
    pub fn loss_reason(&self) -> Option<LossReason> {
        self.signal.reason()
    }

    /// Resolves when the lock is lost. Never resolves while the lock is held.
    ///
    /// Cancel safe: dropping the future and calling `lost()` again misses nothing.
    pub async fn lost(&self) -> LossReason {
        self.signal.lost().await
    }

    /// A cloneable handle on the loss signal, for watching the lock from another task.
    pub fn loss_signal(&self) -> LossSignal {
        self.signal.clone()
    }

    /// Releases the lock and waits until the release has reached the lock service.
    ///
    /// Returns an error only if the release could not be delivered; the lock is then released
    /// by the broker when the connection or channel closes. Not cancel safe in the sense that
    /// dropping the future mid-way still releases the lock, in the background.
    pub async fn release(mut self) -> Result<()> {
        match self.release.take() {
            Some(r) => r.release().await,
            None => Ok(()),
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Some(r) = self.release.take() {
            r.release_in_background();
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
