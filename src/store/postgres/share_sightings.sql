-- 5: the distinct members that replicas counting a rule approximately have seen, shared
-- by each replica in one call every fraction of a second (policy/shared/approximate.rs).
--
-- The same bookkeeping as a sighting in verigate_counter_ops (each member counted in the
-- bucket of its latest sighting, under the key's condition + ':latest'), set-based over
-- any number of sightings of one key: a replica shares dozens of a busy key at once.
-- A sighting older than the member's latest (another replica's) changes nothing.
CREATE FUNCTION verigate_share_sightings(
    p_now bigint[],
    p_rule text[],
    p_condition text[],
    p_value text[],
    p_span bigint[],
    p_member text[]
) RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
    -- The same lock per key, in the same order, as the counter function's sightings.
    PERFORM pg_advisory_xact_lock(k) FROM (
        SELECT DISTINCT hashtextextended(o.rule || chr(31) || o.cond || chr(31) || o.val, 0) AS k
        FROM unnest(p_rule, p_condition, p_value) AS o(rule, cond, val) ORDER BY 1
    ) keys;
    WITH o AS MATERIALIZED (
        SELECT DISTINCT ON (o.rule, o.cond, o.val, o.member)
               o.rule, o.cond, o.val, o.member, o.span, o.now,
               (o.now / greatest(o.span / 10, 1)) * greatest(o.span / 10, 1) AS bucket
        FROM unnest(p_rule, p_condition, p_value, p_span, p_member, p_now)
             AS o(rule, cond, val, span, member, now)
        ORDER BY o.rule, o.cond, o.val, o.member, o.now DESC
    ), seen AS MATERIALIZED (
        -- One index lookup per sighting (the fence keeps a plan made on an empty table
        -- from scanning the whole index).
        SELECT o.*, s.seen_ms AS last,
               (s.seen_ms / greatest(o.span / 10, 1)) * greatest(o.span / 10, 1) AS last_bucket
        FROM o LEFT JOIN LATERAL (
            SELECT seen_ms FROM verigate_seen s
            WHERE s.rule = o.rule AND s.condition = o.cond AND s.value = o.val AND s.member = o.member
            OFFSET 0
        ) s ON true
        WHERE s.seen_ms IS NULL OR s.seen_ms < o.now
    ), member AS (
        INSERT INTO verigate_seen AS s (rule, condition, value, member, seen_ms, expires_ms)
        SELECT rule, cond, val, member, now, now + span FROM seen
        ON CONFLICT ON CONSTRAINT verigate_seen_pkey
        DO UPDATE SET seen_ms = excluded.seen_ms, expires_ms = excluded.expires_ms
    ), moves AS (
        SELECT rule, cond, val, bucket, 1.0::double precision AS delta, span FROM seen
        WHERE last IS NULL OR last_bucket <= now - span OR last_bucket <> bucket
        UNION ALL
        SELECT rule, cond, val, last_bucket, -1.0, span FROM seen
        WHERE last IS NOT NULL AND last_bucket > now - span AND last_bucket <> bucket
    )
    INSERT INTO verigate_counts AS c (rule, condition, value, bucket, amount, expires_ms)
    SELECT rule, cond || ':latest', val, bucket, sum(delta), bucket + max(span) FROM moves
    GROUP BY rule, cond, val, bucket
    ORDER BY 1, 2, 3, 4
    ON CONFLICT ON CONSTRAINT verigate_counts_pkey
    DO UPDATE SET amount = c.amount + excluded.amount;
END
$fn$;
