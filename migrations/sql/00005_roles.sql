-- pglease schema, version 5: least-privilege roles.
--
-- Until this version an application role needed INSERT and DELETE on locks
-- and UPDATE on holders, so any service with a bug could delete or extend
-- anyone's lock with plain SQL. From this version on a role gets no write
-- privilege on any table. It calls functions that run with the schema
-- owner's rights (SECURITY DEFINER, search_path pinned with pg_temp last),
-- and each function that acts for a holder checks that the caller is that
-- holder:
--
--   A holder proves who it is with a secret of its own, at least 16 random
--   bytes chosen by the client when it registers (register) and passed on
--   every call that acts for the holder. The table keeps only its SHA-256
--   (holders.secret_hash), so whoever may read holders learns nothing that
--   lets them act for it. A call with another holder's id and the wrong
--   secret raises SQLSTATE 42L01 and changes nothing.
--
-- The functions of versions 1 to 4 stay as they were, with their rights:
-- a role that has table privileges (the owner, or a role a DBA granted them
-- to) may go on using them, and clients written for version 3 still work.
-- The new functions have EXECUTE revoked from PUBLIC; the grant sets below
-- give them to a role:
--
--   SELECT lease.grant_application('orders_service');
--   SELECT lease.grant_reaper('pglease_reaper');
--   SELECT lease.grant_dba('dba_oncall');
--   SELECT lease.revoke_grants('orders_service');
--
-- run as the schema's owner. The migrations create no roles.
--
-- Contract for later migrations: a function that must be callable by a
-- role without table privileges is SECURITY DEFINER, has EXECUTE revoked
-- from PUBLIC right after its CREATE, and is added to the grant set that
-- needs it by a CREATE OR REPLACE of that grant function.
--
-- Names are unqualified, as in the earlier versions.

-- +goose Up

ALTER TABLE holders ADD COLUMN secret_hash bytea;

-- Locks freed by a DBA with force_release, for the record. Insert-only.
CREATE TABLE forced_releases (
    name         text        NOT NULL,
    entity_id    text        NOT NULL,
    token        bigint      NOT NULL,
    holder_id    bigint      NOT NULL,
    host         text,
    pid          integer,
    application  text,
    acquired_at  timestamptz NOT NULL,
    released_by  name        NOT NULL DEFAULT session_user,
    released_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    reason       text
);
CREATE INDEX forced_releases_released_at ON forced_releases (released_at);

-- holder_matches says whether p_secret is the credential of holder p_holder:
-- true when it is, false when there is no such holder row (a holder that was
-- closed or reaped: its lock rows, if any, are dead and free to take), and
-- it raises 42L01 when the row is another holder's (or a holder registered
-- without a secret, by a client older than this version).
-- +goose StatementBegin
CREATE FUNCTION holder_matches(p_holder bigint, p_secret bytea) RETURNS boolean
LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
DECLARE
    h_hash bytea;
BEGIN
    SELECT h.secret_hash INTO h_hash FROM holders h WHERE h.id = p_holder;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF h_hash IS NULL OR p_secret IS NULL OR h_hash <> sha256(p_secret) THEN
        RAISE EXCEPTION 'pglease: the secret given is not that of holder %', p_holder
            USING ERRCODE = '42L01',
                  HINT = 'a holder acts only for itself: pass the secret it registered with';
    END IF;
    RETURN true;
END
$$;
-- +goose StatementEnd
REVOKE EXECUTE ON FUNCTION holder_matches(bigint, bytea) FROM PUBLIC;

-- register adds a holder (a client, usually one per process) with lease
-- length p_ttl and returns its id. p_secret is the holder's credential: at
-- least 16 bytes, random, kept by the client and passed to every function
-- below that acts for the holder. The lease starts now; renew it before it
-- runs out.
-- +goose StatementBegin
CREATE FUNCTION register(p_host text, p_pid integer, p_application text, p_ttl interval, p_secret bytea)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    new_id bigint;
BEGIN
    IF p_secret IS NULL OR octet_length(p_secret) < 16 THEN
        RAISE EXCEPTION 'pglease: a holder secret must be at least 16 bytes, got %', coalesce(octet_length(p_secret), 0)
            USING ERRCODE = '22023';
    END IF;
    IF p_ttl IS NULL OR p_ttl <= interval '0' THEN
        RAISE EXCEPTION 'pglease: a holder TTL must be positive, got %', p_ttl
            USING ERRCODE = '22023';
    END IF;
    INSERT INTO holders AS h (host, pid, application, ttl, expires_at, secret_hash)
    VALUES (p_host, p_pid, p_application, p_ttl, clock_timestamp() + p_ttl, sha256(p_secret))
    RETURNING h.id INTO new_id;
    RETURN new_id;
END
$$;
-- +goose StatementEnd
REVOKE EXECUTE ON FUNCTION register(text, integer, text, interval, bytea) FROM PUBLIC;

-- acquire, for holder p_holder proving itself with p_secret: version 1's
-- acquire(name, id, holder), with the same result and the same steps (read
-- its comments there), and the check folded into its first statement.
-- Without the check, a caller could pass another holder's id and have that
-- holder's lock row replaced as if it were the caller's own orphan.
--
-- It is written out whole rather than calling version 1's function: each
-- call of a function with a pinned search_path costs a configuration change
-- on entry and exit, and the hot path pays for none it does not need.
-- key_hash stays a call: it is the one definition of the key's hash.
-- +goose StatementBegin
CREATE FUNCTION acquire(p_name text, p_id text, p_holder bigint, p_secret bytea)
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
REVOKE EXECUTE ON FUNCTION acquire(text, text, bigint, bytea) FROM PUBLIC;

-- release deletes holder p_holder's lock row of (p_name, p_id) with exactly
-- p_token, and says whether it did. As version 1's release, it commits
-- asynchronously. The check is folded into the DELETE; only a release that
-- deleted nothing looks at why. A holder row that is gone (closed or reaped)
-- has no lock to release: false.
-- +goose StatementBegin
CREATE FUNCTION release(p_name text, p_id text, p_token bigint, p_holder bigint, p_secret bytea)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
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
REVOKE EXECUTE ON FUNCTION release(text, text, bigint, bigint, bytea) FROM PUBLIC;

-- renew, the heartbeat, for holder p_holder proving itself with p_secret:
-- version 1's renew with the check folded into its UPDATE. alive is false
-- when the holder expired or is gone; it is never revived.
-- +goose StatementBegin
CREATE FUNCTION renew(p_holder bigint, p_secret bytea)
RETURNS TABLE (alive boolean, locks bigint, tokens_xor bigint)
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF current_setting('synchronous_commit') = 'off' THEN
        PERFORM set_config('synchronous_commit', 'on', true);
    END IF;
    UPDATE holders h SET expires_at = clock_timestamp() + h.ttl
     WHERE h.id = p_holder AND h.expires_at > clock_timestamp() AND h.secret_hash = sha256(p_secret);
    IF NOT FOUND THEN
        PERFORM holder_matches(p_holder, p_secret); -- raises for another holder's id
        RETURN QUERY SELECT false, 0::bigint, 0::bigint;
        RETURN;
    END IF;
    RETURN QUERY SELECT true, count(*), coalesce(bit_xor(l.token), 0)
                   FROM locks l WHERE l.holder_id = p_holder;
END
$$;
-- +goose StatementEnd
REVOKE EXECUTE ON FUNCTION renew(bigint, bytea) FROM PUBLIC;

-- close_holder deletes holder p_holder's lock rows and then its holder row:
-- the client's Close. Returns false when the holder row was already gone.
-- +goose StatementBegin
CREATE FUNCTION close_holder(p_holder bigint, p_secret bytea) RETURNS boolean
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
REVOKE EXECUTE ON FUNCTION close_holder(bigint, bytea) FROM PUBLIC;

-- drop_orphan deletes holder p_holder's lock row of (p_name, p_id),
-- whatever its token: the clean-up of an acquire whose outcome the client
-- never learned. Returns whether a row went.
-- +goose StatementBegin
CREATE FUNCTION drop_orphan(p_name text, p_id text, p_holder bigint, p_secret bytea) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF NOT holder_matches(p_holder, p_secret) THEN
        RETURN false;
    END IF;
    DELETE FROM locks l WHERE l.name = p_name AND l.entity_id = p_id AND l.holder_id = p_holder;
    RETURN FOUND;
END
$$;
-- +goose StatementEnd
REVOKE EXECUTE ON FUNCTION drop_orphan(text, text, bigint, bytea) FROM PUBLIC;

-- holder_locks lists holder p_holder's lock rows: what the client checks
-- when the heartbeat's count or XOR of tokens does not match what it holds.
-- +goose StatementBegin
CREATE FUNCTION holder_locks(p_holder bigint, p_secret bytea)
RETURNS TABLE (name text, entity_id text, token bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER AS $$
BEGIN
    IF holder_matches(p_holder, p_secret) THEN
        RETURN QUERY SELECT l.name, l.entity_id, l.token FROM locks l WHERE l.holder_id = p_holder;
    END IF;
END
$$;
-- +goose StatementEnd
REVOKE EXECUTE ON FUNCTION holder_locks(bigint, bytea) FROM PUBLIC;

-- fence takes FOR SHARE on the lock row, which needs an UPDATE privilege on
-- locks; holds reads holders. Both now run with the owner's rights, so that
-- a role with neither privilege can fence its writes. They decide nothing
-- for anyone else: fence raises unless the token is the live holder's.
ALTER FUNCTION fence(text, text, bigint) SECURITY DEFINER;
REVOKE EXECUTE ON FUNCTION fence(text, text, bigint) FROM PUBLIC;
ALTER FUNCTION holds(text, text, bigint) SECURITY DEFINER;
REVOKE EXECUTE ON FUNCTION holds(text, text, bigint) FROM PUBLIC;

-- The advisory path's slow steps write (a dead holder's row, the token
-- guard), on behalf of advisory_acquire, which stays SECURITY INVOKER: it is
-- the hot path, and the rights it needs (SELECT on locks, USAGE on token_seq)
-- grant no write. Taking over a dead holder's row and bumping the guard
-- decide nothing for a live holder; the reaper does the first too.
ALTER FUNCTION advisory_takeover(text, text) SECURITY DEFINER;
REVOKE EXECUTE ON FUNCTION advisory_takeover(text, text) FROM PUBLIC;
ALTER FUNCTION guard_tokens() SECURITY DEFINER;
REVOKE EXECUTE ON FUNCTION guard_tokens() FROM PUBLIC;

-- Reaping (version 4) deletes rows and takes FOR UPDATE row locks: its
-- functions now run with the owner's rights too, so that a reaper role needs
-- no table privilege. The procedure reap cannot be SECURITY DEFINER (it
-- commits between batches); it does nothing itself but call them.
ALTER FUNCTION reap_holders(integer) SECURITY DEFINER;
REVOKE EXECUTE ON FUNCTION reap_holders(integer) FROM PUBLIC;
ALTER FUNCTION reap_locks(integer, bigint) SECURITY DEFINER;
REVOKE EXECUTE ON FUNCTION reap_locks(integer, bigint) FROM PUBLIC;
ALTER FUNCTION reap_dry_run() SECURITY DEFINER;
REVOKE EXECUTE ON FUNCTION reap_dry_run() FROM PUBLIC;
REVOKE EXECUTE ON PROCEDURE reap(integer, interval, bigint, bigint, bigint) FROM PUBLIC;

-- force_release frees the table lock (p_name, p_id) whoever holds it, for a
-- DBA: it deletes the lock row as a DBA's DELETE does (so its holder is told,
-- by the notification and by its next heartbeat, with reason row deleted),
-- records the release in forced_releases with the caller's session role and
-- p_reason, and writes it to the server log. Like a DELETE, it waits for a
-- transaction that fenced a write with the lock to end: a fenced write is
-- never overtaken. Returns the freed lock's token, or NULL when the key was
-- not locked. A lock on the advisory path has no row: it is freed by ending
-- its session (pg_terminate_backend(pid), pid from advisory_held).
-- +goose StatementBegin
CREATE FUNCTION force_release(p_name text, p_id text, p_reason text DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    gone locks%ROWTYPE;
BEGIN
    DELETE FROM locks l WHERE l.name = p_name AND l.entity_id = p_id RETURNING l.* INTO gone;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    INSERT INTO forced_releases (name, entity_id, token, holder_id, host, pid, application, acquired_at, reason)
    SELECT gone.name, gone.entity_id, gone.token, gone.holder_id, h.host, h.pid, h.application,
           gone.acquired_at, p_reason
      FROM (SELECT) AS one
      LEFT JOIN holders h ON h.id = gone.holder_id;
    RAISE LOG 'pglease: % force-released lock (%, %) with token % of holder %: %',
        session_user, gone.name, gone.entity_id, gone.token, gone.holder_id, coalesce(p_reason, 'no reason given');
    RETURN gone.token;
END
$$;
-- +goose StatementEnd
REVOKE EXECUTE ON FUNCTION force_release(text, text, text) FROM PUBLIC;

-- The grant sets. Each takes a role (an existing one: regrole refuses any
-- other name) and grants it what it needs on this schema, and nothing else.
-- They run with the caller's rights: call them as the schema's owner.
--
-- grant_schema_objects is their common part: USAGE on the schema, EXECUTE on
-- p_functions (regprocedure texts), SELECT on p_relations.
-- +goose StatementBegin
CREATE FUNCTION grant_schema_objects(p_role regrole, p_functions text[], p_relations text[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    f text;
    r text;
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO %s', current_schema(), p_role);
    FOREACH f IN ARRAY p_functions LOOP
        EXECUTE format('GRANT EXECUTE ON ROUTINE %s TO %s', f::regprocedure, p_role);
    END LOOP;
    FOREACH r IN ARRAY p_relations LOOP
        EXECUTE format('GRANT SELECT ON %s TO %s', r::regclass, p_role);
    END LOOP;
END
$$;
-- +goose StatementEnd
REVOKE EXECUTE ON FUNCTION grant_schema_objects(regrole, text[], text[]) FROM PUBLIC;

-- grant_application: what a service using pglease needs, on both paths. No
-- write privilege on any table. SELECT on locks and USAGE on token_seq are
-- for the advisory path (it reads the key's row and draws a token) and for
-- reading which rows the holder has.
-- +goose StatementBegin
CREATE FUNCTION grant_application(p_role regrole) RETURNS void
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
REVOKE EXECUTE ON FUNCTION grant_application(regrole) FROM PUBLIC;

-- grant_reaper: reaping (version 4's functions and its procedure reap) and
-- the views, nothing else.
-- +goose StatementBegin
CREATE FUNCTION grant_reaper(p_role regrole) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM grant_schema_objects(p_role,
        ARRAY['schema_info()', 'reap_holders(integer)', 'reap_locks(integer,bigint)', 'reap_dry_run()',
              'reap(integer,interval,bigint,bigint,bigint)'],
        ARRAY['held', 'holder_status']);
END
$$;
-- +goose StatementEnd
REVOKE EXECUTE ON FUNCTION grant_reaper(regrole) FROM PUBLIC;

-- grant_dba: read-only access to the views, and force_release.
-- +goose StatementBegin
CREATE FUNCTION grant_dba(p_role regrole) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM grant_schema_objects(p_role,
        ARRAY['schema_info()', 'key_hash(text,text)', 'holds(text,text,bigint)',
              'force_release(text,text,text)'],
        ARRAY['held', 'holder_status', 'advisory_held', 'forced_releases']);
END
$$;
-- +goose StatementEnd
REVOKE EXECUTE ON FUNCTION grant_dba(regrole) FROM PUBLIC;

-- revoke_grants takes back from p_role every privilege on this schema and
-- its objects, whichever grant set gave it.
-- +goose StatementBegin
CREATE FUNCTION revoke_grants(p_role regrole) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA %I FROM %s', current_schema(), p_role);
    EXECUTE format('REVOKE ALL ON ALL SEQUENCES IN SCHEMA %I FROM %s', current_schema(), p_role);
    EXECUTE format('REVOKE ALL ON ALL ROUTINES IN SCHEMA %I FROM %s', current_schema(), p_role);
    EXECUTE format('REVOKE ALL ON SCHEMA %I FROM %s', current_schema(), p_role);
END
$$;
-- +goose StatementEnd
REVOKE EXECUTE ON FUNCTION revoke_grants(regrole) FROM PUBLIC;

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION schema_info() RETURNS TABLE (version integer, compatible_from integer)
LANGUAGE sql STABLE AS $$
    SELECT 5, 3
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
    SELECT 4, 3
$$;
-- +goose StatementEnd
DROP FUNCTION revoke_grants(regrole);
DROP FUNCTION grant_dba(regrole);
DROP FUNCTION grant_reaper(regrole);
DROP FUNCTION grant_application(regrole);
DROP FUNCTION grant_schema_objects(regrole, text[], text[]);
DROP FUNCTION force_release(text, text, text);
GRANT EXECUTE ON PROCEDURE reap(integer, interval, bigint, bigint, bigint) TO PUBLIC;
ALTER FUNCTION reap_dry_run() SECURITY INVOKER;
GRANT EXECUTE ON FUNCTION reap_dry_run() TO PUBLIC;
ALTER FUNCTION reap_locks(integer, bigint) SECURITY INVOKER;
GRANT EXECUTE ON FUNCTION reap_locks(integer, bigint) TO PUBLIC;
ALTER FUNCTION reap_holders(integer) SECURITY INVOKER;
GRANT EXECUTE ON FUNCTION reap_holders(integer) TO PUBLIC;
ALTER FUNCTION guard_tokens() SECURITY INVOKER;
GRANT EXECUTE ON FUNCTION guard_tokens() TO PUBLIC;
ALTER FUNCTION advisory_takeover(text, text) SECURITY INVOKER;
GRANT EXECUTE ON FUNCTION advisory_takeover(text, text) TO PUBLIC;
ALTER FUNCTION holds(text, text, bigint) SECURITY INVOKER;
GRANT EXECUTE ON FUNCTION holds(text, text, bigint) TO PUBLIC;
ALTER FUNCTION fence(text, text, bigint) SECURITY INVOKER;
GRANT EXECUTE ON FUNCTION fence(text, text, bigint) TO PUBLIC;
DROP FUNCTION holder_locks(bigint, bytea);
DROP FUNCTION drop_orphan(text, text, bigint, bytea);
DROP FUNCTION close_holder(bigint, bytea);
DROP FUNCTION renew(bigint, bytea);
DROP FUNCTION release(text, text, bigint, bigint, bytea);
DROP FUNCTION acquire(text, text, bigint, bytea);
DROP FUNCTION register(text, integer, text, interval, bytea);
DROP FUNCTION holder_matches(bigint, bytea);
DROP TABLE forced_releases;
ALTER TABLE holders DROP COLUMN secret_hash;
