//! Which cluster a broker belongs to (docs/protocol.md, "State loss").
//!
//! A URL list must name nodes of one cluster: two standalone brokers each have their own lock
//! queues and registers, so a client failing over from one to the other would find other
//! holders and lower tokens. The client cannot ask a broker for its cluster's name (lapin does
//! not expose the server properties), so it leaves a mark: a durable queue under the prefix
//! holding one message with a random id. Every node of a cluster sees the same queue; another
//! broker has its own, or none. A client with several URLs reads the mark at every connection
//! and refuses a broker whose mark differs from the one it saw first.

use std::time::Duration;

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};

use crate::config::ClientConfig;

/// The mark queue's name under `prefix`. Lock queues are `<prefix>lock:…`, so it never
/// collides with one.
pub(crate) fn queue_name(prefix: &str) -> String {
    format!("{prefix}cluster-mark")
}

/// Reads the mark of the broker behind `connection`, leaving one if there is none.
///
/// Reading takes the message and requeues it at once, so a concurrent reader may find the queue
/// empty for a moment: a reader that finds it empty looks again twice before it leaves its own
/// mark, and the queue accepts only one (`x-max-length = 1`, `reject-publish`).
pub(crate) async fn read(
    connection: &Connection,
    config: &ClientConfig,
) -> lapin::Result<Option<String>> {
    let channel = connection.create_channel().await?;
    let queue = queue_name(&config.prefix);
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(config.queue_type.as_arg().into()),
    );
    // Every read requeues the mark; RabbitMQ 4.0-4.2 count that against a quorum queue's
    // default delivery limit of 20 and would drop it.
    if let (crate::config::QueueType::Quorum, Some(limit)) =
        (config.queue_type, config.quorum_delivery_limit)
    {
        args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(limit));
    }
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(1));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut empty = 0;
    let mut mark = None;
    for _ in 0..12 {
        if let Some(message) = channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
            .await?
        {
            mark = Some(String::from_utf8_lossy(&message.delivery.data).into_owned());
            crate::protocol::put_back(&message).await?;
            break;
        }
        empty += 1;
        if empty < 3 {
            tokio::time::sleep(Duration::from_millis(30)).await;
            continue;
        }
        let mine = format!(
            "{:x}-{:x}",
            crate::protocol::now_micros(),
            std::process::id()
        );
        // Rejected if another client's mark arrived meanwhile: the next get reads that one.
        channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                mine.as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?
            .await?;
        empty = 0;
    }
    let _ = channel.close(200, "cluster mark read".into()).await;
    Ok(mark)
}
