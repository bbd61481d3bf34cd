//! Attributes: the kernel's view of a backing `stat`, `setattr` on the backing inode, and the
//! ownership of entries the daemon creates for a caller.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo, TimeOrNow};

use super::inodes::Inode;
use super::setid::{self, Caller, Fsetid};
use crate::sys::{self, At, fstat};

fn time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH - Duration::new((-secs) as u64, 0) + Duration::from_nanos(nsecs as u64)
    }
}

fn kind(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

/// The attributes of FUSE inode `ino` whose backing inode has `st`.
pub(super) fn file_attr(ino: u64, st: &libc::stat) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: time(st.st_atime, st.st_atime_nsec),
        mtime: time(st.st_mtime, st.st_mtime_nsec),
        ctime: time(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: kind(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

/// What a `setattr` request changes (`None`: left alone).
#[derive(Debug, Clone, Copy)]
pub(super) struct Changes {
    pub(super) mode: Option<u32>,
    pub(super) uid: Option<u32>,
    pub(super) gid: Option<u32>,
    pub(super) size: Option<u64>,
    pub(super) atime: Option<TimeOrNow>,
    pub(super) mtime: Option<TimeOrNow>,
}

/// `utimensat`'s form of a time: `UTIME_OMIT` leaves it, `UTIME_NOW` is the kernel's now.
fn timespec(t: Option<TimeOrNow>) -> libc::timespec {
    match t {
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
                    // Before the epoch: the nanoseconds of a timespec count forwards.
                    let d = e.duration();
                    let (mut s, mut n) = (-(d.as_secs() as i64), -(d.subsec_nanos() as i64));
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
    }
}

/// Applies `changes` to the backing inode of `ino`: through the open `file` when the request
/// came with a handle (an `ftruncate`, `fchmod`...), otherwise through the inode's path.
/// With `setid_for`, also clears the set-ID bits that the backing file system would clear for
/// that caller ([`setid`]). Returns the attributes after the change.
///
/// The size goes first: a size the backing file system refuses (`EFBIG` beyond its largest
/// file) fails the call before anything changed, as a local `truncate` fails before it changes
/// the mode the kernel sends along with the size to clear set-ID bits.
pub(super) fn set(
    ino: u64,
    inode: &Inode,
    file: Option<&File>,
    changes: &Changes,
    setid_for: Option<&Caller>,
) -> io::Result<FileAttr> {
    let path = inode.proc_path();
    let stat = || match file {
        Some(f) => fstat(f.as_fd()),
        None => fstat(inode.fd.as_fd()),
    };
    let mut mode = changes.mode;
    if let Some(caller) = setid_for {
        let st = stat()?;
        let clear = setid::bits_to_clear(&st, caller, Fsetid::Unknown);
        if clear != 0 {
            mode = Some(mode.unwrap_or(st.st_mode) & !clear);
        }
    }
    if let Some(size) = changes.size {
        match file {
            Some(f) => f.set_len(size)?,
            None => sys::truncate(&path, size)?,
        }
    }
    if let Some(mode) = mode {
        match file {
            Some(f) => sys::fchmod(f.as_fd(), mode & 0o7777)?,
            None => sys::fchmodat(At::Cwd, &path, mode & 0o7777, 0)?,
        }
    }
    if changes.uid.is_some() || changes.gid.is_some() {
        let (u, g) = (
            changes.uid.unwrap_or(u32::MAX),
            changes.gid.unwrap_or(u32::MAX),
        );
        sys::fchownat(
            inode.at(),
            c"",
            u,
            g,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )?;
    }
    if changes.atime.is_some() || changes.mtime.is_some() {
        let times = [timespec(changes.atime), timespec(changes.mtime)];
        match file {
            Some(f) => sys::futimens(f.as_fd(), &times)?,
            None => sys::utimensat(At::Cwd, &path, &times, 0)?,
        }
    }
    Ok(file_attr(ino, &stat()?))
}

/// Gives the entry `name` the daemon (root) just created in `dir` to the caller `uid`/`gid`,
/// with `mode`'s permissions. The group is left as created when the directory is
/// set-group-ID, as the kernel would.
pub(super) fn give_to_caller(
    dir: &Inode,
    name: &CStr,
    uid: u32,
    gid: u32,
    mode: u32,
) -> io::Result<()> {
    let dir_st = fstat(dir.fd.as_fd())?;
    let gid = if dir_st.st_mode & libc::S_ISGID != 0 {
        u32::MAX
    } else {
        gid
    };
    sys::fchownat(dir.at(), name, uid, gid, libc::AT_SYMLINK_NOFOLLOW)?;
    if mode & libc::S_IFMT != libc::S_IFLNK {
        // chown clears set-ID bits and the daemon's umask may have masked some: set the
        // mode the kernel asked for (already masked by the caller's umask).
        let mut perm = mode & 0o7777;
        if dir_st.st_mode & libc::S_ISGID != 0 && mode & libc::S_IFMT == libc::S_IFDIR {
            perm |= libc::S_ISGID;
        }
        sys::fchmodat(dir.at(), name, perm, 0)?;
    }
    Ok(())
}
