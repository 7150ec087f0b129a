# Ordo's tasks. CI (.ci/run) runs `just fmt`, `just lint` and `just test`,
# so these recipes are exactly what CI checks.

set shell := ["bash", "-euo", "pipefail", "-c"]

# List the recipes.
default:
    @just --list

# Install the tools the recipes need (just, redis-server, grpcurl, cargo-nextest).
deps:
    bash scripts/install-deps.sh

# Build every binary (debug).
build:
    cargo build --workspace --bins

# Check formatting.
fmt:
    cargo fmt --all -- --check

# Clippy on everything, warnings are errors.
lint:
    cargo clippy --workspace --all-targets -- -D warnings

# Run all tests; the binaries are built first, as the end-to-end tests spawn them from target/debug.
test: deps
    bash scripts/validate-k8s.sh
    cargo build --workspace --bins
    cargo nextest run --workspace --no-fail-fast

# Render every deploy/k8s overlay (kustomize) and validate it against the
# Kubernetes schemas in strict mode; part of `just test`.
k8s-validate: deps
    bash scripts/validate-k8s.sh

# Run the five services locally (release build) on their default ports; Ctrl-C
# stops them in order (front door first, so in-flight events still get their
# results), like `just down`.
up:
    bash scripts/up.sh

# Stop what `just up` started (from another terminal).
down:
    #!/usr/bin/env bash
    set -euo pipefail
    pid_file="${ORDO_UP_PID_FILE:-target/ordo-up.pid}"
    if [[ ! -f "$pid_file" ]] || ! pid="$(cat "$pid_file")" || ! kill -0 "$pid" 2>/dev/null; then
        echo "ordo is not running (no live pid in $pid_file)"
        exit 0
    fi
    kill -TERM "$pid"
    for _ in $(seq 600); do
        kill -0 "$pid" 2>/dev/null || { echo "stopped"; exit 0; }
        sleep 0.1
    done
    echo "up.sh (pid $pid) is still stopping its services" >&2
    exit 1

# The paper's experiment (figures 6-7): release build, then 389 runs per cell
# (`just experiment --runs 20` for a quick look). Writes results/experiment/.
experiment *ARGS: deps
    cargo build --release --workspace --bins
    ORDO_BIN_DIR=target/release target/release/ordo-experiment {{ARGS}}

# Ordered streams against baselines, workloads (a)–(e): release build,
# then the benchmark (`just bench --full-sequential` runs the sequential
# consumer over all 10,000 events). Writes results/bench/.
# Many streams only: `just bench --workloads d --streams-list 64,4096,32768,131072 --many-streams-events 262144`.
bench *ARGS: deps
    cargo build --release --workspace --bins
    ORDO_BIN_DIR=target/release target/release/ordo-bench {{ARGS}}

# Ordered throughput through a real JetStream broker (a private nats-server):
# 10,000 messages of uniform 0-5 ms work over 1 and then 10 keys, Ordo via
# ordo-source next to a plain consumer processing each key in order one at a
# time, and the same consumer unordered (`just bench-source --keys 1,10,100
# --events 20000`, `--no-ordo`). Release build (into $CARGO_TARGET_DIR when
# set), then the benchmark. Writes results/bench-source/.
bench-source *ARGS: deps
    cargo build --release --workspace --bins
    ORDO_BIN_DIR="${CARGO_TARGET_DIR:-target}/release" "${CARGO_TARGET_DIR:-target}/release/ordo-bench-source" {{ARGS}}

# Ordo's fault suite (docs/reliability.md): release build, then 6 runs of each
# of the 20 fault kinds (`just chaos --quick`: each kind once; `--faults
# sigkill,redis`, `--skip rabbitmq`, `--runs N`). Writes results/chaos/;
# exits 1 if anything was lost, duplicated, reordered or hung.
chaos *ARGS: deps
    cargo build --release --workspace --bins
    ORDO_BIN_DIR=target/release target/release/ordo-chaos {{ARGS}}

# Soak (docs/reliability.md): release build, then 10 minutes at half the
# saturation rate (`just soak --minutes 2 --rate 10000`), sampling RSS and
# open descriptors of every process. Writes results/soak/.
soak *ARGS: deps
    cargo build --release --workspace --bins
    ORDO_BIN_DIR=target/release target/release/ordo-soak {{ARGS}}
