//! The shared tier: Redis through a reconnecting connection, with fenced writes.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script};

use crate::error::{Error, Result, redact_url};

/// Timeouts and reconnection of a [`RedisStore`].
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// Bound on establishing a connection (default 2 s).
    pub connect_timeout: Duration,
    /// Bound on each command's answer (default 2 s): a Redis that stops answering turns into an
    /// error, never a hang.
    pub response_timeout: Duration,
    /// Reconnection attempts per failed command before the error is returned (default 2).
    pub reconnect_retries: usize,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(2),
            reconnect_retries: 2,
        }
    }
}

/// A Redis connection shared by the caches of a node. Cheap to clone.
///
/// It reconnects by itself after Redis restarts; while Redis is down, every command fails with
/// [`Error::Redis`] within the configured timeouts.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    addr: Arc<str>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// `GET value` and `HMGET failures n msg`, pipelined.
type ProbeReply = (Option<Vec<u8>>, (Option<u64>, Option<String>));

/// A value key's content and its failure record, read in one round trip.
pub(crate) struct Probe {
    pub(crate) value: Option<Vec<u8>>,
    /// How many loads of the key failed recently (the record expires).
    pub(crate) failures: u64,
    pub(crate) last_failure: Option<String>,
}

/// Writes a value (or deletes it) only if no later lock holder has written the key: the fence
/// key keeps the highest fencing token seen, zero-padded so Lua compares it as a string without
/// losing the precision of a 64-bit token to Lua's doubles.
const FENCED_WRITE: &str = r"
local last = redis.call('GET', KEYS[2])
if last and ARGV[1] < last then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
if ARGV[3] == 'del' then
  redis.call('DEL', KEYS[1])
elseif ARGV[5] == '0' then
  redis.call('SET', KEYS[1], ARGV[4])
else
  redis.call('SET', KEYS[1], ARGV[4], 'PX', ARGV[5])
end
return 1
";

impl RedisStore {
    /// Connects to `url` (`redis://[:password@]host:port/db`).
    ///
    /// # Errors
    ///
    /// [`Error::Redis`] when `url` is invalid, or when no connection is established within
    /// `connect_timeout × (reconnect_retries + 2)`.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a connection being established is dropped with the future.
    pub async fn connect(url: &str, config: RedisConfig) -> Result<Self> {
        let addr: Arc<str> = redact_url(url).into();
        let err = |e: RedisError| Error::Redis {
            addr: addr.to_string(),
            detail: e.to_string(),
        };
        let client = redis::Client::open(url).map_err(err)?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.response_timeout))
            .set_number_of_retries(config.reconnect_retries)
            .set_max_delay(Duration::from_millis(500));
        // The manager retries the first connection too; bound the whole attempt.
        let bound = config.connect_timeout * (config.reconnect_retries as u32 + 2);
        let conn = tokio::time::timeout(
            bound,
            ConnectionManager::new_with_config(client, manager_config),
        )
        .await
        .map_err(|_| Error::Redis {
            addr: addr.to_string(),
            detail: format!("no connection within {bound:?}"),
        })?
        .map_err(err)?;
        tracing::debug!(%addr, "connected to redis");
        Ok(RedisStore { conn, addr })
    }

    /// The address this store talks to (without credentials).
    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn err(&self, e: RedisError) -> Error {
        Error::Redis {
            addr: self.addr.to_string(),
            detail: e.to_string(),
        }
    }

    pub(crate) async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let mut conn = self.conn.clone();
        redis::cmd("GET")
            .arg(key)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.err(e))
    }

    pub(crate) async fn probe(&self, value_key: &str, failure_key: &str) -> Result<Probe> {
        let mut conn = self.conn.clone();
        let (value, (failures, last_failure)): ProbeReply = redis::pipe()
            .cmd("GET")
            .arg(value_key)
            .cmd("HMGET")
            .arg(failure_key)
            .arg("n")
            .arg("msg")
            .query_async(&mut conn)
            .await
            .map_err(|e| self.err(e))?;
        Ok(Probe {
            value,
            failures: failures.unwrap_or(0),
            last_failure,
        })
    }

    /// Sets (`Some`) or deletes (`None`) a value unless a higher token has written the key.
    /// Returns `false` when the write was refused.
    pub(crate) async fn fenced_write(
        &self,
        value_key: &str,
        fence_key: &str,
        token: u64,
        value: Option<&[u8]>,
        ttl: Option<Duration>,
        fence_ttl: Duration,
    ) -> Result<bool> {
        static SCRIPT: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
        let script = SCRIPT.get_or_init(|| Script::new(FENCED_WRITE));
        let mut conn = self.conn.clone();
        let written: i64 = script
            .key(value_key)
            .key(fence_key)
            .arg(format!("{token:020}"))
            .arg(fence_ttl.as_millis().max(1) as u64)
            .arg(if value.is_some() { "set" } else { "del" })
            .arg(value.unwrap_or_default())
            .arg(ttl.map_or(0, |t| t.as_millis().max(1) as u64))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.err(e))?;
        Ok(written == 1)
    }

    /// Records a failed load: bumps the key's failure count, which waiters compare with the
    /// count they saw before waiting.
    pub(crate) async fn record_failure(
        &self,
        failure_key: &str,
        message: &str,
        ttl: Duration,
    ) -> Result<()> {
        let mut conn = self.conn.clone();
        redis::pipe()
            .atomic()
            .cmd("HINCRBY")
            .arg(failure_key)
            .arg("n")
            .arg(1)
            .ignore()
            .cmd("HSET")
            .arg(failure_key)
            .arg("msg")
            .arg(message)
            .ignore()
            .cmd("PEXPIRE")
            .arg(failure_key)
            .arg(ttl.as_millis().max(1) as u64)
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.err(e))
    }
}
