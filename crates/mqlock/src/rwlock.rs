//! Read-write lock (docs/protocol.md, "Read-write lock"): a gate — a lock that every reader and
//! writer passes in FIFO order — and a semaphore of reader permits. A reader takes the gate,
//! then one permit, and leaves the gate; a writer takes the gate and then every permit.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::{join_all, select_all};

use crate::acquire::{Ask, Wait};
use crate::client::LockClient;
use crate::error::{Error, Result};
use crate::guard::LockGuard;
use crate::kind::LockKind;
use crate::loss::LossReason;
use crate::semaphore::{Permit, Semaphore};

/// The default number of readers a [`RwLock`] admits at once (`mqlock exec --shared`).
pub const DEFAULT_MAX_READERS: u32 = 8;

/// The lock name of reader permit `slot` of the read-write lock `name`.
pub fn reader_lock_name(name: &str, slot: u32) -> String {
    format!("{name}#r{slot}")
}

/// A read-write lock shared by every client that names it with the same reader count
/// ([`LockClient::rw_lock`]).
#[derive(Clone, Debug)]
pub struct RwLock {
    client: LockClient,
    name: Arc<str>,
    kind: LockKind,
    readers: Semaphore,
    /// The acquisitions of this handle pass the gate one at a time in the process: the gate
    /// is one lock per client (N1), so a second acquisition of it by this client at the same
    /// moment would fail instead of waiting. A held write lock keeps the gate, so a read or
    /// write of the same client meanwhile is `AlreadyHeld` (it would wait for itself).
    local: Arc<tokio::sync::Mutex<()>>,
}

/// A shared hold of a [`RwLock`]: one reader permit.
///
/// Its [fencing token](ReadGuard::fencing_token) is the gate's token at the reader's entry,
/// which is below the token of every writer admitted after it: a resource that remembers the
/// token of its last write can refuse a reader whose token is below it (a reader that lost its
/// permit without knowing and read on while a writer wrote).
#[derive(Debug)]
#[must_use = "dropping the guard releases the read lock"]
pub struct ReadGuard {
    token: u64,
    permit: Permit,
}

/// An exclusive hold of a [`RwLock`]: the gate and every reader permit.
#[derive(Debug)]
#[must_use = "dropping the guard releases the write lock"]
pub struct WriteGuard {
    gate: LockGuard,
    permits: Vec<LockGuard>,
}

impl LockClient {
    /// The read-write lock `name`, admitting up to `max_readers` readers at once
    /// ([`DEFAULT_MAX_READERS`] is what `mqlock exec --shared` uses).
    ///
    /// Readers share it, a writer excludes readers and writers. Both pass one gate in the order
    /// they registered with the broker, so neither side starves: a writer waits only for the
    /// readers that entered before it, and readers that arrive after a writer wait for it.
    /// Every client of the name must give the same `max_readers`, and use the name only as a
    /// read-write lock ([`Error::KindMismatch`] otherwise, at the first acquisition).
    ///
    /// Costs: a reader takes two locks (the gate, briefly, and a permit), a writer
    /// `max_readers + 1`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`], and [`Error::InvalidPermits`] for 0 or more than
    /// [`crate::MAX_PERMITS`] readers. Nothing is sent to the broker here.
    pub fn rw_lock(&self, name: &str, max_readers: u32) -> Result<RwLock> {
        let kind = LockKind::ReadWrite { max_readers };
        let slots = (0..max_readers)
            .map(|slot| reader_lock_name(name, slot))
            .collect();
        Ok(RwLock {
            client: self.clone(),
            name: name.into(),
            kind,
            readers: Semaphore::new(self, name, kind, slots)?,
            local: Arc::new(tokio::sync::Mutex::new(())),
        })
    }
}

impl RwLock {
    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The most readers at once.
    pub fn max_readers(&self) -> u32 {
        self.readers.permits()
    }

    /// Waits for a shared hold: the gate, then a reader permit.
    ///
    /// # Errors
    ///
    /// - [`Error::KindMismatch`]: another client uses the name as another kind of lock or with
    ///   another reader count.
    /// - [`Error::AlreadyHeld`]: this client holds the write lock (or takes the gate through
    ///   another `RwLock` handle of the name), or holds every reader permit. Reads of one
    ///   handle from several tasks wait for each other in the process instead.
    /// - Otherwise those of [`LockClient::lock`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe, as [`LockClient::lock`]: a dropped call holds nothing.
    ///
    /// # Panics
    ///
    /// As [`LockClient::lock`].
    pub async fn read(&self) -> Result<ReadGuard> {
        self.read_with(Wait::Forever).await
    }

    /// Waits up to `timeout` in all for a shared hold; [`Error::Timeout`] after that.
    ///
    /// # Errors
    ///
    /// Those of [`RwLock::read`] and [`Error::Timeout`].
    ///
    /// # Cancel safety
    ///
    /// As [`RwLock::read`].
    ///
    /// # Panics
    ///
    /// As [`LockClient::lock_timeout`].
    pub async fn read_timeout(&self, timeout: Duration) -> Result<ReadGuard> {
        self.read_with(Wait::Until(std::time::Instant::now() + timeout))
            .await
    }

    /// Waits for an exclusive hold: the gate, then every reader permit.
    ///
    /// # Errors
    ///
    /// Those of [`RwLock::read`] ([`Error::AlreadyHeld`] also when this client holds a reader
    /// permit: the writer would wait for itself).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the locks already taken are dropped, which releases them in the background.
    ///
    /// # Panics
    ///
    /// As [`LockClient::lock`].
    pub async fn write(&self) -> Result<WriteGuard> {
        self.write_with(Wait::Forever).await
    }

    /// Waits up to `timeout` in all for an exclusive hold; [`Error::Timeout`] after that.
    ///
    /// # Errors
    ///
    /// Those of [`RwLock::write`] and [`Error::Timeout`].
    ///
    /// # Cancel safety
    ///
    /// As [`RwLock::write`].
    ///
    /// # Panics
    ///
    /// As [`LockClient::lock_timeout`].
    pub async fn write_timeout(&self, timeout: Duration) -> Result<WriteGuard> {
        self.write_with(Wait::Until(std::time::Instant::now() + timeout))
            .await
    }

    /// This handle's turn in the process, then the gate.
    async fn gate(&self, wait: Wait) -> Result<(tokio::sync::OwnedMutexGuard<()>, LockGuard)> {
        let local = match wait {
            Wait::Until(deadline) => {
                tokio::time::timeout_at(deadline.into(), self.local.clone().lock_owned())
                    .await
                    .map_err(|_| Error::Timeout {
                        name: self.name.to_string(),
                        addr: self.client.inner.addr.clone(),
                        waited: Duration::ZERO,
                    })?
            }
            _ => self.local.clone().lock_owned().await,
        };
        let ask = Ask {
            kind: Some(self.kind),
            ..Ask::default()
        };
        let gate = self.client.acquire_as(&self.name, wait, ask).await?;
        let gate = gate.expect("a blocking or timed acquisition grants or fails");
        Ok((local, gate))
    }

    async fn read_with(&self, wait: Wait) -> Result<ReadGuard> {
        let (_local, gate) = self.gate(wait).await?;
        let permit = self.readers.acquire_with(wait).await?;
        let permit = permit.expect("a blocking or timed acquisition grants or fails");
        // Leaving the gate lets the next reader or writer in; a dropped guard releases in the
        // background, and the broker hands the gate on when it reads the close.
        let token = gate.fencing_token();
        drop(gate);
        Ok(ReadGuard { token, permit })
    }

    async fn write_with(&self, wait: Wait) -> Result<WriteGuard> {
        let (local, gate) = self.gate(wait).await?;
        // Only the gate's holder registers on reader permits, so taking them all at once
        // cannot deadlock: every other registration there is a reader's that holds its permit
        // and no other lock.
        let ask = || Ask {
            kind: Some(self.kind),
            ..Ask::default()
        };
        let taken = join_all(
            self.readers
                .slot_names()
                .iter()
                .map(|name| self.client.acquire_as(name, wait, ask())),
        )
        .await;
        let mut permits = Vec::with_capacity(taken.len());
        for outcome in taken {
            match outcome {
                Ok(guard) => permits.push(guard.expect("a blocking or timed acquisition grants")),
                // The permits and gate taken so far are dropped: released in the background.
                Err(e) => {
                    return Err(match e {
                        Error::Timeout { addr, waited, .. } => Error::Timeout {
                            name: self.name.to_string(),
                            addr,
                            waited,
                        },
                        e => e,
                    });
                }
            }
        }
        drop(local);
        Ok(WriteGuard { gate, permits })
    }
}

impl ReadGuard {
    /// The gate's fencing token at this reader's entry: below every later writer's token.
    pub fn fencing_token(&self) -> u64 {
        self.token
    }

    /// Whether the reader permit is still believed held ([`LockGuard::is_held`]).
    pub fn is_held(&self) -> bool {
        self.permit.is_held()
    }

    /// Why the reader permit was lost, if it was.
    pub fn loss_reason(&self) -> Option<LossReason> {
        self.permit.loss_reason()
    }

    /// Resolves when the reader permit is lost ([`LockGuard::lost`], with its cancel safety).
    pub async fn lost(&self) -> LossReason {
        self.permit.lost().await
    }

    /// The reader permit held.
    pub fn permit(&self) -> &Permit {
        &self.permit
    }

    /// Gives the read lock back and waits for the broker ([`LockGuard::release`]).
    pub async fn release(self) -> Result<()> {
        self.permit.release().await
    }
}

impl WriteGuard {
    /// The gate's fencing token: larger than every earlier writer's and every earlier reader's
    /// ([`ReadGuard::fencing_token`]).
    pub fn fencing_token(&self) -> u64 {
        self.gate.fencing_token()
    }

    /// Whether the gate and every reader permit are still believed held.
    pub fn is_held(&self) -> bool {
        self.loss_reason().is_none()
    }

    /// Why the write lock was lost — the gate or a reader permit lost — if it was.
    pub fn loss_reason(&self) -> Option<LossReason> {
        std::iter::once(&self.gate)
            .chain(&self.permits)
            .find_map(LockGuard::loss_reason)
    }

    /// Resolves when the gate or any reader permit is lost, with that lock's reason.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe, as [`LockGuard::lost`].
    pub async fn lost(&self) -> LossReason {
        let all = std::iter::once(&self.gate)
            .chain(&self.permits)
            .map(|g| Box::pin(g.lost()));
        select_all(all).await.0
    }

    /// Gives the gate and every reader permit back, and waits for the broker.
    ///
    /// # Errors
    ///
    /// The first error of the releases ([`LockGuard::release`]); every lock is released
    /// whatever the outcome.
    ///
    /// # Cancel safety
    ///
    /// As [`LockGuard::release`].
    pub async fn release(self) -> Result<()> {
        let WriteGuard { gate, permits } = self;
        let all = join_all(std::iter::once(gate).chain(permits).map(LockGuard::release)).await;
        all.into_iter().collect()
    }
}
