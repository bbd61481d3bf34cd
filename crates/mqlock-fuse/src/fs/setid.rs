//! The set-user-ID and set-group-ID bits that a write or a truncate takes away, decided as the
//! kernel decides it for a file of the backing file system.
//!
//! The daemon writes and truncates as root, with `CAP_FSETID`, so the backing file system
//! never clears these bits on a caller's behalf; and the kernel's FUSE module clears only part
//! of them: a direct write (`FOPEN_DIRECT_IO`, the default mode's write handles) only carries
//! `FUSE_WRITE_KILL_SUIDGID` for the daemon to act on, and where the module clears the bits
//! itself (page-cache writes, passthrough writes, truncates: a `setattr` with the new mode) it
//! keeps the pre-6.2 rule, which leaves a set-group-ID bit without group execute alone. What is
//! left reaches the daemon as a `setattr` that changes nothing (or only the size), so the
//! daemon applies the rule itself there and on flagged writes: [`bits_to_clear`].
//!
//! `FUSE_HANDLE_KILLPRIV_V2` would hand the whole rule to the daemon, but fuser 0.18 does not
//! pass on `setattr`'s `FATTR_KILL_SUIDGID` nor open's `FUSE_OPEN_KILL_SUIDGID`, and with it
//! the kernel would not clear the bits on passthrough writes at all.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;

use crate::sys::{self, fstat};

/// `CAP_FSETID`'s bit in a capability set.
const CAP_FSETID: u32 = 4;

/// The process behind a request, as far as the rule needs it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Caller {
    pub(super) pid: u32,
    pub(super) uid: u32,
    /// The caller's file-system group ID (what the kernel sends as the request's `gid`).
    pub(super) gid: u32,
}

impl Caller {
    pub(super) fn of(req: &fuser::Request) -> Caller {
        Caller {
            pid: req.pid(),
            uid: req.uid(),
            gid: req.gid(),
        }
    }
}

/// What the daemon knows of the caller's `CAP_FSETID`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fsetid {
    /// The kernel said the caller lacks it (`FUSE_WRITE_KILL_SUIDGID`).
    Lacking,
    /// Not said: read from `/proc/PID/status` when it matters.
    Unknown,
}

/// The caller's effective capabilities and supplementary groups, from `/proc/PID/status`.
#[derive(Debug, Default, PartialEq, Eq)]
struct Status {
    cap_eff: u64,
    groups: Vec<u32>,
}

impl Status {
    fn parse(text: &str) -> Option<Status> {
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .map(str::trim)
        };
        Some(Status {
            cap_eff: u64::from_str_radix(field("CapEff:")?, 16).ok()?,
            groups: field("Groups:")?
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?,
        })
    }

    /// `None` when the caller is gone, or invisible from here (another PID namespace: the
    /// kernel sends PID 0).
    fn of(pid: u32) -> Option<Status> {
        if pid == 0 {
            return None;
        }
        Status::parse(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
    }
}

/// A status read on first use, at most once.
struct Lazy<F> {
    load: Option<F>,
    value: Option<Status>,
}

impl<F: FnOnce() -> Option<Status>> Lazy<F> {
    fn get(&mut self) -> Option<&Status> {
        if let Some(load) = self.load.take() {
            self.value = load();
        }
        self.value.as_ref()
    }
}

/// The bits of the file `st` that a write or truncate by `caller` clears on a local file
/// system of Linux ≥ 6.2 (`setattr_should_drop_suidgid`): on a regular file, `S_ISUID`, and
/// `S_ISGID` when the file is group-executable or the caller is not in the file's group;
/// nothing for a caller with `CAP_FSETID`. The caller's capabilities and groups are read only
/// when they decide the answer; a caller whose status cannot be read counts as privileged when
/// its user ID is 0, and as a member of its file-system group only.
pub(super) fn bits_to_clear(st: &libc::stat, caller: &Caller, fsetid: Fsetid) -> u32 {
    bits_to_clear_with(st, caller, fsetid, || Status::of(caller.pid))
}

fn bits_to_clear_with(
    st: &libc::stat,
    caller: &Caller,
    fsetid: Fsetid,
    status: impl FnOnce() -> Option<Status>,
) -> u32 {
    let mode = st.st_mode;
    if mode & libc::S_IFMT != libc::S_IFREG || mode & (libc::S_ISUID | libc::S_ISGID) == 0 {
        return 0;
    }
    let mut status = Lazy {
        load: Some(status),
        value: None,
    };
    let mut clear = mode & libc::S_ISUID;
    let group_executable = mode & libc::S_IXGRP != 0;
    if mode & libc::S_ISGID != 0
        && (group_executable
            || !(caller.gid == st.st_gid
                || status.get().is_some_and(|s| s.groups.contains(&st.st_gid))))
    {
        clear |= libc::S_ISGID;
    }
    if clear == 0 {
        return 0;
    }
    let privileged = match fsetid {
        Fsetid::Lacking => false,
        Fsetid::Unknown => match status.get() {
            Some(s) => s.cap_eff & (1 << CAP_FSETID) != 0,
            None => caller.uid == 0,
        },
    };
    if privileged { 0 } else { clear }
}

/// Before a write the kernel flagged `FUSE_WRITE_KILL_SUIDGID`: clears what the write clears
/// on the backing file system, as the kernel does before it writes.
pub(super) fn clear_before_write(file: &File, caller: &Caller) -> io::Result<()> {
    let st = fstat(file.as_fd())?;
    let clear = bits_to_clear(&st, caller, Fsetid::Lacking);
    if clear != 0 {
        sys::fchmod(file.as_fd(), st.st_mode & 0o7777 & !clear)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(mode: u32, gid: u32) -> libc::stat {
        // SAFETY: a plain C struct; all zeroes is a valid value.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        st.st_mode = libc::S_IFREG | mode;
        st.st_gid = gid;
        st
    }

    const NOBODY: Caller = Caller {
        pid: 1,
        uid: 65534,
        gid: 65534,
    };

    fn status(cap_eff: u64, groups: &[u32]) -> impl FnOnce() -> Option<Status> {
        let groups = groups.to_vec();
        move || Some(Status { cap_eff, groups })
    }

    #[test]
    fn follows_the_kernels_rule() {
        fn clear(mode: u32, gid: u32, fsetid: Fsetid, s: impl FnOnce() -> Option<Status>) -> u32 {
            bits_to_clear_with(&stat(mode, gid), &NOBODY, fsetid, s)
        }
        let none = || -> Option<Status> { panic!("the status is not needed") };
        // S_ISUID always; S_ISGID with group execute.
        assert_eq!(clear(0o6777, 0, Fsetid::Lacking, none), 0o6000);
        assert_eq!(clear(0o4755, 0, Fsetid::Lacking, none), 0o4000);
        assert_eq!(clear(0o2775, 65534, Fsetid::Lacking, none), 0o2000);
        // S_ISGID without group execute: only for a caller outside the file's group.
        assert_eq!(clear(0o2767, 0, Fsetid::Lacking, status(0, &[])), 0o2000);
        assert_eq!(clear(0o2767, 0, Fsetid::Lacking, status(0, &[0])), 0);
        assert_eq!(clear(0o2766, 65534, Fsetid::Lacking, none), 0);
        // CAP_FSETID keeps everything; unknown and unreadable: user 0 only.
        assert_eq!(clear(0o6777, 0, Fsetid::Unknown, status(1 << 4, &[])), 0);
        assert_eq!(
            clear(0o6777, 0, Fsetid::Unknown, status(!(1 << 4), &[])),
            0o6000
        );
        assert_eq!(clear(0o6777, 0, Fsetid::Unknown, || None), 0o6000);
        let root = Caller { uid: 0, ..NOBODY };
        assert_eq!(
            bits_to_clear_with(&stat(0o6777, 0), &root, Fsetid::Unknown, || None),
            0
        );
        // Nothing to clear, or not a regular file: nothing read.
        assert_eq!(clear(0o777, 0, Fsetid::Unknown, none), 0);
        let mut dir = stat(0o2777, 0);
        dir.st_mode = libc::S_IFDIR | 0o2777;
        assert_eq!(bits_to_clear_with(&dir, &NOBODY, Fsetid::Lacking, none), 0);
    }

    #[test]
    fn reads_proc_status() {
        let text = "Name:\tsh\nGroups:\t4 24 27 \nCapEff:\t000001ffffffffff\n";
        assert_eq!(
            Status::parse(text),
            Some(Status {
                cap_eff: 0x1ff_ffff_ffff,
                groups: vec![4, 24, 27],
            })
        );
        assert_eq!(
            Status::parse("Groups:\t\nCapEff:\t0000000000000000\n"),
            Some(Status::default())
        );
        let me = Status::of(std::process::id()).expect("this process's status");
        assert_eq!(me.cap_eff & (1 << CAP_FSETID) != 0, sys::geteuid() == 0);
    }
}
