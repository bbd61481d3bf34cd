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
    for g in guards {
        assert!(!g.is_held());
        assert!(
            g.release().await.is_err(),
            "releasing a lost lock reports the loss"
        );
    }
}
