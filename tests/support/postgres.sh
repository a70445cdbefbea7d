#!/usr/bin/env bash
# Starts (once) the PostgreSQL server the tests use and prints its URL. Idempotent: a
# server already running in the folder is reused. As root it runs the server as the
# `postgres` user, since initdb and postgres refuse to run as root.
# `postgres.sh stop` stops the server in the folder (fast shutdown).
#   VERIGATE_PG_DIR   data folder (default: target/test-postgres in the repository)
#   VERIGATE_PG_PORT  TCP port on 127.0.0.1 (default: 54329)
set -euo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
dir="${VERIGATE_PG_DIR:-$here/target/test-postgres}"
port="${VERIGATE_PG_PORT:-54329}"

bin=""
if command -v pg_ctl >/dev/null 2>&1; then
    # Where the server binaries really are (pg_ctl on the PATH may be a lone symlink).
    bin="$(dirname "$(readlink -f "$(command -v pg_ctl)")")"
else
    for candidate in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        bin="$candidate"
        break
    done
fi
if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
    echo "PostgreSQL is not installed (no initdb); on Debian: apt-get install postgresql" >&2
    exit 1
fi

as_owner() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

if [ "${1:-}" = stop ]; then
    as_owner "$bin/pg_ctl" -D "$dir" -m fast -w stop >/dev/null
    exit 0
fi

url="postgres://postgres@127.0.0.1:$port/postgres"
if [ -f "$dir/PG_VERSION" ] && as_owner "$bin/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
    echo "$url"
    exit 0
fi
# Another checkout's test server on the port serves as well as our own would.
if "$bin/pg_isready" -q -h 127.0.0.1 -p "$port" >/dev/null 2>&1; then
    echo "a PostgreSQL server already listens on 127.0.0.1:$port: using it" >&2
    echo "$url"
    exit 0
fi
mkdir -p "$dir"
if [ "$(id -u)" = 0 ]; then chown postgres "$dir"; chmod 700 "$dir"; fi
if [ ! -f "$dir/PG_VERSION" ]; then
    as_owner "$bin/initdb" -D "$dir" -A trust -U postgres >"$dir.initdb.log" 2>&1 || {
        cat "$dir.initdb.log" >&2
        exit 1
    }
fi
as_owner "$bin/pg_ctl" -D "$dir" -l "$dir/server.log" -w \
    -o "-k $dir -h 127.0.0.1 -p $port -c max_connections=300 -c shared_buffers=128MB" start >/dev/null
echo "$url"
