//! Typed errors of the lock client.

use std::time::Duration;

use crate::kind::LockKind;
use crate::loss::LossReason;

/// Errors returned by mqlock.
///
/// Every variant that concerns a lock names it, and every variant that concerns the broker names
/// its address (`host:port/vhost`), never the credentials. Each method's `# Errors` section says
/// which variants it returns; the enum is `#[non_exhaustive]`, so match with a wildcard arm.
///
/// A held lock's loss is not an error of any call: it arrives through
/// [`crate::LockGuard::lost`], and only [`crate::LockGuard::release`] turns it into
/// [`Error::Lost`].
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The lock name cannot be used (empty, or contains control characters). Checked before
    /// anything is sent to the broker; [`crate::name::escape`] turns any non-empty bytes into a
    /// valid name.
    #[error("invalid lock name {name:?}: {reason}")]
    InvalidName {
        /// The name as given (truncated to 80 characters).
        name: String,
        /// Why it was refused.
        reason: &'static str,
    },

    /// The broker URL list could not be parsed: a URL is malformed or has no host, or the list
    /// names no URL at all. Returned by [`crate::LockClient::connect`] only.
    #[error("invalid broker URL: {reason}")]
    InvalidUrl {
        /// Why it was refused (never contains the password).
        reason: String,
    },

    /// A configuration value is out of range or inconsistent ([`crate::ClientConfig::validate`]),
    /// an `amqps://` URL was given to a build without the `rustls` feature, or a TLS file of
    /// [`crate::TlsConfig`] cannot be read or holds no PEM certificate. The TLS files are read at
    /// every connection, so a reconnection during an acquisition can return this too.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// The broker could not be reached, or stopped answering.
    ///
    /// From a connection attempt: no address of the URL list completed the TCP connect and the
    /// AMQP handshake (refused, I/O error, no answer within 15 s); with several addresses,
    /// `detail` lists each one's failure. From [`crate::LockClient::status`] and
    /// [`crate::LockClient::break_lock`]: the connection failed under them. From
    /// [`crate::LockGuard::release`]: the release was not answered in time; the lock is released
    /// by the broker when it reads the close, or when the connection ends.
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

    /// The broker refused the login: wrong user name or password (403), or a vhost that does
    /// not exist or that the user may not use (530). Not retried on another address of the URL
    /// list, since every address gets the same credentials.
    #[error(
        "the broker at {addr} refused the login of user {user:?} (check the user name, password and vhost permissions)"
    )]
    AuthRefused {
        /// Broker address.
        addr: String,
        /// The user name presented.
        user: String,
    },

    /// The broker refused an operation on a lock for lack of permission (403 ACCESS_REFUSED).
    /// Taking locks needs configure and read permission on the queue prefix and write
    /// permission on the exchange `amq.default` (every publish goes through it, break requests
    /// included); docs/security.md has the least-privilege set.
    #[error("the broker at {addr} refused access to lock {name:?}: {detail}")]
    AccessRefused {
        /// Lock name.
        name: String,
        /// Broker address.
        addr: String,
        /// The broker's reply text.
        detail: String,
    },

    /// The wait for the lock ended without a grant: returned only by `lock_timeout`
    /// ([`crate::LockClient::lock_timeout`], [`crate::Locker::lock_timeout`]), when its deadline
    /// passed while connecting, waiting in the queue or completing the grant.
    #[error("timed out after {waited:?} waiting for lock {name:?} at {addr}")]
    Timeout {
        /// Lock name.
        name: String,
        /// Broker address.
        addr: String,
        /// How long the caller waited.
        waited: Duration,
    },

    /// The lock was lost while it was held: returned only by [`crate::LockGuard::release`] of a
    /// guard whose loss signal had fired or whose lease had run out before the release
    /// completed, or whose holder task no longer ran (its runtime shut down). An acquisition
    /// never returns it (an interrupted grant is retried).
    #[error("lock {name:?} was lost: {reason}")]
    Lost {
        /// Lock name.
        name: String,
        /// Why the lock was lost.
        reason: LossReason,
    },

    /// One of the lock's queues exists on the broker with arguments that differ from this
    /// client's configuration (queue type, idle expiry, quorum delivery limit), or is a lock
    /// queue declared by an earlier protocol version (`detail` says how to move on). All
    /// clients of one lock must agree.
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

    /// The broker did something the protocol does not expect, or an acquisition gave up: a
    /// epoch queue holds a message that is not an epoch (or more than 64 values), fencing tokens
    /// overflowed, the broker refused to store a break request, a held lock's holder record
    /// names no holder to break, one acquisition was interrupted 200 times (connection lost, queue
    /// expired in between...), or the broker or lapin reported an error that no other variant
    /// covers.
    #[error("protocol error on lock {name:?} at {addr}: {detail}")]
    Protocol {
        /// Lock name.
        name: String,
        /// Broker address.
        addr: String,
        /// What happened.
        detail: String,
    },

    /// Two brokers of the URL list are not nodes of one cluster: each has its own lock queues
    /// and registers, so neither mutual exclusion nor fencing would hold across them.
    ///
    /// Found when the client reconnects to another address than the first one it used (the
    /// cluster marks are compared then); the refused connection is closed. `connect` itself
    /// never returns it.
    #[error(
        "the brokers at {first} and {other} are not one cluster (their cluster marks differ); a URL list must name nodes of one RabbitMQ cluster"
    )]
    NotOneCluster {
        /// The broker the client saw first.
        first: String,
        /// The broker it refused.
        other: String,
    },

    /// This client (the [`crate::LockClient`] or one of its clones) already holds the lock, or
    /// is acquiring it: a second acquisition would register behind the first one and wait for
    /// it, that is for itself. Returned at once by `lock`, `lock_timeout`, `try_lock`,
    /// `lock_with` and `lock_all` (also for a name given twice to `lock_all`); nothing is sent
    /// to the broker. Other clients, in this process or elsewhere, still queue for the lock.
    /// Share one grant among tasks with [`crate::LockTable`], or release the guard first.
    #[error(
        "lock {name:?} is already held or being acquired by this client; a second acquisition would wait behind itself"
    )]
    AlreadyHeld {
        /// Lock name.
        name: String,
    },

    /// The name is used as another kind of lock than this client asked for — a plain lock, a
    /// semaphore or a read-write lock — or as a semaphore (read-write lock) with another number
    /// of permits (readers). The broker refused this client's declaration of the lock's queue,
    /// which records the kind (docs/protocol.md, "Lock kinds"), so nothing was registered and
    /// nothing created. All clients of a name must use it as the same kind with the same count.
    #[error(
        "lock {name:?} at {addr} is {}, but this client asked for {wanted}; all clients of a name must use it as the same kind of lock, with the same number of permits",
        found.map_or_else(|| "a kind of lock this version does not know".to_owned(), |k| k.to_string())
    )]
    KindMismatch {
        /// Lock name.
        name: String,
        /// Broker address.
        addr: String,
        /// The kind this client asked for.
        wanted: LockKind,
        /// The kind the lock's queue records, if this version can read it.
        found: Option<LockKind>,
    },

    /// A semaphore or read-write lock was asked for with no permits, or with more than
    /// [`crate::MAX_PERMITS`]. Nothing was sent to the broker.
    #[error("lock {name:?}: {permits} permits asked for; a semaphore has between 1 and {max}")]
    InvalidPermits {
        /// Lock name.
        name: String,
        /// The number asked for.
        permits: u32,
        /// The most permits a semaphore may have.
        max: u32,
    },

    /// The client was shut down by [`crate::LockClient::close`] (on this handle or a clone):
    /// every later acquisition, `status` and `break_lock` returns it.
    #[error("the lock client was closed")]
    Closed,
}

/// `Result` with mqlock's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
