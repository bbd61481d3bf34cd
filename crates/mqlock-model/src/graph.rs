//! Liveness by backward reachability over a model's whole state graph (stateright's
//! `eventually` ignores paths that end in a cycle): the mutex's "no stuck lock"
//! (`crate::liveness`) and the recipes' "no stuck wait" and "no stuck permit".
//!
//! [`check`] decides `AG(from -> EF goal)` on the graph restricted to the kept edges, where a
//! goal is a state `goal_state` accepts or a kept edge `goal_edge` accepts (taking it counts as
//! reaching the goal). Under strong fairness over the finitely many transitions that are kept,
//! every `from` state is eventually followed by the goal.

use std::collections::{HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};

use stateright::Model;

/// The outcome of [`check`].
#[derive(Debug)]
pub struct Report<A> {
    /// States explored.
    pub states: usize,
    /// Edges kept.
    pub edges: usize,
    /// States where `from` holds.
    pub from: usize,
    /// States where `from` holds and no goal is reachable over kept edges.
    pub stuck: usize,
    /// A shortest path (over all edges) from the initial state to a stuck state, if any.
    pub stuck_path: Option<Vec<A>>,
}

fn fp<S: Hash>(s: &S) -> u64 {
    let mut h = DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

/// Explores every state of `m` (breadth first) and checks `AG(from -> EF goal)` over the edges
/// `keep` accepts.
pub fn check<M>(
    m: &M,
    from: impl Fn(&M::State) -> bool,
    goal_state: impl Fn(&M::State) -> bool,
    goal_edge: impl Fn(&M::State, &M::Action, &M::State) -> bool,
    keep: impl Fn(&M::State, &M::Action) -> bool,
) -> Report<M::Action>
where
    M: Model,
    M::State: Hash,
    M::Action: Clone,
{
    let init = m.init_states().remove(0);
    let mut index: HashMap<u64, u32> = HashMap::new();
    let mut parent: Vec<(u32, Option<M::Action>)> = vec![(0, None)];
    let mut is_from = vec![false];
    let mut good = vec![false];
    let mut rev: Vec<(u32, u32)> = Vec::new();
    let mut queue = VecDeque::new();
    index.insert(fp(&init), 0);
    queue.push_back((0u32, init));
    let mut actions = Vec::new();
    while let Some((i, s)) = queue.pop_front() {
        let iu = i as usize;
        is_from[iu] = from(&s);
        if goal_state(&s) {
            good[iu] = true;
        }
        actions.clear();
        m.actions(&s, &mut actions);
        for a in actions.drain(..) {
            let kept = keep(&s, &a);
            let Some(t) = m.next_state(&s, a.clone()) else {
                continue;
            };
            if kept && goal_edge(&s, &a, &t) {
                good[iu] = true;
            }
            let f = fp(&t);
            let j = match index.get(&f) {
                Some(j) => *j,
                None => {
                    let j = parent.len() as u32;
                    index.insert(f, j);
                    parent.push((i, Some(a)));
                    is_from.push(false);
                    good.push(false);
                    queue.push_back((j, t));
                    j
                }
            };
            if kept {
                rev.push((j, i));
            }
        }
    }
    let n = parent.len();
    rev.sort_unstable();
    let mut start = vec![0usize; n + 1];
    for (j, _) in &rev {
        start[*j as usize + 1] += 1;
    }
    for k in 0..n {
        start[k + 1] += start[k];
    }
    let mut work: Vec<u32> = (0..n as u32).filter(|k| good[*k as usize]).collect();
    while let Some(j) = work.pop() {
        for (_, i) in &rev[start[j as usize]..start[j as usize + 1]] {
            if !good[*i as usize] {
                good[*i as usize] = true;
                work.push(*i);
            }
        }
    }
    let stuck: Vec<usize> = (0..n).filter(|k| is_from[*k] && !good[*k]).collect();
    let stuck_path = stuck.first().map(|k| {
        let mut acts = Vec::new();
        let mut at = *k;
        while let (p, Some(a)) = &parent[at] {
            acts.push(a.clone());
            at = *p as usize;
        }
        acts.reverse();
        acts
    });
    Report {
        states: n,
        edges: rev.len(),
        from: is_from.iter().filter(|x| **x).count(),
        stuck: stuck.len(),
        stuck_path,
    }
}

/// A shortest path (actions) from the initial state of `m` to a state `bad` accepts, by a
/// breadth-first search that stops there; `None` if no reachable state is bad.
pub fn shortest<M>(m: &M, bad: impl Fn(&M::State) -> bool) -> Option<Vec<M::Action>>
where
    M: Model,
    M::State: Hash,
    M::Action: Clone,
{
    let init = m.init_states().remove(0);
    let mut index: HashMap<u64, u32> = HashMap::new();
    let mut parent: Vec<(u32, Option<M::Action>)> = vec![(0, None)];
    let mut queue = VecDeque::new();
    index.insert(fp(&init), 0);
    queue.push_back((0u32, init));
    let mut actions = Vec::new();
    while let Some((i, s)) = queue.pop_front() {
        if bad(&s) {
            let mut acts = Vec::new();
            let mut at = i as usize;
            while let (p, Some(a)) = &parent[at] {
                acts.push(a.clone());
                at = *p as usize;
            }
            acts.reverse();
            return Some(acts);
        }
        actions.clear();
        m.actions(&s, &mut actions);
        for a in actions.drain(..) {
            let Some(t) = m.next_state(&s, a.clone()) else {
                continue;
            };
            if let std::collections::hash_map::Entry::Vacant(e) = index.entry(fp(&t)) {
                e.insert(parent.len() as u32);
                parent.push((i, Some(a)));
                queue.push_back((parent.len() as u32 - 1, t));
            }
        }
    }
    None
}

/// Replays `actions` from the initial state of `m`; each must be enabled. Returns the states
/// after each step.
pub fn replay<M>(m: &M, actions: &[M::Action]) -> Vec<M::State>
where
    M: Model,
    M::State: Clone,
    M::Action: PartialEq + Clone + std::fmt::Debug,
{
    let mut s = m.init_states().remove(0);
    let mut out = Vec::new();
    for (k, a) in actions.iter().enumerate() {
        let mut enabled = Vec::new();
        m.actions(&s, &mut enabled);
        assert!(
            enabled.contains(a),
            "step {} ({}) is not enabled",
            k + 1,
            m.format_action(a)
        );
        s = m.next_state(&s, a.clone()).expect("a step");
        out.push(s.clone());
    }
    out
}
