//! The v1 client (docs/protocol.md as of today): the delivered message is the token, the
//! registers keep the last value written (`x-max-length = 1`, drop-head), every later delivery
//! is acked away, and the lease is renewed by a probe that the client's own node answers.

use crate::broker::Op;
use crate::client::Phase;
use crate::model::{Action, LockModel, State};
use crate::types::{Reg, Token, confirm};

/// Pushes the v1-specific actions enabled for client `c`.
pub fn actions(m: &LockModel, s: &State, c: usize, out: &mut Vec<Action>) {
    let cl = &s.clients[c];
    let i = c as u8;
    let reachable = s.broker.reachable(c);
    match cl.phase {
        Phase::Waiting if !cl.inbox.is_empty() => out.push(Action::Receive(i)),
        Phase::Holding { deadline, .. } if s.clock < deadline => {
            if !cl.inbox.is_empty() {
                out.push(Action::Receive(i));
            }
            // H3: the probe is answered by the client's own node, so it succeeds while the
            // node is cut off from the leader.
            if deadline < s.clock + m.cfg.m {
                out.push(Action::Probe(i));
            }
        }
        Phase::ReadFence if reachable => out.push(Action::ReadFence(i)),
        Phase::NeedEpoch if reachable => out.push(Action::StartEpoch(i)),
        Phase::AwaitEpoch { .. } if cl.confirms & confirm::EPOCH != 0 => {
            out.push(Action::EpochConfirmed(i))
        }
        Phase::AwaitFence { .. } if cl.confirms & confirm::FENCE != 0 => out.push(Action::Grant(i)),
        _ => {}
    }
}

/// Applies a v1-specific action.
pub fn step(m: &LockModel, s: &mut State, a: Action) {
    match a {
        Action::Receive(c) => {
            let c = usize::from(c);
            let d = s.clients[c].inbox.remove(0);
            if s.clients[c].phase == Phase::Waiting {
                // The first delivery: we are the active consumer; it stays unacked (the token).
                s.clients[c].held = Some(d);
                s.clients[c].phase = Phase::ReadFence;
            } else {
                // Holding: every further delivery is acked away (H1 when it is the token).
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
        }
        Action::ReadFence(c) => {
            let c = usize::from(c);
            let chan = s.chan(c);
            match s.broker.fence.get(chan) {
                Some(v) => publish_token(m, s, c, Token(v).next()),
                None => s.clients[c].phase = Phase::NeedEpoch,
            }
        }
        Action::StartEpoch(c) => {
            let c = usize::from(c);
            let chan = s.chan(c);
            let e = s.broker.epoch.get(chan).map_or(0, |e| e as u8);
            let e2 = (e + 1).max(s.clock);
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
            publish_token(m, s, c, Token::start(e));
        }
        Action::Grant(c) => {
            let c = usize::from(c);
            let Phase::AwaitFence { token, .. } = s.clients[c].phase else {
                unreachable!()
            };
            let chan = s.chan(c);
            m.send(
                s,
                c,
                Op::AckTaken {
                    reg: Reg::Fence,
                    chan,
                },
            );
            s.clients[c].phase = Phase::Holding {
                token,
                deadline: s.clock + m.cfg.m,
            };
            m.record_grant(s, c, token);
        }
        Action::Probe(c) => {
            let c = usize::from(c);
            let now = s.clock;
            if let Phase::Holding { deadline, .. } = &mut s.clients[c].phase {
                *deadline = now + m.cfg.m;
            }
        }
        _ => unreachable!("not a v1 action: {a:?}"),
    }
}

/// Publishes `token` to the fence register (confirmed) and waits for the confirm.
fn publish_token(m: &LockModel, s: &mut State, c: usize, token: Token) {
    let chan = s.chan(c);
    s.clients[c].confirms = 0;
    s.clients[c].phase = Phase::AwaitFence { token, t0: 0 };
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
}
