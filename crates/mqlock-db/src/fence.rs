//! Fenced transactions: work done in a database transaction under a distributed lock, with the
//! lock's fencing token checked and recorded in a fence table inside the same transaction.

use std::sync::Arc;
use std::time::Duration;

use mqlock::{BoxFuture, LockGuard, LockTable, Locker};
use sqlx::postgres::Postgres;
use sqlx::sqlite::Sqlite;
use sqlx::{AssertSqlSafe, Pool, Transaction};
use tokio::sync::OnceCell;

use crate::error::{Error, Result};

/// Default name of the fence table.
pub const DEFAULT_FENCE_TABLE: &str = "mqlock_fence";

mod sealed {
    pub trait Sealed {}
    impl Sealed for sqlx::postgres::Postgres {}
    impl Sealed for sqlx::sqlite::Sqlite {}
}

/// A database the fenced transaction supports: [`Postgres`] or [`Sqlite`].
///
/// The methods are the dialect-specific steps of a fenced transaction; they are public only so
/// that the trait can be named in bounds and are not meant to be called directly.
pub trait FencedDatabase: sqlx::Database + sealed::Sealed {
    /// Takes a connection from `pool` and begins a transaction that serialises writers from
    /// its first statement on (SQLite: `BEGIN IMMEDIATE`).
    #[doc(hidden)]
    fn begin_fenced(pool: &Pool<Self>) -> BoxFuture<'_, sqlx::Result<Transaction<'static, Self>>>;

    /// Creates the fence table if it does not exist.
    #[doc(hidden)]
    fn create_fence_table<'c>(
        pool: &'c Pool<Self>,
        table: &'c str,
    ) -> BoxFuture<'c, sqlx::Result<()>>;

    /// Records `token` for `resource` unless a greater token is recorded; returns that greater
    /// token when there is one.
    #[doc(hidden)]
    fn advance_fence<'c>(
        conn: &'c mut Self::Connection,
        table: &'c str,
        resource: &'c str,
        token: i64,
    ) -> BoxFuture<'c, sqlx::Result<Option<i64>>>;
}

impl FencedDatabase for Postgres {
    fn begin_fenced(pool: &Pool<Self>) -> BoxFuture<'_, sqlx::Result<Transaction<'static, Self>>> {
        Box::pin(pool.begin())
    }

    fn create_fence_table<'c>(
        pool: &'c Pool<Self>,
        table: &'c str,
    ) -> BoxFuture<'c, sqlx::Result<()>> {
        Box::pin(async move {
            // `table` was checked to be a plain identifier by `validate_table`.
            let sql = format!(
                "CREATE TABLE IF NOT EXISTS {table} (\
                 resource TEXT PRIMARY KEY, \
                 token BIGINT NOT NULL, \
                 updated_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            );
            sqlx::query(AssertSqlSafe(sql)).execute(pool).await?;
            Ok(())
        })
    }

    fn advance_fence<'c>(
        conn: &'c mut Self::Connection,
        table: &'c str,
        resource: &'c str,
        token: i64,
    ) -> BoxFuture<'c, sqlx::Result<Option<i64>>> {
        Box::pin(async move {
            // The upsert takes the fence row's lock and keeps it until this transaction ends, so
            // a newer holder's fence statement waits for us: our writes can never land after its.
            let sql = format!(
                "INSERT INTO {table} AS f (resource, token, updated_at) VALUES ($1, $2, now()) \
                 ON CONFLICT (resource) DO UPDATE SET token = EXCLUDED.token, updated_at = now() \
                 WHERE f.token <= EXCLUDED.token"
            );
            let done = sqlx::query(AssertSqlSafe(sql))
                .bind(resource)
                .bind(token)
                .execute(&mut *conn)
                .await?;
            if done.rows_affected() == 1 {
                return Ok(None);
            }
            let sql = format!("SELECT token FROM {table} WHERE resource = $1");
            let recorded: (i64,) = sqlx::query_as(AssertSqlSafe(sql))
                .bind(resource)
                .fetch_one(&mut *conn)
                .await?;
            Ok(Some(recorded.0))
        })
    }
}

impl FencedDatabase for Sqlite {
    fn begin_fenced(pool: &Pool<Self>) -> BoxFuture<'_, sqlx::Result<Transaction<'static, Self>>> {
        // A deferred transaction would read under a shared lock and fail with SQLITE_BUSY when
        // it later upgrades to write; IMMEDIATE takes the write lock up front (waiting up to the
        // busy timeout) so the fence check and the work see the latest committed state.
        Box::pin(pool.begin_with("BEGIN IMMEDIATE"))
    }

    fn create_fence_table<'c>(
        pool: &'c Pool<Self>,
        table: &'c str,
    ) -> BoxFuture<'c, sqlx::Result<()>> {
        Box::pin(async move {
            let sql = format!(
                "CREATE TABLE IF NOT EXISTS {table} (\
                 resource TEXT PRIMARY KEY NOT NULL, \
                 token INTEGER NOT NULL, \
                 updated_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)"
            );
            sqlx::query(AssertSqlSafe(sql)).execute(pool).await?;
            Ok(())
        })
    }

    fn advance_fence<'c>(
        conn: &'c mut Self::Connection,
        table: &'c str,
        resource: &'c str,
        token: i64,
    ) -> BoxFuture<'c, sqlx::Result<Option<i64>>> {
        Box::pin(async move {
            let sql = format!(
                "INSERT INTO {table} (resource, token, updated_at) VALUES (?1, ?2, CURRENT_TIMESTAMP) \
                 ON CONFLICT (resource) DO UPDATE SET token = excluded.token, updated_at = CURRENT_TIMESTAMP \
                 WHERE {table}.token <= excluded.token"
            );
            let done = sqlx::query(AssertSqlSafe(sql))
                .bind(resource)
                .bind(token)
                .execute(&mut *conn)
                .await?;
            if done.rows_affected() == 1 {
                return Ok(None);
            }
            let sql = format!("SELECT token FROM {table} WHERE resource = ?1");
            let recorded: (i64,) = sqlx::query_as(AssertSqlSafe(sql))
                .bind(resource)
                .fetch_one(&mut *conn)
                .await?;
            Ok(Some(recorded.0))
        })
    }
}

/// Checks that `name` is a plain SQL identifier, so it can be spliced into statements.
fn validate_table(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let ok = name.len() <= 63
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidTableName(name.to_owned()))
    }
}

/// The work run inside a fenced transaction: receives the transaction's connection.
///
/// Write it as `|conn| Box::pin(async move { ...; Ok(value) })`. Errors of sqlx calls convert
/// with `?`; wrap other errors with [`Error::work`].
pub trait TxWork<DB: sqlx::Database, T>:
    for<'c> FnOnce(&'c mut DB::Connection) -> BoxFuture<'c, Result<T>> + Send
{
}

impl<DB, T, F> TxWork<DB, T> for F
where
    DB: sqlx::Database,
    F: for<'c> FnOnce(&'c mut DB::Connection) -> BoxFuture<'c, Result<T>> + Send,
{
}

/// Configuration of a [`TxRunner`]: build it with struct syntax over
/// `..TxConfig::default()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxConfig {
    /// Name of the fence table (a plain SQL identifier: letters, digits and `_`, not starting
    /// with a digit, at most 63 characters), created on first use. Every client of a resource
    /// must use the same table. Default: [`DEFAULT_FENCE_TABLE`].
    pub fence_table: String,
    /// How long [`TxRunner::run`] waits for the lock before giving up with
    /// [`mqlock::Error::Timeout`] (wrapped in [`Error::Lock`]). Default: `None`, wait as long as
    /// it takes.
    pub lock_timeout: Option<Duration>,
}

impl Default for TxConfig {
    fn default() -> Self {
        TxConfig {
            fence_table: DEFAULT_FENCE_TABLE.to_owned(),
            lock_timeout: None,
        }
    }
}

/// Runs closures in database transactions under a distributed lock, fenced.
///
/// A runner, not a guard: it holds no lock itself; each [`TxRunner::run`] takes the lock, runs
/// the closure and releases the lock before it returns.
///
/// For each [`TxRunner::run`]: take the lock, begin a transaction, record the grant's fencing
/// token in the fence table as the transaction's first statement (a token lower than the one
/// recorded there aborts with [`Error::StaleFence`]), run the closure, commit only if the lock
/// is still held, release the lock. If the lock is lost at any point after the transaction
/// began and before the commit, the transaction is rolled back and
/// [`Error::LostBeforeCommit`] returned.
///
/// The fence row is keyed by the lock name; its row lock is held until the transaction ends,
/// so a holder that stalls after its check cannot interleave its writes with a newer holder's:
/// the newer holder's fence statement waits for the stale transaction to finish.
///
/// A token *equal* to the recorded one is accepted: it is the same grant (tokens are unique per
/// grant), which lets one grant run several transactions through [`TxRunner::run_with_guard`].
pub struct TxRunner<DB: FencedDatabase> {
    /// Shared by the runner's clones: concurrent runs of one lock name in this process queue
    /// here (FIFO) instead of asking the broker twice for a lock the process is acquiring.
    locks: Arc<LockTable>,
    pool: Pool<DB>,
    table: Arc<str>,
    lock_timeout: Option<Duration>,
    table_ready: Arc<OnceCell<()>>,
}

impl<DB: FencedDatabase> Clone for TxRunner<DB> {
    fn clone(&self) -> Self {
        TxRunner {
            locks: self.locks.clone(),
            pool: self.pool.clone(),
            table: self.table.clone(),
            lock_timeout: self.lock_timeout,
            table_ready: self.table_ready.clone(),
        }
    }
}

impl<DB: FencedDatabase> std::fmt::Debug for TxRunner<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxRunner")
            .field("fence_table", &self.table)
            .field("lock_timeout", &self.lock_timeout)
            .finish_non_exhaustive()
    }
}

impl<DB: FencedDatabase> TxRunner<DB> {
    /// A runner taking locks from `locker` and running transactions on `pool`, as `config`
    /// says (`TxConfig::default()`: the fence table [`DEFAULT_FENCE_TABLE`], no lock timeout).
    /// The runner and its clones take locks through one per-process [`LockTable`]: concurrent
    /// runs of one lock name queue in the process, one broker acquisition at a time (a
    /// [`mqlock::LockClient`] refuses a second acquisition of a name it is acquiring).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidTableName`] if `config.fence_table` is not a plain SQL identifier.
    /// Nothing is connected or created here; the fence table is created on first use.
    pub fn new(locker: Arc<dyn Locker>, pool: Pool<DB>, config: TxConfig) -> Result<Self> {
        let TxConfig {
            fence_table,
            lock_timeout,
        } = config;
        validate_table(&fence_table)?;
        Ok(TxRunner {
            locks: Arc::new(LockTable::new(locker)),
            pool,
            table: fence_table.into(),
            lock_timeout,
            table_ready: Arc::new(OnceCell::new()),
        })
    }

    /// The pool the transactions run on.
    pub fn pool(&self) -> &Pool<DB> {
        &self.pool
    }

    /// The fence table's name.
    pub fn fence_table(&self) -> &str {
        &self.table
    }

    /// Creates the fence table if it does not exist (done automatically on first use; once per
    /// runner and its clones).
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if the table cannot be created (after two retries of a failed
    /// `CREATE TABLE IF NOT EXISTS`, which two first users may race on).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe. Dropped before it completes, it leaves the table created or not (the
    /// statement is idempotent) and the runner not marked ready: the next call tries again.
    pub async fn ensure_fence_table(&self) -> Result<()> {
        self.table_ready
            .get_or_try_init(|| async {
                // Two first users may race on CREATE TABLE IF NOT EXISTS (PostgreSQL can fail the
                // loser with a unique violation on its catalog); the table exists afterwards,
                // so one retry settles it.
                let mut attempt = 0;
                loop {
                    match DB::create_fence_table(&self.pool, &self.table).await {
                        Ok(()) => return Ok(()),
                        Err(e) if attempt < 2 => {
                            tracing::debug!(table = %self.table, error = %e, "creating the fence table failed; retrying");
                            attempt += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => return Err(Error::db("creating the fence table")(e)),
                    }
                }
            })
            .await
            .map(|_| ())
    }

    /// Takes the lock `lock`, runs `work` in a fenced transaction and releases the lock.
    ///
    /// The lock name is also the fenced resource's key in the fence table. The fence table is
    /// prepared before the lock is requested, so a bad database does not make the other
    /// waiters wait behind this one.
    ///
    /// # Errors
    ///
    /// Whatever the error, nothing of `work` was committed, except for
    /// [`Error::Database`] while committing, whose outcome the database did not report.
    ///
    /// - [`Error::Lock`]: the lock could not be taken — broker unreachable, invalid name,
    ///   [`mqlock::Error::Timeout`] after [`TxConfig::lock_timeout`], [`mqlock::Error::Lost`]
    ///   while being acquired; no transaction was begun.
    /// - [`Error::StaleFence`]: a newer holder's token is recorded; rolled back.
    /// - [`Error::LostBeforeCommit`]: the lock was lost during `work` or before the commit;
    ///   rolled back (`work` is dropped at its next await when the loss fires).
    /// - [`Error::Work`], or any error `work` returned: rolled back.
    /// - [`Error::Database`]: creating the fence table, beginning, fencing or committing failed.
    /// - [`Error::TokenOutOfRange`]: the grant's token does not fit a `BIGINT`.
    ///
    /// A failed release of the lock afterwards is logged, not returned: the transaction's
    /// outcome is already decided, and the broker drops the grant when it notices.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe in the sense that a drop can leave a commit's outcome unknown. What a
    /// drop at each await leaves behind:
    ///
    /// - preparing the fence table or waiting for the lock: nothing (both are cancel safe; no
    ///   waiter is left queued);
    /// - during the transaction (beginning, fencing, `work`): nothing committed. sqlx queues a
    ///   `ROLLBACK` on the dropped transaction's connection, which a background task sends when
    ///   it returns the connection to the pool (a broken connection is closed instead, and the
    ///   server rolls back); until then the fence row (PostgreSQL) or the write lock (SQLite)
    ///   stays taken. The lock guard is dropped, so the lock is released in the background;
    /// - during the commit: the transaction may or may not be committed;
    /// - during the release: the work is committed; the lock is released in the background.
    ///
    /// # Panics
    ///
    /// Does not panic itself. If `work` panics, the panic propagates; the transaction and the
    /// lock are then dropped as above (rolled back, released in the background).
    pub async fn run<T, F>(&self, lock: &str, work: F) -> Result<T>
    where
        T: Send,
        F: TxWork<DB, T>,
    {
        // Validate and prepare before queueing for the lock, so a bad database does not make
        // every other waiter wait behind us.
        self.ensure_fence_table().await?;
        let held = self.locks.lock(lock, self.lock_timeout).await?;
        tracing::debug!(
            lock,
            token = held.guard().fencing_token(),
            "lock acquired for a fenced transaction"
        );
        let result = self.run_with_guard(held.guard(), work).await;
        if let Err(e) = held.release().await {
            // The transaction's outcome is already decided; a failed release only delays the
            // next holder until the broker notices our connection is gone.
            tracing::warn!(lock, error = %e, "releasing the lock after a fenced transaction failed");
        }
        result
    }

    /// Runs `work` in a fenced transaction under an already held `guard` (fence key: the lock
    /// name). Does not release the guard; several transactions may run under one grant.
    ///
    /// # Errors
    ///
    /// As [`TxRunner::run`], without the lock acquisition's [`Error::Lock`]. A `guard` whose
    /// lock is already lost fails with [`Error::LostBeforeCommit`] (or [`Error::StaleFence`]
    /// if a newer holder has written already), with nothing committed.
    ///
    /// # Cancel safety
    ///
    /// As [`TxRunner::run`]: a drop before the commit leaves nothing committed (the rollback is
    /// sent in the background), a drop during the commit leaves its outcome unknown. The
    /// `guard` is untouched either way.
    ///
    /// # Panics
    ///
    /// If `work` panics, the panic propagates and the transaction is rolled back as above.
    pub async fn run_with_guard<T, F>(&self, guard: &LockGuard, work: F) -> Result<T>
    where
        T: Send,
        F: TxWork<DB, T>,
    {
        let name = guard.name();
        let token = guard.fencing_token();
        let token_i64 = i64::try_from(token).map_err(|_| Error::TokenOutOfRange(token))?;
        self.ensure_fence_table().await?;

        let mut tx = DB::begin_fenced(&self.pool)
            .await
            .map_err(Error::db("beginning the transaction"))?;
        let stale = DB::advance_fence(&mut tx, &self.table, name, token_i64)
            .await
            .map_err(Error::db("checking the fencing token"))?;
        if let Some(recorded) = stale {
            rollback(tx, name).await;
            tracing::warn!(
                lock = name,
                token,
                recorded,
                "stale fencing token; transaction rolled back"
            );
            return Err(Error::StaleFence {
                resource: name.to_owned(),
                token,
                recorded,
            });
        }

        // Stop the work as soon as the lock is lost rather than let it run on to a commit that
        // would be refused anyway.
        let outcome = tokio::select! {
            biased;
            reason = guard.lost() => Err(Error::LostBeforeCommit { name: name.to_owned(), reason }),
            out = work(&mut tx) => out,
        };
        let value = match outcome {
            Ok(v) => v,
            Err(e) => {
                rollback(tx, name).await;
                return Err(e);
            }
        };
        // Checked again right before COMMIT: the lease is read directly, so a holder that was
        // frozen notices here even if no background task has run since it resumed.
        if let Some(reason) = guard.loss_reason() {
            rollback(tx, name).await;
            tracing::warn!(lock = name, token, %reason, "lock lost before commit; transaction rolled back");
            return Err(Error::LostBeforeCommit {
                name: name.to_owned(),
                reason,
            });
        }
        tx.commit()
            .await
            .map_err(Error::db("committing the transaction"))?;
        tracing::debug!(lock = name, token, "fenced transaction committed");
        Ok(value)
    }
}

async fn rollback<DB: sqlx::Database>(tx: Transaction<'static, DB>, name: &str) {
    if let Err(e) = tx.rollback().await {
        // The connection goes back to the pool, which rolls back or discards it on its own.
        tracing::warn!(lock = name, error = %e, "explicit rollback failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names() {
        assert!(validate_table("mqlock_fence").is_ok());
        assert!(validate_table("_f2").is_ok());
        for bad in [
            "",
            "2x",
            "a-b",
            "a;drop table x",
            "a b",
            "\"q\"",
            &"x".repeat(64),
        ] {
            assert!(
                matches!(validate_table(bad), Err(Error::InvalidTableName(_))),
                "{bad}"
            );
        }
    }
}
