//! [`LockedCache`]: the cache wrapper.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::future::BoxFuture;
use mqlock::Locker;

use crate::bus::{InvalidationBus, Subscriber};
use crate::codec::CacheValue;
use crate::config::CacheConfig;
#[cfg(doc)]
use crate::error::Error;
use crate::error::Result;
use crate::keylock::KeyLocks;
use crate::locked::Read;
use crate::near::Near;
use crate::redis_store::RedisStore;
use crate::single_flight::SingleFlight;

/// A cache whose mutations and loads take the key's distributed lock.
///
/// Tiers, chosen with [`CacheConfig`]:
/// - **near** only: a node-local moka cache. Loads and writes of a key are serialised across the
///   cluster, but each node computes its own copy (there is nothing shared to read it from).
///   With an [`InvalidationBus`], a write on one node drops the key on the others.
/// - **Redis** only: the shared tier. A missing key is computed once in the whole cluster.
/// - **two-tier**: moka in front of Redis, kept coherent by an [`InvalidationBus`] (required).
///
/// [`get`](Self::get) never locks. [`get_or_compute`](Self::get_or_compute),
/// [`insert`](Self::insert), [`update`](Self::update) and [`invalidate`](Self::invalidate) take
/// the key's lock, re-read under it, write (to Redis with the grant's fencing token, so a holder
/// that lost its lock cannot overwrite a newer value), publish an invalidation and let the lock
/// go: released, or kept for this node's next mutation of the key until another node asks for
/// it ([`CacheConfig::lock_keep`]).
pub struct LockedCache<V: CacheValue> {
    inner: Arc<Inner<V>>,
}

impl<V: CacheValue> Clone for LockedCache<V> {
    fn clone(&self) -> Self {
        LockedCache {
            inner: self.inner.clone(),
        }
    }
}

impl<V: CacheValue> std::fmt::Debug for LockedCache<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockedCache")
            .field("namespace", &self.inner.namespace)
            .field("near", &self.inner.near.is_some())
            .field("redis", &self.inner.redis)
            .field("bus", &self.inner.bus)
            .finish()
    }
}

/// The state shared by a cache's clones; its I/O is in `locked.rs`.
pub(crate) struct Inner<V: CacheValue> {
    /// Identifies this cache as the origin of its invalidations, so it skips its own.
    pub(crate) id: u64,
    pub(crate) namespace: String,
    pub(crate) locks: KeyLocks,
    pub(crate) near: Option<Arc<Near<V>>>,
    pub(crate) redis: Option<RedisStore>,
    pub(crate) bus: Option<InvalidationBus>,
    pub(crate) redis_ttl: Option<Duration>,
    pub(crate) lock_timeout: Duration,
    pub(crate) flights: SingleFlight<V>,
}

impl<V: CacheValue> Subscriber for Near<V> {
    fn invalidate<'a>(&'a self, key: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(Near::invalidate(self, key))
    }
    fn set_coherent(&self, coherent: bool) {
        Near::set_coherent(self, coherent);
    }
}

impl<V: CacheValue> LockedCache<V> {
    /// A cache of `V` values whose keys are locked on `locker` under `namespace` (also the
    /// prefix of its Redis keys; every node of the cache must use the same one), with the tiers
    /// and bounds of `config`.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when the namespace is empty or contains `:`, `/` or a control
    /// character, when `config` has no tier, has both tiers but no invalidation bus, or a zero
    /// `max_ttl` or `lock_timeout`.
    pub fn new(
        locker: Arc<dyn Locker>,
        namespace: impl Into<String>,
        config: CacheConfig,
    ) -> Result<Self> {
        let namespace = namespace.into();
        config.check(&namespace)?;
        static IDS: AtomicU64 = AtomicU64::new(0);
        // Unique across processes too: the invalidation exchange is cluster-wide.
        let id = (u64::from(std::process::id()) << 32)
            | (IDS.fetch_add(1, Ordering::Relaxed) & 0xffff_ffff);
        let near = config
            .near
            .map(|n| Arc::new(Near::new(n.max_capacity, n.max_ttl)));
        let inner = Arc::new(Inner {
            id,
            locks: KeyLocks::new(
                locker,
                namespace.clone(),
                config.lock_timeout,
                config.lock_keep.map(|idle| (idle, config.lock_keep_max)),
            ),
            namespace,
            near,
            redis: config.redis,
            bus: config.invalidations,
            redis_ttl: config.redis_ttl,
            lock_timeout: config.lock_timeout,
            flights: SingleFlight::new(),
        });
        if let (Some(bus), Some(near)) = (&inner.bus, &inner.near) {
            let weak: Weak<Near<V>> = Arc::downgrade(near);
            bus.register(id, &inner.namespace, weak);
        }
        Ok(LockedCache { inner })
    }

    /// The value of `key`: near tier, then Redis (filling the near tier). Never locks.
    ///
    /// # Errors
    ///
    /// With Redis down, a near hit is still served and a near miss is [`Error::Redis`];
    /// [`Error::Codec`] when the stored value is not a `V`.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only reads. Dropped during the Redis read, the near tier is not filled.
    pub async fn get(&self, key: &str) -> Result<Option<V>> {
        let inner = &self.inner;
        if let Some(near) = &inner.near
            && let Some(v) = near.get(key).await
        {
            return Ok(Some(v));
        }
        let Some(redis) = &inner.redis else {
            return Ok(None);
        };
        Ok(inner.fetch(redis, key, Read::Value).await?.value)
    }

    /// The value of `key`, computed by `loader` on a miss — once in the whole cluster.
    ///
    /// Callers of one node share one flight; the flight takes the key's distributed lock, reads
    /// again under it (another node may have stored the value meanwhile) and only then runs the
    /// loader, stores the value and releases the lock. A loader error or panic reaches every
    /// caller waiting for that flight — on this node, and on the nodes whose flight was waiting
    /// for the lock ([`Error::LoadFailedElsewhere`]) — is not cached, and the next call runs a
    /// loader again. The lock is let go on every path (released, or kept until another node
    /// asks).
    ///
    /// # Errors
    ///
    /// [`Error::Loader`] / [`Error::LoaderPanicked`] (this node's loader failed),
    /// [`Error::LoadFailedElsewhere`]; [`Error::Redis`] with Redis down (the loader is not
    /// run: its value could be neither shared nor stored); [`Error::Lock`] when the key's lock
    /// cannot be taken (broker down, or [`mqlock::Error::Timeout`] after
    /// [`CacheConfig::lock_timeout`]); [`Error::Fenced`] when the lock was lost before the value
    /// was stored; [`Error::Codec`]. A failed invalidation publish is logged, not returned: the
    /// value is right, and other nodes had no copy to drop.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe. The flight runs in a task of its own: if every caller is dropped, the load
    /// still completes, is stored and the lock released; a caller dropped before it joined a
    /// flight (during the first Redis read) leaves nothing behind.
    ///
    /// # Panics
    ///
    /// If called outside a Tokio runtime (the flight is spawned). A panicking loader does not
    /// panic the caller: it is [`Error::LoaderPanicked`].
    pub async fn get_or_compute<F, Fut, E>(&self, key: &str, loader: F) -> Result<V>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<V, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let inner = &self.inner;
        if let Some(near) = &inner.near
            && let Some(v) = near.get(key).await
        {
            return Ok(v);
        }
        // The failure count seen now tells, under the lock, whether a load failed while we waited.
        let failures_seen = match &inner.redis {
            Some(redis) => {
                let fetched = inner.fetch(redis, key, Read::ValueAndFailures).await?;
                if let Some(value) = fetched.value {
                    return Ok(value);
                }
                fetched.failures
            }
            None => 0,
        };
        let flight = inner.flights.join_or_start(key, || {
            let inner = inner.clone();
            let key = key.to_owned();
            async move { inner.load_locked(&key, failures_seen, loader).await }
        });
        flight.await
    }

    /// Stores `value` under the key's lock, in every tier, and drops the key from the other
    /// nodes' near tiers.
    ///
    /// # Errors
    ///
    /// [`Error::Lock`] when the key's lock cannot be taken (broker down, or
    /// [`mqlock::Error::Timeout`] after [`CacheConfig::lock_timeout`]); [`Error::Redis`];
    /// [`Error::Fenced`] (the lock was lost, or a later holder has written the key: nothing was
    /// written); [`Error::Codec`]; [`Error::Bus`] when the invalidation could not be published
    /// (the value *was* stored: other nodes may serve their old near copy until its
    /// `max_ttl`).
    ///
    /// # Cancel safety
    ///
    /// Dropped while waiting for the lock, it leaves nothing behind (no in-process waiter, no
    /// broker waiter). Once the lock is granted, the write, the invalidation and the release run
    /// in a task of their own and complete even if the future is dropped: the write is never
    /// left half done (stored in Redis but not published).
    ///
    /// # Panics
    ///
    /// If called outside a Tokio runtime, if `V`'s `Serialize` implementation panics, or if the
    /// runtime shuts down while the write is in flight.
    pub async fn insert(&self, key: &str, value: V) -> Result<()> {
        let held = self.inner.locks.lock(key).await?;
        self.inner.commit(key, held, Some(value)).await.map(drop)
    }

    /// Removes the key from every tier (and, through the bus, from every node's near tier)
    /// under the key's lock.
    ///
    /// # Errors
    ///
    /// As [`insert`](Self::insert): [`Error::Lock`], [`Error::Redis`], [`Error::Fenced`],
    /// [`Error::Bus`] (the key *was* removed from Redis and this node; other nodes may serve
    /// their old near copy until its `max_ttl`).
    ///
    /// # Cancel safety
    ///
    /// As [`insert`](Self::insert): nothing is left behind while waiting for the lock; once it
    /// is granted, the removal, the invalidation and the release complete in a task of their own.
    ///
    /// # Panics
    ///
    /// If called outside a Tokio runtime, or if the runtime shuts down while the removal is in
    /// flight.
    pub async fn invalidate(&self, key: &str) -> Result<()> {
        let held = self.inner.locks.lock(key).await?;
        self.inner.commit(key, held, None).await.map(drop)
    }

    /// Read-modify-write under the key's lock: `f` gets the current value (read from Redis
    /// under the lock, never from a possibly stale near copy) and returns the new one, which is
    /// stored as by [`insert`](Self::insert) and returned.
    ///
    /// # Errors
    ///
    /// As [`insert`](Self::insert), plus [`Error::Redis`] / [`Error::Codec`] while reading the
    /// current value (then `f` is not called and nothing is written).
    ///
    /// # Cancel safety
    ///
    /// Dropped while waiting for the lock or while reading the current value, it leaves nothing
    /// behind and writes nothing (the lock is released in the background). Once `f` has
    /// returned, the write, the invalidation and the release run in a task of their own and
    /// complete even if the future is dropped: never stored in Redis without the invalidation
    /// being published.
    ///
    /// # Panics
    ///
    /// If `f` panics (the lock is then released in the background and nothing is written), and
    /// as [`insert`](Self::insert).
    pub async fn update<F>(&self, key: &str, f: F) -> Result<V>
    where
        F: FnOnce(Option<V>) -> V,
    {
        let inner = &self.inner;
        let held = inner.locks.lock(key).await?;
        let current = match inner.read_locked(key).await {
            Ok(current) => current,
            Err(e) => {
                inner.release(key, held).await;
                return Err(e);
            }
        };
        let new = f(current);
        let written = inner.commit(key, held, Some(new)).await?;
        Ok(written.expect("commit returns the value it wrote"))
    }

    /// The cache's namespace.
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// Whether the near tier is currently trusted (it is bypassed while the invalidation bus is
    /// resubscribing). `false` without a near tier.
    pub fn near_is_coherent(&self) -> bool {
        self.inner.near.as_ref().is_some_and(|n| n.is_coherent())
    }

    /// The value of `key` in this node's near tier only (for tests and diagnostics).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only reads.
    pub async fn near_get(&self, key: &str) -> Option<V> {
        match &self.inner.near {
            Some(near) => near.get(key).await,
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use mqlock::MemoryLocker;

    use super::*;
    use crate::config::NearConfig;
    use crate::error::Error;

    fn near_only(locker: &MemoryLocker, lock_timeout: Duration) -> LockedCache<u64> {
        LockedCache::new(
            Arc::new(locker.clone()),
            "ns",
            CacheConfig {
                near: Some(NearConfig::default()),
                lock_timeout,
                ..CacheConfig::default()
            },
        )
        .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn near_only_loads_once_per_node_and_mutates_under_the_lock() {
        let memory = MemoryLocker::new();
        let cache = near_only(&memory, Duration::from_secs(30));
        let runs = Arc::new(AtomicUsize::new(0));
        let mut callers = Vec::new();
        for _ in 0..5 {
            let (cache, runs) = (cache.clone(), runs.clone());
            callers.push(tokio::spawn(async move {
                cache
                    .get_or_compute("k", move || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        Ok::<_, std::io::Error>(1)
                    })
                    .await
            }));
        }
        for c in callers {
            assert_eq!(c.await.unwrap().unwrap(), 1);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(cache.update("k", |v| v.unwrap() + 1).await.unwrap(), 2);
        assert_eq!(cache.get("k").await.unwrap(), Some(2));
        cache.invalidate("k").await.unwrap();
        assert_eq!(cache.get("k").await.unwrap(), None);
        assert!(!memory.is_locked("cache/ns/k"));
        assert_eq!(cache.inner.locks.active_keys(), 0);
        assert_eq!(cache.inner.flights.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn loader_errors_are_not_cached_and_lock_waits_end_with_the_cores_timeout() {
        let memory = MemoryLocker::new();
        let cache = near_only(&memory, Duration::from_millis(50));
        let failed = cache
            .get_or_compute("k", || async {
                Err::<u64, _>(std::io::Error::other("boom"))
            })
            .await;
        assert!(matches!(failed, Err(Error::Loader { .. })), "{failed:?}");
        let panicked = cache
            .get_or_compute("k", || async {
                panic!("loader panic");
                #[allow(unreachable_code)]
                Ok::<u64, std::io::Error>(0)
            })
            .await;
        assert!(
            matches!(&panicked, Err(Error::LoaderPanicked { message, .. }) if message == "loader panic"),
            "{panicked:?}"
        );
        assert_eq!(
            cache
                .get_or_compute("k", || async { Ok::<_, std::io::Error>(3) })
                .await
                .unwrap(),
            3
        );

        let outside = mqlock::Locker::lock(&memory, "cache/ns/k").await.unwrap();
        let err = cache.insert("k", 4).await.unwrap_err();
        assert!(
            matches!(&err, Error::Lock(mqlock::Error::Timeout { name, .. }) if name == "cache/ns/k"),
            "{err:?}"
        );
        drop(outside);
        assert_eq!(cache.get("k").await.unwrap(), Some(3));
    }
}
