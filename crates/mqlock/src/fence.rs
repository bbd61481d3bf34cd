//! Fencing tokens: how every grant gets a number larger than every earlier grant's.
//!
//! A token is `epoch << 32 | counter` (docs/protocol.md, "Fencing tokens"). The lock queue
//! carries the latest one: every renewal a holder publishes is stamped with its token, and the
//! holder keeps one of them unacknowledged until its hold ends, when the broker gives it to the
//! next holder, which counts on from the largest stamp it sees (`grant.rs`). Only a grant that
//! is handed no stamp — a new lock, one whose queue expired, one whose transient renewals a
//! broker restart dropped — needs more: a new **epoch**, from the `epoch:` queue, which keeps
//! the lock's epoch as a *persistent* message, written (and synced by the broker before it
//! confirms) only when an epoch starts.
//!
//! The epoch queue is a **max-register** built from a plain queue (invariant F4): a reader
//! takes *every* value (unacknowledged) and uses the largest; a writer publishes a larger value,
//! waits for the confirm, and only then acks what it took. No value leaves the queue before a
//! larger one is stored, whatever happens in between: a crash requeues what was taken, and a
//! late write adds a value that the next reader compares with the others instead of replacing
//! them.
//!
//! Only the lock queue's active consumer runs [`mint`]; it hands the token out only after the
//! broker confirmed the epoch and its lease is valid.

use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::future::join;
use lapin::message::BasicGetMessage;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation};

use crate::config::{ClientConfig, QueueType};
use crate::name::QueueNames;

/// Bits of a token below the epoch.
const COUNTER_BITS: u32 = 32;
const COUNTER_MASK: u64 = (1 << COUNTER_BITS) - 1;
/// Epochs taken from the clock count seconds from 2024-01-01T00:00:00Z, so tokens stay below
/// 2^63 (and fit a signed 64-bit database column) until the 2090s.
const CLOCK_EPOCH_BASE_SECS: u64 = 1_704_067_200;

/// Why a token could not be chosen.
pub(crate) enum FenceError {
    /// The channel or connection failed.
    Amqp(lapin::Error),
    /// The epoch was not stored this time (nacked, e.g. by a quorum queue changing leader, or
    /// the queue vanished in between): the grant is given up and the acquisition retried.
    Transient(String),
    /// The broker answered, but not in a way that lets us hand out a token.
    Refused(String),
}

impl From<lapin::Error> for FenceError {
    fn from(e: lapin::Error) -> Self {
        FenceError::Amqp(e)
    }
}

/// Arguments of the epoch queue: no length limit, so that a value leaves only when its reader
/// acks it after storing a larger one.
///
/// A quorum epoch queue also gets the lock queues' delivery limit: RabbitMQ 4.0–4.2 count every
/// requeue against a default limit of 20.
pub(crate) fn epoch_args(config: &ClientConfig) -> FieldTable {
    let mut args = crate::protocol::common_args(config);
    if let (QueueType::Quorum, Some(limit)) = (config.queue_type, config.quorum_delivery_limit) {
        args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(limit));
    }
    args
}

/// The first token of a new epoch of the lock: one round trip to read the epoch queue, one to
/// store the next epoch durably (`v3::StartEpoch` and `v3::EpochConfirmed` in docs/model.md).
///
/// The caller must be the lock queue's active consumer (it has received a delivery). `last`: a
/// token known to have been granted (the stamp that made the caller the holder, if its counter
/// is exhausted), which the new token must exceed too.
pub(crate) async fn mint(
    channel: &Channel,
    names: &QueueNames,
    config: &ClientConfig,
    last: Option<u64>,
) -> Result<u64, FenceError> {
    Ok(start_epoch(channel, names, &epoch_args(config), last).await? << COUNTER_BITS)
}

/// The next token of the current epoch, unless its counter is exhausted.
pub(crate) fn next_in_epoch(last: u64) -> Option<u64> {
    (last & COUNTER_MASK != COUNTER_MASK).then(|| last + 1)
}

/// The epoch after `stored` (the epoch queue's value) and after the `last` token granted, and
/// never below the clock.
fn following_epoch(stored: Option<u64>, last: Option<u64>, clock: u64) -> Option<u64> {
    let after_stored = stored.map_or(Some(0), |e| e.checked_add(1))?;
    let after_last = last.map_or(0, |t| (t >> COUNTER_BITS) + 1);
    let epoch = after_stored.max(after_last).max(clock).max(1);
    (epoch <= u64::MAX >> COUNTER_BITS).then_some(epoch)
}

/// Moves the lock to a new epoch, durably, and returns it.
async fn start_epoch(
    channel: &Channel,
    names: &QueueNames,
    args: &FieldTable,
    last: Option<u64>,
) -> Result<u64, FenceError> {
    let (stored, taken) = read_all(channel, &names.epoch, args).await?;
    let stored = stored.into_iter().max();
    let epoch = following_epoch(stored, last, clock_epoch())
        .ok_or_else(|| FenceError::Refused("fencing token overflow".into()))?;
    let persistent = BasicProperties::default().with_delivery_mode(2);
    write(channel, &names.epoch, epoch, persistent).await?;
    ack_all(taken).await?;
    Ok(epoch)
}

/// Every value of a max-register, and the messages holding them (to ack once a larger value
/// is confirmed).
type Values = (Vec<u64>, Vec<BasicGetMessage>);

/// More values than this in one queue means something other than mqlock writes to it.
const MAX_VALUES: usize = 64;

/// Declares a max-register and takes all its values (unacknowledged), like [`take_all`].
async fn read_all(channel: &Channel, queue: &str, args: &FieldTable) -> Result<Values, FenceError> {
    let (declared, got) = join(
        channel.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args.clone(),
        ),
        take_all(channel, queue),
    )
    .await;
    declared?;
    got
}

/// Takes every ready value of a max-register known to exist: one `basic.get`, and one more per
/// value the broker says is left (normally none: only a crash between a write and its ack, or
/// a late write, leaves two).
async fn take_all(channel: &Channel, queue: &str) -> Result<Values, FenceError> {
    let mut values = Vec::new();
    let mut taken = Vec::new();
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: false })
        .await?
    {
        let left = message.message_count;
        match parse(&message.delivery.data) {
            Some(v) => values.push(v),
            None => {
                return Err(FenceError::Refused(format!(
                    "{queue} holds a message that is not a token: {:?}",
                    String::from_utf8_lossy(&message.delivery.data)
                )));
            }
        }
        taken.push(message);
        if left == 0 {
            break;
        }
        if taken.len() >= MAX_VALUES {
            return Err(FenceError::Refused(format!(
                "{queue} holds more than {MAX_VALUES} values; something other than mqlock publishes to it"
            )));
        }
    }
    Ok((values, taken))
}

/// The largest value in a queue of decimal values, leaving every value in place (taken, then requeued).
///
/// Used by `status` on the holder record (`identity.rs`), which keeps one value.
pub(crate) async fn peek_max(
    channel: &Channel,
    queue: &str,
) -> Result<Option<(u64, BasicProperties)>, FenceError> {
    let (values, taken) = take_all(channel, queue).await?;
    let latest = values
        .iter()
        .zip(&taken)
        .max_by_key(|(v, _)| **v)
        .map(|(v, m)| (*v, m.delivery.properties.clone()));
    for message in &taken {
        crate::protocol::put_back(message).await?;
    }
    Ok(latest)
}

/// Acks the values a larger, confirmed value replaced. Each is acked on its own: a `multiple`
/// ack would also ack the message the grant holds, delivered on the same channel.
async fn ack_all(taken: Vec<BasicGetMessage>) -> Result<(), FenceError> {
    for message in taken {
        message
            .delivery
            .acker
            .ack(BasicAckOptions::default())
            .await?;
    }
    Ok(())
}

/// Publishes `value` to the epoch queue and waits for the broker's confirm. A persistent
/// message on a durable queue is confirmed only once the broker wrote it to disk.
async fn write(
    channel: &Channel,
    queue: &str,
    value: u64,
    properties: BasicProperties,
) -> Result<(), FenceError> {
    let confirmation = channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            value.to_string().as_bytes(),
            properties,
        )
        .await?
        .await?;
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => Err(FenceError::Transient(format!(
            "{queue} vanished while the fencing token was written"
        ))),
        Confirmation::Nack(_) => Err(FenceError::Transient(format!(
            "the broker refused to store the fencing token in {queue}"
        ))),
        Confirmation::NotRequested => Err(FenceError::Refused(
            "publisher confirms are not enabled".into(),
        )),
    }
}

fn parse(data: &[u8]) -> Option<u64> {
    std::str::from_utf8(data).ok()?.trim().parse().ok()
}

/// The wall clock as an epoch: seconds since [`CLOCK_EPOCH_BASE_SECS`].
fn clock_epoch() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        .saturating_sub(CLOCK_EPOCH_BASE_SECS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_count_up_within_an_epoch() {
        assert_eq!(next_in_epoch(7 << 32), Some((7 << 32) + 1));
        assert_eq!(next_in_epoch((7 << 32) + 41), Some((7 << 32) + 42));
        // An exhausted counter moves to the next epoch instead of carrying into it.
        assert_eq!(next_in_epoch((7 << 32) | COUNTER_MASK), None);
    }

    #[test]
    fn a_new_epoch_is_above_the_stored_one_the_last_token_and_the_clock() {
        let clock = 90_000_000;
        // Fresh lock: the clock.
        assert_eq!(following_epoch(None, None, clock), Some(clock));
        // Stored epoch ahead of the clock (a slow clock, or several epochs in one second).
        assert_eq!(
            following_epoch(Some(clock + 5), None, clock),
            Some(clock + 6)
        );
        // Stamps lost (broker restart) while the epoch survived.
        assert_eq!(
            following_epoch(Some(clock - 100), None, clock - 200),
            Some(clock - 99)
        );
        // Exhausted counter: the stamp's epoch + 1 even if the epoch queue expired.
        let last = ((clock + 10) << 32) | COUNTER_MASK;
        assert_eq!(following_epoch(None, Some(last), clock), Some(clock + 11));
        // A token from the older all-clock format (microseconds) is far below any epoch.
        let old_format = 1_764_000_000_000_000;
        let epoch = following_epoch(None, Some(old_format), clock).unwrap();
        assert!(epoch << 32 > old_format);
        // The epoch cannot overflow into the sign bit of u64 arithmetic.
        assert_eq!(following_epoch(Some(u64::MAX >> 32), None, clock), None);
        assert_eq!(following_epoch(None, None, 0), Some(1));
    }

    #[test]
    fn clock_tokens_fit_a_signed_64_bit_column_for_decades() {
        let now = clock_epoch();
        assert!(now > 60_000_000, "seconds since 2024: {now}");
        // 2090-01-01 is 66 years after the base.
        let in_2090 = 66 * 366 * 24 * 3600;
        assert!(((in_2090 as u64) << 32 | COUNTER_MASK) < i64::MAX as u64);
    }

    #[test]
    fn values_parse_as_decimal_text() {
        assert_eq!(parse(b"123"), Some(123));
        assert_eq!(parse(b" 9\n"), Some(9));
        assert_eq!(parse(b"x"), None);
    }
}
