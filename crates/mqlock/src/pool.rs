//! The client's broker connections: as many as its lock channels need, one while few are held.
//!
//! Why a pool: every lock owns an AMQP channel from its registration to its release, and
//! release closes that channel (the protocol never cancels a consumer: on RabbitMQ 3.10.8
//! cancelling the active consumer of a classic lock queue can crash the queue,
//! rabbitmq-server #5460; docs/protocol.md). A connection carries at most its negotiated
//! `channel_max` channels (2 047 on RabbitMQ by default), so one connection caps a client at
//! about 2 000 locks held or waited for at once, and lapin's cost per frame grows with the
//! channels of its connection (`MAX_LOCK_CHANNELS`). The pool spreads lock channels over
//! several connections to the same broker:
//!
//! - **Counting.** Each connection counts its lock channels ([`LockChannels`]): a place is
//!   reserved ([`ChannelPermit`]) when an acquisition (or the spare channel opened ahead of
//!   one) chooses the connection, and the channel's status is kept from its opening on. A
//!   channel counts until lapin reports it closed; closed ones are only noticed when the
//!   statuses are looked through (pruned), so the count errs on the high side, never the low.
//!   A connection takes at most `channel_max` less a reserve, and at most 256
//!   ([`room_for_locks`]): the reserve
//!   is for the connection's own channels (the liveness probe; `status`, `break_lock` and the
//!   cluster mark open short-lived ones) and for channels lapin still knows after it reported
//!   them closed.
//! - **Choosing.** An acquisition takes the first live connection, in opening order, whose
//!   count leaves room. When none does, the counts are pruned; if all of them together still
//!   have less than a sixteenth of a connection's room left (near `channel_max` everywhere),
//!   another connection is opened, otherwise the connection with the most room is taken. The
//!   margin keeps a client that holds just about what its connections carry from looking
//!   through every status at every acquisition. Connections are opened one at a time
//!   (`opening`), lazily: a client that never holds more than a connection carries has one.
//! - **Failure.** Connections are independent: each has its own liveness probe, heartbeats and
//!   loss signal (`Conn::dead`), and each held lock watches the connection its channel is on,
//!   so a connection's death loses its locks only. A dead connection leaves the pool at the
//!   next choice; when no live connection is left, the next acquisition opens a new one (a
//!   reconnection, as before the pool). Every connection opened is checked against the
//!   cluster mark (`check_mark`) like the first.
//! - **Shrinking.** At most every [`MAINTAIN_EVERY`], a choice also prunes every count and
//!   closes the connections after the first that carry no lock channel (nor a reservation):
//!   a client that held 10 000 locks and went back to a few goes back to one connection.
//!   (Known gap: `tests/lock_scale.rs` saw an empty connection kept for minutes in some runs,
//!   a count that stayed above zero; not yet explained.)
//! - **Closing.** [`LockClient::close`] closes every connection of the pool.
//!
//! Everything that is not a lock channel (`status`, `break_lock`) uses [`LockClient::connection`],
//! the first live connection.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use lapin::{Channel, ChannelStatus};
use tracing::info;

use crate::client::{LockClient, check_mark};
use crate::connection::Conn;
use crate::error::{Error, Result};

/// How often a choice also prunes the counts and closes the extra connections left empty.
pub(crate) const MAINTAIN_EVERY: Duration = Duration::from_secs(5);

/// The most lock channels one connection takes, whatever its `channel_max`.
///
/// lapin (4.12) reads the flow state of every channel of a connection for each frame it writes
/// (`Channels::flow`, called by the I/O loop's `serialize`), so the cost of every frame on a
/// connection grows with its channels: measured, one client with 2 000 lock channels on one
/// connection stalled that connection's I/O thread (renewals came back too late and leases
/// expired) while 64 acquisitions ran. Several smaller connections, each with its own I/O
/// thread, keep every frame cheap.
pub(crate) const MAX_LOCK_CHANNELS: usize = 256;

/// How many lock channels a connection whose negotiated `channel_max` is `channel_max` takes:
/// all but a thirty-second of them (at least one kept back for the liveness probe, at most
/// 64), and at most [`MAX_LOCK_CHANNELS`].
pub(crate) fn room_for_locks(channel_max: u16) -> usize {
    let max = usize::from(channel_max);
    let reserve = (max / 32).clamp(1, 64);
    max.saturating_sub(reserve).clamp(1, MAX_LOCK_CHANNELS)
}

/// The lock channels of one connection (see the module docs, "Counting").
pub(crate) struct LockChannels {
    /// How many lock channels the connection takes (`room_for_locks`).
    capacity: usize,
    state: std::sync::Mutex<Counted>,
}

#[derive(Default)]
struct Counted {
    /// The status of every lock channel opened and not yet seen closed by a prune.
    open: Vec<ChannelStatus>,
    /// Places reserved for channels being opened.
    reserved: usize,
    /// Set by `saturate`, cleared by a prune: no room whatever the count says.
    full: bool,
}

impl Counted {
    fn used(&self) -> usize {
        self.open.len() + self.reserved
    }
}

impl LockChannels {
    pub(crate) fn new(channel_max: u16) -> LockChannels {
        LockChannels {
            capacity: room_for_locks(channel_max),
            state: std::sync::Mutex::new(Counted::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Counted> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets the channels lapin reports closed; returns the room left.
    fn prune(&self) -> usize {
        let mut state = self.state();
        // A channel is open from its creation (Initial) to its close-ok (Closed) or an error;
        // `closing` covers Closing and Reconnecting.
        state
            .open
            .retain(|s| s.initializing() || s.connected() || s.closing());
        state.full = false;
        self.capacity.saturating_sub(state.used())
    }

    /// Whether the connection carries no lock channel, nor a place reserved for one (pruned).
    fn is_idle(&self) -> bool {
        self.prune();
        self.state().used() == 0
    }

    /// Counts the connection as full until its next prune: lapin refused a channel
    /// (`ChannelsLimitReached`) that the count said there was room for, because short-lived
    /// channels took more than the reserve.
    pub(crate) fn saturate(&self) {
        self.state().full = true;
    }

    /// How many lock channels are counted (for logs).
    pub(crate) fn counted(&self) -> usize {
        self.state().used()
    }
}

/// A place reserved for one lock channel on a connection; given back when dropped unless the
/// channel was opened (`track`), which then counts instead.
pub(crate) struct ChannelPermit {
    conn: Arc<Conn>,
    tracked: bool,
}

impl ChannelPermit {
    /// Reserves a place on `conn` if its count (not pruned) leaves room.
    pub(crate) fn reserve(conn: &Arc<Conn>) -> Option<ChannelPermit> {
        let channels = &conn.lock_channels;
        let mut state = channels.state();
        if state.full || state.used() >= channels.capacity {
            return None;
        }
        state.reserved += 1;
        Some(ChannelPermit {
            conn: conn.clone(),
            tracked: false,
        })
    }

    /// The connection the place is on.
    pub(crate) fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }

    /// Counts `channel`, just opened on the permit's connection, in the place reserved.
    pub(crate) fn track(mut self, channel: &Channel) {
        let mut state = self.conn.lock_channels.state();
        state.reserved -= 1;
        state.open.push(channel.status().clone());
        self.tracked = true;
    }
}

impl Drop for ChannelPermit {
    fn drop(&mut self) {
        if !self.tracked {
            self.conn.lock_channels.state().reserved -= 1;
        }
    }
}

/// The client's connections (see the module docs).
pub(crate) struct Pool {
    state: std::sync::Mutex<PoolState>,
    /// Held while a connection is being opened: one at a time, and an acquisition that waited
    /// for another's opening looks again before opening one of its own.
    opening: tokio::sync::Mutex<()>,
}

struct PoolState {
    /// Live connections (and dead ones not yet noticed), in opening order.
    conns: Vec<Arc<Conn>>,
    /// When the counts were last pruned and the empty extra connections closed.
    maintained: Instant,
    /// Whether the client had a connection once (a new one is then a reconnection, logged).
    connected: bool,
}

impl Pool {
    /// A pool holding `first`, the connection `LockClient::connect` opened.
    pub(crate) fn new(first: Arc<Conn>) -> Pool {
        Pool {
            state: std::sync::Mutex::new(PoolState {
                conns: vec![first],
                maintained: Instant::now(),
                connected: true,
            }),
            opening: tokio::sync::Mutex::new(()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The first live connection, if any.
    fn first_live(&self) -> Option<Arc<Conn>> {
        let mut state = self.state();
        state.conns.retain(|c| c.is_alive());
        state.conns.first().cloned()
    }

    /// A place for a lock channel on a live connection, if one has room (module docs,
    /// "Choosing"); `None`: open another connection.
    fn choose(&self) -> Option<ChannelPermit> {
        let mut state = self.state();
        // A dead connection's locks watch it themselves (`Conn::dead`); the pool only stops
        // choosing it.
        state.conns.retain(|c| c.is_alive());
        if state.maintained.elapsed() >= MAINTAIN_EVERY {
            state.maintained = Instant::now();
            retire_idle(&mut state.conns);
        }
        if let Some(permit) = state.conns.iter().find_map(ChannelPermit::reserve) {
            return Some(permit);
        }
        let rooms: Vec<usize> = state
            .conns
            .iter()
            .map(|c| c.lock_channels.prune())
            .collect();
        let low_water = state
            .conns
            .iter()
            .map(|c| c.lock_channels.capacity / 16)
            .max()
            .unwrap_or(0)
            .max(1);
        if rooms.iter().sum::<usize>() < low_water {
            return None;
        }
        let roomiest = (0..rooms.len()).max_by_key(|&i| rooms[i])?;
        ChannelPermit::reserve(&state.conns[roomiest])
    }

    /// Every connection of the pool, taken out of it (to close them).
    fn take_all(&self) -> Vec<Arc<Conn>> {
        std::mem::take(&mut self.state().conns)
    }

    /// How many connections the pool has, and the lock channels counted on each (not pruned).
    pub(crate) fn counts(&self) -> Vec<usize> {
        self.state()
            .conns
            .iter()
            .map(|c| c.lock_channels.counted())
            .collect()
    }
}

/// Closes the connections after the first that carry no lock channel (module docs,
/// "Shrinking"). A place is reserved under the pool's lock, which the caller holds, so no
/// acquisition can be about to use a connection found idle here.
fn retire_idle(conns: &mut Vec<Arc<Conn>>) {
    let mut index = 0;
    conns.retain(|c| {
        index += 1;
        if index == 1 || !c.lock_channels.is_idle() {
            return true;
        }
        info!(broker = %c.addr, "closing a connection that no longer carries a lock");
        let conn = c.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { conn.close().await });
        }
        false
    });
}

impl LockClient {
    /// The connection for everything but lock channels (`status`, `break_lock`): the first
    /// live one, opened (a reconnection) if there is none.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`], and those of opening a connection (`Conn::open`, `check_mark`).
    pub(crate) async fn connection(&self) -> Result<Arc<Conn>> {
        loop {
            if self.inner.closed.load(Ordering::Acquire) {
                return Err(Error::Closed);
            }
            if let Some(conn) = self.inner.pool.first_live() {
                return Ok(conn);
            }
            self.open_another(|pool| pool.first_live().is_some())
                .await?;
        }
    }

    /// A place for one lock channel on a connection with room, opening another connection
    /// when all are near `channel_max` or none is alive (module docs, "Choosing").
    ///
    /// Cancel safe: a connection being opened is dropped with the future (lapin closes it); a
    /// permit dropped gives its place back.
    ///
    /// # Errors
    ///
    /// As [`LockClient::connection`].
    pub(crate) async fn lock_connection(&self) -> Result<ChannelPermit> {
        loop {
            if self.inner.closed.load(Ordering::Acquire) {
                return Err(Error::Closed);
            }
            if let Some(permit) = self.inner.pool.choose() {
                return Ok(permit);
            }
            // Whoever held `opening` before us may have made room: look again then.
            let mut found = None;
            self.open_another(|pool| {
                found = pool.choose();
                found.is_some()
            })
            .await?;
            if let Some(permit) = found {
                return Ok(permit);
            }
        }
    }

    /// Opens one more connection and adds it to the pool, unless `enough` (called once
    /// `opening` is taken) finds that another opening already gave what was needed.
    async fn open_another(&self, mut enough: impl FnMut(&Pool) -> bool) -> Result<()> {
        let pool = &self.inner.pool;
        let _opening = pool.opening.lock().await;
        if enough(pool) {
            return Ok(());
        }
        let (had, counts) = {
            let state = pool.state();
            (state.connected, state.conns.len())
        };
        if counts == 0 && had {
            info!(broker = %self.inner.addr, "reconnecting");
        } else {
            info!(broker = %self.inner.addr, lock_channels = ?pool.counts(), "every connection is near its channel_max; opening another");
        }
        let conn = Conn::open(&self.inner.uris, &self.inner.config).await?;
        check_mark(
            &conn,
            &self.inner.config,
            self.inner.uris.len(),
            &self.inner.first_mark,
        )
        .await?;
        // `close` may have run while this connection was being opened: it did not see it.
        if self.inner.closed.load(Ordering::Acquire) {
            conn.close().await;
            return Err(Error::Closed);
        }
        let mut state = pool.state();
        state.connected = true;
        state.conns.push(conn);
        Ok(())
    }

    /// Closes every connection of the pool, at once (each waits at most 2 s for the broker).
    pub(crate) async fn close_connections(&self) {
        let conns = self.inner.pool.take_all();
        futures_util::future::join_all(conns.iter().map(|c| c.close())).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_takes_its_channel_max_less_a_reserve_and_at_most_256() {
        // RabbitMQ's default channel_max: lapin's cost per frame caps it.
        assert_eq!(room_for_locks(2047), MAX_LOCK_CHANNELS);
        assert_eq!(room_for_locks(0xffff), MAX_LOCK_CHANNELS);
        // A small channel_max (the URL's `channel_max`) keeps a thirty-second back, at least one.
        assert_eq!(room_for_locks(128), 124);
        assert_eq!(room_for_locks(16), 15);
        assert_eq!(room_for_locks(2), 1);
        assert_eq!(room_for_locks(1), 1);
    }
}
