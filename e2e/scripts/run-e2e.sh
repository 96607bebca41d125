#!/usr/bin/env bash
# Runs the end-to-end tests: starts a throw-away cluster of its own (separate state dir and
# ports, so a `make demo` cluster keeps running), runs `cargo test -p tensor-fusion-e2e` against
# it, and stops it again, also when the tests fail.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

export TF_E2E_STATE=${TF_E2E_TEST_STATE:-$E2E_DIR/.cluster-test}
export TF_E2E_PORT_OFFSET=${TF_E2E_TEST_PORT_OFFSET:-300}

trap 'stop_cluster_on_exit e2e' EXIT

(cd "$REPO_DIR" && cargo build --quiet -p tensor-fusion-webhook -p tensor-fusion-node-agent -p tensor-fusion-mock-nvml)
# The chart tests (tests/helm.rs) need helm: built once into the cache, then put on PATH.
"$E2E_DIR/scripts/build-binaries.sh" helm
export PATH=$HELM_BIN:$PATH
"$E2E_DIR/scripts/cluster.sh" down >/dev/null 2>&1 || true
"$E2E_DIR/scripts/cluster.sh" up >/dev/null
export TF_E2E_KUBECONFIG=$TF_E2E_STATE/kubeconfig
(cd "$REPO_DIR" && cargo test -p tensor-fusion-e2e -- --test-threads=1 "$@")
