//! `mqlock migrate`: apply a directory of sqlx migrations under a distributed lock, so that of
//! many replicas starting together exactly one applies them and the others wait, then carry on.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use mqlock_db::{Error, MigrationConfig, MigrationRunner, load_migrations, validate_database_url};

use crate::connect::ConnectArgs;
use crate::exit_code::{OK, db_error};

/// Options of `mqlock migrate`. Its exit codes are those of the table in `exit_code.rs`
/// (shown by `--help`).
#[derive(Args, Debug)]
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

    /// Give up waiting for the lock after this long (e.g. 30s, 5m) and exit with 124, as
    /// `exec --timeout` does. Default: wait forever. (`--wait-timeout` is the old name.)
    #[arg(
        long = "timeout",
        short = 'w',
        alias = "wait-timeout",
        value_name = "D",
        value_parser = humantime::parse_duration
    )]
    wait_timeout: Option<Duration>,

    #[command(flatten)]
    connect: ConnectArgs,
}

/// Runs `mqlock migrate`.
pub async fn run(args: MigrateArgs) -> ExitCode {
    ExitCode::from(match migrate(args).await {
        Ok(()) => OK,
        Err(e) => {
            eprintln!("mqlock migrate: {}", render(&e));
            db_error(&e)
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
    let runner = MigrationRunner::new(
        Arc::new(client),
        MigrationConfig {
            lock_name: args.lock,
            lock_timeout: args.wait_timeout,
        },
    );
    let report = runner.run(&args.database_url, &migrator).await?;
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
