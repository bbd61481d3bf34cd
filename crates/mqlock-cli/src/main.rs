//! `mqlock`: run a command under a distributed lock, mount a lock-protected directory, run
//! database migrations under a lock, and show lock status. Lock state lives in RabbitMQ.

mod connect;
mod exec;
mod migrate;
mod mount;
mod status;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Distributed locks whose state lives in RabbitMQ.
///
/// Every subcommand talks to the broker given by --url (or MQLOCK_AMQP_URL). Locks are FIFO,
/// released automatically when a holder's connection dies, and every grant carries a fencing
/// token that grows with each grant.
#[derive(Parser, Debug)]
#[command(
    name = "mqlock",
    version,
    propagate_version = true,
    max_term_width = 100
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a command while holding a lock (like flock(1), across machines).
    Exec(exec::ExecArgs),
    /// Show whether a lock is held and what the broker can tell about its waiters.
    Status(status::StatusArgs),
    /// Mount a directory through a FUSE filesystem that locks files opened for writing.
    Mount(mount::MountArgs),
    /// Apply database migrations under a lock, so that exactly one replica runs them.
    Migrate(migrate::MigrateArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MQLOCK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mqlock: cannot start the async runtime: {e}");
            return ExitCode::from(exec::EXIT_INTERNAL);
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Exec(args) => exec::run(args).await,
            Command::Status(args) => status::run(args).await,
            Command::Mount(args) => mount::run(args).await,
            Command::Migrate(args) => migrate::run(args).await,
        }
    })
}
