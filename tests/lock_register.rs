//! Tokens carried by the lock queue and the holder's reading of it, against the real broker
//! (docs/protocol.md, F1, Z1 and "Hold"): stamps out of order never lower the next token, a
//! message stamped by a later grant ends a hold, and a lock queue declared by the previous
//! protocol version is refused with the way out.

mod support;

use std::time::Duration;

use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use mqlock::{ClientConfig, Error, LossReason};

async fn raw_channel() -> (Connection, Channel) {
    let conn = Connection::connect(&support::amqp_url(), Default::default())
        .await
        .expect("raw AMQP connection");
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    (conn, ch)
}

async fn publish(ch: &Channel, queue: &str, body: &[u8], props: BasicProperties) {
    ch.basic_publish(
        "".into(),
        queue.into(),
        BasicPublishOptions::default(),
        body,
        props,
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

fn queues(name: &str) -> mqlock::name::QueueNames {
    mqlock::name::queue_names(&ClientConfig::default().prefix, name).unwrap()
}

/// A message stamped below the lock's latest token can sit in the lock queue ahead of it (an
/// earlier holder's renewal that a holder had not acked yet when it released, requeued in its
/// original place). The grant counts from the first delivery, then meets the larger stamp
/// before its own renewal comes back, and counts from that instead (docs/protocol.md, Grant 3).
#[tokio::test]
async fn a_stale_stamp_ahead_of_the_token_never_lowers_the_next_token() {
    let c = support::client().await;
    let name = support::unique("stale-stamp");
    let q = queues(&name);
    // Two grants, so that `t1 - 1` is a token of the same epoch (the first grant's token has
    // counter 0, one below it would be an exhausted counter of the epoch before: a new epoch).
    c.lock(&name).await.unwrap().release().await.unwrap();
    let g = c.lock(&name).await.unwrap();
    let t1 = g.fencing_token();
    g.release().await.unwrap();
    let (_conn, ch) = raw_channel().await;
    ch.queue_purge(q.lock.as_str().into(), Default::default())
        .await
        .unwrap();
    let latest = t1 + 50;
    publish(&ch, &q.lock, b"", stamp(t1 - 1)).await;
    publish(&ch, &q.lock, b"", stamp(latest)).await;
    let second = c.lock(&name).await.unwrap();
    assert_eq!(
        second.fencing_token(),
        latest + 1,
        "the largest stamp in the queue wins, not the first"
    );
    second.release().await.unwrap();
    // The grant acked the stamps it replaced: one message is left, the released token.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let declared = ch
        .queue_declare(
            q.lock.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(declared.message_count(), 1);
}

#[tokio::test]
async fn a_grant_is_above_the_stamp_of_the_message_that_granted_it() {
    let c = support::client().await;
    let name = support::unique("stamp-floor");
    let q = queues(&name);
    let g = c.lock(&name).await.unwrap();
    let t1 = g.fencing_token();
    g.release().await.unwrap();
    let (_conn, ch) = raw_channel().await;
    // A renewal stamped far above the last grant's token is the only message left in the lock
    // queue (the epoch queue deleted by hand too): the next grant must still be above it.
    ch.queue_delete(q.epoch.as_str().into(), Default::default())
        .await
        .unwrap();
    let stamped = t1 + 1000;
    ch.queue_purge(q.lock.as_str().into(), Default::default())
        .await
        .unwrap();
    publish(&ch, &q.lock, b"", stamp(stamped)).await;
    let g = c.lock(&name).await.unwrap();
    assert!(
        g.fencing_token() > stamped,
        "{} <= {stamped}",
        g.fencing_token()
    );
    g.release().await.unwrap();
}

fn stamp(token: u64) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        "x-mqlock-fence".into(),
        AMQPValue::LongLongInt(token as i64),
    );
    BasicProperties::default()
        .with_message_id("someone-else.r.1".into())
        .with_headers(headers)
}

#[tokio::test]
async fn a_later_grants_renewal_ends_the_hold_and_older_ones_do_not() {
    let c = support::client().await;
    let name = support::unique("granted-elsewhere");
    let q = queues(&name);
    let g = c.lock(&name).await.unwrap();
    let token = g.fencing_token();
    let (_conn, ch) = raw_channel().await;
    // Older holders' renewals and wake-ups are extras: the hold goes on.
    publish(&ch, &q.lock, b"", stamp(token - 1)).await;
    publish(&ch, &q.lock, b"", BasicProperties::default()).await;
    // A renewal stamped with our own token by another client: a grant that gave up after
    // counting from a stamp below ours (docs/protocol.md, Z1). The hold goes on.
    publish(&ch, &q.lock, b"", stamp(token)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(g.is_held(), "{:?}", g.loss_reason());
    // A renewal stamped above our token: only a grant that was handed our token stamps one,
    // so the broker handed the lock on at some point (a partition healed, H1).
    publish(&ch, &q.lock, b"", stamp(token + 5)).await;
    let reason = tokio::time::timeout(Duration::from_secs(5), g.lost())
        .await
        .expect("the holder saw the later grant");
    assert_eq!(reason, LossReason::GrantedElsewhere { token: token + 5 });
    assert!(!g.is_held());
    drop(g);
    // Nothing was acked away: the lock is not stuck, and the next grant is above both.
    let next = tokio::time::timeout(Duration::from_secs(10), c.lock(&name))
        .await
        .expect("the lock is granted again")
        .unwrap();
    assert!(next.fencing_token() > token + 5);
    next.release().await.unwrap();
}

/// A lock queue declared by protocol 2 (no kind mark on a plain lock) is refused with the way
/// out, and nothing is registered on it: a client of each protocol on one lock would count
/// tokens differently (docs/protocol.md, "Upgrading from protocol 2").
#[tokio::test]
async fn a_lock_queue_of_the_previous_protocol_is_refused_with_the_way_out() {
    let c = support::client().await;
    let name = support::unique("old-protocol");
    let q = queues(&name);
    let (_conn, ch) = raw_channel().await;
    // What protocol 2 declared for a plain lock: no `x-max-length-bytes` mark.
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("classic".into()),
    );
    args.insert("x-expires".into(), AMQPValue::LongLongInt(3_600_000));
    args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    ch.queue_declare(
        q.lock.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), c.lock(&name))
        .await
        .expect("refused at once, not waited on")
        .unwrap_err();
    match &err {
        Error::IncompatibleQueue { queue, detail, .. } => {
            assert_eq!(queue, &q.lock, "{err}");
            assert!(detail.contains("earlier mqlock"), "{detail}");
            assert!(detail.contains("delete_queue"), "{detail}");
        }
        other => panic!("expected IncompatibleQueue, got {other:?}"),
    }
    // Nothing left behind: no consumer on the lock queue.
    let status = c.status(&name).await.unwrap();
    assert_eq!(status.consumers, 0, "{status:?}");
    // Once the old queue is gone, the lock works.
    ch.queue_delete(q.lock.as_str().into(), Default::default())
        .await
        .unwrap();
    let g = c.lock(&name).await.unwrap();
    g.release().await.unwrap();
}
