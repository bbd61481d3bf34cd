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
//! use mqlock_fuse::{MountConfig, mount};
//!
//! let client = LockClient::connect("amqp://guest:guest@127.0.0.1:5672/%2f", ClientConfig::default()).await?;
//! let mut mounted = mount("/srv/shared".as_ref(), "/mnt/shared".as_ref(), Arc::new(client), MountConfig::default())?;
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
//! - Lock caching ([`MountConfig::lock_caching`], on by default): the last release parks the
//!   lock instead (still held, after the backing fd was closed), and this node's next
//!   write-open of the file takes it back without a broker round trip. Another node's wait
//!   for the lock wakes this node, which releases it within one hand-off; unused, it is
//!   released after the idle limit. The locks stay the [`mqlock::Locker`]'s until then: the
//!   caller of [`mount`] closes its client to release them at once.
//! - `truncate(2)` on a path, `unlink` and `rename` hold the locks for the duration of the
//!   operation; a rename takes its two paths' locks all or none through the core's multi-lock
//!   ([`mqlock::LockTable::share_all`]: one global order, one timeout for the pair).
//! - A wait (a rename's, for both locks) ends after [`MountConfig::lock_timeout`] with
//!   `ETIMEDOUT`; an `O_NONBLOCK` open fails with `EWOULDBLOCK` when another node holds the
//!   lock (with lock caching after up to 250 ms, in which a node that only keeps the lock
//!   parked hands it over). Lock waits run on the tokio runtime, never on a FUSE worker
//!   thread, so other files keep being served.
//! - When a lock is lost while a write handle is open, later writes, `fallocate`, size changes
//!   and `close` on that handle fail with `EIO`, and the loss is logged with the path and the
//!   fencing token. In [`MountConfig::passthrough`] mode the kernel writes straight to the
//!   backing file, so writes after a loss cannot be stopped there.

mod error;
mod fs;
mod keep_cache;
mod locks;
mod mount;
pub mod names;
mod options;
mod sys;

pub use error::{Error, LockError};
pub use fs::LockedFs;
pub use mount::{Mounted, mount, preflight};
pub use options::{DEFAULT_LOCK_CACHING_IDLE, MountConfig};

/// The former name of [`MountConfig`].
#[deprecated(note = "renamed to MountConfig")]
pub type MountOptions = MountConfig;
