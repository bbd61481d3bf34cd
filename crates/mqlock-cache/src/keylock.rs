//! Per-key locking: an in-process queue in front of the distributed lock.
//!
//! Every locked operation of a node first queues on an in-process mutex for the key, then takes
//! the distributed lock. So the broker sees at most one waiter per node and key, however many
//! tasks of that node mutate the key at once, and tasks of one node are served in FIFO order.

use std::sync::Arc;
use std::time::Duration;

use mqlock::{LockTable, Locker, TableGuard};

use crate::error::Result;

/// A key's lock: this node's slot for the key and the distributed grant
/// ([`TableGuard::guard`]).
pub(crate) type HeldKey = TableGuard;

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
/// the distributed lock.
pub(crate) struct KeyLocks {
    table: LockTable,
    namespace: String,
    lock_timeout: Duration,
}

impl KeyLocks {
    pub(crate) fn new(locker: Arc<dyn Locker>, namespace: String, lock_timeout: Duration) -> Self {
        KeyLocks {
            table: LockTable::new(locker),
            namespace,
            lock_timeout,
        }
    }

    /// Waits (at most the configured lock timeout, in total) for `key`'s lock.
    ///
    /// Cancel safe: dropped at any await point, it leaves no in-process waiter, no slot and no
    /// broker waiter behind (the locker's acquire futures are cancel safe).
    pub(crate) async fn lock(&self, key: &str) -> Result<HeldKey> {
        let name = lock_name(&self.namespace, key);
        let held = self.table.lock(&name, self.lock_timeout).await?;
        tracing::trace!(
            key,
            token = held.guard().fencing_token(),
            "cache key locked"
        );
        Ok(held)
    }

    /// Number of keys with an in-process holder or waiter (for tests of the clean-up).
    #[cfg(test)]
    pub(crate) fn active_keys(&self) -> usize {
        self.table.names_in_use()
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
}
