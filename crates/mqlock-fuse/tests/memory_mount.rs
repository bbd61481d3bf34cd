//! The locking rules of a real FUSE mount, with the in-process [`MemoryLocker`] standing in
//! for the broker so that a test can hold a lock "on another node" and revoke one at will.
//! The two-node behaviour against RabbitMQ is in the workspace's `tests/fuse_*.rs`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqlock::{Locker, MemoryLocker};
use mqlock_fuse::{MountConfig, Mounted, mount};

/// A mount that is unmounted on every exit path, including a failing assertion.
struct TestMount {
    mounted: Option<Mounted>,
    path: PathBuf,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
    backing: PathBuf,
}

impl Drop for TestMount {
    fn drop(&mut self) {
        drop(self.mounted.take());
        // Belt and braces: a mount left behind would break every later run.
        let _ = std::process::Command::new("fusermount3")
            .arg("-uz")
            .arg(&self.path)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

fn mount_with(
    rt: &tokio::runtime::Runtime,
    locker: &MemoryLocker,
    config: MountConfig,
) -> TestMount {
    let backing = tempfile::tempdir().unwrap();
    let mnt = tempfile::tempdir().unwrap();
    let _g = rt.enter();
    let mounted =
        mount(backing.path(), mnt.path(), Arc::new(locker.clone()), config).expect("mount");
    TestMount {
        mounted: Some(mounted),
        path: mnt.path().to_owned(),
        backing: backing.path().to_owned(),
        _dirs: (backing, mnt),
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "timed out waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `MemoryLocker` keeps no lock after its guard lets go (`Locker::lock_keeping` falls back to a
/// plain acquisition), so lock caching would change nothing here but the wait of an
/// `O_NONBLOCK` open: these tests run without it (the real broker's tests have both).
fn config(timeout_ms: u64) -> MountConfig {
    MountConfig {
        lock_timeout: Duration::from_millis(timeout_ms),
        lock_caching: None,
        ..MountConfig::default()
    }
}

/// The modes whose writes the daemon checks: kernel passthrough for reads (the default) and
/// the page cache for everything.
fn checked_modes(timeout_ms: u64) -> [MountConfig; 2] {
    [true, false].map(|read_passthrough| MountConfig {
        read_passthrough,
        ..config(timeout_ms)
    })
}

fn write_file(p: &Path, data: &[u8]) {
    let mut f = File::create(p).unwrap();
    f.write_all(data).unwrap();
}

#[test]
fn write_open_holds_the_lock_until_the_last_handle_closes() {
    let rt = rt();
    let l = MemoryLocker::new();
    let m = mount_with(&rt, &l, config(2000));
    let p = m.path.join("a.txt");
    let mut f1 = File::create(&p).unwrap();
    assert!(l.is_locked("fs:/a.txt"), "create must take the file's lock");
    // A second handle on this node shares the lock instead of queueing behind it.
    let mut f2 = OpenOptions::new().write(true).open(&p).unwrap();
    f1.write_all(b"one ").unwrap();
    drop(f1);
    std::thread::sleep(Duration::from_millis(50));
    assert!(l.is_locked("fs:/a.txt"), "a handle is still open");
    f2.write_all(b"two").unwrap();
    drop(f2);
    wait_until("the last close releases the lock", || {
        !l.is_locked("fs:/a.txt")
    });
    // f2 wrote at its own offset 0, over f1's bytes, straight into the backing file.
    assert_eq!(std::fs::read(m.backing.join("a.txt")).unwrap(), b"two ");
    // Readers take no lock.
    let _r = File::open(&p).unwrap();
    assert!(!l.is_locked("fs:/a.txt"));
}

#[test]
fn nonblocking_open_fails_at_once_and_blocking_open_times_out() {
    let rt = rt();
    let l = MemoryLocker::new();
    let m = mount_with(&rt, &l, config(300));
    let p = m.path.join("b");
    write_file(&p, b"x");
    wait_until("unlocked", || !l.is_locked("fs:/b"));
    let other = rt.block_on(l.lock("fs:/b")).unwrap();
    let t = Instant::now();
    let e = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&p)
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EWOULDBLOCK));
    assert!(
        t.elapsed() < Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );
    let t = Instant::now();
    let e = OpenOptions::new().write(true).open(&p).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ETIMEDOUT));
    assert!(t.elapsed() >= Duration::from_millis(300));
    // Reading is never blocked.
    assert_eq!(std::fs::read(&p).unwrap(), b"x");
    drop(other);
    OpenOptions::new().write(true).open(&p).unwrap();
}

#[test]
fn a_waiting_open_does_not_stall_other_files() {
    let rt = rt();
    let l = MemoryLocker::new();
    let m = mount_with(&rt, &l, config(3000));
    let p = m.path.join("held");
    write_file(&p, b"x");
    wait_until("unlocked", || !l.is_locked("fs:/held"));
    let other = rt.block_on(l.lock("fs:/held")).unwrap();
    let p2 = p.clone();
    let waiter = std::thread::spawn(move || {
        let t = Instant::now();
        let f = OpenOptions::new().write(true).open(&p2);
        (f.is_ok(), t.elapsed())
    });
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    for i in 0..20 {
        write_file(&m.path.join(format!("free{i}")), b"data");
    }
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "other files stalled: {:?}",
        t.elapsed()
    );
    assert!(!waiter.is_finished(), "the open must still be waiting");
    drop(other);
    let (ok, waited) = waiter.join().unwrap();
    assert!(ok);
    assert!(waited >= Duration::from_millis(200));
}

#[test]
fn lost_lock_makes_writes_and_close_fail_with_eio() {
    for o in checked_modes(2000) {
        let mode = format!("read_passthrough {}", o.read_passthrough);
        let rt = rt();
        let l = MemoryLocker::new();
        let m = mount_with(&rt, &l, o);
        let p = m.path.join("c");
        let mut f = File::create(&p).unwrap();
        f.write_all(b"before").unwrap();
        assert!(l.revoke("fs:/c"));
        let e = f.write_all(b"after").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{mode}");
        let e = f.set_len(0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{mode}");
        // A new open gets a new grant and works.
        let mut g = OpenOptions::new().append(true).open(&p).unwrap();
        g.write_all(b"!").unwrap();
        drop(g);
        drop(f);
        assert_eq!(std::fs::read(&p).unwrap(), b"before!", "{mode}");
    }
}

#[test]
fn truncate_unlink_and_rename_take_the_locks() {
    let rt = rt();
    let l = MemoryLocker::new();
    let m = mount_with(&rt, &l, config(300));
    let a = m.path.join("a");
    let b = m.path.join("b");
    write_file(&a, b"hello");
    wait_until("unlocked", || !l.is_locked("fs:/a"));
    let held = rt.block_on(l.lock("fs:/a")).unwrap();
    let c = std::ffi::CString::new(a.to_str().unwrap()).unwrap();
    // SAFETY: valid path.
    let r = unsafe { libc::truncate(c.as_ptr(), 1) };
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::ETIMEDOUT)
    );
    assert_eq!(std::fs::read(&a).unwrap(), b"hello");
    assert_eq!(
        std::fs::rename(&a, &b).unwrap_err().raw_os_error(),
        Some(libc::ETIMEDOUT)
    );
    assert_eq!(
        std::fs::remove_file(&a).unwrap_err().raw_os_error(),
        Some(libc::ETIMEDOUT)
    );
    drop(held);
    // Holding the target's lock blocks a rename onto it too.
    let held_b = rt.block_on(l.lock("fs:/b")).unwrap();
    assert_eq!(
        std::fs::rename(&a, &b).unwrap_err().raw_os_error(),
        Some(libc::ETIMEDOUT)
    );
    drop(held_b);
    // SAFETY: valid path.
    assert_eq!(unsafe { libc::truncate(c.as_ptr(), 1) }, 0);
    assert_eq!(std::fs::read(&a).unwrap(), b"h");
    std::fs::rename(&a, &b).unwrap();
    std::fs::remove_file(&b).unwrap();
    assert!(!l.is_locked("fs:/a") && !l.is_locked("fs:/b"));
}

/// A rename takes its two locks through the core's multi-lock: one `lock_timeout` for the pair
/// (not one per lock), and when the second cannot be had, the first is given back before the
/// rename fails.
#[test]
fn a_rename_has_one_timeout_for_both_locks_and_gives_the_first_back() {
    let rt = rt();
    let l = MemoryLocker::new();
    let m = mount_with(&rt, &l, config(1000));
    let (a, b) = (m.path.join("a"), m.path.join("b"));
    write_file(&a, b"a");
    wait_until("unlocked", || !l.is_locked("fs:/a"));
    // "Another node" holds both names; it lets "fs:/a" (first in the order) go after 800 ms and
    // keeps "fs:/b".
    let held_a = rt.block_on(l.lock("fs:/a")).unwrap();
    let held_b = rt.block_on(l.lock("fs:/b")).unwrap();
    rt.spawn(async move {
        tokio::time::sleep(Duration::from_millis(800)).await;
        drop(held_a);
    });
    let started = Instant::now();
    assert_eq!(
        std::fs::rename(&a, &b).unwrap_err().raw_os_error(),
        Some(libc::ETIMEDOUT)
    );
    let took = started.elapsed();
    // 1 s for the pair; a timeout per lock would have waited 0.8 s + 1 s. The upper bound
    // leaves 0.6 s for a loaded machine.
    assert!(
        took >= Duration::from_millis(1000) && took < Duration::from_millis(1600),
        "{took:?}"
    );
    assert!(
        !l.is_locked("fs:/a"),
        "the first lock is given back before the rename fails"
    );
    assert!(m.backing.join("a").exists() && !m.backing.join("b").exists());
    drop(held_b);
    std::fs::rename(&a, &b).unwrap();
    assert!(!l.is_locked("fs:/a") && !l.is_locked("fs:/b"));
}

#[test]
fn a_handle_sees_data_written_on_the_backing_side_after_reopen() {
    for o in checked_modes(2000) {
        let rt = rt();
        let l = MemoryLocker::new();
        let m = mount_with(&rt, &l, o);
        let p = m.path.join("d");
        write_file(&p, b"short");
        let mut s = String::new();
        File::open(&p).unwrap().read_to_string(&mut s).unwrap();
        assert_eq!(s, "short");
        // Another node writes through the shared directory.
        std::fs::write(m.backing.join("d"), b"a much longer content").unwrap();
        s.clear();
        File::open(&p).unwrap().read_to_string(&mut s).unwrap();
        assert_eq!(s, "a much longer content");
    }
}

#[test]
fn an_unchanged_file_keeps_its_cache_and_a_same_size_rewrite_is_seen() {
    for o in checked_modes(2000) {
        let mode = format!("read_passthrough {}", o.read_passthrough);
        let rt = rt();
        let l = MemoryLocker::new();
        let m = mount_with(&rt, &l, o);
        let p = m.path.join("e");
        write_file(&p, b"first content");
        for round in 0..5 {
            let want: &[u8] = if round % 2 == 0 {
                b"first content"
            } else {
                b"other content"
            };
            assert_eq!(std::fs::read(&p).unwrap(), want, "{mode}, round {round}");
            assert_eq!(std::fs::read(&p).unwrap(), want, "{mode}, round {round}");
            // Another node rewrites the file in place with as many bytes.
            let next: &[u8] = if round % 2 == 0 {
                b"other content"
            } else {
                b"first content"
            };
            std::fs::write(m.backing.join("e"), next).unwrap();
            assert_eq!(std::fs::read(&p).unwrap(), next, "{mode}, round {round}");
            let mut f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
            let mut got = Vec::new();
            f.read_to_end(&mut got).unwrap();
            assert_eq!(got, next, "{mode}, write-open, round {round}");
            drop(f);
            std::fs::write(m.backing.join("e"), want).unwrap();
            std::fs::write(m.backing.join("e"), next).unwrap();
        }
        // Writes through the mount are read back through it.
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b" + appended").unwrap();
        drop(f);
        assert_eq!(
            std::fs::read(&p).unwrap(),
            std::fs::read(m.backing.join("e")).unwrap()
        );
    }
}

fn fallocate(f: &File, mode: i32, offset: i64, len: i64) -> Result<(), i32> {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on an open fd.
    match unsafe { libc::fallocate(f.as_raw_fd(), mode, offset, len) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error().raw_os_error().unwrap()),
    }
}

/// fallocate is a write: it works through a write handle while its lock is held, fails with
/// EIO once the lock is lost (in every mode, also with full kernel passthrough, where reads and
/// writes bypass the daemon but fallocate does not), and a read-only handle gets the backing
/// directory's EBADF.
#[test]
fn fallocate_is_covered_by_the_handles_lock_in_every_mode() {
    for (passthrough, read_passthrough) in [(false, true), (false, false), (true, false)] {
        let rt = rt();
        let l = MemoryLocker::new();
        let config = MountConfig {
            passthrough,
            read_passthrough,
            ..config(2000)
        };
        let m = mount_with(&rt, &l, config);
        let p = m.path.join("g");
        let backing = m.backing.join("g");
        let f = File::create(&p).unwrap();
        assert_eq!(
            fallocate(&f, 0, 0, 8192),
            Ok(()),
            "passthrough {passthrough}, read passthrough {read_passthrough}"
        );
        assert_eq!(std::fs::metadata(&backing).unwrap().len(), 8192);
        assert_eq!(
            fallocate(&f, libc::FALLOC_FL_KEEP_SIZE, 0, 65536),
            Ok(()),
            "passthrough {passthrough}, read passthrough {read_passthrough}"
        );
        assert_eq!(std::fs::metadata(&backing).unwrap().len(), 8192);
        // Read-only handles: the same errno as on the backing directory.
        let r = File::open(&p).unwrap();
        let native = File::open(&backing).unwrap();
        assert_eq!(fallocate(&native, 0, 0, 16384), Err(libc::EBADF));
        assert_eq!(fallocate(&r, 0, 0, 16384), Err(libc::EBADF));
        drop((r, native));
        // Lost lock: refused, file untouched.
        assert!(l.revoke("fs:/g"));
        assert_eq!(
            fallocate(&f, 0, 0, 16384),
            Err(libc::EIO),
            "passthrough {passthrough}, read passthrough {read_passthrough}"
        );
        assert_eq!(
            fallocate(
                &f,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                0,
                4096
            ),
            Err(libc::EIO)
        );
        assert_eq!(std::fs::metadata(&backing).unwrap().len(), 8192);
        // A new write handle takes a new grant and may allocate again.
        let g = OpenOptions::new().write(true).open(&p).unwrap();
        assert_eq!(fallocate(&g, 0, 0, 16384), Ok(()));
        assert_eq!(std::fs::metadata(&backing).unwrap().len(), 16384);
        drop(g);
        drop(f);
    }
}
