//! `cargo bench -p mqlock --bench scale`: what holding many locks on one client costs (issue 11).
//!
//! In one run, with one client: the p50/p99 of an uncontended acquisition (`lock` of a free
//! lock whose queues exist; released between acquisitions, not timed) while the client holds
//! 10 locks, then while it holds `MQLOCK_SCALE_LOCKS` (default 10 000, spread over several
//! connections: `src/pool.rs`), then again with 10 held (to see drift); and the broker's memory
//! per held lock (`mem_used` of the management API, before and after, divided by the locks
//! added). Prints the client's broker connections too.
//!
//! The client has a 90 s lease (60 s heartbeat, 180 s `net_ticktime`) and a 30 s idle expiry,
//! so that every held lock renews and touches its registers every 15 s: with the defaults
//! (a renewal every 2.5 s) 10 000 locks cost about 3 cores of client CPU (README, "The lease's
//! cost"), more than a 2-core machine has. `MQLOCK_SCALE_DEFAULT_LEASE=1` keeps the defaults.
//!
//! Needs the main broker of `scripts/services.sh up` with its management API (127.0.0.1:15672,
//! guest/guest). `MQLOCK_BENCH_ITERS` (default 300) sets the acquisitions timed per phase.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use mqlock::{ClientConfig, LockClient, LockGuard};

fn env(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.into())
}

/// A GET of the management API (HTTP/1.0: the body ends with the connection).
fn management(path: &str) -> String {
    let mut s = std::net::TcpStream::connect("127.0.0.1:15672")
        .expect("the management API (127.0.0.1:15672) does not answer: scripts/services.sh up");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    // guest:guest
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: Basic Z3Vlc3Q6Z3Vlc3Q=\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

/// The broker node's memory use in bytes (`mem_used`; the broker refreshes it every 5 s).
fn broker_memory() -> i64 {
    let body = management("/api/nodes?columns=mem_used");
    let key = "\"mem_used\":";
    let at = body.find(key).expect("mem_used in /api/nodes") + key.len();
    body[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap()
}

/// The channels of the broker connections named `name`, one entry per connection.
fn connection_channels(name: &str) -> Vec<u64> {
    let body = management("/api/connections?columns=channels,client_properties.connection_name");
    // Each connection object: {"channels":N,"client_properties":{"connection_name":"…"}}.
    body.split("{\"channels\":")
        .skip(1)
        .filter(|c| c.contains(&format!("\"connection_name\":\"{name}\"")))
        .filter_map(|c| {
            c.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .ok()
        })
        .collect()
}

fn percentile(v: &[Duration], q: f64) -> Duration {
    v[((v.len() as f64 * q) as usize).min(v.len() - 1)]
}

/// Times `iters` uncontended acquisitions, rotating over 8 lock names (released between).
async fn timed_acquisitions(client: &LockClient, run: &str, iters: usize) -> (Duration, Duration) {
    let mut v = Vec::with_capacity(iters);
    for i in 0..iters {
        let name = format!("{run}-probe-{}", i % 8);
        let t = Instant::now();
        let g = client.lock(&name).await.unwrap();
        v.push(t.elapsed());
        g.release().await.unwrap();
    }
    v.sort();
    (percentile(&v, 0.5), percentile(&v, 0.99))
}

async fn hold(client: &LockClient, run: &str, range: std::ops::Range<usize>) -> Vec<LockGuard> {
    futures_util::stream::iter(range)
        .map(|n| {
            let client = client.clone();
            let name = format!("{run}-held-{n}");
            async move { client.lock(&name).await.unwrap() }
        })
        .buffer_unordered(64)
        .collect()
        .await
}

#[tokio::main]
async fn main() {
    let url = env("MQLOCK_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
    let many: usize = env("MQLOCK_SCALE_LOCKS", "10000").parse().unwrap();
    let iters: usize = env("MQLOCK_BENCH_ITERS", "300").parse().unwrap();
    let run = format!("bench-scale-{}", std::process::id());
    let mut config = ClientConfig {
        connection_name: Some(run.clone()),
        ..ClientConfig::default()
    };
    if env("MQLOCK_SCALE_DEFAULT_LEASE", "0") != "1" {
        config.heartbeat = Duration::from_secs(60);
        config.net_ticktime = Duration::from_secs(180);
        config.idle_expiry = Duration::from_secs(30);
        config.renew_interval = Duration::from_secs(15);
    }
    let client = LockClient::connect(&url, config).await.unwrap();
    let settle = Duration::from_secs(6);

    // Warm up the probe names (their queues exist from then on) and the spare channel.
    timed_acquisitions(&client, &run, 16).await;
    let mut held = hold(&client, &run, 0..10).await;
    let (p50_few, p99_few) = timed_acquisitions(&client, &run, iters).await;
    tokio::time::sleep(settle).await;
    let memory_before = broker_memory();

    let t = Instant::now();
    held.extend(hold(&client, &run, 10..many).await);
    let acquired = t.elapsed();
    tokio::time::sleep(settle).await;
    let memory_after = broker_memory();
    let channels = connection_channels(&run);
    let (p50_many, p99_many) = timed_acquisitions(&client, &run, iters).await;
    assert!(held.iter().all(LockGuard::is_held), "a held lock was lost");

    let rest = held.split_off(10);
    let t = Instant::now();
    futures_util::stream::iter(rest)
        .map(|g| async move { g.release().await.unwrap() })
        .buffer_unordered(64)
        .collect::<Vec<()>>()
        .await;
    let released = t.elapsed();
    let (p50_again, p99_again) = timed_acquisitions(&client, &run, iters).await;

    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!("| acquisition (uncontended)        | p50 µs   | p99 µs   |");
    println!("|----------------------------------|----------|----------|");
    println!(
        "| 10 held                          | {:>8.1} | {:>8.1} |",
        us(p50_few),
        us(p99_few)
    );
    println!(
        "| {many:>6} held                      | {:>8.1} | {:>8.1} |",
        us(p50_many),
        us(p99_many)
    );
    println!(
        "| 10 held again (after releasing)  | {:>8.1} | {:>8.1} |",
        us(p50_again),
        us(p99_again)
    );
    println!(
        "p50 ratio {many} held / 10 held: {:.2} (against the later 10-held run: {:.2})",
        p50_many.as_secs_f64() / p50_few.as_secs_f64(),
        p50_many.as_secs_f64() / p50_again.as_secs_f64()
    );
    println!(
        "acquired {} more locks in {acquired:?} ({:.0}/s), released them in {released:?}",
        many - 10,
        (many - 10) as f64 / acquired.as_secs_f64()
    );
    println!(
        "connections: {} with {:?} channels (a probe channel each)",
        channels.len(),
        channels
    );
    println!(
        "broker memory: {:.1} MiB before, {:.1} MiB with {many} held: {:.1} KiB per held lock",
        memory_before as f64 / 1048576.0,
        memory_after as f64 / 1048576.0,
        (memory_after - memory_before) as f64 / (many - 10) as f64 / 1024.0
    );
    for g in held {
        g.release().await.unwrap();
    }
    client.close().await;
}
