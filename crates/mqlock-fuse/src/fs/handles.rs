//! Open files and directories, and how the kernel serves a new handle: through the page cache
//! or through a kernel backing file (passthrough).

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::DirEntryExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fuser::{BackingId, Errno, FileAttr, FileType, FopenFlags};

use super::Inner;
use super::attr;
use crate::keep_cache::Version;
use crate::locks::Share;
use crate::sys::{At, fstat, openat};

/// An open file: its backing fd and, for a write handle, its share of the file's lock.
pub(super) struct OpenFile {
    pub(super) file: File,
    pub(super) ino: u64,
    pub(super) lock: Option<Share>,
    /// Opened with kernel passthrough: holds a use of the inode's backing file
    /// ([`super::backing::BackingCache`]).
    pub(super) passthrough: bool,
}

impl OpenFile {
    /// Fails writes once the handle's lock is lost: another node may hold it by now.
    pub(super) fn check_lock(&self) -> Result<(), Errno> {
        match &self.lock {
            Some(share) if share.is_lost() => {
                tracing::warn!(lock = %share.name(), fencing_token = share.fencing_token(), "write refused: the file's lock was lost");
                Err(Errno::EIO)
            }
            _ => Ok(()),
        }
    }
}

/// A handle registered by [`Inner::add_handle`], for the reply to an open or create.
pub(super) struct NewHandle {
    pub(super) fh: u64,
    pub(super) flags: FopenFlags,
    /// The inode's kernel backing file, for a passthrough handle.
    pub(super) backing: Option<Arc<BackingId>>,
}

/// How the kernel serves the I/O of a new handle of a regular file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// Through the inode's kernel backing file. `direct`: reads and writes still come to the
    /// daemon (`FOPEN_DIRECT_IO` overrides passthrough for them; a memory map still maps the
    /// backing file).
    Passthrough { direct: bool },
    /// Through the kernel's page cache and the daemon.
    PageCache,
}

pub(super) struct DirEntry {
    pub(super) name: OsString,
    pub(super) kind: FileType,
    pub(super) ino: u64,
}

/// The open files and directories, by handle number (one sequence for both).
pub(super) struct Handles {
    files: Mutex<HashMap<u64, Arc<OpenFile>>>,
    /// A directory's entries as read at `opendir`: `readdir` pages through this snapshot.
    dirs: Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>,
    next_fh: AtomicU64,
}

impl Default for Handles {
    fn default() -> Self {
        Handles {
            files: Mutex::default(),
            dirs: Mutex::default(),
            next_fh: AtomicU64::new(1),
        }
    }
}

impl Handles {
    fn next(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    pub(super) fn file(&self, fh: u64) -> Result<Arc<OpenFile>, Errno> {
        self.files
            .lock()
            .unwrap()
            .get(&fh)
            .cloned()
            .ok_or(Errno::EBADF)
    }

    fn add_file(&self, file: OpenFile) -> u64 {
        let fh = self.next();
        self.files.lock().unwrap().insert(fh, Arc::new(file));
        fh
    }

    pub(super) fn remove_file(&self, fh: u64) -> Option<Arc<OpenFile>> {
        self.files.lock().unwrap().remove(&fh)
    }

    pub(super) fn add_dir(&self, entries: Vec<DirEntry>) -> u64 {
        let fh = self.next();
        self.dirs.lock().unwrap().insert(fh, Arc::new(entries));
        fh
    }

    pub(super) fn dir(&self, fh: u64) -> Option<Arc<Vec<DirEntry>>> {
        self.dirs.lock().unwrap().get(&fh).cloned()
    }

    pub(super) fn remove_dir(&self, fh: u64) {
        self.dirs.lock().unwrap().remove(&fh);
    }
}

pub(super) fn is_write_open(flags: i32) -> bool {
    let acc = flags & libc::O_ACCMODE;
    acc == libc::O_WRONLY || acc == libc::O_RDWR || flags & libc::O_TRUNC != 0
}

/// Open flags for the backing file: the caller's, minus those that only make sense at the
/// FUSE layer (the kernel already handled creation and `O_NOFOLLOW`; `O_DIRECT` would demand
/// aligned buffers the kernel does not promise us).
fn backing_flags(flags: i32) -> i32 {
    flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_NOFOLLOW | libc::O_DIRECT)
}

impl Inner {
    /// The open flags for a new handle of `ino` in the default mode: `FOPEN_KEEP_CACHE` when
    /// the kernel's page cache of the file still holds the backing file's bytes
    /// (`crate::keep_cache`); without it the kernel drops the cache, so the reads of this open
    /// see what other nodes wrote.
    fn cache_flags(&self, ino: u64, file: &File, lock: Option<&Share>) -> FopenFlags {
        match fstat(file.as_fd()) {
            Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFREG => {
                let grant = lock.map(|s| (s.name(), s.fencing_token()));
                if self.cache.open(ino, Version::of(&st), grant) {
                    FopenFlags::FOPEN_KEEP_CACHE
                } else {
                    FopenFlags::empty()
                }
            }
            _ => {
                self.cache.forget(ino);
                FopenFlags::empty()
            }
        }
    }

    /// After this node wrote through `f` (or changed its size): the kernel's cache holds the
    /// change, so the file's new version is a good baseline, if `f`'s grant is still the
    /// baseline's and still held. `append_end`: for an `O_APPEND` write, where the kernel
    /// believes the file now ends. The backing file appends at its real end, which differs
    /// when the kernel's size was stale (another node appended while this open waited for the
    /// lock): the kernel then cached the bytes at the wrong offset.
    pub(super) fn wrote(&self, f: &OpenFile, append_end: Option<u64>) {
        if f.passthrough {
            // Nothing of this inode is in the page cache: every handle bypasses it.
            return;
        }
        let Some(share) = &f.lock else {
            return self.cache.forget(f.ino);
        };
        match fstat(f.file.as_fd()) {
            Ok(st) if !share.is_lost() && append_end.is_none_or(|end| end == st.st_size as u64) => {
                self.cache.wrote(
                    f.ino,
                    Version::of(&st),
                    (share.name(), share.fencing_token()),
                )
            }
            _ => self.cache.forget(f.ino),
        }
    }

    /// How a new handle of a regular file is served (`write`: a write handle).
    ///
    /// The kernel refuses to mix page-cache handles and passthrough handles on one inode, so a
    /// mount uses one or the other for all of them; with read passthrough, a write handle is a
    /// passthrough handle whose reads and writes still come to the daemon.
    fn route(&self, write: bool) -> Route {
        if self.config.passthrough {
            Route::Passthrough { direct: false }
        } else if self.read_passthrough.load(Ordering::Relaxed) {
            Route::Passthrough { direct: write }
        } else {
            Route::PageCache
        }
    }

    /// Registers `file` as a new handle of `ino` routed by [`Inner::route`]; `register` hands
    /// the kernel a backing file the first time an inode needs one. Returns the handle, the
    /// open flags, and the backing id for a passthrough handle; on failure, the lock share to
    /// give back.
    pub(super) fn add_handle(
        &self,
        ino: u64,
        file: File,
        lock: Option<Share>,
        write: bool,
        register: impl FnOnce(&File) -> io::Result<BackingId>,
    ) -> Result<NewHandle, (io::Error, Option<Share>)> {
        match self.route(write) {
            Route::Passthrough { direct } => {
                match self
                    .backings
                    .get_or(ino, write, || self.inodes.get(ino), register)
                {
                    Ok(id) => {
                        let fh = self.handles.add_file(OpenFile {
                            file,
                            ino,
                            lock,
                            passthrough: true,
                        });
                        let flags = if direct {
                            FopenFlags::FOPEN_DIRECT_IO
                        } else {
                            FopenFlags::empty()
                        };
                        Ok(NewHandle {
                            fh,
                            flags,
                            backing: Some(id),
                        })
                    }
                    Err(e) => Err((e, lock)),
                }
            }
            Route::PageCache => {
                // The kernel keeps its page cache of the file only if nothing else changed the
                // file since it was filled, so a node that just got the lock reads what the
                // previous holder wrote.
                let flags = self.cache_flags(ino, &file, lock.as_ref());
                let fh = self.handles.add_file(OpenFile {
                    file,
                    ino,
                    lock,
                    passthrough: false,
                });
                Ok(NewHandle {
                    fh,
                    flags,
                    backing: None,
                })
            }
        }
    }

    /// Reopens the inode for I/O with the caller's flags.
    pub(super) fn open_backing(&self, ino: u64, flags: i32) -> io::Result<File> {
        let inode = self.inodes.get(ino)?;
        let fd = openat(At::Cwd, &inode.proc_path(), backing_flags(flags), 0)?;
        Ok(File::from(fd))
    }

    /// Creates (or, without `O_EXCL`, opens an existing) `name` in `parent` for a create
    /// request, owned by the caller `uid`/`gid`, and looks it up.
    pub(super) fn create_file(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
        uid: u32,
        gid: u32,
    ) -> io::Result<(File, FileAttr)> {
        let dir = self.inodes.get(parent)?;
        let c = crate::sys::cstr(name)?;
        let base = backing_flags(flags);
        // Create exclusively first, so that only a file we really created changes owner; the
        // kernel sends `create` for a name it believed absent, which another node may have
        // created since.
        let (fd, created) = match openat(
            dir.at(),
            &c,
            base | libc::O_CREAT | libc::O_EXCL,
            mode & 0o7777,
        ) {
            Ok(fd) => (fd, true),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) && flags & libc::O_EXCL == 0 => {
                (openat(dir.at(), &c, base, 0)?, false)
            }
            Err(e) => return Err(e),
        };
        if created && self.as_root {
            attr::give_to_caller(&dir, &c, uid, gid, (mode & !libc::S_IFMT) | libc::S_IFREG)?;
        }
        let a = self.inodes.lookup(parent, name)?;
        Ok((File::from(fd), a))
    }

    /// The entries of directory `ino` for a directory handle, `.` and `..` first.
    pub(super) fn read_dir(&self, ino: u64) -> io::Result<Vec<DirEntry>> {
        let inode = self.inodes.get(ino)?;
        let mut out = vec![
            DirEntry {
                name: ".".into(),
                kind: FileType::Directory,
                ino: inode.key.1,
            },
            DirEntry {
                name: "..".into(),
                kind: FileType::Directory,
                ino: 0,
            },
        ];
        for e in std::fs::read_dir(inode.fd_path())? {
            let e = e?;
            let kind = e
                .file_type()
                .map(|t| FileType::from_std(t).unwrap_or(FileType::RegularFile))?;
            out.push(DirEntry {
                name: e.file_name(),
                kind,
                ino: e.ino(),
            });
        }
        Ok(out)
    }
}
