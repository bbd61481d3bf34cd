//! Fenced transactions: work done in a database transaction under a distributed lock, with the
//! lock's fencing token checked and recorded in a fence table inside the same transaction.

use std::sync::Arc;
use std::time::Duration;

use mqlock::{BoxFuture, LockGuard, Locker};
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

/// Runs closures in database transactions under a distributed lock, fenced.
///
/// For each [`TxGuard::run`]: take the lock, begin a transaction, record the grant's fencing
/// token in the fence table as the transaction's first statement (a token lower than the one
/// recorded there aborts with [`Error::StaleFence`]), run the closure, commit only if the lock
/// is still held, release the lock. If the lock is lost at any point before the commit, the
/// transaction is rolled back and [`Error::LockLost`] returned.
///
/// The fence row is keyed by the lock name; its row lock is held until the transaction ends,
/// so a holder that stalls after its check cannot interleave its writes with a newer holder's:
/// the newer holder's fence statement waits for the stale transaction to finish.
///
/// A token *equal* to the recorded one is accepted: it is the same grant (tokens are unique per
/// grant), which lets one guard run several transactions through [`TxGuard::run_with_guard`].
pub struct TxGuard<DB: FencedDatabase, L> {
    locker: L,
    pool: Pool<DB>,
    table: Arc<str>,
    wait_timeout: Option<Duration>,
    table_ready: Arc<OnceCell<()>>,
}

impl<DB: FencedDatabase, L: Clone> Clone for TxGuard<DB, L> {
    fn clone(&self) -> Self {
        TxGuard {
            locker: self.locker.clone(),
            pool: self.pool.clone(),
            table: self.table.clone(),
            wait_timeout: self.wait_timeout,
            table_ready: self.table_ready.clone(),
        }
    }
}

impl<DB: FencedDatabase, L> std::fmt::Debug for TxGuard<DB, L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxGuard")
            .field("fence_table", &self.table)
            .field("wait_timeout", &self.wait_timeout)
            .finish_non_exhaustive()
    }
}

impl<DB: FencedDatabase, L: Locker> TxGuard<DB, L> {
    /// A guard taking locks from `locker` and running transactions on `pool`, with the fence
    /// table [`DEFAULT_FENCE_TABLE`] (created on first use) and no wait timeout.
    pub fn new(locker: L, pool: Pool<DB>) -> Self {
        TxGuard {
            locker,
            pool,
            table: DEFAULT_FENCE_TABLE.into(),
            wait_timeout: None,
            table_ready: Arc::new(OnceCell::new()),
        }
    }

    /// Uses another fence table (a plain identifier, optionally schema-less). Every client of
    /// a resource must use the same table.
    pub fn with_fence_table(mut self, table: &str) -> Result<Self> {
        validate_table(table)?;
        self.table = table.into();
        self.table_ready = Arc::new(OnceCell::new());
        Ok(self)
    }

    /// Gives up waiting for the lock after `timeout` ([`mqlock::Error::Timeout`]).
    pub fn with_wait_timeout(mut self, timeout: Duration) -> Self {
        self.wait_timeout = Some(timeout);
        self
    }

    /// The pool the transactions run on.
    pub fn pool(&self) -> &Pool<DB> {
        &self.pool
    }

    /// The fence table's name.
    pub fn fence_table(&self) -> &str {
        &self.table
    }

    /// Creates the fence table if it does not exist (done automatically on first use).
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
    /// The lock name is also the fenced resource's key in the fence table.
    pub async fn run<T, F>(&self, lock: &str, work: F) -> Result<T>
    where
        T: Send,
        F: TxWork<DB, T>,
    {
        // Validate and prepare before queueing for the lock, so a bad database does not make
        // every other waiter wait behind us.
        self.ensure_fence_table().await?;
        let guard = match self.wait_timeout {
            Some(t) => self.locker.lock_timeout(lock, t).await?,
            None => self.locker.lock(lock).await?,
        };
        tracing::debug!(
            lock,
            token = guard.fencing_token(),
            "lock acquired for a fenced transaction"
        );
        let result = self.run_with_guard(&guard, work).await;
        if let Err(e) = guard.release().await {
            // The transaction's outcome is already decided; a failed release only delays the
            // next holder until the broker notices our connection is gone.
            tracing::warn!(lock, error = %e, "releasing the lock after a fenced transaction failed");
        }
        result
    }

    /// Runs `work` in a fenced transaction under an already held `guard` (fence key: the lock
    /// name). Does not release the guard.
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
            reason = guard.lost() => Err(Error::LockLost { name: name.to_owned(), reason }),
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
            return Err(Error::LockLost {
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
