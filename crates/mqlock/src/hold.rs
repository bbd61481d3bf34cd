//! The task that keeps a granted lock (docs/protocol.md, "Hold"): it renews the lock's lease
//! through the lock queue, keeps the newest renewal as its token, tells extra wake-ups from
//! signs that the broker took the lock away, and runs the release (`release.rs`) when asked.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::claim::NameClaim;
use crate::connection::Conn;

use crate::lease::{BootInstant, Lease};
use crate::loss::{LossReason, LossSignal};
use crate::metrics::Metrics;
use crate::park::Parking;
use crate::protocol::{break_request, loss_reason, renewal_properties, stamp, wanted_by_another};
use crate::release::{Command, HolderHandle, SharedClaim, give_back, release};

/// Publishes a lease renewal (`v2::Renew` in docs/model.md) and returns the moment it was sent.
///
/// The renewal extends the lease when it comes back to us (`v2::Receive`), not when the broker
/// confirms it: a delivery to us proves that the lock queue (its Raft leader, with a majority,
/// on a quorum queue) still had us as its active consumer after `sent`. A confirm proves less:
/// a renewal held up by a partition is confirmed after the heal, when the queue may have handed
/// the lock on meanwhile (its delivery then goes to the new holder instead).
pub(crate) async fn publish_renewal(
    channel: &Channel,
    lock_queue: &str,
    lease: &Lease,
    id: String,
    token: u64,
) -> lapin::Result<BootInstant> {
    let sent = lease.now();
    // The confirm is not awaited (see above); the channel is in confirm mode for the epoch
    // writes, and lapin drops an unawaited confirm when it arrives.
    channel
        .basic_publish(
            "".into(),
            lock_queue.into(),
            BasicPublishOptions::default(),
            b"",
            renewal_properties(id, token),
        )
        .await?;
    Ok(sent)
}

/// The id of a holder's `n`th renewal: the consumer tag (unique per acquisition) and `n`.
pub(crate) fn renewal_id(tag: &str, n: u64) -> String {
    format!("{tag}.r.{n}")
}

/// The prefix of every renewal id of the acquisition with consumer tag `tag`.
pub(crate) fn renewal_prefix(tag: &str) -> String {
    format!("{tag}.r.")
}

pub(crate) struct Holder {
    pub(crate) name: Arc<str>,
    pub(crate) lock_queue: String,
    /// The epoch queue and the holder record, with their arguments: declared again every
    /// `renew_interval` so that their idle expiry never runs out under a long hold (the epoch
    /// is what keeps tokens rising across a broker restart: F3).
    pub(crate) touched: Vec<(String, FieldTable)>,
    pub(crate) tag: String,
    pub(crate) channel: Channel,
    pub(crate) consumer: Consumer,
    /// The held token message: the grant's renewal that came back; replaced by each renewal as
    /// it arrives.
    pub(crate) token: Delivery,
    /// The acks sent so far (the grant's among them), flushed before a release's close.
    pub(crate) acks: Acks,
    pub(crate) fencing_token: u64,
    /// Renewals published so far (the grant published number 0).
    pub(crate) renewals: u64,
    pub(crate) lease: Arc<Lease>,
    pub(crate) signal: LossSignal,
    pub(crate) conn: Arc<Conn>,
    pub(crate) renew_interval: Duration,
    pub(crate) metrics: Arc<Metrics>,
    /// When the lock was granted: the hold time (metrics) runs from here to release or loss.
    pub(crate) granted_at: std::time::Instant,
    /// The hold limit (`LockOptions::max_hold`): the holder gives the lock up when the hold
    /// reaches it, as a loss with `LossReason::HoldLimit` (docs/protocol.md, "Hold limit").
    pub(crate) max_hold: Option<Duration>,
    /// `LockOptions::keep`: the guard parks the lock when it lets go (`park.rs`).
    pub(crate) keep: Option<Duration>,
    pub(crate) parking: Arc<Parking>,
    /// Another client's wake-up came during the grant: the lock is wanted already.
    pub(crate) wanted: bool,
}

/// What a delivery to the holder means (docs/protocol.md, "Hold").
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// Our renewal number `n`, delivered for the first time: it becomes the token, and
    /// extends the lease.
    OwnRenewal(u64),
    /// A waiter's wake-up (published when it registers behind a holder, and as its nudges):
    /// somebody wants the lock. Ack it; a parked lock is released.
    Wanted,
    /// A renewal of an earlier holder, or a stale break request: ack it.
    Extra,
    /// A renewal stamped above our token: only a later grant stamps one (docs/protocol.md,
    /// Z1), so the broker took the lock from us.
    Later(u64),
    /// The broker took the lock from us at some point.
    Lost(LossReason),
}

fn classify_delivery(own_tag: &str, own_prefix: &str, fencing_token: u64, d: &Delivery) -> Seen {
    // A break request names the grant it breaks; one for an earlier grant is stale.
    if let Some((token, reason)) = break_request(&d.properties) {
        return if token == fencing_token {
            Seen::Lost(reason)
        } else {
            Seen::Extra
        };
    }
    let own = d
        .properties
        .message_id()
        .as_ref()
        .and_then(|id| id.as_str().strip_prefix(own_prefix))
        .and_then(|n| n.parse::<u64>().ok());
    if let Some(n) = own {
        // Our renewal can come back redelivered only if the broker returned our messages
        // (a quorum queue does when our node was cut off) and then made us active again.
        return if d.redelivered {
            Seen::Lost(LossReason::TakenBack)
        } else {
            Seen::OwnRenewal(n)
        };
    }
    match stamp(&d.properties) {
        Some(token) if token > fencing_token => Seen::Later(token),
        Some(_) => Seen::Extra,
        None if wanted_by_another(&d.properties, own_tag) => Seen::Wanted,
        None => Seen::Extra,
    }
}

impl Holder {
    /// Starts the holder task and returns the guard's handle on it.
    pub(crate) fn spawn(self, claim: Option<NameClaim>) -> HolderHandle {
        let (tx, rx) = mpsc::unbounded_channel();
        let claim: SharedClaim = Arc::new(std::sync::Mutex::new(claim));
        let wanted = Arc::new(AtomicBool::new(false));
        let handle = HolderHandle {
            tx,
            name: self.name.clone(),
            signal: self.signal.clone(),
            wait: self.conn.lease_margin + Duration::from_secs(2),
            addr: self.conn.addr.clone(),
            claim: claim.clone(),
            tag: self.tag.as_str().into(),
            token: self.fencing_token,
            keep: self.keep,
            parking: self.parking.clone(),
            wanted: wanted.clone(),
        };
        self.metrics.hold_started();
        tokio::spawn(self.run(rx, claim, wanted));
        handle
    }

    /// `claim`: the client's claim on the name (`claim.rs`), which the guard's handle gives back
    /// when it ends; this task gives it back when a lost hold's channel was closed, so that a
    /// lost guard the caller still keeps does not stop the client from locking the name again.
    ///
    /// `wanted_flag`: the handle's copy of `wanted`, for an acquisition that finds the hold
    /// parked (`park.rs`).
    async fn run(
        self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        claim: SharedClaim,
        wanted_flag: Arc<AtomicBool>,
    ) {
        let Holder {
            name,
            lock_queue,
            touched,
            tag,
            channel,
            mut consumer,
            mut token,
            fencing_token,
            mut renewals,
            lease,
            signal,
            conn,
            renew_interval,
            metrics,
            granted_at,
            max_hold,
            keep: _,
            parking,
            mut wanted,
            acks,
        } = self;
        let ack_later = |d: Delivery| acks.ack(d);
        if wanted {
            wanted_flag.store(true, Ordering::Release);
        }
        // Parked (`park.rs`): until when, if nobody wants the lock first.
        let mut parked_until: Option<tokio::time::Instant> = None;
        // While parked, the lock queue's consumers are counted every renewal period: a waiter
        // whose wake-up this holder never saw (acked by an earlier holder, or dropped with a
        // node) still gets the lock within that period.
        let mut park_check = tokio::time::interval(conn.renewal_period);
        park_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Somebody else registered on the lock queue (one passive declare; no answer within a
        // renewal period counts as nobody).
        let others_wait = async || {
            let declared = channel.queue_declare(
                lock_queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            );
            matches!(tokio::time::timeout(conn.renewal_period, declared).await, Ok(Ok(q)) if q.consumer_count() > 1)
        };
        let end_hold =
            async |reply: Option<tokio::sync::oneshot::Sender<crate::error::Result<()>>>| {
                acks.flush().await;
                let result = release(&name, &conn, &channel, &signal, conn.lease_margin).await;
                metrics.hold_ended(granted_at.elapsed());
                if result.is_ok() {
                    metrics.released();
                }
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            };
        // The hold limit, on tokio's clock from the grant (`None`: no limit).
        let hold_limit = async {
            match max_hold {
                Some(limit) => {
                    tokio::time::sleep_until(tokio::time::Instant::from_std(granted_at + limit))
                        .await;
                    limit
                }
                None => std::future::pending().await,
            }
        };
        tokio::pin!(hold_limit);
        let margin = conn.lease_margin;
        let own_prefix = renewal_prefix(&tag);
        // Renewals sent and not come back yet: (number, send time).
        let mut in_flight: VecDeque<(u64, BootInstant)> = VecDeque::new();
        let now = tokio::time::Instant::now();
        // The first renewal comes early if the grant used much of its lease (it returns the
        // guard with whatever the lease has left, at least a renewal's round trip).
        let left = lease.deadline().saturating_duration_since(lease.now());
        let mut renewal_timer =
            tokio::time::interval_at(now + conn.renewal_period.min(left / 2), conn.renewal_period);
        renewal_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut touch = tokio::time::interval_at(now + renew_interval, renew_interval);
        let lost = loop {
            tokio::select! {
                biased;
                command = commands.recv() => match command {
                    // `None`: the guard was forgotten without a release; treat as a release.
                    Some(Command::Release(reply)) => return end_hold(reply).await,
                    None => return end_hold(None).await,
                    Some(Command::Park(idle)) => {
                        if !wanted && !others_wait().await {
                            parked_until = Some(tokio::time::Instant::now() + idle);
                            park_check.reset();
                            debug!(lock = %name, ?idle, "parked");
                        } else if let Some(own) = parking.take_own(&name, &tag) {
                            debug!(lock = %name, "wanted while in use; released instead of parked");
                            drop(own);
                            return end_hold(None).await;
                        }
                    }
                    Some(Command::Unpark) => parked_until = None,
                },
                _ = park_check.tick(), if parked_until.is_some() => {
                    if others_wait().await && let Some(own) = parking.take_own(&name, &tag) {
                        debug!(lock = %name, "a client waits for the parked lock; released");
                        drop(own);
                        return end_hold(None).await;
                    }
                }
                // Parked too long: released (if no acquisition took it back this moment).
                () = sleep_until_opt(parked_until) => {
                    parked_until = None;
                    if let Some(own) = parking.take_own(&name, &tag) {
                        debug!(lock = %name, "parked lock idle; released");
                        drop(own);
                        return end_hold(None).await;
                    }
                }
                // The hold limit: given up like a loss, through the one release path below
                // (the channel close), with its own reason.
                limit = &mut hold_limit => break LossReason::HoldLimit { limit },
                reason = conn.dead() => break reason,
                // Covers the lease running out (the signal watches it): `v2::Expire` in
                // docs/model.md, the loss and the channel close below.
                reason = signal.lost() => break reason,
                delivery = consumer.next() => match delivery {
                    Some(Ok(d)) => match classify_delivery(&tag, &own_prefix, fencing_token, &d) {
                        Seen::OwnRenewal(n) => {
                            while let Some(&(m, sent)) = in_flight.front() {
                                if m > n {
                                    break;
                                }
                                in_flight.pop_front();
                                if m == n {
                                    lease.extend_to(sent + margin);
                                    metrics.renewed();
                                }
                            }
                            // The fresh delivery restarts the broker's consumer timeout (L3).
                            ack_later(std::mem::replace(&mut token, d));
                        }
                        Seen::Extra => ack_later(d),
                        Seen::Wanted => {
                            ack_later(d);
                            wanted_flag.store(true, Ordering::Release);
                            if parked_until.is_some() && let Some(own) = parking.take_own(&name, &tag) {
                                debug!(lock = %name, "parked lock wanted by another client; released");
                                drop(own);
                                return end_hold(None).await;
                            }
                            wanted = true;
                        }
                        Seen::Later(stamped) => break LossReason::GrantedElsewhere { token: stamped },
                        // Never ack it: it may be the lock's only token, and the broker must get
                        // it back when we close the channel.
                        Seen::Lost(reason) => break reason,
                    },
                    Some(Err(e)) => break loss_reason(&e),
                    None => break if channel.status().connected() {
                        LossReason::ConsumerCancelled
                    } else {
                        LossReason::ChannelClosed("channel closed".into())
                    },
                },
                _ = renewal_timer.tick() => {
                    renewals += 1;
                    let id = renewal_id(&tag, renewals);
                    // Sent in the background, timed from now (earlier than the send: the lease
                    // it earns is shorter, never longer). A publish that fails or is held up by a
                    // blocked connection simply never comes back, and the lease runs out.
                    in_flight.push_back((renewals, lease.now()));
                    let (channel, lock_queue, lease) = (channel.clone(), lock_queue.clone(), lease.clone());
                    tokio::spawn(async move {
                        let _ = publish_renewal(&channel, &lock_queue, &lease, id, fencing_token).await;
                    });
                }
                _ = touch.tick() => {
                    for (queue, args) in touched.iter().cloned() {
                        let channel = channel.clone();
                        tokio::spawn(async move {
                            let _ = channel.queue_declare(
                                queue.as_str().into(),
                                QueueDeclareOptions { durable: true, nowait: true, ..Default::default() },
                                args,
                            ).await;
                        });
                    }
                }
            }
        };
        // Fired before the lease is expired, so that a watcher woken by the expired lease
        // cannot report `LeaseExpired` for a loss that had another reason (a hold limit).
        signal.fire(lost.clone());
        lease.expire();
        metrics.hold_ended(granted_at.elapsed());
        // Counted here whoever fired the signal first: a lease that ran out is fired by the
        // first `lost()` to notice it (a user's watcher, or the branch above), and this task is
        // the one place that reports each hold's end.
        metrics.lost(&lost);
        warn!(lock = %name, broker = %conn.addr, reason = %lost, "lock lost");
        if matches!(lost, LossReason::ConnectionLost(_)) {
            // Other locks on this connection are in the same state; new acquisitions reconnect.
            conn.kill(lost);
        }
        // Closing the channel makes the broker drop our consumer and take back what we hold.
        // The close frame is sent at once; its answer may not come (a resource alarm, a node
        // cut off from its peers), and is not waited for long.
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            channel.close(200, "lock lost".into()),
        )
        .await;
        // A lost parked lock is never handed out again: its entry goes (and with it the claim).
        drop(parking.take_own(&name, &tag));
        give_back(&claim);
        // Wait for the guard to be released or dropped so that `release()` reports the loss. A
        // guard that parked meanwhile (it had not seen the loss yet) is taken out of the park.
        while let Some(command) = commands.recv().await {
            match command {
                Command::Park(_) => drop(parking.take_own(&name, &tag)),
                Command::Unpark => {}
                Command::Release(_) => break,
            }
        }
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Acks a delivery in the background: a connection the broker blocked (a resource alarm) holds
/// every frame, and the holder must stay free to notice its lease ending and to release.
/// The acks of one registration, each sent from a spawned task: a connection the broker blocked
/// (a resource alarm, B9) holds every frame, and an awaited ack would hold the holder task
/// with it.
///
/// A release flushes them first: lapin sends an ack through its own task, so an ack spawned
/// just before a close could reach the broker after it, and the broker would requeue that
/// message — a wake-up, an older renewal — ahead of the token message. The next holder, handed
/// it first, would count from a lower stamp (and count again) or start a needless epoch
/// (docs/protocol.md, Grant 4 and Release).
#[derive(Default)]
pub(crate) struct Acks(std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>);

impl Acks {
    /// Acks `d` in the background.
    pub(crate) fn ack(&self, d: Delivery) {
        let mut pending = self.0.lock().unwrap_or_else(|p| p.into_inner());
        pending.retain(|h| !h.is_finished());
        pending.push(tokio::spawn(async move {
            let _ = d.acker.ack(BasicAckOptions::default()).await;
        }));
    }

    /// Waits until every ack sent so far is queued for the broker, for at most a second (a
    /// blocked connection queues them anyway, in order, before a later close).
    pub(crate) async fn flush(&self) {
        let pending = std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()));
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            futures_util::future::join_all(pending),
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{renewal_properties, wake_properties};
    use lapin::BasicProperties;

    fn delivery(properties: BasicProperties, redelivered: bool) -> Delivery {
        let mut d = Delivery::mock(1, "".into(), "q".into(), redelivered, Vec::new());
        d.properties = properties;
        d
    }

    #[test]
    fn deliveries_to_a_holder_are_told_apart() {
        let tag = "mqlock.1.a.7";
        let ours = "mqlock.1.a.7.r.";
        let token = (5 << 32) + 10;
        let own = |n, redelivered| {
            delivery(
                renewal_properties(renewal_id("mqlock.1.a.7", n), token),
                redelivered,
            )
        };
        assert_eq!(
            classify_delivery(tag, ours, token, &own(3, false)),
            Seen::OwnRenewal(3)
        );
        // Our own renewal redelivered: the broker returned our messages once (H1).
        assert_eq!(
            classify_delivery(tag, ours, token, &own(3, true)),
            Seen::Lost(LossReason::TakenBack)
        );
        // Another acquisition of the same process is not us (its tag differs).
        let sibling = delivery(
            renewal_properties("mqlock.1.a.70.r.1".into(), token - 1),
            true,
        );
        assert_eq!(classify_delivery(tag, ours, token, &sibling), Seen::Extra);
        // An earlier holder's renewal, requeued when it released: an extra.
        let earlier = delivery(renewal_properties("x.r.9".into(), token - 1), true);
        assert_eq!(classify_delivery(tag, ours, token, &earlier), Seen::Extra);
        // A renewal stamped above our token: a later grant (Z1).
        let later = delivery(renewal_properties("y.r.1".into(), token + 1), true);
        assert_eq!(
            classify_delivery(tag, ours, token, &later),
            Seen::Later(token + 1)
        );
        // Other clients' wake-ups, fresh or requeued, say that somebody wants the lock; its own
        // (a mint of its acquisition) do not.
        let theirs = wake_properties("mqlock.2.b.1");
        assert_eq!(
            classify_delivery(tag, ours, token, &delivery(theirs.clone(), false)),
            Seen::Wanted
        );
        assert_eq!(
            classify_delivery(tag, ours, token, &delivery(theirs, true)),
            Seen::Wanted
        );
        assert_eq!(
            classify_delivery(tag, ours, token, &delivery(wake_properties(tag), false)),
            Seen::Extra
        );
        // A wake-up of mqlock 0.1 (no id) is another's.
        assert_eq!(
            classify_delivery(
                tag,
                ours,
                token,
                &delivery(BasicProperties::default(), false)
            ),
            Seen::Wanted
        );
    }
}
