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
}

impl ReadBarrier {
    /// Returns once a round begun after this call has passed (running `round` itself when no
    /// later waiter has done so meanwhile); a failed round fails the waiter that ran it, and
    /// the others try again.
    pub async fn pass<F, Fut, E>(&self, round: F) -> Result<(), E>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<(), E>>,
    {
        let arrived_after = self.begun.load(Ordering::SeqCst);
        let _turn = self.turn.lock().await;
        if self.passed.load(Ordering::SeqCst) > arrived_after {
            return Ok(());
        }
        let number = self.begun.fetch_add(1, Ordering::SeqCst) + 1;
        round().await?;
        self.passed.fetch_max(number, Ordering::SeqCst);
        Ok(())
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

    async fn timed_round(rounds: Rounds) -> Result<(), ()> {
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
            assert!(
                rounds.iter().any(|(began, ended)| *began >= arrived && *ended <= answered),
                "a read was answered without a round begun after it arrived"
            );
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
    async fn a_failed_round_fails_its_reader_and_the_next_tries_again() {
        let barrier = ReadBarrier::default();
        assert_eq!(barrier.pass(|| async { Err::<(), _>("no quorum") }).await, Err("no quorum"));
        assert_eq!(barrier.pass(|| async { Ok::<(), &str>(()) }).await, Ok(()));
    }
}
