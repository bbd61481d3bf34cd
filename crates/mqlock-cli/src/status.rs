//! `mqlock status`: what the broker can tell about a lock.

use std::process::ExitCode;

use clap::Args;

use crate::connect::ConnectArgs;
use crate::exec::EXIT_INTERNAL;

/// Show whether a lock is held and how many clients wait for it.
///
/// Exit status: 0 if the lock is free, 1 if it is held, 122 on error — so scripts can test it.
///
/// Example: mqlock status billing/nightly
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct StatusArgs {
    /// Lock name.
    pub name: String,

    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub connect: ConnectArgs,
}

pub async fn run(args: StatusArgs) -> ExitCode {
    let client = match args.connect.connect().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mqlock: {e}");
            return ExitCode::from(EXIT_INTERNAL);
        }
    };
    let status = match client.status(&args.name).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mqlock: {e}");
            return ExitCode::from(EXIT_INTERNAL);
        }
    };
    client.close().await;
    if args.json {
        println!(
            "{{\"name\":{:?},\"queue\":{:?},\"exists\":{},\"held\":{},\"waiters\":{},\"consumers\":{},\"ready_messages\":{}}}",
            status.name,
            status.queue,
            status.exists,
            status.is_held(),
            status.waiters(),
            status.consumers,
            status.ready_messages
        );
    } else if status.is_held() {
        println!(
            "{}: held; {} waiting (queue {} on {})",
            status.name,
            status.waiters(),
            status.queue,
            client.broker_addr()
        );
    } else {
        println!(
            "{}: free{} (queue {} on {})",
            status.name,
            if status.exists {
                ""
            } else {
                ", never used or expired"
            },
            status.queue,
            client.broker_addr()
        );
    }
    ExitCode::from(u8::from(status.is_held()))
}
