//! The [`Locker`] trait the adapters depend on, and [`MemoryLocker`], an in-process
//! implementation for unit tests of adapter logic.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::guard::{BoxFuture, LockGuard, Release};
use crate::loss::{LossReason, LossSignal};
use crate::name;

/// Something that grants named, fenced locks: [`crate::LockClient`] (RabbitMQ) or
/// [`MemoryLocker`] (one process, for tests).
///
/// The adapters are written against this trait, so that their logic can be unit-tested on a
/// [`MemoryLocker`]. Each implementation documents its errors: [`crate::LockClient::lock`] and
/// the [`MemoryLocker`] type.
///
/// # Cancel safety
///
/// Every acquire future is cancel safe: dropped at any await point, it never leaves the lock
/// granted to nobody (a grant that reaches a dropped acquisition is released and handed to the
/// next waiter). What remains for a moment differs: [`crate::LockClient`] closes the dropped
/// acquisition's channel from a spawned task (see [`crate::LockClient::lock`]);
/// [`MemoryLocker`] keeps the dropped waiter's place in its queue until its turn comes, then
/// skips it.
pub trait Locker: Send + Sync + 'static {
    /// Waits until the lock is granted; waiters are granted in the order they asked.
    fn lock<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<LockGuard>>;

    /// Takes the lock if nobody holds it or waits for it; `Ok(None)` otherwise
    /// ([`crate::LockClient::try_lock`] also when the broker did not hand it over in time).
    fn try_lock<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<LockGuard>>>;

    /// Waits up to `timeout` for the lock; [`Error::Timeout`] after that.
    fn lock_timeout<'a>(
        &'a self,
        name: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<LockGuard>>;

    /// Waits for the lock like [`Locker::lock_timeout`] (`None`: like [`Locker::lock`]), and
    /// keeps it after the guard lets go until another client wants it or it was unused for
    /// `keep` ([`crate::LockOptions::keep`]); this locker's next acquisition of the name then
    /// gets it back at once. Keeping is an optimisation: the default, and [`MemoryLocker`],
    /// release as the other methods' guards do.
    fn lock_keeping<'a>(
        &'a self,
        name: &'a str,
        timeout: Option<Duration>,
        keep: Duration,
    ) -> BoxFuture<'a, Result<LockGuard>> {
        let _ = keep;
        match timeout {
            Some(timeout) => self.lock_timeout(name, timeout),
            None => self.lock(name),
        }
    }

    /// Where the locks live, for error messages: the broker's address for
    /// [`crate::LockClient`], `"memory"` for [`MemoryLocker`].
    fn addr(&self) -> String {
        "memory".into()
    }
}

impl<L: Locker + ?Sized> Locker for Arc<L> {
    fn lock<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<LockGuard>> {
        (**self).lock(name)
    }
    fn try_lock<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<LockGuard>>> {
        (**self).try_lock(name)
    }
    fn lock_timeout<'a>(
        &'a self,
        name: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<LockGuard>> {
        (**self).lock_timeout(name, timeout)
    }
    fn lock_keeping<'a>(
        &'a self,
        name: &'a str,
        timeout: Option<Duration>,
        keep: Duration,
    ) -> BoxFuture<'a, Result<LockGuard>> {
        (**self).lock_keeping(name, timeout, keep)
    }
    fn addr(&self) -> String {
        (**self).addr()
    }
}

/// An in-process [`Locker`]: FIFO, fencing tokens, loss signals, and [`MemoryLocker::revoke`]
/// to simulate a lost lock. It protects nothing across processes; use it to unit-test code
/// written against [`Locker`]. Clones share their locks.
///
/// What a test may notice against [`crate::LockClient`]: there is no broker, connection or
/// lease, so a lock is lost only through [`MemoryLocker::revoke`], and
/// [`LockGuard::release`] always returns `Ok(())`, also for a revoked guard. Tokens count up
/// from 1 per lock name (a dropped waiter uses one up). The only errors are
/// [`Error::InvalidName`] and, from `lock_timeout`, [`Error::Timeout`] (its `addr` is
/// `"memory"`).
///
/// Unlike [`crate::LockClient`], it does not refuse a second acquisition of a name it holds
/// ([`Error::AlreadyHeld`]): its clones stand for separate processes in tests (two nodes of an
/// adapter, a [`crate::LockTable`] and "another process" holding the same name), which must
/// queue behind each other, so a clone's second acquisition waits like another process's.
///
/// `lock` and `try_lock` need no runtime; `lock_timeout` panics if polled outside a tokio
/// runtime with its time driver.
#[derive(Clone, Default)]
pub struct MemoryLocker {
    state: Arc<Mutex<HashMap<String, Entry>>>,
}

#[derive(Default)]
struct Entry {
    last_token: u64,
    holder: Option<(u64, LossSignal)>,
    waiters: VecDeque<(u64, oneshot::Sender<LockGuard>)>,
    next_id: u64,
}

impl std::fmt::Debug for MemoryLocker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryLocker").finish_non_exhaustive()
    }
}

struct MemoryRelease {
    locker: MemoryLocker,
    name: String,
    id: u64,
}

impl Release for MemoryRelease {
    fn release(self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        self.locker.release(&self.name, self.id);
        Box::pin(async { Ok(()) })
    }
    fn release_in_background(self: Box<Self>) {
        self.locker.release(&self.name, self.id);
    }
}

impl MemoryLocker {
    /// A locker with no locks.
    pub fn new() -> Self {
        Self::default()
    }

    /// Fires the loss signal of the current holder of `name` ([`LossReason::Revoked`]) and
    /// grants the lock to the next waiter, as the broker would after the holder's connection
    /// died. Returns whether there was a holder. The revoked guard's release then does nothing.
    pub fn revoke(&self, name: &str) -> bool {
        let mut state = self.state.lock().unwrap();
        let Some(entry) = state.get_mut(name) else {
            return false;
        };
        let Some((_, signal)) = entry.holder.take() else {
            return false;
        };
        signal.fire(LossReason::Revoked);
        self.grant_next(name, entry);
        true
    }

    /// Whether `name` is held now.
    pub fn is_locked(&self, name: &str) -> bool {
        self.state
            .lock()
            .unwrap()
            .get(name)
            .is_some_and(|e| e.holder.is_some())
    }

    fn make_guard(&self, name: &str, entry: &mut Entry, id: u64) -> LockGuard {
        entry.last_token += 1;
        let signal = LossSignal::new(None);
        entry.holder = Some((id, signal.clone()));
        LockGuard::new(
            name,
            entry.last_token,
            signal,
            Box::new(MemoryRelease {
                locker: self.clone(),
                name: name.to_owned(),
                id,
            }),
        )
    }

    fn grant_next(&self, name: &str, entry: &mut Entry) {
        while let Some((id, tx)) = entry.waiters.pop_front() {
            let guard = self.make_guard(name, entry, id);
            match tx.send(guard) {
                Ok(()) => return,
                // The waiter went away; its guard was returned to us and must not be dropped
                // while we hold the state lock (its Drop would re-enter). Forget its release.
                Err(mut guard) => {
                    guard.disarm();
                    entry.holder = None;
                }
            }
        }
    }

    fn release(&self, name: &str, id: u64) {
        let mut state = self.state.lock().unwrap();
        let Some(entry) = state.get_mut(name) else {
            return;
        };
        if entry.holder.as_ref().is_some_and(|(h, _)| *h == id) {
            entry.holder = None;
            self.grant_next(name, entry);
        }
    }

    async fn acquire(
        &self,
        name: &str,
        timeout: Option<Duration>,
        try_only: bool,
    ) -> Result<Option<LockGuard>> {
        name::validate(name)?;
        let rx = {
            let mut state = self.state.lock().unwrap();
            let entry = state.entry(name.to_owned()).or_default();
            entry.next_id += 1;
            let id = entry.next_id;
            if entry.holder.is_none() && entry.waiters.is_empty() {
                return Ok(Some(self.make_guard(name, entry, id)));
            }
            if try_only {
                return Ok(None);
            }
            let (tx, rx) = oneshot::channel();
            entry.waiters.push_back((id, tx));
            rx
        };
        // Dropping `rx` (cancellation) makes the granting side's send fail, so it moves on;
        // a guard that was already sent is dropped with `rx` and released by its Drop.
        let wait = async { rx.await.map_err(|_| Error::Closed) };
        let guard = match timeout {
            None => wait.await?,
            Some(t) => tokio::time::timeout(t, wait)
                .await
                .map_err(|_| Error::Timeout {
                    name: name.to_owned(),
                    addr: "memory".into(),
                    waited: t,
                })??,
        };
        Ok(Some(guard))
    }
}

impl Locker for MemoryLocker {
    fn lock<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<LockGuard>> {
        Box::pin(async move {
            Ok(self
                .acquire(name, None, false)
                .await?
                .expect("blocking acquire"))
        })
    }
    fn try_lock<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<LockGuard>>> {
        Box::pin(self.acquire(name, None, true))
    }
    fn lock_timeout<'a>(
        &'a self,
        name: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<LockGuard>> {
        Box::pin(async move {
            Ok(self
                .acquire(name, Some(timeout), false)
                .await?
                .expect("blocking acquire"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fifo_and_fencing() {
        let l = MemoryLocker::new();
        let g1 = l.lock("a").await.unwrap();
        assert!(l.try_lock("a").await.unwrap().is_none());
        let l2 = l.clone();
        let w = tokio::spawn(async move { l2.lock("a").await.unwrap().fencing_token() });
        tokio::task::yield_now().await;
        let t1 = g1.fencing_token();
        g1.release().await.unwrap();
        assert!(w.await.unwrap() > t1);
    }

    #[tokio::test]
    async fn revoke_fires_loss_and_hands_on() {
        let l = MemoryLocker::new();
        let g = l.lock("a").await.unwrap();
        assert!(l.revoke("a"));
        assert_eq!(g.lost().await, LossReason::Revoked);
        assert!(!g.is_held());
        let g2 = l.lock_timeout("a", Duration::from_secs(1)).await.unwrap();
        assert!(g2.fencing_token() > g.fencing_token());
        drop(g); // releasing a revoked guard must not release the new holder
        assert!(l.is_locked("a"));
    }

    #[tokio::test]
    async fn cancelled_waiters_leave_nothing_behind() {
        let l = MemoryLocker::new();
        let g = l.lock("a").await.unwrap();
        for _ in 0..10 {
            assert!(matches!(
                l.lock_timeout("a", Duration::from_millis(1)).await,
                Err(Error::Timeout { .. })
            ));
        }
        drop(g);
        assert!(l.try_lock("a").await.unwrap().is_some());
    }
}
