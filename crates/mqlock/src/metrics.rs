//! The article's figures of merit, per client: lock request rate **R**, release rate **S** and
//! wait time **T** (a histogram of the time from request to grant); and what an operator
//! watches besides: hold time, losses by reason, locks held now, and whether it leads each
//! election it campaigned in. The `prometheus` feature exposes them (`crate::prometheus`).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::loss::{LossReason, LossSignal};

/// Wait-time buckets: bucket `i` counts waits in `[2^i, 2^(i+1))` microseconds.
const BUCKETS: usize = 40;

/// Upper bounds, in seconds, of the wait-time histogram of [`MetricsSnapshot::wait_seconds`]
/// (a Prometheus histogram: a bucket counts the waits `<=` its bound; one more bucket,
/// `+Inf`, counts the rest).
pub const WAIT_BUCKETS_SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// Upper bounds, in seconds, of the hold-time histogram of [`MetricsSnapshot::hold_seconds`]
/// (from grant to release or loss): milliseconds for short critical sections up to a day for
/// locks held for a process's lifetime.
pub const HOLD_BUCKETS_SECONDS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0,
    7200.0, 21600.0, 86400.0,
];

/// The label of each kind of loss in [`MetricsSnapshot::losses_by_reason`] (and in the
/// `reason` label of `mqlock_losses_total`), in that order. `other` counts reasons added to
/// [`LossReason`] after this list.
pub const LOSS_REASONS: [&str; 10] = [
    "connection_lost",
    "channel_closed",
    "consumer_cancelled",
    "lease_expired",
    "taken_back",
    "granted_elsewhere",
    "revoked",
    "broken",
    "hold_limit",
    "other",
];

/// The label of `reason` among [`LOSS_REASONS`].
pub fn loss_reason_label(reason: &LossReason) -> &'static str {
    LOSS_REASONS[loss_reason_index(reason)]
}

fn loss_reason_index(reason: &LossReason) -> usize {
    match reason {
        LossReason::ConnectionLost(_) => 0,
        LossReason::ChannelClosed(_) => 1,
        LossReason::ConsumerCancelled => 2,
        LossReason::LeaseExpired { .. } => 3,
        LossReason::TakenBack => 4,
        LossReason::GrantedElsewhere { .. } => 5,
        LossReason::Revoked => 6,
        LossReason::Broken { .. } => 7,
        LossReason::HoldLimit { .. } => 8,
        // `LossReason` is non-exhaustive: reasons added later count as "other".
        #[allow(unreachable_patterns)]
        _ => 9,
    }
}

/// The live counters of one client, updated by its acquisitions and holder tasks and shared
/// by its clones. Read them with [`Metrics::snapshot`] ([`crate::LockClient::metrics`]).
///
/// Only the client updates them: a `Metrics::default()` made outside the crate stays at zero.
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    requests: AtomicU64,
    grants: AtomicU64,
    releases: AtomicU64,
    timeouts: AtomicU64,
    busy: AtomicU64,
    losses: AtomicU64,
    losses_by_reason: [AtomicU64; LOSS_REASONS.len()],
    held: AtomicU64,
    renewals: AtomicU64,
    wait: Mutex<Histogram>,
    wait_seconds: Mutex<Buckets>,
    hold_seconds: Mutex<Buckets>,
    elections: Mutex<Elections>,
}

/// The elections a client campaigned in, by name, each with the leaderships it won there and
/// has not given up yet (a [`crate::Leadership`] not dropped or resigned), by id, with the loss
/// signal of their guards. Whether it leads is read from those signals at snapshot time, so a
/// lost leadership (an expired lease included) reads as not leading without any task running.
#[derive(Debug, Default)]
struct Elections {
    next_id: u64,
    by_name: BTreeMap<String, Vec<(u64, LossSignal)>>,
}

/// Marks a won election in its client's [`Metrics`] while it lives: the client leads that
/// election as long as a mark whose loss signal has not fired exists. Held by
/// [`crate::Leadership`]; dropping it (resign, drop) takes the leadership off.
#[derive(Debug)]
pub(crate) struct LeaderMark {
    metrics: Arc<Metrics>,
    election: String,
    id: u64,
}

impl Drop for LeaderMark {
    fn drop(&mut self) {
        let mut e = self.metrics.elections.lock().unwrap();
        if let Some(marks) = e.by_name.get_mut(&self.election) {
            // The election stays listed, now without this leadership: it reads as 0.
            marks.retain(|(id, _)| *id != self.id);
        }
    }
}

/// A Prometheus-style histogram: counts per bucket (not cumulative), the last one `+Inf`.
#[derive(Debug, Clone)]
struct Buckets {
    bounds: &'static [f64],
    counts: Vec<u64>,
    count: u64,
    sum: Duration,
}

impl Buckets {
    fn new(bounds: &'static [f64]) -> Self {
        Buckets {
            bounds,
            counts: vec![0; bounds.len() + 1],
            count: 0,
            sum: Duration::ZERO,
        }
    }

    fn observe(&mut self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self.bounds.partition_point(|&b| b < secs);
        self.counts[i] += 1;
        self.count += 1;
        self.sum += d;
    }

    fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            bounds: self.bounds.to_vec(),
            counts: self.counts.clone(),
            count: self.count,
            sum: self.sum,
        }
    }
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
            losses_by_reason: Default::default(),
            held: AtomicU64::new(0),
            renewals: AtomicU64::new(0),
            wait: Mutex::new(Histogram {
                buckets: [0; BUCKETS],
                count: 0,
                sum_micros: 0,
                max_micros: 0,
            }),
            wait_seconds: Mutex::new(Buckets::new(WAIT_BUCKETS_SECONDS)),
            hold_seconds: Mutex::new(Buckets::new(HOLD_BUCKETS_SECONDS)),
            elections: Mutex::new(Elections::default()),
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
        drop(h);
        self.wait_seconds.lock().unwrap().observe(waited);
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
    pub(crate) fn lost(&self, reason: &LossReason) {
        self.losses.fetch_add(1, Ordering::Relaxed);
        self.losses_by_reason[loss_reason_index(reason)].fetch_add(1, Ordering::Relaxed);
    }
    /// A holder task started holding a lock.
    pub(crate) fn hold_started(&self) {
        self.held.fetch_add(1, Ordering::Relaxed);
    }
    /// A holder task stopped holding a lock (released or lost) after holding it for `held`.
    pub(crate) fn hold_ended(&self, held: Duration) {
        // Never below zero, even if a start were missed.
        let _ = self
            .held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        self.hold_seconds.lock().unwrap().observe(held);
    }
    pub(crate) fn renewed(&self) {
        self.renewals.fetch_add(1, Ordering::Relaxed);
    }
    /// The client stands for leader of `election`: listed from now on (not leading yet).
    pub(crate) fn standing(&self, election: &str) {
        self.elections
            .lock()
            .unwrap()
            .by_name
            .entry(election.to_owned())
            .or_default();
    }
    /// The client won `election` with a grant whose loss signal is `signal`: it leads while the
    /// returned mark lives and the signal has not fired.
    pub(crate) fn elected(self: &Arc<Self>, election: &str, signal: LossSignal) -> LeaderMark {
        let mut e = self.elections.lock().unwrap();
        let id = e.next_id;
        e.next_id += 1;
        e.by_name
            .entry(election.to_owned())
            .or_default()
            .push((id, signal));
        LeaderMark {
            metrics: self.clone(),
            election: election.to_owned(),
            id,
        }
    }

    /// A copy of the counters for reading or printing. Each counter and histogram is read on
    /// its own, so a snapshot taken while locks change hands may be off by the events in
    /// between (a grant counted in `grants` but not yet in `wait_seconds`, say).
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
            losses_by_reason: LOSS_REASONS
                .iter()
                .zip(&self.losses_by_reason)
                .map(|(label, n)| (*label, n.load(Ordering::Relaxed)))
                .collect(),
            held: self.held.load(Ordering::Relaxed),
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
            wait_seconds: self.wait_seconds.lock().unwrap().snapshot(),
            hold_seconds: self.hold_seconds.lock().unwrap().snapshot(),
            leading: self
                .elections
                .lock()
                .unwrap()
                .by_name
                .iter()
                .map(|(name, marks)| {
                    let leads = marks.iter().any(|(_, signal)| signal.reason().is_none());
                    (name.clone(), leads)
                })
                .collect(),
        }
    }
}

/// A copy of a Prometheus-style histogram of durations.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// Upper bounds of the buckets, in seconds, ascending.
    pub bounds: Vec<f64>,
    /// Observations per bucket, not cumulative: `counts[i]` counts the durations `d` with
    /// `bounds[i-1] < d <= bounds[i]`; the last entry (one more than `bounds`) counts those
    /// above the last bound (`+Inf`).
    pub counts: Vec<u64>,
    /// Number of observations.
    pub count: u64,
    /// Sum of the observations.
    pub sum: Duration,
}

/// A copy of a client's counters. `R` = requests per second, `S` = releases per second,
/// `T` = wait time from request to grant.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsSnapshot {
    /// Time since the client was created.
    pub elapsed: Duration,
    /// Acquisitions started (lock, try_lock, lock_timeout) with a valid lock name.
    pub requests: u64,
    /// Acquisitions that ended with a grant.
    pub grants: u64,
    /// Releases that completed without error, by [`crate::LockGuard::release`] or by dropping
    /// the guard. The release of a lost lock is not counted.
    pub releases: u64,
    /// Timed acquisitions that ran out of time.
    pub timeouts: u64,
    /// `try_lock` calls that returned `Ok(None)`: the lock was held or waited for, or was not
    /// handed over in time.
    pub busy: u64,
    /// Grants lost while held, as their holder tasks recorded them. A lease that runs out is
    /// normally not counted: the loss signal records that loss itself, before the holder task
    /// can, so `lease_expired` undercounts (it counts only the locks of a connection whose
    /// liveness probe went unanswered, and only when the lock's own lease had not run out
    /// first).
    pub losses: u64,
    /// Grants lost while held, by reason: one entry per label of [`LOSS_REASONS`], in that
    /// order (zeros included); they add up to `losses`.
    pub losses_by_reason: Vec<(&'static str, u64)>,
    /// Locks this client holds now (granted, neither released nor lost yet).
    pub held: u64,
    /// Lease renewals that came back to their holder through the lock queue, the grants' own
    /// included (each costs one publish, one delivery and one ack; docs/protocol.md, "Lease").
    pub renewals: u64,
    /// Mean wait time of grants.
    pub wait_mean: Duration,
    /// Median wait (upper edge of its power-of-two bucket).
    pub wait_p50: Duration,
    /// 99th percentile wait (upper edge of its power-of-two bucket).
    pub wait_p99: Duration,
    /// Longest wait.
    pub wait_max: Duration,
    /// Histogram: entry `i` counts waits in `[2^i, 2^(i+1))` µs (entry 0 also counts waits
    /// under 1 µs, the last entry every longer wait).
    pub wait_buckets: Vec<u64>,
    /// Wait time T (request to grant) of every grant, in the buckets of
    /// [`WAIT_BUCKETS_SECONDS`].
    pub wait_seconds: HistogramSnapshot,
    /// Hold time (grant to release or loss) of every hold that ended, in the buckets of
    /// [`HOLD_BUCKETS_SECONDS`].
    pub hold_seconds: HistogramSnapshot,
    /// Every election this client campaigned in ([`crate::LockClient::campaign`]), sorted by
    /// name, with whether it leads it now: `true` from the won campaign until the
    /// [`crate::Leadership`] is lost (its loss signal fired, its lease ran out), resigned or
    /// dropped; `false` while it stands by and after. (The `mqlock_is_leader` gauge.)
    pub leading: Vec<(String, bool)>,
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
        for (reason, n) in self.losses_by_reason.iter().filter(|(_, n)| *n > 0) {
            write!(f, "  lost ({reason}) {n}")?;
        }
        if self.losses > 0 {
            writeln!(f)?;
        }
        for (election, leads) in &self.leading {
            writeln!(
                f,
                "election {election:?}: {}",
                if *leads { "leader" } else { "not leader" }
            )?;
        }
        let h = &self.hold_seconds;
        writeln!(
            f,
            "held now {}  holds ended {}  hold mean {:?}",
            self.held,
            h.count,
            h.sum.checked_div(h.count.max(1) as u32).unwrap_or_default()
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
        // The Prometheus-style buckets: 100 µs <= 0.0005 s, 5 ms <= 0.005 s.
        assert_eq!(s.wait_seconds.count, 4);
        assert_eq!(s.wait_seconds.counts[0], 3);
        assert_eq!(s.wait_seconds.counts[3], 1);
        assert_eq!(s.wait_seconds.sum, Duration::from_micros(5300));
    }

    #[test]
    fn holds_and_losses_are_counted_by_reason() {
        let m = Metrics::default();
        m.hold_started();
        m.hold_started();
        assert_eq!(m.snapshot().held, 2);
        m.lost(&LossReason::ConsumerCancelled);
        m.hold_ended(Duration::from_secs(2));
        m.hold_ended(Duration::from_millis(1));
        // An ended hold that never started does not wrap the gauge.
        m.hold_ended(Duration::from_secs(100_000));
        let s = m.snapshot();
        assert_eq!(s.held, 0);
        assert_eq!(s.losses, 1);
        assert_eq!(s.losses_by_reason.len(), LOSS_REASONS.len());
        assert!(s.losses_by_reason.contains(&("consumer_cancelled", 1)));
        assert_eq!(s.losses_by_reason.iter().map(|(_, n)| n).sum::<u64>(), 1);
        assert_eq!(s.hold_seconds.count, 3);
        // 1 ms is in the first bucket (<= 0.001 s), 2 s in (1, 5], 100 000 s in +Inf.
        assert_eq!(s.hold_seconds.counts[0], 1);
        assert_eq!(s.hold_seconds.counts[7], 1);
        assert_eq!(*s.hold_seconds.counts.last().unwrap(), 1);
        assert_eq!(
            loss_reason_label(&LossReason::LeaseExpired {
                silent_for: Duration::ZERO
            }),
            "lease_expired"
        );
        assert!(s.to_string().contains("lost (consumer_cancelled) 1"));
        assert_eq!(
            loss_reason_label(&LossReason::Broken {
                by: "ops@host pid 1".into(),
                at: std::time::SystemTime::UNIX_EPOCH,
            }),
            "broken"
        );
        assert_eq!(
            loss_reason_label(&LossReason::HoldLimit {
                limit: Duration::from_secs(2)
            }),
            "hold_limit"
        );
    }

    #[test]
    fn leadership_is_read_from_live_marks_and_their_loss_signals() {
        let m = Arc::new(Metrics::default());
        assert!(m.snapshot().leading.is_empty());
        m.standing("b");
        assert_eq!(m.snapshot().leading, [("b".to_string(), false)]);
        let signal = LossSignal::new(None);
        let mark = m.elected("b", signal.clone());
        let other = m.elected("a", LossSignal::new(None));
        assert_eq!(
            m.snapshot().leading,
            [("a".to_string(), true), ("b".to_string(), true)]
        );
        // Lost: not leading, although the leadership still exists.
        signal.fire(LossReason::ConsumerCancelled);
        assert_eq!(m.snapshot().leading[1], ("b".to_string(), false));
        drop(mark);
        // Resigned (dropped): listed, not leading.
        drop(other);
        assert_eq!(
            m.snapshot().leading,
            [("a".to_string(), false), ("b".to_string(), false)]
        );
        assert!(
            m.snapshot()
                .to_string()
                .contains("election \"a\": not leader")
        );
    }
}
