//! Claims on deciding request events, across replicas: the first replica to see an event
//! claims it; one that gets the same event meanwhile waits for the first one's answer
//! instead of deciding (and counting) it again.
//!
//! The claims of concurrent callbacks go to the database together (batch.rs): one
//! statement looks each event up among those stored and claims the ones that are not.
//! Claims are needed only while an event is decided, so they live in an unlogged table
//! and commit without waiting for the disk.

use std::{collections::HashMap, sync::Arc};

use super::{
    batch::{per_item, BatchWorker},
    failed,
    pipeline::Pipeline,
    seq_of, StoreError,
};
use crate::store::{EventIdentity, FirstDelivery};

/// What a claim found.
#[derive(Debug, Clone)]
pub(super) enum ClaimAnswer {
    /// The event is stored: answer as its first delivery was answered.
    Stored(FirstDelivery),
    /// This replica decides it.
    Claimed,
    /// Another replica is deciding it now.
    HeldElsewhere,
}

/// Looks up and claims a batch of events in one statement; a claim left by a replica
/// that died deciding is taken over after ten seconds.
const CLAIM: &str = "WITH asked AS (
        SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY
            AS a(id, event, discriminator, n)
    ), stored AS (
        SELECT a.n, e.seq, e.answer FROM asked a JOIN verigate_events e
          ON e.id = a.id AND e.event = a.event AND e.discriminator = a.discriminator
    ), claimed AS (
        INSERT INTO verigate_claims (id, event, discriminator, claimed_at)
        SELECT a.id, a.event, a.discriminator, now() FROM asked a
        WHERE NOT EXISTS (SELECT 1 FROM stored s WHERE s.n = a.n)
        ORDER BY 1, 2, 3
        ON CONFLICT (id, event, discriminator) DO UPDATE SET claimed_at = now()
        WHERE verigate_claims.claimed_at < now() - interval '10 seconds'
        RETURNING id, event, discriminator
    )
    SELECT a.n, s.seq, s.answer, c.id IS NOT NULL FROM asked a
    LEFT JOIN stored s ON s.n = a.n
    LEFT JOIN claimed c ON c.id = a.id AND c.event = a.event AND c.discriminator = a.discriminator";

/// Claims batches of events on the shared connections.
pub(super) struct Claimer {
    pub(super) connections: Arc<Pipeline>,
}

impl BatchWorker for Claimer {
    type Item = EventIdentity;
    type Output = Result<ClaimAnswer, StoreError>;

    async fn run(&mut self, asked: Vec<EventIdentity>) -> Vec<Self::Output> {
        per_item(self.claim(&asked).await, asked.len())
    }
}

impl Claimer {
    async fn claim(&self, asked: &[EventIdentity]) -> Result<Vec<ClaimAnswer>, StoreError> {
        // An event asked twice in one batch is claimed once; the second asker waits.
        let mut first_ask: HashMap<&EventIdentity, usize> = HashMap::new();
        let unique: Vec<&EventIdentity> = asked
            .iter()
            .enumerate()
            .filter(|(i, e)| *first_ask.entry(e).or_insert(*i) == *i)
            .map(|(_, e)| e)
            .collect();
        let column = |f: fn(&EventIdentity) -> &String| -> Vec<&str> {
            unique.iter().map(|e| f(e).as_str()).collect()
        };
        let connection = self
            .connections
            .get()
            .await
            .map_err(|e| StoreError::Unavailable(format!("PostgreSQL: {e}")))?;
        let rows = connection
            .query(
                CLAIM,
                &[
                    &column(|e| &e.id),
                    &column(|e| &e.event),
                    &column(|e| &e.discriminator),
                ],
            )
            .await
            .map_err(failed)?;
        let mut by_unique = vec![ClaimAnswer::HeldElsewhere; unique.len()];
        for row in rows {
            let n: i64 = row.try_get(0).map_err(failed)?;
            let seq: Option<i64> = row.try_get(1).map_err(failed)?;
            let answer = match seq {
                Some(seq) => ClaimAnswer::Stored(FirstDelivery {
                    seq: seq_of(seq),
                    answer: row.try_get(2).map_err(failed)?,
                }),
                None if row.try_get(3).map_err(failed)? => ClaimAnswer::Claimed,
                None => ClaimAnswer::HeldElsewhere,
            };
            if let Some(slot) = usize::try_from(n - 1)
                .ok()
                .and_then(|i| by_unique.get_mut(i))
            {
                *slot = answer;
            }
        }
        let position: HashMap<&EventIdentity, usize> =
            unique.iter().enumerate().map(|(i, e)| (*e, i)).collect();
        Ok(asked
            .iter()
            .enumerate()
            .map(|(i, e)| match (first_ask.get(e), position.get(e)) {
                (Some(&first), Some(&u)) if first == i => by_unique[u].clone(),
                _ => ClaimAnswer::HeldElsewhere,
            })
            .collect())
    }
}
