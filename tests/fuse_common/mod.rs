//! Shared by the FUSE test binaries (included with `#[path]`): a `mqlock mount` daemon that is
//! stopped and unmounted on every exit path.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support;

/// One node: an `mqlock mount` process serving `backing` on its own mountpoint.
pub struct Node {
    pub child: Option<Child>,
    pub mnt: PathBuf,
    _mnt_dir: tempfile::TempDir,
}

pub fn is_mounted(path: &Path) -> bool {
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_owned());
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|mp| Path::new(mp) == canonical)
}

impl Node {
    /// Starts a daemon and waits until its mount is up. `extra` goes to `mqlock mount`.
    pub fn start(backing: &Path, lock_prefix: &str, extra: &[&str]) -> Node {
        Self::start_with(backing, lock_prefix, extra, Stdio::inherit())
    }

    /// Like [`Node::start`], with the daemon's log (stderr) written to `log`.
    pub fn start_logging(backing: &Path, lock_prefix: &str, extra: &[&str], log: &Path) -> Node {
        let file = std::fs::File::create(log).unwrap();
        Self::start_with(backing, lock_prefix, extra, Stdio::from(file))
    }

    fn start_with(backing: &Path, lock_prefix: &str, extra: &[&str], stderr: Stdio) -> Node {
        support::services_up();
        let mnt_dir = tempfile::tempdir().unwrap();
        let mnt = mnt_dir.path().to_owned();
        let child = Command::new(support::mqlock_bin())
            .arg("mount")
            .arg(backing)
            .arg(&mnt)
            .args([
                "--url",
                &support::amqp_url(),
                "--lock-prefix",
                lock_prefix,
                "--heartbeat",
                "2s",
            ])
            .args(extra)
            .env("MQLOCK_LOG", "warn,fuser=error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("cannot start mqlock mount");
        let mut node = Node {
            child: Some(child),
            mnt,
            _mnt_dir: mnt_dir,
        };
        let start = Instant::now();
        while !is_mounted(&node.mnt) {
            if let Some(status) = node.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("mqlock mount exited before mounting: {status}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "mount did not come up"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        node
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// Sends `sig` and waits for the exit status.
    pub fn stop(&mut self, sig: i32) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("already stopped");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, sig) };
        let start = Instant::now();
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            if start.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                panic!("mqlock mount did not exit within 10 s of signal {sig}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let start = Instant::now();
            while child.try_wait().ok().flatten().is_none()
                && start.elapsed() < Duration::from_secs(3)
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("fusermount3")
            .arg("-uz")
            .arg(&self.mnt)
            .stderr(Stdio::null())
            .status();
    }
}

pub fn errno_of<T: std::fmt::Debug>(r: std::io::Result<T>) -> i32 {
    r.expect_err("expected an error")
        .raw_os_error()
        .expect("an OS error")
}
