//! The properties checked on every reachable state.

use stateright::Property;

use crate::model::{LockModel, State};

/// M1: at most one consumer of the lock queue holds deliveries, and it is the active one.
pub const M1: &str = "M1 one holder at the broker";
/// F1: every grant's token is above every earlier grant's (so no two grants share a token).
pub const F1: &str = "F1 tokens strictly increase in grant order";
/// L2: when a client is granted, no other client believes it holds.
pub const L2: &str = "L2 nobody else believes at a grant";
/// Z1: a client that believes it holds has the largest token granted so far.
pub const Z1: &str = "Z1 no zombie holder";
/// Sanity (example expected): some client believes it holds.
pub const S_GRANT: &str = "S1 some client is granted";
/// Sanity (example expected): a client holds while another's consumer is suspected (the lock
/// was handed on after a node was declared down).
pub const S_TAKEOVER: &str = "S2 hand-over after a node was declared down";

/// Every property, in the order above.
pub fn all() -> Vec<Property<LockModel>> {
    vec![
        Property::always(M1, |_, s: &State| m1(s)),
        Property::always(F1, |_, s: &State| !s.f1_broken),
        Property::always(L2, |_, s: &State| !s.l2_broken),
        Property::always(Z1, |_, s: &State| z1(s)),
        Property::sometimes(S_GRANT, |_, s: &State| {
            s.clients.iter().any(|c| c.believes(s.clock))
        }),
        Property::sometimes(S_TAKEOVER, |_, s: &State| {
            s.clients.iter().any(|c| c.believes(s.clock)) && !s.broker.suspected.is_empty()
        }),
    ]
}

/// M1 on one state.
pub fn m1(s: &State) -> bool {
    let b = &s.broker;
    b.suspected.iter().all(|k| k.unacked.is_empty())
        && b.consumers.iter().skip(1).all(|k| k.unacked.is_empty())
}

/// Z1 on one state: `believes(c) => token(c) == max granted token`. With F1 this says that
/// only the latest grantee may believe it holds: a holder that was superseded (a later grant
/// has a larger token) and still believes it holds is a zombie, whether it is seen at the
/// moment of the later grant (that is L2) or later, e.g. after a heal.
pub fn z1(s: &State) -> bool {
    s.clients
        .iter()
        .all(|c| !c.believes(s.clock) || c.token() == s.max_grant)
}
