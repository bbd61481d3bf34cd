//! Database adapters of mqlock: fenced transactions and migrations guarded by a distributed
//! lock whose state lives in RabbitMQ, the same way on PostgreSQL and SQLite.
//!
//! - [`TxRunner`] runs a closure in a transaction under a lock. The lock's fencing token is
//!   checked and recorded in a fence table by the transaction's first statement, so a holder
//!   that stalled past its lease and was replaced is refused ([`Error::StaleFence`]) instead of
//!   committing over the newer holder's work.
//! - [`MigrationRunner`] runs a directory of sqlx migrations under a lock on a dedicated
//!   connection, without sqlx's own database lock (PostgreSQL advisory lock; SQLite has none),
//!   so every replica can call it at start-up: one applies, the others wait and find nothing
//!   pending.
//!
//! ```no_run
//! # async fn demo() -> mqlock_db::Result<()> {
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use mqlock::{ClientConfig, LockClient};
//! use mqlock_db::{TxConfig, TxRunner};
//!
//! let locker = LockClient::connect("amqp://guest:guest@127.0.0.1:5672/%2f", ClientConfig::default()).await?;
//! let pool = sqlx::PgPool::connect("postgres://app:secret@127.0.0.1/app").await?;
//! let config = TxConfig {
//!     lock_timeout: Some(Duration::from_secs(30)),
//!     ..TxConfig::default()
//! };
//! let runner = TxRunner::new(Arc::new(locker), pool, config)?;
//! let n: i64 = runner
//!     .run("accounts/42", |conn| Box::pin(async move {
//!         let (n,): (i64,) = sqlx::query_as("UPDATE counters SET n = n + 1 WHERE id = 42 RETURNING n")
//!             .fetch_one(&mut *conn)
//!             .await?;
//!         Ok(n)
//!     }))
//!     .await?;
//! # let _ = n; Ok(()) }
//! ```
//!
//! Like every adapter of mqlock, this crate takes its [`Locker`](mqlock::Locker) as an
//! `Arc<dyn Locker>` (a [`LockClient`](mqlock::LockClient), or
//! [`MemoryLocker`](mqlock::MemoryLocker) in tests), its configuration as a `…Config` struct
//! with public fields and `Default` ([`TxConfig`], [`MigrationConfig`]; the wait for the lock is
//! bounded by `lock_timeout`), and reports the core's errors as [`Error::Lock`].
//!
//! See `docs/db.md` for what the fence guarantees and what it cannot.

mod dburl;
mod error;
mod fence;
mod migrate;

pub use dburl::{redact, validate_database_url};
pub use error::{Error, Result};
pub use fence::{DEFAULT_FENCE_TABLE, FencedDatabase, TxConfig, TxRunner, TxWork};
pub use migrate::{
    AppliedMigration, MigrationConfig, MigrationReport, MigrationRunner, load_migrations,
};
