//! Acquire (docs/protocol.md, "Acquire"): from a call to `lock()` to the first delivery, with
//! the retries, deadlines and reconnections around it. What follows the first delivery is in
//! `grant.rs`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::future::{join, join3};

use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use tracing::{debug, warn};

use crate::claim::NameClaim;
use crate::client::{LockClient, Spare};
use crate::connection::Conn;
use crate::error::{Error, Result};
use crate::fence;
use crate::guard::LockGuard;
use crate::identity;
use crate::kind::{Found, LockKind};
use crate::loss::LossReason;
use crate::metrics::Metrics;
use crate::name::{QueueNames, queue_names};
use crate::pool::ChannelPermit;
use crate::protocol::{
    Fault, PREFETCH, break_request, classify, lock_queue_args, stamp, wake_properties,
    wanted_by_another,
};

/// How long a waiter whose connection failed keeps trying to reconnect.
const RECONNECT_WINDOW: Duration = Duration::from_secs(60);

/// How an acquisition waits.
#[derive(Clone, Copy)]
pub(crate) enum Wait {
    Forever,
    Until(Instant),
    Try,
}

/// Why one attempt ended without a grant.
pub(crate) enum Retry {
    /// Transient (connection lost, queue expired in between): try again.
    Again(String),
    /// Final.
    Fail(Error),
}

/// A registration that received its first delivery: the broker made it the active consumer.
pub(crate) struct Candidate {
    pub(crate) reg: Registration,
    /// The consumer tag, unique per acquisition; the holder's renewal ids start with it.
    pub(crate) tag: String,
    /// The delivery that made us the holder.
    pub(crate) first: Delivery,
    /// When the acquisition started (for the wait time).
    pub(crate) started: Instant,
}

/// What an acquisition carries to its grant's holder: the hold limit, the value a campaign
/// records with the holder's identity (`election.rs`), and the client's claim on the name
/// (`claim.rs`), which the grant moves into the guard's release handle.
pub(crate) struct HoldTerms {
    pub(crate) max_hold: Option<Duration>,
    pub(crate) value: Option<String>,
    pub(crate) claim: Option<NameClaim>,
    pub(crate) keep: Option<Duration>,
    pub(crate) kind: LockKind,
    pub(crate) sibling: Option<Sibling>,
}

/// What a caller asks of one acquisition beyond the name and the wait.
#[derive(Default)]
pub(crate) struct Ask {
    pub(crate) max_hold: Option<Duration>,
    pub(crate) value: Option<String>,
    /// `LockOptions::keep`.
    pub(crate) keep: Option<Duration>,
    /// The kind the lock queue is declared as (`kind.rs`).
    pub(crate) kind: Option<LockKind>,
    /// Set when this acquisition is one of several registrations of a semaphore's acquisition
    /// (`semaphore.rs`), which counts the metrics once for all of them.
    pub(crate) sibling: Option<Sibling>,
}

/// How the registrations of one semaphore acquisition cooperate.
pub(crate) struct Sibling {
    /// Taken from the first delivery to the end of the grant: one grant at a time among the
    /// registrations; the acquisition keeps the first that completes and drops the others.
    pub(crate) turn: Arc<tokio::sync::Mutex<()>>,
    /// Fired once the broker accepted the lock queue's declaration, kind mark included.
    pub(crate) declared: Option<tokio::sync::oneshot::Sender<()>>,
}

impl LockClient {
    pub(crate) async fn acquire(
        &self,
        name: &str,
        wait: Wait,
        max_hold: Option<Duration>,
        value: Option<String>,
    ) -> Result<Option<LockGuard>> {
        let ask = Ask {
            max_hold,
            value,
            ..Ask::default()
        };
        self.acquire_as(name, wait, ask).await
    }

    pub(crate) async fn acquire_as(
        &self,
        name: &str,
        wait: Wait,
        ask: Ask,
    ) -> Result<Option<LockGuard>> {
        let names = queue_names(&self.inner.config.prefix, name)?;
        // A lock this client kept after its last use (`park.rs`) is still held: taken back at
        // once, with its grant's token, unless it was lost meanwhile (then it is dropped, and
        // the acquisition below gets a larger token), or another client waits for it (then it
        // is released, and the acquisition below queues behind that client: a process that
        // uses the lock again and again would otherwise keep it from a waiter for good).
        if let Some(mut parked) = self.inner.parking.take(name) {
            let wanted = parked.wanted.load(std::sync::atomic::Ordering::Acquire);
            if parked.signal.reason().is_none()
                && !wanted
                && ask.kind.is_none()
                && ask.sibling.is_none()
            {
                let _ = parked.tx.send(crate::release::Command::Unpark);
                parked.keep = ask.keep;
                self.inner.metrics.requested();
                self.inner.metrics.granted(Duration::ZERO);
                let (token, signal) = (parked.token, parked.signal.clone());
                return Ok(Some(LockGuard::new(name, token, signal, Box::new(parked))));
            }
            drop(parked);
        }
        // One acquisition per name and client: a second consumer of this client would wait
        // behind the first. Given back when this future ends without a grant (or is dropped);
        // a grant moves it into the guard's release handle.
        let mut terms = HoldTerms {
            max_hold: ask.max_hold,
            value: ask.value,
            keep: ask.keep,
            claim: Some(self.inner.claims.claim(name)?),
            kind: ask.kind.unwrap_or(LockKind::Mutex),
            sibling: ask.sibling,
        };
        let metrics = Counts(terms.sibling.is_none().then_some(&*self.inner.metrics));
        metrics.requested();
        let started = Instant::now();
        let mut backoff = Duration::from_millis(20);
        let mut attempts = 0u32;
        // Set at the first interruption: how long a waiter keeps reconnecting (a broker
        // restart) before it reports the broker unreachable.
        let mut reconnect_until: Option<Instant> = None;
        loop {
            attempts += 1;
            // A place for the lock channel on a connection with room (`pool.rs`). Opening a
            // connection may take seconds (TCP connect and handshake timeouts); a timed
            // acquisition must not outlive its deadline there either.
            let connected = match wait {
                Wait::Until(deadline) => {
                    match tokio::time::timeout_at(deadline.into(), self.lock_connection()).await {
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
                _ => self.lock_connection().await,
            };
            let permit = match connected {
                Ok(p) => p,
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
            let conn = permit.conn().clone();
            // Every step of an attempt (channel, declare, fence write, reconnects) counts
            // against the caller's deadline, not only the wait for the first delivery.
            let attempt = self.attempt(&conn, permit, name, &names, wait, started, &mut terms);
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

    /// A fresh channel for one acquisition, set up as a lock channel needs, on the connection
    /// `permit` holds a place on (`pool.rs`).
    ///
    /// Release closes a lock's channel, so every acquisition needs a new one; opening it and
    /// setting it up costs two round trips. The client opens the next one in the background
    /// after each grant (see `prepare_spare`), so an acquisition usually finds it ready; it
    /// then gives the permit's place back, the spare having one of its own.
    /// Cancel safe: a channel whose taker was dropped is closed when the background task's
    /// result is dropped.
    async fn lock_channel(&self, permit: ChannelPermit) -> lapin::Result<Channel> {
        let conn = permit.conn().clone();
        let taken = {
            let mut slot = self.inner.spare.lock().unwrap_or_else(|p| p.into_inner());
            slot.take().filter(|s| Arc::ptr_eq(&s.conn, &conn))
        };
        if let Some(spare) = taken
            && let Ok(Ok(channel)) = spare.channel.await
            && channel.status().connected()
        {
            return Ok(channel);
        }
        let opened = open_lock_channel(permit).await;
        if let Err(e) = &opened
            && matches!(e.kind(), lapin::ErrorKind::ChannelsLimitReached)
        {
            // Short-lived channels (`status`, `break_lock`) took more than the reserve: choose
            // another connection (the caller retries).
            conn.lock_channels.saturate();
        }
        opened
    }

    /// Starts opening the next acquisition's channel on `conn`, unless one is on its way or
    /// `conn` has no room left for it (`pool.rs`; the next acquisition then goes to another
    /// connection, which gets the next spare).
    ///
    /// Called after a grant rather than when a spare is taken: opened during an acquisition,
    /// the spare's round trips queue on the same connection and broker ahead of that
    /// acquisition's own (measured: about 1.3 ms instead of 0.9 ms per uncontended grant).
    pub(crate) fn prepare_spare(&self, conn: &Arc<Conn>) {
        let mut slot = self.inner.spare.lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_some_and(|s| Arc::ptr_eq(&s.conn, conn)) {
            return;
        }
        let Some(permit) = ChannelPermit::reserve(conn) else {
            return;
        };
        *slot = Some(Spare {
            conn: conn.clone(),
            channel: tokio::spawn(open_lock_channel(permit)),
        });
    }

    /// One registration on the lock queue, from declaring it to the grant: the channel, the
    /// declarations, the consumer and the wake-up of an idle queue are `v2::Acquire` in
    /// docs/model.md, the wake-up every `nudge_interval` is `v2::Nudge`.
    ///
    /// Everything lives in this future's locals: dropping it drops the channel, which the
    /// broker treats like a crash (consumer removed, deliveries requeued).
    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        &self,
        conn: &Arc<Conn>,
        permit: ChannelPermit,
        name: &str,
        names: &QueueNames,
        wait: Wait,
        started: Instant,
        terms: &mut HoldTerms,
    ) -> std::result::Result<Option<LockGuard>, Retry> {
        let config = &self.inner.config;
        let kind = terms.kind;
        let fail = |e: &lapin::Error| match classify(e) {
            Fault::Connection(d) => {
                conn.kill(LossReason::ConnectionLost(d.clone()));
                Retry::Again(d)
            }
            Fault::NotFound(d) | Fault::ConsumerTimeout(d) => Retry::Again(d),
            Fault::Precondition(d) if let Some(found) = LockKind::from_refusal(&d) => {
                Retry::Fail(match found {
                    Found::Kind(found) => Error::KindMismatch {
                        name: name.into(),
                        addr: conn.addr.clone(),
                        wanted: kind,
                        found: Some(found),
                    },
                    Found::Unknown => Error::KindMismatch {
                        name: name.into(),
                        addr: conn.addr.clone(),
                        wanted: kind,
                        found: None,
                    },
                    // Never a silent mix: the two protocols count tokens differently.
                    Found::EarlierProtocol => Error::IncompatibleQueue {
                        name: name.into(),
                        queue: names.lock.clone(),
                        addr: conn.addr.clone(),
                        detail: format!(
                            "{d}; the queue was declared by an earlier mqlock (protocol 2, with a fence register per lock), whose clients must not share a lock with this version: stop them, then delete the queue (rabbitmqctl delete_queue {}) or let it expire after idle_expiry",
                            names.lock
                        ),
                    },
                })
            }
            fault => Retry::Fail(to_error(name, &conn.addr, &names.lock, fault)),
        };
        // A holder record or epoch queue the broker refuses (406): name the queue.
        let fail_register = |(queue, e): &(String, lapin::Error)| match classify(e) {
            Fault::Precondition(detail) => Retry::Fail(Error::IncompatibleQueue {
                name: name.into(),
                queue: queue.clone(),
                addr: conn.addr.clone(),
                detail: format!(
                    "{detail}; clients of one lock must agree on queue type and idle expiry; stop the other clients of this lock and delete the queue (rabbitmqctl delete_queue {queue}), or let it expire after idle_expiry"
                ),
            }),
            _ => fail(e),
        };
        let channel = self
            .lock_channel(permit)
            .await
            .map_err(|e| match e.kind() {
                lapin::ErrorKind::ChannelsLimitReached => Retry::Again(e.to_string()),
                _ => fail(&e),
            })?;
        // From here on, dropping this future closes the channel (see `Registration`).
        let mut reg = Registration {
            channel: Some(channel.clone()),
            consumer: None,
        };

        let mut args = lock_queue_args(config);
        kind.mark(&mut args);
        let declare = channel.queue_declare(
            names.lock.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
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
        // The epoch queue and the holder record are declared with every acquisition, pipelined,
        // so that their idle expiry restarts with every use of the lock: the epoch, written only
        // when an epoch starts, would otherwise expire an hour after that while the lock is in
        // use, and a broker restart would then leave only the clock (F3).
        let declare_one = |queue: &str, args: FieldTable| {
            let queue = queue.to_owned();
            let declared = channel.queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            );
            async move { declared.await.map(drop).map_err(|e| (queue, e)) }
        };
        // Declared by this client less than half an idle expiry ago, they cannot have expired
        // since: skipping them takes two broker operations off the acquisition (the lock queue is
        // still declared every time: its declaration checks the kind and the protocol, K1).
        let refresh = !self.inner.declared.fresh(name, config.idle_expiry / 2);
        let declare_register = async {
            if !refresh {
                return Ok(());
            }
            let (epoch, record) = join(
                declare_one(&names.epoch, fence::epoch_args(config)),
                declare_one(&names.holder, identity::record_args(config)),
            )
            .await;
            epoch.and(record)?;
            self.inner.declared.mark(name);
            Ok(())
        };
        // The declare is answered before our consumer exists, so its counts are about others.
        let queue = if let Wait::Try = wait {
            let queue = declare.await.map_err(|e| fail(&e))?;
            declared(terms);
            if queue.consumer_count() > 0 {
                // Someone registered before us holds the lock or will get it first.
                return Ok(None);
            }
            let (consumed, register) = join(consume, declare_register).await;
            reg.consumer = Some(registered(consumed, register, &fail, &fail_register)?);
            queue
        } else {
            let (declare, consumed, register) = join3(declare, consume, declare_register).await;
            let queue = declare.map_err(|e| fail(&e))?;
            declared(terms);
            reg.consumer = Some(registered(consumed, register, &fail, &fail_register)?);
            queue
        };
        // No consumer and no ready message: the lock has no token yet (new queue) or lost it,
        // so mint one. Two clients may both mint; the holder acks extras away.
        let publish_wake = || {
            channel.basic_publish(
                "".into(),
                names.lock.as_str().into(),
                BasicPublishOptions::default(),
                b"",
                wake_properties(&tag),
            )
        };
        // Someone holds the lock (or is being granted it): tell the holder that we want it, so
        // that a lock kept after its last use (`park.rs`) is released now rather than at its
        // idle limit. Our consumer is registered before this publish reaches the queue (B3), so
        // the holder's release hands the lock to us or to a waiter ahead of us.
        if queue.consumer_count() > 0 || queue.message_count() == 0 {
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
                // `v2::Nudge`.
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
        // First delivery: the broker made us the active consumer (`v2::Receive` in
        // docs/model.md); the grant is the next part of the protocol. A semaphore's
        // registration waits for its turn first (`recipes::Turn`): one grant at a time.
        let turn = match terms.sibling.as_ref().map(|s| s.turn.clone()) {
            Some(turn) => Some(turn.lock_owned().await),
            None => None,
        };
        let candidate = Candidate {
            reg,
            tag,
            first: token,
            started,
        };
        let granted = self
            .grant(conn, name, names, candidate, &fail, terms)
            .await
            .map(Some);
        drop(turn);
        granted
    }
}

/// Tells a semaphore's acquisition that the broker accepted this registration's declaration of
/// the lock queue (its kind mark included), once.
fn declared(terms: &mut HoldTerms) {
    if let Some(declared) = terms.sibling.as_mut().and_then(|s| s.declared.take()) {
        let _ = declared.send(());
    }
}

/// Opens a lock channel in the place `permit` reserved, which counts it from then on.
pub(crate) async fn open_lock_channel(permit: ChannelPermit) -> lapin::Result<Channel> {
    let channel = permit.conn().connection.create_channel().await?;
    permit.track(&channel);
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
pub(crate) struct Registration {
    pub(crate) channel: Option<Channel>,
    pub(crate) consumer: Option<lapin::Consumer>,
}

impl Registration {
    pub(crate) fn disarm(&mut self) -> (Channel, lapin::Consumer) {
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

/// The consumer of a registration whose declarations of the epoch queue and holder record were
/// pipelined with it.
///
/// A queue the broker refuses (406) closes the channel, which fails the consume too: the
/// refusal is the cause to report. (A consumer on a channel the broker closed sends no cancel.)
fn registered(
    consumed: lapin::Result<lapin::Consumer>,
    register: std::result::Result<(), (String, lapin::Error)>,
    fail: &impl Fn(&lapin::Error) -> Retry,
    fail_register: &impl Fn(&(String, lapin::Error)) -> Retry,
) -> std::result::Result<lapin::Consumer, Retry> {
    if let Err(e) = &register
        && matches!(classify(&e.1), Fault::Precondition(_))
    {
        return Err(fail_register(e));
    }
    let consumer = consumed.map_err(|e| fail(&e))?;
    register.map_err(|e| fail_register(&e))?;
    Ok(consumer)
}

/// When this client last declared each lock's epoch queue and holder record (`attempt`).
#[derive(Default)]
pub(crate) struct Declared(std::sync::Mutex<std::collections::HashMap<String, Instant>>);

impl Declared {
    /// The most names remembered; past it, the stalest are forgotten (and declared again).
    const MAX: usize = 65_536;

    fn fresh(&self, name: &str, within: Duration) -> bool {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(name).is_some_and(|t| t.elapsed() < within)
    }

    fn mark(&self, name: &str) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= Self::MAX {
            let mut ages: Vec<Instant> = map.values().copied().collect();
            ages.sort_unstable();
            let cutoff = ages[ages.len() / 2];
            map.retain(|_, t| *t > cutoff);
        }
        map.insert(name.to_owned(), Instant::now());
    }
}

/// What ended a grant's wait for its renewal.
pub(crate) enum Turn {
    /// Our renewal, delivered back to us for the first time.
    Own(Delivery),
    /// Another client's message stamped at least as high as our candidate token.
    Higher(Delivery),
}

/// Waits for our renewal `id` on the consumer, acking wake-ups, renewals stamped below `token`
/// (our candidate) and our own earlier renewals that arrive before it; a message of another
/// client stamped `token` or higher ends the wait too (`Turn::Higher`: the grant counts from
/// it). Gives up (`Err(None)`) on what the holder would take as a loss: one of our renewals
/// redelivered (the broker took the lock from us already) or a break request naming `token`
/// (docs/protocol.md, Grant 3, which the model's `v3::Receive` checks). `Err(Some(e))`: the
/// channel failed.
pub(crate) async fn own_delivery(
    consumer: &mut lapin::Consumer,
    own_tag: &str,
    own_prefix: &str,
    id: &str,
    token: u64,
    wanted: &mut bool,
    acks: &crate::hold::Acks,
) -> std::result::Result<Turn, Option<lapin::Error>> {
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
        let ours = d_id.as_ref().is_some_and(|i| i.starts_with(own_prefix));
        match d_id {
            Some(ref i) if i == id && !d.redelivered => return Ok(Turn::Own(d)),
            _ if ours && d.redelivered => return Err(None),
            _ if break_request(&d.properties).is_some_and(|(t, _)| t == token) => {
                return Err(None);
            }
            _ if !ours && stamp(&d.properties).is_some_and(|s| s >= token) => {
                return Ok(Turn::Higher(d));
            }
            _ => {
                // Another client's wake-up: it registered behind us and wants the lock; a kept
                // lock must not park unwanted (docs/protocol.md, "Keeping a lock").
                *wanted |= wanted_by_another(&d.properties, own_tag);
                acks.ack(d);
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

pub(crate) fn to_error(name: &str, addr: &str, queue: &str, fault: Fault) -> Error {
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

/// The client's acquisition counters, or none for the registrations of a semaphore's
/// acquisition, which `semaphore.rs` counts once for all of them.
struct Counts<'a>(Option<&'a Metrics>);

impl Counts<'_> {
    fn requested(&self) {
        self.0.inspect(|m| m.requested());
    }
    fn granted(&self, waited: Duration) {
        self.0.inspect(|m| m.granted(waited));
    }
    fn timed_out(&self) {
        self.0.inspect(|m| m.timed_out());
    }
    fn found_busy(&self) {
        self.0.inspect(|m| m.found_busy());
    }
}
