//! `mqlock exec` and `mqlock status` as users call them: exit codes and messages.

mod support;

use std::process::{Command, Output};

fn mqlock(args: &[&str]) -> Output {
    Command::new(support::mqlock_bin())
        .args(args)
        .env("MQLOCK_AMQP_URL", support::amqp_url())
        .output()
        .expect("run mqlock")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn exit_codes_follow_the_command_and_the_documented_table() {
    let name = support::unique("cli");
    // CMD's own status passes through; the environment carries the lock.
    let o = mqlock(&[
        "exec",
        &name,
        "--",
        "sh",
        "-c",
        "test -n \"$MQLOCK_FENCING_TOKEN\" && test \"$MQLOCK_LOCK_NAME\" = \"$0\" && exit 7",
        &name,
    ]);
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    // CMD missing: 127, with the command named.
    let o = mqlock(&["exec", &name, "--", "/nonexistent/cmd"]);
    assert_eq!(o.status.code(), Some(127));
    assert!(stderr(&o).contains("/nonexistent/cmd"));
    // Broker unreachable: 122, naming the address and not the password.
    let o = Command::new(support::mqlock_bin())
        .args([
            "exec",
            "--url",
            "amqp://guest:s3cret@127.0.0.1:1/%2f",
            &name,
            "--",
            "true",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(122));
    assert!(
        stderr(&o).contains("127.0.0.1:1") && !stderr(&o).contains("s3cret"),
        "{}",
        stderr(&o)
    );
    // Invalid name: 122 with the reason.
    let o = mqlock(&["exec", "", "--", "true"]);
    assert_eq!(o.status.code(), Some(122));
    assert!(stderr(&o).contains("invalid lock name"), "{}", stderr(&o));
}

#[test]
fn held_lock_gives_124_with_nonblock_and_timeout_and_status_reports_it() {
    let name = support::unique("cli-held");
    let mut holder = Command::new(support::mqlock_bin())
        .args(["exec", &name, "--", "sleep", "30"])
        .env("MQLOCK_AMQP_URL", support::amqp_url())
        .spawn()
        .unwrap();
    let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while mqlock(&["status", &name]).status.code() != Some(1) {
        assert!(std::time::Instant::now() < end, "holder never got the lock");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let o = mqlock(&["exec", "-n", &name, "--", "true"]);
    assert_eq!(o.status.code(), Some(124), "{}", stderr(&o));
    let o = mqlock(&["exec", "--timeout", "300ms", &name, "--", "true"]);
    assert_eq!(o.status.code(), Some(124), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("timed out") && stderr(&o).contains(&name),
        "{}",
        stderr(&o)
    );
    let o = mqlock(&["status", "--json", &name]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("\"held\":true"));
    holder.kill().unwrap();
    holder.wait().unwrap();
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while mqlock(&["status", &name]).status.code() != Some(0) {
        assert!(
            std::time::Instant::now() < end,
            "lock not free after its holder was killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Runs `mqlock exec ARGS -- sh -c SCRIPT` in the background.
fn spawn_exec(args: &[&str], script: &str) -> std::process::Child {
    Command::new(support::mqlock_bin())
        .arg("exec")
        .args(args)
        .args(["--", "sh", "-c", script])
        .env("MQLOCK_AMQP_URL", support::amqp_url())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn mqlock exec")
}

fn wait_for_file(path: &std::path::Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !path.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn permits_shared_and_exclusive_follow_flock_and_a_kind_mismatch_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();

    // --permits 2: two commands run at once, each with its own permit; a third waits (-n: 124).
    let sem = support::unique("cli-sem");
    let hold = |tag: &str| {
        format!("echo $MQLOCK_PERMIT > {d}/{tag}; while [ ! -e {d}/go ]; do sleep 0.02; done")
    };
    let mut a = spawn_exec(&["--permits", "2", &sem], &hold("a"));
    let mut b = spawn_exec(&["--permits", "2", &sem], &hold("b"));
    wait_for_file(&dir.path().join("a"));
    wait_for_file(&dir.path().join("b"));
    let permits: std::collections::BTreeSet<String> = ["a", "b"]
        .iter()
        .map(|t| {
            std::fs::read_to_string(dir.path().join(t))
                .unwrap()
                .trim()
                .to_owned()
        })
        .collect();
    assert_eq!(permits.len(), 2, "one permit each: {permits:?}");
    let o = mqlock(&["exec", "-n", "--permits", "2", &sem, "--", "true"]);
    assert_eq!(o.status.code(), Some(124), "{}", stderr(&o));
    // A client that counts the permits differently, or takes the name as a plain lock, is
    // refused: 122, naming what the lock is.
    let o = mqlock(&["exec", "--permits", "3", &sem, "--", "true"]);
    assert_eq!(o.status.code(), Some(122), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("a semaphore of 2 permits"),
        "{}",
        stderr(&o)
    );
    let o = mqlock(&["exec", &sem, "--", "true"]);
    assert_eq!(o.status.code(), Some(122), "{}", stderr(&o));
    // Bad input never reaches the broker: clap's 2.
    let o = mqlock(&["exec", "--permits", "0", &sem, "--", "true"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    std::fs::write(dir.path().join("go"), "").unwrap();
    assert!(a.wait().unwrap().success());
    assert!(b.wait().unwrap().success());

    // --shared twice at once; --exclusive waits for both, and a plain exec of the name is refused.
    let rw = support::unique("cli-rw");
    std::fs::remove_file(dir.path().join("go")).unwrap();
    let mut r1 = spawn_exec(&["--shared", &rw], &hold("r1"));
    let mut r2 = spawn_exec(&["-s", &rw], &hold("r2"));
    wait_for_file(&dir.path().join("r1"));
    wait_for_file(&dir.path().join("r2"));
    let o = mqlock(&["exec", "--exclusive", "--timeout", "1s", &rw, "--", "true"]);
    assert_eq!(o.status.code(), Some(124), "{}", stderr(&o));
    let o = mqlock(&["exec", &rw, "--", "true"]);
    assert_eq!(o.status.code(), Some(122), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("a read-write lock of 8 readers"),
        "{}",
        stderr(&o)
    );
    let mut w = spawn_exec(&["-x", &rw], &format!("touch {d}/w"));
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        !dir.path().join("w").exists(),
        "the writer ran beside readers"
    );
    std::fs::write(dir.path().join("go"), "").unwrap();
    assert!(r1.wait().unwrap().success());
    assert!(r2.wait().unwrap().success());
    assert!(w.wait().unwrap().success());
    assert!(dir.path().join("w").exists());
}
