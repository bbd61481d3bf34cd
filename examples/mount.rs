//! Mount a lock-protected view of a directory from code, write a file through it while a
//! second mount of the same directory (a second "node") waits for the lock, then read it back.
//!
//! Run as root with RabbitMQ up: `cargo run --example mount`.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqlock::{ClientConfig, LockClient};
use mqlock_fuse::{MountConfig, mount};

fn main() -> anyhow::Result<()> {
    let url = std::env::var("MQLOCK_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let rt = tokio::runtime::Runtime::new()?;
    let _enter = rt.enter();
    let shared = tempfile::tempdir()?;
    let (mnt_a, mnt_b) = (tempfile::tempdir()?, tempfile::tempdir()?);

    // Two clients = two nodes: each has its own broker connection, as two machines would.
    let node_a = rt.block_on(LockClient::connect(&url, ClientConfig::default()))?;
    let node_b = rt.block_on(LockClient::connect(&url, ClientConfig::default()))?;
    let config = MountConfig {
        lock_prefix: format!("example-{}", std::process::id()),
        ..MountConfig::default()
    };
    let a = mount(
        shared.path(),
        mnt_a.path(),
        Arc::new(node_a),
        config.clone(),
    )?;
    let b = mount(shared.path(), mnt_b.path(), Arc::new(node_b), config)?;

    let mut w = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(a.mountpoint().join("report.txt"))?;
    w.write_all(b"written on A")?;
    let b_file = b.mountpoint().join("report.txt");
    let waiter = std::thread::spawn(move || -> std::io::Result<(Duration, String)> {
        let t = Instant::now();
        // Blocks until A closes: the write-open takes the file's lock.
        let mut f = OpenOptions::new().read(true).write(true).open(b_file)?;
        let mut s = String::new();
        f.read_to_string(&mut s)?;
        Ok((t.elapsed(), s))
    });
    std::thread::sleep(Duration::from_millis(300));
    w.write_all(b", then closed")?;
    drop(w);
    let (waited, content) = waiter.join().expect("thread")?;
    println!("B waited {waited:?} for the lock, then read {content:?}");
    drop((a, b)); // unmounts both
    Ok(())
}
