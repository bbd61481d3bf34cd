//! Leader election (issue 13) against the real broker: `campaign`/`resign` hand-over between
//! clients, `leader()` with the leader's value, `observe` in order, and `mqlock elect`
//! processes killed with kill -9 one leader after another while a fencing-checked store counts
//! their writes and `mqlock elect --observe` watches.

mod support;

use std::collections::HashMap;
use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use mqlock::{Error, LockClient, election_lock_name};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaign_and_resign_hand_leadership_over_and_leader_shows_the_value() {
    let (a, b, watcher) = (
        support::client().await,
        support::client().await,
        support::client().await,
    );
    let name = support::unique("elect-handover");
    assert_eq!(
        watcher.leader(&name).await.unwrap(),
        None,
        "nobody leads yet"
    );
    let la = a.campaign(&name, "10.0.0.1:8080").await.unwrap();
    assert!(la.is_leader());
    assert_eq!(la.value(), "10.0.0.1:8080");
    let leader = watcher.leader(&name).await.unwrap().expect("a leads");
    assert_eq!(leader.value, "10.0.0.1:8080");
    assert_eq!(leader.token, la.fencing_token());
    assert_eq!(leader.holder.pid, std::process::id());
    assert_eq!(leader.holder.value.as_deref(), Some("10.0.0.1:8080"));
    // B stands by behind A.
    let standby = {
        let (b, name) = (b.clone(), name.clone());
        tokio::spawn(async move { b.campaign(&name, "10.0.0.2:8080").await })
    };
    let (probe, lock) = (&watcher, election_lock_name(&name));
    let lock = &lock;
    support::wait_until(
        "the standby to register",
        Duration::from_secs(20),
        move || async move { probe.status(lock).await.unwrap().waiters() == 1 },
    )
    .await;
    assert!(!standby.is_finished(), "a standby must wait while A leads");
    let ta = la.fencing_token();
    let resigned = Instant::now();
    la.resign().await.unwrap();
    let lb = standby.await.unwrap().unwrap();
    let handover = resigned.elapsed();
    assert!(lb.fencing_token() > ta);
    let leader = watcher.leader(&name).await.unwrap().expect("b leads");
    assert_eq!(
        (leader.value.as_str(), leader.token),
        ("10.0.0.2:8080", lb.fencing_token())
    );
    lb.resign().await.unwrap();
    let name = &name;
    support::wait_until(
        "nobody to lead",
        Duration::from_secs(10),
        move || async move { probe.leader(name).await.unwrap().is_none() },
    )
    .await;
    // A value that does not fit the register's headers is refused before anything is sent.
    let long = "x".repeat(mqlock::MAX_VALUE_LEN + 1);
    assert!(matches!(
        a.campaign("elect-too-long", &long).await,
        Err(Error::Config(_))
    ));
    eprintln!("hand-over on resign: {handover:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_yields_the_current_leader_then_the_next_in_order() {
    let (a, b, watcher) = (
        support::client().await,
        support::client().await,
        support::client().await,
    );
    let name = support::unique("elect-observe");
    let la = a.campaign(&name, "first").await.unwrap();
    let lb = {
        let (b, name) = (b.clone(), name.clone());
        tokio::spawn(async move { b.campaign(&name, "second").await })
    };
    let mut changes = std::pin::pin!(watcher.observe_every(&name, Duration::from_millis(100)));
    let first = tokio::time::timeout(Duration::from_secs(10), changes.next())
        .await
        .expect("the current leader at once")
        .unwrap()
        .unwrap()
        .expect("someone leads");
    assert_eq!(
        (first.value.as_str(), first.token),
        ("first", la.fencing_token())
    );
    let (probe, lock) = (&watcher, election_lock_name(&name));
    let lock = &lock;
    support::wait_until(
        "the standby to register",
        Duration::from_secs(20),
        move || async move { probe.status(lock).await.unwrap().waiters() == 1 },
    )
    .await;
    la.resign().await.unwrap();
    let lb = lb.await.unwrap().unwrap();
    // The next item is B: nothing in between (the lock went straight from A to B), and within
    // the poll interval plus a status round trip (bounded generously for a loaded machine).
    let next = tokio::time::timeout(Duration::from_secs(5), changes.next())
        .await
        .expect("the next leader within the poll interval")
        .unwrap()
        .unwrap()
        .expect("someone leads");
    assert_eq!(
        (next.value.as_str(), next.token),
        ("second", lb.fencing_token())
    );
    assert!(next.token > first.token);
    lb.resign().await.unwrap();
    let last = tokio::time::timeout(Duration::from_secs(5), changes.next())
        .await
        .expect("nobody, after the last resignation")
        .unwrap()
        .unwrap();
    assert_eq!(last, None);
}

/// The fenced store every leader's command writes to, in `$D`: under `flock`, a write whose
/// token is older than the newest accepted one is refused (`$D/refused`); an accepted one
/// raises `$D/max`, increments `$D/counter` and appends `token mqlock-pid value` to `$D/log`.
/// A write, once started, completes: the SIGTERM that ends a leader's command group at the end
/// of the test must not tear it (a real store's write is atomic too).
const STORE: &str = r#"trap '' TERM INT HUP; t=$MQLOCK_FENCING_TOKEN; max=$(cat "$D/max")
if [ "$t" -lt "$max" ]; then echo "$t" >> "$D/refused"; exit 0; fi
echo "$t" > "$D/max"; n=$(cat "$D/counter"); echo $((n+1)) > "$D/counter"
echo "$t $M $MQLOCK_LEADER_VALUE" >> "$D/log""#;

/// A leader's command: fenced increments every 20 ms until it is killed. `$M` is its mqlock.
const LEADER: &str =
    r#"export M=$PPID; while true; do flock "$D/lock" sh -c "$STORE"; sleep 0.02; done"#;

fn candidate(url: &str, name: &str, dir: &Path, i: usize) -> Child {
    Command::new(support::mqlock_bin())
        .args(["elect", name, "--value", &format!("cand-{i}"), "--"])
        .args(["sh", "-c", LEADER])
        .env("D", dir)
        .env("STORE", STORE)
        .env("MQLOCK_AMQP_URL", url)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn mqlock elect")
}

/// The accepted writes so far: (token, mqlock pid, value).
fn accepted(dir: &Path) -> Vec<(u64, u32, String)> {
    std::fs::read_to_string(dir.join("log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            Some((
                f.next()?.parse().ok()?,
                f.next()?.parse().ok()?,
                f.next()?.to_owned(),
            ))
        })
        .collect()
}

/// The observer's JSON lines parsed so far: (token, value) or None for "no leader".
fn observed(lines: &Mutex<Vec<String>>) -> Vec<Option<(u64, String)>> {
    lines
        .lock()
        .unwrap()
        .iter()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            (!v.is_null()).then(|| {
                (
                    v["token"].as_u64().unwrap(),
                    v["value"].as_str().unwrap().to_owned(),
                )
            })
        })
        .collect()
}

fn wait_for<T>(what: &str, within: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(t) = check() {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_leaders_are_replaced_fenced_and_observed_in_order() {
    const CANDIDATES: usize = 5;
    const KILLS: usize = 6;
    let url = support::amqp_url();
    let name = support::unique("elect-kill");
    let lock = election_lock_name(&name);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (f, v) in [("max", "0"), ("counter", "0"), ("log", "")] {
        std::fs::write(d.join(f), v).unwrap();
    }
    let bin = support::mqlock_bin();
    let probe = support::client().await;

    let mut observer = Command::new(&bin)
        .args(["elect", "--observe", "--json", &name])
        .env("MQLOCK_AMQP_URL", &url)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn mqlock elect --observe");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let reader = {
        let (out, lines) = (observer.stdout.take().unwrap(), lines.clone());
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(l);
            }
        })
    };

    let mut procs: HashMap<u32, Child> = HashMap::new();
    let mut next = 0;
    for _ in 0..CANDIDATES {
        let c = candidate(&url, &name, d, next);
        next += 1;
        procs.insert(c.id(), c);
    }
    let mut takeovers = Vec::new();
    let mut killed_token = 0;
    for round in 0..=KILLS {
        // The first write of a new leader: a token above the last killed leader's.
        let since = Instant::now();
        let (token, pid, value) = wait_for(
            "a standby to take over and write",
            Duration::from_secs(30),
            || accepted(d).last().filter(|w| w.0 > killed_token).cloned(),
        );
        if round > 0 {
            takeovers.push(since.elapsed());
        }
        assert!(
            procs.contains_key(&pid),
            "the leader {pid} is not a live candidate"
        );
        // The observer shows it (the latest leader is never skipped).
        wait_for(
            "the observer to print the new leader",
            Duration::from_secs(10),
            || {
                observed(&lines)
                    .last()
                    .cloned()
                    .flatten()
                    .filter(|(t, v)| *t == token && *v == value)
            },
        );
        if round == KILLS {
            break;
        }
        // Every candidate stands (FIFO) before the leader dies.
        wait_for("every candidate to stand", Duration::from_secs(30), || {
            let s = consumers(&probe, &lock);
            (s == CANDIDATES as u32).then_some(())
        });
        let mut leader = procs.remove(&pid).unwrap();
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        leader.wait().unwrap();
        killed_token = token;
        let c = candidate(&url, &name, d, next);
        next += 1;
        procs.insert(c.id(), c);
    }
    let final_token = accepted(d).last().unwrap().0;

    // Stop: the observer first (SIGINT ends it with 0), then the candidates.
    unsafe { libc::kill(observer.id() as i32, libc::SIGINT) };
    assert_eq!(
        observer.wait().unwrap().code(),
        Some(0),
        "observer's exit code"
    );
    reader.join().unwrap();
    // SIGTERM: a standby exits 143; the leader passes it on to its command, which dies of it
    // (143 too). Also a candidate elected just as the signal comes (the signal is kept for the
    // command, not lost).
    for (pid, mut c) in procs {
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let code = wait_for(
            "a candidate to end on SIGTERM",
            Duration::from_secs(20),
            || c.try_wait().unwrap(),
        );
        assert_eq!(code.code(), Some(143), "candidate {pid}");
    }
    // Orphaned store writes of killed leaders finish within a moment; then the store is still.
    std::thread::sleep(Duration::from_millis(300));

    // At most one leader at a time, by fencing: accepted tokens never go down, so no write
    // with an older token was accepted after a newer one; the count is exact.
    let log = accepted(d);
    let counter: usize = std::fs::read_to_string(d.join("counter"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(counter, log.len(), "every accepted write counted once");
    assert!(
        log.windows(2).all(|w| w[0].0 <= w[1].0),
        "an older token was accepted after a newer one"
    );
    let mut leaders: Vec<(u64, u32, String)> = log.clone();
    leaders.dedup_by_key(|w| w.0);
    assert!(leaders.len() > KILLS, "{} leaders wrote", leaders.len());
    // One token, one mqlock process, one value.
    for w in &log {
        let l = leaders.iter().find(|l| l.0 == w.0).unwrap();
        assert_eq!((l.1, &l.2), (w.1, &w.2), "token {} had two leaders", w.0);
    }
    let refused = std::fs::read_to_string(d.join("refused")).unwrap_or_default();

    // The observer: strictly increasing tokens, each a real leader with its value, ending with
    // the final leader.
    let seen: Vec<(u64, String)> = observed(&lines).into_iter().flatten().collect();
    assert!(
        seen.windows(2).all(|w| w[0].0 < w[1].0),
        "observed tokens must strictly increase: {seen:?}"
    );
    for (t, v) in &seen {
        let l = leaders.iter().find(|l| l.0 == *t);
        assert!(
            l.is_none_or(|l| l.2 == *v),
            "observed {t} with {v}, but it wrote {l:?}"
        );
    }
    assert_eq!(seen.last().map(|s| s.0), Some(final_token));
    // Real time (processes, a real broker). A takeover is the mutex's kill -9 hand-over (the
    // socket closes, the broker activates the next standby at once: under 5 s in lock_safety)
    // plus the new command's start and first write. 10 s still tells it from a hand-over after
    // missed heartbeats (5 s heartbeat: 10 s and more), which would be a bug.
    let slowest = takeovers.iter().max().unwrap();
    assert!(
        *slowest < Duration::from_secs(10),
        "takeovers after kill -9: {takeovers:?}"
    );
    eprintln!(
        "{} leaders, {} accepted writes, {} refused (old tokens), takeovers {takeovers:?}, observer saw {} changes",
        leaders.len(),
        log.len(),
        refused.lines().count(),
        seen.len()
    );
}

/// Consumers on the election's lock queue, from a blocking context.
fn consumers(probe: &LockClient, lock: &str) -> u32 {
    let handle = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| handle.block_on(probe.status(lock)))
        .map(|s| s.consumers)
        .unwrap_or(0)
}
