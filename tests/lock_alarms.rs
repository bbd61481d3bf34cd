//! Resource alarms (docs/reliability.md, "Resource alarms"; review hole H6).
//!
//! A memory or disk alarm makes RabbitMQ block every connection that publishes: it stops
//! reading the socket after the first publish, pauses that connection's heartbeat monitor and
//! sends `connection.blocked`, after which lapin writes nothing more on it. No lock can be
//! granted during the alarm (the fence write is a publish), and a holder cannot renew its
//! lease. What this file asserts: nothing hangs, every bound is kept, and locks work again
//! once the alarm clears.
//!
//! The alarm is raised on the "faults" broker (mqlock-faults@localhost, port 5673) with
//! `set_vm_memory_high_watermark 0` and always cleared again with `0.4` (a drop guard, so a
//! failing check or a panic cannot leave the broker blocked). That broker enforces a 3 s
//! consumer timeout, so clients here are told so (`consumer_timeout: 3 s`, like in
//! tests/lock_faults.rs): their lease margin is 1.5 s and holders renew every 0.5 s.
//!
//! Every check is bounded by `tokio::time::timeout`; the test collects every failed check and
//! fails once at the end with the full list, so one run tells all that is wrong.

mod support;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mqlock::{ClientConfig, Error, LockClient, LockGuard};

const HEARTBEAT: Duration = Duration::from_secs(2);
/// The holder's lease margin: min(1.5 × heartbeat, net_ticktime / 2, consumer_timeout / 2)
/// = 1.5 s here (only named in failure messages; the client computes its own).
const LEASE_MARGIN: Duration = Duration::from_millis(1500);
/// How late after the alarm a holder may learn that it can no longer renew its lease.
const LOSS_BOUND: Duration = Duration::from_secs(6);
/// `release()` during an alarm: 2 × heartbeat + 1 s.
const RELEASE_BOUND: Duration = Duration::from_secs(5);
/// A waiter's own timeout, and the slack it gets on top.
const WAIT: Duration = Duration::from_secs(3);
const WAIT_SLACK: Duration = Duration::from_secs(1);
/// How soon after the alarm clears locks must be granted again.
const RECOVERY_BOUND: Duration = Duration::from_secs(10);
/// How long the alarm lasts at least: long enough for a waiter's nudge (10 s) and for the
/// faults broker's consumer timeout to act on deliveries that cannot be acknowledged.
const ALARM_FOR: Duration = Duration::from_secs(12);
/// How long into the alarm the checks start: past one renewal, so the holder's connection has
/// published during the alarm and is blocked by then.
const SETTLE: Duration = Duration::from_millis(1500);

fn config() -> ClientConfig {
    ClientConfig {
        heartbeat: HEARTBEAT,
        // The faults broker's: the lease stays below half of it.
        consumer_timeout: Duration::from_secs(3),
        ..ClientConfig::default()
    }
}

async fn client() -> LockClient {
    support::init_tracing();
    tokio::time::timeout(
        Duration::from_secs(20),
        LockClient::connect(&support::faults_amqp_url(), config()),
    )
    .await
    .expect("connecting to the faults broker hung for 20 s")
    .expect("connect to the faults broker")
}

/// A memory alarm on the faults broker, cleared when dropped (also while unwinding).
struct MemoryAlarm {
    cleared: bool,
}

impl MemoryAlarm {
    /// Raises the alarm; returns once `rabbitmqctl` says it is set.
    async fn raise() -> MemoryAlarm {
        // Built before the command runs, so that even a failing command is undone.
        let alarm = MemoryAlarm { cleared: false };
        let set = tokio::task::spawn_blocking(|| {
            support::faults_rabbitmqctl(&["set_vm_memory_high_watermark", "0"])
        });
        tokio::time::timeout(Duration::from_secs(30), set)
            .await
            .expect("rabbitmqctl set_vm_memory_high_watermark 0 hung for 30 s")
            .expect("rabbitmqctl task");
        alarm
    }

    /// Clears the alarm; returns once `rabbitmqctl` says it is cleared.
    async fn clear(mut self) {
        self.cleared = true;
        let set = tokio::task::spawn_blocking(clear_alarm);
        tokio::time::timeout(Duration::from_secs(30), set)
            .await
            .expect("rabbitmqctl set_vm_memory_high_watermark 0.4 hung for 30 s")
            .expect("rabbitmqctl task");
    }
}

fn clear_alarm() {
    support::faults_rabbitmqctl(&["set_vm_memory_high_watermark", "0.4"]);
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        if !self.cleared {
            clear_alarm();
        }
    }
}

/// The failed checks of one run.
#[derive(Clone, Default)]
struct Checks(Arc<Mutex<Vec<String>>>);

impl Checks {
    fn fail(&self, msg: String) {
        eprintln!("CHECK FAILED: {msg}");
        self.0.lock().unwrap().push(msg);
    }

    fn check(&self, ok: bool, msg: impl FnOnce() -> String) {
        if !ok {
            self.fail(msg());
        }
    }

    /// Awaits `fut` for at most `limit`; `None` (and a failed check) if it did not finish.
    async fn within<T>(
        &self,
        what: &str,
        limit: Duration,
        fut: impl Future<Output = T>,
    ) -> Option<(T, Duration)> {
        let started = Instant::now();
        match tokio::time::timeout(limit, fut).await {
            Ok(v) => {
                let took = started.elapsed();
                eprintln!("[alarms] {what}: returned after {took:.2?}");
                Some((v, took))
            }
            Err(_) => {
                self.fail(format!("{what}: still pending after {limit:?} (hangs)"));
                None
            }
        }
    }

    fn assert_none_failed(&self) {
        let failed = self.0.lock().unwrap();
        assert!(
            failed.is_empty(),
            "{} check(s) failed under a memory alarm:\n  - {}",
            failed.len(),
            failed.join("\n  - ")
        );
    }
}

fn token(r: &Result<LockGuard, Error>) -> Option<u64> {
    r.as_ref().ok().map(LockGuard::fencing_token)
}

/// One test function: the alarm blocks the whole broker, so its scenarios share one alarm and
/// must not run beside each other's alarms.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_alarm_scenarios() {
    let checks = Checks::default();
    let holder = client().await;
    let waiter = client().await;
    // Its own client: `waiter` is acquiring `held` already, and a client never acquires one
    // name twice at once (Error::AlreadyHeld, docs/protocol.md N1).
    let trier = client().await;
    let fresh = client().await;
    let queued = client().await;
    let across = client().await;

    let held = support::unique("alarm-held");
    let released = support::unique("alarm-released");
    let ga = tokio::time::timeout(Duration::from_secs(10), holder.lock(&held))
        .await
        .expect("lock() before the alarm hung")
        .expect("lock() before the alarm");
    let gb = tokio::time::timeout(Duration::from_secs(10), holder.lock(&released))
        .await
        .expect("lock() before the alarm hung")
        .expect("lock() before the alarm");
    let held_token = ga.fencing_token();

    // A waiter queued on the held lock before the alarm: it gets the lock once the alarm
    // clears (it releases at once, so that later checks can take the lock too).
    let queued_waiter = {
        let (name, checks) = (held.clone(), checks.clone());
        tokio::spawn(async move {
            let r = queued.lock(&name).await;
            let at = Instant::now();
            let t = token(&r);
            match r {
                Ok(g) => {
                    checks
                        .within(
                            "release() of the queued waiter's grant",
                            RELEASE_BOUND,
                            async { g.release().await },
                        )
                        .await;
                }
                Err(e) => checks.fail(format!(
                    "lock() of a waiter queued before the alarm failed instead of waiting: {e}"
                )),
            }
            (at, t)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    let alarm = MemoryAlarm::raise().await;
    let alarm_on = Instant::now();
    eprintln!("[alarms] memory alarm raised");

    // The holder: its loss signal must fire because its lease can no longer be renewed.
    let holder_loss = {
        let signal = ga.loss_signal();
        tokio::spawn(async move {
            let reason = signal.lost().await;
            (reason, Instant::now())
        })
    };

    tokio::time::sleep(SETTLE).await;

    // Everything below starts 1.5 s into the alarm, concurrently.
    let release_during = {
        let checks = checks.clone();
        tokio::spawn(async move {
            let r = checks
                .within("release() during the alarm", RELEASE_BOUND, gb.release())
                .await;
            if let Some((r, took)) = r {
                eprintln!("[alarms] release() during the alarm: {r:?} after {took:.2?}");
            }
        })
    };
    let timed_waiter = {
        let (checks, name, waiter) = (checks.clone(), held.clone(), waiter.clone());
        tokio::spawn(async move {
            let r = checks
                .within(
                    "lock_timeout(held lock, 3 s) during the alarm",
                    WAIT + WAIT_SLACK,
                    waiter.lock_timeout(&name, WAIT),
                )
                .await;
            if let Some((r, _)) = r {
                checks.check(matches!(r, Err(Error::Timeout { .. })), || {
                    format!(
                        "lock_timeout(held lock, 3 s) during the alarm: expected Error::Timeout, got {:?}",
                        r.map(|g| g.fencing_token())
                    )
                });
            }
        })
    };
    let try_waiter = {
        let (checks, name, waiter) = (checks.clone(), held.clone(), trier.clone());
        let bound = 2 * waiter.config().try_window + WAIT_SLACK;
        tokio::spawn(async move {
            let r = checks
                .within(
                    "try_lock(held lock) during the alarm",
                    bound,
                    waiter.try_lock(&name),
                )
                .await;
            if let Some((r, _)) = r {
                checks.check(matches!(r, Ok(None)), || {
                    format!(
                        "try_lock(held lock) during the alarm: expected Ok(None), got {:?}",
                        r.map(|g| g.map(|g| g.fencing_token()))
                    )
                });
            }
        })
    };
    // Fresh names: these acquisitions publish a wake-up, which blocks their own connection.
    let fresh_timed = {
        let (checks, fresh) = (checks.clone(), fresh.clone());
        tokio::spawn(async move {
            let name = support::unique("alarm-fresh-timed");
            let r = checks
                .within(
                    "lock_timeout(new lock, 3 s) during the alarm",
                    WAIT + WAIT_SLACK,
                    fresh.lock_timeout(&name, WAIT),
                )
                .await;
            if let Some((r, _)) = r {
                checks.check(matches!(r, Err(Error::Timeout { .. })), || {
                    format!(
                        "lock_timeout(new lock, 3 s) during the alarm: expected Error::Timeout, got {:?}",
                        r.map(|g| g.fencing_token())
                    )
                });
            }
        })
    };
    let fresh_try = {
        let (checks, fresh) = (checks.clone(), fresh.clone());
        let bound = 2 * fresh.config().try_window + WAIT_SLACK;
        tokio::spawn(async move {
            let name = support::unique("alarm-fresh-try");
            let r = checks
                .within(
                    "try_lock(new lock) during the alarm",
                    bound,
                    fresh.try_lock(&name),
                )
                .await;
            if let Some((r, _)) = r {
                eprintln!(
                    "[alarms] try_lock(new lock) during the alarm: {:?}",
                    r.map(|g| g.map(|g| g.fencing_token()))
                );
            }
        })
    };
    // A waiter on the holder's own client, whose connection is blocked by its renewals.
    let own_timed = {
        let (checks, holder) = (checks.clone(), holder.clone());
        tokio::spawn(async move {
            let name = support::unique("alarm-own-timed");
            let r = checks
                .within(
                    "lock_timeout(new lock, 3 s) on the holder's client during the alarm",
                    WAIT + WAIT_SLACK,
                    holder.lock_timeout(&name, WAIT),
                )
                .await;
            if let Some((r, _)) = r {
                checks.check(matches!(r, Err(Error::Timeout { .. })), || {
                    format!(
                        "lock_timeout(new lock, 3 s) on the holder's client during the alarm: expected Error::Timeout, got {:?}",
                        r.map(|g| g.fencing_token())
                    )
                });
            }
        })
    };
    // lock() of a new name during the alarm: waits, and is granted after the alarm clears.
    let across_name = support::unique("alarm-across");
    let across_lock = {
        let (name, across) = (across_name.clone(), across.clone());
        tokio::spawn(async move {
            let r = across.lock(&name).await;
            (Instant::now(), r)
        })
    };

    for (what, task) in [
        ("release()", release_during),
        ("lock_timeout(held lock)", timed_waiter),
        ("try_lock(held lock)", try_waiter),
        ("lock_timeout(new lock)", fresh_timed),
        ("try_lock(new lock)", fresh_try),
        ("lock_timeout on the holder's client", own_timed),
    ] {
        // Each task bounds its own call; this only guards against a bug in the test.
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .unwrap_or_else(|_| panic!("{what} task did not end"))
            .unwrap_or_else(|e| panic!("{what} task panicked: {e}"));
    }

    let mut holder_lost_at = None;
    let remaining = LOSS_BOUND.saturating_sub(alarm_on.elapsed()) + Duration::from_millis(50);
    match tokio::time::timeout(remaining, holder_loss).await {
        Ok(r) => {
            let (reason, at) = r.expect("loss watcher");
            holder_lost_at = Some(at);
            let after = at - alarm_on;
            eprintln!("[alarms] holder's loss signal: {reason:?}, {after:.2?} into the alarm");
            checks.check(after <= LOSS_BOUND, || {
                format!(
                    "the holder's loss signal fired {after:?} into the alarm, later than {LOSS_BOUND:?} (lease margin {LEASE_MARGIN:?})"
                )
            });
        }
        Err(_) => checks.fail(format!(
            "the holder's loss signal had not fired {LOSS_BOUND:?} into the alarm (lease margin {LEASE_MARGIN:?}): its lease renewals cannot come back"
        )),
    }
    checks.check(!ga.is_held(), || {
        "is_held() is still true for the holder during the alarm".into()
    });
    eprintln!(
        "[alarms] holder's guard during the alarm: is_held={} loss_reason={:?}",
        ga.is_held(),
        ga.loss_reason()
    );
    if let Some((r, _)) = checks
        .within(
            "release() of the lost guard during the alarm",
            RELEASE_BOUND,
            ga.release(),
        )
        .await
    {
        eprintln!("[alarms] release() of the lost guard: {r:?}");
    }

    tokio::time::sleep(ALARM_FOR.saturating_sub(alarm_on.elapsed())).await;
    let clearing = Instant::now();
    alarm.clear().await;
    let cleared = Instant::now();
    eprintln!(
        "[alarms] memory alarm cleared after {:.2?} (rabbitmqctl took {:.2?})",
        alarm_on.elapsed(),
        cleared - clearing
    );

    // The waiter queued before the alarm gets the lock, with a larger token.
    match tokio::time::timeout(RECOVERY_BOUND, queued_waiter).await {
        Ok(r) => {
            let (at, t) = r.expect("queued waiter task");
            eprintln!(
                "[alarms] waiter queued before the alarm: token {t:?}, returned {:.2?} into the alarm, {:.2?} after the clear was begun",
                at.saturating_duration_since(alarm_on),
                at.saturating_duration_since(clearing)
            );
            // L2: the broker must not hand the lock on before the holder knows it lost it.
            if let (Some(_), Some(lost_at)) = (t, holder_lost_at) {
                checks.check(at > lost_at, || {
                    format!(
                        "the queued waiter was granted the lock {:?} before the holder's loss signal fired",
                        lost_at - at
                    )
                });
            }
            if let Some(t) = t {
                checks.check(t > held_token, || {
                    format!("queued waiter's token {t} is not above the holder's {held_token}")
                });
            }
        }
        Err(_) => checks.fail(format!(
            "a waiter queued before the alarm was not granted within {RECOVERY_BOUND:?} after the clear"
        )),
    }
    // lock() of a new name started during the alarm is granted after it.
    match tokio::time::timeout(RECOVERY_BOUND, across_lock).await {
        Ok(r) => {
            let (at, r) = r.expect("lock() task");
            eprintln!(
                "[alarms] lock(new lock) started during the alarm: {:?}, {:.2?} into the alarm, {:.2?} after the clear was begun",
                token(&r),
                at.saturating_duration_since(alarm_on),
                at.saturating_duration_since(clearing)
            );
            match r {
                Ok(g) => {
                    checks
                        .within("release() after the clear", RELEASE_BOUND, g.release())
                        .await;
                }
                Err(e) => checks.fail(format!(
                    "lock(new lock) started during the alarm failed instead of waiting: {e}"
                )),
            }
        }
        Err(_) => checks.fail(format!(
            "lock(new lock) started during the alarm was not granted within {RECOVERY_BOUND:?} after the clear"
        )),
    }

    // A fresh client gets the held lock, with a token above the holder's.
    let after = client().await;
    if let Some((r, took)) = checks
        .within(
            "lock(held lock) by a fresh client after the clear",
            RECOVERY_BOUND,
            after.lock(&held),
        )
        .await
    {
        eprintln!(
            "[alarms] fresh client's lock(held lock): token {:?} after {took:.2?} ({:.2?} after the clear)",
            token(&r),
            cleared.elapsed()
        );
        match r {
            Ok(g) => {
                checks.check(g.fencing_token() > held_token, || {
                    format!(
                        "token {} after the alarm is not above the holder's {held_token}",
                        g.fencing_token()
                    )
                });
                checks
                    .within("release() after the clear", RELEASE_BOUND, g.release())
                    .await;
            }
            Err(e) => checks.fail(format!(
                "lock(held lock) by a fresh client after the clear failed: {e}"
            )),
        }
    }
    // New names work, on a fresh client and on every client that went through the alarm.
    for (who, c) in [
        ("a fresh client", &after),
        ("the holder's client", &holder),
        ("the waiter's client", &waiter),
        ("the client of the new-name waits", &fresh),
    ] {
        let what = format!("lock(new lock) by {who} after the clear");
        if let Some((r, _)) = checks
            .within(
                &what,
                RECOVERY_BOUND,
                c.lock(&support::unique("alarm-after")),
            )
            .await
        {
            match r {
                Ok(g) => {
                    checks
                        .within("release() after the clear", RELEASE_BOUND, g.release())
                        .await;
                }
                Err(e) => checks.fail(format!("{what} failed: {e}")),
            }
        }
    }

    checks.assert_none_failed();
}
