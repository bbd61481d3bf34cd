//! What a cache holds, and how values are stored in Redis (JSON).

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// What a cache can hold: any serde type that can be cloned and shared between tasks.
pub trait CacheValue: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {}
impl<T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static> CacheValue for T {}

/// Encodes a value for Redis (JSON).
///
/// # Errors
///
/// [`Error::Codec`] when `value`'s `Serialize` implementation fails.
pub fn encode<V: Serialize>(key: &str, value: &V) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| Error::Codec {
        key: key.to_owned(),
        op: "encode",
        detail: e.to_string(),
    })
}

/// Decodes a value read from Redis (JSON).
///
/// # Errors
///
/// [`Error::Codec`] when `bytes` is not the JSON of a `V`.
pub fn decode<V: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<V> {
    serde_json::from_slice(bytes).map_err(|e| Error::Codec {
        key: key.to_owned(),
        op: "decode",
        detail: e.to_string(),
    })
}
