//! The passthrough filesystem: every request maps to a syscall on the backing directory,
//! relative to an `O_PATH` fd per inode (keyed by the backing `(st_dev, st_ino)`), so renames
//! on the backing side never leave us with a stale path.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirEntryExt, FileExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use tokio::runtime::Handle as Runtime;

use crate::cache::{CacheBaselines, Version};
use crate::locks::{LockError, LockTable, Share};
use crate::sys::{self, attr, cstr, cvt, errno, fstat, openat, proc_path};
use crate::{Error, MountOptions, names};

const GEN: Generation = Generation(0);

thread_local! {
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

struct Inode {
    fd: OwnedFd,
    key: (u64, u64),
}

#[derive(Default)]
struct Inodes {
    by_ino: HashMap<u64, Arc<Inode>>,
    by_key: HashMap<(u64, u64), u64>,
    lookups: HashMap<u64, u64>,
    next: u64,
}

/// An open file: its backing fd and, for a write handle, its share of the file's lock.
struct OpenFile {
    file: File,
    ino: u64,
    lock: Option<Share>,
    /// Opened with kernel passthrough: holds a use of the inode's [`Backing`].
    passthrough: bool,
}

/// A handle registered by [`Inner::add_handle`], for the reply to an open or create.
struct NewHandle {
    fh: u64,
    flags: FopenFlags,
    /// The inode's kernel backing file, for a passthrough handle.
    backing: Option<Arc<BackingId>>,
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

impl OpenFile {
    /// Fails writes once the handle's lock is lost: another node may hold it by now.
    fn check_lock(&self) -> Result<(), Errno> {
        match &self.lock {
            Some(share) if share.is_lost() => {
                tracing::warn!(lock = %share.name, fencing_token = share.token, "write refused: the file's lock was lost");
                Err(Errno::EIO)
            }
            _ => Ok(()),
        }
    }
}

struct DirEntry {
    name: OsString,
    kind: FileType,
    ino: u64,
}

/// One kernel backing file per inode: the kernel refuses two different backing files for one
/// FUSE inode, so every passthrough open of an inode reuses it.
struct Backing {
    id: Arc<BackingId>,
    writable: bool,
    opens: usize,
}

pub(crate) struct Inner {
    root_path: Vec<u8>,
    opts: MountOptions,
    inodes: Mutex<Inodes>,
    files: Mutex<HashMap<u64, Arc<OpenFile>>>,
    dirs: Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>,
    backings: Mutex<HashMap<u64, Backing>>,
    next_fh: AtomicU64,
    locks: LockTable,
    /// When the kernel may keep a file's page cache across opens (`crate::cache`).
    cache: CacheBaselines,
    runtime: Runtime,
    as_root: bool,
    /// Set at `init` when the kernel granted passthrough for `MountOptions::read_passthrough`.
    read_passthrough: std::sync::atomic::AtomicBool,
}

/// The FUSE filesystem of one mount: a passthrough of the backing directory that locks files
/// opened for writing. Mount it with [`crate::mount`].
pub struct LockedFs {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LockedFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockedFs")
            .field("backing", &String::from_utf8_lossy(&self.inner.root_path))
            .finish_non_exhaustive()
    }
}

impl LockedFs {
    /// Opens the backing directory. `runtime` runs the lock waits, so that a request waiting
    /// for a lock never occupies a FUSE worker thread.
    pub fn new(
        backing: &Path,
        locker: Arc<dyn mqlock::Locker>,
        opts: MountOptions,
        runtime: Runtime,
    ) -> Result<Self, Error> {
        let backing_err = |source| Error::Backing {
            path: backing.to_owned(),
            source,
        };
        mqlock::name::validate(&names::lock_name(&opts.lock_prefix, b"x"))
            .map_err(Error::LockPrefix)?;
        let c = cstr(backing.as_os_str()).map_err(backing_err)?;
        let fd = openat(libc::AT_FDCWD, &c, libc::O_PATH | libc::O_DIRECTORY, 0).map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOTDIR) {
                Error::BackingNotDir {
                    path: backing.to_owned(),
                }
            } else {
                backing_err(e)
            }
        })?;
        let st = fstat(fd.as_raw_fd()).map_err(backing_err)?;
        let link =
            std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).map_err(backing_err)?;
        let mut root_path = link.as_os_str().as_bytes().to_vec();
        if root_path.last() == Some(&b'/') {
            root_path.pop();
        }
        let mut inodes = Inodes {
            next: 2,
            ..Inodes::default()
        };
        let key = (st.st_dev, st.st_ino);
        inodes.by_key.insert(key, 1);
        inodes.by_ino.insert(1, Arc::new(Inode { fd, key }));
        let locks = LockTable::new(locker, opts.lock_timeout);
        Ok(LockedFs {
            inner: Arc::new(Inner {
                root_path,
                opts,
                inodes: Mutex::new(inodes),
                files: Mutex::default(),
                dirs: Mutex::default(),
                backings: Mutex::default(),
                next_fh: AtomicU64::new(1),
                locks,
                cache: CacheBaselines::default(),
                runtime,
                // SAFETY: geteuid cannot fail.
                as_root: unsafe { libc::geteuid() } == 0,
                read_passthrough: Default::default(),
            }),
        })
    }
}

/// Sends an io::Error as the request's errno.
macro_rules! tri {
    ($reply:expr, $e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => {
                $reply.error(errno(&e));
                return;
            }
        }
    };
}

fn enoent() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOENT)
}

fn lock_errno(e: &LockError) -> Errno {
    Errno::from_i32(e.errno())
}

fn is_write_open(flags: i32) -> bool {
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
    fn ttl(&self) -> Duration {
        self.opts.attr_timeout
    }

    fn inode(&self, ino: u64) -> io::Result<Arc<Inode>> {
        self.inodes
            .lock()
            .unwrap()
            .by_ino
            .get(&ino)
            .cloned()
            .ok_or_else(enoent)
    }

    fn file(&self, fh: u64) -> Result<Arc<OpenFile>, Errno> {
        self.files
            .lock()
            .unwrap()
            .get(&fh)
            .cloned()
            .ok_or(Errno::EBADF)
    }

    fn stat_ino(&self, ino: u64) -> io::Result<FileAttr> {
        let inode = self.inode(ino)?;
        Ok(attr(ino, &fstat(inode.fd.as_raw_fd())?))
    }

    /// Looks `name` up in `parent` and counts one kernel reference to the result.
    fn lookup(&self, parent: u64, name: &OsStr) -> io::Result<FileAttr> {
        let dir = self.inode(parent)?;
        let fd = openat(
            dir.fd.as_raw_fd(),
            &cstr(name)?,
            libc::O_PATH | libc::O_NOFOLLOW,
            0,
        )?;
        let st = fstat(fd.as_raw_fd())?;
        let key = (st.st_dev, st.st_ino);
        let mut t = self.inodes.lock().unwrap();
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
        Ok(attr(ino, &st))
    }

    fn forget(&self, ino: u64, n: u64) {
        if ino == 1 {
            return;
        }
        let mut t = self.inodes.lock().unwrap();
        let left = match t.lookups.get_mut(&ino) {
            Some(c) => {
                *c = c.saturating_sub(n);
                *c
            }
            None => return,
        };
        if left == 0 {
            t.lookups.remove(&ino);
            if let Some(inode) = t.by_ino.remove(&ino) {
                t.by_key.remove(&inode.key);
            }
            self.cache.forget(ino);
        }
    }

    /// The path of `ino` relative to the mount root, as the kernel knows it now.
    fn rel_path(&self, ino: u64) -> io::Result<Vec<u8>> {
        let inode = self.inode(ino)?;
        let link = std::fs::read_link(format!("/proc/self/fd/{}", inode.fd.as_raw_fd()))?;
        let b = link.as_os_str().as_bytes();
        let rel = b.strip_prefix(self.root_path.as_slice()).unwrap_or(b);
        Ok(rel.strip_prefix(b"/").unwrap_or(rel).to_vec())
    }

    fn child_path(&self, parent: u64, name: &OsStr) -> io::Result<Vec<u8>> {
        let mut p = self.rel_path(parent)?;
        if !p.is_empty() {
            p.push(b'/');
        }
        p.extend_from_slice(name.as_bytes());
        Ok(p)
    }

    fn lock_name(&self, rel: &[u8]) -> String {
        names::lock_name(&self.opts.lock_prefix, rel)
    }

    /// Creates the entry `name` in `parent` with `make(dir fd, name)`, gives it to the caller
    /// (with `mode`'s file type and permissions), and looks it up.
    fn make_entry(
        &self,
        req: &Request,
        parent: u64,
        name: &OsStr,
        mode: u32,
        make: impl FnOnce(RawFd, &std::ffi::CStr) -> libc::c_int,
    ) -> io::Result<FileAttr> {
        let dir = self.inode(parent)?;
        let c = cstr(name)?;
        cvt(make(dir.fd.as_raw_fd(), &c))?;
        self.give_to_caller(dir.fd.as_raw_fd(), &c, req.uid(), req.gid(), mode)?;
        self.lookup(parent, name)
    }

    /// Gives a created entry to the caller: the daemon (root) created it, the caller owns it.
    /// The group is left as created when the directory is set-group-ID, as the kernel would.
    fn give_to_caller(
        &self,
        dir: RawFd,
        name: &std::ffi::CStr,
        uid: u32,
        gid: u32,
        mode: u32,
    ) -> io::Result<()> {
        if !self.as_root {
            return Ok(());
        }
        let dir_st = fstat(dir)?;
        let gid = if dir_st.st_mode & libc::S_ISGID != 0 {
            u32::MAX
        } else {
            gid
        };
        // SAFETY: fd-relative syscalls on a valid dir fd and C string.
        cvt(unsafe { libc::fchownat(dir, name.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) })?;
        if mode & libc::S_IFMT != libc::S_IFLNK {
            // chown clears set-ID bits and the daemon's umask may have masked some: set the
            // mode the kernel asked for (already masked by the caller's umask).
            let mut perm = mode & 0o7777;
            if dir_st.st_mode & libc::S_ISGID != 0 && mode & libc::S_IFMT == libc::S_IFDIR {
                perm |= libc::S_ISGID;
            }
            cvt(unsafe { libc::fchmodat(dir, name.as_ptr(), perm, 0) })?;
        }
        Ok(())
    }

    fn add_file(&self, file: OpenFile) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.files.lock().unwrap().insert(fh, Arc::new(file));
        fh
    }

    /// The open flags for a new handle of `ino` in the default mode: `FOPEN_KEEP_CACHE` when
    /// the kernel's page cache of the file still holds the backing file's bytes
    /// (`crate::cache`); without it the kernel drops the cache, so the reads of this open see
    /// what other nodes wrote.
    fn cache_flags(&self, ino: u64, file: &File, lock: Option<&Share>) -> FopenFlags {
        match fstat(file.as_raw_fd()) {
            Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFREG => {
                let grant = lock.map(|s| (&s.name, s.token));
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
    fn wrote(&self, f: &OpenFile, append_end: Option<u64>) {
        if f.passthrough {
            // Nothing of this inode is in the page cache: every handle bypasses it.
            return;
        }
        let Some(share) = &f.lock else {
            return self.cache.forget(f.ino);
        };
        match fstat(f.file.as_raw_fd()) {
            Ok(st) if !share.is_lost() && append_end.is_none_or(|end| end == st.st_size as u64) => {
                self.cache
                    .wrote(f.ino, Version::of(&st), (&share.name, share.token))
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
        if self.opts.passthrough {
            Route::Passthrough { direct: false }
        } else if self.read_passthrough.load(Ordering::Relaxed) {
            Route::Passthrough { direct: write }
        } else {
            Route::PageCache
        }
    }

    /// Registers `file` as a new handle of `ino` routed by [`Inner::route`]; `register` hands
    /// the kernel a backing file the first time an inode needs one. Returns the handle, the
    /// open flags, and the backing id for a passthrough handle.
    fn add_handle(
        &self,
        ino: u64,
        file: File,
        lock: Option<Share>,
        write: bool,
        register: impl FnOnce(&File) -> io::Result<BackingId>,
    ) -> Result<NewHandle, (io::Error, Option<Share>)> {
        match self.route(write) {
            Route::Passthrough { direct } => match self.passthrough_id(ino, write, register) {
                Ok(id) => {
                    let fh = self.add_file(OpenFile {
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
            },
            Route::PageCache => {
                // The kernel keeps its page cache of the file only if nothing else changed the
                // file since it was filled, so a node that just got the lock reads what the
                // previous holder wrote.
                let flags = self.cache_flags(ino, &file, lock.as_ref());
                let fh = self.add_file(OpenFile {
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
    fn open_backing(&self, ino: u64, flags: i32) -> io::Result<File> {
        let inode = self.inode(ino)?;
        let fd = openat(
            libc::AT_FDCWD,
            &proc_path(inode.fd.as_raw_fd()),
            backing_flags(flags),
            0,
        )?;
        Ok(File::from(fd))
    }

    /// The kernel backing file of `ino` for passthrough, opened read-write when possible so that
    /// readers and writers of the inode can share it.
    fn passthrough_id(
        &self,
        ino: u64,
        write: bool,
        register: impl FnOnce(&File) -> io::Result<BackingId>,
    ) -> io::Result<Arc<BackingId>> {
        let mut b = self.backings.lock().unwrap();
        if let Some(backing) = b.get_mut(&ino) {
            if write && !backing.writable {
                return Err(io::Error::from_raw_os_error(libc::EACCES));
            }
            backing.opens += 1;
            return Ok(backing.id.clone());
        }
        let inode = self.inode(ino)?;
        let path = proc_path(inode.fd.as_raw_fd());
        let (fd, writable) = match openat(libc::AT_FDCWD, &path, libc::O_RDWR, 0) {
            Ok(fd) => (fd, true),
            Err(e) if write => return Err(e),
            Err(_) => (openat(libc::AT_FDCWD, &path, libc::O_RDONLY, 0)?, false),
        };
        let id = Arc::new(register(&File::from(fd))?);
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

    fn drop_passthrough(&self, ino: u64) {
        let mut b = self.backings.lock().unwrap();
        if let Some(backing) = b.get_mut(&ino) {
            backing.opens -= 1;
            if backing.opens == 0 {
                b.remove(&ino);
            }
        }
    }

    /// Runs `f` on the runtime while holding the locks of `names` (taken in sorted order, so
    /// that two nodes renaming across the same pair cannot deadlock).
    fn with_locks<R: Send + 'static>(
        self: &Arc<Self>,
        mut names: Vec<String>,
        f: impl FnOnce(&Inner) -> R + Send + 'static,
        done: impl FnOnce(Result<R, LockError>) + Send + 'static,
    ) {
        names.sort();
        names.dedup();
        let inner = self.clone();
        self.runtime.spawn(async move {
            let mut shares = Vec::with_capacity(names.len());
            for name in &names {
                match inner.locks.acquire(name, false).await {
                    Ok(s) => shares.push(s),
                    Err(e) => {
                        tracing::info!(lock = %name, error = %e, "file operation refused: lock not available");
                        for s in shares.iter().rev() {
                            inner.locks.release(s).await;
                        }
                        return done(Err(e));
                    }
                }
            }
            let r = f(&inner);
            for s in shares.iter().rev() {
                inner.locks.release(s).await;
            }
            done(Ok(r));
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        file: Option<&OpenFile>,
    ) -> io::Result<FileAttr> {
        let inode = self.inode(ino)?;
        let fd = inode.fd.as_raw_fd();
        let path = proc_path(fd);
        // SAFETY (all blocks below): syscalls on fds we own and valid C strings.
        if let Some(mode) = mode {
            match file {
                Some(f) => cvt(unsafe { libc::fchmod(f.file.as_raw_fd(), mode & 0o7777) })?,
                None => {
                    cvt(unsafe { libc::fchmodat(libc::AT_FDCWD, path.as_ptr(), mode & 0o7777, 0) })?
                }
            };
        }
        if uid.is_some() || gid.is_some() {
            let (u, g) = (uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX));
            cvt(unsafe {
                libc::fchownat(
                    fd,
                    c"".as_ptr(),
                    u,
                    g,
                    libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
                )
            })?;
        }
        if let Some(size) = size {
            match file {
                Some(f) => f.file.set_len(size)?,
                None => {
                    cvt(unsafe { libc::truncate(path.as_ptr(), size as libc::off_t) })?;
                }
            }
        }
        if atime.is_some() || mtime.is_some() {
            let ts = |t: Option<TimeOrNow>| match t {
                None => libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_OMIT,
                },
                Some(TimeOrNow::Now) => libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_NOW,
                },
                Some(TimeOrNow::SpecificTime(t)) => {
                    let (s, n) = match t.duration_since(UNIX_EPOCH) {
                        Ok(d) => (d.as_secs() as i64, d.subsec_nanos() as i64),
                        Err(e) => {
                            let d = e.duration();
                            let (mut s, mut n) =
                                (-(d.as_secs() as i64), -(d.subsec_nanos() as i64));
                            if n < 0 {
                                s -= 1;
                                n += 1_000_000_000;
                            }
                            (s, n)
                        }
                    };
                    libc::timespec {
                        tv_sec: s,
                        tv_nsec: n,
                    }
                }
            };
            let times = [ts(atime), ts(mtime)];
            match file {
                Some(f) => cvt(unsafe { libc::futimens(f.file.as_raw_fd(), times.as_ptr()) })?,
                None => cvt(unsafe {
                    libc::utimensat(libc::AT_FDCWD, path.as_ptr(), times.as_ptr(), 0)
                })?,
            };
        }
        match file {
            Some(f) => Ok(attr(ino, &fstat(f.file.as_raw_fd())?)),
            None => Ok(attr(ino, &fstat(fd)?)),
        }
    }

    fn read_dir(&self, ino: u64) -> io::Result<Vec<DirEntry>> {
        let inode = self.inode(ino)?;
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
        for e in std::fs::read_dir(format!("/proc/self/fd/{}", inode.fd.as_raw_fd()))? {
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

    fn xattr_reply(reply: ReplyXattr, size: u32, r: isize, buf: &[u8]) {
        if r < 0 {
            reply.error(errno(&io::Error::last_os_error()));
        } else if size == 0 {
            reply.size(r as u32);
        } else {
            reply.data(&buf[..r as usize]);
        }
    }
}

/// Answers an open (or the open part of a create) once the backing file is open and, for a
/// write, the lock is held.
fn finish_open(
    inner: &Arc<Inner>,
    ino: u64,
    file: File,
    lock: Option<Share>,
    write: bool,
    reply: ReplyOpen,
) {
    match inner.add_handle(ino, file, lock, write, |f| reply.open_backing(f.as_fd())) {
        Ok(NewHandle {
            fh,
            flags,
            backing: Some(id),
        }) => reply.opened_passthrough(FileHandle(fh), flags, &id),
        Ok(NewHandle { fh, flags, .. }) => reply.opened(FileHandle(fh), flags),
        Err((e, lock)) => {
            release_in_background(inner, lock);
            reply.error(errno(&e));
        }
    }
}

fn release_in_background(inner: &Arc<Inner>, lock: Option<Share>) {
    if let Some(share) = lock {
        let inner2 = inner.clone();
        inner
            .runtime
            .spawn(async move { inner2.locks.release(&share).await });
    }
}

impl Filesystem for LockedFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        if self.inner.opts.passthrough {
            config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).map_err(|_| {
                io::Error::new(io::ErrorKind::Unsupported, "the kernel does not offer FUSE passthrough (needs Linux 6.9+ with CONFIG_FUSE_PASSTHROUGH)")
            })?;
            config.set_max_stack_depth(1).map_err(|_| {
                io::Error::other("the kernel refused a passthrough stacking depth of 1")
            })?;
        } else if self.inner.opts.read_passthrough {
            // Backing files are opened by the daemon, which needs CAP_SYS_ADMIN to hand them
            // to the kernel: as another user every open would fail, so keep the page cache.
            let granted = self.inner.as_root
                && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            self.inner
                .read_passthrough
                .store(granted, Ordering::Relaxed);
            if granted {
                tracing::info!(
                    "read-only opens use kernel passthrough; writes go through the daemon"
                );
            } else {
                tracing::info!(
                    "kernel passthrough unavailable (needs Linux 6.9+ and root): every open goes through the page cache"
                );
            }
        }
        if !self.inner.ttl().is_zero() {
            // Attributes from readdirplus are only worth their lookups when they may be cached.
            let _ = config.add_capabilities(
                InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO,
            );
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let a = tri!(reply, self.inner.lookup(parent.0, name));
        reply.entry(&self.inner.ttl(), &a, GEN);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.inner.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let st = match fh.and_then(|fh| self.inner.file(fh.0).ok()) {
            Some(f) => fstat(f.file.as_raw_fd()).map(|st| attr(ino.0, &st)),
            None => self.inner.stat_ino(ino.0),
        };
        let a = tri!(reply, st);
        reply.attr(&self.inner.ttl(), &a);
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let file = fh.and_then(|fh| self.inner.file(fh.0).ok());
        let ttl = self.inner.ttl();
        // A size change is a write: through a write handle its lock already covers it; anything
        // else (truncate(2) on a path, or a handle without the lock) takes the lock around it.
        let locked_handle = file.as_ref().is_some_and(|f| f.lock.is_some());
        if size.is_some() && !locked_handle {
            let rel = tri!(reply, self.inner.rel_path(ino.0));
            let name = self.inner.lock_name(&rel);
            self.inner.with_locks(
                vec![name],
                move |inner| {
                    inner.cache.forget(ino.0);
                    inner.setattr(ino.0, mode, uid, gid, size, atime, mtime, file.as_deref())
                },
                move |r| match r {
                    Ok(Ok(a)) => reply.attr(&ttl, &a),
                    Ok(Err(e)) => reply.error(errno(&e)),
                    Err(e) => reply.error(lock_errno(&e)),
                },
            );
            return;
        }
        if size.is_some()
            && let Some(f) = &file
            && let Err(e) = f.check_lock()
        {
            return reply.error(e);
        }
        let r = self
            .inner
            .setattr(ino.0, mode, uid, gid, size, atime, mtime, file.as_deref());
        if let Some(f) = &file
            && f.lock.is_some()
        {
            // Through a write handle: the kernel truncates its cache to a new size itself, and
            // modes and times leave the bytes alone, so the new version is a good baseline.
            match &r {
                Ok(_) => self.inner.wrote(f, None),
                Err(_) if size.is_some() => self.inner.cache.forget(f.ino),
                Err(_) => {}
            }
        }
        let a = tri!(reply, r);
        reply.attr(&ttl, &a);
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let inode = tri!(reply, self.inner.inode(ino.0));
        let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
        // SAFETY: buffer and length match; an empty path reads the link `fd` itself is on.
        let n = unsafe {
            libc::readlinkat(
                inode.fd.as_raw_fd(),
                c"".as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return reply.error(errno(&io::Error::last_os_error()));
        }
        reply.data(&buf[..n as usize]);
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        // SAFETY: fd-relative syscall with a valid C string.
        let make = |dir, c: &std::ffi::CStr| unsafe {
            libc::mknodat(dir, c.as_ptr(), mode, rdev as libc::dev_t)
        };
        let a = tri!(
            reply,
            self.inner.make_entry(req, parent.0, name, mode, make)
        );
        reply.entry(&self.inner.ttl(), &a, GEN);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        // SAFETY: fd-relative syscall with a valid C string.
        let make = |dir, c: &std::ffi::CStr| unsafe { libc::mkdirat(dir, c.as_ptr(), mode) };
        let a = tri!(
            reply,
            self.inner
                .make_entry(req, parent.0, name, mode | libc::S_IFDIR, make)
        );
        reply.entry(&self.inner.ttl(), &a, GEN);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let rel = tri!(reply, self.inner.child_path(parent.0, name));
        let lock = self.inner.lock_name(&rel);
        let name = name.to_owned();
        self.inner.with_locks(
            vec![lock],
            move |inner| -> io::Result<()> {
                let dir = inner.inode(parent.0)?;
                let c = cstr(&name)?;
                // SAFETY: fd-relative syscall with a valid C string.
                cvt(unsafe { libc::unlinkat(dir.fd.as_raw_fd(), c.as_ptr(), 0) })?;
                Ok(())
            },
            move |r| match r {
                Ok(Ok(())) => reply.ok(),
                Ok(Err(e)) => reply.error(errno(&e)),
                Err(e) => reply.error(lock_errno(&e)),
            },
        );
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let dir = tri!(reply, self.inner.inode(parent.0));
        let c = tri!(reply, cstr(name));
        // SAFETY: fd-relative syscall with a valid C string.
        tri!(
            reply,
            cvt(unsafe { libc::unlinkat(dir.fd.as_raw_fd(), c.as_ptr(), libc::AT_REMOVEDIR) })
        );
        reply.ok();
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let t = tri!(reply, cstr(target.as_os_str()));
        // SAFETY: fd-relative syscall with valid C strings.
        let make =
            |dir, c: &std::ffi::CStr| unsafe { libc::symlinkat(t.as_ptr(), dir, c.as_ptr()) };
        let a = tri!(
            reply,
            self.inner
                .make_entry(req, parent.0, link_name, libc::S_IFLNK, make)
        );
        reply.entry(&self.inner.ttl(), &a, GEN);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if !(RenameFlags::RENAME_NOREPLACE | RenameFlags::RENAME_EXCHANGE).contains(flags) {
            return reply.error(Errno::EINVAL);
        }
        let from = tri!(reply, self.inner.child_path(parent.0, name));
        let to = tri!(reply, self.inner.child_path(newparent.0, newname));
        let locks = vec![self.inner.lock_name(&from), self.inner.lock_name(&to)];
        let (name, newname) = (name.to_owned(), newname.to_owned());
        self.inner.with_locks(
            locks,
            move |inner| -> io::Result<()> {
                let a = inner.inode(parent.0)?;
                let b = inner.inode(newparent.0)?;
                let (ca, cb) = (cstr(&name)?, cstr(&newname)?);
                // SAFETY: fd-relative syscall with valid C strings.
                cvt(unsafe {
                    libc::renameat2(
                        a.fd.as_raw_fd(),
                        ca.as_ptr(),
                        b.fd.as_raw_fd(),
                        cb.as_ptr(),
                        flags.bits(),
                    )
                })?;
                Ok(())
            },
            move |r| match r {
                Ok(Ok(())) => reply.ok(),
                Ok(Err(e)) => reply.error(errno(&e)),
                Err(e) => reply.error(lock_errno(&e)),
            },
        );
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let inode = tri!(reply, self.inner.inode(ino.0));
        let dir = tri!(reply, self.inner.inode(newparent.0));
        let c = tri!(reply, cstr(newname));
        let src = proc_path(inode.fd.as_raw_fd());
        // SAFETY: valid C strings; following the /proc magic link links the inode itself.
        tri!(
            reply,
            cvt(unsafe {
                libc::linkat(
                    libc::AT_FDCWD,
                    src.as_ptr(),
                    dir.fd.as_raw_fd(),
                    c.as_ptr(),
                    libc::AT_SYMLINK_FOLLOW,
                )
            })
        );
        let a = tri!(reply, self.inner.lookup(newparent.0, newname));
        reply.entry(&self.inner.ttl(), &a, GEN);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = is_write_open(flags.0);
        if !write {
            let file = tri!(reply, self.inner.open_backing(ino.0, flags.0));
            return finish_open(&self.inner, ino.0, file, None, false, reply);
        }
        let rel = tri!(reply, self.inner.rel_path(ino.0));
        let name = self.inner.lock_name(&rel);
        let nonblock = flags.0 & libc::O_NONBLOCK != 0;
        let inner = self.inner.clone();
        // The wait runs on the runtime: a FUSE worker thread is never parked on a lock.
        self.inner.runtime.spawn(async move {
            let share = match inner.locks.acquire(&name, nonblock).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::info!(lock = %name, error = %e, "write-open refused");
                    return reply.error(lock_errno(&e));
                }
            };
            match inner.open_backing(ino.0, flags.0) {
                Ok(file) => finish_open(&inner, ino.0, file, Some(share), true, reply),
                Err(e) => {
                    inner.locks.release(&share).await;
                    reply.error(errno(&e));
                }
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let f = match self.inner.file(fh.0) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        READ_BUF.with_borrow_mut(|buf| {
            // One buffer per worker thread: a fresh zeroed allocation of a large read costs a
            // page fault per page.
            if buf.len() < size as usize {
                buf.resize(size as usize, 0);
            }
            let buf = &mut buf[..size as usize];
            let mut done = 0;
            // The kernel fills a short read with zeroes unless it is at EOF: read until full
            // or EOF.
            while done < buf.len() {
                match f.file.read_at(&mut buf[done..], offset + done as u64) {
                    Ok(0) => break,
                    Ok(n) => done += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return reply.error(errno(&e)),
                }
            }
            reply.data(&buf[..done]);
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let f = match self.inner.file(fh.0) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        if let Err(e) = f.check_lock() {
            return reply.error(e);
        }
        // pwrite on an O_APPEND backing fd appends at the backing file's real end, whatever
        // offset this node's possibly stale size suggested. Pages written back from a memory
        // map (which the kernel may send through an O_APPEND handle) belong where they are.
        let in_place;
        let target =
            if write_flags.contains(WriteFlags::FUSE_WRITE_CACHE) && sys::is_append(&f.file) {
                in_place = tri!(reply, self.inner.open_backing(f.ino, libc::O_WRONLY));
                &in_place
            } else {
                &f.file
            };
        let mut done = 0;
        while done < data.len() {
            match target.write_at(&data[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if done == 0 => {
                    self.inner.cache.forget(f.ino);
                    return reply.error(errno(&e));
                }
                Err(_) => break,
            }
        }
        if done == data.len() {
            let append = flags.0 & libc::O_APPEND != 0 && std::ptr::eq(target, &f.file);
            self.inner.wrote(&f, append.then_some(offset + done as u64));
        } else {
            self.inner.cache.forget(f.ino);
        }
        reply.written(done as u32);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let f = match self.inner.file(fh.0) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        // close(2) reports a lost lock: the data written under it may have raced another node.
        if let Err(e) = f.check_lock() {
            return reply.error(e);
        }
        tri!(reply, sys::dup_close(f.file.as_raw_fd()));
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let Some(f) = self.inner.files.lock().unwrap().remove(&fh.0) else {
            return reply.error(Errno::EBADF);
        };
        let (ino, lock) = (f.ino, f.lock.clone());
        // Close the backing fd before the lock goes, so the next holder sees every byte
        // (on NFS, close is what pushes the data to the server).
        let passthrough = f.passthrough;
        drop(f);
        if passthrough {
            self.inner.drop_passthrough(ino);
        }
        reply.ok();
        release_in_background(&self.inner, lock);
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let f = match self.inner.file(fh.0) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        let r = if datasync {
            f.file.sync_data()
        } else {
            f.file.sync_all()
        };
        tri!(reply, r);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let entries = tri!(reply, self.inner.read_dir(ino.0));
        let fh = self.inner.next_fh.fetch_add(1, Ordering::Relaxed);
        self.inner
            .dirs
            .lock()
            .unwrap()
            .insert(fh, Arc::new(entries));
        reply.opened(FileHandle(fh), FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(entries) = self.inner.dirs.lock().unwrap().get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(e.ino.max(1)), i as u64 + 1, e.kind, &e.name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let Some(entries) = self.inner.dirs.lock().unwrap().get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        let ttl = self.inner.ttl();
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            let dots = e.name == "." || e.name == "..";
            let a = if dots {
                // The kernel does not count lookups for these two.
                match self.inner.stat_ino(ino.0) {
                    Ok(a) => a,
                    Err(_) => continue,
                }
            } else {
                match self.inner.lookup(ino.0, &e.name) {
                    Ok(a) => a,
                    // Gone since opendir.
                    Err(_) => continue,
                }
            };
            if reply.add(a.ino, i as u64 + 1, &e.name, &ttl, &a, GEN) {
                if !dots {
                    self.inner.forget(a.ino.0, 1);
                }
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.inner.dirs.lock().unwrap().remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let inode = tri!(reply, self.inner.inode(ino.0));
        let r = openat(
            libc::AT_FDCWD,
            &proc_path(inode.fd.as_raw_fd()),
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
        )
        .and_then(|fd| File::from(fd).sync_all());
        tri!(reply, r);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let inode = tri!(
            reply,
            self.inner.inode(ino.0).or_else(|_| self.inner.inode(1))
        );
        let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
        // SAFETY: valid out pointer; fstatvfs works on O_PATH fds.
        tri!(
            reply,
            cvt(unsafe { libc::fstatvfs(inode.fd.as_raw_fd(), st.as_mut_ptr()) })
        );
        // SAFETY: initialised by the successful call.
        let st = unsafe { st.assume_init() };
        reply.statfs(
            st.f_blocks,
            st.f_bfree,
            st.f_bavail,
            st.f_files,
            st.f_ffree,
            st.f_bsize as u32,
            st.f_namemax as u32,
            st.f_frsize as u32,
        );
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let inode = tri!(reply, self.inner.inode(ino.0));
        let n = tri!(reply, cstr(name));
        let p = proc_path(inode.fd.as_raw_fd());
        // SAFETY: valid C strings and buffer.
        tri!(
            reply,
            cvt(unsafe {
                libc::setxattr(
                    p.as_ptr(),
                    n.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    flags,
                )
            })
        );
        reply.ok();
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let inode = tri!(reply, self.inner.inode(ino.0));
        let n = tri!(reply, cstr(name));
        let p = proc_path(inode.fd.as_raw_fd());
        let mut buf = vec![0u8; size as usize];
        // SAFETY: valid C strings; buffer and length match (size 0 asks for the length).
        let r =
            unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        Inner::xattr_reply(reply, size, r, &buf);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let inode = tri!(reply, self.inner.inode(ino.0));
        let p = proc_path(inode.fd.as_raw_fd());
        let mut buf = vec![0u8; size as usize];
        // SAFETY: valid C string; buffer and length match.
        let r = unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        Inner::xattr_reply(reply, size, r, &buf);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let inode = tri!(reply, self.inner.inode(ino.0));
        let n = tri!(reply, cstr(name));
        let p = proc_path(inode.fd.as_raw_fd());
        // SAFETY: valid C strings.
        tri!(
            reply,
            cvt(unsafe { libc::removexattr(p.as_ptr(), n.as_ptr()) })
        );
        reply.ok();
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let inode = tri!(reply, self.inner.inode(ino.0));
        let p = proc_path(inode.fd.as_raw_fd());
        // SAFETY: valid C string.
        tri!(
            reply,
            cvt(unsafe { libc::faccessat(libc::AT_FDCWD, p.as_ptr(), mask.bits(), 0) })
        );
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let rel = tri!(reply, self.inner.child_path(parent.0, name));
        let lock = self.inner.lock_name(&rel);
        let nonblock = flags & libc::O_NONBLOCK != 0;
        let (uid, gid) = (req.uid(), req.gid());
        let name = name.to_owned();
        let inner = self.inner.clone();
        self.inner.runtime.spawn(async move {
            let share = match inner.locks.acquire(&lock, nonblock).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::info!(lock = %lock, error = %e, "create refused");
                    return reply.error(lock_errno(&e));
                }
            };
            match create_file(&inner, parent.0, &name, mode, flags, uid, gid) {
                Ok((file, a)) => {
                    let ino = a.ino.0;
                    let ttl = inner.ttl();
                    let register = |f: &File| reply.open_backing(f.as_fd());
                    match inner.add_handle(ino, file, Some(share), true, register) {
                        Ok(NewHandle {
                            fh,
                            flags,
                            backing: Some(id),
                        }) => reply.created_passthrough(&ttl, &a, GEN, FileHandle(fh), flags, &id),
                        Ok(NewHandle { fh, flags, .. }) => {
                            reply.created(&ttl, &a, GEN, FileHandle(fh), flags)
                        }
                        Err((e, share)) => {
                            inner.forget(ino, 1);
                            if let Some(share) = share {
                                inner.locks.release(&share).await;
                            }
                            reply.error(errno(&e));
                        }
                    }
                }
                Err(e) => {
                    inner.locks.release(&share).await;
                    reply.error(errno(&e));
                }
            }
        });
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let f = match self.inner.file(fh.0) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        // fallocate changes the file like a write: only through a write handle, which holds
        // the file's lock (the kernel refuses read-only fds itself), and not after the lock was
        // lost.
        if f.lock.is_none() {
            return reply.error(Errno::EBADF);
        }
        if let Err(e) = f.check_lock() {
            return reply.error(e);
        }
        // The kernel drops punched or zeroed ranges from its cache itself, but only after we
        // answer: do not vouch for the cache across this call.
        self.inner.cache.forget(f.ino);
        // SAFETY: plain syscall on an fd we own.
        tri!(
            reply,
            cvt(unsafe {
                libc::fallocate(
                    f.file.as_raw_fd(),
                    mode,
                    offset as libc::off_t,
                    length as libc::off_t,
                )
            })
        );
        reply.ok();
    }
}

/// Creates (or, without `O_EXCL`, opens an existing) `name` in `parent` for a create request.
fn create_file(
    inner: &Inner,
    parent: u64,
    name: &OsStr,
    mode: u32,
    flags: i32,
    uid: u32,
    gid: u32,
) -> io::Result<(File, FileAttr)> {
    let dir = inner.inode(parent)?;
    let c = cstr(name)?;
    let base = backing_flags(flags);
    // Create exclusively first, so that only a file we really created changes owner; the kernel
    // sends `create` for a name it believed absent, which another node may have created since.
    let (fd, created) = match openat(
        dir.fd.as_raw_fd(),
        &c,
        base | libc::O_CREAT | libc::O_EXCL,
        mode & 0o7777,
    ) {
        Ok(fd) => (fd, true),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) && flags & libc::O_EXCL == 0 => {
            (openat(dir.fd.as_raw_fd(), &c, base, 0)?, false)
        }
        Err(e) => return Err(e),
    };
    if created {
        inner.give_to_caller(
            dir.fd.as_raw_fd(),
            &c,
            uid,
            gid,
            (mode & !libc::S_IFMT) | libc::S_IFREG,
        )?;
    }
    let a = inner.lookup(parent, name)?;
    Ok((File::from(fd), a))
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn f<T: Send + Sync>() {}
    f::<LockedFs>();
}
