//! The broker-facing details of the protocol in `docs/protocol.md`: queue arguments, the
//! wake-up message, the fence register's encoding, and how broker errors are classified.

use std::time::{SystemTime, UNIX_EPOCH};

use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, ErrorKind};

use crate::config::{ClientConfig, QueueType};
use crate::guard::LossReason;

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

/// Properties of a wake-up (the token is just a wake-up the holder keeps). Persistent, so a
/// token survives a broker restart on a durable queue.
pub(crate) fn wake_properties(message_id: Option<String>) -> BasicProperties {
    let props = BasicProperties::default().with_delivery_mode(2);
    match message_id {
        Some(id) => props.with_message_id(ShortString::from(id)),
        None => props,
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
                AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => Fault::Precondition(text),
                AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => Fault::AccessRefused(text),
                AMQPErrorKind::Hard(_) => Fault::Connection(text),
                AMQPErrorKind::Soft(_) => Fault::Other(text),
            }
        }
        ErrorKind::InvalidChannelState(..) => Fault::Connection(format!("channel closed: {e}")),
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
        Fault::NotFound(d) | Fault::Precondition(d) | Fault::AccessRefused(d) | Fault::Other(d) => {
            LossReason::ChannelClosed(d)
        }
    }
}
