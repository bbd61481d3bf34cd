//! The kernel backing files of passthrough handles.
//!
//! The kernel refuses two different backing files for one FUSE inode, so every passthrough
//! open of an inode reuses the inode's one `BackingId`, counted per open and given back to the
//! kernel at the last release (fuser's `examples/passthrough.rs` keeps them the same way in its
//! `BackingCache`, by handle; here the count is enough, as a handle never changes inode).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::sync::{Arc, Mutex};

use fuser::BackingId;

use super::inodes::Inode;
use crate::sys::{At, openat};

struct Backing {
    id: Arc<BackingId>,
    /// Opened read-write: write handles can share it.
    writable: bool,
    opens: usize,
}

/// One kernel backing file per inode, by FUSE inode number.
#[derive(Default)]
pub(super) struct BackingCache {
    by_inode: Mutex<HashMap<u64, Backing>>,
}

impl BackingCache {
    /// The backing file of `ino` for one more passthrough open (`write`: a write handle). The
    /// first open of an inode opens `inode` and hands the file to the kernel with `register`.
    /// Each success is given back with [`BackingCache::put`].
    pub(super) fn get_or(
        &self,
        ino: u64,
        write: bool,
        inode: impl FnOnce() -> io::Result<Arc<Inode>>,
        register: impl FnOnce(&File) -> io::Result<BackingId>,
    ) -> io::Result<Arc<BackingId>> {
        let mut b = self.by_inode.lock().unwrap();
        if let Some(backing) = b.get_mut(&ino) {
            if write && !backing.writable {
                return Err(io::Error::from_raw_os_error(libc::EACCES));
            }
            backing.opens += 1;
            return Ok(backing.id.clone());
        }
        let inode = inode()?;
        let (file, writable) = open_shared(&inode, write)?;
        let id = Arc::new(register(&file)?);
        b.insert(
            ino,
            Backing {
                id: id.clone(),
                writable,
                opens: 1,
            },
        );
        Ok(id)
    }

    /// Gives back one open of `ino`'s backing file; the last one closes it in the kernel.
    pub(super) fn put(&self, ino: u64) {
        let mut b = self.by_inode.lock().unwrap();
        if let Some(backing) = b.get_mut(&ino) {
            backing.opens -= 1;
            if backing.opens == 0 {
                b.remove(&ino);
            }
        }
    }
}

/// Opens `inode` as a backing file, read-write when possible so that readers and writers of
/// the inode can share it (a read-only file will do for readers). Returns whether it is
/// writable.
fn open_shared(inode: &Inode, write: bool) -> io::Result<(File, bool)> {
    let path = inode.proc_path();
    let (fd, writable) = match openat(At::Cwd, &path, libc::O_RDWR, 0) {
        Ok(fd) => (fd, true),
        Err(e) if write => return Err(e),
        Err(_) => (openat(At::Cwd, &path, libc::O_RDONLY, 0)?, false),
    };
    Ok((File::from(fd), writable))
}
