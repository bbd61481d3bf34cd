//! Typed errors of the lock client.

use std::time::Duration;

use crate::guard::LossReason;

/// Errors returned by mqlock.
///
/// Every variant that concerns a lock names it, and every variant that concerns the broker names
/// its address (`host:port/vhost`), never the credentials.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The lock name cannot be used (empty, or contains control characters).
    #[error("invalid lock name {name:?}: {reason}")]
    InvalidName {
        /// The name as given (truncated to 80 characters).
        name: String,
        /// Why it was refused.
        reason: &'static str,
    },

    /// The broker URL could not be parsed.
    #[error("invalid broker URL: {reason}")]
    InvalidUrl {
        /// Why it was refused (never contains the password).
        reason: String,
    },

    /// A configuration value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// No broker address answered.
    #[error("cannot reach the broker at {addr}: {detail}")]
    Unreachable {
        /// Broker address(es) tried.
        addr: String,
        /// What went wrong (I/O error, refused connection...).
        detail: String,
    },

    /// The TLS handshake with the broker failed: its certificate is not signed by a trusted CA
    /// (see [`crate::TlsConfig::ca_cert`]), was not issued for the URL's host, or the port does
    /// not speak TLS.
    #[error("TLS handshake with the broker at {addr} failed: {detail}")]
    Tls {
        /// Broker address.
        addr: String,
        /// What the TLS library reported.
        detail: String,
    },

    /// The broker refused the credentials.
    #[error(
        "the broker at {addr} refused the login of user {user:?} (check the user name, password and vhost permissions)"
    )]
    AuthRefused {
        /// Broker address.
        addr: String,
        /// The user name presented.
        user: String,
    },

    /// The broker refused an operation for lack of permission (403 ACCESS_REFUSED).
    #[error("the broker at {addr} refused access to lock {name:?}: {detail}")]
    AccessRefused {
        /// Lock name.
        name: String,
        /// Broker address.
        addr: String,
        /// The broker's reply text.
        detail: String,
    },

    /// The wait for the lock ended without a grant.
    #[error("timed out after {waited:?} waiting for lock {name:?} at {addr}")]
    Timeout {
        /// Lock name.
        name: String,
        /// Broker address.
        addr: String,
        /// How long the caller waited.
        waited: Duration,
    },

    /// The lock was lost (by the holder, or while it was being acquired).
    #[error("lock {name:?} was lost: {reason}")]
    Lost {
        /// Lock name.
        name: String,
        /// Why the lock was lost.
        reason: LossReason,
    },

    /// The lock's queue exists on the broker with arguments that differ from this client's
    /// configuration (queue type, idle expiry...). All clients of one lock must agree.
    #[error(
        "lock {name:?}: queue {queue:?} at {addr} exists with different arguments ({detail}); all clients of a lock must use the same queue type and idle expiry"
    )]
    IncompatibleQueue {
        /// Lock name.
        name: String,
        /// Queue name on the broker.
        queue: String,
        /// Broker address.
        addr: String,
        /// The broker's reply text.
        detail: String,
    },

    /// The broker or the connection did something the protocol does not expect.
    #[error("protocol error on lock {name:?} at {addr}: {detail}")]
    Protocol {
        /// Lock name (empty for connection-level errors).
        name: String,
        /// Broker address.
        addr: String,
        /// What happened.
        detail: String,
    },

    /// Two brokers of the URL list are not nodes of one cluster: each has its own lock queues
    /// and registers, so neither mutual exclusion nor fencing would hold across them.
    #[error(
        "the brokers at {first} and {other} are not one cluster (their cluster marks differ); a URL list must name nodes of one RabbitMQ cluster"
    )]
    NotOneCluster {
        /// The broker the client saw first.
        first: String,
        /// The broker it refused.
        other: String,
    },

    /// The client was shut down.
    #[error("the lock client was closed")]
    Closed,
}

/// `Result` with mqlock's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
