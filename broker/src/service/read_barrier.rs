//! Linearizable reads in rounds. A read is linearizable once this node has confirmed, in a
//! round of heartbeats that *began after the read arrived*, that it still leads, and has
//! applied everything committed up to then. One such round serves every read that arrived
//! before it began, so however many reads (or unknown credentials to confirm) arrive at once,
//! at most one round is under way and one more is waited for: a flood costs the cluster rounds
//! at its own pace, never one per request.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct ReadBarrier {
    /// Held while a round is under way.
    turn: tokio::sync::Mutex<()>,
    /// Rounds begun so far; a round's number is its position.
    begun: AtomicU64,
    /// The latest round that confirmed leadership.
    passed: AtomicU64,
    /// The latest round that failed, and why.
    failed: std::sync::Mutex<(u64, String)>,
}

impl ReadBarrier {
    /// Returns once a round begun after this call has passed (running `round` itself when no
    /// later waiter has done so meanwhile). A failed round fails every waiter that arrived
    /// before it began: while leadership cannot be confirmed, waiters are not answered one
    /// round after another.
    pub async fn pass<F, Fut>(&self, round: F) -> Result<(), String>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<(), String>>,
    {
        let arrived_after = self.begun.load(Ordering::SeqCst);
        let _turn = self.turn.lock().await;
        if self.passed.load(Ordering::SeqCst) > arrived_after {
            return Ok(());
        }
        {
            let failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
            if failed.0 > arrived_after {
                return Err(failed.1.clone());
            }
        }
        let number = self.begun.fetch_add(1, Ordering::SeqCst) + 1;
        match round().await {
            Ok(()) => {
                self.passed.fetch_max(number, Ordering::SeqCst);
                Ok(())
            }
            Err(why) => {
                *self.failed.lock().unwrap_or_else(|p| p.into_inner()) = (number, why.clone());
                Err(why)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use std::time::Instant;

    use super::*;

    /// When each round began and ended.
    type Rounds = Arc<Mutex<Vec<(Instant, Instant)>>>;

    async fn timed_round(rounds: Rounds) -> Result<(), String> {
        let began = Instant::now();
        tokio::time::sleep(Duration::from_millis(20)).await;
        rounds.lock().expect("rounds").push((began, Instant::now()));
        Ok(())
    }

    #[tokio::test]
    async fn a_flood_of_reads_costs_two_rounds_and_each_read_waits_for_one_begun_after_it() {
        let (barrier, rounds): (Arc<ReadBarrier>, Rounds) = Default::default();
        let readers: Vec<_> = (0..100)
            .map(|_| {
                let (barrier, rounds) = (barrier.clone(), rounds.clone());
                tokio::spawn(async move {
                    let arrived = Instant::now();
                    barrier.pass(|| timed_round(rounds.clone())).await.expect("passes");
                    (arrived, Instant::now())
                })
            })
            .collect();
        let mut served = Vec::new();
        for r in readers {
            served.push(r.await.expect("reader"));
        }
        let rounds = rounds.lock().expect("rounds").clone();
        assert!(rounds.len() <= 2, "{} rounds for 100 concurrent reads", rounds.len());
        for (arrived, answered) in served {
            assert!(rounds.iter().any(|(began, ended)| *began >= arrived && *ended <= answered), "a read was answered without a round begun after it arrived");
        }
    }

    #[tokio::test]
    async fn a_read_after_a_round_waits_for_a_new_one() {
        let (barrier, rounds): (ReadBarrier, Rounds) = Default::default();
        barrier.pass(|| timed_round(rounds.clone())).await.expect("first");
        barrier.pass(|| timed_round(rounds.clone())).await.expect("second");
        assert_eq!(rounds.lock().expect("rounds").len(), 2, "an earlier round never answers a later read");
    }

    #[tokio::test]
    async fn a_failed_round_fails_the_readers_that_waited_for_it_and_a_later_one_tries_again() {
        let barrier = Arc::new(ReadBarrier::default());
        let rounds = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let failing = |rounds: Arc<std::sync::atomic::AtomicU64>| {
            move || {
                let rounds = rounds.clone();
                async move {
                    rounds.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Err::<(), _>("no quorum".to_owned())
                }
            }
        };
        let readers: Vec<_> = (0..10)
            .map(|_| {
                let (barrier, round) = (barrier.clone(), failing(rounds.clone()));
                tokio::spawn(async move { barrier.pass(round).await })
            })
            .collect();
        for r in readers {
            assert_eq!(r.await.expect("reader"), Err("no quorum".to_owned()));
        }
        assert!(rounds.load(Ordering::SeqCst) <= 2, "{} failing rounds for 10 readers", rounds.load(Ordering::SeqCst));
        assert_eq!(barrier.pass(|| async { Ok(()) }).await, Ok(()), "a reader after the failure runs a round of its own");
    }
}
