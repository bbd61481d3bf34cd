//! Typed errors of the database adapters.

use std::path::PathBuf;

use mqlock::LossReason;

/// Errors returned by mqlock-db.
///
/// Database URLs in messages never contain the password.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Taking or holding the distributed lock failed: broker unreachable, wait timed out
    /// ([`mqlock::Error::Timeout`] after the configured `lock_timeout`), invalid lock name, or
    /// the lock lost ([`mqlock::Error::Lost`]) while it was being acquired or during a
    /// migration run. Every adapter of mqlock wraps the core's errors this way.
    #[error(transparent)]
    Lock(#[from] mqlock::Error),

    /// Another holder with a newer fencing token has already written to the resource: this
    /// holder's lock was taken over while it was stalled. The transaction was rolled back.
    #[error(
        "stale fencing token {token} for {resource:?}: the fence table already records token {recorded} from a newer holder; the transaction was rolled back"
    )]
    StaleFence {
        /// The fenced resource (the lock name).
        resource: String,
        /// This holder's token.
        token: u64,
        /// The token recorded by the newer holder.
        recorded: i64,
    },

    /// A fenced transaction's lock was lost after the transaction began and before it was
    /// committed; the transaction was rolled back and nothing of it was committed.
    ///
    /// Why this is not [`Error::Lock`] with [`mqlock::Error::Lost`]: the core's variant says
    /// only that a lock was lost, which [`TxRunner::run`](crate::TxRunner::run) also returns
    /// (as `Lock(Lost)`) when the lock is lost while it is being acquired, before any
    /// transaction exists. This one says more: the transaction had begun (its work may have run)
    /// and was rolled back. The migration runner, which has no such transaction to report,
    /// returns the core's `Lock(Lost)`.
    #[error("lock {name:?} was lost before commit ({reason}); the transaction was rolled back")]
    LostBeforeCommit {
        /// Lock name.
        name: String,
        /// Why the lock was lost.
        reason: LossReason,
    },

    /// The database URL is malformed or names a database this crate does not support.
    #[error("invalid database URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL without its password.
        url: String,
        /// Why it was refused.
        reason: String,
    },

    /// The database could not be reached or refused the connection.
    #[error("cannot connect to the database at {url}: {source}")]
    Connect {
        /// The URL without its password.
        url: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },

    /// A database statement failed.
    #[error("database error while {context}: {source}")]
    Database {
        /// What was being done.
        context: &'static str,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },

    /// The closure run in a fenced transaction failed; the transaction was rolled back.
    #[error("the transaction's work failed (rolled back): {0}")]
    Work(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),

    /// The fencing token does not fit a signed 64-bit column.
    #[error("fencing token {0} does not fit a BIGINT column")]
    TokenOutOfRange(u64),

    /// The fence table name is not a plain SQL identifier.
    #[error(
        "invalid fence table name {0:?}: use letters, digits and '_' (not starting with a digit), at most 63 characters"
    )]
    InvalidTableName(String),

    /// The migrations directory does not exist, is not a directory or cannot be read.
    #[error("cannot read migrations from {path}: {detail}")]
    MigrationSource {
        /// The directory given.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },

    /// A migration failed; it was rolled back (as far as the database's transactional DDL
    /// allows) and the lock was released.
    #[error("migration {version} ({description}) failed: {source}")]
    MigrationFailed {
        /// Version of the failing migration.
        version: i64,
        /// Its description (from the file name).
        description: String,
        /// Migrations this run applied before the failure, in order.
        applied_before: Vec<i64>,
        /// The database's error.
        #[source]
        source: sqlx::migrate::MigrateError,
    },

    /// The database's migration history does not agree with the migration source (a migration
    /// was edited or removed after it was applied, or a previous failure left it dirty).
    #[error("the migration history does not match the migrations directory: {0}")]
    MigrationHistory(#[source] sqlx::migrate::MigrateError),
}

impl Error {
    /// Wraps an application error returned from inside a fenced transaction.
    pub fn work(err: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        Error::Work(err.into())
    }

    pub(crate) fn db(context: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
        move |source| Error::Database { context, source }
    }
}

/// Lets `?` on sqlx calls inside a fenced transaction's closure produce an [`Error`].
impl From<sqlx::Error> for Error {
    fn from(source: sqlx::Error) -> Self {
        Error::Database {
            context: "running the transaction's work",
            source,
        }
    }
}

/// `Result` with mqlock-db's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
