//! The migration guard: sqlx migrations applied under a distributed lock.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use mqlock::{LockGuard, Locker};
use sqlx::migrate::{Migrate, MigrateError, Migrator};
use sqlx::{ConnectOptions, Connection, PgConnection, SqliteConnection};

use crate::dburl::{DbOptions, redact};
use crate::error::{Error, Result};

/// Reads a directory of sqlx migrations (`<version>_<description>.sql`, or `.up.sql`/`.down.sql`).
///
/// A missing or unreadable directory is an [`Error::MigrationSource`]; an empty directory is
/// accepted (nothing to apply).
pub async fn load_migrations(dir: &Path) -> Result<Migrator> {
    let meta = tokio::fs::metadata(dir)
        .await
        .map_err(|e| Error::MigrationSource {
            path: dir.to_owned(),
            detail: e.to_string(),
        })?;
    if !meta.is_dir() {
        return Err(Error::MigrationSource {
            path: dir.to_owned(),
            detail: "not a directory".into(),
        });
    }
    Migrator::new(dir)
        .await
        .map_err(|e| Error::MigrationSource {
            path: dir.to_owned(),
            detail: e.to_string(),
        })
}

/// One migration applied by this run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedMigration {
    /// Its version.
    pub version: i64,
    /// Its description.
    pub description: String,
    /// How long applying it took.
    pub elapsed: Duration,
}

/// What a guarded migration run did.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MigrationReport {
    /// The lock it ran under.
    pub lock: String,
    /// The fencing token of that grant.
    pub fencing_token: u64,
    /// How long it waited for the lock.
    pub waited: Duration,
    /// Migrations this run applied, in order (empty when another replica had applied them).
    pub applied: Vec<AppliedMigration>,
    /// Migrations already applied when this run got the lock.
    pub already_applied: usize,
}

/// Runs sqlx migrations under a distributed lock, so that of many replicas starting at once
/// exactly one applies them while the others wait, then find nothing pending.
///
/// Each run opens its own connection (never a pooled one, so no session state outlives the
/// run), disables sqlx's database lock, takes the distributed lock, applies what is pending,
/// then releases the lock and closes the connection — on failure too, so a failed migration
/// never leaves a lock behind. The lock is checked before each migration; if it was lost, the
/// run stops with [`Error::LockLost`] before starting the next one.
#[derive(Debug, Clone)]
pub struct MigrationGuard<L> {
    locker: L,
    lock_name: Option<String>,
    wait_timeout: Option<Duration>,
}

impl<L: Locker> MigrationGuard<L> {
    /// A guard taking its lock from `locker`, with the default lock name (see
    /// [`MigrationGuard::lock_name`]) and no wait timeout.
    pub fn new(locker: L) -> Self {
        MigrationGuard {
            locker,
            lock_name: None,
            wait_timeout: None,
        }
    }

    /// Uses the lock `name`. By default the name is derived from the database:
    /// `migrate/postgres/<current_database()>` or `migrate/sqlite/<canonical file path>`, so
    /// replicas that spell the URL differently still share one lock. Replicas of one service
    /// must agree on the name.
    pub fn lock_name(mut self, name: impl Into<String>) -> Self {
        self.lock_name = Some(name.into());
        self
    }

    /// Gives up waiting for the lock after `timeout` ([`mqlock::Error::Timeout`]).
    pub fn wait_timeout(mut self, timeout: Duration) -> Self {
        self.wait_timeout = Some(timeout);
        self
    }

    /// Reads the migrations in `dir` and applies them to `database_url` under the lock.
    pub async fn run_dir(&self, database_url: &str, dir: &Path) -> Result<MigrationReport> {
        let migrator = load_migrations(dir).await?;
        self.run(database_url, &migrator).await
    }

    /// Applies `migrator`'s migrations to `database_url` under the lock.
    ///
    /// `postgres://` / `postgresql://` and `sqlite:` URLs are supported; a SQLite file is
    /// created if missing.
    pub async fn run(&self, database_url: &str, migrator: &Migrator) -> Result<MigrationReport> {
        let options = DbOptions::parse(database_url)?;
        let shown = redact(database_url);
        let connect_err = |source| Error::Connect {
            url: shown.clone(),
            source,
        };
        match options {
            DbOptions::Postgres(o) => {
                let mut conn: PgConnection = o.connect().await.map_err(connect_err)?;
                let result = async {
                    let name = match &self.lock_name {
                        Some(n) => n.clone(),
                        None => {
                            let (db,): (String,) = sqlx::query_as("SELECT current_database()")
                                .fetch_one(&mut conn)
                                .await
                                .map_err(Error::db("reading the database name"))?;
                            format!("migrate/postgres/{db}")
                        }
                    };
                    self.locked(&name, &mut conn, migrator).await
                }
                .await;
                close(conn).await;
                result
            }
            DbOptions::Sqlite(o) => {
                let path = o.get_filename().to_owned();
                let mut conn: SqliteConnection = o
                    .create_if_missing(true)
                    .connect()
                    .await
                    .map_err(connect_err)?;
                let name = match &self.lock_name {
                    Some(n) => n.clone(),
                    None => {
                        let canon = std::fs::canonicalize(&path).unwrap_or(path);
                        format!("migrate/sqlite/{}", canon.display())
                    }
                };
                let result = self.locked(&name, &mut conn, migrator).await;
                close(conn).await;
                result
            }
        }
    }

    async fn locked<C>(
        &self,
        name: &str,
        conn: &mut C,
        migrator: &Migrator,
    ) -> Result<MigrationReport>
    where
        C: Migrate + Send,
    {
        let start = Instant::now();
        let guard = match self.wait_timeout {
            Some(t) => self.locker.lock_timeout(name, t).await?,
            None => self.locker.lock(name).await?,
        };
        let waited = start.elapsed();
        tracing::info!(
            lock = name,
            token = guard.fencing_token(),
            ?waited,
            "migration lock acquired"
        );
        let result = apply_pending(conn, migrator, &guard).await;
        let token = guard.fencing_token();
        if let Err(e) = guard.release().await {
            // Whatever happened is committed or rolled back already; a failed release only
            // delays the next replica until the broker drops our grant.
            tracing::warn!(lock = name, error = %e, "releasing the migration lock failed");
        }
        let (applied, already_applied) = result?;
        tracing::info!(
            lock = name,
            applied = applied.len(),
            already_applied,
            "migrations up to date"
        );
        Ok(MigrationReport {
            lock: name.to_owned(),
            fencing_token: token,
            waited,
            applied,
            already_applied,
        })
    }
}

/// sqlx's `Migrator::run_direct` without its database lock and with per-migration reporting
/// and a lock check before each migration.
async fn apply_pending<C>(
    conn: &mut C,
    migrator: &Migrator,
    guard: &LockGuard,
) -> Result<(Vec<AppliedMigration>, usize)>
where
    C: Migrate + Send,
{
    let table = &*migrator.table_name;
    let history = Error::MigrationHistory;
    conn.ensure_migrations_table(table).await.map_err(history)?;
    if let Some(version) = conn.dirty_version(table).await.map_err(history)? {
        return Err(history(MigrateError::Dirty(version)));
    }
    let applied_list = conn.list_applied_migrations(table).await.map_err(history)?;
    if !migrator.ignore_missing {
        let known: HashSet<i64> = migrator.iter().map(|m| m.version).collect();
        if let Some(missing) = applied_list.iter().find(|a| !known.contains(&a.version)) {
            return Err(history(MigrateError::VersionMissing(missing.version)));
        }
    }
    let applied_map: HashMap<i64, _> = applied_list.into_iter().map(|m| (m.version, m)).collect();
    let mut done = Vec::new();
    let mut already = 0;
    for migration in migrator.iter() {
        if migration.migration_type.is_down_migration() {
            continue;
        }
        if let Some(applied) = applied_map.get(&migration.version) {
            if applied.checksum != migration.checksum {
                return Err(history(MigrateError::VersionMismatch(migration.version)));
            }
            already += 1;
            continue;
        }
        if let Some(reason) = guard.loss_reason() {
            return Err(Error::LockLost {
                name: guard.name().to_owned(),
                reason,
            });
        }
        tracing::info!(version = migration.version, description = %migration.description, "applying migration");
        match conn.apply(table, migration).await {
            Ok(elapsed) => done.push(AppliedMigration {
                version: migration.version,
                description: migration.description.to_string(),
                elapsed,
            }),
            Err(source) => {
                // Returned to the caller, who reports it; logged here only for traces.
                tracing::debug!(version = migration.version, error = %source, "migration failed");
                return Err(Error::MigrationFailed {
                    version: migration.version,
                    description: migration.description.to_string(),
                    applied_before: done.iter().map(|m| m.version).collect(),
                    source,
                });
            }
        }
    }
    Ok((done, already))
}

async fn close<C: Connection>(conn: C) {
    if let Err(e) = conn.close().await {
        tracing::debug!(error = %e, "closing the migration connection failed");
    }
}
