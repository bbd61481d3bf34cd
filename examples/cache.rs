//! Several cache nodes in one process, each with its own broker and Redis connections:
//! a stampede on a cold key is computed once, and an update on one node reaches every node.
//!
//! `scripts/services.sh up && cargo run --example cache`
//! (`MQLOCK_AMQP_URL` / `REDIS_URL` override the endpoints).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mqlock::{ClientConfig, LockClient};
use mqlock_cache::{
    BusConfig, CacheConfig, InvalidationBus, LockedCache, NearConfig, RedisConfig, RedisStore,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let amqp = std::env::var("MQLOCK_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let redis = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
    let namespace = format!("example_{}", std::process::id());

    let mut nodes = Vec::new();
    for _ in 0..4 {
        let locks = LockClient::connect(&amqp, ClientConfig::default()).await?;
        let bus = InvalidationBus::connect(&amqp, BusConfig::default()).await?;
        let store = RedisStore::connect(&redis, RedisConfig::default()).await?;
        let cache: LockedCache<String> = LockedCache::new(
            Arc::new(locks),
            namespace.as_str(),
            CacheConfig {
                near: Some(NearConfig {
                    max_capacity: 1_000,
                    max_ttl: Duration::from_secs(30),
                }),
                redis: Some(store),
                invalidations: Some(bus),
                ..CacheConfig::default()
            },
        )?;
        nodes.push(cache);
    }

    // 4 nodes x 25 callers ask for the same cold key at once.
    let loads = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut callers = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        for _ in 0..25 {
            let (node, loads) = (node.clone(), loads.clone());
            callers.push(tokio::spawn(async move {
                node.get_or_compute("report", move || async move {
                    loads.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(300)).await; // the expensive part
                    Ok::<_, std::io::Error>(format!("report computed on node {i}"))
                })
                .await
            }));
        }
    }
    let mut values = std::collections::BTreeSet::new();
    for c in callers {
        values.insert(c.await??);
    }
    println!(
        "stampede: 100 callers on 4 nodes served in {:?}; loader ran {} time(s); values: {values:?}",
        started.elapsed(),
        loads.load(Ordering::SeqCst)
    );

    // Every node now has the report in its near tier. Node 0 changes it...
    for node in &nodes {
        assert!(node.near_get("report").await.is_some());
    }
    let sent = Instant::now();
    nodes[0]
        .update("report", |old| {
            format!("{} (revised)", old.unwrap_or_default())
        })
        .await?;
    // ...and the invalidation drops the old copy everywhere.
    for (i, node) in nodes.iter().enumerate().skip(1) {
        while node.near_get("report").await.as_deref() == Some(values.first().unwrap().as_str()) {
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
        println!(
            "node {i} dropped its old copy {:?} after the update; it now reads {:?}",
            sent.elapsed(),
            node.get("report").await?.unwrap_or_default()
        );
    }
    Ok(())
}
