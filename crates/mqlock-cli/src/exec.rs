//! `mqlock exec`: run a command while holding a lock.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use mqlock::{Error, LockGuard};
use tokio::signal::unix::{SignalKind, signal};

use crate::connect::ConnectArgs;
use crate::exit_code::{
    CANNOT_EXEC, FAILURE, INTERRUPTED, LOST, NOT_FOUND, TERMINATED, TIMEOUT, lock_error,
};
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

    /// Print what happens (grant, fencing token, release) on stderr.
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
    let mut sigint = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let mut sigterm = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let guard = tokio::select! {
        r = acquire => r,
        _ = sigint.recv() => { eprintln!("mqlock: interrupted while waiting for lock {:?}", args.name); return INTERRUPTED; }
        _ = sigterm.recv() => { eprintln!("mqlock: terminated while waiting for lock {:?}", args.name); return TERMINATED; }
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
    let code = supervise(args, &guard).await;
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

/// Runs the command and waits for it, passing signals on and watching the lock.
async fn supervise(args: &ExecArgs, guard: &LockGuard) -> u8 {
    let parent = std::process::id() as libc::pid_t;
    let mut cmd = tokio::process::Command::new(&args.command[0]);
    cmd.args(&args.command[1..])
        .env("MQLOCK_LOCK_NAME", &args.name)
        .env("MQLOCK_FENCING_TOKEN", guard.fencing_token().to_string())
        .process_group(0);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // If mqlock dies (even by SIGKILL), the broker releases the lock: CMD must not go on.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // mqlock may have died between fork and prctl.
            if libc::getppid() != parent {
                libc::_exit(LOST as i32);
            }
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mqlock: cannot run {:?}: {e}", args.command[0]);
            return if e.kind() == std::io::ErrorKind::NotFound {
                NOT_FOUND
            } else {
                CANNOT_EXEC
            };
        }
    };
    let pgid = child.id().map(|p| p as libc::pid_t);
    let send = |sig: libc::c_int| {
        if let Some(pgid) = pgid {
            // SAFETY: plain syscall; a group that is gone just yields ESRCH.
            unsafe { libc::kill(-pgid, sig) };
        }
    };
    let mut on_int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let mut on_term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut on_hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    let mut on_quit = signal(SignalKind::quit()).expect("SIGQUIT handler");
    let forward = async {
        loop {
            let sig = tokio::select! {
                _ = on_int.recv() => libc::SIGINT,
                _ = on_term.recv() => libc::SIGTERM,
                _ = on_hup.recv() => libc::SIGHUP,
                _ = on_quit.recv() => libc::SIGQUIT,
            };
            send(sig);
        }
    };
    let lost = tokio::select! {
        status = child.wait() => {
            // A frozen client (SIGSTOP, a suspended host) resumes with its command: the command
            // may finish before the loss is noticed, and its work then ran partly without the
            // lock. The lease tells: a loss that took effect by now is reported, never exit 0.
            if let Some(reason) = guard.loss_reason() {
                eprintln!(
                    "mqlock: lock {:?} was lost while the command ran (fencing token {}): {reason}; the command had already exited ({})",
                    args.name,
                    guard.fencing_token(),
                    exit_code(status)
                );
                return LOST;
            }
            return exit_code(status);
        }
        _ = forward => unreachable!("signal forwarding loops forever"),
        reason = guard.lost() => reason,
    };
    eprintln!(
        "mqlock: lock {:?} lost while the command ran (fencing token {}): {lost}; terminating it",
        args.name,
        guard.fencing_token()
    );
    send(libc::SIGTERM);
    if tokio::time::timeout(args.grace, child.wait())
        .await
        .is_err()
    {
        eprintln!(
            "mqlock: command still running {:?} after SIGTERM; sending SIGKILL",
            args.grace
        );
        send(libc::SIGKILL);
        let _ = child.wait().await;
    }
    LOST
}

fn exit_code(status: std::io::Result<std::process::ExitStatus>) -> u8 {
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => c as u8,
            (None, Some(sig)) => 128u8.saturating_add(sig as u8),
            _ => FAILURE,
        },
        Err(e) => {
            eprintln!("mqlock: waiting for the command failed: {e}");
            FAILURE
        }
    }
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
