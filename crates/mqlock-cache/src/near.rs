//! The near tier: a node-local moka cache whose entries are only trusted while their key's
//! generation is unchanged.
//!
//! moka keeps whatever a load inserts, even if the key was invalidated while the load was in
//! flight. So every entry records the generation of its key's stripe as read *before* its value
//! was fetched, and an invalidation bumps that generation before dropping the entry: a stale
//! load that lands afterwards carries an old generation and is never served. Keys share
//! generation stripes; a collision only costs an extra miss, never a stale hit.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use moka::future::Cache;

const STRIPES: usize = 4096;

/// A generation snapshot taken before fetching a value; pass it to [`Near::fill`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Generation(u64);

pub(crate) struct Near<V> {
    cache: Cache<String, (V, u64)>,
    stripes: Box<[AtomicU64]>,
    /// Whether invalidations are being received. While they are not, the tier is bypassed: a
    /// copy could go stale without this node hearing of it.
    coherent: AtomicBool,
}

impl<V: Clone + Send + Sync + 'static> Near<V> {
    pub(crate) fn new(max_capacity: u64, max_ttl: Duration) -> Self {
        Near {
            cache: Cache::builder()
                .max_capacity(max_capacity)
                .time_to_live(max_ttl)
                .build(),
            stripes: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            coherent: AtomicBool::new(true),
        }
    }

    fn stripe(&self, key: &str) -> &AtomicU64 {
        // FNV-1a: short keys hash in a few ns, which keeps the hit path close to raw moka.
        let mut h = Fnv(0xcbf2_9ce4_8422_2325);
        key.hash(&mut h);
        &self.stripes[(h.0 as usize) % STRIPES]
    }

    /// The key's generation now: take it before reading the value from the shared tier or the
    /// loader.
    pub(crate) fn generation(&self, key: &str) -> Generation {
        Generation(self.stripe(key).load(Ordering::Acquire))
    }

    /// The cached value, if present and not invalidated since it was fetched.
    pub(crate) async fn get(&self, key: &str) -> Option<V> {
        if !self.coherent.load(Ordering::Acquire) {
            return None;
        }
        let (value, generation) = self.cache.get(key).await?;
        (generation == self.stripe(key).load(Ordering::Acquire)).then_some(value)
    }

    /// Stores a value fetched after `generation` was taken.
    pub(crate) async fn fill(&self, key: &str, value: V, generation: Generation) {
        // Entries with an old generation would be ignored anyway; skipping them saves an insert.
        if self.coherent.load(Ordering::Acquire) && self.generation(key) == generation {
            self.cache
                .insert(key.to_owned(), (value, generation.0))
                .await;
        }
    }

    /// Drops the key and makes every in-flight load of it unusable.
    pub(crate) async fn invalidate(&self, key: &str) {
        self.stripe(key).fetch_add(1, Ordering::AcqRel);
        self.cache.invalidate(key).await;
    }

    /// Drops everything, including loads in flight.
    pub(crate) fn clear(&self) {
        for s in self.stripes.iter() {
            s.fetch_add(1, Ordering::AcqRel);
        }
        self.cache.invalidate_all();
    }

    /// Marks the tier coherent (invalidations flowing) or not; both transitions clear it.
    pub(crate) fn set_coherent(&self, coherent: bool) {
        // Clear after a loss (we may have missed invalidations) and again on resubscribe
        // (a load that started before the loss may have landed in between).
        self.coherent.store(coherent, Ordering::Release);
        self.clear();
    }

    pub(crate) fn is_coherent(&self) -> bool {
        self.coherent.load(Ordering::Acquire)
    }
}

struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_load_in_flight_during_an_invalidation_is_never_served() {
        let near = Near::new(100, Duration::from_secs(60));
        let g = near.generation("k");
        // The "load" read the old value; an invalidation arrives before it lands.
        near.invalidate("k").await;
        near.fill("k", "stale", g).await;
        assert_eq!(near.get("k").await, None);
        // Even if the insert itself races past the check, the entry is not served.
        near.cache.insert("k".into(), ("stale", g.0)).await;
        assert_eq!(near.get("k").await, None);
        let g = near.generation("k");
        near.fill("k", "fresh", g).await;
        assert_eq!(near.get("k").await, Some("fresh"));
    }

    #[tokio::test]
    async fn incoherent_tier_is_bypassed_and_cleared() {
        let near = Near::new(100, Duration::from_secs(60));
        near.fill("k", 1, near.generation("k")).await;
        assert_eq!(near.get("k").await, Some(1));
        near.set_coherent(false);
        assert_eq!(near.get("k").await, None);
        near.fill("k", 2, near.generation("k")).await;
        near.set_coherent(true);
        assert_eq!(near.get("k").await, None);
    }

    #[tokio::test]
    async fn entries_expire_after_the_max_ttl() {
        let near = Near::new(100, Duration::from_millis(100));
        near.fill("k", 1, near.generation("k")).await;
        assert_eq!(near.get("k").await, Some(1));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(near.get("k").await, None);
    }
}
