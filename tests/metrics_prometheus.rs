//! The Prometheus exposition against the real broker: scraped over HTTP from `mqlock exec
//! --metrics-addr` during a wait and a run, and encoded from a library client after known
//! grants, releases and losses.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mqlock::{ClientConfig, LockClient, LossReason};
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
