//! Semaphore (docs/protocol.md, "Semaphore"): `N` permits, each a lock of its own — its queue,
//! its register, its fencing tokens — and an acquisition that waits on every permit at once and
//! keeps the first it is granted.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::acquire::{Ask, Sibling, Wait};
use crate::client::LockClient;
use crate::error::{Error, Result};
use crate::guard::LockGuard;
use crate::kind::{LockKind, MAX_PERMITS};
use crate::loss::{LossReason, LossSignal};
use crate::name;

/// The lock name of permit `slot` of the semaphore `name`: the name itself for permit 0 (so a
/// plain lock of that name and the semaphore meet in one queue, where the broker tells them
/// apart: "Lock kinds"), `name#slot` for the others.
pub fn permit_lock_name(name: &str, slot: u32) -> String {
    if slot == 0 {
        name.to_owned()
    } else {
        format!("{name}#{slot}")
    }
}

/// A semaphore of a fixed number of permits, shared by every client that names it with the
/// same number ([`LockClient::semaphore`]).
///
/// Clones share one queue of waiting acquisitions: in a process, acquisitions through one
/// `Semaphore` (and its clones) wait for the broker one at a time, in the order they were
/// called, and a permit this client holds is never waited for again. Make one `Semaphore` per
/// name and client and share it; two separate handles of one name on one client may see
/// [`Error::AlreadyHeld`] while the other one waits.
#[derive(Clone, Debug)]
pub struct Semaphore {
    client: LockClient,
    name: Arc<str>,
    kind: LockKind,
    /// The lock names of the permits, in order.
    slots: Arc<[String]>,
    /// The acquisitions of this handle wait for the broker one at a time.
    queue: Arc<tokio::sync::Mutex<()>>,
    /// Told when a permit of this handle is given back, so that a waiting acquisition of the
    /// handle registers on it too (it skipped the permit while this client held it).
    returned: Arc<tokio::sync::Notify>,
}

/// A held permit of a [`Semaphore`]: the guard of one permit's lock.
///
/// Each permit is a lock with its own fencing tokens: a token is larger than every earlier
/// grant's *of the same permit*. A resource shared by all permit holders fences on the pair
/// ([`Permit::slot`], [`Permit::fencing_token`]). Everything else — the loss signal, the lease,
/// release on drop and when the connection dies — is the lock's ([`LockGuard`]).
#[derive(Debug)]
#[must_use = "dropping the permit releases it"]
pub struct Permit {
    semaphore: Arc<str>,
    slot: u32,
    guard: LockGuard,
    /// Dropped after `guard` (fields drop in order): tells the handle the permit is back.
    returned: Returned,
}

/// Tells a [`Semaphore`] handle, when dropped, that one of its permits was given back.
#[derive(Debug)]
struct Returned(Arc<tokio::sync::Notify>);

impl Drop for Returned {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}

impl LockClient {
    /// The semaphore `name` with `permits` permits.
    ///
    /// At most `permits` holders at once across every client, a permit given back when its
    /// holder releases it, drops it or dies (the broker hands it to the next waiter), a fencing
    /// token per grant, and waiters served in the order they registered with the broker. Every
    /// client of the name must give the same number: the broker refuses a declaration with
    /// another one, or of a plain lock or read-write lock of that name
    /// ([`Error::KindMismatch`], at the first acquisition).
    ///
    /// Costs: an acquisition registers a consumer — a channel — on every permit this client
    /// does not hold, and each permit is a lock queue with its register and epoch queue; hence
    /// the limit of [`MAX_PERMITS`].
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`] for an invalid name, [`Error::InvalidPermits`] for 0 or more
    /// than [`MAX_PERMITS`] permits. Nothing is sent to the broker here.
    pub fn semaphore(&self, name: &str, permits: u32) -> Result<Semaphore> {
        let slots = (0..permits)
            .map(|slot| permit_lock_name(name, slot))
            .collect();
        Semaphore::new(self, name, LockKind::Semaphore { permits }, slots)
    }
}

impl Semaphore {
    /// A semaphore over the locks `slots`, whose queues are declared as `kind`.
    pub(crate) fn new(
        client: &LockClient,
        name: &str,
        kind: LockKind,
        slots: Vec<String>,
    ) -> Result<Semaphore> {
        name::validate(name)?;
        let permits = slots.len() as u32;
        if permits == 0 || permits > MAX_PERMITS {
            return Err(Error::InvalidPermits {
                name: name.to_owned(),
                permits,
                max: MAX_PERMITS,
            });
        }
        Ok(Semaphore {
            client: client.clone(),
            name: name.into(),
            kind,
            slots: slots.into(),
            queue: Arc::new(tokio::sync::Mutex::new(())),
            returned: Arc::new(tokio::sync::Notify::new()),
        })
    }

    /// The semaphore's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The number of permits.
    pub fn permits(&self) -> u32 {
        self.slots.len() as u32
    }

    /// The lock names of the permits, in order.
    pub(crate) fn slot_names(&self) -> &[String] {
        &self.slots
    }

    /// Waits for a permit and takes it.
    ///
    /// Registers on every permit this client does not hold already — on permit 0 first, then,
    /// once the broker accepted its declaration (the kind and count agreed), on the others —
    /// and keeps the first permit the broker hands it; the other registrations are closed,
    /// which hands any permit they were given to the next waiter.
    ///
    /// # Errors
    ///
    /// - [`Error::KindMismatch`]: another client uses the name as another kind of lock or with
    ///   another number of permits.
    /// - [`Error::AlreadyHeld`]: this client holds every permit.
    /// - Otherwise those of [`LockClient::lock`] (a permit's error names the permit's lock).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future drops every registration (their channels are closed
    /// in the background, as for [`LockClient::lock`]); no permit is kept.
    ///
    /// # Panics
    ///
    /// As [`LockClient::lock`].
    pub async fn acquire(&self) -> Result<Permit> {
        self.acquire_with(Wait::Forever)
            .await
            .map(|p| p.expect("a blocking acquisition grants or fails"))
    }

    /// Waits up to `timeout` for a permit, like [`Semaphore::acquire`]; [`Error::Timeout`]
    /// (naming the semaphore) after that.
    ///
    /// # Errors
    ///
    /// Those of [`Semaphore::acquire`] and [`Error::Timeout`].
    ///
    /// # Cancel safety
    ///
    /// As [`Semaphore::acquire`].
    ///
    /// # Panics
    ///
    /// As [`LockClient::lock_timeout`].
    pub async fn acquire_timeout(&self, timeout: Duration) -> Result<Permit> {
        self.acquire_with(Wait::Until(std::time::Instant::now() + timeout))
            .await
            .map(|p| p.expect("a timed acquisition grants or fails"))
    }

    /// Takes a permit if one is free and nobody waits for it; `Ok(None)` otherwise (also when
    /// another acquisition of this handle is waiting).
    ///
    /// # Errors
    ///
    /// Those of [`Semaphore::acquire`], never [`Error::Timeout`].
    ///
    /// # Cancel safety
    ///
    /// As [`Semaphore::acquire`].
    ///
    /// # Panics
    ///
    /// As [`LockClient::try_lock`].
    pub async fn try_acquire(&self) -> Result<Option<Permit>> {
        self.acquire_with(Wait::Try).await
    }

    pub(crate) async fn acquire_with(&self, wait: Wait) -> Result<Option<Permit>> {
        let metrics = &self.client.inner.metrics;
        let started = Instant::now();
        metrics.requested();
        let outcome = self.race(wait).await;
        match &outcome {
            Ok(Some(_)) => metrics.granted(started.elapsed()),
            Ok(None) => metrics.found_busy(),
            Err(Error::Timeout { .. }) => metrics.timed_out(),
            Err(_) => {}
        }
        outcome.map_err(|e| match e {
            Error::Timeout { addr, .. } => Error::Timeout {
                name: self.name.to_string(),
                addr,
                waited: started.elapsed(),
            },
            e => e,
        })
    }

    /// One registration per permit this client does not hold; the first grant wins.
    async fn race(&self, wait: Wait) -> Result<Option<Permit>> {
        let timed_out = || Error::Timeout {
            name: self.name.to_string(),
            addr: self.client.inner.addr.clone(),
            waited: Duration::ZERO,
        };
        // In-process order first: one acquisition of this handle registers at a time, so a
        // second one skips the permits the first one won instead of waiting behind them.
        let _queued = match wait {
            Wait::Forever => self.queue.lock().await,
            Wait::Until(deadline) => tokio::time::timeout_at(deadline.into(), self.queue.lock())
                .await
                .map_err(|_| timed_out())?,
            Wait::Try => match self.queue.try_lock() {
                Ok(q) => q,
                Err(_) => return Ok(None),
            },
        };
        let claims = &self.client.inner.claims;
        let unclaimed =
            || (0..self.permits()).filter(|&slot| !claims.contains(&self.slots[slot as usize]));
        let free: Vec<u32> = unclaimed().collect();
        let Some((&first, rest)) = free.split_first() else {
            return Err(Error::AlreadyHeld {
                name: self.name.to_string(),
            });
        };
        let turn = Arc::new(tokio::sync::Mutex::new(()));
        let register = |slot: u32, declared: Option<oneshot::Sender<()>>| {
            let ask = Ask {
                kind: Some(self.kind),
                sibling: Some(Sibling {
                    turn: turn.clone(),
                    declared,
                }),
                ..Ask::default()
            };
            let client = self.client.clone();
            let lock = self.slots[slot as usize].clone();
            async move { (slot, client.acquire_as(&lock, wait, ask).await) }
        };
        // The first permit alone until the broker accepted its declaration: a client that
        // disagrees on the kind or the count is refused there, before it creates any queue.
        let (declared, mut first_declared) = oneshot::channel();
        let mut racing = FuturesUnordered::new();
        racing.push(register(first, Some(declared)));
        // Until the first registration's declaration is answered, only it runs; if it ends
        // before that (an error, or busy for `try_acquire`), the others never start.
        let mut rest_pending = true;
        let mut busy = false;
        let mut registered: Vec<u32> = free.clone();
        loop {
            tokio::select! {
                accepted = &mut first_declared, if rest_pending => {
                    rest_pending = false;
                    if accepted.is_ok() {
                        racing.extend(rest.iter().map(|&slot| register(slot, None)));
                    } else {
                        registered.truncate(1);
                    }
                }
                // A permit this client held was given back while we wait: wait on it too
                // (`recipes::Register`), or it might stay free while we wait on the others.
                () = self.returned.notified(), if !rest_pending && !racing.is_empty() => {
                    for slot in unclaimed().filter(|s| !registered.contains(s)).collect::<Vec<_>>() {
                        registered.push(slot);
                        racing.push(register(slot, None));
                    }
                }
                Some((slot, outcome)) = racing.next() => match outcome {
                    Ok(Some(guard)) => {
                        return Ok(Some(Permit {
                            semaphore: self.name.clone(),
                            slot,
                            guard,
                            returned: Returned(self.returned.clone()),
                        }));
                    }
                    Ok(None) => busy = true,
                    // Taken meanwhile by another handle of this client: not ours to wait for.
                    Err(Error::AlreadyHeld { .. }) => {}
                    Err(e) => return Err(e),
                },
            }
            // Every registration ended without a grant, and no more will start.
            if racing.is_empty() && !rest_pending {
                return if busy {
                    Ok(None)
                } else {
                    Err(Error::AlreadyHeld {
                        name: self.name.to_string(),
                    })
                };
            }
        }
    }
}

impl Permit {
    /// The semaphore's name.
    pub fn semaphore(&self) -> &str {
        &self.semaphore
    }

    /// Which permit this is, from 0 to `permits - 1`.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// The grant's fencing token: larger than every earlier grant's of this permit
    /// ([`LockGuard::fencing_token`]). Fence on the pair ([`Permit::slot`], token).
    pub fn fencing_token(&self) -> u64 {
        self.guard.fencing_token()
    }

    /// Whether the permit is still believed held ([`LockGuard::is_held`]).
    pub fn is_held(&self) -> bool {
        self.guard.is_held()
    }

    /// Why the permit was lost, if it was ([`LockGuard::loss_reason`]).
    pub fn loss_reason(&self) -> Option<LossReason> {
        self.guard.loss_reason()
    }

    /// Resolves when the permit is lost ([`LockGuard::lost`], with its cancel safety).
    pub async fn lost(&self) -> LossReason {
        self.guard.lost().await
    }

    /// A cloneable handle on the loss signal ([`LockGuard::loss_signal`]).
    pub fn loss_signal(&self) -> LossSignal {
        self.guard.loss_signal()
    }

    /// The guard of the permit's lock.
    pub fn guard(&self) -> &LockGuard {
        &self.guard
    }

    /// Gives the permit back and waits for the broker ([`LockGuard::release`], with its errors
    /// and cancel safety): the next waiter of this permit is granted in the same step.
    pub async fn release(self) -> Result<()> {
        let Permit {
            guard, returned, ..
        } = self;
        let released = guard.release().await;
        drop(returned);
        released
    }
}
