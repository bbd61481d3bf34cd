//! The held lock: [`LockGuard`], its fencing token, and how it is given back ([`Release`]).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::error::Result;
use crate::loss::{LossReason, LossSignal};

/// Boxed future used by the object-safe parts of the API ([`crate::Locker`], [`Release`]).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How a guard gives its lock back. Implemented by each [`crate::Locker`].
///
/// A guard calls exactly one of the two methods, once: [`Release::release`] from
/// [`LockGuard::release`], [`Release::release_in_background`] when it is dropped.
pub trait Release: Send + Sync + 'static {
    /// Releases the lock and resolves when the release has been sent to (and, where the
    /// protocol allows, acknowledged by) the lock service.
    ///
    /// [`LockGuard::release`] promises that dropping its future still releases the lock: an
    /// implementation must start the release before its first await point, or release when the
    /// returned future is dropped.
    fn release(self: Box<Self>) -> BoxFuture<'static, Result<()>>;
    /// Releases without waiting; used by `Drop`, which may run outside any async runtime: must
    /// neither block nor need a runtime.
    fn release_in_background(self: Box<Self>);
}

/// A held lock.
///
/// The guard carries the grant's [fencing token](LockGuard::fencing_token) and a
/// [loss signal](LockGuard::lost). Dropping the guard releases the lock in the background;
/// [`LockGuard::release`] releases it and waits, and reports a loss. Dropping needs no runtime:
/// it only tells the lock's holder task, which runs on the runtime the lock was taken on.
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
    ///
    /// `token` must be larger than every earlier grant's of the lock `name`, `signal` is the
    /// grant's loss signal (fired by the implementation when the grant is lost), and `release`
    /// gives the lock back, once, when the guard is released or dropped.
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
    /// of the same lock (after a broker lost its state, only as far as clocks allow:
    /// docs/protocol.md, "State loss"). Send it with every write to the protected resource.
    /// [`crate::LockClient`]'s tokens are `epoch << 32 | counter` and fit a signed 64-bit
    /// column until the 2090s.
    pub fn fencing_token(&self) -> u64 {
        self.token
    }

    /// Whether the lock is still believed held: no loss has been signalled and the lease is
    /// valid (for [`crate::LockClient`]: a renewal sent less than the lease margin ago came back
    /// through the lock queue). Reads the clock itself, so a process that was frozen or
    /// suspended sees `false` at its first call after it resumes, before any task has run.
    /// `false` is final; `true` is a belief, not a proof (see [`LockGuard`]).
    pub fn is_held(&self) -> bool {
        self.signal.reason().is_none()
    }

    /// Why the lock was lost, if it was: `None` exactly when [`LockGuard::is_held`] is `true`.
    pub fn loss_reason(&self) -> Option<LossReason> {
        self.signal.reason()
    }

    /// Resolves when the lock is lost, with the reason. Never resolves while the lock is held.
    ///
    /// Fires for every loss the broker tells the holder about and when the lease runs out (at
    /// most 250 ms late after a suspend of the host; [`LockGuard::is_held`] is never late).
    /// Race the critical section against it to stop work the lock no longer protects.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the loss is kept in the signal, so dropping the future and calling `lost()`
    /// again misses nothing.
    ///
    /// # Panics
    ///
    /// For a guard of [`crate::LockClient`], if polled outside a tokio runtime with its time
    /// driver (it sleeps until the lease's deadline).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(client: mqlock::LockClient) -> mqlock::Result<()> {
    /// let guard = client.lock("jobs/compaction").await?;
    /// let finished = tokio::select! {
    ///     reason = guard.lost() => {
    ///         // Past this point another holder may be running the job: stop, and let the
    ///         // fencing token make the store refuse whatever this one still sends.
    ///         eprintln!("lock lost, compaction abandoned: {reason}");
    ///         false
    ///     }
    ///     () = compact(guard.fencing_token()) => true,
    /// };
    /// if finished {
    ///     guard.release().await?;
    /// }
    /// # Ok(()) }
    /// # async fn compact(_token: u64) {}
    /// ```
    pub async fn lost(&self) -> LossReason {
        self.signal.lost().await
    }

    /// A cloneable handle on the loss signal, for watching the lock from another task.
    ///
    /// The handle outlives the guard: once the guard is released or dropped, nothing renews
    /// the lease, and the signal of a [`crate::LockClient`] guard then reports
    /// [`LossReason::LeaseExpired`] after the lease margin. Stop watching when you release.
    pub fn loss_signal(&self) -> LossSignal {
        self.signal.clone()
    }

    /// Releases the lock and waits until the lock service confirmed it.
    ///
    /// For [`crate::LockClient`], the release closes the lock's channel: the broker removes this
    /// holder's consumer and hands the lock to the next waiter in the same step
    /// (docs/protocol.md, "Release"). It returns within the lease margin plus 2 s. A
    /// [`crate::MemoryLocker`] guard is released at once and always returns `Ok(())`.
    ///
    /// # Errors
    ///
    /// - [`crate::Error::Lost`]: the lock was lost before the release completed: its loss
    ///   signal fired, or its lease ran out (also the outcome when the broker does not answer
    ///   the close within the lease margin, since nothing renews the lease meanwhile). Work done
    ///   under this guard may have overlapped a later holder's; the lock is released all the
    ///   same.
    /// - [`crate::Error::Unreachable`]: the holder task did not answer within the lease margin
    ///   plus 2 s (or, on a lease clock that stood still, the broker did not answer the close).
    ///   The close is sent or queued; the broker releases the lock when it reads it, or when the
    ///   connection ends.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future still releases the lock: the holder task carries the release out
    /// whether or not anyone waits for its answer. Only the result is lost.
    ///
    /// # Panics
    ///
    /// For a guard of [`crate::LockClient`], if polled outside a tokio runtime with its time
    /// driver.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(client: mqlock::LockClient) -> mqlock::Result<()> {
    /// let guard = client.lock("reports/daily").await?;
    /// // ... the critical section ...
    /// match guard.release().await {
    ///     Ok(()) => {}
    ///     // The lock was not held to the end: the critical section may have overlapped the
    ///     // next holder's, so its result must not be trusted as exclusive.
    ///     Err(mqlock::Error::Lost { reason, .. }) => eprintln!("lost before the release: {reason}"),
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok(()) }
    /// ```
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
