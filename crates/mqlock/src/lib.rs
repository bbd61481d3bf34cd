//! Distributed locks whose state lives in RabbitMQ.
//!
//! ```no_run
//! # async fn demo() -> mqlock::Result<()> {
//! use mqlock::{ClientConfig, LockClient};
//!
//! let client = LockClient::connect("amqp://guest:guest@127.0.0.1:5672/%2f", ClientConfig::default()).await?;
//! let guard = client.lock("reports/daily").await?;
//! // Send the fencing token with every write to the protected resource.
//! println!("holding {} with token {}", guard.name(), guard.fencing_token());
//! tokio::select! {
//!     reason = guard.lost() => eprintln!("lock lost: {reason}"),
//!     _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
//! }
//! guard.release().await?;
//! # Ok(()) }
//! ```
//!
//! Each lock is a durable queue with *single active consumer*. A client that wants the lock
//! registers a consumer; the broker activates consumers one at a time in registration order,
//! and the active consumer — the holder — keeps one message unacknowledged. When the holder
//! releases (or its connection dies), the broker activates the next consumer and hands it the
//! message: FIFO hand-off pushed by the broker, no polling. That message carries the holder's
//! fencing token, and every grant counts on from the one it is handed, so tokens strictly
//! increase.
//!
//! What the lock promises, and what it cannot, is in `docs/protocol.md`. In short: the broker
//! never has two active consumers, but a holder that is cut off or frozen may not know yet that
//! it lost the lock; the fencing token is what keeps the protected resource safe then.
//!
//! [`LockClient`] runs on tokio: its connection, the connection's liveness probe and each held
//! lock's holder task are tokio tasks. Each method's docs say which [`Error`] variants it
//! returns, what dropping its future at each await point leaves behind (`# Cancel safety`),
//! and when it panics.

#![warn(missing_docs)]

mod acquire;
mod broker_url;
mod claim;
mod client;
mod cluster_mark;
mod config;
mod connection;
mod election;
mod error;
mod fence;
mod grant;
mod guard;
mod hold;
mod identity;
mod kind;
mod lease;
mod locker;
mod loss;
mod metrics;
mod multi;
pub mod name;
mod park;
mod pool;
#[cfg(feature = "prometheus")]
pub mod prometheus;
mod protocol;
mod release;
mod rwlock;
mod semaphore;
mod table;

pub use client::{BreakOutcome, LockClient, LockOptions, LockStatus};
pub use config::{ClientConfig, DEFAULT_QUORUM_DELIVERY_LIMIT, QueueType, TlsConfig};
pub use connection::open_connection;
pub use election::{
    DEFAULT_OBSERVE_INTERVAL, ELECTION_PREFIX, Leader, Leadership, MAX_VALUE_LEN,
    election_lock_name,
};
pub use error::{Error, Result};
pub use guard::{BoxFuture, LockGuard, Release};
pub use identity::HolderInfo;
pub use kind::{LockKind, MAX_PERMITS};
pub use lease::{BootClock, BootInstant, Clock, Lease, ManualClock};
pub use locker::{Locker, MemoryLocker};
pub use loss::{LossReason, LossSignal};
pub use metrics::{
    HOLD_BUCKETS_SECONDS, HistogramSnapshot, LOSS_REASONS, Metrics, MetricsSnapshot,
    WAIT_BUCKETS_SECONDS, loss_reason_label,
};
pub use multi::lock_all;
pub use rwlock::{DEFAULT_MAX_READERS, ReadGuard, RwLock, WriteGuard, reader_lock_name};
pub use semaphore::{Permit, Semaphore, permit_lock_name};
pub use table::{LockTable, Share, TableGuard};
