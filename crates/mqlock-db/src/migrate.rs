//! The migration runner: sqlx migrations applied under a distributed lock.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqlock::{LockGuard, Locker};
use sqlx::migrate::{Migrate, MigrateError, Migrator};
use sqlx::{ConnectOptions, Connection, PgConnection, SqliteConnection};

use crate::dburl::{DbOptions, redact};
use crate::error::{Error, Result};

/// Reads a directory of sqlx migrations (`<version>_<description>.sql`, or `.up.sql`/`.down.sql`).
///
/// An empty directory is accepted (nothing to apply).
///
/// # Errors
///
/// [`Error::MigrationSource`] if the directory is missing, is not a directory, cannot be read,
/// or holds a file sqlx cannot parse as a migration.
///
/// # Cancel safety
///
/// Cancel safe: it only reads files.
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

/// What a migration run did.
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

/// Configuration of a [`MigrationRunner`]: build it with struct syntax over
/// `..MigrationConfig::default()`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationConfig {
    /// The lock's name. Replicas of one service must agree on it. Default (`None`): derived
    /// from the database, `migrate/postgres/<current_database()>` or
    /// `migrate/sqlite/<canonical file path>`, so replicas that spell the URL differently still
    /// share one lock.
    pub lock_name: Option<String>,
    /// How long a run waits for the lock before giving up with [`mqlock::Error::Timeout`]
    /// (wrapped in [`Error::Lock`]). Default: `None`, wait as long as it takes.
    pub lock_timeout: Option<Duration>,
}

/// Runs sqlx migrations under a distributed lock, so that of many replicas starting at once
/// exactly one applies them while the others wait, then find nothing pending.
///
/// A runner, not a guard: it holds no lock itself; each run takes the lock and releases it
/// before it returns.
///
/// Each run opens its own connection (never a pooled one, so no session state outlives the
/// run), disables sqlx's database lock, takes the distributed lock, applies what is pending,
/// then releases the lock and closes the connection — on failure too, so a failed migration
/// never leaves a lock behind. The lock is checked before each migration; if it was lost, the
/// run stops with [`mqlock::Error::Lost`] (in [`Error::Lock`]) before starting the next one.
#[derive(Clone)]
pub struct MigrationRunner {
    locker: Arc<dyn Locker>,
    config: MigrationConfig,
}

impl std::fmt::Debug for MigrationRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigrationRunner")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl MigrationRunner {
    /// A runner taking its lock from `locker`, as `config` says
    /// (`MigrationConfig::default()`: the lock name derived from the database, no lock
    /// timeout). The lock name, if given, is checked when a run takes the lock.
    pub fn new(locker: Arc<dyn Locker>, config: MigrationConfig) -> Self {
        MigrationRunner { locker, config }
    }

    /// Reads the migrations in `dir` and applies them to `database_url` under the lock.
    ///
    /// # Errors
    ///
    /// [`Error::MigrationSource`] if `dir` cannot be read (checked before anything is
    /// contacted); otherwise as [`MigrationRunner::run`].
    ///
    /// # Cancel safety
    ///
    /// As [`MigrationRunner::run`]; a drop while the directory is read leaves nothing behind.
    pub async fn run_dir(&self, database_url: &str, dir: &Path) -> Result<MigrationReport> {
        let migrator = load_migrations(dir).await?;
        self.run(database_url, &migrator).await
    }

    /// Applies `migrator`'s migrations to `database_url` under the lock.
    ///
    /// `postgres://` / `postgresql://` and `sqlite:` URLs are supported; a SQLite file is
    /// created if missing.
    ///
    /// # Errors
    ///
    /// - [`Error::InvalidUrl`]: malformed or unsupported URL (checked before connecting);
    /// - [`Error::Connect`]: the database cannot be reached; [`Error::Database`]: reading the
    ///   database's name for the default lock name failed;
    /// - [`Error::Lock`]: the lock could not be taken (broker unreachable, invalid lock name,
    ///   [`mqlock::Error::Timeout`] after [`MigrationConfig::lock_timeout`]), or
    ///   [`mqlock::Error::Lost`]: the lock was lost during the run — the migrations applied
    ///   before stay applied, the next one was not started;
    /// - [`Error::MigrationHistory`]: the database's history does not match `migrator`
    ///   (edited, removed or dirty migrations); nothing applied;
    /// - [`Error::MigrationFailed`]: a migration failed; it was rolled back as far as the
    ///   database's transactional DDL allows, the earlier ones stay applied.
    ///
    /// The lock is released and the connection closed on every path; a failed release is
    /// logged, not returned.
    ///
    /// # Cancel safety
    ///
    /// What a drop at each await leaves behind:
    ///
    /// - connecting, or reading the database's name: nothing (the connection is closed);
    /// - waiting for the lock: nothing (acquisitions are cancel safe);
    /// - while a migration is applied: the connection is dropped, which closes it, so the
    ///   server rolls back the migration's transaction; migrations applied before stay applied.
    ///   A `-- no-transaction` migration may stay partly applied and unrecorded. The lock guard
    ///   is dropped and the lock released in the background;
    /// - during the release: the migrations are applied; the lock is released in the
    ///   background.
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
                    let name = match &self.config.lock_name {
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
                let name = match &self.config.lock_name {
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
        let guard = match self.config.lock_timeout {
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
            return Err(Error::Lock(mqlock::Error::Lost {
                name: guard.name().to_owned(),
                reason,
            }));
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
