//! POSIX behaviour of the passthrough, through a real `mqlock mount` on the real broker:
//! what a program sees on the mount must match what it would see on the backing directory.

#[path = "fuse_common/mod.rs"]
mod common;
mod support;

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt, symlink};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use common::{Node, errno_of};

const NOBODY: u32 = 65534;

fn node(extra: &[&str]) -> (tempfile::TempDir, Node) {
    let backing = tempfile::tempdir().unwrap();
    // The mount is used by another user below: the backing root must be reachable by it.
    std::fs::set_permissions(backing.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let n = Node::start(backing.path(), &support::unique("posix"), extra);
    (backing, n)
}

fn c(p: &Path) -> CString {
    CString::new(p.to_str().unwrap()).unwrap()
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap()
}

/// Runs `sh -c script` as nobody; returns (success, stderr).
fn as_nobody(script: &str) -> (bool, String) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn files_directories_and_links_behave_like_the_backing_directory() {
    let (backing, n) = node(&[]);
    // create, write, read, O_EXCL.
    std::fs::write(n.path("a"), b"hello").unwrap();
    assert_eq!(std::fs::read(backing.path().join("a")).unwrap(), b"hello");
    assert_eq!(
        errno_of(
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(n.path("a"))
        ),
        libc::EEXIST
    );
    assert_eq!(errno_of(File::open(n.path("missing"))), libc::ENOENT);
    // mkdir, readdir, rmdir of a non-empty directory, rename, unlink.
    std::fs::create_dir(n.path("d")).unwrap();
    assert_eq!(errno_of(std::fs::create_dir(n.path("d"))), libc::EEXIST);
    std::fs::write(n.path("d/x"), b"x").unwrap();
    assert_eq!(errno_of(std::fs::remove_dir(n.path("d"))), libc::ENOTEMPTY);
    let mut names: Vec<String> = std::fs::read_dir(n.path(""))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["a", "d"]);
    std::fs::rename(n.path("d/x"), n.path("y")).unwrap();
    assert!(backing.path().join("y").exists() && !backing.path().join("d/x").exists());
    std::fs::remove_dir(n.path("d")).unwrap();
    std::fs::remove_file(n.path("y")).unwrap();
    assert_eq!(errno_of(std::fs::remove_file(n.path("y"))), libc::ENOENT);
    assert_eq!(errno_of(std::fs::remove_dir(n.path("a"))), libc::ENOTDIR);
    // truncate and ftruncate.
    std::fs::write(n.path("t"), b"0123456789").unwrap();
    // SAFETY: valid C string.
    assert_eq!(unsafe { libc::truncate(c(&n.path("t")).as_ptr(), 4) }, 0);
    assert_eq!(std::fs::read(n.path("t")).unwrap(), b"0123");
    OpenOptions::new()
        .write(true)
        .open(n.path("t"))
        .unwrap()
        .set_len(8)
        .unwrap();
    assert_eq!(std::fs::read(n.path("t")).unwrap(), b"0123\0\0\0\0");
    // chmod, chown, utimens.
    std::fs::set_permissions(n.path("t"), std::fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(
        std::fs::metadata(backing.path().join("t")).unwrap().mode() & 0o7777,
        0o640
    );
    std::os::unix::fs::chown(n.path("t"), Some(NOBODY), Some(NOBODY)).unwrap();
    let m = std::fs::metadata(n.path("t")).unwrap();
    assert_eq!((m.uid(), m.gid()), (NOBODY, NOBODY));
    let times = [
        libc::timespec {
            tv_sec: 1_000_000,
            tv_nsec: 5,
        },
        libc::timespec {
            tv_sec: 2_000_000,
            tv_nsec: 7,
        },
    ];
    // SAFETY: valid C string and times.
    assert_eq!(
        unsafe { libc::utimensat(libc::AT_FDCWD, c(&n.path("t")).as_ptr(), times.as_ptr(), 0) },
        0
    );
    let m = std::fs::metadata(n.path("t")).unwrap();
    assert_eq!(
        (m.atime(), m.atime_nsec(), m.mtime(), m.mtime_nsec()),
        (1_000_000, 5, 2_000_000, 7)
    );
    // symlink, readlink, hard link.
    symlink("a", n.path("s")).unwrap();
    assert_eq!(std::fs::read_link(n.path("s")).unwrap(), Path::new("a"));
    assert_eq!(std::fs::read(n.path("s")).unwrap(), b"hello");
    assert!(
        std::fs::symlink_metadata(backing.path().join("s"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    std::fs::hard_link(n.path("a"), n.path("h")).unwrap();
    assert_eq!(std::fs::metadata(n.path("a")).unwrap().nlink(), 2);
    assert_eq!(
        std::fs::metadata(n.path("h")).unwrap().ino(),
        std::fs::metadata(n.path("a")).unwrap().ino()
    );
    // mkfifo: a FIFO on the mount is a FIFO on the backing side.
    // SAFETY: valid C string.
    assert_eq!(unsafe { libc::mkfifo(c(&n.path("p")).as_ptr(), 0o600) }, 0);
    assert!(
        std::fs::metadata(backing.path().join("p"))
            .unwrap()
            .file_type()
            .is_fifo()
    );
    // statfs answers for the backing file system.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out pointer.
    assert_eq!(
        unsafe { libc::statvfs(c(&n.path("")).as_ptr(), &mut st) },
        0
    );
    assert!(st.f_blocks > 0);
}

#[test]
fn rename_flags_noreplace_exchange_and_whiteout() {
    let (_backing, n) = node(&[]);
    std::fs::write(n.path("a"), b"A").unwrap();
    std::fs::write(n.path("b"), b"B").unwrap();
    let rename2 = |from: &str, to: &str, flags: u32| {
        // SAFETY: valid C strings.
        let r = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                c(&n.path(from)).as_ptr(),
                libc::AT_FDCWD,
                c(&n.path(to)).as_ptr(),
                flags,
            )
        };
        if r == 0 { 0 } else { last_errno() }
    };
    assert_eq!(rename2("a", "b", libc::RENAME_NOREPLACE), libc::EEXIST);
    assert_eq!(rename2("a", "b", libc::RENAME_EXCHANGE), 0);
    assert_eq!(std::fs::read(n.path("a")).unwrap(), b"B");
    assert_eq!(std::fs::read(n.path("b")).unwrap(), b"A");
    assert_eq!(rename2("a", "c", libc::RENAME_WHITEOUT), libc::EINVAL);
    assert_eq!(rename2("a", "c", libc::RENAME_NOREPLACE), 0);
}

#[test]
fn xattrs_round_trip() {
    let (backing, n) = node(&[]);
    std::fs::write(n.path("x"), b"x").unwrap();
    let (p, name) = (c(&n.path("x")), CString::new("user.mqlock").unwrap());
    // SAFETY: valid C strings and buffers throughout.
    unsafe {
        assert_eq!(
            libc::setxattr(p.as_ptr(), name.as_ptr(), b"v1".as_ptr().cast(), 2, 0),
            0,
            "{}",
            last_errno()
        );
        let mut buf = [0u8; 16];
        assert_eq!(
            libc::getxattr(
                p.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len()
            ),
            2
        );
        assert_eq!(&buf[..2], b"v1");
        assert_eq!(
            libc::getxattr(p.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0),
            2
        );
        let bp = c(&backing.path().join("x"));
        assert_eq!(
            libc::getxattr(
                bp.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len()
            ),
            2
        );
        let n = libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len());
        assert_eq!(&buf[..n as usize], b"user.mqlock\0");
        assert_eq!(libc::removexattr(p.as_ptr(), name.as_ptr()), 0);
        assert_eq!(
            libc::getxattr(
                p.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len()
            ),
            -1
        );
        assert_eq!(last_errno(), libc::ENODATA);
    }
}

#[test]
fn other_users_are_checked_against_modes_and_own_what_they_create() {
    let (backing, n) = node(&["--allow-other"]);
    std::fs::write(n.path("root-only"), b"secret").unwrap();
    std::fs::set_permissions(n.path("root-only"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(n.path("readable"), b"public").unwrap();
    std::fs::set_permissions(n.path("readable"), std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::create_dir(n.path("shared")).unwrap();
    std::fs::set_permissions(n.path("shared"), std::fs::Permissions::from_mode(0o777)).unwrap();
    let q = |p: &str| n.path(p).to_str().unwrap().to_owned();

    let (ok, err) = as_nobody(&format!("cat {}", q("root-only")));
    assert!(!ok && err.contains("Permission denied"), "{err}");
    let (ok, err) = as_nobody(&format!("echo x >> {}", q("readable")));
    assert!(!ok && err.contains("Permission denied"), "{err}");
    let (ok, err) = as_nobody(&format!("touch {}", q("new-in-root")));
    assert!(!ok && err.contains("Permission denied"), "{err}");
    let (ok, err) = as_nobody(&format!(
        "cat {} && umask 027 && echo mine > {} && mkdir {}",
        q("readable"),
        q("shared/mine"),
        q("shared/sub")
    ));
    assert!(ok, "{err}");
    let m = std::fs::metadata(backing.path().join("shared/mine")).unwrap();
    assert_eq!(
        (m.uid(), m.gid(), m.mode() & 0o7777),
        (NOBODY, NOBODY, 0o640),
        "owner and umask of a created file"
    );
    let m = std::fs::metadata(backing.path().join("shared/sub")).unwrap();
    assert_eq!(
        (m.uid(), m.gid(), m.mode() & 0o7777),
        (NOBODY, NOBODY, 0o750)
    );
    let (ok, err) = as_nobody(&format!("chmod 600 {}", q("readable")));
    assert!(!ok && err.contains("Operation not permitted"), "{err}");
}

#[test]
fn without_allow_other_other_users_are_refused() {
    let (_backing, n) = node(&[]);
    std::fs::write(n.path("f"), b"x").unwrap();
    std::fs::set_permissions(n.path("f"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, err) = as_nobody(&format!("cat {}", n.path("f").display()));
    assert!(!ok && err.contains("Permission denied"), "{err}");
}

#[test]
fn appends_and_large_writes_round_trip_in_both_modes() {
    for extra in [&[][..], &["--passthrough"][..]] {
        let (backing, n) = node(extra);
        let data: Vec<u8> = (0..5_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(n.path("big"), &data).unwrap();
        assert_eq!(
            std::fs::read(backing.path().join("big")).unwrap(),
            data,
            "{extra:?}"
        );
        assert_eq!(std::fs::read(n.path("big")).unwrap(), data, "{extra:?}");
        let mut f = OpenOptions::new()
            .append(true)
            .custom_flags(0)
            .open(n.path("big"))
            .unwrap();
        f.write_all(b"tail").unwrap();
        drop(f);
        assert_eq!(
            std::fs::metadata(n.path("big")).unwrap().len(),
            data.len() as u64 + 4
        );
    }
}

/// "ok" or the errno of a result, for transcripts.
fn outcome<T>(r: std::io::Result<T>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => format!("errno {}", e.raw_os_error().unwrap_or(-1)),
    }
}

fn cvt(r: libc::c_int) -> std::io::Result<libc::c_int> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// The semantics a passthrough most easily gets wrong, run in `dir`; returns what a program
/// observes, step by step, so that the mount's transcript can be compared with the backing
/// directory's.
fn tricky_semantics(dir: &Path) -> Vec<String> {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::fs::FileExt;
    let mut t = Vec::new();
    let p = |n: &str| dir.join(n);
    let read_handle = |f: &mut File| {
        let mut s = String::new();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_string(&mut s).unwrap();
        s
    };

    // rename over a file that is open: the old handle keeps the old file, now unlinked.
    std::fs::write(p("a"), "old a").unwrap();
    std::fs::write(p("b"), "new b").unwrap();
    let mut old = File::open(p("a")).unwrap();
    std::fs::rename(p("b"), p("a")).unwrap();
    t.push(format!(
        "rename-over-open: handle reads {:?}",
        read_handle(&mut old)
    ));
    t.push(format!(
        "rename-over-open: handle nlink {}",
        old.metadata().unwrap().nlink()
    ));
    t.push(format!(
        "rename-over-open: path reads {:?}",
        std::fs::read_to_string(p("a")).unwrap()
    ));
    drop(old);

    // unlink of an open file: the handle still reads and writes it.
    let mut u = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(p("u"))
        .unwrap();
    u.write_all(b"before unlink").unwrap();
    std::fs::remove_file(p("u")).unwrap();
    u.write_all(b", after unlink").unwrap();
    t.push(format!(
        "unlinked-open: handle reads {:?}",
        read_handle(&mut u)
    ));
    t.push(format!(
        "unlinked-open: nlink {}",
        u.metadata().unwrap().nlink()
    ));
    t.push(format!(
        "unlinked-open: size {}",
        u.metadata().unwrap().len()
    ));
    t.push(format!(
        "unlinked-open: path {}",
        outcome(File::open(p("u")))
    ));
    t.push(format!(
        "unlinked-open: ftruncate {}",
        outcome(u.set_len(6))
    ));
    t.push(format!(
        "unlinked-open: after ftruncate {:?}",
        read_handle(&mut u)
    ));
    drop(u);

    // Hard links share one inode.
    std::fs::write(p("h1"), "linked").unwrap();
    std::fs::hard_link(p("h1"), p("h2")).unwrap();
    OpenOptions::new()
        .append(true)
        .open(p("h2"))
        .unwrap()
        .write_all(b" +h2")
        .unwrap();
    t.push(format!(
        "hard-link: h1 reads {:?}",
        std::fs::read_to_string(p("h1")).unwrap()
    ));
    let (m1, m2) = (
        std::fs::metadata(p("h1")).unwrap(),
        std::fs::metadata(p("h2")).unwrap(),
    );
    t.push(format!(
        "hard-link: same ino {}, nlink {}/{}",
        m1.ino() == m2.ino(),
        m1.nlink(),
        m2.nlink()
    ));
    std::fs::remove_file(p("h1")).unwrap();
    t.push(format!(
        "hard-link: nlink after unlink {}",
        std::fs::metadata(p("h2")).unwrap().nlink()
    ));
    t.push(format!(
        "hard-link: link to a directory {}",
        outcome(std::fs::hard_link(dir, p("dirlink")))
    ));

    // O_APPEND: every write goes to the end, whatever the offset.
    std::fs::write(p("ap"), "12345").unwrap();
    let mut ap = OpenOptions::new().append(true).open(p("ap")).unwrap();
    ap.seek(SeekFrom::Start(0)).unwrap();
    ap.write_all(b"x").unwrap();
    ap.write_at(b"y", 1).unwrap();
    t.push(format!(
        "append: position {}",
        ap.stream_position().unwrap()
    ));
    drop(ap);
    t.push(format!(
        "append: content {:?}",
        std::fs::read_to_string(p("ap")).unwrap()
    ));
    t.push(format!(
        "append: read on a write-only fd {}",
        outcome(
            OpenOptions::new()
                .append(true)
                .open(p("ap"))
                .unwrap()
                .read(&mut [0u8; 4])
        )
    ));

    // O_EXCL on create, including over a dangling symlink.
    let excl = |n: &str| outcome(OpenOptions::new().write(true).create_new(true).open(p(n)));
    t.push(format!("excl: new {}", excl("ex")));
    t.push(format!("excl: existing {}", excl("ex")));
    symlink("nowhere", p("dangling")).unwrap();
    t.push(format!("excl: dangling symlink {}", excl("dangling")));
    t.push(format!(
        "nofollow: symlink {}",
        outcome(
            OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(p("dangling"))
        )
    ));
    t.push(format!(
        "creat through a dangling symlink {}",
        outcome(
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(p("dangling"))
        )
    ));
    t.push(format!(
        "creat through a dangling symlink: target exists {}",
        p("nowhere").exists()
    ));

    // Truncate a file that is open for reading (path) and for writing (handle).
    std::fs::write(p("tr"), "0123456789").unwrap();
    let mut r = File::open(p("tr")).unwrap();
    let cpath = c(&p("tr"));
    // SAFETY: valid C string.
    t.push(format!(
        "truncate-open: truncate {}",
        outcome(cvt(unsafe { libc::truncate(cpath.as_ptr(), 3) }))
    ));
    t.push(format!(
        "truncate-open: reader sees {:?}",
        read_handle(&mut r)
    ));
    let w = OpenOptions::new().write(true).open(p("tr")).unwrap();
    w.set_len(5).unwrap();
    t.push(format!("truncate-open: extended {:?}", read_handle(&mut r)));
    t.push(format!(
        "truncate-open: ftruncate on a read-only fd {}",
        outcome(r.set_len(1))
    ));
    drop((r, w));

    // utimensat with UTIME_OMIT and UTIME_NOW.
    std::fs::write(p("tm"), "t").unwrap();
    let tp = c(&p("tm"));
    let set = |a: libc::timespec, m: libc::timespec| {
        let times = [a, m];
        // SAFETY: valid C string and times.
        cvt(unsafe { libc::utimensat(libc::AT_FDCWD, tp.as_ptr(), times.as_ptr(), 0) })
    };
    let ts = |sec, nsec| libc::timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    };
    set(ts(1_000_000, 1), ts(2_000_000, 2)).unwrap();
    set(ts(3_000_000, 3), ts(0, libc::UTIME_OMIT)).unwrap();
    let m = std::fs::metadata(p("tm")).unwrap();
    t.push(format!(
        "utimens omit: atime {}.{} mtime {}.{}",
        m.atime(),
        m.atime_nsec(),
        m.mtime(),
        m.mtime_nsec()
    ));
    set(ts(0, libc::UTIME_OMIT), ts(0, libc::UTIME_NOW)).unwrap();
    let m = std::fs::metadata(p("tm")).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    t.push(format!(
        "utimens now: atime {}.{} mtime recent {}",
        m.atime(),
        m.atime_nsec(),
        (now - m.mtime()).abs() < 10
    ));

    // A size beyond the largest file the backing file system allows (16 TiB - 4 KiB on ext4
    // with 4 KiB blocks): EFBIG, by path and by handle, and nothing changes.
    std::fs::write(p("big"), "0123").unwrap();
    let bp = c(&p("big"));
    // SAFETY: valid C string and times.
    cvt(unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            bp.as_ptr(),
            [ts(1_000_000, 1), ts(2_000_000, 2)].as_ptr(),
            0,
        )
    })
    .unwrap();
    let w = OpenOptions::new().write(true).open(p("big")).unwrap();
    for size in [1u64 << 60, i64::MAX as u64] {
        t.push(format!(
            "too big {size}: truncate {}",
            // SAFETY: valid C string.
            outcome(cvt(unsafe { libc::truncate(bp.as_ptr(), size as i64) }))
        ));
        t.push(format!(
            "too big {size}: ftruncate {}",
            outcome(w.set_len(size))
        ));
    }
    drop(w);
    let m = std::fs::metadata(p("big")).unwrap();
    t.push(format!(
        "too big: size {} mtime {}.{} content {:?}",
        m.len(),
        m.mtime(),
        m.mtime_nsec(),
        std::fs::read_to_string(p("big")).unwrap()
    ));

    // Directory errnos.
    std::fs::create_dir(p("d1")).unwrap();
    std::fs::create_dir(p("d2")).unwrap();
    std::fs::write(p("d2/x"), "x").unwrap();
    t.push(format!(
        "rename dir over non-empty dir {}",
        outcome(std::fs::rename(p("d1"), p("d2")))
    ));
    t.push(format!(
        "rename dir over file {}",
        outcome(std::fs::rename(p("d1"), p("ap")))
    ));
    t.push(format!(
        "rename file over dir {}",
        outcome(std::fs::rename(p("ap"), p("d1")))
    ));
    t.push(format!(
        "rename dir into itself {}",
        outcome(std::fs::rename(p("d2"), p("d2/sub")))
    ));
    t.push(format!(
        "rename dir over empty dir {}",
        outcome(std::fs::rename(p("d1"), p("d3")).and_then(|_| {
            std::fs::create_dir(p("d4"))?;
            std::fs::rename(p("d3"), p("d4"))
        }))
    ));
    t.push(format!(
        "open dir for writing {}",
        outcome(OpenOptions::new().write(true).open(p("d2")))
    ));
    t.push(format!(
        "unlink a dir {}",
        outcome(std::fs::remove_file(p("d2")))
    ));
    t.push(format!(
        "O_DIRECTORY on a file {}",
        outcome(
            OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECTORY)
                .open(p("ap"))
        )
    ));
    t.push(format!(
        "name too long {}",
        outcome(File::create(p(&"n".repeat(256))))
    ));
    symlink("loop2", p("loop1")).unwrap();
    symlink("loop1", p("loop2")).unwrap();
    t.push(format!("symlink loop {}", outcome(File::open(p("loop1")))));
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    t.push(format!("readdir {names:?}"));
    t
}

#[test]
fn tricky_posix_semantics_match_the_backing_directory() {
    let (_backing, n) = node(&[]);
    let native = tempfile::tempdir().unwrap();
    let want = tricky_semantics(native.path());
    let got = tricky_semantics(&n.mnt);
    for (w, g) in want.iter().zip(&got) {
        assert_eq!(g, w, "mount vs backing directory");
    }
    assert_eq!(got.len(), want.len());
}

/// Files owned by root with various modes, for another user to be refused.
fn permission_fixture(dir: &Path) {
    let mode = |p: &str, m: u32| {
        std::fs::set_permissions(dir.join(p), std::fs::Permissions::from_mode(m)).unwrap()
    };
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    for (name, m) in [("secret", 0o600), ("readonly", 0o644), ("writable", 0o666)] {
        std::fs::write(dir.join(name), name).unwrap();
        mode(name, m);
    }
    std::fs::create_dir(dir.join("tmp")).unwrap();
    mode("tmp", 0o1777);
    std::fs::write(dir.join("tmp/rootfile"), "root's").unwrap();
    mode("tmp/rootfile", 0o666);
}

/// What nobody sees doing things root's modes forbid (and a few they allow), one line each.
const NOBODY_SCRIPT: &str = r#"
r() { "$@" 2>&1; echo "$* -> $?"; }
r cat secret
r cat readonly
r sh -c 'echo x >> readonly'
r sh -c 'echo x >> writable'
r touch new-in-root
r rm readonly
r rm tmp/rootfile
r mv tmp/rootfile tmp/stolen
r sh -c 'echo x >> tmp/rootfile'
r chmod 600 readonly
r chown nobody readonly
r touch -d 2000-01-01 writable
r touch writable
r truncate -s 0 readonly
r truncate -s 1 writable
r ln secret tmp/hardlink
r mkdir tmp/mine
r chmod 700 tmp/mine
r touch tmp/mine/f
r stat -c '%U %G %a' tmp/mine tmp/mine/f
r ls tmp/mine
"#;

#[test]
fn another_users_permission_errors_match_the_backing_directory() {
    let (backing, n) = node(&["--allow-other"]);
    permission_fixture(backing.path());
    let native = tempfile::tempdir().unwrap();
    permission_fixture(native.path());
    let run = |dir: &Path| {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "cd '{}' && umask 022 && {NOBODY_SCRIPT}",
                dir.display()
            ))
            .uid(NOBODY)
            .gid(NOBODY)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let want = run(native.path());
    let got = run(&n.mnt);
    assert!(
        want.contains("Permission denied") && want.contains("Operation not permitted"),
        "the fixture must refuse things: {want}"
    );
    for (w, g) in want.lines().zip(got.lines()) {
        assert_eq!(g, w, "mount vs backing directory");
    }
    assert_eq!(got.lines().count(), want.lines().count(), "{got}");
}

/// Regular files with set-ID bits, owned by root unless said: nobody writes and truncates some
/// of them, root others.
fn setid_fixture(dir: &Path) {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    for (name, mode, owner, group) in [
        // Written by nobody: S_ISUID always goes, S_ISGID when the file is group-executable
        // (w2777, g2776) or nobody is not in its group (w2767: Linux 6.2 and later); nobody's
        // group keeps it on g2766; the owner's own write clears them too (n6777).
        ("w6777", 0o6777, None, None),
        ("w4777", 0o4777, None, None),
        ("w2777", 0o2777, None, None),
        ("w2767", 0o2767, None, None),
        ("g2766", 0o2766, None, Some(NOBODY)),
        ("g2776", 0o2776, None, Some(NOBODY)),
        ("n6777", 0o6777, Some(NOBODY), Some(NOBODY)),
        // Truncated by nobody: the same rule.
        ("t6777", 0o6777, None, None),
        ("t2767", 0o2767, None, None),
        // Truncated by nobody beyond the largest file: EFBIG, and the bits stay.
        ("b6777", 0o6777, None, None),
        // Written and truncated by root (CAP_FSETID): the bits stay.
        ("r6777", 0o6777, None, None),
        ("s6777", 0o6777, None, None),
    ] {
        let f = dir.join(name);
        std::fs::write(&f, "x").unwrap();
        std::os::unix::fs::chown(&f, owner, group).unwrap();
        // After the chown, which clears set-ID bits.
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
    }
}

/// What nobody does to the set-ID fixture.
const SETID_SCRIPT: &str = r#"
r() { "$@" 2>&1; echo "$* -> $?"; }
for f in w6777 w4777 w2777 w2767 g2766 g2776 n6777; do r sh -c "echo y >> $f"; done
r truncate -s 1 t6777
r truncate -s 1 t2767
r truncate -s 1152921504606846976 b6777
"#;

/// The set-ID fixture in `dir`, nobody's script, root's write and truncate, then every file's
/// mode and size.
fn setid_transcript(dir: &Path) -> String {
    setid_fixture(dir);
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("cd '{}' && {SETID_SCRIPT}", dir.display()))
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    let mut t = String::from_utf8_lossy(&out.stdout).into_owned();
    OpenOptions::new()
        .append(true)
        .open(dir.join("r6777"))
        .unwrap()
        .write_all(b"root")
        .unwrap();
    OpenOptions::new()
        .write(true)
        .open(dir.join("s6777"))
        .unwrap()
        .set_len(0)
        .unwrap();
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    for name in names {
        let m = std::fs::metadata(dir.join(&name)).unwrap();
        t.push_str(&format!("{name} {:o} {}\n", m.mode() & 0o7777, m.len()));
    }
    t
}

/// A write or truncate by another user than root clears set-ID bits as on the backing file
/// system, whichever way the mount writes (direct writes through the daemon, the page cache,
/// kernel passthrough), and a truncate beyond the backing file system's largest file changes
/// nothing, set-ID bits included.
#[test]
fn set_id_bits_and_size_limits_match_the_backing_directory_in_every_mode() {
    let native = tempfile::tempdir().unwrap();
    let want = setid_transcript(native.path());
    assert!(
        [
            "w6777 777 ",
            "w2767 767 ",
            "g2766 2766 ",
            "b6777 6777 ",
            "r6777 6777 "
        ]
        .iter()
        .all(|line| want.contains(line))
            && want.contains("File too large"),
        "the fixture must clear some bits and keep others: {want}"
    );
    for extra in [
        &["--allow-other"][..],
        &["--allow-other", "--no-read-passthrough"][..],
        &["--allow-other", "--passthrough"][..],
    ] {
        let (_backing, n) = node(extra);
        let got = setid_transcript(&n.mnt);
        for (w, g) in want.lines().zip(got.lines()) {
            assert_eq!(g, w, "{extra:?}: mount vs backing directory");
        }
        assert_eq!(
            got.lines().count(),
            want.lines().count(),
            "{extra:?}: {got}"
        );
    }
}

/// A shared writable memory map stores its bytes in place, also through an `O_APPEND` handle
/// (pwrite on an `O_APPEND` fd would append them), and read-only maps and reads see them, in
/// every I/O mode.
#[test]
fn memory_maps_write_in_place_in_every_mode() {
    use std::os::fd::AsRawFd;
    const LEN: usize = 8192;
    for extra in [
        &[][..],
        &["--no-read-passthrough"][..],
        &["--passthrough"][..],
    ] {
        let (backing, n) = node(extra);
        std::fs::write(n.path("m"), vec![b'a'; LEN]).unwrap();
        let f = OpenOptions::new()
            .read(true)
            .append(true)
            .open(n.path("m"))
            .unwrap();
        // SAFETY: a fresh shared map of LEN bytes of an open file, unmapped below; the writes
        // stay inside it.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            );
            assert_ne!(
                p,
                libc::MAP_FAILED,
                "{extra:?}: {}",
                std::io::Error::last_os_error()
            );
            std::ptr::copy_nonoverlapping(b"MAPPED".as_ptr(), (p as *mut u8).add(4096), 6);
            assert_eq!(libc::msync(p, LEN, libc::MS_SYNC), 0, "{extra:?}");
            assert_eq!(libc::munmap(p, LEN), 0);
        }
        drop(f);
        let mut want = vec![b'a'; LEN];
        want[4096..4102].copy_from_slice(b"MAPPED");
        assert!(
            std::fs::read(backing.path().join("m")).unwrap() == want,
            "{extra:?}: the backing file does not hold the mapped store in place"
        );
        assert!(std::fs::read(n.path("m")).unwrap() == want, "{extra:?}");
        let r = File::open(n.path("m")).unwrap();
        // SAFETY: a read-only map of LEN bytes, read inside its bounds, then unmapped.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                LEN,
                libc::PROT_READ,
                libc::MAP_SHARED,
                r.as_raw_fd(),
                0,
            );
            assert_ne!(p, libc::MAP_FAILED, "{extra:?}");
            let seen = std::slice::from_raw_parts(p as *const u8, LEN).to_vec();
            assert_eq!(libc::munmap(p, LEN), 0);
            assert!(seen == want, "{extra:?}: a read-only map sees other bytes");
        }
    }
}
