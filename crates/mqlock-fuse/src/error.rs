//! Why a mount could not be set up, and why a file operation could not get its lock.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Why a mount could not be set up (or torn down).
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
    /// The lock service refused something, for instance a
    /// [`lock_prefix`](crate::MountConfig::lock_prefix) that cannot be part of a lock name
    /// ([`mqlock::Error::InvalidName`], which names the lock).
    #[error(transparent)]
    Lock(#[from] mqlock::Error),
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

/// Why a file lock could not be taken: the reason behind the errno of a refused write-open,
/// truncate, unlink or rename ([`LockError::errno`]), as the mount logs it.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another node holds the lock and the open asked not to wait (`O_NONBLOCK`).
    #[error("lock {name:?} is held elsewhere")]
    Busy {
        /// Lock name.
        name: String,
    },
    /// The wait ran out.
    #[error("timed out after {waited:?} waiting for lock {name:?}")]
    Timeout {
        /// Lock name.
        name: String,
        /// How long the open waited.
        waited: Duration,
    },
    /// The lock service failed (broker unreachable, invalid name...).
    #[error(transparent)]
    Lock(#[from] mqlock::Error),
}

impl LockError {
    /// The errno a file operation fails with: `EWOULDBLOCK` (= `EAGAIN`) for a busy lock under
    /// `O_NONBLOCK`, `ETIMEDOUT` when the wait ran out, `EIO` when the lock service failed.
    pub fn errno(&self) -> i32 {
        match self {
            LockError::Busy { .. } => libc::EWOULDBLOCK,
            LockError::Timeout { .. } => libc::ETIMEDOUT,
            LockError::Lock(_) => libc::EIO,
        }
    }
}
