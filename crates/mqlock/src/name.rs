//! Lock names and the broker queue names derived from them.
//!
//! A lock name is any non-empty UTF-8 string without control characters (`U+0000..=U+001F`,
//! `U+007F..=U+009F`). Slashes, dots, spaces and non-ASCII letters are fine: a file path is a
//! good lock name. Each lock uses three queues, `{prefix}lock:{name}`, `{prefix}holder:{name}`
//! and `{prefix}epoch:{name}`; because the prefix is always prepended, no lock name can reach a queue outside the prefix.
//! When a queue name would exceed RabbitMQ's 255-byte limit, the name part is replaced by a
//! readable head plus the SHA-256 of the whole name, so every name maps to a valid, distinct
//! queue (a collision would need a SHA-256 collision, and would only make two locks one).

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// RabbitMQ's limit on queue names, in bytes.
pub const MAX_QUEUE_NAME_BYTES: usize = 255;
const LOCK_KIND: &str = "lock:";
const HOLDER_KIND: &str = "holder:";
const EPOCH_KIND: &str = "epoch:";
/// 32 hex digits of SHA-256 (128 bits) plus the separator.
const HASH_SUFFIX_BYTES: usize = 1 + 32;

/// The broker queue names of one lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueNames {
    /// The lock queue: single active consumer; its active consumer is the holder.
    pub lock: String,
    /// The holder record: the latest grant's token and holder identity, for `status`, `list`
    /// and `break` (advisory: tokens never depend on it).
    pub holder: String,
    /// The epoch queue: holds the fencing tokens' current epoch (docs/protocol.md).
    pub epoch: String,
}

/// Checks `name` and maps it to queue names under `prefix`, as every client does.
///
/// # Errors
///
/// [`Error::InvalidName`] for a name [`validate`] refuses; [`Error::Config`] for a prefix too
/// long to leave room for a name (one that passes [`validate_prefix`] always leaves room).
pub fn queue_names(prefix: &str, name: &str) -> Result<QueueNames> {
    validate(name)?;
    let budget = MAX_QUEUE_NAME_BYTES
        .checked_sub(prefix.len() + HOLDER_KIND.len().max(LOCK_KIND.len()).max(EPOCH_KIND.len()))
        .filter(|b| *b > HASH_SUFFIX_BYTES)
        .ok_or_else(|| Error::Config(format!("queue name prefix {prefix:?} is too long")))?;
    let part = if name.len() <= budget {
        name.to_owned()
    } else {
        let digest = Sha256::digest(name.as_bytes());
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        let mut head_len = budget - HASH_SUFFIX_BYTES;
        while !name.is_char_boundary(head_len) {
            head_len -= 1;
        }
        format!("{}~{hex}", &name[..head_len])
    };
    Ok(QueueNames {
        lock: format!("{prefix}{LOCK_KIND}{part}"),
        holder: format!("{prefix}{HOLDER_KIND}{part}"),
        epoch: format!("{prefix}{EPOCH_KIND}{part}"),
    })
}

/// Checks a lock name without mapping it.
///
/// # Errors
///
/// [`Error::InvalidName`] for an empty name or one with a control character.
pub fn validate(name: &str) -> Result<()> {
    let refuse = |reason| Error::InvalidName {
        name: name.chars().take(80).collect(),
        reason,
    };
    if name.is_empty() {
        return Err(refuse("the name is empty"));
    }
    if name.chars().any(char::is_control) {
        return Err(refuse("the name contains a control character"));
    }
    Ok(())
}

/// Checks a queue-name prefix: printable, and short enough to leave room for names.
///
/// # Errors
///
/// [`Error::Config`] for a prefix with a control character, one that starts with `amq.`
/// (reserved by RabbitMQ), or one longer than 208 bytes.
pub fn validate_prefix(prefix: &str) -> Result<()> {
    if prefix.chars().any(char::is_control) {
        return Err(Error::Config(format!(
            "queue name prefix {prefix:?} contains a control character"
        )));
    }
    if prefix.starts_with("amq.") {
        return Err(Error::Config(
            "queue name prefix may not start with \"amq.\" (reserved by RabbitMQ)".into(),
        ));
    }
    if prefix.len() + HOLDER_KIND.len() + HASH_SUFFIX_BYTES + 8 > MAX_QUEUE_NAME_BYTES {
        return Err(Error::Config(format!(
            "queue name prefix is {} bytes; at most {} leave room for lock names",
            prefix.len(),
            MAX_QUEUE_NAME_BYTES - HOLDER_KIND.len() - HASH_SUFFIX_BYTES - 8
        )));
    }
    Ok(())
}

/// Turns arbitrary bytes (a file path, a cache key) into text that is a valid part of a lock
/// name: `%`, control characters and bytes that are not UTF-8 are written as `%XX`, everything
/// else is kept as it is, so names stay readable.
///
/// The mapping is injective: two different inputs never give the same output, so two files or
/// two keys never share a lock. The adapters build their lock names with it.
pub fn escape(raw: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(raw.len());
    for chunk in raw.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_control() || c == '%' {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    let _ = write!(out, "%{b:02X}");
                }
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_keeps_text_and_is_injective() {
        assert_eq!(escape(b"a/b c.txt"), "a/b c.txt");
        assert_eq!(escape("é".as_bytes()), "é");
        assert_eq!(escape(b"100%"), "100%25");
        assert_eq!(escape(b"a\nb"), "a%0Ab");
        assert_eq!(escape(b"\xff\xfe"), "%FF%FE");
        // `%` itself is escaped, so an escaped form never collides with a literal one.
        assert_ne!(escape(b"%0A"), escape(b"\n"));
        for raw in [&b"x\x7f"[..], b"\x00", "\u{85}".as_bytes()] {
            validate(&escape(raw)).unwrap();
        }
    }

    #[test]
    fn short_names_are_kept_readable() {
        let q = queue_names("mqlock.", "files/a b.txt").unwrap();
        assert_eq!(q.lock, "mqlock.lock:files/a b.txt");
        assert_eq!(q.holder, "mqlock.holder:files/a b.txt");
        assert_eq!(q.epoch, "mqlock.epoch:files/a b.txt");
    }

    #[test]
    fn bad_names_are_refused() {
        assert!(matches!(
            queue_names("p.", ""),
            Err(Error::InvalidName { .. })
        ));
        assert!(matches!(
            queue_names("p.", "a\nb"),
            Err(Error::InvalidName { .. })
        ));
        assert!(matches!(
            queue_names("p.", "a\0"),
            Err(Error::InvalidName { .. })
        ));
    }

    #[test]
    fn long_names_are_hashed_within_the_limit_and_stay_distinct() {
        for len in [200, 240, 255, 256, 1000, 100_000] {
            let a = "é".repeat(len);
            let b = format!("{}x", "é".repeat(len - 1));
            let qa = queue_names("mqlock.", &a).unwrap();
            let qb = queue_names("mqlock.", &b).unwrap();
            assert!(qa.lock.len() <= MAX_QUEUE_NAME_BYTES, "{len}");
            assert!(qa.holder.len() <= MAX_QUEUE_NAME_BYTES, "{len}");
            assert!(qa.epoch.len() <= MAX_QUEUE_NAME_BYTES, "{len}");
            assert_ne!(qa.lock, qb.lock);
            assert_ne!(qa.holder, qa.lock);
        }
    }

    #[test]
    fn prefix_is_checked() {
        assert!(validate_prefix("amq.x").is_err());
        assert!(validate_prefix(&"p".repeat(240)).is_err());
        assert!(validate_prefix("team-a.").is_ok());
    }
}
