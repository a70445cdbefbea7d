//! The PostgreSQL schema, as numbered migrations embedded in the binary. Each replica
//! applies the missing ones at start under an advisory lock, so two replicas starting at
//! once neither race nor apply one twice; `verigate store migrate` runs the same code.

use tokio_postgres::Client;

use crate::store::StoreError;

/// The advisory lock every replica takes to migrate: "verigate" in ASCII, as a number.
const MIGRATION_LOCK: i64 = 0x7665_7269_6761_7465;

/// Migrations in order; the schema version is the number of those applied. Never edit
/// one that has shipped: add another.
const MIGRATIONS: &[&str] = &[
    // 1: events (the raw log, and each event's identity), verifications (one merged
    // record each), named state.
    r#"
    CREATE TABLE verigate_events (
        seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id text NOT NULL,
        event text NOT NULL,
        discriminator text NOT NULL,
        received_at timestamptz NOT NULL,
        app_key text NOT NULL,
        body text NOT NULL,
        answer jsonb,
        UNIQUE (id, event, discriminator)
    );
    CREATE INDEX verigate_events_by_time ON verigate_events (received_at, seq);
    CREATE TABLE verigate_verifications (
        id text PRIMARY KEY,
        seq bigint NOT NULL,
        first_seen timestamptz NOT NULL,
        number text,
        reference text,
        record jsonb
    );
    CREATE INDEX verigate_verifications_by_time ON verigate_verifications (first_seen, seq);
    CREATE INDEX verigate_verifications_by_number
        ON verigate_verifications (number, first_seen, seq) WHERE number IS NOT NULL;
    CREATE INDEX verigate_verifications_by_reference
        ON verigate_verifications (lower(reference), first_seen, seq) WHERE reference IS NOT NULL;
    CREATE TABLE verigate_state (
        name text PRIMARY KEY,
        value bytea NOT NULL
    );
    CREATE TABLE verigate_claims (
        id text NOT NULL,
        event text NOT NULL,
        discriminator text NOT NULL,
        claimed_at timestamptz NOT NULL,
        PRIMARY KEY (id, event, discriminator)
    );
    "#,
    // 2: policy state shared by the replicas: counters, the outcome book, quarantines,
    // and each replica's policy version.
    r#"
    CREATE TABLE verigate_counts (
        rule text NOT NULL,
        condition text NOT NULL,
        value text NOT NULL,
        bucket bigint NOT NULL,
        amount double precision NOT NULL,
        expires_ms bigint NOT NULL,
        PRIMARY KEY (rule, condition, value, bucket)
    );
    CREATE INDEX verigate_counts_expiry ON verigate_counts (expires_ms);
    CREATE TABLE verigate_seen (
        rule text NOT NULL,
        condition text NOT NULL,
        value text NOT NULL,
        member text NOT NULL,
        seen_ms bigint NOT NULL,
        expires_ms bigint NOT NULL,
        PRIMARY KEY (rule, condition, value, member)
    );
    CREATE INDEX verigate_seen_expiry ON verigate_seen (expires_ms);
    CREATE TABLE verigate_pending (
        id text PRIMARY KEY,
        due_ms bigint NOT NULL,
        tracked jsonb NOT NULL
    );
    CREATE INDEX verigate_pending_due ON verigate_pending (due_ms);
    CREATE TABLE verigate_evidence (
        rule text NOT NULL,
        key text NOT NULL,
        at_ms bigint NOT NULL,
        evidence jsonb NOT NULL
    );
    CREATE INDEX verigate_evidence_by_key ON verigate_evidence (rule, key, at_ms);
    CREATE TABLE verigate_blocks (
        rule text NOT NULL,
        key text NOT NULL,
        block jsonb NOT NULL,
        until_ms bigint,
        PRIMARY KEY (rule, key)
    );
    CREATE TABLE verigate_block_history (
        rule text NOT NULL,
        key text NOT NULL,
        strikes integer NOT NULL,
        ended_ms bigint NOT NULL,
        PRIMARY KEY (rule, key)
    );
    CREATE TABLE verigate_replicas (
        replica text PRIMARY KEY,
        policy_version text NOT NULL,
        seen_at timestamptz NOT NULL
    );
    "#,
    // 3: production speed.
    // - A verification's stats fields as columns, so that stats aggregate in SQL instead
    //   of decoding every record; filled in from the records already stored.
    // - The record as JSON text: written and read whole, never queried inside, so the
    //   server need not parse it into jsonb on every write nor print it on every read.
    // - Claims live only while an event is decided: unlogged, they cost no WAL.
    // - Room on each page for updates in place (HOT), which skip the indexes, and keys
    //   that compare as bytes.
    // - An index on creation order, which listings and exports page in.
    // Then (4) one function for the counters of a batch of decisions (counter_ops.sql).
    r#"
    ALTER TABLE verigate_verifications
        ADD COLUMN country text,
        ADD COLUMN method text,
        ADD COLUMN requested boolean NOT NULL DEFAULT false,
        ADD COLUMN action text,
        ADD COLUMN decision_rule text,
        ADD COLUMN on_error boolean NOT NULL DEFAULT false,
        ADD COLUMN status text,
        ADD COLUMN price_currency text,
        ADD COLUMN price_amount double precision;
    UPDATE verigate_verifications SET
        country = record->>'country',
        method = record->>'method',
        requested = jsonb_typeof(record->'request') = 'object',
        action = record->'decision'->>'action',
        decision_rule = record->'decision'->>'rule',
        on_error = coalesce((record->'decision'->>'on_error')::boolean, false),
        status = record->'result'->>'status',
        price_currency = record->'request'->'price'->>'currencyId',
        price_amount = (record->'request'->'price'->>'amount')::double precision
    WHERE record IS NOT NULL;
    ALTER TABLE verigate_verifications ALTER COLUMN record TYPE text USING record::text;
    -- A record (1-3 KB) stays in its row, uncompressed: compressing it on every write
    -- would cost more CPU than the disk it saves.
    ALTER TABLE verigate_verifications SET (fillfactor = 80, toast_tuple_target = 8160);
    -- Distinct members are counted by the bucket of their latest sighting (see the
    -- counter function): those already seen, counted so.
    INSERT INTO verigate_counts (rule, condition, value, bucket, amount, expires_ms)
    SELECT rule, condition || ':latest', value, bucket, count(*), bucket + max(span)
    FROM (
        SELECT rule, condition, value, expires_ms - seen_ms AS span,
               (seen_ms / greatest((expires_ms - seen_ms) / 10, 1)) * greatest((expires_ms - seen_ms) / 10, 1) AS bucket
        FROM verigate_seen
    ) seen
    GROUP BY rule, condition, value, bucket;
    -- Keys compare byte by byte: they are identifiers, not words, and a locale's
    -- collation costs a library call per comparison on every index lookup.
    ALTER TABLE verigate_counts ALTER COLUMN rule TYPE text COLLATE "C",
        ALTER COLUMN condition TYPE text COLLATE "C", ALTER COLUMN value TYPE text COLLATE "C";
    ALTER TABLE verigate_seen ALTER COLUMN rule TYPE text COLLATE "C",
        ALTER COLUMN condition TYPE text COLLATE "C", ALTER COLUMN value TYPE text COLLATE "C",
        ALTER COLUMN member TYPE text COLLATE "C";
    ALTER TABLE verigate_events ALTER COLUMN id TYPE text COLLATE "C",
        ALTER COLUMN event TYPE text COLLATE "C", ALTER COLUMN discriminator TYPE text COLLATE "C";
    ALTER TABLE verigate_claims ALTER COLUMN id TYPE text COLLATE "C",
        ALTER COLUMN event TYPE text COLLATE "C", ALTER COLUMN discriminator TYPE text COLLATE "C";
    ALTER TABLE verigate_verifications ALTER COLUMN id TYPE text COLLATE "C",
        ALTER COLUMN number TYPE text COLLATE "C";
    ALTER TABLE verigate_pending ALTER COLUMN id TYPE text COLLATE "C";
    ALTER TABLE verigate_evidence ALTER COLUMN rule TYPE text COLLATE "C",
        ALTER COLUMN key TYPE text COLLATE "C";
    ALTER TABLE verigate_counts SET (fillfactor = 75);
    ALTER TABLE verigate_seen SET (fillfactor = 75);
    ALTER TABLE verigate_claims SET UNLOGGED;
    -- A reference is the customer's own and may be long: the index keeps its first 512
    -- characters (an entry must fit in a third of a page), lookups compare it whole.
    DROP INDEX verigate_verifications_by_reference;
    CREATE INDEX verigate_verifications_by_reference
        ON verigate_verifications (left(lower(reference), 512), first_seen, seq)
        WHERE reference IS NOT NULL;
    -- Listings and exports page through verifications in creation order; with the time
    -- in the key, rows outside the range asked for are passed over in the index alone.
    CREATE INDEX verigate_verifications_by_seq ON verigate_verifications (seq, first_seen);
    "#,
    include_str!("counter_ops.sql"),
    include_str!("share_sightings.sql"),
    // 6: approximate counts exchanged through a log (policy/shared/sharing.rs): each
    // replica process (a sharer) appends numbered shares, and records in its mark the
    // last share its flushes into verigate_counts and verigate_seen include. The log is
    // unlogged: a crash of the database loses it as it may lose the counters' last
    // moments, and a replica that then finds rows missing loads everything again.
    // Migration 5's function stays for replicas of the release before, during a roll.
    r#"
    CREATE UNLOGGED TABLE verigate_share_log (
        sharer text COLLATE "C" NOT NULL,
        share bigint NOT NULL,
        written_at timestamptz NOT NULL DEFAULT now(),
        body bytea NOT NULL,
        PRIMARY KEY (sharer, share)
    );
    CREATE TABLE verigate_share_marks (
        sharer text COLLATE "C" PRIMARY KEY,
        flushed bigint NOT NULL,
        flushed_at timestamptz NOT NULL
    );
    "#,
];

/// The schema version this build needs.
pub fn current_version() -> i32 {
    i32::try_from(MIGRATIONS.len()).unwrap_or(i32::MAX)
}

/// The version the database is at (0: empty).
pub async fn version(client: &Client) -> Result<i32, StoreError> {
    let exists = client
        .query_one("SELECT to_regclass('verigate_schema') IS NOT NULL", &[])
        .await
        .map_err(super::failed)?;
    if !exists.get::<_, bool>(0) {
        return Ok(0);
    }
    let row = client
        .query_one("SELECT coalesce(max(version), 0) FROM verigate_schema", &[])
        .await
        .map_err(super::failed)?;
    Ok(row.get(0))
}

/// Applies every missing migration, each in its own transaction; returns those applied.
/// A database newer than this build is refused rather than written to.
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>, StoreError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(super::failed)?;
    let applied = apply_missing(client).await;
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(super::failed);
    let applied = applied?;
    unlocked?;
    Ok(applied)
}

async fn apply_missing(client: &mut Client) -> Result<Vec<i32>, StoreError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS verigate_schema (
                 version integer PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await
        .map_err(super::failed)?;
    let at = version(client).await?;
    if at > current_version() {
        return Err(StoreError::NeedsMigration(format!(
            "the database schema is at version {at}, newer than this verigate ({}): run a newer verigate",
            current_version()
        )));
    }
    let mut applied = Vec::new();
    for (index, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(at).unwrap_or(0))
    {
        let number = i32::try_from(index + 1).unwrap_or(i32::MAX);
        let tx = client.transaction().await.map_err(super::failed)?;
        tx.batch_execute(sql).await.map_err(super::failed)?;
        tx.execute(
            "INSERT INTO verigate_schema (version) VALUES ($1)",
            &[&number],
        )
        .await
        .map_err(super::failed)?;
        tx.commit().await.map_err(super::failed)?;
        applied.push(number);
    }
    Ok(applied)
}
