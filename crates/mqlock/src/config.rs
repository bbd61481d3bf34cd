//! Client configuration.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::lease::{BootClock, Clock};

/// The RabbitMQ queue type of a lock's queues (lock queue, epoch queue, holder record).
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
/// `queue_type`, `idle_expiry` and, on quorum queues, `quorum_delivery_limit` become arguments
/// of a lock's queues: every client of one lock must use the same values, or the broker refuses
/// the later declaration ([`Error::IncompatibleQueue`]). `prefix` is part of the queue names:
/// clients with different prefixes use different queues, so they do not exclude each other at
/// all. [`ClientConfig::validate`] lists the allowed ranges.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// AMQP heartbeat interval (default 5 s, not RabbitMQ's 60 s; 1 s to 600 s, in whole
    /// seconds). The broker drops a silent client after two missed heartbeats; a holder's lease
    /// ends at most `1.5 × heartbeat` after it sent its last renewal that came back through the
    /// lock queue, so it declares its lock lost before the broker can hand it on (also bounded
    /// by `net_ticktime` and `consumer_timeout`; docs/protocol.md, L2). The leases use the
    /// heartbeat the broker negotiates, or this one if the broker disables heartbeats.
    pub heartbeat: Duration,
    /// Lock queue type (default classic).
    pub queue_type: QueueType,
    /// Prefix of every queue name (default `"mqlock."`). Every client of one lock must use the
    /// same prefix: another prefix names other queues, hence another lock.
    pub prefix: String,
    /// An unused lock's queues are deleted by the broker after this long (`x-expires`,
    /// default 1 h). Fencing survives it as long as the clients' wall clocks differ by less than it
    /// (docs/protocol.md, B7 and F3).
    pub idle_expiry: Duration,
    /// The longest time between two renewals of a holder's token, and how often a holder
    /// declares its epoch queue and holder record again so that they do not expire under a
    /// long hold (default 5 min; at least 100 ms, at most half of `idle_expiry`). A holder
    /// renews far more often anyway (three times per lease margin).
    pub renew_interval: Duration,
    /// A waiter republishes a wake-up this often, so a lock whose token was lost (purged by
    /// hand, dropped by a delivery limit) is still handed on (default 10 s).
    pub nudge_interval: Duration,
    /// How long `try_lock` waits for the broker to hand over a lock it found free (default 1 s);
    /// its attempt, grant included, ends at the latest twice this long after the call.
    pub try_window: Duration,
    /// `x-delivery-limit` of quorum queues: lock queues, fence registers, epoch queues and the
    /// cluster mark (default [`DEFAULT_QUORUM_DELIVERY_LIMIT`], about two billion). Classic
    /// queues never get it.
    ///
    /// Every release requeues the token, and a quorum queue drops a message delivered more
    /// often than its limit. RabbitMQ 4.x sets a limit of 20 when none is given; 3.x has none.
    /// `-1` means "no limit" on 4.x only: 3.10 takes it literally and drops every released
    /// token. A large explicit limit means the same on both, and the argument — which the
    /// broker compares on every declaration — does not change when a broker is upgraded or a
    /// cluster mixes versions (docs/compat.md). `None` sends no argument (the broker's default
    /// applies). A dropped token delays the next grant until a waiter's nudge; it never
    /// breaks mutual exclusion. All clients of one lock must use the same value.
    pub quorum_delivery_limit: Option<i64>,
    /// The brokers' `net_ticktime` (Erlang's inter-node failure detector; 60 s by default, and
    /// RabbitMQ's). A cluster node may declare a silent peer down, and hand that peer's locks
    /// on, `0.75 × net_ticktime` after it last heard from it; a holder's lease is therefore
    /// never longer than half of it (docs/protocol.md, L2). Set it to the cluster's value when
    /// the brokers run with a shorter one; a longer value here than on the brokers breaks L2.
    /// A single broker has no peers, but the bound applies anyway (it costs nothing at 60 s).
    pub net_ticktime: Duration,
    /// The brokers' `consumer_timeout` (RabbitMQ's default: 30 min). A holder whose renewals
    /// stop reaching the broker (a resource alarm blocks its connection) keeps an ever older
    /// token, and the broker hands the lock on once that delivery is older than this; the lease
    /// stays below half of it. Set it when the brokers run with a shorter one.
    pub consumer_timeout: Duration,
    /// Name shown for this client's connection in the broker's management tools, and recorded
    /// with every grant ([`crate::HolderInfo::client`]); `None` means `mqlock pid <pid>`.
    pub connection_name: Option<String>,
    /// The clock leases are measured on: [`BootClock`] (`CLOCK_BOOTTIME`, which counts time
    /// the host spent suspended). Tests inject a [`crate::ManualClock`] to simulate a suspend.
    pub clock: Arc<dyn Clock>,
    /// Certificates for `amqps://` URLs (used only with the `rustls` feature).
    pub tls: TlsConfig,
}

/// The default `x-delivery-limit` of quorum lock queues: `i32::MAX` deliveries, which a lock
/// handed on 1 000 times a second reaches after 24 days (and then loses one token, replaced by
/// the next nudge).
pub const DEFAULT_QUORUM_DELIVERY_LIMIT: i64 = i32::MAX as i64;

/// Certificates for `amqps://` broker URLs.
///
/// The broker's certificate is checked against `ca_cert` alone when it is given (the system's
/// CAs are then not trusted), or else against the system's CA bundle (`$SSL_CERT_FILE`,
/// `/etc/ssl/certs/ca-certificates.crt`...); its name is checked against the URL's host (use
/// the name or IP address the certificate was issued for). Needs mqlock's `rustls` cargo feature; without it an `amqps://` URL is refused with
/// [`Error::Config`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsConfig {
    /// PEM file with the CA certificate(s) that signed the broker's certificate; the only CAs
    /// trusted when given.
    pub ca_cert: Option<PathBuf>,
    /// PEM file with a client certificate (and its chain), for brokers that require one
    /// (`ssl_options.verify = verify_peer`, `fail_if_no_peer_cert = true`).
    pub client_cert: Option<PathBuf>,
    /// PEM file with the client certificate's private key (PKCS#8, PKCS#1 or SEC1, not
    /// encrypted). Required with `client_cert`.
    pub client_key: Option<PathBuf>,
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
            quorum_delivery_limit: Some(DEFAULT_QUORUM_DELIVERY_LIMIT),
            net_ticktime: Duration::from_secs(60),
            consumer_timeout: Duration::from_secs(30 * 60),
            connection_name: None,
            clock: Arc::new(BootClock),
            tls: TlsConfig::default(),
        }
    }
}

impl ClientConfig {
    /// Checks ranges and consistency; [`crate::LockClient::connect`] calls it.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when `prefix` contains a control character, starts with `amq.` or is
    /// longer than 208 bytes; `heartbeat` is outside 1 s to 600 s; `idle_expiry` is under 10 s;
    /// `renew_interval` is under 100 ms or over half of `idle_expiry`; only one of
    /// `tls.client_cert` and `tls.client_key` is set; `net_ticktime` is under 2 s;
    /// `consumer_timeout` is under 1 s; or `nudge_interval` is under 100 ms.
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
        if self.tls.client_cert.is_some() != self.tls.client_key.is_some() {
            return Err(Error::Config(
                "a TLS client certificate needs its key, and a key needs its certificate".into(),
            ));
        }
        if self.net_ticktime < Duration::from_secs(2) {
            return Err(Error::Config(format!(
                "net_ticktime must be at least 2 s (Erlang's minimum is 1 s; the lease is half of it), got {:?}",
                self.net_ticktime
            )));
        }
        if self.consumer_timeout < Duration::from_secs(1) {
            return Err(Error::Config(format!(
                "consumer_timeout must be at least 1 s, got {:?}",
                self.consumer_timeout
            )));
        }
        if self.nudge_interval < Duration::from_millis(100) {
            return Err(Error::Config(
                "nudge_interval must be at least 100 ms".into(),
            ));
        }
        Ok(())
    }

    /// A holder's lease margin for a connection whose negotiated heartbeat is `heartbeat`: below
    /// the broker's own failure detection (`2 × heartbeat`), a cluster peer's
    /// (`0.75 × net_ticktime`) and the broker's consumer timeout, with a quarter of the
    /// shortest left for clock rates and scheduling (docs/protocol.md, L2).
    pub(crate) fn lease_margin(&self, heartbeat: Duration) -> Duration {
        (heartbeat * 3 / 2)
            .min(self.net_ticktime / 2)
            .min(self.consumer_timeout / 2)
    }

    /// How often a holder renews its lease: three renewals per margin, so that one lost or
    /// slow renewal does not end it; never less often than `renew_interval`.
    pub(crate) fn renewal_period(&self, heartbeat: Duration) -> Duration {
        (self.lease_margin(heartbeat) / 3).min(self.renew_interval)
    }

    /// The heartbeat in whole seconds, as AMQP negotiates it.
    pub(crate) fn heartbeat_secs(&self) -> u16 {
        self.heartbeat.as_secs().clamp(1, 600) as u16
    }
}
