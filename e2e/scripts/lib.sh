# Shared settings for the e2e scripts. Sourced, not run.
# Versions of the upstream binaries; each one keys its cache directory.
K8S_VERSION=v1.33.13
ETCD_VERSION=v3.5.36
KWOK_VERSION=v0.7.0
HELM_VERSION=v3.18.6

E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPO_DIR=$(cd "$E2E_DIR/.." && pwd)
TF_CACHE_DIR=${TF_CACHE_DIR:-$HOME/.cache/tensor-fusion}
BIN_CACHE=$TF_CACHE_DIR/bin
K8S_BIN=$BIN_CACHE/kubernetes-$K8S_VERSION
ETCD_BIN=$BIN_CACHE/etcd-$ETCD_VERSION
KWOK_BIN=$BIN_CACHE/kwok-$KWOK_VERSION
HELM_BIN=$BIN_CACHE/helm-$HELM_VERSION

log() { printf '\033[1m==>\033[0m %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Runs a long command, printing a heartbeat with elapsed time so a first build shows progress.
with_progress() {
  local what=$1; shift
  local start=$SECONDS
  "$@" &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 20
    kill -0 "$pid" 2>/dev/null && log "$what: still building ($((SECONDS - start))s elapsed)"
  done
  wait "$pid"
}

# An EXIT trap for scripts that start a throw-away cluster: stops it, keeping the control-plane
# logs when the script failed. Usage: trap 'stop_cluster_on_exit "e2e"' EXIT
stop_cluster_on_exit() {
  local status=$? what=$1
  if [ "$status" -ne 0 ]; then
    log "$what failed; control-plane logs kept in $TF_E2E_STATE/logs, component logs in ${TMPDIR:-/tmp}/tf-*.log"
    "$E2E_DIR/scripts/cluster.sh" down --keep >/dev/null 2>&1 || true
  else
    "$E2E_DIR/scripts/cluster.sh" down >/dev/null 2>&1 || true
  fi
  exit "$status"
}
