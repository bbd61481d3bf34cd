//! The broker-facing details of the protocol in `docs/protocol.md`: queue arguments, the
//! wake-up and renewal messages, and how broker errors are classified.

use std::time::{SystemTime, UNIX_EPOCH};

use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, ErrorKind};

use crate::config::{ClientConfig, QueueType};
use crate::loss::LossReason;

/// Prefetch of a lock consumer. The holder keeps one delivery unacknowledged (its token) and
/// needs room for one more, so that wake-ups published by later waiters reach it and are acked
/// away at once instead of piling up in the queue.
pub(crate) const PREFETCH: u16 = 2;

/// Arguments of a lock queue.
pub(crate) fn lock_queue_args(config: &ClientConfig) -> FieldTable {
    let mut args = common_args(config);
    args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    // Every release requeues the token; RabbitMQ 4.x drops a quorum queue's message after 20
    // deliveries unless told otherwise (config.rs, docs/compat.md).
    if let (QueueType::Quorum, Some(limit)) = (config.queue_type, config.quorum_delivery_limit) {
        args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(limit));
    }
    args
}

/// Arguments every queue of a lock carries: its type and its idle expiry.
pub(crate) fn common_args(config: &ClientConfig) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(config.queue_type.as_arg().into()),
    );
    args.insert(
        "x-expires".into(),
        AMQPValue::LongLongInt(config.idle_expiry.as_millis().min(i64::MAX as u128) as i64),
    );
    args
}

/// Properties of a wake-up published by the acquisition with consumer tag `tag`. Transient: a
/// wake-up carries no token (a broker restart drops it, and the waiters publish again when they
/// register again). Its message id names the publisher (`<tag>.w`), so that a holder tells
/// another client's wake-up — somebody wants the lock — from its own.
pub(crate) fn wake_properties(tag: &str) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(1)
        .with_message_id(ShortString::from(wake_id(tag)))
}

/// The message id of the wake-ups of the acquisition with consumer tag `tag`.
pub(crate) fn wake_id(tag: &str) -> String {
    format!("{tag}.w")
}

/// Whether a lock-queue message is a wake-up of another acquisition than `own_tag`'s: plain
/// (no stamp, no break request) and not published by `own_tag` (wake-ups of mqlock before
/// 0.2 carry no id and count as another's).
pub(crate) fn wanted_by_another(properties: &BasicProperties, own_tag: &str) -> bool {
    stamp(properties).is_none()
        && break_request(properties).is_none()
        && properties.message_id().as_ref().is_none_or(|id| {
            id.as_str() != wake_id(own_tag) && !id.as_str().starts_with(&format!("{own_tag}.r."))
        })
}

/// The header in which a holder's lease renewal carries the holder's fencing token.
pub(crate) const STAMP_HEADER: &str = "x-mqlock-fence";

/// Properties of a lease renewal: published by the holder to its own lock queue, it comes back
/// to the holder (the active consumer) and becomes its token. `id` names it among the holder's
/// own messages; the stamp tells any later reader which grant published it (docs/protocol.md,
/// "Hold"). Transient: a renewal is confirmed without a disk write on a classic queue, and after
/// a broker restart the first waiter mints a new token anyway.
pub(crate) fn renewal_properties(id: String, token: u64) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        STAMP_HEADER.into(),
        AMQPValue::LongLongInt(token.min(i64::MAX as u64) as i64),
    );
    BasicProperties::default()
        .with_delivery_mode(1)
        .with_message_id(ShortString::from(id))
        .with_headers(headers)
}

/// The header of a break request (`mqlock break`): the fencing token of the grant to break.
pub(crate) const BREAK_HEADER: &str = "x-mqlock-break";
/// Who sent a break request, and when (milliseconds since 1970).
pub(crate) const BROKEN_BY_HEADER: &str = "x-mqlock-broken-by";
pub(crate) const BROKEN_AT_HEADER: &str = "x-mqlock-broken-at-ms";

/// Properties of a break request for the grant with fencing token `token`.
pub(crate) fn break_properties(token: u64, by: &str, at: SystemTime) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        BREAK_HEADER.into(),
        AMQPValue::LongLongInt(token.min(i64::MAX as u64) as i64),
    );
    headers.insert(BROKEN_BY_HEADER.into(), AMQPValue::LongString(by.into()));
    let ms = at
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
        .min(i64::MAX as u128) as i64;
    headers.insert(BROKEN_AT_HEADER.into(), AMQPValue::LongLongInt(ms));
    BasicProperties::default()
        .with_delivery_mode(1)
        .with_message_id(ShortString::from(format!("break.{token}")))
        .with_headers(headers)
}

/// A break request's target token and the loss it means for that grant's holder.
pub(crate) fn break_request(properties: &BasicProperties) -> Option<(u64, LossReason)> {
    let headers = properties.headers().as_ref()?.inner();
    let token = match headers.get(BREAK_HEADER)? {
        AMQPValue::LongLongInt(v) => u64::try_from(*v).ok()?,
        _ => return None,
    };
    let by = match headers.get(BROKEN_BY_HEADER) {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        _ => "someone".to_owned(),
    };
    let at = match headers.get(BROKEN_AT_HEADER) {
        Some(AMQPValue::LongLongInt(ms)) => {
            UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(*ms).unwrap_or(0))
        }
        _ => SystemTime::now(),
    };
    Some((token, LossReason::Broken { by, at }))
}

/// The fencing token a lock-queue message was stamped with, if a holder published it.
pub(crate) fn stamp(properties: &BasicProperties) -> Option<u64> {
    let headers = properties.headers().as_ref()?;
    match headers.inner().get(STAMP_HEADER)? {
        AMQPValue::LongLongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongUInt(v) => Some(u64::from(*v)),
        AMQPValue::LongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::Timestamp(v) => Some(*v),
        _ => None,
    }
}

/// Microseconds since 1970; makes consumer tags unique across restarts of a process id.
pub(crate) fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// What a broker or connection error means for the operation that hit it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fault {
    /// The connection is gone; a new one may work.
    Connection(String),
    /// 404: a queue vanished (idle expiry) between two steps; declaring again fixes it.
    NotFound(String),
    /// 406 "delivery acknowledgement timed out": the broker's consumer timeout closed the
    /// channel (a grant that could not ack or write in time, e.g. under a resource alarm).
    /// Transient for an acquisition; a loss for a holder.
    ConsumerTimeout(String),
    /// 406 on declare: the queue exists with other arguments. On a held lock: consumer timeout.
    Precondition(String),
    /// 403.
    AccessRefused(String),
    /// Anything else the broker said.
    Other(String),
}

pub(crate) fn classify(e: &lapin::Error) -> Fault {
    match e.kind() {
        ErrorKind::ProtocolError(amqp) => {
            let text = format!("{} {}", amqp.get_id(), amqp.get_message());
            match amqp.kind() {
                AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => Fault::NotFound(text),
                AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
                    if text.contains("delivery acknowledgement") =>
                {
                    Fault::ConsumerTimeout(text)
                }
                AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => Fault::Precondition(text),
                AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => Fault::AccessRefused(text),
                AMQPErrorKind::Hard(_) => Fault::Connection(text),
                AMQPErrorKind::Soft(_) => Fault::Other(text),
            }
        }
        // A channel lapin no longer knows: its connection was closed or is being reset.
        ErrorKind::InvalidChannelState(..) | ErrorKind::InvalidChannel(_) => {
            Fault::Connection(format!("channel closed: {e}"))
        }
        ErrorKind::IOError(_)
        | ErrorKind::MissingHeartbeatError
        | ErrorKind::InvalidConnectionState(_)
        | ErrorKind::RuntimeShutdownError(_) => Fault::Connection(e.to_string()),
        _ => Fault::Other(e.to_string()),
    }
}

/// The loss reason a holder reports for an error on its channel or connection.
pub(crate) fn loss_reason(e: &lapin::Error) -> LossReason {
    match classify(e) {
        Fault::Connection(d) => LossReason::ConnectionLost(d),
        Fault::NotFound(d)
        | Fault::Precondition(d)
        | Fault::ConsumerTimeout(d)
        | Fault::AccessRefused(d)
        | Fault::Other(d) => LossReason::ChannelClosed(d),
    }
}

/// Puts a message taken with `basic.get` back at the head of its queue, for a reader that only
/// looks (the holder record's `peek_max`, the cluster mark).
pub(crate) async fn put_back(message: &lapin::message::BasicGetMessage) -> lapin::Result<bool> {
    message
        .delivery
        .acker
        .nack(lapin::options::BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_renewal_carries_its_token_and_a_wake_up_none() {
        let props = renewal_properties("tag.r.1".into(), (7 << 32) + 3);
        assert_eq!(stamp(&props), Some((7 << 32) + 3));
        assert_eq!(
            props.message_id().as_ref().map(|s| s.as_str()),
            Some("tag.r.1")
        );
        assert_eq!(stamp(&wake_properties("t")), None);
        assert!(wanted_by_another(&wake_properties("t"), "u"));
        assert!(!wanted_by_another(&wake_properties("t"), "t"));
    }
}
