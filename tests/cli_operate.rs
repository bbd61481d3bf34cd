//! Operating locks from the command line (issue 14): who holds a lock (`mqlock status`, also
//! after a hand-off and after a holder was killed), breaking a lock (`mqlock break`), and the
//! holder named when a wait gives up. Real broker, real `mqlock exec` processes.

mod support;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn mqlock(args: &[&str]) -> Output {
    mqlock_as(&support::amqp_url(), args)
}

fn mqlock_as(url: &str, args: &[&str]) -> Output {
    Command::new(support::mqlock_bin())
        .args(args)
        .env("MQLOCK_AMQP_URL", url)
        .output()
        .expect("run mqlock")
}

/// `mqlock exec NAME` whose command writes its fencing token to `token_file`, then sleeps.
fn holder(name: &str, token_file: &Path) -> Child {
    Command::new(support::mqlock_bin())
        .args([
            "exec",
            name,
            "--",
            "sh",
            "-c",
            "echo $MQLOCK_FENCING_TOKEN > \"$0.tmp\" && mv \"$0.tmp\" \"$0\" && exec sleep 60",
        ])
        .arg(token_file)
        .env("MQLOCK_AMQP_URL", support::amqp_url())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mqlock exec")
}

fn wait_for_token(file: &Path) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(s) = std::fs::read_to_string(file)
            && let Ok(t) = s.trim().parse()
        {
            return t;
        }
        assert!(Instant::now() < deadline, "no token in {}", file.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn status_json(name: &str) -> serde_json::Value {
    let o = mqlock(&["status", "--json", name]);
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stdout)))
}

fn wait_for_consumers(name: &str, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while status_json(name)["consumers"].as_u64() != Some(n) {
        assert!(Instant::now() < deadline, "{name}: never {n} consumers");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn kill(child: &Child, signal: i32) {
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, signal) };
}

#[test]
fn status_names_the_holder_across_a_hand_off_and_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let name = support::unique("who-holds");
    let (fa, fb, fc) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    let mut a = holder(&name, &fa);
    let ta = wait_for_token(&fa);
    let mut b = holder(&name, &fb);
    wait_for_consumers(&name, 2);
    let s = status_json(&name);
    assert_eq!(s["held"], true);
    assert_eq!(s["waiters"], 1);
    assert_eq!(s["holder"]["pid"], a.id());
    assert_eq!(s["holder"]["token"], ta);
    assert_eq!(s["holder"]["host"], mqlock_host());
    // The text form says the same.
    let text = String::from_utf8_lossy(&mqlock(&["status", &name]).stdout).into_owned();
    assert!(
        text.contains(&format!("pid {}", a.id())) && text.contains(&format!("token {ta}")),
        "{text}"
    );
    // A is killed (kill -9): the broker hands the lock to B at once; status follows.
    kill(&a, libc::SIGKILL);
    a.wait().unwrap();
    let tb = wait_for_token(&fb);
    assert!(tb > ta);
    let s = status_json(&name);
    assert_eq!(s["holder"]["pid"], b.id());
    assert_eq!(s["holder"]["token"], tb);
    // A hand-off by release: B's command is told to stop (SIGTERM to mqlock passes it on).
    let mut c = holder(&name, &fc);
    wait_for_consumers(&name, 2);
    kill(&b, libc::SIGTERM);
    b.wait().unwrap();
    let tc = wait_for_token(&fc);
    assert!(tc > tb);
    let s = status_json(&name);
    assert_eq!(s["holder"]["pid"], c.id());
    assert_eq!(s["holder"]["token"], tc);
    kill(&c, libc::SIGTERM);
    c.wait().unwrap();
    // Free now; the last holder is still on record.
    let s = status_json(&name);
    assert_eq!(s["held"], false);
    assert_eq!(s["holder"]["pid"], c.id());
}

fn mqlock_host() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: writable buffer of the given length.
    unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap();
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[test]
fn break_stops_the_holder_and_grants_the_waiter_a_larger_token() {
    let dir = tempfile::tempdir().unwrap();
    let name = support::unique("break");
    let (fa, fb) = (dir.path().join("a"), dir.path().join("b"));
    let a = holder(&name, &fa);
    let ta = wait_for_token(&fa);
    let mut b = holder(&name, &fb);
    wait_for_consumers(&name, 2);
    let o = mqlock(&["break", &name]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let said = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(said.contains(&format!("pid {}", a.id())), "{said}");
    // The holder's command got SIGTERM; mqlock exits 123 and says who broke the lock.
    let out = a.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(123));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.contains("broken by") && err.contains("pid"), "{err}");
    // The waiter keeps its place and gets a larger token.
    let tb = wait_for_token(&fb);
    assert!(tb > ta, "{tb} <= {ta}");
    kill(&b, libc::SIGTERM);
    b.wait().unwrap();
    // Nothing to break: a free lock, and a lock that never existed.
    let o = mqlock(&["break", &name]);
    assert_eq!(o.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("free, nothing to break"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let o = mqlock(&["break", &support::unique("never-used")]);
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stdout).contains("no such lock"));
}

#[test]
fn break_without_write_permission_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let name = support::unique("break-denied");
    let fa = dir.path().join("a");
    let mut a = holder(&name, &fa);
    wait_for_token(&fa);
    // A monitoring user: may declare and read the lock queues, may not publish.
    let user = format!("mqlock-monitor-{}", std::process::id());
    support::main_rabbitmqctl(&["add_user", &user, "monitor-pw"]);
    support::main_rabbitmqctl(&[
        "set_permissions",
        "-p",
        "/",
        &user,
        r"^mqlock\.",
        "",
        r"^mqlock\.",
    ]);
    let url = format!("amqp://{user}:monitor-pw@127.0.0.1:5672/%2f");
    let status = mqlock_as(&url, &["status", &name]);
    let o = mqlock_as(&url, &["break", &name]);
    support::main_rabbitmqctl(&["delete_user", &user]);
    assert_eq!(status.status.code(), Some(1), "status works read-only");
    assert_eq!(o.status.code(), Some(122));
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        err.contains("refused") && err.contains("write permission on amq.default"),
        "{err}"
    );
    // The holder was not disturbed.
    assert!(a.try_wait().unwrap().is_none(), "the holder must still run");
    kill(&a, libc::SIGTERM);
    a.wait().unwrap();
}

#[test]
fn a_wait_that_gives_up_names_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let name = support::unique("timeout-names");
    let fa = dir.path().join("a");
    let mut a = holder(&name, &fa);
    let ta = wait_for_token(&fa);
    let o = mqlock(&["exec", "--timeout", "1s", &name, "--", "true"]);
    assert_eq!(o.status.code(), Some(124));
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        err.contains(&format!("held by pid {}", a.id())) && err.contains(&format!("token {ta}")),
        "{err}"
    );
    let o = mqlock(&["exec", "-n", &name, "--", "true"]);
    assert_eq!(o.status.code(), Some(124));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(&format!("held by pid {}", a.id())),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    kill(&a, libc::SIGTERM);
    a.wait().unwrap();
}

#[test]
fn expected_broker_replies_leave_one_line_and_no_library_logs() {
    // A lock never used: the broker's 404 is the answer, not an error to log.
    let o = mqlock(&["status", &support::unique("never-used")]);
    assert_eq!(o.status.code(), Some(0));
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // A refused login: mqlock's own one line, no ERROR lines from the AMQP library.
    let o = mqlock_as(
        "amqp://guest:wrong-password@127.0.0.1:5672/%2f",
        &["status", "x"],
    );
    assert_eq!(o.status.code(), Some(122));
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("mqlock: ") && !err.contains("ERROR"),
        "{err}"
    );
    assert!(!err.contains("wrong-password"), "{err}");
}

#[test]
fn completions_and_man_page_come_from_the_command_definitions() {
    let o = mqlock(&["completions", "bash"]);
    assert_eq!(o.status.code(), Some(0));
    let script = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        script.contains("_mqlock") && script.contains("break"),
        "{script}"
    );
    let o = mqlock(&["man"]);
    assert_eq!(o.status.code(), Some(0));
    let page = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(page.contains(".TH mqlock 1"), "{page}");
    for sub in [
        "mqlock-exec",
        "mqlock-status",
        "mqlock-break",
        "mqlock-mount",
    ] {
        assert!(page.contains(sub), "no {sub} in the man page");
    }
}

#[test]
fn list_shows_every_lock_with_its_holder_and_waiters() {
    let dir = tempfile::tempdir().unwrap();
    let group = support::unique("list");
    let (held, contended, free) = (
        format!("{group}/a-held"),
        format!("{group}/b-contended"),
        format!("{group}/c-free"),
    );
    let o = mqlock(&["exec", &free, "--", "true"]);
    assert_eq!(o.status.code(), Some(0));
    let mut a = holder(&held, &dir.path().join("a"));
    let ta = wait_for_token(&dir.path().join("a"));
    let mut b = holder(&contended, &dir.path().join("b"));
    let tb = wait_for_token(&dir.path().join("b"));
    let mut c = holder(&contended, &dir.path().join("c"));
    wait_for_consumers(&contended, 2);

    let o = mqlock(&["list", &format!("{group}/"), "--json"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [held.as_str(), contended.as_str(), free.as_str()],
        "sorted by name"
    );
    assert_eq!(rows[0]["held"], true);
    assert_eq!(rows[0]["holder"]["pid"], a.id());
    assert_eq!(rows[0]["holder"]["token"], ta);
    assert_eq!(rows[1]["waiters"], 1);
    assert_eq!(rows[1]["holder"]["pid"], b.id());
    assert_eq!(rows[1]["holder"]["token"], tb);
    assert_eq!(rows[2]["held"], false);
    // The table says the same, one line per lock.
    let o = mqlock(&["list", &format!("{group}/")]);
    let table = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(table.lines().count(), 4, "{table}");
    assert!(table.contains(&format!("pid {} on", a.id())), "{table}");
    // A management API that is not there: a clear error, exit 122.
    let o = mqlock(&["list", "--management-url", "http://127.0.0.1:1"]);
    assert_eq!(o.status.code(), Some(122));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("management API"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for p in [&a, &b, &c] {
        kill(p, libc::SIGTERM);
    }
    for p in [&mut a, &mut b, &mut c] {
        p.wait().unwrap();
    }
}
