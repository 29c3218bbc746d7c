-- pglease schema, version 1.
--
-- Every name below is unqualified: the schema is whatever search_path names first
-- when this file runs. The Go migrator sets search_path to the configured schema
-- (default "lease"). A DBA applying this file by hand runs, for example:
--
--   CREATE SCHEMA lease;
--   SET search_path = lease;
--   \i 00001_init.sql        (the part above the Down marker)
--
-- The functions pin their own search_path to this schema when created (see the
-- last statement), so they behave the same whatever the caller's search_path is.

-- +goose Up

-- Fencing tokens. bigint, NO CYCLE: it never wraps. CACHE 1 so that values are
-- handed out in the order the (per-key serialised) acquirers ask for them.
CREATE SEQUENCE token_seq AS bigint MINVALUE 1 NO CYCLE CACHE 1;

-- The crash guard of token_seq. A sequence logs ahead (once every 32 values),
-- and a value is safe from being handed out again after a crash only once the
-- record that covers it is on disk. The table path draws its tokens in durable
-- transactions, so they are. The advisory path does not wait for that flush
-- (it would cost a flush per 32 acquisitions while the key is held), so after
-- a crash token_seq may restart below tokens that were handed out.
--
-- This table says that it has not. It is UNLOGGED: PostgreSQL empties it on
-- crash recovery, and a promoted standby has it empty, while it keeps its row
-- through a clean restart. Every session checks it before its first draw (see
-- guard_tokens); a session that finds it empty moves token_seq 2^40 ahead,
-- durably, before the row is put back. Every token handed out before the crash
-- is below that: no server draws 2^40 values between two WAL flushes (at a
-- million draws a second that would take twelve days). A session that saw the
-- row cannot outlive a crash: every session ends with one. 2^40 per crash
-- leaves room for eight million crashes in a bigint.
CREATE UNLOGGED TABLE token_guard (
    bumped_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
-- A new sequence has handed nothing out yet.
INSERT INTO token_guard DEFAULT VALUES;

-- One row per live client (usually one per process). The heartbeat moves
-- expires_at forward; once expires_at has passed, the holder is dead for good:
-- the heartbeat's own WHERE refuses to renew it.
CREATE TABLE holders (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    host        text        NOT NULL,
    pid         integer     NOT NULL,
    application text        NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    ttl         interval    NOT NULL CHECK (ttl > interval '0'),
    expires_at  timestamptz NOT NULL
);
CREATE INDEX holders_expires_at ON holders (expires_at);

-- One row per held lock. Rows are only inserted and deleted, never updated.
-- There is deliberately no foreign key to holders: an FK makes every insert
-- lock the holder row, which under concurrency burns multixacts. A lock whose
-- holder row is missing counts as dead.
CREATE TABLE locks (
    name        text        NOT NULL,
    entity_id   text        NOT NULL,
    token       bigint      NOT NULL,
    holder_id   bigint      NOT NULL,
    acquired_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT locks_pkey PRIMARY KEY (name, entity_id)
);
CREATE INDEX locks_holder_id ON locks (holder_id);

-- The channel that deletes of lock rows are announced on. Stable for a schema;
-- a DBA can LISTEN to it: SELECT lease.channel();
-- +goose StatementBegin
CREATE FUNCTION channel() RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT 'pglease_' || md5(current_schema())
$$;
-- +goose StatementEnd

-- mark_listening registers the calling session as a listener of channel(),
-- for the rest of the session: it takes the schema's listener lock in share
-- mode, the session-level advisory lock on the pair (1885826163,
-- hashtext(schema)) ('pgls' read as a big-endian integer; the pair form lives
-- in a key space of its own, objsubid 2 in pg_locks, apart from the bigint
-- keys that locks use). Releases on the advisory path announce themselves only
-- while some session holds it (see advisory_release). Call it once per
-- session, after LISTEN: pglease clients do so on their LISTEN connection.
-- Deletes of lock rows are announced whether or not anyone listens.
-- +goose StatementBegin
CREATE FUNCTION mark_listening() RETURNS void
LANGUAGE sql AS $$
    SELECT pg_advisory_lock_shared(1885826163, hashtext(current_schema()))
$$;
-- +goose StatementEnd

-- guard_tokens makes token_seq safe to draw from in the calling session (see
-- token_guard): when the guard row is missing (after a crash, or on a promoted
-- standby) it moves the sequence 2^40 ahead and puts the row back, in a
-- transaction that commits durably. It then records in the session setting
-- pglease.guard_<md5(schema)> that this session need not look again. Call it
-- before drawing from token_seq; acquire and advisory_acquire do.
-- +goose StatementBegin
CREATE FUNCTION guard_tokens() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT FROM token_guard) THEN
        -- One bump per crash: bumpers queue here ('pglg' and the schema's hash).
        PERFORM pg_advisory_xact_lock(1885826151, hashtext(current_schema()));
        IF NOT EXISTS (SELECT FROM token_guard) THEN
            PERFORM setval('token_seq', nextval('token_seq') + 1099511627776);
            INSERT INTO token_guard DEFAULT VALUES;
            PERFORM set_config('synchronous_commit', 'on', true);
        END IF;
    END IF;
    -- Session-level, but undone if this transaction fails.
    PERFORM set_config('pglease.guard_' || md5(current_schema()), 'on', false);
END
$$;
-- +goose StatementEnd

-- The 64-bit key of (name, id): the first 8 bytes of
-- sha256(schema || 0x00 || name || 0x00 || id), all UTF-8, read as a big-endian
-- signed integer. The Go package computes the same value; the advisory fast path
-- locks it, and table-mode acquirers of one key meet on it.
-- +goose StatementBegin
CREATE FUNCTION key_hash(p_name text, p_id text) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT ('x' || encode(substring(sha256(
               convert_to(current_schema(), 'UTF8') || '\x00'::bytea ||
               convert_to(p_name, 'UTF8') || '\x00'::bytea ||
               convert_to(p_id, 'UTF8')) FROM 1 FOR 8), 'hex'))::bit(64)::bigint
$$;
-- +goose StatementEnd

-- acquire takes (name, id) for holder p_holder if it is free or its holder is
-- dead, and otherwise reports who holds it. One round trip, its own READ
-- COMMITTED transaction: each statement below sees a fresh snapshot.
--
-- Result: acquired; token (ours, or NULL when not acquired); the current
-- holder's id, host, pid, application, acquired_at; expires_in (the holder's
-- time left on the database clock, NULL when unknown); busy (true when the key
-- is being acquired by someone else right now or held on the advisory path).
-- +goose StatementBegin
CREATE FUNCTION acquire(p_name text, p_id text, p_holder bigint)
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

-- release deletes the lock row with exactly this token (never the next
-- holder's) and reports whether it did. It commits asynchronously: a release
-- lost in a crash only keeps a free key locked until its holder expires.
-- +goose StatementBegin
CREATE FUNCTION release(p_name text, p_id text, p_token bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    DELETE FROM locks l WHERE l.name = p_name AND l.entity_id = p_id AND l.token = p_token;
    RETURN FOUND;
END
$$;
-- +goose StatementEnd

-- renew is the heartbeat: it extends a live holder's lease and reports how many
-- lock rows the holder has, with the XOR of their tokens, so the client can tell
-- in the same round trip whether a row was deleted from under it. It never
-- revives an expired holder. alive is false when the holder has expired or is
-- gone: its locks are lost for good.
-- +goose StatementBegin
CREATE FUNCTION renew(p_holder bigint)
RETURNS TABLE (alive boolean, locks bigint, tokens_xor bigint)
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('synchronous_commit') = 'off' THEN
        PERFORM set_config('synchronous_commit', 'on', true);
    END IF;
    UPDATE holders h SET expires_at = clock_timestamp() + h.ttl
     WHERE h.id = p_holder AND h.expires_at > clock_timestamp();
    IF NOT FOUND THEN
        RETURN QUERY SELECT false, 0::bigint, 0::bigint;
        RETURN;
    END IF;
    RETURN QUERY SELECT true, count(*), coalesce(bit_xor(l.token), 0)
                   FROM locks l WHERE l.holder_id = p_holder;
END
$$;
-- +goose StatementEnd

-- holds reports whether token is the live holder's token for (name, id). It
-- takes no lock: a check, not a guard. Use fence to guard a write.
-- +goose StatementBegin
CREATE FUNCTION holds(p_name text, p_id text, p_token bigint) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (
        SELECT 1 FROM locks l JOIN holders h ON h.id = l.holder_id
         WHERE l.name = p_name AND l.entity_id = p_id AND l.token = p_token
           AND h.expires_at > clock_timestamp())
$$;
-- +goose StatementEnd

-- fence guards a write in the caller's own transaction. It raises SQLSTATE
-- 55L01 unless token is the live holder's token for (name, id), and it takes
-- FOR SHARE on the lock row, so no takeover or reap of that row can complete
-- until the caller's transaction ends: a fenced write can never land after the
-- lock passed to someone else.
-- +goose StatementBegin
CREATE FUNCTION fence(p_name text, p_id text, p_token bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM locks l JOIN holders h ON h.id = l.holder_id
     WHERE l.name = p_name AND l.entity_id = p_id AND l.token = p_token
       AND h.expires_at > clock_timestamp()
       FOR SHARE OF l;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pglease: lock (%, %) is not held with token %', p_name, p_id, p_token
            USING ERRCODE = '55L01',
                  HINT = 'the lease was lost or released: abandon this write';
    END IF;
END
$$;
-- +goose StatementEnd

-- Announce deletes of lock rows, so waiters wake without polling. Payload: a
-- JSON array of [name, id, token] triples, cut into chunks that fit NOTIFY's
-- 8000-byte limit; "*" after a TRUNCATE. acquire's takeover sets
-- pglease.quiet so that a takeover does not wake anyone.
-- +goose StatementBegin
CREATE FUNCTION notify_deleted() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    ch  text := channel();
    buf text := '';
    e   text;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        PERFORM pg_notify(ch, '*');
        RETURN NULL;
    END IF;
    IF current_setting('pglease.quiet', true) = 'on' THEN
        RETURN NULL;
    END IF;
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
    RETURN NULL;
END
$$;
-- +goose StatementEnd

CREATE TRIGGER locks_notify_delete AFTER DELETE ON locks
    REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION notify_deleted();
CREATE TRIGGER locks_notify_truncate AFTER TRUNCATE ON locks
    FOR EACH STATEMENT EXECUTE FUNCTION notify_deleted();

-- For DBAs: every lock row with its owner, age and time left. alive is false
-- for a row whose holder has expired or vanished: such a row is free to take
-- and the reaper will delete it.
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

-- For DBAs: every holder with how many locks it has and whether it is alive.
CREATE VIEW holder_status AS
SELECT h.id,
       h.host,
       h.pid,
       h.application,
       h.started_at,
       h.ttl,
       h.expires_at,
       greatest(h.expires_at - clock_timestamp(), interval '0')    AS time_left,
       h.expires_at > clock_timestamp()                            AS alive,
       (SELECT count(*) FROM locks l WHERE l.holder_id = h.id)     AS locks
  FROM holders h;

-- Pin every function's search_path to this schema.
-- +goose StatementBegin
DO $$
DECLARE
    f text;
BEGIN
    FOREACH f IN ARRAY ARRAY['channel()', 'key_hash(text,text)', 'acquire(text,text,bigint)',
                             'release(text,text,bigint)', 'renew(bigint)', 'holds(text,text,bigint)',
                             'fence(text,text,bigint)', 'notify_deleted()',
                             'mark_listening()', 'guard_tokens()'] LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = %I, pg_catalog, pg_temp', f, current_schema());
    END LOOP;
END
$$;
-- +goose StatementEnd

-- +goose Down
DROP VIEW holder_status;
DROP VIEW held;
DROP TRIGGER locks_notify_truncate ON locks;
DROP TRIGGER locks_notify_delete ON locks;
DROP FUNCTION notify_deleted();
DROP FUNCTION fence(text, text, bigint);
DROP FUNCTION holds(text, text, bigint);
DROP FUNCTION release(text, text, bigint);
DROP FUNCTION renew(bigint);
DROP FUNCTION acquire(text, text, bigint);
DROP FUNCTION key_hash(text, text);
DROP FUNCTION guard_tokens();
DROP FUNCTION mark_listening();
DROP FUNCTION channel();
DROP TABLE locks;
DROP TABLE holders;
DROP TABLE token_guard;
DROP SEQUENCE token_seq;
