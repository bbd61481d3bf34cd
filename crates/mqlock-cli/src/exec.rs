//! `mqlock exec`: run a command while holding a lock.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use mqlock::{Error, LockClient, LockGuard, LossReason, Permit, ReadGuard, WriteGuard};

use crate::child::{self, Held};
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
/// The lock is a plain lock unless one of these makes it another kind, which every client of
/// NAME must then agree on (a mismatch is refused by the broker and exits 122):
///   --permits N   a semaphore of N permits: up to N commands run at once; CMD also gets
///                 MQLOCK_PERMIT (0..N-1); tokens grow per permit
///   --shared      a read-write lock, shared side (like flock -s): readers run together
///   --exclusive   a read-write lock, exclusive side (like flock -x on the same file)
///
/// Example: mqlock exec nightly-report --timeout 10m -- ./report.sh --full
///          mqlock exec --permits 3 encoder -- ./encode.sh   # at most 3 at once
///          mqlock exec --shared catalog -- ./read.sh        # with --exclusive for writers
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

    /// Do not wait: exit with 124 at once if another client holds or awaits the lock (with
    /// --permits: every permit).
    #[arg(long, short = 'n', conflicts_with_all = ["timeout", "shared", "exclusive"])]
    pub nonblock: bool,

    /// Use NAME as a semaphore of N permits (1 to 128), agreed by every client of NAME.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=mqlock::MAX_PERMITS as i64), conflicts_with_all = ["shared", "exclusive"])]
    pub permits: Option<u32>,

    /// Use NAME as a read-write lock and take its shared (read) side.
    #[arg(long, short = 's', conflicts_with = "exclusive")]
    pub shared: bool,

    /// Use NAME as a read-write lock and take its exclusive (write) side.
    #[arg(long, short = 'x')]
    pub exclusive: bool,

    /// With --shared or --exclusive: how many readers the read-write lock admits at once,
    /// agreed by every client of NAME.
    #[arg(long, value_name = "N", default_value_t = mqlock::DEFAULT_MAX_READERS, value_parser = clap::value_parser!(u32).range(1..=mqlock::MAX_PERMITS as i64))]
    pub max_readers: u32,

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
    let acquire = Hold::acquire(&client, args);
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
            "mqlock: acquired {:?}{} with fencing token {} after {:.3?}",
            args.name,
            guard.describe(),
            guard.fencing_token(),
            started.elapsed()
        );
    }
    let mut env = vec![
        ("MQLOCK_LOCK_NAME", args.name.clone()),
        ("MQLOCK_FENCING_TOKEN", guard.fencing_token().to_string()),
    ];
    if let Hold::Permit(p) = &guard {
        env.push(("MQLOCK_PERMIT", p.slot().to_string()));
    }
    let code = child::supervise(
        &args.command,
        &env,
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

/// What `exec` holds while CMD runs: the lock of the kind asked for.
enum Hold {
    Lock(LockGuard),
    Permit(Permit),
    Read(ReadGuard),
    Write(WriteGuard),
}

impl Hold {
    /// Waits (or not: --nonblock; or up to --timeout) for the kind of hold `args` asks for.
    async fn acquire(client: &LockClient, args: &ExecArgs) -> mqlock::Result<Option<Hold>> {
        let name = &args.name;
        if args.shared || args.exclusive {
            let rw = client.rw_lock(name, args.max_readers)?;
            return Ok(Some(match (args.shared, args.timeout) {
                (true, Some(t)) => Hold::Read(rw.read_timeout(t).await?),
                (true, None) => Hold::Read(rw.read().await?),
                (false, Some(t)) => Hold::Write(rw.write_timeout(t).await?),
                (false, None) => Hold::Write(rw.write().await?),
            }));
        }
        if let Some(permits) = args.permits {
            let semaphore = client.semaphore(name, permits)?;
            let permit = if args.nonblock {
                semaphore.try_acquire().await?
            } else if let Some(t) = args.timeout {
                Some(semaphore.acquire_timeout(t).await?)
            } else {
                Some(semaphore.acquire().await?)
            };
            return Ok(permit.map(Hold::Permit));
        }
        let guard = if args.nonblock {
            client.try_lock(name).await?
        } else if let Some(t) = args.timeout {
            Some(client.lock_timeout(name, t).await?)
        } else {
            Some(client.lock(name).await?)
        };
        Ok(guard.map(Hold::Lock))
    }

    /// How the verbose line names the hold, after the lock's name.
    fn describe(&self) -> String {
        match self {
            Hold::Lock(_) => String::new(),
            Hold::Permit(p) => format!(" (permit {})", p.slot()),
            Hold::Read(_) => " (shared)".to_owned(),
            Hold::Write(_) => " (exclusive)".to_owned(),
        }
    }

    async fn release(self) -> mqlock::Result<()> {
        match self {
            Hold::Lock(g) => g.release().await,
            Hold::Permit(p) => p.release().await,
            Hold::Read(r) => r.release().await,
            Hold::Write(w) => w.release().await,
        }
    }
}

impl child::Held for Hold {
    fn fencing_token(&self) -> u64 {
        match self {
            Hold::Lock(g) => g.fencing_token(),
            Hold::Permit(p) => p.fencing_token(),
            Hold::Read(r) => r.fencing_token(),
            Hold::Write(w) => w.fencing_token(),
        }
    }

    fn loss_reason(&self) -> Option<LossReason> {
        match self {
            Hold::Lock(g) => g.loss_reason(),
            Hold::Permit(p) => p.loss_reason(),
            Hold::Read(r) => r.loss_reason(),
            Hold::Write(w) => w.loss_reason(),
        }
    }

    async fn lost(&self) -> LossReason {
        match self {
            Hold::Lock(g) => g.lost().await,
            Hold::Permit(p) => p.lost().await,
            Hold::Read(r) => r.lost().await,
            Hold::Write(w) => w.lost().await,
        }
    }
}
