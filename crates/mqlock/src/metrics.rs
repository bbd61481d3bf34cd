//! The article's figures of merit, per client: lock request rate **R**, release rate **S** and
//! wait time **T** (a histogram of the time from request to grant).

use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Wait-time buckets: bucket `i` counts waits in `[2^i, 2^(i+1))` microseconds.
const BUCKETS: usize = 40;

/// Live counters of one client. Cheap to update from many tasks.
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    requests: AtomicU64,
    grants: AtomicU64,
    releases: AtomicU64,
    timeouts: AtomicU64,
    busy: AtomicU64,
    losses: AtomicU64,
    renewals: AtomicU64,
    wait: Mutex<Histogram>,
}

#[derive(Debug, Clone)]
struct Histogram {
    buckets: [u64; BUCKETS],
    count: u64,
    sum_micros: u128,
    max_micros: u64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            started: Instant::now(),
            requests: AtomicU64::new(0),
            grants: AtomicU64::new(0),
            releases: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            busy: AtomicU64::new(0),
            losses: AtomicU64::new(0),
            renewals: AtomicU64::new(0),
            wait: Mutex::new(Histogram {
                buckets: [0; BUCKETS],
                count: 0,
                sum_micros: 0,
                max_micros: 0,
            }),
        }
    }
}

impl Metrics {
    pub(crate) fn requested(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn granted(&self, waited: Duration) {
        self.grants.fetch_add(1, Ordering::Relaxed);
        let micros = waited.as_micros().min(u64::MAX as u128) as u64;
        let bucket = (64 - micros.max(1).leading_zeros() as usize - 1).min(BUCKETS - 1);
        let mut h = self.wait.lock().unwrap();
        h.buckets[bucket] += 1;
        h.count += 1;
        h.sum_micros += micros as u128;
        h.max_micros = h.max_micros.max(micros);
    }
    pub(crate) fn released(&self) {
        self.releases.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn timed_out(&self) {
        self.timeouts.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn found_busy(&self) {
        self.busy.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn lost(&self) {
        self.losses.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn renewed(&self) {
        self.renewals.fetch_add(1, Ordering::Relaxed);
    }

    /// A consistent-enough copy of the counters for reading or printing.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let h = self.wait.lock().unwrap().clone();
        let quantile = |q: f64| -> Duration {
            if h.count == 0 {
                return Duration::ZERO;
            }
            let rank = ((h.count as f64) * q).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (i, n) in h.buckets.iter().enumerate() {
                seen += n;
                if seen >= rank {
                    // Upper edge of the bucket, capped by the largest wait seen.
                    return Duration::from_micros((1u64 << (i + 1)).min(h.max_micros.max(1)));
                }
            }
            Duration::from_micros(h.max_micros)
        };
        MetricsSnapshot {
            elapsed: self.started.elapsed(),
            requests: self.requests.load(Ordering::Relaxed),
            grants: self.grants.load(Ordering::Relaxed),
            releases: self.releases.load(Ordering::Relaxed),
            timeouts: self.timeouts.load(Ordering::Relaxed),
            busy: self.busy.load(Ordering::Relaxed),
            losses: self.losses.load(Ordering::Relaxed),
            renewals: self.renewals.load(Ordering::Relaxed),
            wait_mean: if h.count == 0 {
                Duration::ZERO
            } else {
                Duration::from_micros((h.sum_micros / h.count as u128) as u64)
            },
            wait_p50: quantile(0.50),
            wait_p99: quantile(0.99),
            wait_max: Duration::from_micros(h.max_micros),
            wait_buckets: h.buckets.to_vec(),
        }
    }
}

/// A copy of a client's counters. `R` = requests per second, `S` = releases per second,
/// `T` = wait time from request to grant.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsSnapshot {
    /// Time since the client was created.
    pub elapsed: Duration,
    /// Acquisitions started (lock, try_lock, lock_timeout).
    pub requests: u64,
    /// Acquisitions that ended with a grant.
    pub grants: u64,
    /// Grants given back (release or drop).
    pub releases: u64,
    /// Timed acquisitions that ran out of time.
    pub timeouts: u64,
    /// `try_lock` calls that found the lock held.
    pub busy: u64,
    /// Grants lost while held.
    pub losses: u64,
    /// Lease renewals confirmed by lock queues (one publish, confirm, delivery and ack each;
    /// docs/protocol.md, "Lease"), the grants' own included.
    pub renewals: u64,
    /// Mean wait time of grants.
    pub wait_mean: Duration,
    /// Median wait (upper edge of its power-of-two bucket).
    pub wait_p50: Duration,
    /// 99th percentile wait (upper edge of its power-of-two bucket).
    pub wait_p99: Duration,
    /// Longest wait.
    pub wait_max: Duration,
    /// Histogram: entry `i` counts waits in `[2^i, 2^(i+1))` µs.
    pub wait_buckets: Vec<u64>,
}

impl MetricsSnapshot {
    /// R: lock requests per second since the client started.
    pub fn request_rate(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    /// S: releases per second since the client started.
    pub fn release_rate(&self) -> f64 {
        self.releases as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl fmt::Display for MetricsSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "R (requests/s) {:.1}   S (releases/s) {:.1}   over {:.1?}",
            self.request_rate(),
            self.release_rate(),
            self.elapsed
        )?;
        writeln!(
            f,
            "requests {}  grants {}  releases {}  timeouts {}  busy {}  losses {}",
            self.requests, self.grants, self.releases, self.timeouts, self.busy, self.losses
        )?;
        write!(
            f,
            "T (wait) mean {:?}  p50 ≤{:?}  p99 ≤{:?}  max {:?}",
            self.wait_mean, self.wait_p50, self.wait_p99, self.wait_max
        )?;
        for (i, n) in self
            .wait_buckets
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
        {
            write!(
                f,
                "\n  [{:>10?}, {:>10?})  {n}",
                Duration::from_micros(1 << i),
                Duration::from_micros(1 << (i + 1))
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_from_the_histogram() {
        let m = Metrics::default();
        for us in [100u64, 100, 100, 5000] {
            m.requested();
            m.granted(Duration::from_micros(us));
        }
        let s = m.snapshot();
        assert_eq!(s.grants, 4);
        assert_eq!(s.wait_p50, Duration::from_micros(128));
        assert_eq!(s.wait_max, Duration::from_micros(5000));
        assert_eq!(s.wait_p99, Duration::from_micros(5000));
        assert!(s.to_string().contains("R (requests/s)"));
    }
}
