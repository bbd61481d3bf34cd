//! The recipes of issue 13 that sit on the mutex itself, against the real broker: one
//! acquisition per name and client (`Error::AlreadyHeld`), the hold limit
//! (`LockOptions::max_hold`, `LossReason::HoldLimit`) and the multi-lock (`lock_all`).

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mqlock::{Error, LockClient, LockOptions, LossReason};
use rand::seq::SliceRandom;

async fn wait_for_waiters(probe: &LockClient, name: &str, n: u32) {
    support::wait_until(
        &format!("the broker to count {n} waiter(s) on {name}"),
        Duration::from_secs(20),
        move || async move { probe.status(name).await.unwrap().waiters() == n },
    )
    .await;
}

fn already_held(r: &mqlock::Result<impl std::fmt::Debug>, name: &str) -> bool {
    matches!(r, Err(Error::AlreadyHeld { name: n }) if n == name)
}

#[tokio::test]
async fn a_client_never_waits_behind_itself_but_other_clients_still_queue() {
    let a = support::client().await;
    let b = support::client().await;
    let name = support::unique("self");
    let held = a.lock(&name).await.unwrap();

    // Every way of asking again, through the client or a clone, fails at once. (1 s is a
    // generous bound for a check that sends nothing; a wait behind itself would never end.)
    let asked = Instant::now();
    assert!(already_held(&a.lock(&name).await, &name));
    let clone = a.clone();
    assert!(already_held(
        &clone.lock_timeout(&name, Duration::from_secs(30)).await,
        &name
    ));
    assert!(already_held(&clone.try_lock(&name).await, &name));
    assert!(already_held(
        &clone.lock_with(&name, LockOptions::default()).await,
        &name
    ));
    assert!(already_held(
        &a.lock_all(&[name.as_str()], Duration::from_secs(30)).await,
        &name
    ));
    let e = a.lock(&name).await.unwrap_err();
    assert!(e.to_string().contains("wait behind itself"), "{e}");
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );

    // Another client of this process queues at the broker as before.
    let waiter = {
        let (b, name) = (b.clone(), name.clone());
        tokio::spawn(async move { b.lock(&name).await })
    };
    wait_for_waiters(&a, &name, 1).await;
    assert!(
        !waiter.is_finished(),
        "the other client waits for the holder"
    );
    // While it is acquiring, the waiting client cannot ask again either.
    let asked = Instant::now();
    assert!(already_held(&b.try_lock(&name).await, &name));
    assert!(asked.elapsed() < Duration::from_secs(1));

    let first = held.fencing_token();
    held.release().await.unwrap();
    let g = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the other client is granted after the release")
        .unwrap()
        .unwrap();
    assert!(g.fencing_token() > first);

    // A failed acquisition gives the name back: the client can wait again.
    assert!(matches!(
        a.lock_timeout(&name, Duration::from_millis(300)).await,
        Err(Error::Timeout { .. })
    ));
    let again = {
        let (a, name) = (a.clone(), name.clone());
        tokio::spawn(async move { a.lock(&name).await })
    };
    wait_for_waiters(&b, &name, 1).await;
    let second = g.fencing_token();
    drop(g); // a dropped guard gives the name back too
    let g = tokio::time::timeout(Duration::from_secs(10), again)
        .await
        .expect("the first client locks the name again")
        .unwrap()
        .unwrap();
    assert!(g.fencing_token() > second);
    g.release().await.unwrap();
    // A dropped acquisition gives the name back.
    let blocker = b.lock(&name).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(200), a.lock(&name))
            .await
            .is_err()
    );
    drop(blocker);
    a.lock_timeout(&name, Duration::from_secs(10))
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
}

#[tokio::test]
async fn a_hold_limit_gives_the_lock_up_and_says_why() {
    let a = support::client().await;
    let b = support::client().await;
    let name = support::unique("hold-limit");
    let limit = Duration::from_secs(2);
    let g = a
        .lock_with(
            &name,
            LockOptions {
                max_hold: Some(limit),
                ..LockOptions::default()
            },
        )
        .await
        .unwrap();
    let granted = Instant::now();
    let waiter = {
        let (b, name) = (b.clone(), name.clone());
        tokio::spawn(async move { b.lock(&name).await })
    };
    wait_for_waiters(&a, &name, 1).await;
    let reason = tokio::time::timeout(Duration::from_secs(10), g.lost())
        .await
        .expect("the hold limit fires");
    let at = granted.elapsed();
    assert_eq!(reason, LossReason::HoldLimit { limit });
    // Not before the limit; the upper bound is generous for a loaded machine.
    assert!(
        at >= limit - Duration::from_millis(50) && at < limit + Duration::from_millis(1500),
        "{at:?}"
    );
    assert!(!g.is_held());
    let next = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("the waiter is granted shortly after the limit")
        .unwrap()
        .unwrap();
    let handed_on = granted.elapsed();
    assert!(next.fencing_token() > g.fencing_token());
    let first = g.fencing_token();
    match g.release().await {
        Err(Error::Lost { reason, .. }) => assert_eq!(reason, LossReason::HoldLimit { limit }),
        other => panic!("release after the limit: {other:?}"),
    }
    assert!(a.metrics().losses_by_reason.contains(&("hold_limit", 1)));
    next.release().await.unwrap();
    // Without a limit the hold outlives it; the name is free for the client again.
    let g = a.lock_with(&name, LockOptions::default()).await.unwrap();
    assert!(g.fencing_token() > first);
    tokio::time::sleep(limit + Duration::from_millis(500)).await;
    assert!(g.is_held());
    g.release().await.unwrap();
    eprintln!("hold limit fired at {at:?}, next holder granted at {handed_on:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlapping_multi_locks_in_random_order_never_deadlock_nor_overlap() {
    const CLIENTS: usize = 8;
    const ROUNDS: usize = 1000;
    let base = support::unique("multi");
    let names: Arc<Vec<String>> = Arc::new((0..5).map(|i| format!("{base}-{i}")).collect());
    // Per name: (someone inside, count).
    let state: Arc<Mutex<HashMap<String, (bool, u64)>>> = Arc::default();
    let started = Instant::now();
    let mut tasks = Vec::new();
    // 1 000 rounds split over the clients (125 each).
    const _: () = assert!(ROUNDS.is_multiple_of(CLIENTS));
    for _ in 0..CLIENTS {
        let client = support::client().await;
        let (names, state) = (names.clone(), state.clone());
        let rounds = ROUNDS / CLIENTS;
        tasks.push(tokio::spawn(async move {
            // This client's own increments, per name: the shared counters must add up to them.
            let mut mine: HashMap<String, u64> = HashMap::new();
            for _ in 0..rounds {
                let pair: Vec<String> = {
                    let mut rng = rand::rng();
                    let mut all: Vec<&String> = names.iter().collect();
                    all.shuffle(&mut rng);
                    all[..2].iter().map(|s| (*s).clone()).collect()
                };
                let guards = client
                    .lock_all(&pair, Duration::from_secs(120))
                    .await
                    .expect("lock_all within the timeout");
                for (g, n) in guards.iter().zip(&pair) {
                    assert_eq!(g.name(), n, "guards in the caller's order");
                }
                // Read-modify-write with a yield in between: a second holder inside would
                // either trip the flag or lose an increment.
                let mut read = Vec::new();
                for n in &pair {
                    let mut s = state.lock().unwrap();
                    let e = s.entry(n.clone()).or_default();
                    assert!(!e.0, "two holders inside {n}");
                    e.0 = true;
                    read.push(e.1);
                }
                tokio::task::yield_now().await;
                for (n, v) in pair.iter().zip(read) {
                    let mut s = state.lock().unwrap();
                    let e = s.get_mut(n).unwrap();
                    assert!(e.0, "{n}: the inside flag was cleared by someone else");
                    e.1 = v + 1;
                    e.0 = false;
                    *mine.entry(n.clone()).or_default() += 1;
                }
                for g in guards {
                    g.release().await.unwrap();
                }
            }
            (rounds, mine)
        }));
    }
    // Generous: a deadlock never ends, a loaded machine takes a minute at worst.
    let (rounds, expected) = tokio::time::timeout(Duration::from_secs(600), async {
        let mut total = 0;
        let mut expected: HashMap<String, u64> = HashMap::new();
        for t in tasks {
            let (rounds, mine) = t.await.unwrap();
            total += rounds;
            for (n, k) in mine {
                *expected.entry(n).or_default() += k;
            }
        }
        (total, expected)
    })
    .await
    .expect("no deadlock: every round ends within the bound");
    assert_eq!(rounds, ROUNDS);
    let state = state.lock().unwrap();
    assert!(state.values().all(|(inside, _)| !inside));
    let counts: HashMap<String, u64> = state.iter().map(|(n, (_, k))| (n.clone(), *k)).collect();
    assert_eq!(counts, expected, "no increment lost");
    let taken: u64 = counts.values().sum();
    assert_eq!(taken, 2 * ROUNDS as u64);
    eprintln!(
        "{ROUNDS} rounds, {taken} grants, over {CLIENTS} clients in {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_multi_lock_that_times_out_leaves_nothing_held() {
    let a = support::client().await;
    let holder = support::client().await;
    let other = support::client().await;
    let base = support::unique("multi-timeout");
    let (x, y, z) = (
        format!("{base}-a"),
        format!("{base}-b"),
        format!("{base}-c"),
    );
    let held = holder.lock(&z).await.unwrap();
    let started = Instant::now();
    let e = a
        .lock_all(&[&z, &x, &y], Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::Timeout { ref name, waited, .. } if *name == z && waited >= Duration::from_secs(1)),
        "{e:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // The names it took on the way are free again, for another client and for itself.
    for n in [&x, &y] {
        let g = other
            .try_lock(n)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{n} was left held"));
        g.release().await.unwrap();
    }
    assert!(already_held(
        &a.lock_all(&[&x, &y, &x], Duration::from_secs(1)).await,
        &x
    ));
    held.release().await.unwrap();
    let all = a
        .lock_all(&[&z, &x, &y], Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        all.iter().map(|g| g.name()).collect::<Vec<_>>(),
        [&z, &x, &y]
    );
    for g in all {
        g.release().await.unwrap();
    }
}
