-- pglease schema, version 6: lock kinds (exclusive, shared, semaphore
-- permits), key sets, and a wait queue that every client can see.
--
-- Grants. A lock row is now a grant: kind 'x' (exclusive, slot 0), 's'
-- (shared, slot = its token) or 'p' (permit `slot` of `permits`, slot 1 to
-- permits). The primary key is (name, entity_id, slot), so at most one
-- exclusive grant and at most N permits exist by construction; which kinds
-- may coexist on a key is decided under the key's locks (below). Rows are
-- still only inserted and deleted.
--
-- The queue. An acquirer that has to wait inserts a row into waiters; the
-- identity column gives arrival order across every client. A grant is made
-- only when it fits beside the key's live grants and beside every live
-- waiter queued before it (strict arrival order): an exclusive request when
-- nothing is held and nobody waits ahead; a shared one when no exclusive
-- grant is held and no exclusive waiter waits ahead; a permit when the live
-- grants plus the waiters ahead leave one free. A waiter whose holder is dead
-- is deleted by whoever meets it, and by the reaper. The view waiting shows
-- the queue.
--
-- Per-key serialisation. Every table-path grant of a key is made under two
-- transaction-level advisory locks, taken in this order: the key's queue
-- lock, the pair ('pglq', hashint8(key_hash)), exclusive, which serialises
-- table acquirers of the key and guards its queue (waited for: it is held
-- for one statement); then the key lock key_hash itself (shared for a shared
-- grant, else exclusive, and only tried: an advisory-path holder keeps it),
-- which is what excludes the advisory path. Tokens are drawn
-- under both, so the tokens of a key grow in commit order across all table
-- grants, and across paths wherever the grants exclude each other. A key
-- set takes the locks of its keys in key_hash order.
--
-- Clients of versions 3 to 5 keep working: their acquire functions are
-- replaced below by ones that go through the same engine as exclusive
-- requests that do not wait (they do not queue; they retry on release
-- notifications as before, behind any queued waiters).
--
-- Names are unqualified, as in the earlier versions.

-- +goose Up

ALTER TABLE locks
    ADD COLUMN kind "char" NOT NULL DEFAULT 'x',
    ADD COLUMN slot bigint NOT NULL DEFAULT 0,
    ADD COLUMN permits integer NOT NULL DEFAULT 1,
    ADD CONSTRAINT locks_kind_check CHECK (kind IN ('x', 's', 'p')),
    ADD CONSTRAINT locks_slot_check CHECK (
        (kind = 'x' AND slot = 0 AND permits = 1) OR
        (kind = 's' AND slot = token AND permits = 1) OR
        (kind = 'p' AND slot BETWEEN 1 AND permits AND permits BETWEEN 1 AND 1024));
ALTER TABLE locks DROP CONSTRAINT locks_pkey;
ALTER TABLE locks ADD CONSTRAINT locks_pkey PRIMARY KEY (name, entity_id, slot);

-- One row per waiting acquirer and key. At most one per holder and key: a
-- client asks for a key through one attempt at a time, and an attempt that
-- finds its own row keeps its place. Insert/delete-only, no foreign key (as
-- locks).
CREATE TABLE waiters (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text        NOT NULL,
    entity_id   text        NOT NULL,
    holder_id   bigint      NOT NULL,
    kind        "char"      NOT NULL CHECK (kind IN ('x', 's', 'p')),
    permits     integer     NOT NULL DEFAULT 1 CHECK (permits BETWEEN 1 AND 1024),
    set_size    integer     NOT NULL DEFAULT 1 CHECK (set_size BETWEEN 1 AND 64),
    since       timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT waiters_key_holder UNIQUE (name, entity_id, holder_id)
);
CREATE INDEX waiters_holder_id ON waiters (holder_id);

-- Waking the queue: when a waiter leaves (gave up, or was found dead), the
-- ones behind it may now be served; they hear it on channel() as if a grant
-- of the key with token 0 had been released. A waiter that becomes a grant
-- leaves quietly: that frees nobody.
-- +goose StatementBegin
CREATE FUNCTION notify_waiter_left() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    ch  text := channel();
    buf text := '';
    e   text;
BEGIN
    IF current_setting('pglease.quiet', true) = 'on' THEN
        RETURN NULL;
    END IF;
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
    RETURN NULL;
END
$$;
-- +goose StatementEnd
CREATE TRIGGER waiters_notify_delete AFTER DELETE ON waiters
    REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION notify_waiter_left();

-- key_hash, with the same result as version 3's, now inlinable: the planner
-- folds a call into the calling statement, where version 3's pinned
-- search_path cost a configuration change on entry and exit of every call
-- (the table path hashes every key it acquires). So it names everything
-- itself: PostgreSQL's functions with pg_catalog, and this schema's name as
-- a literal (what current_schema() returned in version 3's, which could
-- differ in a caller with another search_path only because it was pinned).
-- +goose StatementBegin
DO $gen$
BEGIN
    EXECUTE replace($f$
CREATE OR REPLACE FUNCTION key_hash(p_name text, p_id text) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT ('x' || pg_catalog.encode(pg_catalog.substring(pg_catalog.sha256(
               pg_catalog.convert_to(@schema@, 'UTF8') || pg_catalog.decode('00', 'hex') ||
               pg_catalog.convert_to(p_name, 'UTF8') || pg_catalog.decode('00', 'hex') ||
               pg_catalog.convert_to(p_id, 'UTF8')), 1, 8), 'hex'))::pg_catalog.bit(64)::pg_catalog.int8
$$
$f$, '@schema@', quote_literal(current_schema()));
END
$gen$;
-- +goose StatementEnd

-- kind_conflict raises SQLSTATE 55L05 for (p_name, p_id), in use as kind
-- p_kind (with p_permits permits): see grant_keys.
-- +goose StatementBegin
CREATE FUNCTION kind_conflict(p_name text, p_id text, p_kind "char", p_permits integer) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'pglease: (%, %) is in use as %', p_name, p_id,
        CASE WHEN p_kind = 'p' THEN format('a semaphore of %s permits', p_permits)
             WHEN p_kind = 's' THEN 'a shared lock' ELSE 'an exclusive lock' END
        USING ERRCODE = '55L05',
              HINT = 'every user of a key must ask for it as the same kind, and a semaphore with the same number of permits';
END
$$;
-- +goose StatementEnd

-- grant_keys is the acquire engine: every table-path acquire, of one key or
-- a set, of any kind, old clients' included, runs it. It acts for holder
-- p_holder without checking who calls (acquire_keys checks the secret) and
-- runs with its caller's rights.
--
-- p_names, p_ids, p_kinds: the keys and their kinds ('x' or 's'; 'p' for a
-- semaphore of p_permits permits, one key only), in any order (they are
-- served in key_hash order). p_wait: queue when the request cannot be granted
-- now. p_keep: the tokens the caller holds on these keys; any other grant of
-- p_holder on them is an orphan (an acquire whose reply was lost, a release
-- still pending) and is deleted.
--
-- Result, one row: acquired, with tokens and slots in the order of the keys
-- given, acquired_at; or not, with busy (a key's locks are taken right now:
-- ask again soon), queued (the caller waits in the queue of every key, and
-- will hear of a release), blocked (the index, from 1, of a key that could
-- not be granted) and who holds that key (holder_id and so on, when a live
-- grant of another holder is in the way). A key asked for as another kind
-- than it is held or awaited as raises SQLSTATE 55L05.
-- +goose StatementBegin
CREATE FUNCTION grant_keys(p_names text[], p_ids text[], p_kinds "char"[], p_permits integer,
                           p_holder bigint, p_wait boolean, p_keep bigint[])
RETURNS TABLE (acquired boolean, tokens bigint[], slots bigint[], acquired_at timestamptz,
               busy boolean, queued boolean, blocked integer, holder_id bigint, host text,
               pid integer, application text, held_since timestamptz, expires_in interval)
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
    quiet    boolean;
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
                                r.acquired_at, h.expires_at - clock_timestamp()
                           FROM (SELECT) AS one LEFT JOIN holders h ON h.id = r.holder_id;
            RETURN;
        END IF;
    END LOOP;

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
            IF p_wait AND n = 1 THEN
                INSERT INTO waiters AS w (name, entity_id, holder_id, kind, permits, set_size)
                VALUES (p_names[1], p_ids[1], p_holder, p_kinds[1], p_permits, 1)
                ON CONFLICT ON CONSTRAINT waiters_key_holder DO NOTHING;
            END IF;
            RETURN QUERY SELECT false, NULL::bigint[], NULL::bigint[], NULL::timestamptz,
                                true, p_wait AND n = 1, k, NULL::bigint, NULL::text, NULL::integer,
                                NULL::text, NULL::timestamptz, NULL::interval;
            RETURN;
        END IF;
    END LOOP;

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
        quiet := NULL;
        FOR r IN SELECT x.token, x.holder_id, x.kind, x.permits,
                        x.exp > clock_timestamp() AS alive, x.exp IS NOT NULL AS present
                   FROM (SELECT l.token, l.holder_id, l.kind, l.permits,
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
                RETURN QUERY SELECT false, NULL::bigint[], NULL::bigint[], NULL::timestamptz,
                                    true, false, k, NULL::bigint, NULL::text, NULL::integer,
                                    NULL::text, NULL::timestamptz, NULL::interval;
                RETURN;
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
                    RETURN QUERY SELECT false, NULL::bigint[], NULL::bigint[], NULL::timestamptz,
                                        true, false, k, NULL::bigint, NULL::text, NULL::integer,
                                        NULL::text, NULL::timestamptz, NULL::interval;
                    RETURN;
                END IF;
                UPDATE holders h SET expires_at = h.expires_at
                 WHERE h.id = r.holder_id AND h.expires_at <= clock_timestamp();
                IF NOT FOUND THEN
                    -- Renewed since we looked: alive after all. Ask again.
                    RETURN QUERY SELECT false, NULL::bigint[], NULL::bigint[], NULL::timestamptz,
                                        true, false, k, NULL::bigint, NULL::text, NULL::integer,
                                        NULL::text, NULL::timestamptz, NULL::interval;
                    RETURN;
                END IF;
            END IF;
            -- Quietly unless someone else waits: they are told (a freed
            -- permit may be theirs); else the key is about to be held again.
            IF quiet IS NULL THEN
                quiet := NOT EXISTS (SELECT FROM waiters w WHERE w.name = nm AND w.entity_id = ident
                                        AND w.holder_id <> p_holder);
            END IF;
            IF quiet THEN
                PERFORM set_config('pglease.quiet', 'on', true);
            END IF;
            DELETE FROM locks l WHERE l.name = nm AND l.entity_id = ident AND l.token = r.token;
            IF quiet THEN
                PERFORM set_config('pglease.quiet', 'off', true);
            END IF;
        END LOOP;

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
                    PERFORM set_config('pglease.quiet', 'on', true);
                    DELETE FROM waiters w WHERE w.id = r.id;
                    PERFORM set_config('pglease.quiet', 'off', true);
                END IF;
                EXIT;
            END IF;
            IF NOT r.alive THEN
                DELETE FROM waiters w WHERE w.id = r.id;
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

    IF NOT all_fit THEN
        IF p_wait THEN
            -- Queue on every key, those that fit too (the set waits for all
            -- of them at once), in this one statement under all the keys'
            -- locks: two sets that share keys queue in the same order on
            -- every key they share, so neither waits behind the other twice.
            INSERT INTO waiters AS w (name, entity_id, holder_id, kind, permits, set_size)
            SELECT p_names[x.i], p_ids[x.i], p_holder, p_kinds[x.i], p_permits, n
              FROM generate_series(1, n) x(i)
            ON CONFLICT ON CONSTRAINT waiters_key_holder DO NOTHING;
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
                            r.acquired_at, r.expires_at - clock_timestamp();
        RETURN;
    END IF;

    -- Every key fits: grant them all, in key_hash order, and leave the
    -- queues (quietly: a waiter turned holder frees nobody).
    IF NOT EXISTS (SELECT FROM token_guard) THEN
        PERFORM guard_tokens();
    END IF;
    IF had_mine THEN
        PERFORM set_config('pglease.quiet', 'on', true);
        DELETE FROM waiters w
         USING unnest(p_names, p_ids) AS u(a, b)
         WHERE w.name = u.a AND w.entity_id = u.b AND w.holder_id = p_holder;
        PERFORM set_config('pglease.quiet', 'off', true);
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
    RETURN QUERY SELECT true, n_tokens, n_slots, now_at, false, false, NULL::integer, NULL::bigint,
                        NULL::text, NULL::integer, NULL::text, NULL::timestamptz, NULL::interval;
END
$$;
-- +goose StatementEnd

-- acquire_keys is grant_keys for holder p_holder proving itself with
-- p_secret (see version 5): what the client calls for every table-path
-- acquire.
-- +goose StatementBegin
CREATE FUNCTION acquire_keys(p_names text[], p_ids text[], p_kinds "char"[], p_permits integer,
                             p_holder bigint, p_secret bytea, p_wait boolean, p_keep bigint[])
RETURNS TABLE (acquired boolean, tokens bigint[], slots bigint[], acquired_at timestamptz,
               busy boolean, queued boolean, blocked integer, holder_id bigint, host text,
               pid integer, application text, held_since timestamptz, expires_in interval)
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
    RETURN QUERY SELECT * FROM grant_keys(p_names, p_ids, p_kinds, p_permits, p_holder, p_wait, p_keep);
END
$$;
-- +goose StatementEnd
REVOKE EXECUTE ON FUNCTION acquire_keys(text[], text[], "char"[], integer, bigint, bytea, boolean, bigint[]) FROM PUBLIC;

-- The acquire functions of versions 1 and 5, for clients of versions 3 to 5:
-- an exclusive request through the engine that does not queue, with their
-- old result (busy also when queued waiters come first). Version 1's runs
-- with its caller's rights, as before; version 5's checks the secret.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION acquire(p_name text, p_id text, p_holder bigint)
RETURNS TABLE (acquired boolean, token bigint, holder_id bigint, host text, pid integer,
               application text, acquired_at timestamptz, expires_in interval, busy boolean)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM holders h WHERE h.id = p_holder AND h.expires_at > clock_timestamp();
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pglease: holder % has expired', p_holder
            USING ERRCODE = '55L02', HINT = 'register a new holder';
    END IF;
    RETURN QUERY
        SELECT g.acquired, g.tokens[1], g.holder_id, g.host, g.pid, g.application,
               coalesce(g.acquired_at, g.held_since), g.expires_in, g.busy OR g.holder_id IS NULL AND NOT g.acquired
          FROM grant_keys(ARRAY[p_name], ARRAY[p_id], ARRAY['x']::"char"[], 1, p_holder, false, '{}') g;
END
$$;
-- +goose StatementEnd

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION acquire(p_name text, p_id text, p_holder bigint, p_secret bytea)
RETURNS TABLE (acquired boolean, token bigint, holder_id bigint, host text, pid integer,
               application text, acquired_at timestamptz, expires_in interval, busy boolean)
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    RETURN QUERY
        SELECT g.acquired, g.tokens[1], g.holder_id, g.host, g.pid, g.application,
               coalesce(g.acquired_at, g.held_since), g.expires_in, g.busy OR g.holder_id IS NULL AND NOT g.acquired
          FROM acquire_keys(ARRAY[p_name], ARRAY[p_id], ARRAY['x']::"char"[], 1, p_holder, p_secret, false, '{}') g;
END
$$;
-- +goose StatementEnd

-- leave is the clean-up of a key this client asked for and does not hold:
-- it deletes holder p_holder's waiter row of (p_name, p_id) (an acquirer
-- that gave up) and every grant of it on the key whose token is not in
-- p_keep (orphans: an acquire whose reply was lost). Returns how many rows
-- went. Waiters behind hear of it (see notify_waiter_left).
-- +goose StatementBegin
CREATE FUNCTION leave(p_name text, p_id text, p_holder bigint, p_secret bytea, p_keep bigint[])
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
    DELETE FROM waiters w WHERE w.name = p_name AND w.entity_id = p_id AND w.holder_id = p_holder;
    GET DIAGNOSTICS a = ROW_COUNT;
    DELETE FROM locks l WHERE l.name = p_name AND l.entity_id = p_id AND l.holder_id = p_holder
       AND NOT (l.token = ANY (coalesce(p_keep, '{}')));
    GET DIAGNOSTICS b = ROW_COUNT;
    RETURN a + b;
END
$$;
-- +goose StatementEnd
REVOKE EXECUTE ON FUNCTION leave(text, text, bigint, bytea, bigint[]) FROM PUBLIC;

-- close_holder, as in version 5, and the holder's waiter rows with it.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION close_holder(p_holder bigint, p_secret bytea) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF NOT holder_matches(p_holder, p_secret) THEN
        RETURN false;
    END IF;
    DELETE FROM waiters w WHERE w.holder_id = p_holder;
    DELETE FROM locks l WHERE l.holder_id = p_holder;
    DELETE FROM holders h WHERE h.id = p_holder;
    RETURN true;
END
$$;
-- +goose StatementEnd

-- reap_holders, as in version 4, and then the waiter rows of holders that
-- are gone or expired (up to p_batch): they are skipped by every acquirer
-- anyway, and their going wakes the waiters behind them.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION reap_holders(p_batch integer) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    n integer;
BEGIN
    IF p_batch IS NULL OR p_batch < 1 OR p_batch > 100000 THEN
        RAISE EXCEPTION 'pglease: batch size % is out of range', coalesce(p_batch::text, 'NULL')
            USING ERRCODE = '22023',
                  HINT = 'pass the most rows one call may delete, from 1 to 100000 (the reaper uses 1000)';
    END IF;
    PERFORM set_config('synchronous_commit', 'off', true);
    DELETE FROM holders h
     WHERE h.id = ANY (ARRAY(
             SELECT d.id FROM holders d
              WHERE d.expires_at <= (SELECT clock_timestamp())
              ORDER BY d.expires_at
              LIMIT p_batch
                FOR UPDATE SKIP LOCKED))
       AND h.expires_at <= clock_timestamp();
    GET DIAGNOSTICS n = ROW_COUNT;
    DELETE FROM waiters w
     WHERE w.id = ANY (ARRAY(
             SELECT d.id FROM waiters d
              WHERE NOT EXISTS (SELECT FROM holders h WHERE h.id = d.holder_id
                                   AND h.expires_at > clock_timestamp())
              ORDER BY d.id
              LIMIT p_batch
                FOR UPDATE SKIP LOCKED));
    RETURN n;
END
$$;
-- +goose StatementEnd

-- advisory_takeover, for the advisory path's exclusive acquirer holding the
-- key's advisory lock, now looks at every grant of the key: -1 when a live
-- holder has any (the key is held on the table path), 0 when a dead one is
-- locked by someone (busy), else 1 after deleting every dead grant.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION advisory_takeover(p_name text, p_id text) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    RETURN advisory_takeover_kinds(p_name, p_id, ARRAY['x', 's', 'p']::"char"[]);
END
$$;
-- +goose StatementEnd

-- advisory_takeover_kinds is advisory_takeover for the grants of kinds
-- p_kinds only (a shared advisory acquirer minds no shared grant).
-- +goose StatementBegin
CREATE FUNCTION advisory_takeover_kinds(p_name text, p_id text, p_kinds "char"[]) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    r record;
BEGIN
    IF EXISTS (SELECT FROM locks l JOIN holders h ON h.id = l.holder_id
                WHERE l.name = p_name AND l.entity_id = p_id AND l.kind = ANY (p_kinds)
                  AND h.expires_at > clock_timestamp()) THEN
        RETURN -1;
    END IF;
    FOR r IN SELECT l.token, l.holder_id, h.id IS NOT NULL AS present
               FROM locks l LEFT JOIN holders h ON h.id = l.holder_id
              WHERE l.name = p_name AND l.entity_id = p_id AND l.kind = ANY (p_kinds) LOOP
        PERFORM 1 FROM locks l WHERE l.name = p_name AND l.entity_id = p_id AND l.token = r.token
            FOR UPDATE SKIP LOCKED;
        IF NOT FOUND THEN
            RETURN 0;
        END IF;
        IF r.present THEN
            PERFORM 1 FROM holders h WHERE h.id = r.holder_id FOR UPDATE SKIP LOCKED;
            IF NOT FOUND THEN
                RETURN 0;
            END IF;
            UPDATE holders h SET expires_at = h.expires_at
             WHERE h.id = r.holder_id AND h.expires_at <= clock_timestamp();
            IF NOT FOUND THEN
                RETURN -1; -- renewed meanwhile: alive
            END IF;
        END IF;
        PERFORM set_config('pglease.quiet', 'on', true);
        DELETE FROM locks l WHERE l.name = p_name AND l.entity_id = p_id AND l.token = r.token;
        PERFORM set_config('pglease.quiet', 'off', true);
    END LOOP;
    RETURN 1;
END
$$;
-- +goose StatementEnd
REVOKE EXECUTE ON FUNCTION advisory_takeover_kinds(text, text, "char"[]) FROM PUBLIC;

-- The advisory path, shared: advisory_acquire_shared takes the session-level
-- shared advisory lock p_key (pg_advisory_lock_shared) for (p_name, p_id) on
-- the calling connection, as advisory_acquire takes the exclusive one, and
-- refuses (-1) when a live holder has an exclusive grant or permits of the key
-- on the table path. Shared holders on both paths share the key: a table
-- shared acquirer takes the key lock shared too. Its token is drawn under the
-- key's queue lock, which table acquirers hold through their commit, so it
-- is larger than every table grant made before it. Same result as
-- advisory_acquire; release with advisory_release_shared. Created with every
-- name written out, as version 2's hot path.
-- +goose StatementBegin
DO $gen$
DECLARE
    s text := quote_ident(current_schema());
BEGIN
    EXECUTE replace($f$
CREATE FUNCTION @schema@.advisory_acquire_shared(p_name text, p_id text, p_key bigint, p_wait boolean)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    res integer;
    b   boolean;
BEGIN
    IF pg_catalog.current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'pglease: advisory_acquire_shared must run at READ COMMITTED, not %',
            pg_catalog.current_setting('transaction_isolation')
            USING ERRCODE = '55L03';
    END IF;
    IF p_wait THEN
        b := pg_catalog.pg_advisory_lock_shared(p_key) IS NOT NULL;
    ELSIF NOT pg_catalog.pg_try_advisory_lock_shared(p_key) THEN
        RETURN 0;
    END IF;
    IF EXISTS (SELECT FROM @schema@.locks l WHERE l.name = p_name AND l.entity_id = p_id AND l.kind <> 's') THEN
        res := @schema@.advisory_takeover_kinds(p_name, p_id, ARRAY['x', 'p']::"char"[]);
        IF res <= 0 THEN
            b := pg_catalog.pg_advisory_unlock_shared(p_key);
            RETURN res;
        END IF;
    END IF;
    b := pg_catalog.pg_advisory_xact_lock(1885826161, pg_catalog.hashint8(p_key)) IS NOT NULL;
    IF NOT EXISTS (SELECT FROM @schema@.token_guard) THEN
        PERFORM @schema@.guard_tokens();
    ELSE
        b := pg_catalog.set_config('synchronous_commit', 'off', true) IS NOT NULL;
    END IF;
    RETURN pg_catalog.nextval('@schema@.token_seq'::regclass);
END
$$
$f$, '@schema@', s);
    EXECUTE replace(replace(replace($f$
CREATE FUNCTION @schema@.advisory_release_shared(p_name text, p_id text, p_key bigint, p_token bigint)
RETURNS boolean
LANGUAGE sql AS $$
    SELECT CASE
        WHEN NOT pg_catalog.pg_advisory_unlock_shared(p_key) THEN false
        WHEN pg_catalog.pg_try_advisory_lock(1885826163, @listener@)
            THEN pg_catalog.pg_advisory_unlock(1885826163, @listener@)
        ELSE pg_catalog.pg_notify('@channel@',
                 pg_catalog.json_build_array(pg_catalog.json_build_array(p_name, p_id, p_token))::text) IS NOT NULL
    END
$$
$f$, '@schema@', s), '@listener@', 'pg_catalog.hashtext(' || quote_literal(current_schema()) || ')'), '@channel@', channel());
END
$gen$;
-- +goose StatementEnd

-- advisory_unlock_shared_if_held is advisory_unlock_if_held for a shared
-- advisory lock.
-- +goose StatementBegin
CREATE FUNCTION advisory_unlock_shared_if_held(p_key bigint) RETURNS boolean
LANGUAGE sql AS $$
    SELECT CASE WHEN EXISTS (
               SELECT 1 FROM pg_locks l
                WHERE l.locktype = 'advisory' AND l.pid = pg_backend_pid() AND l.granted
                  AND l.objsubid = 1 AND l.mode = 'ShareLock'
                  AND l.classid = ((p_key >> 32) & 4294967295)::oid
                  AND l.objid = (p_key & 4294967295)::oid)
           THEN pg_advisory_unlock_shared(p_key) ELSE false END
$$;
-- +goose StatementEnd

-- For DBAs: every grant, with its kind: exclusive, shared, or permit slot of
-- permits. The columns of version 1 come first, unchanged.
CREATE OR REPLACE VIEW held AS
SELECT l.name,
       l.entity_id,
       l.token,
       l.holder_id,
       h.host,
       h.pid,
       h.application,
       l.acquired_at,
       clock_timestamp() - l.acquired_at                           AS age,
       h.expires_at,
       greatest(h.expires_at - clock_timestamp(), interval '0')    AS time_left,
       coalesce(h.expires_at > clock_timestamp(), false)           AS alive,
       CASE l.kind WHEN 'x' THEN 'exclusive' WHEN 's' THEN 'shared' ELSE 'permit' END AS kind,
       CASE WHEN l.kind = 'p' THEN l.slot END                      AS permit,
       CASE WHEN l.kind = 'p' THEN l.permits END                   AS permits
  FROM locks l
  LEFT JOIN holders h ON h.id = l.holder_id;

-- For DBAs: every waiter, with its place in its key's queue (1 is next).
-- alive is false for a waiter whose holder has expired or is gone: it is
-- never served, and goes when an acquirer or the reaper meets it.
CREATE VIEW waiting AS
SELECT w.name,
       w.entity_id,
       w.id                                                        AS waiter_id,
       w.holder_id,
       h.host,
       h.pid,
       h.application,
       CASE w.kind WHEN 'x' THEN 'exclusive' WHEN 's' THEN 'shared' ELSE 'permit' END AS kind,
       CASE WHEN w.kind = 'p' THEN w.permits END                   AS permits,
       w.set_size,
       w.since,
       clock_timestamp() - w.since                                 AS waited,
       row_number() OVER (PARTITION BY w.name, w.entity_id ORDER BY w.id) AS position,
       coalesce(h.expires_at > clock_timestamp(), false)           AS alive
  FROM waiters w
  LEFT JOIN holders h ON h.id = w.holder_id;

-- The grant sets, with what this version adds. The application may read
-- token_guard: advisory_acquire_shared, which runs with its caller's rights,
-- reads the guard row on every call rather than trusting a session setting
-- (anyone may set one in their own session).
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION grant_application(p_role regrole) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM grant_schema_objects(p_role,
        ARRAY['schema_info()', 'channel()', 'key_hash(text,text)', 'mark_listening()',
              'register(text,integer,text,interval,bytea)',
              'acquire(text,text,bigint,bytea)', 'release(text,text,bigint,bigint,bytea)',
              'acquire_keys(text[],text[],"char"[],integer,bigint,bytea,boolean,bigint[])',
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

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION grant_reaper(p_role regrole) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM grant_schema_objects(p_role,
        ARRAY['schema_info()', 'reap_holders(integer)', 'reap_locks(integer,bigint)', 'reap_dry_run()',
              'reap(integer,interval,bigint,bigint,bigint)'],
        ARRAY['held', 'holder_status', 'waiting']);
END
$$;
-- +goose StatementEnd

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION grant_dba(p_role regrole) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM grant_schema_objects(p_role,
        ARRAY['schema_info()', 'key_hash(text,text)', 'holds(text,text,bigint)',
              'force_release(text,text,text)'],
        ARRAY['held', 'holder_status', 'advisory_held', 'forced_releases', 'waiting']);
END
$$;
-- +goose StatementEnd

-- pin_search_path, as in version 4, leaving out the hot path of both modes
-- of the advisory path.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION pin_search_path() RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    setting text := format('search_path=%I, pg_catalog, pg_temp', current_schema());
    f       regprocedure;
    n       integer := 0;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure
          FROM pg_proc p
          JOIN pg_namespace ns ON ns.oid = p.pronamespace
         WHERE ns.nspname = current_schema()
           AND p.prokind IN ('f', 'p')
           AND p.proname NOT IN ('advisory_acquire', 'advisory_release', 'reap',
                                 'advisory_acquire_shared', 'advisory_release_shared', 'key_hash')
           AND NOT coalesce(p.proconfig @> ARRAY[setting], false)
         ORDER BY p.oid
    LOOP
        EXECUTE format('ALTER ROUTINE %s SET search_path = %I, pg_catalog, pg_temp', f, current_schema());
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;
-- +goose StatementEnd

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION schema_info() RETURNS TABLE (version integer, compatible_from integer)
LANGUAGE sql STABLE AS $$
    SELECT 6, 3
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
-- Down refuses while grants of the new kinds, or waiters, exist: version 5
-- knows only exclusive locks.
-- +goose StatementBegin
DO $$
BEGIN
    IF EXISTS (SELECT FROM locks WHERE kind <> 'x') THEN
        RAISE EXCEPTION 'pglease: shared locks or semaphore permits are held; release them before migrating down'
            USING ERRCODE = '55000';
    END IF;
END
$$;
-- +goose StatementEnd
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION schema_info() RETURNS TABLE (version integer, compatible_from integer)
LANGUAGE sql STABLE AS $$
    SELECT 5, 3
$$;
-- +goose StatementEnd
DROP VIEW waiting;
DROP VIEW held;
CREATE VIEW held AS
SELECT l.name,
       l.entity_id,
       l.token,
       l.holder_id,
       h.host,
       h.pid,
       h.application,
       l.acquired_at,
       clock_timestamp() - l.acquired_at                           AS age,
       h.expires_at,
       greatest(h.expires_at - clock_timestamp(), interval '0')    AS time_left,
       coalesce(h.expires_at > clock_timestamp(), false)           AS alive
  FROM locks l
  LEFT JOIN holders h ON h.id = l.holder_id;
-- The functions this version replaced, as versions 1 to 5 left them.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION key_hash(p_name text, p_id text) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT ('x' || encode(substring(sha256(
               convert_to(current_schema(), 'UTF8') || decode('00', 'hex') ||
               convert_to(p_name, 'UTF8') || decode('00', 'hex') ||
               convert_to(p_id, 'UTF8')) FROM 1 FOR 8), 'hex'))::bit(64)::bigint
$$;
-- +goose StatementEnd
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION acquire(p_name text, p_id text, p_holder bigint)
RETURNS TABLE (acquired boolean, token bigint, holder_id bigint, host text, pid integer,
               application text, acquired_at timestamptz, expires_in interval, busy boolean)
LANGUAGE plpgsql AS $$
DECLARE
    cur      locks%ROWTYPE;
    h_exp    timestamptz;
    have_row boolean;
BEGIN
    -- The caller must itself be alive; a lock inserted for a dead holder would be
    -- free for anyone to take at once.
    PERFORM 1 FROM holders h WHERE h.id = p_holder AND h.expires_at > clock_timestamp();
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pglease: holder % has expired', p_holder
            USING ERRCODE = '55L02', HINT = 'register a new holder';
    END IF;

    -- A takeover must be durable even where the role defaults to asynchronous
    -- commit: a lost acquire after a crash could hand the key to two holders.
    IF current_setting('synchronous_commit') = 'off' THEN
        PERFORM set_config('synchronous_commit', 'on', true);
    END IF;

    -- Fast path for a held key: a plain read, no row lock, no transaction id.
    -- A row of our own holder is an orphan (an acquire whose reply was lost, or
    -- a release still pending): the client only asks when it holds no lock on
    -- the key, so it is replaced below with a fresh token.
    SELECT l.* INTO cur FROM locks l WHERE l.name = p_name AND l.entity_id = p_id;
    IF FOUND AND cur.holder_id <> p_holder THEN
        SELECT h.expires_at INTO h_exp FROM holders h WHERE h.id = cur.holder_id;
        IF h_exp > clock_timestamp() THEN
            RETURN QUERY SELECT false, NULL::bigint, cur.holder_id, h.host, h.pid, h.application,
                                cur.acquired_at, h.expires_at - clock_timestamp(), false
                         FROM holders h WHERE h.id = cur.holder_id;
            RETURN;
        END IF;
    END IF;

    -- Acquirers of one key meet here, and so does the advisory fast path, which
    -- holds the same key at session level. Serialising acquirers is what makes
    -- fencing tokens increase per key: the token is drawn after this point.
    IF NOT pg_try_advisory_xact_lock(key_hash(p_name, p_id)) THEN
        RETURN QUERY SELECT false, NULL::bigint, NULL::bigint, NULL::text, NULL::integer,
                            NULL::text, NULL::timestamptz, NULL::interval, true;
        RETURN;
    END IF;

    -- SKIP LOCKED: a row locked by a fenced transaction, a release or a reaper is
    -- not waited on.
    SELECT l.* INTO cur FROM locks l WHERE l.name = p_name AND l.entity_id = p_id
        FOR UPDATE SKIP LOCKED;
    have_row := FOUND;
    IF have_row AND cur.holder_id = p_holder THEN
        NULL; -- our own orphan: replace it
    ELSIF have_row THEN
        -- Is its holder dead? A real (no-op) UPDATE of a dead holder row makes a
        -- heartbeat that already passed its expiry check wait for us and then
        -- re-check against the new row version, so it cannot revive the holder
        -- after we took its lock.
        UPDATE holders h SET expires_at = h.expires_at
         WHERE h.id = cur.holder_id AND h.expires_at <= clock_timestamp();
        IF NOT FOUND THEN
            SELECT h.expires_at INTO h_exp FROM holders h WHERE h.id = cur.holder_id;
            IF FOUND THEN
                -- Alive (renewed since the fast-path read, or it is our own lock).
                RETURN QUERY SELECT false, NULL::bigint, cur.holder_id, h.host, h.pid, h.application,
                                    cur.acquired_at, h.expires_at - clock_timestamp(), false
                             FROM holders h WHERE h.id = cur.holder_id;
                RETURN;
            END IF;
        END IF;
    END IF;
    IF have_row THEN
        -- Take it over. Quietly: waiters need no wake-up for a key that is about
        -- to be held again.
        PERFORM set_config('pglease.quiet', 'on', true);
        DELETE FROM locks l WHERE l.name = p_name AND l.entity_id = p_id AND l.token = cur.token;
        PERFORM set_config('pglease.quiet', 'off', true);
    ELSIF EXISTS (SELECT 1 FROM locks l WHERE l.name = p_name AND l.entity_id = p_id) THEN
        -- The row is locked by someone (a fenced write, a release, a reaper).
        RETURN QUERY SELECT false, NULL::bigint, NULL::bigint, NULL::text, NULL::integer,
                            NULL::text, NULL::timestamptz, NULL::interval, true;
        RETURN;
    END IF;

    IF current_setting('pglease.guard_' || md5(current_schema()), true) IS DISTINCT FROM 'on' THEN
        PERFORM guard_tokens();
    END IF;
    RETURN QUERY
        INSERT INTO locks AS l (name, entity_id, token, holder_id)
        VALUES (p_name, p_id, nextval('token_seq'), p_holder)
        RETURNING true, l.token, l.holder_id, NULL::text, NULL::integer, NULL::text,
                  l.acquired_at, NULL::interval, false;
END
$$;
-- +goose StatementEnd
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION acquire(p_name text, p_id text, p_holder bigint, p_secret bytea)
RETURNS TABLE (acquired boolean, token bigint, holder_id bigint, host text, pid integer,
               application text, acquired_at timestamptz, expires_in interval, busy boolean)
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    cur      locks%ROWTYPE;
    h_exp    timestamptz;
    have_row boolean;
    mine     boolean;
    alive    boolean;
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

    IF current_setting('synchronous_commit') = 'off' THEN
        PERFORM set_config('synchronous_commit', 'on', true);
    END IF;

    SELECT l.* INTO cur FROM locks l WHERE l.name = p_name AND l.entity_id = p_id;
    IF FOUND AND cur.holder_id <> p_holder THEN
        SELECT h.expires_at INTO h_exp FROM holders h WHERE h.id = cur.holder_id;
        IF h_exp > clock_timestamp() THEN
            RETURN QUERY SELECT false, NULL::bigint, cur.holder_id, h.host, h.pid, h.application,
                                cur.acquired_at, h.expires_at - clock_timestamp(), false
                         FROM holders h WHERE h.id = cur.holder_id;
            RETURN;
        END IF;
    END IF;

    IF NOT pg_try_advisory_xact_lock(key_hash(p_name, p_id)) THEN
        RETURN QUERY SELECT false, NULL::bigint, NULL::bigint, NULL::text, NULL::integer,
                            NULL::text, NULL::timestamptz, NULL::interval, true;
        RETURN;
    END IF;

    SELECT l.* INTO cur FROM locks l WHERE l.name = p_name AND l.entity_id = p_id
        FOR UPDATE SKIP LOCKED;
    have_row := FOUND;
    IF have_row AND cur.holder_id = p_holder THEN
        NULL; -- our own orphan: replace it
    ELSIF have_row THEN
        UPDATE holders h SET expires_at = h.expires_at
         WHERE h.id = cur.holder_id AND h.expires_at <= clock_timestamp();
        IF NOT FOUND THEN
            SELECT h.expires_at INTO h_exp FROM holders h WHERE h.id = cur.holder_id;
            IF FOUND THEN
                RETURN QUERY SELECT false, NULL::bigint, cur.holder_id, h.host, h.pid, h.application,
                                    cur.acquired_at, h.expires_at - clock_timestamp(), false
                             FROM holders h WHERE h.id = cur.holder_id;
                RETURN;
            END IF;
        END IF;
    END IF;
    IF have_row THEN
        PERFORM set_config('pglease.quiet', 'on', true);
        DELETE FROM locks l WHERE l.name = p_name AND l.entity_id = p_id AND l.token = cur.token;
        PERFORM set_config('pglease.quiet', 'off', true);
    ELSIF EXISTS (SELECT 1 FROM locks l WHERE l.name = p_name AND l.entity_id = p_id) THEN
        RETURN QUERY SELECT false, NULL::bigint, NULL::bigint, NULL::text, NULL::integer,
                            NULL::text, NULL::timestamptz, NULL::interval, true;
        RETURN;
    END IF;

    -- The token guard is read here on every call rather than trusted from
    -- the session setting guard_tokens leaves: anyone may set a setting in
    -- their own session, and a caller that skipped the guard after a crash
    -- could draw a token that was handed out before it. One row of an
    -- unlogged table costs a microsecond.
    IF NOT EXISTS (SELECT FROM token_guard) THEN
        PERFORM guard_tokens();
    END IF;
    RETURN QUERY
        INSERT INTO locks AS l (name, entity_id, token, holder_id)
        VALUES (p_name, p_id, nextval('token_seq'), p_holder)
        RETURNING true, l.token, l.holder_id, NULL::text, NULL::integer, NULL::text,
                  l.acquired_at, NULL::interval, false;
END
$$;
-- +goose StatementEnd
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION close_holder(p_holder bigint, p_secret bytea) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF NOT holder_matches(p_holder, p_secret) THEN
        RETURN false;
    END IF;
    DELETE FROM locks l WHERE l.holder_id = p_holder;
    DELETE FROM holders h WHERE h.id = p_holder;
    RETURN true;
END
$$;
-- +goose StatementEnd
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION reap_holders(p_batch integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    IF p_batch IS NULL OR p_batch < 1 OR p_batch > 100000 THEN
        RAISE EXCEPTION 'pglease: batch size % is out of range', coalesce(p_batch::text, 'NULL')
            USING ERRCODE = '22023',
                  HINT = 'pass the most rows one call may delete, from 1 to 100000 (the reaper uses 1000)';
    END IF;
    PERFORM set_config('synchronous_commit', 'off', true);
    DELETE FROM holders h
     WHERE h.id = ANY (ARRAY(
             SELECT d.id FROM holders d
              WHERE d.expires_at <= (SELECT clock_timestamp())
              ORDER BY d.expires_at
              LIMIT p_batch
                FOR UPDATE SKIP LOCKED))
       AND h.expires_at <= clock_timestamp();
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;
-- +goose StatementEnd
ALTER FUNCTION reap_holders(integer) SECURITY DEFINER;
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION advisory_takeover(p_name text, p_id text) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    cur   locks%ROWTYPE;
    alive boolean;
BEGIN
    SELECT l.* INTO cur FROM locks l WHERE l.name = p_name AND l.entity_id = p_id;
    IF NOT FOUND THEN
        RETURN 1; -- deleted meanwhile
    END IF;
    SELECT h.expires_at > clock_timestamp() INTO alive FROM holders h WHERE h.id = cur.holder_id;
    IF alive THEN
        RETURN -1;
    END IF;
    -- The row's holder is dead (or gone): take the row over as acquire does.
    -- SKIP LOCKED: a row locked by a fenced transaction, a release or a reaper
    -- is not waited on; the key counts as busy.
    SELECT l.* INTO cur FROM locks l WHERE l.name = p_name AND l.entity_id = p_id
        FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    -- A real no-op UPDATE of the dead holder row, as in acquire: a heartbeat
    -- that already passed its expiry check waits for it and then re-checks, so
    -- it cannot revive the holder after its row was taken.
    UPDATE holders h SET expires_at = h.expires_at
     WHERE h.id = cur.holder_id AND h.expires_at <= clock_timestamp();
    IF NOT FOUND AND EXISTS (SELECT 1 FROM holders h WHERE h.id = cur.holder_id) THEN
        RETURN -1; -- renewed meanwhile: alive
    END IF;
    PERFORM set_config('pglease.quiet', 'on', true);
    DELETE FROM locks l WHERE l.name = p_name AND l.entity_id = p_id AND l.token = cur.token;
    PERFORM set_config('pglease.quiet', 'off', true);
    RETURN 1;
END
$$;
-- +goose StatementEnd
ALTER FUNCTION advisory_takeover(text, text) SECURITY DEFINER;
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION grant_application(p_role regrole) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM grant_schema_objects(p_role,
        ARRAY['schema_info()', 'channel()', 'key_hash(text,text)', 'mark_listening()',
              'register(text,integer,text,interval,bytea)',
              'acquire(text,text,bigint,bytea)', 'release(text,text,bigint,bigint,bytea)',
              'renew(bigint,bytea)', 'close_holder(bigint,bytea)', 'drop_orphan(text,text,bigint,bytea)',
              'holder_locks(bigint,bytea)', 'fence(text,text,bigint)', 'holds(text,text,bigint)',
              'advisory_acquire(text,text,bigint,boolean)', 'advisory_release(text,text,bigint,bigint)',
              'advisory_unlock_if_held(bigint)', 'advisory_takeover(text,text)', 'guard_tokens()'],
        ARRAY['locks', 'held', 'holder_status', 'advisory_held']);
    EXECUTE format('GRANT USAGE ON SEQUENCE %s TO %s', 'token_seq'::regclass, p_role);
END
$$;
-- +goose StatementEnd
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION grant_reaper(p_role regrole) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM grant_schema_objects(p_role,
        ARRAY['schema_info()', 'reap_holders(integer)', 'reap_locks(integer,bigint)', 'reap_dry_run()',
              'reap(integer,interval,bigint,bigint,bigint)'],
        ARRAY['held', 'holder_status']);
END
$$;
-- +goose StatementEnd
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION grant_dba(p_role regrole) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM grant_schema_objects(p_role,
        ARRAY['schema_info()', 'key_hash(text,text)', 'holds(text,text,bigint)',
              'force_release(text,text,text)'],
        ARRAY['held', 'holder_status', 'advisory_held', 'forced_releases']);
END
$$;
-- +goose StatementEnd
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION pin_search_path() RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    setting text := format('search_path=%I, pg_catalog, pg_temp', current_schema());
    f       regprocedure;
    n       integer := 0;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure
          FROM pg_proc p
          JOIN pg_namespace ns ON ns.oid = p.pronamespace
         WHERE ns.nspname = current_schema()
           AND p.prokind IN ('f', 'p')
           AND p.proname NOT IN ('advisory_acquire', 'advisory_release', 'reap')
           AND NOT coalesce(p.proconfig @> ARRAY[setting], false)
         ORDER BY p.oid
    LOOP
        EXECUTE format('ALTER ROUTINE %s SET search_path = %I, pg_catalog, pg_temp', f, current_schema());
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;
-- +goose StatementEnd
DROP FUNCTION advisory_takeover_kinds(text, text, "char"[]);
DROP FUNCTION grant_keys(text[], text[], "char"[], integer, bigint, boolean, bigint[]);
DROP FUNCTION kind_conflict(text, text, "char", integer);
-- +goose StatementBegin
DO $$
BEGIN
    PERFORM pin_search_path();
END
$$;
-- +goose StatementEnd
DROP FUNCTION advisory_unlock_shared_if_held(bigint);
DROP FUNCTION advisory_release_shared(text, text, bigint, bigint);
DROP FUNCTION advisory_acquire_shared(text, text, bigint, boolean);
DROP FUNCTION leave(text, text, bigint, bytea, bigint[]);
DROP FUNCTION acquire_keys(text[], text[], "char"[], integer, bigint, bytea, boolean, bigint[]);
DROP TABLE waiters;
DROP FUNCTION notify_waiter_left();
ALTER TABLE locks DROP CONSTRAINT locks_pkey;
ALTER TABLE locks ADD CONSTRAINT locks_pkey PRIMARY KEY (name, entity_id);
ALTER TABLE locks DROP CONSTRAINT locks_slot_check, DROP CONSTRAINT locks_kind_check,
    DROP COLUMN permits, DROP COLUMN slot, DROP COLUMN kind;
