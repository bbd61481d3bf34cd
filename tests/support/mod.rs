//! Shared helpers of the integration tests: service start-up, endpoints, unique names.
//!
//! Tests that need a service call [`need`] (or an endpoint function that calls it), which runs
//! `scripts/services.sh up` for just those services, once per test binary, and panics (failing
//! the test loudly) when one cannot be started.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A service of `scripts/services.sh` (its names for `MQLOCK_SERVICES`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Service {
    /// The main broker (AMQP 5672, TLS 5671, management API 15672).
    Rabbitmq,
    /// The broker tests may restart (5673).
    RabbitmqFaults,
    /// Redis (6379).
    Redis,
    /// PostgreSQL (5432).
    Postgres,
    /// FUSE 3 (`fusermount3`, /dev/fuse).
    Fuse,
}

impl Service {
    fn name(self) -> &'static str {
        match self {
            Service::Rabbitmq => "rabbitmq",
            Service::RabbitmqFaults => "rabbitmq-faults",
            Service::Redis => "redis",
            Service::Postgres => "postgres",
            Service::Fuse => "fuse",
        }
    }
}

/// Starts the services a test needs (idempotent; each once per test binary) with
/// `MQLOCK_SERVICES=… scripts/services.sh up`, and panics — failing the test loudly — when one
/// cannot be started. A test binary starts only what it uses.
pub fn need(services: &[Service]) {
    static STARTED: std::sync::Mutex<Vec<Service>> = std::sync::Mutex::new(Vec::new());
    let mut started = STARTED.lock().unwrap_or_else(|p| p.into_inner());
    let missing: Vec<Service> = services
        .iter()
        .copied()
        .filter(|s| !started.contains(s))
        .collect();
    if missing.is_empty() {
        return;
    }
    let names: Vec<&str> = missing.iter().map(|s| s.name()).collect();
    let out = Command::new(root().join("scripts/services.sh"))
        .arg("up")
        .env("MQLOCK_SERVICES", names.join(" "))
        .output()
        .expect("cannot run scripts/services.sh");
    assert!(
        out.status.success(),
        "MQLOCK_SERVICES='{}' scripts/services.sh up failed:\n{}{}",
        names.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    started.extend(missing);
}

/// The main broker and FUSE: what a test of `mqlock mount` needs.
pub fn services_up() {
    need(&[Service::Rabbitmq, Service::Fuse]);
}

/// The broker URL the tests use.
pub fn amqp_url() -> String {
    need(&[Service::Rabbitmq]);
    std::env::var("MQLOCK_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// The Redis URL the tests use.
pub fn redis_url() -> String {
    need(&[Service::Redis]);
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into())
}

/// The PostgreSQL URL the tests use.
pub fn database_url() -> String {
    need(&[Service::Postgres]);
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://mqlock:mqlock@127.0.0.1:5432/mqlock".into())
}

/// A lock name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A program of the workspace that tests run as a separate process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fixture {
    /// A `[[bin]]` target: `cargo build --bin NAME`.
    Bin(&'static str),
    /// An example: `cargo build --example NAME`.
    Example(&'static str),
}

/// Builds `fixture` of `package` (debug profile, once per test binary) with the cargo that runs
/// the tests, and returns the path of the executable; panics, failing the test, if the build
/// fails.
pub fn fixture_bin(package: &'static str, fixture: Fixture) -> PathBuf {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static BUILT: Mutex<Option<HashMap<(&str, Fixture), PathBuf>>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    let built = built.get_or_insert_with(HashMap::new);
    if let Some(path) = built.get(&(package, fixture)) {
        return path.clone();
    }
    let (flag, name, dir) = match fixture {
        Fixture::Bin(name) => ("--bin", name, "debug"),
        Fixture::Example(name) => ("--example", name, "debug/examples"),
    };
    let status = Command::new(env!("CARGO"))
        .args(["build", "-q", "-p", package, flag, name])
        .current_dir(root())
        .status()
        .expect("cannot run cargo build");
    assert!(
        status.success(),
        "building {package}'s {flag} {name} failed (cargo build -p {package} {flag} {name})"
    );
    let path = target_dir().join(dir).join(name);
    built.insert((package, fixture), path.clone());
    path
}

/// The cargo target directory the tests were built in (`CARGO_TARGET_DIR`, or `target/`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// Path of the `mqlock` binary, built on demand (release builds are not needed here).
pub fn mqlock_bin() -> PathBuf {
    fixture_bin("mqlock-cli", Fixture::Bin("mqlock"))
}

/// A lock client of the main test broker with the default configuration (tracing on).
pub async fn client() -> mqlock::LockClient {
    init_tracing();
    mqlock::LockClient::connect(&amqp_url(), mqlock::ClientConfig::default())
        .await
        .expect("connect to the test broker")
}

/// Polls `check` (every 10 ms, real time) until it returns `true`; panics — failing the test
/// with "timed out after … waiting for `what`" — once `within` has passed. Every poll loop of the
/// tests has such a deadline, so a condition that never comes fails instead of hanging.
pub async fn wait_until<F, Fut>(what: &str, within: std::time::Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Installs a tracing subscriber once (RUST_LOG controls it).
pub fn init_tracing() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
    });
}

/// The broker that disruptive tests may restart (consumer_timeout 3 s, checked every second).
pub fn faults_amqp_url() -> String {
    need(&[Service::RabbitmqFaults]);
    std::env::var("MQLOCK_FAULTS_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5673/%2f".into())
}

/// Runs `rabbitmqctl` against the faults broker and panics if it fails.
pub fn faults_rabbitmqctl(args: &[&str]) {
    rabbitmqctl("mqlock-faults@localhost", args);
}

/// Runs `rabbitmqctl` against the main broker (rabbit@localhost) and returns its output;
/// panics if it fails.
pub fn main_rabbitmqctl(args: &[&str]) -> String {
    need(&[Service::Rabbitmq]);
    rabbitmqctl("rabbit@localhost", args)
}

fn rabbitmqctl(node: &str, args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .args(["-q", "-n", node])
        .args(args)
        .env("HOME", "/var/lib/rabbitmq")
        .output()
        .expect("cannot run rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl -n {node} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The main broker over TLS (`scripts/services.sh` adds the listener and the test CA).
pub fn amqps_url() -> String {
    need(&[Service::Rabbitmq]);
    std::env::var("MQLOCK_AMQPS_URL")
        .unwrap_or_else(|_| "amqps://guest:guest@127.0.0.1:5671/%2f".into())
}

/// Where `scripts/services.sh` keeps the test CA (`ca.pem`) and the client certificate
/// (`client.pem`, `client.key`).
pub fn tls_dir() -> PathBuf {
    need(&[Service::Rabbitmq]);
    PathBuf::from(
        std::env::var("MQLOCK_TLS_DIR").unwrap_or_else(|_| "/var/tmp/mqlock-services/tls".into()),
    )
}

/// Starts the RabbitMQ 4.x broker of `scripts/rabbitmq4.sh` (once per test binary; the first
/// run builds its chroot) and returns its URL. Panics, failing the test loudly, if it cannot.
pub fn rabbitmq4_url() -> String {
    static UP: OnceLock<()> = OnceLock::new();
    UP.get_or_init(|| {
        let out = Command::new(root().join("scripts/rabbitmq4.sh"))
            .arg("up")
            .output()
            .expect("cannot run scripts/rabbitmq4.sh");
        assert!(
            out.status.success(),
            "scripts/rabbitmq4.sh up failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    });
    std::env::var("MQLOCK_RMQ4_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5674/%2f".into())
}

/// A fresh PostgreSQL database for one test, created on the server of [`database_url`];
/// returns its URL. `prefix` must be a valid SQL identifier start (letters, digits).
pub async fn fresh_pg_database(prefix: &str) -> String {
    let admin_url = database_url();
    let admin = sqlx::PgPool::connect(&admin_url)
        .await
        .expect("PostgreSQL must be up");
    let name = unique(prefix).replace('-', "_");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    let (base, _) = admin_url.rsplit_once('/').unwrap();
    format!("{base}/{name}")
}
