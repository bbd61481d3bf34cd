//! [`LockClient`]: the RabbitMQ implementation of [`Locker`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use lapin::Channel;
use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::uri::AMQPUri;
use tracing::{info, warn};

use crate::acquire::{Ask, Wait, to_error};
use crate::broker_url::{display_addr, parse_urls};
use crate::claim::Claims;
use crate::cluster_mark;
use crate::config::ClientConfig;
use crate::connection::Conn;
use crate::error::{Error, Result};
use crate::fence;
use crate::guard::{BoxFuture, LockGuard};
use crate::identity::HolderInfo;
use crate::locker::Locker;
use crate::loss::LossReason;
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::name::queue_names;
use crate::park::Parking;
use crate::pool::Pool;
use crate::protocol::{Fault, break_properties, classify};

/// Clients created by this process (part of every consumer tag).
static CLIENTS: AtomicU64 = AtomicU64::new(0);

/// A lock client: broker connections shared by every lock taken through it.
///
/// Cheap to clone: clones share the connections, the metrics and the closed state
/// ([`LockClient::close`] on one closes them all). The first connection is opened by
/// [`LockClient::connect`]. Every held lock owns a channel, and a connection carries at most its
/// `channel_max` channels (2 047 on RabbitMQ), so a client that holds more locks than that
/// opens more connections to the same broker, lazily, and closes the extra ones once they carry
/// no lock again: a client with few locks has one connection. A connection that fails is
/// replaced on demand, by the next acquisition; locks held on a failed connection are reported
/// lost (see [`LockGuard::lost`]), never moved to another, and the locks on the other
/// connections are not affected.
///
/// The connections' I/O and liveness probes, and each held lock's holder task, run on the tokio
/// runtime that opened them: keep that runtime running while the client and its guards are in
/// use.
#[derive(Clone)]
pub struct LockClient {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) config: ClientConfig,
    pub(crate) uris: Vec<AMQPUri>,
    pub(crate) addr: String,
    /// The broker connections lock channels are spread over (`pool.rs`): one until the
    /// client holds more locks than a connection carries.
    pub(crate) pool: Pool,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) closed: AtomicBool,
    pub(crate) tag_prefix: String,
    pub(crate) tag_seq: AtomicU64,
    /// A lock channel being opened ahead of the next acquisition (see `lock_channel`).
    pub(crate) spare: std::sync::Mutex<Option<Spare>>,
    /// With several broker URLs: the cluster mark of the first broker connected to, and its
    /// address (see `check_mark`).
    pub(crate) first_mark: std::sync::Mutex<Option<(String, String)>>,
    /// The names this client (and its clones) holds or is acquiring: a second acquisition of
    /// one of them fails at once (`Error::AlreadyHeld`).
    pub(crate) claims: Arc<Claims>,
    /// The locks kept after their guards let go (`LockOptions::keep`), still held.
    pub(crate) parking: Arc<Parking>,
    /// Locks whose epoch queue and holder record this client declared lately.
    pub(crate) declared: crate::acquire::Declared,
}

/// A channel opened in the background, with `basic.qos` and `confirm.select` done, on `conn`.
pub(crate) struct Spare {
    pub(crate) conn: Arc<Conn>,
    pub(crate) channel: tokio::task::JoinHandle<lapin::Result<Channel>>,
}

impl std::fmt::Debug for LockClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockClient")
            .field("broker", &self.inner.addr)
            .finish_non_exhaustive()
    }
}

/// What the broker can tell about a lock, from [`LockClient::status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockStatus {
    /// Lock name.
    pub name: String,
    /// The lock queue's name on the broker.
    pub queue: String,
    /// Whether the lock queue exists (it is created by the first acquisition and expires
    /// [`ClientConfig::idle_expiry`] after its last use).
    pub exists: bool,
    /// Consumers registered on the lock queue: the holder (or a client being granted) and
    /// its waiters. On quorum queues RabbitMQ may under-report waiters.
    pub consumers: u32,
    /// Wake-ups ready in the lock queue (not a count of waiters).
    pub ready_messages: u32,
    /// The latest grant in the lock's holder record: the holder while the lock is held, the
    /// last holder when it is free. `None` for a lock never granted, one whose record expired,
    /// and when the record could not be read or was taken at that moment by another reader.
    /// The record is written beside the grant, not waited for: right after a hand-off it may
    /// still name the previous holder for a moment.
    pub holder: Option<HolderInfo>,
}

/// What [`LockClient::break_lock`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BreakOutcome {
    /// No lock by that name: never used, or its queue expired. Nothing was sent, or the request
    /// came back unrouted because the queue expired between the look and the publish.
    Unknown,
    /// Nobody holds the lock. Nothing was sent.
    Free {
        /// The last holder recorded, if any.
        last: Option<HolderInfo>,
    },
    /// The holder was asked to give the lock up.
    Requested {
        /// The grant the request names.
        holder: HolderInfo,
    },
}

impl LockStatus {
    /// Whether some client holds the lock or is being granted it: the lock queue has a
    /// consumer (single active consumer makes one of them the holder).
    pub fn is_held(&self) -> bool {
        self.consumers > 0
    }
    /// Clients waiting behind the holder (exact on classic queues; quorum queues may
    /// under-report, see [`LockStatus::consumers`]).
    pub fn waiters(&self) -> u32 {
        self.consumers.saturating_sub(1)
    }
}

/// How [`LockClient::lock_with`] acquires and holds a lock. The default waits without a limit
/// and holds until released, like [`LockClient::lock`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LockOptions {
    /// How long to wait for the grant at most ([`Error::Timeout`] after that); `None` waits
    /// until granted.
    pub timeout: Option<Duration>,
    /// How long the lock may be held, counted from the grant; `None` holds until released or
    /// lost. When the limit is reached, the lock is given up and its loss signal fires with
    /// [`LossReason::HoldLimit`] (docs/protocol.md, "Hold limit").
    pub max_hold: Option<Duration>,
    /// Keep the lock after its guard is released or dropped, for at most this long unused:
    /// the lock stays held (renewed, fenced) and this client's next acquisition of the name
    /// gets it back at once, with the same token, until another client starts waiting for it
    /// (then it is released within a round trip) or the idle time runs out
    /// (docs/protocol.md, "Keeping a lock until it is wanted"). `None` (the default) releases.
    /// Not together with `max_hold`.
    pub keep: Option<Duration>,
}

impl LockClient {
    /// Connects to the broker.
    ///
    /// `url` is an AMQP URL (`amqp://user:pass@host:5672/vhost`; `amqps://` needs the `rustls`
    /// feature), or several separated by commas: the first address that answers is used, now
    /// and at every reconnection. Several URLs must name nodes of one cluster (see
    /// [`Error::NotOneCluster`]). The heartbeat of [`ClientConfig`] overrides one in the URL, and
    /// a URL without `connection_timeout` gets 5 s for the TCP connect; the AMQP handshake gets
    /// 15 s.
    ///
    /// # Errors
    ///
    /// - [`Error::Config`]: `config` fails [`ClientConfig::validate`], an `amqps://` URL without
    ///   the `rustls` feature, or a TLS file of [`ClientConfig::tls`] that cannot be read.
    /// - [`Error::InvalidUrl`]: a URL does not parse or has no host, or `url` names none.
    /// - [`Error::AuthRefused`]: a broker refused the login; the remaining addresses are not
    ///   tried.
    /// - [`Error::Tls`]: the TLS handshake failed.
    /// - [`Error::Unreachable`]: the address could not be reached. With several URLs, when every
    ///   address failed, their failures (TLS and TLS files included) are listed in one
    ///   [`Error::Unreachable`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: nothing outlives the dropped future. A connection being opened is dropped,
    /// and lapin closes it; with several URLs, the cluster mark queue (`<prefix>cluster-mark`)
    /// may have been declared and given its mark, as any connection does.
    ///
    /// # Panics
    ///
    /// If polled outside a tokio runtime with its I/O and time drivers: the connection runs
    /// on the current runtime.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> mqlock::Result<()> {
    /// use mqlock::{ClientConfig, LockClient, QueueType};
    ///
    /// // Quorum queues keep the locks through the loss of a node; a vhost of their own keeps
    /// // the lock user's write permission on the default exchange away from other applications.
    /// let config = ClientConfig {
    ///     queue_type: QueueType::Quorum,
    ///     connection_name: Some("report-builder".into()),
    ///     ..ClientConfig::default()
    /// };
    /// let client = LockClient::connect(
    ///     "amqp://app:secret@rabbit-1:5672/locks,amqp://app:secret@rabbit-2:5672/locks",
    ///     config,
    /// )
    /// .await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(url: &str, config: ClientConfig) -> Result<LockClient> {
        config.validate()?;
        let uris = parse_urls(url, &config)?;
        let addr = uris.iter().map(display_addr).collect::<Vec<_>>().join(", ");
        let conn = Conn::open(&uris, &config).await?;
        let first_mark = std::sync::Mutex::new(None);
        check_mark(&conn, &config, uris.len(), &first_mark).await?;
        info!(
            broker = %conn.addr,
            lease = ?conn.lease_margin,
            renewal = ?conn.renewal_period,
            net_ticktime = ?config.net_ticktime,
            "connected; a holder's lease assumes every broker node runs with a net_ticktime of at least this"
        );
        let now = crate::protocol::now_micros();
        Ok(LockClient {
            inner: Arc::new(Inner {
                config,
                uris,
                addr,
                pool: Pool::new(conn),
                metrics: Arc::new(Metrics::default()),
                closed: AtomicBool::new(false),
                // pid, start time and a per-process sequence: two clients of one process never
                // share a prefix, so neither takes the other's renewals for its own.
                tag_prefix: format!(
                    "mqlock.{}.{now:x}.{}",
                    std::process::id(),
                    CLIENTS.fetch_add(1, Ordering::Relaxed)
                ),
                tag_seq: AtomicU64::new(0),
                spare: std::sync::Mutex::new(None),
                first_mark,
                claims: Arc::new(Claims::default()),
                parking: Arc::new(Parking::default()),
                declared: Default::default(),
            }),
        })
    }

    /// The broker address(es), as `host:port/vhost` (never the credentials).
    pub fn broker_addr(&self) -> &str {
        &self.inner.addr
    }

    /// The client's configuration, as given to [`LockClient::connect`].
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// A snapshot of this client's counters, shared by its clones: the request rate R, the
    /// release rate S and the wait time T, with hold times, losses by reason and the locks held
    /// now. The `prometheus` feature exposes the same counters (`mqlock::prometheus::register`).
    pub fn metrics(&self) -> MetricsSnapshot {
        self.inner.metrics.snapshot()
    }

    /// Waits until the lock is granted. Waiters are granted in the order they registered with
    /// the broker.
    ///
    /// The guard is returned once its lease has started: a renewal stamped with its fencing
    /// token came back through the lock queue, which keeps that stamp for the next holder to
    /// count on from, so the token can be used at once. If the connection fails while waiting, the client reconnects and registers
    /// again, at the back of the queue.
    ///
    /// # Errors
    ///
    /// - [`Error::InvalidName`]: checked before anything is sent.
    /// - [`Error::AlreadyHeld`]: this client (or a clone) already holds `name` or is acquiring
    ///   it; returned at once, nothing is sent (a second consumer would wait behind the first,
    ///   that is for itself). The name is free again once that acquisition ends without a
    ///   grant or its guard is released or dropped.
    /// - [`Error::Closed`]: the client was closed, before or during the wait.
    /// - [`Error::Unreachable`], [`Error::AuthRefused`]: the client cannot connect. Returned at
    ///   once when the connection was already gone before this call; once this call's wait was
    ///   interrupted, reconnecting is retried until 60 s after that first interruption.
    /// - [`Error::Tls`], [`Error::Config`] (TLS files), [`Error::NotOneCluster`]: a
    ///   reconnection failed so; not retried.
    /// - [`Error::IncompatibleQueue`]: the lock's queues exist with other arguments (another
    ///   queue type or idle expiry, or declared by an earlier protocol version: the error says
    ///   how to move on).
    /// - [`Error::AccessRefused`]: the broker user lacks a permission.
    /// - [`Error::Protocol`]: the epoch queue holds something other than epochs, or the wait
    ///   was interrupted 200 times.
    ///
    /// Never [`Error::Timeout`] nor [`Error::Lost`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the guard is created after the last await point, so a dropped future never
    /// holds the lock. What a drop leaves, by where the future was:
    ///
    /// - connecting: the connection being opened is dropped, and lapin closes it;
    /// - registered (waiting, or in the grant): the acquisition's channel is closed by a task
    ///   spawned on the current runtime, which removes its consumer and hands any delivery on
    ///   to the next waiter; until the broker has read that close (one round trip) the consumer
    ///   still counts in [`LockClient::status`];
    /// - in the grant: a renewal stamped with its token, and a new epoch in the epoch queue,
    ///   may already be stored; the next grant counts on from them, so tokens skip a number
    ///   and never go down. The message the grant kept goes back when its channel closes (F1
    ///   in docs/protocol.md). A wake-up or a renewal it published may stay in the lock queue,
    ///   where later holders tell it apart (docs/protocol.md, "Hold").
    ///
    /// Drop it inside a tokio runtime: without one the consumer is cancelled before the channel
    /// closes, and on RabbitMQ 3.10.8 cancelling the active consumer of a classic lock queue
    /// can crash the queue (rabbitmq-server #5460; docs/protocol.md).
    ///
    /// # Panics
    ///
    /// If polled outside a tokio runtime with its time driver: the wait uses tokio's timers, and
    /// the lock's holder task is spawned on the current runtime.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(client: mqlock::LockClient) -> mqlock::Result<()> {
    /// let guard = client.lock("reports/daily").await?;
    /// // The token orders this holder's writes after every earlier holder's: a store that keeps
    /// // the highest token it has seen refuses a holder that lost the lock without knowing it.
    /// write_report(guard.fencing_token()).await;
    /// guard.release().await?;
    /// # Ok(()) }
    /// # async fn write_report(_token: u64) {}
    /// ```
    pub async fn lock(&self, name: &str) -> Result<LockGuard> {
        self.acquire(name, Wait::Forever, None, None)
            .await
            .map(|g| g.expect("blocking acquire grants"))
    }

    /// Waits up to `timeout` for the lock, like [`LockClient::lock`]; [`Error::Timeout`] after
    /// that.
    ///
    /// The deadline covers the whole acquisition: reconnecting, registering, waiting, and the
    /// grant's first renewal (and a new epoch, for a lock that has none). A grant still in progress at the deadline is
    /// abandoned (its token number is skipped).
    ///
    /// # Errors
    ///
    /// Those of [`LockClient::lock`], and [`Error::Timeout`] when the deadline passes, also
    /// while a reconnection is being retried.
    ///
    /// # Cancel safety
    ///
    /// As [`LockClient::lock`].
    ///
    /// # Panics
    ///
    /// If polled outside a tokio runtime with its time driver, and if `timeout` is too large to
    /// be added to the current `Instant` (`Duration::MAX`, for instance): use
    /// [`LockClient::lock`] to wait without a limit.
    pub async fn lock_timeout(&self, name: &str, timeout: Duration) -> Result<LockGuard> {
        self.acquire(name, Wait::Until(Instant::now() + timeout), None, None)
            .await
            .map(|g| g.expect("timed acquire grants or fails"))
    }

    /// Takes the lock if no other client holds it or waits for it; `Ok(None)` otherwise.
    ///
    /// When the lock looks free (its queue has no consumer), registers and waits up to
    /// [`ClientConfig::try_window`] for the broker's hand-over; if another client registered at
    /// the same instant and won, returns `Ok(None)`. The attempt, grant included, ends at the
    /// latest `2 × try_window` after the call (reconnecting first is not bounded by it), with
    /// `Ok(None)` if it has not granted by then. An attempt interrupted by a lost connection or
    /// a queue that expired in between also returns `Ok(None)`, without retrying.
    ///
    /// # Errors
    ///
    /// Those of [`LockClient::lock`], except that a failed reconnection is not retried and an
    /// interrupted attempt is `Ok(None)`, not an error. Never [`Error::Timeout`].
    ///
    /// # Cancel safety
    ///
    /// As [`LockClient::lock`].
    ///
    /// # Panics
    ///
    /// If polled outside a tokio runtime with its time driver.
    pub async fn try_lock(&self, name: &str) -> Result<Option<LockGuard>> {
        self.acquire(name, Wait::Try, None, None).await
    }

    /// Acquires `name` with [`LockOptions`]: an optional bound on the wait (as
    /// [`LockClient::lock_timeout`]; `None` waits like [`LockClient::lock`]) and an optional
    /// limit on the hold.
    ///
    /// With [`LockOptions::max_hold`], the guard gives the lock up by itself once it has been
    /// held that long (counted from the grant): its holder task closes the lock's channel, as
    /// for any loss, and fires the loss signal with [`LossReason::HoldLimit`]; the next waiter
    /// is granted with a larger token. [`LockGuard::release`] afterwards returns
    /// [`Error::Lost`] with that reason, and the metrics count it under `hold_limit`. Like
    /// `etcdctl lock --ttl` or Redisson's `leaseTime`, it bounds how long a holder that forgot
    /// the lock (or hangs) keeps others out; a holder that outlives the limit must stop using
    /// the protected resource, and its fencing token is what makes the resource refuse it.
    ///
    /// # Errors
    ///
    /// Those of [`LockClient::lock`]; with a timeout, also [`Error::Timeout`] (as
    /// [`LockClient::lock_timeout`]).
    ///
    /// # Cancel safety
    ///
    /// As [`LockClient::lock`].
    ///
    /// # Panics
    ///
    /// As [`LockClient::lock_timeout`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(client: mqlock::LockClient) -> mqlock::Result<()> {
    /// use std::time::Duration;
    /// use mqlock::LockOptions;
    ///
    /// let options = LockOptions {
    ///     timeout: Some(Duration::from_secs(10)),
    ///     max_hold: Some(Duration::from_secs(60)),
    ///     ..LockOptions::default()
    /// };
    /// let guard = client.lock_with("jobs/nightly", options).await?;
    /// tokio::select! {
    ///     reason = guard.lost() => eprintln!("stopped: {reason}"), // HoldLimit after 60 s
    ///     () = run_job(guard.fencing_token()) => {}
    /// }
    /// # Ok(()) }
    /// # async fn run_job(_token: u64) {}
    /// ```
    pub async fn lock_with(&self, name: &str, options: LockOptions) -> Result<LockGuard> {
        if options.keep.is_some() && options.max_hold.is_some() {
            return Err(Error::Config(format!(
                "lock {name:?}: LockOptions::keep and max_hold cannot be used together"
            )));
        }
        let wait = match options.timeout {
            Some(t) => Wait::Until(Instant::now() + t),
            None => Wait::Forever,
        };
        let ask = Ask {
            max_hold: options.max_hold,
            keep: options.keep,
            ..Ask::default()
        };
        self.acquire_as(name, wait, ask)
            .await
            .map(|g| g.expect("blocking acquire grants or fails"))
    }

    /// Takes every lock of `names` or none, within `timeout` in all; the guards come back in
    /// the order of `names`.
    ///
    /// The locks are acquired one after the other in one global order (the names sorted by
    /// their bytes), so callers that take overlapping sets never wait for each other in a
    /// cycle. On any failure, the deadline included, the locks already taken are released
    /// (this call waits for their releases) and the error is returned. See
    /// [`crate::lock_all`], which this calls, for the rules.
    ///
    /// # Errors
    ///
    /// - [`Error::InvalidName`]: a name is invalid; checked for every name before anything is
    ///   taken.
    /// - [`Error::AlreadyHeld`]: a name appears twice in `names` (checked first), or this
    ///   client already holds or is acquiring one of them.
    /// - [`Error::Timeout`]: `timeout` ran out; the error names the lock being waited for and
    ///   the time waited in all.
    /// - Otherwise those of [`LockClient::lock_timeout`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the acquisition in progress is dropped as [`LockClient::lock`]'s, and the
    /// guards already taken are dropped, which releases them in the background.
    ///
    /// # Panics
    ///
    /// As [`LockClient::lock_timeout`].
    pub async fn lock_all<S: AsRef<str>>(
        &self,
        names: &[S],
        timeout: Duration,
    ) -> Result<Vec<LockGuard>> {
        crate::multi::lock_all(self, names, timeout).await
    }

    /// What the broker can tell about a lock: held or free, how many clients wait, and who
    /// holds it (or held it last).
    ///
    /// Registers nothing and creates no queue: a passive declare of the lock queue, then a
    /// look at the holder record, which is taken for one round trip and put back (tokens never
    /// depend on it: docs/protocol.md, "Holder identity"). Reading the record needs read
    /// permission on the prefix; without it, `holder` is `None`.
    ///
    /// # Errors
    ///
    /// - [`Error::InvalidName`], [`Error::Closed`].
    /// - A failed reconnection: [`Error::Unreachable`], [`Error::AuthRefused`], [`Error::Tls`],
    ///   [`Error::Config`], [`Error::NotOneCluster`] (not retried).
    /// - [`Error::Unreachable`], [`Error::AccessRefused`] or [`Error::Protocol`]: the channel
    ///   failed or the broker refused the declare.
    ///
    /// A missing lock queue is not an error (`exists: false`), nor a record that cannot be
    /// read (`holder: None`).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: nothing is registered. Dropped while it holds the holder record, the
    /// record goes back when lapin closes the dropped channel (asynchronously, one round trip).
    ///
    /// # Panics
    ///
    /// If polled outside a tokio runtime, when it has to reconnect.
    pub async fn status(&self, name: &str) -> Result<LockStatus> {
        let names = queue_names(&self.inner.config.prefix, name)?;
        let conn = self.connection().await?;
        let channel = conn
            .connection
            .create_channel()
            .await
            .map_err(|e| self.fatal(name, &e))?;
        let declared = channel
            .queue_declare(
                names.lock.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        let mut status = match declared {
            Ok(q) => LockStatus {
                name: name.into(),
                queue: names.lock.clone(),
                exists: true,
                consumers: q.consumer_count(),
                ready_messages: q.message_count(),
                holder: None,
            },
            // A passive declare of a missing queue closes the channel with 404.
            Err(e) if matches!(classify(&e), Fault::NotFound(_)) => {
                return Ok(LockStatus {
                    name: name.into(),
                    queue: names.lock,
                    exists: false,
                    consumers: 0,
                    ready_messages: 0,
                    holder: None,
                });
            }
            Err(e) => return Err(self.fatal(name, &e)),
        };
        // The holder record keeps the latest grant's token with its holder's identity. Reading
        // it takes it for one round trip and requeues it. A missing record (404) closes the
        // channel: no holder recorded.
        if let Ok(Some((token, props))) = fence::peek_max(&channel, &names.holder).await {
            status.holder = HolderInfo::from_record(token, &props);
        }
        let _ = channel.close(200, "status".into()).await;
        Ok(status)
    }

    /// Break-glass release: asks the holder of `name` to give the lock up.
    ///
    /// Publishes a break request naming the current grant's fencing token to the lock queue.
    /// The holder — the queue's active consumer — receives it, fires its loss signal with
    /// [`LossReason::Broken`] (who and when) and closes its channel; the next waiter is granted
    /// with a larger token and keeps its place. A request for a grant that already ended is
    /// ignored by whoever receives it. A holder whose process does not run (frozen, its runtime
    /// blocked) cannot act on it; the broker releases such a holder when its heartbeats stop.
    ///
    /// Needs write permission on the default exchange (`amq.default`), through which the request
    /// is published ([`Error::AccessRefused`] names it otherwise); a monitoring user with read
    /// permission only can see `status` but not break.
    /// Returns once the broker confirmed the request, not when the holder acted on it. The
    /// request names the grant the holder record named when the lock was looked at; if that
    /// grant ended in between, the request is ignored and the outcome still says
    /// [`BreakOutcome::Requested`] with the old grant.
    ///
    /// # Errors
    ///
    /// Those of [`LockClient::status`], which it runs first, and:
    ///
    /// - [`Error::AccessRefused`]: no write permission on `amq.default`.
    /// - [`Error::Protocol`]: the lock is held but its holder record shows no holder (taken
    ///   at that moment by another reader, or not yet written by a grant in progress: try
    ///   again), or the broker refused to store the request.
    /// - [`Error::Unreachable`] or [`Error::Protocol`]: the channel failed.
    ///
    /// # Cancel safety
    ///
    /// Dropped while it looks at the lock, as [`LockClient::status`]. Dropped after the
    /// publish, before the confirm, the request may or may not have been published; a
    /// published request takes effect as if the call had returned.
    ///
    /// # Panics
    ///
    /// If polled outside a tokio runtime, when it has to reconnect.
    pub async fn break_lock(&self, name: &str) -> Result<BreakOutcome> {
        let status = self.status(name).await?;
        if !status.exists {
            return Ok(BreakOutcome::Unknown);
        }
        if !status.is_held() {
            return Ok(BreakOutcome::Free {
                last: status.holder,
            });
        }
        let Some(holder) = status.holder else {
            return Err(Error::Protocol {
                name: name.into(),
                addr: self.inner.addr.clone(),
                detail: "the lock is held but its holder record names no holder (read by another client at that moment, or a grant in progress?); try again, or close the holder's connection instead".into(),
            });
        };
        let names = queue_names(&self.inner.config.prefix, name)?;
        let conn = self.connection().await?;
        let by = format!(
            "{}@{} pid {}",
            std::env::var("USER").unwrap_or_else(|_| "unknown".into()),
            crate::identity::host_name(),
            std::process::id()
        );
        let refused = |e: &lapin::Error| match classify(e) {
            Fault::AccessRefused(detail) => Error::AccessRefused {
                name: name.into(),
                addr: conn.addr.clone(),
                detail: format!(
                    "breaking a lock publishes a request to queue {} through the default exchange, which needs write permission on amq.default: {detail}",
                    names.lock
                ),
            },
            _ => self.fatal(name, e),
        };
        let channel = conn
            .connection
            .create_channel()
            .await
            .map_err(|e| self.fatal(name, &e))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| refused(&e))?;
        let confirm = channel
            .basic_publish(
                "".into(),
                names.lock.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                b"",
                break_properties(holder.token, &by, SystemTime::now()),
            )
            .await
            .map_err(|e| refused(&e))?
            .await
            .map_err(|e| refused(&e))?;
        let _ = channel.close(200, "break".into()).await;
        match confirm {
            Confirmation::Ack(None) => Ok(BreakOutcome::Requested { holder }),
            // The queue expired in between: nobody holds it any more.
            Confirmation::Ack(Some(_)) => Ok(BreakOutcome::Unknown),
            _ => Err(Error::Protocol {
                name: name.into(),
                addr: conn.addr.clone(),
                detail: "the broker refused the break request".into(),
            }),
        }
    }

    /// How many locks this client keeps after their guards let go ([`LockOptions::keep`]):
    /// held, and not in use.
    pub fn kept_locks(&self) -> usize {
        self.inner.parking.len()
    }

    /// Closes the client: its connections, for this handle and every clone.
    ///
    /// Held locks are released by the broker, which closes their channels with their connection,
    /// and reported lost ([`LossReason::ConnectionLost`], or [`LossReason::ChannelClosed`] if
    /// the holder notices its channel first); their guards' `release` then returns
    /// [`Error::Lost`]. Acquisitions waiting on the connection end, usually with
    /// [`Error::Closed`] (`try_lock` with `Ok(None)`), and every later acquisition, `status` and
    /// `break_lock` returns [`Error::Closed`]. Closes the connections together and waits at most
    /// 2 s for the broker to confirm their close. Calling it again does nothing.
    ///
    /// # Cancel safety
    ///
    /// The client is marked closed at the first poll, whatever happens next. Dropped before the
    /// close has gone out, the connections may stay open, and their held locks held and renewed,
    /// until their guards and every handle of the client are dropped.
    ///
    /// # Panics
    ///
    /// If polled outside a tokio runtime with its time driver while the client has a
    /// connection to close.
    pub async fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        // Kept locks are released with the rest (their holder tasks close their channels).
        for parked in self.inner.parking.drain() {
            let _ = parked.tx.send(crate::release::Command::Release(None));
        }
        self.close_connections().await;
    }

    fn fatal(&self, name: &str, e: &lapin::Error) -> Error {
        to_error(name, &self.inner.addr, "", classify(e))
    }
}

/// With several broker URLs, refuses a broker that is not in the same cluster as the first one
/// this client used ([`Error::NotOneCluster`]); see `cluster_mark`. A mark that cannot be read
/// (no permission, its queue's node down) is logged and the connection used anyway.
pub(crate) async fn check_mark(
    conn: &Arc<Conn>,
    config: &ClientConfig,
    urls: usize,
    first: &std::sync::Mutex<Option<(String, String)>>,
) -> Result<()> {
    if urls < 2 {
        return Ok(());
    }
    let mark = match cluster_mark::read(&conn.connection, config).await {
        Ok(Some(mark)) => mark,
        Ok(None) => return Ok(()),
        Err(e) => {
            warn!(broker = %conn.addr, error = %e, "cannot read the cluster mark; not checking that the URL list is one cluster");
            return Ok(());
        }
    };
    let mut first = first.lock().unwrap_or_else(|p| p.into_inner());
    match &*first {
        None => *first = Some((mark, conn.addr.clone())),
        Some((seen, _)) if *seen == mark => {}
        Some((_, first_addr)) if *first_addr == conn.addr => {
            // The same broker with a new mark: its state was lost (a reset, a node without its
            // data). Tokens now rise only as far as clocks allow (docs/protocol.md, State loss).
            warn!(broker = %conn.addr, "the broker's cluster mark changed: its state was reset or lost; fencing tokens continue from the clock");
            *first = Some((mark, conn.addr.clone()));
        }
        Some((_, first_addr)) => {
            let err = Error::NotOneCluster {
                first: first_addr.clone(),
                other: conn.addr.clone(),
            };
            conn.kill(LossReason::ConnectionLost(err.to_string()));
            return Err(err);
        }
    }
    Ok(())
}

impl Locker for LockClient {
    fn lock<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<LockGuard>> {
        Box::pin(LockClient::lock(self, name))
    }
    fn try_lock<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<LockGuard>>> {
        Box::pin(LockClient::try_lock(self, name))
    }
    fn lock_timeout<'a>(
        &'a self,
        name: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<LockGuard>> {
        Box::pin(LockClient::lock_timeout(self, name, timeout))
    }
    fn lock_keeping<'a>(
        &'a self,
        name: &'a str,
        timeout: Option<Duration>,
        keep: Duration,
    ) -> BoxFuture<'a, Result<LockGuard>> {
        let options = LockOptions {
            timeout,
            keep: Some(keep),
            ..LockOptions::default()
        };
        Box::pin(LockClient::lock_with(self, name, options))
    }
    fn addr(&self) -> String {
        self.broker_addr().to_owned()
    }
}
