#!/usr/bin/env bash
# Runs a command with a private PostgreSQL server for the test suite's PostgreSQL lane.
#
#   tools/postgres.sh COMMAND...      # COMMAND sees WEBHOOKS_TEST_POSTGRES_URL
#
# When WEBHOOKS_TEST_POSTGRES_URL is already set, that server is used as it is. Otherwise a
# throw-away cluster is created under build/postgres, listening on 127.0.0.1 only, and
# stopped again afterwards. The server binaries come from Debian's postgresql package,
# installed here when missing. PostgreSQL refuses to run as root, so as root the cluster
# runs as the `postgres` user that the package creates.
set -euo pipefail

if [[ -n "${WEBHOOKS_TEST_POSTGRES_URL:-}" ]]; then
  exec "$@"
fi

root=$(cd "$(dirname "$0")/.." && pwd)
dir="$root/build/postgres"
port="${WEBHOOKS_TEST_POSTGRES_PORT:-54329}"

find_bin() {
  local found
  found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  [[ -n "$found" && -x "$found/pg_ctl" ]] && echo "$found"
}

bin=$(find_bin || true)
if [[ -z "$bin" ]]; then
  echo "postgres lane: installing PostgreSQL from Debian's packages" >&2
  if [[ $(id -u) -ne 0 ]]; then
    echo "postgres lane: PostgreSQL is not installed; run 'apt-get install postgresql' as root" >&2
    exit 1
  fi
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends postgresql >/dev/null
  bin=$(find_bin)
fi

as_owner=()
if [[ $(id -u) -eq 0 ]]; then
  as_owner=(runuser -u postgres --)
fi

rm -rf "$dir"
mkdir -p "$dir"
if [[ $(id -u) -eq 0 ]]; then
  chown postgres "$dir"
fi
"${as_owner[@]}" "$bin/initdb" -D "$dir/data" -U postgres -A trust --no-sync -E UTF8 >/dev/null
# fsync off: a test cluster is thrown away, and durability is SQLite's and the real server's job.
"${as_owner[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
  -o "-h 127.0.0.1 -p $port -k $dir -c fsync=off -c full_page_writes=off -c max_connections=300" \
  start >/dev/null

stop() {
  "${as_owner[@]}" "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
}
trap stop EXIT

export WEBHOOKS_TEST_POSTGRES_URL="postgresql://postgres@127.0.0.1:$port/postgres"
"$@"
