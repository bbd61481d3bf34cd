//! Throughput of a mount against its backing directory, in one run, on the real broker:
//! sequential write and read, a small-file create+write+close loop, a rewrite loop over
//! existing files, and the latency of an uncontended write-open, with and without lock caching
//! and kernel passthrough. Prints ratios (medians of 3).
//!
//! Two reads are measured: "seq read" re-reads the file this node just wrote (the kernel may
//! keep its page cache across opens: nothing changed the file since), "read after a foreign
//! change" first changes the backing file's times through the backing directory, as another
//! node's write would, so the mount must drop its cache and read through the daemon.
//!
//! Lock caching (issue 12, the default) keeps a file's lock parked after the last close; the
//! bench measures it against `--no-lock-caching` in the same run: the small-file loop (a new
//! lock per file, which caching cannot save), the rewrite loop (100 existing files, open for
//! writing, 4 KiB, close: every lock this node's own), the write-open of a file this node wrote
//! last, and the write-open of a file whose lock a second mount (another node, its own broker
//! connection) keeps parked, next to one hand-off of the core (release → next waiter granted).
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
use mqlock_fuse::{MountConfig, Mounted, mount};

const CHUNK: usize = 1 << 20;
const SMALL_FILES: usize = 500;
const REWRITE_FILES: usize = 100;
/// Passes over the rewrite files per round.
const REWRITE_PASSES: usize = 10;
const OPENS: usize = 300;
/// Write-opens of a file the other mount keeps parked (each one a hand-off there and back).
const CONTENDED: usize = 100;

#[derive(Clone, Copy)]
struct Seq {
    write_mbs: f64,
    read_mbs: f64,
    foreign_read_mbs: f64,
}

#[derive(Clone, Copy)]
struct Loops {
    small_per_s: f64,
    rewrite_per_s: f64,
    open: Latency,
}

#[derive(Clone, Copy)]
struct Latency {
    p50: Duration,
    p90: Duration,
}

impl Latency {
    fn of(mut v: Vec<Duration>) -> Latency {
        v.sort();
        Latency {
            p50: v[v.len() / 2],
            p90: v[v.len() * 9 / 10],
        }
    }
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
        // Let the background release (or park) finish, so that each open is uncontended.
        std::thread::sleep(Duration::from_millis(3));
    }
    Latency::of(opens)
}

/// Sequential write, re-read, and read after a foreign change of one big file (medians of 3).
fn measure_seq(dir: &Path, backing: &Path, mb: usize) -> Seq {
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
    Seq {
        write_mbs: median(writes),
        read_mbs: median(reads),
        foreign_read_mbs: median(foreign),
    }
}

/// The small-file loop (create + 4 KiB + close, new names), the rewrite loop (existing files,
/// open for writing + 4 KiB + close) and the write-open latency of a file this node wrote last;
/// medians of 3 rounds. `tag` keeps the names of different mounts of one backing dir apart.
fn measure_loops(dir: &Path, tag: &str) -> Loops {
    let small = vec![7u8; 4096];
    let mut smalls = Vec::new();
    for round in 0..3 {
        let d = dir.join(format!("small-{tag}-{round}"));
        std::fs::create_dir(&d).unwrap();
        let t = Instant::now();
        for i in 0..SMALL_FILES {
            let mut f = File::create(d.join(i.to_string())).unwrap();
            f.write_all(&small).unwrap();
        }
        smalls.push(SMALL_FILES as f64 / t.elapsed().as_secs_f64());
        std::fs::remove_dir_all(&d).unwrap();
    }
    let d = dir.join(format!("rewrite-{tag}"));
    std::fs::create_dir(&d).unwrap();
    let files: Vec<_> = (0..REWRITE_FILES).map(|i| d.join(i.to_string())).collect();
    for p in &files {
        std::fs::write(p, &small).unwrap();
    }
    let mut rewrites = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..REWRITE_PASSES {
            for p in &files {
                let mut f = OpenOptions::new().write(true).open(p).unwrap();
                f.write_all(&small).unwrap();
            }
        }
        rewrites.push((REWRITE_PASSES * REWRITE_FILES) as f64 / t.elapsed().as_secs_f64());
    }
    std::fs::remove_dir_all(&d).unwrap();
    let p = dir.join(format!("open-me-{tag}"));
    std::fs::write(&p, b"x").unwrap();
    let open = open_latency(&p, true);
    Loops {
        small_per_s: median(smalls),
        rewrite_per_s: median(rewrites),
        open,
    }
}

/// Write-opens on `a` of a file that `b` (another node) wrote last and keeps parked: each is
/// timed, then closed (parked on `a`), and `b` takes the lock back before the next.
fn contended_open_latency(a: &Path, b: &Path) -> Latency {
    std::fs::write(b.join("contended"), b"b").unwrap();
    let mut opens = Vec::with_capacity(CONTENDED);
    for _ in 0..CONTENDED {
        let mut f = OpenOptions::new()
            .write(true)
            .open(b.join("contended"))
            .unwrap();
        f.write_all(b"b").unwrap();
        drop(f);
        std::thread::sleep(Duration::from_millis(3));
        let t = Instant::now();
        let f = OpenOptions::new()
            .write(true)
            .open(a.join("contended"))
            .unwrap();
        opens.push(t.elapsed());
        drop(f);
        std::thread::sleep(Duration::from_millis(3));
    }
    Latency::of(opens)
}

/// The core's hand-off: `x` holds a lock, `y` waits for it; from `x`'s release to `y`'s grant.
fn core_handoff(rt: &tokio::runtime::Runtime, x: &LockClient, y: &LockClient) -> Latency {
    let name = format!("bench-handoff-{}", std::process::id());
    let mut handoffs = Vec::with_capacity(CONTENDED);
    for _ in 0..CONTENDED {
        let held = rt.block_on(x.lock(&name)).unwrap();
        let (y, n) = (y.clone(), name.clone());
        let waiter = rt.spawn(async move {
            let g = y.lock(&n).await.unwrap();
            let granted = Instant::now();
            g.release().await.unwrap();
            granted
        });
        // Let the waiter register behind the holder.
        std::thread::sleep(Duration::from_millis(20));
        let released = Instant::now();
        rt.block_on(held.release()).unwrap();
        let granted = rt.block_on(waiter).unwrap();
        handoffs.push(granted.saturating_duration_since(released));
        std::thread::sleep(Duration::from_millis(3));
    }
    Latency::of(handoffs)
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
    Latency::of(waits)
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// A mount of `backing` through `locker`, on a fresh mountpoint under `base`.
fn mount_on(
    rt: &tokio::runtime::Runtime,
    base: &Path,
    backing: &Path,
    locker: Arc<dyn Locker>,
    config: MountConfig,
) -> (tempfile::TempDir, Mounted) {
    let mnt = tempfile::tempdir_in(base).unwrap();
    let _g = rt.enter();
    let m = mount(backing, mnt.path(), locker, config).expect("mount");
    (mnt, m)
}

fn unmount(mut m: Mounted) {
    m.unmount().unwrap();
    drop(m);
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
    let connect = || {
        rt.block_on(LockClient::connect(&url, ClientConfig::default()))
            .expect("broker")
    };
    // One client per mount: a parked lock of one mount must not be found by the next.
    let backing = tempfile::tempdir_in(&base).unwrap();
    let native_seq = measure_seq(backing.path(), backing.path(), mb);
    let native = measure_loops(backing.path(), "native");
    let native_read_open = open_latency(&backing.path().join("open-me-native"), false);
    println!(
        "sequential size {mb} MiB, {SMALL_FILES} small files of 4 KiB, rewrites of {REWRITE_FILES} files × {REWRITE_PASSES}, {OPENS} write-opens; medians of 3 runs"
    );
    println!(
        "| mode | seq write | seq read | seq read after a foreign change | small files | rewrites | write-open p50 |"
    );
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| backing dir | {:.0} MiB/s | {:.0} MiB/s | {:.0} MiB/s | {:.0}/s | {:.0}/s | {:.1} µs |",
        native_seq.write_mbs,
        native_seq.read_mbs,
        native_seq.foreign_read_mbs,
        native.small_per_s,
        native.rewrite_per_s,
        us(native.open.p50)
    );
    let modes: [(&str, bool, bool); 3] = [
        ("mount (default: lock caching)", false, true),
        ("mount --no-lock-caching", false, false),
        ("mount --passthrough", true, true),
    ];
    let mut split = Vec::new();
    let mut loops = Vec::new();
    for (name, passthrough, caching) in modes {
        let client = connect();
        let config = MountConfig {
            passthrough,
            lock_caching: if caching {
                MountConfig::default().lock_caching
            } else {
                None
            },
            ..MountConfig::default()
        };
        let (mnt, m) = mount_on(&rt, &base, backing.path(), Arc::new(client.clone()), config);
        // The sequential figures do not depend on lock caching: measured once per I/O mode.
        let seq = caching.then(|| measure_seq(mnt.path(), backing.path(), mb));
        let tag = name.replace(|c: char| !c.is_ascii_alphanumeric(), "");
        let r = measure_loops(mnt.path(), &tag);
        let read_open = open_latency(&mnt.path().join(format!("open-me-{tag}")), false);
        unmount(m);
        rt.block_on(client.close());
        let seq = match seq {
            Some(s) => format!(
                "{:.2}× ({:.0} MiB/s) | {:.2}× ({:.0} MiB/s) | {:.2}× ({:.0} MiB/s)",
                s.write_mbs / native_seq.write_mbs,
                s.write_mbs,
                s.read_mbs / native_seq.read_mbs,
                s.read_mbs,
                s.foreign_read_mbs / native_seq.foreign_read_mbs,
                s.foreign_read_mbs,
            ),
            None => "as above | as above | as above".into(),
        };
        println!(
            "| {name} | {seq} | {:.3}× ({:.0}/s) | {:.3}× ({:.0}/s) | {:.1} µs |",
            r.small_per_s / native.small_per_s,
            r.small_per_s,
            r.rewrite_per_s / native.rewrite_per_s,
            r.rewrite_per_s,
            us(r.open.p50),
        );
        split.push((format!("{name}, broker locks"), r.open, read_open));
        loops.push(r);
    }
    let (cached, plain) = (loops[0], loops[1]);

    // Two nodes: a file the other mount wrote last, its lock parked there.
    let contended = {
        let (ca, cb) = (connect(), connect());
        let config = MountConfig {
            lock_prefix: format!("bench-{}", std::process::id()),
            ..MountConfig::default()
        };
        let (ma, a) = mount_on(
            &rt,
            &base,
            backing.path(),
            Arc::new(ca.clone()),
            config.clone(),
        );
        let (mb_, b) = mount_on(&rt, &base, backing.path(), Arc::new(cb.clone()), config);
        let l = contended_open_latency(ma.path(), mb_.path());
        unmount(a);
        unmount(b);
        rt.block_on(ca.close());
        rt.block_on(cb.close());
        l
    };
    let handoff = {
        let (x, y) = (connect(), connect());
        let l = core_handoff(&rt, &x, &y);
        rt.block_on(x.close());
        rt.block_on(y.close());
        l
    };

    // The same opens with an in-process locker: what the mount itself costs.
    {
        let memory: Arc<dyn Locker> = Arc::new(MemoryLocker::new());
        let (mnt, m) = mount_on(&rt, &base, backing.path(), memory, MountConfig::default());
        let p = mnt.path().join("open-me-memory");
        std::fs::write(&p, b"x").unwrap();
        let write_open = open_latency(&p, true);
        let read_open = open_latency(&p, false);
        unmount(m);
        split.push(("mount, MemoryLocker".into(), write_open, read_open));
    }
    let client = connect();
    let core = core_lock_latency(&rt, &client);
    rt.block_on(client.close());
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
    println!(
        "| mount (lock caching), the other node keeps the lock parked ({CONTENDED} opens) | {:.1} / {:.1} µs | |",
        us(contended.p50),
        us(contended.p90)
    );
    println!(
        "| core hand-off, release → next waiter granted ({CONTENDED}) | {:.1} / {:.1} µs | |",
        us(handoff.p50),
        us(handoff.p90)
    );
    let verdict = |ok: bool| if ok { "met" } else { "missed" };
    let small = cached.small_per_s / native.small_per_s;
    let rewrite = cached.rewrite_per_s / native.rewrite_per_s;
    let own = us(cached.open.p50);
    let bound = us(plain.open.p50) + us(handoff.p50);
    println!();
    println!("issue 12 targets (lock caching on, this run)");
    println!("| measurement | result | target | |");
    println!("|---|---|---|---|");
    println!(
        "| small-file loop vs backing dir | {small:.3}× (--no-lock-caching {:.3}×) | ≥ 0.5× | {} |",
        plain.small_per_s / native.small_per_s,
        verdict(small >= 0.5)
    );
    println!(
        "| rewrite loop over {REWRITE_FILES} files vs backing dir | {rewrite:.3}× (--no-lock-caching {:.3}×) | ≥ 0.7× | {} |",
        plain.rewrite_per_s / native.rewrite_per_s,
        verdict(rewrite >= 0.7)
    );
    println!(
        "| write-open p50, a file this node wrote last | {own:.1} µs (--no-lock-caching {:.1} µs) | ≤ 50 µs | {} |",
        us(plain.open.p50),
        verdict(own <= 50.0)
    );
    println!(
        "| write-open p50, parked on the other node | {:.1} µs | ≤ {bound:.1} µs (write-open --no-lock-caching {:.1} + hand-off {:.1}) | {} |",
        us(contended.p50),
        us(plain.open.p50),
        us(handoff.p50),
        verdict(us(contended.p50) <= bound)
    );
}
