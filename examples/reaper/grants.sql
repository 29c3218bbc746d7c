-- Privileges the pglease reaper needs, and no more.
--
-- Written for the default schema "lease" and a role named pglease_reaper;
-- replace both names if yours differ. Run it as the owner of the schema
-- (the role that applied the migrations), for example:
--
--   psql "$ADMIN_DATABASE_URL" -f grants.sql
--
-- Create the login role once, with a password of your choosing:
--
--   CREATE ROLE pglease_reaper LOGIN PASSWORD '...';
--   GRANT CONNECT ON DATABASE yourdb TO pglease_reaper;
--
-- Why each privilege:
--   USAGE on the schema     to see the tables at all.
--   SELECT, DELETE          to find dead rows and delete them.
--   UPDATE on one column    PostgreSQL requires an UPDATE privilege for
--                           SELECT ... FOR UPDATE SKIP LOCKED, which is how
--                           the reaper locks the rows it is about to delete
--                           without waiting on anyone. The reaper never
--                           updates a row; the columns granted are
--                           informational ones that nothing depends on.
-- The deleting is done by the schema's SQL functions reap_holders,
-- reap_locks and reap_dry_run (the procedure reap calls them too), which run
-- with the caller's rights, so these table privileges are what they need;
-- EXECUTE on them, and on schema_info(), is PUBLIC's by default.
-- The delete trigger's functions (channel(), notify_deleted()) are executable
-- by PUBLIC, so deleting lock rows sends the notifications that wake waiters
-- without further grants.
--
-- "reaper migrate up|down" needs more: it creates and drops the tables. Run
-- it as the schema owner, not as this role.

GRANT USAGE ON SCHEMA lease TO pglease_reaper;
GRANT SELECT, DELETE, UPDATE (started_at) ON TABLE lease.holders TO pglease_reaper;
GRANT SELECT, DELETE, UPDATE (acquired_at) ON TABLE lease.locks TO pglease_reaper;
