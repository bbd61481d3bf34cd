//! The systems under measurement: a connected client each, and how it does one uncontended
//! lock+unlock cycle (for the AMQP hop, one publish→deliver).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use mqlock::{ClientConfig, LockClient, LockGuard, QueueType};
use tokio::task::JoinHandle;

/// The time-to-live of every etcd lease here, in seconds: close to mqlock's default lease
/// (7.5 s), and what a holder that dies without unlocking would block the lock for.
pub const ETCD_LEASE_TTL: i64 = 10;

/// A unique name per process and use, so that runs side by side never share a lock.
pub fn unique(what: &str) -> String {
    format!("mqlock-bench-{what}-{}", std::process::id())
}

/// The AMQP queue a hop goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HopQueue {
    /// A server-named, exclusive classic queue (the unit of the issue's targets).
    Classic,
    /// A quorum queue (replicated on a cluster; deleted at the end).
    Quorum,
}

/// One connected client and its cycle.
pub enum Cycle {
    /// The raw AMQP hop: publish a message to a queue, receive it on a consumer of the same
    /// connection (the ack is sent after the clock stops).
    Hop {
        /// The connection both channels live on.
        conn: Connection,
        /// The publishing channel.
        publisher: lapin::Channel,
        /// The consumer that receives each message.
        consumer: lapin::Consumer,
        /// The queue's name.
        queue: String,
        /// Whether the queue must be deleted at the end (quorum queues cannot be exclusive).
        delete: bool,
    },
    /// Redis: `SET key token NX PX 30000`, then a script that deletes the key only if it
    /// still holds our token (the single-instance lock of the Redis documentation).
    Redis {
        /// A multiplexed connection.
        con: redis::aio::MultiplexedConnection,
        /// The compare-and-delete script (run by `EVALSHA`).
        unlock: redis::Script,
        /// The lock's key.
        key: String,
        /// The next token.
        seq: u64,
    },
    /// PostgreSQL: `SELECT pg_advisory_lock(k)` then `SELECT pg_advisory_unlock(k)` on one
    /// session.
    Postgres {
        /// The session.
        con: sqlx::PgConnection,
        /// The advisory lock's key.
        key: i64,
    },
    /// etcd's lock service, one lease per lock: `LeaseGrant`, `Lock` with that lease,
    /// `Unlock`, `LeaseRevoke` (what a one-shot client such as `etcdctl lock` does).
    EtcdLeasePerLock {
        /// The gRPC client.
        client: etcd_client::Client,
        /// The lock's name.
        name: String,
    },
    /// etcd's lock service with a session lease: one lease granted up front and kept alive in
    /// the background, and each cycle is `Lock` with it then `Unlock` (what Go's
    /// `concurrency.NewSession` + `NewMutex` do for a long-lived client).
    EtcdSession {
        /// The gRPC client.
        client: etcd_client::Client,
        /// The lock's name.
        name: String,
        /// The session's lease.
        lease: i64,
        /// The keep-alive task.
        keeper: JoinHandle<()>,
    },
    /// mqlock: `client.lock(name)` then `guard.release()`.
    Mqlock {
        /// The lock client.
        client: LockClient,
        /// The lock's name.
        name: String,
    },
}

impl Cycle {
    /// Connects to the broker at `url` and sets up a hop through a queue of type `queue`.
    pub async fn hop(url: &str, queue: HopQueue) -> Result<Cycle> {
        let conn = Connection::connect(url, ConnectionProperties::default())
            .await
            .with_context(|| format!("AMQP connect to {}", redact(url)))?;
        let publisher = conn.create_channel().await?;
        let sub = conn.create_channel().await?;
        let (name, options, mut args, delete) = match queue {
            HopQueue::Classic => (
                String::new(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
                false,
            ),
            HopQueue::Quorum => (
                unique("hop-quorum"),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
                true,
            ),
        };
        if queue == HopQueue::Quorum {
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
        }
        let q = publisher
            .queue_declare(name.as_str().into(), options, args)
            .await?;
        let consumer = sub
            .basic_consume(
                q.name().clone(),
                "mqlock-bench".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Cycle::Hop {
            queue: q.name().to_string(),
            conn,
            publisher,
            consumer,
            delete,
        })
    }

    /// Connects to Redis at `url`.
    pub async fn redis(url: &str) -> Result<Cycle> {
        let client = redis::Client::open(url)?;
        let con = client
            .get_multiplexed_async_connection()
            .await
            .with_context(|| format!("Redis connect to {}", redact(url)))?;
        Ok(Cycle::Redis {
            con,
            unlock: redis::Script::new(
                r#"if redis.call("get",KEYS[1]) == ARGV[1] then return redis.call("del",KEYS[1]) else return 0 end"#,
            ),
            key: unique("redis"),
            seq: 0,
        })
    }

    /// Connects to PostgreSQL at `url`.
    pub async fn postgres(url: &str) -> Result<Cycle> {
        use sqlx::Connection as _;
        let con = sqlx::PgConnection::connect(url)
            .await
            .with_context(|| format!("PostgreSQL connect to {}", redact(url)))?;
        Ok(Cycle::Postgres {
            con,
            key: 0x6d71_6c6b_0000_0000 | i64::from(std::process::id()),
        })
    }

    /// Connects to etcd at `endpoints`; with `session`, grants the session's lease and keeps
    /// it alive.
    pub async fn etcd(endpoints: &[String], session: bool) -> Result<Cycle> {
        let mut client = etcd(endpoints).await?;
        let name = unique(if session {
            "etcd-session"
        } else {
            "etcd-lease"
        });
        if !session {
            return Ok(Cycle::EtcdLeasePerLock { client, name });
        }
        let (lease, keeper) = session_lease(&mut client).await?;
        Ok(Cycle::EtcdSession {
            client,
            name,
            lease,
            keeper,
        })
    }

    /// Connects an mqlock client to `urls` (comma-separated; a cluster's nodes) with queues of
    /// type `queue_type`; `net_ticktime` is the brokers' (a cluster's is shorter than the
    /// default's 60 s).
    pub async fn mqlock(
        urls: &str,
        queue_type: QueueType,
        net_ticktime: Option<Duration>,
    ) -> Result<Cycle> {
        let client = mqlock_client(urls, queue_type, net_ticktime, "cycle").await?;
        let name = unique(match queue_type {
            QueueType::Quorum => "mqlock-quorum",
            QueueType::Classic => "mqlock-classic",
        });
        Ok(Cycle::Mqlock { client, name })
    }

    /// One cycle, timed.
    pub async fn run(&mut self) -> Result<Duration> {
        match self {
            Cycle::Hop {
                publisher,
                consumer,
                queue,
                ..
            } => {
                let t = Instant::now();
                publisher
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions::default(),
                        b"x",
                        BasicProperties::default(),
                    )
                    .await?;
                let delivery = consumer
                    .next()
                    .await
                    .ok_or_else(|| anyhow!("the hop's consumer ended"))??;
                let took = t.elapsed();
                delivery.acker.ack(BasicAckOptions::default()).await?;
                Ok(took)
            }
            Cycle::Redis {
                con,
                unlock,
                key,
                seq,
            } => {
                *seq += 1;
                let token = seq.to_string();
                let t = Instant::now();
                let ok: Option<String> = redis::cmd("SET")
                    .arg(&*key)
                    .arg(&token)
                    .arg("NX")
                    .arg("PX")
                    .arg(30_000)
                    .query_async(con)
                    .await?;
                ensure!(ok.is_some(), "the Redis lock {key} was taken");
                let deleted: i32 = unlock.key(&*key).arg(&token).invoke_async(con).await?;
                let took = t.elapsed();
                ensure!(deleted == 1, "the Redis lock {key} was not ours to delete");
                Ok(took)
            }
            Cycle::Postgres { con, key } => {
                let t = Instant::now();
                sqlx::query("SELECT pg_advisory_lock($1)")
                    .bind(*key)
                    .execute(&mut *con)
                    .await?;
                let unlocked: (bool,) = sqlx::query_as("SELECT pg_advisory_unlock($1)")
                    .bind(*key)
                    .fetch_one(&mut *con)
                    .await?;
                let took = t.elapsed();
                ensure!(unlocked.0, "the advisory lock was not held");
                Ok(took)
            }
            Cycle::EtcdLeasePerLock { client, name } => {
                let t = Instant::now();
                let lease = client.lease_grant(ETCD_LEASE_TTL, None).await?.id();
                let key = client
                    .lock(
                        name.as_str(),
                        Some(etcd_client::LockOptions::new().with_lease(lease)),
                    )
                    .await?
                    .key()
                    .to_vec();
                client.unlock(key).await?;
                client.lease_revoke(lease).await?;
                Ok(t.elapsed())
            }
            Cycle::EtcdSession {
                client,
                name,
                lease,
                ..
            } => {
                let t = Instant::now();
                let key = client
                    .lock(
                        name.as_str(),
                        Some(etcd_client::LockOptions::new().with_lease(*lease)),
                    )
                    .await?
                    .key()
                    .to_vec();
                client.unlock(key).await?;
                Ok(t.elapsed())
            }
            Cycle::Mqlock { client, name } => {
                let t = Instant::now();
                let guard = client.lock(name).await?;
                guard.release().await?;
                Ok(t.elapsed())
            }
        }
    }

    /// Disconnects, deleting what was created.
    pub async fn close(self) {
        match self {
            Cycle::Hop {
                conn,
                publisher,
                queue,
                delete,
                ..
            } => {
                if delete {
                    let _ = publisher
                        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                        .await;
                }
                let _ = conn.close(200, "bye".into()).await;
            }
            Cycle::EtcdSession {
                mut client,
                lease,
                keeper,
                ..
            } => {
                keeper.abort();
                let _ = client.lease_revoke(lease).await;
            }
            Cycle::Mqlock { client, .. } => client.close().await,
            Cycle::Redis { .. } | Cycle::Postgres { .. } | Cycle::EtcdLeasePerLock { .. } => {}
        }
    }
}

/// A connected etcd client (requests are spread over `endpoints`).
pub async fn etcd(endpoints: &[String]) -> Result<etcd_client::Client> {
    etcd_client::Client::connect(endpoints, None)
        .await
        .with_context(|| format!("etcd connect to {}", endpoints.join(",")))
}

/// Grants a lease and keeps it alive from a background task, as a session does.
pub async fn session_lease(client: &mut etcd_client::Client) -> Result<(i64, JoinHandle<()>)> {
    let lease = client.lease_grant(ETCD_LEASE_TTL, None).await?.id();
    let (mut keeper, mut responses) = client.lease_keep_alive(lease).await?;
    let task = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs((ETCD_LEASE_TTL / 3) as u64)).await;
            if keeper.keep_alive().await.is_err() || responses.message().await.is_err() {
                return;
            }
        }
    });
    Ok((lease, task))
}

/// A connected mqlock client; `role` names its connection.
pub async fn mqlock_client(
    urls: &str,
    queue_type: QueueType,
    net_ticktime: Option<Duration>,
    role: &str,
) -> Result<LockClient> {
    let mut config = ClientConfig {
        queue_type,
        connection_name: Some(format!("mqlock-bench {role}")),
        ..ClientConfig::default()
    };
    if let Some(t) = net_ticktime {
        config.net_ticktime = t;
    }
    LockClient::connect(urls, config)
        .await
        .with_context(|| format!("mqlock connect to {}", redact(urls)))
}

/// A lock held during a hand-off measurement.
pub enum Held {
    /// An mqlock guard.
    Mqlock(LockGuard),
    /// The key of an etcd lock.
    Etcd(Vec<u8>),
}

/// A contender of a hand-off measurement: one client of its own.
pub enum Contender {
    /// An mqlock client.
    Mqlock(LockClient),
    /// An etcd client with its session lease.
    Etcd {
        /// The gRPC client (boxed: it is large).
        client: Box<etcd_client::Client>,
        /// The session's lease.
        lease: i64,
        /// The keep-alive task.
        keeper: JoinHandle<()>,
    },
}

impl Contender {
    /// Takes the lock `name`, waiting as long as it takes.
    pub async fn lock(&mut self, name: &str) -> Result<Held> {
        Ok(match self {
            Contender::Mqlock(c) => Held::Mqlock(c.lock(name).await?),
            Contender::Etcd { client, lease, .. } => Held::Etcd(
                client
                    .lock(
                        name,
                        Some(etcd_client::LockOptions::new().with_lease(*lease)),
                    )
                    .await?
                    .key()
                    .to_vec(),
            ),
        })
    }

    /// Releases a lock this contender holds.
    pub async fn release(&mut self, held: Held) -> Result<()> {
        match (self, held) {
            (Contender::Mqlock(_), Held::Mqlock(g)) => g.release().await?,
            (Contender::Etcd { client, .. }, Held::Etcd(key)) => {
                client.unlock(key).await?;
            }
            _ => return Err(anyhow!("released a lock of another kind of system")),
        }
        Ok(())
    }

    /// Disconnects.
    pub async fn close(self) {
        match self {
            Contender::Mqlock(c) => c.close().await,
            Contender::Etcd {
                mut client,
                lease,
                keeper,
            } => {
                keeper.abort();
                let _ = client.lease_revoke(lease).await;
            }
        }
    }
}

/// `url` without its password, for error messages.
pub fn redact(url: &str) -> String {
    url.split(',')
        .map(|u| match (u.find("://"), u.rfind('@')) {
            (Some(s), Some(at)) if at > s => match u[s + 3..at].find(':') {
                Some(c) => format!("{}:***{}", &u[..s + 3 + c], &u[at..]),
                None => u.to_owned(),
            },
            _ => u.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("amqp://guest:guest@127.0.0.1:5672/%2f,amqp://u:p@h:1/v"),
            "amqp://guest:***@127.0.0.1:5672/%2f,amqp://u:***@h:1/v"
        );
        assert_eq!(redact("redis://127.0.0.1:6379/"), "redis://127.0.0.1:6379/");
    }
}
