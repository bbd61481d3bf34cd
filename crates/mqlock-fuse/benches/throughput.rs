//! Throughput of a mount against its backing directory, in one run, on the real broker:
//! sequential write and read, a small-file create+write+close loop, and the latency of an
//! uncontended write-open, with and without kernel passthrough. Prints ratios (medians of 3).
//!
//! `cargo bench -p mqlock-fuse --bench throughput` (as root, broker on MQLOCK_AMQP_URL).
//! MQLOCK_BENCH_MB sets the sequential size (default 1024), MQLOCK_BENCH_DIR where the
//! backing directory is created (default the temp dir).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqlock::{ClientConfig, LockClient};
use mqlock_fuse::{MountOptions, mount};

const CHUNK: usize = 1 << 20;
const SMALL_FILES: usize = 500;
const OPENS: usize = 300;

struct Results {
    write_mbs: f64,
    read_mbs: f64,
    small_per_s: f64,
    open_p50: Duration,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn measure(dir: &Path, mb: usize) -> Results {
    let buf = vec![0x5au8; CHUNK];
    let big = dir.join("big");
    let mut writes = Vec::new();
    let mut reads = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let mut f = File::create(&big).unwrap();
        for _ in 0..mb {
            f.write_all(&buf).unwrap();
        }
        drop(f);
        writes.push(mb as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        let mut f = File::open(&big).unwrap();
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
        reads.push(mb as f64 / t.elapsed().as_secs_f64());
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
    let mut opens = Vec::with_capacity(OPENS);
    for _ in 0..OPENS {
        let t = Instant::now();
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        opens.push(t.elapsed().as_secs_f64());
        drop(f);
        // Let the background release finish, so that each open is uncontended.
        std::thread::sleep(Duration::from_millis(3));
    }
    Results {
        write_mbs: median(writes),
        read_mbs: median(reads),
        small_per_s: median(smalls),
        open_p50: Duration::from_secs_f64(median(opens)),
    }
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
    let native = measure(backing.path(), mb);
    println!(
        "sequential size {mb} MiB, {SMALL_FILES} small files of 4 KiB, {OPENS} write-opens; medians of 3 runs"
    );
    println!("| mode | seq write | seq read | small files | write-open p50 |");
    println!("|---|---|---|---|---|");
    println!(
        "| backing dir | {:.0} MiB/s | {:.0} MiB/s | {:.0}/s | {:.1} µs |",
        native.write_mbs,
        native.read_mbs,
        native.small_per_s,
        native.open_p50.as_secs_f64() * 1e6
    );
    for passthrough in [false, true] {
        let mnt = tempfile::tempdir_in(&base).unwrap();
        let mut opts = MountOptions::default();
        opts.passthrough = passthrough;
        let _g = rt.enter();
        let mut m =
            mount(backing.path(), mnt.path(), Arc::new(client.clone()), opts).expect("mount");
        let r = measure(mnt.path(), mb);
        m.unmount().unwrap();
        drop(m);
        println!(
            "| {} | {:.2}× ({:.0} MiB/s) | {:.2}× ({:.0} MiB/s) | {:.2}× ({:.0}/s) | {:.1} µs (+{:.1} µs) |",
            if passthrough {
                "mount --passthrough"
            } else {
                "mount"
            },
            r.write_mbs / native.write_mbs,
            r.write_mbs,
            r.read_mbs / native.read_mbs,
            r.read_mbs,
            r.small_per_s / native.small_per_s,
            r.small_per_s,
            r.open_p50.as_secs_f64() * 1e6,
            (r.open_p50.as_secs_f64() - native.open_p50.as_secs_f64()) * 1e6
        );
    }
}
