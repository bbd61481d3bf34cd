//! Security: TLS (`amqps://`), credentials kept out of errors and logs, lock names confined to
//! the configured prefix, and the least-privilege broker user of docs/security.md.
//!
//! Needs mqlock's `rustls` feature (the workspace enables it) and the main
//! broker's TLS listener on 127.0.0.1:5671 (`scripts/services.sh up`).

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use mqlock::{ClientConfig, Error, LockClient, TlsConfig};

// ------------------------------------------------------------------ log capture

/// Everything every test of this binary logged, at TRACE level (mqlock, lapin, rustls...).
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("trace"))
            .with_ansi(false)
            .with_writer(move || Capture(sink.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("no other subscriber");
        buf
    })
}

struct Capture(Arc<Mutex<Vec<u8>>>);
impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn setup() {
    logs();
    support::need(&[support::Service::Rabbitmq]);
}

fn captured() -> String {
    String::from_utf8_lossy(&logs().lock().unwrap()).into_owned()
}

/// Asserts that neither the Display nor the Debug form of `e` contains `secret`.
fn assert_hides(e: &Error, secret: &str) {
    let display = e.to_string();
    let debug = format!("{e:?}");
    assert!(!display.contains(secret), "password in Display: {display}");
    assert!(!debug.contains(secret), "password in Debug: {debug}");
}

// ------------------------------------------------------------------ TLS

fn tls_config(ca: Option<PathBuf>) -> ClientConfig {
    ClientConfig {
        tls: TlsConfig {
            ca_cert: ca,
            ..TlsConfig::default()
        },
        ..ClientConfig::default()
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

async fn connect_time(url: &str, config: &ClientConfig) -> Duration {
    let t0 = Instant::now();
    let c = LockClient::connect(url, config.clone()).await.unwrap();
    let took = t0.elapsed();
    c.close().await;
    took
}

#[tokio::test]
async fn amqps_with_the_ca_locks_and_releases() {
    setup();
    let url = support::amqps_url();
    let config = tls_config(Some(support::tls_dir().join("ca.pem")));
    let a = LockClient::connect(&url, config.clone())
        .await
        .expect("amqps connect with the test CA");
    let b = LockClient::connect(&url, config.clone()).await.unwrap();
    assert!(a.broker_addr().contains("127.0.0.1:5671"), "{a:?}");
    let name = support::unique("tls");
    let g = a.lock(&name).await.unwrap();
    assert!(g.is_held());
    let first = g.fencing_token();
    assert!(b.try_lock(&name).await.unwrap().is_none(), "held over TLS");
    assert!(b.status(&name).await.unwrap().is_held());
    let waiter = tokio::spawn({
        let b = b.clone();
        let name = name.clone();
        async move { b.lock(&name).await.map(|g| g.fencing_token()) }
    });
    // The hand-off is to a waiter the broker has registered (instead of a fixed pause).
    let (probe, n) = (&a, &name);
    support::wait_until(
        "the broker to count the waiter over TLS",
        Duration::from_secs(20),
        move || async move { probe.status(n).await.unwrap().waiters() == 1 },
    )
    .await;
    g.release().await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("hand-off over TLS")
        .unwrap()
        .unwrap();
    assert!(second > first);

    // What the TLS handshake costs per connection (printed for docs/security.md).
    let plain = support::amqp_url();
    let mut t_plain = Vec::new();
    let mut t_tls = Vec::new();
    for _ in 0..9 {
        t_plain.push(connect_time(&plain, &ClientConfig::default()).await);
        t_tls.push(connect_time(&url, &config).await);
    }
    let (p, t) = (median(t_plain), median(t_tls));
    eprintln!("connect median over 9: amqp {p:?}, amqps {t:?}");
    // Real time: real TCP and TLS handshakes, which tokio's paused clock cannot measure. The
    // bound only catches a handshake that stalls or retries (seconds each); the figure itself is
    // printed above for docs/security.md, so the bound is generous for a loaded machine.
    assert!(t < Duration::from_secs(5), "TLS connect took {t:?}");
}

#[tokio::test]
async fn amqps_with_a_client_certificate() {
    setup();
    let dir = support::tls_dir();
    let config = ClientConfig {
        tls: TlsConfig {
            ca_cert: Some(dir.join("ca.pem")),
            client_cert: Some(dir.join("client.pem")),
            client_key: Some(dir.join("client.key")),
        },
        ..ClientConfig::default()
    };
    let c = LockClient::connect(&support::amqps_url(), config)
        .await
        .expect("the broker accepts a client certificate signed by its CA");
    let g = c.lock(&support::unique("tls-client")).await.unwrap();
    g.release().await.unwrap();
}

/// A CA and a client certificate nobody trusts, made with openssl in `dir`.
fn foreign_ca(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=wrong CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=intruder",
        "-keyout",
        "client.key",
        "-out",
        "client.csr",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "client.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-out",
        "client.pem",
    ]);
    (
        dir.join("ca.pem"),
        dir.join("client.pem"),
        dir.join("client.key"),
    )
}

#[tokio::test]
async fn amqps_with_a_wrong_ca_is_a_tls_error_naming_the_broker_not_the_password() {
    setup();
    let dir = tempfile::tempdir().unwrap();
    let (wrong_ca, _, _) = foreign_ca(dir.path());
    let url = "amqps://guest:s3cr3t-tls-pw@127.0.0.1:5671/%2f";
    let t0 = Instant::now();
    let err = LockClient::connect(url, tls_config(Some(wrong_ca)))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Tls { .. }), "{err:?}");
    assert!(err.to_string().contains("127.0.0.1:5671"), "{err}");
    assert_hides(&err, "s3cr3t");
    // Real time (a real handshake with the broker). A refused certificate fails the first
    // handshake at once; the generous bound catches a client that retries or waits for a
    // timeout instead of reporting it.
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "a refused certificate took {:?} to report",
        t0.elapsed()
    );
    eprintln!("wrong CA: {err}");

    // No CA at all: the system's trust store does not know the test CA either.
    let err = LockClient::connect(url, tls_config(None))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Tls { .. }), "{err:?}");
    assert_hides(&err, "s3cr3t");

    // TLS spoken to the plain AMQP port.
    let err = LockClient::connect(
        "amqps://guest:s3cr3t-tls-pw@127.0.0.1:5672/%2f",
        tls_config(Some(support::tls_dir().join("ca.pem"))),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, Error::Tls { .. } | Error::Unreachable { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("127.0.0.1:5672"), "{err}");
    assert_hides(&err, "s3cr3t");
}

#[tokio::test]
async fn amqps_with_a_client_certificate_from_a_foreign_ca_is_refused() {
    setup();
    let dir = tempfile::tempdir().unwrap();
    let (_, cert, key) = foreign_ca(dir.path());
    let config = ClientConfig {
        tls: TlsConfig {
            ca_cert: Some(support::tls_dir().join("ca.pem")),
            client_cert: Some(cert),
            client_key: Some(key),
        },
        ..ClientConfig::default()
    };
    let err = LockClient::connect("amqps://guest:s3cr3t-tls-pw@127.0.0.1:5671/%2f", config)
        .await
        .unwrap_err();
    // The broker checks a presented certificate against its CA and ends the handshake.
    assert!(
        matches!(err, Error::Tls { .. } | Error::Unreachable { .. }),
        "{err:?}"
    );
    assert_hides(&err, "s3cr3t");
}

#[tokio::test]
async fn missing_or_bad_certificate_files_are_config_errors() {
    setup();
    let url = support::amqps_url();
    let err = LockClient::connect(&url, tls_config(Some("/nonexistent/ca.pem".into())))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    let err = LockClient::connect(&url, tls_config(Some(junk)))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err:?}");

    let half = ClientConfig {
        tls: TlsConfig {
            client_cert: Some(support::tls_dir().join("client.pem")),
            ..TlsConfig::default()
        },
        ..ClientConfig::default()
    };
    let err = LockClient::connect(&url, half).await.unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
}

// ------------------------------------------------------------------ credentials

#[tokio::test]
async fn connection_errors_never_contain_the_password() {
    setup();
    // Wrong password.
    let err = LockClient::connect(
        "amqp://guest:s3cr3t-pw@127.0.0.1:5672/%2f",
        ClientConfig::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::AuthRefused { .. }), "{err:?}");
    assert!(err.to_string().contains("127.0.0.1:5672"), "{err}");
    assert_hides(&err, "s3cr3t");

    // Nobody listening.
    let err = LockClient::connect(
        "amqp://guest:s3cr3t-pw@127.0.0.1:1/%2f",
        ClientConfig::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Unreachable { .. }), "{err:?}");
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
    assert_hides(&err, "s3cr3t");

    // Several addresses, all failing.
    let err = LockClient::connect(
        "amqp://u:s3cr3t-pw@127.0.0.1:1/%2f, amqp://u:s3cr3t-pw@127.0.0.1:2/%2f",
        ClientConfig::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Unreachable { .. }), "{err:?}");
    assert_hides(&err, "s3cr3t");

    // Unknown vhost.
    let err = LockClient::connect(
        "amqp://guest:s3cr3t-pw@127.0.0.1:5672/no-such-vhost",
        ClientConfig::default(),
    )
    .await
    .unwrap_err();
    assert_hides(&err, "s3cr3t");

    // Malformed URLs.
    for url in [
        "amqp://guest:s3cr3t-pw@127.0.0.1:notaport/%2f",
        "amqp://guest:s3cr3t-pw@/%2f",
        "http://guest:s3cr3t-pw@127.0.0.1/",
        "amqp://guest:s3cr3t-pw@127.0.0.1:5672/%2f?heartbeat=x",
    ] {
        let err = LockClient::connect(url, ClientConfig::default())
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidUrl { .. }), "{url}: {err:?}");
        assert_hides(&err, "s3cr3t");
    }

    // A client's Debug form and its broker address.
    let c = LockClient::connect(&support::amqp_url(), ClientConfig::default())
        .await
        .unwrap();
    assert!(!format!("{c:?}").contains("guest:guest"), "{c:?}");
    assert!(!c.broker_addr().contains('@'), "{}", c.broker_addr());

    // And nothing any test of this binary logged, at TRACE level, lapin's frames included.
    let logs = captured();
    assert!(
        logs.contains("lapin") && logs.contains("mqlock"),
        "the capture must have seen lapin's and mqlock's records"
    );
    assert!(!logs.contains("s3cr3t"), "a password reached the logs");
}

// ------------------------------------------------------------------ lock names

/// Names that try to escape, or confuse, the prefix.
fn hostile_names() -> Vec<String> {
    let mut v: Vec<String> = [
        "..",
        "../x",
        "../../mqlock.lock:other",
        "/",
        "//etc/passwd",
        "a/../../b",
        "*",
        "#",
        "a.*.#",
        "amq.default",
        "amq.gen-x",
        "%2f",
        "%00",
        "\u{202e}evil",
        "\u{feff}",
        " ",
        "🔒",
        "x:lock:y",
        "lock:",
        "fence:",
        "holder:",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // Invalid UTF-8 as it arrives from a lossy conversion (file names, network input).
    v.push(String::from_utf8_lossy(b"bad\xff\xfe\xc3(utf8").into_owned());
    v.push("x".repeat(300));
    v.push("/".repeat(10_000));
    v.push("é".repeat(200));
    v.push(format!("{}..{}", "a".repeat(250), "b".repeat(250)));
    v
}

#[test]
fn every_name_maps_inside_the_prefix_or_is_refused() {
    for prefix in ["mqlock.", "team-a.", "x"] {
        for name in hostile_names() {
            let q = mqlock::name::queue_names(prefix, &name)
                .unwrap_or_else(|e| panic!("{name:?} refused: {e}"));
            assert!(
                q.lock.starts_with(&format!("{prefix}lock:")),
                "{name:?} -> {}",
                q.lock
            );
            assert!(
                q.holder.starts_with(&format!("{prefix}holder:")),
                "{name:?} -> {}",
                q.holder
            );
            assert!(
                q.epoch.starts_with(&format!("{prefix}epoch:")),
                "{name:?} -> {}",
                q.epoch
            );
            for queue in [&q.lock, &q.holder, &q.epoch] {
                assert!(queue.len() <= mqlock::name::MAX_QUEUE_NAME_BYTES);
                assert!(!queue.contains('\0'));
            }
        }
    }
    // Refused: empty, NUL and every other control character (C0, DEL, C1).
    for name in [
        "",
        "\0",
        "a\0b",
        "a\nb",
        "\r",
        "\t",
        "\u{1b}[31m",
        "\u{7f}",
        "\u{85}",
        "\u{9f}",
    ] {
        let err = mqlock::name::queue_names("mqlock.", name).unwrap_err();
        assert!(
            matches!(err, Error::InvalidName { .. }),
            "{name:?}: {err:?}"
        );
    }
    // A refused name is shown truncated, so a huge one cannot flood a log line.
    let huge = format!("{}\0", "y".repeat(100_000));
    let err = mqlock::name::queue_names("mqlock.", &huge).unwrap_err();
    assert!(
        err.to_string().len() < 300,
        "{} bytes",
        err.to_string().len()
    );
    // Distinct long names stay distinct after hashing.
    let a = mqlock::name::queue_names("mqlock.", &"x".repeat(300)).unwrap();
    let b = mqlock::name::queue_names("mqlock.", &format!("{}y", "x".repeat(299))).unwrap();
    assert_ne!(a.lock, b.lock);
    // A prefix may not be a reserved one or carry control characters.
    for prefix in ["amq.", "amq.x.", "a\0", "a\nb"] {
        let config = ClientConfig {
            prefix: prefix.into(),
            ..ClientConfig::default()
        };
        assert!(
            matches!(config.validate(), Err(Error::Config(_))),
            "{prefix:?}"
        );
    }
}

// ------------------------------------------------------------------ least privilege

/// A broker user created for one test and deleted when dropped.
struct TempUser {
    name: String,
    password: String,
}

impl TempUser {
    /// Creates a user with the given configure / write / read permissions on vhost `/`.
    fn new(configure: &str, write: &str, read: &str) -> TempUser {
        Self::new_in("/", configure, write, read)
    }

    /// Creates a user with the given permissions on `vhost`.
    fn new_in(vhost: &str, configure: &str, write: &str, read: &str) -> TempUser {
        use rand::Rng;
        let mut rng = rand::rng();
        let name = format!("mqlock-app-{}", rng.random::<u32>());
        let password: String = (0..24)
            .map(|_| rng.sample(rand::distr::Alphanumeric) as char)
            .collect();
        support::main_rabbitmqctl(&["add_user", &name, &password]);
        support::main_rabbitmqctl(&[
            "set_permissions",
            "-p",
            vhost,
            &name,
            configure,
            write,
            read,
        ]);
        TempUser { name, password }
    }

    fn url(&self) -> String {
        format!("amqp://{}:{}@127.0.0.1:5672/%2f", self.name, self.password)
    }
}

impl Drop for TempUser {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "-n", "rabbit@localhost", "delete_user", &self.name])
            .env("HOME", "/var/lib/rabbitmq")
            .output();
    }
}

/// The permissions docs/security.md recommends for the default prefix `mqlock.`: declare
/// (configure) and consume/get (read) the lock queues, publish (write) to the default exchange.
/// Publishing through the default exchange checks write on `amq.default` only, never on the
/// queue, so the lock queues need no write permission.
const CONFIGURE: &str = r"^mqlock\.";
const WRITE: &str = r"^amq\.default$";
const READ: &str = r"^mqlock\.";

#[tokio::test]
async fn least_privilege_user_can_lock_and_nothing_else() {
    setup();
    let user = TempUser::new(CONFIGURE, WRITE, READ);
    let app = LockClient::connect(&user.url(), ClientConfig::default())
        .await
        .expect("the least-privilege user logs in");
    let other = LockClient::connect(&support::amqp_url(), ClientConfig::default())
        .await
        .unwrap();

    // lock, try_lock, status, release, hand-off, with hostile names too.
    for name in [
        support::unique("lp"),
        format!("../../{}", support::unique("lp")),
        format!("*.#.{}", support::unique("lp")),
    ] {
        let g = app.lock(&name).await.unwrap();
        let first = g.fencing_token();
        assert!(app.status(&name).await.unwrap().is_held());
        assert!(other.try_lock(&name).await.unwrap().is_none());
        g.release().await.unwrap();
        let g = app
            .try_lock(&name)
            .await
            .unwrap()
            .expect("free after release");
        assert!(g.fencing_token() > first);
        let waiter = tokio::spawn({
            let other = other.clone();
            let name = name.clone();
            async move { other.lock(&name).await.map(|g| g.fencing_token()) }
        });
        let (probe, n) = (&app, &name);
        support::wait_until(
            "the broker to count the waiter",
            Duration::from_secs(20),
            move || async move { probe.status(n).await.unwrap().waiters() == 1 },
        )
        .await;
        let held = g.fencing_token();
        drop(g);
        let next = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(next > held);
        let t = app
            .lock_timeout(&name, Duration::from_secs(5))
            .await
            .unwrap();
        t.release().await.unwrap();
    }

    // Another prefix is outside its permissions: refused, typed, naming the broker.
    let outside = LockClient::connect(
        &user.url(),
        ClientConfig {
            prefix: "elsewhere.".into(),
            ..ClientConfig::default()
        },
    )
    .await
    .unwrap();
    let name = support::unique("lp-out");
    let err = outside.lock(&name).await.unwrap_err();
    assert!(matches!(err, Error::AccessRefused { .. }), "{err:?}");
    assert!(err.to_string().contains("127.0.0.1:5672"), "{err}");
    assert_hides(&err, &user.password);
    let err = outside.try_lock(&name).await.unwrap_err();
    assert!(matches!(err, Error::AccessRefused { .. }), "{err:?}");
    let err = outside
        .lock_timeout(&name, Duration::from_secs(2))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AccessRefused { .. }), "{err:?}");
    // The same client still works inside its permissions afterwards.
    let g = app.lock(&support::unique("lp-after")).await.unwrap();
    g.release().await.unwrap();
}

#[tokio::test]
async fn a_refused_or_incompatible_queue_does_not_cost_the_client_its_other_locks() {
    setup();
    // The broker closes the offending channel (here 406; 403 takes the same path); lapin
    // reports that as an error event of the connection, but the connection and every other
    // lock on it are fine.
    let user = TempUser::new(CONFIGURE, WRITE, READ);
    let app = LockClient::connect(&user.url(), ClientConfig::default())
        .await
        .unwrap();
    let held = app.lock(&support::unique("lp-held")).await.unwrap();

    // 406: a lock whose queue exists with other arguments.
    let name = support::unique("lp-406");
    let plain = LockClient::connect(&support::amqp_url(), ClientConfig::default())
        .await
        .unwrap();
    plain.lock(&name).await.unwrap().release().await.unwrap();
    let quorum = LockClient::connect(
        &user.url(),
        ClientConfig {
            queue_type: mqlock::QueueType::Quorum,
            ..ClientConfig::default()
        },
    )
    .await
    .unwrap();
    let held_q = quorum.lock(&support::unique("lp-held-q")).await.unwrap();
    let err = quorum.lock(&name).await.unwrap_err();
    assert!(matches!(err, Error::IncompatibleQueue { .. }), "{err:?}");

    // Real time, real broker: this checks that nothing happens (no loss follows the channel
    // error), which only waiting shows; half a second covers the broker's channel close and
    // the client's handling of it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(held.is_held(), "an unrelated channel error cost the lock");
    assert!(held_q.is_held(), "an unrelated 406 cost the quorum lock");
    let lost = tokio::time::timeout(Duration::from_millis(300), held_q.lost()).await;
    assert!(lost.is_err(), "loss signalled: {lost:?}");
    // And the connection is still used for new locks.
    quorum
        .lock(&support::unique("lp-after-406"))
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    held.release().await.unwrap();
    held_q.release().await.unwrap();
}

#[tokio::test]
async fn publishing_to_the_default_exchange_is_what_write_on_amq_default_is_for() {
    setup();
    // Without write permission on amq.default, the first grant of a new lock cannot mint its
    // token: the broker refuses the publish. (Write on the queues themselves does not help,
    // and read on amq.default is not what publishing needs.)
    let user = TempUser::new(CONFIGURE, r"^mqlock\.", r"^(mqlock\.|amq\.default$)");
    let app = LockClient::connect(&user.url(), ClientConfig::default())
        .await
        .unwrap();
    let err = app
        .lock_timeout(&support::unique("lp-nowrite"), Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AccessRefused { .. }), "{err:?}");
    assert!(err.to_string().contains("amq.default"), "{err}");
}

#[tokio::test]
async fn read_permission_on_the_lock_queues_is_needed() {
    setup();
    let user = TempUser::new(CONFIGURE, WRITE, r"^nothing$");
    let app = LockClient::connect(&user.url(), ClientConfig::default())
        .await
        .unwrap();
    let err = app
        .lock_timeout(&support::unique("lp-noread"), Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AccessRefused { .. }), "{err:?}");
}

#[tokio::test]
async fn a_dedicated_vhost_confines_the_default_exchange() {
    setup();
    // Write on amq.default lets a user publish into *any* queue of its vhost (RabbitMQ checks
    // the exchange, not the queue). A vhost of its own keeps the lock user away from every
    // other application's queues.
    use rand::Rng;
    let vhost = format!("mqlock-test-{}", rand::rng().random::<u32>());
    support::main_rabbitmqctl(&["add_vhost", &vhost]);
    struct DropVhost(String);
    impl Drop for DropVhost {
        fn drop(&mut self) {
            let _ = Command::new("rabbitmqctl")
                .args(["-q", "-n", "rabbit@localhost", "delete_vhost", &self.0])
                .env("HOME", "/var/lib/rabbitmq")
                .output();
        }
    }
    let _cleanup = DropVhost(vhost.clone());
    let user = TempUser::new_in(&vhost, CONFIGURE, WRITE, READ);
    let url = format!(
        "amqp://{}:{}@127.0.0.1:5672/{vhost}",
        user.name, user.password
    );
    let app = LockClient::connect(&url, ClientConfig::default())
        .await
        .unwrap();
    assert!(
        app.broker_addr().ends_with(&format!("/{vhost}")),
        "{}",
        app.broker_addr()
    );
    let name = support::unique("vhost");
    let g = app.lock(&name).await.unwrap();
    assert!(app.status(&name).await.unwrap().is_held());
    g.release().await.unwrap();

    // The default vhost is out of reach altogether.
    let err = LockClient::connect(&user.url(), ClientConfig::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AuthRefused { .. }), "{err:?}");
    assert_hides(&err, &user.password);
}

// ------------------------------------------------------------------ the command

#[test]
fn the_command_speaks_tls_and_keeps_passwords_out_of_its_messages() {
    setup();
    let bin = support::mqlock_bin();
    let ca = support::tls_dir().join("ca.pem");
    let name = support::unique("cli-tls");
    // --ca-cert on the command line, MQLOCK_CA_CERT in the environment.
    let ok = Command::new(&bin)
        .args(["status", &name, "--url", &support::amqps_url(), "--ca-cert"])
        .arg(&ca)
        .output()
        .unwrap();
    let out =
        String::from_utf8_lossy(&ok.stdout).into_owned() + &String::from_utf8_lossy(&ok.stderr);
    assert_eq!(ok.status.code(), Some(0), "{out}");
    assert!(out.contains("127.0.0.1:5671"), "{out}");
    let ok = Command::new(&bin)
        .args(["exec", &name, "--", "true"])
        .env("MQLOCK_AMQP_URL", support::amqps_url())
        .env("MQLOCK_CA_CERT", &ca)
        .output()
        .unwrap();
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let (wrong_ca, _, _) = foreign_ca(dir.path());
    for (url, ca) in [
        (
            "amqps://guest:s3cr3t-cli@127.0.0.1:5671/%2f",
            wrong_ca.as_path(),
        ),
        ("amqp://guest:s3cr3t-cli@127.0.0.1:5672/%2f", ca.as_path()),
        ("amqp://guest:s3cr3t-cli@127.0.0.1:1/%2f", ca.as_path()),
    ] {
        let out = Command::new(&bin)
            .args(["exec", &name, "--", "true"])
            .env("MQLOCK_AMQP_URL", url)
            .env("MQLOCK_CA_CERT", ca)
            .env("RUST_LOG", "trace")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(122), "{url}: {text}");
        assert!(text.contains("127.0.0.1:"), "{url}: {text}");
        assert!(!text.contains("s3cr3t"), "{url}: password printed: {text}");
    }
    // --help shows where the URL comes from, not its value.
    let help = Command::new(&bin)
        .args(["status", "--help"])
        .env(
            "MQLOCK_AMQP_URL",
            "amqp://guest:s3cr3t-cli@127.0.0.1:5672/%2f",
        )
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("--ca-cert") && help.contains("MQLOCK_CA_CERT"),
        "{help}"
    );
    assert!(!help.contains("s3cr3t"), "{help}");
}
