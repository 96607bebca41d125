#!/usr/bin/env bash
# The node agent's assignment latency (e2e/benches/assignment.rs): starts a throw-away cluster of
# its own (separate state dir and ports), builds the agent and the mock NVML in release, runs the
# benchmark against it, and stops the cluster again.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

export TF_E2E_STATE=${TF_E2E_BENCH_STATE:-$E2E_DIR/.cluster-bench}
export TF_E2E_PORT_OFFSET=${TF_E2E_BENCH_PORT_OFFSET:-400}
trap 'stop_cluster_on_exit benchmark' EXIT

(cd "$REPO_DIR" && cargo build --quiet --release -p tensor-fusion-node-agent -p tensor-fusion-mock-nvml)
"$E2E_DIR/scripts/cluster.sh" down >/dev/null 2>&1 || true
"$E2E_DIR/scripts/cluster.sh" up >/dev/null
export TF_E2E_KUBECONFIG=$TF_E2E_STATE/kubeconfig
(cd "$REPO_DIR" && cargo bench --quiet -p tensor-fusion-e2e --bench assignment)
