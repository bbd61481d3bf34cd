//! Benchmark of mqlock-cache against the real broker and Redis, in one run:
//! hit path vs raw moka, miss path vs raw Redis GET+SET, stampede loader count.
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
    let bus = InvalidationBus::connect(amqp, BusConfig::default())
        .await
        .expect("bus");
    let store = RedisStore::connect(redis, RedisConfig::default())
        .await
        .expect("redis");
    LockedCache::new(
        Arc::new(locks),
        ns,
        CacheConfig {
            near: Some(NearConfig {
                max_capacity: 100_000,
                max_ttl: Duration::from_secs(300),
            }),
            redis: Some(store),
            invalidations: Some(bus),
            ..CacheConfig::default()
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
