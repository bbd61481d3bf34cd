//! Broker connection options shared by every subcommand.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use mqlock::{ClientConfig, LockClient, QueueType, TlsConfig};

/// How to reach the broker and how lock queues are declared.
#[derive(Args, Debug, Clone)]
pub struct ConnectArgs {
    /// Broker URL; several may be given, comma-separated, and are tried in turn.
    /// Example: amqp://user:pass@rabbit1:5672/%2f, or amqps://user:pass@rabbit1:5671/%2f for TLS.
    /// Prefer the environment variable to the command line for a URL with a password: other
    /// users can see a process's arguments.
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

    /// AMQP heartbeat. A holder's lease lasts 1.5 times this (or half of --net-ticktime, if
    /// shorter): a holder cut off from the broker learns of its loss within that, before the
    /// broker can hand the lock on.
    #[arg(long, env = "MQLOCK_HEARTBEAT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub heartbeat: Duration,

    /// The brokers' Erlang net_ticktime (RabbitMQ's default: 60s). On a cluster, a node cut off
    /// from its peers has its locks handed on after 0.75 times this; the lease stays below half
    /// of it. Give the cluster's value if it runs with a shorter one (scripts/cluster.sh: 10s).
    #[arg(long, env = "MQLOCK_NET_TICKTIME", default_value = "60s", value_parser = humantime::parse_duration)]
    pub net_ticktime: Duration,

    /// PEM file of the CA that signed the broker's certificate, for amqps:// URLs; only this CA
    /// is trusted then (default: the system's CA bundle). Example: --ca-cert /etc/mqlock/ca.pem
    #[arg(long, env = "MQLOCK_CA_CERT", value_name = "PATH")]
    pub ca_cert: Option<PathBuf>,

    /// PEM file of a client certificate, for brokers that ask for one (needs --client-key).
    #[arg(
        long,
        env = "MQLOCK_CLIENT_CERT",
        value_name = "PATH",
        requires = "client_key"
    )]
    pub client_cert: Option<PathBuf>,

    /// PEM file of the client certificate's private key (not encrypted).
    #[arg(
        long,
        env = "MQLOCK_CLIENT_KEY",
        value_name = "PATH",
        requires = "client_cert"
    )]
    pub client_key: Option<PathBuf>,
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
            net_ticktime: self.net_ticktime,
            queue_type: self.queue_type,
            prefix: self.prefix.clone(),
            tls: TlsConfig {
                ca_cert: self.ca_cert.clone(),
                client_cert: self.client_cert.clone(),
                client_key: self.client_key.clone(),
            },
            ..ClientConfig::default()
        }
    }

    /// Connects to the broker.
    pub async fn connect(&self) -> mqlock::Result<LockClient> {
        LockClient::connect(&self.url, self.config()).await
    }
}
