//! One acquisition per name and client (docs/protocol.md, "One acquisition per name and
//! client"): the names a [`crate::LockClient`] holds or is acquiring, so that a second
//! acquisition of one of them fails at once ([`Error::AlreadyHeld`]) instead of registering
//! behind the first and waiting for itself.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

/// The names claimed by one client and its clones.
#[derive(Default, Debug)]
pub(crate) struct Claims {
    names: Mutex<HashSet<String>>,
}

impl Claims {
    /// Claims `name` for one acquisition and, once granted, its hold.
    pub(crate) fn claim(self: &Arc<Self>, name: &str) -> Result<NameClaim> {
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        if !names.insert(name.to_owned()) {
            return Err(Error::AlreadyHeld { name: name.into() });
        }
        Ok(NameClaim {
            claims: self.clone(),
            name: name.to_owned(),
        })
    }

    /// Whether `name` is claimed now.
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(name)
    }
}

/// A claimed name; dropping it gives the name back. Lives in the acquisition's future, then in
/// the guard's release handle: a failed or dropped acquisition and a released, dropped or
/// lost-and-dropped guard all free it.
#[derive(Debug)]
pub(crate) struct NameClaim {
    claims: Arc<Claims>,
    name: String,
}

impl Drop for NameClaim {
    fn drop(&mut self) {
        self.claims
            .names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_claimed_once_until_given_back() {
        let claims = Arc::new(Claims::default());
        let a = claims.claim("a").unwrap();
        assert!(matches!(claims.claim("a"), Err(Error::AlreadyHeld { ref name }) if name == "a"));
        let b = claims.claim("b").unwrap();
        drop(a);
        assert!(!claims.contains("a"));
        let _a = claims.claim("a").unwrap();
        drop(b);
        assert!(claims.contains("a"));
    }
}
