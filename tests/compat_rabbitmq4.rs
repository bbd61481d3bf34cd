//! The core scenarios against RabbitMQ 4.x (Debian trixie's 4.0.5, run from a chroot by
//! `scripts/rabbitmq4.sh` on 127.0.0.1:5674), and what differs from 3.x: quorum queues' default
//! delivery limit (20 on 4.x, none on 3.x), which mqlock replaces with one large explicit
//! limit that means the same on both (`DEFAULT_QUORUM_DELIVERY_LIMIT`; docs/compat.md). Since
//! every grant replaces the token with its own first renewal, the limit no longer reaches
//! mqlock's tokens at all; the argument stays, because the broker compares it on every
//! declaration.
//!
//! The first run builds the chroot (about a minute here, see docs/compat.md); a broker that
//! cannot be started fails these tests.

mod contention;
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use contention::Contention;
use mqlock::{ClientConfig, DEFAULT_QUORUM_DELIVERY_LIMIT, Error, LockClient, QueueType};

fn quorum() -> ClientConfig {
    ClientConfig {
        queue_type: QueueType::Quorum,
        ..ClientConfig::default()
    }
}

async fn client(url: &str, config: ClientConfig) -> LockClient {
    support::init_tracing();
    LockClient::connect(url, config)
        .await
        .expect("connect to the test broker")
}

/// `rabbitmqctl ARGS` (4.x node through the script, or the host's 3.x node).
fn ctl4(args: &[&str]) -> String {
    let out = Command::new(support::root().join("scripts/rabbitmq4.sh"))
        .arg("ctl")
        .args(args)
        .output()
        .expect("scripts/rabbitmq4.sh ctl");
    assert!(
        out.status.success(),
        "rabbitmq4.sh ctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `arguments` column of `list_queues` for one queue.
fn queue_arguments(listing: &str, queue: &str) -> String {
    listing
        .lines()
        .find(|l| l.split('\t').next() == Some(queue))
        .unwrap_or_else(|| panic!("queue {queue} not listed in:\n{listing}"))
        .to_string()
}

/// 8 clients on 8 connections × `rounds` read-modify-write increments of a counter (the
/// shared harness of `tests/contention`): the count must be exact, never two holders inside,
/// fencing tokens strictly increasing in grant order.
async fn eight_clients(url: &str, config: ClientConfig, rounds: usize) {
    let contention = Contention {
        clients: 8,
        rounds,
        pause: Duration::from_micros(200),
    };
    contention::count_exactly(url, config, "compat-mutex", contention).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn classic_eight_clients_count_exactly_on_4x() {
    eight_clients(&support::rabbitmq4_url(), ClientConfig::default(), 30).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quorum_eight_clients_count_exactly_on_4x() {
    eight_clients(&support::rabbitmq4_url(), quorum(), 30).await;
}

/// Two clients hand a quorum lock back and forth `n` times; returns the slowest hand-off.
async fn ping_pong(url: &str, config: ClientConfig, name: &str, n: usize) -> Duration {
    let a = client(url, config.clone()).await;
    let b = client(url, config).await;
    let mut g = a.lock(name).await.unwrap();
    let mut last = g.fencing_token();
    let mut slowest = Duration::ZERO;
    for i in 0..n {
        let next = if i % 2 == 0 { &b } else { &a };
        let waiter = tokio::spawn({
            let next = next.clone();
            let name = name.to_string();
            async move { next.lock(&name).await }
        });
        // Let the waiter register behind the holder. A fixed pause, not a poll of `status`:
        // status requeues the register values it reads, which counts against the quorum
        // delivery limits these tests are about (real broker, so real time).
        tokio::time::sleep(Duration::from_millis(30)).await;
        let t0 = Instant::now();
        g.release().await.unwrap();
        g = tokio::time::timeout(Duration::from_secs(30), waiter)
            .await
            .unwrap_or_else(|_| panic!("hand-off #{i} never completed"))
            .unwrap()
            .unwrap();
        slowest = slowest.max(t0.elapsed());
        assert!(g.fencing_token() > last);
        last = g.fencing_token();
    }
    g.release().await.unwrap();
    slowest
}

#[tokio::test]
async fn quorum_token_survives_many_hand_offs_on_4x() {
    let url = support::rabbitmq4_url();
    // A token dropped by the delivery limit would stall a hand-off until the waiter's next
    // nudge: make that a minute, so a drop cannot hide.
    let config = ClientConfig {
        nudge_interval: Duration::from_secs(60),
        ..quorum()
    };
    let name = support::unique("compat-handoff");
    let slowest = ping_pong(&url, config.clone(), &name, 40).await;
    eprintln!("40 quorum hand-offs on 4.x, slowest {slowest:?}");
    // Real time, real broker. Generous: a dropped token shows as a wait for the next nudge,
    // 60 s here, so 5 s leaves a loaded machine room and still catches it.
    assert!(
        slowest < Duration::from_secs(5),
        "slowest hand-off {slowest:?}"
    );

    let listing = ctl4(&["list_queues", "name", "arguments"]);
    let lock_queue = mqlock::name::queue_names("mqlock.", &name).unwrap().lock;
    let args = queue_arguments(&listing, &lock_queue);
    assert!(
        args.contains(&format!(
            "{{\"x-delivery-limit\",{DEFAULT_QUORUM_DELIVERY_LIMIT}}}"
        )),
        "{args}"
    );
}

#[tokio::test]
async fn the_brokers_default_delivery_limit_no_longer_reaches_the_token_on_4x() {
    let url = support::rabbitmq4_url();
    // Control: 4.x applies a delivery limit of 20 to a quorum queue declared without one. A
    // message taken and requeued again and again is dropped after 20 deliveries.
    let conn = lapin::Connection::connect(&url, Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let control = support::unique("compat-limit-control");
    let mut args = lapin::types::FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("quorum".into()),
    );
    ch.queue_declare(
        control.as_str().into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    ch.basic_publish(
        "".into(),
        control.as_str().into(),
        Default::default(),
        b"token",
        Default::default(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let mut deliveries = 0;
    while deliveries < 30 {
        let Some(m) = ch
            .basic_get(control.as_str().into(), Default::default())
            .await
            .unwrap()
        else {
            break;
        };
        deliveries += 1;
        m.delivery
            .acker
            .nack(lapin::options::BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let _ = ch
        .queue_delete(control.as_str().into(), Default::default())
        .await;
    assert!(
        (19..=21).contains(&deliveries),
        "4.x should drop a message after about 20 deliveries; it made {deliveries}"
    );
    // mqlock without the argument: every grant makes its own first renewal the token and acks
    // the one it was handed (docs/protocol.md, Grant 3), so no token is delivered more than a
    // few times and the default limit never drops one: no hand-off waits for a nudge.
    let config = ClientConfig {
        quorum_delivery_limit: None,
        nudge_interval: Duration::from_secs(60),
        ..quorum()
    };
    let name = support::unique("compat-limit");
    let slowest = ping_pong(&url, config, &name, 30).await;
    eprintln!("30 hand-offs without x-delivery-limit, slowest {slowest:?}");
    assert!(
        slowest < Duration::from_secs(5),
        "a token was dropped and waited for a nudge; slowest {slowest:?}"
    );
}

#[tokio::test]
async fn quorum_on_3x_keeps_its_token_with_the_same_argument() {
    let url = support::amqp_url();
    let name = support::unique("compat-3x");
    let slowest = ping_pong(
        &url,
        ClientConfig {
            nudge_interval: Duration::from_secs(60),
            ..quorum()
        },
        &name,
        30,
    )
    .await;
    assert!(
        slowest < Duration::from_secs(5),
        "slowest hand-off {slowest:?}"
    );
    let listing = support::main_rabbitmqctl(&["list_queues", "name", "arguments"]);
    let lock_queue = mqlock::name::queue_names("mqlock.", &name).unwrap().lock;
    let args = queue_arguments(&listing, &lock_queue);
    assert!(
        args.contains(&format!(
            "{{\"x-delivery-limit\",{DEFAULT_QUORUM_DELIVERY_LIMIT}}}"
        )),
        "{args}"
    );
}

#[tokio::test]
async fn minus_one_on_3x_drops_every_released_token() {
    // Why mqlock does not send 4.x's "no limit" value: RabbitMQ 3.10 takes -1 literally, so
    // every release drops the token and each hand-off waits for a waiter's nudge.
    let config = ClientConfig {
        quorum_delivery_limit: Some(-1),
        nudge_interval: Duration::from_secs(2),
        ..quorum()
    };
    let name = support::unique("compat-minus-one");
    let slowest = ping_pong(&support::amqp_url(), config, &name, 2).await;
    assert!(
        slowest >= Duration::from_millis(1500),
        "3.x kept a token past x-delivery-limit -1? slowest {slowest:?}"
    );
}

#[tokio::test]
async fn the_delivery_limit_is_compared_on_every_declaration() {
    // Which is why the argument must not depend on the broker's version: a lock declared
    // with one value refuses clients that send another (or none), on 3.x and 4.x alike.
    for url in [support::amqp_url(), support::rabbitmq4_url()] {
        let name = support::unique("compat-equiv");
        let ours = client(&url, quorum()).await;
        ours.lock(&name).await.unwrap().release().await.unwrap();
        let other = client(
            &url,
            ClientConfig {
                quorum_delivery_limit: None,
                ..quorum()
            },
        )
        .await;
        let err = other.lock(&name).await.unwrap_err();
        assert!(
            matches!(err, Error::IncompatibleQueue { .. }),
            "{url}: {err}"
        );
        assert!(err.to_string().contains("x-delivery-limit"), "{err}");
    }
}

#[tokio::test]
async fn lock_kinds_are_compared_on_3x_and_4x_with_both_queue_types() {
    // The kind mark (x-max-length-bytes, docs/protocol.md "Lock kinds") must be compared by
    // every supported broker, on classic and quorum queues, and must not limit anything: a
    // semaphore's permits hand over as usual.
    for url in [support::amqp_url(), support::rabbitmq4_url()] {
        for config in [ClientConfig::default(), quorum()] {
            let kind = format!("{url} {:?}", config.queue_type);
            let a = client(&url, config.clone()).await;
            let b = client(&url, config.clone()).await;
            let name = support::unique("compat-kind");
            let sem = a.semaphore(&name, 2).unwrap();
            let p1 = sem.acquire().await.unwrap();
            let p2 = sem.acquire().await.unwrap();
            match b.semaphore(&name, 3).unwrap().try_acquire().await {
                Err(Error::KindMismatch { found, .. }) => assert_eq!(
                    found,
                    Some(mqlock::LockKind::Semaphore { permits: 2 }),
                    "{kind}"
                ),
                other => panic!("{kind}: {other:?}"),
            }
            let err = b.lock(&name).await.unwrap_err();
            assert!(matches!(err, Error::KindMismatch { .. }), "{kind}: {err}");
            let waiter = {
                let sem = b.semaphore(&name, 2).unwrap();
                tokio::spawn(async move { sem.acquire().await })
            };
            let (slot, token) = (p1.slot(), p1.fencing_token());
            p1.release().await.unwrap();
            let next = tokio::time::timeout(Duration::from_secs(20), waiter)
                .await
                .unwrap_or_else(|_| panic!("{kind}: the waiter was not handed the permit"))
                .unwrap()
                .unwrap();
            assert_eq!(next.slot(), slot, "{kind}");
            assert!(next.fencing_token() > token, "{kind}");
            next.release().await.unwrap();
            p2.release().await.unwrap();
        }
    }
}

#[tokio::test]
async fn try_lock_status_timeout_and_incompatible_queue_on_4x() {
    let url = support::rabbitmq4_url();
    for config in [ClientConfig::default(), quorum()] {
        let a = client(&url, config.clone()).await;
        let b = client(&url, config.clone()).await;
        let name = support::unique("compat-basic");
        let g = a.lock(&name).await.unwrap();
        assert!(b.try_lock(&name).await.unwrap().is_none());
        assert!(b.status(&name).await.unwrap().is_held());
        let err = b
            .lock_timeout(&name, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{err}");
        g.release().await.unwrap();
        // The broker answers close-ok before the queue has processed the closed channel's
        // consumer (quorum queues: a Raft command, on 3.x and 4.x alike; a 4.0 classic queue
        // was seen to lag too): try_lock right after another client's release may see the
        // holder for a few milliseconds. docs/compat.md.
        let patience = 20;
        let mut got = None;
        for _ in 0..patience {
            got = b.try_lock(&name).await.unwrap();
            if got.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let g = got.unwrap_or_else(|| panic!("free after release ({:?})", config.queue_type));
        g.release().await.unwrap();
    }
    // A lock declared classic cannot be used as quorum.
    let name = support::unique("compat-mixed");
    let c = client(&url, ClientConfig::default()).await;
    c.lock(&name).await.unwrap().release().await.unwrap();
    let q = client(&url, quorum()).await;
    let err = q.lock(&name).await.unwrap_err();
    assert!(matches!(err, Error::IncompatibleQueue { .. }), "{err}");
}

#[tokio::test]
async fn no_deprecated_broker_feature_is_used_on_4x() {
    // Transient non-exclusive queues and global QoS are deprecated in 4.0 (and refused from
    // 4.3): the broker reports whether anything currently uses them.
    let url = support::rabbitmq4_url();
    let c = client(&url, ClientConfig::default()).await;
    let q = client(&url, quorum()).await;
    let g1 = c.lock(&support::unique("compat-depr")).await.unwrap();
    let g2 = q.lock(&support::unique("compat-depr")).await.unwrap();
    let out = Command::new(support::root().join("scripts/rabbitmq4.sh"))
        .args(["diagnostics", "check_if_any_deprecated_features_are_used"])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    g1.release().await.unwrap();
    g2.release().await.unwrap();
}

/// RabbitMQ 4.0-4.2 count every requeue against a quorum queue's delivery limit (20 by
/// default), and `status` requeues the register values it reads: the registers carry the lock
/// queues' large limit, so a long hold polled by an operator keeps its recorded holder.
#[tokio::test]
async fn many_status_reads_keep_a_quorum_register_on_4x() {
    let url = support::rabbitmq4_url();
    let c = client(&url, quorum()).await;
    let name = support::unique("compat-status");
    let g = c.lock(&name).await.unwrap();
    let token = g.fencing_token();
    for i in 0..30 {
        let s = c.status(&name).await.unwrap();
        let holder = s
            .holder
            .unwrap_or_else(|| panic!("status #{i}: no holder recorded"));
        assert_eq!(holder.token, token);
    }
    g.release().await.unwrap();
    let next = c.lock(&name).await.unwrap();
    assert_eq!(
        next.fencing_token(),
        token + 1,
        "the register kept its value: no new epoch"
    );
    next.release().await.unwrap();
}
