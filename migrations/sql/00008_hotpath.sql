-- pglease schema, version 8: the table path's hot path as cheap as the SQL
-- allows. The same protocol as version 7 (read its header), the same
-- signatures and results; only what each call spends changes:
--
-- - A blocking acquire of one key tries the key's queue lock first and, when
--   it is free, goes straight to the locked path: the refusals made without
--   the locks (three queries) are only for when another acquirer of the key
--   is in the middle of its own statement.
-- - pglease.quiet, which keeps the delete triggers from serving a queue that
--   grant_keys serves itself, is set only before grant_keys' first delete; an
--   acquire that deletes nothing changes no setting.
-- - A caller already queued is not queued again (an INSERT that conflicted,
--   and a SELECT of the row it knew), and a shared grant or a permit looks
--   for waiters behind it only when its scan of the queue saw some.
-- - A grant's result is returned from the function's own variables rather
--   than by a query.
-- - The helpers' calls that run for their effect are assignments rather
--   than PERFORM, which runs a query through the executor.
-- - The delete triggers share one helper, announce, for the notifications
--   on channel() that they send while someone listens there.
--
-- Left as they are, on purpose (see BENCHMARKS.md for the measurements):
-- - Each SECURITY DEFINER function keeps its pinned search_path, one
--   configuration change on entry and one on exit. Without it, a caller
--   could put a schema of its own ahead of pg_catalog and have its own
--   operators run with the owner's rights; schema-qualifying every operator
--   in every body instead would cost more in review than the 2 or 3
--   microseconds a call it saves.
-- - release still turns synchronous_commit off for its transaction: that
--   setting is what saves the release's WAL flush.
-- - A grant still reads token_guard (one query): the session setting that
--   guard_tokens leaves, which the advisory path's advisory_acquire trusts,
--   is the caller's to set, and these functions run with the owner's rights
--   (see version 5): a caller that skipped the guard after a crash could
--   draw a token that was handed out before it.
-- - The key's hash is computed here, not passed in by the client: the
--   queue lock and the key lock are taken on it, so a hash the server did
--   not check would let one caller's wrong hash break another's exclusion,
--   and checking it costs what computing it does (key_hash is inlined).

-- +goose Up

-- announce sends entries (JSON texts) on channel() as JSON arrays, as many
-- entries to a notification as fit in 8000 bytes: for the delete triggers,
-- while someone listens there.
-- +goose StatementBegin
CREATE FUNCTION announce(p_entries text[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    ch  text := channel();
    buf text := '';
    e   text;
BEGIN
    FOREACH e IN ARRAY p_entries LOOP
        IF buf <> '' AND octet_length(buf) + octet_length(e) + 3 > 7990 THEN
            PERFORM pg_notify(ch, '[' || buf || ']');
            buf := '';
        END IF;
        buf := CASE WHEN buf = '' THEN e ELSE buf || ',' || e END;
    END LOOP;
    IF buf <> '' THEN
        PERFORM pg_notify(ch, '[' || buf || ']');
    END IF;
END
$$;
-- +goose StatementEnd
REVOKE EXECUTE ON FUNCTION announce(text[]) FROM PUBLIC;

-- key_lock_again tries the key lock p_hash (shared or not) a few more
-- times, 0.1 to 0.4 ms apart, for a caller that holds the key's queue lock
-- and found the key lock taken; it returns whether it got it. A transaction
-- that held both (an acquire, a release that handed the key over) lets go of
-- them one after the other as it ends, so the acquirer that waited for the
-- queue lock can run while the key lock is still taken, by nobody who holds
-- the key. Measured before this (8 clients taking turns on one key): one
-- acquire in seven was told the key was busy, and one handoff in twenty
-- became a poke, each costing the waiter a wide LISTEN and more statements.
-- Only the advisory path holds a key lock for longer; a table acquirer of a
-- key held there now spends up to 1 ms more before it is told busy.
-- +goose StatementBegin
CREATE FUNCTION key_lock_again(p_hash bigint, p_shared boolean) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1..4 LOOP
        PERFORM pg_sleep(0.0001 * i);
        IF p_shared THEN
            IF pg_try_advisory_xact_lock_shared(p_hash) THEN
                RETURN true;
            END IF;
        ELSIF pg_try_advisory_xact_lock(p_hash) THEN
            RETURN true;
        END IF;
    END LOOP;
    RETURN false;
END
$$;
-- +goose StatementEnd
REVOKE EXECUTE ON FUNCTION key_lock_again(bigint, boolean) FROM PUBLIC;

-- serve, as in version 7, its settings changed by assignment.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION serve(p_name text, p_id text, p_try boolean) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    hash   bigint;
    r      record;
    live_n integer := 0;
    live_x boolean := false;
    n      integer := 0;
    fits   boolean;
    t      bigint;
    s      bigint;
    at     timestamptz;
    quiet  text := coalesce(current_setting('pglease.quiet', true), 'off');
    v      text;
BEGIN
    IF NOT EXISTS (SELECT FROM waiters w WHERE w.name = p_name AND w.entity_id = p_id) THEN
        RETURN 0;
    END IF;
    hash := key_hash(p_name, p_id);
    IF p_try AND NOT pg_try_advisory_xact_lock(1885826161, hashint8(hash)) THEN
        PERFORM poke(p_name, p_id);
        RETURN 0;
    END IF;
    FOR r IN SELECT l.kind,
                    coalesce((SELECT h.expires_at FROM holders h WHERE h.id = l.holder_id)
                             > clock_timestamp(), false) AS alive
               FROM locks l WHERE l.name = p_name AND l.entity_id = p_id LOOP
        IF NOT r.alive THEN
            PERFORM poke(p_name, p_id); -- its acquire takes the dead grant over
            RETURN 0;
        END IF;
        live_n := live_n + 1;
        live_x := live_x OR r.kind = 'x';
    END LOOP;
    v := set_config('pglease.quiet', 'on', true);
    FOR r IN SELECT w.id, w.holder_id, w.kind, w.permits, w.set_size, w.handoff,
                    coalesce((SELECT h.expires_at FROM holders h WHERE h.id = w.holder_id)
                             > clock_timestamp(), false) AS alive
               FROM waiters w
              WHERE w.name = p_name AND w.entity_id = p_id ORDER BY w.id LOOP
        IF NOT r.alive THEN
            DELETE FROM waiters w WHERE w.id = r.id; -- a dead waiter is never served
            CONTINUE;
        END IF;
        IF r.kind = 'x' THEN
            fits := live_n = 0;
        ELSIF r.kind = 's' THEN
            fits := NOT live_x;
        ELSE
            fits := live_n < r.permits;
        END IF;
        EXIT WHEN NOT fits;
        IF NOT r.handoff OR r.set_size > 1 THEN
            PERFORM poke(p_name, p_id); -- now the first waiter
            EXIT;
        END IF;
        IF n = 0 THEN
            -- The key lock, as grant_keys takes it: an advisory-path holder
            -- keeps it.
            IF NOT (CASE WHEN r.kind = 's' THEN pg_try_advisory_xact_lock_shared(hash)
                         ELSE pg_try_advisory_xact_lock(hash) END)
               AND NOT key_lock_again(hash, r.kind = 's') THEN
                PERFORM poke(p_name, p_id);
                EXIT;
            END IF;
            IF NOT EXISTS (SELECT FROM token_guard) THEN
                PERFORM guard_tokens();
            END IF;
            -- A grant must be durable, whatever the releaser chose.
            v := set_config('synchronous_commit', 'on', true);
        END IF;
        t := nextval('token_seq');
        IF r.kind = 'x' THEN
            s := 0;
        ELSIF r.kind = 's' THEN
            s := t;
        ELSE
            SELECT min(x.s) INTO s FROM generate_series(1, r.permits) x(s)
             WHERE NOT EXISTS (SELECT FROM locks l WHERE l.name = p_name
                                  AND l.entity_id = p_id AND l.slot = x.s);
        END IF;
        INSERT INTO locks AS l (name, entity_id, token, holder_id, kind, slot, permits)
        VALUES (p_name, p_id, t, r.holder_id, r.kind, s, r.permits)
        RETURNING l.acquired_at INTO at;
        DELETE FROM waiters w WHERE w.id = r.id;
        PERFORM pg_notify(channel() || '_' || r.holder_id,
                          json_build_array('h', p_name, p_id, t, s, r.id, r.kind, r.permits,
                                           (extract(epoch FROM at) * 1000000)::bigint)::text);
        n := n + 1;
        live_n := live_n + 1;
        live_x := live_x OR r.kind = 'x';
        EXIT WHEN r.kind = 'x';
    END LOOP;
    v := set_config('pglease.quiet', quiet, true);
    RETURN n;
END
$$;
-- +goose StatementEnd

-- The delete triggers, as in version 7, with announce.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION notify_deleted() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    k record;
    v text;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        IF NOT pg_try_advisory_lock(1885826163, hashtext(current_schema())) THEN
            PERFORM pg_notify(channel(), '*');
        ELSE
            v := pg_advisory_unlock(1885826163, hashtext(current_schema()))::text;
        END IF;
        FOR k IN SELECT DISTINCT w.name, w.entity_id, key_hash(w.name, w.entity_id) AS h
                   FROM waiters w ORDER BY 3 LOOP
            PERFORM serve(k.name, k.entity_id, true);
        END LOOP;
        RETURN NULL;
    END IF;
    IF current_setting('pglease.quiet', true) = 'on' THEN
        RETURN NULL;
    END IF;
    IF NOT pg_try_advisory_lock(1885826163, hashtext(current_schema())) THEN
        PERFORM announce(ARRAY(SELECT json_build_array(g.name, g.entity_id, g.token)::text FROM gone g));
    ELSE
        v := pg_advisory_unlock(1885826163, hashtext(current_schema()))::text;
    END IF;
    -- Most releases have nobody waiting: one query that stops at the first
    -- waiter tells, before the keys are sorted by their hashes.
    IF NOT EXISTS (SELECT FROM gone g
                    WHERE EXISTS (SELECT FROM waiters w WHERE w.name = g.name AND w.entity_id = g.entity_id)) THEN
        RETURN NULL;
    END IF;
    FOR k IN SELECT DISTINCT g.name, g.entity_id, key_hash(g.name, g.entity_id) AS h
               FROM gone g
              WHERE EXISTS (SELECT FROM waiters w WHERE w.name = g.name AND w.entity_id = g.entity_id)
              ORDER BY 3 LOOP
        PERFORM serve(k.name, k.entity_id, true);
    END LOOP;
    RETURN NULL;
END
$$;
-- +goose StatementEnd

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION notify_waiter_left() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    k record;
    v text;
BEGIN
    IF current_setting('pglease.quiet', true) = 'on' THEN
        RETURN NULL;
    END IF;
    IF NOT pg_try_advisory_lock(1885826163, hashtext(current_schema())) THEN
        PERFORM announce(ARRAY(SELECT DISTINCT json_build_array(g.name, g.entity_id, 0)::text FROM gone g));
    ELSE
        v := pg_advisory_unlock(1885826163, hashtext(current_schema()))::text;
    END IF;
    FOR k IN SELECT DISTINCT g.name, g.entity_id, key_hash(g.name, g.entity_id) AS h
               FROM gone g ORDER BY 3 LOOP
        PERFORM serve(k.name, k.entity_id, true);
    END LOOP;
    RETURN NULL;
END
$$;
-- +goose StatementEnd

-- grant_keys, as in version 7, with the savings listed above.
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

-- leave and release, as in version 7, their settings and locks taken by
-- assignment.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION leave(p_name text, p_id text, p_holder bigint, p_secret bytea, p_keep bigint[])
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    a integer;
    b integer;
    v text;
BEGIN
    IF NOT holder_matches(p_holder, p_secret) THEN
        RETURN 0;
    END IF;
    v := set_config('synchronous_commit', 'off', true);
    v := pg_advisory_xact_lock(1885826161, hashint8(key_hash(p_name, p_id)))::text;
    DELETE FROM waiters w WHERE w.name = p_name AND w.entity_id = p_id AND w.holder_id = p_holder;
    GET DIAGNOSTICS a = ROW_COUNT;
    DELETE FROM locks l WHERE l.name = p_name AND l.entity_id = p_id AND l.holder_id = p_holder
       AND NOT (l.token = ANY (coalesce(p_keep, '{}')));
    GET DIAGNOSTICS b = ROW_COUNT;
    -- And the key is served whether or not anything went: a client that is
    -- told to ask again for a key it no longer wants calls leave, so that
    -- the next waiter is not left waiting for a poke sent to it.
    PERFORM serve(p_name, p_id, false);
    RETURN a + b;
END
$$;
-- +goose StatementEnd

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION release(p_name text, p_id text, p_token bigint, p_holder bigint, p_secret bytea)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    v text;
BEGIN
    v := set_config('synchronous_commit', 'off', true);
    v := pg_advisory_xact_lock(1885826161, hashint8(key_hash(p_name, p_id)))::text;
    DELETE FROM locks l USING holders h
     WHERE l.name = p_name AND l.entity_id = p_id AND l.token = p_token AND l.holder_id = p_holder
       AND h.id = p_holder AND h.secret_hash = sha256(p_secret);
    IF FOUND THEN
        RETURN true;
    END IF;
    PERFORM holder_matches(p_holder, p_secret); -- raises for another holder's id
    RETURN false;
END
$$;
-- +goose StatementEnd

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION schema_info() RETURNS TABLE (version integer, compatible_from integer)
LANGUAGE sql STABLE AS $$
    SELECT 8, 3
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
    SELECT 7, 3
$$;
-- +goose StatementEnd
-- Version 7's bodies.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION release(p_name text, p_id text, p_token bigint, p_holder bigint, p_secret bytea)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM pg_advisory_xact_lock(1885826161, hashint8(key_hash(p_name, p_id)));
    DELETE FROM locks l USING holders h
     WHERE l.name = p_name AND l.entity_id = p_id AND l.token = p_token AND l.holder_id = p_holder
       AND h.id = p_holder AND h.secret_hash = sha256(p_secret);
    IF FOUND THEN
        RETURN true;
    END IF;
    PERFORM holder_matches(p_holder, p_secret); -- raises for another holder's id
    RETURN false;
END
$$;
-- +goose StatementEnd

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION leave(p_name text, p_id text, p_holder bigint, p_secret bytea, p_keep bigint[])
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    a integer;
    b integer;
BEGIN
    IF NOT holder_matches(p_holder, p_secret) THEN
        RETURN 0;
    END IF;
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM pg_advisory_xact_lock(1885826161, hashint8(key_hash(p_name, p_id)));
    DELETE FROM waiters w WHERE w.name = p_name AND w.entity_id = p_id AND w.holder_id = p_holder;
    GET DIAGNOSTICS a = ROW_COUNT;
    DELETE FROM locks l WHERE l.name = p_name AND l.entity_id = p_id AND l.holder_id = p_holder
       AND NOT (l.token = ANY (coalesce(p_keep, '{}')));
    GET DIAGNOSTICS b = ROW_COUNT;
    -- And the key is served whether or not anything went: a client that is
    -- told to ask again for a key it no longer wants calls leave, so that
    -- the next waiter is not left waiting for a poke sent to it.
    PERFORM serve(p_name, p_id, false);
    RETURN a + b;
END
$$;
-- +goose StatementEnd

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
        PERFORM set_config('synchronous_commit', 'on', true);
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
        EXIT WHEN p_fresh;
        IF p_kinds[k] = 'x' THEN
            SELECT l.holder_id, l.acquired_at INTO r
              FROM locks l
             WHERE l.name = p_names[k] AND l.entity_id = p_ids[k] AND l.holder_id <> p_holder
               AND l.kind <> 'p'
               AND (SELECT h.expires_at FROM holders h WHERE h.id = l.holder_id) > clock_timestamp()
             LIMIT 1;
        ELSIF p_kinds[k] = 's' THEN
            SELECT l.holder_id, l.acquired_at INTO r
              FROM locks l
             WHERE l.name = p_names[k] AND l.entity_id = p_ids[k] AND l.holder_id <> p_holder
               AND l.kind = 'x'
               AND (SELECT h.expires_at FROM holders h WHERE h.id = l.holder_id) > clock_timestamp()
             LIMIT 1;
        ELSE
            -- All permits live, none of them the caller's.
            SELECT min(l.holder_id) AS holder_id, min(l.acquired_at) AS acquired_at INTO r
              FROM locks l
             WHERE l.name = p_names[k] AND l.entity_id = p_ids[k]
               AND (SELECT h.expires_at FROM holders h WHERE h.id = l.holder_id) > clock_timestamp()
            HAVING count(*) >= p_permits AND bool_and(l.kind = 'p' AND l.permits = p_permits
                                                      AND l.holder_id <> p_holder);
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
            RETURN QUERY SELECT false, NULL::bigint[], NULL::bigint[], NULL::timestamptz,
                                false, p_wait, k, r.holder_id, h.host, h.pid, h.application,
                                r.acquired_at, h.expires_at - clock_timestamp(), NULL::bigint
                           FROM (SELECT) AS one LEFT JOIN holders h ON h.id = r.holder_id;
            RETURN;
        END IF;
    END LOOP;

    -- The fast refusal by the queue, for one key: live waiters ahead of the
    -- caller (all of them for a newcomer) that keep it out. Without this,
    -- every waiter woken by a release would queue for the key's queue lock
    -- behind the one that is served. Dead waiters do not count here; the
    -- locked path below deletes them.
    IF n = 1 AND NOT p_fresh THEN
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
    -- knows whether it takes the keys. Undone before every return.
    PERFORM set_config('pglease.quiet', 'on', true);
    touched := array_fill(false, ARRAY[n]);

    -- The keys in key_hash order: the one order every acquirer locks them in.
    IF n = 1 THEN
        ord := '{1}';
        hashes := ARRAY[key_hash(p_names[1], p_ids[1])];
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
        PERFORM pg_advisory_xact_lock(1885826161, hashint8(hashes[i]));
        IF NOT (CASE WHEN p_kinds[k] = 's' THEN pg_try_advisory_xact_lock_shared(hashes[i])
                     ELSE pg_try_advisory_xact_lock(hashes[i]) END) THEN
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
                PERFORM set_config('synchronous_commit', 'off', true);
                INSERT INTO waiters AS w (name, entity_id, holder_id, kind, permits, set_size, handoff)
                VALUES (p_names[1], p_ids[1], p_holder, p_kinds[1], p_permits, 1, p_handoff)
                ON CONFLICT ON CONSTRAINT waiters_key_holder DO NOTHING;
                SELECT w.id INTO mine FROM waiters w
                 WHERE w.name = p_names[1] AND w.entity_id = p_ids[1] AND w.holder_id = p_holder;
            END IF;
            PERFORM set_config('pglease.quiet', 'off', true);
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
            DELETE FROM locks l WHERE l.name = nm AND l.entity_id = ident AND l.token = r.token;
            touched[k] := true;
        END LOOP;

        IF adopt IS NOT NULL THEN
            -- Adopted under a new token. The old one may be a lock the
            -- caller had and released, back after a crash undid the release
            -- (it commits asynchronously): handing that token out again would
            -- let a late write of the first holding pass a fence during the
            -- second.
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
            PERFORM set_config('pglease.quiet', 'off', true);
            RETURN QUERY SELECT true, ARRAY[t], ARRAY[s], now_at, false, false, NULL::integer,
                                NULL::bigint, NULL::text, NULL::integer, NULL::text,
                                NULL::timestamptz, NULL::interval, NULL::bigint;
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
            IF r.holder_id = p_holder THEN
                IF r.kind = kd AND r.permits = p_permits THEN
                    mine := r.id;
                    had_mine := true;
                ELSE -- asked for as something else now: queue anew
                    DELETE FROM waiters w WHERE w.id = r.id;
                    touched[k] := true;
                END IF;
                EXIT;
            END IF;
            IF NOT r.alive THEN
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
        PERFORM set_config('pglease.quiet', 'off', true);
        RETURN QUERY SELECT false, NULL::bigint[], NULL::bigint[], NULL::timestamptz,
                            true, false, busy_k, NULL::bigint, NULL::text, NULL::integer,
                            NULL::text, NULL::timestamptz, NULL::interval, NULL::bigint;
        RETURN;
    END IF;

    IF NOT all_fit THEN
        IF p_wait THEN
            -- Not durably: see above. (A grant that serve makes below is.)
            PERFORM set_config('synchronous_commit', 'off', true);
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
        PERFORM set_config('pglease.quiet', 'off', true);
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
    IF n = 1 AND p_kinds[1] <> 'x' THEN
        IF EXISTS (SELECT FROM waiters w WHERE w.name = p_names[1] AND w.entity_id = p_ids[1]) THEN
            PERFORM serve(p_names[1], p_ids[1], false);
        END IF;
    END IF;
    PERFORM set_config('pglease.quiet', 'off', true);
    RETURN QUERY SELECT true, n_tokens, n_slots, now_at, false, false, NULL::integer, NULL::bigint,
                        NULL::text, NULL::integer, NULL::text, NULL::timestamptz, NULL::interval,
                        NULL::bigint;
END
$$;
-- +goose StatementEnd
REVOKE EXECUTE ON FUNCTION grant_keys(text[], text[], "char"[], integer, bigint, boolean, bigint[], boolean, boolean) FROM PUBLIC;

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION notify_waiter_left() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    ch  text;
    buf text := '';
    e   text;
    k   record;
BEGIN
    IF current_setting('pglease.quiet', true) = 'on' THEN
        RETURN NULL;
    END IF;
    IF NOT pg_try_advisory_lock(1885826163, hashtext(current_schema())) THEN
        ch := channel();
        FOR e IN SELECT DISTINCT json_build_array(g.name, g.entity_id, 0)::text FROM gone g LOOP
            IF buf <> '' AND octet_length(buf) + octet_length(e) + 3 > 7990 THEN
                PERFORM pg_notify(ch, '[' || buf || ']');
                buf := '';
            END IF;
            buf := CASE WHEN buf = '' THEN e ELSE buf || ',' || e END;
        END LOOP;
        IF buf <> '' THEN
            PERFORM pg_notify(ch, '[' || buf || ']');
        END IF;
    ELSE
        PERFORM pg_advisory_unlock(1885826163, hashtext(current_schema()));
    END IF;
    FOR k IN SELECT DISTINCT g.name, g.entity_id, key_hash(g.name, g.entity_id) AS h
               FROM gone g ORDER BY 3 LOOP
        PERFORM serve(k.name, k.entity_id, true);
    END LOOP;
    RETURN NULL;
END
$$;
-- +goose StatementEnd

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION notify_deleted() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    ch  text;
    buf text := '';
    e   text;
    k   record;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        IF NOT pg_try_advisory_lock(1885826163, hashtext(current_schema())) THEN
            PERFORM pg_notify(channel(), '*');
        ELSE
            PERFORM pg_advisory_unlock(1885826163, hashtext(current_schema()));
        END IF;
        FOR k IN SELECT DISTINCT w.name, w.entity_id, key_hash(w.name, w.entity_id) AS h
                   FROM waiters w ORDER BY 3 LOOP
            PERFORM serve(k.name, k.entity_id, true);
        END LOOP;
        RETURN NULL;
    END IF;
    IF current_setting('pglease.quiet', true) = 'on' THEN
        RETURN NULL;
    END IF;
    IF NOT pg_try_advisory_lock(1885826163, hashtext(current_schema())) THEN
        ch := channel();
        FOR e IN SELECT json_build_array(g.name, g.entity_id, g.token)::text FROM gone g LOOP
            IF buf <> '' AND octet_length(buf) + octet_length(e) + 3 > 7990 THEN
                PERFORM pg_notify(ch, '[' || buf || ']');
                buf := '';
            END IF;
            buf := CASE WHEN buf = '' THEN e ELSE buf || ',' || e END;
        END LOOP;
        IF buf <> '' THEN
            PERFORM pg_notify(ch, '[' || buf || ']');
        END IF;
    ELSE
        PERFORM pg_advisory_unlock(1885826163, hashtext(current_schema()));
    END IF;
    FOR k IN SELECT DISTINCT g.name, g.entity_id, key_hash(g.name, g.entity_id) AS h
               FROM gone g
              WHERE EXISTS (SELECT FROM waiters w WHERE w.name = g.name AND w.entity_id = g.entity_id)
              ORDER BY 3 LOOP
        PERFORM serve(k.name, k.entity_id, true);
    END LOOP;
    RETURN NULL;
END
$$;
-- +goose StatementEnd

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION serve(p_name text, p_id text, p_try boolean) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    hash   bigint;
    r      record;
    live_n integer := 0;
    live_x boolean := false;
    n      integer := 0;
    fits   boolean;
    t      bigint;
    s      bigint;
    at     timestamptz;
    quiet  text := coalesce(current_setting('pglease.quiet', true), 'off');
BEGIN
    IF NOT EXISTS (SELECT FROM waiters w WHERE w.name = p_name AND w.entity_id = p_id) THEN
        RETURN 0;
    END IF;
    hash := key_hash(p_name, p_id);
    IF p_try AND NOT pg_try_advisory_xact_lock(1885826161, hashint8(hash)) THEN
        PERFORM poke(p_name, p_id);
        RETURN 0;
    END IF;
    FOR r IN SELECT l.kind,
                    coalesce((SELECT h.expires_at FROM holders h WHERE h.id = l.holder_id)
                             > clock_timestamp(), false) AS alive
               FROM locks l WHERE l.name = p_name AND l.entity_id = p_id LOOP
        IF NOT r.alive THEN
            PERFORM poke(p_name, p_id); -- its acquire takes the dead grant over
            RETURN 0;
        END IF;
        live_n := live_n + 1;
        live_x := live_x OR r.kind = 'x';
    END LOOP;
    PERFORM set_config('pglease.quiet', 'on', true);
    FOR r IN SELECT w.id, w.holder_id, w.kind, w.permits, w.set_size, w.handoff,
                    coalesce((SELECT h.expires_at FROM holders h WHERE h.id = w.holder_id)
                             > clock_timestamp(), false) AS alive
               FROM waiters w
              WHERE w.name = p_name AND w.entity_id = p_id ORDER BY w.id LOOP
        IF NOT r.alive THEN
            DELETE FROM waiters w WHERE w.id = r.id; -- a dead waiter is never served
            CONTINUE;
        END IF;
        IF r.kind = 'x' THEN
            fits := live_n = 0;
        ELSIF r.kind = 's' THEN
            fits := NOT live_x;
        ELSE
            fits := live_n < r.permits;
        END IF;
        EXIT WHEN NOT fits;
        IF NOT r.handoff OR r.set_size > 1 THEN
            PERFORM poke(p_name, p_id); -- now the first waiter
            EXIT;
        END IF;
        IF n = 0 THEN
            -- The key lock, as grant_keys takes it: an advisory-path holder
            -- keeps it.
            IF NOT (CASE WHEN r.kind = 's' THEN pg_try_advisory_xact_lock_shared(hash)
                         ELSE pg_try_advisory_xact_lock(hash) END) THEN
                PERFORM poke(p_name, p_id);
                EXIT;
            END IF;
            IF NOT EXISTS (SELECT FROM token_guard) THEN
                PERFORM guard_tokens();
            END IF;
            -- A grant must be durable, whatever the releaser chose.
            PERFORM set_config('synchronous_commit', 'on', true);
        END IF;
        t := nextval('token_seq');
        IF r.kind = 'x' THEN
            s := 0;
        ELSIF r.kind = 's' THEN
            s := t;
        ELSE
            SELECT min(x.s) INTO s FROM generate_series(1, r.permits) x(s)
             WHERE NOT EXISTS (SELECT FROM locks l WHERE l.name = p_name
                                  AND l.entity_id = p_id AND l.slot = x.s);
        END IF;
        INSERT INTO locks AS l (name, entity_id, token, holder_id, kind, slot, permits)
        VALUES (p_name, p_id, t, r.holder_id, r.kind, s, r.permits)
        RETURNING l.acquired_at INTO at;
        DELETE FROM waiters w WHERE w.id = r.id;
        PERFORM pg_notify(channel() || '_' || r.holder_id,
                          json_build_array('h', p_name, p_id, t, s, r.id, r.kind, r.permits,
                                           (extract(epoch FROM at) * 1000000)::bigint)::text);
        n := n + 1;
        live_n := live_n + 1;
        live_x := live_x OR r.kind = 'x';
        EXIT WHEN r.kind = 'x';
    END LOOP;
    PERFORM set_config('pglease.quiet', quiet, true);
    RETURN n;
END
$$;
-- +goose StatementEnd

DROP FUNCTION announce(text[]);
DROP FUNCTION key_lock_again(bigint, boolean);

-- +goose StatementBegin
DO $$
BEGIN
    PERFORM pin_search_path();
END
$$;
-- +goose StatementEnd
