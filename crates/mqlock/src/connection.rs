//! One broker connection and its liveness probe.
//!
//! Every `heartbeat / 4` the prober sends a cheap RPC on a probe channel; a connection whose
//! broker has not answered one within `1.5 × heartbeat` is declared dead, so that acquisitions
//! reconnect instead of waiting on it. This says nothing about held locks: each has a lease of
//! its own, renewed through its lock queue (`lease.rs`, `hold.rs`; docs/protocol.md, "Lease").
//! A node cut off from its cluster still answers the probe; only the lock queue's quorum can
//! renew a lock's lease.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::BasicQosOptions;
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connection, ConnectionProperties, Event};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::broker_url::{display_addr, parse_urls, tls_config};
use crate::config::ClientConfig;
use crate::error::Error;
use crate::lease::Lease;
use crate::loss::LossReason;
use crate::pool::LockChannels;
use crate::protocol::{Fault, classify};

/// A live connection shared by the locks of one client (a client spreads its locks over as
/// many as their channels need: `pool.rs`).
pub(crate) struct Conn {
    pub(crate) connection: Connection,
    pub(crate) addr: String,
    /// The connection name the broker shows (recorded with every grant: `HolderInfo::client`).
    pub(crate) name: String,
    /// The connection's own liveness (the prober's): decides whether new acquisitions may
    /// use it. Held locks have leases of their own, renewed through their lock queues.
    pub(crate) lease: Arc<Lease>,
    /// A holder's lease margin on this connection (`ClientConfig::lease_margin` of the
    /// negotiated heartbeat).
    pub(crate) lease_margin: Duration,
    /// How often a holder renews its lease on this connection.
    pub(crate) renewal_period: Duration,
    /// The lock channels open on this connection, counted against its negotiated
    /// `channel_max` (`pool.rs`).
    pub(crate) lock_channels: LockChannels,
    dead: watch::Sender<Option<LossReason>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Opens a bare AMQP connection exactly as [`crate::LockClient::connect`] opens its own: `urls`
/// is one broker URL or several separated by commas, tried in turn (a refused login stops the
/// round); [`ClientConfig::heartbeat`] replaces any heartbeat in the URLs; `amqps://` URLs use
/// [`ClientConfig::tls`]; the broker shows [`ClientConfig::connection_name`] (default
/// `mqlock pid N`); failures are mapped to the same errors. For the adapters' own connections
/// (the cache's invalidation bus), so that every connection of a process follows one set of rules.
/// Unlike `LockClient::connect` it opens no probe channel and reads no cluster mark.
///
/// Returns the connection and the address (`host:port[/vhost]`) of the broker that answered.
///
/// # Errors
///
/// [`Error::Config`] (an invalid `config`, unreadable TLS files, `amqps://` without the `rustls`
/// feature), [`Error::InvalidUrl`], [`Error::Unreachable`], [`Error::Tls`],
/// [`Error::AuthRefused`].
///
/// # Cancel safety
///
/// Cancel safe: a connection being opened when the future is dropped is dropped with it.
pub async fn open_connection(
    urls: &str,
    config: &ClientConfig,
) -> Result<(Connection, String), Error> {
    config.validate()?;
    let uris = parse_urls(urls, config)?;
    first_answering(&uris, |uri, addr| async move {
        let (connection, _name) = connect(uri, &addr, config).await?;
        Ok((connection, addr))
    })
    .await
}

/// Tries `open` on each address in turn and returns the first success; a refused login ends
/// the round (credentials are the same everywhere).
async fn first_answering<'a, T, F, Fut>(uris: &'a [AMQPUri], open: F) -> Result<T, Error>
where
    F: Fn(&'a AMQPUri, String) -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    let mut failures = Vec::new();
    for uri in uris {
        let addr = display_addr(uri);
        match open(uri, addr.clone()).await {
            Ok(c) => return Ok(c),
            // Credentials are the same everywhere; a refusal will not get better elsewhere.
            Err(e @ Error::AuthRefused { .. }) => return Err(e),
            Err(e) => {
                debug!(%addr, error = %e, "broker address failed");
                failures.push(e);
            }
        }
    }
    match failures.len() {
        1 => Err(failures.pop().expect("one failure")),
        _ => Err(Error::Unreachable {
            addr: uris.iter().map(display_addr).collect::<Vec<_>>().join(", "),
            detail: failures
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        }),
    }
}

/// The AMQP connection to one address, and the connection name the broker shows.
async fn connect(
    uri: &AMQPUri,
    addr: &str,
    config: &ClientConfig,
) -> Result<(Connection, String), Error> {
    let name = config
        .connection_name
        .clone()
        .unwrap_or_else(|| format!("mqlock pid {}", std::process::id()));
    let props = ConnectionProperties::default().with_connection_name(name.clone().into());
    let tls = tls_config(uri, config)?;
    let runtime = lapin::runtime::default_runtime().map_err(|e| Error::Unreachable {
        addr: addr.into(),
        detail: format!("no async runtime: {e}"),
    })?;
    let connect = Connection::connect_uri_with_config(uri.clone(), props, tls, runtime);
    // The URL's connection_timeout bounds the TCP connect; this bounds the AMQP handshake too.
    match tokio::time::timeout(Duration::from_secs(15), connect).await {
        Err(_) => Err(Error::Unreachable {
            addr: addr.into(),
            detail: "no answer to the AMQP handshake within 15 s".into(),
        }),
        Ok(Err(e)) => Err(connect_error(&e, uri, addr)),
        Ok(Ok(c)) => Ok((c, name)),
    }
}

impl Conn {
    /// Opens a connection to the first address that answers.
    pub(crate) async fn open(uris: &[AMQPUri], config: &ClientConfig) -> Result<Arc<Conn>, Error> {
        first_answering(uris, |uri, addr| async move {
            Self::open_one(uri, &addr, config).await
        })
        .await
    }

    async fn open_one(
        uri: &AMQPUri,
        addr: &str,
        config: &ClientConfig,
    ) -> Result<Arc<Conn>, Error> {
        let (connection, name) = connect(uri, addr, config).await?;
        let probe = connection
            .create_channel()
            .await
            .map_err(|e| connect_error(&e, uri, addr))?;

        let negotiated = connection.configuration().heartbeat();
        let heartbeat = if negotiated == 0 {
            // The broker disabled heartbeats; it then notices a dead client only through TCP.
            warn!(%addr, "the broker disabled AMQP heartbeats; a cut-off holder may be noticed late");
            config.heartbeat
        } else {
            Duration::from_secs(negotiated.into())
        };
        let margin = heartbeat * 3 / 2;
        let lease = Arc::new(Lease::with_clock(config.clock.clone(), margin));
        let (dead, _) = watch::channel(None);
        // Negotiated: the lower of the broker's and the URL's `channel_max`.
        let lock_channels = LockChannels::new(connection.configuration().channel_max());

        let mut conn = Conn {
            connection,
            addr: addr.into(),
            name,
            lease: lease.clone(),
            lease_margin: config.lease_margin(heartbeat),
            renewal_period: config.renewal_period(heartbeat),
            lock_channels,
            dead,
            tasks: Vec::new(),
        };
        let dead_tx = conn.dead.clone();
        let events = conn.connection.events_listener();
        let addr_owned = conn.addr.clone();
        conn.tasks.push(tokio::spawn(async move {
            let mut events = std::pin::pin!(events);
            while let Some(event) = events.next().await {
                if let Event::Error(e) = event {
                    // lapin also reports a channel the broker closed (403, 404, 406 on one
                    // lock) as an error event; that channel's owner handles it, and the
                    // connection and the other locks on it are fine.
                    if is_channel_level(&e) {
                        debug!(addr = %addr_owned, error = %e, "a channel was closed by the broker");
                        continue;
                    }
                    warn!(addr = %addr_owned, error = %e, "broker connection failed");
                    mark_dead(&dead_tx, LossReason::ConnectionLost(e.to_string()));
                    return;
                }
            }
        }));
        let dead_tx = conn.dead.clone();
        let addr_owned = conn.addr.clone();
        conn.tasks.push(tokio::spawn(async move {
            let every = heartbeat / 4;
            loop {
                tokio::time::sleep(every).await;
                let sent = lease.now();
                let answered = tokio::select! {
                    r = probe.basic_qos(0, BasicQosOptions::default()) => Some(r),
                    _ = lease.expired() => None,
                };
                match answered {
                    Some(Ok(())) => lease.extend_to(sent + margin),
                    Some(Err(e)) => {
                        if let Fault::Connection(d) = classify(&e) {
                            mark_dead(&dead_tx, LossReason::ConnectionLost(d));
                            return;
                        }
                        mark_dead(&dead_tx, LossReason::ConnectionLost(e.to_string()));
                        return;
                    }
                    None => {
                        let silent_for = margin + lease.overdue();
                        warn!(addr = %addr_owned, ?silent_for, "broker silent past the safety margin; locks on this connection are lost");
                        mark_dead(&dead_tx, LossReason::LeaseExpired { silent_for });
                        return;
                    }
                }
            }
        }));
        Ok(Arc::new(conn))
    }

    /// Whether the connection can still be used for new acquisitions.
    pub(crate) fn is_alive(&self) -> bool {
        self.dead.borrow().is_none()
            && self.connection.status().connected()
            && self.lease.is_valid()
    }

    /// Resolves when the connection is declared dead (I/O error, broker close, expired lease).
    pub(crate) async fn dead(&self) -> LossReason {
        let mut rx = self.dead.subscribe();
        loop {
            if let Some(r) = rx.borrow_and_update().clone() {
                return r;
            }
            if rx.changed().await.is_err() {
                return LossReason::ConnectionLost("connection dropped".into());
            }
        }
    }

    /// Declares the connection dead (e.g. after an I/O error seen on a channel) and closes it
    /// in the background, so that the broker drops every consumer on it even where a channel's
    /// own close did not get through.
    pub(crate) fn kill(self: &Arc<Self>, reason: LossReason) {
        if !mark_dead(&self.dead, reason) {
            return;
        }
        let conn = self.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    conn.connection
                        .close(320, "mqlock: connection declared dead".into()),
                )
                .await;
            });
        }
    }

    /// Closes the connection politely (used when the client is closed).
    pub(crate) async fn close(&self) {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.connection.close(200, "mqlock client closed".into()),
        )
        .await;
        mark_dead(
            &self.dead,
            LossReason::ConnectionLost("client closed".into()),
        );
    }
}

/// Records why the connection died; `false` if it was already dead.
fn mark_dead(tx: &watch::Sender<Option<LossReason>>, reason: LossReason) -> bool {
    tx.send_if_modified(|cur| {
        if cur.is_none() {
            *cur = Some(reason);
            true
        } else {
            false
        }
    })
}

fn connect_error(e: &lapin::Error, uri: &AMQPUri, addr: &str) -> Error {
    let user = uri.authority.userinfo.username.as_str();
    if uri.scheme == AMQPScheme::AMQPS
        && let lapin::ErrorKind::IOError(io) = e.kind()
        && is_tls_failure(io)
    {
        return Error::Tls {
            addr: addr.into(),
            detail: io.to_string(),
        };
    }
    match classify(e) {
        Fault::AccessRefused(_) => Error::AuthRefused {
            addr: addr.into(),
            user: user.into(),
        },
        // 530 NOT_ALLOWED: the vhost does not exist or the user may not use it.
        Fault::Connection(d) if d.starts_with("530") || d.starts_with("403") => {
            Error::AuthRefused {
                addr: addr.into(),
                user: user.into(),
            }
        }
        Fault::Connection(d)
        | Fault::NotFound(d)
        | Fault::Precondition(d)
        | Fault::ConsumerTimeout(d)
        | Fault::Other(d) => Error::Unreachable {
            addr: addr.into(),
            detail: d,
        },
    }
}

/// Whether an I/O error of an `amqps://` connection attempt came from the TLS layer (rustls
/// reports certificate and protocol failures as `InvalidData`), rather than from the network.
fn is_tls_failure(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    if matches!(
        e.kind(),
        K::ConnectionRefused | K::TimedOut | K::HostUnreachable | K::NetworkUnreachable
    ) {
        return false;
    }
    let text = e.to_string().to_ascii_lowercase();
    e.kind() == K::InvalidData
        || ["certificate", "tls", "handshake", "peer", "alert"]
            .iter()
            .any(|w| text.contains(w))
}

/// Whether an error event concerns one channel only: a soft AMQP error (channel.close from the
/// broker), as opposed to I/O errors, missed heartbeats and hard (connection.close) errors.
fn is_channel_level(e: &lapin::Error) -> bool {
    use lapin::protocol::AMQPErrorKind;
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp) if matches!(amqp.kind(), AMQPErrorKind::Soft(_)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPHardError, AMQPSoftError};

    fn amqp(kind: AMQPErrorKind) -> lapin::Error {
        lapin::ErrorKind::ProtocolError(AMQPError::new(kind, "text".into())).into()
    }

    #[test]
    fn only_soft_errors_are_channel_level() {
        assert!(is_channel_level(&amqp(AMQPErrorKind::Soft(
            AMQPSoftError::ACCESSREFUSED
        ))));
        assert!(is_channel_level(&amqp(AMQPErrorKind::Soft(
            AMQPSoftError::PRECONDITIONFAILED
        ))));
        assert!(!is_channel_level(&amqp(AMQPErrorKind::Hard(
            AMQPHardError::CONNECTIONFORCED
        ))));
        assert!(!is_channel_level(
            &lapin::ErrorKind::MissingHeartbeatError.into()
        ));
    }

    #[test]
    fn tls_failures_are_told_from_network_failures() {
        use std::io::{Error as E, ErrorKind as K};
        assert!(is_tls_failure(&E::new(
            K::InvalidData,
            "invalid peer certificate: UnknownIssuer"
        )));
        assert!(is_tls_failure(&E::other(
            "received fatal alert: BadCertificate"
        )));
        assert!(!is_tls_failure(&E::new(K::ConnectionRefused, "refused")));
        assert!(!is_tls_failure(&E::new(K::TimedOut, "handshake timed out")));
        assert!(!is_tls_failure(&E::other("broken pipe")));
    }
}
