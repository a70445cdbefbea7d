//! What one accepted event does to its verification, the same whether it arrives now
//! (the commit thread) or is replayed from the write-ahead log after a crash.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::{
    codec::{Accepted, StoredVerification, WalEntry},
    keys::Stamp,
    memtable::{Change, Memtable},
    Shared,
};
use crate::{
    decision::DecisionRecord,
    events::VerificationEvent,
    phone::NumberFacts,
    store::{RecordStamp, StoreError, VerificationRecord},
};

/// An event merged into its verification.
pub struct Merged {
    pub verification: StoredVerification,
    pub created: bool,
    pub new_number: Option<String>,
    pub new_reference: Option<String>,
}

#[allow(clippy::too_many_arguments)]
pub fn merge(
    current: Option<&StoredVerification>,
    event: &VerificationEvent,
    discriminator: &str,
    stamp: Stamp,
    received_at: DateTime<Utc>,
    app_key: &str,
    number: Option<(&str, &NumberFacts)>,
    decision: Option<&DecisionRecord>,
) -> Merged {
    let before = current.map(|c| &c.record);
    let record = VerificationRecord::apply(
        before.cloned(),
        event,
        RecordStamp {
            app_key,
            seq: stamp.seq,
            ordered_at: stamp.at(),
            received_at,
        },
        number,
        decision,
    );
    let gained = |was: Option<&Option<String>>, now: &Option<String>| match (was, now) {
        (Some(Some(_)), _) | (_, None) => None,
        (_, Some(value)) => Some(value.clone()),
    };
    let new_number = gained(before.map(|b| &b.number), &record.number);
    let new_reference = gained(before.map(|b| &b.reference), &record.reference);
    let mut accepted = current.map(|c| c.accepted.clone()).unwrap_or_default();
    accepted.push(Accepted {
        event: event.event_type().to_owned(),
        discriminator: discriminator.to_owned(),
        seq: stamp.seq,
    });
    Merged {
        verification: StoredVerification { record, accepted },
        created: current.is_none(),
        new_number,
        new_reference,
    }
}

/// Applies replayed log entries (those after the checkpoint position `checkpoint`) to a
/// memtable, as [`Committer::accept`] did when they arrived.
///
/// A checkpoint may have been cut short by the crash, leaving some of these entries' effects
/// in the index already. So a record created after the position counts as created here
/// whatever the index holds, an event the record already includes is not merged again but
/// still touches it (and its raw event is kept), and every touched record's number and
/// reference entries are made again: the checkpoint after the replay then writes all of it
/// once more, whole.
pub fn replay(
    shared: &Shared,
    memtable: &mut Memtable,
    entries: Vec<WalEntry>,
    checkpoint: u64,
) -> Result<(), StoreError> {
    for entry in entries {
        let logged = entry.event;
        let event = VerificationEvent::parse(logged.body.as_bytes())
            .map_err(|e| StoreError::Corrupt(format!("a logged event does not parse: {e}")))?;
        let id = logged.id.clone();
        let current = match memtable.records.get(id.as_str()) {
            Some(held) => Some(Arc::clone(&held.verification)),
            None => shared.lookup_index(&id)?,
        };
        let identity = crate::store::EventIdentity {
            id: id.clone(),
            event: event.event_type().to_owned(),
            discriminator: entry.discriminator.clone(),
        };
        let verification = match current
            .as_ref()
            .filter(|c| c.first_delivery(&identity).is_some())
        {
            Some(already) => Arc::clone(already),
            None => Arc::new(
                merge(
                    current.as_deref(),
                    &event,
                    &entry.discriminator,
                    logged.stamp,
                    logged.received_at,
                    &logged.app_key,
                    entry.number.as_ref().map(|(n, facts)| (n.as_str(), facts)),
                    entry.decision.as_ref(),
                )
                .verification,
            ),
        };
        let created = verification.record.seq > checkpoint;
        memtable.apply(Change {
            new_number: verification.record.number.clone(),
            new_reference: verification.record.reference.clone(),
            verification,
            created,
            event: logged,
        });
    }
    Ok(())
}
