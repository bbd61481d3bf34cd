//! The contention harness of the mutual-exclusion tests (`lock_safety.rs` against RabbitMQ 3.x,
//! `compat_rabbitmq4.rs` against 4.x): clients on their own connections take one lock in turn
//! and do a read-modify-write of a shared counter while they hold it. Checked: never two
//! holders inside (an in-critical-section marker), the count exact, one fencing token per
//! grant, strictly increasing in grant order.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mqlock::{ClientConfig, LockClient};

/// How hard to contend.
#[derive(Debug, Clone, Copy)]
pub struct Contention {
    /// Clients, each on its own broker connection and its own task.
    pub clients: usize,
    /// Increments per client.
    pub rounds: usize,
    /// Pause between reading and writing the counter, on top of the counter file's I/O (which
    /// runs on tokio's blocking threads, so other tasks run in between).
    pub pause: Duration,
}

/// Runs `contention` on a fresh lock named after `prefix`, on the broker at `url` with
/// `config`, and panics (failing the test) if mutual exclusion or fencing did not hold.
pub async fn count_exactly(url: &str, config: ClientConfig, prefix: &str, contention: Contention) {
    let Contention {
        clients,
        rounds,
        pause,
    } = contention;
    let name = crate::support::unique(prefix);
    let dir = tempfile::tempdir().unwrap();
    let counter = dir.path().join("counter");
    std::fs::write(&counter, "0").unwrap();
    let inside = Arc::new(AtomicBool::new(false));
    let grants = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        crate::support::init_tracing();
        let c = LockClient::connect(url, config.clone())
            .await
            .expect("connect to the test broker");
        let (name, counter, inside, grants) = (
            name.clone(),
            counter.clone(),
            inside.clone(),
            grants.clone(),
        );
        tasks.push(tokio::spawn(async move {
            for _ in 0..rounds {
                let g = c.lock(&name).await.unwrap();
                assert!(!inside.swap(true, Ordering::SeqCst), "two holders at once");
                grants.lock().unwrap().push(g.fencing_token());
                increment(&counter, pause).await;
                assert!(g.is_held());
                inside.store(false, Ordering::SeqCst);
                g.release().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let n: usize = std::fs::read_to_string(&counter).unwrap().parse().unwrap();
    assert_eq!(n, clients * rounds, "lost or extra increments");
    let grants = grants.lock().unwrap();
    assert_eq!(grants.len(), clients * rounds);
    assert!(
        grants.windows(2).all(|w| w[0] < w[1]),
        "fencing tokens must grow in grant order"
    );
}

/// Reads the counter, yields (and pauses), writes it plus one: a lost update unless the
/// increments are serialised.
async fn increment(counter: &Path, pause: Duration) {
    let n: u64 = tokio::fs::read_to_string(counter)
        .await
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    tokio::task::yield_now().await;
    if !pause.is_zero() {
        tokio::time::sleep(pause).await;
    }
    tokio::fs::write(counter, (n + 1).to_string())
        .await
        .unwrap();
}
