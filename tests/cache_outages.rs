//! mqlock-cache when Redis or the broker is unreachable or goes away mid-use: typed errors
//! within bounded time, never a hang; near tiers cleared and resubscribed after a lost link.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mqlock::{ClientConfig, LockClient, MemoryLocker};
use mqlock_cache::{
    BusConfig, CacheConfig, Error, InvalidationBus, LockedCache, NearConfig, RedisConfig,
    RedisStore,
};

fn namespace() -> String {
    support::unique("co").replace('-', "_")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A throwaway redis-server, killed on drop.
struct ThrowawayRedis {
    child: std::process::Child,
    port: u16,
}

impl ThrowawayRedis {
    fn start(port: u16) -> Self {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
                "--bind",
                "127.0.0.1",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/services.sh installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server on port {port} did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        ThrowawayRedis { child, port }
    }
    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for ThrowawayRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP proxy to the broker that can cut every connection and refuse new ones, then come back
/// on the same port: the broker "goes down" for the clients behind it only.
struct BrokerProxy {
    port: u16,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl BrokerProxy {
    async fn start(port: u16) -> Self {
        // The previous listener on this port is dropped by an aborted task: retry briefly.
        let mut tries = 0;
        let listener = loop {
            match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
                Ok(l) => break l,
                Err(e) if tries < 100 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Err(e) => panic!("cannot bind the broker proxy on {port}: {e}"),
            }
        };
        let task = tokio::spawn(async move {
            let mut pipes = tokio::task::JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                pipes.spawn(async move {
                    let mut upstream = tokio::net::TcpStream::connect("127.0.0.1:5672")
                        .await
                        .unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                });
            }
            // Dropping the JoinSet (when this task is aborted) closes every piped connection.
        });
        BrokerProxy {
            port,
            task: Some(task),
        }
    }
    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
    fn cut(&mut self) {
        self.task.take().unwrap().abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_services_are_typed_errors_not_hangs() {
    support::init_tracing();
    let started = Instant::now();
    let redis = RedisStore::connect("redis://127.0.0.1:1/", RedisConfig::default()).await;
    assert!(matches!(redis, Err(Error::Redis { .. })), "{redis:?}");
    let bus =
        InvalidationBus::connect("amqp://guest:guest@127.0.0.1:1/%2f", BusConfig::default()).await;
    assert!(matches!(bus, Err(Error::Bus { .. })), "{bus:?}");
    let locks = LockClient::connect(
        "amqp://guest:guest@127.0.0.1:1/%2f",
        ClientConfig::default(),
    )
    .await;
    assert!(
        matches!(locks, Err(mqlock::Error::Unreachable { .. })),
        "{locks:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    // A two-tier cache without a bus is refused rather than silently incoherent.
    let store = RedisStore::connect(&support::redis_url(), RedisConfig::default())
        .await
        .unwrap();
    let no_bus = LockedCache::<u32>::new(
        Arc::new(MemoryLocker::new()),
        "x",
        CacheConfig {
            near: Some(NearConfig {
                max_capacity: 10,
                max_ttl: Duration::from_secs(1),
            }),
            redis: Some(store),
            ..CacheConfig::default()
        },
    );
    assert!(matches!(no_bus, Err(Error::Config(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_going_down_mid_use_gives_typed_errors_then_recovers() {
    support::init_tracing();
    let port = free_port();
    let mut server = ThrowawayRedis::start(port);
    let amqp = support::amqp_url();
    let locks = LockClient::connect(&amqp, ClientConfig::default())
        .await
        .unwrap();
    let bus = InvalidationBus::connect(&amqp, BusConfig::default())
        .await
        .unwrap();
    let config = RedisConfig::default();
    let store = RedisStore::connect(&server.url(), config).await.unwrap();
    let ns = namespace();
    let cache: LockedCache<String> = LockedCache::new(
        Arc::new(locks.clone()),
        ns.as_str(),
        CacheConfig {
            near: Some(NearConfig {
                max_capacity: 100,
                max_ttl: Duration::from_secs(60),
            }),
            redis: Some(store),
            invalidations: Some(bus),
            lock_timeout: Duration::from_secs(10),
            lock_keep: Some(Duration::from_secs(30)),
            ..CacheConfig::default()
        },
    )
    .unwrap();
    cache.insert("hot", "cached".into()).await.unwrap();
    assert_eq!(cache.get("hot").await.unwrap().as_deref(), Some("cached"));

    server.child.kill().unwrap();
    server.child.wait().unwrap();

    // Policy: near hits are still served; anything that needs Redis is a typed error in bounded
    // time; loaders are not run (their value could be neither shared nor stored).
    assert_eq!(cache.get("hot").await.unwrap().as_deref(), Some("cached"));
    let t = Instant::now();
    assert!(matches!(cache.get("cold").await, Err(Error::Redis { .. })));
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let computed = cache
        .get_or_compute("cold", move || async move {
            r.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>("x".to_string())
        })
        .await;
    assert!(matches!(computed, Err(Error::Redis { .. })), "{computed:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    assert!(matches!(
        cache.insert("cold", "y".into()).await,
        Err(Error::Redis { .. })
    ));
    assert!(matches!(
        cache.update("hot", |_| "z".into()).await,
        Err(Error::Redis { .. })
    ));
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "errors took {:?}",
        t.elapsed()
    );
    // The failed mutations let go of the key's lock: another client gets it at once (it was
    // released, or kept by this node until someone asks, far below the idle limit).
    let probe = LockClient::connect(&amqp, ClientConfig::default())
        .await
        .unwrap();
    let asked = Instant::now();
    let g = probe
        .lock_timeout(
            &mqlock_cache::lock_name(&ns, "cold"),
            Duration::from_secs(5),
        )
        .await
        .expect("lock let go after the Redis error");
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "{:?}",
        asked.elapsed()
    );
    g.release().await.unwrap();
    probe.close().await;

    // Redis comes back on the same port: the store reconnects by itself.
    let _server = ThrowawayRedis::start(port);
    let deadline = Instant::now() + Duration::from_secs(20);
    let value = loop {
        match cache
            .get_or_compute("cold", || async {
                Ok::<_, std::io::Error>("after restart".to_string())
            })
            .await
        {
            Ok(v) => break v,
            Err(Error::Redis { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("did not recover: {e}"),
        }
    };
    assert_eq!(value, "after restart");
}

/// A cache node with its own lock client at `amqp_url`, a near tier, the shared Redis and its
/// invalidation `bus`.
async fn two_tier_node(
    amqp_url: &str,
    ns: &str,
    bus: InvalidationBus,
    lock_timeout: Duration,
) -> LockedCache<String> {
    let locks = LockClient::connect(amqp_url, ClientConfig::default())
        .await
        .unwrap();
    LockedCache::new(
        Arc::new(locks),
        ns,
        CacheConfig {
            near: Some(NearConfig {
                max_capacity: 100,
                max_ttl: Duration::from_secs(60),
            }),
            redis: Some(
                RedisStore::connect(&support::redis_url(), RedisConfig::default())
                    .await
                    .unwrap(),
            ),
            invalidations: Some(bus),
            lock_timeout,
            ..CacheConfig::default()
        },
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_link_lost_mid_use_clears_near_and_resubscribes() {
    support::init_tracing();
    let port = free_port();
    let mut proxy = BrokerProxy::start(port).await;
    let ns = namespace();
    // Node A talks to the broker directly; node B through the proxy.
    let a_bus = InvalidationBus::connect(&support::amqp_url(), BusConfig::default())
        .await
        .unwrap();
    let a = two_tier_node(
        &support::amqp_url(),
        &ns,
        a_bus,
        CacheConfig::default().lock_timeout,
    )
    .await;
    let b_bus = InvalidationBus::connect(&proxy.url(), BusConfig::default())
        .await
        .unwrap();
    let b = two_tier_node(&proxy.url(), &ns, b_bus.clone(), Duration::from_secs(5)).await;
    a.insert("k", "v1".into()).await.unwrap();
    assert_eq!(b.get("k").await.unwrap().as_deref(), Some("v1"));
    assert_eq!(b.near_get("k").await.as_deref(), Some("v1"));

    proxy.cut();
    // B notices the lost subscription, clears and bypasses its near tier.
    let deadline = Instant::now() + Duration::from_secs(15);
    while b_bus.is_subscribed() {
        assert!(Instant::now() < deadline, "B did not notice the lost link");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(b.near_get("k").await, None);
    assert!(!b.near_is_coherent());
    // A writes while B is cut off; B reads Redis, never its old near copy.
    a.insert("k", "v2".into()).await.unwrap();
    assert_eq!(b.get("k").await.unwrap().as_deref(), Some("v2"));
    // Locked operations on B fail with a typed error in bounded time.
    let t = Instant::now();
    let r = b.insert("k", "from b".into()).await;
    assert!(matches!(r, Err(Error::Lock(_))), "{r:?}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );

    // The broker is reachable again: B resubscribes and its near tier works and stays coherent.
    let _proxy = BrokerProxy::start(port).await;
    assert!(
        b_bus.wait_subscribed(Duration::from_secs(20)).await,
        "B did not resubscribe"
    );
    assert!(b_bus.subscriptions() >= 2);
    assert!(b.near_is_coherent());
    assert_eq!(b.get("k").await.unwrap().as_deref(), Some("v2"));
    assert_eq!(b.near_get("k").await.as_deref(), Some("v2"));
    a.insert("k", "v3".into()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(1);
    while b.near_get("k").await.as_deref() == Some("v2") {
        assert!(
            Instant::now() < deadline,
            "B missed an invalidation after resubscribing"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(b.get("k").await.unwrap().as_deref(), Some("v3"));
}
