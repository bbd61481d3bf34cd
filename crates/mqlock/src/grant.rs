//! Grant (docs/protocol.md, "Grant"; `v3::Receive` .. `v3::Grant` in docs/model.md): from the
//! first delivery to the guard, normally in one round trip. The token is one above the largest
//! stamp the lock queue handed us (a new epoch when it handed us none); the grant publishes a
//! renewal stamped with it and is granted when that renewal comes back to us, within the lease
//! it started, with nothing stamped as high seen before it.

use std::sync::Arc;

use futures_util::future::join;
use lapin::message::Delivery;
use tracing::debug;

use crate::acquire::{Candidate, HoldTerms, Retry, Turn, own_delivery};
use crate::client::LockClient;
use crate::connection::Conn;
use crate::error::Error;
use crate::fence::{self, FenceError};
use crate::guard::LockGuard;
use crate::hold::{Acks, Holder, publish_renewal, renewal_id, renewal_prefix};
use crate::identity::{self, HolderInfo};
use crate::lease::Lease;
use crate::loss::LossSignal;
use crate::name::QueueNames;
use crate::protocol::{stamp, wanted_by_another};

impl LockClient {
    /// Turns a registration that received its first delivery into a held lock.
    ///
    /// The name's claim moves into the guard's release handle (after the last await point).
    ///
    /// Cancel safe like the acquisition: dropping the future drops the registration, which
    /// closes the channel and hands the lock on, with every message this grant kept; a renewal
    /// it published and never saw back only makes the next grant count from a larger stamp.
    pub(crate) async fn grant(
        &self,
        conn: &Arc<Conn>,
        name: &str,
        names: &QueueNames,
        candidate: Candidate,
        fail: &impl Fn(&lapin::Error) -> Retry,
        terms: &mut HoldTerms,
    ) -> std::result::Result<LockGuard, Retry> {
        let Candidate {
            mut reg,
            tag,
            first,
            started,
        } = candidate;
        let config = &self.inner.config;
        let channel = reg.channel.clone().expect("channel set");
        let fence_fail = |e: FenceError| match e {
            FenceError::Amqp(e) => fail(&e),
            // No token was handed out: closing this registration hands the lock on, and the
            // retry registers again.
            FenceError::Transient(d) => Retry::Again(d),
            FenceError::Refused(d) => Retry::Fail(Error::Protocol {
                name: name.into(),
                addr: conn.addr.clone(),
                detail: d,
            }),
        };
        let lease = Arc::new(Lease::with_clock(config.clock.clone(), conn.lease_margin));
        let own_prefix = renewal_prefix(&tag);
        // Another client's wake-up — the delivery that granted us included — means that client
        // registered behind us: the lock is wanted (docs/protocol.md, "Keeping a lock").
        let mut wanted = wanted_by_another(&first.properties, &tag);
        // The message with the largest stamp handed to us so far. It stays unacknowledged until
        // a renewal stamped above it is back in the queue and delivered to us: whatever happens
        // in between, the queue keeps a message stamped at least as high as every grant so far
        // (F1).
        let mut held: Delivery = first;
        let mut candidates = 0u64;
        let acks = Acks::default();
        let (fence, renewal, sent) = loop {
            let floor = stamp(&held.properties);
            let fence = match floor.and_then(fence::next_in_epoch) {
                Some(next) => next,
                // Nothing stamped handed to us (a new lock, an expired queue, renewals dropped
                // by a broker restart), or the epoch's counter is exhausted: a new epoch.
                None => fence::mint(&channel, names, config, floor)
                    .await
                    .map_err(fence_fail)?,
            };
            let id = renewal_id(&tag, candidates);
            // Both publishes are handed to lapin at once: each await waits for lapin's I/O
            // thread (measured on a 2-core machine, delivery to the renewal's send: 350 µs when
            // awaited in turn, 230 µs together). Both are queued before the guard exists, so the
            // record is on the wire before any release.
            let holder = HolderInfo::this_process(&conn.name, fence, terms.value.clone());
            let (_, sent) = join(
                identity::record(&channel, &names.holder, &holder),
                publish_renewal(&channel, &names.lock, &lease, id.clone(), fence),
            )
            .await;
            let sent = sent.map_err(|e| fail(&e))?;
            // The lease starts when the renewal comes back to us: the lock queue still had us as
            // its active consumer after `sent` (docs/protocol.md, "Lease"). Everything the queue
            // held before it has been delivered to us by then (FIFO).
            let consumer = reg.consumer.as_mut().expect("consumer set");
            let turn = tokio::select! {
                turn = own_delivery(consumer, &tag, &own_prefix, &id, fence, &mut wanted, &acks) => turn.map_err(|e| match e {
                    Some(e) => fail(&e),
                    None => Retry::Again("the lock was taken back or broken during the grant".into()),
                })?,
                // Slower than the lease: the lock may already have been handed on (L2).
                _ = lease.expired() => {
                    return Err(Retry::Again(format!(
                        "the grant took longer than the lease of {:?}",
                        conn.lease_margin
                    )));
                }
            };
            match turn {
                Turn::Own(renewal) => break (fence, renewal, sent),
                // A message stamped at least as high as our candidate was in the queue behind
                // the one we were handed (requeued out of order, or a grant that gave up): count
                // from it instead. Its stamp is above the one we keep, so ours is acked.
                Turn::Higher(d) => {
                    debug!(lock = name, candidate = fence, stamped = ?stamp(&d.properties), "a larger stamp behind the first delivery; counting from it");
                    acks.ack(std::mem::replace(&mut held, d));
                    candidates += 1;
                }
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
        // The renewal is the token now; the message we counted from is not needed.
        acks.ack(held);
        debug!(lock = name, fence, waited = ?started.elapsed(), "granted");
        self.prepare_spare(conn);

        let signal = LossSignal::new(Some(lease.clone()));
        let name: Arc<str> = Arc::from(name);
        let (channel, consumer) = reg.disarm();
        let handle = Holder {
            name: name.clone(),
            lock_queue: names.lock.clone(),
            touched: vec![
                (names.epoch.clone(), fence::epoch_args(config)),
                (names.holder.clone(), identity::record_args(config)),
            ],
            tag,
            channel,
            consumer,
            token: renewal,
            acks,
            fencing_token: fence,
            renewals: candidates,
            lease,
            signal: signal.clone(),
            conn: conn.clone(),
            renew_interval: config.renew_interval,
            metrics: self.inner.metrics.clone(),
            granted_at: std::time::Instant::now(),
            max_hold: terms.max_hold,
            keep: terms.keep,
            parking: self.inner.parking.clone(),
            wanted,
        }
        .spawn(terms.claim.take());
        Ok(LockGuard::new(name, fence, signal, Box::new(handle)))
    }
}
