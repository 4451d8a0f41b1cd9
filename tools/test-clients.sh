#!/usr/bin/env bash
# Runs the Go and TypeScript clients' end-to-end tests against the real service: starts
# `dembrane-webhooks serve` on loopback ports the kernel picks (port 0, read back from the
# service's log, so no other process can take them in between) with a fresh SQLite file and a
# random JWT secret, lets loopback receivers through, runs both tests, and stops the service again
# whatever happened (its log is shown when something failed). `make test-clients` calls it
# once the clients are built; it exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

VPY=.venv/bin/python
work=$(mktemp -d)
pid=

stop() {
  local status=$? code=0
  if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
    # SIGTERM lets the service finish its calls and stop its sender processes itself.
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "test-clients: the service did not stop within 20 s; killing it" >&2
      kill -KILL -- "-$pid" 2>/dev/null || true
    fi
  fi
  if [[ -n $pid ]]; then
    wait "$pid" 2>/dev/null || code=$?
    if ((code != 0)); then
      echo "test-clients: the service exited with status $code" >&2
      status=1
    fi
  fi
  if ((status != 0)) && [[ -s $work/service.log ]]; then
    echo "--- the service's log" >&2
    cat "$work/service.log" >&2
  fi
  rm -rf "$work"
  exit "$status"
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

secret=$("$VPY" -c 'import secrets; print(secrets.token_hex(32))')

# Job control puts the service and its sender processes in a process group of their own,
# which the fallback above can kill as a whole.
set -m
WEBHOOKS_GRPC_PORT=0 \
  WEBHOOKS_HTTP_PORT=0 \
  WEBHOOKS_BIND=127.0.0.1 \
  WEBHOOKS_DATABASE_URL="sqlite:///$work/webhooks.db" \
  WEBHOOKS_JWT_SECRET=$secret \
  WEBHOOKS_ALLOWED_TARGETS=127.0.0.0/8 \
  WEBHOOKS_LOG_LEVEL=INFO \
  .venv/bin/dembrane-webhooks serve >"$work/service.log" 2>&1 </dev/null &
pid=$!
set +m

# The port a "<what> listening on <address>:<port>" line of the service's log names.
listening_port() {
  sed -n "s/.*$1 listening on [^ ]*:\([0-9][0-9]*\)\$/\1/p" "$work/service.log" | head -n 1
}
healthy() {
  [[ -n $http_port ]] &&
    "$VPY" -c 'import sys, urllib.request as u; u.urlopen(sys.argv[1], timeout=2)' \
      "http://127.0.0.1:$http_port/healthz" 2>/dev/null
}
echo "test-clients: waiting for the service"
grpc_port= http_port=
deadline=$((SECONDS + 60))
until [[ -n $grpc_port ]] && healthy; do
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "test-clients: the service exited at start" >&2
    exit 1
  fi
  if ((SECONDS > deadline)); then
    echo "test-clients: the service was not healthy within a minute" >&2
    exit 1
  fi
  sleep 0.2
  grpc_port=$(listening_port gRPC)
  http_port=$(listening_port "REST gateway")
done
echo "test-clients: the service is up (gRPC 127.0.0.1:$grpc_port, REST :$http_port)"

export E2E_GRPC_TARGET=127.0.0.1:$grpc_port E2E_JWT_SECRET=$secret

# Both clients run, whichever fails first.
failed=0
echo "test-clients: Go client"
(cd clients/go && go test -count=1 -v ./e2e/) || failed=1
echo "test-clients: TypeScript client"
(cd clients/typescript && node --test dist/test/e2e.test.js) || failed=1
exit "$failed"
