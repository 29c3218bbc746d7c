-- pglease schema, version 9: a grant handed over to a caller while its own
-- acquire waited for the key's queue lock keeps its token.
--
-- Versions 7 and 8 give a grant of the caller's that the caller did not know
-- of (a handoff whose notification it has not read, an acquire whose reply
-- was lost) back to it under a new token, because the old token may be one
-- the caller already held: a lock it released, back after a crash undid the
-- release, which commits asynchronously. But the commonest such grant is a
-- handoff made while the waiter's own acquire was waiting for the queue lock
-- (every waiter looks again when the holder's lease runs out, and the one
-- that takes the dead grant over hands the key to the head of the queue):
-- its token was drawn for nothing, and for a moment the key was held under
-- a token nobody ever used, which an observer of the key (an election's
-- Observe) reported as a leader of its own.
--
-- acquire_keys now takes p_seen, the largest token the caller has been told
-- of for its holder (a holder's rows are all made during its life, so a
-- client can know every token it has had). A grant of its own with a larger
-- token was never the caller's before: it is handed out as it is. One with a
-- token at or below p_seen, or any when p_seen is NULL (the older
-- signatures, which stay), is given a new token as before.

-- +goose Up

-- grant_keys, as in version 8, with p_seen: the largest token the caller has
-- been told of for its holder. A grant of the caller's that it did not know
-- of and whose token is larger is handed out with that token (see below).
-- +goose StatementBegin
CREATE FUNCTION grant_keys(p_names text[], p_ids text[], p_kinds "char"[], p_permits integer,
                           p_holder bigint, p_wait boolean, p_keep bigint[],
                           p_handoff boolean, p_fresh boolean, p_seen bigint)
RETURNS TABLE (acquired boolean, tokens bigint[], slots bigint[], acquired_at timestamptz,
               busy boolean, queued boolean, blocked integer, holder_id bigint, host text,
               pid integer, application text, held_since timestamptz, expires_in interval,
               waiter bigint)
LANGUAGE plpgsql AS $$
DECLARE
    n        integer := cardinality(p_names);
    ord      integer[];
    hashes   bigint[];
    i        integer;
    k        integer;
    nm       text;
    ident    text;
    kd       "char";
    fits     boolean;
    all_fit  boolean := true;
    first_no integer;
    r        record;
    live_n   integer;
    live_x   boolean;
    ahead_n  integer;
    ahead_x  boolean;
    mine     bigint;
    had_mine boolean := false;
    adopt    bigint;
    adopt_s  bigint;
    adopt_at timestamptz;
    touched  boolean[];
    busy_k   integer;
    n_tokens bigint[];
    n_slots  bigint[];
    t        bigint;
    s        bigint;
    now_at   timestamptz;
    h1       bigint;
    got_q    boolean := false;
    quiet    boolean := false;
    v        text;
    queue_seen boolean := false;
BEGIN
    IF n IS NULL OR n < 1 OR n > 64 OR cardinality(p_ids) IS DISTINCT FROM n
       OR cardinality(p_kinds) IS DISTINCT FROM n THEN
        RAISE EXCEPTION 'pglease: a key set has 1 to 64 keys, each with an id and a kind'
            USING ERRCODE = '22023';
    END IF;
    IF p_permits IS NULL OR p_permits < 1 OR p_permits > 1024 THEN
        RAISE EXCEPTION 'pglease: a semaphore has 1 to 1024 permits, not %', p_permits
            USING ERRCODE = '22023';
    END IF;
    IF 'p' = ANY (p_kinds) AND n > 1 THEN
        RAISE EXCEPTION 'pglease: a semaphore permit is acquired alone, not in a key set'
            USING ERRCODE = '22023';
    END IF;
    IF array_position(p_kinds, NULL) IS NOT NULL OR NOT p_kinds <@ '{x,s,p}'::"char"[] THEN
        RAISE EXCEPTION 'pglease: a kind is ''x'' (exclusive), ''s'' (shared) or ''p'' (permit)'
            USING ERRCODE = '22023';
    END IF;
    IF n > 1 THEN
        IF (SELECT count(DISTINCT (a, b)) FROM unnest(p_names, p_ids) AS u(a, b)) <> n THEN
            RAISE EXCEPTION 'pglease: a key set names a key twice'
                USING ERRCODE = '22023';
        END IF;
    END IF;
    p_keep := coalesce(p_keep, '{}');

    -- A takeover or a grant must be durable even where the role defaults to
    -- asynchronous commit: a lost grant after a crash could hand a key twice.
    IF current_setting('synchronous_commit') = 'off' THEN
        v := set_config('synchronous_commit', 'on', true);
    END IF;

    -- A blocking acquire of one key tries the key's queue lock first. When
    -- it is free (no other acquirer of the key is in a statement like this
    -- one), the locked path below answers at once, and the refusals made
    -- without the locks would be statements spent for nothing. A try goes
    -- the other way: the refusal below answers it for a held key in one
    -- query.
    IF n = 1 AND (p_wait OR p_fresh) THEN
        h1 := key_hash(p_names[1], p_ids[1]);
        got_q := pg_try_advisory_xact_lock(1885826161, hashint8(h1));
    END IF;

    -- The fast refusal: a key held by a live holder in a way this request
    -- cannot share, and the caller not about to queue (a try, or a waiter
    -- already queued on every key). No lock, no transaction id.
    --
    -- Every query here and below reads holders through a scalar subquery per
    -- row rather than a join: a join lets the planner's generic plan (which
    -- PL/pgSQL caches) scan locks by another index than the key's, which
    -- costs a full index scan on a small, busy table.
    -- One query per kind, with no CASE on the kind: a CASE that the planner
    -- can fold for given arguments makes PL/pgSQL plan the statement anew on
    -- every call (its custom plans look cheaper than the generic one).
    FOR k IN 1..n LOOP
        EXIT WHEN p_fresh OR got_q;
        -- (Each query reads the holder's details too, for the refusal: the
        -- subquery, which keeps its LIMIT or its aggregate, is scanned by
        -- the key's index whatever the join.)
        IF p_kinds[k] = 'x' THEN
            SELECT x.holder_id, x.acquired_at, h.host, h.pid, h.application, h.expires_at INTO r
              FROM (SELECT l.holder_id, l.acquired_at
                      FROM locks l
                     WHERE l.name = p_names[k] AND l.entity_id = p_ids[k] AND l.holder_id <> p_holder
                       AND l.kind <> 'p'
                       AND (SELECT h.expires_at FROM holders h WHERE h.id = l.holder_id) > clock_timestamp()
                     LIMIT 1) x
              LEFT JOIN holders h ON h.id = x.holder_id;
        ELSIF p_kinds[k] = 's' THEN
            SELECT x.holder_id, x.acquired_at, h.host, h.pid, h.application, h.expires_at INTO r
              FROM (SELECT l.holder_id, l.acquired_at
                      FROM locks l
                     WHERE l.name = p_names[k] AND l.entity_id = p_ids[k] AND l.holder_id <> p_holder
                       AND l.kind = 'x'
                       AND (SELECT h.expires_at FROM holders h WHERE h.id = l.holder_id) > clock_timestamp()
                     LIMIT 1) x
              LEFT JOIN holders h ON h.id = x.holder_id;
        ELSE
            -- All permits live, none of them the caller's.
            SELECT x.holder_id, x.acquired_at, h.host, h.pid, h.application, h.expires_at INTO r
              FROM (SELECT min(l.holder_id) AS holder_id, min(l.acquired_at) AS acquired_at
                      FROM locks l
                     WHERE l.name = p_names[k] AND l.entity_id = p_ids[k]
                       AND (SELECT h.expires_at FROM holders h WHERE h.id = l.holder_id) > clock_timestamp()
                    HAVING count(*) >= p_permits AND bool_and(l.kind = 'p' AND l.permits = p_permits
                                                              AND l.holder_id <> p_holder)) x
              LEFT JOIN holders h ON h.id = x.holder_id;
        END IF;
        IF FOUND THEN
            -- A waiter not yet queued on every key must queue, under the
            -- locks below. (Tested apart from p_wait, not in one condition
            -- with it: see above.)
            IF p_wait THEN
                IF EXISTS (SELECT FROM generate_series(1, n) x(i)
                            WHERE NOT EXISTS (SELECT FROM waiters w WHERE w.name = p_names[x.i]
                                                 AND w.entity_id = p_ids[x.i] AND w.holder_id = p_holder)) THEN
                    EXIT;
                END IF;
            END IF;
            acquired := false;
            busy := false;
            queued := p_wait;
            blocked := k;
            holder_id := r.holder_id;
            host := r.host;
            pid := r.pid;
            application := r.application;
            held_since := r.acquired_at;
            expires_in := r.expires_at - clock_timestamp();
            RETURN NEXT;
            RETURN;
        END IF;
    END LOOP;

    -- The fast refusal by the queue, for one key: live waiters ahead of the
    -- caller (all of them for a newcomer) that keep it out. Without this,
    -- every waiter woken by a release would queue for the key's queue lock
    -- behind the one that is served. Dead waiters do not count here; the
    -- locked path below deletes them.
    IF n = 1 AND NOT p_fresh AND NOT got_q THEN
        SELECT w.id INTO mine FROM waiters w
         WHERE w.name = p_names[1] AND w.entity_id = p_ids[1] AND w.holder_id = p_holder;
        IF p_kinds[1] = 'x' THEN
            SELECT w.holder_id, w.since AS acquired_at INTO r FROM waiters w
             WHERE w.name = p_names[1] AND w.entity_id = p_ids[1] AND w.id < coalesce(mine, 9223372036854775807)
               AND w.holder_id <> p_holder AND w.kind <> 'p'
               AND (SELECT h.expires_at FROM holders h WHERE h.id = w.holder_id) > clock_timestamp()
             LIMIT 1;
        ELSIF p_kinds[1] = 's' THEN
            SELECT w.holder_id, w.since AS acquired_at INTO r FROM waiters w
             WHERE w.name = p_names[1] AND w.entity_id = p_ids[1] AND w.id < coalesce(mine, 9223372036854775807)
               AND w.holder_id <> p_holder AND w.kind = 'x'
               AND (SELECT h.expires_at FROM holders h WHERE h.id = w.holder_id) > clock_timestamp()
             LIMIT 1;
        ELSE
            SELECT NULL::bigint AS holder_id, NULL::timestamptz AS acquired_at INTO r
             WHERE (SELECT count(*) FROM locks l
                     WHERE l.name = p_names[1] AND l.entity_id = p_ids[1]
                       AND (SELECT h.expires_at FROM holders h WHERE h.id = l.holder_id) > clock_timestamp())
                 + (SELECT count(*) FROM waiters w
                     WHERE w.name = p_names[1] AND w.entity_id = p_ids[1] AND w.id < coalesce(mine, 9223372036854775807)
                       AND w.holder_id <> p_holder
                       AND (SELECT h.expires_at FROM holders h WHERE h.id = w.holder_id) > clock_timestamp())
                   >= p_permits
               AND NOT EXISTS (SELECT FROM locks l WHERE l.name = p_names[1] AND l.entity_id = p_ids[1]
                                  AND (l.kind <> 'p' OR l.permits <> p_permits))
               AND NOT EXISTS (SELECT FROM waiters w WHERE w.name = p_names[1] AND w.entity_id = p_ids[1]
                                  AND (w.kind <> 'p' OR w.permits <> p_permits));
        END IF;
        IF FOUND AND (NOT p_wait OR mine IS NOT NULL) THEN
            -- Unless the caller has a grant of the key it did not know of
            -- (a handoff): it is adopted under the locks below.
            IF NOT EXISTS (SELECT FROM locks l WHERE l.name = p_names[1] AND l.entity_id = p_ids[1]
                              AND l.holder_id = p_holder AND NOT (l.token = ANY (p_keep))) THEN
                RETURN QUERY SELECT false, NULL::bigint[], NULL::bigint[], NULL::timestamptz,
                                    false, p_wait, 1, NULL::bigint, NULL::text, NULL::integer,
                                    NULL::text, NULL::timestamptz, NULL::interval, mine;
                RETURN;
            END IF;
        END IF;
        mine := NULL;
    END IF;

    -- Every delete below is quiet: this function serves the queues it
    -- changes itself (see serve), under the keys' locks it holds, after it
    -- knows whether it takes the keys. pglease.quiet is set before the first
    -- delete (quiet), and undone before every return; a call that deletes
    -- nothing changes no setting.
    touched := array_fill(false, ARRAY[n]);

    -- The keys in key_hash order: the one order every acquirer locks them in.
    IF n = 1 THEN
        ord := '{1}';
        hashes := ARRAY[coalesce(h1, key_hash(p_names[1], p_ids[1]))];
    ELSE
        SELECT array_agg(u.i ORDER BY u.h, u.i), array_agg(u.h ORDER BY u.h, u.i) INTO ord, hashes
          FROM (SELECT x.i, key_hash(p_names[x.i], p_ids[x.i]) AS h
                  FROM generate_series(1, n) AS x(i)) u;
    END IF;

    -- Under the keys' locks, in key_hash order: the queue lock, then the key
    -- lock. The queue lock is waited for: whoever holds it is another
    -- acquirer of the key for the length of one statement like this one (or
    -- advisory_acquire_shared drawing a token), which waits for no queue
    -- lock it does not hold already and only tries key locks, and every
    -- acquirer of several keys takes their queue locks in this same order: so
    -- no wait here can close a cycle. The key lock is only tried: on the
    -- advisory path a holder keeps it for as long as it holds the key.
    FOR i IN 1..n LOOP
        k := ord[i];
        IF NOT got_q THEN
            v := pg_advisory_xact_lock(1885826161, hashint8(hashes[i]))::text;
        END IF;
        IF NOT (CASE WHEN p_kinds[k] = 's' THEN pg_try_advisory_xact_lock_shared(hashes[i])
                     ELSE pg_try_advisory_xact_lock(hashes[i]) END)
           AND NOT key_lock_again(hashes[i], p_kinds[k] = 's') THEN
            -- Table acquirers take the queue lock first, and we have it: so
            -- the advisory path holds the key. Busy; a waiter for one key
            -- takes its place in the queue meanwhile (under the queue lock,
            -- so that the order of the queue holds).
            -- (Not a caller that has a grant of the key it did not know of,
            -- a handoff: it asks again, and adopts it.)
            IF p_wait AND n = 1 AND NOT EXISTS (
                   SELECT FROM locks l WHERE l.name = p_names[1] AND l.entity_id = p_ids[1]
                      AND l.holder_id = p_holder AND NOT (l.token = ANY (p_keep))) THEN
                -- A place in the queue need not survive a crash: a waiter
                -- whose row is lost queues again at its next call.
                v := set_config('synchronous_commit', 'off', true);
                INSERT INTO waiters AS w (name, entity_id, holder_id, kind, permits, set_size, handoff)
                VALUES (p_names[1], p_ids[1], p_holder, p_kinds[1], p_permits, 1, p_handoff)
                ON CONFLICT ON CONSTRAINT waiters_key_holder DO NOTHING;
                SELECT w.id INTO mine FROM waiters w
                 WHERE w.name = p_names[1] AND w.entity_id = p_ids[1] AND w.holder_id = p_holder;
            END IF;
            RETURN QUERY SELECT false, NULL::bigint[], NULL::bigint[], NULL::timestamptz,
                                true, p_wait AND n = 1, k, NULL::bigint, NULL::text, NULL::integer,
                                NULL::text, NULL::timestamptz, NULL::interval, mine;
            RETURN;
        END IF;
    END LOOP;

    <<keys>>
    FOR i IN 1..n LOOP
        k := ord[i];
        nm := p_names[k];
        ident := p_ids[k];
        kd := p_kinds[k];
        -- The grants: dead ones and this holder's orphans are deleted (a row
        -- locked by someone, a fenced write or a reaper, makes the key busy).
        -- Kinds must agree: a semaphore is one with every permit holder and
        -- waiter of its key, and never a lock at the same time.
        live_n := 0;
        live_x := false;
        FOR r IN SELECT x.token, x.holder_id, x.kind, x.slot, x.permits, x.acquired_at,
                        x.exp > clock_timestamp() AS alive, x.exp IS NOT NULL AS present
                   FROM (SELECT l.token, l.holder_id, l.kind, l.slot, l.permits, l.acquired_at,
                                (SELECT h.expires_at FROM holders h WHERE h.id = l.holder_id) AS exp
                           FROM locks l WHERE l.name = nm AND l.entity_id = ident) x LOOP
            IF (r.holder_id = p_holder AND r.token = ANY (p_keep)) OR (r.holder_id <> p_holder AND r.alive) THEN
                IF (kd = 'p') <> (r.kind = 'p') OR (kd = 'p' AND r.permits <> p_permits) THEN
                    PERFORM kind_conflict(nm, ident, r.kind, r.permits);
                END IF;
                live_n := live_n + 1;
                live_x := live_x OR r.kind = 'x';
                CONTINUE;
            END IF;
            -- An orphan of ours, or a grant of a dead holder: take it over.
            PERFORM 1 FROM locks l WHERE l.name = nm AND l.entity_id = ident AND l.token = r.token
                FOR UPDATE SKIP LOCKED;
            IF NOT FOUND THEN
                busy_k := k;
                EXIT keys;
            END IF;
            IF r.holder_id <> p_holder AND r.present THEN
                -- A real (no-op) UPDATE of the dead holder row: a heartbeat
                -- that already passed its expiry check waits for it and then
                -- re-checks, so it cannot revive the holder after we took its
                -- grant. The row is locked first without waiting (a heartbeat
                -- or a reaper has it: busy), so that nothing here waits while
                -- it holds the key's locks.
                PERFORM 1 FROM holders h WHERE h.id = r.holder_id FOR UPDATE SKIP LOCKED;
                IF NOT FOUND THEN
                    busy_k := k;
                    EXIT keys;
                END IF;
                UPDATE holders h SET expires_at = h.expires_at
                 WHERE h.id = r.holder_id AND h.expires_at <= clock_timestamp();
                IF NOT FOUND THEN
                    -- Renewed since we looked: alive after all. Ask again.
                    busy_k := k;
                    EXIT keys;
                END IF;
            END IF;
            IF n = 1 AND r.holder_id = p_holder AND adopt IS NULL AND r.kind = kd
               AND r.permits = p_permits THEN
                -- A grant of ours that we did not know of, of the kind asked
                -- for: a handoff whose notification has not arrived, or an
                -- acquire whose reply was lost. The key is ours: adopted below.
                adopt := r.token;
                adopt_s := r.slot;
                adopt_at := r.acquired_at;
                CONTINUE;
            END IF;
            IF NOT quiet THEN
                quiet := set_config('pglease.quiet', 'on', true) = 'on';
            END IF;
            DELETE FROM locks l WHERE l.name = nm AND l.entity_id = ident AND l.token = r.token;
            touched[k] := true;
        END LOOP;

        IF adopt IS NOT NULL THEN
            IF NOT quiet THEN
                quiet := set_config('pglease.quiet', 'on', true) = 'on';
            END IF;
            DELETE FROM waiters w WHERE w.name = nm AND w.entity_id = ident AND w.holder_id = p_holder;
            IF adopt > p_seen THEN
                -- A token the caller was never told of (a handoff made while
                -- this call waited for the queue lock, say): no holding of the
                -- caller's ever had it, so it is handed out as it is, and the
                -- key keeps the token its grant drew.
                t := adopt;
                s := adopt_s;
                now_at := adopt_at;
            ELSE
                -- Adopted under a new token. The old one may be a lock the
                -- caller had and released, back after a crash undid the
                -- release (it commits asynchronously): handing that token out
                -- again would let a late write of the first holding pass a
                -- fence during the second. (So may any token when the caller
                -- does not say what it has seen: p_seen NULL.)
                DELETE FROM locks l WHERE l.name = nm AND l.entity_id = ident AND l.token = adopt;
                IF NOT EXISTS (SELECT FROM token_guard) THEN
                    PERFORM guard_tokens();
                END IF;
                t := nextval('token_seq');
                s := CASE WHEN kd = 's' THEN t ELSE adopt_s END;
                INSERT INTO locks AS l (name, entity_id, token, holder_id, kind, slot, permits)
                VALUES (nm, ident, t, p_holder, kd, s, p_permits)
                RETURNING l.acquired_at INTO now_at;
            END IF;
            IF kd <> 'x' THEN
                PERFORM serve(nm, ident, false);
            END IF;
            v := set_config('pglease.quiet', 'off', true);
            acquired := true;
            tokens := ARRAY[t];
            slots := ARRAY[s];
            acquired_at := now_at;
            busy := false;
            queued := false;
            RETURN NEXT;
            RETURN;
        END IF;

        -- The queue ahead of the caller. Waiters of dead holders go.
        ahead_n := 0;
        ahead_x := false;
        mine := NULL;
        FOR r IN SELECT w.id, w.holder_id, w.kind, w.permits,
                        coalesce((SELECT h.expires_at FROM holders h WHERE h.id = w.holder_id)
                                 > clock_timestamp(), false) AS alive
                   FROM waiters w
                  WHERE w.name = nm AND w.entity_id = ident ORDER BY w.id LOOP
            queue_seen := true;
            IF r.holder_id = p_holder THEN
                IF r.kind = kd AND r.permits = p_permits THEN
                    mine := r.id;
                    had_mine := true;
                ELSE -- asked for as something else now: queue anew
                    IF NOT quiet THEN
                        quiet := set_config('pglease.quiet', 'on', true) = 'on';
                    END IF;
                    DELETE FROM waiters w WHERE w.id = r.id;
                    touched[k] := true;
                END IF;
                EXIT;
            END IF;
            IF NOT r.alive THEN
                IF NOT quiet THEN
                    quiet := set_config('pglease.quiet', 'on', true) = 'on';
                END IF;
                DELETE FROM waiters w WHERE w.id = r.id;
                touched[k] := true;
                CONTINUE;
            END IF;
            IF (kd = 'p') <> (r.kind = 'p') OR (kd = 'p' AND r.permits <> p_permits) THEN
                PERFORM kind_conflict(nm, ident, r.kind, r.permits);
            END IF;
            ahead_n := ahead_n + 1;
            ahead_x := ahead_x OR r.kind = 'x';
        END LOOP;

        fits := CASE kd
                    WHEN 'x' THEN live_n = 0 AND ahead_n = 0
                    WHEN 's' THEN NOT live_x AND NOT ahead_x
                    ELSE live_n + ahead_n < p_permits
                END;
        IF NOT fits AND all_fit THEN
            all_fit := false;
            first_no := k;
        END IF;
        IF NOT fits AND NOT p_wait THEN
            EXIT; -- a try: the rest does not matter
        END IF;
    END LOOP;

    IF busy_k IS NOT NULL THEN
        -- A grant is locked by someone (a fenced write, a reaper), or its
        -- dead holder is being renewed or reaped: ask again soon.
        FOR i IN 1..n LOOP
            IF touched[ord[i]] THEN
                PERFORM serve(p_names[ord[i]], p_ids[ord[i]], false);
            END IF;
        END LOOP;
        IF quiet THEN
            v := set_config('pglease.quiet', 'off', true);
        END IF;
        RETURN QUERY SELECT false, NULL::bigint[], NULL::bigint[], NULL::timestamptz,
                            true, false, busy_k, NULL::bigint, NULL::text, NULL::integer,
                            NULL::text, NULL::timestamptz, NULL::interval, NULL::bigint;
        RETURN;
    END IF;

    IF NOT all_fit THEN
        IF p_wait AND NOT (n = 1 AND had_mine) THEN
            -- Not durably: see above. (A grant that serve makes below is.)
            v := set_config('synchronous_commit', 'off', true);
            -- Queue on every key, those that fit too (the set waits for all
            -- of them at once), in this one statement under all the keys'
            -- locks: two sets that share keys queue in the same order on
            -- every key they share, so neither waits behind the other twice.
            INSERT INTO waiters AS w (name, entity_id, holder_id, kind, permits, set_size, handoff)
            SELECT p_names[x.i], p_ids[x.i], p_holder, p_kinds[x.i], p_permits, n, p_handoff
              FROM generate_series(1, n) x(i)
            ON CONFLICT ON CONSTRAINT waiters_key_holder DO NOTHING;
            IF n = 1 THEN
                SELECT w.id INTO mine FROM waiters w
                 WHERE w.name = p_names[1] AND w.entity_id = p_ids[1] AND w.holder_id = p_holder;
            END IF;
        END IF;
        -- What this call took away (dead grants, dead waiters, orphans) may
        -- let waiters ahead of it in: they are served now.
        FOR i IN 1..n LOOP
            IF touched[ord[i]] THEN
                PERFORM serve(p_names[ord[i]], p_ids[ord[i]], false);
            END IF;
        END LOOP;
        IF quiet THEN
            v := set_config('pglease.quiet', 'off', true);
        END IF;
        SELECT x.holder_id, x.acquired_at, h.host, h.pid, h.application, h.expires_at INTO r
          FROM (SELECT l.holder_id, l.acquired_at FROM locks l
                 WHERE l.name = p_names[first_no] AND l.entity_id = p_ids[first_no]
                   AND l.holder_id <> p_holder
                   AND (SELECT hh.expires_at FROM holders hh WHERE hh.id = l.holder_id) > clock_timestamp()
                 ORDER BY l.kind = 'x' DESC, l.token LIMIT 1) x
          LEFT JOIN holders h ON h.id = x.holder_id;
        RETURN QUERY SELECT false, NULL::bigint[], NULL::bigint[], NULL::timestamptz,
                            false, p_wait, first_no, r.holder_id, r.host, r.pid, r.application,
                            r.acquired_at, r.expires_at - clock_timestamp(),
                            CASE WHEN p_wait AND n = 1 THEN mine END;
        RETURN;
    END IF;

    -- Every key fits: grant them all, in key_hash order, and leave the
    -- queues (quietly: a waiter turned holder frees nobody).
    IF NOT EXISTS (SELECT FROM token_guard) THEN
        PERFORM guard_tokens();
    END IF;
    IF had_mine THEN
        IF NOT quiet THEN
            quiet := set_config('pglease.quiet', 'on', true) = 'on';
        END IF;
        DELETE FROM waiters w
         USING unnest(p_names, p_ids) AS u(a, b)
         WHERE w.name = u.a AND w.entity_id = u.b AND w.holder_id = p_holder;
    END IF;
    n_tokens := array_fill(NULL::bigint, ARRAY[n]);
    n_slots := array_fill(NULL::bigint, ARRAY[n]);
    FOR i IN 1..n LOOP
        k := ord[i];
        t := nextval('token_seq');
        IF p_kinds[k] = 'x' THEN
            s := 0;
        ELSIF p_kinds[k] = 's' THEN
            s := t;
        ELSE
            SELECT min(x.s) INTO s FROM generate_series(1, p_permits) x(s)
             WHERE NOT EXISTS (SELECT FROM locks l WHERE l.name = p_names[k]
                                  AND l.entity_id = p_ids[k] AND l.slot = x.s);
        END IF;
        INSERT INTO locks AS l (name, entity_id, token, holder_id, kind, slot, permits)
        VALUES (p_names[k], p_ids[k], t, p_holder, p_kinds[k], s, p_permits)
        RETURNING l.acquired_at INTO now_at;
        n_tokens[k] := t;
        n_slots[k] := s;
    END LOOP;
    -- A shared grant or a permit may leave room for the waiters behind
    -- (readers after a reader, permits still free): serve them now rather
    -- than at the next release.
    IF n = 1 AND p_kinds[1] <> 'x' AND queue_seen THEN
        IF EXISTS (SELECT FROM waiters w WHERE w.name = p_names[1] AND w.entity_id = p_ids[1]) THEN
            PERFORM serve(p_names[1], p_ids[1], false);
        END IF;
    END IF;
    IF quiet THEN
        v := set_config('pglease.quiet', 'off', true);
    END IF;
    acquired := true;
    tokens := n_tokens;
    slots := n_slots;
    acquired_at := now_at;
    busy := false;
    queued := false;
    RETURN NEXT;
END
$$;
-- +goose StatementEnd
REVOKE EXECUTE ON FUNCTION grant_keys(text[], text[], "char"[], integer, bigint, boolean, bigint[], boolean, boolean, bigint) FROM PUBLIC;

-- Version 8's grant_keys, for version 8's acquire_keys and the older ones
-- that call it: a caller that does not say what it has seen.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION grant_keys(p_names text[], p_ids text[], p_kinds "char"[], p_permits integer,
                           p_holder bigint, p_wait boolean, p_keep bigint[],
                           p_handoff boolean, p_fresh boolean)
RETURNS TABLE (acquired boolean, tokens bigint[], slots bigint[], acquired_at timestamptz,
               busy boolean, queued boolean, blocked integer, holder_id bigint, host text,
               pid integer, application text, held_since timestamptz, expires_in interval,
               waiter bigint)
LANGUAGE sql AS $$
    SELECT * FROM grant_keys(p_names, p_ids, p_kinds, p_permits, p_holder, p_wait, p_keep,
                             p_handoff, p_fresh, NULL)
$$;
-- +goose StatementEnd

-- acquire_keys for this version's clients: version 7's, with p_seen.
-- +goose StatementBegin
CREATE FUNCTION acquire_keys(p_names text[], p_ids text[], p_kinds "char"[], p_permits integer,
                             p_holder bigint, p_secret bytea, p_wait boolean, p_keep bigint[],
                             p_fresh boolean, p_seen bigint)
RETURNS TABLE (acquired boolean, tokens bigint[], slots bigint[], acquired_at timestamptz,
               busy boolean, queued boolean, blocked integer, holder_id bigint, host text,
               pid integer, application text, held_since timestamptz, expires_in interval,
               waiter bigint)
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    mine  boolean;
    alive boolean;
BEGIN
    SELECT h.secret_hash = sha256(p_secret), h.expires_at > clock_timestamp() INTO mine, alive
      FROM holders h WHERE h.id = p_holder;
    IF FOUND AND mine IS NOT TRUE THEN
        RAISE EXCEPTION 'pglease: the secret given is not that of holder %', p_holder
            USING ERRCODE = '42L01',
                  HINT = 'a holder acts only for itself: pass the secret it registered with';
    END IF;
    IF alive IS NOT TRUE THEN
        RAISE EXCEPTION 'pglease: holder % has expired', p_holder
            USING ERRCODE = '55L02', HINT = 'register a new holder';
    END IF;
    RETURN QUERY SELECT * FROM grant_keys(p_names, p_ids, p_kinds, p_permits, p_holder, p_wait, p_keep,
                                          true, p_fresh, p_seen);
END
$$;
-- +goose StatementEnd
REVOKE EXECUTE ON FUNCTION acquire_keys(text[], text[], "char"[], integer, bigint, bytea, boolean, bigint[], boolean, bigint) FROM PUBLIC;

-- The application's grant set, with this version's acquire_keys.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION grant_application(p_role regrole) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM grant_schema_objects(p_role,
        ARRAY['schema_info()', 'channel()', 'key_hash(text,text)', 'mark_listening()',
              'register(text,integer,text,interval,bytea)',
              'acquire(text,text,bigint,bytea)', 'release(text,text,bigint,bigint,bytea)',
              'acquire_keys(text[],text[],"char"[],integer,bigint,bytea,boolean,bigint[])',
              'acquire_keys(text[],text[],"char"[],integer,bigint,bytea,boolean,bigint[],boolean)',
              'acquire_keys(text[],text[],"char"[],integer,bigint,bytea,boolean,bigint[],boolean,bigint)',
              'leave(text,text,bigint,bytea,bigint[])',
              'renew(bigint,bytea)', 'close_holder(bigint,bytea)', 'drop_orphan(text,text,bigint,bytea)',
              'holder_locks(bigint,bytea)', 'fence(text,text,bigint)', 'holds(text,text,bigint)',
              'advisory_acquire(text,text,bigint,boolean)', 'advisory_release(text,text,bigint,bigint)',
              'advisory_unlock_if_held(bigint)', 'advisory_takeover(text,text)', 'guard_tokens()',
              'advisory_acquire_shared(text,text,bigint,boolean)',
              'advisory_release_shared(text,text,bigint,bigint)',
              'advisory_unlock_shared_if_held(bigint)', 'advisory_takeover_kinds(text,text,"char"[])'],
        ARRAY['locks', 'held', 'holder_status', 'advisory_held', 'waiting', 'token_guard']);
    EXECUTE format('GRANT USAGE ON SEQUENCE %s TO %s', 'token_seq'::regclass, p_role);
END
$$;
-- +goose StatementEnd

-- Roles already given version 8's acquire_keys (by grant_application, or
-- by hand) get this version's too: a client of this version calls it on
-- this schema, and must not be refused where the last one was let in.
-- +goose StatementBegin
DO $$
DECLARE
    r regrole;
BEGIN
    FOR r IN SELECT a.grantee::regrole
               FROM pg_proc p, aclexplode(p.proacl) a
              WHERE p.oid = 'acquire_keys(text[], text[], "char"[], integer, bigint, bytea, boolean, bigint[], boolean)'::regprocedure
                AND a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner AND a.grantee <> 0 LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s',
                       'acquire_keys(text[], text[], "char"[], integer, bigint, bytea, boolean, bigint[], boolean, bigint)'::regprocedure, r);
    END LOOP;
END
$$;
-- +goose StatementEnd

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION schema_info() RETURNS TABLE (version integer, compatible_from integer)
LANGUAGE sql STABLE AS $$
    SELECT 9, 3
$$;
-- +goose StatementEnd

-- +goose StatementBegin
DO $$
BEGIN
    PERFORM pin_search_path();
END
$$;
-- +goose StatementEnd

-- +goose Down
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION schema_info() RETURNS TABLE (version integer, compatible_from integer)
LANGUAGE sql STABLE AS $$
    SELECT 8, 3
$$;
-- +goose StatementEnd

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION grant_application(p_role regrole) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM grant_schema_objects(p_role,
        ARRAY['schema_info()', 'channel()', 'key_hash(text,text)', 'mark_listening()',
              'register(text,integer,text,interval,bytea)',
              'acquire(text,text,bigint,bytea)', 'release(text,text,bigint,bigint,bytea)',
              'acquire_keys(text[],text[],"char"[],integer,bigint,bytea,boolean,bigint[])',
              'acquire_keys(text[],text[],"char"[],integer,bigint,bytea,boolean,bigint[],boolean)',
              'leave(text,text,bigint,bytea,bigint[])',
              'renew(bigint,bytea)', 'close_holder(bigint,bytea)', 'drop_orphan(text,text,bigint,bytea)',
              'holder_locks(bigint,bytea)', 'fence(text,text,bigint)', 'holds(text,text,bigint)',
              'advisory_acquire(text,text,bigint,boolean)', 'advisory_release(text,text,bigint,bigint)',
              'advisory_unlock_if_held(bigint)', 'advisory_takeover(text,text)', 'guard_tokens()',
              'advisory_acquire_shared(text,text,bigint,boolean)',
              'advisory_release_shared(text,text,bigint,bigint)',
              'advisory_unlock_shared_if_held(bigint)', 'advisory_takeover_kinds(text,text,"char"[])'],
        ARRAY['locks', 'held', 'holder_status', 'advisory_held', 'waiting', 'token_guard']);
    EXECUTE format('GRANT USAGE ON SEQUENCE %s TO %s', 'token_seq'::regclass, p_role);
END
$$;
-- +goose StatementEnd

DROP FUNCTION acquire_keys(text[], text[], "char"[], integer, bigint, bytea, boolean, bigint[], boolean, bigint);

-- Version 8's grant_keys.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION grant_keys(p_names text[], p_ids text[], p_kinds "char"[], p_permits integer,
                           p_holder bigint, p_wait boolean, p_keep bigint[],
                           p_handoff boolean, p_fresh boolean)
RETURNS TABLE (acquired boolean, tokens bigint[], slots bigint[], acquired_at timestamptz,
               busy boolean, queued boolean, blocked integer, holder_id bigint, host text,
               pid integer, application text, held_since timestamptz, expires_in interval,
               waiter bigint)
LANGUAGE plpgsql AS $$
DECLARE
    n        integer := cardinality(p_names);
    ord      integer[];
    hashes   bigint[];
    i        integer;
    k        integer;
    nm       text;
    ident    text;
    kd       "char";
    fits     boolean;
    all_fit  boolean := true;
    first_no integer;
    r        record;
    live_n   integer;
    live_x   boolean;
    ahead_n  integer;
    ahead_x  boolean;
    mine     bigint;
    had_mine boolean := false;
    adopt    bigint;
    adopt_s  bigint;
    touched  boolean[];
    busy_k   integer;
    n_tokens bigint[];
    n_slots  bigint[];
    t        bigint;
    s        bigint;
    now_at   timestamptz;
    h1       bigint;
    got_q    boolean := false;
    quiet    boolean := false;
    v        text;
    queue_seen boolean := false;
BEGIN
    IF n IS NULL OR n < 1 OR n > 64 OR cardinality(p_ids) IS DISTINCT FROM n
       OR cardinality(p_kinds) IS DISTINCT FROM n THEN
        RAISE EXCEPTION 'pglease: a key set has 1 to 64 keys, each with an id and a kind'
            USING ERRCODE = '22023';
    END IF;
    IF p_permits IS NULL OR p_permits < 1 OR p_permits > 1024 THEN
        RAISE EXCEPTION 'pglease: a semaphore has 1 to 1024 permits, not %', p_permits
            USING ERRCODE = '22023';
    END IF;
    IF 'p' = ANY (p_kinds) AND n > 1 THEN
        RAISE EXCEPTION 'pglease: a semaphore permit is acquired alone, not in a key set'
            USING ERRCODE = '22023';
    END IF;
    IF array_position(p_kinds, NULL) IS NOT NULL OR NOT p_kinds <@ '{x,s,p}'::"char"[] THEN
        RAISE EXCEPTION 'pglease: a kind is ''x'' (exclusive), ''s'' (shared) or ''p'' (permit)'
            USING ERRCODE = '22023';
    END IF;
    IF n > 1 THEN
        IF (SELECT count(DISTINCT (a, b)) FROM unnest(p_names, p_ids) AS u(a, b)) <> n THEN
            RAISE EXCEPTION 'pglease: a key set names a key twice'
                USING ERRCODE = '22023';
        END IF;
    END IF;
    p_keep := coalesce(p_keep, '{}');

    -- A takeover or a grant must be durable even where the role defaults to
    -- asynchronous commit: a lost grant after a crash could hand a key twice.
    IF current_setting('synchronous_commit') = 'off' THEN
        v := set_config('synchronous_commit', 'on', true);
    END IF;

    -- A blocking acquire of one key tries the key's queue lock first. When
    -- it is free (no other acquirer of the key is in a statement like this
    -- one), the locked path below answers at once, and the refusals made
    -- without the locks would be statements spent for nothing. A try goes
    -- the other way: the refusal below answers it for a held key in one
    -- query.
    IF n = 1 AND (p_wait OR p_fresh) THEN
        h1 := key_hash(p_names[1], p_ids[1]);
        got_q := pg_try_advisory_xact_lock(1885826161, hashint8(h1));
    END IF;

    -- The fast refusal: a key held by a live holder in a way this request
    -- cannot share, and the caller not about to queue (a try, or a waiter
    -- already queued on every key). No lock, no transaction id.
    --
    -- Every query here and below reads holders through a scalar subquery per
    -- row rather than a join: a join lets the planner's generic plan (which
    -- PL/pgSQL caches) scan locks by another index than the key's, which
    -- costs a full index scan on a small, busy table.
    -- One query per kind, with no CASE on the kind: a CASE that the planner
    -- can fold for given arguments makes PL/pgSQL plan the statement anew on
    -- every call (its custom plans look cheaper than the generic one).
    FOR k IN 1..n LOOP
        EXIT WHEN p_fresh OR got_q;
        -- (Each query reads the holder's details too, for the refusal: the
        -- subquery, which keeps its LIMIT or its aggregate, is scanned by
        -- the key's index whatever the join.)
        IF p_kinds[k] = 'x' THEN
            SELECT x.holder_id, x.acquired_at, h.host, h.pid, h.application, h.expires_at INTO r
              FROM (SELECT l.holder_id, l.acquired_at
                      FROM locks l
                     WHERE l.name = p_names[k] AND l.entity_id = p_ids[k] AND l.holder_id <> p_holder
                       AND l.kind <> 'p'
                       AND (SELECT h.expires_at FROM holders h WHERE h.id = l.holder_id) > clock_timestamp()
                     LIMIT 1) x
              LEFT JOIN holders h ON h.id = x.holder_id;
        ELSIF p_kinds[k] = 's' THEN
            SELECT x.holder_id, x.acquired_at, h.host, h.pid, h.application, h.expires_at INTO r
              FROM (SELECT l.holder_id, l.acquired_at
                      FROM locks l
                     WHERE l.name = p_names[k] AND l.entity_id = p_ids[k] AND l.holder_id <> p_holder
                       AND l.kind = 'x'
                       AND (SELECT h.expires_at FROM holders h WHERE h.id = l.holder_id) > clock_timestamp()
                     LIMIT 1) x
              LEFT JOIN holders h ON h.id = x.holder_id;
        ELSE
            -- All permits live, none of them the caller's.
            SELECT x.holder_id, x.acquired_at, h.host, h.pid, h.application, h.expires_at INTO r
              FROM (SELECT min(l.holder_id) AS holder_id, min(l.acquired_at) AS acquired_at
                      FROM locks l
                     WHERE l.name = p_names[k] AND l.entity_id = p_ids[k]
                       AND (SELECT h.expires_at FROM holders h WHERE h.id = l.holder_id) > clock_timestamp()
                    HAVING count(*) >= p_permits AND bool_and(l.kind = 'p' AND l.permits = p_permits
                                                              AND l.holder_id <> p_holder)) x
              LEFT JOIN holders h ON h.id = x.holder_id;
        END IF;
        IF FOUND THEN
            -- A waiter not yet queued on every key must queue, under the
            -- locks below. (Tested apart from p_wait, not in one condition
            -- with it: see above.)
            IF p_wait THEN
                IF EXISTS (SELECT FROM generate_series(1, n) x(i)
                            WHERE NOT EXISTS (SELECT FROM waiters w WHERE w.name = p_names[x.i]
                                                 AND w.entity_id = p_ids[x.i] AND w.holder_id = p_holder)) THEN
                    EXIT;
                END IF;
            END IF;
            acquired := false;
            busy := false;
            queued := p_wait;
            blocked := k;
            holder_id := r.holder_id;
            host := r.host;
            pid := r.pid;
            application := r.application;
            held_since := r.acquired_at;
            expires_in := r.expires_at - clock_timestamp();
            RETURN NEXT;
            RETURN;
        END IF;
    END LOOP;

    -- The fast refusal by the queue, for one key: live waiters ahead of the
    -- caller (all of them for a newcomer) that keep it out. Without this,
    -- every waiter woken by a release would queue for the key's queue lock
    -- behind the one that is served. Dead waiters do not count here; the
    -- locked path below deletes them.
    IF n = 1 AND NOT p_fresh AND NOT got_q THEN
        SELECT w.id INTO mine FROM waiters w
         WHERE w.name = p_names[1] AND w.entity_id = p_ids[1] AND w.holder_id = p_holder;
        IF p_kinds[1] = 'x' THEN
            SELECT w.holder_id, w.since AS acquired_at INTO r FROM waiters w
             WHERE w.name = p_names[1] AND w.entity_id = p_ids[1] AND w.id < coalesce(mine, 9223372036854775807)
               AND w.holder_id <> p_holder AND w.kind <> 'p'
               AND (SELECT h.expires_at FROM holders h WHERE h.id = w.holder_id) > clock_timestamp()
             LIMIT 1;
        ELSIF p_kinds[1] = 's' THEN
            SELECT w.holder_id, w.since AS acquired_at INTO r FROM waiters w
             WHERE w.name = p_names[1] AND w.entity_id = p_ids[1] AND w.id < coalesce(mine, 9223372036854775807)
               AND w.holder_id <> p_holder AND w.kind = 'x'
               AND (SELECT h.expires_at FROM holders h WHERE h.id = w.holder_id) > clock_timestamp()
             LIMIT 1;
        ELSE
            SELECT NULL::bigint AS holder_id, NULL::timestamptz AS acquired_at INTO r
             WHERE (SELECT count(*) FROM locks l
                     WHERE l.name = p_names[1] AND l.entity_id = p_ids[1]
                       AND (SELECT h.expires_at FROM holders h WHERE h.id = l.holder_id) > clock_timestamp())
                 + (SELECT count(*) FROM waiters w
                     WHERE w.name = p_names[1] AND w.entity_id = p_ids[1] AND w.id < coalesce(mine, 9223372036854775807)
                       AND w.holder_id <> p_holder
                       AND (SELECT h.expires_at FROM holders h WHERE h.id = w.holder_id) > clock_timestamp())
                   >= p_permits
               AND NOT EXISTS (SELECT FROM locks l WHERE l.name = p_names[1] AND l.entity_id = p_ids[1]
                                  AND (l.kind <> 'p' OR l.permits <> p_permits))
               AND NOT EXISTS (SELECT FROM waiters w WHERE w.name = p_names[1] AND w.entity_id = p_ids[1]
                                  AND (w.kind <> 'p' OR w.permits <> p_permits));
        END IF;
        IF FOUND AND (NOT p_wait OR mine IS NOT NULL) THEN
            -- Unless the caller has a grant of the key it did not know of
            -- (a handoff): it is adopted under the locks below.
            IF NOT EXISTS (SELECT FROM locks l WHERE l.name = p_names[1] AND l.entity_id = p_ids[1]
                              AND l.holder_id = p_holder AND NOT (l.token = ANY (p_keep))) THEN
                RETURN QUERY SELECT false, NULL::bigint[], NULL::bigint[], NULL::timestamptz,
                                    false, p_wait, 1, NULL::bigint, NULL::text, NULL::integer,
                                    NULL::text, NULL::timestamptz, NULL::interval, mine;
                RETURN;
            END IF;
        END IF;
        mine := NULL;
    END IF;

    -- Every delete below is quiet: this function serves the queues it
    -- changes itself (see serve), under the keys' locks it holds, after it
    -- knows whether it takes the keys. pglease.quiet is set before the first
    -- delete (quiet), and undone before every return; a call that deletes
    -- nothing changes no setting.
    touched := array_fill(false, ARRAY[n]);

    -- The keys in key_hash order: the one order every acquirer locks them in.
    IF n = 1 THEN
        ord := '{1}';
        hashes := ARRAY[coalesce(h1, key_hash(p_names[1], p_ids[1]))];
    ELSE
        SELECT array_agg(u.i ORDER BY u.h, u.i), array_agg(u.h ORDER BY u.h, u.i) INTO ord, hashes
          FROM (SELECT x.i, key_hash(p_names[x.i], p_ids[x.i]) AS h
                  FROM generate_series(1, n) AS x(i)) u;
    END IF;

    -- Under the keys' locks, in key_hash order: the queue lock, then the key
    -- lock. The queue lock is waited for: whoever holds it is another
    -- acquirer of the key for the length of one statement like this one (or
    -- advisory_acquire_shared drawing a token), which waits for no queue
    -- lock it does not hold already and only tries key locks, and every
    -- acquirer of several keys takes their queue locks in this same order: so
    -- no wait here can close a cycle. The key lock is only tried: on the
    -- advisory path a holder keeps it for as long as it holds the key.
    FOR i IN 1..n LOOP
        k := ord[i];
        IF NOT got_q THEN
            v := pg_advisory_xact_lock(1885826161, hashint8(hashes[i]))::text;
        END IF;
        IF NOT (CASE WHEN p_kinds[k] = 's' THEN pg_try_advisory_xact_lock_shared(hashes[i])
                     ELSE pg_try_advisory_xact_lock(hashes[i]) END)
           AND NOT key_lock_again(hashes[i], p_kinds[k] = 's') THEN
            -- Table acquirers take the queue lock first, and we have it: so
            -- the advisory path holds the key. Busy; a waiter for one key
            -- takes its place in the queue meanwhile (under the queue lock,
            -- so that the order of the queue holds).
            -- (Not a caller that has a grant of the key it did not know of,
            -- a handoff: it asks again, and adopts it.)
            IF p_wait AND n = 1 AND NOT EXISTS (
                   SELECT FROM locks l WHERE l.name = p_names[1] AND l.entity_id = p_ids[1]
                      AND l.holder_id = p_holder AND NOT (l.token = ANY (p_keep))) THEN
                -- A place in the queue need not survive a crash: a waiter
                -- whose row is lost queues again at its next call.
                v := set_config('synchronous_commit', 'off', true);
                INSERT INTO waiters AS w (name, entity_id, holder_id, kind, permits, set_size, handoff)
                VALUES (p_names[1], p_ids[1], p_holder, p_kinds[1], p_permits, 1, p_handoff)
                ON CONFLICT ON CONSTRAINT waiters_key_holder DO NOTHING;
                SELECT w.id INTO mine FROM waiters w
                 WHERE w.name = p_names[1] AND w.entity_id = p_ids[1] AND w.holder_id = p_holder;
            END IF;
            RETURN QUERY SELECT false, NULL::bigint[], NULL::bigint[], NULL::timestamptz,
                                true, p_wait AND n = 1, k, NULL::bigint, NULL::text, NULL::integer,
                                NULL::text, NULL::timestamptz, NULL::interval, mine;
            RETURN;
        END IF;
    END LOOP;

    <<keys>>
    FOR i IN 1..n LOOP
        k := ord[i];
        nm := p_names[k];
        ident := p_ids[k];
        kd := p_kinds[k];
        -- The grants: dead ones and this holder's orphans are deleted (a row
        -- locked by someone, a fenced write or a reaper, makes the key busy).
        -- Kinds must agree: a semaphore is one with every permit holder and
        -- waiter of its key, and never a lock at the same time.
        live_n := 0;
        live_x := false;
        FOR r IN SELECT x.token, x.holder_id, x.kind, x.slot, x.permits,
                        x.exp > clock_timestamp() AS alive, x.exp IS NOT NULL AS present
                   FROM (SELECT l.token, l.holder_id, l.kind, l.slot, l.permits,
                                (SELECT h.expires_at FROM holders h WHERE h.id = l.holder_id) AS exp
                           FROM locks l WHERE l.name = nm AND l.entity_id = ident) x LOOP
            IF (r.holder_id = p_holder AND r.token = ANY (p_keep)) OR (r.holder_id <> p_holder AND r.alive) THEN
                IF (kd = 'p') <> (r.kind = 'p') OR (kd = 'p' AND r.permits <> p_permits) THEN
                    PERFORM kind_conflict(nm, ident, r.kind, r.permits);
                END IF;
                live_n := live_n + 1;
                live_x := live_x OR r.kind = 'x';
                CONTINUE;
            END IF;
            -- An orphan of ours, or a grant of a dead holder: take it over.
            PERFORM 1 FROM locks l WHERE l.name = nm AND l.entity_id = ident AND l.token = r.token
                FOR UPDATE SKIP LOCKED;
            IF NOT FOUND THEN
                busy_k := k;
                EXIT keys;
            END IF;
            IF r.holder_id <> p_holder AND r.present THEN
                -- A real (no-op) UPDATE of the dead holder row: a heartbeat
                -- that already passed its expiry check waits for it and then
                -- re-checks, so it cannot revive the holder after we took its
                -- grant. The row is locked first without waiting (a heartbeat
                -- or a reaper has it: busy), so that nothing here waits while
                -- it holds the key's locks.
                PERFORM 1 FROM holders h WHERE h.id = r.holder_id FOR UPDATE SKIP LOCKED;
                IF NOT FOUND THEN
                    busy_k := k;
                    EXIT keys;
                END IF;
                UPDATE holders h SET expires_at = h.expires_at
                 WHERE h.id = r.holder_id AND h.expires_at <= clock_timestamp();
                IF NOT FOUND THEN
                    -- Renewed since we looked: alive after all. Ask again.
                    busy_k := k;
                    EXIT keys;
                END IF;
            END IF;
            IF n = 1 AND r.holder_id = p_holder AND adopt IS NULL AND r.kind = kd
               AND r.permits = p_permits THEN
                -- A grant of ours that we did not know of, of the kind asked
                -- for: a handoff whose notification has not arrived, or an
                -- acquire whose reply was lost. The key is ours: adopted below.
                adopt := r.token;
                adopt_s := r.slot;
                CONTINUE;
            END IF;
            IF NOT quiet THEN
                quiet := set_config('pglease.quiet', 'on', true) = 'on';
            END IF;
            DELETE FROM locks l WHERE l.name = nm AND l.entity_id = ident AND l.token = r.token;
            touched[k] := true;
        END LOOP;

        IF adopt IS NOT NULL THEN
            -- Adopted under a new token. The old one may be a lock the
            -- caller had and released, back after a crash undid the release
            -- (it commits asynchronously): handing that token out again would
            -- let a late write of the first holding pass a fence during the
            -- second.
            IF NOT quiet THEN
                quiet := set_config('pglease.quiet', 'on', true) = 'on';
            END IF;
            DELETE FROM locks l WHERE l.name = nm AND l.entity_id = ident AND l.token = adopt;
            DELETE FROM waiters w WHERE w.name = nm AND w.entity_id = ident AND w.holder_id = p_holder;
            IF NOT EXISTS (SELECT FROM token_guard) THEN
                PERFORM guard_tokens();
            END IF;
            t := nextval('token_seq');
            s := CASE WHEN kd = 's' THEN t ELSE adopt_s END;
            INSERT INTO locks AS l (name, entity_id, token, holder_id, kind, slot, permits)
            VALUES (nm, ident, t, p_holder, kd, s, p_permits)
            RETURNING l.acquired_at INTO now_at;
            IF kd <> 'x' THEN
                PERFORM serve(nm, ident, false);
            END IF;
            v := set_config('pglease.quiet', 'off', true);
            acquired := true;
            tokens := ARRAY[t];
            slots := ARRAY[s];
            acquired_at := now_at;
            busy := false;
            queued := false;
            RETURN NEXT;
            RETURN;
        END IF;

        -- The queue ahead of the caller. Waiters of dead holders go.
        ahead_n := 0;
        ahead_x := false;
        mine := NULL;
        FOR r IN SELECT w.id, w.holder_id, w.kind, w.permits,
                        coalesce((SELECT h.expires_at FROM holders h WHERE h.id = w.holder_id)
                                 > clock_timestamp(), false) AS alive
                   FROM waiters w
                  WHERE w.name = nm AND w.entity_id = ident ORDER BY w.id LOOP
            queue_seen := true;
            IF r.holder_id = p_holder THEN
                IF r.kind = kd AND r.permits = p_permits THEN
                    mine := r.id;
                    had_mine := true;
                ELSE -- asked for as something else now: queue anew
                    IF NOT quiet THEN
                        quiet := set_config('pglease.quiet', 'on', true) = 'on';
                    END IF;
                    DELETE FROM waiters w WHERE w.id = r.id;
                    touched[k] := true;
                END IF;
                EXIT;
            END IF;
            IF NOT r.alive THEN
                IF NOT quiet THEN
                    quiet := set_config('pglease.quiet', 'on', true) = 'on';
                END IF;
                DELETE FROM waiters w WHERE w.id = r.id;
                touched[k] := true;
                CONTINUE;
            END IF;
            IF (kd = 'p') <> (r.kind = 'p') OR (kd = 'p' AND r.permits <> p_permits) THEN
                PERFORM kind_conflict(nm, ident, r.kind, r.permits);
            END IF;
            ahead_n := ahead_n + 1;
            ahead_x := ahead_x OR r.kind = 'x';
        END LOOP;

        fits := CASE kd
                    WHEN 'x' THEN live_n = 0 AND ahead_n = 0
                    WHEN 's' THEN NOT live_x AND NOT ahead_x
                    ELSE live_n + ahead_n < p_permits
                END;
        IF NOT fits AND all_fit THEN
            all_fit := false;
            first_no := k;
        END IF;
        IF NOT fits AND NOT p_wait THEN
            EXIT; -- a try: the rest does not matter
        END IF;
    END LOOP;

    IF busy_k IS NOT NULL THEN
        -- A grant is locked by someone (a fenced write, a reaper), or its
        -- dead holder is being renewed or reaped: ask again soon.
        FOR i IN 1..n LOOP
            IF touched[ord[i]] THEN
                PERFORM serve(p_names[ord[i]], p_ids[ord[i]], false);
            END IF;
        END LOOP;
        IF quiet THEN
            v := set_config('pglease.quiet', 'off', true);
        END IF;
        RETURN QUERY SELECT false, NULL::bigint[], NULL::bigint[], NULL::timestamptz,
                            true, false, busy_k, NULL::bigint, NULL::text, NULL::integer,
                            NULL::text, NULL::timestamptz, NULL::interval, NULL::bigint;
        RETURN;
    END IF;

    IF NOT all_fit THEN
        IF p_wait AND NOT (n = 1 AND had_mine) THEN
            -- Not durably: see above. (A grant that serve makes below is.)
            v := set_config('synchronous_commit', 'off', true);
            -- Queue on every key, those that fit too (the set waits for all
            -- of them at once), in this one statement under all the keys'
            -- locks: two sets that share keys queue in the same order on
            -- every key they share, so neither waits behind the other twice.
            INSERT INTO waiters AS w (name, entity_id, holder_id, kind, permits, set_size, handoff)
            SELECT p_names[x.i], p_ids[x.i], p_holder, p_kinds[x.i], p_permits, n, p_handoff
              FROM generate_series(1, n) x(i)
            ON CONFLICT ON CONSTRAINT waiters_key_holder DO NOTHING;
            IF n = 1 THEN
                SELECT w.id INTO mine FROM waiters w
                 WHERE w.name = p_names[1] AND w.entity_id = p_ids[1] AND w.holder_id = p_holder;
            END IF;
        END IF;
        -- What this call took away (dead grants, dead waiters, orphans) may
        -- let waiters ahead of it in: they are served now.
        FOR i IN 1..n LOOP
            IF touched[ord[i]] THEN
                PERFORM serve(p_names[ord[i]], p_ids[ord[i]], false);
            END IF;
        END LOOP;
        IF quiet THEN
            v := set_config('pglease.quiet', 'off', true);
        END IF;
        SELECT x.holder_id, x.acquired_at, h.host, h.pid, h.application, h.expires_at INTO r
          FROM (SELECT l.holder_id, l.acquired_at FROM locks l
                 WHERE l.name = p_names[first_no] AND l.entity_id = p_ids[first_no]
                   AND l.holder_id <> p_holder
                   AND (SELECT hh.expires_at FROM holders hh WHERE hh.id = l.holder_id) > clock_timestamp()
                 ORDER BY l.kind = 'x' DESC, l.token LIMIT 1) x
          LEFT JOIN holders h ON h.id = x.holder_id;
        RETURN QUERY SELECT false, NULL::bigint[], NULL::bigint[], NULL::timestamptz,
                            false, p_wait, first_no, r.holder_id, r.host, r.pid, r.application,
                            r.acquired_at, r.expires_at - clock_timestamp(),
                            CASE WHEN p_wait AND n = 1 THEN mine END;
        RETURN;
    END IF;

    -- Every key fits: grant them all, in key_hash order, and leave the
    -- queues (quietly: a waiter turned holder frees nobody).
    IF NOT EXISTS (SELECT FROM token_guard) THEN
        PERFORM guard_tokens();
    END IF;
    IF had_mine THEN
        IF NOT quiet THEN
            quiet := set_config('pglease.quiet', 'on', true) = 'on';
        END IF;
        DELETE FROM waiters w
         USING unnest(p_names, p_ids) AS u(a, b)
         WHERE w.name = u.a AND w.entity_id = u.b AND w.holder_id = p_holder;
    END IF;
    n_tokens := array_fill(NULL::bigint, ARRAY[n]);
    n_slots := array_fill(NULL::bigint, ARRAY[n]);
    FOR i IN 1..n LOOP
        k := ord[i];
        t := nextval('token_seq');
        IF p_kinds[k] = 'x' THEN
            s := 0;
        ELSIF p_kinds[k] = 's' THEN
            s := t;
        ELSE
            SELECT min(x.s) INTO s FROM generate_series(1, p_permits) x(s)
             WHERE NOT EXISTS (SELECT FROM locks l WHERE l.name = p_names[k]
                                  AND l.entity_id = p_ids[k] AND l.slot = x.s);
        END IF;
        INSERT INTO locks AS l (name, entity_id, token, holder_id, kind, slot, permits)
        VALUES (p_names[k], p_ids[k], t, p_holder, p_kinds[k], s, p_permits)
        RETURNING l.acquired_at INTO now_at;
        n_tokens[k] := t;
        n_slots[k] := s;
    END LOOP;
    -- A shared grant or a permit may leave room for the waiters behind
    -- (readers after a reader, permits still free): serve them now rather
    -- than at the next release.
    IF n = 1 AND p_kinds[1] <> 'x' AND queue_seen THEN
        IF EXISTS (SELECT FROM waiters w WHERE w.name = p_names[1] AND w.entity_id = p_ids[1]) THEN
            PERFORM serve(p_names[1], p_ids[1], false);
        END IF;
    END IF;
    IF quiet THEN
        v := set_config('pglease.quiet', 'off', true);
    END IF;
    acquired := true;
    tokens := n_tokens;
    slots := n_slots;
    acquired_at := now_at;
    busy := false;
    queued := false;
    RETURN NEXT;
END
$$;
-- +goose StatementEnd
REVOKE EXECUTE ON FUNCTION grant_keys(text[], text[], "char"[], integer, bigint, boolean, bigint[], boolean, boolean) FROM PUBLIC;

DROP FUNCTION grant_keys(text[], text[], "char"[], integer, bigint, boolean, bigint[], boolean, boolean, bigint);

-- +goose StatementBegin
DO $$
BEGIN
    PERFORM pin_search_path();
END
$$;
-- +goose StatementEnd
