//! Per-key locking: an in-process queue in front of the distributed lock, and the budget of
//! locks kept after use.
//!
//! Every locked operation of a node first queues on an in-process mutex for the key, then takes
//! the distributed lock. So the broker sees at most one waiter per node and key, however many
//! tasks of that node mutate the key at once, and tasks of one node are served in FIFO order.
//!
//! With [`CacheConfig::lock_keep`](crate::CacheConfig::lock_keep), a key's lock is kept after
//! use ([`Locker::lock_keeping`]): the node's next operation on the key takes it back without
//! a broker round trip, and another node's wait for it makes the core release it at once. At
//! most [`CacheConfig::lock_keep_max`](crate::CacheConfig::lock_keep_max) keys are kept at a
//! time (each kept lock holds a broker channel); beyond that, locks are released after use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mqlock::{BoxFuture, LockGuard, LockTable, Locker, TableGuard};
use tokio::time::Instant;

use crate::error::Result;

/// How long past its idle limit a kept lock is still counted as kept: the core starts the
/// idle time when its holder task sees the guard let go, a moment after the budget does.
const KEEP_SLACK: Duration = Duration::from_secs(1);

/// A key's lock: this node's slot for the key and the distributed grant
/// ([`HeldKey::guard`]). Releasing or dropping it lets go of the grant (parked if kept).
pub(crate) struct HeldKey {
    // Field order matters: the budget hears of the let-go before the slot goes to the next
    // task of this node, whose admission must not be overwritten.
    kept: Option<LetGo>,
    table: TableGuard,
}

impl HeldKey {
    /// The distributed grant: its name, fencing token and loss signal.
    pub(crate) fn guard(&self) -> &LockGuard {
        self.table.guard()
    }

    /// Lets go of the lock (a kept one is parked, a plain one released) and waits until the
    /// core has been told, then hands the key to the next task of this node.
    pub(crate) async fn release(self) -> mqlock::Result<()> {
        let HeldKey { kept, table } = self;
        drop(kept);
        table.release().await
    }
}

/// Lock name of `key` in `namespace`: `cache/{namespace}/{key}`, the key escaped with
/// [`mqlock::name::escape`].
///
/// The core refuses control characters in lock names, while cache keys may contain anything, so
/// `%` and control characters are percent-encoded (an injective mapping: two keys never share
/// a lock). The core hashes names that are too long for a queue name.
pub fn lock_name(namespace: &str, key: &str) -> String {
    format!("cache/{namespace}/{}", mqlock::name::escape(key.as_bytes()))
}

/// Takes keys' locks through the core's per-process [`LockTable`]: the in-process queue, then
/// the distributed lock (kept after use within the budget, if the cache keeps locks).
pub(crate) struct KeyLocks {
    table: LockTable,
    budget: Option<Arc<KeepBudget>>,
    namespace: String,
    lock_timeout: Duration,
}

impl KeyLocks {
    /// `keep`: the idle limit of kept locks and how many keys' locks may be kept at once
    /// (`None`: every lock is released after use).
    pub(crate) fn new(
        locker: Arc<dyn Locker>,
        namespace: String,
        lock_timeout: Duration,
        keep: Option<(Duration, usize)>,
    ) -> Self {
        let (table, budget) = match keep {
            None => (LockTable::new(locker), None),
            Some((idle, max)) => {
                let budget = Arc::new(KeepBudget {
                    idle,
                    max,
                    names: Mutex::default(),
                });
                let keeping = KeepingLocker {
                    inner: locker,
                    budget: budget.clone(),
                };
                (LockTable::new(Arc::new(keeping)), Some(budget))
            }
        };
        KeyLocks {
            table,
            budget,
            namespace,
            lock_timeout,
        }
    }

    /// Waits (at most the configured lock timeout, in total) for `key`'s lock.
    ///
    /// Cancel safe: dropped at any await point, it leaves no in-process waiter, no slot and no
    /// broker waiter behind (the locker's acquire futures are cancel safe), and nothing counted
    /// in the keep budget.
    pub(crate) async fn lock(&self, key: &str) -> Result<HeldKey> {
        let name = lock_name(&self.namespace, key);
        let table = self.table.lock(&name, self.lock_timeout).await?;
        tracing::trace!(
            key,
            token = table.guard().fencing_token(),
            "cache key locked"
        );
        Ok(HeldKey {
            kept: self.budget.clone().map(|budget| LetGo { budget, name }),
            table,
        })
    }

    /// Number of keys with an in-process holder or waiter (for tests of the clean-up).
    #[cfg(test)]
    pub(crate) fn active_keys(&self) -> usize {
        self.table.names_in_use()
    }
}

/// The keys whose locks a cache keeps, so that their number stays bounded: a key is counted
/// from its admission (an acquisition that will keep its lock) until its lock's idle limit has
/// surely passed after its last let-go. A kept lock released earlier (another node wanted it)
/// stays counted until then: the count is an upper bound.
struct KeepBudget {
    idle: Duration,
    max: usize,
    /// By lock name: `None` while acquired or held (the node's slot for the key serialises
    /// them: one at a time), else until when the lock may still be kept.
    names: Mutex<HashMap<String, Option<Instant>>>,
}

impl KeepBudget {
    fn names(&self) -> std::sync::MutexGuard<'_, HashMap<String, Option<Instant>>> {
        self.names.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether an acquisition of `name` may keep its lock: always for a name counted already
    /// (keeping it again adds no lock), else while fewer than `max` names are counted. An
    /// admitted name is counted as in use.
    fn admit(&self, name: &str) -> bool {
        let mut names = self.names();
        if let Some(state) = names.get_mut(name) {
            *state = None;
            return true;
        }
        if names.len() >= self.max {
            let now = Instant::now();
            names.retain(|_, until| until.is_none_or(|t| t > now));
        }
        if names.len() >= self.max {
            return false;
        }
        names.insert(name.to_owned(), None);
        true
    }

    /// An admitted acquisition failed or was dropped: no lock of the name is held or kept
    /// (a kept one would have been taken back at once).
    fn abandon(&self, name: &str) {
        self.names().remove(name);
    }

    /// The holder of `name` let go: its lock is kept at most the idle limit from now.
    fn let_go(&self, name: &str) {
        if let Some(state @ None) = self.names().get_mut(name) {
            *state = Some(Instant::now() + self.idle + KEEP_SLACK);
        }
    }

    #[cfg(test)]
    fn counted(&self) -> usize {
        self.names().len()
    }
}

/// Tells the budget that the holder of a name let go (dropped with [`HeldKey`]).
struct LetGo {
    budget: Arc<KeepBudget>,
    name: String,
}

impl Drop for LetGo {
    fn drop(&mut self) {
        self.budget.let_go(&self.name);
    }
}

/// Un-counts an admitted acquisition that did not end in a grant (an error, or dropped).
struct Admitted<'a> {
    budget: &'a KeepBudget,
    name: &'a str,
    granted: bool,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        if !self.granted {
            self.budget.abandon(self.name);
        }
    }
}

/// The locker the cache's [`LockTable`] uses when the cache keeps locks: an acquisition that
/// the budget admits keeps its lock after use ([`Locker::lock_keeping`]), others release it.
struct KeepingLocker {
    inner: Arc<dyn Locker>,
    budget: Arc<KeepBudget>,
}

impl KeepingLocker {
    fn acquire<'a>(
        &'a self,
        name: &'a str,
        timeout: Option<Duration>,
    ) -> BoxFuture<'a, mqlock::Result<LockGuard>> {
        Box::pin(async move {
            if !self.budget.admit(name) {
                return match timeout {
                    Some(timeout) => self.inner.lock_timeout(name, timeout).await,
                    None => self.inner.lock(name).await,
                };
            }
            let mut admitted = Admitted {
                budget: &self.budget,
                name,
                granted: false,
            };
            let guard = self
                .inner
                .lock_keeping(name, timeout, self.budget.idle)
                .await?;
            admitted.granted = true;
            Ok(guard)
        })
    }
}

impl Locker for KeepingLocker {
    fn lock<'a>(&'a self, name: &'a str) -> BoxFuture<'a, mqlock::Result<LockGuard>> {
        self.acquire(name, None)
    }
    fn try_lock<'a>(&'a self, name: &'a str) -> BoxFuture<'a, mqlock::Result<Option<LockGuard>>> {
        self.inner.try_lock(name)
    }
    fn lock_timeout<'a>(
        &'a self,
        name: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, mqlock::Result<LockGuard>> {
        self.acquire(name, Some(timeout))
    }
    fn lock_keeping<'a>(
        &'a self,
        name: &'a str,
        timeout: Option<Duration>,
        keep: Duration,
    ) -> BoxFuture<'a, mqlock::Result<LockGuard>> {
        self.inner.lock_keeping(name, timeout, keep)
    }
    fn addr(&self) -> String {
        self.inner.addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use mqlock::MemoryLocker;

    #[test]
    fn lock_names_are_injective_and_valid() {
        let a = lock_name("ns", "a%0Ab");
        let b = lock_name("ns", "a\nb");
        assert_ne!(a, b);
        assert_eq!(b, "cache/ns/a%0Ab");
        assert_eq!(a, "cache/ns/a%250Ab");
        assert!(mqlock::name::validate(&lock_name("ns", "\u{0}\u{85}é")).is_ok());
        assert!(mqlock::name::validate(&lock_name("ns", "")).is_ok());
    }

    /// The names built before `mqlock::name::escape` existed: locks taken by nodes running the
    /// previous version must stay the same locks.
    #[test]
    fn lock_names_are_byte_identical_to_the_previous_escaping() {
        fn previous(namespace: &str, key: &str) -> String {
            let mut name = format!("cache/{namespace}/");
            for c in key.chars() {
                if c == '%' || c.is_control() {
                    let mut buf = [0u8; 4];
                    for b in c.encode_utf8(&mut buf).bytes() {
                        name.push_str(&format!("%{b:02X}"));
                    }
                } else {
                    name.push(c);
                }
            }
            name
        }
        for key in [
            "",
            "k",
            "a%0Ab",
            "a\nb",
            "100%",
            "\u{0}\u{1f}\u{7f}\u{85}\u{9f}",
            "é/ü:x y",
            "日本\t語",
            "%%",
            "\u{a0}\u{2028}",
        ] {
            assert_eq!(lock_name("ns", key), previous("ns", key), "{key:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn local_queue_then_distributed_lock_and_clean_up() {
        let memory = MemoryLocker::new();
        let locks = Arc::new(KeyLocks::new(
            Arc::new(memory.clone()),
            "ns".into(),
            Duration::from_secs(5),
            None,
        ));
        let held = locks.lock("k").await.unwrap();
        assert!(memory.is_locked("cache/ns/k"));
        // A second task of the node queues in process: still one distributed holder.
        let l2 = locks.clone();
        let waiter =
            tokio::spawn(async move { l2.lock("k").await.map(|h| h.guard().fencing_token()) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        let first = held.guard().fencing_token();
        drop(held);
        assert!(waiter.await.unwrap().unwrap() > first);
        assert_eq!(locks.active_keys(), 0);
        assert!(!memory.is_locked("cache/ns/k"));
    }

    #[tokio::test(start_paused = true)]
    async fn waits_are_bounded_and_cancelled_waiters_leave_nothing() {
        let memory = MemoryLocker::new();
        let locks = KeyLocks::new(
            Arc::new(memory.clone()),
            "ns".into(),
            Duration::from_millis(50),
            Some((Duration::from_secs(5), 10)),
        );
        let outside = memory.lock("cache/ns/k").await.unwrap();
        // Behind another process: the locker's own timeout.
        assert!(matches!(
            locks.lock("k").await,
            Err(Error::Lock(mqlock::Error::Timeout { .. }))
        ));
        assert_eq!(locks.active_keys(), 0);
        drop(outside);
        let held = locks.lock("k").await.unwrap();
        // Behind another task of this process: the in-process queue's timeout, same error.
        assert!(matches!(
            locks.lock("k").await,
            Err(Error::Lock(mqlock::Error::Timeout { .. }))
        ));
        drop(held);
        assert_eq!(locks.active_keys(), 0);
    }

    /// A [`MemoryLocker`] (which releases kept locks like plain ones) that counts the
    /// acquisitions asked to keep their lock.
    struct Counting {
        memory: MemoryLocker,
        kept: std::sync::atomic::AtomicUsize,
    }

    impl Locker for Counting {
        fn lock<'a>(&'a self, name: &'a str) -> BoxFuture<'a, mqlock::Result<LockGuard>> {
            self.memory.lock(name)
        }
        fn try_lock<'a>(
            &'a self,
            name: &'a str,
        ) -> BoxFuture<'a, mqlock::Result<Option<LockGuard>>> {
            self.memory.try_lock(name)
        }
        fn lock_timeout<'a>(
            &'a self,
            name: &'a str,
            timeout: Duration,
        ) -> BoxFuture<'a, mqlock::Result<LockGuard>> {
            self.memory.lock_timeout(name, timeout)
        }
        fn lock_keeping<'a>(
            &'a self,
            name: &'a str,
            timeout: Option<Duration>,
            keep: Duration,
        ) -> BoxFuture<'a, mqlock::Result<LockGuard>> {
            self.kept.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.memory.lock_keeping(name, timeout, keep)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn at_most_the_budget_of_keys_is_kept_and_kept_keys_stay_kept() {
        let counting = Arc::new(Counting {
            memory: MemoryLocker::new(),
            kept: Default::default(),
        });
        let idle = Duration::from_secs(5);
        let locks = KeyLocks::new(
            counting.clone(),
            "ns".into(),
            Duration::from_millis(50),
            Some((idle, 2)),
        );
        let kept = || counting.kept.load(std::sync::atomic::Ordering::SeqCst);
        let budget = locks.budget.clone().unwrap();
        for key in ["a", "b"] {
            locks.lock(key).await.unwrap().release().await.unwrap();
        }
        assert_eq!(kept(), 2);
        // The budget is full: a third key's lock is released after use, the kept keys stay
        // kept however often they are used.
        drop(locks.lock("c").await.unwrap());
        assert_eq!(kept(), 2);
        for _ in 0..3 {
            drop(locks.lock("a").await.unwrap());
        }
        assert_eq!(kept(), 5);
        assert_eq!(budget.counted(), 2);
        // A key is counted until its lock's idle limit has surely passed since its last use.
        tokio::time::sleep(idle).await;
        drop(locks.lock("c").await.unwrap());
        assert_eq!(kept(), 5, "b and a are still counted at the idle limit");
        tokio::time::sleep(KEEP_SLACK).await;
        drop(locks.lock("c").await.unwrap());
        assert_eq!(kept(), 6, "then their places are free");
        assert_eq!(budget.counted(), 1);
        // A held key counts however long it is held; a failed acquisition does not count.
        let held = locks.lock("a").await.unwrap();
        let outside = counting.memory.lock("cache/ns/b").await.unwrap();
        assert!(locks.lock("b").await.is_err());
        assert_eq!(budget.counted(), 2, "c and a");
        tokio::time::sleep(idle * 10).await;
        assert!(budget.admit("z"), "c's place is free");
        assert!(!budget.admit("y"), "a, held, and z fill the budget");
        budget.abandon("z");
        drop((held, outside));
        assert_eq!(locks.active_keys(), 0);
    }
}
