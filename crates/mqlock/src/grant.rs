//! Grant (docs/protocol.md, "Grant"; `v2::ReadFence` .. `v2::Grant` in docs/model.md): from
//! the first delivery to the guard, in two round trips. Choose the token (one `basic.get` of
//! the register), then store it and send the first lease renewal together; the guard is
//! returned once the register confirmed the token and the renewal came back to us, within the
//! lease it started.

use std::sync::Arc;

use futures_util::future::join;
use lapin::options::BasicAckOptions;
use tracing::debug;

use crate::acquire::{Candidate, HoldTerms, Retry, own_delivery};
use crate::client::LockClient;
use crate::connection::Conn;
use crate::error::Error;
use crate::fence::{self, FenceError};
use crate::guard::LockGuard;
use crate::hold::{Holder, publish_renewal, renewal_id, renewal_prefix};
use crate::identity::HolderInfo;
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
    /// closes the channel and hands the lock on; a token written to the register and never
    /// returned is only a gap in the sequence.
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
            first: token,
            register_declared,
            started,
        } = candidate;
        let config = &self.inner.config;
        let channel = reg.channel.clone().expect("channel set");
        // An idle register expires `idle_expiry` after its last use; ours was declared a moment
        // ago unless the wait was long.
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
            draft.commit(
                &channel,
                names,
                &HolderInfo::this_process(&conn.name, fence, terms.value.clone()),
            ),
            publish_renewal(&channel, &names.lock, &lease, first_renewal.clone(), fence),
        )
        .await;
        committed.map_err(fence_fail)?;
        let sent = published.map_err(|e| fail(&e))?;
        // The lease starts when the renewal comes back to us: the lock queue still had us as its
        // active consumer after `sent` (docs/protocol.md, "Lease").
        let consumer = reg.consumer.as_mut().expect("consumer set");
        let own_prefix = renewal_prefix(&tag);
        // Another client's wake-up — the delivery that granted us included — means that client
        // registered behind us: the lock is wanted (docs/protocol.md, "Keeping a lock").
        let mut wanted = wanted_by_another(&token.properties, &tag);
        let renewal = tokio::select! {
            renewal = own_delivery(consumer, &tag, &own_prefix, &first_renewal, fence, &mut wanted) => renewal.map_err(|e| match e {
                Some(e) => fail(&e),
                None => Retry::Again("the lock was taken back, granted on, or broken during the grant".into()),
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
        // The renewal is the token now; the delivery that granted us is not needed. (Acked in
        // the background: a connection blocked by a resource alarm would hold the await.)
        tokio::spawn(async move {
            let _ = token.acker.ack(BasicAckOptions::default()).await;
        });
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
            epoch_queue: names.epoch.clone(),
            fence_args: fence::register_args(config),
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
