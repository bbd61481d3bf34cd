//! A lock-protected FUSE mount: a passthrough of a shared directory in which opening a file for
//! writing takes that file's [mqlock] distributed lock.
//!
//! Several nodes mount the same shared directory (an NFS export, a shared volume) through
//! mqlock. A write-open (`O_WRONLY`, `O_RDWR`, `O_CREAT`, `O_TRUNC`) waits for the file's lock
//! before it returns, so two nodes never write one file at once; readers are never blocked.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use mqlock::{ClientConfig, LockClient};
//! use mqlock_fuse::{MountOptions, mount};
//!
//! let client = LockClient::connect("amqp://guest:guest@127.0.0.1:5672/%2f", ClientConfig::default()).await?;
//! let mut mounted = mount("/srv/shared".as_ref(), "/mnt/shared".as_ref(), Arc::new(client), MountOptions::default())?;
//! // ... files under /mnt/shared are now lock-protected ...
//! mounted.unmount()?;
//! # Ok(()) }
//! ```
//!
//! The rules, in short (`docs/fuse.md` has the details):
//! - The lock name of a file is `fs:{lock_prefix}/{path relative to the mount root}`, so every
//!   node agrees on it whatever the mount and backing paths are.
//! - All write handles of one file on one node share one lock; the last release unlocks it.
//!   The backing fd is closed before the unlock, so the next holder reads every byte.
//! - `truncate(2)` on a path, `unlink` and `rename` (both paths, in sorted order) hold the
//!   locks for the duration of the operation.
//! - A wait ends after [`MountOptions::lock_timeout`] with `ETIMEDOUT`; an `O_NONBLOCK` open
//!   fails at once with `EWOULDBLOCK` when another node holds the lock. Lock waits run on the
//!   tokio runtime, never on a FUSE worker thread, so other files keep being served.
//! - When a lock is lost while a write handle is open, later writes, `fallocate`, size changes
//!   and `close` on that handle fail with `EIO`, and the loss is logged with the path and the
//!   fencing token. In [`MountOptions::passthrough`] mode the kernel writes straight to the
//!   backing file, so writes after a loss cannot be stopped there.

mod cache;
mod fs;
mod locks;
pub mod names;
mod sys;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fuser::{Config, MountOption, SessionACL, SessionUnmounter};

pub use fs::LockedFs;
pub use locks::LockError;

/// How a mount behaves.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MountOptions {
    /// How long a write-open, truncate, unlink or rename waits for a file's lock before it fails
    /// with `ETIMEDOUT` (default 30 s). A process blocked in `open(2)` on a FUSE file cannot be
    /// interrupted, so this bound is what keeps it killable.
    pub lock_timeout: Duration,
    /// Namespace of the lock names: `fs:{lock_prefix}/{path}` (default empty). Mounts that must
    /// exclude each other use the same prefix.
    pub lock_prefix: String,
    /// Let other users than the mounting one use the mount (`allow_other`).
    pub allow_other: bool,
    /// Kernel passthrough: reads and writes go straight to the backing file without a trip to
    /// the daemon. Locks are still taken at open and released at the last close, but writes
    /// after a lost lock cannot be refused.
    pub passthrough: bool,
    /// Kernel passthrough for read-only opens (default on): their reads go straight to the
    /// backing file, so they are as fast as the backing directory and always see its current
    /// bytes. Write handles then bypass the page cache (direct I/O through the daemon, which
    /// refuses writes once the lock is lost), and a memory map of any handle maps the backing
    /// file, so stores through a writable mapping are not checked against the lock. Used when
    /// the kernel offers passthrough and the daemon runs as root; otherwise, or when off, every
    /// open goes through the kernel's page cache and the daemon.
    pub read_passthrough: bool,
    /// FUSE worker threads (default 4).
    pub threads: usize,
    /// How long the kernel may cache attributes and names (default 0: other nodes change the
    /// shared directory behind this node's back, and a node that gets a lock must see the
    /// previous holder's size and times).
    pub attr_timeout: Duration,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            lock_timeout: Duration::from_secs(30),
            lock_prefix: String::new(),
            allow_other: false,
            passthrough: false,
            read_passthrough: true,
            threads: 4,
            attr_timeout: Duration::ZERO,
        }
    }
}

/// Why a mount could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The backing directory cannot be opened.
    #[error("backing directory {path}: {source}")]
    Backing {
        /// The path given.
        path: PathBuf,
        /// The error of opening it.
        #[source]
        source: io::Error,
    },
    /// The backing path is not a directory.
    #[error("backing path {path} is not a directory")]
    BackingNotDir {
        /// The path given.
        path: PathBuf,
    },
    /// The mountpoint does not exist or cannot be examined.
    #[error("mountpoint {path}: {source}")]
    Mountpoint {
        /// The path given.
        path: PathBuf,
        /// The error of examining it.
        #[source]
        source: io::Error,
    },
    /// The mountpoint is not a directory.
    #[error("mountpoint {path} is not a directory")]
    MountpointNotDir {
        /// The path given.
        path: PathBuf,
    },
    /// Something is already mounted on the mountpoint.
    #[error(
        "mountpoint {path} is busy: a file system is already mounted there (unmount it with `fusermount3 -u {path}`)"
    )]
    MountpointBusy {
        /// The path given.
        path: PathBuf,
    },
    /// The lock prefix cannot be part of a lock name.
    #[error("invalid lock prefix: {0}")]
    LockPrefix(#[source] mqlock::Error),
    /// The kernel or fusermount3 refused the mount.
    #[error("mounting {path} failed: {source}")]
    Mount {
        /// The mountpoint.
        path: PathBuf,
        /// What the mount reported.
        #[source]
        source: io::Error,
    },
    /// Unmounting failed (for instance because the mount is busy).
    #[error("unmounting {path} failed: {source}")]
    Unmount {
        /// The mountpoint.
        path: PathBuf,
        /// What the unmount reported.
        #[source]
        source: io::Error,
    },
}

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
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out pointer / in pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
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
/// existing directory with nothing mounted on it.
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

/// A mounted filesystem. Dropping it unmounts (lazily: files still open keep working until
/// closed) and waits a few seconds for the FUSE session to end.
#[derive(Debug)]
pub struct Mounted {
    mountpoint: PathBuf,
    unmounter: SessionUnmounter,
    thread: Option<std::thread::JoinHandle<io::Result<()>>>,
    ended: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl Mounted {
    /// The mountpoint.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Detaches the mount from the mountpoint. The FUSE session ends once no file on the mount
    /// is open any more; [`Mounted::ended`] tells when.
    pub fn unmount(&mut self) -> Result<(), Error> {
        self.unmounter.unmount().map_err(|source| Error::Unmount {
            path: self.mountpoint.clone(),
            source,
        })
    }

    /// Resolves when the FUSE session has ended: after [`Mounted::unmount`] once the last open
    /// file is closed, or when someone unmounted the mountpoint from outside
    /// (`fusermount3 -u`). Cancel safe.
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
/// Must be called inside a tokio runtime (multi-threaded): lock waits run on it. The FUSE
/// session runs on its own threads until [`Mounted::unmount`] or an outside unmount.
pub fn mount(
    backing: &Path,
    mountpoint: &Path,
    locker: Arc<dyn mqlock::Locker>,
    opts: MountOptions,
) -> Result<Mounted, Error> {
    let runtime = tokio::runtime::Handle::current();
    raise_fd_limit();
    let canonical = check_mountpoint(mountpoint)?;
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!("mqlock:{}", backing.display())),
        MountOption::Subtype("mqlock".into()),
        MountOption::DefaultPermissions,
    ];
    if opts.allow_other {
        config.acl = SessionACL::All;
    }
    config.n_threads = Some(opts.threads.max(1));
    // The worker threads share one /dev/fuse fd. With one fd each (`clone_fd`), the kernel
    // looks up a reply in the list of the fd it arrives on; fuser answers FUSE_INTERRUPT with
    // ENOSYS from whichever thread read it, so that answer missed the interrupted request
    // whenever another thread had read it, failed with ENOENT (logged as an error), and the
    // kernel kept sending interrupts for every signal a blocked opener got (a shell's SIGCHLD).
    // Through one fd the first ENOSYS reaches the kernel, which then stops sending them.
    config.clone_fd = false;
    let fs = LockedFs::new(backing, locker, opts, runtime)?;
    let mut session =
        fuser::Session::new(fs, &canonical, &config).map_err(|source| Error::Mount {
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
