//! Test helper for the SIGSTOP fencing test (`tests/db_fence.rs`): takes a lock, prints its
//! fencing token, waits for a line on stdin (the window in which the test freezes it), then
//! tries to insert a row tagged with its name in a fenced transaction and prints the outcome.
//!
//! Usage: `fence_holder AMQP_URL DATABASE_URL LOCK TAG`
//!
//! Output lines: `TOKEN <n>`, then one of `RESULT ok`, `RESULT stale <recorded>`,
//! `RESULT lost <reason>`, `RESULT error <message>`.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use mqlock::{ClientConfig, LockClient};
use mqlock_db::{Error, TxConfig, TxRunner};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [amqp, db, lock, tag] = args.as_slice() else {
        eprintln!("usage: fence_holder AMQP_URL DATABASE_URL LOCK TAG");
        std::process::exit(2);
    };
    // A one-second heartbeat lets the broker drop the frozen holder within ~3 s.
    let config = ClientConfig {
        heartbeat: Duration::from_secs(1),
        ..ClientConfig::default()
    };
    let client = LockClient::connect(amqp, config).await.expect("broker");
    let pool = sqlx::PgPool::connect(db).await.expect("database");
    let runner = TxRunner::new(Arc::new(client.clone()), pool, TxConfig::default())
        .expect("fence table name");
    runner.ensure_fence_table().await.expect("fence table");

    let held = client.lock(lock).await.expect("lock");
    println!("TOKEN {}", held.fencing_token());
    std::io::stdout().flush().unwrap();

    // "Preparing the write": the test stops us here, past our lease.
    tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).unwrap();
    })
    .await
    .unwrap();

    let tag = tag.clone();
    let token = held.fencing_token() as i64;
    let outcome = runner
        .run_with_guard(&held, move |c| {
            Box::pin(async move {
                sqlx::query("INSERT INTO fenced_log (who, token) VALUES ($1, $2)")
                    .bind(tag)
                    .bind(token)
                    .execute(&mut *c)
                    .await?;
                Ok(())
            })
        })
        .await;
    match outcome {
        Ok(()) => println!("RESULT ok"),
        Err(Error::StaleFence { recorded, .. }) => println!("RESULT stale {recorded}"),
        Err(Error::LostBeforeCommit { reason, .. }) => println!("RESULT lost {reason}"),
        Err(e) => println!("RESULT error {e}"),
    }
    std::io::stdout().flush().unwrap();
    drop(held);
    client.close().await;
}
