//! The fence register and the holder's reading of its lock queue, against the real broker
//! (docs/protocol.md, F4 and "Hold"): writes that arrive late or out of order never lower the
//! next token, a message stamped by a later grant ends a hold, and a register declared by the
//! previous protocol version is refused with the way out.

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

#[tokio::test]
async fn late_and_requeued_register_writes_never_lower_the_next_token() {
    let c = support::client().await;
    let name = support::unique("late-write");
    let q = queues(&name);
    let first = c.lock(&name).await.unwrap();
    let t1 = first.fencing_token();
    first.release().await.unwrap();
    let (_conn, ch) = raw_channel().await;
    // A holder deposed while it recorded writes its value after a newer grant's: lower, and
    // then the same again (a crash between its write and its ack requeues the old one too).
    publish(&ch, &q.fence, b"7", BasicProperties::default()).await;
    publish(
        &ch,
        &q.fence,
        (t1 - 1).to_string().as_bytes(),
        BasicProperties::default(),
    )
    .await;
    let second = c.lock(&name).await.unwrap();
    assert_eq!(
        second.fencing_token(),
        t1 + 1,
        "the register's largest value wins, not its last or first"
    );
    second.release().await.unwrap();
    // The register holds one value again: the grant took all three and acked them.
    let declared = ch
        .queue_declare(
            q.fence.as_str().into(),
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
    // A renewal of a holder whose register write was lost (a register deleted by hand) is the
    // only message left in the lock queue: the next grant must still be above its stamp.
    ch.queue_delete(q.fence.as_str().into(), Default::default())
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
async fn a_later_grants_renewal_ends_the_hold_and_a_given_up_grants_does_not() {
    let c = support::client().await;
    let name = support::unique("granted-elsewhere");
    let q = queues(&name);
    let g = c.lock(&name).await.unwrap();
    let token = g.fencing_token();
    let (_conn, ch) = raw_channel().await;
    // Older holders' renewals and wake-ups are extras: the hold goes on.
    publish(&ch, &q.lock, b"", stamp(token - 1)).await;
    publish(&ch, &q.lock, b"", BasicProperties::default()).await;
    // A renewal stamped above our token whose write never reached the register: a grant that
    // gave up. The holder asks the register, finds its own token on top, and holds on.
    publish(&ch, &q.lock, b"", stamp(token + 3)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(g.is_held(), "{:?}", g.loss_reason());
    // A later grant recorded its token, and its renewal reaches this holder: the broker
    // handed the lock on at some point (a partition healed, H1).
    publish(
        &ch,
        &q.fence,
        (token + 5).to_string().as_bytes(),
        BasicProperties::default(),
    )
    .await;
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

#[tokio::test]
async fn a_register_of_the_previous_version_is_refused_with_the_way_out() {
    let c = support::client().await;
    let name = support::unique("old-register");
    let q = queues(&name);
    let (_conn, ch) = raw_channel().await;
    // mqlock 0.1 declared the register with a length limit of one and drop-head.
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("classic".into()),
    );
    args.insert("x-expires".into(), AMQPValue::LongLongInt(3_600_000));
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(1));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("drop-head".into()),
    );
    ch.queue_declare(
        q.fence.as_str().into(),
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
            assert_eq!(queue, &q.fence, "{err}");
            assert!(detail.contains("delete_queue"), "{detail}");
        }
        other => panic!("expected IncompatibleQueue, got {other:?}"),
    }
    // Nothing left behind: no consumer on the lock queue.
    let status = c.status(&name).await.unwrap();
    assert_eq!(status.consumers, 0, "{status:?}");
    // Once the old register is gone, the lock works.
    ch.queue_delete(q.fence.as_str().into(), Default::default())
        .await
        .unwrap();
    let g = c.lock(&name).await.unwrap();
    g.release().await.unwrap();
}
