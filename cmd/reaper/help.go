package main

const usageText = `reaper deletes the rows that dead pglease holders left behind.

Usage:
  reaper --once     [flags]        one pass, then exit (cron, Kubernetes CronJob)
  reaper --schedule SPEC [flags]   a pass at start, then on a schedule until
                                   SIGINT/SIGTERM (daemon)
  reaper migrate up|status|down [flags]
                                   apply, show or roll back the pglease schema
  reaper help [migrate]            this help, or the help of migrate

Flags may come before or after the command and its action.

Flags (each has an environment variable; a flag given wins over it):
  --database-url URL     PostgreSQL connection string           DATABASE_URL
                         (URL or "key=value ..."). When neither is set, the
                         libpq variables are used: PGHOST, PGPORT, PGUSER,
                         PGPASSWORD, PGDATABASE, PGSSLMODE, PGPASSFILE, ...
                         With none of those either, the reaper connects as
                         the operating system user over the local Unix socket.
                         Prefer the environment or a .pgpass file to putting a
                         password on the command line, where ps shows it.
  --schema NAME          schema of the pglease tables           REAPER_SCHEMA
                         (default "lease")
  --once                 run one pass and exit                  REAPER_ONCE
  --schedule SPEC        cron expression ("*/5 * * * *", with   REAPER_SCHEDULE
                         an optional leading seconds field and
                         CRON_TZ=Zone/Name prefix) or a
                         descriptor ("@hourly", "@every 30s")
  --skip-first-pass      with --schedule: do not run a pass at  REAPER_SKIP_FIRST_PASS
                         start, wait for the schedule
  --batch-size N         rows per batch (one transaction)       REAPER_BATCH_SIZE
                         (default 1000, 1 to 100000)
  --batch-timeout D      time limit of one batch, a Go          REAPER_BATCH_TIMEOUT
                         duration such as 5s or 1m (default 10s)
  --dry-run              count what would be deleted, delete    REAPER_DRY_RUN
                         nothing
  --listen ADDR          with --schedule: serve /healthz and    REAPER_LISTEN
                         /metrics (Prometheus) on ADDR, e.g.
                         ":9187" (port 0 picks a free port; the
                         address is logged)
  --unhealthy-after N    /healthz answers 503 after N failed    REAPER_UNHEALTHY_AFTER
                         passes in a row, ok again after a
                         good pass (default 3)
  --log-format F         text or json (default text)            REAPER_LOG_FORMAT
  --log-level L          debug, info, warn or error             REAPER_LOG_LEVEL
                         (default info)
  --version              print the version and exit
  --help                 print this help and exit

Boolean flags and variables take true or false (also 1, t, T, TRUE, True,
0, f, F, FALSE, False).

Run "reaper help migrate" for the flags of "reaper migrate".

Exit codes:
  0  done; also after SIGINT/SIGTERM, once the batch in flight has finished
  1  a pass or migration failed, or the daemon could not connect at start
     (database unreachable, login refused, timeout, permissions): the message
     says what and how to fix it; running again later is safe
  2  bad flags, environment variables or configuration

Logs go to stderr. A pass that finds nothing to delete logs nothing (at the
default level), so a crontab entry mails only when something happened. A dry
run (--once --dry-run) also prints what it would delete on stdout.

Examples:
  # crontab: every 5 minutes
  */5 * * * * DATABASE_URL=postgres://reaper@db/app reaper --once

  # see what a pass would delete
  reaper --once --dry-run --database-url "postgres://reaper@db:5432/app"

  # daemon with metrics on :9187, JSON logs
  REAPER_SCHEDULE="@every 30s" reaper --listen :9187 --log-format json

  # create or upgrade the schema (as its owner), then check it
  reaper migrate up --database-url "postgres://owner@db/app"
  reaper migrate status
`

const migrateUsageText = `reaper migrate applies, shows or rolls back the pglease schema.

Usage:
  reaper migrate up     [flags]   apply the migrations not yet applied
  reaper migrate status [flags]   list the migrations and whether each is applied;
                                  only reads (says when the schema does not
                                  exist or is not migrated, and exits 0)
  reaper migrate down --yes [flags]
                                  roll back the latest migration (for the first
                                  one: drop the tables and every lock in them)

Run it as the schema's owner (or a role that may CREATE in the database), not
as the reaper's role. Migrations run under an advisory lock: many processes
starting at once migrate exactly once, and running again is safe.

Flags may come before or after "migrate" and its action.

Flags (each has an environment variable; a flag given wins over it):
  --database-url URL     PostgreSQL connection string           DATABASE_URL
                         (URL or "key=value ..."; else the libpq PG*
                         variables; else the operating system user over the
                         local Unix socket)
  --schema NAME          schema of the pglease tables           REAPER_SCHEMA
                         (default "lease")
  --log-format F         text or json (default text)            REAPER_LOG_FORMAT
  --log-level L          debug, info, warn or error             REAPER_LOG_LEVEL
                         (default info)
  --yes                  confirm "migrate down"
  --help                 print this help and exit

The variables of the pass flags (REAPER_SCHEDULE, REAPER_ONCE, ...) are
ignored by migrate.

Exit codes:
  0  done
  1  the migration failed: the message says what and how to fix it
  2  bad flags, environment variables or configuration

Examples:
  reaper migrate up --database-url "postgres://owner@db/app"
  reaper --schema lease migrate status
`
