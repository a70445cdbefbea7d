//! Claims on deciding request events, across replicas: the first replica to see an event
//! claims it; one that gets the same event meanwhile waits for the first one's answer
//! instead of deciding (and counting) it again.
//!
//! The claims of concurrent callbacks go to the database together (batch.rs): one
//! statement looks each event up among those stored and claims the ones that are not.
//! Claims are needed only while an event is decided, so they live in an unlogged table
//! and commit without waiting for the disk. With the rules policy on the same database,
//! those statements go out together with the decisions' counter batches, one round trip
//! for both ([`riding`]).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError, Weak},
};

use chrono::{DateTime, Utc};

use super::{
    batch::{per_item, BatchWorker, QueueOf},
    failed,
    pipeline::Pipeline,
    record_of, seq_of, StoreError,
};
use crate::store::{EventIdentity, FirstDelivery, HistoryAsk, VerificationRecord};

/// What a claim found.
#[derive(Debug, Clone)]
pub(crate) enum ClaimAnswer {
    /// The event is stored: answer as its first delivery was answered.
    Stored(FirstDelivery),
    /// This replica decides it.
    Claimed,
    /// Another replica is deciding it now.
    HeldElsewhere,
}

/// An event to claim and, for a decision that reads it, its number's history.
#[derive(Debug, Clone)]
pub(crate) struct ClaimAsk {
    pub(super) identity: EventIdentity,
    pub(super) history: Option<OwnedHistoryAsk>,
}

/// A [`HistoryAsk`] that can wait in a queue.
#[derive(Debug, Clone)]
pub(crate) struct OwnedHistoryAsk {
    number: String,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
    limit: i64,
}

impl From<&HistoryAsk<'_>> for OwnedHistoryAsk {
    fn from(ask: &HistoryAsk<'_>) -> Self {
        Self {
            number: ask.number.to_owned(),
            since: ask.since,
            until: ask.until,
            limit: i64::try_from(ask.limit).unwrap_or(i64::MAX),
        }
    }
}

/// What a claim found, with the number's history when it was asked for.
pub(crate) type Claimed = (ClaimAnswer, Vec<VerificationRecord>);

/// Looks up and claims a batch of events in one statement; a claim left by a replica
/// that died deciding is taken over after ten seconds. The same statement reads the
/// number histories asked for (what `recent_of_number` reads), so a decision that
/// spares returning numbers makes no round trip for them.
const CLAIM: &str = "WITH asked AS (
        SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY
            AS a(id, event, discriminator, n)
    ), histories AS (
        SELECT * FROM unnest($4::text[], $5::timestamptz[], $6::timestamptz[], $7::int8[])
            WITH ORDINALITY AS h(number, since, until, most, n)
        WHERE h.number IS NOT NULL
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
    SELECT a.n, s.seq, s.answer, c.id IS NOT NULL, NULL::text FROM asked a
    LEFT JOIN stored s ON s.n = a.n
    LEFT JOIN claimed c ON c.id = a.id AND c.event = a.event AND c.discriminator = a.discriminator
    UNION ALL
    SELECT h.n, NULL, NULL, NULL, v.record FROM histories h
    CROSS JOIN LATERAL (
        SELECT v.record FROM verigate_verifications v
        WHERE v.number = h.number AND v.first_seen >= h.since AND v.first_seen < h.until
          AND v.record IS NOT NULL
        ORDER BY v.number DESC, v.first_seen DESC, v.seq DESC LIMIT h.most
    ) v";

/// Claims batches of events on the shared connections.
pub(crate) struct Claimer {
    pub(crate) connections: Arc<Pipeline>,
}

impl BatchWorker for Claimer {
    type Item = ClaimAsk;
    type Output = Result<Claimed, StoreError>;

    async fn run(&mut self, asked: Vec<ClaimAsk>) -> Vec<Self::Output> {
        per_item(self.claim(&asked).await, asked.len())
    }
}

impl Claimer {
    async fn claim(&self, asked: &[ClaimAsk]) -> Result<Vec<Claimed>, StoreError> {
        // An event asked twice in one batch is claimed once; the second asker waits.
        let mut first_ask: HashMap<&EventIdentity, usize> = HashMap::new();
        let unique: Vec<&ClaimAsk> = asked
            .iter()
            .enumerate()
            .filter(|(i, a)| *first_ask.entry(&a.identity).or_insert(*i) == *i)
            .map(|(_, a)| a)
            .collect();
        let column = |f: fn(&EventIdentity) -> &String| -> Vec<&str> {
            unique.iter().map(|a| f(&a.identity).as_str()).collect()
        };
        let histories: Vec<Option<&OwnedHistoryAsk>> =
            unique.iter().map(|a| a.history.as_ref()).collect();
        let numbers: Vec<Option<&str>> = histories
            .iter()
            .map(|h| h.map(|h| h.number.as_str()))
            .collect();
        let since: Vec<Option<DateTime<Utc>>> =
            histories.iter().map(|h| h.map(|h| h.since)).collect();
        let until: Vec<Option<DateTime<Utc>>> =
            histories.iter().map(|h| h.map(|h| h.until)).collect();
        let most: Vec<Option<i64>> = histories.iter().map(|h| h.map(|h| h.limit)).collect();
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
                    &numbers,
                    &since,
                    &until,
                    &most,
                ],
            )
            .await
            .map_err(failed)?;
        let mut by_unique: Vec<Claimed> =
            vec![(ClaimAnswer::HeldElsewhere, Vec::new()); unique.len()];
        for row in rows {
            let n: i64 = row.try_get(0).map_err(failed)?;
            let Some(slot) = usize::try_from(n - 1)
                .ok()
                .and_then(|i| by_unique.get_mut(i))
            else {
                continue;
            };
            // A history row (their order does not matter: a history is read by time).
            if row.try_get::<_, Option<bool>>(3).map_err(failed)?.is_none() {
                slot.1.push(record_of(&row, 4)?);
                continue;
            }
            let seq: Option<i64> = row.try_get(1).map_err(failed)?;
            let answer = match seq {
                Some(seq) => ClaimAnswer::Stored(FirstDelivery {
                    seq: seq_of(seq),
                    answer: row.try_get(2).map_err(failed)?,
                }),
                None if row.try_get(3).map_err(failed)? => ClaimAnswer::Claimed,
                None => ClaimAnswer::HeldElsewhere,
            };
            slot.0 = answer;
        }
        let position: HashMap<&EventIdentity, usize> = unique
            .iter()
            .enumerate()
            .map(|(i, a)| (&a.identity, i))
            .collect();
        let mut by_unique: Vec<Option<Claimed>> = by_unique.into_iter().map(Some).collect();
        Ok(asked
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let e = &a.identity;
                match (first_ask.get(e), position.get(e)) {
                    (Some(&first), Some(&u)) if first == i => by_unique[u].take(),
                    _ => None,
                }
                .unwrap_or((ClaimAnswer::HeldElsewhere, Vec::new()))
            })
            .collect())
    }
}

/// Where claims are handed in.
pub(crate) type ClaimQueue = QueueOf<Claimer>;

/// Claims that may wait in a claim queue, whichever loop serves it.
pub(crate) const QUEUE: usize = 4096;

/// Claim queues whose batches ride with the decisions' counter batches (one round trip
/// carries both), by database URL. The policy's shared state, which owns the counters'
/// connection, is built before the store opens, and apart from it: this is where the
/// store finds the queue. Keyed by the database, so a store only ever claims in its own.
static RIDING: Mutex<Vec<(String, Weak<ClaimQueue>)>> = Mutex::new(Vec::new());

/// Offers `queue` to stores that open on `url` from now on (while it lives).
pub(crate) fn ride_with_counters(url: &str, queue: &Arc<ClaimQueue>) {
    let mut riding = RIDING.lock().unwrap_or_else(PoisonError::into_inner);
    riding.retain(|(_, queue)| queue.strong_count() > 0);
    riding.push((url.to_owned(), Arc::downgrade(queue)));
}

/// The claim queue offered for `url`, if a live one was.
pub(crate) fn riding(url: &str) -> Option<Arc<ClaimQueue>> {
    let riding = RIDING.lock().unwrap_or_else(PoisonError::into_inner);
    riding
        .iter()
        .rev()
        .filter(|(offered, _)| offered == url)
        .find_map(|(_, queue)| queue.upgrade())
}
