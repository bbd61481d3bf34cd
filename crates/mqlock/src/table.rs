//! The per-process lock table: at most one distributed hold, and one broker waiter, per lock
//! name and process.
//!
//! A process that asks the broker twice for the same lock queues behind itself: its second
//! consumer waits for its first to let go. The adapters therefore put a [`LockTable`] in front
//! of the [`Locker`]: every use of a name in this process goes through one in-process slot (a
//! FIFO async mutex), so the broker sees one consumer per name per process, and tasks of one
//! process are served in the order they asked.
//!
//! A slot is used in one of two ways:
//! - [`LockTable::lock`]: exclusive among the process's tasks (the cache's key locks): the
//!   task holds the slot and the grant until its [`TableGuard`] is released or dropped.
//! - [`LockTable::share`]: shared among the process's users (the mount's write handles of one
//!   file): the first user acquires the grant, later ones join it, the last
//!   [`LockTable::unshare`] releases it.
//!
//! A slot is removed from the table as soon as nobody holds, shares or waits for it, so the
//! table's size is the number of names in use.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::{Mutex as AsyncMutex, Notify, OwnedMutexGuard};
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::guard::LockGuard;
use crate::locker::Locker;
use crate::loss::LossSignal;

/// How long past its own timeout a locker may take to report it before the table gives up.
const LOCKER_GRACE: Duration = Duration::from_millis(500);

/// The grant a slot holds for its sharers.
struct Held {
    guard: LockGuard,
    users: usize,
    /// Which grant this is: a share of an earlier (lost) grant must not release a later one.
    epoch: u64,
    /// Logs the loss of the grant; aborted when the grant is released.
    watcher: JoinHandle<()>,
}

type State = Arc<AsyncMutex<Option<Held>>>;
type Slots = Arc<Mutex<HashMap<String, SlotEntry>>>;

#[derive(Clone, Default)]
struct SlotEntry {
    state: State,
    /// Set while a user of this process waits for the locker to grant the name: the lock is
    /// then not ours yet, which a non-blocking [`LockTable::try_share`] must see at once.
    waiting: Arc<AtomicBool>,
    /// Notified when the sharers' grant is released, for an exclusive user waiting for it.
    released: Arc<Notify>,
}

/// A counted reference to a slot that removes it from the table when it is the last user,
/// also when a waiter is cancelled.
struct SlotRef {
    slots: Slots,
    name: String,
    entry: SlotEntry,
}

impl Drop for SlotRef {
    fn drop(&mut self) {
        let mut slots = self.slots.lock().unwrap();
        // The map's reference plus ours: nobody else holds, shares or waits for this name.
        if Arc::strong_count(&self.entry.state) == 2
            && self.entry.state.try_lock().is_ok_and(|s| s.is_none())
        {
            slots.remove(&self.name);
        }
    }
}

/// One distributed hold per lock name per process, in front of a [`Locker`].
///
/// See the [module docs](self) for the two ways to use a slot. Cloning is not needed: share
/// the table behind an `Arc`.
pub struct LockTable {
    locker: Arc<dyn Locker>,
    slots: Slots,
    epochs: AtomicU64,
    loss_message: &'static str,
    /// `with_keep`: how long a lock is kept unused after this process's last user let go.
    keep: Option<Duration>,
}

impl std::fmt::Debug for LockTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockTable")
            .field("names_in_use", &self.names_in_use())
            .finish_non_exhaustive()
    }
}

/// An exclusive hold of a name by one task of this process (from [`LockTable::lock`]).
///
/// Dropping it releases the lock in the background, like [`LockGuard`]'s drop; the next task
/// of this process that waits for the name starts its distributed wait only after that release
/// was sent.
pub struct TableGuard {
    // Field order matters: the grant is released before the slot is handed to the next task.
    guard: Option<LockGuard>,
    _local: OwnedMutexGuard<Option<Held>>,
    _slot: SlotRef,
}

impl std::fmt::Debug for TableGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TableGuard")
            .field("guard", &self.guard)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for SlotRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotRef").field("name", &self.name).finish()
    }
}

impl TableGuard {
    /// The distributed grant: its name, fencing token and loss signal.
    pub fn guard(&self) -> &LockGuard {
        self.guard.as_ref().expect("present until release")
    }

    /// Releases the lock and waits until the broker was told, then lets the next task of this
    /// process have the slot.
    ///
    /// # Errors
    ///
    /// As [`LockGuard::release`]; the slot is handed on either way.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before it completes releases the lock in the background, as
    /// dropping the guard does.
    pub async fn release(mut self) -> Result<()> {
        match self.guard.take() {
            Some(g) => g.release().await,
            None => Ok(()),
        }
    }
}

/// A user's share of this process's grant of a name (from [`LockTable::share`]). Give it back
/// with [`LockTable::unshare`]; the last share given back releases the lock.
#[derive(Debug, Clone)]
pub struct Share {
    name: Arc<str>,
    token: u64,
    epoch: u64,
    signal: LossSignal,
}

impl Share {
    /// The lock name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The fencing token of the grant this share belongs to.
    pub fn fencing_token(&self) -> u64 {
        self.token
    }

    /// Whether the grant this share belongs to was lost. A later grant of the same name does
    /// not revive it: the share's holder must stop using the protected resource.
    pub fn is_lost(&self) -> bool {
        self.signal.reason().is_some()
    }

    /// The loss signal of the grant this share belongs to.
    pub fn loss_signal(&self) -> &LossSignal {
        &self.signal
    }
}

/// Clears a slot's `waiting` flag however the wait ends (also when the future is dropped).
struct Waiting<'a>(&'a AtomicBool);

impl<'a> Waiting<'a> {
    fn start(flag: &'a AtomicBool) -> Self {
        flag.store(true, Ordering::Release);
        Waiting(flag)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl LockTable {
    /// An empty table in front of `locker`.
    pub fn new(locker: Arc<dyn Locker>) -> Self {
        LockTable {
            locker,
            slots: Slots::default(),
            epochs: AtomicU64::new(0),
            loss_message: "lost a lock shared by this process's users",
            keep: None,
        }
    }

    /// Keeps each lock after this process's last user let go, until another client wants it
    /// or it was unused for `keep` ([`Locker::lock_keeping`], [`crate::LockOptions::keep`]):
    /// this process's next use of the name takes it back without a broker round trip.
    pub fn with_keep(mut self, keep: Duration) -> Self {
        self.keep = Some(keep);
        self
    }

    /// The message logged (at ERROR, with the lock name, token and reason) when a shared
    /// grant is lost, so that the log says what the loss means for the adapter's users.
    pub fn with_loss_message(mut self, message: &'static str) -> Self {
        self.loss_message = message;
        self
    }

    /// The locker behind the table.
    pub fn locker(&self) -> &Arc<dyn Locker> {
        &self.locker
    }

    /// How many names have a holder, a sharer or a waiter in this process.
    pub fn names_in_use(&self) -> usize {
        self.slots.lock().unwrap().len()
    }

    fn slot(&self, name: &str) -> SlotRef {
        let entry = self
            .slots
            .lock()
            .unwrap()
            .entry(name.to_owned())
            .or_default()
            .clone();
        SlotRef {
            slots: self.slots.clone(),
            name: name.to_owned(),
            entry,
        }
    }

    fn timeout(&self, name: &str, started: Instant) -> Error {
        Error::Timeout {
            name: name.to_owned(),
            addr: self.locker.addr(),
            waited: started.elapsed(),
        }
    }

    /// `fut`, bounded by `left` (`None`: no bound, a caller that waits as long as it takes).
    async fn within<F: std::future::Future>(
        &self,
        name: &str,
        started: Instant,
        left: Option<Duration>,
        fut: F,
    ) -> Result<F::Output> {
        match left {
            Some(left) => tokio::time::timeout(left, fut)
                .await
                .map_err(|_| self.timeout(name, started)),
            None => Ok(fut.await),
        }
    }

    /// The locker's acquisition, kept after use if the table keeps its locks.
    fn acquire<'a>(
        &'a self,
        name: &'a str,
        timeout: Option<Duration>,
    ) -> crate::guard::BoxFuture<'a, Result<LockGuard>> {
        match (self.keep, timeout) {
            (Some(keep), timeout) => self.locker.lock_keeping(name, timeout, keep),
            (None, Some(timeout)) => self.locker.lock_timeout(name, timeout),
            (None, None) => self.locker.lock(name),
        }
    }

    /// The locker's wait, bounded here as well: "never hang" is the table's promise even for a
    /// locker that does not keep its own timeout. The grace lets the locker report its own
    /// timeout (or error) first.
    async fn bounded(&self, name: &str, left: Duration, started: Instant) -> Result<LockGuard> {
        tokio::time::timeout(
            left.saturating_add(LOCKER_GRACE),
            self.acquire(name, Some(left)),
        )
        .await
        .map_err(|_| self.timeout(name, started))?
    }

    /// Waits, first behind this process's other tasks (FIFO), then for the distributed lock,
    /// at most `timeout` in all (a `Duration`, or an `Option<Duration>` whose `None` waits as
    /// long as it takes).
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] when `timeout` ran out (in the process's queue or the broker's);
    /// otherwise what [`Locker::lock_timeout`] returns.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a drop while queued in the process leaves the queue; a drop while waiting
    /// for the broker leaves what the locker's acquisition leaves (nothing, for both lockers
    /// of this crate).
    pub async fn lock(
        &self,
        name: &str,
        timeout: impl Into<Option<Duration>>,
    ) -> Result<TableGuard> {
        let timeout: Option<Duration> = timeout.into();
        let started = Instant::now();
        let slot = self.slot(name);
        let left = || timeout.map(|t| t.saturating_sub(started.elapsed()));
        let local = loop {
            let mut local = self
                .within(name, started, left(), slot.entry.state.clone().lock_owned())
                .await?;
            // Sharers of this process hold the grant: asking the broker now would queue this
            // process behind itself while holding the slot their last unshare needs. Wait
            // for that release instead (armed before the slot is let go: no lost wake-up).
            if local.as_ref().is_some_and(|h| h.guard.is_held()) {
                let released = slot.entry.released.notified();
                tokio::pin!(released);
                released.as_mut().enable();
                drop(local);
                self.within(name, started, left(), released).await?;
                continue;
            }
            if let Some(lost) = local.take() {
                lost.watcher.abort();
            }
            break local;
        };
        let waiting = Waiting::start(&slot.entry.waiting);
        let guard = match left() {
            Some(left) if left.is_zero() => Err(self.timeout(name, started)),
            Some(left) => self.bounded(name, left, started).await,
            None => self.acquire(name, None).await,
        };
        drop(waiting);
        Ok(TableGuard {
            guard: Some(guard?),
            _local: local,
            _slot: slot,
        })
    }

    /// Joins this process's grant of `name`, or acquires it if the process holds none; waits
    /// at most `timeout` in all.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] when `timeout` ran out; otherwise what [`Locker::lock_timeout`]
    /// returns.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe, as [`LockTable::lock`]: a share is counted only when it is returned.
    pub async fn share(&self, name: &str, timeout: Duration) -> Result<Share> {
        let started = Instant::now();
        let slot = self.slot(name);
        let mut state = tokio::time::timeout(timeout, slot.entry.state.lock())
            .await
            .map_err(|_| self.timeout(name, started))?;
        if let Some(share) = self.join(&mut state) {
            return Ok(share);
        }
        let left = timeout.saturating_sub(started.elapsed());
        let waiting = Waiting::start(&slot.entry.waiting);
        let guard = self.bounded(name, left, started).await;
        drop(waiting);
        Ok(self.start(&mut state, guard?))
    }

    /// Joins or acquires this process's grant of every name of `names`, or of none, within
    /// `timeout` in all: the multi-lock of [`crate::lock_all`] (docs/protocol.md, "Multi-lock")
    /// over [`LockTable::share`]. The names are taken one after the other in the one global
    /// order (sorted by their bytes), each with what is left of the deadline, so two processes
    /// taking overlapping sets never wait for each other in a cycle. On any failure the shares
    /// already taken are given back ([`LockTable::unshare`], awaited) before the error is
    /// returned. The shares come back in the order of `names`.
    ///
    /// # Errors
    ///
    /// - [`Error::InvalidName`]: a name is invalid (checked for every name before anything is
    ///   taken).
    /// - [`Error::AlreadyHeld`]: a name appears twice in `names` (checked before anything is
    ///   taken).
    /// - [`Error::Timeout`]: the deadline passed; the error names the lock waited for and the
    ///   time since the call.
    /// - Otherwise what [`LockTable::share`] returns.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: the shares taken before the future is dropped stay counted, and their
    /// grants stay held, until the process ends. Run it to completion (in a task of its own,
    /// like [`LockTable::unshare`]).
    pub async fn share_all<S: AsRef<str>>(
        &self,
        names: &[S],
        timeout: Duration,
    ) -> Result<Vec<Share>> {
        crate::multi::take_all(
            names,
            timeout,
            || self.locker.addr(),
            |name, left| self.share(name, left),
            |share| async move { self.unshare(&share).await },
        )
        .await
    }

    /// Joins this process's grant of `name`, or takes the lock if it is free; `Ok(None)` if
    /// another process holds it or a user of this process is waiting for it (the lock is not
    /// this process's yet). A release in flight in this process is waited out, up to
    /// `timeout`: the lock is about to be free.
    ///
    /// # Errors
    ///
    /// What [`Locker::try_lock`] returns.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe, as [`LockTable::lock`].
    pub async fn try_share(&self, name: &str, timeout: Duration) -> Result<Option<Share>> {
        let started = Instant::now();
        let slot = self.slot(name);
        let mut state = loop {
            if slot.entry.waiting.load(Ordering::Acquire) {
                return Ok(None);
            }
            if let Ok(state) = slot.entry.state.try_lock() {
                break state;
            }
            if started.elapsed() >= timeout {
                return Ok(None);
            }
            // Short: the holder of the slot's mutex is a quick step (a release, another try),
            // since a long wait would have set `waiting`.
            tokio::time::sleep(Duration::from_micros(500)).await;
        };
        if let Some(share) = self.join(&mut state) {
            return Ok(Some(share));
        }
        Ok(self
            .locker
            .try_lock(name)
            .await?
            .map(|guard| self.start(&mut state, guard)))
    }

    /// Gives a share back; the last share of a grant releases the lock (and waits until the
    /// broker was told). A share of a grant that was lost and replaced releases nothing.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before the release was sent leaves the share counted out but the
    /// grant in the table; the last share's drop of the grant itself then releases it in the
    /// background. Do not drop it.
    pub async fn unshare(&self, share: &Share) {
        let entry = self.slots.lock().unwrap().get(&*share.name).cloned();
        let Some(entry) = entry else { return };
        let slot = SlotRef {
            slots: self.slots.clone(),
            name: share.name.to_string(),
            entry,
        };
        let mut state = slot.entry.state.lock().await;
        let last = match state.as_mut() {
            Some(held) if held.epoch == share.epoch => {
                held.users -= 1;
                held.users == 0
            }
            _ => false,
        };
        if last {
            let held = state.take().expect("checked above");
            held.watcher.abort();
            let released = held.guard.release().await;
            slot.entry.released.notify_waiters();
            match released {
                Ok(()) => {
                    tracing::debug!(lock = %share.name, fencing_token = share.token, "shared lock released")
                }
                Err(e) => tracing::warn!(
                    lock = %share.name, error = %e,
                    "releasing a shared lock failed; the broker frees it when the connection closes"
                ),
            }
        }
        drop(state);
        drop(slot);
    }

    /// Counts a new user into the slot's grant if it is still held. A lost grant is dropped
    /// (its loss was logged by its watcher): its shares keep failing, the caller needs a new one.
    fn join(&self, state: &mut Option<Held>) -> Option<Share> {
        if let Some(held) = state.as_mut() {
            if held.guard.is_held() {
                held.users += 1;
                return Some(share_of(held));
            }
            if let Some(old) = state.take() {
                old.watcher.abort();
            }
        }
        None
    }

    fn start(&self, state: &mut Option<Held>, guard: LockGuard) -> Share {
        let epoch = self.epochs.fetch_add(1, Ordering::Relaxed);
        let signal = guard.loss_signal();
        let token = guard.fencing_token();
        let name = guard.name().to_owned();
        let message = self.loss_message;
        let watcher = tokio::spawn(async move {
            let reason = signal.lost().await;
            tracing::error!(lock = %name, fencing_token = token, %reason, "{message}");
        });
        share_of(state.insert(Held {
            guard,
            users: 1,
            epoch,
            watcher,
        }))
    }
}

fn share_of(held: &Held) -> Share {
    Share {
        name: held.guard.name().into(),
        token: held.guard.fencing_token(),
        epoch: held.epoch,
        signal: held.guard.loss_signal(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryLocker;

    fn table(l: &MemoryLocker) -> Arc<LockTable> {
        Arc::new(LockTable::new(Arc::new(l.clone())))
    }

    #[tokio::test(start_paused = true)]
    async fn exclusive_users_queue_in_process_then_at_the_broker() {
        let memory = MemoryLocker::new();
        let t = table(&memory);
        let held = t.lock("k", Duration::from_secs(5)).await.unwrap();
        assert!(memory.is_locked("k"));
        let t2 = t.clone();
        let waiter = tokio::spawn(async move {
            t2.lock("k", Duration::from_secs(5))
                .await
                .map(|h| h.guard().fencing_token())
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !waiter.is_finished(),
            "the second task queues behind the first"
        );
        let first = held.guard().fencing_token();
        held.release().await.unwrap();
        assert!(waiter.await.unwrap().unwrap() > first);
        assert_eq!(t.names_in_use(), 0);
        assert!(!memory.is_locked("k"));
    }

    #[tokio::test(start_paused = true)]
    async fn exclusive_waits_are_bounded_and_cancelled_waiters_leave_nothing() {
        let memory = MemoryLocker::new();
        let t = table(&memory);
        let outside = memory.lock("k").await.unwrap();
        let wait = Duration::from_millis(50);
        assert!(matches!(
            t.lock("k", wait).await,
            Err(Error::Timeout { ref name, .. }) if name == "k"
        ));
        assert_eq!(t.names_in_use(), 0);
        drop(outside);
        let held = t.lock("k", wait).await.unwrap();
        // Queued in the process behind `held`: the timeout names the lock too.
        assert!(matches!(
            t.lock("k", wait).await,
            Err(Error::Timeout { .. })
        ));
        drop(held);
        assert_eq!(t.names_in_use(), 0);
    }

    #[tokio::test]
    async fn shares_ride_one_grant_and_the_last_unshare_releases() {
        let memory = MemoryLocker::new();
        let t = table(&memory);
        let a = t.share("f", Duration::from_secs(1)).await.unwrap();
        let b = t
            .try_share("f", Duration::from_secs(1))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(a.fencing_token(), b.fencing_token());
        t.unshare(&a).await;
        assert!(memory.is_locked("f"));
        t.unshare(&b).await;
        assert!(!memory.is_locked("f"));
        assert_eq!(t.names_in_use(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn try_share_fails_at_once_and_share_times_out() {
        let memory = MemoryLocker::new();
        let other = memory.lock("f").await.unwrap();
        let t = table(&memory);
        let started = Instant::now();
        assert!(
            t.try_share("f", Duration::from_millis(200))
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(started.elapsed(), Duration::ZERO, "no wait for a busy lock");
        assert!(matches!(
            t.share("f", Duration::from_millis(200)).await,
            Err(Error::Timeout { .. })
        ));
        assert!(started.elapsed() >= Duration::from_millis(200));
        drop(other);
        assert!(t.share("f", Duration::from_millis(200)).await.is_ok());
    }

    // Paused clock: the one deadline is checked on tokio's virtual time.
    #[tokio::test(start_paused = true)]
    async fn share_all_takes_all_or_none_within_one_deadline() {
        let memory = MemoryLocker::new();
        let t = table(&memory);
        // A name this process already shares is joined; the shares come in the caller's order.
        let held = t.share("b", Duration::from_secs(1)).await.unwrap();
        let both = t
            .share_all(&["c", "b"], Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(both.iter().map(Share::name).collect::<Vec<_>>(), ["c", "b"]);
        assert_eq!(both[1].fencing_token(), held.fencing_token());
        for s in both.iter().chain([&held]) {
            t.unshare(s).await;
        }
        assert!(!memory.is_locked("b") && !memory.is_locked("c"));
        // One deadline for the set: "a" (first in the order) comes free after 200 ms, "z" never.
        // The call fails 300 ms after it started, not 300 ms after "a" came, and gives "a" back.
        let a = memory.lock("a").await.unwrap();
        let z = memory.lock("z").await.unwrap();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            drop(a);
        });
        let started = Instant::now();
        let e = t
            .share_all(&["z", "a"], Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(
            matches!(e, Error::Timeout { ref name, waited, .. } if name == "z" && waited >= Duration::from_millis(300)),
            "{e:?}"
        );
        assert!(started.elapsed() < Duration::from_millis(400));
        assert!(!memory.is_locked("a"), "the share taken was given back");
        assert_eq!(t.names_in_use(), 0);
        drop(z);
        // A name given twice takes nothing.
        assert!(matches!(
            t.share_all(&["x", "y", "x"], Duration::from_secs(1)).await,
            Err(Error::AlreadyHeld { ref name }) if name == "x"
        ));
        assert!(!memory.is_locked("x") && !memory.is_locked("y"));
    }

    #[tokio::test(start_paused = true)]
    async fn try_share_waits_out_a_release_in_flight_but_not_a_waiter() {
        let memory = MemoryLocker::new();
        let t = table(&memory);
        let a = t.share("f", Duration::from_secs(2)).await.unwrap();
        // A release in flight holds the slot's mutex for a moment.
        let slot = t.slot("f");
        let g = slot.entry.state.lock().await;
        let t2 = t.clone();
        let opener = tokio::spawn(async move {
            t2.try_share("f", Duration::from_secs(2))
                .await
                .map(|s| s.map(|s| s.fencing_token()))
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(g);
        assert_eq!(
            opener.await.unwrap().unwrap(),
            Some(a.fencing_token()),
            "joined the held grant"
        );
        drop(slot);
        // A user waiting for a lock held elsewhere makes try_share fail at once.
        let other = memory.lock("g").await.unwrap();
        let t3 = t.clone();
        let waiter =
            tokio::spawn(async move { t3.share("g", Duration::from_secs(2)).await.is_ok() });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let started = Instant::now();
        assert!(
            t.try_share("g", Duration::from_secs(2))
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(started.elapsed(), Duration::ZERO);
        drop(other);
        assert!(waiter.await.unwrap());
    }

    #[tokio::test]
    async fn a_lost_grant_stays_lost_and_a_new_user_gets_a_new_one() {
        let memory = MemoryLocker::new();
        let t = table(&memory);
        let a = t.share("f", Duration::from_secs(1)).await.unwrap();
        assert!(memory.revoke("f"));
        assert!(a.is_lost());
        let b = t.share("f", Duration::from_secs(1)).await.unwrap();
        assert!(!b.is_lost());
        assert!(b.fencing_token() > a.fencing_token());
        // The old share's unshare must not release the new grant.
        t.unshare(&a).await;
        assert!(memory.is_locked("f"));
        t.unshare(&b).await;
        assert!(!memory.is_locked("f"));
        assert_eq!(t.names_in_use(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_exclusive_user_and_sharers_exclude_each_other_in_process() {
        let memory = MemoryLocker::new();
        let t = table(&memory);
        let s = t.share("x", Duration::from_secs(1)).await.unwrap();
        // The slot's mutex is free between share calls, but the grant is the sharers': an
        // exclusive user of the same process must not take it over.
        let t2 = t.clone();
        let excl = tokio::spawn(async move { t2.lock("x", Duration::from_secs(5)).await.is_ok() });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!excl.is_finished());
        t.unshare(&s).await;
        assert!(
            excl.await.unwrap(),
            "granted after the sharers' release, no self-wait"
        );
        assert_eq!(t.names_in_use(), 0);
    }
}
