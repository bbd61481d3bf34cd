//! Helpers of the cluster fault-injection suite (tests/cluster_faults.rs): the 3-node cluster
//! (driven through scripts/cluster.sh), a fencing-checked store, the contending clients that
//! record a history of grants, and the checker that turns a history into the reported numbers.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mqlock::{ClientConfig, LockClient, QueueType};
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::task::JoinHandle;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/cluster.sh")
}

/// Runs `scripts/cluster.sh ARGS` and returns its stdout; panics (failing the test) if it fails.
pub async fn cluster_sh(args: &[&str]) -> String {
    let out = tokio::process::Command::new(script())
        .args(args)
        .output()
        .await
        .expect("cannot run scripts/cluster.sh");
    assert!(
        out.status.success(),
        "scripts/cluster.sh {} failed:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The 3-node cluster, brought up by [`Cluster::up`] and torn down when dropped (also when
/// the test panics).
pub struct Cluster {
    urls: Vec<String>,
}

impl Cluster {
    /// Starts the cluster (fails the test loudly if it cannot: never skips).
    pub async fn up() -> Cluster {
        cluster_sh(&["up"]).await;
        let urls = cluster_sh(&["urls"])
            .await
            .split(',')
            .map(str::to_owned)
            .collect::<Vec<_>>();
        assert_eq!(urls.len(), 3, "scripts/cluster.sh urls: {urls:?}");
        Cluster { urls }
    }

    /// All three URLs, starting with node `first % 3`: clients spread over the nodes (each
    /// client tries the others in turn when its node fails).
    pub fn urls_from(&self, first: usize) -> String {
        (0..3)
            .map(|k| self.urls[(first + k) % 3].clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The node (1..=3) that leads the quorum queue `queue`.
    pub async fn leader(&self, queue: &str) -> usize {
        let node = cluster_sh(&["leader", queue]).await;
        match node.as_str() {
            "mqlock-c1@localhost" => 1,
            "mqlock-c2@localhost" => 2,
            "mqlock-c3@localhost" => 3,
            other => panic!("unexpected leader {other:?} of {queue}"),
        }
    }

    /// Waits until all three nodes run, clustered, with no partition. Returns what the script
    /// reports on stdout: the workarounds it had to apply (a node stuck in `global:sync()`).
    pub async fn wait_healthy(&self) -> String {
        cluster_sh(&["wait-healthy", "180"]).await
    }

    /// Whether the cluster becomes healthy within `secs` (as [`Cluster::wait_healthy`], but
    /// `false` instead of a failed test), with the script's stdout (its workarounds).
    pub async fn healthy_within(&self, secs: u64) -> (bool, String) {
        let out = tokio::process::Command::new(script())
            .args(["wait-healthy", &secs.to_string()])
            .output()
            .await
            .expect("cannot run scripts/cluster.sh");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        )
    }
}

/// `cluster_partition_handling` set on every node at run time (`scripts/cluster.sh
/// partition-handling MODE`) for as long as the guard lives. Dropping it, also when the test
/// panics, heals every node and sets `pause_minority` (the cluster's configured mode) again.
pub struct PartitionHandling {
    mode: String,
}

impl PartitionHandling {
    pub async fn set(mode: &str) -> PartitionHandling {
        // Armed first: a failure half-way (one node set, another not) is restored too.
        let guard = PartitionHandling { mode: mode.into() };
        let out = cluster_sh(&["partition-handling", mode]).await;
        assert!(
            out.lines().count() == 3 && out.lines().all(|l| l.ends_with(&format!(" {mode}"))),
            "cluster_partition_handling not set to {mode} on every node: {out}"
        );
        guard
    }

    pub fn mode(&self) -> &str {
        &self.mode
    }
}

impl Drop for PartitionHandling {
    fn drop(&mut self) {
        // Healed first: a node cut off from the others cannot be reached by rabbitmqctl.
        let _ = std::process::Command::new(script()).arg("heal").status();
        let ok = std::process::Command::new(script())
            .args(["partition-handling", "pause_minority"])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!(
                "WARNING: cluster_partition_handling could not be set back to pause_minority on every node (scripts/cluster.sh partition-handling pause_minority)"
            );
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::env::var_os("MQLOCK_CLUSTER_KEEP").is_some() {
            return;
        }
        let _ = std::process::Command::new(script()).arg("down").status();
    }
}

/// The broker queue of a lock (for leader look-ups).
pub fn lock_queue(name: &str) -> String {
    mqlock::name::queue_names("mqlock.", name)
        .expect("valid lock name")
        .lock
}

/// The configuration of every client of the suite: quorum queues, a 2 s heartbeat (a holder
/// cut off from its node learns of the loss within 3 s), and the cluster's `net_ticktime`
/// (10 s, or `MQLOCK_CLUSTER_NET_TICKTIME` as in scripts/cluster.sh), which bounds the lease
/// on a cluster.
pub fn client_config(name: String) -> ClientConfig {
    ClientConfig {
        queue_type: QueueType::Quorum,
        heartbeat: Duration::from_secs(2),
        net_ticktime: Duration::from_secs(net_ticktime_secs()),
        connection_name: Some(name),
        ..ClientConfig::default()
    }
}

/// The cluster's `net_ticktime` in seconds: scripts/cluster.sh configures the nodes with
/// `MQLOCK_CLUSTER_NET_TICKTIME`, 10 by default.
pub fn net_ticktime_secs() -> u64 {
    std::env::var("MQLOCK_CLUSTER_NET_TICKTIME")
        .ok()
        .map(|v| {
            v.parse()
                .expect("MQLOCK_CLUSTER_NET_TICKTIME must be a number of seconds")
        })
        .unwrap_or(10)
}

// ------------------------------------------------------------------------ the fenced store

/// The outcome of one operation on the store: its position in the store's total order, and
/// whether the fence let it through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Accepted(u64),
    Rejected(u64),
    NotDone,
}

impl Op {
    pub fn rejected(self) -> bool {
        matches!(self, Op::Rejected(_))
    }
    pub fn seq(self) -> Option<u64> {
        match self {
            Op::Accepted(s) | Op::Rejected(s) => Some(s),
            Op::NotDone => None,
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct Register {
    /// Highest token seen by any operation (reads register their token too).
    pub highest_seen: u64,
    /// Highest token of an accepted write.
    pub highest_written: u64,
    /// The fenced counter.
    pub counter: u64,
    pub accepted_writes: u64,
    pub rejected_reads: u64,
    pub rejected_writes: u64,
    /// The same counter without fencing: what a resource that ignores the token would hold.
    pub plain: u64,
    pub plain_writes: u64,
}

/// A resource that checks fencing tokens, one register per lock.
///
/// A read with token `t` is refused if a higher token was seen, and raises the highest seen
/// token to `t`; a write is refused unless `t` is at least the highest seen and greater than
/// the highest written (each grant writes once). So once a newer holder has read, an older
/// holder can neither read nor write, and an accepted read-modify-write is never interleaved
/// with another accepted one. Every operation gets a sequence number (the store's total
/// order) and an instant. A shadow counter without fencing is updated by the same operations.
#[derive(Default)]
pub struct Store {
    inner: Mutex<StoreInner>,
}

#[derive(Default)]
struct StoreInner {
    seq: u64,
    registers: HashMap<usize, Register>,
    log: Vec<(u64, Instant)>,
}

/// What a read returns.
#[derive(Debug, Clone, Copy)]
pub struct ReadResult {
    pub op: Op,
    pub value: u64,
    pub plain: u64,
    pub at: Instant,
}

impl Store {
    pub fn read(&self, lock: usize, token: u64) -> ReadResult {
        let mut s = self.inner.lock().unwrap();
        s.seq += 1;
        let seq = s.seq;
        let at = Instant::now();
        s.log.push((seq, at));
        let r = s.registers.entry(lock).or_default();
        let op = if token < r.highest_seen {
            r.rejected_reads += 1;
            Op::Rejected(seq)
        } else {
            r.highest_seen = token;
            Op::Accepted(seq)
        };
        ReadResult {
            op,
            value: r.counter,
            plain: r.plain,
            at,
        }
    }

    pub fn write(&self, lock: usize, token: u64, value: u64, plain: u64) -> (Op, Instant) {
        let mut s = self.inner.lock().unwrap();
        s.seq += 1;
        let seq = s.seq;
        let at = Instant::now();
        s.log.push((seq, at));
        let r = s.registers.entry(lock).or_default();
        r.plain = plain;
        r.plain_writes += 1;
        if token < r.highest_seen || token <= r.highest_written {
            r.rejected_writes += 1;
            (Op::Rejected(seq), at)
        } else {
            r.highest_seen = token;
            r.highest_written = token;
            r.counter = value;
            r.accepted_writes += 1;
            (Op::Accepted(seq), at)
        }
    }

    pub fn register(&self, lock: usize) -> Register {
        self.inner
            .lock()
            .unwrap()
            .registers
            .get(&lock)
            .cloned()
            .unwrap_or_default()
    }
}

/// Serves the store to other processes on 127.0.0.1 (a line protocol a shell can speak
/// through bash's /dev/tcp): `read LOCK TOKEN` → `ok|rejected VALUE PLAIN`, and
/// `write LOCK TOKEN VALUE PLAIN` → `ok|rejected`. Every operation is also logged with its
/// token, so the test can rebuild the remote holder's grant.
pub struct StoreServer {
    pub port: u16,
    pub remote_ops: Arc<Mutex<Vec<RemoteOp>>>,
    task: JoinHandle<()>,
}

#[derive(Debug, Clone)]
pub struct RemoteOp {
    pub write: bool,
    pub lock: usize,
    pub token: u64,
    pub op: Op,
    pub at: Instant,
}

impl StoreServer {
    pub async fn start(store: Arc<Store>) -> StoreServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let remote_ops = Arc::new(Mutex::new(Vec::new()));
        let ops = remote_ops.clone();
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let (store, ops) = (store.clone(), ops.clone());
                tokio::spawn(async move {
                    let (r, mut w) = sock.into_split();
                    let mut lines = BufReader::new(r).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        let f: Vec<u64> = line
                            .split_whitespace()
                            .skip(1)
                            .filter_map(|x| x.parse().ok())
                            .collect();
                        let reply = match (line.split_whitespace().next(), f.as_slice()) {
                            (Some("read"), [lock, token]) => {
                                let r = store.read(*lock as usize, *token);
                                ops.lock().unwrap().push(RemoteOp {
                                    write: false,
                                    lock: *lock as usize,
                                    token: *token,
                                    op: r.op,
                                    at: r.at,
                                });
                                let st = if r.op.rejected() { "rejected" } else { "ok" };
                                format!("{st} {} {}\n", r.value, r.plain)
                            }
                            (Some("write"), [lock, token, value, plain]) => {
                                let (op, at) = store.write(*lock as usize, *token, *value, *plain);
                                ops.lock().unwrap().push(RemoteOp {
                                    write: true,
                                    lock: *lock as usize,
                                    token: *token,
                                    op,
                                    at,
                                });
                                if op.rejected() {
                                    "rejected\n".into()
                                } else {
                                    "ok\n".into()
                                }
                            }
                            _ => format!("error bad request {line:?}\n"),
                        };
                        if w.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        StoreServer {
            port,
            remote_ops,
            task,
        }
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ------------------------------------------------------------------------ history

/// One grant as its holder saw it.
#[derive(Debug, Clone)]
pub struct Grant {
    pub client: String,
    pub lock: usize,
    pub token: u64,
    /// When `lock()` returned.
    pub start: Instant,
    /// When the holder finished its critical section and began to release.
    pub end: Instant,
    pub read: Op,
    pub write: Op,
    /// `guard.is_held()` at the end of the critical section.
    pub held_at_end: bool,
}

/// The contending clients: each loops taking a random one of the locks, doing a
/// read-modify-write of the lock's counter through the fenced store, and releasing.
pub struct Load {
    stop: Arc<AtomicBool>,
    pub grants: Arc<AtomicU64>,
    pub history: Arc<Mutex<Vec<Grant>>>,
    pub errors: Arc<Mutex<Vec<String>>>,
    tasks: Vec<JoinHandle<()>>,
    clients: Vec<LockClient>,
}

/// How long one acquisition may take before the suite calls it hung (it reconnects through
/// faults by itself; this bound only turns a hang into a reported error).
const ACQUIRE_BOUND: Duration = Duration::from_secs(120);

impl Load {
    pub async fn start(
        cluster: &Cluster,
        clients: usize,
        locks: &[String],
        store: Arc<Store>,
        hold_max: Duration,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let grants = Arc::new(AtomicU64::new(0));
        let history = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        let mut all = Vec::new();
        for i in 0..clients {
            let who = format!("client-{i}");
            let client = LockClient::connect(&cluster.urls_from(i), client_config(who.clone()))
                .await
                .unwrap_or_else(|e| panic!("{who} cannot connect to the cluster: {e}"));
            all.push(client.clone());
            let (stop, grants, history, errors, store, locks) = (
                stop.clone(),
                grants.clone(),
                history.clone(),
                errors.clone(),
                store.clone(),
                locks.to_vec(),
            );
            tasks.push(tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(i as u64 ^ 0x6d71);
                while !stop.load(Ordering::Relaxed) {
                    let lock = rng.random_range(0..locks.len());
                    let acquired = tokio::time::timeout(
                        ACQUIRE_BOUND,
                        client.lock_timeout(&locks[lock], ACQUIRE_BOUND - Duration::from_secs(5)),
                    )
                    .await;
                    let guard = match acquired {
                        Ok(Ok(g)) => g,
                        Ok(Err(e)) => {
                            errors.lock().unwrap().push(format!("{who}: {e}"));
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            continue;
                        }
                        Err(_) => {
                            errors
                                .lock()
                                .unwrap()
                                .push(format!("{who}: acquisition hung for {ACQUIRE_BOUND:?}"));
                            continue;
                        }
                    };
                    let start = Instant::now();
                    let token = guard.fencing_token();
                    let r = store.read(lock, token);
                    let hold = rng.random_range(0..=hold_max.as_micros() as u64);
                    if hold >= 1000 {
                        tokio::time::sleep(Duration::from_micros(hold)).await;
                    } else {
                        tokio::task::yield_now().await;
                    }
                    let (write, _) = store.write(lock, token, r.value + 1, r.plain + 1);
                    let held_at_end = guard.is_held();
                    let end = Instant::now();
                    history.lock().unwrap().push(Grant {
                        client: who.clone(),
                        lock,
                        token,
                        start,
                        end,
                        read: r.op,
                        write,
                        held_at_end,
                    });
                    grants.fetch_add(1, Ordering::Relaxed);
                    // Releasing a lost lock reports the loss: expected under faults.
                    if tokio::time::timeout(Duration::from_secs(30), guard.release())
                        .await
                        .is_err()
                    {
                        errors
                            .lock()
                            .unwrap()
                            .push(format!("{who}: release hung for 30 s"));
                    }
                }
            }));
        }
        Load {
            stop,
            grants,
            history,
            errors,
            tasks,
            clients: all,
        }
    }

    pub fn count(&self) -> u64 {
        self.grants.load(Ordering::Relaxed)
    }

    /// Grants of lock `lock` that started after `since`.
    pub fn grants_since(&self, lock: usize, since: Instant) -> usize {
        self.history
            .lock()
            .unwrap()
            .iter()
            .filter(|g| g.lock == lock && g.start > since)
            .count()
    }

    /// Stops the clients (each finishes its current round) and returns the history.
    pub async fn stop(self) -> (Vec<Grant>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            tokio::time::timeout(ACQUIRE_BOUND + Duration::from_secs(40), t)
                .await
                .expect("a client did not stop")
                .expect("a client task panicked");
        }
        for c in &self.clients {
            c.close().await;
        }
        let history = std::mem::take(&mut *self.history.lock().unwrap());
        let errors = std::mem::take(&mut *self.errors.lock().unwrap());
        (history, errors)
    }
}

// ------------------------------------------------------------------------ the checker

/// The numbers of one scenario (all locks together; `longest_gap` is the worst lock's).
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub scenario: String,
    pub grants: usize,
    /// Pairs of grants of one lock whose [start, end] intervals overlap in time.
    pub overlaps: usize,
    /// Overlaps in which the fence refused one holder's read or write.
    pub overlaps_caught: usize,
    /// Overlaps whose store operations did not interleave (the older holder finished its
    /// read-modify-write before the newer one read): harmless.
    pub overlaps_ordered: usize,
    /// Overlaps whose accepted operations interleaved: must be 0.
    pub overlaps_harmful: usize,
    /// Reads and writes refused by the fence.
    pub fenced_reads: u64,
    pub fenced_writes: u64,
    /// Accepted writes minus the final counter: must be 0.
    pub lost_updates: i64,
    /// The same with a resource that ignores the token.
    pub lost_updates_unfenced: i64,
    /// Grants of one lock with the same token: must be 0.
    pub duplicate_tokens: usize,
    /// A grant that started after another of the same lock ended, with a token not larger:
    /// must be 0.
    pub order_violations: usize,
    /// Grants whose holder learnt during its critical section that the lock was lost.
    pub lost_while_held: usize,
    /// Longest time in which a lock had no holder whose write was accepted.
    pub longest_gap: Duration,
    pub errors: usize,
    pub duration: Duration,
    pub notes: Vec<String>,
}

pub fn analyse(scenario: &str, history: &[Grant], store: &Store, locks: usize) -> Report {
    let mut rep = Report {
        scenario: scenario.into(),
        grants: history.len(),
        ..Report::default()
    };
    for lock in 0..locks {
        let mut gs: Vec<&Grant> = history.iter().filter(|g| g.lock == lock).collect();
        gs.sort_by_key(|g| g.start);
        let mut seen = HashSet::new();
        for g in &gs {
            if !seen.insert(g.token) {
                rep.duplicate_tokens += 1;
            }
            if !g.held_at_end {
                rep.lost_while_held += 1;
            }
        }
        // Overlapping pairs.
        for i in 0..gs.len() {
            for j in i + 1..gs.len() {
                if gs[j].start >= gs[i].end {
                    break;
                }
                rep.overlaps += 1;
                let (old, new) = if gs[i].token < gs[j].token {
                    (gs[i], gs[j])
                } else {
                    (gs[j], gs[i])
                };
                if old.read.rejected()
                    || old.write.rejected()
                    || new.read.rejected()
                    || new.write.rejected()
                {
                    rep.overlaps_caught += 1;
                } else if matches!((old.write.seq(), new.read.seq()), (Some(w), Some(r)) if w < r) {
                    rep.overlaps_ordered += 1;
                } else {
                    rep.overlaps_harmful += 1;
                }
            }
        }
        // Token order among grants that did not overlap.
        let mut by_end: Vec<&Grant> = gs.clone();
        by_end.sort_by_key(|g| g.end);
        let (mut k, mut max_before) = (0, None::<u64>);
        for g in &gs {
            while k < by_end.len() && by_end[k].end < g.start {
                max_before = max_before.max(Some(by_end[k].token));
                k += 1;
            }
            if max_before.is_some_and(|m| m >= g.token) {
                rep.order_violations += 1;
            }
        }
        // Longest time without a holder whose write counted.
        let valid: Vec<&Grant> = gs
            .iter()
            .copied()
            .filter(|g| matches!(g.write, Op::Accepted(_)))
            .collect();
        let mut covered_until: Option<Instant> = None;
        for g in &valid {
            if let Some(c) = covered_until {
                if g.start > c {
                    rep.longest_gap = rep.longest_gap.max(g.start - c);
                }
                covered_until = Some(c.max(g.end));
            } else {
                covered_until = Some(g.end);
            }
        }
        let reg = store.register(lock);
        rep.fenced_reads += reg.rejected_reads;
        rep.fenced_writes += reg.rejected_writes;
        rep.lost_updates += reg.accepted_writes as i64 - reg.counter as i64;
        rep.lost_updates_unfenced += reg.plain_writes as i64 - reg.plain as i64;
    }
    rep
}

impl Report {
    pub const TABLE_HEADER: &'static str = "| scenario | grants | overlaps (wall clock) | caught by fence / ordered / harmful | fenced reads / writes | lost updates | lost without fencing | longest gap | errors seen by clients | duration |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|";

    pub fn table_row(&self) -> String {
        format!(
            "| {} | {} | {} | {} / {} / {} | {} / {} | {} | {} | {:.1} s | {} | {:.0} s |",
            self.scenario,
            self.grants,
            self.overlaps,
            self.overlaps_caught,
            self.overlaps_ordered,
            self.overlaps_harmful,
            self.fenced_reads,
            self.fenced_writes,
            self.lost_updates,
            self.lost_updates_unfenced,
            self.longest_gap.as_secs_f64(),
            self.errors,
            self.duration.as_secs_f64()
        )
    }

    /// The safety assertions every scenario must pass.
    pub fn assert_safe(&self) {
        assert_eq!(self.lost_updates, 0, "lost updates: {self}");
        assert_eq!(
            self.duplicate_tokens, 0,
            "two grants with one token: {self}"
        );
        assert_eq!(
            self.order_violations, 0,
            "fencing tokens not increasing in grant order: {self}"
        );
        assert_eq!(
            self.overlaps_harmful, 0,
            "an overlap the fence did not catch: {self}"
        );
        assert_eq!(
            self.overlaps,
            self.overlaps_caught + self.overlaps_ordered,
            "{self}"
        );
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} grants in {:.0} s; overlaps {} (caught {}, ordered {}, harmful {}); fenced reads {} writes {}; lost updates {} (unfenced {}); duplicate tokens {}; order violations {}; lost while held {}; longest gap {:.2} s; client errors {}",
            self.scenario,
            self.grants,
            self.duration.as_secs_f64(),
            self.overlaps,
            self.overlaps_caught,
            self.overlaps_ordered,
            self.overlaps_harmful,
            self.fenced_reads,
            self.fenced_writes,
            self.lost_updates,
            self.lost_updates_unfenced,
            self.duplicate_tokens,
            self.order_violations,
            self.lost_while_held,
            self.longest_gap.as_secs_f64(),
            self.errors
        )?;
        for n in &self.notes {
            write!(f, "\n    {n}")?;
        }
        Ok(())
    }
}
