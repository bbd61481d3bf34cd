//! The invalidation bus: a RabbitMQ fanout exchange that carries "drop this key" to every node.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ExchangeKind};
use mqlock::ClientConfig;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::error::{Error, Result, redact_urls};

/// Settings of an [`InvalidationBus`].
#[derive(Debug, Clone)]
pub struct BusConfig {
    /// The fanout exchange (default `"mqlock.cache.invalidations"`); every node of a cluster
    /// must use the same one.
    pub exchange: String,
    /// Bound on connecting and subscribing, and on each publish confirmation (default 5 s).
    pub timeout: Duration,
    /// Longest pause between reconnection attempts (default 5 s).
    pub max_reconnect_delay: Duration,
    /// How the bus's connection is opened — by [`mqlock::open_connection`], with the lock
    /// client's rules: [`ClientConfig::heartbeat`] (default 5 s) replaces any heartbeat in the
    /// URLs, and a node notices a silently dead broker link after about twice it, and clears
    /// its near caches then; [`ClientConfig::tls`] for `amqps://` URLs;
    /// [`ClientConfig::connection_name`] (`"mqlock-cache invalidations"` when `None`). Passing
    /// the lock client's own `ClientConfig` is fine: the fields about lock queues are not used.
    pub connection: ClientConfig,
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            exchange: "mqlock.cache.invalidations".into(),
            timeout: Duration::from_secs(5),
            max_reconnect_delay: Duration::from_secs(5),
            connection: ClientConfig::default(),
        }
    }
}

/// What the bus calls on a near tier. Implemented by the caches.
pub(crate) trait Subscriber: Send + Sync + 'static {
    fn invalidate<'a>(&'a self, key: &'a str) -> futures_util::future::BoxFuture<'a, ()>;
    fn set_coherent(&self, coherent: bool);
}

struct Registration {
    id: u64,
    namespace: String,
    subscriber: Weak<dyn Subscriber>,
}

#[derive(Serialize, Deserialize)]
struct Message {
    /// The publishing cache; it has already updated its own near tier.
    o: u64,
    n: String,
    k: String,
}

struct Shared {
    urls: String,
    /// The brokers of `urls`, without credentials.
    addr: String,
    config: BusConfig,
    publisher: Mutex<Option<Channel>>,
    registrations: Mutex<Vec<Registration>>,
    subscribed: watch::Sender<bool>,
    queue: Mutex<Option<String>>,
    subscriptions: AtomicU64,
}

/// A node's subscription to the invalidation exchange, shared by its caches. Cheap to clone;
/// the connection closes when the last clone is dropped.
///
/// Each node declares an exclusive, server-named queue bound to the fanout exchange. When that
/// subscription is lost (connection dropped, queue deleted, missed heartbeats) the bus marks
/// every registered near tier incoherent — they are cleared and bypassed — reconnects with
/// backoff, and clears them once more when the new subscription is in place, because
/// invalidations sent in between were missed.
#[derive(Clone)]
pub struct InvalidationBus {
    shared: Arc<Shared>,
    _stop: Arc<watch::Sender<()>>,
}

impl std::fmt::Debug for InvalidationBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InvalidationBus")
            .field("addr", &self.shared.addr)
            .field("exchange", &self.shared.config.exchange)
            .field("subscribed", &self.is_subscribed())
            .finish()
    }
}

struct Link {
    conn: Connection,
    consumer: lapin::Consumer,
}

impl InvalidationBus {
    /// Connects to the broker and subscribes. `urls` is one AMQP URL or several separated by
    /// commas, tried in turn (nodes of one cluster), as for [`mqlock::LockClient::connect`];
    /// reconnections go through the same list. Once connected, losses are handled in the
    /// background.
    ///
    /// # Errors
    ///
    /// [`Error::Bus`] within `config.timeout` when no broker of the list can be reached, or
    /// when the connection settings are refused (invalid URL or `config.connection`,
    /// unreadable TLS files, a refused login: `detail` is the core's message).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropped before it returns, it leaves no connection and no task behind (the
    /// background task is started only once the subscription is in place).
    ///
    /// # Panics
    ///
    /// If called outside a Tokio runtime.
    pub async fn connect(urls: &str, mut config: BusConfig) -> Result<Self> {
        config
            .connection
            .connection_name
            .get_or_insert_with(|| "mqlock-cache invalidations".into());
        let (stop, stopped) = watch::channel(());
        let shared = Arc::new(Shared {
            addr: redact_urls(urls),
            urls: urls.to_owned(),
            config,
            publisher: Mutex::new(None),
            registrations: Mutex::new(Vec::new()),
            subscribed: watch::channel(false).0,
            queue: Mutex::new(None),
            subscriptions: AtomicU64::new(0),
        });
        let link = shared.establish().await?;
        tokio::spawn(supervise(shared.clone(), link, stopped));
        Ok(InvalidationBus {
            shared,
            _stop: Arc::new(stop),
        })
    }

    /// Whether invalidations are currently being received.
    pub fn is_subscribed(&self) -> bool {
        *self.shared.subscribed.borrow()
    }

    /// How many times a subscription was established (1 after `connect`, +1 per resubscribe).
    pub fn subscriptions(&self) -> u64 {
        self.shared.subscriptions.load(Ordering::Acquire)
    }

    /// The broker-named queue of the current subscription, for diagnostics.
    pub fn queue_name(&self) -> Option<String> {
        self.shared.queue.lock().unwrap().clone()
    }

    /// Waits until the bus is subscribed, at most `timeout`; returns whether it is.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only watches.
    pub async fn wait_subscribed(&self, timeout: Duration) -> bool {
        let mut rx = self.shared.subscribed.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|s| *s))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    pub(crate) fn register(&self, id: u64, namespace: &str, subscriber: Weak<dyn Subscriber>) {
        let mut regs = self.shared.registrations.lock().unwrap();
        if let Some(s) = subscriber.upgrade() {
            // Under the registrations lock, so it cannot miss a concurrent transition.
            s.set_coherent(*self.shared.subscribed.borrow());
        }
        regs.push(Registration {
            id,
            namespace: namespace.to_owned(),
            subscriber,
        });
    }

    /// Publishes "drop `key`" to every other cache of `namespace`, and waits for the broker's
    /// confirmation.
    pub(crate) async fn publish(&self, origin: u64, namespace: &str, key: &str) -> Result<()> {
        let shared = &self.shared;
        let channel = shared
            .publisher
            .lock()
            .unwrap()
            .clone()
            .ok_or_else(|| Error::Bus {
                addr: shared.addr.clone(),
                detail: "not connected (reconnecting)".into(),
            })?;
        let payload = serde_json::to_vec(&Message {
            o: origin,
            n: namespace.to_owned(),
            k: key.to_owned(),
        })
        .expect("strings serialize");
        let publish = async {
            channel
                .basic_publish(
                    shared.config.exchange.as_str().into(),
                    "".into(),
                    BasicPublishOptions::default(),
                    &payload,
                    BasicProperties::default(),
                )
                .await?
                .await
        };
        let confirmation = tokio::time::timeout(shared.config.timeout, publish)
            .await
            .map_err(|_| {
                shared.bus_err(format!(
                    "no publish confirmation within {:?}",
                    shared.config.timeout
                ))
            })?
            .map_err(|e| shared.bus_err(e.to_string()))?;
        if confirmation.is_nack() {
            return Err(shared.bus_err("the broker refused the invalidation".into()));
        }
        Ok(())
    }
}

impl Shared {
    fn bus_err(&self, detail: String) -> Error {
        Error::Bus {
            addr: self.addr.clone(),
            detail,
        }
    }

    async fn establish(&self) -> Result<Link> {
        let attempt = async {
            let (conn, addr) = mqlock::open_connection(&self.urls, &self.config.connection)
                .await
                .map_err(|e| self.bus_err(e.to_string()))?;
            let (consumer, publish, queue) = self
                .subscribe(&conn)
                .await
                .map_err(|e| self.bus_err(e.to_string()))?;
            Ok::<_, Error>((conn, addr, consumer, publish, queue))
        };
        let (conn, addr, consumer, publish, queue) =
            tokio::time::timeout(self.config.timeout, attempt)
                .await
                .map_err(|_| {
                    self.bus_err(format!("no connection within {:?}", self.config.timeout))
                })??;
        *self.publisher.lock().unwrap() = Some(publish);
        *self.queue.lock().unwrap() = Some(queue.clone());
        // Count first: whoever wakes on `subscribed` must see this subscription counted.
        let n = self.subscriptions.fetch_add(1, Ordering::AcqRel) + 1;
        self.set_subscribed(true);
        tracing::info!(%addr, queue, subscription = n, "invalidation bus subscribed");
        Ok(Link { conn, consumer })
    }

    /// Declares the exchange and this node's queue on `conn`, consumes it, and opens the
    /// confirmed publishing channel.
    async fn subscribe(
        &self,
        conn: &Connection,
    ) -> lapin::Result<(lapin::Consumer, Channel, String)> {
        let consume = conn.create_channel().await?;
        let exchange = self.config.exchange.as_str();
        consume
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let queue = consume
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let queue = queue.name().to_string();
        consume
            .queue_bind(
                queue.as_str().into(),
                exchange.into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let consumer = consume
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let publish = conn.create_channel().await?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok((consumer, publish, queue))
    }

    fn set_subscribed(&self, subscribed: bool) {
        let mut regs = self.registrations.lock().unwrap();
        regs.retain(|r| r.subscriber.strong_count() > 0);
        for r in regs.iter() {
            if let Some(s) = r.subscriber.upgrade() {
                s.set_coherent(subscribed);
            }
        }
        self.subscribed.send_replace(subscribed);
    }

    async fn dispatch(&self, data: &[u8]) {
        let Ok(msg) = serde_json::from_slice::<Message>(data) else {
            tracing::warn!(addr = %self.addr, "ignoring a malformed invalidation");
            return;
        };
        let targets: Vec<Arc<dyn Subscriber>> = self
            .registrations
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.id != msg.o && r.namespace == msg.n)
            .filter_map(|r| r.subscriber.upgrade())
            .collect();
        for t in targets {
            t.invalidate(&msg.k).await;
        }
    }
}

/// Consumes invalidations; on loss, makes near tiers incoherent and resubscribes.
async fn supervise(shared: Arc<Shared>, mut link: Link, mut stopped: watch::Receiver<()>) {
    loop {
        let reason = loop {
            tokio::select! {
                item = link.consumer.next() => match item {
                    Some(Ok(delivery)) => shared.dispatch(&delivery.data).await,
                    Some(Err(e)) => break e.to_string(),
                    None => break "the broker ended the subscription".to_owned(),
                },
                _ = stopped.changed() => {
                    let _ = link.conn.close(200, "bus dropped".into()).await;
                    return;
                }
            }
        };
        tracing::warn!(addr = %shared.addr, reason, "invalidation subscription lost; near caches cleared until resubscribed");
        *shared.publisher.lock().unwrap() = None;
        *shared.queue.lock().unwrap() = None;
        shared.set_subscribed(false);
        let _ = link.conn.close(200, "resubscribing".into()).await;
        let mut delay = Duration::from_millis(100);
        link = loop {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stopped.changed() => return,
            }
            match shared.establish().await {
                Ok(link) => break link,
                Err(e) => {
                    tracing::debug!(error = %e, "invalidation bus reconnect failed");
                    delay = (delay * 2).min(shared.config.max_reconnect_delay);
                }
            }
        };
    }
}
