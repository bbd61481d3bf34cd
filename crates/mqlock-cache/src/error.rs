//! Typed errors of the cache wrappers.

use std::sync::Arc;

/// Errors returned by the cache wrappers.
///
/// The type is `Clone` because one load's outcome is handed to every caller that waited for it
/// (single-flight): a loader error reaches all of them as the same value.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The key's distributed lock could not be taken: the core's error, as it is.
    ///
    /// The lock is named `cache/{namespace}/{key}` ([`crate::lock_name`]), so every variant that
    /// names the lock names the key. [`mqlock::Error::Timeout`] when the key's lock was not
    /// granted within [`CacheConfig::lock_timeout`](crate::CacheConfig::lock_timeout) (its
    /// `addr` is the broker's, `"memory"` for a [`mqlock::MemoryLocker`], or says that the wait
    /// ended in this process's queue for the key, behind another task mutating it);
    /// [`mqlock::Error::Unreachable`] and the other connection errors when the broker is down.
    #[error(transparent)]
    Lock(#[from] mqlock::Error),

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

    /// The invalidation bus is unreachable (or its connection settings were refused: `detail` is
    /// then the core's message), or it could not publish. For a mutation, the shared tier has
    /// already been written: other nodes may serve their old near-cache copy until its maximum
    /// TTL.
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

/// The part of a URL after the credentials: `amqp://u:p@host:5672/%2f` → `host:5672/%2f`.
pub(crate) fn redact_url(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.split('?').next().unwrap_or(rest).to_owned()
}

/// [`redact_url`] of each URL of a comma-separated list, joined with `", "`.
pub(crate) fn redact_urls(urls: &str) -> String {
    urls.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(redact_url)
        .collect::<Vec<_>>()
        .join(", ")
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
        assert_eq!(
            redact_urls("amqp://u:secret@h1:5672/%2f, amqp://u:secret@h2/v,"),
            "h1:5672/%2f, h2/v"
        );
    }
}
