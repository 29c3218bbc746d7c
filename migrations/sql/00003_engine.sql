-- pglease schema, version 3: what a client needs to check the schema, and a
-- search_path pinner that every later migration calls.
--
-- Names are unqualified, as in versions 1 and 2: the schema is whatever
-- search_path names first when this file runs (the Go migrator sets it to the
-- configured schema).

-- +goose Up

-- schema_info says which version this schema is at and which clients may use
-- it. The contract, for every later migration:
--
--   version          this schema's version: the number of the last migration
--                    applied. Every migration CREATE OR REPLACEs this function
--                    with its own number.
--   compatible_from  the oldest client schema version that may still use this
--                    schema. A migration that breaks clients written for an
--                    older version (a function removed or its result changed,
--                    a table that older clients would write wrongly) raises it
--                    to its own number; one that only adds, keeps it.
--
-- A client written for version N accepts a schema with
-- compatible_from <= N <= version, and asks for `migrations.Up` (or
-- `reaper migrate up`) when version < N, or for a newer client when
-- compatible_from > N. It calls this function once, before it registers as a
-- holder; a schema where it does not exist is at version 1 or 2.
-- +goose StatementBegin
CREATE FUNCTION schema_info() RETURNS TABLE (version integer, compatible_from integer)
LANGUAGE sql STABLE AS $$
    SELECT 3, 3
$$;
-- +goose StatementEnd

-- key_hash, again, with the same result. Version 1 wrote the NUL separator as
-- the literal '\x00', which reads as an escape (and fails: "invalid byte
-- sequence for encoding UTF8: 0x00") in a session with
-- standard_conforming_strings off, because an SQL function's body is parsed
-- with the calling session's settings. So key_hash, and with it every
-- table-mode acquire, failed in such sessions. decode('00', 'hex') means the
-- same byte under either setting.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION key_hash(p_name text, p_id text) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT ('x' || encode(substring(sha256(
               convert_to(current_schema(), 'UTF8') || decode('00', 'hex') ||
               convert_to(p_name, 'UTF8') || decode('00', 'hex') ||
               convert_to(p_id, 'UTF8')) FROM 1 FOR 8), 'hex'))::bit(64)::bigint
$$;
-- +goose StatementEnd

-- pin_search_path pins search_path = <this schema>, pg_catalog, pg_temp on
-- every function and procedure of this schema (pg_proc, by namespace), so that
-- each behaves the same whatever its caller's search_path is, and returns how
-- many it changed. Functions already pinned so are left alone; other
-- settings a function has are kept. CREATE OR REPLACE drops a function's SET
-- clause, so every later migration calls this after creating or replacing
-- functions.
--
-- Two functions are left out on purpose: advisory_acquire and
-- advisory_release, the hot path, name every object explicitly instead (see
-- version 2), because a SET attribute costs a configuration change on entry
-- and again on exit of every call. A function added to the hot path later is
-- added to that list here, by a CREATE OR REPLACE of this function.
--
-- The schema is current_schema(): the one search_path names when this runs by
-- migration, and this function's own once its first run (below) pinned it. It
-- reaches the ALTER statements only through format's %I, and each function
-- through its regprocedure, which quotes its own name.
-- +goose StatementBegin
CREATE FUNCTION pin_search_path() RETURNS integer
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

-- +goose Down
DROP FUNCTION pin_search_path();
DROP FUNCTION schema_info();

-- key_hash as version 1 created it, pinned as version 1 pinned it.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION key_hash(p_name text, p_id text) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT ('x' || encode(substring(sha256(
               convert_to(current_schema(), 'UTF8') || '\x00'::bytea ||
               convert_to(p_name, 'UTF8') || '\x00'::bytea ||
               convert_to(p_id, 'UTF8')) FROM 1 FOR 8), 'hex'))::bit(64)::bigint
$$;
-- +goose StatementEnd

-- +goose StatementBegin
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION key_hash(text,text) SET search_path = %I, pg_catalog, pg_temp', current_schema());
END
$$;
-- +goose StatementEnd
