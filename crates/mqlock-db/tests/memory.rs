//! Adapter logic against the in-process `MemoryLocker` and real SQLite files. The cross-process
//! behaviour (real broker, PostgreSQL, several processes) is tested in the workspace's
//! `tests/db_*.rs`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mqlock::{Locker, MemoryLocker};
use mqlock_db::{Error, MigrationConfig, MigrationRunner, TxConfig, TxRunner};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};

fn data(dir: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/data/db")
        .join(dir)
}

async fn sqlite_pool(dir: &tempfile::TempDir) -> SqlitePool {
    let opts = SqliteConnectOptions::new()
        .filename(dir.path().join("t.db"))
        .create_if_missing(true);
    let pool = SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(opts)
        .await
        .unwrap();
    sqlx::query("CREATE TABLE counter (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO counter VALUES (1, 0)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("CREATE TABLE log (who TEXT NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    pool
}

fn tx_runner(locker: MemoryLocker, pool: &SqlitePool) -> TxRunner<sqlx::Sqlite> {
    TxRunner::new(Arc::new(locker), pool.clone(), TxConfig::default()).unwrap()
}

/// A migration runner on the lock "m".
fn migration_runner(locker: &MemoryLocker) -> MigrationRunner {
    MigrationRunner::new(
        Arc::new(locker.clone()),
        MigrationConfig {
            lock_name: Some("m".into()),
            ..MigrationConfig::default()
        },
    )
}

async fn count(pool: &SqlitePool, sql: &'static str) -> i64 {
    sqlx::query_as::<_, (i64,)>(sql)
        .fetch_one(pool)
        .await
        .unwrap()
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_increments_are_exact() {
    let dir = tempfile::tempdir().unwrap();
    let pool = sqlite_pool(&dir).await;
    let runner = tx_runner(MemoryLocker::new(), &pool);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let runner = runner.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..25 {
                runner
                    .run("counter", |c| {
                        Box::pin(async move {
                            // Read, then write in a second statement: lost updates would show
                            // if two transactions interleaved.
                            let (n,): (i64,) = sqlx::query_as("SELECT n FROM counter WHERE id = 1")
                                .fetch_one(&mut *c)
                                .await?;
                            tokio::task::yield_now().await;
                            sqlx::query("UPDATE counter SET n = ?1 WHERE id = 1")
                                .bind(n + 1)
                                .execute(&mut *c)
                                .await?;
                            Ok(())
                        })
                    })
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        count(&pool, "SELECT n FROM counter WHERE id = 1").await,
        200
    );
}

#[tokio::test]
async fn stale_holder_is_fenced_off() {
    let dir = tempfile::tempdir().unwrap();
    let pool = sqlite_pool(&dir).await;
    let locker = MemoryLocker::new();
    let runner = tx_runner(locker.clone(), &pool);

    let old = locker.lock("res").await.unwrap();
    // The old holder is "frozen": the lock is taken away and granted to a new holder, who
    // commits first.
    let waiter = {
        let locker = locker.clone();
        tokio::spawn(async move { locker.lock("res").await.unwrap() })
    };
    tokio::task::yield_now().await;
    assert!(locker.revoke("res"));
    let new = waiter.await.unwrap();
    assert!(new.fencing_token() > old.fencing_token());
    runner
        .run_with_guard(&new, |c| {
            Box::pin(async move {
                sqlx::query("INSERT INTO log VALUES ('new')")
                    .execute(&mut *c)
                    .await?;
                Ok(())
            })
        })
        .await
        .unwrap();

    let err = runner
        .run_with_guard(&old, |c| {
            Box::pin(async move {
                sqlx::query("INSERT INTO log VALUES ('old')")
                    .execute(&mut *c)
                    .await?;
                Ok(())
            })
        })
        .await
        .unwrap_err();
    match err {
        Error::StaleFence {
            resource,
            token,
            recorded,
        } => {
            assert_eq!(resource, "res");
            assert_eq!(token, old.fencing_token());
            assert_eq!(recorded, new.fencing_token() as i64);
        }
        other => panic!("expected StaleFence, got {other:?}"),
    }
    assert_eq!(
        count(&pool, "SELECT COUNT(*) FROM log WHERE who = 'old'").await,
        0
    );
    assert_eq!(
        count(&pool, "SELECT COUNT(*) FROM log WHERE who = 'new'").await,
        1
    );
    // The same grant may run a second transaction.
    runner
        .run_with_guard(&new, |c| {
            Box::pin(async move {
                sqlx::query("INSERT INTO log VALUES ('new')")
                    .execute(&mut *c)
                    .await?;
                Ok(())
            })
        })
        .await
        .unwrap();
    assert_eq!(
        count(&pool, "SELECT COUNT(*) FROM log WHERE who = 'new'").await,
        2
    );
}

#[tokio::test]
async fn lock_lost_during_work_rolls_back() {
    let dir = tempfile::tempdir().unwrap();
    let pool = sqlite_pool(&dir).await;
    let locker = MemoryLocker::new();
    let runner = tx_runner(locker.clone(), &pool);
    let l2 = locker.clone();
    let err = runner
        .run("res", move |c| {
            Box::pin(async move {
                sqlx::query("INSERT INTO log VALUES ('doomed')")
                    .execute(&mut *c)
                    .await?;
                l2.revoke("res");
                // Work that would go on: the loss must interrupt it.
                tokio::time::sleep(Duration::from_secs(30)).await;
                Ok(())
            })
        })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::LostBeforeCommit { .. }), "{err:?}");
    assert_eq!(count(&pool, "SELECT COUNT(*) FROM log").await, 0);
}

#[tokio::test]
async fn lock_lost_after_work_refuses_commit() {
    let dir = tempfile::tempdir().unwrap();
    let pool = sqlite_pool(&dir).await;
    let locker = MemoryLocker::new();
    let runner = tx_runner(locker.clone(), &pool);
    let held = locker.lock("res").await.unwrap();
    let err = runner
        .run_with_guard(&held, |c| {
            let locker = locker.clone();
            Box::pin(async move {
                sqlx::query("INSERT INTO log VALUES ('doomed')")
                    .execute(&mut *c)
                    .await?;
                // Lost after the work finished but before the commit: the work's future
                // completes in the same poll as the loss fires.
                locker.revoke("res");
                Ok(())
            })
        })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::LostBeforeCommit { .. }), "{err:?}");
    assert_eq!(count(&pool, "SELECT COUNT(*) FROM log").await, 0);
}

#[tokio::test]
async fn work_error_rolls_back_and_releases() {
    let dir = tempfile::tempdir().unwrap();
    let pool = sqlite_pool(&dir).await;
    let locker = MemoryLocker::new();
    let runner = tx_runner(locker.clone(), &pool);
    let err = runner
        .run("res", |c| {
            Box::pin(async move {
                sqlx::query("INSERT INTO log VALUES ('x')")
                    .execute(&mut *c)
                    .await?;
                Err::<(), _>(Error::work(std::io::Error::other("boom")))
            })
        })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Work(_)), "{err:?}");
    assert_eq!(count(&pool, "SELECT COUNT(*) FROM log").await, 0);
    assert!(!locker.is_locked("res"));
}

#[tokio::test]
async fn lock_timeout_and_bad_table_name() {
    let dir = tempfile::tempdir().unwrap();
    let pool = sqlite_pool(&dir).await;
    let locker = MemoryLocker::new();
    assert!(matches!(
        TxRunner::new(
            Arc::new(locker.clone()),
            pool.clone(),
            TxConfig {
                fence_table: "x; DROP TABLE log".into(),
                ..TxConfig::default()
            }
        ),
        Err(Error::InvalidTableName(_))
    ));
    let _held = locker.lock("res").await.unwrap();
    let runner = TxRunner::new(
        Arc::new(locker.clone()),
        pool.clone(),
        TxConfig {
            lock_timeout: Some(Duration::from_millis(50)),
            ..TxConfig::default()
        },
    )
    .unwrap();
    let err = runner
        .run("res", |_| Box::pin(async { Ok(()) }))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Lock(mqlock::Error::Timeout { .. })),
        "{err:?}"
    );
}

#[tokio::test]
async fn migrations_apply_once_and_failures_release_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("m.db").display());
    let locker = MemoryLocker::new();
    let runner = migration_runner(&locker);

    let first = runner.run_dir(&url, &data("ok")).await.unwrap();
    assert_eq!(
        first.applied.iter().map(|m| m.version).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    let second = runner.run_dir(&url, &data("ok")).await.unwrap();
    assert!(second.applied.is_empty());
    assert_eq!(second.already_applied, 3);
    assert!(second.fencing_token > first.fencing_token);
    assert!(!locker.is_locked("m"));

    let url2 = format!("sqlite://{}", dir.path().join("f.db").display());
    let err = runner.run_dir(&url2, &data("failing")).await.unwrap_err();
    match &err {
        Error::MigrationFailed {
            version,
            description,
            applied_before,
            ..
        } => {
            assert_eq!(*version, 2);
            assert_eq!(description, "broken");
            assert_eq!(applied_before, &[1]);
        }
        other => panic!("expected MigrationFailed, got {other:?}"),
    }
    assert!(err.to_string().contains("no_such_table"), "{err}");
    assert!(
        !locker.is_locked("m"),
        "a failed migration must release the lock"
    );
    let fixed = runner.run_dir(&url2, &data("fixed")).await.unwrap();
    assert_eq!(
        fixed.applied.iter().map(|m| m.version).collect::<Vec<_>>(),
        [2]
    );
}

#[tokio::test]
async fn migration_bad_input() {
    let locker = MemoryLocker::new();
    let runner = migration_runner(&locker);
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("m.db").display());
    assert!(matches!(
        runner.run_dir(&url, &dir.path().join("nope")).await,
        Err(Error::MigrationSource { .. })
    ));
    assert!(matches!(
        runner.run_dir("mysql://u:pw@h/db", &data("ok")).await,
        Err(Error::InvalidUrl { .. })
    ));
    // A directory that cannot hold the file.
    let err = runner
        .run_dir("sqlite:///nonexistent-dir-mqlock/x.db", &data("ok"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    assert!(!locker.is_locked("m"));
}
