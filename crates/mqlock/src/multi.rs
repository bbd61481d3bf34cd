//! Multi-lock (docs/protocol.md, "Multi-lock"): several locks taken all or none, in one global
//! order, within one deadline.

use std::time::Duration;

use futures_util::future::join_all;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::guard::LockGuard;
use crate::locker::Locker;
use crate::name;

/// Takes every lock of `names` from `locker`, or none, within `timeout` in all; the guards come
/// back in the order of `names`.
///
/// The locks are acquired one after the other in one global order: the names sorted by their
/// bytes. Two callers that take overlapping sets therefore never hold one lock each while
/// waiting for the other's (no cycle of waits: a caller waits only for a name above every name
/// it holds). A name given twice is refused ([`Error::AlreadyHeld`]) rather than merged, so that
/// the guards match `names` one to one. An empty list returns no guard at once.
///
/// On any failure — an acquisition's error, or the deadline — the locks already taken are
/// released, and this call waits for their releases (each bounded as
/// [`LockGuard::release`]) before it returns the error: when it returns, the other names are
/// free again as far as this caller is concerned. A failed release is not reported; the error
/// returned is the acquisition's.
///
/// [`crate::LockClient::lock_all`] calls this with its client; with a [`crate::MemoryLocker`]
/// it runs in process.
///
/// # Errors
///
/// - [`Error::InvalidName`]: a name is invalid (checked for every name before anything is
///   taken).
/// - [`Error::AlreadyHeld`]: a name appears twice in `names` (checked before anything is
///   taken), or, from a [`crate::LockClient`], the client already holds or is acquiring one.
/// - [`Error::Timeout`]: the deadline passed while waiting for a lock (its `name`; `waited` is
///   the time since the call), or before the next lock could be asked for.
/// - Otherwise what the locker's [`Locker::lock_timeout`] returns.
///
/// # Cancel safety
///
/// Cancel safe: the acquisition in progress is dropped (cancel safe itself, see
/// [`Locker`]), and the guards already taken are dropped, which releases them in the
/// background. Dropped while it releases after a failure, the releases go on in the background
/// as well.
///
/// # Panics
///
/// If polled outside a tokio runtime with its time driver, or if `timeout` is too large to be
/// added to the current `Instant`.
pub async fn lock_all<L, S>(locker: &L, names: &[S], timeout: Duration) -> Result<Vec<LockGuard>>
where
    L: Locker + ?Sized,
    S: AsRef<str>,
{
    take_all(
        names,
        timeout,
        || locker.addr(),
        |name, left| locker.lock_timeout(name, left),
        |guard: LockGuard| async move {
            let _ = guard.release().await;
        },
    )
    .await
}

/// The multi-lock itself, over any way of taking one lock: [`lock_all`] runs it over a
/// [`Locker`]'s guards, [`crate::LockTable::share_all`] over a table's shares, so that every
/// multi-lock of the crate keeps the one global order and the one deadline.
///
/// Checks every name and refuses a duplicate before anything is taken; then calls
/// `take(name, left)` for each name in the global order (sorted by bytes), `left` being what is
/// left of `timeout`; on any failure awaits `give_back` of every item taken (all at once) and
/// returns the error, a timeout's `waited` counting from the call. `addr` names the lock
/// service in a timeout found before the next lock could be asked for. The items come back in
/// the order of `names`.
pub(crate) async fn take_all<'n, S, T, Take, TakeFut, Give, GiveFut>(
    names: &'n [S],
    timeout: Duration,
    addr: impl Fn() -> String,
    mut take: Take,
    give_back: Give,
) -> Result<Vec<T>>
where
    S: AsRef<str>,
    Take: FnMut(&'n str, Duration) -> TakeFut,
    TakeFut: Future<Output = Result<T>>,
    Give: FnMut(T) -> GiveFut,
    GiveFut: Future<Output = ()>,
{
    let started = Instant::now();
    let deadline = started + timeout;
    for n in names {
        name::validate(n.as_ref())?;
    }
    // The global order: sorted by name; adjacent equal names are duplicates.
    let mut order: Vec<usize> = (0..names.len()).collect();
    order.sort_by(|&a, &b| names[a].as_ref().cmp(names[b].as_ref()));
    if let Some(w) = order
        .windows(2)
        .find(|w| names[w[0]].as_ref() == names[w[1]].as_ref())
    {
        return Err(Error::AlreadyHeld {
            name: names[w[0]].as_ref().to_owned(),
        });
    }
    let mut taken: Vec<Option<T>> = (0..names.len()).map(|_| None).collect();
    for &i in &order {
        let name = names[i].as_ref();
        let left = deadline.saturating_duration_since(Instant::now());
        let got = if left.is_zero() {
            Err(Error::Timeout {
                name: name.to_owned(),
                addr: addr(),
                waited: started.elapsed(),
            })
        } else {
            take(name, left).await
        };
        match got {
            Ok(item) => taken[i] = Some(item),
            Err(e) => {
                let e = match e {
                    Error::Timeout { name, addr, .. } => Error::Timeout {
                        name,
                        addr,
                        waited: started.elapsed(),
                    },
                    e => e,
                };
                join_all(taken.into_iter().flatten().map(give_back)).await;
                return Err(e);
            }
        }
    }
    Ok(taken
        .into_iter()
        .map(|item| item.expect("every name was taken"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryLocker;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    #[tokio::test]
    async fn guards_come_back_in_the_callers_order() {
        let l = MemoryLocker::new();
        let gs = lock_all(&l, &["c", "a", "b"], Duration::from_secs(1))
            .await
            .unwrap();
        let got: Vec<&str> = gs.iter().map(|g| g.name()).collect();
        assert_eq!(got, ["c", "a", "b"]);
        assert!(["a", "b", "c"].iter().all(|n| l.is_locked(n)));
        drop(gs);
        assert!(["a", "b", "c"].iter().all(|n| !l.is_locked(n)));
        assert!(
            lock_all(&l, &[] as &[&str], Duration::ZERO)
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn duplicates_and_bad_names_take_nothing() {
        let l = MemoryLocker::new();
        assert!(matches!(
            lock_all(&l, &["b", "a", "b"], Duration::from_secs(1)).await,
            Err(Error::AlreadyHeld { ref name }) if name == "b"
        ));
        assert!(matches!(
            lock_all(&l, &["a", ""], Duration::from_secs(1)).await,
            Err(Error::InvalidName { .. })
        ));
        assert!(!l.is_locked("a") && !l.is_locked("b"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_timeout_releases_what_was_taken() {
        let l = MemoryLocker::new();
        let other = l.lock("c").await.unwrap();
        let started = Instant::now();
        let e = lock_all(&l, &["a", "c", "b"], Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(
            matches!(e, Error::Timeout { ref name, waited, .. } if name == "c" && waited >= Duration::from_millis(300)),
            "{e:?}"
        );
        assert!(started.elapsed() < Duration::from_millis(400));
        assert!(!l.is_locked("a") && !l.is_locked("b"));
        drop(other);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn overlapping_sets_in_any_order_never_deadlock() {
        let l = MemoryLocker::new();
        let names = ["n0", "n1", "n2", "n3", "n4"];
        let inside: Arc<Mutex<HashMap<&str, bool>>> = Arc::default();
        let counts: Arc<Mutex<HashMap<&str, u32>>> = Arc::default();
        let mut tasks = Vec::new();
        for t in 0..8usize {
            let (l, inside, counts) = (l.clone(), inside.clone(), counts.clone());
            tasks.push(tokio::spawn(async move {
                for r in 0..50usize {
                    let a = names[(t + r) % 5];
                    let b = names[(t * 3 + r * 7 + 1) % 5];
                    let pair: Vec<&str> = if a == b { vec![a] } else { vec![b, a] };
                    let gs = lock_all(&l, &pair, Duration::from_secs(10)).await.unwrap();
                    for n in &pair {
                        assert!(!inside.lock().unwrap().insert(n, true).unwrap_or(false));
                    }
                    tokio::task::yield_now().await;
                    for n in &pair {
                        *counts.lock().unwrap().entry(n).or_default() += 1;
                        inside.lock().unwrap().insert(n, false);
                    }
                    drop(gs);
                }
            }));
        }
        tokio::time::timeout(Duration::from_secs(30), async {
            for t in tasks {
                t.await.unwrap();
            }
        })
        .await
        .expect("no deadlock");
        let total: u32 = counts.lock().unwrap().values().sum();
        assert!(total >= 400);
    }
}
