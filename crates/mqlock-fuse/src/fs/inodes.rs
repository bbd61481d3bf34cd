//! The inode table: one `O_PATH` fd per inode the kernel knows, keyed by the backing
//! `(st_dev, st_ino)`, so renames on the backing side never leave the daemon with a stale path.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use fuser::FileAttr;

use super::attr::file_attr;
use crate::Error;
use crate::sys::{self, At, cstr, fstat, openat};

/// The FUSE inode number of the mount root.
pub(super) const ROOT: u64 = 1;

pub(super) struct Inode {
    pub(super) fd: OwnedFd,
    pub(super) key: (u64, u64),
}

impl Inode {
    /// The inode as the starting point of an `*at` call on its entries (a directory's).
    pub(super) fn at(&self) -> At<'_> {
        At::Dir(self.fd.as_fd())
    }

    /// `/proc/self/fd/N` of the inode's fd: opens or addresses the inode itself.
    pub(super) fn proc_path(&self) -> std::ffi::CString {
        sys::proc_path(self.fd.as_fd())
    }

    /// `/proc/self/fd/N` of the inode's fd, for std's path-based calls.
    pub(super) fn fd_path(&self) -> String {
        format!("/proc/self/fd/{}", self.fd.as_raw_fd())
    }

    /// The inode's current path, as the backing file system resolves it.
    fn path(&self) -> io::Result<std::path::PathBuf> {
        std::fs::read_link(self.fd_path())
    }
}

#[derive(Default)]
struct Table {
    by_ino: HashMap<u64, Arc<Inode>>,
    by_key: HashMap<(u64, u64), u64>,
    /// The kernel's lookup count of each inode but the root: the inode is dropped at zero.
    lookups: HashMap<u64, u64>,
    next: u64,
}

pub(super) struct InodeTable {
    /// The backing directory's path at mount time (no trailing slash): what the paths of the
    /// inodes' fds start with, and what lock names leave out.
    root_path: Vec<u8>,
    table: Mutex<Table>,
}

fn enoent() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOENT)
}

impl InodeTable {
    /// Opens the backing directory as the root inode.
    pub(super) fn open(backing: &Path) -> Result<Self, Error> {
        let backing_err = |source| Error::Backing {
            path: backing.to_owned(),
            source,
        };
        let c = cstr(backing.as_os_str()).map_err(backing_err)?;
        let fd = openat(At::Cwd, &c, libc::O_PATH | libc::O_DIRECTORY, 0).map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOTDIR) {
                Error::BackingNotDir {
                    path: backing.to_owned(),
                }
            } else {
                backing_err(e)
            }
        })?;
        let st = fstat(fd.as_fd()).map_err(backing_err)?;
        let key = (st.st_dev, st.st_ino);
        let root = Inode { fd, key };
        let mut root_path = root
            .path()
            .map_err(backing_err)?
            .as_os_str()
            .as_bytes()
            .to_vec();
        if root_path.last() == Some(&b'/') {
            root_path.pop();
        }
        let mut table = Table {
            next: ROOT + 1,
            ..Table::default()
        };
        table.by_key.insert(key, ROOT);
        table.by_ino.insert(ROOT, Arc::new(root));
        Ok(InodeTable {
            root_path,
            table: Mutex::new(table),
        })
    }

    pub(super) fn root_path(&self) -> &[u8] {
        &self.root_path
    }

    pub(super) fn get(&self, ino: u64) -> io::Result<Arc<Inode>> {
        self.table
            .lock()
            .unwrap()
            .by_ino
            .get(&ino)
            .cloned()
            .ok_or_else(enoent)
    }

    pub(super) fn stat(&self, ino: u64) -> io::Result<FileAttr> {
        let inode = self.get(ino)?;
        Ok(file_attr(ino, &fstat(inode.fd.as_fd())?))
    }

    /// Looks `name` up in `parent` and counts one kernel reference to the result.
    pub(super) fn lookup(&self, parent: u64, name: &OsStr) -> io::Result<FileAttr> {
        let dir = self.get(parent)?;
        let fd = openat(dir.at(), &cstr(name)?, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
        let st = fstat(fd.as_fd())?;
        let key = (st.st_dev, st.st_ino);
        let mut t = self.table.lock().unwrap();
        // The fd of a known inode pins it, so a (dev, ino) found here cannot be a reused number.
        let ino = match t.by_key.get(&key) {
            Some(&ino) => ino,
            None => {
                let ino = t.next;
                t.next += 1;
                t.by_key.insert(key, ino);
                t.by_ino.insert(ino, Arc::new(Inode { fd, key }));
                ino
            }
        };
        *t.lookups.entry(ino).or_default() += 1;
        Ok(file_attr(ino, &st))
    }

    /// Drops `n` kernel references to `ino`; true when that was the last one and the inode is
    /// gone from the table (the root never goes).
    pub(super) fn forget(&self, ino: u64, n: u64) -> bool {
        if ino == ROOT {
            return false;
        }
        let mut t = self.table.lock().unwrap();
        let left = match t.lookups.get_mut(&ino) {
            Some(c) => {
                *c = c.saturating_sub(n);
                *c
            }
            None => return false,
        };
        if left != 0 {
            return false;
        }
        t.lookups.remove(&ino);
        if let Some(inode) = t.by_ino.remove(&ino) {
            t.by_key.remove(&inode.key);
        }
        true
    }

    /// The path of `ino` relative to the mount root, as the backing file system knows it now
    /// (what lock names are made of, so that every node names a file alike).
    pub(super) fn rel_path(&self, ino: u64) -> io::Result<Vec<u8>> {
        let link = self.get(ino)?.path()?;
        let b = link.as_os_str().as_bytes();
        let rel = b.strip_prefix(self.root_path.as_slice()).unwrap_or(b);
        Ok(rel.strip_prefix(b"/").unwrap_or(rel).to_vec())
    }

    /// The relative path of the entry `name` in `parent`.
    pub(super) fn child_path(&self, parent: u64, name: &OsStr) -> io::Result<Vec<u8>> {
        let mut p = self.rel_path(parent)?;
        if !p.is_empty() {
            p.push(b'/');
        }
        p.extend_from_slice(name.as_bytes());
        Ok(p)
    }
}
