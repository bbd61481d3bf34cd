//! Typed errors of the cache wrappers.

use std::sync::Arc;
use std::time::Duration;

/// Errors returned by the cache wrappers.
///
/// The type is `Clone` because one load's outcome is handed to every caller that waited for it
/// (single-flight): a loader error reaches all of them as the same value.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The key's distributed lock could not be taken (broker unreachable, lock lost...).
    #[error("cannot lock cache key {key:?}: {source}")]
    Lock {
        /// The cache key.
        key: String,
        /// The lock client's error.
        #[source]
        source: mqlock::Error,
    },

    /// The key's lock was not granted within the configured wait.
    #[error("timed out after {waited:?} waiting for the lock of cache key {key:?}")]
    LockTimeout {
        /// The cache key.
        key: String,
        /// How long the caller waited.
        waited: Duration,
    },

    /// The lock was lost while the write was being prepared, or Redis refused the write because
    /// a later lock holder (with a higher fencing token) has written the key since.
    #[error(
        "write to cache key {key:?} refused: the lock (fencing token {token}) is no longer the newest grant"
    )]
    Fenced {
        /// The cache key.
        key: String,
        /// The fencing token this write carried.
        token: u64,
    },

    /// A Redis command failed (server down, timeout, refused command).
    #[error("redis at {addr}: {detail}")]
    Redis {
        /// Redis address (`host:port`, never the password).
        addr: String,
        /// What went wrong.
        detail: String,
    },

    /// The loader returned an error. It is not cached: the next call runs a loader again.
    #[error("the loader of cache key {key:?} failed: {source}")]
    Loader {
        /// The cache key.
        key: String,
        /// The loader's error.
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync>,
    },

    /// The loader panicked. Like an error, it is not cached and the lock is released.
    #[error("the loader of cache key {key:?} panicked: {message}")]
    LoaderPanicked {
        /// The cache key.
        key: String,
        /// The panic message.
        message: String,
    },

    /// Another node's loader for this key failed while this call was waiting for the lock; its
    /// error is passed on instead of running a second loader for the same request wave.
    #[error("the loader of cache key {key:?} failed on another node: {message}")]
    LoadFailedElsewhere {
        /// The cache key.
        key: String,
        /// The other node's error message.
        message: String,
    },

    /// A value could not be encoded or decoded.
    #[error("cannot {op} the value of cache key {key:?}: {detail}")]
    Codec {
        /// The cache key.
        key: String,
        /// `"encode"` or `"decode"`.
        op: &'static str,
        /// The serde error.
        detail: String,
    },

    /// The invalidation bus is unreachable or could not publish. For a mutation, the shared tier
    /// has already been written: other nodes may serve their old near-cache copy until its
    /// maximum TTL.
    #[error("invalidation bus at {addr}: {detail}")]
    Bus {
        /// Broker address (`host:port/vhost`, never the credentials).
        addr: String,
        /// What went wrong.
        detail: String,
    },

    /// The cache was configured inconsistently.
    #[error("invalid cache configuration: {0}")]
    Config(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn from_lock(key: &str, source: mqlock::Error) -> Self {
        match source {
            mqlock::Error::Timeout { waited, .. } => Error::LockTimeout {
                key: key.to_owned(),
                waited,
            },
            source => Error::Lock {
                key: key.to_owned(),
                source,
            },
        }
    }
}

/// The part of a URL after the credentials: `amqp://u:p@host:5672/%2f` → `host:5672/%2f`.
pub(crate) fn redact_url(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.split('?').next().unwrap_or(rest).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_credentials() {
        assert_eq!(
            redact_url("amqp://guest:secret@10.0.0.1:5672/%2f?heartbeat=5"),
            "10.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("redis://:pw@h:6379/0"), "h:6379/0");
        assert_eq!(redact_url("redis://h:6379/"), "h:6379/");
    }
}
