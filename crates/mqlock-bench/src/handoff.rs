//! Hand-off with two waiters: two clients of one system take turns on one lock; the time
//! measured is from the moment the holder starts its release to the moment the other, already
//! waiting, has the lock.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::systems::Contender;

#[derive(Default)]
struct Shared {
    /// When the current holder started releasing.
    released_at: Option<Instant>,
    /// Whether each contender has asked for the lock and not yet got it.
    waiting: [bool; 2],
    /// The hand-off times measured.
    samples: Vec<Duration>,
    /// Grants so far.
    grants: usize,
}

/// Runs `grants` grants alternating between the two `contenders` on the lock `name` and
/// returns the hand-off times (one fewer than the grants: the first grant is not a hand-off).
///
/// Each holder waits until the other has called `lock`, then holds for `hold` more so that
/// the other's request has reached the server before the release starts: every sample is a
/// hand-off to a registered waiter, not an uncontended acquisition.
pub async fn measure(
    contenders: [Contender; 2],
    name: &str,
    grants: usize,
    hold: Duration,
) -> Result<(Vec<Duration>, [Contender; 2])> {
    let shared = Arc::new(Mutex::new(Shared::default()));
    let tasks: Vec<_> = contenders
        .into_iter()
        .enumerate()
        .map(|(id, mut c)| {
            let (shared, name) = (shared.clone(), name.to_owned());
            tokio::spawn(async move {
                let result: Result<()> = async {
                    loop {
                        shared.lock().unwrap().waiting[id] = true;
                        let held = c.lock(&name).await?;
                        let granted = Instant::now();
                        let done = {
                            let mut s = shared.lock().unwrap();
                            s.waiting[id] = false;
                            if let Some(r) = s.released_at.take() {
                                s.samples.push(granted - r);
                            }
                            s.grants += 1;
                            s.grants >= grants
                        };
                        if !done {
                            // The other contender is waiting (or about to be) once its flag
                            // is up; give its request time to reach the server.
                            let deadline = Instant::now() + Duration::from_secs(10);
                            while !shared.lock().unwrap().waiting[1 - id]
                                && Instant::now() < deadline
                            {
                                tokio::time::sleep(Duration::from_micros(200)).await;
                            }
                            tokio::time::sleep(hold).await;
                            shared.lock().unwrap().released_at = Some(Instant::now());
                        }
                        c.release(held).await?;
                        if done || shared.lock().unwrap().grants >= grants {
                            // The other contender, if waiting, gets the lock, sees the quota
                            // reached and releases it in turn.
                            return Ok(());
                        }
                    }
                }
                .await;
                (result, c)
            })
        })
        .collect();
    let mut back = Vec::with_capacity(2);
    for t in tasks {
        let (result, c) = t.await?;
        result?;
        back.push(c);
    }
    let samples = std::mem::take(&mut shared.lock().unwrap().samples);
    let contenders: [Contender; 2] = match back.try_into() {
        Ok(c) => c,
        Err(_) => unreachable!("two tasks, two contenders"),
    };
    Ok((samples, contenders))
}
