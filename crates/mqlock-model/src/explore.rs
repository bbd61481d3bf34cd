//! The exhaustive check every test of this crate runs: stateright's breadth-first search over
//! every reachable state, on 2 threads, going on after the first discoveries so that the state
//! count (which the tests floor) covers the whole configuration.

use std::collections::BTreeSet;
use std::hash::Hash;

use stateright::{Checker, HasDiscoveries, Model};

/// Explores every reachable state of `m` and returns the finished checker (its discoveries,
/// state count and depth).
pub fn explore_all<M>(m: &M) -> impl Checker<M>
where
    M: Model + Clone + Send + Sync + 'static,
    M::State: Hash + Send + Sync + Clone + PartialEq + 'static,
    M::Action: Clone + PartialEq,
{
    m.clone()
        .checker()
        .threads(2)
        // No property is named "(none)": the search stops only when every state was seen.
        .finish_when(HasDiscoveries::AnyOf(BTreeSet::from(["(none)"])))
        .spawn_bfs()
        .join()
}
