//! Single-flight per key within a node: the callers of one key share one load, run in a task of
//! its own.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};

use crate::error::{Error, Result};

/// One load of a key, shared by every caller that joined it.
pub(crate) type Flight<V> = Shared<BoxFuture<'static, Result<V>>>;

type Flights<V> = Arc<Mutex<HashMap<String, (u64, Flight<V>)>>>;

/// The flights in progress, by key.
pub(crate) struct SingleFlight<V> {
    flights: Flights<V>,
    next_id: AtomicU64,
}

impl<V: Clone + Send + Sync + 'static> SingleFlight<V> {
    pub(crate) fn new() -> Self {
        SingleFlight {
            flights: Arc::new(Mutex::new(HashMap::new())),
            next_id: AtomicU64::new(0),
        }
    }

    /// The key's flight in progress, or a new one running `load()` in a task of its own (so it
    /// completes even if every caller goes away). The flight leaves the map when its task ends,
    /// however it ends; a task that ends abnormally reaches its callers as
    /// [`Error::LoaderPanicked`].
    ///
    /// # Panics
    ///
    /// If called outside a Tokio runtime.
    pub(crate) fn join_or_start<F, Fut>(&self, key: &str, load: F) -> Flight<V>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V>> + Send + 'static,
    {
        let mut flights = self.flights.lock().unwrap();
        if let Some((_, flight)) = flights.get(key) {
            return flight.clone();
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let landing = Landing {
            flights: self.flights.clone(),
            key: key.to_owned(),
            id,
        };
        let load = load();
        // Spawned under the map's lock: the task's landing cannot remove the entry before it is
        // inserted.
        let task = tokio::spawn(async move {
            let _landing = landing;
            load.await
        });
        let owned_key = key.to_owned();
        let flight = async move {
            task.await.unwrap_or_else(|e| {
                Err(Error::LoaderPanicked {
                    key: owned_key,
                    message: format!("the load task ended abnormally: {e}"),
                })
            })
        }
        .boxed()
        .shared();
        flights.insert(key.to_owned(), (id, flight.clone()));
        flight
    }

    /// Number of flights in progress (for tests).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.flights.lock().unwrap().len()
    }
}

/// Removes the flight from the map however its task ends (even by a panic).
struct Landing<V> {
    flights: Flights<V>,
    key: String,
    id: u64,
}

impl<V> Drop for Landing<V> {
    fn drop(&mut self) {
        let mut flights = self.flights.lock().unwrap();
        if flights.get(&self.key).is_some_and(|(id, _)| *id == self.id) {
            flights.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn callers_share_one_flight_that_outlives_them() {
        let flights = SingleFlight::<u32>::new();
        let runs = Arc::new(AtomicU64::new(0));
        let start = |runs: Arc<AtomicU64>| {
            move || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(1)).await;
                Ok(7)
            }
        };
        let a = flights.join_or_start("k", start(runs.clone()));
        let b = flights.join_or_start("k", start(runs.clone()));
        assert_eq!(a.await.unwrap(), 7);
        assert_eq!(b.await.unwrap(), 7);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(flights.len(), 0);

        // Every caller gone: the load still runs to its end, then leaves the map.
        drop(flights.join_or_start("k", start(runs.clone())));
        assert_eq!(flights.len(), 1);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        assert_eq!(flights.len(), 0);
    }
}
