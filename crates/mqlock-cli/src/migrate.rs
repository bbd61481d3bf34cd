//! `mqlock migrate`: apply a directory of sqlx migrations under a distributed lock, so that of
//! many replicas starting together exactly one applies them and the others wait, then carry on.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use mqlock_db::{Error, MigrationGuard, load_migrations, validate_database_url};

use crate::connect::ConnectArgs;

/// The schema is up to date (applied by this process or by another one).
const EXIT_OK: u8 = 0;
/// A migration failed; it was rolled back as far as the database allows and the lock released.
const EXIT_MIGRATION_FAILED: u8 = 1;
/// Bad input: malformed or unsupported database URL, missing migrations directory, bad lock name.
const EXIT_BAD_INPUT: u8 = 2;
/// The database could not be reached, or a database statement outside the migrations failed.
const EXIT_DATABASE: u8 = 3;
/// The broker could not be reached or refused us.
const EXIT_BROKER: u8 = 4;
/// The migration history in the database does not match the directory (edited, removed or
/// half-applied migrations).
const EXIT_HISTORY: u8 = 5;
/// The lock was lost during the run; the remaining migrations were not started.
const EXIT_LOST: u8 = crate::exec::EXIT_LOST;
/// Gave up waiting for the lock (--wait-timeout).
const EXIT_TIMEOUT: u8 = crate::exec::EXIT_TIMEOUT;

/// Options of `mqlock migrate`.
#[derive(Args, Debug)]
#[command(after_help = "\
Exit codes:
    0    the schema is up to date (applied by this process or by another replica)
    1    a migration failed: it was rolled back (as far as the database's transactional DDL
         allows), the lock was released, and the failing version and error are printed
    2    bad input: malformed or unsupported database URL, missing migrations directory,
         invalid lock name
    3    the database is unreachable or refused the connection
    4    the broker is unreachable or refused the connection
    5    the migration history does not match the directory (a migration applied earlier was
         edited or removed, or a previous run left it half applied)
    123  the lock was lost during the run; later migrations were not started
    124  timed out waiting for the lock (--wait-timeout)")]
pub struct MigrateArgs {
    /// Database URL: postgres://user:pass@host/db or sqlite:path/to/file.db (the SQLite file
    /// is created if missing).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,

    /// Directory of sqlx migrations (<version>_<description>.sql, or .up.sql/.down.sql).
    #[arg(long, value_name = "DIR")]
    source: PathBuf,

    /// Lock name; every replica of a service must use the same. Default: derived from the
    /// database (migrate/postgres/<database name>, migrate/sqlite/<canonical file path>).
    #[arg(long, value_name = "NAME")]
    lock: Option<String>,

    /// Give up waiting for the lock after this long (e.g. 30s, 5m). Default: wait forever.
    #[arg(long, value_name = "D", value_parser = humantime::parse_duration)]
    wait_timeout: Option<Duration>,

    #[command(flatten)]
    connect: ConnectArgs,
}

/// Runs `mqlock migrate`.
pub async fn run(args: MigrateArgs) -> ExitCode {
    ExitCode::from(match migrate(args).await {
        Ok(()) => EXIT_OK,
        Err(e) => {
            eprintln!("mqlock migrate: {}", render(&e));
            exit_code(&e)
        }
    })
}

async fn migrate(args: MigrateArgs) -> Result<(), Error> {
    // Input that can be checked locally is checked before we touch the broker or queue for the
    // lock, so a typo is reported at once rather than after a wait.
    let migrator = load_migrations(&args.source).await?;
    validate_database_url(&args.database_url)?;
    if let Some(name) = &args.lock {
        mqlock::name::validate(name)?;
    }
    let client = args.connect.connect().await?;
    let mut guard = MigrationGuard::new(client);
    if let Some(name) = args.lock {
        guard = guard.lock_name(name);
    }
    if let Some(t) = args.wait_timeout {
        guard = guard.wait_timeout(t);
    }
    let report = guard.run(&args.database_url, &migrator).await?;
    if report.applied.is_empty() {
        println!(
            "up to date: {} migration(s) already applied (lock {:?}, waited {:.3}s)",
            report.already_applied,
            report.lock,
            report.waited.as_secs_f64()
        );
    } else {
        for m in &report.applied {
            println!(
                "applied {}/{} ({:.3}s)",
                m.version,
                m.description,
                m.elapsed.as_secs_f64()
            );
        }
        println!(
            "up to date: applied {}, {} already applied (lock {:?}, token {}, waited {:.3}s)",
            report.applied.len(),
            report.already_applied,
            report.lock,
            report.fencing_token,
            report.waited.as_secs_f64()
        );
    }
    Ok(())
}

/// The error with its causes, so the driver's message (e.g. which table is missing) is shown.
fn render(e: &Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

fn exit_code(e: &Error) -> u8 {
    match e {
        Error::MigrationFailed { .. } => EXIT_MIGRATION_FAILED,
        Error::InvalidUrl { .. } | Error::MigrationSource { .. } => EXIT_BAD_INPUT,
        Error::Connect { .. } | Error::Database { .. } => EXIT_DATABASE,
        Error::MigrationHistory(_) => EXIT_HISTORY,
        Error::LockLost { .. } => EXIT_LOST,
        Error::Lock(l) => match l {
            mqlock::Error::Timeout { .. } => EXIT_TIMEOUT,
            mqlock::Error::Lost { .. } => EXIT_LOST,
            mqlock::Error::InvalidName { .. }
            | mqlock::Error::InvalidUrl { .. }
            | mqlock::Error::Config(_) => EXIT_BAD_INPUT,
            _ => EXIT_BROKER,
        },
        _ => EXIT_DATABASE,
    }
}
