#!/usr/bin/env bash
# Prepares a local PostgreSQL for the control plane's tests and prints its URL.
#
#   export BERTH_TEST_POSTGRES="$(bash scripts/test-postgres.sh)"
#   cargo test -p berth-control-plane
#
# Idempotent: installs `postgresql` (Debian, as root) when it is missing,
# starts the default cluster, and makes the role `berth` (password `berth`,
# CREATEDB, so each test can make and drop its own database) and the
# database `berth_test` when they are absent. Progress goes to stderr; the
# URL is the last line on stdout.
set -euo pipefail

URL="postgres://berth:berth@127.0.0.1:5432/berth_test"

log() { printf 'test-postgres: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    log "must run as root (it installs and starts PostgreSQL)"
    exit 1
fi

if ! command -v pg_ctlcluster >/dev/null 2>&1 || ! command -v pg_lsclusters >/dev/null 2>&1; then
    log "installing postgresql"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq postgresql >&2
fi

# The first cluster listed (Debian makes `<version> main` on install).
read -r VERSION CLUSTER PORT STATUS _ < <(pg_lsclusters --no-header | head -n 1) || true
if [ -z "${VERSION:-}" ]; then
    VERSION="$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n 1)"
    log "no cluster yet; creating $VERSION main"
    pg_createcluster "$VERSION" main >&2
    read -r VERSION CLUSTER PORT STATUS _ < <(pg_lsclusters --no-header | head -n 1)
fi
if [ "$PORT" != "5432" ]; then
    log "cluster $VERSION/$CLUSTER listens on port $PORT, expected 5432"
    exit 1
fi
if [ "$STATUS" != "online" ]; then
    log "starting cluster $VERSION/$CLUSTER"
    pg_ctlcluster "$VERSION" "$CLUSTER" start >&2
fi

# Wait until it accepts connections.
for _ in $(seq 1 60); do
    if runuser -u postgres -- psql -p "$PORT" -Atqc 'SELECT 1' postgres >/dev/null 2>&1; then
        break
    fi
    sleep 0.5
done

psql_admin() { runuser -u postgres -- psql -p "$PORT" -v ON_ERROR_STOP=1 -Atq "$@" postgres; }

if [ "$(psql_admin -c "SELECT 1 FROM pg_roles WHERE rolname = 'berth'")" != "1" ]; then
    log "creating role berth"
    psql_admin -c "CREATE ROLE berth LOGIN PASSWORD 'berth' CREATEDB" >&2
else
    # Keep the password and CREATEDB as the tests expect, even on an old role.
    psql_admin -c "ALTER ROLE berth LOGIN PASSWORD 'berth' CREATEDB" >&2
fi

if [ "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = 'berth_test'")" != "1" ]; then
    log "creating database berth_test"
    psql_admin -c "CREATE DATABASE berth_test OWNER berth" >&2
fi

# Check the URL works over TCP with the password, as the tests connect.
if ! PGPASSWORD=berth psql -h 127.0.0.1 -p "$PORT" -U berth -Atqc 'SELECT 1' berth_test >/dev/null 2>&1; then
    log "cannot log in as berth over TCP; check pg_hba.conf of cluster $VERSION/$CLUSTER"
    exit 1
fi

log "ready ($VERSION/$CLUSTER)"
echo "$URL"
