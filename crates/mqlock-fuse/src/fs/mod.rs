//! The passthrough filesystem: every request maps to a syscall on the backing directory,
//! relative to the `O_PATH` fd of an inode ([`inodes`]), and the requests that change a file
//! take its lock first ([`crate::locks`]).

mod attr;
mod backing;
mod handles;
mod inodes;
mod setid;

use std::ffi::{CStr, OsStr};
use std::fs::File;
use std::future::Future;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Waker};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use tokio::runtime::Handle as Runtime;

use self::attr::{Changes, file_attr};
use self::backing::BackingCache;
use self::handles::{Handles, NewHandle, is_write_open};
use self::inodes::{InodeTable, ROOT};
use self::setid::Caller;
use crate::error::LockError;
use crate::keep_cache::CacheBaselines;
use crate::locks::{LockTable, Share};
use crate::sys::{self, At, cstr, fstat, openat};
use crate::{Error, MountConfig, names};

const GEN: Generation = Generation(0);

thread_local! {
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

struct Inner {
    config: MountConfig,
    inodes: InodeTable,
    handles: Handles,
    backings: BackingCache,
    locks: LockTable,
    /// When the kernel may keep a file's page cache across opens (`crate::keep_cache`).
    cache: CacheBaselines,
    runtime: Runtime,
    as_root: bool,
    /// Set at `init` when the kernel granted passthrough for `MountConfig::read_passthrough`.
    read_passthrough: AtomicBool,
}

/// The FUSE filesystem of one mount: a passthrough of the backing directory that locks files
/// opened for writing. Mount it with [`mount()`](crate::mount()).
pub struct LockedFs {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LockedFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockedFs")
            .field(
                "backing",
                &String::from_utf8_lossy(self.inner.inodes.root_path()),
            )
            .finish_non_exhaustive()
    }
}

impl LockedFs {
    /// Opens the backing directory. `runtime` runs the lock waits, so that a request waiting
    /// for a lock never occupies a FUSE worker thread; it needs its timer enabled.
    ///
    /// Blocks while it opens the backing directory.
    ///
    /// # Errors
    ///
    /// [`Error::Lock`] when `config.lock_prefix` cannot be part of a lock name;
    /// [`Error::Backing`] or [`Error::BackingNotDir`] when the backing directory cannot be
    /// opened.
    pub fn new(
        backing: &Path,
        locker: Arc<dyn mqlock::Locker>,
        config: MountConfig,
        runtime: Runtime,
    ) -> Result<Self, Error> {
        // Checked once here, so that no file operation fails later on a bad prefix.
        mqlock::name::validate(&names::lock_name(&config.lock_prefix, b"x"))?;
        let inodes = InodeTable::open(backing)?;
        let locks = LockTable::new(locker, config.lock_timeout, config.lock_caching);
        Ok(LockedFs {
            inner: Arc::new(Inner {
                config,
                inodes,
                handles: Handles::default(),
                backings: BackingCache::default(),
                locks,
                cache: CacheBaselines::default(),
                runtime,
                as_root: sys::geteuid() == 0,
                read_passthrough: AtomicBool::default(),
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

fn errno(e: &io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

fn lock_errno(e: &LockError) -> Errno {
    Errno::from_i32(e.errno())
}

/// Answers an xattr request: the length alone when the kernel asked with `size` 0.
fn xattr_reply(reply: ReplyXattr, size: u32, r: io::Result<usize>, buf: &[u8]) {
    match r {
        Err(e) => reply.error(errno(&e)),
        Ok(n) if size == 0 => reply.size(n as u32),
        Ok(n) => reply.data(&buf[..n]),
    }
}

impl Inner {
    /// Runs `fut`, which answers a request: on the calling FUSE worker thread if it completes
    /// without waiting (a lock this node shares or keeps parked, a release that only parks),
    /// otherwise as a task on the runtime, so that a worker thread never waits for a lock or
    /// the broker. Saves the hop to a runtime thread on the fast path of lock caching.
    ///
    /// The first poll uses a waker that does nothing; the runtime's task polls the future again
    /// at once with its own, which every future then registers (a future must wake the waker of
    /// its latest poll), so no wake-up is lost.
    fn run(&self, fut: impl Future<Output = ()> + Send + 'static) {
        let mut fut = Box::pin(fut);
        let polled = {
            let _runtime = self.runtime.enter();
            let mut cx = Context::from_waker(Waker::noop());
            // A panic stays in this request (as it would in a task), not in the worker thread.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fut.as_mut().poll(&mut cx)))
        };
        match polled {
            Ok(std::task::Poll::Ready(())) => {}
            Ok(std::task::Poll::Pending) => drop(self.runtime.spawn(fut)),
            Err(_) => tracing::error!("a file operation panicked; its request fails"),
        }
    }

    fn ttl(&self) -> Duration {
        self.config.attr_timeout
    }

    fn lock_name(&self, rel: &[u8]) -> String {
        names::lock_name(&self.config.lock_prefix, rel)
    }

    fn forget(&self, ino: u64, n: u64) {
        if self.inodes.forget(ino, n) {
            self.cache.forget(ino);
        }
    }

    /// Creates the entry `name` in `parent` with `make(dir, name)`, gives it to the caller
    /// (with `mode`'s file type and permissions), and looks it up.
    fn make_entry(
        &self,
        req: &Request,
        parent: u64,
        name: &OsStr,
        mode: u32,
        make: impl FnOnce(At<'_>, &CStr) -> io::Result<()>,
    ) -> io::Result<FileAttr> {
        let dir = self.inodes.get(parent)?;
        let c = cstr(name)?;
        make(dir.at(), &c)?;
        // The daemon (root) created it; the caller owns it.
        if self.as_root {
            attr::give_to_caller(&dir, &c, req.uid(), req.gid(), mode)?;
        }
        self.inodes.lookup(parent, name)
    }

    /// `setattr` on the backing inode of `ino`, through `file` when the request named a handle;
    /// with `setid_for`, clearing the set-ID bits the backing file system would clear for that
    /// caller ([`attr::set`]).
    fn setattr(
        &self,
        ino: u64,
        file: Option<&handles::OpenFile>,
        changes: &Changes,
        setid_for: Option<&Caller>,
    ) -> io::Result<FileAttr> {
        let inode = self.inodes.get(ino)?;
        attr::set(ino, &inode, file.map(|f| &f.file), changes, setid_for)
    }

    /// Runs `f` (through [`Inner::run`]: a wait goes to the runtime) while holding the locks
    /// of `names`, taken all or none by the core's multi-lock ([`LockTable::acquire_all`]): in the one global order (two nodes
    /// renaming across the same pair cannot deadlock), within one `lock_timeout` for the whole
    /// set, and given back when one of them cannot be had. A name given twice (a rename onto
    /// its own name) is locked once.
    fn with_locks<R: Send + 'static>(
        self: &Arc<Self>,
        names: Vec<String>,
        f: impl FnOnce(&Inner) -> R + Send + 'static,
        done: impl FnOnce(Result<R, LockError>) + Send + 'static,
    ) {
        let mut unique: Vec<String> = Vec::with_capacity(names.len());
        for name in names {
            if !unique.contains(&name) {
                unique.push(name);
            }
        }
        let inner = self.clone();
        self.run(async move {
            let shares = match inner.locks.acquire_all(&unique).await {
                Ok(shares) => shares,
                Err(e) => {
                    tracing::info!(locks = ?unique, error = %e, "file operation refused: lock not available");
                    return done(Err(e));
                }
            };
            let r = f(&inner);
            for s in &shares {
                inner.locks.release(s).await;
            }
            done(Ok(r));
        });
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

/// Gives `lock` back without waiting for the broker: at once when the lock only parks (lock
/// caching) or another handle still shares it, otherwise on the runtime.
fn release_in_background(inner: &Arc<Inner>, lock: Option<Share>) {
    if let Some(share) = lock {
        let inner2 = inner.clone();
        inner.run(async move { inner2.locks.release(&share).await });
    }
}

impl Filesystem for LockedFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        if self.inner.config.passthrough {
            config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).map_err(|_| {
                io::Error::new(io::ErrorKind::Unsupported, "the kernel does not offer FUSE passthrough (needs Linux 6.9+ with CONFIG_FUSE_PASSTHROUGH)")
            })?;
            config.set_max_stack_depth(1).map_err(|_| {
                io::Error::other("the kernel refused a passthrough stacking depth of 1")
            })?;
        } else if self.inner.config.read_passthrough {
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
        let a = tri!(reply, self.inner.inodes.lookup(parent.0, name));
        reply.entry(&self.inner.ttl(), &a, GEN);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.inner.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let st = match fh.and_then(|fh| self.inner.handles.file(fh.0).ok()) {
            Some(f) => fstat(f.file.as_fd()).map(|st| file_attr(ino.0, &st)),
            None => self.inner.inodes.stat(ino.0),
        };
        let a = tri!(reply, st);
        reply.attr(&self.inner.ttl(), &a);
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let file = fh.and_then(|fh| self.inner.handles.file(fh.0).ok());
        let ttl = self.inner.ttl();
        let changes = Changes {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
        };
        // A truncate clears set-ID bits on the backing file system, and a setattr that changes
        // nothing is what the kernel sends when a write or chown should clear bits its own rule
        // keeps (`setid`): the caller's bits are cleared here as the backing kernel would.
        let nothing = [mode, uid, gid].iter().all(Option::is_none)
            && size.is_none()
            && atime.is_none()
            && mtime.is_none()
            && ctime.is_none();
        let setid_for = (size.is_some() || nothing).then(|| Caller::of(req));
        // A size change is a write: through a write handle its lock already covers it; anything
        // else (truncate(2) on a path, or a handle without the lock) takes the lock around it.
        let locked_handle = file.as_ref().is_some_and(|f| f.lock.is_some());
        if size.is_some() && !locked_handle {
            let rel = tri!(reply, self.inner.inodes.rel_path(ino.0));
            let name = self.inner.lock_name(&rel);
            self.inner.with_locks(
                vec![name],
                move |inner| {
                    inner.cache.forget(ino.0);
                    inner.setattr(ino.0, file.as_deref(), &changes, setid_for.as_ref())
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
            .setattr(ino.0, file.as_deref(), &changes, setid_for.as_ref());
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
        let inode = tri!(reply, self.inner.inodes.get(ino.0));
        let target = tri!(reply, sys::readlink_fd(inode.fd.as_fd()));
        reply.data(&target);
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
        let make = |dir: At<'_>, c: &CStr| sys::mknodat(dir, c, mode, rdev.into());
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
        let make = |dir: At<'_>, c: &CStr| sys::mkdirat(dir, c, mode);
        let a = tri!(
            reply,
            self.inner
                .make_entry(req, parent.0, name, mode | libc::S_IFDIR, make)
        );
        reply.entry(&self.inner.ttl(), &a, GEN);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let rel = tri!(reply, self.inner.inodes.child_path(parent.0, name));
        let lock = self.inner.lock_name(&rel);
        let name = name.to_owned();
        self.inner.with_locks(
            vec![lock],
            move |inner| -> io::Result<()> {
                let dir = inner.inodes.get(parent.0)?;
                sys::unlinkat(dir.at(), &cstr(&name)?, 0)
            },
            move |r| match r {
                Ok(Ok(())) => reply.ok(),
                Ok(Err(e)) => reply.error(errno(&e)),
                Err(e) => reply.error(lock_errno(&e)),
            },
        );
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let dir = tri!(reply, self.inner.inodes.get(parent.0));
        let c = tri!(reply, cstr(name));
        tri!(reply, sys::unlinkat(dir.at(), &c, libc::AT_REMOVEDIR));
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
        let make = |dir: At<'_>, c: &CStr| sys::symlinkat(&t, dir, c);
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
        let from = tri!(reply, self.inner.inodes.child_path(parent.0, name));
        let to = tri!(reply, self.inner.inodes.child_path(newparent.0, newname));
        let locks = vec![self.inner.lock_name(&from), self.inner.lock_name(&to)];
        let (name, newname) = (name.to_owned(), newname.to_owned());
        self.inner.with_locks(
            locks,
            move |inner| -> io::Result<()> {
                let a = inner.inodes.get(parent.0)?;
                let b = inner.inodes.get(newparent.0)?;
                let (ca, cb) = (cstr(&name)?, cstr(&newname)?);
                sys::renameat2(a.at(), &ca, b.at(), &cb, flags.bits())
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
        let inode = tri!(reply, self.inner.inodes.get(ino.0));
        let dir = tri!(reply, self.inner.inodes.get(newparent.0));
        let c = tri!(reply, cstr(newname));
        // Following the /proc magic link links the inode itself, whatever its name is now.
        tri!(
            reply,
            sys::linkat(
                At::Cwd,
                &inode.proc_path(),
                dir.at(),
                &c,
                libc::AT_SYMLINK_FOLLOW,
            )
        );
        let a = tri!(reply, self.inner.inodes.lookup(newparent.0, newname));
        reply.entry(&self.inner.ttl(), &a, GEN);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = is_write_open(flags.0);
        if !write {
            let file = tri!(reply, self.inner.open_backing(ino.0, flags.0));
            return finish_open(&self.inner, ino.0, file, None, false, reply);
        }
        let rel = tri!(reply, self.inner.inodes.rel_path(ino.0));
        let name = self.inner.lock_name(&rel);
        let nonblock = flags.0 & libc::O_NONBLOCK != 0;
        let inner = self.inner.clone();
        // A wait runs on the runtime: a FUSE worker thread is never parked on a lock.
        self.inner.run(async move {
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
        let f = match self.inner.handles.file(fh.0) {
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
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let f = match self.inner.handles.file(fh.0) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        if let Err(e) = f.check_lock() {
            return reply.error(e);
        }
        // The kernel clears no set-ID bit before a direct write (the default mode's write
        // handles): it flags the write instead, for the daemon, whose own write as root
        // would not clear them either.
        if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
            tri!(reply, setid::clear_before_write(&f.file, &Caller::of(req)));
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
        let f = match self.inner.handles.file(fh.0) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        // close(2) reports a lost lock: the data written under it may have raced another node.
        if let Err(e) = f.check_lock() {
            return reply.error(e);
        }
        tri!(reply, sys::dup_close(f.file.as_fd()));
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
        let Some(f) = self.inner.handles.remove_file(fh.0) else {
            return reply.error(Errno::EBADF);
        };
        let (ino, lock) = (f.ino, f.lock.clone());
        // Close the backing fd before the lock goes, so the next holder sees every byte
        // (on NFS, close is what pushes the data to the server).
        let passthrough = f.passthrough;
        drop(f);
        if passthrough {
            self.inner.backings.put(ino);
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
        let f = match self.inner.handles.file(fh.0) {
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
        let fh = self.inner.handles.add_dir(entries);
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
        let Some(entries) = self.inner.handles.dir(fh.0) else {
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
        let Some(entries) = self.inner.handles.dir(fh.0) else {
            return reply.error(Errno::EBADF);
        };
        let ttl = self.inner.ttl();
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            let dots = e.name == "." || e.name == "..";
            let a = if dots {
                // The kernel does not count lookups for these two.
                match self.inner.inodes.stat(ino.0) {
                    Ok(a) => a,
                    Err(_) => continue,
                }
            } else {
                match self.inner.inodes.lookup(ino.0, &e.name) {
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
        self.inner.handles.remove_dir(fh.0);
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
        let inode = tri!(reply, self.inner.inodes.get(ino.0));
        let r = openat(
            At::Cwd,
            &inode.proc_path(),
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
            self.inner
                .inodes
                .get(ino.0)
                .or_else(|_| self.inner.inodes.get(ROOT))
        );
        let st = tri!(reply, sys::fstatvfs(inode.fd.as_fd()));
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
        let inode = tri!(reply, self.inner.inodes.get(ino.0));
        let n = tri!(reply, cstr(name));
        tri!(reply, sys::setxattr(&inode.proc_path(), &n, value, flags));
        reply.ok();
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let inode = tri!(reply, self.inner.inodes.get(ino.0));
        let n = tri!(reply, cstr(name));
        let mut buf = vec![0u8; size as usize];
        let r = sys::getxattr(&inode.proc_path(), &n, &mut buf);
        xattr_reply(reply, size, r, &buf);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let inode = tri!(reply, self.inner.inodes.get(ino.0));
        let mut buf = vec![0u8; size as usize];
        let r = sys::listxattr(&inode.proc_path(), &mut buf);
        xattr_reply(reply, size, r, &buf);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let inode = tri!(reply, self.inner.inodes.get(ino.0));
        let n = tri!(reply, cstr(name));
        tri!(reply, sys::removexattr(&inode.proc_path(), &n));
        reply.ok();
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let inode = tri!(reply, self.inner.inodes.get(ino.0));
        tri!(
            reply,
            sys::faccessat(At::Cwd, &inode.proc_path(), mask.bits(), 0)
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
        let rel = tri!(reply, self.inner.inodes.child_path(parent.0, name));
        let lock = self.inner.lock_name(&rel);
        let nonblock = flags & libc::O_NONBLOCK != 0;
        let (uid, gid) = (req.uid(), req.gid());
        let name = name.to_owned();
        let inner = self.inner.clone();
        self.inner.run(async move {
            let share = match inner.locks.acquire(&lock, nonblock).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::info!(lock = %lock, error = %e, "create refused");
                    return reply.error(lock_errno(&e));
                }
            };
            match inner.create_file(parent.0, &name, mode, flags, uid, gid) {
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
        let f = match self.inner.handles.file(fh.0) {
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
        tri!(reply, sys::fallocate(f.file.as_fd(), mode, offset, length));
        reply.ok();
    }
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn f<T: Send + Sync>() {}
    f::<LockedFs>();
}
