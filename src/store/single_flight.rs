//! One decision per event, however many deliveries of it arrive at once.
//!
//! Sinch retries a callback it got no answer for, and a retry can overtake the first
//! attempt. The first delivery to arrive leads: it is checked against what is stored,
//! decided and recorded. Deliveries of the same event that arrive meanwhile wait for the
//! leader and are then answered as duplicates, with the leader's answer, so a rate limit
//! or spend cap is counted once. If the leader fails, one waiter takes over.

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex, PoisonError},
};

use tokio::sync::watch;

use super::{EventIdentity, FirstDelivery, RecordOutcome, StoreError};
use crate::decision::DecisionRecord;

#[derive(Debug, Clone)]
enum Flight {
    Running,
    Done(FirstDelivery),
    Failed,
}

/// The events in flight, by identity.
#[derive(Default)]
pub(super) struct SingleFlight {
    flights: Mutex<HashMap<EventIdentity, watch::Sender<Flight>>>,
}

/// Whether a delivery is the first of its event.
#[derive(Debug)]
pub enum Admission {
    /// Go ahead: decide and record it with this claim.
    First(Claim),
    /// Seen before (or just now, in flight): answer as the first delivery was answered.
    Duplicate(FirstDelivery),
}

/// The right to record an event. Dropping it unused lets a waiting duplicate take over.
#[derive(Debug)]
pub struct Claim {
    identity: EventIdentity,
    flights: Option<Arc<SingleFlight>>,
}

impl std::fmt::Debug for SingleFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SingleFlight")
    }
}

impl SingleFlight {
    /// Leads or waits, as the module docs describe. `stored` looks the event up in the
    /// store (only the leader calls it).
    pub async fn admit<F, Fut>(
        self: &Arc<Self>,
        identity: EventIdentity,
        stored: F,
    ) -> Result<Admission, StoreError>
    where
        F: Fn(EventIdentity) -> Fut,
        Fut: Future<Output = Result<Option<FirstDelivery>, StoreError>>,
    {
        loop {
            let waiting = {
                let mut flights = self.flights.lock().unwrap_or_else(PoisonError::into_inner);
                match flights.get(&identity) {
                    Some(leader) => Some(leader.subscribe()),
                    None => {
                        flights.insert(identity.clone(), watch::channel(Flight::Running).0);
                        None
                    }
                }
            };
            let Some(mut leader) = waiting else {
                let claim = Claim {
                    identity: identity.clone(),
                    flights: Some(Arc::clone(self)),
                };
                return match stored(identity.clone()).await {
                    Ok(Some(first)) => {
                        claim.finish(Flight::Done(first.clone()));
                        Ok(Admission::Duplicate(first))
                    }
                    Ok(None) => Ok(Admission::First(claim)),
                    // Dropping the claim lets waiters try for themselves.
                    Err(err) => Err(err),
                };
            };
            let ended = leader
                .wait_for(|f| !matches!(f, Flight::Running))
                .await
                .map(|f| f.clone());
            if let Ok(Flight::Done(first)) = ended {
                return Ok(Admission::Duplicate(first));
            }
            // The leader failed or went away: try again, perhaps as the leader.
        }
    }

    fn end(&self, identity: &EventIdentity, flight: Flight) {
        let leader = self
            .flights
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(identity);
        if let Some(leader) = leader {
            // No receiver left is fine: nobody was waiting.
            let _ = leader.send(flight);
        }
    }
}

impl Claim {
    pub fn identity(&self) -> &EventIdentity {
        &self.identity
    }

    /// Tells waiting duplicates how recording ended.
    pub fn complete(
        self,
        outcome: &Result<RecordOutcome, StoreError>,
        decision: Option<&DecisionRecord>,
    ) {
        let flight = match outcome {
            Ok(RecordOutcome::Stored { seq, .. }) => Flight::Done(FirstDelivery {
                seq: *seq,
                answer: decision.map(|d| d.answer.clone()),
            }),
            Ok(RecordOutcome::Duplicate(first)) => Flight::Done(first.clone()),
            Err(_) => Flight::Failed,
        };
        self.finish(flight);
    }

    fn finish(mut self, flight: Flight) {
        if let Some(flights) = self.flights.take() {
            flights.end(&self.identity, flight);
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(flights) = self.flights.take() {
            flights.end(&self.identity, Flight::Failed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn identity() -> EventIdentity {
        EventIdentity {
            id: "v".into(),
            event: "VerificationRequestEvent".into(),
            discriminator: String::new(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_deliveries_have_one_leader_and_the_rest_get_its_answer() {
        let flights = Arc::new(SingleFlight::default());
        let leaders = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (flights, leaders) = (Arc::clone(&flights), Arc::clone(&leaders));
                tokio::spawn(async move {
                    match flights.admit(identity(), |_| async { Ok(None) }).await {
                        Ok(Admission::First(claim)) => {
                            leaders.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                            claim.complete(
                                &Ok(RecordOutcome::Stored {
                                    seq: 7,
                                    decision: None,
                                    taken: None,
                                }),
                                None,
                            );
                            7
                        }
                        Ok(Admission::Duplicate(first)) => first.seq,
                        Err(err) => panic!("{err}"),
                    }
                })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap(), 7);
        }
        assert_eq!(leaders.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_waiter_takes_over_when_the_leader_gives_up() {
        let flights = Arc::new(SingleFlight::default());
        let Ok(Admission::First(claim)) = flights.admit(identity(), |_| async { Ok(None) }).await
        else {
            panic!("the first delivery leads")
        };
        let waiter = {
            let flights = Arc::clone(&flights);
            tokio::spawn(async move { flights.admit(identity(), |_| async { Ok(None) }).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        drop(claim);
        let taken = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("the waiter must not hang")
            .unwrap();
        assert!(matches!(taken, Ok(Admission::First(_))), "{taken:?}");
    }
}
