//! Setting a mount up and tearing it down: the mountpoint checks (mountinfo), the fd limit,
//! the read-ahead, and the FUSE session's thread.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fuser::{Config, MountOption, SessionACL, SessionUnmounter};

use crate::{Error, LockedFs, MountConfig, sys};

/// Checks that `path` is an existing directory with nothing mounted on it.
fn check_mountpoint(path: &Path) -> Result<PathBuf, Error> {
    let err = |source: io::Error| {
        if source.raw_os_error() == Some(libc::ENOTCONN) {
            // A FUSE mount whose daemon died: the path is mounted, just dead.
            Error::MountpointBusy {
                path: path.to_owned(),
            }
        } else {
            Error::Mountpoint {
                path: path.to_owned(),
                source,
            }
        }
    };
    let meta = std::fs::metadata(path).map_err(err)?;
    if !meta.is_dir() {
        return Err(Error::MountpointNotDir {
            path: path.to_owned(),
        });
    }
    let canonical = path.canonicalize().map_err(err)?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let busy = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|mp| unescape_mountinfo(mp) == canonical.as_os_str().to_string_lossy());
    if busy {
        return Err(Error::MountpointBusy {
            path: path.to_owned(),
        });
    }
    Ok(canonical)
}

/// mountinfo writes space, tab, newline and backslash as octal escapes.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every inode the kernel knows costs an `O_PATH` fd: lift the soft fd limit to the hard one.
/// A failure only means fewer inodes at once before lookups fail with `EMFILE`.
fn raise_fd_limit() {
    if let Err(e) = sys::raise_nofile_limit() {
        tracing::debug!(error = %e, "cannot raise the open file limit");
    }
}

/// Read-ahead of the mount, in KiB: one maximal FUSE request (256 pages).
const READ_AHEAD_KB: u32 = 1024;

/// The kernel gives a FUSE mount 128 KiB of read-ahead, so a sequential read through the
/// daemon arrives in 128 KiB requests; raise it to what one request may carry. The setting
/// lives in sysfs (root only) and the kernel lowers it to its own value when it processes the
/// session's INIT reply, so this waits for the mount to answer a `stat` first.
fn raise_readahead(mountpoint: &Path) {
    let dev = match std::fs::metadata(mountpoint) {
        Ok(m) => std::os::unix::fs::MetadataExt::dev(&m),
        Err(e) => {
            tracing::debug!(error = %e, "cannot stat the new mount to set its read-ahead");
            return;
        }
    };
    let path = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    if let Err(e) = std::fs::write(&path, READ_AHEAD_KB.to_string()) {
        tracing::debug!(path, error = %e, "cannot raise the mount's read-ahead");
    }
}

/// Checks, before anything is started, that `backing` is a directory and `mountpoint` an
/// existing directory with nothing mounted on it: a caller can refuse bad paths before it
/// spends a broker connection on them. [`mount`] checks the same again.
///
/// Blocks while it examines the two paths (a hung network file system under either one
/// blocks it as long as it blocks `stat(2)`).
///
/// # Errors
///
/// [`Error::Backing`] or [`Error::BackingNotDir`] for the backing path;
/// [`Error::Mountpoint`], [`Error::MountpointNotDir`] or [`Error::MountpointBusy`] (also for
/// a dead FUSE mount, which answers `ENOTCONN`) for the mountpoint.
pub fn preflight(backing: &Path, mountpoint: &Path) -> Result<(), Error> {
    let meta = std::fs::metadata(backing).map_err(|source| Error::Backing {
        path: backing.to_owned(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(Error::BackingNotDir {
            path: backing.to_owned(),
        });
    }
    check_mountpoint(mountpoint).map(drop)
}

/// A mounted filesystem.
///
/// Dropping it unmounts as [`Mounted::unmount`] does (unless that was called already) and
/// blocks the dropping thread until the FUSE session has ended, for at most 5 s: a file left
/// open keeps the mount (as root) or the lazily detached session (as another user) alive, and
/// the drop then leaves the session running rather than hang. To wait without blocking, call
/// [`Mounted::unmount`] and await [`Mounted::ended`] before the drop.
#[derive(Debug)]
pub struct Mounted {
    mountpoint: PathBuf,
    unmounter: SessionUnmounter,
    thread: Option<std::thread::JoinHandle<io::Result<()>>>,
    ended: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl Mounted {
    /// The mountpoint (canonical).
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Unmounts the mountpoint (fuser's unmount): as root a plain `umount(2)`, which fails
    /// while a file on the mount is open; as another user a lazy `fusermount3 -u -z`, after
    /// which the FUSE session ends once no file on the mount is open any more.
    /// [`Mounted::ended`] tells when the session has ended. Only the first call (or the drop)
    /// tries: later calls do nothing and return `Ok`, also after a failure.
    ///
    /// Blocks while the unmount runs (as another user, while `fusermount3` runs).
    ///
    /// # Errors
    ///
    /// [`Error::Unmount`] when the kernel refused, e.g. `EBUSY` as root while a file on the
    /// mount is open; the mount then stays where it is (`fusermount3 -u` removes it). The lazy
    /// unmount as another user reports no error.
    pub fn unmount(&mut self) -> Result<(), Error> {
        self.unmounter.unmount().map_err(|source| Error::Unmount {
            path: self.mountpoint.clone(),
            source,
        })
    }

    /// Resolves when the FUSE session has ended: after [`Mounted::unmount`] once the last open
    /// file is closed, or when someone unmounted the mountpoint from outside
    /// (`fusermount3 -u`). Once the session has ended it joins the session thread, which has
    /// nothing left to do by then, so that join does not hold up the runtime.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: its only await is the session's end signal, which stays in `self` when the
    /// future is dropped, so a later call waits for the same end and misses nothing.
    pub async fn ended(&mut self) {
        if let Some(rx) = self.ended.as_mut() {
            let _ = rx.await;
            self.ended = None;
        }
        self.join();
    }

    fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(mountpoint = %self.mountpoint.display(), error = %e, "FUSE session ended with an error")
                }
                Err(_) => {
                    tracing::error!(mountpoint = %self.mountpoint.display(), "FUSE session thread panicked")
                }
            }
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let Some(thread) = self.thread.as_ref() else {
            return;
        };
        if let Err(e) = self.unmounter.unmount() {
            tracing::warn!(mountpoint = %self.mountpoint.display(), error = %e, "unmount failed");
        }
        // A file left open keeps a lazily unmounted session alive: do not hang on it forever.
        let start = std::time::Instant::now();
        while !thread.is_finished() && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        if thread.is_finished() {
            self.join();
        } else {
            tracing::warn!(mountpoint = %self.mountpoint.display(), "files are still open on the unmounted file system; leaving its session running");
        }
    }
}

/// Mounts `backing` on `mountpoint`, locking files through `locker`.
///
/// Lock waits run as tasks on the tokio runtime `mount` is called in, never on a FUSE worker
/// thread. That runtime needs its timer (`enable_time` or `enable_all`: without it each lock
/// wait's task panics and the operation fails with `EIO`), and it must keep running while the
/// mount is used: on a current-thread runtime, a write-open made from the runtime's own thread
/// would wait for a task that only that thread can run. The FUSE session runs on its own
/// threads until [`Mounted::unmount`] or an outside unmount.
///
/// Blocks the calling thread while the mount is made (`fusermount3` when not root) and until
/// the new session has answered its first request.
///
/// # Errors
///
/// - [`Error::Mountpoint`], [`Error::MountpointNotDir`], [`Error::MountpointBusy`]: as
///   [`preflight`] for the mountpoint;
/// - [`Error::Backing`], [`Error::BackingNotDir`]: the backing directory cannot be opened;
/// - [`Error::Lock`]: `config.lock_prefix` cannot be part of a lock name
///   ([`mqlock::Error::InvalidName`]);
/// - [`Error::Mount`]: the kernel or `fusermount3` refused, or the session thread could not
///   be started.
///
/// # Panics
///
/// Panics when called outside the context of a tokio runtime, before it touches anything,
/// with tokio's message "there is no reactor running, must be called from the context of a
/// Tokio 1.x runtime" (from `tokio::runtime::Handle::current`).
pub fn mount(
    backing: &Path,
    mountpoint: &Path,
    locker: Arc<dyn mqlock::Locker>,
    config: MountConfig,
) -> Result<Mounted, Error> {
    let runtime = tokio::runtime::Handle::current();
    raise_fd_limit();
    let canonical = check_mountpoint(mountpoint)?;
    let mut fuse_config = Config::default();
    fuse_config.mount_options = vec![
        MountOption::FSName(format!("mqlock:{}", backing.display())),
        MountOption::Subtype("mqlock".into()),
        MountOption::DefaultPermissions,
    ];
    if config.allow_other {
        fuse_config.acl = SessionACL::All;
    }
    fuse_config.n_threads = Some(config.threads.max(1));
    // The worker threads share one /dev/fuse fd. With one fd each (`clone_fd`), the kernel
    // looks up a reply in the list of the fd it arrives on; fuser answers FUSE_INTERRUPT with
    // ENOSYS from whichever thread read it, so that answer missed the interrupted request
    // whenever another thread had read it, failed with ENOENT (logged as an error), and the
    // kernel kept sending interrupts for every signal a blocked opener got (a shell's SIGCHLD).
    // Through one fd the first ENOSYS reaches the kernel, which then stops sending them.
    fuse_config.clone_fd = false;
    let fs = LockedFs::new(backing, locker, config, runtime)?;
    let mut session =
        fuser::Session::new(fs, &canonical, &fuse_config).map_err(|source| Error::Mount {
            path: mountpoint.to_owned(),
            source,
        })?;
    let unmounter = session.unmount_callable();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("mqlock-fuse".into())
        .spawn(move || {
            let r = session.run();
            let _ = tx.send(());
            r
        })
        .map_err(|source| Error::Mount {
            path: mountpoint.to_owned(),
            source,
        })?;
    raise_readahead(&canonical);
    tracing::info!(backing = %backing.display(), mountpoint = %canonical.display(), "mounted");
    Ok(Mounted {
        mountpoint: canonical,
        unmounter,
        thread: Some(thread),
        ended: Some(rx),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo(r"/mnt/a\040b\011c"), "/mnt/a b\tc");
        assert_eq!(
            unescape_mountinfo(r"/mnt/back\134slash"),
            r"/mnt/back\slash"
        );
        // Not an escape: left as it is.
        assert_eq!(unescape_mountinfo(r"/mnt/x\09"), r"/mnt/x\09");
    }

    /// What the `# Panics` section of [`mount`] promises, checked before any path is touched.
    #[test]
    #[should_panic(expected = "must be called from the context of a Tokio 1.x runtime")]
    fn mount_outside_a_runtime_panics() {
        let locker: Arc<dyn mqlock::Locker> = Arc::new(mqlock::MemoryLocker::new());
        let _ = mount(
            Path::new("/nonexistent-backing"),
            Path::new("/nonexistent-mountpoint"),
            locker,
            MountConfig::default(),
        );
    }
}
