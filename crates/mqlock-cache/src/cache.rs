//! [`LockedCache`]: the cache wrapper and its builder.

use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use mqlock::Locker;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::bus::{InvalidationBus, Subscriber};
use crate::error::{Error, Result};
use crate::keylock::{HeldKey, KeyLocks};
use crate::near::Near;
use crate::redis_store::RedisStore;

/// What a cache can hold: any serde type that can be cloned and shared between tasks.
pub trait CacheValue: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {}
impl<T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static> CacheValue for T {}

/// Encodes a value for Redis (JSON).
pub fn encode<V: Serialize>(key: &str, value: &V) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| Error::Codec {
        key: key.to_owned(),
        op: "encode",
        detail: e.to_string(),
    })
}

/// Decodes a value read from Redis (JSON).
pub fn decode<V: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<V> {
    serde_json::from_slice(bytes).map_err(|e| Error::Codec {
        key: key.to_owned(),
        op: "decode",
        detail: e.to_string(),
    })
}

type Flight<V> = Shared<BoxFuture<'static, Result<V>>>;

/// A cache whose mutations and loads take the key's distributed lock.
///
/// Tiers, chosen with [`CacheBuilder`]:
/// - **near** only: a node-local moka cache. Loads and writes of a key are serialised across the
///   cluster, but each node computes its own copy (there is nothing shared to read it from).
///   With an [`InvalidationBus`], a write on one node drops the key on the others.
/// - **Redis** only: the shared tier. A missing key is computed once in the whole cluster.
/// - **two-tier**: moka in front of Redis, kept coherent by an [`InvalidationBus`] (required).
///
/// [`get`](Self::get) never locks. [`get_or_compute`](Self::get_or_compute),
/// [`insert`](Self::insert), [`update`](Self::update) and [`invalidate`](Self::invalidate) take
/// the key's lock, re-read under it, write (to Redis with the grant's fencing token, so a holder
/// that lost its lock cannot overwrite a newer value), publish an invalidation and release.
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

struct Inner<V: CacheValue> {
    /// Identifies this cache as the origin of its invalidations, so it skips its own.
    id: u64,
    namespace: String,
    locks: KeyLocks,
    near: Option<Arc<Near<V>>>,
    redis: Option<RedisStore>,
    bus: Option<InvalidationBus>,
    redis_ttl: Option<Duration>,
    lock_wait: Duration,
    flights: Mutex<HashMap<String, (u64, Flight<V>)>>,
    next_flight: AtomicU64,
}

/// Builds a [`LockedCache`]; see its docs for the tiers.
pub struct CacheBuilder<V> {
    locker: Arc<dyn Locker>,
    namespace: String,
    near: Option<(u64, Duration)>,
    redis: Option<RedisStore>,
    bus: Option<InvalidationBus>,
    redis_ttl: Option<Duration>,
    lock_wait: Duration,
    _value: PhantomData<fn() -> V>,
}

impl<V> std::fmt::Debug for CacheBuilder<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheBuilder")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl<V: CacheValue> CacheBuilder<V> {
    /// Adds the near tier: at most `max_capacity` entries, each kept at most `max_ttl` (the
    /// bound on staleness when an invalidation cannot reach this node).
    pub fn near(mut self, max_capacity: u64, max_ttl: Duration) -> Self {
        self.near = Some((max_capacity, max_ttl));
        self
    }

    /// Adds the shared tier.
    pub fn redis(mut self, store: RedisStore) -> Self {
        self.redis = Some(store);
        self
    }

    /// Publishes and receives invalidations on `bus` (required with both tiers).
    pub fn invalidations(mut self, bus: InvalidationBus) -> Self {
        self.bus = Some(bus);
        self
    }

    /// Expiry of values written to Redis (default: none).
    pub fn redis_ttl(mut self, ttl: Duration) -> Self {
        self.redis_ttl = Some(ttl);
        self
    }

    /// Longest wait for a key's lock (default 30 s); then [`Error::LockTimeout`].
    pub fn lock_wait(mut self, wait: Duration) -> Self {
        self.lock_wait = wait;
        self
    }

    /// Checks the configuration and builds the cache.
    pub fn build(self) -> Result<LockedCache<V>> {
        let ns = &self.namespace;
        if ns.is_empty() || ns.chars().any(|c| c == ':' || c == '/' || c.is_control()) {
            // ':' and '/' separate the namespace from the key in Redis keys and lock names.
            return Err(Error::Config(format!(
                "namespace {ns:?} must be non-empty, without ':', '/' or control characters"
            )));
        }
        if self.near.is_none() && self.redis.is_none() {
            return Err(Error::Config(
                "a cache needs a near tier, a Redis tier or both".into(),
            ));
        }
        if self.near.is_some() && self.redis.is_some() && self.bus.is_none() {
            return Err(Error::Config(
                "a two-tier cache needs an invalidation bus, or near copies would never be dropped on other nodes".into(),
            ));
        }
        if self.near.is_some_and(|(_, ttl)| ttl.is_zero()) || self.lock_wait.is_zero() {
            return Err(Error::Config(
                "max_ttl and lock_wait must be positive".into(),
            ));
        }
        static IDS: AtomicU64 = AtomicU64::new(0);
        // Unique across processes too: the invalidation exchange is cluster-wide.
        let id = (u64::from(std::process::id()) << 32)
            | (IDS.fetch_add(1, Ordering::Relaxed) & 0xffff_ffff);
        let near = self.near.map(|(cap, ttl)| Arc::new(Near::new(cap, ttl)));
        let inner = Arc::new(Inner {
            id,
            locks: KeyLocks::new(self.locker, self.namespace.clone(), self.lock_wait),
            namespace: self.namespace,
            near,
            redis: self.redis,
            bus: self.bus,
            redis_ttl: self.redis_ttl,
            lock_wait: self.lock_wait,
            flights: Mutex::new(HashMap::new()),
            next_flight: AtomicU64::new(0),
        });
        if let (Some(bus), Some(near)) = (&inner.bus, &inner.near) {
            let weak: Weak<Near<V>> = Arc::downgrade(near);
            bus.register(id, &inner.namespace, weak);
        }
        Ok(LockedCache { inner })
    }
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
    /// Starts a cache of `V` values whose keys are locked on `locker` under `namespace`
    /// (also the prefix of its Redis keys; every node of the cache must use the same one).
    pub fn builder(locker: impl Locker, namespace: impl Into<String>) -> CacheBuilder<V> {
        CacheBuilder {
            locker: Arc::new(locker),
            namespace: namespace.into(),
            near: None,
            redis: None,
            bus: None,
            redis_ttl: None,
            lock_wait: Duration::from_secs(30),
            _value: PhantomData,
        }
    }

    /// The value of `key`: near tier, then Redis. Never locks.
    ///
    /// With Redis down, a near hit is still served and a near miss is [`Error::Redis`].
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
        let generation = inner.near.as_ref().map(|n| n.generation(key));
        let value = match redis.get(&inner.value_key(key)).await? {
            Some(bytes) => decode::<V>(key, &bytes)?,
            None => return Ok(None),
        };
        if let (Some(near), Some(g)) = (&inner.near, generation) {
            near.fill(key, value.clone(), g).await;
        }
        Ok(Some(value))
    }

    /// The value of `key`, computed by `loader` on a miss — once in the whole cluster.
    ///
    /// Callers of one node share one flight; the flight takes the key's distributed lock, reads
    /// again under it (another node may have stored the value meanwhile) and only then runs the
    /// loader, stores the value and releases the lock. A loader error or panic reaches every
    /// caller waiting for that flight — on this node, and on the nodes whose flight was waiting
    /// for the lock ([`Error::LoadFailedElsewhere`]) — is not cached, and the next call runs a
    /// loader again. The lock is released on every path.
    ///
    /// The flight runs in its own task: if every caller gives up, the load still completes and
    /// is stored. With Redis down this fails with [`Error::Redis`] without running the loader;
    /// with the broker down it fails with [`Error::Lock`] or [`Error::LockTimeout`].
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
        let generation = inner.near.as_ref().map(|n| n.generation(key));
        // The failure count seen now tells, under the lock, whether a load failed while we waited.
        let failures_seen = match &inner.redis {
            Some(redis) => {
                let probe = redis
                    .probe(&inner.value_key(key), &inner.failure_key(key))
                    .await?;
                if let Some(bytes) = probe.value {
                    let value = decode::<V>(key, &bytes)?;
                    if let (Some(near), Some(g)) = (&inner.near, generation) {
                        near.fill(key, value.clone(), g).await;
                    }
                    return Ok(value);
                }
                probe.failures
            }
            None => 0,
        };
        let flight = {
            let mut flights = inner.flights.lock().unwrap();
            match flights.get(key) {
                Some((_, flight)) => flight.clone(),
                None => {
                    let id = inner.next_flight.fetch_add(1, Ordering::Relaxed);
                    let flight = self.start_flight(key, id, failures_seen, loader);
                    flights.insert(key.to_owned(), (id, flight.clone()));
                    flight
                }
            }
        };
        flight.await
    }

    fn start_flight<F, Fut, E>(
        &self,
        key: &str,
        id: u64,
        failures_seen: u64,
        loader: F,
    ) -> Flight<V>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<V, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        /// Removes the flight from the map however the task ends (even by a panic).
        struct Landing<V: CacheValue> {
            inner: Arc<Inner<V>>,
            key: String,
            id: u64,
        }
        impl<V: CacheValue> Drop for Landing<V> {
            fn drop(&mut self) {
                let mut flights = self.inner.flights.lock().unwrap();
                if flights.get(&self.key).is_some_and(|(id, _)| *id == self.id) {
                    flights.remove(&self.key);
                }
            }
        }
        let landing = Landing {
            inner: self.inner.clone(),
            key: key.to_owned(),
            id,
        };
        let task = tokio::spawn(async move {
            let landing = landing;
            landing
                .inner
                .load_locked(&landing.key, failures_seen, loader)
                .await
        });
        let key = key.to_owned();
        async move {
            task.await.unwrap_or_else(|e| {
                Err(Error::LoaderPanicked {
                    key,
                    message: format!("the load task ended abnormally: {e}"),
                })
            })
        }
        .boxed()
        .shared()
    }

    /// Stores `value` under the key's lock.
    pub async fn insert(&self, key: &str, value: V) -> Result<()> {
        let held = self.inner.locks.lock(key).await?;
        let result = self
            .inner
            .write_locked(key, &held, Some(&value), true)
            .await;
        self.inner.release(key, held).await;
        result
    }

    /// Removes the key from every tier (and, through the bus, from every node's near tier)
    /// under the key's lock.
    pub async fn invalidate(&self, key: &str) -> Result<()> {
        let held = self.inner.locks.lock(key).await?;
        let result = self.inner.write_locked(key, &held, None, true).await;
        self.inner.release(key, held).await;
        result
    }

    /// Read-modify-write under the key's lock: `f` gets the current value (read from Redis
    /// under the lock, never from a possibly stale near copy) and returns the new one.
    pub async fn update<F>(&self, key: &str, f: F) -> Result<V>
    where
        F: FnOnce(Option<V>) -> V,
    {
        let inner = &self.inner;
        let held = inner.locks.lock(key).await?;
        let result = async {
            let current = inner.read_locked(key).await?;
            let new = f(current);
            inner.write_locked(key, &held, Some(&new), true).await?;
            Ok(new)
        }
        .await;
        inner.release(key, held).await;
        result
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
    pub async fn near_get(&self, key: &str) -> Option<V> {
        match &self.inner.near {
            Some(near) => near.get(key).await,
            None => None,
        }
    }
}

impl<V: CacheValue> Inner<V> {
    fn value_key(&self, key: &str) -> String {
        format!("{}:v:{key}", self.namespace)
    }
    fn fence_key(&self, key: &str) -> String {
        format!("{}:t:{key}", self.namespace)
    }
    fn failure_key(&self, key: &str) -> String {
        format!("{}:f:{key}", self.namespace)
    }

    /// The authoritative current value, read while holding the key's lock.
    async fn read_locked(&self, key: &str) -> Result<Option<V>> {
        match &self.redis {
            Some(redis) => match redis.get(&self.value_key(key)).await? {
                Some(bytes) => Ok(Some(decode(key, &bytes)?)),
                None => Ok(None),
            },
            None => Ok(self
                .near
                .as_ref()
                .expect("a cache has a tier")
                .get(key)
                .await),
        }
    }

    async fn load_locked<F, Fut, E>(&self, key: &str, failures_seen: u64, loader: F) -> Result<V>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<V, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let held = self.locks.lock(key).await?;
        let result = self.load_held(key, &held, failures_seen, loader).await;
        self.release(key, held).await;
        result
    }

    async fn load_held<F, Fut, E>(
        &self,
        key: &str,
        held: &HeldKey,
        failures_seen: u64,
        loader: F,
    ) -> Result<V>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<V, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        // Re-check under the lock: the holder before us may have stored the value, or failed.
        match &self.redis {
            Some(redis) => {
                let generation = self.near.as_ref().map(|n| n.generation(key));
                let probe = redis
                    .probe(&self.value_key(key), &self.failure_key(key))
                    .await?;
                if let Some(bytes) = probe.value {
                    let value = decode::<V>(key, &bytes)?;
                    if let (Some(near), Some(g)) = (&self.near, generation) {
                        near.fill(key, value.clone(), g).await;
                    }
                    return Ok(value);
                }
                if probe.failures > failures_seen {
                    return Err(Error::LoadFailedElsewhere {
                        key: key.to_owned(),
                        message: probe.last_failure.unwrap_or_else(|| "unknown error".into()),
                    });
                }
            }
            None => {
                if let Some(v) = self.read_locked(key).await? {
                    return Ok(v);
                }
            }
        }
        tracing::debug!(
            key,
            token = held.guard.fencing_token(),
            "running the loader"
        );
        // Converted inside the block: the loader's error type need not be `Send`.
        let outcome = AssertUnwindSafe(async move { loader().await.map_err(Into::into) })
            .catch_unwind()
            .await;
        let value = match outcome {
            Ok(Ok(value)) => value,
            Ok(Err(e)) => {
                let error = Error::Loader {
                    key: key.to_owned(),
                    source: Arc::from(e),
                };
                self.record_failure(key, &error).await;
                return Err(error);
            }
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic payload".into());
                let error = Error::LoaderPanicked {
                    key: key.to_owned(),
                    message,
                };
                self.record_failure(key, &error).await;
                return Err(error);
            }
        };
        self.write_locked(key, held, Some(&value), false).await?;
        Ok(value)
    }

    async fn record_failure(&self, key: &str, error: &Error) {
        tracing::warn!(key, %error, "load failed; not cached");
        if let Some(redis) = &self.redis {
            // Kept for longer than any wait for the lock, so every waiter of this wave sees it.
            let ttl = self.lock_wait + Duration::from_secs(60);
            if let Err(e) = redis
                .record_failure(&self.failure_key(key), &error.to_string(), ttl)
                .await
            {
                tracing::warn!(key, error = %e, "could not record the failed load; waiters on other nodes will retry it");
            }
        }
    }

    /// Writes (or, with `None`, deletes) the key in every tier while holding its lock, then
    /// tells the other nodes. `strict`: a failed publish is an error (explicit mutations);
    /// otherwise it is logged (loads: the value is right, only remote near copies may lag,
    /// bounded by their max TTL).
    async fn write_locked(
        &self,
        key: &str,
        held: &HeldKey,
        value: Option<&V>,
        strict: bool,
    ) -> Result<()> {
        let token = held.guard.fencing_token();
        if !held.guard.is_held() {
            return Err(Error::Fenced {
                key: key.to_owned(),
                token,
            });
        }
        if let Some(redis) = &self.redis {
            let bytes = value.map(|v| encode(key, v)).transpose()?;
            // The fence outlives any zombie holder by far; it is only a few bytes per key.
            let fence_ttl = Duration::from_secs(24 * 3600).max(self.redis_ttl.unwrap_or_default());
            let written = redis
                .fenced_write(
                    &self.value_key(key),
                    &self.fence_key(key),
                    token,
                    bytes.as_deref(),
                    self.redis_ttl,
                    fence_ttl,
                )
                .await?;
            if !written {
                return Err(Error::Fenced {
                    key: key.to_owned(),
                    token,
                });
            }
        }
        if let Some(near) = &self.near {
            near.invalidate(key).await;
            if let Some(v) = value {
                near.fill(key, v.clone(), near.generation(key)).await;
            }
        }
        if let Some(bus) = &self.bus
            && let Err(e) = bus.publish(self.id, &self.namespace, key).await
        {
            if strict {
                return Err(e);
            }
            tracing::warn!(key, error = %e, "stored, but the invalidation was not published");
        }
        Ok(())
    }

    async fn release(&self, key: &str, held: HeldKey) {
        let HeldKey { guard, local } = held;
        if let Err(e) = guard.release().await {
            tracing::warn!(key, error = %e, "releasing the key's lock failed; the broker frees it when the channel closes");
        }
        drop(local);
    }
}
