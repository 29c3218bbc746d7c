-- pglease schema, version 2: the advisory fast path.
--
-- A lock on the advisory path is a session-level PostgreSQL advisory lock on
-- key_hash(name, id), held by a connection the client keeps open for the
-- lock's lifetime. Nothing is written to a table on this path; the lock is in
-- pg_locks, and the view advisory_held below shows who has it.
--
-- The table path (acquire) takes pg_try_advisory_xact_lock(key_hash(name, id))
-- before it touches a key and reports "busy" when it cannot, so a key held on
-- the advisory path cannot be acquired on the table path. advisory_acquire
-- closes the other direction: after it holds the session lock it looks, in a
-- new statement and so a new snapshot, for a live lock row of the key, and
-- lets go of the session lock when there is one. A table acquirer that
-- committed its row did so before it released its transaction lock, so that
-- row is visible to any snapshot taken after the advisory lock was granted.
--
-- Names are unqualified, as in version 1, and the search_path of most
-- functions is pinned by the last statement; the two on the hot path are the
-- exception (see below).

-- +goose Up

-- advisory_acquire and advisory_release are the hot path: each is one round
-- trip that costs about what a bare pg_advisory_lock or pg_advisory_unlock
-- does. So, unlike every other function here, they do not pin their
-- search_path with a SET clause (which costs a configuration change on entry
-- and again on exit, more than the rest of the release). Instead the DO block
-- below creates them with every name written out: this schema's objects
-- qualified with its name (the @schema@ placeholder), PostgreSQL's own with
-- pg_catalog, and the channel name and listener lock pair as constants
-- (@channel@ is channel(), @listener@ the call hashtext(schema) with the
-- schema's name as a literal, which the planner folds into a constant while
-- mark_listening computes the same at run time, so the two agree even if a
-- PostgreSQL upgrade changed hashtext; @guard@ the
-- setting that guard_tokens sets). They read the same as the other functions
-- otherwise.
--
-- advisory_takeover is advisory_acquire's slow path, for a key that has a lock
-- row; it pins its search_path as usual.

-- advisory_takeover looks at the lock row of (p_name, p_id) for an acquirer
-- that holds the key's advisory lock: 1 when there is no row, or its holder
-- was dead and the row is now deleted (quietly, as acquire's takeover does);
-- -1 when a live holder has the key on the table path; 0 when the row is
-- locked by someone (a fenced transaction, a release, a reaper): busy.
-- +goose StatementBegin
CREATE FUNCTION advisory_takeover(p_name text, p_id text) RETURNS integer
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

-- +goose StatementBegin
DO $gen$
DECLARE
    s text := quote_ident(current_schema());
BEGIN
-- advisory_acquire takes the session-level advisory lock p_key for (p_name,
-- p_id) on the calling connection: at once or not at all when p_wait is false,
-- else waiting in the server's lock queue. p_key must be key_hash(p_name, p_id):
-- the client computes it too, and passes it so that it is not hashed twice.
--
-- Result: the fencing token (> 0, from token_seq) when the lock was taken; 0
-- when the key is busy (another session holds the advisory lock, or the key's
-- lock row is being changed right now); -1 when a live holder has the key on
-- the table path (see the view held). A scalar, because a record result costs
-- more than the rest of the call on this path.
--
-- Call it outside a transaction block, at READ COMMITTED: the row check must
-- see a snapshot taken after the lock was granted. If it fails after the lock
-- was granted (a cancel arriving just then, say), the session lock is still
-- held: the client then calls advisory_unlock_if_held.
--
-- The token is drawn while the key is held, so the tokens of one key grow
-- across both paths. Its transaction commits asynchronously: the sequence
-- logs ahead once every 32 values, and waiting for that record's flush while
-- the key is held would cost more than everything else here. token_guard
-- (see guard_tokens) keeps a token from being handed out twice across a
-- crash instead.
    EXECUTE replace(replace($f$
CREATE FUNCTION @schema@.advisory_acquire(p_name text, p_id text, p_key bigint, p_wait boolean)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    res integer;
    b   boolean; -- assignments below stand in for PERFORM, which runs a
                 -- query through the executor; an assignment is evaluated
                 -- directly, at a sixth of the cost
BEGIN
    IF pg_catalog.current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'pglease: advisory_acquire must run at READ COMMITTED, not %',
            pg_catalog.current_setting('transaction_isolation')
            USING ERRCODE = '55L03';
    END IF;
    IF p_wait THEN
        b := pg_catalog.pg_advisory_lock(p_key) IS NOT NULL;
    ELSIF NOT pg_catalog.pg_try_advisory_lock(p_key) THEN
        RETURN 0;
    END IF;

    -- A new statement: its snapshot sees every lock row committed before the
    -- advisory lock was granted.
    IF EXISTS (SELECT FROM @schema@.locks l WHERE l.name = p_name AND l.entity_id = p_id) THEN
        res := @schema@.advisory_takeover(p_name, p_id);
        IF res <= 0 THEN
            b := pg_catalog.pg_advisory_unlock(p_key);
            RETURN res;
        END IF;
    END IF;
    -- After the wait, not before: a bump holds guard_tokens' lock until this
    -- transaction ends, and must not hold it through a wait for the key.
    IF pg_catalog.current_setting('@guard@', true) IS DISTINCT FROM 'on' THEN
        PERFORM @schema@.guard_tokens(); -- once per session; durable if it bumps
    ELSE
        b := pg_catalog.set_config('synchronous_commit', 'off', true) IS NOT NULL;
    END IF;
    RETURN pg_catalog.nextval('@schema@.token_seq'::regclass);
END
$$
$f$, '@schema@', s), '@guard@', 'pglease.guard_' || md5(current_schema()));

-- advisory_release lets go of the session-level advisory lock p_key that the
-- calling connection holds for (p_name, p_id) with p_token, and returns false
-- when the session did not hold it.
--
-- When some session listens (holds the listener lock, see mark_listening), it
-- announces the release on channel() as a lock row delete is announced, so
-- that waiters wake; else it sends nothing, which saves a transaction id, a
-- commit record and the cluster-wide notify lock. The check comes after the
-- unlock, and a listener LISTENs before it takes its share of the listener
-- lock and wakes its waiters only after that: so a release that got the
-- listener lock itself (nobody listening) had unlocked the key before any
-- listener's wake-up, and one that could not get it sends a notification that
-- every listener receives. Two releases at once may keep each other from the
-- listener lock; both then notify, which costs only the notification.
--
-- One SQL expression (a CASE evaluates its branches in order, and only the
-- one it picks): the planner inlines the function into the caller's
-- statement, so the call costs no more than the expression.
    EXECUTE replace(replace(replace($f$
CREATE FUNCTION @schema@.advisory_release(p_name text, p_id text, p_key bigint, p_token bigint)
RETURNS boolean
LANGUAGE sql AS $$
    SELECT CASE
        WHEN NOT pg_catalog.pg_advisory_unlock(p_key) THEN false
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

-- advisory_unlock_if_held lets go of p_key if the calling session holds it,
-- without the warning pg_advisory_unlock gives otherwise. The client calls it
-- after an advisory_acquire that failed part-way.
-- +goose StatementBegin
CREATE FUNCTION advisory_unlock_if_held(p_key bigint) RETURNS boolean
LANGUAGE sql AS $$
    SELECT CASE WHEN EXISTS (
               SELECT 1 FROM pg_locks l
                WHERE l.locktype = 'advisory' AND l.pid = pg_backend_pid() AND l.granted
                  AND l.objsubid = 1 AND l.mode = 'ExclusiveLock'
                  AND l.classid = ((p_key >> 32) & 4294967295)::oid
                  AND l.objid = (p_key & 4294967295)::oid)
           THEN pg_advisory_unlock(p_key) ELSE false END
$$;
-- +goose StatementEnd

-- For DBAs: every session-level advisory lock of this database on a 64-bit
-- key (held or waited for), with the session that has it. A pglease key is
-- key_hash(name, id); find one with
--   SELECT * FROM lease.advisory_held WHERE key = lease.key_hash('invoice', '42');
-- Other applications' bigint advisory locks show here too: their keys match no
-- key_hash. (name, id) itself is not recorded: the advisory path writes
-- nothing.
CREATE VIEW advisory_held AS
SELECT (l.classid::bigint << 32) | l.objid::bigint AS key,
       l.granted,
       l.pid,
       a.application_name AS application,
       a.client_addr,
       a.client_port,
       a.usename,
       a.backend_start    AS connected_since,
       a.state,
       a.state_change,
       clock_timestamp() - a.backend_start AS connected_for
  FROM pg_locks l
  JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE l.locktype = 'advisory' AND l.objsubid = 1
   AND l.database = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database());

-- +goose StatementBegin
DO $$
DECLARE
    f text;
BEGIN
    FOREACH f IN ARRAY ARRAY['advisory_takeover(text,text)', 'advisory_unlock_if_held(bigint)'] LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = %I, pg_catalog, pg_temp', f, current_schema());
    END LOOP;
END
$$;
-- +goose StatementEnd

-- +goose Down
DROP VIEW advisory_held;
DROP FUNCTION advisory_unlock_if_held(bigint);
DROP FUNCTION advisory_release(text, text, bigint, bigint);
DROP FUNCTION advisory_acquire(text, text, bigint, boolean);
DROP FUNCTION advisory_takeover(text, text);
