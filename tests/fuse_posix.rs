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
