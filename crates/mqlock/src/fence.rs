//! Fencing tokens: how every grant gets a number larger than every earlier grant's.
//!
//! A token is `epoch << 32 | counter` (docs/protocol.md, "Fencing"). Two queues per lock hold
//! the state:
//!
//! - the **register** (`fence:`) keeps the last token granted, as a *transient* message: writing
//!   it costs one confirmed round trip and no disk sync, which is what every grant pays;
//! - the **epoch** queue (`epoch:`) keeps the current epoch as a *persistent* message, written
//!   (and synced by the broker before it confirms) only when the register is found empty: on a
//!   lock's first use, after the register expired with an idle lock, and after a broker restart
//!   dropped the transient register.
//!
//! Only the active consumer of the lock queue runs [`record`], and it hands out the token only
//! after the broker confirmed every write; so writes are ordered like grants (invariant F1).

use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::future::join;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation};

use crate::config::ClientConfig;
use crate::name::QueueNames;

/// Bits of a token below the epoch.
const COUNTER_BITS: u32 = 32;
const COUNTER_MASK: u64 = (1 << COUNTER_BITS) - 1;
/// Epochs taken from the clock count seconds from 2024-01-01T00:00:00Z, so tokens stay below
/// 2^63 (and fit a signed 64-bit database column) until the 2090s.
const CLOCK_EPOCH_BASE_SECS: u64 = 1_704_067_200;

/// Why the token could not be recorded.
pub(crate) enum FenceError {
    /// The channel or connection failed.
    Amqp(lapin::Error),
    /// The write was not stored this time (nacked, e.g. by a quorum queue changing leader, or
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

/// Arguments of the register and the epoch queue: each keeps only its newest value
/// (`drop-head`), so a value requeued after a crash is dropped in favour of the one published
/// after it.
pub(crate) fn register_args(common: FieldTable) -> FieldTable {
    let mut args = common;
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(1));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("drop-head".into()),
    );
    args
}

/// Records and returns the fencing token of the grant the caller was just given.
///
/// The caller must be the lock queue's active consumer (it has received a delivery).
/// `register_declared`: the caller declared the register recently enough that it cannot have
/// expired since, so it need not be declared again.
pub(crate) async fn record(
    channel: &Channel,
    names: &QueueNames,
    config: &ClientConfig,
    register_declared: bool,
) -> Result<u64, FenceError> {
    let args = register_args(crate::protocol::common_args(config));
    // Declaring first recreates a register that expired, and resets its idle timer. (If it
    // vanished anyway, the get fails with 404, which closes this channel: the acquisition is
    // retried, and declares again.)
    let (last, old) = if register_declared {
        take(channel, &names.fence).await?
    } else {
        read(channel, &names.fence, &args).await?
    };
    let token = match last.and_then(next_in_epoch) {
        Some(token) => token,
        None => start_epoch(channel, names, &args, last).await? << COUNTER_BITS,
    };
    write(channel, &names.fence, token, false).await?;
    if let Some(old) = old {
        old.delivery.acker.ack(BasicAckOptions::default()).await?;
    }
    Ok(token)
}

/// The next token of the current epoch, unless its counter is exhausted.
fn next_in_epoch(last: u64) -> Option<u64> {
    (last & COUNTER_MASK != COUNTER_MASK).then(|| last + 1)
}

/// The epoch after `stored` (the epoch queue's value) and after the register's `last` token,
/// and never below the clock.
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
    let (stored, old) = read(channel, &names.epoch, args).await?;
    let epoch = following_epoch(stored, last, clock_epoch())
        .ok_or_else(|| FenceError::Refused("fencing token overflow".into()))?;
    write(channel, &names.epoch, epoch, true).await?;
    if let Some(old) = old {
        old.delivery.acker.ack(BasicAckOptions::default()).await?;
    }
    Ok(epoch)
}

/// A one-value queue's value, and the message holding it (to ack once it is replaced).
type OneValue = (Option<u64>, Option<lapin::message::BasicGetMessage>);

/// Declares a one-value queue and takes its value (unacknowledged: acked once the new value
/// is confirmed, so a failure in between leaves the old value in place).
async fn read(channel: &Channel, queue: &str, args: &FieldTable) -> Result<OneValue, FenceError> {
    let (declared, got) = join(
        channel.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args.clone(),
        ),
        take(channel, queue),
    )
    .await;
    declared?;
    got
}

/// Takes the value of a one-value queue known to exist, like [`read`].
async fn take(channel: &Channel, queue: &str) -> Result<OneValue, FenceError> {
    let got = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: false })
        .await?;
    Ok((got.as_ref().and_then(|m| parse(&m.delivery.data)), got))
}

/// Publishes `value` to a one-value queue and waits for the broker's confirm. A persistent
/// message on a durable queue is confirmed only once the broker wrote it to disk.
async fn write(
    channel: &Channel,
    queue: &str,
    value: u64,
    persistent: bool,
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
            BasicProperties::default().with_delivery_mode(if persistent { 2 } else { 1 }),
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
    fn a_new_epoch_is_above_the_stored_one_the_register_and_the_clock() {
        let clock = 90_000_000;
        // Fresh lock: the clock.
        assert_eq!(following_epoch(None, None, clock), Some(clock));
        // Stored epoch ahead of the clock (a slow clock, or several epochs in one second).
        assert_eq!(
            following_epoch(Some(clock + 5), None, clock),
            Some(clock + 6)
        );
        // Register lost (broker restart) while the epoch survived.
        assert_eq!(
            following_epoch(Some(clock - 100), None, clock - 200),
            Some(clock - 99)
        );
        // Exhausted counter: the register's epoch + 1 even if the epoch queue expired.
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
