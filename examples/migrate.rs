//! A service's start-up with mqlock-db: every replica calls the migration runner, exactly one
//! applies the pending migrations while the others wait and then find nothing to do; then the
//! service "serves" by doing fenced writes.
//!
//! ```text
//! scripts/services.sh up
//! DATABASE_URL=postgres://mqlock:mqlock@127.0.0.1:5432/mqlock \
//!   cargo run --example migrate -- tests/data/db/ok
//! ```
//! Start several at once to watch one apply and the others wait.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mqlock::{ClientConfig, LockClient};
use mqlock_db::{MigrationConfig, MigrationRunner, TxConfig, TxRunner};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let amqp = std::env::var("MQLOCK_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let db_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://mqlock:mqlock@127.0.0.1:5432/mqlock".into());
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "migrations".into()),
    );

    let client = LockClient::connect(&amqp, ClientConfig::default()).await?;
    let locker = Arc::new(client.clone());

    // 1. Migrations: one replica applies, the rest wait (bounded) and continue.
    let migrations = MigrationConfig {
        lock_timeout: Some(Duration::from_secs(120)),
        ..MigrationConfig::default()
    };
    let report = MigrationRunner::new(locker.clone(), migrations)
        .run_dir(&db_url, &dir)
        .await?;
    println!(
        "schema ready: applied {:?}, {} already applied, waited {:?}",
        report.applied.iter().map(|m| m.version).collect::<Vec<_>>(),
        report.already_applied,
        report.waited
    );

    // 2. Serve: writes that must not interleave across replicas go through a fenced
    //    transaction; a replica that stalled past its lease is refused with StaleFence.
    let pool = sqlx::PgPool::connect(&db_url).await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS example_hits (n BIGINT NOT NULL)")
        .execute(&pool)
        .await?;
    let fenced = TxConfig {
        lock_timeout: Some(Duration::from_secs(30)),
        ..TxConfig::default()
    };
    let tx = TxRunner::new(locker, pool, fenced)?;
    for _ in 0..3 {
        let total: i64 = tx
            .run("example/hits", |c| {
                Box::pin(async move {
                    sqlx::query("INSERT INTO example_hits VALUES (1)")
                        .execute(&mut *c)
                        .await?;
                    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM example_hits")
                        .fetch_one(&mut *c)
                        .await?;
                    Ok(n)
                })
            })
            .await?;
        println!("served; {total} hits so far");
    }
    client.close().await;
    Ok(())
}
