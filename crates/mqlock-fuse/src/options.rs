//! How a mount behaves.

use std::time::Duration;

/// How a mount behaves: start from `MountConfig::default()` and set the fields that differ.
///
/// ```
/// # use std::time::Duration;
/// let config = mqlock_fuse::MountConfig {
///     lock_timeout: Duration::from_secs(5),
///     lock_prefix: "team".into(),
///     ..Default::default()
/// };
/// # drop(config);
/// ```
#[derive(Debug, Clone)]
pub struct MountConfig {
    /// How long a write-open, truncate, unlink or rename waits for a file's lock (a rename: for
    /// both its locks, in all) before it fails with `ETIMEDOUT` (default 30 s). A process blocked in `open(2)` on a FUSE file cannot be
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
    /// Lock caching (default on, [`DEFAULT_LOCK_CACHING_IDLE`]): a file's lock stays held by
    /// this node after its last write handle is closed — parked
    /// ([`mqlock::LockTable::with_keep`]) — until another node wants it (its wait wakes this
    /// node, which then releases within a round trip) or it was unused for this long; this
    /// node's next write-open of the file takes it back without a broker round trip, with the
    /// same fencing token. The backing fd is still closed before the lock is parked, so
    /// close-to-open consistency across nodes is unchanged. `None` releases the lock at the
    /// last close (`mqlock mount --no-lock-caching`).
    pub lock_caching: Option<Duration>,
}

/// How long a mount keeps an unused file lock by default ([`MountConfig::lock_caching`]).
pub const DEFAULT_LOCK_CACHING_IDLE: Duration = Duration::from_secs(30);

impl Default for MountConfig {
    fn default() -> Self {
        MountConfig {
            lock_timeout: Duration::from_secs(30),
            lock_prefix: String::new(),
            allow_other: false,
            passthrough: false,
            read_passthrough: true,
            threads: 4,
            attr_timeout: Duration::ZERO,
            lock_caching: Some(DEFAULT_LOCK_CACHING_IDLE),
        }
    }
}
