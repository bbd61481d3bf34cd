//! mqlock-cache against the real broker and Redis: cluster-wide single-flight, exact
//! read-modify-write, invalidations, the in-flight-load race, failing loaders, and key locks
//! kept between one node's mutations (`CacheConfig::lock_keep`).
//!
//! The nodes keep their key locks for `LONG_KEEP` (far above the default): a node that waited
//! for another's kept lock until its idle limit, instead of having it released when it asked,
//! would show as a wait of half a minute.

mod support;

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mqlock::{ClientConfig, LockClient};
use mqlock_cache::{
    BusConfig, CacheConfig, CacheValue, Error, InvalidationBus, LockedCache, NearConfig,
    RedisConfig, RedisStore, lock_name,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

struct Node<V: CacheValue> {
    cache: LockedCache<V>,
    bus: InvalidationBus,
    locks: LockClient,
}

/// How long the test nodes keep an unused key lock.
const LONG_KEEP: Duration = Duration::from_secs(30);

/// A two-tier node with its own broker connections and Redis connection, keeping its key locks
/// for [`LONG_KEEP`].
async fn node<V: CacheValue>(ns: &str) -> Node<V> {
    node_keeping(ns, Some(LONG_KEEP)).await
}

/// A two-tier node that keeps its key locks for `lock_keep` (`None`: releases them).
async fn node_keeping<V: CacheValue>(ns: &str, lock_keep: Option<Duration>) -> Node<V> {
    let amqp = support::amqp_url();
    let locks = LockClient::connect(&amqp, ClientConfig::default())
        .await
        .expect("lock client");
    let bus = InvalidationBus::connect(&amqp, BusConfig::default())
        .await
        .expect("bus");
    let store = RedisStore::connect(&support::redis_url(), RedisConfig::default())
        .await
        .expect("redis");
    let cache = LockedCache::new(
        Arc::new(locks.clone()),
        ns,
        CacheConfig {
            near: Some(NearConfig {
                max_capacity: 10_000,
                max_ttl: Duration::from_secs(60),
            }),
            redis: Some(store),
            invalidations: Some(bus.clone()),
            lock_timeout: Duration::from_secs(60),
            lock_keep,
            ..CacheConfig::default()
        },
    )
    .expect("cache");
    Node { cache, bus, locks }
}

fn namespace() -> String {
    support::unique("ct").replace('-', "_")
}

async fn redis_conn() -> redis::aio::MultiplexedConnection {
    redis::Client::open(support::redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stampede_four_nodes_fifty_callers_loader_runs_once() {
    support::init_tracing();
    let ns = namespace();
    let key = "cold key";
    let counter = format!("{ns}:loads");
    const CALLERS: usize = 50;
    const LOADER_MS: u64 = 500;

    // Node 4 is a separate process.
    let mut child = tokio::process::Command::new(support::fixture_bin(
        "mqlock-cache",
        support::Fixture::Example("cache_node"),
    ))
    .args([
        &support::amqp_url(),
        &support::redis_url(),
        &ns,
        key,
        &CALLERS.to_string(),
        &LOADER_MS.to_string(),
        &counter,
    ])
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .kill_on_drop(true)
    .spawn()
    .expect("spawn cache_node");
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(out.next_line().await.unwrap().as_deref(), Some("ready"));

    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(node::<String>(&ns).await);
    }
    let client = redis::Client::open(support::redis_url()).unwrap();
    let go = Arc::new(tokio::sync::Barrier::new(3 * CALLERS + 1));
    let mut tasks = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        for _ in 0..CALLERS {
            let (cache, go, client, counter) =
                (n.cache.clone(), go.clone(), client.clone(), counter.clone());
            tasks.push(tokio::spawn(async move {
                go.wait().await;
                cache
                    .get_or_compute(key, move || async move {
                        tokio::time::sleep(Duration::from_millis(LOADER_MS)).await;
                        let mut c = client.get_multiplexed_async_connection().await?;
                        let _: u64 = redis::cmd("INCR").arg(&counter).query_async(&mut c).await?;
                        Ok::<_, redis::RedisError>(format!("computed by in-process node {i}"))
                    })
                    .await
            }));
        }
    }
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"go\n").await.unwrap();
    go.wait().await;
    let started = Instant::now();

    let mut values = std::collections::BTreeSet::new();
    for t in tasks {
        values.insert(t.await.unwrap().expect("every caller gets the value"));
    }
    let mut child_values = Vec::new();
    let mut child_done = None;
    while let Some(line) = out.next_line().await.unwrap() {
        if let Some(v) = line.strip_prefix("value ") {
            child_values.push(v.to_owned());
        } else if let Some(n) = line.strip_prefix("done ") {
            child_done = Some(n.parse::<usize>().unwrap());
        }
    }
    assert!(
        child.wait().await.unwrap().success(),
        "the node process failed"
    );
    let elapsed = started.elapsed();

    assert_eq!(
        child_done,
        Some(CALLERS),
        "every caller of the process node got a value"
    );
    values.extend(child_values);
    assert_eq!(
        values.len(),
        1,
        "all 200 callers got the same value: {values:?}"
    );
    let loads: u64 = redis::cmd("GET")
        .arg(&counter)
        .query_async(&mut redis_conn().await)
        .await
        .unwrap();
    assert_eq!(loads, 1, "the loader ran exactly once in the cluster");
    // Each node's flight took the key's lock in turn and kept it after finding the value: the
    // next node's wait (registered before that grant) must end it at once, not at the idle
    // limit (5 s in the process node, 30 s here).
    assert!(
        elapsed < Duration::from_millis(LOADER_MS) + Duration::from_secs(4),
        "a flight waited for a kept lock's idle limit: {elapsed:?}"
    );
    eprintln!(
        "stampede: 4 nodes x {CALLERS} callers served in {elapsed:?}, loader runs {loads}, value {values:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn update_from_four_nodes_gives_the_exact_total() {
    support::init_tracing();
    let ns = namespace();
    let key = "counter";
    const PER_NODE: u64 = 200;
    let mut nodes = Vec::new();
    for _ in 0..4 {
        nodes.push(node::<u64>(&ns).await);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for n in &nodes {
        for _ in 0..PER_NODE {
            let cache = n.cache.clone();
            tasks.push(tokio::spawn(async move {
                cache.update(key, |v| v.unwrap_or(0) + 1).await
            }));
        }
    }
    for t in tasks {
        t.await.unwrap().expect("update");
    }
    let elapsed = started.elapsed();
    let raw: Vec<u8> = redis::cmd("GET")
        .arg(format!("{ns}:v:{key}"))
        .query_async(&mut redis_conn().await)
        .await
        .unwrap();
    let total: u64 = mqlock_cache::decode(key, &raw).unwrap();
    assert_eq!(total, 4 * PER_NODE, "no increment lost");
    for n in &nodes {
        assert_eq!(
            n.cache.get(key).await.unwrap(),
            Some(4 * PER_NODE),
            "every node reads the final value"
        );
    }
    eprintln!(
        "update: {} increments in {elapsed:?} ({:?} each)",
        4 * PER_NODE,
        elapsed / (4 * PER_NODE as u32)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalidation_on_one_node_reaches_the_others_quickly() {
    support::init_tracing();
    let ns = namespace();
    let mut nodes = Vec::new();
    for _ in 0..4 {
        nodes.push(node::<String>(&ns).await);
    }
    nodes[0].cache.insert("k", "v1".into()).await.unwrap();
    for n in &nodes {
        assert_eq!(n.cache.get("k").await.unwrap().as_deref(), Some("v1"));
        // The insert returns once its invalidation is confirmed, not delivered (and, with the
        // key's lock kept, without a release's round trip): arriving after a node's read began,
        // it makes the node drop what it read (a miss, never a stale copy). Read again.
        support::wait_until("near tier filled", Duration::from_secs(5), || async {
            n.cache.get("k").await.unwrap();
            n.cache.near_get("k").await.as_deref() == Some("v1")
        })
        .await;
    }
    let mut worst = Duration::ZERO;
    for round in 0..20 {
        let value = format!("v{}", round + 2);
        let writer = &nodes[round % 4];
        let sent = Instant::now();
        writer.cache.insert("k", value.clone()).await.unwrap();
        for n in &nodes {
            loop {
                match n.cache.near_get("k").await {
                    Some(v) if v == value => break,
                    None => break,
                    Some(_) => {
                        assert!(
                            sent.elapsed() < Duration::from_secs(1),
                            "stale near copy after 1 s"
                        );
                        tokio::time::sleep(Duration::from_micros(200)).await;
                    }
                }
            }
            assert_eq!(n.cache.get("k").await.unwrap(), Some(value.clone()));
        }
        worst = worst.max(sent.elapsed());
        // Refill every near tier for the next round.
        for n in &nodes {
            n.cache.get("k").await.unwrap();
        }
    }
    eprintln!("invalidation: worst insert→all nodes fresh {worst:?}");
}

/// A TCP proxy to Redis that delays every answer by `delay`: it widens the window between a
/// node reading a value and storing it in its near tier, so the race is hit every time.
async fn slow_redis_proxy(delay: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream_addr = support::redis_url()
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_owned();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let upstream = tokio::net::TcpStream::connect(&upstream_addr)
                .await
                .unwrap();
            let (mut cr, mut cw) = client.into_split();
            let (mut ur, mut uw) = upstream.into_split();
            tokio::spawn(async move { tokio::io::copy(&mut cr, &mut uw).await });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match ur.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    tokio::time::sleep(delay).await;
                    if cw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("redis://127.0.0.1:{port}/")
}

/// The race moka alone loses: node B reads the old value from Redis, an invalidation for the
/// key reaches B, and only then does B's read land in its near tier. B must never serve it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_load_in_flight_during_an_invalidation_is_never_served() {
    support::init_tracing();
    let ns = namespace();
    let a = node::<u64>(&ns).await;
    let amqp = support::amqp_url();
    let b_bus = InvalidationBus::connect(&amqp, BusConfig::default())
        .await
        .unwrap();
    let slow = RedisStore::connect(
        &slow_redis_proxy(Duration::from_millis(150)).await,
        RedisConfig::default(),
    )
    .await
    .unwrap();
    let b: LockedCache<u64> = LockedCache::new(
        Arc::new(a.locks.clone()),
        ns.as_str(),
        CacheConfig {
            near: Some(NearConfig {
                max_capacity: 100,
                max_ttl: Duration::from_secs(60),
            }),
            redis: Some(slow),
            invalidations: Some(b_bus),
            ..CacheConfig::default()
        },
    )
    .unwrap();
    a.cache.insert("k", 0).await.unwrap();
    for i in 0..5u64 {
        // B's near tier misses (the last insert invalidated it): its read goes to Redis and
        // reads `i`, but the answer takes 150 ms to come back.
        assert_eq!(b.near_get("k").await, None);
        let reader = {
            let b = b.clone();
            tokio::spawn(async move { b.get("k").await })
        };
        tokio::time::sleep(Duration::from_millis(30)).await;
        // Meanwhile A writes `i + 1`; its invalidation reaches B long before B's read lands.
        a.cache.insert("k", i + 1).await.unwrap();
        assert_eq!(
            reader.await.unwrap().unwrap(),
            Some(i),
            "B's read was in flight before the write"
        );
        let near = b.near_get("k").await;
        assert_eq!(
            near, None,
            "round {i}: B kept the value loaded before the invalidation"
        );
        assert_eq!(b.get("k").await.unwrap(), Some(i + 1));
        // And the fresh value is cached normally once nothing races it.
        assert_eq!(b.near_get("k").await, Some(i + 1));
        a.cache.insert("k", i + 1).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn failing_flight(panic: bool) {
    let ns = namespace();
    let key = "flaky";
    let a = node::<String>(&ns).await;
    let b = node::<String>(&ns).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for n in [&a, &b] {
        for _ in 0..10 {
            let (cache, runs) = (n.cache.clone(), runs.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_compute(key, move || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        if panic {
                            panic!("loader exploded");
                        }
                        Err::<String, _>(std::io::Error::other("backend said no"))
                    })
                    .await
            }));
        }
    }
    for t in tasks {
        match t.await.unwrap() {
            Err(Error::Loader { source, .. }) => {
                assert!(!panic && source.to_string().contains("backend said no"))
            }
            Err(Error::LoaderPanicked { message, .. }) => {
                assert!(panic && message.contains("loader exploded"))
            }
            Err(Error::LoadFailedElsewhere { message, .. }) => {
                assert!(
                    message.contains(if panic {
                        "loader exploded"
                    } else {
                        "backend said no"
                    }),
                    "{message}"
                )
            }
            other => panic!("expected the loader's failure, got {other:?}"),
        }
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "one loader for the whole wave"
    );
    // The lock is not stuck (probed from a third connection): free, or kept by the node that
    // ran the loader until someone asks, which this wait does.
    let probe = LockClient::connect(&support::amqp_url(), ClientConfig::default())
        .await
        .unwrap();
    let asked = Instant::now();
    let g = probe
        .lock_timeout(&lock_name(&ns, key), Duration::from_secs(20))
        .await
        .expect("the key's lock is released when another client asks");
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "the kept lock was released at its idle limit, not when asked: {:?}",
        asked.elapsed()
    );
    g.release().await.unwrap();
    assert_eq!(
        a.cache.get(key).await.unwrap(),
        None,
        "the failure was not cached"
    );
    // The next call retries.
    let v = b
        .cache
        .get_or_compute(key, || async {
            Ok::<_, std::io::Error>("recovered".to_string())
        })
        .await
        .unwrap();
    assert_eq!(v, "recovered");
    assert_eq!(
        a.cache.get(key).await.unwrap().as_deref(),
        Some("recovered")
    );
    drop((a.bus, b.bus, a.locks, b.locks));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn loader_error_reaches_all_waiters_and_is_not_cached() {
    support::init_tracing();
    failing_flight(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn loader_panic_reaches_all_waiters_and_releases_the_lock() {
    support::init_tracing();
    failing_flight(true).await;
}

/// The fence token Redis keeps for `key` (the highest that wrote it).
async fn fence_of(ns: &str, key: &str) -> u64 {
    let raw: String = redis::cmd("GET")
        .arg(format!("{ns}:t:{key}"))
        .query_async(&mut redis_conn().await)
        .await
        .unwrap();
    raw.parse().unwrap()
}

/// `update`'s function that appends `entry` to the key's history.
fn append(entry: String) -> impl FnOnce(Option<Vec<String>>) -> Vec<String> {
    move |old| {
        let mut v = old.unwrap_or_default();
        v.push(entry);
        v
    }
}

/// Issue 12: a hot key updated 100 times by node A keeps A's lock between updates (one grant,
/// one fencing token, every write accepted); then node B updates it: B is granted when it asks,
/// far below the idle limit, and sees A's last value; A's next update, asked while B holds the
/// lock, waits for B's and follows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hot_key_kept_by_one_node_goes_to_another_when_it_asks_and_in_order() {
    support::init_tracing();
    let ns = namespace();
    let key = "hot";
    let a = node::<Vec<String>>(&ns).await;
    let b = node::<Vec<String>>(&ns).await;

    let mut times = Vec::new();
    let mut a_token = None;
    for i in 1..=100 {
        let t = Instant::now();
        let v = a.cache.update(key, append(format!("a{i}"))).await.unwrap();
        times.push(t.elapsed());
        assert_eq!(v.len(), i);
        // Every write of the kept grant carries its token, and the fence accepts it again.
        let token = fence_of(&ns, key).await;
        assert_eq!(*a_token.get_or_insert(token), token, "update {i}");
    }
    let a_token = a_token.unwrap();
    assert_eq!(a.locks.kept_locks(), 1, "A keeps the key's lock");
    let first = times[0];
    times.sort();
    eprintln!(
        "hot key: A's first update {first:?}, then median {:?}, max {:?} (lock kept)",
        times[times.len() / 2],
        times[times.len() - 1]
    );

    // B asks: A gives the kept lock up at once.
    let asked = Instant::now();
    let seen = b
        .cache
        .update(key, |old| {
            let old = old.expect("A's value");
            assert_eq!(old.len(), 100, "B sees all of A's updates");
            assert_eq!(old.last().map(String::as_str), Some("a100"));
            append("b1".into())(Some(old))
        })
        .await
        .unwrap();
    let b_wait = asked.elapsed();
    eprintln!("hot key: B's update, behind A's kept lock, took {b_wait:?}");
    assert!(
        b_wait < Duration::from_secs(5),
        "B waited for A's idle limit ({LONG_KEEP:?}) rather than a hand-off: {b_wait:?}"
    );
    assert_eq!(seen.len(), 101);
    assert_eq!(a.locks.kept_locks(), 0, "A released the lock B asked for");
    let b_token = fence_of(&ns, key).await;
    assert!(
        b_token > a_token,
        "B's grant is a new one: {b_token} > {a_token}"
    );

    // B updates again, slowly, while A asks: A's update waits for B's and follows it.
    let (in_f, b_in_f) = tokio::sync::oneshot::channel();
    let slow_b = {
        let cache = b.cache.clone();
        tokio::spawn(async move {
            let v = cache
                .update(key, move |old| {
                    let _ = in_f.send(());
                    // Blocks one of the runtime's workers: B holds the lock meanwhile.
                    std::thread::sleep(Duration::from_millis(300));
                    append("b2".into())(old)
                })
                .await;
            (v, Instant::now())
        })
    };
    b_in_f.await.unwrap();
    let after_a = a.cache.update(key, append("a101".into())).await.unwrap();
    let a_done = Instant::now();
    let (after_b, b_done) = slow_b.await.unwrap();
    let after_b = after_b.unwrap();
    assert!(b_done <= a_done, "A's update ended before B's");
    assert_eq!(after_b.len(), 102);
    assert_eq!(
        after_a[100..].to_vec(),
        ["b1", "b2", "a101"],
        "A's update followed B's"
    );
    let expected: Vec<String> = (1..=100)
        .map(|i| format!("a{i}"))
        .chain(["b1".into(), "b2".into(), "a101".into()])
        .collect();
    assert_eq!(after_a, expected, "every update once, in order");
    assert!(fence_of(&ns, key).await > b_token);
    // Both nodes read the last value (B's near copy was invalidated by A's write).
    for n in [&a, &b] {
        support::wait_until(
            "the last value on both nodes",
            Duration::from_secs(5),
            || async { n.cache.get(key).await.unwrap().as_ref() == Some(&expected) },
        )
        .await;
    }
}

/// A node that mutates a key without pause keeps its lock only until another node asks: the
/// other node is served within a few of the busy node's updates, not when the busy node stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_busy_node_does_not_keep_a_key_from_a_node_that_asks() {
    support::init_tracing();
    let ns = namespace();
    let key = "busy";
    let a = node::<u64>(&ns).await;
    let b = node::<u64>(&ns).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let a_updates = Arc::new(AtomicUsize::new(0));
    // Four tasks of A update the key back to back (they queue in A's process, one lock).
    let mut busy = Vec::new();
    for _ in 0..4 {
        let (cache, stop, count) = (a.cache.clone(), stop.clone(), a_updates.clone());
        busy.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                cache.update(key, |v| v.unwrap_or(0) + 1).await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    support::wait_until("A busy on the key", Duration::from_secs(20), || async {
        a_updates.load(Ordering::SeqCst) >= 50
    })
    .await;
    let before = a_updates.load(Ordering::SeqCst);
    let asked = Instant::now();
    b.cache.update(key, |v| v.unwrap() + 1).await.unwrap();
    let b_wait = asked.elapsed();
    let during = a_updates.load(Ordering::SeqCst) - before;
    eprintln!("busy key: B served after {b_wait:?}, A updated {during} times meanwhile");
    assert!(
        busy.iter().all(|t| !t.is_finished()),
        "B was served only when A stopped"
    );
    assert!(
        b_wait < Duration::from_secs(5),
        "B waited {b_wait:?} behind a busy node"
    );
    // Once B's wait reached A, A's next use of the lock is its last before B: a few updates
    // in flight at most (generous for a loaded machine).
    assert!(during <= 10, "A updated {during} times while B waited");
    stop.store(true, Ordering::SeqCst);
    for t in busy {
        t.await.unwrap();
    }
    let total = a_updates.load(Ordering::SeqCst) as u64 + 1;
    assert_eq!(
        b.cache.update(key, |v| v.unwrap()).await.unwrap(),
        total,
        "no update lost"
    );
}

/// Fencing under kept locks: the fence accepts a grant's token again (the writes of one kept
/// grant; `a_hot_key_…`) but never a token below the highest that wrote the key. Two caches on
/// separate in-memory lockers stand for a holder whose lock was granted on without its
/// knowledge (a frozen node) and the node that got it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fence_refuses_a_write_with_an_older_token() {
    support::init_tracing();
    let ns = namespace();
    let key = "fenced";
    let redis_only = |locker: mqlock::MemoryLocker| {
        let ns = ns.clone();
        async move {
            let store = RedisStore::connect(&support::redis_url(), RedisConfig::default())
                .await
                .unwrap();
            LockedCache::<u64>::new(
                Arc::new(locker),
                ns,
                CacheConfig {
                    redis: Some(store),
                    ..CacheConfig::default()
                },
            )
            .unwrap()
        }
    };
    let (stale_locks, fresh_locks) = (mqlock::MemoryLocker::new(), mqlock::MemoryLocker::new());
    // The fresh node's locker has granted the key four times before: its next token is 5.
    for _ in 0..4 {
        drop(
            mqlock::Locker::lock(&fresh_locks, &lock_name(&ns, key))
                .await
                .unwrap(),
        );
    }
    let stale = redis_only(stale_locks).await;
    let fresh = redis_only(fresh_locks).await;
    stale.insert(key, 1).await.unwrap();
    fresh.insert(key, 5).await.unwrap();
    assert_eq!(fence_of(&ns, key).await, 5);
    let refused = stale.update(key, |v| v.unwrap() + 100).await;
    assert!(
        matches!(refused, Err(Error::Fenced { token: 2, .. })),
        "{refused:?}"
    );
    assert_eq!(fresh.get(key).await.unwrap(), Some(5), "nothing written");
    fresh.insert(key, 6).await.unwrap();
    assert_eq!(fresh.get(key).await.unwrap(), Some(6));
}
