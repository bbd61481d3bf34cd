//! `mqlock break`: the break-glass release of a stuck lock.

use std::process::ExitCode;

use clap::Args;
use mqlock::BreakOutcome;

use crate::connect::ConnectArgs;
use crate::exit_code::{OK, lock_error};

/// Ask the holder of a lock to give it up (break-glass release).
///
/// Sends a break request naming the current grant: the holder's loss signal fires with the
/// reason "broken by USER@HOST pid N at TIME" (an `mqlock exec` holder sends its command SIGTERM
/// and exits 123), and the next waiter is granted with a larger fencing token, keeping its place
/// in the queue. A holder whose process does not run (frozen, hung) cannot act on it; the broker
/// releases that one when its heartbeats stop.
///
/// Needs write permission on the default exchange (amq.default). Exits 0 when the request was
/// sent or there was nothing to break (the message says which).
///
/// Example: mqlock break deploy/prod
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct BreakArgs {
    /// Lock name.
    pub name: String,

    /// Show mqlock's and the AMQP library's logs on stderr (debug level; MQLOCK_LOG or RUST_LOG,
    /// when set, choose instead).
    #[arg(long, short = 'v')]
    pub verbose: bool,

    #[command(flatten)]
    pub connect: ConnectArgs,
}

pub async fn run(args: BreakArgs) -> ExitCode {
    let client = match args.connect.connect().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mqlock: {e}");
            return ExitCode::from(lock_error(&e));
        }
    };
    let outcome = client.break_lock(&args.name).await;
    client.close().await;
    match outcome {
        Ok(BreakOutcome::Requested { holder }) => {
            println!(
                "{}: asked the holder to give the lock up: {holder}",
                args.name
            );
            ExitCode::from(OK)
        }
        Ok(BreakOutcome::Free { last }) => {
            println!(
                "{}: free, nothing to break{}",
                args.name,
                last.map(|h| format!(" (last held by {h})"))
                    .unwrap_or_default()
            );
            ExitCode::from(OK)
        }
        Ok(BreakOutcome::Unknown) => {
            println!(
                "{}: no such lock (never used, or expired), nothing to break",
                args.name
            );
            ExitCode::from(OK)
        }
        Ok(other) => {
            println!("{}: {other:?}", args.name);
            ExitCode::from(OK)
        }
        Err(e) => {
            eprintln!("mqlock: {e}");
            ExitCode::from(lock_error(&e))
        }
    }
}
