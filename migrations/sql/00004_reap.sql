-- pglease schema, version 4: the reaper in SQL.
--
-- What dead holders leave behind (their holder rows, and the lock rows of
-- holders whose row is gone) is deleted by the functions below, in batches.
-- The reaper binary and package call them; so can a DBA, from psql or from
-- pg_cron:
--
--   CALL lease.reap();                      -- everything, a batch at a time
--   SELECT * FROM lease.reap_dry_run();     -- what that would delete
--
-- Names are unqualified, as in versions 1 to 3, and every function's
-- search_path is pinned by pin_search_path() at the end; the procedure reap is
-- the exception (see there). This version only adds: compatible_from stays 3.

-- +goose Up

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION schema_info() RETURNS TABLE (version integer, compatible_from integer)
LANGUAGE sql STABLE AS $$
    SELECT 4, 3
$$;
-- +goose StatementEnd

-- reap_holders deletes up to p_batch dead holder rows (expires_at passed on
-- the database clock), oldest expiry first, and returns how many it deleted.
-- Call it again while it returns p_batch.
--
-- The rows are picked with FOR UPDATE SKIP LOCKED: a heartbeat or a takeover
-- that has a row locked is not waited on, and a heartbeat arriving now waits
-- for this delete and then finds no row to renew. The DELETE checks the
-- expiry again at the moment it deletes each row, so a lease renewed a moment
-- ago is never removed. The inner clock_timestamp() is in a sub-select so that
-- it is computed once and bounds the holders_expires_at index scan.
--
-- Holder rows go before lock rows (see reap_locks): a holder row that is gone
-- can never be renewed, so its lock rows can be deleted without asking again
-- whether it is alive.
--
-- It commits asynchronously, as reap_locks does: a reap lost in a crash only
-- leaves dead rows for the next one (a holder row that comes back is still
-- dead, for good).
-- +goose StatementBegin
CREATE FUNCTION reap_holders(p_batch integer) RETURNS integer
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

-- reap_locks deletes up to p_batch lock rows whose holder row is gone (see
-- reap_holders: a gone holder can never come back), and returns
--
--   deleted    how many it deleted;
--   skipped    how many lock rows of gone holders it left because another
--              transaction has them locked (a fenced write holding FOR SHARE
--              through fence(), an acquirer taking the key over, another
--              reaper); a later call deletes them;
--   next_from  where the next call should start (pass it as p_from), or NULL
--              when this call looked at every gone holder from p_from on.
--
-- Call it again, with p_from = next_from, until next_from is NULL. Called
-- without p_from it starts from the lowest holder id, which is always correct
-- and only slower. skipped counts each row once over such a series of calls.
--
-- It walks the distinct holder ids of the locks table from p_from on, by a
-- loose scan of locks_holder_id (one index probe per distinct id, never a scan
-- of the whole table), a page of gone ids at a time, and deletes their rows in
-- holder id order: picked with FOR UPDATE SKIP LOCKED, so a locked row is
-- skipped at once, not waited on, and with the holder row's absence checked
-- again in the DELETE itself. Lock rows are never updated, so a row's ctid is
-- stable while this transaction holds its row lock. Pages start at 8 ids and
-- double while they yield fewer rows than the batch still needs: a few
-- probes when holders have many rows each, a few DELETEs (each one
-- notification) when they have one. It commits asynchronously: a lost reap
-- only leaves dead rows for the next one, and a durable commit would make
-- everyone else's commits wait for the NOTIFY that its DELETE sends (the
-- notification holds a cluster-wide lock through its commit's flush).
-- +goose StatementBegin
CREATE FUNCTION reap_locks(p_batch integer, p_from bigint DEFAULT NULL,
                           OUT deleted integer, OUT skipped bigint, OUT next_from bigint)
LANGUAGE plpgsql AS $$
DECLARE
    page_from bigint := coalesce(p_from, -9223372036854775808);
    page_size integer;
    ids       bigint[];
    n         integer;
    last_id   bigint;
BEGIN
    IF p_batch IS NULL OR p_batch < 1 OR p_batch > 100000 THEN
        RAISE EXCEPTION 'pglease: batch size % is out of range', coalesce(p_batch::text, 'NULL')
            USING ERRCODE = '22023',
                  HINT = 'pass the most rows one call may delete, from 1 to 100000 (the reaper uses 1000)';
    END IF;
    PERFORM set_config('synchronous_commit', 'off', true);
    page_size := least(p_batch, 8);
    deleted := 0;
    skipped := 0;
    LOOP
        -- The next page of gone holders, in ascending order: the recursion
        -- yields each id after the one before it, and LIMIT stops it early.
        ids := ARRAY(
            WITH RECURSIVE d(holder_id) AS (
                (SELECT l.holder_id FROM locks l WHERE l.holder_id >= page_from
                  ORDER BY l.holder_id LIMIT 1)
              UNION ALL
                SELECT (SELECT l.holder_id FROM locks l WHERE l.holder_id > d.holder_id
                         ORDER BY l.holder_id LIMIT 1)
                  FROM d WHERE d.holder_id IS NOT NULL)
            SELECT d.holder_id FROM d
             WHERE d.holder_id IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM holders h WHERE h.id = d.holder_id)
             LIMIT page_size);
        IF cardinality(ids) = 0 THEN
            next_from := NULL;
            RETURN;
        END IF;
        WITH del AS (
            DELETE FROM locks l
             WHERE l.ctid = ANY (ARRAY(
                     SELECT k.ctid FROM locks k
                      WHERE k.holder_id = ANY (ids)
                      ORDER BY k.holder_id
                      LIMIT p_batch - deleted
                        FOR UPDATE SKIP LOCKED))
               AND NOT EXISTS (SELECT 1 FROM holders h WHERE h.id = l.holder_id)
            RETURNING l.holder_id)
        SELECT count(*), max(del.holder_id) INTO n, last_id FROM del;
        deleted := deleted + n;
        IF deleted = p_batch THEN
            -- Full. The rows were taken in holder id order, so what is left
            -- of the holders before the last one is locked by someone; that
            -- last one may have more rows: the next call starts there.
            skipped := skipped + (SELECT count(*) FROM locks l
                                   WHERE l.holder_id = ANY (ids) AND l.holder_id < last_id);
            next_from := last_id;
            RETURN;
        END IF;
        -- Every row of this page that nobody else has locked is deleted.
        skipped := skipped + (SELECT count(*) FROM locks l WHERE l.holder_id = ANY (ids));
        IF cardinality(ids) < page_size OR ids[cardinality(ids)] = 9223372036854775807 THEN
            next_from := NULL;
            RETURN;
        END IF;
        page_from := ids[cardinality(ids)] + 1;
        page_size := least(p_batch, page_size * 2);
    END LOOP;
END
$$;
-- +goose StatementEnd

-- reap_dry_run counts what a reap would delete now, and deletes and locks
-- nothing: holders, the holder rows whose lease has run out; locks, the lock
-- rows of every holder that is not alive (run out, or its row gone). A reap
-- deletes those lock rows once their holder rows are gone, so a pass of
-- reap_holders and then reap_locks deletes them all, less the rows that
-- someone has locked at that moment and the holders that die meanwhile.
-- +goose StatementBegin
CREATE FUNCTION reap_dry_run() RETURNS TABLE (holders bigint, locks bigint)
LANGUAGE sql AS $$
    WITH RECURSIVE d(holder_id) AS (
        (SELECT l.holder_id FROM locks l ORDER BY l.holder_id LIMIT 1)
      UNION ALL
        SELECT (SELECT l.holder_id FROM locks l WHERE l.holder_id > d.holder_id
                 ORDER BY l.holder_id LIMIT 1)
          FROM d WHERE d.holder_id IS NOT NULL)
    SELECT (SELECT count(*) FROM holders h WHERE h.expires_at <= clock_timestamp()),
           (SELECT coalesce(sum((SELECT count(*) FROM locks l WHERE l.holder_id = d.holder_id)), 0)::bigint
              FROM d
             WHERE d.holder_id IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM holders h
                                WHERE h.id = d.holder_id AND h.expires_at > clock_timestamp()))
$$;
-- +goose StatementEnd

-- reap, for a DBA or pg_cron: reaps everything, holders first, then lock
-- rows, p_batch rows per transaction, committing after each batch, and
-- returns how many rows it deleted and skipped (as reap_locks counts them):
--
--   CALL lease.reap();                 -- batches of 1000
--   CALL lease.reap(p_batch => 500);
--
-- Each batch waits at most p_lock_timeout for a table lock (a migration or
-- other DDL on the tables) before it fails; NULL leaves the session's
-- lock_timeout as it is. Batches already committed stay done, and running it
-- again is always safe.
--
-- It commits between batches, so CALL it on its own, not inside a transaction
-- block (BEGIN ... COMMIT, or several statements sent as one string): there it
-- fails with "invalid transaction termination" before deleting anything. Use
-- reap_holders and reap_locks inside a transaction instead.
--
-- A procedure that has a SET clause, or is SECURITY DEFINER, cannot commit.
-- So reap has no pinned search_path (pin_search_path leaves it alone) and
-- runs with its caller's rights: the DO block below creates it with every
-- name written out, this schema's objects qualified with its name and
-- PostgreSQL's own with pg_catalog, so that it behaves the same whatever the
-- caller's search_path is. Its caller needs EXECUTE on it and on the
-- functions it calls, which do the work.
-- +goose StatementBegin
DO $gen$
BEGIN
    EXECUTE format($f$
CREATE PROCEDURE %1$I.reap(p_batch integer DEFAULT 1000,
                           p_lock_timeout interval DEFAULT '10 seconds',
                           INOUT holders bigint DEFAULT NULL,
                           INOUT locks bigint DEFAULT NULL,
                           INOUT skipped bigint DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    n    integer;
    r    record;
    from_id bigint;
BEGIN
    IF p_lock_timeout <= interval '0' THEN
        RAISE EXCEPTION 'pglease: lock timeout %% is not positive', p_lock_timeout
            USING ERRCODE = '22023',
                  HINT = 'pass how long a batch may wait for a table lock, such as ''10 seconds'', or NULL for the session''s lock_timeout';
    END IF;
    holders := 0;
    locks := 0;
    skipped := 0;
    LOOP
        IF p_lock_timeout IS NOT NULL THEN
            PERFORM pg_catalog.set_config('lock_timeout',
                (pg_catalog.ceil(pg_catalog.date_part('epoch', p_lock_timeout) * 1000))::bigint::text, true);
        END IF;
        n := %1$I.reap_holders(p_batch);
        holders := holders + n;
        COMMIT;
        EXIT WHEN n < p_batch;
    END LOOP;
    LOOP
        IF p_lock_timeout IS NOT NULL THEN
            PERFORM pg_catalog.set_config('lock_timeout',
                (pg_catalog.ceil(pg_catalog.date_part('epoch', p_lock_timeout) * 1000))::bigint::text, true);
        END IF;
        SELECT * INTO r FROM %1$I.reap_locks(p_batch, from_id);
        locks := locks + r.deleted;
        skipped := skipped + r.skipped;
        COMMIT;
        EXIT WHEN r.next_from IS NULL;
        from_id := r.next_from;
    END LOOP;
END
$$
$f$, current_schema());
END
$gen$;
-- +goose StatementEnd

-- pin_search_path, as version 3 made it, with reap added to the functions it
-- leaves alone: a pinned search_path would keep reap from committing.
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

-- +goose StatementBegin
DO $$
BEGIN
    PERFORM pin_search_path();
END
$$;
-- +goose StatementEnd

-- +goose Down
DROP PROCEDURE reap(integer, interval, bigint, bigint, bigint);
DROP FUNCTION reap_dry_run();
DROP FUNCTION reap_locks(integer, bigint);
DROP FUNCTION reap_holders(integer);

-- schema_info and pin_search_path as version 3 created them, pinned again.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION schema_info() RETURNS TABLE (version integer, compatible_from integer)
LANGUAGE sql STABLE AS $$
    SELECT 3, 3
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
           AND p.proname NOT IN ('advisory_acquire', 'advisory_release')
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
DO $$
BEGIN
    PERFORM pin_search_path();
END
$$;
-- +goose StatementEnd
