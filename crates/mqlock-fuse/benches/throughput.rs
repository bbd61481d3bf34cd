//! Throughput of a mount against its backing directory, in one run, on the real broker:
//! sequential write and read, a small-file create+write+close loop, and the latency of an
//! uncontended write-open, with and without kernel passthrough. Prints ratios (medians of 3).
//!
//! Two reads are measured: "seq read" re-reads the file this node just wrote (the kernel may
//! keep its page cache across opens: nothing changed the file since), "read after a foreign
//! change" first changes the backing file's times through the backing directory, as another
//! node's write would, so the mount must drop its cache and read through the daemon.
//!
//! A last table splits the write-open latency: the same open on a mount whose locks come from
//! the in-process `MemoryLocker` (the FUSE path and lock table without the broker), a
//! read-only open (the FUSE path without any lock), and the core's uncontended `lock()` with
//! no mount at all (the broker's share).
//!
//! `cargo bench -p mqlock-fuse --bench throughput` (as root, broker on MQLOCK_AMQP_URL).
//! MQLOCK_BENCH_MB sets the sequential size (default 1024), MQLOCK_BENCH_DIR where the
//! backing directory is created (default the temp dir).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqlock::{ClientConfig, LockClient, Locker, MemoryLocker};
use mqlock_fuse::{MountConfig, mount};

const CHUNK: usize = 1 << 20;
const SMALL_FILES: usize = 500;
const OPENS: usize = 300;

struct Results {
    write_mbs: f64,
    read_mbs: f64,
    foreign_read_mbs: f64,
    small_per_s: f64,
    open: Latency,
}

#[derive(Clone, Copy)]
struct Latency {
    p50: Duration,
    p90: Duration,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn read_all(p: &Path, mb: usize) -> f64 {
    let t = Instant::now();
    let mut f = File::open(p).unwrap();
    let mut rb = vec![0u8; CHUNK];
    let mut total = 0;
    loop {
        let n = f.read(&mut rb).unwrap();
        if n == 0 {
            break;
        }
        total += n;
    }
    assert_eq!(total, mb * CHUNK);
    mb as f64 / t.elapsed().as_secs_f64()
}

/// What another node's write does to the backing file's version: new times (and ctime).
fn touch(p: &Path) {
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: valid C string; a null times pointer means "now".
    assert_eq!(
        unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), std::ptr::null(), 0) },
        0
    );
}

/// Latency of `OPENS` opens of an existing file, each closed before the next.
fn open_latency(p: &Path, write: bool) -> Latency {
    let mut opens = Vec::with_capacity(OPENS);
    for _ in 0..OPENS {
        let t = Instant::now();
        let f = OpenOptions::new()
            .read(!write)
            .write(write)
            .open(p)
            .unwrap();
        opens.push(t.elapsed());
        drop(f);
        // Let the background release finish, so that each open is uncontended.
        std::thread::sleep(Duration::from_millis(3));
    }
    opens.sort();
    Latency {
        p50: opens[OPENS / 2],
        p90: opens[OPENS * 9 / 10],
    }
}

/// `dir` is where the program works (mount or backing dir), `backing` the backing dir.
fn measure(dir: &Path, backing: &Path, mb: usize) -> Results {
    let buf = vec![0x5au8; CHUNK];
    let big = dir.join("big");
    let mut writes = Vec::new();
    let mut reads = Vec::new();
    let mut foreign = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let mut f = File::create(&big).unwrap();
        for _ in 0..mb {
            f.write_all(&buf).unwrap();
        }
        drop(f);
        writes.push(mb as f64 / t.elapsed().as_secs_f64());
        reads.push(read_all(&big, mb));
        touch(&backing.join("big"));
        foreign.push(read_all(&big, mb));
    }
    std::fs::remove_file(&big).unwrap();
    let mut smalls = Vec::new();
    let small = vec![7u8; 4096];
    for round in 0..3 {
        let d = dir.join(format!("small{round}"));
        std::fs::create_dir(&d).unwrap();
        let t = Instant::now();
        for i in 0..SMALL_FILES {
            let mut f = File::create(d.join(i.to_string())).unwrap();
            f.write_all(&small).unwrap();
        }
        smalls.push(SMALL_FILES as f64 / t.elapsed().as_secs_f64());
        std::fs::remove_dir_all(&d).unwrap();
    }
    let p = dir.join("open-me");
    std::fs::write(&p, b"x").unwrap();
    Results {
        write_mbs: median(writes),
        read_mbs: median(reads),
        foreign_read_mbs: median(foreign),
        small_per_s: median(smalls),
        open: open_latency(&p, true),
    }
}

/// Latency of `OPENS` uncontended acquisitions of one lock through the core alone, each
/// released (and given the same pause) before the next: the share of a write-open that is the
/// broker's, measured in the same run.
fn core_lock_latency(rt: &tokio::runtime::Runtime, client: &LockClient) -> Latency {
    let name = format!("bench-core-{}", std::process::id());
    let mut waits = Vec::with_capacity(OPENS);
    for _ in 0..OPENS {
        let t = Instant::now();
        let g = rt.block_on(client.lock(&name)).unwrap();
        waits.push(t.elapsed());
        rt.block_on(g.release()).unwrap();
        std::thread::sleep(Duration::from_millis(3));
    }
    waits.sort();
    Latency {
        p50: waits[OPENS / 2],
        p90: waits[OPENS * 9 / 10],
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    let mb: usize = std::env::var("MQLOCK_BENCH_MB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024);
    let base = std::env::var_os("MQLOCK_BENCH_DIR")
        .map(Into::into)
        .unwrap_or_else(std::env::temp_dir);
    let url = std::env::var("MQLOCK_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt
        .block_on(LockClient::connect(&url, ClientConfig::default()))
        .expect("broker");
    let backing = tempfile::tempdir_in(&base).unwrap();
    let native = measure(backing.path(), backing.path(), mb);
    let native_read_open = open_latency(&backing.path().join("open-me"), false);
    println!(
        "sequential size {mb} MiB, {SMALL_FILES} small files of 4 KiB, {OPENS} write-opens; medians of 3 runs"
    );
    println!(
        "| mode | seq write | seq read | seq read after a foreign change | small files | write-open p50 |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| backing dir | {:.0} MiB/s | {:.0} MiB/s | {:.0} MiB/s | {:.0}/s | {:.1} µs |",
        native.write_mbs,
        native.read_mbs,
        native.foreign_read_mbs,
        native.small_per_s,
        us(native.open.p50)
    );
    let mut split = Vec::new();
    for passthrough in [false, true] {
        let mnt = tempfile::tempdir_in(&base).unwrap();
        let config = MountConfig {
            passthrough,
            ..MountConfig::default()
        };
        let _g = rt.enter();
        let mut m =
            mount(backing.path(), mnt.path(), Arc::new(client.clone()), config).expect("mount");
        let r = measure(mnt.path(), backing.path(), mb);
        let read_open = open_latency(&mnt.path().join("open-me"), false);
        m.unmount().unwrap();
        drop(m);
        let name = if passthrough {
            "mount --passthrough"
        } else {
            "mount"
        };
        println!(
            "| {name} | {:.2}× ({:.0} MiB/s) | {:.2}× ({:.0} MiB/s) | {:.2}× ({:.0} MiB/s) | {:.3}× ({:.0}/s) | {:.1} µs (+{:.1} µs) |",
            r.write_mbs / native.write_mbs,
            r.write_mbs,
            r.read_mbs / native.read_mbs,
            r.read_mbs,
            r.foreign_read_mbs / native.foreign_read_mbs,
            r.foreign_read_mbs,
            r.small_per_s / native.small_per_s,
            r.small_per_s,
            us(r.open.p50),
            us(r.open.p50) - us(native.open.p50)
        );
        split.push((format!("{name}, broker locks"), r.open, read_open));
    }
    // The same opens with an in-process locker: what the mount itself costs.
    {
        let mnt = tempfile::tempdir_in(&base).unwrap();
        let _g = rt.enter();
        let memory: Arc<dyn Locker> = Arc::new(MemoryLocker::new());
        let mut m =
            mount(backing.path(), mnt.path(), memory, MountConfig::default()).expect("mount");
        let p = mnt.path().join("open-me");
        let write_open = open_latency(&p, true);
        let read_open = open_latency(&p, false);
        m.unmount().unwrap();
        drop(m);
        split.push(("mount, MemoryLocker".into(), write_open, read_open));
    }
    let core = core_lock_latency(&rt, &client);
    println!();
    println!("write-open latency split ({OPENS} opens of an existing file, p50 / p90)");
    println!("| mount | write-open | read-only open (no lock) |");
    println!("|---|---|---|");
    println!(
        "| backing dir | {:.1} / {:.1} µs | {:.1} / {:.1} µs |",
        us(native.open.p50),
        us(native.open.p90),
        us(native_read_open.p50),
        us(native_read_open.p90)
    );
    for (name, w, r) in split {
        println!(
            "| {name} | {:.1} / {:.1} µs | {:.1} / {:.1} µs |",
            us(w.p50),
            us(w.p90),
            us(r.p50),
            us(r.p90)
        );
    }
    println!(
        "| core `lock()` alone, no mount | {:.1} / {:.1} µs | |",
        us(core.p50),
        us(core.p90)
    );
}
