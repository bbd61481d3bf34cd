//! Running a command under a held lock, shared by `mqlock exec` and `mqlock elect`: the command
//! gets its own process group, mqlock's signals, and SIGKILL when mqlock dies; a loss of the lock
//! terminates it.

use std::future::Future;
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use mqlock::{LockGuard, LossReason};
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::exit_code::{CANNOT_EXEC, FAILURE, LOST, NOT_FOUND};

/// The SIGINT and SIGTERM listeners of a run, made before it waits for the lock and handed on
/// to [`supervise`]: a signal that arrives between the grant and the command's start is then
/// passed on to the command instead of being lost (a listener made later would not see it).
pub struct Stop {
    /// SIGINT.
    pub int: Signal,
    /// SIGTERM.
    pub term: Signal,
}

impl Stop {
    /// Starts listening for SIGINT and SIGTERM.
    pub fn listen() -> Self {
        Stop {
            int: signal(SignalKind::interrupt()).expect("SIGINT handler"),
            term: signal(SignalKind::terminate()).expect("SIGTERM handler"),
        }
    }
}

/// What `supervise` watches: a held lock of any kind (a lock, a permit, a read or write hold).
pub trait Held {
    /// The fencing token the command is given.
    fn fencing_token(&self) -> u64;
    /// Why the hold was lost, if it was.
    fn loss_reason(&self) -> Option<LossReason>;
    /// Resolves when the hold is lost.
    fn lost(&self) -> impl Future<Output = LossReason>;
}

impl Held for LockGuard {
    fn fencing_token(&self) -> u64 {
        LockGuard::fencing_token(self)
    }
    fn loss_reason(&self) -> Option<LossReason> {
        LockGuard::loss_reason(self)
    }
    fn lost(&self) -> impl Future<Output = LossReason> {
        LockGuard::lost(self)
    }
}

/// Runs `command` (with `env` added to its environment) in its own process group and waits for
/// it, passing SIGINT, SIGTERM (from `stop`), SIGHUP and SIGQUIT on and watching `guard`: on a loss, SIGTERM,
/// then SIGKILL after `grace`, and [`LOST`]. `what` names the lock in messages ("lock \"x\"").
/// Returns the command's exit code (128+N for signal N), or [`LOST`], [`NOT_FOUND`],
/// [`CANNOT_EXEC`], [`FAILURE`].
pub async fn supervise(
    command: &[String],
    env: &[(&str, String)],
    guard: &impl Held,
    grace: Duration,
    what: &str,
    stop: &mut Stop,
) -> u8 {
    let parent = std::process::id() as libc::pid_t;
    let mut cmd = tokio::process::Command::new(&command[0]);
    cmd.args(&command[1..])
        .envs(env.iter().map(|(k, v)| (k, v)))
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
            eprintln!("mqlock: cannot run {:?}: {e}", command[0]);
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
    let mut on_hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    let mut on_quit = signal(SignalKind::quit()).expect("SIGQUIT handler");
    let forward = async {
        loop {
            let sig = tokio::select! {
                _ = stop.int.recv() => libc::SIGINT,
                _ = stop.term.recv() => libc::SIGTERM,
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
                    "mqlock: {what} was lost while the command ran (fencing token {}): {reason}; the command had already exited ({})",
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
        "mqlock: {what} lost while the command ran (fencing token {}): {lost}; terminating it",
        guard.fencing_token()
    );
    send(libc::SIGTERM);
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        eprintln!(
            "mqlock: command still running {:?} after SIGTERM; sending SIGKILL",
            grace
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
