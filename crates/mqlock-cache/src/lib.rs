//! Cache wrappers that lock keys on mutation with [`mqlock`].
//!
//! Many nodes cache the same data, locally (moka) and/or in a shared Redis. Without
//! coordination a cold key makes every node recompute it at once (a stampede), and concurrent
//! writers leave the caches disagreeing. [`LockedCache`] fixes both with the key's distributed
//! lock:
//!
//! - **Reads never lock.** [`LockedCache::get`] reads the near tier, then Redis.
//! - **Mutations lock, re-check, write.** [`LockedCache::get_or_compute`] (on a miss),
//!   [`LockedCache::insert`], [`LockedCache::update`] and [`LockedCache::invalidate`] take the
//!   key's lock (`cache/{namespace}/{key}`), read again under it, write with the grant's fencing
//!   token, publish an invalidation, and let the lock go — on every path, errors and panics
//!   included. By default the lock is then *kept* ([`CacheConfig::lock_keep`]): the node's next
//!   mutation of the key takes it back without a broker round trip, and another node's wait for
//!   it makes this node release it at once.
//! - **Cluster-wide single-flight.** The callers of one node share one flight; the flights of
//!   all nodes queue on the key's lock; the first runs the loader, the others find its value
//!   when their turn comes. A loader error reaches the waiters and is not cached.
//! - **Near-cache coherence.** Every locked write publishes "drop this key" on a RabbitMQ fanout
//!   exchange ([`InvalidationBus`]); a node that loses the subscription clears and bypasses its
//!   near tier until it has resubscribed. A per-key generation makes sure a load that was in
//!   flight during an invalidation is never served, and every near entry has a maximum TTL.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use mqlock::{ClientConfig, LockClient};
//! use mqlock_cache::{
//!     BusConfig, CacheConfig, InvalidationBus, LockedCache, NearConfig, RedisConfig, RedisStore,
//! };
//!
//! let amqp = "amqp://guest:guest@127.0.0.1:5672/%2f";
//! let locks = LockClient::connect(amqp, ClientConfig::default()).await?;
//! let bus = InvalidationBus::connect(amqp, BusConfig::default()).await?;
//! let redis = RedisStore::connect("redis://127.0.0.1:6379/", RedisConfig::default()).await?;
//! let cache: LockedCache<String> = LockedCache::new(
//!     Arc::new(locks),
//!     "reports",
//!     CacheConfig {
//!         near: Some(NearConfig { max_capacity: 10_000, max_ttl: Duration::from_secs(30) }),
//!         redis: Some(redis),
//!         invalidations: Some(bus),
//!         ..CacheConfig::default()
//!     },
//! )?;
//! let report = cache
//!     .get_or_compute("daily", || async { Ok::<_, std::io::Error>("expensive".to_string()) })
//!     .await?;
//! cache.update("daily", |old| format!("{}!", old.unwrap_or_default())).await?;
//! # let _ = report; Ok(()) }
//! ```
//!
//! Failure policy (details in `docs/cache.md`): nothing waits unboundedly. Redis down → near
//! hits are served, everything else fails with [`Error::Redis`] (loaders are not run: their
//! result could be neither shared nor stored). Broker down → reads work, locked operations fail
//! with [`Error::Lock`] (the core's error: `Unreachable`..., or `Timeout` after
//! [`CacheConfig::lock_timeout`]), and near tiers are bypassed until the bus has resubscribed.

mod bus;
mod cache;
mod codec;
mod config;
mod error;
mod keylock;
mod locked;
mod near;
mod redis_store;
mod single_flight;

pub use bus::{BusConfig, InvalidationBus};
pub use cache::LockedCache;
pub use codec::{CacheValue, decode, encode};
pub use config::{CacheConfig, NearConfig};
pub use error::{Error, Result};
pub use keylock::lock_name;
pub use redis_store::{RedisConfig, RedisStore};
