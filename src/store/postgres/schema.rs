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
