//! Node-local sharing of file locks.
//!
//! Every write handle of one file on this node shares one distributed lock: the first opener
//! acquires it, later openers only count themselves in, and the last release gives it back.
//! Asking the broker a second time for a lock this node already holds would queue the node
//! behind itself, so all acquisitions of one name on this node go through one async mutex.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mqlock::{LockGuard, Locker, LossSignal};
use tokio::task::JoinHandle;
// tokio's clock (the same as std's outside tests) so that the timeout tests run on paused time.
use tokio::time::Instant;

use crate::error::LockError;

/// One handle's share of a node-held lock.
#[derive(Debug, Clone)]
pub(crate) struct Share {
    pub(crate) name: Arc<str>,
    pub(crate) token: u64,
    epoch: u64,
    signal: LossSignal,
}

impl Share {
    /// Whether the grant this share belongs to was lost (a later grant does not revive it).
    pub(crate) fn is_lost(&self) -> bool {
        self.signal.reason().is_some()
    }
}

struct Held {
    guard: LockGuard,
    count: usize,
    epoch: u64,
    watcher: JoinHandle<()>,
}

/// One lock name's state on this node. `waiting` is set while an opener waits for the lock
/// service to grant it (the lock is held elsewhere, or at least not yet ours); the mutex alone
/// is also held for quick steps (a release in flight, a non-blocking try), which a
/// non-blocking opener waits out rather than failing.
#[derive(Default)]
struct SlotState {
    held: tokio::sync::Mutex<Option<Held>>,
    waiting: std::sync::atomic::AtomicBool,
}

type Slot = Arc<SlotState>;

/// The locks this node holds for open files, by lock name.
pub(crate) struct LockTable {
    locker: Arc<dyn Locker>,
    timeout: Duration,
    slots: Mutex<HashMap<String, Slot>>,
    epochs: AtomicU64,
}

impl LockTable {
    pub(crate) fn new(locker: Arc<dyn Locker>, timeout: Duration) -> Self {
        LockTable {
            locker,
            timeout,
            slots: Mutex::new(HashMap::new()),
            epochs: AtomicU64::new(0),
        }
    }

    fn slot(&self, name: &str) -> Slot {
        self.slots
            .lock()
            .unwrap()
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    /// Joins this node's hold of `name`, acquiring it from the lock service if the node does
    /// not hold it. Waits at most the configured timeout; with `nonblock`, not at all.
    ///
    /// Cancel safety: a drop while waiting leaves no share and no grant behind (the lock
    /// service's wait is dropped with it) but may leave the name's empty slot in the table
    /// until the name's next acquire or release collects it. The mount never drops it: every
    /// acquisition runs to its end in its own task.
    pub(crate) async fn acquire(&self, name: &str, nonblock: bool) -> Result<Share, LockError> {
        let started = Instant::now();
        let slot = self.slot(name);
        let result = self.acquire_in(&slot, name, nonblock, started).await;
        if result.is_err() {
            self.collect(name, slot);
        }
        result
    }

    async fn acquire_in(
        &self,
        slot: &Slot,
        name: &str,
        nonblock: bool,
        started: Instant,
    ) -> Result<Share, LockError> {
        let timeout = || LockError::Timeout {
            name: name.to_owned(),
            waited: started.elapsed(),
        };
        let busy = || LockError::Busy {
            name: name.to_owned(),
        };
        let mut state = if nonblock {
            // Another opener on this node waiting for the lock service: the lock is not ours
            // yet, so for a non-blocking open it counts as held elsewhere. A release in flight
            // (this node's last close, a moment ago) is waited out: the lock is about to be free.
            loop {
                if slot.waiting.load(Ordering::Acquire) {
                    return Err(busy());
                }
                if let Ok(state) = slot.held.try_lock() {
                    break state;
                }
                if started.elapsed() >= self.timeout {
                    return Err(busy());
                }
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
        } else {
            tokio::time::timeout(self.timeout, slot.held.lock())
                .await
                .map_err(|_| timeout())?
        };
        if let Some(held) = state.as_mut() {
            if held.guard.is_held() {
                held.count += 1;
                return Ok(share_of(held));
            }
            // The grant was lost (and logged by its watcher). Handles of that grant keep
            // failing; this opener needs a new grant.
            if let Some(old) = state.take() {
                old.watcher.abort();
            }
        }
        let guard = if nonblock {
            self.locker
                .try_lock(name)
                .await?
                .ok_or_else(|| LockError::Busy {
                    name: name.to_owned(),
                })?
        } else {
            let left = self.timeout.saturating_sub(started.elapsed());
            /// Clears `waiting` however the wait ends (also if the future is dropped).
            struct Waiting<'a>(&'a std::sync::atomic::AtomicBool);
            impl Drop for Waiting<'_> {
                fn drop(&mut self) {
                    self.0.store(false, Ordering::Release);
                }
            }
            slot.waiting.store(true, Ordering::Release);
            let w = Waiting(&slot.waiting);
            let r = self.locker.lock_timeout(name, left).await;
            drop(w);
            match r {
                Ok(g) => g,
                Err(mqlock::Error::Timeout { .. }) => return Err(timeout()),
                Err(e) => return Err(e.into()),
            }
        };
        let epoch = self.epochs.fetch_add(1, Ordering::Relaxed);
        let signal = guard.loss_signal();
        let token = guard.fencing_token();
        let lock_name = name.to_owned();
        let watcher = tokio::spawn(async move {
            let reason = signal.lost().await;
            tracing::error!(
                lock = %lock_name,
                fencing_token = token,
                %reason,
                "lost the lock of a file open for writing: further writes through its handles fail with EIO"
            );
        });
        tracing::debug!(lock = %name, fencing_token = token, waited = ?started.elapsed(), "file lock acquired");
        let held = state.insert(Held {
            guard,
            count: 1,
            epoch,
            watcher,
        });
        Ok(share_of(held))
    }

    /// Leaves this node's hold; the last share out releases the lock.
    ///
    /// Cancel safety: a drop while waiting for the slot leaves the share counted, so the lock
    /// stays held until the connection closes; a drop during the release itself still releases
    /// it, in the background (the guard's drop). The mount runs every release in its own task.
    pub(crate) async fn release(&self, share: &Share) {
        let Some(slot) = self.slots.lock().unwrap().get(&*share.name).cloned() else {
            return;
        };
        {
            let mut state = slot.held.lock().await;
            let last = match state.as_mut() {
                Some(held) if held.epoch == share.epoch => {
                    held.count -= 1;
                    held.count == 0
                }
                _ => false,
            };
            if last {
                let held = state.take().expect("checked above");
                held.watcher.abort();
                if let Err(e) = held.guard.release().await {
                    tracing::warn!(lock = %share.name, error = %e, "releasing a file lock failed; the broker frees it when the connection closes");
                } else {
                    tracing::debug!(lock = %share.name, fencing_token = share.token, "file lock released");
                }
            }
        }
        self.collect(&share.name, slot);
    }

    /// Drops the slot of `name` if nobody holds, waits for or uses it.
    fn collect(&self, name: &str, slot: Slot) {
        let mut slots = self.slots.lock().unwrap();
        // Two references: the map's and ours. Anyone else would be an opener in flight.
        if Arc::strong_count(&slot) == 2 && slot.held.try_lock().is_ok_and(|s| s.is_none()) {
            slots.remove(name);
        }
    }

    /// Number of lock names this node currently holds or is acquiring (for tests).
    #[cfg(test)]
    pub(crate) fn slots(&self) -> usize {
        self.slots.lock().unwrap().len()
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
    use mqlock::MemoryLocker;

    fn table(l: &MemoryLocker, t: Duration) -> LockTable {
        LockTable::new(Arc::new(l.clone()), t)
    }

    #[tokio::test]
    async fn shares_one_grant_and_the_last_release_unlocks() {
        let l = MemoryLocker::new();
        let t = table(&l, Duration::from_secs(1));
        let a = t.acquire("f", false).await.unwrap();
        let b = t.acquire("f", true).await.unwrap();
        assert_eq!(a.token, b.token);
        t.release(&a).await;
        assert!(l.is_locked("f"));
        t.release(&b).await;
        assert!(!l.is_locked("f"));
        assert_eq!(t.slots(), 0);
    }

    // Paused clock: the bounds are checked on tokio's virtual time, so a loaded machine cannot
    // fail them and the 200 ms timeout costs no real time.
    #[tokio::test(start_paused = true)]
    async fn nonblocking_fails_at_once_and_blocking_times_out() {
        let l = MemoryLocker::new();
        let other = l.lock("f").await.unwrap();
        let t = table(&l, Duration::from_millis(200));
        let started = Instant::now();
        let e = t.acquire("f", true).await.unwrap_err();
        assert_eq!(e.errno(), libc::EWOULDBLOCK);
        assert!(started.elapsed() < Duration::from_millis(100));
        let e = t.acquire("f", false).await.unwrap_err();
        assert_eq!(e.errno(), libc::ETIMEDOUT);
        assert!(started.elapsed() >= Duration::from_millis(200));
        drop(other);
        assert!(t.acquire("f", false).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_nonblocking_opener_waits_out_a_release_in_flight_but_not_a_waiter() {
        let l = MemoryLocker::new();
        let t = Arc::new(table(&l, Duration::from_secs(2)));
        let a = t.acquire("f", false).await.unwrap();
        // A release in flight holds the slot's mutex for a moment.
        let slot = t.slot("f");
        let g = slot.held.lock().await;
        let t2 = t.clone();
        let opener = tokio::spawn(async move { t2.acquire("f", true).await.map(|s| s.token) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(g);
        assert_eq!(
            opener.await.unwrap().unwrap(),
            a.token,
            "joined the held grant"
        );
        drop(slot);
        // An opener waiting for a lock held elsewhere makes a non-blocking open fail at once.
        let other = l.lock("g").await.unwrap();
        let t3 = t.clone();
        let waiter = tokio::spawn(async move { t3.acquire("g", false).await.is_ok() });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let started = Instant::now();
        let e = t.acquire("g", true).await.unwrap_err();
        assert_eq!(e.errno(), libc::EWOULDBLOCK);
        assert!(started.elapsed() < Duration::from_millis(100));
        drop(other);
        assert!(waiter.await.unwrap());
    }

    #[tokio::test]
    async fn a_lost_grant_stays_lost_and_a_new_opener_gets_a_new_one() {
        let l = MemoryLocker::new();
        let t = table(&l, Duration::from_secs(1));
        let a = t.acquire("f", false).await.unwrap();
        assert!(l.revoke("f"));
        assert!(a.is_lost());
        let b = t.acquire("f", false).await.unwrap();
        assert!(!b.is_lost());
        assert!(b.token > a.token);
        // The old share's release must not release the new grant.
        t.release(&a).await;
        assert!(l.is_locked("f"));
        t.release(&b).await;
        assert!(!l.is_locked("f"));
    }
}
