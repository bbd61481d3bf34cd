//! Keeping a lock until it is wanted (docs/protocol.md, "Keeping a lock until it is wanted"):
//! the locks a client keeps after their guards let go, each still held by its holder task, for
//! the client's next acquisition of the name to take back at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::release::{HolderHandle, give_back};

/// The parked locks of one client and its clones, by name.
///
/// Whoever takes an entry out owns the hold: an acquisition of the name (it hands the lock back
/// to its caller) or the holder task (it releases the lock: wanted by another client, idle too
/// long, or lost). The map's lock decides between them.
#[derive(Default)]
pub(crate) struct Parking {
    parked: Mutex<HashMap<Arc<str>, HolderHandle>>,
}

impl Parking {
    /// Parks the hold of `handle`: it stays claimed and held until taken out.
    pub(crate) fn park(&self, handle: HolderHandle) {
        let displaced = self.map().insert(handle.name.clone(), handle);
        // One acquisition per name and client (N1): a name has at most one hold to park.
        debug_assert!(displaced.is_none(), "two parked holds of one name");
    }

    /// Takes the parked hold of `name` out, for an acquisition of the name.
    pub(crate) fn take(&self, name: &str) -> Option<HolderHandle> {
        self.map().remove(name)
    }

    /// Takes the parked hold of `name` out if it is the hold `tag` (its holder task's own), to
    /// release it: `None` when an acquisition took it back first. The client's claim on the
    /// name is given back at once, under the map's lock: an acquisition that finds no parked
    /// hold must not find the name still claimed by the hold that is leaving
    /// (`Error::AlreadyHeld`).
    pub(crate) fn take_own(&self, name: &str, tag: &str) -> Option<HolderHandle> {
        let mut map = self.map();
        if map.get(name).is_some_and(|h| &*h.tag == tag) {
            let own = map.remove(name)?;
            give_back(&own.claim);
            Some(own)
        } else {
            None
        }
    }

    /// Every parked hold, taken out (their handles dropped release them).
    pub(crate) fn drain(&self) -> Vec<HolderHandle> {
        self.map().drain().map(|(_, h)| h).collect()
    }

    /// How many holds are parked.
    pub(crate) fn len(&self) -> usize {
        self.map().len()
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, HolderHandle>> {
        self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }
}
