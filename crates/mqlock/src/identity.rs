//! Who holds a lock (docs/protocol.md, "Holder identity").
//!
//! Every grant records its fencing token and its holder's identity in the lock's **holder
//! record** (`holder:`, a queue of at most one message): published beside the grant's first
//! renewal and never waited for, so it costs the grant no round trip.
//! [`crate::LockClient::status`] reads it back without taking it away. It is advisory: tokens
//! never depend on it (docs/protocol.md, "Holder identity").

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel};

use crate::config::ClientConfig;

const HOST: &str = "x-mqlock-host";
const PID: &str = "x-mqlock-pid";
const CLIENT: &str = "x-mqlock-client";
const SINCE: &str = "x-mqlock-since-ms";
const VALUE: &str = "x-mqlock-value";

/// The holder of a grant, as recorded with its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HolderInfo {
    /// Host name of the holder's machine.
    pub host: String,
    /// Process id of the holder.
    pub pid: u32,
    /// The holder's connection name (`ClientConfig::connection_name`, or `mqlock pid N`).
    pub client: String,
    /// When the lock was granted (the holder's wall clock).
    pub since: SystemTime,
    /// The grant's fencing token.
    pub token: u64,
    /// The value a leader campaigned with ([`crate::LockClient::campaign`]); `None` for a plain
    /// lock and for records written before elections existed.
    pub value: Option<String>,
}

impl HolderInfo {
    /// This process as the holder of `token`, granted now (`value`: a campaign's).
    pub(crate) fn this_process(client: &str, token: u64, value: Option<String>) -> Self {
        HolderInfo {
            host: host_name(),
            pid: std::process::id(),
            client: client.to_owned(),
            since: SystemTime::now(),
            token,
            value,
        }
    }

    /// The record's properties: transient, with the identity in its headers.
    pub(crate) fn properties(&self) -> BasicProperties {
        let mut h = FieldTable::default();
        h.insert(
            HOST.into(),
            AMQPValue::LongString(self.host.as_str().into()),
        );
        h.insert(PID.into(), AMQPValue::LongLongInt(i64::from(self.pid)));
        h.insert(
            CLIENT.into(),
            AMQPValue::LongString(self.client.as_str().into()),
        );
        let since = self
            .since
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis()
            .min(i64::MAX as u128) as i64;
        h.insert(SINCE.into(), AMQPValue::LongLongInt(since));
        if let Some(v) = &self.value {
            h.insert(VALUE.into(), AMQPValue::LongString(v.as_str().into()));
        }
        BasicProperties::default()
            .with_delivery_mode(1)
            .with_headers(h)
    }

    /// The identity recorded with a token, if the writer recorded one.
    pub(crate) fn from_record(token: u64, properties: &BasicProperties) -> Option<Self> {
        let h = properties.headers().as_ref()?.inner();
        let text = |k: &str| match h.get(k)? {
            AMQPValue::LongString(s) => Some(s.to_string()),
            AMQPValue::ShortString(s) => Some(ShortString::as_str(s).to_owned()),
            _ => None,
        };
        let int = |k: &str| match h.get(k)? {
            AMQPValue::LongLongInt(v) => u64::try_from(*v).ok(),
            AMQPValue::LongInt(v) => u64::try_from(*v).ok(),
            AMQPValue::LongUInt(v) => Some(u64::from(*v)),
            _ => None,
        };
        Some(HolderInfo {
            host: text(HOST)?,
            pid: u32::try_from(int(PID)?).ok()?,
            client: text(CLIENT).unwrap_or_default(),
            since: UNIX_EPOCH + Duration::from_millis(int(SINCE)?),
            token,
            value: text(VALUE),
        })
    }
}

/// Arguments of the holder record: at most one message, the latest (`drop-head`, the
/// broker's default overflow). A quorum record gets the lock queues' delivery limit, since
/// `status` requeues what it reads.
pub(crate) fn record_args(config: &ClientConfig) -> FieldTable {
    let mut args = crate::fence::epoch_args(config);
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(1));
    args
}

/// Records `holder` as the lock's latest grant, without waiting for the broker: the publish is
/// queued on the grant's channel before its first renewal.
pub(crate) async fn record(channel: &Channel, queue: &str, holder: &HolderInfo) {
    let _ = channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            holder.token.to_string().as_bytes(),
            holder.properties(),
        )
        .await;
}

impl std::fmt::Display for HolderInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let held_for = SystemTime::now()
            .duration_since(self.since)
            .unwrap_or_default();
        write!(
            f,
            "pid {} on {} ({}), token {}, since {} ({} s ago)",
            self.pid,
            self.host,
            self.client,
            self.token,
            humantime::format_rfc3339_seconds(self.since),
            held_for.as_secs()
        )?;
        match &self.value {
            Some(v) => write!(f, ", value {v:?}"),
            None => Ok(()),
        }
    }
}

/// This machine's host name (`gethostname`), or `"unknown"`.
pub(crate) fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is writable for its whole length; gethostname writes at most that much.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_survives_the_record_headers() {
        let me = HolderInfo::this_process("mqlock pid 7", 42, None);
        let back = HolderInfo::from_record(42, &me.properties()).unwrap();
        assert_eq!(back.host, me.host);
        assert_eq!(back.pid, std::process::id());
        assert_eq!(back.client, "mqlock pid 7");
        let drift = me
            .since
            .duration_since(back.since)
            .unwrap_or_else(|e| e.duration());
        assert!(drift < Duration::from_millis(1), "{drift:?}");
        // A plain lock records no value.
        assert_eq!(back.value, None);
        let leader = HolderInfo {
            value: Some("10.0.0.7:8080 ü".into()),
            ..me
        };
        let back = HolderInfo::from_record(42, &leader.properties()).unwrap();
        assert_eq!(back.value.as_deref(), Some("10.0.0.7:8080 ü"));
        // A value written without identity (mqlock 0.1) has none.
        assert_eq!(
            HolderInfo::from_record(1, &BasicProperties::default()),
            None
        );
        assert!(!host_name().is_empty());
    }
}
