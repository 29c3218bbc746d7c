-- The pglease SQL protocol, run from psql: a holder registers, renews its
-- lease, finds a key held by someone else, takes another, fences a write
-- with it, releases it and closes. README.md ("The SQL protocol") describes
-- each step; lease/protocol_test.go runs this file while Go clients contend
-- for the same keys.
--
--   psql "$DATABASE_URL" -X -v ON_ERROR_STOP=1 -v schema=lease \
--        -v held_name=invoice -v held_id=41 -v key_name=invoice -v key_id=42 \
--        -v data=lease_demo_writes -v gate=0 -f protocol.sql
--
-- held_name/held_id: a key that someone else holds; key_name/key_id: the key
-- to take; data: a table in the schema, (k text PRIMARY KEY, n bigint,
-- token bigint), whose row k = key_id the fenced write updates; gate: an advisory lock the script waits for
-- while it holds the key (0: none), so that a test can look at it then.
--
-- Each statement runs in its own transaction (psql's autocommit), at READ
-- COMMITTED, as acquire requires. A check that fails stops the script with
-- an error (it divides by zero).

\set QUIET on

-- 0. The schema must be at version 6 or later, and serve clients of 6.
SELECT 1 / (version >= 6 AND compatible_from <= 6)::int AS schema_ok
  FROM :"schema".schema_info() \gset

-- 1. Register a holder, with a secret of its own (16 random bytes or more:
-- two UUIDs here) and a lease of 30 seconds. Keep the id and the secret:
-- every call that acts for the holder passes both. Only the secret's SHA-256
-- is stored.
SELECT decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex') AS secret \gset
SELECT :"schema".register('psql', pg_backend_pid(), 'protocol.sql', interval '30 seconds', :'secret') AS holder \gset
\echo registered holder :holder

-- 2. Renew: the heartbeat, well within the TTL (every TTL/3, say). alive
-- false: the lease ran out, every lock of the holder is lost, register anew.
-- locks and tokens_xor describe the lock rows the holder has: compare them
-- with the locks it believes it holds.
SELECT 1 / alive::int AS renewed, locks AS rows_held FROM :"schema".renew(:holder, :'secret') \gset
\echo renewed, rows held :rows_held

-- 3. Acquire a key that someone else holds: acquired is false, and the row
-- says who has it and for how long at most (expires_in). A waiter tries
-- again after a notification on channel(), after expires_in, or after a
-- short pause.
SELECT 1 / (NOT acquired)::int AS refused, holder_id AS other_holder, application AS other_application
  FROM :"schema".acquire(:'held_name', :'held_id', :holder, :'secret') \gset
\echo :held_name/:held_id is held by holder :other_holder (:other_application)

-- 4. Acquire a free key: acquired is true, with a fencing token.
SELECT 1 / acquired::int AS ok, token FROM :"schema".acquire(:'key_name', :'key_id', :holder, :'secret') \gset
\echo acquired :key_name/:key_id with token :token

-- 5. Write the protected data in a transaction of its own, fenced: fence
-- raises SQLSTATE 55L01 unless the token is the live holder's, and keeps the
-- lock from passing on until this transaction ends.
BEGIN;
SELECT :"schema".fence(:'key_name', :'key_id', :token) AS fenced \gset
UPDATE :"schema".:"data" SET n = n + 1, token = :token WHERE k = :'key_id' AND token < :token;
SELECT 1 / count(*)::int AS written FROM :"schema".:"data" WHERE k = :'key_id' AND token = :token \gset
COMMIT;
\echo fenced write done

-- (For tests: wait here, holding the key, until the gate opens.)
SELECT CASE WHEN :gate <> 0 THEN pg_advisory_lock_shared(:gate) END \gset
SELECT CASE WHEN :gate <> 0 THEN pg_advisory_unlock_shared(:gate) END \gset

-- 6. Release: deletes the lock row with exactly this token, and wakes the
-- waiters. true: released; false: it was gone already (lost).
SELECT 1 / released::int AS ok
  FROM :"schema".release(:'key_name', :'key_id', :token, :holder, :'secret') AS released \gset
\echo released

-- 7. Kinds, key sets and the queue (schema version 6): acquire_keys takes
-- one key or a set, each exclusive ('x'), shared ('s') or a semaphore permit
-- ('p', one key alone, with its number of permits), all or nothing. Here a
-- shared lock and an exclusive one as one set; tokens come in the order of
-- the keys given.
SELECT 1 / acquired::int AS ok, tokens[1] AS shared_token, tokens[2] AS set_token
  FROM :"schema".acquire_keys(ARRAY[:'key_name' || '-shared', :'key_name' || '-set'],
                              ARRAY[:'key_id', :'key_id'], '{s,x}', 1, :holder, :'secret', false, '{}') \gset
\echo acquired a shared lock and an exclusive one as a set

-- A permit of a semaphore of 2: slots are 1 and 2.
SELECT 1 / acquired::int AS ok, slots[1] AS slot
  FROM :"schema".acquire_keys(ARRAY[:'key_name' || '-sem'], ARRAY[:'key_id'], '{p}', 2,
                              :holder, :'secret', false, '{}') \gset
\echo permit :slot of 2

-- Wait for the key someone else holds: with wait true the call takes a place
-- in the queue (queued), kept on every later call; the view waiting shows
-- it. Give the place up with leave.
SELECT 1 / (queued AND NOT acquired)::int AS ok
  FROM :"schema".acquire_keys(ARRAY[:'held_name'], ARRAY[:'held_id'], '{x}', 1,
                              :holder, :'secret', true, '{}') \gset
SELECT 1 / count(*)::int AS ok, min(position) AS place FROM :"schema".waiting
 WHERE name = :'held_name' AND entity_id = :'held_id' AND holder_id = :holder \gset
SELECT 1 / gone::int AS ok
  FROM :"schema".leave(:'held_name', :'held_id', :holder, :'secret', '{}') AS gone \gset
\echo queued at place :place, then left

-- 8. Close: deletes the holder's remaining lock rows and its holder row.
SELECT 1 / closed::int AS ok FROM :"schema".close_holder(:holder, :'secret') AS closed \gset
\echo closed
