//! `mqlock mount`: serve a shared directory through a FUSE mount that locks files opened for
//! writing, until SIGINT/SIGTERM or an outside `fusermount3 -u`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use mqlock_fuse::MountConfig;
use tokio::signal::unix::{SignalKind, signal};

use crate::connect::ConnectArgs;
use crate::metrics_server::MetricsArgs;

/// Options of `mqlock mount`.
///
/// `--prefix` (from the connection options) is the prefix of the broker's queue names; the
/// namespace of the file locks is `--lock-prefix`: a file's lock is `fs:{lock-prefix}/{path}`.
///
/// Example, with the file locks' metrics for Prometheus at http://127.0.0.1:9464/metrics:
/// mqlock mount --metrics-addr 127.0.0.1:9464 /srv/shared /mnt/shared
#[derive(Args, Debug)]
pub struct MountArgs {
    /// The shared directory to serve (e.g. an NFS export mounted on this node).
    pub backing: PathBuf,

    /// Where to mount it: an existing, empty directory with nothing mounted on it.
    pub mountpoint: PathBuf,

    #[command(flatten)]
    pub connect: ConnectArgs,

    #[command(flatten)]
    pub metrics: MetricsArgs,

    /// How long a write-open (and truncate, unlink, rename) waits for a file's lock before
    /// failing with ETIMEDOUT. An O_NONBLOCK open does not wait for a node that has the file
    /// open: it fails with EWOULDBLOCK (with lock caching after at most 250 ms, the time it
    /// gives a node that only keeps the lock parked to hand it over).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub lock_timeout: Duration,

    /// Namespace of the file locks; mounts that must exclude each other use the same one.
    #[arg(long, default_value = "")]
    pub lock_prefix: String,

    /// Let users other than the one mounting use the mount (needs user_allow_other in
    /// /etc/fuse.conf when not mounting as root).
    #[arg(long)]
    pub allow_other: bool,

    /// Kernel FUSE passthrough: reads and writes bypass the daemon (native speed), locks are
    /// still taken at open and released at the last close, but writes after a lost lock
    /// cannot be refused.
    #[arg(long)]
    pub passthrough: bool,

    /// Serve read-only opens through the kernel's page cache and the daemon instead of kernel
    /// passthrough. By default (when the kernel offers passthrough and mqlock runs as root)
    /// read-only opens read the backing file directly, write handles use direct I/O through
    /// the daemon, and memory maps map the backing file: stores through a writable mapping
    /// are then not refused after a lost lock.
    #[arg(long, conflicts_with = "passthrough")]
    pub no_read_passthrough: bool,

    /// FUSE worker threads.
    #[arg(long, default_value_t = 4)]
    pub threads: usize,

    /// How long the kernel may cache attributes and names. 0 (the default) always asks the
    /// backing directory, which other nodes change too.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub attr_timeout: Duration,

    /// Release a file's lock at the last close on this node. By default the lock stays held
    /// (parked) after the last close, so this node's next write-open of the file takes it back
    /// without a broker round trip; another node's write-open wakes this node, which then
    /// releases it within one hand-off. Close-to-open consistency is the same either way.
    #[arg(long)]
    pub no_lock_caching: bool,

    /// How long an unused file lock stays parked at most (lock caching) before it is released
    /// even though no other node asked for it. Example: --lock-caching-idle 2min
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, conflicts_with = "no_lock_caching")]
    pub lock_caching_idle: Duration,
}

/// Exit code when the mount cannot be set up (bad paths, metrics address, mount refused).
const EXIT_SETUP: u8 = crate::exit_code::MOUNT_SETUP;

pub async fn run(args: MountArgs) -> ExitCode {
    // Refuse bad paths before spending a broker connection on them.
    if let Err(e) = mqlock_fuse::preflight(&args.backing, &args.mountpoint) {
        eprintln!("mqlock mount: {e}");
        return ExitCode::from(EXIT_SETUP);
    }
    let client = match args.connect.connect().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mqlock mount: {e}");
            return ExitCode::from(crate::exit_code::lock_error(&e));
        }
    };
    if let Err(e) = args.metrics.serve(&client).await {
        eprintln!("mqlock mount: {e}");
        return ExitCode::from(EXIT_SETUP);
    }
    let config = MountConfig {
        lock_timeout: args.lock_timeout,
        lock_prefix: args.lock_prefix,
        allow_other: args.allow_other,
        passthrough: args.passthrough,
        read_passthrough: !args.no_read_passthrough,
        threads: args.threads,
        attr_timeout: args.attr_timeout,
        lock_caching: (!args.no_lock_caching).then_some(args.lock_caching_idle),
    };
    let (mut sigint, mut sigterm) = match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(a), Ok(b)) => (a, b),
        _ => {
            eprintln!("mqlock mount: cannot install signal handlers");
            return ExitCode::from(crate::exit_code::FAILURE);
        }
    };
    // Kept for the end: closing it releases the locks parked by lock caching at once.
    let closer = client.clone();
    let mut mounted =
        match mqlock_fuse::mount(&args.backing, &args.mountpoint, Arc::new(client), config) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("mqlock mount: {e}");
                return ExitCode::from(EXIT_SETUP);
            }
        };
    eprintln!(
        "mqlock mount: serving {} on {} (Ctrl-C or `fusermount3 -u {}` to stop)",
        args.backing.display(),
        mounted.mountpoint().display(),
        mounted.mountpoint().display()
    );
    tokio::select! {
        _ = mounted.ended() => {
            tracing::info!("unmounted from outside");
            closer.close().await;
            return ExitCode::SUCCESS;
        }
        _ = sigint.recv() => {}
        _ = sigterm.recv() => {}
    }
    if let Err(e) = mounted.unmount() {
        eprintln!("mqlock mount: {e}");
        return ExitCode::from(EXIT_SETUP);
    }
    // The unmount is lazy: a file still open keeps the session alive. Give such files a
    // moment, then exit anyway (the kernel then fails their I/O, and the broker frees their
    // locks when this process's connection closes).
    tokio::select! {
        _ = mounted.ended() => {}
        _ = tokio::time::sleep(Duration::from_secs(2)) => {
            eprintln!("mqlock mount: files are still open on {}; exiting anyway", args.mountpoint.display());
            std::process::exit(0);
        }
        _ = sigint.recv() => std::process::exit(0),
        _ = sigterm.recv() => std::process::exit(0),
    }
    closer.close().await;
    ExitCode::SUCCESS
}
