//! Broker connection options shared by every subcommand.

use std::time::Duration;

use clap::Args;
use mqlock::{ClientConfig, LockClient, QueueType};

/// How to reach the broker and how lock queues are declared.
#[derive(Args, Debug, Clone)]
pub struct ConnectArgs {
    /// Broker URL; several may be given, comma-separated, and are tried in turn.
    /// Example: amqp://user:pass@rabbit1:5672/%2f
    #[arg(
        long,
        env = "MQLOCK_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    pub url: String,

    /// Prefix of every lock queue's name. Clients of one lock must use the same prefix.
    #[arg(long, env = "MQLOCK_PREFIX", default_value = "mqlock.")]
    pub prefix: String,

    /// Lock queue type: classic (one broker) or quorum (replicated, for clusters).
    /// Clients of one lock must agree.
    #[arg(long, env = "MQLOCK_QUEUE_TYPE", default_value = "classic", value_parser = parse_queue_type)]
    pub queue_type: QueueType,

    /// AMQP heartbeat; a holder cut off from the broker learns of its loss within 1.5 times this.
    #[arg(long, env = "MQLOCK_HEARTBEAT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub heartbeat: Duration,
}

fn parse_queue_type(s: &str) -> Result<QueueType, String> {
    match s {
        "classic" => Ok(QueueType::Classic),
        "quorum" => Ok(QueueType::Quorum),
        other => Err(format!("unknown queue type {other:?} (classic or quorum)")),
    }
}

impl ConnectArgs {
    /// The client configuration these options describe.
    pub fn config(&self) -> ClientConfig {
        ClientConfig {
            heartbeat: self.heartbeat,
            queue_type: self.queue_type,
            prefix: self.prefix.clone(),
            ..ClientConfig::default()
        }
    }

    /// Connects to the broker.
    pub async fn connect(&self) -> mqlock::Result<LockClient> {
        LockClient::connect(&self.url, self.config()).await
    }
}
