//! Locks kept until they are wanted (`LockOptions::keep`, issue 12) against the real broker: a
//! kept lock comes back to its client at once with its token, is released as soon as another
//! client waits (also when the wait began while it was in use), is never handed out again once
//! lost, and is released at its idle limit, queues and all.

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
