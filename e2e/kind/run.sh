#!/usr/bin/env bash
# The kind end-to-end suite in one command:
#   e2e/kind/run.sh [pytest args...]
# creates a kind cluster (1 control plane + 2 workers), builds the image (nsm:dev, and nsm-e2e:dev
# for the client pods: ping, ip, scapy), loads both into the nodes, makes the cluster's CA (`nsm
# ca-init`, with the host's python when it has the project's dependencies, else in the image) into
# the Secret nsm-system/nsm-ca, deploys the mesh (deploy/overlays/kind), runs
# e2e/kind/test_kind.py (each test's namespace gets a copy of the Secret), dumps the cluster's
# state into $NSM_KIND_ARTIFACTS on failure, and deletes the cluster.
# Settings: NSM_KIND_CLUSTER (name, default nsm-e2e), NSM_KIND_NODE_IMAGE (e.g.
# kindest/node:v1.32.2), NSM_KIND_ARTIFACTS (default e2e/kind/artifacts), NSM_KIND_KEEP=1 (keep the
# cluster afterwards), PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/../.."
CLUSTER="${NSM_KIND_CLUSTER:-nsm-e2e}"
ARTIFACTS="${NSM_KIND_ARTIFACTS:-e2e/kind/artifacts}"
PY="${PYTHON:-python3}"
export NSM_KIND_CONTEXT="kind-${CLUSTER}"
# = NSM_TRUST_DOMAIN of deploy/base (tests/deploy checks that they agree).
TRUST_DOMAIN="k8s.nsm"
CA_DIR=""

for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null || { echo "e2e/kind/run.sh: $tool is not on PATH" >&2; exit 2; }
done

dump() {
  echo "e2e/kind/run.sh: dumping the cluster's state into $ARTIFACTS" >&2
  mkdir -p "$ARTIFACTS"
  local k=(kubectl --context "$NSM_KIND_CONTEXT")
  "${k[@]}" get nodes,pods,ds,deploy,svc -A -o wide >"$ARTIFACTS/resources.txt" 2>&1 || true
  "${k[@]}" get events -A --sort-by=.lastTimestamp >"$ARTIFACTS/events.txt" 2>&1 || true
  "${k[@]}" get pods -A -o yaml >"$ARTIFACTS/pods.yaml" 2>&1 || true
  for pod in $("${k[@]}" -n nsm-system get pods -o name 2>/dev/null); do
    local name="${pod#pod/}"
    "${k[@]}" -n nsm-system logs "$pod" --all-containers --prefix >"$ARTIFACTS/$name.log" 2>&1 || true
    "${k[@]}" -n nsm-system logs "$pod" --all-containers --prefix --previous \
      >"$ARTIFACTS/$name.previous.log" 2>/dev/null || true
  done
  for node in $(kind get nodes --name "$CLUSTER" 2>/dev/null); do
    {
      echo "== /etc/cni/net.d"; docker exec "$node" sh -c 'for f in /etc/cni/net.d/*; do echo "-- $f"; cat "$f"; done'
      echo "== /opt/cni/bin"; docker exec "$node" ls -la /opt/cni/bin
      echo "== links"; docker exec "$node" ip -d link
      echo "== addresses"; docker exec "$node" ip addr
      echo "== netns"; docker exec "$node" ls -la /var/run/netns
    } >"$ARTIFACTS/node-$node.txt" 2>&1 || true
  done
  kind export logs "$ARTIFACTS/kind" --name "$CLUSTER" >/dev/null 2>&1 || true
}

finish() {
  local rc=$?
  if [ "$rc" != 0 ]; then dump; fi
  if [ -z "${NSM_KIND_KEEP:-}" ]; then kind delete cluster --name "$CLUSTER" || true; fi
  if [ -n "$CA_DIR" ]; then rm -rf "$CA_DIR"; fi
  exit "$rc"
}
trap finish EXIT

kind create cluster --name "$CLUSTER" --config e2e/kind/kind-config.yaml --wait 180s \
  ${NSM_KIND_NODE_IMAGE:+--image "$NSM_KIND_NODE_IMAGE"}
docker build -t nsm:dev .
docker build --target e2e -t nsm-e2e:dev .
kind load docker-image nsm:dev nsm-e2e:dev --name "$CLUSTER"

# The cluster's identities: one built-in CA, every NSM pod mounts it (a development default:
# whoever reads the Secret can mint any identity; production: deploy/overlays/spire).
CA_DIR="$(mktemp -d)"
if "$PY" -c "import nsm.security.cainit" 2>/dev/null; then
  "$PY" -m nsm.cli ca-init --dir "$CA_DIR/ca" --trust-domain "$TRUST_DOMAIN"
else
  docker run --rm --user "$(id -u):$(id -g)" -v "$CA_DIR:/out" nsm:dev \
    ca-init --dir /out/ca --trust-domain "$TRUST_DOMAIN"
fi
kubectl --context "$NSM_KIND_CONTEXT" apply -f deploy/base/namespace.yaml
kubectl --context "$NSM_KIND_CONTEXT" -n nsm-system create secret generic nsm-ca \
  --from-file="$CA_DIR/ca/ca.pem" --from-file="$CA_DIR/ca/ca.key"
rm -rf "$CA_DIR"; CA_DIR=""

kubectl --context "$NSM_KIND_CONTEXT" apply -k deploy/overlays/kind
kubectl --context "$NSM_KIND_CONTEXT" -n nsm-system rollout status deployment/registry --timeout=180s
kubectl --context "$NSM_KIND_CONTEXT" -n nsm-system rollout status daemonset/nsm-node --timeout=300s

"$PY" -m pytest -p no:cacheprovider -v -rs e2e/kind "$@"
