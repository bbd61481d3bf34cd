//! `mqlock migrate` as real processes against the real broker, PostgreSQL and SQLite files:
//! concurrent replicas, a failing migration, bad input.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use mqlock::{ClientConfig, LockClient};
use sqlx::{PgPool, SqlitePool};

fn data(dir: &str) -> PathBuf {
    support::root().join("tests/data/db").join(dir)
}

fn migrate_cmd(db: &str, source: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(support::mqlock_bin());
    cmd.arg("migrate")
        .args([
            "--url",
            &support::amqp_url(),
            "--database-url",
            db,
            "--source",
        ])
        .arg(source)
        .args(extra)
        .env_remove("DATABASE_URL");
    cmd
}

/// Starts `n` processes at once and waits for all of them.
fn run_many(n: usize, db: &str, source: &Path) -> Vec<Output> {
    let children: Vec<_> = (0..n)
        .map(|_| {
            // The old name of --timeout, still accepted.
            migrate_cmd(db, source, &["--wait-timeout", "60s"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect()
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// How many processes printed that they applied `version`.
fn appliers(outputs: &[Output], version: i64) -> usize {
    let needle = format!("applied {version}/");
    outputs
        .iter()
        .filter(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.starts_with(&needle))
        })
        .count()
}

fn assert_all_ok_and_applied_once(outputs: &[Output]) {
    for o in outputs {
        assert_eq!(o.status.code(), Some(0), "{}", text(o));
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("up to date"),
            "{}",
            text(o)
        );
    }
    for v in 1..=3 {
        assert_eq!(
            appliers(outputs, v),
            1,
            "migration {v} must be applied by exactly one process"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_replicas_migrate_postgres() {
    let url = support::fresh_pg_database("mqlockmig").await;
    let outputs = run_many(8, &url, &data("ok"));
    assert_all_ok_and_applied_once(&outputs);

    let db = PgPool::connect(&url).await.unwrap();
    let runs: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT version, COUNT(*) FROM migration_runs GROUP BY version ORDER BY version",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(runs, vec![(1, 1), (2, 1), (3, 1)]);
    let history: Vec<(i64, bool)> =
        sqlx::query_as("SELECT version, success FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(history, vec![(1, true), (2, true), (3, true)]);
    let items: Vec<(i32, String, i32)> = sqlx::query_as("SELECT id, name, qty FROM items")
        .fetch_all(&db)
        .await
        .unwrap();
    assert_eq!(items, vec![(1, "seed".to_owned(), 7)]);
    // sqlx's own advisory lock was never taken: no session holds one now, and none of ours may.
    let (advisory,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND database = (SELECT oid FROM pg_database WHERE datname = current_database())")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(advisory, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_replicas_migrate_one_sqlite_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("app.db");
    let url = format!("sqlite://{}", file.display());
    let outputs = run_many(8, &url, &data("ok"));
    assert_all_ok_and_applied_once(&outputs);

    let db = SqlitePool::connect(&url).await.unwrap();
    let runs: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT version, COUNT(*) FROM migration_runs GROUP BY version ORDER BY version",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(runs, vec![(1, 1), (2, 1), (3, 1)]);
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(n, 3);
    let items: Vec<(i64, String, i64)> = sqlx::query_as("SELECT id, name, qty FROM items")
        .fetch_all(&db)
        .await
        .unwrap();
    assert_eq!(items, vec![(1, "seed".to_owned(), 7)]);
}

async fn table_exists_pg(db: &PgPool, table: &str) -> bool {
    sqlx::query_as::<_, (bool,)>("SELECT to_regclass($1) IS NOT NULL")
        .bind(table)
        .fetch_one(db)
        .await
        .unwrap()
        .0
}

fn assert_all_report_failure(outputs: &[Output]) {
    for o in outputs {
        assert_eq!(o.status.code(), Some(1), "{}", text(o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("migration 2 (broken) failed"), "{}", text(o));
        assert!(err.contains("no_such_table"), "{}", text(o));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_migration_postgres_releases_lock_and_fixed_rerun_succeeds() {
    let url = support::fresh_pg_database("mqlockmig").await;
    // Every replica reports the failure; none hangs (a lock left behind would make the others
    // time out with exit 124 instead).
    let outputs = run_many(4, &url, &data("failing"));
    assert_all_report_failure(&outputs);

    let db = PgPool::connect(&url).await.unwrap();
    assert!(
        table_exists_pg(&db, "things").await,
        "migration 1 stays applied"
    );
    assert!(
        !table_exists_pg(&db, "half_done").await,
        "the failed migration's DDL must be rolled back"
    );
    let runs: Vec<(i32,)> = sqlx::query_as("SELECT version FROM migration_runs")
        .fetch_all(&db)
        .await
        .unwrap();
    assert_eq!(runs, vec![(1,)]);
    let history: Vec<(i64,)> = sqlx::query_as("SELECT version FROM _sqlx_migrations")
        .fetch_all(&db)
        .await
        .unwrap();
    assert_eq!(history, vec![(1,)]);

    let fixed = migrate_cmd(&url, &data("fixed"), &["--timeout", "10s"])
        .output()
        .unwrap();
    assert_eq!(fixed.status.code(), Some(0), "{}", text(&fixed));
    assert!(
        String::from_utf8_lossy(&fixed.stdout).contains("applied 2/broken"),
        "{}",
        text(&fixed)
    );
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM half_done")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(n, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_migration_sqlite_rolls_back_and_fixed_rerun_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("f.db").display());
    let outputs = run_many(4, &url, &data("failing"));
    assert_all_report_failure(&outputs);
    let db = SqlitePool::connect(&url).await.unwrap();
    let (half,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM sqlite_master WHERE name = 'half_done'")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(half, 0, "the failed migration's DDL must be rolled back");
    let fixed = migrate_cmd(&url, &data("fixed"), &["--timeout", "10s"])
        .output()
        .unwrap();
    assert_eq!(fixed.status.code(), Some(0), "{}", text(&fixed));
    let runs: Vec<(i64,)> = sqlx::query_as("SELECT version FROM migration_runs ORDER BY version")
        .fetch_all(&db)
        .await
        .unwrap();
    assert_eq!(runs, vec![(1,), (2,)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gives_clear_errors_and_applies_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite_file = dir.path().join("never.db");
    let sqlite_url = format!("sqlite://{}", sqlite_file.display());
    let ok = data("ok");

    // Unreachable database: exit 3, the password never printed.
    let o = migrate_cmd("postgres://mqlock:topsecret@127.0.0.1:1/mqlock", &ok, &[])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("cannot connect to the database at postgres://mqlock:***@127.0.0.1:1/mqlock"),
        "{}",
        text(&o)
    );
    assert!(!err.contains("topsecret"));

    // Malformed and unsupported URLs: exit 2.
    for bad in [
        "postgres://u:p@h:notaport/db",
        "mysql://u:p@h/db",
        "not a url",
    ] {
        let o = migrate_cmd(bad, &ok, &[]).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{bad}: {}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("invalid database URL"),
            "{}",
            text(&o)
        );
    }

    // Missing migrations directory: exit 2, and the database is not touched.
    let o = migrate_cmd(&sqlite_url, &dir.path().join("no-such-dir"), &[])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("cannot read migrations from"),
        "{}",
        text(&o)
    );
    assert!(!sqlite_file.exists());

    // Broker down: exit 122 as in every subcommand, nothing applied (PostgreSQL: no migrations
    // table).
    let url = support::fresh_pg_database("mqlockmig").await;
    let o = Command::new(support::mqlock_bin())
        .args([
            "migrate",
            "--url",
            "amqp://guest:guest@127.0.0.1:1/%2f",
            "--database-url",
            &url,
            "--source",
        ])
        .arg(&ok)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(122), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("cannot reach the broker"),
        "{}",
        text(&o)
    );
    let db = PgPool::connect(&url).await.unwrap();
    assert!(!table_exists_pg(&db, "_sqlx_migrations").await);

    // Lock held elsewhere and --wait-timeout: exit 124, nothing applied.
    let lock = support::unique("db-migrate-held");
    let holder = LockClient::connect(&support::amqp_url(), ClientConfig::default())
        .await
        .unwrap();
    let held = holder.lock(&lock).await.unwrap();
    let o = migrate_cmd(&url, &ok, &["--lock", &lock, "--wait-timeout", "1s"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(124), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("timed out"),
        "{}",
        text(&o)
    );
    assert!(!table_exists_pg(&db, "_sqlx_migrations").await);
    held.release().await.unwrap();
    let o = migrate_cmd(&url, &ok, &["--lock", &lock, "--wait-timeout", "10s"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn library_errors_are_typed() {
    use mqlock_db::{Error, MigrationConfig, MigrationRunner};
    let client = LockClient::connect(&support::amqp_url(), ClientConfig::default())
        .await
        .unwrap();
    let runner = MigrationRunner::new(
        std::sync::Arc::new(client),
        MigrationConfig {
            lock_timeout: Some(Duration::from_secs(5)),
            ..MigrationConfig::default()
        },
    );
    let err = runner
        .run_dir("postgres://mqlock:pw@127.0.0.1:1/x", &data("ok"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    let err = runner
        .run_dir("postgres://u:p@h:notaport/db", &data("ok"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidUrl { .. }), "{err:?}");
    let err = runner
        .run_dir(&support::database_url(), Path::new("/no/such/dir"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::MigrationSource { .. }), "{err:?}");
    let down = LockClient::connect(
        "amqp://guest:guest@127.0.0.1:1/%2f",
        ClientConfig::default(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(down, mqlock::Error::Unreachable { .. }),
        "{down:?}"
    );
}
