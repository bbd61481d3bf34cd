//! Fenced transactions against the real broker, PostgreSQL and SQLite: exact counts under
//! concurrency, and a holder frozen with SIGSTOP past its lease being fenced off.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqlock::{BoxFuture, ClientConfig, LockClient};
use mqlock_db::{FencedDatabase, TxConfig, TxRunner};
use sqlx::postgres::Postgres;
use sqlx::sqlite::Sqlite;
use sqlx::{PgPool, Pool};
use support::Fixture;

async fn client() -> LockClient {
    LockClient::connect(&support::amqp_url(), ClientConfig::default())
        .await
        .expect("RabbitMQ must be up")
}

/// What the increment test needs of a database, in its own SQL dialect; the test body is
/// [`eight_clients_increment_exactly`], one for both.
trait CounterDb: FencedDatabase {
    /// A fresh database with a table `counter (id, n)` holding the row (1, 0): its URL, and
    /// the temporary directory that must outlive it (SQLite).
    async fn fresh() -> (String, Option<tempfile::TempDir>);

    /// Adds 1 to the counter with a read, a 1 ms pause and a write: an update is lost unless
    /// the transactions are serialised.
    fn bump(conn: &mut Self::Connection) -> BoxFuture<'_, mqlock_db::Result<()>>;

    /// The counter's value.
    async fn count(pool: &Pool<Self>) -> i64;

    /// How many fence rows record `lock`, and the greatest token among them.
    async fn fence_row(pool: &Pool<Self>, lock: &str) -> (i64, i64);
}

impl CounterDb for Postgres {
    async fn fresh() -> (String, Option<tempfile::TempDir>) {
        let url = support::fresh_pg_database("mqlockdb").await;
        let setup = PgPool::connect(&url).await.unwrap();
        sqlx::query("CREATE TABLE counter (id INT PRIMARY KEY, n BIGINT NOT NULL)")
            .execute(&setup)
            .await
            .unwrap();
        sqlx::query("INSERT INTO counter VALUES (1, 0)")
            .execute(&setup)
            .await
            .unwrap();
        setup.close().await;
        (url, None)
    }

    fn bump(c: &mut Self::Connection) -> BoxFuture<'_, mqlock_db::Result<()>> {
        Box::pin(async move {
            let (n,): (i64,) = sqlx::query_as("SELECT n FROM counter WHERE id = 1")
                .fetch_one(&mut *c)
                .await?;
            tokio::time::sleep(Duration::from_millis(1)).await;
            sqlx::query("UPDATE counter SET n = $1 WHERE id = 1")
                .bind(n + 1)
                .execute(&mut *c)
                .await?;
            Ok(())
        })
    }

    async fn count(pool: &Pool<Self>) -> i64 {
        let (n,): (i64,) = sqlx::query_as("SELECT n FROM counter WHERE id = 1")
            .fetch_one(pool)
            .await
            .unwrap();
        n
    }

    async fn fence_row(pool: &Pool<Self>, lock: &str) -> (i64, i64) {
        sqlx::query_as("SELECT COUNT(*), MAX(token) FROM mqlock_fence WHERE resource = $1")
            .bind(lock)
            .fetch_one(pool)
            .await
            .unwrap()
    }
}

impl CounterDb for Sqlite {
    async fn fresh() -> (String, Option<tempfile::TempDir>) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("c.db").display());
        let setup = sqlx::SqlitePool::connect(&url).await.unwrap();
        sqlx::query("CREATE TABLE counter (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
            .execute(&setup)
            .await
            .unwrap();
        sqlx::query("INSERT INTO counter VALUES (1, 0)")
            .execute(&setup)
            .await
            .unwrap();
        setup.close().await;
        (url, Some(dir))
    }

    fn bump(c: &mut Self::Connection) -> BoxFuture<'_, mqlock_db::Result<()>> {
        Box::pin(async move {
            let (n,): (i64,) = sqlx::query_as("SELECT n FROM counter WHERE id = 1")
                .fetch_one(&mut *c)
                .await?;
            tokio::time::sleep(Duration::from_millis(1)).await;
            sqlx::query("UPDATE counter SET n = ?1 WHERE id = 1")
                .bind(n + 1)
                .execute(&mut *c)
                .await?;
            Ok(())
        })
    }

    async fn count(pool: &Pool<Self>) -> i64 {
        let (n,): (i64,) = sqlx::query_as("SELECT n FROM counter WHERE id = 1")
            .fetch_one(pool)
            .await
            .unwrap();
        n
    }

    async fn fence_row(pool: &Pool<Self>, lock: &str) -> (i64, i64) {
        sqlx::query_as("SELECT COUNT(*), MAX(token) FROM mqlock_fence WHERE resource = ?1")
            .bind(lock)
            .fetch_one(pool)
            .await
            .unwrap()
    }
}

/// 8 clients (own broker connection, own pool) each add 1 twenty times with a read-then-write
/// that loses updates unless the transactions are serialised: the count is exact, and the
/// fence table holds one row for the lock, with its latest grant's token.
async fn eight_clients_increment_exactly<DB: CounterDb>(lock_prefix: &str) {
    let (url, _dir) = DB::fresh().await;
    let setup = Pool::<DB>::connect(&url).await.unwrap();
    let lock = support::unique(lock_prefix);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let pool = Pool::<DB>::connect(&url).await.unwrap();
        let lock = lock.clone();
        tasks.push(tokio::spawn(async move {
            let config = TxConfig {
                lock_timeout: Some(Duration::from_secs(60)),
                ..TxConfig::default()
            };
            let runner = TxRunner::new(Arc::new(client().await), pool, config).unwrap();
            for _ in 0..20 {
                runner.run(&lock, DB::bump).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(DB::count(&setup).await, 160);
    // The fence table recorded the lock's latest grant.
    let (rows, token) = DB::fence_row(&setup, &lock).await;
    assert_eq!(rows, 1);
    assert!(token > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_clients_increment_exactly_postgres() {
    eight_clients_increment_exactly::<Postgres>("db-incr-pg").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_clients_increment_exactly_sqlite() {
    eight_clients_increment_exactly::<Sqlite>("db-incr-sqlite").await;
}

/// One broker client and one runner shared by 8 tasks of a process, all on one lock name:
/// the runner queues them in the process (a `LockClient` refuses to acquire a name twice at
/// once), so every run succeeds and the count is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_sharing_one_client_and_runner_queue_in_process() {
    let (url, _dir) = Sqlite::fresh().await;
    let setup = Pool::<Sqlite>::connect(&url).await.unwrap();
    let lock = support::unique("db-shared-runner");
    let runner = TxRunner::new(
        Arc::new(client().await),
        Pool::<Sqlite>::connect(&url).await.unwrap(),
        TxConfig::default(),
    )
    .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (runner, lock) = (runner.clone(), lock.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..5 {
                runner.run(&lock, Sqlite::bump).await?;
            }
            Ok::<_, mqlock_db::Error>(())
        }));
    }
    for t in tasks {
        t.await
            .unwrap()
            .expect("every run of the shared runner succeeds");
    }
    assert_eq!(Sqlite::count(&setup).await, 40);
}

/// Kills the helper on drop, so a failing test does not leave a stopped process behind.
struct Reap(Child);
impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holder_frozen_past_its_lease_is_fenced_off() {
    let bin = support::fixture_bin("mqlock-db", Fixture::Example("fence_holder"));
    let url = support::fresh_pg_database("mqlockdb").await;
    let db = PgPool::connect(&url).await.unwrap();
    sqlx::query("CREATE TABLE fenced_log (who TEXT NOT NULL, token BIGINT NOT NULL)")
        .execute(&db)
        .await
        .unwrap();
    let lock = support::unique("db-sigstop");

    let child = Command::new(&bin)
        .args([&support::amqp_url(), &url, &lock, "A"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Reap(child);
    let mut out = BufReader::new(child.0.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let token_a: u64 = line
        .trim()
        .strip_prefix("TOKEN ")
        .unwrap_or_else(|| panic!("bad line {line:?}"))
        .parse()
        .unwrap();
    let pid = child.0.id() as libc::pid_t;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);

    // B waits for the broker to give up on the frozen A (missed heartbeats), then commits.
    let b = client().await;
    let runner = TxRunner::new(Arc::new(b.clone()), db.clone(), TxConfig::default()).unwrap();
    let start = Instant::now();
    let held = mqlock::Locker::lock_timeout(&b, &lock, Duration::from_secs(60))
        .await
        .unwrap();
    let takeover = start.elapsed();
    let token_b = held.fencing_token();
    assert!(token_b > token_a);
    runner
        .run_with_guard(&held, move |c| {
            Box::pin(async move {
                sqlx::query("INSERT INTO fenced_log VALUES ('B', $1)")
                    .bind(token_b as i64)
                    .execute(&mut *c)
                    .await?;
                Ok(())
            })
        })
        .await
        .unwrap();
    eprintln!("B took over {takeover:?} after A was frozen (token {token_a} -> {token_b})");

    // A resumes and tries to commit its write.
    child.0.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    child.0.stdin.as_mut().unwrap().flush().unwrap();
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(
        line.trim(),
        format!("RESULT stale {token_b}"),
        "A's outcome"
    );

    let rows: Vec<(String, i64)> = sqlx::query_as("SELECT who, token FROM fenced_log ORDER BY who")
        .fetch_all(&db)
        .await
        .unwrap();
    assert_eq!(
        rows,
        vec![("B".to_owned(), token_b as i64)],
        "nothing from A may be committed"
    );
    held.release().await.unwrap();
    let status = child.0.wait().unwrap();
    assert!(status.success());
}
