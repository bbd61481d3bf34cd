//! Client configuration.

use std::time::Duration;

use crate::error::{Error, Result};

/// The RabbitMQ queue type of lock queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueType {
    /// Classic queues: the default on a single broker.
    #[default]
    Classic,
    /// Quorum queues (Raft-replicated): for clusters.
    Quorum,
}

impl QueueType {
    pub(crate) fn as_arg(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

/// Configuration of a [`crate::LockClient`].
///
/// `queue_type`, `prefix` and `idle_expiry` become arguments of the lock queues: every client of
/// one lock must use the same values, or the broker refuses the later declaration
/// ([`Error::IncompatibleQueue`]).
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// AMQP heartbeat interval (default 5 s, not RabbitMQ's 60 s). The broker drops a silent
    /// client after two missed heartbeats; a holder declares its lock lost after
    /// `1.5 × heartbeat` without an answer from the broker, before the broker can hand it on.
    pub heartbeat: Duration,
    /// Lock queue type (default classic).
    pub queue_type: QueueType,
    /// Prefix of every queue name (default `"mqlock."`).
    pub prefix: String,
    /// An unused lock's queues are deleted by the broker after this long (`x-expires`,
    /// default 1 h). Fencing survives it as long as clocks differ by less than half of it.
    pub idle_expiry: Duration,
    /// A holder refreshes its token this often, so a hold longer than the broker's
    /// `consumer_timeout` (30 min by default) is not cut (default 5 min; must be shorter
    /// than `consumer_timeout`).
    pub renew_interval: Duration,
    /// A waiter republishes a wake-up this often, so a lock whose token was lost (purged by
    /// hand, dropped by a delivery limit) is still handed on (default 10 s).
    pub nudge_interval: Duration,
    /// How long `try_lock` waits for the broker to hand over a lock it found free (default 1 s).
    pub try_window: Duration,
    /// `x-delivery-limit` for quorum lock queues. RabbitMQ 4.x drops a message after 20
    /// deliveries by default; set `Some(-1)` there. Leave `None` on 3.x (no default limit).
    pub quorum_delivery_limit: Option<i64>,
    /// Name shown for this client's connection in the broker's management tools.
    pub connection_name: Option<String>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            heartbeat: Duration::from_secs(5),
            queue_type: QueueType::Classic,
            prefix: "mqlock.".into(),
            idle_expiry: Duration::from_secs(3600),
            renew_interval: Duration::from_secs(300),
            nudge_interval: Duration::from_secs(10),
            try_window: Duration::from_secs(1),
            quorum_delivery_limit: None,
            connection_name: None,
        }
    }
}

impl ClientConfig {
    /// Checks ranges and consistency.
    pub fn validate(&self) -> Result<()> {
        crate::name::validate_prefix(&self.prefix)?;
        if self.heartbeat < Duration::from_secs(1) || self.heartbeat > Duration::from_secs(600) {
            return Err(Error::Config(format!(
                "heartbeat must be between 1 s and 600 s (AMQP counts it in whole seconds), got {:?}",
                self.heartbeat
            )));
        }
        if self.idle_expiry < Duration::from_secs(10) {
            return Err(Error::Config(format!(
                "idle_expiry must be at least 10 s, got {:?}",
                self.idle_expiry
            )));
        }
        if self.renew_interval < Duration::from_millis(100)
            || self.renew_interval * 2 > self.idle_expiry
        {
            return Err(Error::Config(format!(
                "renew_interval must be at least 100 ms and at most half of idle_expiry, got {:?}",
                self.renew_interval
            )));
        }
        if self.nudge_interval < Duration::from_millis(100) {
            return Err(Error::Config(
                "nudge_interval must be at least 100 ms".into(),
            ));
        }
        Ok(())
    }

    /// The heartbeat in whole seconds, as AMQP negotiates it.
    pub(crate) fn heartbeat_secs(&self) -> u16 {
        self.heartbeat.as_secs().clamp(1, 600) as u16
    }
}
