//! Faults that need a broker of their own (the "faults" broker on port 5673, which tests may
//! restart and which enforces a 3 s consumer timeout checked every second).

mod support;

use std::time::{Duration, Instant};

use mqlock::{ClientConfig, LockClient, LossReason};

fn config() -> ClientConfig {
    ClientConfig {
        heartbeat: Duration::from_secs(2),
        // Shorter than the faults broker's 3 s consumer timeout.
        renew_interval: Duration::from_secs(1),
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
}

async fn long_hold_outlives_the_consumer_timeout() {
    let renewing = client(config()).await;
    let not_renewing = client(ClientConfig {
        renew_interval: Duration::from_secs(3600),
        idle_expiry: Duration::from_secs(3 * 3600),
        ..config()
    })
    .await;
    let a = renewing.lock(&support::unique("long-hold")).await.unwrap();
    let b = not_renewing
        .lock(&support::unique("no-renew"))
        .await
        .unwrap();
    // The control: without renewal the broker's 3 s consumer timeout must cut the hold.
    let lost = tokio::time::timeout(Duration::from_secs(15), b.lost())
        .await
        .expect("the broker's consumer timeout should have cut the non-renewing holder");
    assert!(
        matches!(&lost, LossReason::ChannelClosed(d) if d.contains("406")),
        "{lost:?}"
    );
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
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(1));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("drop-head".into()),
    );
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
