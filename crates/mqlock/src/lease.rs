//! The lease: until when a holder may believe it holds (docs/protocol.md, "Lease" and L2).
//!
//! A lease is a deadline on the **boot clock** (`CLOCK_BOOTTIME`), which keeps counting while
//! the host is suspended. `Instant` (`CLOCK_MONOTONIC`) stops during a suspend: a laptop or VM
//! resumed after an hour would otherwise see its old deadline still ahead, while the broker
//! handed its locks on long ago. The clock is injectable ([`Clock`]) so that a suspend can be
//! tested without suspending the machine.

use std::fmt;
use std::ops::Add;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A point on a [`Clock`]: the time since the clock's origin (for [`BootClock`], the boot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct BootInstant(Duration);

impl BootInstant {
    /// The instant `since_origin` after the clock's origin.
    pub fn from_origin(since_origin: Duration) -> Self {
        BootInstant(since_origin)
    }

    /// Time since the clock's origin.
    pub fn since_origin(self) -> Duration {
        self.0
    }

    /// How long after `earlier` this is, or zero if it is not after it.
    pub fn saturating_duration_since(self, earlier: BootInstant) -> Duration {
        self.0.saturating_sub(earlier.0)
    }
}

impl Add<Duration> for BootInstant {
    type Output = BootInstant;
    fn add(self, d: Duration) -> BootInstant {
        BootInstant(self.0.saturating_add(d))
    }
}

/// The clock a lease is measured on ([`crate::ClientConfig::clock`]).
///
/// It must never go backwards: that a lost lock stays lost ([`crate::LockGuard::is_held`]:
/// "`false` is final") rests on it.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current time.
    fn now(&self) -> BootInstant;
}

/// `CLOCK_BOOTTIME`: monotonic, and counting while the host is suspended (Linux, Android).
/// Elsewhere it falls back to `Instant`, which may not count a suspend.
///
/// # Panics
///
/// `now` panics if `clock_gettime(CLOCK_BOOTTIME)` fails, which Linux does not do since 2.6.39.
#[derive(Debug, Clone, Copy, Default)]
pub struct BootClock;

impl Clock for BootClock {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn now(&self) -> BootInstant {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec; CLOCK_BOOTTIME exists since Linux 2.6.39.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
        assert_eq!(rc, 0, "clock_gettime(CLOCK_BOOTTIME) failed");
        BootInstant(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
    }

    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    fn now(&self) -> BootInstant {
        use std::sync::OnceLock;
        use std::time::Instant;
        static ORIGIN: OnceLock<Instant> = OnceLock::new();
        BootInstant(ORIGIN.get_or_init(Instant::now).elapsed())
    }
}

/// How often a task waiting for a lease to run out looks at the clock. Timers run on the
/// monotonic clock, which stops during a suspend; checking at least this often bounds how
/// late `LossSignal::lost` resolves after the host resumes. (`is_held` reads the clock
/// itself and is never late.)
const RECHECK: Duration = Duration::from_millis(250);

/// A deadline that only moves forward, read without any task running.
///
/// [`crate::LockGuard::is_held`] compares the clock with it directly, so a process that was
/// frozen (SIGSTOP, VM pause, suspend) sees the loss on its first check after it resumes,
/// before any background task has had a chance to run.
#[derive(Debug)]
pub struct Lease {
    clock: Arc<dyn Clock>,
    /// The deadline, in nanoseconds since the clock's origin.
    deadline_nanos: AtomicU64,
}

impl Lease {
    /// A lease on the boot clock that expires `valid_for` from now.
    pub fn new(valid_for: Duration) -> Self {
        Self::with_clock(Arc::new(BootClock), valid_for)
    }

    /// A lease on `clock` that expires `valid_for` from now.
    pub fn with_clock(clock: Arc<dyn Clock>, valid_for: Duration) -> Self {
        let deadline = clock.now() + valid_for;
        Lease {
            clock,
            deadline_nanos: AtomicU64::new(nanos(deadline)),
        }
    }

    /// The current time on the lease's clock.
    pub fn now(&self) -> BootInstant {
        self.clock.now()
    }

    /// Moves the deadline to `deadline` if that is later than the current one. Never revives
    /// a lease that already ran out: once [`Lease::is_valid`] said `false`, it stays `false`.
    pub fn extend_to(&self, deadline: BootInstant) {
        let new = nanos(deadline);
        let now = nanos(self.now());
        let _ = self
            .deadline_nanos
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                (cur > now && new > cur).then_some(new)
            });
    }

    /// Ends the lease now.
    pub fn expire(&self) {
        self.deadline_nanos.store(0, Ordering::Release);
    }

    /// The current deadline; the clock's origin once [`Lease::expire`] was called.
    pub fn deadline(&self) -> BootInstant {
        BootInstant(Duration::from_nanos(
            self.deadline_nanos.load(Ordering::Acquire),
        ))
    }

    /// Whether the deadline is still in the future.
    pub fn is_valid(&self) -> bool {
        self.now() < self.deadline()
    }

    /// How long ago the deadline passed (zero while the lease is valid).
    pub fn overdue(&self) -> Duration {
        self.now().saturating_duration_since(self.deadline())
    }

    /// Resolves once the lease has run out (the deadline of `v2::Expire` in docs/model.md;
    /// the holder task then ends the hold). Looks at the clock at least every 250 ms, so a
    /// suspend of the host (which tokio's timers do not count) is noticed at most that late.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it holds no state of its own.
    ///
    /// # Panics
    ///
    /// If polled outside a tokio runtime with its time driver.
    pub async fn expired(&self) {
        loop {
            let left = self.deadline().saturating_duration_since(self.now());
            if left.is_zero() {
                return;
            }
            tokio::time::sleep(left.min(RECHECK)).await;
        }
    }
}

fn nanos(t: BootInstant) -> u64 {
    t.0.as_nanos().min(u64::MAX as u128) as u64
}

/// A clock that moves only when told to: for tests of leases across a suspend or a freeze
/// (set it as [`crate::ClientConfig::clock`]).
#[derive(Debug, Default)]
pub struct ManualClock {
    nanos: AtomicU64,
}

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: Duration) -> Self {
        ManualClock {
            nanos: AtomicU64::new(start.as_nanos() as u64),
        }
    }

    /// Moves the clock forward, as a suspend of `by` would move the boot clock.
    pub fn advance(&self, by: Duration) {
        self.nanos.fetch_add(by.as_nanos() as u64, Ordering::AcqRel);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> BootInstant {
        BootInstant(Duration::from_nanos(self.nanos.load(Ordering::Acquire)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_boot_clock_moves_forward() {
        let a = BootClock.now();
        std::thread::sleep(Duration::from_millis(5));
        let b = BootClock.now();
        assert!(b.saturating_duration_since(a) >= Duration::from_millis(5));
    }

    #[test]
    fn a_suspend_ends_the_lease_at_once() {
        let clock = Arc::new(ManualClock::new(Duration::from_secs(1000)));
        let lease = Lease::with_clock(clock.clone(), Duration::from_secs(7));
        assert!(lease.is_valid());
        // The host sleeps for an hour: the monotonic clock stood still, the boot clock did not.
        clock.advance(Duration::from_secs(3600));
        assert!(!lease.is_valid());
        assert_eq!(lease.overdue(), Duration::from_secs(3593));
    }

    #[test]
    fn a_lease_only_moves_forward_and_never_revives() {
        let clock = Arc::new(ManualClock::new(Duration::from_secs(10)));
        let lease = Lease::with_clock(clock.clone(), Duration::from_secs(5));
        let start = clock.now();
        lease.extend_to(start + Duration::from_secs(8));
        assert_eq!(lease.deadline(), start + Duration::from_secs(8));
        lease.extend_to(start + Duration::from_secs(6));
        assert_eq!(lease.deadline(), start + Duration::from_secs(8));
        clock.advance(Duration::from_secs(9));
        assert!(!lease.is_valid());
        // A late confirmation of a renewal sent before the freeze must not bring it back.
        lease.extend_to(clock.now() + Duration::from_secs(5));
        assert!(!lease.is_valid());
    }

    #[tokio::test(start_paused = true)]
    async fn expired_resolves_soon_after_a_suspend_even_though_timers_stood_still() {
        let clock = Arc::new(ManualClock::new(Duration::from_secs(1)));
        let lease = Arc::new(Lease::with_clock(clock.clone(), Duration::from_secs(3600)));
        let waiter = tokio::spawn({
            let lease = lease.clone();
            async move { lease.expired().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        clock.advance(Duration::from_secs(7200));
        // Within a recheck period, not after the hour the monotonic timer still counts.
        tokio::time::timeout(RECHECK * 4, waiter)
            .await
            .expect("expired() noticed the suspend")
            .unwrap();
    }
}
