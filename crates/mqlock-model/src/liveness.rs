//! "No stuck lock", checked by our own reachability analysis over the whole state graph
//! (stateright's `eventually` ignores paths that end in a cycle).
//!
//! The property (LV): from every reachable state in which some client is waiting (consumer
//! registered, not granted), a state is reachable in which a client is granted (a `Grant`
//! step that grants) or nobody waits any more, without any waiter closing its channel on its
//! own (`client::Close` of a waiting client is left out of the graph; v2's give-up after a
//! late grant and holders' releases, crashes and losses stay in). It is
//! `AG (waiting -> EF (granted or nobody waits))` on that graph: under strong fairness over
//! the model's finitely many transitions — a step enabled infinitely often is eventually
//! taken — every wait ends. It says nothing about how long a wait lasts, and the bounds
//! (horizon, acquisitions, nudges) count: a waiter whose only hope is a nudge it may no longer
//! send is reported stuck.

use std::collections::{HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};

use stateright::Model;

use crate::client::Phase;
use crate::graph;
use crate::model::{Action, LockModel, State};

/// The outcome of the analysis.
#[derive(Debug)]
pub struct Liveness {
    /// States explored.
    pub states: usize,
    /// Transitions kept in the graph.
    pub edges: usize,
    /// Reachable states with a waiter from which no grant is reachable.
    pub stuck: usize,
    /// A shortest path (action names) from the initial state to a stuck state, if any.
    pub stuck_path: Option<Vec<String>>,
    /// The stuck state at the end of that path.
    pub stuck_state: Option<State>,
}

fn fp(s: &State) -> u64 {
    let mut h = DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

/// Explores every state of `m` (breadth first) and checks LV with [`graph::check`].
pub fn check(m: &LockModel) -> Liveness {
    check_with(m, |_, _| true)
}

/// LV-W, "released as soon as another client starts waiting": LV on the graph without the
/// steps that end a parked hold other than a wake-up or a loss: no `v2::ParkExpire` (the idle
/// limit never fires), no `v2::Unpark` and no `client::Close` of a parked holder (its client
/// never uses the lock again and never crashes). Losses (`v2::Expire`, a larger stamp, an own
/// renewal redelivered), holders in use (their releases, crashes, `v2::Park`) and the broker's
/// steps stay. So every waiter is granted even if parked holders never resume use and their
/// idle limit is infinite.
pub fn check_wanted(m: &LockModel) -> Liveness {
    check_with(m, |s, a| match a {
        Action::ParkExpire(_) | Action::Unpark(_) => false,
        Action::Close(c) => s.clients[usize::from(*c)].parked.is_none(),
        _ => true,
    })
}

/// LV-G, "a newcomer is granted": from every reachable state in which a client is registered
/// and has not had its first delivery yet (`Phase::Waiting`), a grant (to any client) is
/// reachable, on LV's graph (without a waiter's own `client::Close`). Unlike LV, nobody
/// waiting is not a goal. So a lock that every consumer gives up in turn is caught even when
/// the bounded acquisitions end the wait; a grantee that gives up because its grant came too
/// late (`now >= t0 + M`), with nobody behind it, is not (it has had its first delivery).
pub fn check_grantable(m: &LockModel) -> Liveness {
    check_with_goal(
        m,
        |s| s.clients.iter().any(|c| c.phase == Phase::Waiting),
        |_| false,
        |_, _| true,
    )
}

/// LV over the edges `keep` accepts (and without a waiter's own `client::Close`).
fn check_with(m: &LockModel, keep: impl Fn(&State, &Action) -> bool) -> Liveness {
    let waiting = |s: &State| s.clients.iter().any(|c| c.waiting());
    check_with_goal(m, waiting, move |s| !waiting(s), keep)
}

/// `AG(from -> EF(goal or a grant))` over the edges `keep` accepts, without a waiter's own
/// `client::Close`.
fn check_with_goal(
    m: &LockModel,
    from: impl Fn(&State) -> bool,
    goal: impl Fn(&State) -> bool,
    keep: impl Fn(&State, &Action) -> bool,
) -> Liveness {
    let report = graph::check(
        m,
        from,
        goal,
        |_, a, t| matches!(a, Action::Grant(c) if t.clients[usize::from(*c)].token().is_some()),
        // A waiter that walks away does not count as the wait ending.
        |s, a| !matches!(a, Action::Close(c) if s.clients[usize::from(*c)].waiting()) && keep(s, a),
    );
    let stuck_state = report.stuck_path.as_ref().map(|acts| {
        let mut s = m.init_states().remove(0);
        for a in acts {
            s = m.next_state(&s, *a).expect("replay");
        }
        s
    });
    Liveness {
        states: report.states,
        edges: report.edges,
        stuck: report.stuck,
        stuck_path: report
            .stuck_path
            .map(|acts| acts.iter().map(|a| m.action_name(a)).collect()),
        stuck_state,
    }
}

/// A shortest path (actions, with the state after each) from the initial state to a state
/// where the property `name` is false, found by our own breadth-first search (stateright's
/// multi-block search does not promise shortest paths). `None` if there is none.
pub fn shortest_counterexample(m: &LockModel, name: &'static str) -> Option<Vec<(Action, State)>> {
    let cond = m.property(name).condition;
    shortest_path_to(m, |s| !cond(m, s))
}

/// A shortest path (actions, with the state after each) from the initial state to a state
/// `target` accepts, by breadth-first search. `None` if there is none.
pub fn shortest_path_to(
    m: &LockModel,
    target: impl Fn(&State) -> bool,
) -> Option<Vec<(Action, State)>> {
    let init = m.init_states().remove(0);
    let mut index: HashMap<u64, u32> = HashMap::new();
    let mut parent: Vec<(u32, Option<Action>)> = vec![(0, None)];
    let mut queue = VecDeque::new();
    index.insert(fp(&init), 0);
    queue.push_back((0u32, init));
    let mut actions = Vec::new();
    while let Some((i, s)) = queue.pop_front() {
        if target(&s) {
            let mut acts = Vec::new();
            let mut at = i as usize;
            while let (p, Some(a)) = parent[at] {
                acts.push(a);
                at = p as usize;
            }
            acts.reverse();
            return Some(replay(m, &acts));
        }
        actions.clear();
        m.actions(&s, &mut actions);
        for a in actions.drain(..) {
            let Some(t) = m.next_state(&s, a) else {
                continue;
            };
            if let std::collections::hash_map::Entry::Vacant(e) = index.entry(fp(&t)) {
                let j = parent.len() as u32;
                e.insert(j);
                parent.push((i, Some(a)));
                queue.push_back((j, t));
            }
        }
    }
    None
}

/// Replays `actions` from the initial state; each must be enabled. Returns each action with
/// the state after it.
pub fn replay(m: &LockModel, actions: &[Action]) -> Vec<(Action, State)> {
    let mut s = m.init_states().remove(0);
    let mut out = Vec::new();
    for a in actions {
        let mut enabled = Vec::new();
        m.actions(&s, &mut enabled);
        assert!(
            enabled.contains(a),
            "{} is not enabled after {:?}",
            m.action_name(a),
            out.iter()
                .map(|(a, _)| m.action_name(a))
                .collect::<Vec<_>>()
        );
        s = m.next_state(&s, *a).expect("a step");
        out.push((*a, s.clone()));
    }
    out
}

/// A path in words: one line per step with the action's name and what it changed in a few
/// words (clock, the clients' phases, the registers, the lock queue).
pub fn describe(m: &LockModel, path: &[(Action, State)]) -> String {
    let mut out = String::new();
    for (k, (a, s)) in path.iter().enumerate() {
        let clients: Vec<String> = s
            .clients
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let belief = if c.believes(s.clock) { " BELIEVES" } else { "" };
                let parked = match c.parked {
                    Some(t) => format!(" PARKED@{t}"),
                    None => String::new(),
                };
                let wanted = if c.wanted { " WANTED" } else { "" };
                format!("c{i}:{:?}{belief}{parked}{wanted}", c.phase)
            })
            .collect();
        let fence: Vec<String> = s
            .broker
            .fence
            .ready
            .iter()
            .map(|v| format!("{:?}", crate::types::Token(*v)))
            .collect();
        out.push_str(&format!(
            "{:>3}. t={} {:<32} {} | fence={:?} epoch={:?} queue={:?} active={:?}\n",
            k + 1,
            s.clock,
            m.action_name(a),
            clients.join(" "),
            fence,
            s.broker.epoch.ready,
            s.broker.ready,
            s.broker.consumers.first().map(|c| c.chan),
        ));
    }
    out
}
