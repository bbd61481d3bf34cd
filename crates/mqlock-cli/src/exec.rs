//! `mqlock exec`: run a command while holding a lock.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use mqlock::Error;

use crate::child;
use crate::connect::ConnectArgs;
use crate::exit_code::{FAILURE, INTERRUPTED, LOST, TERMINATED, TIMEOUT, lock_error};
use crate::metrics_server::MetricsArgs;

/// Run CMD while holding the lock NAME.
///
/// Waits (FIFO) for the lock, runs CMD with MQLOCK_LOCK_NAME and MQLOCK_FENCING_TOKEN in its
/// environment, and releases the lock when CMD exits. Exits with CMD's exit status (128+N if
/// CMD was killed by signal N). SIGINT, SIGTERM, SIGHUP and SIGQUIT sent to mqlock are passed
/// on to CMD's process group. If mqlock dies, even by SIGKILL, the broker releases the lock and
/// CMD receives SIGKILL.
///
/// CMD can outlive the lock: for up to --grace after a loss (SIGTERM first), and for as long
/// as mqlock itself is frozen (SIGSTOP, a paused VM) while the broker hands the lock on. Give
/// CMD's writes MQLOCK_FENCING_TOKEN and let the resource refuse older tokens; that is what
/// keeps it safe then.
///
/// Example: mqlock exec nightly-report --timeout 10m -- ./report.sh --full
/// Metrics for Prometheus while it waits and runs (http://127.0.0.1:9464/metrics):
///          mqlock exec --metrics-addr 127.0.0.1:9464 nightly-report -- ./report.sh
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct ExecArgs {
    /// Lock name: any non-empty text without control characters, e.g. "billing/nightly".
    pub name: String,

    /// Give up waiting after this long (e.g. 30s, 5m) and exit with 124.
    #[arg(long, short = 'w', value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,

    /// Do not wait: exit with 124 at once if another client holds or awaits the lock.
    #[arg(long, short = 'n', conflicts_with = "timeout")]
    pub nonblock: bool,

    /// After a lost lock, how long CMD has between SIGTERM and SIGKILL.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub grace: Duration,

    /// Print what happens (grant, fencing token, release) on stderr, with mqlock's and the AMQP
    /// library's logs (debug level; MQLOCK_LOG or RUST_LOG, when set, choose instead).
    #[arg(long, short = 'v')]
    pub verbose: bool,

    /// Print the client's figures of merit (request rate R, release rate S, wait time T) at the end.
    #[arg(long)]
    pub stats: bool,

    #[command(flatten)]
    pub connect: ConnectArgs,

    #[command(flatten)]
    pub metrics: MetricsArgs,

    /// The command to run, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

pub async fn run(args: ExecArgs) -> ExitCode {
    let code = run_inner(&args).await;
    ExitCode::from(code)
}

async fn run_inner(args: &ExecArgs) -> u8 {
    let client = match args.connect.connect().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mqlock: {e}");
            return lock_error(&e);
        }
    };
    // Listening before the lock is requested: a scrape during the wait sees it.
    if let Err(e) = args.metrics.serve(&client).await {
        eprintln!("mqlock: {e}");
        client.close().await;
        return FAILURE;
    }
    let started = Instant::now();
    let acquire = async {
        if args.nonblock {
            client.try_lock(&args.name).await
        } else if let Some(t) = args.timeout {
            client.lock_timeout(&args.name, t).await.map(Some)
        } else {
            client.lock(&args.name).await.map(Some)
        }
    };
    let mut stop = child::Stop::listen();
    let guard = tokio::select! {
        r = acquire => r,
        _ = stop.int.recv() => { eprintln!("mqlock: interrupted while waiting for lock {:?}", args.name); return INTERRUPTED; }
        _ = stop.term.recv() => { eprintln!("mqlock: terminated while waiting for lock {:?}", args.name); return TERMINATED; }
    };
    let guard = match guard {
        Ok(Some(g)) => g,
        Ok(None) => {
            eprintln!(
                "mqlock: lock {:?} is held by another client (--nonblock){}",
                args.name,
                held_by(&client, &args.name).await
            );
            return TIMEOUT;
        }
        Err(e @ Error::Timeout { .. }) => {
            eprintln!("mqlock: {e}{}", held_by(&client, &args.name).await);
            return TIMEOUT;
        }
        Err(e) => {
            // A lock lost while it was being acquired is a failure too: CMD never ran, and
            // LOST means that CMD was terminated.
            eprintln!("mqlock: {e}");
            return FAILURE;
        }
    };
    if args.verbose {
        eprintln!(
            "mqlock: acquired {:?} with fencing token {} after {:.3?}",
            args.name,
            guard.fencing_token(),
            started.elapsed()
        );
    }
    let code = child::supervise(
        &args.command,
        &[
            ("MQLOCK_LOCK_NAME", args.name.clone()),
            ("MQLOCK_FENCING_TOKEN", guard.fencing_token().to_string()),
        ],
        &guard,
        args.grace,
        &format!("lock {:?}", args.name),
        &mut stop,
    )
    .await;
    let token = guard.fencing_token();
    match guard.release().await {
        Ok(()) if args.verbose => {
            eprintln!("mqlock: released {:?} (fencing token {token})", args.name)
        }
        Ok(()) => {}
        Err(e) if code != LOST => {
            eprintln!("mqlock: {e}");
        }
        Err(_) => {}
    }
    if args.stats {
        eprintln!("{}", client.metrics());
    }
    client.close().await;
    code
}

/// `"; held by …"` naming the lock's current holder, for a wait that gave up; empty when the
/// broker cannot tell (the holder recorded no identity, or the lock is free by now).
async fn held_by(client: &mqlock::LockClient, name: &str) -> String {
    match tokio::time::timeout(std::time::Duration::from_secs(5), client.status(name)).await {
        Ok(Ok(status)) if status.is_held() => match status.holder {
            Some(holder) => format!("; held by {holder}"),
            None => String::new(),
        },
        _ => String::new(),
    }
}
