//! Leader election (docs/protocol.md, "Election"), built on the mutex.
//!
//! Leadership of the election `NAME` is holding the lock [`election_lock_name`]`(NAME)`
//! (`elect:NAME`). The leader's value travels in the holder identity its grant already writes to
//! the lock's holder record ([`HolderInfo::value`]), so campaigning adds no protocol step and no round
//! trip; [`LockClient::leader`] reads it back through [`LockClient::status`], and
//! [`LockClient::observe`] polls that.

use std::time::Duration;

use futures_util::Stream;

use crate::acquire::Wait;
use crate::client::LockClient;
use crate::error::{Error, Result};
use crate::guard::LockGuard;
use crate::identity::HolderInfo;
use crate::loss::{LossReason, LossSignal};
use crate::metrics::{LeaderMark, Metrics};

/// The prefix that keeps an election's lock apart from plain locks: the election `NAME` is the
/// lock `elect:NAME`. (A plain lock named `elect:NAME` would be the same lock: don't.)
pub const ELECTION_PREFIX: &str = "elect:";

/// The longest value a candidate may campaign with, in bytes. The value rides in the headers of
/// the holder record's message, which must fit one AMQP frame.
pub const MAX_VALUE_LEN: usize = 4096;

/// How often [`LockClient::observe`] looks at the election by default.
pub const DEFAULT_OBSERVE_INTERVAL: Duration = Duration::from_millis(250);

/// The lock whose holder is the leader of the election `name`.
pub fn election_lock_name(name: &str) -> String {
    format!("{ELECTION_PREFIX}{name}")
}

/// The leader of an election, as recorded by its grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    /// The value the leader campaigned with (empty if its grant recorded none: a plain lock
    /// taken on the election's lock name).
    pub value: String,
    /// The leader's fencing token: strictly larger than every earlier leader's.
    pub token: u64,
    /// Who the leader is: host, process id, connection name, since when.
    pub holder: HolderInfo,
}

impl Leader {
    fn from_holder(holder: HolderInfo) -> Self {
        Leader {
            value: holder.value.clone().unwrap_or_default(),
            token: holder.token,
            holder,
        }
    }
}

impl std::fmt::Display for Leader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?}, token {}, pid {} on {}",
            self.value, self.token, self.holder.pid, self.holder.host
        )
    }
}

/// Leadership of an election, from [`LockClient::campaign`]: a held [`LockGuard`] of the
/// election's lock, with the value it was won with.
///
/// Like a guard, it is a belief, not a proof: a leader that was frozen or cut off may still hold
/// it while a standby has taken over. Send [`Leadership::fencing_token`] with every action only
/// the leader may take, and let the resource refuse older tokens. Dropping it resigns in the
/// background.
///
/// While it leads, its client's metrics say so ([`crate::MetricsSnapshot::leading`], the
/// `mqlock_is_leader{election="NAME"}` gauge of `crate::prometheus`): 1 from the won campaign
/// until it is lost, resigned or dropped, then 0.
#[must_use = "dropping the leadership resigns it"]
#[derive(Debug)]
pub struct Leadership {
    election: String,
    value: String,
    guard: LockGuard,
    /// Shows this leadership in the client's metrics while it lives.
    mark: LeaderMark,
}

impl Leadership {
    /// The election's name (as given to [`LockClient::campaign`]).
    pub fn election(&self) -> &str {
        &self.election
    }

    /// The value this leader campaigned with.
    pub fn value(&self) -> &str {
        &self.value
    }

    /// The fencing token of this leadership: strictly larger than every earlier leader's.
    pub fn fencing_token(&self) -> u64 {
        self.guard.fencing_token()
    }

    /// Whether this client still believes it leads ([`LockGuard::is_held`]).
    pub fn is_leader(&self) -> bool {
        self.guard.is_held()
    }

    /// Why leadership was lost, if it was ([`LockGuard::loss_reason`]).
    pub fn loss_reason(&self) -> Option<LossReason> {
        self.guard.loss_reason()
    }

    /// Resolves when leadership is lost, with the reason ([`LockGuard::lost`]; cancel safe).
    pub async fn lost(&self) -> LossReason {
        self.guard.lost().await
    }

    /// A cloneable handle on the loss signal ([`LockGuard::loss_signal`]).
    pub fn loss_signal(&self) -> LossSignal {
        self.guard.loss_signal()
    }

    /// The held lock under this leadership.
    pub fn guard(&self) -> &LockGuard {
        &self.guard
    }

    /// Gives leadership up: releases the election's lock, which the broker hands to the next
    /// standby in the same step ([`LockGuard::release`], with its errors and cancel safety).
    pub async fn resign(self) -> Result<()> {
        let Leadership { guard, mark, .. } = self;
        // Not leading from here on, before the broker hands leadership to a standby: the
        // is-leader gauges of two clients do not both read 1 across the hand-over.
        drop(mark);
        guard.release().await
    }
}

impl LockClient {
    /// Stands for leader of the election `name` with `value`, and waits until elected.
    ///
    /// Candidates stand by in the order they registered with the broker (FIFO) and take over
    /// when the leader resigns, loses its lease or dies: exactly like [`LockClient::lock`] on
    /// the lock [`election_lock_name`]`(name)`, whose grant records `value` with the holder's
    /// identity (no extra round trip), where [`LockClient::leader`] and
    /// [`LockClient::observe`] read it.
    ///
    /// # Errors
    ///
    /// Those of [`LockClient::lock`], and [`Error::Config`] for a value longer than
    /// [`MAX_VALUE_LEN`] bytes (checked before anything is sent).
    ///
    /// # Cancel safety
    ///
    /// As [`LockClient::lock`]: a dropped campaign never leads.
    ///
    /// # Panics
    ///
    /// As [`LockClient::lock`].
    pub async fn campaign(&self, name: &str, value: &str) -> Result<Leadership> {
        if value.len() > MAX_VALUE_LEN {
            return Err(Error::Config(format!(
                "the value of a campaign for {name:?} is {} bytes long, more than {MAX_VALUE_LEN}",
                value.len()
            )));
        }
        // Listed in the metrics (not leading) while standing by.
        self.inner.metrics.standing(name);
        let guard = self
            .acquire(
                &election_lock_name(name),
                Wait::Forever,
                None,
                Some(value.to_owned()),
            )
            .await?
            .expect("a blocking acquisition grants or fails");
        let mark = Metrics::elected(&self.inner.metrics, name, guard.loss_signal());
        Ok(Leadership {
            election: name.to_owned(),
            value: value.to_owned(),
            guard,
            mark,
        })
    }

    /// The current leader of the election `name`, or `None` if nobody leads.
    ///
    /// One [`LockClient::status`] of the election's lock: the leader is the holder the holder
    /// record names while the lock is held. During a hand-over it may still name the previous
    /// leader for the moment the new one is being granted. A record another reader has taken at
    /// that moment is looked at again, up to 5 times in 100 ms; if it still shows no holder,
    /// `None`.
    ///
    /// # Errors
    ///
    /// Those of [`LockClient::status`].
    ///
    /// # Cancel safety
    ///
    /// As [`LockClient::status`].
    pub async fn leader(&self, name: &str) -> Result<Option<Leader>> {
        Ok(match self.read_leader(name).await? {
            Reading::Leader(l) => Some(l),
            Reading::Nobody | Reading::Unknown => None,
        })
    }

    /// The leader, nobody, or held by someone the holder record does not show (after retries).
    async fn read_leader(&self, name: &str) -> Result<Reading> {
        let lock = election_lock_name(name);
        for attempt in 0..5 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let status = self.status(&lock).await?;
            if !status.is_held() {
                return Ok(Reading::Nobody);
            }
            if let Some(holder) = status.holder {
                return Ok(Reading::Leader(Leader::from_holder(holder)));
            }
        }
        Ok(Reading::Unknown)
    }

    /// Watches the election `name`: yields the current leader (or `None`) first, then each
    /// change, looking every [`DEFAULT_OBSERVE_INTERVAL`] (250 ms); see
    /// [`LockClient::observe_every`].
    pub fn observe(&self, name: &str) -> impl Stream<Item = Result<Option<Leader>>> + use<> {
        self.observe_every(name, DEFAULT_OBSERVE_INTERVAL)
    }

    /// Watches the election `name`, looking every `interval` ([`LockClient::leader`]).
    ///
    /// Yields the current leader (or `None`) first, then every change it sees: a leader with a
    /// larger fencing token, or nobody after someone. What it promises (etcd's observe):
    ///
    /// - the leaders it yields have strictly increasing tokens;
    /// - the latest leader is yielded eventually: within `interval` plus one status round trip
    ///   (two broker round trips) after the new leader's grant was recorded, unless it changed
    ///   again meanwhile;
    /// - it may skip leaders that led for less than that: intermediate changes are coalesced,
    ///   never the latest.
    ///
    /// A failed look yields the error and the stream goes on looking (the client reconnects on
    /// the next look); stop on the first error if that suits better. The stream never ends on
    /// its own. Each look registers nothing, but takes the register's values for one round trip
    /// (as [`LockClient::status`] does): a grant at that moment starts a new epoch.
    ///
    /// # Panics
    ///
    /// If polled outside a tokio runtime with its time driver.
    pub fn observe_every(
        &self,
        name: &str,
        interval: Duration,
    ) -> impl Stream<Item = Result<Option<Leader>>> + use<> {
        struct State {
            client: LockClient,
            name: String,
            interval: Duration,
            /// Looked at least once: sleep before the next look.
            looked: bool,
            /// Nothing yielded yet.
            first: bool,
            /// The last thing yielded was a leader (not nobody).
            leading: bool,
            /// The largest token yielded.
            top: u64,
        }
        let state = State {
            client: self.clone(),
            name: name.to_owned(),
            interval,
            looked: false,
            first: true,
            leading: false,
            top: 0,
        };
        futures_util::stream::unfold(state, |mut s| async move {
            loop {
                if std::mem::replace(&mut s.looked, true) {
                    tokio::time::sleep(s.interval).await;
                }
                match s.client.read_leader(&s.name).await {
                    Err(e) => return Some((Err(e), s)),
                    // Held, but the record did not show by whom: nothing to tell yet.
                    Ok(Reading::Unknown) => {}
                    Ok(Reading::Nobody) => {
                        if s.first || s.leading {
                            s.first = false;
                            s.leading = false;
                            return Some((Ok(None), s));
                        }
                    }
                    // Registers never go down (F4): a token not above the largest one yielded
                    // is not a newer leader.
                    Ok(Reading::Leader(l)) => {
                        if s.first || l.token > s.top {
                            s.first = false;
                            s.leading = true;
                            s.top = s.top.max(l.token);
                            return Some((Ok(Some(l)), s));
                        }
                    }
                }
            }
        })
    }
}

enum Reading {
    Nobody,
    Unknown,
    Leader(Leader),
}
