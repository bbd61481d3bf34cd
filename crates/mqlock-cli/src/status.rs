//! `mqlock status`: what the broker can tell about a lock.

use std::process::ExitCode;

use clap::Args;

use crate::connect::ConnectArgs;
use crate::exit_code::{HELD, OK, lock_error};

/// Show whether a lock is held, by whom (host, pid, client, fencing token, since when), and how
/// many clients wait for it.
///
/// The exit code says whether the lock is held (see below), so scripts can test it.
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

    /// Show mqlock's and the AMQP library's logs on stderr (debug level; MQLOCK_LOG or RUST_LOG,
    /// when set, choose instead).
    #[arg(long, short = 'v')]
    pub verbose: bool,

    #[command(flatten)]
    pub connect: ConnectArgs,
}

pub async fn run(args: StatusArgs) -> ExitCode {
    let client = match args.connect.connect().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mqlock: {e}");
            return ExitCode::from(lock_error(&e));
        }
    };
    let status = match client.status(&args.name).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mqlock: {e}");
            return ExitCode::from(lock_error(&e));
        }
    };
    client.close().await;
    if args.json {
        println!("{}", status_json(&status));
    } else if status.is_held() {
        println!(
            "{}: held{}; {} waiting (queue {} on {})",
            status.name,
            status
                .holder
                .as_ref()
                .map(|h| format!(" by {h}"))
                .unwrap_or_default(),
            status.waiters(),
            status.queue,
            client.broker_addr()
        );
    } else {
        println!(
            "{}: free{}{} (queue {} on {})",
            status.name,
            if status.exists {
                ""
            } else {
                ", never used or expired"
            },
            status
                .holder
                .as_ref()
                .map(|h| format!("; last held by {h}"))
                .unwrap_or_default(),
            status.queue,
            client.broker_addr()
        );
    }
    ExitCode::from(if status.is_held() { HELD } else { OK })
}

/// The `--json` form of a status. Field names are stable (documented in README.md, "Operating
/// mqlock", "Finding a stuck lock"): `name`, `queue`,
/// `exists`, `held`, `waiters`, `consumers`, `ready_messages`, and `holder` (null, or an object
/// with `host`, `pid`, `client`, `token`, `since` as RFC 3339, `since_unix_ms`, and `value`: an
/// election leader's value, null for a plain lock).
pub fn status_json(status: &mqlock::LockStatus) -> serde_json::Value {
    let holder = status.holder.as_ref().map(|h| {
        serde_json::json!({
            "host": h.host,
            "pid": h.pid,
            "client": h.client,
            "token": h.token,
            "since": humantime::format_rfc3339_millis(h.since).to_string(),
            "since_unix_ms": h.since.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
            "value": h.value,
        })
    });
    serde_json::json!({
        "name": status.name,
        "queue": status.queue,
        "exists": status.exists,
        "held": status.is_held(),
        "waiters": status.waiters(),
        "consumers": status.consumers,
        "ready_messages": status.ready_messages,
        "holder": holder,
    })
}
