//! Safe wrappers over the raw system calls of the passthrough and of mounting.
//!
//! All the `unsafe` of the crate's system calls is here, each block next to the one call it
//! covers: the wrappers take borrowed fds and C strings, so a caller can neither pass a dangling
//! pointer nor name an fd it does not own, and every failure comes back as an [`io::Error`]
//! carrying the errno the FUSE reply needs.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

/// What a relative path of an `*at` call starts from. The passthrough addresses inodes either
/// relative to a directory's `O_PATH` fd or by the absolute `/proc/self/fd/N` path of
/// [`proc_path`], which ignores the starting point ([`At::Cwd`]).
#[derive(Debug, Clone, Copy)]
pub(crate) enum At<'a> {
    /// `AT_FDCWD`.
    Cwd,
    /// A directory fd (or, with an empty path and `AT_EMPTY_PATH`, the fd's own inode).
    Dir(BorrowedFd<'a>),
}

impl At<'_> {
    fn raw(self) -> RawFd {
        match self {
            At::Cwd => libc::AT_FDCWD,
            At::Dir(fd) => fd.as_raw_fd(),
        }
    }
}

impl<'a> From<BorrowedFd<'a>> for At<'a> {
    fn from(fd: BorrowedFd<'a>) -> Self {
        At::Dir(fd)
    }
}

/// A negative return is `errno`.
fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// The `ssize_t` flavour of [`cvt`], for calls that return a length.
fn cvt_len(r: isize) -> io::Result<usize> {
    usize::try_from(r).map_err(|_| io::Error::last_os_error())
}

/// A name from the kernel as a C string (`EINVAL` for an interior NUL, which no file name has).
pub(crate) fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `/proc/self/fd/N`: reopens or addresses the inode behind an `O_PATH` fd.
pub(crate) fn proc_path(fd: BorrowedFd<'_>) -> CString {
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL")
}

pub(crate) fn openat(at: At<'_>, name: &CStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    // SAFETY: `name` is a valid C string for the duration of the call.
    let fd = cvt(unsafe { libc::openat(at.raw(), name.as_ptr(), flags | libc::O_CLOEXEC, mode) })?;
    // SAFETY: `fd` was just opened and is not owned elsewhere.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The inode `fd` stands for, without following a symlink (also for `O_PATH` fds).
pub(crate) fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: `st` is a valid out pointer; an empty path with AT_EMPTY_PATH names `fd` itself.
    cvt(unsafe {
        libc::fstatat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            st.as_mut_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    // SAFETY: initialised by the successful call.
    Ok(unsafe { st.assume_init() })
}

/// Closes a duplicate of `fd`: close() reports errors of the backing file system (e.g. NFS
/// write-back), which is what `flush` must return, while `fd` itself stays open.
pub(crate) fn dup_close(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: dup of a borrowed, open fd.
    let copy = cvt(unsafe { libc::dup(fd.as_raw_fd()) })?;
    // SAFETY: `copy` was just made and is owned by nobody else. (`OwnedFd` would drop the error.)
    cvt(unsafe { libc::close(copy) })?;
    Ok(())
}

/// Whether `file` was opened with `O_APPEND`.
pub(crate) fn is_append(file: &File) -> bool {
    // SAFETY: F_GETFL on an open fd.
    let fl = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    fl >= 0 && fl & libc::O_APPEND != 0
}

pub(crate) fn geteuid() -> u32 {
    // SAFETY: no arguments; cannot fail.
    unsafe { libc::geteuid() }
}

pub(crate) fn fchownat(at: At<'_>, name: &CStr, uid: u32, gid: u32, flags: i32) -> io::Result<()> {
    // SAFETY: valid C string.
    cvt(unsafe { libc::fchownat(at.raw(), name.as_ptr(), uid, gid, flags) }).map(drop)
}

pub(crate) fn fchmodat(at: At<'_>, name: &CStr, mode: u32, flags: i32) -> io::Result<()> {
    // SAFETY: valid C string.
    cvt(unsafe { libc::fchmodat(at.raw(), name.as_ptr(), mode, flags) }).map(drop)
}

pub(crate) fn fchmod(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    // SAFETY: plain syscall on a borrowed fd.
    cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode) }).map(drop)
}

pub(crate) fn truncate(path: &CStr, size: u64) -> io::Result<()> {
    // SAFETY: valid C string.
    cvt(unsafe { libc::truncate(path.as_ptr(), size as libc::off_t) }).map(drop)
}

pub(crate) fn futimens(fd: BorrowedFd<'_>, times: &[libc::timespec; 2]) -> io::Result<()> {
    // SAFETY: `times` points to the two timespecs the call reads.
    cvt(unsafe { libc::futimens(fd.as_raw_fd(), times.as_ptr()) }).map(drop)
}

pub(crate) fn utimensat(
    at: At<'_>,
    path: &CStr,
    times: &[libc::timespec; 2],
    flags: i32,
) -> io::Result<()> {
    // SAFETY: valid C string; `times` points to the two timespecs the call reads.
    cvt(unsafe { libc::utimensat(at.raw(), path.as_ptr(), times.as_ptr(), flags) }).map(drop)
}

/// The target of the symlink `fd` is an `O_PATH` fd of.
pub(crate) fn readlink_fd(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: buffer and length match; an empty path reads the link `fd` itself is on.
    let n = cvt_len(unsafe {
        libc::readlinkat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })?;
    buf.truncate(n);
    Ok(buf)
}

pub(crate) fn mknodat(at: At<'_>, name: &CStr, mode: u32, rdev: u64) -> io::Result<()> {
    // SAFETY: valid C string.
    cvt(unsafe { libc::mknodat(at.raw(), name.as_ptr(), mode, rdev as libc::dev_t) }).map(drop)
}

pub(crate) fn mkdirat(at: At<'_>, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: valid C string.
    cvt(unsafe { libc::mkdirat(at.raw(), name.as_ptr(), mode) }).map(drop)
}

pub(crate) fn symlinkat(target: &CStr, at: At<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: valid C strings.
    cvt(unsafe { libc::symlinkat(target.as_ptr(), at.raw(), name.as_ptr()) }).map(drop)
}

pub(crate) fn unlinkat(at: At<'_>, name: &CStr, flags: i32) -> io::Result<()> {
    // SAFETY: valid C string.
    cvt(unsafe { libc::unlinkat(at.raw(), name.as_ptr(), flags) }).map(drop)
}

pub(crate) fn renameat2(
    from_at: At<'_>,
    from: &CStr,
    to_at: At<'_>,
    to: &CStr,
    flags: u32,
) -> io::Result<()> {
    // SAFETY: valid C strings.
    cvt(unsafe {
        libc::renameat2(
            from_at.raw(),
            from.as_ptr(),
            to_at.raw(),
            to.as_ptr(),
            flags,
        )
    })
    .map(drop)
}

pub(crate) fn linkat(
    from_at: At<'_>,
    from: &CStr,
    to_at: At<'_>,
    to: &CStr,
    flags: i32,
) -> io::Result<()> {
    // SAFETY: valid C strings.
    cvt(unsafe {
        libc::linkat(
            from_at.raw(),
            from.as_ptr(),
            to_at.raw(),
            to.as_ptr(),
            flags,
        )
    })
    .map(drop)
}

/// The file system `fd` is on (also for `O_PATH` fds).
pub(crate) fn fstatvfs(fd: BorrowedFd<'_>) -> io::Result<libc::statvfs> {
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: valid out pointer.
    cvt(unsafe { libc::fstatvfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: initialised by the successful call.
    Ok(unsafe { st.assume_init() })
}

pub(crate) fn setxattr(path: &CStr, name: &CStr, value: &[u8], flags: i32) -> io::Result<()> {
    // SAFETY: valid C strings; pointer and length of `value` match.
    cvt(unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

/// Reads the attribute into `buf`; an empty `buf` asks for the length only.
pub(crate) fn getxattr(path: &CStr, name: &CStr, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: valid C strings; pointer and length of `buf` match.
    cvt_len(unsafe {
        libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })
}

/// Reads the attribute names into `buf`; an empty `buf` asks for the length only.
pub(crate) fn listxattr(path: &CStr, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: valid C string; pointer and length of `buf` match.
    cvt_len(unsafe { libc::listxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })
}

pub(crate) fn removexattr(path: &CStr, name: &CStr) -> io::Result<()> {
    // SAFETY: valid C strings.
    cvt(unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) }).map(drop)
}

pub(crate) fn faccessat(at: At<'_>, path: &CStr, mode: i32, flags: i32) -> io::Result<()> {
    // SAFETY: valid C string.
    cvt(unsafe { libc::faccessat(at.raw(), path.as_ptr(), mode, flags) }).map(drop)
}

pub(crate) fn fallocate(fd: BorrowedFd<'_>, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on a borrowed fd.
    cvt(unsafe {
        libc::fallocate(
            fd.as_raw_fd(),
            mode,
            offset as libc::off_t,
            len as libc::off_t,
        )
    })
    .map(drop)
}

/// Lifts the soft limit on open fds to the hard one.
pub(crate) fn raise_nofile_limit() -> io::Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out pointer.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) })?;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: valid in pointer.
        cvt(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) })?;
    }
    Ok(())
}
