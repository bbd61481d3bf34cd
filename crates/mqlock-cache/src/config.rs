//! [`CacheConfig`]: the tiers and bounds of a [`LockedCache`](crate::LockedCache), and their checks.

use std::time::Duration;

use crate::bus::InvalidationBus;
use crate::error::{Error, Result};
use crate::redis_store::RedisStore;

/// Settings of a [`LockedCache`](crate::LockedCache), taken by
/// [`LockedCache::new`](crate::LockedCache::new); see the cache's docs for the tiers.
///
/// Set the fields you need and take the rest from [`Default`]:
///
/// ```no_run
/// # fn demo(redis: mqlock_cache::RedisStore, bus: mqlock_cache::InvalidationBus) {
/// use std::time::Duration;
/// use mqlock_cache::{CacheConfig, NearConfig};
///
/// let config = CacheConfig {
///     near: Some(NearConfig { max_capacity: 10_000, max_ttl: Duration::from_secs(30) }),
///     redis: Some(redis),
///     invalidations: Some(bus),
///     lock_timeout: Duration::from_secs(10),
///     ..CacheConfig::default()
/// };
/// # let _ = config; }
/// ```
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// The near tier, a node-local moka cache (default: none).
    pub near: Option<NearConfig>,
    /// The shared tier (default: none).
    pub redis: Option<RedisStore>,
    /// The bus on which invalidations are published and received (default: none). Required
    /// with both tiers; optional with the near tier alone (a write on one node then drops the
    /// key on the others); unused with Redis alone.
    pub invalidations: Option<InvalidationBus>,
    /// Expiry of values written to Redis (default: none).
    pub redis_ttl: Option<Duration>,
    /// Longest wait for a key's lock, the in-process queue included (default 30 s); then
    /// [`Error::Lock`] with [`mqlock::Error::Timeout`].
    pub lock_timeout: Duration,
    /// Keep a key's lock after the mutation that took it, for at most this long unused
    /// (default 5 s; `None`: release after every mutation). While kept, this node's next
    /// mutation or load of the key takes the lock back without a broker round trip, with the
    /// same fencing token; another node that asks for the lock makes this node release it at
    /// once (within a round trip; [`mqlock::LockOptions::keep`]). Single-flight, fencing and
    /// invalidations are unchanged (docs/cache.md, "Kept key locks").
    pub lock_keep: Option<Duration>,
    /// At most this many keys' locks are kept at once by this cache (default 512): each kept
    /// lock holds a broker channel, three queues and its lease renewals (the client spreads
    /// channels over connections past `channel_max`, but each costs the broker). A mutation
    /// of a further key releases its lock as usual until kept ones have run out their idle
    /// time; keys already kept stay kept.
    pub lock_keep_max: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            near: None,
            redis: None,
            invalidations: None,
            redis_ttl: None,
            lock_timeout: Duration::from_secs(30),
            lock_keep: Some(Duration::from_secs(5)),
            lock_keep_max: 512,
        }
    }
}

/// Size and staleness bound of the near tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NearConfig {
    /// At most this many entries (default 10 000).
    pub max_capacity: u64,
    /// Each entry is kept at most this long (default 30 s): the bound on staleness when an
    /// invalidation cannot reach this node.
    pub max_ttl: Duration,
}

impl Default for NearConfig {
    fn default() -> Self {
        NearConfig {
            max_capacity: 10_000,
            max_ttl: Duration::from_secs(30),
        }
    }
}

impl CacheConfig {
    /// Checks the namespace and the configuration: at least one tier, a bus with both tiers,
    /// positive durations and keep bound.
    pub(crate) fn check(&self, namespace: &str) -> Result<()> {
        let ns = namespace;
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
        if self.near.is_some() && self.redis.is_some() && self.invalidations.is_none() {
            return Err(Error::Config(
                "a two-tier cache needs an invalidation bus, or near copies would never be dropped on other nodes".into(),
            ));
        }
        if self.near.is_some_and(|n| n.max_ttl.is_zero()) || self.lock_timeout.is_zero() {
            return Err(Error::Config(
                "max_ttl and lock_timeout must be positive".into(),
            ));
        }
        if self
            .lock_keep
            .is_some_and(|k| k.is_zero() || self.lock_keep_max == 0)
        {
            return Err(Error::Config(
                "lock_keep and lock_keep_max must be positive (lock_keep: None keeps no lock)"
                    .into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inconsistent_configurations_are_refused() {
        let near = Some(NearConfig::default());
        let ok = CacheConfig {
            near,
            ..CacheConfig::default()
        };
        assert!(ok.check("ns").is_ok());
        for ns in ["", "a:b", "a/b", "a\nb"] {
            assert!(matches!(ok.check(ns), Err(Error::Config(_))), "{ns:?}");
        }
        let no_tier = CacheConfig::default();
        assert!(matches!(no_tier.check("ns"), Err(Error::Config(_))));
        let zero_wait = CacheConfig {
            near,
            lock_timeout: Duration::ZERO,
            ..CacheConfig::default()
        };
        assert!(matches!(zero_wait.check("ns"), Err(Error::Config(_))));
        let zero_ttl = CacheConfig {
            near: Some(NearConfig {
                max_ttl: Duration::ZERO,
                ..NearConfig::default()
            }),
            ..CacheConfig::default()
        };
        assert!(matches!(zero_ttl.check("ns"), Err(Error::Config(_))));
        for (keep, max) in [(Some(Duration::ZERO), 1), (Some(Duration::from_secs(1)), 0)] {
            let bad_keep = CacheConfig {
                near,
                lock_keep: keep,
                lock_keep_max: max,
                ..CacheConfig::default()
            };
            assert!(matches!(bad_keep.check("ns"), Err(Error::Config(_))));
        }
        let no_keep = CacheConfig {
            near,
            lock_keep: None,
            ..CacheConfig::default()
        };
        assert!(no_keep.check("ns").is_ok());
    }
}
