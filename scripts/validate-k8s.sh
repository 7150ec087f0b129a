#!/usr/bin/env bash
# Renders every kustomize overlay of deploy/k8s (kubectl's built-in kustomize)
# and validates each rendered manifest against the Kubernetes OpenAPI schemas
# in strict mode (kubernetes-validate, which ships the schemas: no cluster and
# no network needed). Also checks that every pod's
# terminationGracePeriodSeconds covers ORDO_DRAIN_TIMEOUT plus a margin.
# Exits non-zero on the first problem. Tools: scripts/install-deps.sh.
#
# Usage: bash scripts/validate-k8s.sh   (KUBERNETES_VERSION=1.32.0 by default)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
version="${KUBERNETES_VERSION:-1.32.0}"
kubectl="${KUBECTL:-kubectl}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

for tool in "$kubectl" kubernetes-validate python3; do
  command -v "$tool" >/dev/null 2>&1 || { echo "validate-k8s: $tool not found (run scripts/install-deps.sh)" >&2; exit 2; }
done

overlays=("$root"/deploy/k8s/overlays/*/)
[[ ${#overlays[@]} -gt 0 ]] || { echo "validate-k8s: no overlays under deploy/k8s/overlays" >&2; exit 1; }
for overlay in "${overlays[@]}"; do
  name="$(basename "$overlay")"
  rendered="$out/$name.yaml"
  "$kubectl" kustomize "$overlay" >"$rendered"
  kubernetes-validate --strict --quiet --kubernetes-version "$version" "$rendered"
  # The grace period must outlast the drain (docs: deploy/k8s/README.md).
  python3 - "$rendered" "$name" <<'PY'
import re, sys, yaml
path, name = sys.argv[1], sys.argv[2]
docs = [d for d in yaml.safe_load_all(open(path)) if d]
drain = None
for d in docs:
    if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "ordo-config":
        m = re.fullmatch(r"(\d+)s", d["data"]["ORDO_DRAIN_TIMEOUT"])
        if not m:
            sys.exit(f"{name}: ORDO_DRAIN_TIMEOUT must be whole seconds here, got {d['data']['ORDO_DRAIN_TIMEOUT']!r}")
        drain = int(m.group(1))
if drain is None:
    sys.exit(f"{name}: no ordo-config ConfigMap with ORDO_DRAIN_TIMEOUT")
problems = []
for d in docs:
    if d["kind"] != "Deployment":
        continue
    grace = d["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    if grace < drain + 5:
        problems.append(f"{d['metadata']['name']}: terminationGracePeriodSeconds {grace} < ORDO_DRAIN_TIMEOUT {drain}s + 5s margin")
if problems:
    sys.exit(f"{name}: " + "; ".join(problems))
PY
  echo "validate-k8s: $name: $(grep -c '^kind:' "$rendered") resources valid (Kubernetes $version, strict)"
done
