//! `cargo bench -p mqlock`: mqlock's own measurements, in one run, on loopback.
//!
//! Prints p50/p99 of: the raw AMQP publish→deliver hop; mqlock's uncontended lock+release
//! cycle; and its contended hand-off (release → next holder granted) with 2, 8 and 32 waiters,
//! with ratios against the hop and the count of FIFO violations; `lock()` of a never-used name
//! against a lock used before, with the broker's floor for a new durable queue. Two "broker floor" rows show
//! what single active consumer itself costs with no fencing at all (a bare consume→close cycle
//! and a bare close→next-consumer hand-off), so mqlock's own overhead can be read off; and the
//! lease's cost of holding.
//!
//! The anchors (Redis, PostgreSQL, etcd) are measured by `crates/mqlock-bench`
//! (`scripts/bench.sh`), which keeps their clients out of this crate's build.
//!
//! Needs the broker of `scripts/services.sh up`. `MQLOCK_BENCH_ITERS` scales the run.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use mqlock::{ClientConfig, LockClient};

fn env(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.into())
}

#[derive(Clone, Copy)]
struct Stats {
    p50: Duration,
    p99: Duration,
    n: usize,
}

fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    Stats {
        p50: at(0.5),
        p99: at(0.99),
        n: v.len(),
    }
}

fn row(name: &str, s: Stats) {
    println!(
        "| {name:<44} | {:>9.1} | {:>9.1} | {:>6} |",
        s.p50.as_secs_f64() * 1e6,
        s.p99.as_secs_f64() * 1e6,
        s.n
    );
}

async fn amqp_hop(url: &str, iters: usize) -> Stats {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap();
    let pubc = conn.create_channel().await.unwrap();
    let subc = conn.create_channel().await.unwrap();
    let q = pubc
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut consumer = subc
        .basic_consume(
            q.name().clone(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut v = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        pubc.basic_publish(
            "".into(),
            q.name().clone(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default(),
        )
        .await
        .unwrap();
        let d = consumer.next().await.unwrap().unwrap();
        v.push(t.elapsed());
        d.acker.ack(BasicAckOptions::default()).await.unwrap();
    }
    let _ = conn.close(200, "bye".into()).await;
    stats(v)
}

/// A consumer on its own channel, as a lock waiter registers.
async fn sac_register(
    conn: &Connection,
    queue: &str,
    tag: usize,
) -> (lapin::Channel, lapin::Consumer) {
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(2, Default::default()).await.unwrap();
    let consumer = ch
        .basic_consume(
            queue.into(),
            format!("bench-{tag}").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    (ch, consumer)
}

async fn sac_queue(conn: &Connection, name: &str) {
    let mut args = FieldTable::default();
    args.insert("x-single-active-consumer".into(), true.into());
    args.insert(
        "x-expires".into(),
        lapin::types::AMQPValue::LongLongInt(60_000),
    );
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(name.into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    ch.basic_publish(
        "".into(),
        name.into(),
        BasicPublishOptions::default(),
        b"",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let _ = ch.close(200, "bye".into()).await;
}

/// The broker's floor for a lock cycle on single active consumer, with no fencing and no
/// safety checks: open a channel, consume, receive the token, close the channel.
async fn bare_sac_cycle(url: &str, iters: usize) -> Stats {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap();
    let queue = format!("bench-bare-cycle-{}", std::process::id());
    sac_queue(&conn, &queue).await;
    let mut v = Vec::with_capacity(iters);
    for i in 0..iters {
        let t = Instant::now();
        let (ch, mut consumer) = sac_register(&conn, &queue, i).await;
        consumer.next().await.unwrap().unwrap();
        ch.close(200, "release".into()).await.unwrap();
        v.push(t.elapsed());
    }
    let _ = conn.close(200, "bye".into()).await;
    stats(v)
}

/// The broker's floor for a hand-off on single active consumer: the holder closes its channel,
/// the next consumer receives the token. Two participants take turns.
async fn bare_sac_handoff(url: &str, iters: usize) -> Stats {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap();
    let queue = format!("bench-bare-handoff-{}", std::process::id());
    sac_queue(&conn, &queue).await;
    let mut holder = sac_register(&conn, &queue, 0).await;
    holder.1.next().await.unwrap().unwrap();
    let mut waiter = sac_register(&conn, &queue, 1).await;
    let mut v = Vec::with_capacity(iters);
    for i in 0..iters {
        let t = Instant::now();
        let (closed, delivered) =
            futures_util::future::join(holder.0.close(200, "release".into()), async {
                let d = waiter.1.next().await;
                (d, t.elapsed())
            })
            .await;
        closed.unwrap();
        delivered.0.unwrap().unwrap();
        v.push(delivered.1);
        holder = std::mem::replace(&mut waiter, sac_register(&conn, &queue, i + 2).await);
    }
    let _ = conn.close(200, "bye".into()).await;
    stats(v)
}

/// `lock()` alone (the release is not timed): of a name never used before (`fresh`), or of one
/// lock used again and again. A short idle expiry lets the fresh names' queues go soon after.
async fn mqlock_acquisition(url: &str, iters: usize, fresh: bool) -> Stats {
    let c = LockClient::connect(
        url,
        ClientConfig {
            idle_expiry: Duration::from_secs(60),
            renew_interval: Duration::from_secs(30),
            ..ClientConfig::default()
        },
    )
    .await
    .unwrap();
    let run = format!("{}-{}", std::process::id(), fresh);
    let mut v = Vec::with_capacity(iters);
    for i in 0..iters {
        let name = if fresh {
            format!("bench-fresh-{run}-{i}")
        } else {
            format!("bench-again-{run}")
        };
        let t = Instant::now();
        let g = c.lock(&name).await.unwrap();
        v.push(t.elapsed());
        g.release().await.unwrap();
    }
    stats(v)
}

/// What the broker needs at least for a lock it has never seen that must remember a number
/// across a restart: declare a durable queue, and publish one persistent message to it with a
/// confirm (the broker writes it to disk first). A never-used mqlock lock does this and more
/// (three queues, a consume, its renewal).
async fn new_durable_queue_floor(url: &str, iters: usize) -> Stats {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-expires".into(),
        lapin::types::AMQPValue::LongLongInt(60_000),
    );
    let mut v = Vec::with_capacity(iters);
    for i in 0..iters {
        let queue = format!("bench-floor-new-{}-{i}", std::process::id());
        let t = Instant::now();
        ch.queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args.clone(),
        )
        .await
        .unwrap();
        ch.basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            b"1",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
        v.push(t.elapsed());
    }
    let _ = conn.close(200, "bye".into()).await;
    stats(v)
}

async fn mqlock_uncontended(url: &str, iters: usize) -> Stats {
    let c = LockClient::connect(url, ClientConfig::default())
        .await
        .unwrap();
    let name = format!("bench-uncontended-{}", std::process::id());
    let mut v = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        let g = c.lock(&name).await.unwrap();
        g.release().await.unwrap();
        v.push(t.elapsed());
    }
    stats(v)
}

/// What holding costs: `locks` locks held by one client for `hold`, with the default lease.
/// Returns confirmed renewals per held lock per second, and this process's CPU time per held
/// lock per second (user + system, from getrusage) above an idle client's in the same window.
async fn lease_cost(url: &str, locks: usize, hold: Duration) -> (f64, Duration) {
    fn cpu() -> Duration {
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `ru` is a valid, writable rusage.
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
        let t = |tv: libc::timeval| Duration::new(tv.tv_sec as u64, tv.tv_usec as u32 * 1000);
        t(ru.ru_utime) + t(ru.ru_stime)
    }
    let c = LockClient::connect(url, ClientConfig::default())
        .await
        .unwrap();
    // Baseline: the same window with the client connected and nothing held.
    let idle_start = cpu();
    tokio::time::sleep(hold).await;
    let idle = cpu() - idle_start;
    let mut guards = Vec::with_capacity(locks);
    for i in 0..locks {
        let name = format!("bench-lease-{i}-{}", std::process::id());
        guards.push(c.lock(&name).await.unwrap());
    }
    let before = c.metrics().renewals;
    let cpu_start = cpu();
    tokio::time::sleep(hold).await;
    let held_cpu = (cpu() - cpu_start).saturating_sub(idle);
    let renewed = c.metrics().renewals - before;
    for g in guards {
        g.release().await.unwrap();
    }
    let lock_seconds = locks as f64 * hold.as_secs_f64();
    (
        renewed as f64 / lock_seconds,
        held_cpu.div_f64(lock_seconds),
    )
}

/// `waiters` clients contend in a loop; the hand-off time is from the moment a holder starts
/// its release to the moment the next holder has its guard.
async fn mqlock_handoff(url: &str, waiters: usize, grants: usize) -> (Stats, usize) {
    let name = format!("bench-handoff-{waiters}-{}", std::process::id());
    let clients: Vec<LockClient> = futures_util::future::join_all(
        (0..waiters).map(|_| LockClient::connect(url, ClientConfig::default())),
    )
    .await
    .into_iter()
    .map(Result::unwrap)
    .collect();
    struct Shared {
        released_at: Option<Instant>,
        handoffs: Vec<Duration>,
        waiting_since: Vec<Option<Instant>>,
        fifo_violations: usize,
        grants: usize,
    }
    let shared = Arc::new(Mutex::new(Shared {
        released_at: None,
        handoffs: Vec::new(),
        waiting_since: vec![None; waiters],
        fifo_violations: 0,
        grants: 0,
    }));
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(id, c)| {
            let (shared, name) = (shared.clone(), name.clone());
            tokio::spawn(async move {
                loop {
                    let asked = Instant::now();
                    shared.lock().unwrap().waiting_since[id] = Some(asked);
                    let g = c.lock(&name).await.unwrap();
                    let granted = Instant::now();
                    {
                        let mut s = shared.lock().unwrap();
                        s.waiting_since[id] = None;
                        if let Some(r) = s.released_at.take() {
                            s.handoffs.push(granted - r);
                        }
                        // Someone who started waiting well before us (5 ms of slack for the
                        // registration to reach the broker) should have been served first.
                        if s.waiting_since
                            .iter()
                            .flatten()
                            .any(|w| *w + Duration::from_millis(5) < asked)
                        {
                            s.fifo_violations += 1;
                        }
                        s.grants += 1;
                        if s.grants >= grants {
                            return;
                        }
                        s.released_at = Some(Instant::now());
                    }
                    g.release().await.unwrap();
                }
            })
        })
        .collect();
    // The first task to reach the quota returns holding its guard (dropped = released); the
    // others are still waiting and are simply aborted.
    loop {
        if shared.lock().unwrap().grants >= grants {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for t in tasks {
        t.abort();
    }
    let s = shared.lock().unwrap();
    (stats(s.handoffs.clone()), s.fifo_violations)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let amqp = env("MQLOCK_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
    let iters: usize = env("MQLOCK_BENCH_ITERS", "2000").parse().unwrap();
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` probes
    }
    println!("mqlock bench: {iters} iterations per baseline, loopback");
    println!("(Redis, PostgreSQL and etcd anchors: scripts/bench.sh, crates/mqlock-bench)");
    println!(
        "| {:<44} | {:>9} | {:>9} | {:>6} |",
        "measurement", "p50 µs", "p99 µs", "n"
    );
    println!("|{:-<46}|{:-<11}|{:-<11}|{:-<8}|", "", "", "", "");
    let hop = amqp_hop(&amqp, iters).await;
    row("raw AMQP publish→deliver hop", hop);
    let floor_cycle = bare_sac_cycle(&amqp, iters / 2).await;
    row("broker floor: bare SAC consume→token→close", floor_cycle);
    let floor_handoff = bare_sac_handoff(&amqp, iters / 2).await;
    row(
        "broker floor: bare SAC hand-off (close→next)",
        floor_handoff,
    );
    let unc = mqlock_uncontended(&amqp, iters / 2).await;
    row("mqlock uncontended lock+release cycle", unc);
    let mut handoffs = Vec::new();
    for w in [2, 8, 32] {
        let (s, fifo) = mqlock_handoff(&amqp, w, iters / 2).await;
        row(
            &format!("mqlock hand-off, {w} waiters ({fifo} FIFO violations)"),
            s,
        );
        handoffs.push((w, s, fifo));
    }
    let again = mqlock_acquisition(&amqp, iters / 4, false).await;
    row("mqlock lock() of a lock used before", again);
    let fresh = mqlock_acquisition(&amqp, iters / 4, true).await;
    row("mqlock lock() of a never-used name", fresh);
    let new_floor = new_durable_queue_floor(&amqp, iters / 4).await;
    row("broker floor: new durable queue + fsynced msg", new_floor);
    let (renewals, cpu) = lease_cost(&amqp, 200, Duration::from_secs(10)).await;
    let r = |a: Stats, b: Stats| a.p50.as_secs_f64() / b.p50.as_secs_f64();
    println!();
    println!(
        "lease cost, 200 locks held 10 s (default 7.5 s lease): {renewals:.2} renewals per held lock per second (each a publish, confirm, delivery and ack), client CPU {:.1} µs per held lock per second",
        cpu.as_secs_f64() * 1e6
    );
    println!(
        "uncontended cycle p50 / raw AMQP hop p50 = {:.2}x (target <= 3x; the broker floor cycle alone is {:.2}x)",
        r(unc, hop),
        r(floor_cycle, hop)
    );
    println!(
        "never-used name p50 / lock used before p50 = {:.2}x (target <= 2x); the broker floor for a new durable queue with an fsynced message alone is {:.2}x the lock used before",
        r(fresh, again),
        r(new_floor, again)
    );
    println!(
        "uncontended cycle p50 / broker floor cycle p50 = {:.2}x; the floor itself is {:.2}x the hop",
        r(unc, floor_cycle),
        r(floor_cycle, hop)
    );
    println!(
        "broker floor hand-off p50 / raw AMQP hop p50 = {:.2}x",
        r(floor_handoff, hop)
    );
    for (w, s, fifo) in handoffs {
        println!(
            "hand-off p50 with {w} waiters / raw AMQP hop p50 = {:.2}x (target <= 2.5x), / broker floor hand-off = {:.2}x; FIFO violations: {fifo}",
            r(s, hop),
            r(s, floor_handoff)
        );
    }
}
