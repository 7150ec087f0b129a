#!/usr/bin/env bash
# Runs the whole Ordo suite on this machine: builds the release binaries,
# makes sure a Redis answers (starting a private one if none does), starts the
# five services on their default ports with each log line prefixed by the
# service's name, and stops everything on Ctrl-C or SIGTERM. If a service
# exits on its own, the others are stopped and the script exits non-zero.
#
# Usage: scripts/up.sh   (or `just up`; `just down` stops it from elsewhere)
# Environment:
#   ORDO_REDIS_URL               Redis to use (default redis://127.0.0.1:6379)
#   OTEL_EXPORTER_OTLP_ENDPOINT  export spans over OTLP/gRPC, e.g. http://localhost:4317
#   ORDO_UP_PROFILE              cargo profile to build and run (default release)
#   ORDO_UP_GRACE                seconds a service may take to stop (default 15)
#   Every service flag's environment variable (docs/configuration.md) is
#   passed through unchanged.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"
PROFILE="${ORDO_UP_PROFILE:-release}"
GRACE="${ORDO_UP_GRACE:-15}"
export ORDO_REDIS_URL="${ORDO_REDIS_URL:-redis://127.0.0.1:6379}"
# Start order: the back end first, so the harmonizer's lazy channels find
# their peers on the first try (any order works, only the first calls differ).
SERVICES=(stateless reassembler push-gateway stateful-worker harmonizer)
PID_FILE="$ROOT/target/ordo-up.pid"

NAMES=()
PIDS=()
REDIS_PID=""
STOP_REQUESTED=0
SLEEP_PID=""

log() { printf '[%-15s] %s\n' "up" "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }

# Prefixes every line of a service's output with its name. It ignores Ctrl-C
# so that the service's last lines, written while it drains, still show.
prefix() {
  trap '' INT TERM
  local line
  while IFS= read -r line || [[ -n "$line" ]]; do
    printf '[%-15s] %s\n' "$1" "$line"
  done
}

# Starts "$@" in the background with prefixed output. `$!` is the program
# itself (not the prefixer): the process substitution is not a pipeline.
spawn() {
  local name="$1"
  shift
  "$@" > >(prefix "$name") 2>&1 &
  NAMES+=("$name")
  PIDS+=("$!")
}

# shellcheck disable=SC2317 # reached through the EXIT trap
# Sends SIGTERM to the given pids and waits up to GRACE seconds, then kills.
stop_pids() {
  local pid deadline
  for pid in "$@"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  deadline=$((SECONDS + GRACE))
  for pid in "$@"; do
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
      sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
      log "pid $pid did not stop within ${GRACE}s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
  done
}

# shellcheck disable=SC2317 # reached through the EXIT trap
# The harmonizer stops first and alone: while it drains, in-flight events
# still need the workers, reassembler and push-gateway behind it. Redis goes
# last, after everything that writes to it.
stop_all() {
  local i front=() rest=()
  for i in "${!PIDS[@]}"; do
    case "${NAMES[$i]}" in
      harmonizer) front+=("${PIDS[$i]}") ;;
      redis) ;;
      *) rest+=("${PIDS[$i]}") ;;
    esac
  done
  if ((${#front[@]} > 0)); then stop_pids "${front[@]}"; fi
  if ((${#rest[@]} > 0)); then stop_pids "${rest[@]}"; fi
  if [[ -n "$REDIS_PID" ]]; then
    log "stopping the Redis started by up.sh"
    stop_pids "$REDIS_PID"
  fi
}

# shellcheck disable=SC2317 # reached through the EXIT trap
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  if [[ -n "$SLEEP_PID" ]]; then kill "$SLEEP_PID" 2>/dev/null || true; fi
  if ((${#PIDS[@]} > 0)) || [[ -n "$REDIS_PID" ]]; then
    log "stopping services"
    stop_all
    log "all stopped"
  fi
  if [[ -f "$PID_FILE" && "$(cat "$PID_FILE" 2>/dev/null)" == "$$" ]]; then rm -f "$PID_FILE"; fi
  exit "$status"
}
trap cleanup EXIT
trap 'STOP_REQUESTED=1' INT TERM

# ---------------------------------------------------------------- one at a time
if [[ -f "$PID_FILE" ]] && kill -0 "$(cat "$PID_FILE" 2>/dev/null)" 2>/dev/null; then
  die "already running (pid $(cat "$PID_FILE")); stop it with 'just down'"
fi

# ---------------------------------------------------------------------- build
case "$PROFILE" in
  release) cargo build --release --bins ;;
  dev | debug)
    PROFILE=debug
    cargo build --bins
    ;;
  *) cargo build --profile "$PROFILE" --bins ;;
esac
BIN_DIR="$ROOT/target/$PROFILE"
for name in "${SERVICES[@]}" ordo; do
  [[ -x "$BIN_DIR/$name" ]] || die "$BIN_DIR/$name was not built"
done
mkdir -p "$(dirname "$PID_FILE")"
echo "$$" >"$PID_FILE"

# ---------------------------------------------------------------------- redis
# host and port of redis://[user:password@]host[:port][/db]
redis_rest="${ORDO_REDIS_URL#*://}"
redis_rest="${redis_rest##*@}"
redis_rest="${redis_rest%%/*}"
redis_rest="${redis_rest%%\?*}"
REDIS_PORT=6379
if [[ "$redis_rest" == \[* ]]; then
  REDIS_HOST="${redis_rest%%]*}"
  REDIS_HOST="${REDIS_HOST#[}"
  [[ "$redis_rest" == *]:* ]] && REDIS_PORT="${redis_rest##*]:}"
elif [[ "$redis_rest" == *:* ]]; then
  REDIS_HOST="${redis_rest%:*}"
  REDIS_PORT="${redis_rest##*:}"
else
  REDIS_HOST="$redis_rest"
fi
REDIS_HOST="${REDIS_HOST:-127.0.0.1}"

redis_answers() {
  if have redis-cli; then
    [[ "$(timeout 2 redis-cli -u "$ORDO_REDIS_URL" ping 2>/dev/null)" == PONG ]]
  else
    # shellcheck disable=SC2016 # expanded by the inner bash
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$REDIS_HOST" "$REDIS_PORT" 2>/dev/null
  fi
}

REDIS_NOTE="already running"
if ! redis_answers; then
  case "$REDIS_HOST" in
    127.* | localhost | ::1 | 0.0.0.0) ;;
    *) die "no Redis answers at $ORDO_REDIS_URL, and it is not on this machine" ;;
  esac
  have redis-server || die "no Redis at $ORDO_REDIS_URL and no redis-server (run 'just deps')"
  log "no Redis at $ORDO_REDIS_URL; starting a private redis-server on port $REDIS_PORT"
  spawn redis redis-server --port "$REDIS_PORT" --bind 127.0.0.1 -::1 --save '' --appendonly no \
    --daemonize no --dir "${TMPDIR:-/tmp}"
  # Not a service: stopped last, and its exit is checked like theirs below.
  REDIS_PID="${PIDS[-1]}"
  REDIS_NOTE="started by up.sh, stopped on exit"
  for _ in $(seq 50); do
    redis_answers && break
    kill -0 "$REDIS_PID" 2>/dev/null || die "redis-server exited at start-up"
    sleep 0.1
  done
  redis_answers || die "the redis-server started on port $REDIS_PORT does not answer"
fi

# ------------------------------------------------------------------- services
for name in "${SERVICES[@]}"; do
  spawn "$name" "$BIN_DIR/$name"
done

# Index of the first started process that is gone, if any.
first_dead() {
  local i
  for i in "${!PIDS[@]}"; do
    if ! kill -0 "${PIDS[$i]}" 2>/dev/null; then
      printf '%s' "$i"
      return 0
    fi
  done
  return 1
}

port_of() { printf '%s' "${1##*:}"; }
HARMONIZER_PORT="$(port_of "${HARMONIZER_LISTEN:-0.0.0.0:50051}")"

# The banner waits for the front door, so the examples work when it shows.
ready=0
for _ in $(seq 60); do
  if ((STOP_REQUESTED)) || first_dead >/dev/null; then break; fi
  if "$BIN_DIR/ordo" health --addr "127.0.0.1:$HARMONIZER_PORT" --timeout 1s >/dev/null 2>&1; then
    ready=1
    break
  fi
  sleep 0.5
done
((ready)) || log "warning: the harmonizer is not SERVING yet on port $HARMONIZER_PORT"

cat >&2 <<EOF

  Ordo is up ($PROFILE build)
    harmonizer       localhost:$HARMONIZER_PORT   front door: Process, Submit, ListOperations
    stateless        localhost:$(port_of "${STATELESS_LISTEN:-0.0.0.0:50052}")
    stateful-worker  localhost:$(port_of "${WORKER_LISTEN:-0.0.0.0:50053}")
    reassembler      localhost:$(port_of "${REASSEMBLER_LISTEN:-0.0.0.0:50054}")
    push-gateway     localhost:$(port_of "${PUSH_GATEWAY_LISTEN:-0.0.0.0:50055}")   Subscribe (gRPC); Server-Sent Events on localhost:$(port_of "${PUSH_GATEWAY_SSE_LISTEN:-0.0.0.0:50056}") (docs/push.md)
    redis            $ORDO_REDIS_URL ($REDIS_NOTE)
    traces           ${OTEL_EXPORTER_OTLP_ENDPOINT:-not exported (set OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4317)}

  Try:
    grpcurl -plaintext localhost:$HARMONIZER_PORT list
    grpcurl -plaintext localhost:$HARMONIZER_PORT ordo.v1.Harmonizer/ListOperations
    target/$(basename "$BIN_DIR")/ordo send --addr localhost:$HARMONIZER_PORT --text 'hello, ordered world' --latency exp:10ms
    target/$(basename "$BIN_DIR")/ordo send --addr localhost:$HARMONIZER_PORT --text 'hello, ordered world' --latency exp:10ms --unordered

  Ctrl-C (or 'just down') stops everything.

EOF

# ----------------------------------------------------------------- supervise
exit_code=0
while ((!STOP_REQUESTED)); do
  if i="$(first_dead)"; then
    code=0
    wait "${PIDS[$i]}" || code=$?
    log "${NAMES[$i]} exited unexpectedly (exit code $code); stopping the others"
    [[ "$REDIS_PID" == "${PIDS[$i]}" ]] && REDIS_PID=""
    unset "PIDS[$i]" "NAMES[$i]"
    exit_code=1
    break
  fi
  # A background sleep, because `wait` returns at once when a signal comes in
  # and a foreground `sleep` would delay Ctrl-C handling.
  sleep 1 &
  SLEEP_PID=$!
  wait "$SLEEP_PID" 2>/dev/null || true
  SLEEP_PID=""
done
((STOP_REQUESTED)) && log "stop requested"
exit "$exit_code"
