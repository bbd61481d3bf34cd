//! V3: the grant without the fence register (what crates/mqlock implements next). Everything
//! else is v2 (`crate::v2` runs it, and calls in here for the grant): the delivered lease,
//! renewals, the holding rules, parking, the broker.
//!
//! - **First delivery** `d` (`v3::Receive` while waiting): `d` is held unacked. Stamped `s`:
//!   the candidate token is `s + 1`, published as the grant's renewal `R0` stamped with it.
//!   A wake-up (no stamp): a new epoch is started (`v3::StartEpoch`, `v3::EpochConfirmed`:
//!   `e' = max(largest stored epoch + 1, clock)`), and the candidate is `e'.0`. The fence
//!   register is never read or written.
//! - **The grant** (`AwaitFence`): granted (`v3::Grant`) once the candidate's own renewal was
//!   delivered back, not redelivered (`R0_SEEN`; no confirm is needed); a grant that comes
//!   too late (`now >= sent + M`) gives up as in v2. Until then, a delivery of another
//!   channel's renewal stamped at or above the candidate is held instead of the old held
//!   delivery and makes a new candidate above it (**re-candidate**, the next renewal number);
//!   an own older candidate is acked; any own renewal redelivered gives up; the rest is acked.
//!   After the own renewal came back, deliveries follow the holder's rules (a larger stamp is
//!   a loss).
//!
//! The negative controls ([`V3Fault`]) each turn one of these rules off.

use crate::broker::Op;
use crate::client::Phase;
use crate::model::{LockModel, State, V3Fault};
use crate::types::{Delivery, MsgKind, Token, confirm};

/// Acks the lock-queue delivery `d` on client `c`'s channel.
pub fn ack(m: &LockModel, s: &mut State, c: usize, d: Delivery) {
    let chan = s.chan(c);
    m.send(
        s,
        c,
        Op::AckLock {
            chan,
            inc: d.inc,
            kind: d.msg.kind,
        },
    );
}

/// The first delivery `d` (already held by client `c`): a candidate above its stamp, or a new
/// epoch for a wake-up.
pub fn start(m: &LockModel, s: &mut State, c: usize, d: Delivery) {
    match d.msg.kind.stamp() {
        Some(stamp) => publish_candidate(m, s, c, stamp.next()),
        None => s.clients[c].phase = Phase::NeedEpoch,
    }
}

/// The new epoch after the largest stored one `stored` at time `clock`: `max(stored + 1,
/// clock)` (v2's rule with no last token); with [`V3Fault::ReuseEpoch`], `max(stored, clock)`.
pub fn new_epoch(m: &LockModel, stored: Option<u8>, clock: u8) -> u8 {
    let step = u8::from(!m.faulty(V3Fault::ReuseEpoch));
    stored.map_or(0, |e| e + step).max(clock)
}

/// Publishes the renewal numbered `renewal_n` stamped with the candidate `token` and waits
/// for it to come back; `t0` is now.
pub fn publish_candidate(m: &LockModel, s: &mut State, c: usize, token: Token) {
    let chan = s.chan(c);
    let cl = &mut s.clients[c];
    cl.confirms = 0;
    cl.phase = Phase::AwaitFence { token, t0: s.clock };
    let kind = MsgKind::Renewal {
        stamp: token,
        chan,
        n: cl.renewal_n,
    };
    m.publish_lock(s, c, kind, confirm::R0);
    if m.faulty(V3Fault::AckHeldEarly)
        && let Some(held) = s.clients[c].held.take()
    {
        ack(m, s, c, held);
    }
}

/// During the grant, `d`, another channel's renewal stamped `stamp` at or above the
/// candidate, was delivered: it is held instead of the old held delivery (acked) and a new
/// candidate `stamp + 1` is published with the next renewal number. With
/// [`V3Fault::GiveUpOnHigher`] the grantee gives up (closes its channel) instead.
pub fn recandidate(m: &LockModel, s: &mut State, c: usize, d: Delivery, stamp: Token) {
    if m.faulty(V3Fault::GiveUpOnHigher) {
        m.close(s, c);
        return;
    }
    if let Some(old) = s.clients[c].held.replace(d) {
        ack(m, s, c, old);
    }
    s.clients[c].renewal_n += 1;
    publish_candidate(m, s, c, stamp.next());
}
