//! When the kernel may keep its page cache of a file across opens, in the page-cache mode
//! (`MountConfig::read_passthrough` off or unavailable; with read passthrough no handle of a
//! regular file uses the FUSE page cache, so there is nothing to keep).
//!
//! Without `FOPEN_KEEP_CACHE` the kernel drops a file's page cache at every open, so every
//! read goes through the daemon: close-to-open consistency at a tenth of the backing
//! directory's read speed. Keeping the cache is safe when the cached bytes are those of the
//! backing file now. This node knows that in two cases:
//!
//! - **Nothing changed the backing file** since the cache was last known good: its version
//!   (device, inode, size, mtime, ctime, all to the nanosecond) at this open is the one recorded
//!   when this node last dropped the cache or last wrote the file itself. Another node's write
//!   changes mtime and ctime (and file systems with fine-grained timestamps, ext4 and xfs on
//!   Linux ≥ 6.13, give a change that follows a `stat` a timestamp of its own). This is all a
//!   read-only open can check, as it takes no lock.
//! - For a **write-open** the version must match *and* the file's lock must have passed to
//!   nobody else since this node last held it: the new grant's fencing token is the one of the
//!   grant this node last wrote or opened under (the same grant, shared by several handles),
//!   or the next one. Tokens grow strictly with every grant (F1 in docs/protocol.md), so a
//!   foreign grant in between would leave a gap. A node that gets the lock thus reads the
//!   previous holder's bytes even if that holder's write left size and times unchanged. With
//!   lock caching (`MountConfig::lock_caching`) a write-open usually takes back the lock this
//!   node kept parked since its last close: the same grant, so the same token, and nobody else
//!   held the lock in between (a parked lock is still held; once another node asks, it is
//!   released and this node's next grant has a larger token, past the other node's).
//!
//! Every other case drops the cache and records the version at this open as the new baseline
//! (recorded before any byte is read into the fresh cache, so a change racing with the reads
//! only makes the next open drop the cache again). A write through a handle of this node
//! keeps the baseline moving: the kernel put the written bytes in its cache, so the version
//! after the write is a good one, provided the baseline belongs to the same grant (no foreign
//! change has been seen since the write-open). Anything whose effect on the kernel's cache is
//! not a plain write (`fallocate`, a truncate on a path) forgets the baseline.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// What identifies the contents of a backing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Version {
    dev: u64,
    ino: u64,
    size: i64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Version {
    pub(crate) fn of(st: &libc::stat) -> Self {
        Version {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size,
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
        }
    }
}

/// A lock grant: the lock name and its fencing token.
pub(crate) type Grant<'a> = (&'a str, u64);

struct Baseline {
    version: Version,
    /// The grant this node held when it recorded the baseline, if any.
    grant: Option<(Arc<str>, u64)>,
}

/// The last known-good version of each inode's cache, by FUSE inode number.
#[derive(Default)]
pub(crate) struct CacheBaselines {
    map: Mutex<HashMap<u64, Baseline>>,
}

impl CacheBaselines {
    /// At an open of `ino` whose backing file is at `now` (`grant`: the lock of a write-open):
    /// whether the kernel may keep its cache. Records the new baseline.
    pub(crate) fn open(&self, ino: u64, now: Version, grant: Option<Grant<'_>>) -> bool {
        let mut map = self.map.lock().unwrap();
        let keep = match (map.get(&ino), grant) {
            (Some(b), None) => b.version == now,
            (Some(b), Some((name, token))) => {
                b.version == now
                    && b.grant.as_ref().is_some_and(|(n, t)| {
                        &**n == name && (token == *t || token == t.saturating_add(1))
                    })
            }
            (None, _) => false,
        };
        let owned = grant.map(|(n, t)| (Arc::<str>::from(n), t));
        match map.get_mut(&ino) {
            Some(b) if keep => {
                if owned.is_some() {
                    b.grant = owned;
                }
            }
            _ => {
                map.insert(
                    ino,
                    Baseline {
                        version: now,
                        grant: owned,
                    },
                );
            }
        }
        keep
    }

    /// After this node wrote `ino` (or changed its size) through a handle of `grant`, leaving
    /// the backing file at `now`: the kernel's cache holds that change.
    pub(crate) fn wrote(&self, ino: u64, now: Version, grant: Grant<'_>) {
        let mut map = self.map.lock().unwrap();
        if let Some(b) = map.get_mut(&ino)
            && b.grant
                .as_ref()
                .is_some_and(|(n, t)| &**n == grant.0 && *t == grant.1)
        {
            b.version = now;
        }
    }

    /// The kernel's cache of `ino` may no longer match any recorded version.
    pub(crate) fn forget(&self, ino: u64) {
        self.map.lock().unwrap().remove(&ino);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(size: i64, mtime: i64) -> Version {
        Version {
            dev: 1,
            ino: 2,
            size,
            mtime: (mtime, 0),
            ctime: (mtime, 0),
        }
    }

    #[test]
    fn a_read_open_keeps_the_cache_only_while_the_version_is_unchanged() {
        let c = CacheBaselines::default();
        assert!(!c.open(5, v(1, 1), None), "nothing known yet");
        assert!(c.open(5, v(1, 1), None));
        assert!(!c.open(5, v(1, 2), None), "times changed");
        assert!(c.open(5, v(1, 2), None));
        assert!(!c.open(5, v(2, 2), None), "size changed");
        assert!(!c.open(6, v(2, 2), None), "another inode");
    }

    #[test]
    fn a_write_open_also_needs_an_unbroken_chain_of_grants() {
        let c = CacheBaselines::default();
        let (f, g): (Arc<str>, Arc<str>) = ("fs:/f".into(), "fs:/g".into());
        assert!(!c.open(1, v(1, 1), Some((&f, 10))));
        // Same grant (a second handle), then the next grant.
        assert!(c.open(1, v(1, 1), Some((&f, 10))));
        assert!(c.open(1, v(1, 1), Some((&f, 11))));
        // A foreign grant in between (token 12) leaves a gap, even with the same version.
        assert!(!c.open(1, v(1, 1), Some((&f, 13))));
        assert!(c.open(1, v(1, 1), Some((&f, 14))));
        // Another lock name (the file was renamed).
        assert!(!c.open(1, v(1, 1), Some((&g, 15))));
        // A read-open that saw a change leaves no grant: the next write-open drops the cache.
        assert!(!c.open(1, v(1, 2), None));
        assert!(!c.open(1, v(1, 2), Some((&g, 16))));
        // A read-open that saw no change keeps the grant.
        assert!(c.open(1, v(1, 2), None));
        assert!(c.open(1, v(1, 2), Some((&g, 17))));
    }

    /// Lock caching: each write-open of a file this node keeps parked is the same grant, so
    /// the same token, again and again; once another node took the lock in between, this
    /// node's next grant leaves a gap.
    #[test]
    fn a_lock_taken_back_from_the_park_keeps_the_cache_and_a_fresh_grant_after_another_does_not() {
        let c = CacheBaselines::default();
        let f: Arc<str> = "fs:/f".into();
        assert!(!c.open(1, v(1, 1), Some((&f, 10))));
        for i in 2..20 {
            // Closed (parked), opened again (taken back: token 10), written.
            assert!(c.open(1, v(i - 1, i - 1), Some((&f, 10))), "round {i}");
            c.wrote(1, v(i, i), (&f, 10));
        }
        // Another node was granted 11 and wrote (here: same size and times, to be sure the
        // token alone decides); this node's next grant is 12.
        assert!(!c.open(1, v(19, 19), Some((&f, 12))));
    }

    #[test]
    fn own_writes_move_the_baseline_only_under_the_recorded_grant() {
        let c = CacheBaselines::default();
        let f: Arc<str> = "fs:/f".into();
        c.open(1, v(1, 1), Some((&f, 10)));
        c.wrote(1, v(5, 2), (&f, 10));
        assert!(c.open(1, v(5, 2), None), "our own write");
        c.wrote(1, v(6, 3), (&f, 9));
        assert!(!c.open(1, v(6, 3), None), "a write under an old grant");
        c.wrote(1, v(7, 4), (&f, 10));
        assert!(!c.open(1, v(7, 4), None), "the failed open reset the grant");
        c.open(1, v(7, 4), Some((&f, 11)));
        c.forget(1);
        assert!(!c.open(1, v(7, 4), None), "forgotten");
    }
}
