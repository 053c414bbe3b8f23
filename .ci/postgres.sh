#!/usr/bin/env bash
# Start a throwaway PostgreSQL server for fedtune's ledger tests and print how to reach it.
#
# Why: the ledger must behave the same on SQLite and PostgreSQL, so CI runs every ledger test against a
# real server. This script installs PostgreSQL from Debian packages if it is missing, creates a cluster of
# its own (it never touches the distribution's `main` cluster), starts it on 127.0.0.1 only, and creates
# a password-protected role that may create schemas in its own database.
#
# Usage (as root, or as a user with passwordless sudo):
#     eval "$(bash .ci/postgres.sh)"        # sets FEDTUNE_TEST_POSTGRES_URL in the calling shell
# stdout carries exactly one line, `export FEDTUNE_TEST_POSTGRES_URL=...`; progress goes to stderr.
# Safe to run again: an existing cluster, role, password and database are reused, a running server is kept.
#
# Knobs (environment): FEDTUNE_PG_PORT (5433), FEDTUNE_PG_DATA (/var/lib/postgresql/fedtune-ci),
# FEDTUNE_PG_USER (fedtune), FEDTUNE_PG_DB (fedtune_test), FEDTUNE_PG_ENV_FILE (also write the export line there).
set -euo pipefail

PORT="${FEDTUNE_PG_PORT:-5433}"
DATA="${FEDTUNE_PG_DATA:-/var/lib/postgresql/fedtune-ci}"
ROLE="${FEDTUNE_PG_USER:-fedtune}"
DB="${FEDTUNE_PG_DB:-fedtune_test}"
STATE="${DATA}-state"   # outside the data dir: initdb wants an empty directory
SOCK="$STATE/run"

log() { echo "postgres.sh: $*" >&2; }

if [ "$(id -u)" = 0 ]; then
    as_root() { "$@"; }
    as_postgres() { runuser -u postgres -- "$@"; }
else
    as_root() { sudo -n "$@"; }
    as_postgres() { sudo -n -u postgres "$@"; }
fi

find_bindir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

BIN="$(find_bindir || true)"
if [ -z "$BIN" ] || [ ! -x "$BIN/initdb" ]; then
    log "installing PostgreSQL from Debian packages"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
    BIN="$(find_bindir)"
fi
log "using $BIN"

as_root mkdir -p "$DATA" "$SOCK"
as_root chown postgres:postgres "$DATA" "$STATE" "$SOCK"
as_root chmod 700 "$DATA" "$STATE"

if [ ! -s "$STATE/password" ]; then
    head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n' | as_root tee "$STATE/password" >/dev/null
    as_root chmod 600 "$STATE/password"
fi
PASSWORD="$(as_root cat "$STATE/password")"

if [ ! -s "$DATA/PG_VERSION" ]; then
    log "initialising cluster in $DATA"
    as_postgres "$BIN/initdb" -D "$DATA" -U postgres -E UTF8 --no-locale \
        --auth-local=peer --auth-host=scram-sha-256 >&2
fi

if as_postgres "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
    log "server already running"
else
    log "starting server on 127.0.0.1:$PORT"
    as_postgres "$BIN/pg_ctl" -D "$DATA" -l "$STATE/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $PORT -k $SOCK" start >&2
fi

psql_admin() { as_postgres "$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$SOCK" -p "$PORT" -U postgres -d postgres "$@"; }

# Role and database: create when absent, always (re)set the password so the printed URL is valid.
psql_admin -v role="$ROLE" -v pw="$PASSWORD" -v db="$DB" >&2 <<'SQL'
SELECT format('CREATE ROLE %I LOGIN', :'role') WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'role')
\gexec
ALTER ROLE :"role" WITH LOGIN CREATEDB PASSWORD :'pw';
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'role')
WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'db')
\gexec
SQL

LINE="export FEDTUNE_TEST_POSTGRES_URL=postgresql+psycopg://$ROLE:$PASSWORD@127.0.0.1:$PORT/$DB"
if [ -n "${FEDTUNE_PG_ENV_FILE:-}" ]; then
    echo "$LINE" >"$FEDTUNE_PG_ENV_FILE"
fi
log "ready"
echo "$LINE"
