//! The client's metrics in Prometheus, through the `prometheus-client` crate (feature
//! `prometheus`).
//!
//! [`register`] adds a collector to a [`Registry`] that reads the client's live counters at
//! every scrape (nothing to update by hand). Encode the registry with
//! `prometheus_client::encoding::text::encode` (OpenMetrics) or
//! `prometheus_client::encoding::prometheus_text::encode` (Prometheus text format 0.0.4, what
//! `mqlock --metrics-addr` serves). The metrics, per client (names as exposed, under the
//! registry's own prefix if it has one):
//!
//! | metric | type | what |
//! |---|---|---|
//! | `mqlock_requests_total` | counter | acquisitions started (R) |
//! | `mqlock_grants_total` | counter | acquisitions that ended with a grant |
//! | `mqlock_releases_total` | counter | releases that completed without error (S) |
//! | `mqlock_timeouts_total` | counter | timed acquisitions that ran out of time |
//! | `mqlock_busy_total` | counter | `try_lock` calls that found the lock held |
//! | `mqlock_losses_total{reason}` | counter | grants lost while held, by reason (below; see [`crate::MetricsSnapshot::losses`]) |
//! | `mqlock_lease_renewals_total` | counter | lease renewals that came back from their lock queue |
//! | `mqlock_held_locks` | gauge | locks held now |
//! | `mqlock_wait_seconds` | histogram | wait time T, request to grant |
//! | `mqlock_hold_seconds` | histogram | hold time, grant to release or loss |
//! | `mqlock_is_leader{election}` | gauge | 1 while this client leads the election, else 0 |
//!
//! `reason` is one of [`crate::LOSS_REASONS`]: `connection_lost`, `channel_closed`,
//! `consumer_cancelled`, `lease_expired`, `taken_back`, `granted_elsewhere`, `revoked`,
//! `broken` (`mqlock break`), `hold_limit` (`LockOptions::max_hold`), `other`; every one is
//! exposed, zeros included.
//!
//! `mqlock_is_leader` has one series per election the client campaigned in
//! ([`LockClient::campaign`], label `election` = the election's name, not its lock's): 0 while it
//! stands by, 1 from the won campaign until its [`crate::Leadership`] is lost (loss signal fired
//! or lease run out), resigned or dropped, then 0 again. Nothing needs updating by hand: a
//! registered client's leaderships set and clear it ([`crate::MetricsSnapshot::leading`]).
//! Summed over every candidate of an election, it should be 1 (briefly 0 at a hand-over; above 1
//! only while a deposed leader has not noticed its loss, the case fencing tokens are for).
//!
//! ```no_run
//! # async fn demo() -> mqlock::Result<()> {
//! use mqlock::{ClientConfig, LockClient};
//! use prometheus_client::registry::Registry;
//!
//! let client = LockClient::connect("amqp://guest:guest@127.0.0.1:5672/%2f", ClientConfig::default()).await?;
//! let mut registry = Registry::default();
//! mqlock::prometheus::register(&client, &mut registry);
//! let mut text = String::new();
//! prometheus_client::encoding::prometheus_text::encode(&mut text, &registry).unwrap();
//! # Ok(()) }
//! ```

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

use crate::client::LockClient;
use crate::metrics::{HistogramSnapshot, Metrics, MetricsSnapshot};

/// The prefix of every metric's name (joined with `_`).
pub const PREFIX: &str = "mqlock";

/// Registers the metrics of `client` (and of its clones, which share them) with `registry`,
/// under the prefix `mqlock`. Register each client once per registry: two clients in one
/// registry would expose the same names twice (give each its own sub-registry with a label,
/// `Registry::sub_registry_with_label`).
pub fn register(client: &LockClient, registry: &mut Registry) {
    register_metrics(client.inner.metrics.clone(), registry);
}

/// Registers `metrics` with `registry`, under the prefix `mqlock`.
///
/// A client's own [`Metrics`] are not reachable from outside the crate, so this exposes the
/// names and help texts with zero values; [`register`] exposes a client's.
pub fn register_metrics(metrics: Arc<Metrics>, registry: &mut Registry) {
    registry
        .sub_registry_with_prefix(PREFIX)
        .register_collector(Box::new(MetricsCollector { metrics }));
}

/// Reads a client's counters at scrape time.
#[derive(Debug)]
struct MetricsCollector {
    metrics: Arc<Metrics>,
}

impl Collector for MetricsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s: MetricsSnapshot = self.metrics.snapshot();
        let counters = [
            (
                "requests",
                "Lock acquisitions started (lock, try_lock, lock_timeout): the request rate R.",
                s.requests,
            ),
            (
                "grants",
                "Lock acquisitions that ended with a grant.",
                s.grants,
            ),
            (
                "releases",
                "Grants given back by a release that completed: the release rate S.",
                s.releases,
            ),
            (
                "timeouts",
                "Timed lock acquisitions that ran out of time.",
                s.timeouts,
            ),
            ("busy", "try_lock calls that found the lock held.", s.busy),
            (
                "lease_renewals",
                "Lease renewals that came back from their lock queue (the grants' own included).",
                s.renewals,
            ),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(name, help, None, MetricType::Counter)?)?;
        }

        let mut losses = encoder.encode_descriptor(
            "losses",
            "Grants lost while held, by reason.",
            None,
            MetricType::Counter,
        )?;
        for (reason, n) in &s.losses_by_reason {
            let labels = [("reason", *reason)];
            ConstCounter::new(*n).encode(losses.encode_family(&labels)?)?;
        }

        ConstGauge::new(s.held as i64).encode(encoder.encode_descriptor(
            "held_locks",
            "Locks this client holds now (granted, neither released nor lost).",
            None,
            MetricType::Gauge,
        )?)?;

        let mut leading = encoder.encode_descriptor(
            "is_leader",
            "1 while this client leads the election (won, neither lost nor resigned), else 0.",
            None,
            MetricType::Gauge,
        )?;
        for (election, leads) in &s.leading {
            let labels = [("election", election.as_str())];
            ConstGauge::new(i64::from(*leads)).encode(leading.encode_family(&labels)?)?;
        }

        for (name, help, h) in [
            (
                "wait",
                "Wait time T of each grant, from request to grant.",
                &s.wait_seconds,
            ),
            (
                "hold",
                "Hold time of each ended hold, from grant to release or loss.",
                &s.hold_seconds,
            ),
        ] {
            let mut m = encoder.encode_descriptor(
                name,
                help,
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?;
            encode_histogram(&mut m, h)?;
        }
        Ok(())
    }
}

fn encode_histogram(
    m: &mut prometheus_client::encoding::MetricEncoder<'_>,
    h: &HistogramSnapshot,
) -> Result<(), std::fmt::Error> {
    // Per-bucket counts with their upper bounds; the encoder makes them cumulative.
    let buckets: Vec<(f64, u64)> = h
        .bounds
        .iter()
        .copied()
        .chain(std::iter::once(f64::INFINITY))
        .zip(h.counts.iter().copied())
        .collect();
    m.encode_histogram::<NoLabelSet>(h.sum.as_secs_f64(), h.count, &buckets, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::LossReason;
    use std::time::Duration;

    #[test]
    fn the_exposition_has_every_metric_with_its_values() {
        let metrics = Arc::new(Metrics::default());
        for ms in [1u64, 3, 2000] {
            metrics.requested();
            metrics.granted(Duration::from_millis(ms));
            metrics.hold_started();
        }
        metrics.requested();
        metrics.timed_out();
        metrics.hold_ended(Duration::from_millis(20));
        metrics.released();
        metrics.lost(&LossReason::ConsumerCancelled);
        metrics.hold_ended(Duration::from_secs(7));
        metrics.standing("standby \"x\"");
        let _leading = metrics.elected("sched", crate::LossSignal::new(None));
        let mut registry = Registry::default();
        register_metrics(metrics, &mut registry);
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry).unwrap();
        for line in [
            "mqlock_requests_total 4",
            "mqlock_grants_total 3",
            "mqlock_releases_total 1",
            "mqlock_timeouts_total 1",
            "mqlock_busy_total 0",
            "mqlock_lease_renewals_total 0",
            "mqlock_losses_total{reason=\"consumer_cancelled\"} 1",
            "mqlock_losses_total{reason=\"lease_expired\"} 0",
            "mqlock_losses_total{reason=\"other\"} 0",
            "mqlock_held_locks 1",
            "# TYPE mqlock_wait_seconds histogram",
            "mqlock_wait_seconds_count 3",
            "mqlock_wait_seconds_sum 2.004",
            "mqlock_wait_seconds_bucket{le=\"0.001\"} 1",
            "mqlock_wait_seconds_bucket{le=\"0.005\"} 2",
            "mqlock_wait_seconds_bucket{le=\"1\"} 2",
            "mqlock_wait_seconds_bucket{le=\"2.5\"} 3",
            "mqlock_wait_seconds_bucket{le=\"+Inf\"} 3",
            "mqlock_hold_seconds_count 2",
            "mqlock_hold_seconds_sum 7.02",
            "mqlock_hold_seconds_bucket{le=\"0.05\"} 1",
            "mqlock_hold_seconds_bucket{le=\"10\"} 2",
            "# TYPE mqlock_is_leader gauge",
            "mqlock_is_leader{election=\"sched\"} 1",
            "mqlock_is_leader{election=\"standby \\\"x\\\"\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing from:\n{text}"
            );
        }
    }
}
