//! One cache node in its own process, for the cluster stampede test (and for trying it by hand).
//!
//! `cache_node AMQP_URL REDIS_URL NAMESPACE KEY CALLERS LOADER_MS COUNTER_KEY`
//!
//! Connects its own lock client, invalidation bus and Redis store, prints `ready`, waits for a
//! line on stdin (so several processes start together), then runs CALLERS concurrent
//! `get_or_compute(KEY)` calls whose loader sleeps LOADER_MS and counts its runs with
//! `INCR COUNTER_KEY`. Prints one `value <v>` line per distinct value received and
//! `done <n>` with the number of successful callers; exits non-zero on any error.

use std::sync::Arc;
use std::time::Duration;

use mqlock::{ClientConfig, LockClient};
use mqlock_cache::{
    BusConfig, CacheConfig, InvalidationBus, LockedCache, NearConfig, RedisConfig, RedisStore,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [amqp, redis_url, namespace, key, callers, loader_ms, counter] = args.as_slice() else {
        return Err(
            "usage: cache_node AMQP_URL REDIS_URL NAMESPACE KEY CALLERS LOADER_MS COUNTER_KEY"
                .into(),
        );
    };
    let callers: usize = callers.parse()?;
    let loader_ms: u64 = loader_ms.parse()?;

    let locks = LockClient::connect(amqp, ClientConfig::default()).await?;
    let bus = InvalidationBus::connect(amqp, BusConfig::default()).await?;
    let store = RedisStore::connect(redis_url, RedisConfig::default()).await?;
    let cache: LockedCache<String> = LockedCache::new(
        Arc::new(locks),
        namespace.as_str(),
        CacheConfig {
            near: Some(NearConfig {
                max_capacity: 1000,
                max_ttl: Duration::from_secs(60),
            }),
            redis: Some(store),
            invalidations: Some(bus),
            ..CacheConfig::default()
        },
    )?;
    let counter_client = redis::Client::open(redis_url.as_str())?;

    println!("ready");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;

    let mut tasks = Vec::new();
    for _ in 0..callers {
        let cache = cache.clone();
        let key = key.clone();
        let counter = counter.clone();
        let counter_client = counter_client.clone();
        tasks.push(tokio::spawn(async move {
            cache
                .get_or_compute(&key, move || async move {
                    tokio::time::sleep(Duration::from_millis(loader_ms)).await;
                    let mut conn = counter_client.get_multiplexed_async_connection().await?;
                    let _: u64 = redis::cmd("INCR")
                        .arg(&counter)
                        .query_async(&mut conn)
                        .await?;
                    Ok::<_, redis::RedisError>(format!(
                        "computed by process {}",
                        std::process::id()
                    ))
                })
                .await
        }));
    }
    let mut values = std::collections::BTreeSet::new();
    let mut done = 0;
    for t in tasks {
        values.insert(t.await??);
        done += 1;
    }
    for v in values {
        println!("value {v}");
    }
    println!("done {done}");
    Ok(())
}
