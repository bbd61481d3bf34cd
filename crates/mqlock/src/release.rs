//! Release (docs/protocol.md, "Release"): the guard's handle on its holder task, and the
//! channel close that gives the lock back.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use lapin::Channel;
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use crate::claim::NameClaim;
use crate::connection::Conn;
use crate::error::{Error, Result};
use crate::guard::{BoxFuture, Release};
use crate::loss::{LossReason, LossSignal};
use crate::park::Parking;

/// What the guard asks of its holder task.
pub(crate) enum Command {
    Release(Option<oneshot::Sender<Result<()>>>),
    /// The guard let go of a kept lock: hold it, parked, until it is wanted by another client or
    /// idle this long (`park.rs`).
    Park(Duration),
    /// An acquisition of this client took the parked lock back.
    Unpark,
}

/// The guard's handle on the holder task.
pub(crate) struct HolderHandle {
    pub(crate) tx: mpsc::UnboundedSender<Command>,
    pub(crate) name: Arc<str>,
    pub(crate) signal: LossSignal,
    /// How long `release()` waits for the holder task (which itself waits at most the lease
    /// margin for the broker).
    pub(crate) wait: Duration,
    pub(crate) addr: String,
    /// The client's claim on the name (`claim.rs`), shared with the holder task: given back by
    /// whichever comes first — this handle's end (the guard dropped, or its `release()` answered
    /// or dropped) or the end of a lost hold (its channel closed).
    pub(crate) claim: SharedClaim,
    /// The hold's consumer tag: tells its holder task's parked entry from a later hold's.
    pub(crate) tag: Arc<str>,
    /// The grant's fencing token.
    pub(crate) token: u64,
    /// With `Some(idle)`, letting the guard go parks the lock instead of releasing it
    /// (`LockOptions::keep`).
    pub(crate) keep: Option<Duration>,
    /// The client's parked locks.
    pub(crate) parking: Arc<Parking>,
    /// Set by the holder task when another client is known to wait for the lock: a parked
    /// hold that is wanted is not handed back to an acquisition of this client, which queues
    /// behind the waiter instead (a waiter waits at most one use longer because of parking).
    pub(crate) wanted: Arc<AtomicBool>,
}

impl HolderHandle {
    /// Parks this hold, if it is kept and still held; otherwise gives it back.
    fn park(self: Box<Self>) -> std::result::Result<(), Box<Self>> {
        match self.keep {
            Some(idle) if self.signal.reason().is_none() => {
                let (tx, parking) = (self.tx.clone(), self.parking.clone());
                parking.park(*self);
                // A holder task that ended meanwhile (a loss) cannot take the entry out; the
                // next acquisition of the name finds it lost and drops it.
                let _ = tx.send(Command::Park(idle));
                Ok(())
            }
            _ => Err(self),
        }
    }
}

/// A name claim that the guard's handle and its holder task both may give back.
pub(crate) type SharedClaim = Arc<std::sync::Mutex<Option<NameClaim>>>;

/// Gives the claim back (idempotent).
pub(crate) fn give_back(claim: &SharedClaim) {
    drop(claim.lock().unwrap_or_else(|p| p.into_inner()).take());
}

impl Drop for HolderHandle {
    fn drop(&mut self) {
        give_back(&self.claim);
    }
}

impl Release for HolderHandle {
    fn release(self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        let this = match self.park() {
            Ok(()) => return Box::pin(async { Ok(()) }),
            Err(this) => this,
        };
        Box::pin(async move {
            let this = this;
            let (reply, done) = oneshot::channel();
            let lost = |signal: &LossSignal, name: &Arc<str>| Error::Lost {
                name: name.to_string(),
                reason: signal
                    .reason()
                    .unwrap_or_else(|| LossReason::ConnectionLost("holder stopped".into())),
            };
            if this.tx.send(Command::Release(Some(reply))).is_err() {
                // The holder task ended: the lock was lost and the broker took it back.
                return Err(lost(&this.signal, &this.name));
            }
            match tokio::time::timeout(this.wait, done).await {
                Ok(answer) => answer.unwrap_or_else(|_| Err(lost(&this.signal, &this.name))),
                Err(_) => Err(Error::Unreachable {
                    addr: this.addr.clone(),
                    detail: format!(
                        "the release of lock {:?} was not answered within {:?}; the broker releases it when it reads the close",
                        this.name, this.wait
                    ),
                }),
            }
        })
    }

    fn release_in_background(self: Box<Self>) {
        let Err(this) = self.park() else {
            return;
        };
        let _ = this.tx.send(Command::Release(None));
    }
}

/// Releases by closing the channel (`client::Close` in docs/model.md), waiting at most `wait`
/// for the broker's answer.
///
/// The broker handles a channel close in one step: it removes our consumer, requeues the token
/// and runs the queue, which activates the next consumer and delivers the token to it. That is
/// the cheapest hand-off (one frame, no wake-up publish), it is the same path as a crash, and it
/// avoids the separate `basic.cancel` that RabbitMQ 3.10.8 mishandles on classic
/// single-active-consumer queues (the next consumer is activated but not fed, and the next
/// publish crashes the queue: rabbitmq-server #5460, reproduced by our stress tests).
///
/// A broker under a resource alarm stops reading from publishing connections, so the answer may
/// not come until the alarm clears; the frame is sent, and the broker releases when it reads it.
pub(crate) async fn release(
    name: &str,
    conn: &Conn,
    channel: &Channel,
    signal: &LossSignal,
    wait: Duration,
) -> Result<()> {
    let lost = |signal: &LossSignal| {
        signal.reason().map(|reason| Error::Lost {
            name: name.to_string(),
            reason,
        })
    };
    // A lease that ran out before the release: the broker may have handed the lock on already,
    // and the caller must hear that it did not hold the lock to the end.
    let lost_before = lost(signal);
    match tokio::time::timeout(wait, channel.close(200, "lock released".into())).await {
        Ok(Ok(())) => lost_before.map_or(Ok(()), Err),
        Ok(Err(e)) => {
            // Whatever failed, the channel is gone and the broker requeued the token.
            debug!(lock = %name, error = %e, "release hit an error; the broker releases on channel close");
            lost(signal).map_or(Ok(()), Err)
        }
        Err(_) => Err(lost(signal).unwrap_or_else(|| Error::Unreachable {
            addr: conn.addr.clone(),
            detail: format!(
                "the broker did not answer the release of lock {name:?} within {wait:?} \
                 (is a resource alarm blocking this connection?); it releases the lock when it reads the close"
            ),
        })),
    }
}
