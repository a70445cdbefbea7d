//! How replicas exchange their approximate counts through PostgreSQL (approximate.rs
//! says what is exchanged and why): a log of numbered shares, the per-key tables each
//! replica flushes its counts into with the number of its last share they include, and
//! the load that reads both in one snapshot.
//!
//! Each replica process is one *sharer*, named for the replica and a random suffix, so
//! that a restarted replica's shares never pass for its earlier ones. A sharer writes its
//! shares one after another (1, 2, 3, …), so a follower that has taken in share `n` of a
//! sharer expects `n + 1` next; one that finds a gap (rows it missed were trimmed during
//! an outage) loads everything again.

use std::{
    collections::{HashMap, HashSet},
    time::Instant,
};

use tokio_postgres::Row;

use super::{
    approximate::{Loaded, Share, Tally, FLUSH_EVERY},
    failed, SharedState,
};
use crate::{
    policy::{counters::CounterKey, PolicyError},
    store::postgres::Cached,
};

/// Where this replica stands in the exchange.
#[derive(Debug)]
pub(super) struct Exchange {
    sharer: String,
    /// Whether this sharer is known to the others (its row in `verigate_share_marks`).
    registered: bool,
    /// The last share this replica wrote.
    written: u64,
    flushed_at: Instant,
    /// For each other sharer, the last of its shares taken in.
    taken: HashMap<String, u64>,
    /// A gap in the log was found: everything is loaded again.
    lost: bool,
}

impl Exchange {
    pub(super) fn new(replica: &str) -> Self {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        Self {
            sharer: format!("{replica}/{}", &suffix[..12]),
            registered: false,
            written: 0,
            flushed_at: Instant::now(),
            taken: HashMap::new(),
            lost: false,
        }
    }
}

const REGISTER: &str = "INSERT INTO verigate_share_marks (sharer, flushed, flushed_at)
    VALUES ($1, 0, now()) ON CONFLICT (sharer) DO NOTHING";

const APPEND: &str = "INSERT INTO verigate_share_log (sharer, share, body) VALUES ($1, $2, $3)";

/// The shares of every other sharer past those taken in, in order. One index range per
/// sharer: every sharer has a row in the marks from its start.
const FOLLOW: &str = "SELECT m.sharer, l.share, l.body
    FROM verigate_share_marks m
    LEFT JOIN unnest($2::text[], $3::bigint[]) AS k(sharer, last) ON k.sharer = m.sharer
    CROSS JOIN LATERAL (
        SELECT l.share, l.body FROM verigate_share_log l
        WHERE l.sharer = m.sharer AND l.share > coalesce(k.last, 0)
        OFFSET 0
    ) l
    WHERE m.sharer <> $1
    ORDER BY m.sharer, l.share";

const FLUSH_COUNTS: &str = "INSERT INTO verigate_counts AS c (rule, condition, value, bucket, amount, expires_ms)
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::float8[], $6::bigint[])
    ORDER BY 1, 2, 3, 4
    ON CONFLICT ON CONSTRAINT verigate_counts_pkey
    DO UPDATE SET amount = c.amount + excluded.amount,
                  expires_ms = greatest(c.expires_ms, excluded.expires_ms)";

/// Each member's latest sighting, which is what a starting replica loads. (The exact
/// path's per-bucket counts of members, `condition:latest`, are not kept for rules
/// counted approximately: a rule switched to exact counting counts its distinct members
/// afresh.)
const FLUSH_SIGHTINGS: &str =
    "INSERT INTO verigate_seen AS s (rule, condition, value, member, seen_ms, expires_ms)
    SELECT rule, cond, val, member, seen, seen + span
    FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[])
        AS o(seen, rule, cond, val, span, member)
    ORDER BY 1, 2, 3, 4
    ON CONFLICT ON CONSTRAINT verigate_seen_pkey
    DO UPDATE SET seen_ms = greatest(s.seen_ms, excluded.seen_ms),
                  expires_ms = greatest(s.expires_ms, excluded.expires_ms)";

const MARK: &str = "INSERT INTO verigate_share_marks (sharer, flushed, flushed_at)
    VALUES ($1, $2, now())
    ON CONFLICT (sharer) DO UPDATE SET flushed = excluded.flushed, flushed_at = excluded.flushed_at";

/// One round: load what is not loaded, write this replica's share, take in the others',
/// and flush when it is time. Nothing while no rule is counted approximately.
pub(super) fn round(
    state: &SharedState,
    exchange: &mut Exchange,
    now_ms: i64,
) -> Result<(), PolicyError> {
    let counters = &state.approximate;
    if counters.rules().is_empty() {
        // A rule counted approximately later is loaded whole: nothing to keep up with.
        return Ok(());
    }
    if !exchange.registered {
        let (fast, sharer) = (state.share_handle(), exchange.sharer.clone());
        state.run(async move {
            let connection = fast.get().await.map_err(failed)?;
            connection
                .execute(REGISTER, &[&sharer])
                .await
                .map(drop)
                .map_err(failed)
        })?;
        exchange.registered = true;
    }
    let to_load: HashSet<String> = if exchange.lost {
        counters.rules().iter().cloned().collect()
    } else {
        counters.to_load().into_iter().collect()
    };
    if !to_load.is_empty() {
        load(state, exchange, &to_load, now_ms)?;
    }
    share(state, exchange)?;
    follow(state, exchange)?;
    if exchange.flushed_at.elapsed() >= FLUSH_EVERY {
        flush(state, exchange)?;
    }
    Ok(())
}

fn share(state: &SharedState, exchange: &mut Exchange) -> Result<(), PolicyError> {
    let counters = &state.approximate;
    let tally = counters.take_unsent();
    if tally.is_empty() {
        return Ok(());
    }
    let number = exchange.written + 1;
    let body = match serde_json::to_vec(&tally.share()) {
        Ok(body) => body,
        Err(err) => {
            counters.shared(tally, false);
            return Err(failed(err));
        }
    };
    let (fast, sharer) = (state.share_handle(), exchange.sharer.clone());
    let written = state.run(async move {
        let connection = fast.get().await.map_err(failed)?;
        let number = i64::try_from(number).map_err(failed)?;
        connection
            .execute(APPEND, &[&sharer, &number, &body])
            .await
            .map(drop)
            .map_err(failed)
    });
    counters.shared(tally, written.is_ok());
    if written.is_ok() {
        exchange.written = number;
    }
    written
}

/// Takes in the other sharers' new shares.
fn follow(state: &SharedState, exchange: &mut Exchange) -> Result<(), PolicyError> {
    let (sharers, lasts): (Vec<String>, Vec<i64>) = exchange
        .taken
        .iter()
        .map(|(sharer, last)| (sharer.clone(), i64::try_from(*last).unwrap_or(i64::MAX)))
        .unzip();
    let (fast, me) = (state.share_handle(), exchange.sharer.clone());
    let rows = state.run(async move {
        let connection = fast.get().await.map_err(failed)?;
        connection
            .query(FOLLOW, &[&me, &sharers, &lasts])
            .await
            .map_err(failed)
    })?;
    let mut shares = Vec::with_capacity(rows.len());
    for row in rows {
        let (sharer, number, share) = log_row(&row)?;
        let expected = exchange.taken.get(&sharer).map_or(1, |last| last + 1);
        if number != expected {
            // Rows this replica never took in are gone: load everything again.
            exchange.lost = true;
            tracing::warn!(
                sharer = %sharer, expected, found = number,
                "approximate counts: shares were missed; loading them again"
            );
            break;
        }
        exchange.taken.insert(sharer, number);
        shares.extend(share);
    }
    state.approximate.take_in(shares);
    Ok(())
}

/// A log row: sharer, share number, and the share (`None`: unreadable, skipped).
fn log_row(row: &Row) -> Result<(String, u64, Option<Share>), PolicyError> {
    let sharer: String = row.try_get(0).map_err(failed)?;
    let number: i64 = row.try_get(1).map_err(failed)?;
    let body: Vec<u8> = row.try_get(2).map_err(failed)?;
    let share = match serde_json::from_slice(&body) {
        Ok(share) => Some(share),
        Err(err) => {
            tracing::warn!(sharer = %sharer, share = number, error.message = %err,
                "approximate counts: a share could not be read; skipped");
            None
        }
    };
    Ok((sharer, u64::try_from(number).unwrap_or(0), share))
}

/// Adds what this replica shared since its last flush to the per-key tables, with the
/// number of its last share, in one transaction. Also with nothing to add: the mark's
/// time says the sharer is alive (marks of sharers gone a day are swept).
fn flush(state: &SharedState, exchange: &mut Exchange) -> Result<(), PolicyError> {
    let counters = &state.approximate;
    exchange.flushed_at = Instant::now();
    let tally = counters.take_unflushed();
    let (rows, sightings) = flush_rows(&tally);
    let (pool, sharer) = (state.safe.clone(), exchange.sharer.clone());
    let mark = i64::try_from(exchange.written).map_err(failed)?;
    let done = state.run(async move {
        let mut client = pool.get().await.map_err(failed)?;
        let tx = client.transaction().await.map_err(failed)?;
        // Counts, as the counters always were, may lose their last moment in a crash.
        tx.cached_execute("SET LOCAL synchronous_commit = off", &[])
            .await
            .map_err(failed)?;
        if !rows.bucket.is_empty() {
            tx.cached_execute(
                FLUSH_COUNTS,
                &[
                    &rows.rule,
                    &rows.condition,
                    &rows.value,
                    &rows.bucket,
                    &rows.amount,
                    &rows.expires,
                ],
            )
            .await
            .map_err(failed)?;
        }
        if !sightings.member.is_empty() {
            tx.cached_execute(
                FLUSH_SIGHTINGS,
                &[
                    &sightings.seen,
                    &sightings.rule,
                    &sightings.condition,
                    &sightings.value,
                    &sightings.span,
                    &sightings.member,
                ],
            )
            .await
            .map_err(failed)?;
        }
        tx.cached_execute(MARK, &[&sharer, &mark])
            .await
            .map_err(failed)?;
        tx.commit().await.map_err(failed)
    });
    if done.is_err() {
        counters.flush_failed(tally);
    }
    done
}

#[derive(Default)]
struct CountRows {
    rule: Vec<String>,
    condition: Vec<String>,
    value: Vec<String>,
    bucket: Vec<i64>,
    amount: Vec<f64>,
    expires: Vec<i64>,
}

#[derive(Default)]
struct SightingRows {
    seen: Vec<i64>,
    rule: Vec<String>,
    condition: Vec<String>,
    value: Vec<String>,
    span: Vec<i64>,
    member: Vec<String>,
}

fn flush_rows(tally: &Tally) -> (CountRows, SightingRows) {
    let (mut counts, mut sightings) = (CountRows::default(), SightingRows::default());
    for shared in tally.share().keys {
        for (bucket, amount) in &shared.adds {
            counts.rule.push(shared.rule.clone());
            counts.condition.push(shared.condition.clone());
            counts.value.push(shared.value.clone());
            counts.bucket.push(*bucket);
            counts.amount.push(*amount);
            counts.expires.push(bucket + shared.span_ms);
        }
        for (member, seen_ms) in &shared.sightings {
            sightings.seen.push(*seen_ms);
            sightings.rule.push(shared.rule.clone());
            sightings.condition.push(shared.condition.clone());
            sightings.value.push(shared.value.clone());
            sightings.span.push(shared.span_ms);
            sightings.member.push(member.clone());
        }
    }
    (counts, sightings)
}

/// Loads the keys of `rules` in one snapshot: the per-key tables, and the log rows past
/// each sharer's flushed share. Log rows this replica had not taken in yet are taken
/// in for the other rules too.
fn load(
    state: &SharedState,
    exchange: &mut Exchange,
    rules: &HashSet<String>,
    now_ms: i64,
) -> Result<(), PolicyError> {
    let counters = &state.approximate;
    let pool = state.safe.clone();
    let names: Vec<String> = rules.iter().cloned().collect();
    let (marks, counts, seen, log) = state.run(async move {
        let mut client = pool.get().await.map_err(failed)?;
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(failed)?;
        let marks = tx
            .cached_query("SELECT sharer, flushed FROM verigate_share_marks", &[])
            .await
            .map_err(failed)?;
        let counts = tx
            .cached_query(
                "SELECT rule, condition, value, bucket, amount, expires_ms - bucket
                 FROM verigate_counts
                 WHERE rule = ANY($1) AND expires_ms > $2 AND bucket >= 0
                   AND right(condition, 7) <> ':latest'",
                &[&names, &now_ms],
            )
            .await
            .map_err(failed)?;
        let seen = tx
            .cached_query(
                "SELECT rule, condition, value, member, seen_ms, expires_ms - seen_ms
                 FROM verigate_seen WHERE rule = ANY($1) AND expires_ms > $2",
                &[&names, &now_ms],
            )
            .await
            .map_err(failed)?;
        let log = tx
            .cached_query(
                "SELECT sharer, share, body FROM verigate_share_log ORDER BY sharer, share",
                &[],
            )
            .await
            .map_err(failed)?;
        tx.commit().await.map_err(failed)?;
        Ok((marks, counts, seen, log))
    })?;
    let key = |row: &Row| -> Result<CounterKey, PolicyError> {
        Ok(CounterKey {
            rule: row.try_get(0).map_err(failed)?,
            condition: row.try_get(1).map_err(failed)?,
            value: row.try_get(2).map_err(failed)?,
        })
    };
    let mut loaded = Loaded::default();
    for row in &counts {
        loaded.counts.push((
            key(row)?,
            row.try_get(3).map_err(failed)?,
            row.try_get(4).map_err(failed)?,
            row.try_get(5).map_err(failed)?,
        ));
    }
    for row in &seen {
        loaded.seen.push((
            key(row)?,
            row.try_get(3).map_err(failed)?,
            row.try_get(4).map_err(failed)?,
            row.try_get(5).map_err(failed)?,
        ));
    }
    let mut flushed: HashMap<String, u64> = HashMap::new();
    for row in &marks {
        let sharer: String = row.try_get(0).map_err(failed)?;
        let mark: i64 = row.try_get(1).map_err(failed)?;
        flushed.insert(sharer, u64::try_from(mark).unwrap_or(0));
    }
    // The rules not loaded now take in only what they have not taken in yet.
    let mut rest = Vec::new();
    let mut taken = exchange.taken.clone();
    if exchange.lost {
        taken.clear();
    }
    for row in &log {
        let (sharer, number, share) = log_row(row)?;
        let Some(share) = share else { continue };
        let new_for_others =
            sharer != exchange.sharer && taken.get(&sharer).is_none_or(|last| number > *last);
        if new_for_others {
            taken.insert(sharer.clone(), number);
            rest.push(share.clone());
        }
        if number > flushed.get(&sharer).copied().unwrap_or(0) {
            loaded.shares.push(share);
        }
    }
    for (sharer, mark) in &flushed {
        if *sharer != exchange.sharer {
            let last = taken.entry(sharer.clone()).or_insert(0);
            *last = (*last).max(*mark);
        }
    }
    let (counted, members, shares) = (loaded.counts.len(), loaded.seen.len(), loaded.shares.len());
    counters.load(rules, loaded);
    let others: HashSet<String> = counters
        .rules()
        .iter()
        .filter(|r| !rules.contains(*r))
        .cloned()
        .collect();
    counters.take_in_for(rest, &others);
    exchange.taken = taken;
    exchange.lost = false;
    tracing::info!(
        rules = rules.len(),
        counts = counted,
        members,
        shares,
        "approximate counts loaded"
    );
    Ok(())
}
