//! Percentiles of a set of measured durations.

use std::time::Duration;

/// The sorted samples of one measurement and the percentiles the tables print.
#[derive(Clone, Debug)]
pub struct Stats {
    /// Every sample, sorted ascending.
    pub sorted: Vec<Duration>,
}

impl Stats {
    /// Sorts `samples`. Panics when there are none (every measurement takes at least one).
    pub fn new(mut samples: Vec<Duration>) -> Stats {
        assert!(!samples.is_empty(), "a measurement without samples");
        samples.sort_unstable();
        Stats { sorted: samples }
    }

    /// The `q`-quantile (0 ≤ q ≤ 1), nearest rank: the smallest sample with at least `q` of
    /// the samples at or below it.
    pub fn quantile(&self, q: f64) -> Duration {
        let n = self.sorted.len();
        let rank = (q * n as f64).ceil() as usize;
        self.sorted[rank.clamp(1, n) - 1]
    }

    /// The median.
    pub fn p50(&self) -> Duration {
        self.quantile(0.5)
    }

    /// The 90th percentile.
    pub fn p90(&self) -> Duration {
        self.quantile(0.9)
    }

    /// The 99th percentile.
    pub fn p99(&self) -> Duration {
        self.quantile(0.99)
    }

    /// How many samples.
    pub fn n(&self) -> usize {
        self.sorted.len()
    }
}

/// A duration in microseconds, as the tables and the plot show it.
pub fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let s = Stats::new((1..=100).rev().map(Duration::from_micros).collect());
        assert_eq!(s.p50(), Duration::from_micros(50));
        assert_eq!(s.p90(), Duration::from_micros(90));
        assert_eq!(s.p99(), Duration::from_micros(99));
        assert_eq!(s.quantile(0.0), Duration::from_micros(1));
        assert_eq!(s.quantile(1.0), Duration::from_micros(100));
        let one = Stats::new(vec![Duration::from_micros(7)]);
        assert_eq!(one.p99(), Duration::from_micros(7));
    }
}
