//! `mqlock`: run a command under a distributed lock, mount a lock-protected directory, run
//! database migrations under a lock, and show lock status. Lock state lives in RabbitMQ.

mod break_lock;
mod child;
mod connect;
mod elect;
mod exec;
mod exit_code;
mod generate;
mod list;
mod metrics_server;
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
    max_term_width = 100,
    after_help = exit_code::help(None)
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a command while holding a lock (like flock(1), across machines).
    #[command(after_help = exit_code::help(Some("exec")))]
    Exec(exec::ExecArgs),
    // No doc comment here: it would replace ElectArgs' long help, which explains both forms.
    #[command(after_help = exit_code::help(Some("elect")))]
    Elect(elect::ElectArgs),
    /// Show whether a lock is held, by whom, and how many clients wait for it.
    #[command(after_help = exit_code::help(Some("status")))]
    Status(status::StatusArgs),
    /// List every lock with its state, holder, waiters and age (needs the management API).
    #[command(after_help = exit_code::help(Some("list")))]
    List(list::ListArgs),
    /// Ask a lock's holder to give it up (break-glass release).
    #[command(after_help = exit_code::help(Some("break")))]
    Break(break_lock::BreakArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    #[command(after_help = exit_code::help(Some("completions")))]
    Completions(generate::CompletionsArgs),
    /// Print the man page.
    #[command(after_help = exit_code::help(Some("man")))]
    Man(generate::ManArgs),
    /// Mount a directory through a FUSE filesystem that locks files opened for writing.
    #[command(after_help = exit_code::help(Some("mount")))]
    Mount(mount::MountArgs),
    /// Apply database migrations under a lock, so that exactly one replica runs them.
    #[command(after_help = exit_code::help(Some("migrate")))]
    Migrate(migrate::MigrateArgs),
}

/// What is logged when neither MQLOCK_LOG nor RUST_LOG is set: mqlock's own warnings (a lock
/// lost, a retried acquisition), nothing from the AMQP library.
const DEFAULT_LOG: &str = "warn,lapin=off";

fn main() -> ExitCode {
    // mqlock prints its own one-line message for every failure; the libraries' logs (lapin
    // reports an expected 404 or a refused login as an ERROR) stay quiet unless asked for with
    // MQLOCK_LOG or RUST_LOG (e.g. MQLOCK_LOG=debug).
    let filter = tracing_subscriber::EnvFilter::try_from_env("MQLOCK_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
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
            return ExitCode::from(exit_code::FAILURE);
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Exec(args) => exec::run(args).await,
            Command::Elect(args) => elect::run(args).await,
            Command::Status(args) => status::run(args).await,
            Command::List(args) => list::run(args).await,
            Command::Break(args) => break_lock::run(args).await,
            Command::Completions(args) => generate::completions(args),
            Command::Man(args) => generate::man(args),
            Command::Mount(args) => mount::run(args).await,
            Command::Migrate(args) => migrate::run(args).await,
        }
    })
}
