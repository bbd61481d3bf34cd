//! `mqlock-bench`: mqlock's lock cycle against its anchors, measured in one run on one machine.
//!
//! Each system does uncontended lock+unlock cycles on a connected client: a raw AMQP
//! publish→deliver hop (the unit of mqlock's latency targets), Redis `SET NX PX` + a scripted
//! compare-and-delete, PostgreSQL `pg_advisory_lock`/`pg_advisory_unlock`, etcd 3.4's lock
//! service through its native gRPC client (with a lease per lock, and with a session lease), and
//! mqlock on classic queues. With `--cluster`, mqlock on quorum queues on the 3-node RabbitMQ
//! cluster of `scripts/cluster.sh` is set against the 3-member etcd cluster of
//! `scripts/services.sh` (service `etcd-cluster`), with a quorum-queue hop on that cluster.
//!
//! After a warm-up, the iterations run in interleaved rounds (every system does a batch per
//! round, in a rotating order), so that the machine's noise hits every system alike. The output
//! is a markdown table of p50/p90/p99 with the ratios of each p50 to the hop's and to etcd's;
//! then the hand-off with two waiters (release → the other waiter has the lock) for mqlock and
//! etcd. `--plot` draws the cycle latencies' CDFs into a PNG.
//!
//! `scripts/bench.sh` starts the services and runs it.

mod handoff;
mod plot;
mod stats;
mod systems;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use clap::Parser;
use mqlock::QueueType;

use stats::{Stats, micros};
use systems::{Contender, Cycle, HopQueue};

/// Command line.
#[derive(Parser, Debug)]
#[command(
    version,
    about = "mqlock's lock cycle against a raw AMQP hop, Redis, PostgreSQL and etcd, in one run"
)]
struct Args {
    /// Measured cycles per system (after the warm-up).
    #[arg(long, default_value_t = 2000)]
    iterations: usize,
    /// Unmeasured cycles per system before the measurement.
    #[arg(long, default_value_t = 200)]
    warmup: usize,
    /// Rounds the iterations are spread over; each round runs a batch of every system, in an
    /// order rotated by one each round.
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Also measure mqlock on quorum queues on the 3-node RabbitMQ cluster (scripts/cluster.sh
    /// up) against the 3-member etcd cluster (service etcd-cluster).
    #[arg(long)]
    cluster: bool,
    /// Grants of each hand-off measurement (two waiters); 0 leaves the hand-off out.
    #[arg(long, default_value_t = 400)]
    handoff_grants: usize,
    /// How long a holder keeps the lock, after the other waiter has asked for it, before it
    /// releases (so that the request has reached the server), in milliseconds.
    #[arg(long, default_value_t = 5)]
    handoff_hold_ms: u64,
    /// Draw the CDF of every system's cycle latency into this PNG.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// The TrueType font of the plot's text.
    #[arg(
        long,
        default_value = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    )]
    font: PathBuf,
    /// The main RabbitMQ broker.
    #[arg(
        long,
        env = "MQLOCK_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    /// Redis.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379/")]
    redis_url: String,
    /// PostgreSQL.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://mqlock:mqlock@127.0.0.1:5432/mqlock"
    )]
    database_url: String,
    /// etcd (comma-separated endpoints).
    #[arg(long, env = "ETCD_ENDPOINTS", default_value = "http://127.0.0.1:2379")]
    etcd: String,
    /// The 3-member etcd cluster (with --cluster).
    #[arg(
        long,
        env = "ETCD_CLUSTER_ENDPOINTS",
        default_value = "http://127.0.0.1:2381,http://127.0.0.1:2382,http://127.0.0.1:2383"
    )]
    etcd_cluster: String,
    /// The RabbitMQ cluster's nodes (with --cluster; `scripts/cluster.sh urls`). mqlock connects
    /// to the first and fails over to the others; the quorum hop uses the first.
    #[arg(
        long,
        env = "MQLOCK_CLUSTER_URLS",
        default_value = "amqp://guest:guest@127.0.0.1:5681/%2f,amqp://guest:guest@127.0.0.1:5682/%2f,amqp://guest:guest@127.0.0.1:5683/%2f"
    )]
    cluster_urls: String,
    /// The RabbitMQ cluster's net_ticktime in seconds (scripts/cluster.sh configures 10).
    #[arg(long, env = "MQLOCK_CLUSTER_NET_TICKTIME", default_value_t = 10)]
    cluster_net_ticktime: u64,
}

/// Which comparison a system belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Group {
    /// One node of each system.
    Single,
    /// Three-node clusters.
    Cluster,
}

/// What a row is to the ratios.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// The raw AMQP hop on a classic queue: the `p50 / hop` denominator.
    Hop,
    /// etcd with a lease per lock: the first etcd denominator of its group.
    EtcdLease,
    /// etcd with a session lease: the second etcd denominator of its group.
    EtcdSession,
    /// Anything else.
    Other,
}

/// One system under measurement.
struct System {
    label: String,
    group: Group,
    role: Role,
    cycle: Cycle,
    samples: Vec<Duration>,
}

fn split(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

async fn etcd_version(endpoints: &[String]) -> String {
    match systems::etcd(endpoints).await {
        Ok(mut c) => c
            .status()
            .await
            .map(|s| s.version().to_owned())
            .unwrap_or_else(|e| format!("? ({e})")),
        Err(e) => format!("? ({e})"),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.iterations > 0 && args.rounds > 0,
        "--iterations and --rounds must be positive"
    );
    let etcd = split(&args.etcd);
    let etcd_cluster = split(&args.etcd_cluster);
    let cluster_urls = split(&args.cluster_urls);
    let ticktime = Some(Duration::from_secs(args.cluster_net_ticktime));

    println!(
        "mqlock-bench, {} UTC, load average {} (1/5/15 min) at the start, {} cores",
        humantime::format_rfc3339_seconds(SystemTime::now()),
        loadavg(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    println!(
        "{} measured cycles per system after {} of warm-up, in {} interleaved rounds; etcd {}{}",
        args.iterations,
        args.warmup,
        args.rounds,
        etcd_version(&etcd).await,
        if args.cluster {
            format!(", etcd-cluster {}", etcd_version(&etcd_cluster).await)
        } else {
            String::new()
        }
    );

    let mut list = vec![
        System::new(
            "raw AMQP publish→deliver hop (classic queue)",
            Group::Single,
            Role::Hop,
            Cycle::hop(&args.amqp_url, HopQueue::Classic).await?,
        ),
        System::new(
            "Redis SET NX PX + scripted compare-and-DEL",
            Group::Single,
            Role::Other,
            Cycle::redis(&args.redis_url).await?,
        ),
        System::new(
            "PostgreSQL pg_advisory_lock + unlock",
            Group::Single,
            Role::Other,
            Cycle::postgres(&args.database_url).await?,
        ),
        System::new(
            "etcd lock, lease per lock (grant+lock+unlock+revoke)",
            Group::Single,
            Role::EtcdLease,
            Cycle::etcd(&etcd, false).await?,
        ),
        System::new(
            "etcd lock, session lease (lock+unlock)",
            Group::Single,
            Role::EtcdSession,
            Cycle::etcd(&etcd, true).await?,
        ),
        System::new(
            "mqlock classic (lock + release)",
            Group::Single,
            Role::Other,
            Cycle::mqlock(&args.amqp_url, QueueType::Classic, None).await?,
        ),
    ];
    if args.cluster {
        list.extend([
            System::new(
                "3 nodes: raw AMQP hop (quorum queue)",
                Group::Cluster,
                Role::Other,
                Cycle::hop(&cluster_urls[0], HopQueue::Quorum).await?,
            ),
            System::new(
                "3 nodes: etcd lock, lease per lock",
                Group::Cluster,
                Role::EtcdLease,
                Cycle::etcd(&etcd_cluster, false).await?,
            ),
            System::new(
                "3 nodes: etcd lock, session lease",
                Group::Cluster,
                Role::EtcdSession,
                Cycle::etcd(&etcd_cluster, true).await?,
            ),
            System::new(
                "3 nodes: mqlock quorum (lock + release)",
                Group::Cluster,
                Role::Other,
                Cycle::mqlock(&args.cluster_urls, QueueType::Quorum, ticktime).await?,
            ),
        ]);
    }

    for s in &mut list {
        for _ in 0..args.warmup {
            s.cycle
                .run()
                .await
                .with_context(|| format!("warm-up of {}", s.label))?;
        }
    }
    let n = list.len();
    for round in 0..args.rounds {
        // This round's share of the iterations (the first rounds take the remainder).
        let batch =
            args.iterations / args.rounds + usize::from(round < args.iterations % args.rounds);
        for k in 0..n {
            let s = &mut list[(round + k) % n];
            for _ in 0..batch {
                let took = s
                    .cycle
                    .run()
                    .await
                    .with_context(|| format!("cycle of {}", s.label))?;
                s.samples.push(took);
            }
        }
    }
    let mut results = Vec::with_capacity(n);
    for s in list {
        s.cycle.close().await;
        results.push((s.label, s.group, s.role, Stats::new(s.samples)));
    }

    println!();
    println!(
        "Uncontended lock+unlock cycle (µs; `/ hop` is against the classic-queue hop, `/ etcd` against etcd of the same group):"
    );
    println!();
    table(&results);

    if args.handoff_grants > 1 {
        let hold = Duration::from_millis(args.handoff_hold_ms);
        let hop = results.iter().find(|r| r.2 == Role::Hop).map(|r| r.3.p50());
        let mut pairs = vec![(
            "mqlock classic",
            "etcd, session lease",
            handoff_pair(
                Contenders::Mqlock(&args.amqp_url, QueueType::Classic, None),
                Contenders::Etcd(&etcd),
                args.handoff_grants,
                hold,
            )
            .await?,
        )];
        if args.cluster {
            pairs.push((
                "3 nodes: mqlock quorum",
                "3 nodes: etcd, session lease",
                handoff_pair(
                    Contenders::Mqlock(&args.cluster_urls, QueueType::Quorum, ticktime),
                    Contenders::Etcd(&etcd_cluster),
                    args.handoff_grants,
                    hold,
                )
                .await?,
            ));
        }
        println!();
        println!(
            "Hand-off with 2 waiters (µs, from the holder's release to the other waiter's grant; {} grants each, {} ms hold):",
            args.handoff_grants, args.handoff_hold_ms
        );
        println!();
        println!("| hand-off, 2 waiters | n | p50 | p90 | p99 | p50 / hop | p50 / etcd hand-off |");
        println!("|---|---:|---:|---:|---:|---:|---:|");
        for (mq_label, etcd_label, (mq, et)) in &pairs {
            let ratio_hop = |s: &Stats| hop.map_or("–".into(), |h| ratio(s.p50(), h));
            println!(
                "| {mq_label} | {} | {:.0} | {:.0} | {:.0} | {} | {} |",
                mq.n(),
                micros(mq.p50()),
                micros(mq.p90()),
                micros(mq.p99()),
                ratio_hop(mq),
                ratio(mq.p50(), et.p50()),
            );
            println!(
                "| {etcd_label} | {} | {:.0} | {:.0} | {:.0} | {} | 1.00× |",
                et.n(),
                micros(et.p50()),
                micros(et.p90()),
                micros(et.p99()),
                ratio_hop(et),
            );
        }
    }

    println!();
    println!("load average {} at the end", loadavg());

    if let Some(path) = &args.plot {
        let series: Vec<(String, &Stats)> = results.iter().map(|r| (r.0.clone(), &r.3)).collect();
        plot::cdf(
            path,
            &args.font,
            &format!(
                "Lock+unlock cycle latency, {} cycles per system",
                args.iterations
            ),
            &series,
            (1280, 800),
        )?;
        println!("CDF plot: {}", path.display());
    }
    Ok(())
}

impl System {
    fn new(label: &str, group: Group, role: Role, cycle: Cycle) -> System {
        System {
            label: label.into(),
            group,
            role,
            cycle,
            samples: Vec::new(),
        }
    }
}

fn ratio(a: Duration, b: Duration) -> String {
    format!("{:.2}×", a.as_secs_f64() / b.as_secs_f64())
}

fn table(results: &[(String, Group, Role, Stats)]) {
    let hop = results.iter().find(|r| r.2 == Role::Hop).map(|r| r.3.p50());
    let etcd = |group: Group, role: Role| {
        results
            .iter()
            .find(|r| r.1 == group && r.2 == role)
            .map(|r| r.3.p50())
    };
    println!(
        "| system | n | p50 | p90 | p99 | p50 / hop | p50 / etcd (lease per lock) | p50 / etcd (session lease) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (label, group, _, s) in results {
        let r = |d: Option<Duration>| d.map_or("–".into(), |d| ratio(s.p50(), d));
        println!(
            "| {label} | {} | {:.0} | {:.0} | {:.0} | {} | {} | {} |",
            s.n(),
            micros(s.p50()),
            micros(s.p90()),
            micros(s.p99()),
            r(hop),
            r(etcd(*group, Role::EtcdLease)),
            r(etcd(*group, Role::EtcdSession)),
        );
    }
}

/// How to make the contenders of one hand-off measurement.
enum Contenders<'a> {
    /// mqlock clients: URLs, queue type, net_ticktime.
    Mqlock(&'a str, QueueType, Option<Duration>),
    /// etcd clients with a session lease each: endpoints.
    Etcd(&'a [String]),
}

impl Contenders<'_> {
    async fn make(&self) -> Result<[Contender; 2]> {
        let mut out = Vec::with_capacity(2);
        for i in 0..2 {
            out.push(match self {
                Contenders::Mqlock(urls, qt, tick) => Contender::Mqlock(
                    systems::mqlock_client(urls, *qt, *tick, &format!("hand-off {i}")).await?,
                ),
                Contenders::Etcd(endpoints) => {
                    let mut client = systems::etcd(endpoints).await?;
                    let (lease, keeper) = systems::session_lease(&mut client).await?;
                    Contender::Etcd {
                        client: Box::new(client),
                        lease,
                        keeper,
                    }
                }
            });
        }
        Ok(match out.try_into() {
            Ok(c) => c,
            Err(_) => unreachable!("two contenders"),
        })
    }
}

/// The hand-off of mqlock and of etcd, each in two halves run alternately (mqlock, etcd,
/// mqlock, etcd) so that noise falls on both.
async fn handoff_pair(
    mq: Contenders<'_>,
    et: Contenders<'_>,
    grants: usize,
    hold: Duration,
) -> Result<(Stats, Stats)> {
    let mut mq_c = Some(mq.make().await?);
    let mut et_c = Some(et.make().await?);
    let (mut mq_s, mut et_s) = (Vec::new(), Vec::new());
    let (mq_name, et_name) = (
        systems::unique("handoff-mqlock"),
        systems::unique("handoff-etcd"),
    );
    // A short warm-up of each, then the two halves.
    for (i, part) in [grants / 10, grants / 2, grants - grants / 2]
        .into_iter()
        .enumerate()
    {
        let part = part.max(2);
        let (s, c) = handoff::measure(mq_c.take().unwrap(), &mq_name, part, hold)
            .await
            .context("mqlock hand-off")?;
        mq_c = Some(c);
        let (t, c) = handoff::measure(et_c.take().unwrap(), &et_name, part, hold)
            .await
            .context("etcd hand-off")?;
        et_c = Some(c);
        if i > 0 {
            mq_s.extend(s);
            et_s.extend(t);
        }
    }
    for c in mq_c.take().unwrap().into_iter().chain(et_c.take().unwrap()) {
        c.close().await;
    }
    Ok((Stats::new(mq_s), Stats::new(et_s)))
}
