//! Locks kept until they are wanted (`LockOptions::keep`, issue 12) against the real broker: a
//! kept lock comes back to its client at once with its token, is released as soon as another
//! client waits (also when the wait began while it was in use, or before the grant; and not
//! taken back by its own client once wanted), is never handed out again once lost, and is
//! released at its idle limit, queues and all.

mod support;

use std::time::{Duration, Instant};

use mqlock::{ClientConfig, Error, LockClient, LockOptions};

fn keep(keep: Duration) -> LockOptions {
    LockOptions {
        keep: Some(keep),
        timeout: Some(Duration::from_secs(20)),
        ..LockOptions::default()
    }
}

#[tokio::test]
async fn a_kept_lock_comes_back_at_once_and_goes_to_the_first_client_that_waits() {
    let name = support::unique("keep");
    let (a, b) = (support::client().await, support::client().await);
    let held = a
        .lock_with(&name, keep(Duration::from_secs(60)))
        .await
        .unwrap();
    let token = held.fencing_token();
    held.release().await.unwrap();
    assert_eq!(a.kept_locks(), 1);
    assert!(a.status(&name).await.unwrap().is_held(), "kept: still held");
    // Taken back with the same grant (the same token), by any acquisition of the name.
    for _ in 0..3 {
        let again = a
            .lock_with(&name, keep(Duration::from_secs(60)))
            .await
            .unwrap();
        assert_eq!(again.fencing_token(), token);
        assert!(again.is_held());
        assert_eq!(a.kept_locks(), 0);
        drop(again);
        assert_eq!(a.kept_locks(), 1);
    }
    let plain = a.lock(&name).await.unwrap();
    assert_eq!(plain.fencing_token(), token);
    drop(plain); // a plain guard releases
    support::wait_until(
        "the plain guard's release",
        Duration::from_secs(10),
        || async { !a.status(&name).await.unwrap().is_held() },
    )
    .await;
    assert_eq!(a.kept_locks(), 0);

    // Kept again; another client that waits is granted long before the idle limit of 60 s.
    let held = a
        .lock_with(&name, keep(Duration::from_secs(60)))
        .await
        .unwrap();
    let token = held.fencing_token();
    drop(held);
    let asked = Instant::now();
    let theirs = b
        .lock_timeout(&name, Duration::from_secs(20))
        .await
        .unwrap();
    let waited = asked.elapsed();
    assert!(theirs.fencing_token() > token);
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    assert_eq!(a.kept_locks(), 0, "given up when wanted");
    // ... and the first client now waits for it like anyone else.
    let e = a
        .lock_timeout(&name, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    theirs.release().await.unwrap();
    println!("a waiter was granted a kept lock after {waited:?}");
    a.close().await;
    b.close().await;
}

#[tokio::test]
async fn a_lock_wanted_while_in_use_is_released_not_kept() {
    let name = support::unique("keep-wanted");
    let (a, b) = (support::client().await, support::client().await);
    let held = a
        .lock_with(&name, keep(Duration::from_secs(60)))
        .await
        .unwrap();
    let waiter = {
        let (b, name) = (b.clone(), name.clone());
        tokio::spawn(async move { b.lock_timeout(&name, Duration::from_secs(20)).await })
    };
    support::wait_until(
        "the waiter to register",
        Duration::from_secs(20),
        || async { a.status(&name).await.unwrap().waiters() == 1 },
    )
    .await;
    // The waiter's wake-up reached the holder while it was in use; give it a moment.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let token = held.fencing_token();
    held.release().await.unwrap();
    let theirs = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter is granted at the release, not at the idle limit")
        .unwrap()
        .unwrap();
    assert!(theirs.fencing_token() > token);
    assert_eq!(a.kept_locks(), 0);
    theirs.release().await.unwrap();
    a.close().await;
    b.close().await;
}

/// Waiters queued behind a holder that hands the lock to a client that keeps it: their wake-ups
/// went to the earlier holder, so the new holder learns of them from the queue (its consumer
/// count, once per grant) and releases at its first park, not at its idle limit.
#[tokio::test]
async fn waiters_queued_before_a_grant_end_its_park() {
    let name = support::unique("keep-chain");
    let (a, b, c) = (
        support::client().await,
        support::client().await,
        support::client().await,
    );
    let held = a
        .lock_with(&name, keep(Duration::from_secs(60)))
        .await
        .unwrap();
    let spawn_waiter = |client: LockClient| {
        let name = name.clone();
        tokio::spawn(async move {
            let g = client
                .lock_with(&name, keep(Duration::from_secs(60)))
                .await
                .unwrap();
            let at = Instant::now();
            drop(g); // parked, unless wanted
            (client, at)
        })
    };
    let b_waits = spawn_waiter(b);
    support::wait_until("B to wait", Duration::from_secs(20), || async {
        a.status(&name).await.unwrap().waiters() == 1
    })
    .await;
    let c_waits = spawn_waiter(c);
    support::wait_until("C to wait", Duration::from_secs(20), || async {
        a.status(&name).await.unwrap().waiters() == 2
    })
    .await;
    drop(held);
    let (b, b_done) = tokio::time::timeout(Duration::from_secs(20), b_waits)
        .await
        .expect("B granted when A let go")
        .unwrap();
    let (c, c_done) = tokio::time::timeout(Duration::from_secs(20), c_waits)
        .await
        .expect("C granted")
        .unwrap();
    let gap = c_done.saturating_duration_since(b_done);
    println!("C was granted {gap:?} after B let go");
    assert!(
        gap < Duration::from_secs(5),
        "C waited for B's idle limit (or a nudge), not B's release: {gap:?}"
    );
    assert_eq!(b.kept_locks(), 0, "B released the lock C waited for");
    for client in [a, b, c] {
        client.close().await;
    }
}

/// A parked lock that another client waits for is not taken back by its own client, even by
/// an acquisition that comes before the holder task has seen the guard let go: that
/// acquisition queues behind the waiter (a client that locks again and again would otherwise
/// keep the lock from it for good).
#[tokio::test]
async fn a_wanted_lock_is_not_taken_back_by_its_client() {
    let name = support::unique("keep-busy");
    let (a, b) = (support::client().await, support::client().await);
    let held = a
        .lock_with(&name, keep(Duration::from_secs(60)))
        .await
        .unwrap();
    let token = held.fencing_token();
    let waiter = {
        let (b, name) = (b.clone(), name.clone());
        tokio::spawn(async move { b.lock_timeout(&name, Duration::from_secs(20)).await })
    };
    support::wait_until("B to wait", Duration::from_secs(20), || async {
        a.status(&name).await.unwrap().waiters() == 1
    })
    .await;
    // B's wake-up reaches A's holder while the lock is in use (nothing to poll for).
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Let go and lock again at once: the acquisition's first poll, which looks in the park,
    // runs before the holder task has seen the guard let go.
    drop(held);
    let mut again = Box::pin({
        let (a, name) = (a.clone(), name.clone());
        async move {
            a.lock_with(&name, keep(Duration::from_secs(60)))
                .await
                .unwrap()
        }
    });
    tokio::select! {
        biased;
        g = &mut again => panic!("A took its wanted lock back (token {})", g.fencing_token()),
        () = std::future::ready(()) => {}
    }
    let again = tokio::spawn(again);
    let theirs = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("B is granted when A lets go, before A's next acquisition")
        .unwrap()
        .unwrap();
    assert!(theirs.fencing_token() > token);
    assert!(!again.is_finished(), "A's acquisition waits behind B");
    let their_token = theirs.fencing_token();
    drop(theirs);
    let again = tokio::time::timeout(Duration::from_secs(20), again)
        .await
        .expect("A granted after B")
        .unwrap();
    assert!(
        again.fencing_token() > their_token,
        "A's second acquisition is a new grant, after B's"
    );
    drop(again);
    a.close().await;
    b.close().await;
}

#[tokio::test]
async fn a_kept_lock_that_is_lost_is_never_handed_out_again() {
    let name = support::unique("keep-lost");
    let conn_name = support::unique("keep-conn");
    let a = LockClient::connect(
        &support::amqp_url(),
        ClientConfig {
            connection_name: Some(conn_name.clone()),
            ..ClientConfig::default()
        },
    )
    .await
    .unwrap();
    let held = a
        .lock_with(&name, keep(Duration::from_secs(60)))
        .await
        .unwrap();
    let token = held.fencing_token();
    let signal = held.loss_signal();
    drop(held);
    assert_eq!(a.kept_locks(), 1);
    // The broker closes the client's connection (as for a network cut it detected).
    let listing = support::main_rabbitmqctl(&["list_connections", "pid", "client_properties"]);
    let pid = listing
        .lines()
        .find(|l| l.contains(&conn_name))
        .and_then(|l| l.split('\t').next())
        .unwrap_or_else(|| panic!("connection {conn_name} not listed:\n{listing}"))
        .to_owned();
    support::main_rabbitmqctl(&["close_connection", &pid, "test: connection killed"]);
    tokio::time::timeout(Duration::from_secs(10), signal.lost())
        .await
        .expect("the kept lock's loss is signalled");
    support::wait_until(
        "the lost lock to leave the park",
        Duration::from_secs(10),
        || async { a.kept_locks() == 0 },
    )
    .await;
    let fresh = a
        .lock_with(&name, keep(Duration::from_secs(60)))
        .await
        .unwrap();
    assert!(
        fresh.fencing_token() > token,
        "a fresh grant, not the lost one: {} <= {token}",
        fresh.fencing_token()
    );
    drop(fresh);
    a.close().await;
}

#[tokio::test]
async fn kept_locks_are_released_at_their_idle_limit() {
    const LOCKS: usize = 50;
    let a = support::client().await;
    let names: Vec<String> = (0..LOCKS).map(|_| support::unique("keep-idle")).collect();
    for name in &names {
        let g = a
            .lock_with(name, keep(Duration::from_secs(2)))
            .await
            .unwrap();
        drop(g);
    }
    assert_eq!(a.kept_locks(), LOCKS);
    support::wait_until(
        "every kept lock to reach its idle limit",
        Duration::from_secs(30),
        || async { a.kept_locks() == 0 },
    )
    .await;
    let probe = support::client().await;
    for name in &names {
        support::wait_until(
            "the broker to see the release",
            Duration::from_secs(10),
            || async { !probe.status(name).await.unwrap().is_held() },
        )
        .await;
    }
    a.close().await;
    probe.close().await;
}

#[tokio::test]
async fn keep_and_a_hold_limit_are_refused_together() {
    let a = support::client().await;
    let options = LockOptions {
        keep: Some(Duration::from_secs(1)),
        max_hold: Some(Duration::from_secs(1)),
        ..LockOptions::default()
    };
    let e = a.lock_with("never-taken", options).await.unwrap_err();
    assert!(matches!(e, Error::Config(_)), "{e}");
    a.close().await;
}
