//! Node-local sharing of file locks.
//!
//! Every write handle of one file on this node shares one distributed lock: the first opener
//! acquires it, later openers only count themselves in, and the last release gives it back.
//! Asking the broker a second time for a lock this node already holds would queue the node
//! behind itself, so every acquisition goes through the core's per-process
//! [`mqlock::LockTable`] (its shared use: [`mqlock::LockTable::share`]). This module adds the
//! file system's view: a non-blocking open, and the errno each failure becomes.
//!
//! With lock caching ([`crate::MountConfig::lock_caching`]) the table keeps each lock after the
//! last share is given back ([`mqlock::LockTable::with_keep`]): parked, still held and fenced,
//! until another node asks for it or it was unused for the idle limit. The next share of the
//! name on this node takes it back without a broker round trip, with the same fencing token.

use std::sync::Arc;
use std::time::Duration;

use mqlock::Locker;
// tokio's clock (the same as std's outside tests) so that the timeout tests run on paused time.
use tokio::time::Instant;

use crate::error::LockError;

/// One handle's share of the node's grant of a file's lock.
pub(crate) use mqlock::Share;

/// How long an `O_NONBLOCK` write-open waits, with lock caching, for a lock another node
/// holds: a node that only keeps it parked gives it up within one hand-off (its wait wakes that
/// node), while a node that has the file open keeps it, and the open fails with `EWOULDBLOCK`
/// after this.
pub(crate) const NONBLOCK_HANDOFF: Duration = Duration::from_millis(250);

/// The locks this node holds for open files, by lock name.
pub(crate) struct LockTable {
    table: mqlock::LockTable,
    timeout: Duration,
    /// Lock caching is on: locks are parked after the last share ([`crate::MountConfig::lock_caching`]).
    caching: bool,
}

impl LockTable {
    /// `keep`: the idle limit of parked locks ([`crate::MountConfig::lock_caching`]), `None`
    /// to release at the last share.
    pub(crate) fn new(locker: Arc<dyn Locker>, timeout: Duration, keep: Option<Duration>) -> Self {
        let table = mqlock::LockTable::new(locker).with_loss_message(
            "lost the lock of a file open for writing: further writes through its handles fail with EIO",
        );
        let table = match keep {
            Some(idle) => table.with_keep(idle),
            None => table,
        };
        LockTable {
            table,
            timeout,
            caching: keep.is_some(),
        }
    }

    /// Joins this node's hold of `name`, acquiring it from the lock service if the node does
    /// not hold it. Waits at most the configured timeout; with `nonblock`, not for another
    /// node that uses the file (a release in flight on this node is waited out: the lock is
    /// about to be free). With lock caching, a non-blocking open waits up to
    /// [`NONBLOCK_HANDOFF`] for the lock: the broker cannot tell a lock another node keeps
    /// parked from one it uses, and a parked one is handed over within that.
    ///
    /// Cancel safe: a share is counted only when it is returned (see
    /// [`mqlock::LockTable::share`]).
    pub(crate) async fn acquire(&self, name: &str, nonblock: bool) -> Result<Share, LockError> {
        let started = Instant::now();
        let busy = || LockError::Busy {
            name: name.to_owned(),
        };
        let share = if nonblock && self.caching {
            match self
                .table
                .share(name, NONBLOCK_HANDOFF.min(self.timeout))
                .await
            {
                Ok(share) => share,
                Err(mqlock::Error::Timeout { .. }) => return Err(busy()),
                Err(e) => return Err(e.into()),
            }
        } else if nonblock {
            self.table
                .try_share(name, self.timeout)
                .await?
                .ok_or_else(busy)?
        } else {
            match self.table.share(name, self.timeout).await {
                Ok(share) => share,
                Err(mqlock::Error::Timeout { .. }) => {
                    return Err(LockError::Timeout {
                        name: name.to_owned(),
                        waited: started.elapsed(),
                    });
                }
                Err(e) => return Err(e.into()),
            }
        };
        tracing::debug!(lock = %name, fencing_token = share.fencing_token(), waited = ?started.elapsed(), "file lock shared");
        Ok(share)
    }

    /// Joins or acquires every lock of `names`, or none (rename's two paths): the core's
    /// multi-lock ([`mqlock::LockTable::share_all`]), so the locks are taken in the one global
    /// order of every multi-lock (two nodes renaming across the same pair in opposite directions
    /// cannot deadlock), the configured timeout bounds the whole set, and on a failure the shares
    /// already taken are given back before the error returns. The names must differ.
    ///
    /// Not cancel safe (see [`mqlock::LockTable::share_all`]): callers run it to completion in a
    /// task of their own.
    pub(crate) async fn acquire_all(&self, names: &[String]) -> Result<Vec<Share>, LockError> {
        let shares = match self.table.share_all(names, self.timeout).await {
            Ok(shares) => shares,
            Err(mqlock::Error::Timeout { name, waited, .. }) => {
                return Err(LockError::Timeout { name, waited });
            }
            Err(e) => return Err(e.into()),
        };
        tracing::debug!(locks = ?names, "file locks shared");
        Ok(shares)
    }

    /// Leaves this node's hold; the last share out releases the lock.
    ///
    /// Not cancel safe: see [`mqlock::LockTable::unshare`]; callers run it to completion in a
    /// task of their own.
    pub(crate) async fn release(&self, share: &Share) {
        self.table.unshare(share).await;
    }

    /// Number of lock names this node currently holds or is acquiring (for tests).
    #[cfg(test)]
    pub(crate) fn slots(&self) -> usize {
        self.table.names_in_use()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqlock::MemoryLocker;

    fn table(l: &MemoryLocker, t: Duration) -> LockTable {
        LockTable::new(Arc::new(l.clone()), t, None)
    }

    #[tokio::test]
    async fn shares_one_grant_and_the_last_release_unlocks() {
        let l = MemoryLocker::new();
        let t = table(&l, Duration::from_secs(1));
        let a = t.acquire("f", false).await.unwrap();
        let b = t.acquire("f", true).await.unwrap();
        assert_eq!(a.fencing_token(), b.fencing_token());
        t.release(&a).await;
        assert!(l.is_locked("f"));
        t.release(&b).await;
        assert!(!l.is_locked("f"));
        assert_eq!(t.slots(), 0);
    }

    /// With lock caching, a non-blocking open gives a lock held elsewhere one hand-off
    /// (`NONBLOCK_HANDOFF`) to come, then fails with EWOULDBLOCK, never with ETIMEDOUT.
    #[tokio::test(start_paused = true)]
    async fn with_caching_a_nonblocking_open_waits_one_hand_off_at_most() {
        let l = MemoryLocker::new();
        let other = l.lock("f").await.unwrap();
        let t = LockTable::new(
            Arc::new(l.clone()),
            Duration::from_secs(30),
            Some(Duration::from_secs(30)),
        );
        let started = Instant::now();
        let e = t.acquire("f", true).await.unwrap_err();
        assert_eq!(e.errno(), libc::EWOULDBLOCK);
        assert!(started.elapsed() >= NONBLOCK_HANDOFF);
        assert!(started.elapsed() < NONBLOCK_HANDOFF + Duration::from_secs(1));
        // Handed over within it: granted.
        let l2 = l.clone();
        tokio::spawn(async move {
            tokio::time::sleep(NONBLOCK_HANDOFF / 2).await;
            drop(other);
            drop(l2);
        });
        let share = t.acquire("f", true).await.unwrap();
        t.release(&share).await;
        assert_eq!(t.slots(), 0);
    }

    // Paused clock, as below.
    #[tokio::test(start_paused = true)]
    async fn acquire_all_has_one_timeout_and_gives_back_what_it_took() {
        let l = MemoryLocker::new();
        let busy = l.lock("fs:/b").await.unwrap();
        let t = table(&l, Duration::from_millis(300));
        let names = ["fs:/b".to_owned(), "fs:/a".to_owned()];
        let started = Instant::now();
        let e = t.acquire_all(&names).await.unwrap_err();
        assert_eq!(e.errno(), libc::ETIMEDOUT);
        assert!(matches!(e, LockError::Timeout { ref name, .. } if name == "fs:/b"));
        assert!(started.elapsed() < Duration::from_millis(400));
        assert!(!l.is_locked("fs:/a"), "the first lock was given back");
        assert_eq!(t.slots(), 0);
        drop(busy);
        let shares = t.acquire_all(&names).await.unwrap();
        assert_eq!(shares[0].name(), "fs:/b");
        for s in &shares {
            t.release(s).await;
        }
        assert!(!l.is_locked("fs:/a") && !l.is_locked("fs:/b"));
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
}
