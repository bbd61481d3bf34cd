//! The cache's I/O: the one read of the shared tier, and the reads, loads and writes done while
//! holding a key's lock.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;

use crate::cache::Inner;
use crate::codec::{CacheValue, decode, encode};
use crate::error::{Error, Result};
use crate::keylock::HeldKey;
use crate::redis_store::{Probe, RedisStore};

/// What [`Inner::fetch`] reads besides the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Read {
    /// The value alone (one `GET`).
    Value,
    /// The value and the key's failure record, in one round trip (loads).
    ValueAndFailures,
}

/// What one read of the shared tier saw.
pub(crate) struct Fetched<V> {
    pub(crate) value: Option<V>,
    /// Recently failed loads of the key (0 with [`Read::Value`]).
    pub(crate) failures: u64,
    pub(crate) last_failure: Option<String>,
}

impl<V: CacheValue> Inner<V> {
    pub(crate) fn value_key(&self, key: &str) -> String {
        format!("{}:v:{key}", self.namespace)
    }
    fn fence_key(&self, key: &str) -> String {
        format!("{}:t:{key}", self.namespace)
    }
    fn failure_key(&self, key: &str) -> String {
        format!("{}:f:{key}", self.namespace)
    }

    /// Reads the key from Redis, the one way every path does: take the key's near generation,
    /// read, decode, then fill the near tier with the value read — a fill that the near tier
    /// ignores if an invalidation of the key arrived since the generation was taken (near.rs).
    pub(crate) async fn fetch(
        &self,
        redis: &RedisStore,
        key: &str,
        read: Read,
    ) -> Result<Fetched<V>> {
        let generation = self.near.as_ref().map(|n| n.generation(key));
        let probe = match read {
            Read::Value => Probe {
                value: redis.get(&self.value_key(key)).await?,
                failures: 0,
                last_failure: None,
            },
            Read::ValueAndFailures => {
                redis
                    .probe(&self.value_key(key), &self.failure_key(key))
                    .await?
            }
        };
        let value = probe
            .value
            .map(|bytes| decode::<V>(key, &bytes))
            .transpose()?;
        if let (Some(v), Some(near), Some(g)) = (&value, &self.near, generation) {
            near.fill(key, v.clone(), g).await;
        }
        Ok(Fetched {
            value,
            failures: probe.failures,
            last_failure: probe.last_failure,
        })
    }

    /// The authoritative current value, read while holding the key's lock: Redis when there is
    /// a shared tier, else this node's near tier (which every locked write on any node keeps
    /// up to date, through the bus).
    pub(crate) async fn read_locked(&self, key: &str) -> Result<Option<V>> {
        match &self.redis {
            Some(redis) => Ok(self.fetch(redis, key, Read::Value).await?.value),
            None => Ok(self
                .near
                .as_ref()
                .expect("a cache has a tier")
                .get(key)
                .await),
        }
    }

    /// Takes the key's lock, loads it (unless the holder before us did) and releases the lock on
    /// every path. Runs in the flight's task.
    pub(crate) async fn load_locked<F, Fut, E>(
        &self,
        key: &str,
        failures_seen: u64,
        loader: F,
    ) -> Result<V>
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
                let fetched = self.fetch(redis, key, Read::ValueAndFailures).await?;
                if let Some(value) = fetched.value {
                    return Ok(value);
                }
                if fetched.failures > failures_seen {
                    return Err(Error::LoadFailedElsewhere {
                        key: key.to_owned(),
                        message: fetched
                            .last_failure
                            .unwrap_or_else(|| "unknown error".into()),
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
            token = held.guard().fencing_token(),
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
            let ttl = self.lock_timeout + Duration::from_secs(60);
            if let Err(e) = redis
                .record_failure(&self.failure_key(key), &error.to_string(), ttl)
                .await
            {
                tracing::warn!(key, error = %e, "could not record the failed load; waiters on other nodes will retry it");
            }
        }
    }

    /// Writes `value` (or, with `None`, deletes the key) in every tier, publishes the
    /// invalidation and releases the lock — in a task of its own, so that all of it happens even
    /// if the caller's future is dropped meanwhile. Returns the value written.
    ///
    /// # Panics
    ///
    /// If the task panics (a `Serialize` implementation of `V` that panics; the panic is passed
    /// on), or is cancelled because the Tokio runtime is shutting down.
    pub(crate) async fn commit(
        self: &Arc<Self>,
        key: &str,
        held: HeldKey,
        value: Option<V>,
    ) -> Result<Option<V>> {
        let inner = self.clone();
        let key = key.to_owned();
        let task = tokio::spawn(async move {
            let result = inner.write_locked(&key, &held, value.as_ref(), true).await;
            inner.release(&key, held).await;
            result.map(|()| value)
        });
        match task.await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("the cache's write task did not complete: {e}"),
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
        let token = held.guard().fencing_token();
        if !held.guard().is_held() {
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

    /// Releases the key's lock: the distributed grant first, then the in-process slot.
    pub(crate) async fn release(&self, key: &str, held: HeldKey) {
        // The table releases the distributed grant first, then hands the slot on.
        if let Err(e) = held.release().await {
            tracing::warn!(key, error = %e, "releasing the key's lock failed; the broker frees it when the channel closes");
        }
    }
}
