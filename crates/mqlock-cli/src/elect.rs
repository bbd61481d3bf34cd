//! `mqlock elect`: run a command only while leader of an election, or watch an election.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use futures_util::StreamExt;
use mqlock::Leader;
use tokio::signal::unix::{SignalKind, signal};

use crate::child;
use crate::connect::ConnectArgs;
use crate::exit_code::{FAILURE, INTERRUPTED, LOST, OK, TERMINATED, lock_error};
use crate::metrics_server::MetricsArgs;

/// Run CMD only while leader of the election NAME, or watch who leads it (--observe)
///
/// mqlock elect NAME [--value V] -- CMD
///   Stands by (FIFO, behind earlier candidates) until elected, then runs CMD with
///   MQLOCK_ELECTION, MQLOCK_LEADER_VALUE and MQLOCK_FENCING_TOKEN in its environment, and
///   resigns when CMD exits. Exits with CMD's exit status. Leadership is the lock
///   "elect:NAME" (see mqlock exec): CMD is terminated when leadership is lost, signals are
///   passed on to it, and if mqlock dies (even by SIGKILL) a standby takes over and CMD
///   receives SIGKILL. V (default: this host's name) is what others see as the leader's value.
///   A deposed leader's CMD may still run for up to --grace, or while mqlock is frozen: give
///   its actions MQLOCK_FENCING_TOKEN and let the resource refuse older tokens.
///
/// mqlock elect --observe NAME [--json]
///   Prints the current leader, then one line per change, until interrupted (exit 0):
///   value, fencing token, pid and host, or "no leader". It looks every --interval: a change
///   shows within that plus a round trip or two; a leader that led for less may be skipped,
///   the latest never is. Printed tokens strictly increase.
///
/// Example: mqlock elect scheduler --value "$(hostname):8080" -- ./run-scheduler.sh
///          mqlock elect --observe scheduler
/// With metrics for Prometheus (mqlock_is_leader{election="scheduler"} is 1 while leading):
///          mqlock elect --metrics-addr 127.0.0.1:9464 scheduler -- ./run-scheduler.sh
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct ElectArgs {
    /// Election name: any non-empty text without control characters.
    pub name: String,

    /// The value others see while this candidate leads (at most 4096 bytes; default: the host
    /// name).
    #[arg(long, conflicts_with = "observe")]
    pub value: Option<String>,

    /// Watch the election instead of standing: print the leader and each change.
    #[arg(long, short = 'o')]
    pub observe: bool,

    /// With --observe: print one JSON object per line (value, token, host, pid, client, since;
    /// null for no leader).
    #[arg(long, requires = "observe")]
    pub json: bool,

    /// With --observe: how often to look.
    #[arg(long, default_value = "250ms", value_parser = humantime::parse_duration, requires = "observe")]
    pub interval: Duration,

    /// After a lost leadership, how long CMD has between SIGTERM and SIGKILL.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, conflicts_with = "observe")]
    pub grace: Duration,

    /// Print what happens (elected, fencing token, resigned) on stderr, with mqlock's and the
    /// AMQP library's logs (debug level; MQLOCK_LOG or RUST_LOG, when set, choose instead).
    #[arg(long, short = 'v')]
    pub verbose: bool,

    #[command(flatten)]
    pub connect: ConnectArgs,

    #[command(flatten)]
    pub metrics: MetricsArgs,

    /// The command to run while leader, after `--`.
    #[arg(
        last = true,
        value_name = "CMD",
        required_unless_present = "observe",
        conflicts_with = "observe"
    )]
    pub command: Vec<String>,
}

pub async fn run(args: ElectArgs) -> ExitCode {
    let code = if args.observe {
        observe(&args).await
    } else {
        campaign(&args).await
    };
    ExitCode::from(code)
}

async fn campaign(args: &ElectArgs) -> u8 {
    let client = match args.connect.connect().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mqlock: {e}");
            return lock_error(&e);
        }
    };
    // Listening before the campaign: a scrape while standing by shows is_leader 0.
    if let Err(e) = args.metrics.serve(&client).await {
        eprintln!("mqlock: {e}");
        client.close().await;
        return FAILURE;
    }
    let value = args.value.clone().unwrap_or_else(host_name);
    let started = Instant::now();
    let mut stop = child::Stop::listen();
    let won = tokio::select! {
        r = client.campaign(&args.name, &value) => r,
        _ = stop.int.recv() => { eprintln!("mqlock: interrupted while standing for election {:?}", args.name); return INTERRUPTED; }
        _ = stop.term.recv() => { eprintln!("mqlock: terminated while standing for election {:?}", args.name); return TERMINATED; }
    };
    let leadership = match won {
        Ok(l) => l,
        Err(e) => {
            eprintln!("mqlock: {e}");
            return FAILURE;
        }
    };
    if args.verbose {
        eprintln!(
            "mqlock: elected leader of {:?} with fencing token {} after {:.3?}",
            args.name,
            leadership.fencing_token(),
            started.elapsed()
        );
    }
    let code = child::supervise(
        &args.command,
        &[
            ("MQLOCK_ELECTION", args.name.clone()),
            ("MQLOCK_LEADER_VALUE", value),
            (
                "MQLOCK_FENCING_TOKEN",
                leadership.fencing_token().to_string(),
            ),
        ],
        leadership.guard(),
        args.grace,
        &format!("leadership of {:?}", args.name),
        &mut stop,
    )
    .await;
    let token = leadership.fencing_token();
    match leadership.resign().await {
        Ok(()) if args.verbose => {
            eprintln!("mqlock: resigned {:?} (fencing token {token})", args.name)
        }
        Ok(()) => {}
        Err(e) if code != LOST => eprintln!("mqlock: {e}"),
        Err(_) => {}
    }
    client.close().await;
    code
}

async fn observe(args: &ElectArgs) -> u8 {
    let client = match args.connect.connect().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mqlock: {e}");
            return lock_error(&e);
        }
    };
    if let Err(e) = args.metrics.serve(&client).await {
        eprintln!("mqlock: {e}");
        client.close().await;
        return FAILURE;
    }
    let mut sigint = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let mut sigterm = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let changes = client.observe_every(&args.name, args.interval);
    let mut changes = std::pin::pin!(changes);
    let mut seen = false;
    let code = loop {
        let next = tokio::select! {
            n = changes.next() => n,
            _ = sigint.recv() => break OK,
            _ = sigterm.recv() => break OK,
        };
        match next {
            Some(Ok(leader)) => {
                seen = true;
                if args.json {
                    println!("{}", leader_json(leader.as_ref()));
                } else {
                    match leader {
                        Some(l) => println!(
                            "{} token {} pid {} on {}",
                            l.value.escape_debug(),
                            l.token,
                            l.holder.pid,
                            l.holder.host
                        ),
                        None => println!("no leader"),
                    }
                }
            }
            // A bad name or a broker that cannot be reached at the first look: give up.
            // Later failures are passing (the client reconnects at the next look).
            Some(Err(e)) if !seen => {
                eprintln!("mqlock: {e}");
                break lock_error(&e);
            }
            Some(Err(e)) => eprintln!("mqlock: {e}; looking again"),
            None => break OK,
        }
    };
    client.close().await;
    code
}

/// One line of `elect --observe --json`: `null`, or `value`, `token`, `host`, `pid`, `client`,
/// `since` (RFC 3339), `since_unix_ms`.
fn leader_json(leader: Option<&Leader>) -> serde_json::Value {
    match leader {
        None => serde_json::Value::Null,
        Some(l) => serde_json::json!({
            "value": l.value,
            "token": l.token,
            "host": l.holder.host,
            "pid": l.holder.pid,
            "client": l.holder.client,
            "since": humantime::format_rfc3339_millis(l.holder.since).to_string(),
            "since_unix_ms": l.holder.since.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
        }),
    }
}

fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is writable for its whole length; gethostname writes at most that much.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}
