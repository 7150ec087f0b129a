#!/usr/bin/env bash
# Runs the whole Ordo suite on this machine: builds the release binaries,
# makes sure a Redis answers (starting a private one if none does), starts the
# five services on their default ports with each log line prefixed by the
# service's name, and stops everything on Ctrl-C or SIGTERM. If a service
# exits on its own, the others are stopped and the script exits non-zero.
#
# Ctrl-C stops things the way `just down` does. Each service runs in its own
# session (setsid), so the terminal's SIGINT reaches only this script, not
# every service at once; the script then stops them in order: the front door
# first (it drains: accepted events still get their results, which needs
# everything behind it), then the workers, the reassembler, the push-gateway,
# the stateless service, and last a Redis it started. It exits 0 when every
# service stopped cleanly, 1 when one failed, exited early or had to be killed.
#
# Usage: scripts/up.sh   (or `just up`; `just down` stops it from elsewhere)
# Environment:
#   ORDO_REDIS_URL               Redis to use (default redis://127.0.0.1:6379)
#   OTEL_EXPORTER_OTLP_ENDPOINT  export spans over OTLP/gRPC, e.g. http://localhost:4317
#   ORDO_UP_PROFILE              cargo profile to build and run (default release)
#   ORDO_UP_BIN_DIR              run the binaries in this directory instead,
#                                without building (e.g. target/debug, for tests)
#   ORDO_UP_PID_FILE             where the pid of this script is kept for
#                                `just down` (default target/ordo-up.pid)
#   ORDO_UP_GRACE                seconds a service may take to stop (default 15)
#   Every service flag's environment variable (docs/configuration.md) is
#   passed through unchanged; ports, for instance: HARMONIZER_LISTEN,
#   STATELESS_LISTEN, WORKER_LISTEN, REASSEMBLER_LISTEN, PUSH_GATEWAY_LISTEN,
#   PUSH_GATEWAY_SSE_LISTEN, with ORDO_STATELESS, ORDO_WORKERS,
#   ORDO_REASSEMBLERS, ORDO_PUSH_GATEWAY pointing the services at each other.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"
PROFILE="${ORDO_UP_PROFILE:-release}"
GRACE="${ORDO_UP_GRACE:-15}"
export ORDO_REDIS_URL="${ORDO_REDIS_URL:-redis://127.0.0.1:6379}"
# Start order: the back end first, so the harmonizer's lazy channels find
# their peers on the first try (any order works, only the first calls differ).
SERVICES=(stateless reassembler push-gateway stateful-worker harmonizer)
PID_FILE="${ORDO_UP_PID_FILE:-$ROOT/target/ordo-up.pid}"
# The order services are stopped in (see the header); Redis goes after them.
STOP_ORDER=(harmonizer stateful-worker reassembler push-gateway stateless)

NAMES=()
PIDS=()
REDIS_PID=""
STOP_REQUESTED=0
SLEEP_PID=""
# Set when a service did not stop cleanly (non-zero exit, or killed).
STOP_FAILED=0

log() { printf '[%-15s] %s\n' "up" "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }
# Ctrl-C in a terminal sends SIGINT to the whole process group, so a
# foreground sleep (or probe) dies of it with status 130; under `set -e` that
# would end this script there, before it stopped anything. Every wait in a
# loop goes through this instead; the INT trap decides what happens next.
pause() { sleep "$1" || true; }

# Prefixes every line of a service's output with its name. It ignores Ctrl-C
# so that the service's last lines, written while it drains, still show.
prefix() {
  trap '' INT TERM
  local line
  while IFS= read -r line || [[ -n "$line" ]]; do
    printf '[%-15s] %s\n' "$1" "$line"
  done
}

# Starts "$@" in the background, in a session of its own (so a Ctrl-C in
# the terminal does not reach it: this script stops it, in order), with
# prefixed output. `$!` is the program itself: not the prefixer (the process
# substitution is not a pipeline), and not a setsid parent (a background job
# of a script is no process group leader, so setsid execs in place).
spawn() {
  local name="$1"
  shift
  setsid "$@" > >(prefix "$name") 2>&1 &
  NAMES+=("$name")
  PIDS+=("$!")
}

# shellcheck disable=SC2317 # reached through the EXIT trap
# Sends SIGTERM to the processes named "$1" and waits up to GRACE seconds for
# each, then kills it. Logs how each one ended.
stop_named() {
  local want="$1" i pid code deadline
  local pids=() names=()
  for i in "${!PIDS[@]}"; do
    if [[ "${NAMES[$i]}" == "$want" ]]; then
      pids+=("${PIDS[$i]}")
      names+=("${NAMES[$i]}")
    fi
  done
  ((${#pids[@]} > 0)) || return 0
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  deadline=$((SECONDS + GRACE))
  for i in "${!pids[@]}"; do
    pid="${pids[$i]}"
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
      pause 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      log "${names[$i]} (pid $pid) did not stop within ${GRACE}s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
      STOP_FAILED=1
    fi
    code=0
    wait "$pid" 2>/dev/null || code=$?
    if ((code == 0)); then
      log "${names[$i]} stopped"
    else
      log "${names[$i]} exited with code $code"
      STOP_FAILED=1
    fi
  done
}

# shellcheck disable=SC2317 # reached through the EXIT trap
# One stage at a time, in STOP_ORDER: while the harmonizer drains, its
# in-flight events still need the workers, reassembler and push-gateway
# behind it; a worker's results still need the reassembler. Redis goes last,
# after everything that writes to it.
stop_all() {
  local name
  for name in "${STOP_ORDER[@]}"; do
    stop_named "$name"
  done
  if [[ -n "$REDIS_PID" ]]; then
    log "stopping the Redis started by up.sh"
    stop_named redis
  fi
}

# shellcheck disable=SC2317 # reached through the EXIT trap
cleanup() {
  local status=$?
  trap - EXIT
  # The services are in sessions of their own: this script must outlive
  # them. A second Ctrl-C stops waiting for the drains (kills what is left).
  trap 'GRACE=0; log "stopping without waiting"' INT TERM
  if [[ -n "$SLEEP_PID" ]]; then kill "$SLEEP_PID" 2>/dev/null || true; fi
  if ((${#PIDS[@]} > 0)) || [[ -n "$REDIS_PID" ]]; then
    log "stopping services (Ctrl-C again to kill them at once)"
    stop_all
    if ((STOP_FAILED)); then
      log "stopped; some did not stop cleanly"
      ((status != 0)) || status=1
    else
      log "all stopped"
    fi
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
if [[ -n "${ORDO_UP_BIN_DIR:-}" ]]; then
  BIN_DIR="$(cd "$ORDO_UP_BIN_DIR" && pwd)" || die "ORDO_UP_BIN_DIR=$ORDO_UP_BIN_DIR is not a directory"
  PROFILE="prebuilt, $BIN_DIR"
else
  case "$PROFILE" in
    release) cargo build --release --bins ;;
    dev | debug)
      PROFILE=debug
      cargo build --bins
      ;;
    *) cargo build --profile "$PROFILE" --bins ;;
  esac
  BIN_DIR="$ROOT/target/$PROFILE"
fi
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
    pause 0.1
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
  pause 0.5
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
    $BIN_DIR/ordo send --addr localhost:$HARMONIZER_PORT --text 'hello, ordered world' --latency exp:10ms
    $BIN_DIR/ordo send --addr localhost:$HARMONIZER_PORT --text 'hello, ordered world' --latency exp:10ms --unordered

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
