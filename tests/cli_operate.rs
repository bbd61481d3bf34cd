//! Operating locks from the command line (issue 14): who holds a lock (`mqlock status`, also
//! after a hand-off and after a holder was killed), breaking a lock (`mqlock break`), and the
//! holder named when a wait gives up. Real broker, real `mqlock exec` processes.

mod support;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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

/// `mqlock exec NAME` whose command writes its fencing token to `token_file`, then runs until
/// SIGTERM, which it traps: it writes "TERM" to `marker` and exits 0.
fn trapping_holder(name: &str, token_file: &Path, marker: &Path) -> Child {
    Command::new(support::mqlock_bin())
        .args([
            "exec",
            name,
            "--",
            "sh",
            "-c",
            r#"trap 'echo TERM > "$1"; exit 0' TERM
echo $MQLOCK_FENCING_TOKEN > "$0.tmp" && mv "$0.tmp" "$0"
while :; do sleep 0.1; done"#,
        ])
        .arg(token_file)
        .arg(marker)
        .env("MQLOCK_AMQP_URL", support::amqp_url())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mqlock exec")
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// Checks that a `holder` object of `status --json` has `since` (RFC 3339) and `since_unix_ms`
/// saying the same instant, between `from` and `to`.
fn assert_since_within(holder: &serde_json::Value, from: SystemTime, to: SystemTime) {
    let ms = holder["since_unix_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("no since_unix_ms in {holder}"));
    let since = humantime::parse_rfc3339(holder["since"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("since is not RFC 3339 ({e}): {holder}"));
    assert_eq!(
        unix_ms(since),
        ms,
        "since and since_unix_ms differ: {holder}"
    );
    assert!(
        unix_ms(from) <= ms && ms <= unix_ms(to),
        "granted at {ms}, not within [{}, {}]: {holder}",
        unix_ms(from),
        unix_ms(to)
    );
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
    let before_a = SystemTime::now();
    let mut a = holder(&name, &fa);
    let ta = wait_for_token(&fa);
    let after_a = SystemTime::now();
    let mut b = holder(&name, &fb);
    wait_for_consumers(&name, 2);
    let s = status_json(&name);
    assert_eq!(s["held"], true);
    assert_eq!(s["waiters"], 1);
    assert_eq!(s["holder"]["pid"], a.id());
    assert_eq!(s["holder"]["token"], ta);
    assert_eq!(s["holder"]["host"], mqlock_host());
    // The connection name (mqlock's default names the process) and the grant's time.
    assert_eq!(s["holder"]["client"], format!("mqlock pid {}", a.id()));
    assert_since_within(&s["holder"], before_a, after_a);
    // A plain lock records no leader value.
    assert!(s["holder"]["value"].is_null(), "{s}");
    // The text form says the same.
    let text = String::from_utf8_lossy(&mqlock(&["status", &name]).stdout).into_owned();
    assert!(
        text.contains(&format!("pid {}", a.id())) && text.contains(&format!("token {ta}")),
        "{text}"
    );
    // A is killed (kill -9): the broker hands the lock to B at once; status follows.
    let killed = SystemTime::now();
    kill(&a, libc::SIGKILL);
    a.wait().unwrap();
    let tb = wait_for_token(&fb);
    assert!(tb > ta);
    let s = status_json(&name);
    assert_eq!(s["holder"]["pid"], b.id());
    assert_eq!(s["holder"]["token"], tb);
    assert_eq!(s["holder"]["client"], format!("mqlock pid {}", b.id()));
    assert_since_within(&s["holder"], killed, SystemTime::now());
    // A hand-off by release: B's command is told to stop (SIGTERM to mqlock passes it on).
    let mut c = holder(&name, &fc);
    wait_for_consumers(&name, 2);
    let released = SystemTime::now();
    kill(&b, libc::SIGTERM);
    b.wait().unwrap();
    let tc = wait_for_token(&fc);
    assert!(tc > tb);
    let s = status_json(&name);
    assert_eq!(s["holder"]["pid"], c.id());
    assert_eq!(s["holder"]["token"], tc);
    assert_eq!(s["holder"]["client"], format!("mqlock pid {}", c.id()));
    assert_since_within(&s["holder"], released, SystemTime::now());
    kill(&c, libc::SIGTERM);
    c.wait().unwrap();
    // Free now; the last holder is still on record.
    let s = status_json(&name);
    assert_eq!(s["held"], false);
    assert_eq!(s["holder"]["pid"], c.id());
}

#[test]
fn status_of_an_election_lock_shows_the_leader_with_its_value() {
    let dir = tempfile::tempdir().unwrap();
    let election = support::unique("elect-status");
    let tf = dir.path().join("leader");
    let before = SystemTime::now();
    let mut leader = Command::new(support::mqlock_bin())
        .args([
            "elect",
            &election,
            "--value",
            "node-1:8080",
            "--",
            "sh",
            "-c",
            "echo $MQLOCK_FENCING_TOKEN > \"$0.tmp\" && mv \"$0.tmp\" \"$0\" && exec sleep 60",
        ])
        .arg(&tf)
        .env("MQLOCK_AMQP_URL", support::amqp_url())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let token = wait_for_token(&tf);
    let after = SystemTime::now();
    // Leadership is the lock elect:NAME; its status names the leader and its value.
    let lock = mqlock::election_lock_name(&election);
    assert_eq!(lock, format!("elect:{election}"));
    let s = status_json(&lock);
    assert_eq!(s["name"], lock.as_str(), "{s}");
    assert_eq!(s["held"], true, "{s}");
    let h = &s["holder"];
    assert_eq!(h["value"], "node-1:8080", "{s}");
    assert_eq!(h["token"], token, "{s}");
    assert_eq!(h["pid"], leader.id(), "{s}");
    assert_eq!(h["host"], mqlock_host(), "{s}");
    assert_eq!(h["client"], format!("mqlock pid {}", leader.id()), "{s}");
    assert_since_within(h, before, after);
    let text = String::from_utf8_lossy(&mqlock(&["status", &lock]).stdout).into_owned();
    assert!(text.contains("value \"node-1:8080\""), "{text}");
    kill(&leader, libc::SIGTERM);
    leader.wait().unwrap();
    // Resigned: free, the last leader (and its value) on record.
    let s = status_json(&lock);
    assert_eq!(s["held"], false, "{s}");
    assert_eq!(s["holder"]["value"], "node-1:8080", "{s}");
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
    let (fa, fb, fc, marker) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
        dir.path().join("a-got-term"),
    );
    // A holds; its command traps SIGTERM. B, then C, queue behind it.
    let a = trapping_holder(&name, &fa, &marker);
    let ta = wait_for_token(&fa);
    let mut b = holder(&name, &fb);
    wait_for_consumers(&name, 2);
    let mut c = holder(&name, &fc);
    wait_for_consumers(&name, 3);
    assert_eq!(status_json(&name)["waiters"], 2);

    let before = SystemTime::now();
    let started = Instant::now();
    let breaker = Command::new(support::mqlock_bin())
        .args(["break", &name])
        .env("MQLOCK_AMQP_URL", support::amqp_url())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let breaker_pid = breaker.id();
    let o = breaker.wait_with_output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let said = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(said.contains(&format!("pid {}", a.id())), "{said}");

    // The holder's command got SIGTERM (its trap left the marker) and exited at once; mqlock
    // exits 123, long before the 10 s --grace after which it would have sent SIGKILL.
    let out = a.wait_with_output().unwrap();
    let stopped_after = started.elapsed();
    let after = SystemTime::now();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(123), "{err}");
    assert_eq!(
        std::fs::read_to_string(&marker)
            .unwrap_or_else(|e| panic!("no SIGTERM marker ({e}); mqlock said: {err}"))
            .trim(),
        "TERM"
    );
    assert!(
        stopped_after < Duration::from_secs(5),
        "the holder stopped {stopped_after:?} after the break (grace 10 s): {err}"
    );
    // The loss message says who broke the lock and when: "broken by USER@HOST pid N at TIME".
    assert!(err.contains("broken by"), "{err}");
    let by = format!("@{} pid {breaker_pid} at ", mqlock_host());
    let (_, when) = err
        .split_once(&by)
        .unwrap_or_else(|| panic!("no {by:?} in: {err}"));
    let when = when
        .split_whitespace()
        .next()
        .unwrap()
        .trim_end_matches([';', ',', ':']);
    let at = humantime::parse_rfc3339(when)
        .unwrap_or_else(|e| panic!("{when:?} is not an RFC 3339 time ({e}): {err}"));
    // The time is given to the second.
    let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_secs();
    assert!(
        secs(before) <= secs(at) && secs(at) <= secs(after),
        "broken at {when}, not between the break's start and the holder's exit: {err}"
    );

    // The first waiter, B, keeps its place: it is granted, with a larger token; C still waits.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !fb.exists() && !fc.exists() {
        assert!(Instant::now() < deadline, "nobody was granted the lock");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !fc.exists(),
        "the second waiter was granted before the first"
    );
    let tb = wait_for_token(&fb);
    assert!(tb > ta, "{tb} <= {ta}");
    let s = status_json(&name);
    assert_eq!(s["holder"]["pid"], b.id(), "{s}");
    assert_eq!(s["holder"]["token"], tb, "{s}");
    assert_eq!(s["waiters"], 1, "{s}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(!fc.exists(), "C must wait while B holds");
    assert!(c.try_wait().unwrap().is_none(), "C must still wait");
    // And C comes next.
    kill(&b, libc::SIGTERM);
    b.wait().unwrap();
    let tc = wait_for_token(&fc);
    assert!(tc > tb, "{tc} <= {tb}");
    kill(&c, libc::SIGTERM);
    c.wait().unwrap();
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

/// `mqlock ARGS` with `-v` or not, and with no log filter in the environment unless given.
fn mqlock_logging(args: &[&str], env: &[(&str, &str)]) -> (Output, String) {
    let mut cmd = Command::new(support::mqlock_bin());
    cmd.args(args)
        .env("MQLOCK_AMQP_URL", support::amqp_url())
        .env_remove("MQLOCK_LOG")
        .env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let o = cmd.output().expect("run mqlock");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    (o, err)
}

#[test]
fn verbose_shows_the_library_logs_which_stay_quiet_by_default() {
    let unused = support::unique("never-used-v");
    // The broker's 404 for a lock never used: quiet by default, the AMQP library's ERROR line
    // and mqlock's debug lines with -v; the answer is the same.
    let (quiet, err) = mqlock_logging(&["status", &unused], &[]);
    assert!(err.is_empty(), "{err}");
    let (o, err) = mqlock_logging(&["status", "-v", &unused], &[]);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert_eq!(o.stdout, quiet.stdout);
    assert!(err.contains("NOT_FOUND") && err.contains("lapin"), "{err}");
    assert!(err.contains("DEBUG") && err.contains("mqlock"), "{err}");
    assert!(
        !err.contains('\u{1b}'),
        "no colours outside a terminal: {err:?}"
    );
    // MQLOCK_LOG (or RUST_LOG), when set, decides instead of -v.
    let (_, err) = mqlock_logging(&["status", "-v", &unused], &[("MQLOCK_LOG", "off")]);
    assert!(err.is_empty(), "{err}");
    // A refused login: the library's view of it with -v, and mqlock's own line last.
    let (o, err) = mqlock_logging(
        &[
            "status",
            "--verbose",
            "--url",
            "amqp://guest:wrong-password@127.0.0.1:5672/%2f",
            "x",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(122), "{err}");
    assert!(
        err.contains("ACCESS_REFUSED") && err.lines().count() > 1,
        "{err}"
    );
    // mqlock's own one line (the library's io thread may log after it: no order is promised).
    assert_eq!(
        err.lines().filter(|l| l.starts_with("mqlock: ")).count(),
        1,
        "{err}"
    );
    assert!(!err.contains("wrong-password"), "{err}");
    // break and list take -v too.
    let (o, err) = mqlock_logging(&["break", "-v", &unused], &[]);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(err.contains("NOT_FOUND"), "{err}");
    let (o, err) = mqlock_logging(&["list", "-v", &unused], &[]);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(err.contains("INFO") && err.contains("connected"), "{err}");
    // exec -v: its own lines and the library's (the grant's debug line).
    let (o, err) = mqlock_logging(&["exec", "-v", &unused, "--", "true"], &[]);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(err.contains("mqlock: acquired"), "{err}");
    assert!(err.contains("DEBUG") && err.contains("granted"), "{err}");
    let (o, err) = mqlock_logging(&["exec", &unused, "--", "true"], &[]);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(err.is_empty(), "{err}");
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
    let test_start = Instant::now();
    let test_started_at = SystemTime::now();
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
    check_ages(&table, test_start.elapsed());

    // The holder of the contended lock is killed (kill -9): its waiter takes over.
    kill(&b, libc::SIGKILL);
    b.wait().unwrap();
    let tc = wait_for_token(&dir.path().join("c"));
    assert!(tc > tb);
    // A hands the held lock over to D by releasing it.
    let mut d = holder(&held, &dir.path().join("d"));
    wait_for_consumers(&held, 2);
    kill(&a, libc::SIGTERM);
    a.wait().unwrap();
    let td = wait_for_token(&dir.path().join("d"));
    assert!(td > ta);

    let o = mqlock(&["list", &format!("{group}/"), "--json"]);
    assert_eq!(o.status.code(), Some(0));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["held"], true);
    assert_eq!(rows[0]["waiters"], 0);
    assert_eq!(rows[0]["holder"]["pid"], d.id());
    assert_eq!(rows[0]["holder"]["token"], td);
    assert_eq!(rows[1]["held"], true);
    assert_eq!(rows[1]["waiters"], 0);
    assert_eq!(rows[1]["holder"]["pid"], c.id());
    assert_eq!(rows[1]["holder"]["token"], tc);
    assert_eq!(rows[2]["held"], false);
    // Every lock was granted during this test (the free one to the first `exec true`).
    for row in &rows {
        assert_since_within(&row["holder"], test_started_at, SystemTime::now());
    }
    let table =
        String::from_utf8_lossy(&mqlock(&["list", &format!("{group}/")]).stdout).into_owned();
    assert!(
        table.contains(&format!("pid {} on {}, token {td}", d.id(), mqlock_host())),
        "{table}"
    );
    assert!(
        table.contains(&format!("pid {} on {}, token {tc}", c.id(), mqlock_host())),
        "{table}"
    );
    check_ages(&table, test_start.elapsed());

    // A management API that is not there: a clear error, exit 122.
    let o = mqlock(&["list", "--management-url", "http://127.0.0.1:1"]);
    assert_eq!(o.status.code(), Some(122));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("management API"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for p in [&c, &d] {
        kill(p, libc::SIGTERM);
    }
    for p in [&mut c, &mut d] {
        p.wait().unwrap();
    }
}

/// Checks the AGE column of `mqlock list`'s table: every lock has one (each was granted at least
/// once), and none is older than `at_most`, the time the test has run.
fn check_ages(table: &str, at_most: Duration) {
    for row in table.lines().skip(1) {
        // LOCK STATE WAITING AGE HOLDER…; lock names have no spaces here.
        let age = row.split_whitespace().nth(3).unwrap();
        let parsed =
            parse_age(age).unwrap_or_else(|| panic!("age {age:?} is not a duration: {row}"));
        assert!(
            parsed <= at_most + Duration::from_secs(1),
            "age {age} of {row:?} is above the test's {at_most:?}"
        );
    }
}

/// `mqlock list`'s ages: `12s`, `3m4s`, `2h5m`.
fn parse_age(s: &str) -> Option<Duration> {
    let mut total = 0u64;
    let mut n = String::new();
    for ch in s.chars() {
        if ch.is_ascii_digit() {
            n.push(ch);
            continue;
        }
        let unit = match ch {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return None,
        };
        total += n.parse::<u64>().ok()? * unit;
        n.clear();
    }
    (n.is_empty() && !s.is_empty()).then(|| Duration::from_secs(total))
}
