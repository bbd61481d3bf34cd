//! The v2 client: registers without a length limit read whole (max of all values), the grant
//! publishes the token (confirmed) and a stamped renewal `R0`, and is granted once the token is
//! confirmed and `R0` came back to it; the lease runs to `sent + M` of the last of the holder's
//! own renewals *delivered* back to it (not redelivered), and deliveries are checked for signs
//! of loss. `Version::V2Confirm`, the rejected design, takes the lease from renewals' publisher
//! confirms instead. `Version::V3` runs here too, with its grant in [`crate::v3`].

use crate::broker::Op;
use crate::client::Phase;
use crate::model::{Action, LockModel, State, V3Fault, Version};
use crate::types::{MsgKind, Reg, Token, confirm};
use crate::v3;

/// Pushes the v2-specific actions enabled for client `c`.
pub fn actions(m: &LockModel, s: &State, c: usize, out: &mut Vec<Action>) {
    let cl = &s.clients[c];
    let i = c as u8;
    let reachable = s.broker.reachable(c);
    let delivered_lease = m.version != Version::V2Confirm;
    // v2 (not v2-confirm): the grant needs the fence confirm and its own R0 delivered back;
    // v3 only the latter (and nothing with the control `GrantAtOnce`).
    let stamped = cl.held.is_some_and(|d| d.msg.kind.stamp().is_some());
    let grant_bits = if m.faulty(V3Fault::GrantAtOnce) && stamped {
        0
    } else if m.v3() {
        confirm::R0_SEEN
    } else if delivered_lease {
        confirm::FENCE | confirm::R0_SEEN
    } else {
        confirm::FENCE | confirm::R0
    };
    if let (Some(at), Some(p)) = (cl.parked, m.cfg.park)
        && s.clock >= at.saturating_add(p.idle)
    {
        out.push(Action::ParkExpire(i));
    }
    match cl.phase {
        Phase::Waiting if !cl.inbox.is_empty() => out.push(Action::Receive(i)),
        Phase::Holding { deadline, .. } if s.clock < deadline => {
            if !cl.inbox.is_empty() {
                out.push(Action::Receive(i));
            }
            if cl.renew_sent.is_none() && cl.renewals_left > 0 {
                out.push(Action::Renew(i));
            }
            if !delivered_lease && cl.renew_sent.is_some() && cl.confirms & confirm::RENEW != 0 {
                out.push(Action::RenewConfirmed(i));
            }
            if m.parking().is_some() {
                out.push(match cl.parked {
                    None => Action::Park(i),
                    Some(_) => Action::Unpark(i),
                });
            }
        }
        Phase::AwaitFence { .. } if delivered_lease && !cl.inbox.is_empty() => {
            out.push(Action::Receive(i));
            if cl.confirms & grant_bits == grant_bits {
                out.push(Action::Grant(i))
            }
        }
        Phase::ReadFence if reachable => out.push(Action::ReadFence(i)),
        Phase::NeedEpoch if reachable => out.push(Action::StartEpoch(i)),
        Phase::AwaitEpoch { .. } if cl.confirms & confirm::EPOCH != 0 => {
            out.push(Action::EpochConfirmed(i))
        }
        Phase::AwaitFence { .. } if cl.confirms & grant_bits == grant_bits => {
            out.push(Action::Grant(i))
        }
        _ => {}
    }
}

/// Applies a v2-specific action.
pub fn step(m: &LockModel, s: &mut State, a: Action) {
    match a {
        Action::Receive(c) => receive(m, s, usize::from(c)),
        Action::ReadFence(c) => {
            let c = usize::from(c);
            let chan = s.chan(c);
            let values = s.broker.fence.take_all(chan);
            let stamp = s.clients[c].held.and_then(|d| d.msg.kind.stamp());
            let last = values.into_iter().map(Token).chain(stamp).max();
            match last {
                Some(last) => publish_token(m, s, c, last.next()),
                None => s.clients[c].phase = Phase::NeedEpoch,
            }
        }
        Action::StartEpoch(c) => {
            let c = usize::from(c);
            let chan = s.chan(c);
            let e = s.broker.epoch.take_all(chan).into_iter().max();
            let e2 = v3::new_epoch(m, e.map(|e| e as u8), s.clock);
            s.clients[c].confirms = 0;
            s.clients[c].phase = Phase::AwaitEpoch { e: e2 };
            m.send(
                s,
                c,
                Op::PublishReg {
                    reg: Reg::Epoch,
                    value: u16::from(e2),
                    chan,
                    confirm: confirm::EPOCH,
                },
            );
        }
        Action::EpochConfirmed(c) => {
            let c = usize::from(c);
            let Phase::AwaitEpoch { e } = s.clients[c].phase else {
                unreachable!()
            };
            let chan = s.chan(c);
            m.send(
                s,
                c,
                Op::AckTaken {
                    reg: Reg::Epoch,
                    chan,
                },
            );
            if m.v3() {
                v3::publish_candidate(m, s, c, Token::start(e));
            } else {
                publish_token(m, s, c, Token::start(e));
            }
        }
        Action::Grant(c) => {
            let c = usize::from(c);
            let Phase::AwaitFence { token, t0 } = s.clients[c].phase else {
                unreachable!()
            };
            let chan = s.chan(c);
            if !m.v3() {
                m.send(
                    s,
                    c,
                    Op::AckTaken {
                        reg: Reg::Fence,
                        chan,
                    },
                );
            }
            let deadline = t0 + m.cfg.m;
            if s.clock >= deadline {
                // Too late to use: hand on (close the channel) and retry later.
                m.close(s, c);
            } else {
                s.clients[c].confirms = 0;
                s.clients[c].phase = Phase::Holding { token, deadline };
                m.record_grant(s, c, token);
            }
        }
        Action::Renew(c) => {
            let c = usize::from(c);
            let Phase::Holding { token, .. } = s.clients[c].phase else {
                unreachable!()
            };
            let chan = s.chan(c);
            let cl = &mut s.clients[c];
            cl.renewals_left -= 1;
            cl.renewal_n += 1;
            cl.renew_sent = Some(s.clock);
            cl.confirms &= !confirm::RENEW;
            let kind = MsgKind::Renewal {
                stamp: token,
                chan,
                n: cl.renewal_n,
            };
            m.publish_lock(s, c, kind, confirm::RENEW);
        }
        Action::RenewConfirmed(c) => {
            let c = usize::from(c);
            let cl = &mut s.clients[c];
            let sent = cl.renew_sent.take().expect("a renewal is pending");
            cl.confirms &= !confirm::RENEW;
            if let Phase::Holding { deadline, .. } = &mut cl.phase {
                *deadline = (*deadline).max(sent + m.cfg.m);
            }
        }
        Action::Park(c) => {
            let c = usize::from(c);
            let p = m.parking().expect("parking");
            let others_registered = p.count_at_park
                && s.broker.reachable(c)
                && s.broker
                    .consumers
                    .iter()
                    .any(|k| usize::from(k.chan.client) != c);
            let cl = &mut s.clients[c];
            if (cl.wanted && p.release_when_wanted) || others_registered {
                // Wanted while in use: released instead of parked.
                m.close(s, c);
            } else {
                cl.parked = Some(s.clock);
            }
        }
        Action::Unpark(c) => s.clients[usize::from(c)].parked = None,
        _ => unreachable!("not a v2 action: {a:?}"),
    }
}

/// `v2::Receive`: the first delivery starts the grant; while holding, a delivery is kept (own
/// new renewal), means loss (own renewal redelivered, a larger stamp) or is acked.
fn receive(m: &LockModel, s: &mut State, c: usize) {
    let d = s.clients[c].inbox.remove(0);
    let chan = s.chan(c);
    let delivered_lease = m.version != Version::V2Confirm;
    let token = match s.clients[c].phase {
        Phase::Holding { token, .. } | Phase::AwaitFence { token, .. } => token,
        _ => {
            // Waiting: the first delivery; it stays unacked while we record the fence.
            let cl = &mut s.clients[c];
            cl.held = Some(d);
            cl.phase = Phase::ReadFence;
            // Proposed parking rule: another client's wake-up is a waiter behind us.
            if let MsgKind::Wake { from: Some(f) } = d.msg.kind
                && usize::from(f) != c
            {
                cl.wanted = true;
            }
            if m.v3() {
                // No register: a candidate above the stamp, or a new epoch.
                v3::start(m, s, c, d);
            }
            return;
        }
    };
    let granting = matches!(s.clients[c].phase, Phase::AwaitFence { .. });
    // v3: the grant's own renewal has not come back yet (after it, the holder's rules apply).
    let candidate = m.v3() && granting && s.clients[c].confirms & confirm::R0_SEEN == 0;
    let ack = |m: &LockModel, s: &mut State, d: crate::types::Delivery| {
        m.send(
            s,
            c,
            Op::AckLock {
                chan,
                inc: d.inc,
                kind: d.msg.kind,
            },
        )
    };
    match d.msg.kind {
        MsgKind::Renewal { chan: own, n, .. } if own == chan => {
            if d.msg.redelivered {
                // The broker once took it back from us: token taken back.
                m.close(s, c);
            } else if candidate && n < s.clients[c].renewal_n {
                // v3: an earlier candidate of ours, replaced by a re-candidate.
                ack(m, s, d);
            } else {
                if let Some(old) = s.clients[c].held.replace(d) {
                    ack(m, s, old);
                }
                if delivered_lease {
                    // The broker delivered it to us: we were the active consumer after it was
                    // sent. That proves the grant (R0) or extends the lease (Rn).
                    let cl = &mut s.clients[c];
                    if granting {
                        cl.confirms |= confirm::R0_SEEN;
                    } else if let (Some(sent), MsgKind::Renewal { n, .. }) =
                        (cl.renew_sent, d.msg.kind)
                        && n == cl.renewal_n
                    {
                        cl.renew_sent = None;
                        if let Phase::Holding { deadline, .. } = &mut cl.phase {
                            *deadline = (*deadline).max(sent + m.cfg.m);
                        }
                    }
                }
            }
        }
        // v3: another candidate at or above ours (or a holder's renewal): a candidate above it.
        MsgKind::Renewal { stamp, .. } if candidate && stamp >= token => {
            v3::recandidate(m, s, c, d, stamp)
        }
        MsgKind::Renewal { stamp, .. } if stamp > token => m.close(s, c), // granted elsewhere
        // A waiter's wake-up: somebody wants the lock (only parking looks at it).
        MsgKind::Wake { from } => {
            ack(m, s, d);
            if let Some(p) = m.parking() {
                let cl = &mut s.clients[c];
                // Proposed rule: wake-ups carry their publisher, and our own mean nothing.
                let other = from != Some(c as u8);
                if granting && cl.confirms & confirm::R0_SEEN == 0 {
                    // Before our R0 the grant acks it like any extra (`own_delivery`); the
                    // rule (`wanted_in_grant`) keeps another client's as wanted.
                    cl.wanted |= p.wanted_in_grant && other;
                } else if granting || cl.parked.is_none() {
                    // In use (after R0 the holder task sees it): wanted.
                    cl.wanted |= other;
                } else if p.release_when_parked && other {
                    // Parked and wanted: released.
                    m.close(s, c);
                }
            }
        }
        _ => ack(m, s, d),
    }
}

/// Publishes `token` to the fence register and `R0` stamped with it to the lock queue (both
/// confirmed), and waits for both confirms; `t0` is now.
fn publish_token(m: &LockModel, s: &mut State, c: usize, token: Token) {
    let chan = s.chan(c);
    s.clients[c].confirms = 0;
    s.clients[c].phase = Phase::AwaitFence { token, t0: s.clock };
    m.send(
        s,
        c,
        Op::PublishReg {
            reg: Reg::Fence,
            value: token.0,
            chan,
            confirm: confirm::FENCE,
        },
    );
    let r0 = MsgKind::Renewal {
        stamp: token,
        chan,
        n: 0,
    };
    m.publish_lock(s, c, r0, confirm::R0);
}
