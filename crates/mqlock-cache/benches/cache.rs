//! Benchmark of mqlock-cache against the real broker and Redis, in one run:
//! hit path vs raw moka, miss path vs raw Redis GET+SET, `update` of a hot key from one node
//! (key locks kept and not) vs the same read-modify-write on raw Redis, stampede loader count.
//!
//! `cargo bench -p mqlock-cache --bench cache` (services from `scripts/services.sh up`;
//! `MQLOCK_AMQP_URL` / `REDIS_URL` override the endpoints). Prints medians and ratios.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mqlock::{ClientConfig, LockClient};
use mqlock_cache::{
    BusConfig, CacheConfig, InvalidationBus, LockedCache, NearConfig, RedisConfig, RedisStore,
};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

async fn node(amqp: &str, redis: &str, ns: &str) -> LockedCache<String> {
    let locks = LockClient::connect(amqp, ClientConfig::default())
        .await
        .expect("broker");
    configured(
        Arc::new(locks),
        amqp,
        redis,
        ns,
        true,
        CacheConfig::default(),
    )
    .await
}

/// A cache on `locks`: two-tier (with its own bus) or Redis only, with `config`'s other fields.
async fn configured<V: mqlock_cache::CacheValue>(
    locks: Arc<LockClient>,
    amqp: &str,
    redis: &str,
    ns: &str,
    two_tier: bool,
    config: CacheConfig,
) -> LockedCache<V> {
    let store = RedisStore::connect(redis, RedisConfig::default())
        .await
        .expect("redis");
    let (near, invalidations) = if two_tier {
        let bus = InvalidationBus::connect(amqp, BusConfig::default())
            .await
            .expect("bus");
        let near = NearConfig {
            max_capacity: 100_000,
            max_ttl: Duration::from_secs(300),
        };
        (Some(near), Some(bus))
    } else {
        (None, None)
    };
    LockedCache::new(
        locks,
        ns,
        CacheConfig {
            near,
            redis: Some(store),
            invalidations,
            ..config
        },
    )
    .expect("cache")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let amqp = std::env::var("MQLOCK_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let redis_url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
    let ns = format!(
        "bench_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    );
    let cache = node(&amqp, &redis_url, &ns).await;

    // Hit path: per-op time of batches of gets on a warm key; median over batches.
    const BATCH: u32 = 2_000;
    const BATCHES: usize = 101;
    let raw: moka::future::Cache<String, String> = moka::future::Cache::builder()
        .max_capacity(100_000)
        .time_to_live(Duration::from_secs(300))
        .build();
    let value = "x".repeat(64);
    raw.insert("hot".into(), value.clone()).await;
    cache.insert("hot", value.clone()).await.unwrap();
    assert!(cache.near_get("hot").await.is_some());
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..BATCHES {
        // Interleaved so both see the same machine load.
        let t = Instant::now();
        for _ in 0..BATCH {
            std::hint::black_box(raw.get("hot").await.unwrap());
        }
        theirs.push(t.elapsed() / BATCH);
        let t = Instant::now();
        for _ in 0..BATCH {
            std::hint::black_box(cache.get("hot").await.unwrap().unwrap());
        }
        ours.push(t.elapsed() / BATCH);
    }
    let (hit, moka_hit) = (median(ours), median(theirs));
    println!(
        "hit path: LockedCache::get {hit:?} vs raw moka get {moka_hit:?} (ratio {:.2})",
        hit.as_secs_f64() / moka_hit.as_secs_f64()
    );

    // Miss path: get_or_compute of a fresh key (lock, re-check, trivial loader, fenced SET,
    // publish, release) vs raw GET + SET of a fresh key.
    const MISSES: usize = 301;
    let mut conn = redis::Client::open(redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for i in 0..MISSES {
        let key = format!("{ns}:raw:{i}");
        let t = Instant::now();
        let got: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(got.is_none());
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg(&value)
            .query_async(&mut conn)
            .await
            .unwrap();
        theirs.push(t.elapsed());
        let v = value.clone();
        let t = Instant::now();
        cache
            .get_or_compute(&format!("miss{i}"), move || async move {
                Ok::<_, std::io::Error>(v)
            })
            .await
            .unwrap();
        ours.push(t.elapsed());
    }
    let (miss, raw_miss) = (median(ours), median(theirs));
    println!(
        "miss path: get_or_compute {miss:?} vs raw Redis GET+SET {raw_miss:?} (ratio {:.1})",
        miss.as_secs_f64() / raw_miss.as_secs_f64()
    );

    // Hot key: `update` (+1) of one key, again and again from one node, vs the same
    // read-modify-write on raw Redis (GET, then SET of the new value). The cache's key lock is
    // kept between updates (the default) or released after each (`lock_keep: None`); Redis
    // tier alone (lock, GET, fenced SET) and two-tier (plus the confirmed invalidation publish
    // and the near tier). Interleaved, one sample of each per round; medians.
    const ROUNDS: usize = 501;
    const WARM_UP: usize = 20;
    let locks = Arc::new(
        LockClient::connect(&amqp, ClientConfig::default())
            .await
            .expect("broker"),
    );
    let kept = CacheConfig::default();
    let plain = CacheConfig {
        lock_keep: None,
        ..CacheConfig::default()
    };
    let mut variants: Vec<(&str, LockedCache<u64>, Vec<Duration>)> = Vec::new();
    for (label, two_tier, config) in [
        ("Redis tier, lock kept", false, kept.clone()),
        ("Redis tier, lock not kept", false, plain.clone()),
        ("two-tier, lock kept", true, kept),
        ("two-tier, lock not kept", true, plain),
    ] {
        let ns = format!("{ns}_hot{}", variants.len());
        let cache = configured(locks.clone(), &amqp, &redis_url, &ns, two_tier, config).await;
        variants.push((label, cache, Vec::new()));
    }
    let raw_key = format!("{ns}:rawhot");
    let mut raw_times = Vec::new();
    // The two-tier cache's own cost floor: the raw update, then the confirmed publish of an
    // invalidation on the same exchange (for a namespace no cache has: every bus drops it).
    let (amqp_conn, _) = mqlock::open_connection(&amqp, &ClientConfig::default())
        .await
        .expect("broker");
    let publisher = amqp_conn.create_channel().await.unwrap();
    publisher
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .unwrap();
    let invalidation = format!(r#"{{"o":0,"n":"{ns}_nobody","k":"hot"}}"#).into_bytes();
    let mut raw_publish_times = Vec::new();
    for round in 0..WARM_UP + ROUNDS {
        let t = Instant::now();
        let old: Option<u64> = redis::cmd("GET")
            .arg(&raw_key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let _: () = redis::cmd("SET")
            .arg(&raw_key)
            .arg(old.unwrap_or(0) + 1)
            .query_async(&mut conn)
            .await
            .unwrap();
        let raw = t.elapsed();
        let confirm = publisher
            .basic_publish(
                BusConfig::default().exchange.as_str().into(),
                "".into(),
                lapin::options::BasicPublishOptions::default(),
                &invalidation,
                lapin::BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
        let raw_publish = t.elapsed();
        for (_, cache, times) in variants.iter_mut() {
            let t = Instant::now();
            let v = cache.update("hot", |v| v.unwrap_or(0) + 1).await.unwrap();
            let took = t.elapsed();
            assert_eq!(v, round as u64 + 1);
            if round >= WARM_UP {
                times.push(took);
            }
        }
        if round >= WARM_UP {
            raw_times.push(raw);
            raw_publish_times.push(raw_publish);
        }
    }
    let raw_update = median(raw_times);
    let raw_publish = median(raw_publish_times);
    println!("hot-key update, one node, median of {ROUNDS}: raw Redis GET+SET {raw_update:?}");
    println!(
        "  raw Redis GET+SET, then a confirmed publish on the bus's exchange: {raw_publish:?}"
    );
    let mut kept_ratio = f64::NAN;
    for (label, _, times) in variants {
        let m = median(times);
        let ratio = m.as_secs_f64() / raw_update.as_secs_f64();
        if label == "Redis tier, lock kept" {
            kept_ratio = ratio;
        }
        let floor = if label.starts_with("two-tier") {
            format!(
                "; {:.2} x GET+SET+publish",
                m.as_secs_f64() / raw_publish.as_secs_f64()
            )
        } else {
            String::new()
        };
        println!("  LockedCache::update, {label}: {m:?} (ratio {ratio:.2}{floor})");
    }
    println!(
        "  target (issue 12): Redis tier, lock kept <= 1.5 x raw: {}",
        if kept_ratio <= 1.5 { "met" } else { "NOT met" }
    );
    println!(
        "  locks kept by the bench's client now: {}",
        locks.kept_locks()
    );

    // Stampede: 4 nodes (own connections) x 50 callers on a cold key, 200 ms loader.
    let mut nodes = vec![cache];
    for _ in 0..3 {
        nodes.push(node(&amqp, &redis_url, &ns).await);
    }
    for round in 0..3 {
        let runs = Arc::new(AtomicUsize::new(0));
        let key = format!("stampede{round}");
        let t = Instant::now();
        let mut tasks = Vec::new();
        for n in &nodes {
            for _ in 0..50 {
                let (n, runs, key) = (n.clone(), runs.clone(), key.clone());
                tasks.push(tokio::spawn(async move {
                    n.get_or_compute(&key, move || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        Ok::<_, std::io::Error>("v".to_string())
                    })
                    .await
                    .unwrap()
                }));
            }
        }
        for t in tasks {
            t.await.unwrap();
        }
        println!(
            "stampede round {round}: 4 nodes x 50 callers, loader runs {}, all served in {:?} (loader 200 ms)",
            runs.load(Ordering::SeqCst),
            t.elapsed()
        );
    }
}
