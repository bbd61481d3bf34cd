//! Basic behaviour of the RabbitMQ lock against the real broker: grant, release, fencing,
//! try_lock, timeouts, FIFO order, status, bad input.

mod support;

use std::time::Duration;

use mqlock::{ClientConfig, Error, LockClient};

#[tokio::test]
async fn grant_release_and_fencing_tokens_grow() {
    let c = support::client().await;
    let name = support::unique("basic");
    let mut last = 0;
    for _ in 0..20 {
        let g = c.lock(&name).await.unwrap();
        assert!(g.is_held());
        assert!(g.fencing_token() > last, "{} <= {last}", g.fencing_token());
        last = g.fencing_token();
        g.release().await.unwrap();
    }
    let m = c.metrics();
    assert_eq!(m.grants, 20);
    assert_eq!(m.releases, 20);
}

#[tokio::test]
async fn try_lock_sees_a_held_lock_and_timeout_expires() {
    let a = support::client().await;
    let b = support::client().await;
    let name = support::unique("try");
    let g = a.lock(&name).await.unwrap();
    assert!(b.try_lock(&name).await.unwrap().is_none());
    let t0 = std::time::Instant::now();
    let err = b
        .lock_timeout(&name, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert!(t0.elapsed() >= Duration::from_millis(300));
    // Real time: the wait talks to the real broker, so tokio's paused clock cannot stand in.
    // The bound is generous for a loaded machine and still catches the overrun it is about: a
    // timeout noticed only at the next nudge (10 s by default) or after a second attempt.
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "overran its timeout: {:?}",
        t0.elapsed()
    );
    // The broker's address (host:port of the URL under test, e.g. 127.0.0.1:5672).
    assert!(err.to_string().contains(&name) && err.to_string().contains(b.broker_addr()));
    let status = b.status(&name).await.unwrap();
    assert!(status.is_held(), "{status:?}");
    assert_eq!(
        status.waiters(),
        0,
        "timed-out waiters must leave: {status:?}"
    );
    let t = g.fencing_token();
    g.release().await.unwrap();
    let g2 = b
        .try_lock(&name)
        .await
        .unwrap()
        .expect("free after release");
    assert!(g2.fencing_token() > t);
}

#[tokio::test]
async fn waiters_are_granted_in_fifo_order() {
    let holder = support::client().await;
    let name = support::unique("fifo");
    let g = holder.lock(&name).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let c = support::client().await;
        let (n, tx) = (name.clone(), tx.clone());
        tasks.push(tokio::spawn(async move {
            let g = c.lock(&n).await.unwrap();
            tx.send((i, g.fencing_token())).unwrap();
            g.release().await.unwrap();
        }));
        // Registration order is the order in which waiters start; wait until the broker saw it.
        let (h, n) = (&holder, &name);
        support::wait_until(
            &format!("the broker to count waiter #{i} ({} waiters)", i + 1),
            Duration::from_secs(20),
            move || async move { h.status(n).await.unwrap().waiters() == i + 1 },
        )
        .await;
    }
    g.release().await.unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    drop(tx);
    let mut order = Vec::new();
    while let Some(x) = rx.recv().await {
        order.push(x);
    }
    let ids: Vec<u32> = order.iter().map(|x| x.0).collect();
    assert_eq!(ids, (0..8).collect::<Vec<_>>());
    assert!(
        order.windows(2).all(|w| w[0].1 < w[1].1),
        "tokens grow in grant order: {order:?}"
    );
}

#[tokio::test]
async fn bad_input_gives_typed_errors() {
    let c = support::client().await;
    assert!(matches!(c.lock("").await, Err(Error::InvalidName { .. })));
    assert!(matches!(
        c.try_lock("a\nb").await,
        Err(Error::InvalidName { .. })
    ));
    // Very long names are mapped, not refused.
    let long = "x".repeat(10_000);
    c.lock(&long).await.unwrap().release().await.unwrap();

    let e = LockClient::connect(
        "amqp://guest:guest@127.0.0.1:1/%2f",
        ClientConfig::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::Unreachable { .. }), "{e}");
    assert!(e.to_string().contains("127.0.0.1:1"), "{e}");

    let e = LockClient::connect(
        "amqp://guest:wrong-secret@127.0.0.1:5672/%2f",
        ClientConfig::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::AuthRefused { .. }), "{e}");
    assert!(
        !e.to_string().contains("wrong-secret"),
        "password leaked: {e}"
    );

    let e = LockClient::connect("http://nope", ClientConfig::default())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidUrl { .. }), "{e}");

    let other = ClientConfig {
        idle_expiry: Duration::from_secs(777),
        ..ClientConfig::default()
    };
    let d = LockClient::connect(&support::amqp_url(), other)
        .await
        .unwrap();
    let name = support::unique("args");
    c.lock(&name).await.unwrap().release().await.unwrap();
    let e = d.lock(&name).await.unwrap_err();
    assert!(matches!(e, Error::IncompatibleQueue { .. }), "{e}");
}

/// A waiter declares the epoch queue and the holder record when it registers; the grant of a
/// lock whose queue hands it a stamp reads neither. If both are deleted in between (by hand:
/// they cannot expire that fast), the waiter is still granted, above the last token.
#[tokio::test]
async fn queues_deleted_while_waiting_do_not_stop_the_grant_and_tokens_still_grow() {
    let a = support::client().await;
    let b = support::client().await;
    let name = support::unique("register");
    let held = a.lock(&name).await.unwrap();
    let first = held.fencing_token();
    let b2 = b.clone();
    let n2 = name.clone();
    let waiter = tokio::spawn(async move { b2.lock(&n2).await });
    // Real time, real broker: the waiter's declarations are pipelined behind its consumer, so
    // no status read shows when they have landed; 300 ms is ample for them.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished());
    let queues = mqlock::name::queue_names(&ClientConfig::default().prefix, &name).unwrap();
    let conn = lapin::Connection::connect(&support::amqp_url(), Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    for queue in [&queues.holder, &queues.epoch] {
        let deleted = ch
            .queue_delete(queue.as_str().into(), Default::default())
            .await
            .unwrap();
        assert!(deleted <= 1, "{queue}: {deleted}");
    }
    held.release().await.unwrap();
    let g = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter is granted")
        .unwrap()
        .unwrap();
    assert!(g.is_held());
    assert!(
        g.fencing_token() > first,
        "{} <= {first}",
        g.fencing_token()
    );
    g.release().await.unwrap();
}

/// H5: a host suspended past its lease (the boot clock jumps, the monotonic clock does not)
/// must see the loss on its first look after the resume, and hand the lock on.
#[tokio::test]
async fn a_holder_resumed_after_a_suspend_knows_its_lease_ended() {
    use std::sync::Arc;
    let clock = Arc::new(mqlock::ManualClock::new(Duration::from_secs(1_000)));
    let suspended = LockClient::connect(
        &support::amqp_url(),
        ClientConfig {
            clock: clock.clone(),
            ..ClientConfig::default()
        },
    )
    .await
    .unwrap();
    let other = support::client().await;
    let name = support::unique("suspend");
    let g = suspended.lock(&name).await.unwrap();
    assert!(g.is_held());
    // An hour of suspend: nothing ran, no timer fired.
    clock.advance(Duration::from_secs(3600));
    assert!(
        !g.is_held(),
        "the lease must have run out on the boot clock"
    );
    let reason = tokio::time::timeout(Duration::from_secs(2), g.lost())
        .await
        .expect("lost() resolves soon after the resume, not a lease later");
    assert!(
        matches!(reason, mqlock::LossReason::LeaseExpired { silent_for } if silent_for >= Duration::from_secs(3000)),
        "{reason:?}"
    );
    // The holder gave the lock back when it noticed; the other client gets it.
    let next = tokio::time::timeout(Duration::from_secs(10), other.lock(&name))
        .await
        .expect("the lock was handed on")
        .unwrap();
    assert!(next.fencing_token() > g.fencing_token());
    next.release().await.unwrap();
    // The loss is counted once, under its reason, although the user's lost() fired the signal
    // before the holder task saw it.
    support::wait_until(
        "the suspended client's metrics to count the lease loss",
        Duration::from_secs(10),
        || async { suspended.metrics().losses > 0 },
    )
    .await;
    let m = suspended.metrics();
    assert_eq!(m.losses, 1, "{m:?}");
    assert!(
        m.losses_by_reason.contains(&("lease_expired", 1)),
        "{:?}",
        m.losses_by_reason
    );
}
