#!/usr/bin/env bash
# Starts a throwaway PostgreSQL server on a free loopback port (trust auth, data in a temp dir) and
# prints the SQLAlchemy URL for it. Used by .ci/run and `make test-postgres`; installs the
# Debian package first when it is missing (a new machine).
set -euo pipefail
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    (apt-get update -q && apt-get install -y -q postgresql) >&2
fi
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
# A free loopback port unless one is given (another server may hold the usual ones).
PORT=${LEPTONFL_PG_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
DIR=$(mktemp -d /tmp/leptonfl-pg.XXXXXX)
chown postgres "$DIR" 2>/dev/null || true
as_pg() { if [ "$(id -u)" = 0 ]; then su postgres -s /bin/sh -c "$*"; else sh -c "$*"; fi; }
as_pg "$BIN/initdb -D $DIR/data -A trust -U postgres >$DIR/initdb.log 2>&1"
as_pg "$BIN/pg_ctl -D $DIR/data -l $DIR/server.log -w -o '-p $PORT -k $DIR -c listen_addresses=127.0.0.1 -c fsync=off' start >&2"
echo "postgresql+psycopg://postgres@127.0.0.1:$PORT/postgres"
