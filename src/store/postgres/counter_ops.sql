-- 4: every counter operation of a batch of decisions and outcomes in one call, so that
-- a decision costs a share of one round trip instead of one round trip per counter.
--
-- The ops come as parallel arrays, in the order they were asked for, each with its own
-- time, split into stages: a stage never writes a key that an earlier op of the stage
-- touched, nor reads one it wrote (except caps, which run one by one in order), so each
-- kind of op in a stage runs as one set-based statement, and a later stage sees what an
-- earlier one wrote (each statement of a PL/pgSQL function takes a fresh snapshot).
-- Kinds:
--   0 add to a count; returns the window's total     1 a window's total
--   2 add to a level (never below zero); returns it  3 a level
--     (steps folded into one come as their sum, with in p_cap the least the level ends
--     at whatever it was: the largest sum of their last steps, at least zero)
--   4 see a member; returns the distinct members in the window, and when the member was
--     seen before (what undoing it restores)          7 undo a see
--   5 add within a cap; returns the total with the amount, and whether it was added
--   6 add to a capped key whatever the cap (a refund)
--   8, 9 an add (0) or a level's step (2) that only teaches: its result is not read and
--     no other kind touches its key (outcomes)
-- Caps run after the stages, one by one in order; what is taught runs last.
--
-- Locks are taken in one order by everybody, so no two calls ever wait on each other
-- in a circle: first an advisory lock per key the stages write (so nobody else writes
-- it meanwhile), then per cap's key (so its check and add are one step), each set in
-- one sorted order; then the rows of what is taught, sorted, held only until the end.
--
-- A window is ten buckets. Distinct members are counted per key by the bucket of each
-- member's latest sighting (under the key's condition + ':latest'), so a sighting costs
-- the same however many members the key has.
CREATE FUNCTION verigate_counter_ops(
    p_now bigint[],
    p_stage smallint[],
    p_kind smallint[],
    p_rule text[],
    p_condition text[],
    p_value text[],
    p_span bigint[],
    p_amount double precision[],
    p_member text[],
    p_cap double precision[],
    p_before bigint[]
) RETURNS TABLE (op integer, result double precision, added boolean, before_ms bigint)
LANGUAGE plpgsql AS $fn$
DECLARE
    st smallint;
    stages smallint;
    w record;
    total double precision;
BEGIN
    PERFORM pg_advisory_xact_lock(k) FROM (
        SELECT DISTINCT hashtextextended(o.rule || chr(31) || o.cond || chr(31) || o.val, 0) AS k
        FROM unnest(p_kind, p_rule, p_condition, p_value) AS o(kind, rule, cond, val)
        WHERE o.kind IN (0, 2, 4, 7) ORDER BY 1
    ) keys;
    stages := coalesce((SELECT max(s) FROM unnest(p_stage) s), 0);
    FOR st IN 1 .. stages LOOP
        IF 0 = ANY (p_kind) THEN
            -- A count's current bucket, and the rest of its window as it was.
            RETURN QUERY
            WITH o AS MATERIALIZED (
                SELECT o.i, o.rule, o.cond, o.val, o.span, o.amount, o.now,
                       (o.now / greatest(o.span / 10, 1)) * greatest(o.span / 10, 1) AS bucket
                FROM unnest(p_stage, p_kind, p_rule, p_condition, p_value, p_span, p_amount, p_now)
                     WITH ORDINALITY AS o(stage, kind, rule, cond, val, span, amount, now, i)
                WHERE o.stage = st AND o.kind = 0
            ), ins AS (
                INSERT INTO verigate_counts AS c (rule, condition, value, bucket, amount, expires_ms)
                SELECT o.rule, o.cond, o.val, o.bucket, o.amount, o.bucket + o.span FROM o
                ON CONFLICT ON CONSTRAINT verigate_counts_pkey
                DO UPDATE SET amount = c.amount + excluded.amount
                RETURNING c.rule, c.condition, c.value, c.amount
            )
            SELECT o.i::integer, ins.amount + coalesce((
                       SELECT sum(c.amount) FROM verigate_counts c
                       WHERE c.rule = o.rule AND c.condition = o.cond AND c.value = o.val
                         AND c.bucket > o.now - o.span AND c.bucket < o.bucket), 0),
                   NULL::boolean, NULL::bigint
            FROM o JOIN ins ON ins.rule = o.rule AND ins.condition = o.cond AND ins.value = o.val;
        END IF;
        IF 2 = ANY (p_kind) THEN
            -- A level idle for its span restarts from zero.
            RETURN QUERY
            WITH o AS MATERIALIZED (
                SELECT o.i, o.rule, o.cond, o.val, o.span, o.amount, o.cap AS floor, o.now
                FROM unnest(p_stage, p_kind, p_rule, p_condition, p_value, p_span, p_amount, p_cap, p_now)
                     WITH ORDINALITY AS o(stage, kind, rule, cond, val, span, amount, cap, now, i)
                WHERE o.stage = st AND o.kind = 2
            ), bumped AS (
                UPDATE verigate_counts c SET
                    amount = greatest(o.floor, CASE WHEN c.expires_ms < o.now THEN 0 ELSE greatest(0, c.amount) END
                                               + o.amount),
                    expires_ms = o.now + o.span
                FROM o
                WHERE c.rule = o.rule AND c.condition = o.cond AND c.value = o.val AND c.bucket = -1
                RETURNING o.i, c.amount
            ), started AS (
                INSERT INTO verigate_counts (rule, condition, value, bucket, amount, expires_ms)
                SELECT o.rule, o.cond, o.val, -1, greatest(o.floor, o.amount), o.now + o.span FROM o
                WHERE NOT EXISTS (SELECT 1 FROM verigate_counts c WHERE c.rule = o.rule
                                  AND c.condition = o.cond AND c.value = o.val AND c.bucket = -1)
                RETURNING rule, condition, value, amount
            )
            SELECT bumped.i::integer, greatest(0, bumped.amount), NULL::boolean, NULL::bigint FROM bumped
            UNION ALL
            SELECT o.i::integer, greatest(0, started.amount), NULL::boolean, NULL::bigint
            FROM o JOIN started ON started.rule = o.rule AND started.condition = o.cond AND started.value = o.val;
        END IF;
        IF 4 = ANY (p_kind) THEN
            RETURN QUERY
            WITH seen AS MATERIALIZED (
                -- When each member was last seen (nobody else writes the key meanwhile).
                SELECT o.i, o.rule, o.cond, o.val, o.span, o.member, o.now, s.seen_ms AS last,
                       (o.now / greatest(o.span / 10, 1)) * greatest(o.span / 10, 1) AS bucket,
                       (s.seen_ms / greatest(o.span / 10, 1)) * greatest(o.span / 10, 1) AS last_bucket
                FROM unnest(p_stage, p_kind, p_rule, p_condition, p_value, p_span, p_member, p_now)
                     WITH ORDINALITY AS o(stage, kind, rule, cond, val, span, member, now, i)
                LEFT JOIN verigate_seen s
                  ON s.rule = o.rule AND s.condition = o.cond AND s.value = o.val AND s.member = o.member
                WHERE o.stage = st AND o.kind = 4
            ), member AS (
                INSERT INTO verigate_seen AS s (rule, condition, value, member, seen_ms, expires_ms)
                SELECT rule, cond, val, member, now, now + span FROM seen
                ON CONFLICT ON CONSTRAINT verigate_seen_pkey
                DO UPDATE SET seen_ms = excluded.seen_ms, expires_ms = excluded.expires_ms
            ), moves AS (
                -- A member new to the window counts in the current bucket; one seen in an
                -- earlier bucket of the window moves to the current one.
                SELECT rule, cond, val, bucket, 1.0::double precision AS delta, span FROM seen
                WHERE last IS NULL OR last_bucket <= now - span OR last_bucket <> bucket
                UNION ALL
                SELECT rule, cond, val, last_bucket, -1.0, span FROM seen
                WHERE last IS NOT NULL AND last_bucket > now - span AND last_bucket <> bucket
            ), counted AS (
                INSERT INTO verigate_counts AS c (rule, condition, value, bucket, amount, expires_ms)
                SELECT rule, cond || ':latest', val, bucket, delta, bucket + span FROM moves
                ON CONFLICT ON CONSTRAINT verigate_counts_pkey
                DO UPDATE SET amount = c.amount + excluded.amount
            )
            -- The members counted before this sighting, plus it if it is new to the window.
            SELECT seen.i::integer,
                   coalesce((SELECT sum(c.amount) FROM verigate_counts c
                             WHERE c.rule = seen.rule AND c.condition = seen.cond || ':latest'
                               AND c.value = seen.val AND c.bucket > seen.now - seen.span), 0)
                   + CASE WHEN last IS NULL OR last_bucket <= now - span THEN 1 ELSE 0 END,
                   NULL::boolean, seen.last
            FROM seen;
        END IF;
        IF 7 = ANY (p_kind) THEN
            -- Only a sighting still as that call left it: a later one is not undone.
            WITH undone AS MATERIALIZED (
                SELECT o.rule, o.cond, o.val, o.span, o.member, o.now, o.before,
                       (o.now / greatest(o.span / 10, 1)) * greatest(o.span / 10, 1) AS bucket,
                       (o.before / greatest(o.span / 10, 1)) * greatest(o.span / 10, 1) AS before_bucket
                FROM unnest(p_stage, p_kind, p_rule, p_condition, p_value, p_span, p_member, p_now, p_before)
                     WITH ORDINALITY AS o(stage, kind, rule, cond, val, span, member, now, before, i)
                JOIN verigate_seen s
                  ON s.rule = o.rule AND s.condition = o.cond AND s.value = o.val
                 AND s.member = o.member AND s.seen_ms = o.now
                WHERE o.stage = st AND o.kind = 7
            ), gone AS (
                DELETE FROM verigate_seen s USING undone u
                WHERE u.before IS NULL AND s.rule = u.rule AND s.condition = u.cond
                  AND s.value = u.val AND s.member = u.member
            ), back AS (
                UPDATE verigate_seen s SET seen_ms = u.before, expires_ms = u.before + u.span FROM undone u
                WHERE u.before IS NOT NULL AND s.rule = u.rule AND s.condition = u.cond
                  AND s.value = u.val AND s.member = u.member
            ), moves AS (
                SELECT rule, cond, val, bucket, -1.0::double precision AS delta, span FROM undone
                WHERE before IS NULL OR before_bucket <= now - span OR before_bucket <> bucket
                UNION ALL
                SELECT rule, cond, val, before_bucket, 1.0, span FROM undone
                WHERE before IS NOT NULL AND before_bucket > now - span AND before_bucket <> bucket
            )
            INSERT INTO verigate_counts AS c (rule, condition, value, bucket, amount, expires_ms)
            SELECT rule, cond || ':latest', val, bucket, delta, bucket + span FROM moves
            ON CONFLICT ON CONSTRAINT verigate_counts_pkey
            DO UPDATE SET amount = c.amount + excluded.amount;
        END IF;
        IF 1 = ANY (p_kind) OR 3 = ANY (p_kind) THEN
            RETURN QUERY
            SELECT o.i::integer, CASE WHEN o.kind = 1 THEN coalesce((
                       SELECT sum(c.amount) FROM verigate_counts c
                       WHERE c.rule = o.rule AND c.condition = o.cond AND c.value = o.val
                         AND c.bucket > o.now - o.span), 0)
                   ELSE greatest(0, coalesce((
                       SELECT max(c.amount) FROM verigate_counts c
                       WHERE c.rule = o.rule AND c.condition = o.cond AND c.value = o.val
                         AND c.bucket = -1 AND c.expires_ms >= o.now), 0)) END,
                   NULL::boolean, NULL::bigint
            FROM unnest(p_stage, p_kind, p_rule, p_condition, p_value, p_span, p_now)
                 WITH ORDINALITY AS o(stage, kind, rule, cond, val, span, now, i)
            WHERE o.stage = st AND o.kind IN (1, 3);
        END IF;
    END LOOP;
    IF 5 = ANY (p_kind) OR 6 = ANY (p_kind) THEN
        PERFORM pg_advisory_xact_lock(k) FROM (
            SELECT DISTINCT hashtextextended(o.rule || chr(31) || o.cond || chr(31) || o.val, 0) AS k
            FROM unnest(p_kind, p_rule, p_condition, p_value) AS o(kind, rule, cond, val)
            WHERE o.kind IN (5, 6) ORDER BY 1
        ) caps;
        FOR w IN
            SELECT o.i, o.kind, o.rule, o.cond, o.val, o.span, o.amount, o.cap, o.now,
                   (o.now / greatest(o.span / 10, 1)) * greatest(o.span / 10, 1) AS bucket
            FROM unnest(p_kind, p_rule, p_condition, p_value, p_span, p_amount, p_cap, p_now)
                 WITH ORDINALITY AS o(kind, rule, cond, val, span, amount, cap, now, i)
            WHERE o.kind IN (5, 6)
            ORDER BY o.rule, o.cond, o.val, o.i
        LOOP
            SELECT coalesce(sum(c.amount), 0) INTO total FROM verigate_counts c
            WHERE c.rule = w.rule AND c.condition = w.cond AND c.value = w.val
              AND c.bucket > w.now - w.span;
            op := w.i;
            result := total + w.amount;
            added := w.kind = 6 OR total + w.amount <= w.cap;
            before_ms := NULL;
            IF added THEN
                INSERT INTO verigate_counts AS c (rule, condition, value, bucket, amount, expires_ms)
                VALUES (w.rule, w.cond, w.val, w.bucket, w.amount, w.bucket + w.span)
                ON CONFLICT ON CONSTRAINT verigate_counts_pkey
                DO UPDATE SET amount = c.amount + excluded.amount;
            END IF;
            RETURN NEXT;
        END LOOP;
    END IF;
    IF 8 = ANY (p_kind) THEN
        INSERT INTO verigate_counts AS c (rule, condition, value, bucket, amount, expires_ms)
        SELECT o.rule, o.cond, o.val, o.bucket, o.amount, o.bucket + o.span
        FROM (SELECT o.*, (o.now / greatest(o.span / 10, 1)) * greatest(o.span / 10, 1) AS bucket
              FROM unnest(p_kind, p_rule, p_condition, p_value, p_span, p_amount, p_now)
                   AS o(kind, rule, cond, val, span, amount, now)
              WHERE o.kind = 8) o
        ORDER BY o.rule, o.cond, o.val, o.bucket
        ON CONFLICT ON CONSTRAINT verigate_counts_pkey
        DO UPDATE SET amount = c.amount + excluded.amount;
    END IF;
    IF 9 = ANY (p_kind) THEN
        -- Every level's row, locked in order (a new one made, idle), then stepped.
        INSERT INTO verigate_counts AS c (rule, condition, value, bucket, amount, expires_ms)
        SELECT o.rule, o.cond, o.val, -1, 0, 0
        FROM unnest(p_kind, p_rule, p_condition, p_value) AS o(kind, rule, cond, val)
        WHERE o.kind = 9
        ORDER BY o.rule, o.cond, o.val
        ON CONFLICT ON CONSTRAINT verigate_counts_pkey DO UPDATE SET expires_ms = c.expires_ms;
        UPDATE verigate_counts c SET
            amount = greatest(o.floor, CASE WHEN c.expires_ms < o.now THEN 0 ELSE greatest(0, c.amount) END
                                       + o.amount),
            expires_ms = o.now + o.span
        FROM unnest(p_kind, p_rule, p_condition, p_value, p_span, p_amount, p_cap, p_now)
             AS o(kind, rule, cond, val, span, amount, floor, now)
        WHERE o.kind = 9 AND c.rule = o.rule AND c.condition = o.cond AND c.value = o.val AND c.bucket = -1;
    END IF;
END
$fn$;
