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
