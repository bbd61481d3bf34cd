//! The task that keeps a granted lock: it holds the token, acks extra wake-ups, renews the
//! token before the broker's consumer timeout, watches for loss, and performs the release.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::connection::Conn;
use crate::error::{Error, Result};
use crate::guard::{BoxFuture, LossReason, LossSignal, Release};
use crate::metrics::Metrics;
use crate::protocol::{loss_reason, wake_properties};

pub(crate) struct Holder {
    pub(crate) name: Arc<str>,
    pub(crate) lock_queue: String,
    /// The fence register and its arguments: renewal declares it again so that its idle
    /// expiry never runs out under a long hold.
    pub(crate) fence_queue: String,
    pub(crate) fence_args: FieldTable,
    pub(crate) tag: String,
    pub(crate) channel: Channel,
    pub(crate) consumer: Consumer,
    pub(crate) token: Delivery,
    pub(crate) signal: LossSignal,
    pub(crate) conn: Arc<Conn>,
    pub(crate) renew_interval: Duration,
    pub(crate) metrics: Arc<Metrics>,
}

enum Command {
    Release(Option<oneshot::Sender<Result<()>>>),
}

/// The guard's handle on the holder task.
pub(crate) struct HolderHandle {
    tx: mpsc::UnboundedSender<Command>,
    name: Arc<str>,
    signal: LossSignal,
}

impl Release for HolderHandle {
    fn release(self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        Box::pin(async move {
            let (reply, done) = oneshot::channel();
            let lost = |signal: &LossSignal, name: &Arc<str>| Error::Lost {
                name: name.to_string(),
                reason: signal
                    .reason()
                    .unwrap_or_else(|| LossReason::ConnectionLost("holder stopped".into())),
            };
            if self.tx.send(Command::Release(Some(reply))).is_err() {
                // The holder task ended: the lock was lost and the broker took it back.
                return Err(lost(&self.signal, &self.name));
            }
            done.await
                .unwrap_or_else(|_| Err(lost(&self.signal, &self.name)))
        })
    }

    fn release_in_background(self: Box<Self>) {
        let _ = self.tx.send(Command::Release(None));
    }
}

impl Holder {
    /// Starts the holder task and returns the guard's handle on it.
    pub(crate) fn spawn(self) -> HolderHandle {
        let (tx, rx) = mpsc::unbounded_channel();
        let handle = HolderHandle {
            tx,
            name: self.name.clone(),
            signal: self.signal.clone(),
        };
        tokio::spawn(self.run(rx));
        handle
    }

    async fn run(self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let Holder {
            name,
            lock_queue,
            fence_queue,
            fence_args,
            tag,
            channel,
            mut consumer,
            mut token,
            signal,
            conn,
            renew_interval,
            metrics,
        } = self;
        let mut renewals = 0u64;
        let mut renew_id: Option<String> = None;
        let mut renew =
            tokio::time::interval_at(tokio::time::Instant::now() + renew_interval, renew_interval);
        let lost = loop {
            tokio::select! {
                biased;
                command = commands.recv() => {
                    // `None`: the guard was forgotten without a release; treat as a release.
                    let reply = match command { Some(Command::Release(r)) => r, None => None };
                    let result = release(&name, &channel, &signal).await;
                    if result.is_ok() {
                        metrics.released();
                    }
                    if let Some(reply) = reply {
                        let _ = reply.send(result);
                    }
                    return;
                }
                reason = conn.dead() => break reason,
                reason = signal.lost() => break reason,
                delivery = consumer.next() => match delivery {
                    Some(Ok(d)) => {
                        let is_renewal = renew_id.is_some()
                            && d.properties.message_id().as_ref().map(|s| s.as_str()) == renew_id.as_deref();
                        if is_renewal {
                            // Swap tokens: the fresh delivery restarts the broker's ack timer.
                            let old = std::mem::replace(&mut token, d);
                            let _ = old.acker.ack(BasicAckOptions::default()).await;
                            renew_id = None;
                            debug!(lock = %name, "token renewed");
                        } else {
                            // A waiter's wake-up: the token we hold will wake the next holder.
                            let _ = d.acker.ack(BasicAckOptions::default()).await;
                        }
                    }
                    Some(Err(e)) => break loss_reason(&e),
                    None => break if channel.status().connected() {
                        LossReason::ConsumerCancelled
                    } else {
                        LossReason::ChannelClosed("channel closed".into())
                    },
                },
                _ = renew.tick() => {
                    renewals += 1;
                    let id = format!("{tag}.renew.{renewals}");
                    let published = channel.basic_publish(
                        "".into(),
                        lock_queue.as_str().into(),
                        BasicPublishOptions::default(),
                        b"",
                        wake_properties(Some(id.clone())),
                    ).await;
                    match published {
                        Ok(_) => renew_id = Some(id),
                        Err(e) => break loss_reason(&e),
                    }
                    let touched = channel.queue_declare(
                        fence_queue.as_str().into(),
                        QueueDeclareOptions { durable: true, nowait: true, ..Default::default() },
                        fence_args.clone(),
                    ).await;
                    if let Err(e) = touched {
                        break loss_reason(&e);
                    }
                }
            }
        };
        if signal.fire(lost.clone()) {
            metrics.lost();
            warn!(lock = %name, reason = %lost, "lock lost");
        }
        if matches!(
            lost,
            LossReason::ConnectionLost(_) | LossReason::LeaseExpired { .. }
        ) {
            // Other locks on this connection are in the same state; new acquisitions reconnect.
            conn.kill(lost);
        }
        // Closing the channel makes sure the broker no longer counts us as a consumer.
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            channel.close(200, "lock lost".into()),
        )
        .await;
        // Wait for the guard to be released or dropped so that `release()` reports the loss.
        let _ = commands.recv().await;
    }
}

/// Releases by closing the channel.
///
/// The broker handles a channel close in one step: it removes our consumer, requeues the token
/// and runs the queue, which activates the next consumer and delivers the token to it. That is
/// the cheapest hand-off (one frame, no wake-up publish), it is the same path as a crash, and it
/// avoids the separate `basic.cancel` that RabbitMQ 3.10.8 mishandles on classic
/// single-active-consumer queues (the next consumer is activated but not fed, and the next
/// publish crashes the queue: rabbitmq-server #5460, reproduced by our stress tests).
async fn release(name: &str, channel: &Channel, signal: &LossSignal) -> Result<()> {
    match channel.close(200, "lock released".into()).await {
        Ok(()) => Ok(()),
        Err(e) => {
            // Whatever failed, the channel is gone and the broker requeued the token.
            debug!(lock = %name, error = %e, "release hit an error; the broker releases on channel close");
            match signal.reason() {
                Some(reason) => Err(Error::Lost {
                    name: name.to_string(),
                    reason,
                }),
                None => Ok(()),
            }
        }
    }
}
