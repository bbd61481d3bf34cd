//! [`LockClient`]: the RabbitMQ implementation of [`Locker`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::future::{join, join3};
use lapin::Channel;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::uri::AMQPUri;
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use crate::cluster_mark;
use crate::config::ClientConfig;
use crate::connection::{Conn, display_addr, parse_urls};
use crate::error::{Error, Result};
use crate::fence::{self, FenceError};
use crate::guard::{BoxFuture, LockGuard, LossReason, LossSignal};
use crate::hold::{Holder, publish_renewal, renewal_id, renewal_prefix};
use crate::lease::Lease;
use crate::locker::Locker;
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::name::{QueueNames, queue_names};
use crate::protocol::{
    Fault, PREFETCH, classify, common_args, lock_queue_args, stamp, wake_properties,
};

/// A lock client: one broker connection shared by every lock taken through it.
///
/// Cheap to clone (clones share the connection and the metrics). The connection is opened by
/// [`LockClient::connect`] and reopened on demand after it fails; locks held on a failed
/// connection are reported lost (see [`LockGuard::lost`]).
#[derive(Clone)]
pub struct LockClient {
    inner: Arc<Inner>,
}

struct Inner {
    config: ClientConfig,
    uris: Vec<AMQPUri>,
    addr: String,
    conn: Mutex<Option<Arc<Conn>>>,
    metrics: Arc<Metrics>,
    closed: AtomicBool,
    tag_prefix: String,
    tag_seq: AtomicU64,
    /// A lock channel being opened ahead of the next acquisition (see `lock_channel`).
    spare: std::sync::Mutex<Option<Spare>>,
    /// With several broker URLs: the cluster mark of the first broker connected to, and its
    /// address (see `check_mark`).
    first_mark: std::sync::Mutex<Option<(String, String)>>,
}

/// A channel opened in the background, with `basic.qos` and `confirm.select` done, on `conn`.
struct Spare {
    conn: Arc<Conn>,
    channel: tokio::task::JoinHandle<lapin::Result<Channel>>,
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
    /// Whether the lock queue exists (it is created on first use and expires when idle).
    pub exists: bool,
    /// Consumers registered on the lock queue: the holder (or a client being granted) and
    /// its waiters. On quorum queues RabbitMQ may under-report waiters.
    pub consumers: u32,
    /// Wake-ups ready in the lock queue (not a count of waiters).
    pub ready_messages: u32,
}

impl LockStatus {
    /// Whether some client holds the lock or is being granted it.
    pub fn is_held(&self) -> bool {
        self.consumers > 0
    }
    /// Clients waiting behind the holder (exact on classic queues).
    pub fn waiters(&self) -> u32 {
        self.consumers.saturating_sub(1)
    }
}

/// How long a waiter whose connection failed keeps trying to reconnect.
const RECONNECT_WINDOW: Duration = Duration::from_secs(60);

/// How an acquisition waits.
#[derive(Clone, Copy)]
enum Wait {
    Forever,
    Until(Instant),
    Try,
}

/// Why one attempt ended without a grant.
enum Retry {
    /// Transient (connection lost, queue expired in between): try again.
    Again(String),
    /// Final.
    Fail(Error),
}

impl LockClient {
    /// Connects to the broker.
    ///
    /// `url` is an AMQP URL (`amqp://user:pass@host:5672/vhost`), or several separated by
    /// commas, tried in turn. The heartbeat of [`ClientConfig`] overrides one in the URL.
    ///
    /// Errors: [`Error::InvalidUrl`], [`Error::Config`], [`Error::Unreachable`],
    /// [`Error::AuthRefused`]. Cancel safe.
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
                conn: Mutex::new(Some(conn)),
                metrics: Arc::new(Metrics::default()),
                closed: AtomicBool::new(false),
                tag_prefix: format!("mqlock.{}.{now:x}", std::process::id()),
                tag_seq: AtomicU64::new(0),
                spare: std::sync::Mutex::new(None),
                first_mark,
            }),
        })
    }

    /// The broker address(es), as `host:port/vhost` (never the credentials).
    pub fn broker_addr(&self) -> &str {
        &self.inner.addr
    }

    /// The client's configuration.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// The article's figures of merit for this client: request rate R, release rate S, wait
    /// time T.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.inner.metrics.snapshot()
    }

    /// Waits until the lock is granted. Waiters are granted in the order they started waiting.
    ///
    /// Cancel safe: dropping the future at any point leaves no consumer and no token behind.
    /// If the connection fails while waiting, the client reconnects and waits again (at the
    /// back of the queue).
    pub async fn lock(&self, name: &str) -> Result<LockGuard> {
        self.acquire(name, Wait::Forever)
            .await
            .map(|g| g.expect("blocking acquire grants"))
    }

    /// Waits up to `timeout` for the lock; [`Error::Timeout`] after that. Cancel safe.
    pub async fn lock_timeout(&self, name: &str, timeout: Duration) -> Result<LockGuard> {
        self.acquire(name, Wait::Until(Instant::now() + timeout))
            .await
            .map(|g| g.expect("timed acquire grants or fails"))
    }

    /// Takes the lock if no other client holds it or waits for it; `Ok(None)` otherwise.
    ///
    /// When the lock looks free, waits up to [`ClientConfig::try_window`] for the broker's
    /// hand-over; if another client registered at the same instant and won, returns
    /// `Ok(None)`. Cancel safe.
    pub async fn try_lock(&self, name: &str) -> Result<Option<LockGuard>> {
        self.acquire(name, Wait::Try).await
    }

    /// What the broker can tell about a lock: held or free, and how many clients wait.
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
        let status = match declared {
            Ok(q) => LockStatus {
                name: name.into(),
                queue: names.lock,
                exists: true,
                consumers: q.consumer_count(),
                ready_messages: q.message_count(),
            },
            // A passive declare of a missing queue closes the channel with 404.
            Err(e) if matches!(classify(&e), Fault::NotFound(_)) => LockStatus {
                name: name.into(),
                queue: names.lock,
                exists: false,
                consumers: 0,
                ready_messages: 0,
            },
            Err(e) => return Err(self.fatal(name, &e)),
        };
        let _ = channel.close(200, "status".into()).await;
        Ok(status)
    }

    /// Closes the connection. Held locks are released by the broker and reported lost.
    pub async fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        if let Some(conn) = self.inner.conn.lock().await.take() {
            conn.close().await;
        }
    }

    async fn connection(&self) -> Result<Arc<Conn>> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        let mut slot = self.inner.conn.lock().await;
        if let Some(conn) = slot.as_ref().filter(|c| c.is_alive()) {
            return Ok(conn.clone());
        }
        if slot.take().is_some() {
            info!(broker = %self.inner.addr, "reconnecting");
        }
        let conn = Conn::open(&self.inner.uris, &self.inner.config).await?;
        check_mark(
            &conn,
            &self.inner.config,
            self.inner.uris.len(),
            &self.inner.first_mark,
        )
        .await?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    fn fatal(&self, name: &str, e: &lapin::Error) -> Error {
        to_error(name, &self.inner.addr, "", classify(e))
    }

    async fn acquire(&self, name: &str, wait: Wait) -> Result<Option<LockGuard>> {
        let names = queue_names(&self.inner.config.prefix, name)?;
        let metrics = &self.inner.metrics;
        metrics.requested();
        let started = Instant::now();
        let mut backoff = Duration::from_millis(20);
        let mut attempts = 0u32;
        // Set at the first interruption: how long a waiter keeps reconnecting (a broker
        // restart) before it reports the broker unreachable.
        let mut reconnect_until: Option<Instant> = None;
        loop {
            attempts += 1;
            // Opening a connection may take seconds (TCP connect and handshake timeouts); a
            // timed acquisition must not outlive its deadline there either.
            let connected = match wait {
                Wait::Until(deadline) => {
                    match tokio::time::timeout_at(deadline.into(), self.connection()).await {
                        Ok(connected) => connected,
                        Err(_) => {
                            metrics.timed_out();
                            return Err(Error::Timeout {
                                name: name.into(),
                                addr: self.inner.addr.clone(),
                                waited: started.elapsed(),
                            });
                        }
                    }
                }
                _ => self.connection().await,
            };
            let conn = match connected {
                Ok(c) => c,
                Err(e @ (Error::Unreachable { .. } | Error::AuthRefused { .. }))
                    if reconnect_until.is_some_and(|t| Instant::now() < t)
                        && !matches!(wait, Wait::Try) =>
                {
                    if let Wait::Until(deadline) = wait
                        && Instant::now() + backoff >= deadline
                    {
                        metrics.timed_out();
                        return Err(Error::Timeout {
                            name: name.into(),
                            addr: self.inner.addr.clone(),
                            waited: started.elapsed(),
                        });
                    }
                    debug!(lock = name, error = %e, "broker still unreachable; waiting to reconnect");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
                Err(e) => return Err(e),
            };
            // Every step of an attempt (channel, declare, fence write, reconnects) counts
            // against the caller's deadline, not only the wait for the first delivery.
            let attempt = self.attempt(&conn, name, &names, wait, started);
            let outcome = match wait {
                Wait::Until(deadline) => tokio::time::timeout_at(deadline.into(), attempt)
                    .await
                    .unwrap_or_else(|_| {
                        Err(Retry::Fail(Error::Timeout {
                            name: name.into(),
                            addr: conn.addr.clone(),
                            waited: started.elapsed(),
                        }))
                    }),
                Wait::Try => tokio::time::timeout_at(
                    (started + 2 * self.inner.config.try_window).into(),
                    attempt,
                )
                .await
                .unwrap_or(Ok(None)),
                Wait::Forever => attempt.await,
            };
            match outcome {
                Ok(Some(guard)) => {
                    metrics.granted(started.elapsed());
                    return Ok(Some(guard));
                }
                Ok(None) => {
                    metrics.found_busy();
                    return Ok(None);
                }
                Err(Retry::Fail(e)) => {
                    if matches!(e, Error::Timeout { .. }) {
                        metrics.timed_out();
                    }
                    return Err(e);
                }
                Err(Retry::Again(why)) => {
                    reconnect_until.get_or_insert_with(|| Instant::now() + RECONNECT_WINDOW);
                    warn!(lock = name, broker = %conn.addr, reason = %why, attempt = attempts, "acquisition interrupted; retrying");
                    if attempts >= 200 {
                        return Err(Error::Protocol {
                            name: name.into(),
                            addr: conn.addr.clone(),
                            detail: format!("gave up after {attempts} attempts; last: {why}"),
                        });
                    }
                    let pause = match wait {
                        Wait::Until(deadline) if Instant::now() + backoff >= deadline => {
                            metrics.timed_out();
                            return Err(Error::Timeout {
                                name: name.into(),
                                addr: conn.addr.clone(),
                                waited: started.elapsed(),
                            });
                        }
                        Wait::Try => return Ok(None),
                        _ => backoff,
                    };
                    tokio::time::sleep(pause).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// A fresh channel for one acquisition, set up as a lock channel needs.
    ///
    /// Release closes a lock's channel, so every acquisition needs a new one; opening it and
    /// setting it up costs two round trips. The client opens the next one in the background
    /// after each grant (see `prepare_spare`), so an acquisition usually finds it ready.
    /// Cancel safe: a channel whose taker was dropped is closed when the background task's
    /// result is dropped.
    async fn lock_channel(&self, conn: &Arc<Conn>) -> lapin::Result<Channel> {
        let taken = {
            let mut slot = self.inner.spare.lock().unwrap_or_else(|p| p.into_inner());
            slot.take().filter(|s| Arc::ptr_eq(&s.conn, conn))
        };
        if let Some(spare) = taken
            && let Ok(Ok(channel)) = spare.channel.await
            && channel.status().connected()
        {
            return Ok(channel);
        }
        open_lock_channel(conn).await
    }

    /// Starts opening the next acquisition's channel on `conn`, unless one is on its way.
    ///
    /// Called after a grant rather than when a spare is taken: opened during an acquisition,
    /// the spare's round trips queue on the same connection and broker ahead of that
    /// acquisition's own (measured: about 1.3 ms instead of 0.9 ms per uncontended grant).
    fn prepare_spare(&self, conn: &Arc<Conn>) {
        let mut slot = self.inner.spare.lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_some_and(|s| Arc::ptr_eq(&s.conn, conn)) {
            return;
        }
        let next = conn.clone();
        *slot = Some(Spare {
            conn: conn.clone(),
            channel: tokio::spawn(async move { open_lock_channel(&next).await }),
        });
    }

    /// One registration on the lock queue, from declaring it to the grant.
    ///
    /// Everything lives in this future's locals: dropping it drops the channel, which the
    /// broker treats like a crash (consumer removed, deliveries requeued).
    async fn attempt(
        &self,
        conn: &Arc<Conn>,
        name: &str,
        names: &QueueNames,
        wait: Wait,
        started: Instant,
    ) -> std::result::Result<Option<LockGuard>, Retry> {
        let config = &self.inner.config;
        let fail = |e: &lapin::Error| match classify(e) {
            Fault::Connection(d) => {
                conn.kill(LossReason::ConnectionLost(d.clone()));
                Retry::Again(d)
            }
            Fault::NotFound(d) | Fault::ConsumerTimeout(d) => Retry::Again(d),
            fault => Retry::Fail(to_error(name, &conn.addr, &names.lock, fault)),
        };
        // A register declared by mqlock 0.1 had a length limit; the broker refuses the new
        // arguments on it (406), never silently: name the queue and the way out.
        let fail_register = |e: &lapin::Error| match classify(e) {
            Fault::Precondition(detail) => Retry::Fail(Error::IncompatibleQueue {
                name: name.into(),
                queue: names.fence.clone(),
                addr: conn.addr.clone(),
                detail: format!(
                    "{detail}; if mqlock 0.1 declared it (x-max-length = 1), stop the old clients of this lock and delete the queue (rabbitmqctl delete_queue {}), or let it expire after idle_expiry",
                    names.fence
                ),
            }),
            _ => fail(e),
        };
        let channel = self.lock_channel(conn).await.map_err(|e| fail(&e))?;
        // From here on, dropping this future closes the channel (see `Registration`).
        let mut reg = Registration {
            channel: Some(channel.clone()),
            consumer: None,
        };

        let declare = channel.queue_declare(
            names.lock.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            lock_queue_args(config),
        );
        let tag = format!(
            "{}.{}",
            self.inner.tag_prefix,
            self.inner.tag_seq.fetch_add(1, Ordering::Relaxed)
        );
        let consume = channel.basic_consume(
            names.lock.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        );
        // Declaring the fence register now, while waiting, takes its declaration off the path
        // after the grant (`fence::record`); declaring changes no value in it.
        let declare_register = channel.queue_declare(
            names.fence.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            fence::register_args(common_args(config)),
        );
        // The declare is answered before our consumer exists, so its counts are about others.
        let queue = if let Wait::Try = wait {
            let queue = declare.await.map_err(|e| fail(&e))?;
            if queue.consumer_count() > 0 {
                // Someone registered before us holds the lock or will get it first.
                return Ok(None);
            }
            let (consumed, register) = join(consume, declare_register).await;
            reg.consumer = Some(registered(consumed, register, &fail, &fail_register)?);
            queue
        } else {
            let (declared, consumed, register) = join3(declare, consume, declare_register).await;
            let queue = declared.map_err(|e| fail(&e))?;
            reg.consumer = Some(registered(consumed, register, &fail, &fail_register)?);
            queue
        };
        let register_declared = Instant::now();
        // No consumer and no ready message: the lock has no token yet (new queue) or lost it,
        // so mint one. Two clients may both mint; the holder acks extras away.
        let publish_wake = || {
            channel.basic_publish(
                "".into(),
                names.lock.as_str().into(),
                BasicPublishOptions::default(),
                b"",
                wake_properties(),
            )
        };
        if queue.consumer_count() == 0 && queue.message_count() == 0 {
            publish_wake().await.map_err(|e| fail(&e))?;
        }
        let consumer = reg.consumer.as_mut().expect("consumer set");

        let deadline = match wait {
            Wait::Forever => None,
            Wait::Until(d) => Some(d),
            Wait::Try => Some(Instant::now() + config.try_window),
        };
        let mut nudge = tokio::time::interval_at(
            tokio::time::Instant::now() + config.nudge_interval,
            config.nudge_interval,
        );
        let token = loop {
            tokio::select! {
                delivery = consumer.next() => match delivery {
                    Some(Ok(d)) => break d,
                    Some(Err(e)) => return Err(fail(&e)),
                    None => return Err(Retry::Again("the broker cancelled the waiting consumer".into())),
                },
                reason = conn.dead() => return Err(Retry::Again(reason.to_string())),
                _ = nudge.tick() => {
                    debug!(lock = name, "still waiting; publishing another wake-up");
                    publish_wake().await.map_err(|e| fail(&e))?;
                }
                _ = sleep_until_opt(deadline) => {
                    return match wait {
                        Wait::Try => Ok(None),
                        _ => Err(Retry::Fail(Error::Timeout {
                            name: name.into(),
                            addr: conn.addr.clone(),
                            waited: started.elapsed(),
                        })),
                    };
                }
            }
        };
        // First delivery: the broker made us the active consumer (`v2::Receive`, then
        // `v2::ReadFence` .. `v2::Grant` in docs/model.md).
        // Choose the token (one round trip), then store it and renew the lock's lease in one
        // more: the guard is returned only once the register and the lock queue confirmed both,
        // and while the lease that the lock queue's confirm started is still valid.
        // An idle register expires `idle_expiry` after its last use; ours was a moment ago unless
        // the wait was long.
        let register_fresh = register_declared.elapsed() < config.idle_expiry / 2;
        let fence_fail = |e: FenceError| match e {
            FenceError::Amqp(e) => fail(&e),
            // The token was never used: closing this registration hands the lock on, and
            // the retry registers again.
            FenceError::Transient(d) => Retry::Again(d),
            FenceError::Refused(d) => Retry::Fail(Error::Protocol {
                name: name.into(),
                addr: conn.addr.clone(),
                detail: d,
            }),
        };
        let draft = fence::draft(
            &channel,
            names,
            config,
            register_fresh,
            stamp(&token.properties),
        )
        .await
        .map_err(fence_fail)?;
        let fence = draft.token;
        let lease = Arc::new(Lease::with_clock(config.clock.clone(), conn.lease_margin));
        let first_renewal = renewal_id(&tag, 0);
        let (committed, published) = join(
            draft.commit(&channel, names),
            publish_renewal(&channel, &names.lock, &lease, first_renewal.clone(), fence),
        )
        .await;
        committed.map_err(fence_fail)?;
        let sent = published.map_err(|e| fail(&e))?;
        // The lease starts when the renewal comes back to us: the lock queue still had us as its
        // active consumer after `sent` (docs/protocol.md, "Lease").
        let consumer = reg.consumer.as_mut().expect("consumer set");
        let own_prefix = renewal_prefix(&tag);
        let renewal = tokio::select! {
            renewal = own_delivery(consumer, &own_prefix, &first_renewal) => renewal.map_err(|e| match e {
                Some(e) => fail(&e),
                None => Retry::Again("the broker took the lock back during the grant".into()),
            })?,
            // Slower than the lease: the lock may already have been handed on (L2).
            _ = lease.expired() => {
                return Err(Retry::Again(format!(
                    "the grant took longer than the lease of {:?}",
                    conn.lease_margin
                )));
            }
        };
        lease.extend_to(sent + conn.lease_margin);
        self.inner.metrics.renewed();
        if !lease.is_valid() {
            return Err(Retry::Again(format!(
                "the grant took longer than the lease of {:?}",
                conn.lease_margin
            )));
        }
        // The renewal is the token now; the delivery that granted us is not needed.
        let _ = token.acker.ack(BasicAckOptions::default()).await;
        let token = renewal;
        debug!(lock = name, fence, waited = ?started.elapsed(), "granted");
        self.prepare_spare(conn);

        let signal = LossSignal::new(Some(lease.clone()));
        let name: Arc<str> = Arc::from(name);
        let (channel, consumer) = reg.disarm();
        let handle = Holder {
            name: name.clone(),
            lock_queue: names.lock.clone(),
            fence_queue: names.fence.clone(),
            fence_args: fence::register_args(common_args(config)),
            tag,
            channel,
            consumer,
            token,
            fencing_token: fence,
            renewals: 0,
            lease,
            signal: signal.clone(),
            conn: conn.clone(),
            renew_interval: config.renew_interval,
            metrics: self.inner.metrics.clone(),
        }
        .spawn();
        Ok(Some(LockGuard::new(name, fence, signal, Box::new(handle))))
    }
}

/// With several broker URLs, refuses a broker that is not in the same cluster as the first one
/// this client used ([`Error::NotOneCluster`]); see `cluster_mark`. A mark that cannot be read
/// (no permission, its queue's node down) is logged and the connection used anyway.
async fn check_mark(
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

async fn open_lock_channel(conn: &Conn) -> lapin::Result<Channel> {
    let channel = conn.connection.create_channel().await?;
    let (qos, confirm) = join(
        channel.basic_qos(PREFETCH, BasicQosOptions::default()),
        channel.confirm_select(ConfirmSelectOptions::default()),
    )
    .await;
    qos.and(confirm)?;
    Ok(channel)
}

/// A registration on a lock queue that is not (yet) a grant.
///
/// If the acquisition is dropped, the channel is closed *before* the consumer is dropped:
/// lapin cancels a dropped consumer with `basic.cancel`, and on RabbitMQ 3.10.8 cancelling the
/// active consumer of a classic single-active-consumer queue, followed by any publish, can
/// crash the queue (rabbitmq-server #5460; docs/protocol.md). Closing the channel switches the
/// active consumer in one step that also feeds it.
struct Registration {
    channel: Option<Channel>,
    consumer: Option<lapin::Consumer>,
}

impl Registration {
    fn disarm(&mut self) -> (Channel, lapin::Consumer) {
        (
            self.channel.take().expect("channel set"),
            self.consumer.take().expect("consumer set"),
        )
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let (Some(channel), consumer) = (self.channel.take(), self.consumer.take()) else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    let _ = channel.close(200, "acquisition abandoned".into()).await;
                    drop(consumer);
                });
            }
            // No runtime: lapin closes the channel when both handles are gone.
            Err(_) => drop((consumer, channel)),
        }
    }
}

/// The consumer of a registration whose register declaration was pipelined with it.
///
/// A register the broker refuses (406) closes the channel, which fails the consume too: the
/// refusal is the cause to report. (A consumer on a channel the broker closed sends no cancel.)
fn registered<T>(
    consumed: lapin::Result<lapin::Consumer>,
    register: lapin::Result<T>,
    fail: &impl Fn(&lapin::Error) -> Retry,
    fail_register: &impl Fn(&lapin::Error) -> Retry,
) -> std::result::Result<lapin::Consumer, Retry> {
    if let Err(e) = &register
        && matches!(classify(e), Fault::Precondition(_))
    {
        return Err(fail_register(e));
    }
    let consumer = consumed.map_err(|e| fail(&e))?;
    register.map_err(|e| fail_register(&e))?;
    Ok(consumer)
}

/// Waits for our renewal `id` on the consumer, acking what arrives before it (wake-ups, earlier
/// holders' renewals). `Err(None)`: one of our renewals came back redelivered, so the broker
/// took the lock from us already; `Err(Some(e))`: the channel failed.
async fn own_delivery(
    consumer: &mut lapin::Consumer,
    own_prefix: &str,
    id: &str,
) -> std::result::Result<lapin::message::Delivery, Option<lapin::Error>> {
    loop {
        let d = match consumer.next().await {
            Some(Ok(d)) => d,
            Some(Err(e)) => return Err(Some(e)),
            None => return Err(None),
        };
        let d_id = d
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_owned());
        match d_id {
            Some(ref i) if i == id && !d.redelivered => return Ok(d),
            Some(ref i) if i.starts_with(own_prefix) && d.redelivered => return Err(None),
            _ => {
                let _ = d.acker.ack(BasicAckOptions::default()).await;
            }
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

fn to_error(name: &str, addr: &str, queue: &str, fault: Fault) -> Error {
    match fault {
        Fault::Precondition(detail) => Error::IncompatibleQueue {
            name: name.into(),
            queue: queue.into(),
            addr: addr.into(),
            detail,
        },
        Fault::AccessRefused(detail) => Error::AccessRefused {
            name: name.into(),
            addr: addr.into(),
            detail,
        },
        Fault::Connection(detail) => Error::Unreachable {
            addr: addr.into(),
            detail,
        },
        Fault::NotFound(detail) | Fault::ConsumerTimeout(detail) | Fault::Other(detail) => {
            Error::Protocol {
                name: name.into(),
                addr: addr.into(),
                detail,
            }
        }
    }
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
}
