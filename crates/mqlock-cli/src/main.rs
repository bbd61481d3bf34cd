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

use std::io::IsTerminal;
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

impl Command {
    /// Whether `-v` was given (the subcommands that take it).
    fn verbose(&self) -> bool {
        match self {
            Command::Exec(a) => a.verbose,
            Command::Elect(a) => a.verbose,
            Command::Status(a) => a.verbose,
            Command::List(a) => a.verbose,
            Command::Break(a) => a.verbose,
            Command::Completions(_) | Command::Man(_) | Command::Mount(_) | Command::Migrate(_) => {
                false
            }
        }
    }
}

/// What is logged when neither MQLOCK_LOG nor RUST_LOG is set: mqlock's own warnings (a lock
/// lost, a retried acquisition), nothing from the AMQP library.
const DEFAULT_LOG: &str = "warn,lapin=off";

/// What `-v` logs when neither MQLOCK_LOG nor RUST_LOG is set: mqlock's debug lines (grants,
/// reconnects, releases) and every library's info and above (the AMQP library's own report of
/// a refused login or a 404 included).
const VERBOSE_LOG: &str = "info,mqlock=debug,mqlock_cli=debug";

/// The log filter: MQLOCK_LOG, else RUST_LOG, else [`VERBOSE_LOG`] with `-v`, else
/// [`DEFAULT_LOG`].
fn log_filter(verbose: bool) -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_env("MQLOCK_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(if verbose { VERBOSE_LOG } else { DEFAULT_LOG })
        })
}

fn main() -> ExitCode {
    // Parsed first: `-v` chooses the log filter. (Usage errors are clap's own output.)
    let cli = Cli::parse();
    // mqlock prints its own one-line message for every failure; the libraries' logs (lapin
    // reports an expected 404 or a refused login as an ERROR) stay quiet unless asked for with
    // -v, MQLOCK_LOG or RUST_LOG (e.g. MQLOCK_LOG=debug).
    tracing_subscriber::fmt()
        .with_env_filter(log_filter(cli.command.verbose()))
        .with_writer(std::io::stderr)
        // Colours for a terminal only, not in a log file or a test's captured output.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
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
