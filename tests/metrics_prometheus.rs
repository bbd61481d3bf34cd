//! The Prometheus exposition against the real broker: scraped over HTTP from `mqlock exec
//! --metrics-addr` during a wait and a run, from `mqlock mount --metrics-addr` after known
//! grants, waits, losses and holds, and from `mqlock elect --metrics-addr` (the is-leader gauge);
//! and encoded from library clients after known grants, releases, losses and leaderships.

#[path = "fuse_common/mod.rs"]
mod common;
mod support;

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mqlock::{BreakOutcome, ClientConfig, LockClient, LossReason};
use prometheus_client::registry::Registry;

/// A port that was free a moment ago on 127.0.0.1.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP GET with a plain TcpStream: (status line, headers, body); `None` if nothing
/// listens yet.
fn http_get(port: u16, path: &str) -> Option<(String, String, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/plain\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("a complete response");
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    Some((status.to_string(), headers.to_string(), body.to_string()))
}

/// The value of the sample whose name and labels are exactly `series`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn value(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or_else(|| panic!("{series} missing from:\n{text}"))
}

/// Scrapes `port` every 20 ms until `ready` holds for the exposition, and returns it; panics
/// after `within` with `what` and the last exposition scraped.
fn scrape_until(port: u16, what: &str, within: Duration, ready: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + within;
    let mut last = String::new();
    loop {
        if let Some((status, _, body)) = http_get(port, "/metrics") {
            assert_eq!(status, "HTTP/1.1 200 OK");
            if ready(&body) {
                return body;
            }
            last = body;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}; last scrape:\n{last}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn exec_serves_metrics_during_the_wait_and_the_run() {
    let name = support::unique("metrics-exec");
    let url = support::amqp_url();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Another client holds the lock first.
    let other = rt
        .block_on(LockClient::connect(&url, ClientConfig::default()))
        .unwrap();
    let held = rt.block_on(other.lock(&name)).unwrap();

    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let exec = Command::new(support::mqlock_bin())
        .args(["exec", "--metrics-addr", &addr, &name, "--", "sleep", "2"])
        .env("MQLOCK_AMQP_URL", &url)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // During the wait: the request is counted, nothing granted or held.
    let end = Instant::now() + Duration::from_secs(20);
    let waiting = loop {
        assert!(Instant::now() < end, "no scrape showed the request");
        if let Some((status, headers, body)) = http_get(port, "/metrics") {
            assert_eq!(status, "HTTP/1.1 200 OK");
            assert!(
                headers
                    .to_ascii_lowercase()
                    .contains("content-type: text/plain; version=0.0.4"),
                "{headers}"
            );
            if sample(&body, "mqlock_requests_total") == Some(1.0) {
                break body;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // The exec's request started before this instant.
    let requested_by = Instant::now();
    assert_eq!(value(&waiting, "mqlock_grants_total"), 0.0);
    assert_eq!(value(&waiting, "mqlock_held_locks"), 0.0);
    assert_eq!(value(&waiting, "mqlock_wait_seconds_count"), 0.0);
    let (status, _, _) = http_get(port, "/other").unwrap();
    assert_eq!(status, "HTTP/1.1 404 Not Found");

    // The other client holds on for a known time after the request, then releases.
    let hold_after_request = Duration::from_millis(1500);
    std::thread::sleep(hold_after_request);
    rt.block_on(held.release()).unwrap();
    let held_for = requested_by.elapsed();
    assert!(held_for >= hold_after_request);

    // While CMD runs (2 s): granted once, held, one wait at least as long as the other hold.
    let end = Instant::now() + Duration::from_secs(10);
    let running = loop {
        assert!(Instant::now() < end, "no scrape showed the grant");
        let (_, _, body) = http_get(port, "/metrics").expect("the endpoint stays up");
        if sample(&body, "mqlock_grants_total") == Some(1.0) {
            break body;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(value(&running, "mqlock_requests_total"), 1.0);
    assert_eq!(value(&running, "mqlock_held_locks"), 1.0);
    assert_eq!(value(&running, "mqlock_wait_seconds_count"), 1.0);
    let wait_sum = value(&running, "mqlock_wait_seconds_sum");
    assert!(
        wait_sum >= hold_after_request.as_secs_f64(),
        "waited {wait_sum} s, the other client held {hold_after_request:?} after the request"
    );
    assert!(wait_sum < 15.0, "waited {wait_sum} s");
    // The one wait is above 1 s: not in the 1 s bucket, in +Inf.
    assert_eq!(value(&running, "mqlock_wait_seconds_bucket{le=\"1\"}"), 0.0);
    assert_eq!(
        value(&running, "mqlock_wait_seconds_bucket{le=\"+Inf\"}"),
        1.0
    );
    assert_eq!(value(&running, "mqlock_releases_total"), 0.0);
    assert_eq!(value(&running, "mqlock_hold_seconds_count"), 0.0);
    assert_eq!(
        value(
            &running,
            "mqlock_losses_total{reason=\"consumer_cancelled\"}"
        ),
        0.0
    );
    assert_eq!(value(&running, "mqlock_timeouts_total"), 0.0);
    assert!(value(&running, "mqlock_lease_renewals_total") >= 1.0);

    let out = exec.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    rt.block_on(other.close());
}

#[test]
fn exec_refuses_a_metrics_address_it_cannot_bind() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = Command::new(support::mqlock_bin())
        .args([
            "exec",
            "--metrics-addr",
            &addr,
            &support::unique("metrics-bind"),
            "--",
            "true",
        ])
        .env("MQLOCK_AMQP_URL", support::amqp_url())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(122));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--metrics-addr") && stderr.contains(&addr),
        "{stderr}"
    );
}

fn exposition(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, registry).unwrap();
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_releases_and_losses_are_exposed_by_reason() {
    support::init_tracing();
    let url = support::amqp_url();
    let client = LockClient::connect(&url, ClientConfig::default())
        .await
        .unwrap();
    let mut registry = Registry::default();
    mqlock::prometheus::register(&client, &mut registry);
    let text = exposition(&registry);
    assert_eq!(value(&text, "mqlock_grants_total"), 0.0);
    assert_eq!(value(&text, "mqlock_held_locks"), 0.0);

    let raw = lapin::Connection::connect(&url, Default::default())
        .await
        .unwrap();
    let raw = raw.create_channel().await.unwrap();

    // R released grants, K lost ones (the lock queue deleted under the holder), one broken, one
    // held.
    const RELEASED: u64 = 3;
    const LOST: u64 = 2;
    let mut hold_total = Duration::ZERO;
    for _ in 0..RELEASED {
        let started = Instant::now();
        let g = client.lock(&support::unique("metrics-lib")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        g.release().await.unwrap();
        hold_total += started.elapsed();
    }
    for _ in 0..LOST {
        let name = support::unique("metrics-loss");
        let g = client.lock(&name).await.unwrap();
        let queues = mqlock::name::queue_names(&ClientConfig::default().prefix, &name).unwrap();
        raw.queue_delete(queues.lock.as_str().into(), Default::default())
            .await
            .unwrap();
        let reason = tokio::time::timeout(Duration::from_secs(10), g.lost())
            .await
            .expect("the holder learns of the deleted queue");
        assert_eq!(reason, LossReason::ConsumerCancelled);
        assert!(g.release().await.is_err());
    }
    // One more lost to `mqlock break` (another client's break-glass release): "broken".
    let name = support::unique("metrics-break");
    let g = client.lock(&name).await.unwrap();
    let operator = LockClient::connect(&url, ClientConfig::default())
        .await
        .unwrap();
    operator.break_lock(&name).await.unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(10), g.lost())
        .await
        .expect("the holder acts on the break");
    assert!(
        matches!(reason, LossReason::Broken { .. }),
        "lost by {reason}"
    );
    assert!(g.release().await.is_err());
    operator.close().await;
    const BROKEN: u64 = 1;

    let g = client.lock(&support::unique("metrics-held")).await.unwrap();

    let grants = RELEASED + LOST + BROKEN + 1;
    let text = exposition(&registry);
    assert_eq!(value(&text, "mqlock_requests_total"), grants as f64);
    assert_eq!(value(&text, "mqlock_grants_total"), grants as f64);
    assert_eq!(value(&text, "mqlock_releases_total"), RELEASED as f64);
    assert_eq!(
        value(&text, "mqlock_losses_total{reason=\"consumer_cancelled\"}"),
        LOST as f64
    );
    assert_eq!(
        value(&text, "mqlock_losses_total{reason=\"broken\"}"),
        BROKEN as f64
    );
    for reason in mqlock::LOSS_REASONS
        .iter()
        .filter(|r| !["consumer_cancelled", "broken"].contains(*r))
    {
        let series = format!("mqlock_losses_total{{reason=\"{reason}\"}}");
        assert_eq!(value(&text, &series), 0.0, "{series}");
    }
    assert_eq!(value(&text, "mqlock_held_locks"), 1.0);
    assert_eq!(value(&text, "mqlock_wait_seconds_count"), grants as f64);
    assert_eq!(
        value(&text, "mqlock_wait_seconds_bucket{le=\"+Inf\"}"),
        grants as f64
    );
    assert_eq!(
        value(&text, "mqlock_hold_seconds_count"),
        (RELEASED + LOST + BROKEN) as f64
    );
    let hold_sum = value(&text, "mqlock_hold_seconds_sum");
    assert!(
        hold_sum >= 0.05 * RELEASED as f64 && hold_sum <= hold_total.as_secs_f64() + 10.0,
        "hold sum {hold_sum} s"
    );
    assert!(value(&text, "mqlock_lease_renewals_total") >= grants as f64);
    // The snapshot agrees with the exposition.
    let snapshot = client.metrics();
    assert_eq!(snapshot.losses, LOST + BROKEN);
    assert!(snapshot.losses_by_reason.contains(&("broken", BROKEN)));
    assert!(
        snapshot
            .losses_by_reason
            .contains(&("consumer_cancelled", LOST))
    );
    assert_eq!(snapshot.hold_seconds.count, RELEASED + LOST + BROKEN);

    g.release().await.unwrap();
    let text = exposition(&registry);
    assert_eq!(value(&text, "mqlock_held_locks"), 0.0);
    assert_eq!(value(&text, "mqlock_hold_seconds_count"), grants as f64);
    assert_eq!(value(&text, "mqlock_releases_total"), (RELEASED + 1) as f64);
    client.close().await;
}

/// `mqlock mount --metrics-addr`, scraped over HTTP after a known history: uncontended grants,
/// waits behind another client's hold of a known length, holds broken by `break_lock`, and one
/// lock still held. Counts, the wait histogram's count, sum and buckets, losses by reason and held
/// locks must match it.
#[test]
fn mount_serves_grants_waits_losses_and_held_locks_over_http() {
    const FAST: usize = 3;
    const WAITS: usize = 2;
    const BROKEN: usize = 2;
    /// How long the other client keeps holding after the mount's request was counted.
    const HOLD: Duration = Duration::from_millis(1200);
    let test_start = Instant::now();
    let backing = tempfile::tempdir().unwrap();
    let fast: Vec<String> = (0..FAST).map(|i| format!("fast{i}")).collect();
    let waits: Vec<String> = (0..WAITS).map(|i| format!("wait{i}")).collect();
    let broken: Vec<String> = (0..BROKEN).map(|i| format!("broken{i}")).collect();
    // Created in the backing directory, so that each write-open through the mount takes exactly
    // one lock (no create, no truncate).
    for f in fast
        .iter()
        .chain(&waits)
        .chain(&broken)
        .chain(["held".to_string()].iter())
    {
        std::fs::write(backing.path().join(f), b"x").unwrap();
    }
    let prefix = support::unique("metrics-mount");
    let lock = |f: &str| format!("fs:{prefix}/{f}");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    // Without lock caching: each last close releases, so the history is one grant and one
    // release per open (caching would keep the locks parked, still held).
    let node = common::Node::start(
        backing.path(),
        &prefix,
        &["--no-lock-caching", "--metrics-addr", &addr],
    );
    let scrape = || http_get(port, "/metrics").expect("the endpoint is up").2;
    let open_for_writing = |f: &str| -> (std::fs::File, Duration) {
        let t = Instant::now();
        let h = OpenOptions::new()
            .write(true)
            .open(node.path(f))
            .unwrap_or_else(|e| panic!("open {f}: {e}"));
        (h, t.elapsed())
    };
    let text = scrape();
    assert_eq!(value(&text, "mqlock_requests_total"), 0.0);
    assert_eq!(value(&text, "mqlock_held_locks"), 0.0);

    // How long each open took: each grant's wait is within its open.
    let mut uncontended_opens = Vec::new();
    let mut contended_opens = Vec::new();
    for f in &fast {
        let (mut h, took) = open_for_writing(f);
        uncontended_opens.push(took);
        h.write_all(b"y").unwrap();
        // The last close releases the lock.
        drop(h);
    }

    let rt = tokio::runtime::Runtime::new().unwrap();
    let other = rt
        .block_on(LockClient::connect(
            &support::amqp_url(),
            ClientConfig::default(),
        ))
        .unwrap();
    for (i, f) in waits.iter().enumerate() {
        let g = rt.block_on(other.lock(&lock(f))).unwrap();
        let path = node.path(f);
        let opener = std::thread::spawn(move || {
            let t = Instant::now();
            let h = OpenOptions::new().write(true).open(&path).unwrap();
            (h, t.elapsed())
        });
        // The mount has asked for the lock (its request is counted) before the hold's HOLD.
        let requested = (FAST + i + 1) as f64;
        scrape_until(port, "the mount's request", Duration::from_secs(20), |t| {
            sample(t, "mqlock_requests_total") == Some(requested)
        });
        std::thread::sleep(HOLD);
        rt.block_on(g.release()).unwrap();
        let (h, took) = opener.join().unwrap();
        assert!(took >= HOLD, "the open waited {took:?}");
        contended_opens.push(took);
        drop(h);
    }

    let mut broken_handles = Vec::new();
    for (i, f) in broken.iter().enumerate() {
        let (h, took) = open_for_writing(f);
        uncontended_opens.push(took);
        let outcome = rt.block_on(other.break_lock(&lock(f))).unwrap();
        assert!(
            matches!(outcome, BreakOutcome::Requested { .. }),
            "{outcome:?}"
        );
        let lost = (i + 1) as f64;
        scrape_until(port, "the broken hold", Duration::from_secs(20), |t| {
            sample(t, "mqlock_losses_total{reason=\"broken\"}") == Some(lost)
        });
        broken_handles.push(h);
    }
    // A write through a handle whose lock was broken is refused.
    assert!(broken_handles[0].write_all(b"too late").is_err());
    drop(broken_handles);

    let (held, took) = open_for_writing("held");
    uncontended_opens.push(took);

    // Every grant, release and hold end has been counted once the closes went through.
    let grants = (FAST + WAITS + BROKEN + 1) as f64;
    let released = (FAST + WAITS) as f64;
    let ended = (FAST + WAITS + BROKEN) as f64;
    let text = scrape_until(port, "the final counts", Duration::from_secs(20), |t| {
        sample(t, "mqlock_grants_total") == Some(grants)
            && sample(t, "mqlock_releases_total") == Some(released)
            && sample(t, "mqlock_hold_seconds_count") == Some(ended)
            && sample(t, "mqlock_held_locks") == Some(1.0)
    });
    assert_eq!(value(&text, "mqlock_requests_total"), grants);
    assert_eq!(value(&text, "mqlock_timeouts_total"), 0.0);
    assert_eq!(value(&text, "mqlock_busy_total"), 0.0);
    assert_eq!(
        value(&text, "mqlock_losses_total{reason=\"broken\"}"),
        BROKEN as f64
    );
    for reason in mqlock::LOSS_REASONS.iter().filter(|r| **r != "broken") {
        let series = format!("mqlock_losses_total{{reason=\"{reason}\"}}");
        assert_eq!(value(&text, &series), 0.0, "{series}");
    }
    // The wait histogram: one wait per grant; the contended ones lasted at least HOLD, and no
    // wait outlasted its open.
    assert_eq!(value(&text, "mqlock_wait_seconds_count"), grants);
    assert_eq!(
        value(&text, "mqlock_wait_seconds_bucket{le=\"+Inf\"}"),
        grants
    );
    let wait_sum = value(&text, "mqlock_wait_seconds_sum");
    let at_least = WAITS as f64 * HOLD.as_secs_f64();
    let at_most: f64 = uncontended_opens
        .iter()
        .chain(&contended_opens)
        .map(Duration::as_secs_f64)
        .sum();
    assert!(
        at_least <= wait_sum && wait_sum <= at_most + 1e-3,
        "wait sum {wait_sum} s, expected within [{at_least}, {at_most}]"
    );
    // The contended waits (above 1 s) are not in the 1 s bucket; every uncontended one that
    // opened within 1 s is.
    let within_1s = value(&text, "mqlock_wait_seconds_bucket{le=\"1\"}");
    let quick = uncontended_opens
        .iter()
        .filter(|d| **d <= Duration::from_secs(1))
        .count() as f64;
    assert!(
        quick <= within_1s && within_1s <= grants - WAITS as f64,
        "{within_1s} waits within 1 s; {quick} uncontended opens took no longer"
    );
    let hold_sum = value(&text, "mqlock_hold_seconds_sum");
    assert!(
        hold_sum > 0.0 && hold_sum <= ended * test_start.elapsed().as_secs_f64(),
        "hold sum {hold_sum} s"
    );

    // Closed: nothing held, one more release.
    drop(held);
    scrape_until(port, "the last release", Duration::from_secs(20), |t| {
        sample(t, "mqlock_held_locks") == Some(0.0)
            && sample(t, "mqlock_releases_total") == Some(released + 1.0)
            && sample(t, "mqlock_hold_seconds_count") == Some(ended + 1.0)
    });
    rt.block_on(other.close());
    drop(node);
}

/// `mqlock elect --metrics-addr`: `mqlock_is_leader{election="NAME"}` reads 0 while it stands
/// by, 1 once elected, and 0 again as soon as the leadership is lost, while its command is still
/// shutting down.
#[test]
fn elect_serves_the_is_leader_gauge_over_http() {
    let name = support::unique("metrics-elect");
    let series = format!("mqlock_is_leader{{election=\"{name}\"}}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let other = rt
        .block_on(LockClient::connect(
            &support::amqp_url(),
            ClientConfig::default(),
        ))
        .unwrap();
    let leading = rt.block_on(other.campaign(&name, "other")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("got-term");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let elect = Command::new(support::mqlock_bin())
        .args([
            "elect",
            "--metrics-addr",
            &addr,
            "--value",
            "cli",
            &name,
            "--",
            "sh",
            "-c",
            // On SIGTERM, takes 2 s to stop: the scrapes after the loss happen meanwhile.
            r#"trap 'echo TERM > "$0"; sleep 2; exit 0' TERM
while :; do sleep 0.1; done"#,
        ])
        .arg(&marker)
        .env("MQLOCK_AMQP_URL", support::amqp_url())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // Standing by behind the other leader: 0.
    let standing = scrape_until(port, "the campaign", Duration::from_secs(20), |t| {
        sample(t, "mqlock_requests_total") == Some(1.0)
    });
    assert_eq!(value(&standing, &series), 0.0);
    assert_eq!(value(&standing, "mqlock_grants_total"), 0.0);
    assert!(
        standing.contains("# TYPE mqlock_is_leader gauge"),
        "{standing}"
    );

    // The other leader resigns: elected, 1.
    rt.block_on(leading.resign()).unwrap();
    let elected = scrape_until(port, "the election", Duration::from_secs(20), |t| {
        sample(t, &series) == Some(1.0)
    });
    assert_eq!(value(&elected, "mqlock_grants_total"), 1.0);
    assert_eq!(value(&elected, "mqlock_held_locks"), 1.0);

    // Broken: the leadership is lost; 0 while mqlock still waits for its command.
    let outcome = rt
        .block_on(other.break_lock(&mqlock::election_lock_name(&name)))
        .unwrap();
    assert!(
        matches!(outcome, BreakOutcome::Requested { .. }),
        "{outcome:?}"
    );
    let lost = scrape_until(port, "the loss", Duration::from_secs(20), |t| {
        sample(t, &series) == Some(0.0)
            && sample(t, "mqlock_losses_total{reason=\"broken\"}") == Some(1.0)
    });
    assert_eq!(value(&lost, "mqlock_grants_total"), 1.0);
    let out = elect.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(123), "{err}");
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap().trim(),
        "TERM",
        "{err}"
    );
    rt.block_on(other.close());
}

/// The library hook: a registered client's `Leadership` sets `mqlock_is_leader` while it leads
/// and clears it when resigned, lost or dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leadership_sets_is_leader_and_clears_it_on_resign_loss_and_drop() {
    support::init_tracing();
    let url = support::amqp_url();
    let a = LockClient::connect(&url, ClientConfig::default())
        .await
        .unwrap();
    let b = LockClient::connect(&url, ClientConfig::default())
        .await
        .unwrap();
    let (mut ra, mut rb) = (Registry::default(), Registry::default());
    mqlock::prometheus::register(&a, &mut ra);
    mqlock::prometheus::register(&b, &mut rb);
    let name = support::unique("metrics-leader");
    let series = format!("mqlock_is_leader{{election=\"{name}\"}}");
    let leads = |r: &Registry| sample(&exposition(r), &series);
    // No campaign yet: no series.
    assert_eq!(leads(&ra), None);

    let la = a.campaign(&name, "a").await.unwrap();
    assert_eq!(leads(&ra), Some(1.0));
    // B stands by: listed, 0.
    let standby = {
        let (b, name) = (b.clone(), name.clone());
        tokio::spawn(async move { b.campaign(&name, "b").await })
    };
    support::wait_until("B stands by", Duration::from_secs(10), || {
        std::future::ready(leads(&rb) == Some(0.0))
    })
    .await;
    // A resigns: 0 at once; B is elected: 1.
    la.resign().await.unwrap();
    assert_eq!(leads(&ra), Some(0.0));
    let lb = tokio::time::timeout(Duration::from_secs(10), standby)
        .await
        .expect("B is elected")
        .unwrap()
        .unwrap();
    assert_eq!(leads(&rb), Some(1.0));
    assert_eq!(b.metrics().leading, [(name.clone(), true)]);

    // B's leadership is broken: 0 while the Leadership still exists.
    a.break_lock(&mqlock::election_lock_name(&name))
        .await
        .unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(10), lb.lost())
        .await
        .expect("B acts on the break");
    assert!(matches!(reason, LossReason::Broken { .. }), "{reason}");
    assert_eq!(leads(&rb), Some(0.0));
    assert_eq!(b.metrics().leading, [(name.clone(), false)]);
    drop(lb);

    // A leads again; dropping the leadership (a resign in the background) clears it.
    let la = a.campaign(&name, "a").await.unwrap();
    assert_eq!(leads(&ra), Some(1.0));
    assert_eq!(leads(&rb), Some(0.0));
    drop(la);
    assert_eq!(leads(&ra), Some(0.0));
    a.close().await;
    b.close().await;
}
