//! Faults that need a broker of their own (the "faults" broker on port 5673, which tests may
//! restart and which enforces a 3 s consumer timeout checked every second).

mod support;

use std::time::{Duration, Instant};

use mqlock::{ClientConfig, LockClient, LossReason};

fn config() -> ClientConfig {
    ClientConfig {
        heartbeat: Duration::from_secs(2),
        // The faults broker's: the lease (1.5 s) stays below half of it, and a renewal every
        // 0.5 s keeps the token far younger than it.
        consumer_timeout: Duration::from_secs(3),
        ..ClientConfig::default()
    }
}

async fn client(config: ClientConfig) -> LockClient {
    support::init_tracing();
    LockClient::connect(&support::faults_amqp_url(), config)
        .await
        .expect("connect to the faults broker")
}

/// One test function so that the restart cannot disturb the long-hold check.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn faults_broker_scenarios() {
    long_hold_outlives_the_consumer_timeout().await;
    broker_restart_loses_holders_and_waiters_get_the_locks_afterwards().await;
    a_url_list_of_two_standalone_brokers_is_refused_on_failover().await;
}

async fn long_hold_outlives_the_consumer_timeout() {
    let renewing = client(config()).await;
    let a = renewing.lock(&support::unique("long-hold")).await.unwrap();
    // The control: a consumer that keeps one delivery unacknowledged, as a holder that never
    // renewed its token would, is cut by the broker's 3 s consumer timeout.
    let control = support::unique("no-renew");
    let conn = lapin::Connection::connect(&support::faults_amqp_url(), Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        control.as_str().into(),
        lapin::options::QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        Default::default(),
    )
    .await
    .unwrap();
    ch.basic_publish(
        "".into(),
        control.as_str().into(),
        Default::default(),
        b"token",
        Default::default(),
    )
    .await
    .unwrap();
    let mut consumer = ch
        .basic_consume(
            control.as_str().into(),
            "control".into(),
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap();
    use futures_util::StreamExt;
    let held = consumer.next().await.unwrap().unwrap();
    let cut = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match consumer.next().await {
                Some(Err(e)) => break e.to_string(),
                None => break "consumer ended".to_string(),
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .expect("the broker's consumer timeout should have cut the non-renewing consumer");
    assert!(cut.contains("406") || cut.contains("PRECONDITION"), "{cut}");
    drop(held);
    // By then the mqlock holder has swapped its token many times (every lease renewal).
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        a.is_held(),
        "the renewing holder lost its lock: {:?}",
        a.loss_reason()
    );
    a.release().await.unwrap();
}

async fn broker_restart_loses_holders_and_waiters_get_the_locks_afterwards() {
    let names: Vec<String> = (0..3).map(|_| support::unique("restart")).collect();
    let holders = client(config()).await;
    let waiters = client(config()).await;
    let mut guards = Vec::new();
    for n in &names {
        guards.push(holders.lock(n).await.unwrap());
    }
    let mut waiting = Vec::new();
    for n in names.clone() {
        let w = waiters.clone();
        waiting.push(tokio::spawn(async move {
            let g = w.lock_timeout(&n, Duration::from_secs(90)).await;
            (Instant::now(), g)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let watchers: Vec<_> = guards
        .iter()
        .map(|g| {
            let s = g.loss_signal();
            tokio::spawn(async move { (s.lost().await, Instant::now()) })
        })
        .collect();
    let (ahead, ahead_epoch, ahead_token) = lock_with_epoch_ahead_of_the_clock(&holders).await;
    tokio::task::spawn_blocking(|| {
        support::faults_rabbitmqctl(&["stop_app"]);
        support::faults_rabbitmqctl(&["start_app"]);
    })
    .await
    .unwrap();
    let mut lost_at = Vec::new();
    for w in watchers {
        let (reason, at) = tokio::time::timeout(Duration::from_secs(20), w)
            .await
            .expect("holder must see the loss")
            .unwrap();
        assert!(
            matches!(
                reason,
                LossReason::ConnectionLost(_)
                    | LossReason::LeaseExpired { .. }
                    | LossReason::ChannelClosed(_)
            ),
            "{reason:?}"
        );
        lost_at.push(at);
    }
    for (i, w) in waiting.into_iter().enumerate() {
        let (granted_at, g) = w.await.unwrap();
        let g = g.expect("waiter gets the lock after the restart");
        assert!(g.fencing_token() > guards[i].fencing_token());
        assert!(
            granted_at > lost_at[i],
            "new grant before the old holder knew it lost the lock"
        );
        g.release().await.unwrap();
    }
    // Locks keep working for the holders' client too, on a new connection.
    for (i, n) in names.iter().enumerate() {
        let g = holders
            .lock_timeout(n, Duration::from_secs(10))
            .await
            .unwrap();
        assert!(g.fencing_token() > guards[i].fencing_token());
        g.release().await.unwrap();
    }
    // The restart dropped the transient fence register; the next token comes from the durable
    // epoch, not from the clock, which is far behind that epoch here.
    let g = holders
        .lock_timeout(&ahead, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        g.fencing_token() >> 32,
        ahead_epoch + 2,
        "token {} after the restart; before it {ahead_token}",
        g.fencing_token()
    );
    assert!(g.fencing_token() > ahead_token);
    g.release().await.unwrap();
    for g in guards {
        assert!(!g.is_held());
        assert!(
            g.release().await.is_err(),
            "releasing a lost lock reports the loss"
        );
    }
}

/// Seeds a lock's epoch queue with an epoch far ahead of this machine's clock, as a node with
/// a fast clock would have left it, takes the lock once, and returns (name, seeded epoch,
/// token). A client that fell back to its clock after losing the register would go backwards.
async fn lock_with_epoch_ahead_of_the_clock(client: &LockClient) -> (String, u64, u64) {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
    use lapin::types::{AMQPValue, FieldTable};

    let name = support::unique("epoch-ahead");
    let clock_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 1_704_067_200;
    let seeded = clock_epoch + 1_000_000;
    let conn = lapin::Connection::connect(
        &support::faults_amqp_url(),
        lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    // The same arguments the client declares (docs/protocol.md, "The queues of one lock").
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("classic".into()),
    );
    let expiry = client.config().idle_expiry.as_millis() as i64;
    args.insert("x-expires".into(), AMQPValue::LongLongInt(expiry));
    let queue = format!("{}epoch:{name}", client.config().prefix);
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
    ch.basic_publish(
        "".into(),
        queue.as_str().into(),
        BasicPublishOptions::default(),
        seeded.to_string().as_bytes(),
        lapin::BasicProperties::default().with_delivery_mode(2),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let _ = conn.close(200, "seeded".into()).await;

    let g = client.lock(&name).await.unwrap();
    let token = g.fencing_token();
    assert_eq!(
        token >> 32,
        seeded + 1,
        "a new lock moves past the stored epoch"
    );
    g.release().await.unwrap();
    let g = client.lock(&name).await.unwrap();
    assert_eq!(
        g.fencing_token(),
        token + 1,
        "later grants count up in the epoch"
    );
    g.release().await.unwrap();
    (name, seeded, token + 1)
}

/// H2: a URL list whose brokers are not one cluster. The faults broker and the main broker are
/// two standalone brokers; a client that fails over from one to the other must refuse it.
async fn a_url_list_of_two_standalone_brokers_is_refused_on_failover() {
    support::init_tracing();
    let urls = format!("{},{}", support::faults_amqp_url(), support::amqp_url());
    let client = LockClient::connect(&urls, config())
        .await
        .expect("the first broker of the list answers");
    let name = support::unique("not-one-cluster");
    client.lock(&name).await.unwrap().release().await.unwrap();
    // The faults broker goes away: the next acquisition reconnects to the main broker, which
    // has its own queues and registers.
    tokio::task::spawn_blocking(|| support::faults_rabbitmqctl(&["stop_app"]))
        .await
        .unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(60), client.lock(&name)).await;
    tokio::task::spawn_blocking(|| support::faults_rabbitmqctl(&["start_app"]))
        .await
        .unwrap();
    let err = refused
        .expect("refused promptly, not waited on")
        .expect_err("a broker of another cluster must be refused");
    assert!(
        matches!(&err, mqlock::Error::NotOneCluster { first, other } if first.ends_with(":5673") && other.ends_with(":5672")),
        "{err:?}"
    );
}
