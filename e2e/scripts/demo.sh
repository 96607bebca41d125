#!/usr/bin/env bash
# `make demo`: a local cluster, the webhook, and the guide's canary example played out.
#
#   demo.sh up     build, start the cluster and the webhook, run the canary and the rollback
#   demo.sh down   stop the webhook and the cluster
#
# The webhook runs as a local process on 127.0.0.1:${TF_DEMO_WEBHOOK_PORT:-19443} (ops endpoint
# on ${TF_DEMO_OPS_PORT:-19090}); its certificates and log live in the cluster's state dir.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

STATE=$(realpath -m "${TF_E2E_STATE:-$E2E_DIR/.cluster}")
WEBHOOK_PORT=${TF_DEMO_WEBHOOK_PORT:-19443}
OPS_PORT=${TF_DEMO_OPS_PORT:-19090}
WEBHOOK_DIR=$STATE/webhook
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO_DIR/target}
export KUBECONFIG=$STATE/kubeconfig

kc() { kubectl "$@"; }

build() {
  log "building tensor-fusion-webhook and tensor-fusion-certs"
  (cd "$REPO_DIR" && cargo build --quiet -p tensor-fusion-webhook -p tensor-fusion-certs)
}

stop_webhook() {
  local pid_file=$WEBHOOK_DIR/webhook.pid
  if [ -f "$pid_file" ] && kill -0 "$(<"$pid_file")" 2>/dev/null; then
    kill "$(<"$pid_file")" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$(<"$pid_file")" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$pid_file"
}

start_webhook() {
  stop_webhook
  mkdir -p "$WEBHOOK_DIR"
  if [ ! -f "$WEBHOOK_DIR/ca.crt" ]; then
    log "generating the webhook CA and serving certificate (IP SAN 127.0.0.1)"
    "$TARGET_DIR/debug/tensor-fusion-certs" generate --out-dir "$WEBHOOK_DIR" \
      --dns localhost --ip 127.0.0.1
  fi
  log "starting the webhook on https://127.0.0.1:$WEBHOOK_PORT (log: $WEBHOOK_DIR/webhook.log)"
  nohup "$TARGET_DIR/debug/tensor-fusion-webhook" \
    --listen "127.0.0.1:$WEBHOOK_PORT" --ops-listen "127.0.0.1:$OPS_PORT" \
    --tls-cert "$WEBHOOK_DIR/tls.crt" --tls-key "$WEBHOOK_DIR/tls.key" \
    >"$WEBHOOK_DIR/webhook.log" 2>&1 &
  echo $! >"$WEBHOOK_DIR/webhook.pid"
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$OPS_PORT/readyz" >/dev/null 2>&1 && return 0
    kill -0 "$(<"$WEBHOOK_DIR/webhook.pid")" 2>/dev/null || break
    sleep 0.2
  done
  tail -20 "$WEBHOOK_DIR/webhook.log" >&2
  die "the webhook did not become ready"
}

register_webhook() {
  log "registering the MutatingWebhookConfiguration (only pods labelled tensor-fusion.ai/enabled=true)"
  WEBHOOK_URL="https://127.0.0.1:$WEBHOOK_PORT/mutate-v1-pod" \
    CA_BUNDLE=$(base64 -w0 <"$WEBHOOK_DIR/ca.crt") \
    envsubst '${WEBHOOK_URL} ${CA_BUNDLE}' <"$E2E_DIR/manifests/webhook-configuration.yaml" |
    kc apply -f - >/dev/null
  # The API server picks a new configuration up after a short delay: probe with a dry run.
  local probe='{"apiVersion":"v1","kind":"Pod","metadata":{"generateName":"probe-","namespace":"default",
    "labels":{"tensor-fusion.ai/enabled":"true"},"annotations":{"tensor-fusion.ai/vram-limit":"1Gi"}},
    "spec":{"containers":[{"name":"probe","image":"probe"}]}}'
  for _ in $(seq 150); do
    if echo "$probe" | kc create --dry-run=server -o jsonpath='{.metadata.annotations}' -f - 2>/dev/null |
      grep -q 'tensor-fusion.ai/injected'; then
      return 0
    fi
    sleep 0.2
  done
  die "the API server does not call the webhook"
}

# One line per pod: name, mode, canary position or native reason, nvidia.com/gpu, vram resource.
show_pods() {
  local rows
  rows=$(kc get pods -n tf-demo -l app=inference --sort-by=.metadata.creationTimestamp -o jsonpath='{range .items[*]}{.metadata.name}{"|"}{.metadata.annotations.tensor-fusion\.ai/injected}{"|"}{.metadata.annotations.tensor-fusion\.ai/canary}{"|"}{.metadata.annotations.tensor-fusion\.ai/native}{"|"}{.spec.containers[0].resources.limits.nvidia\.com/gpu}{"|"}{.spec.containers[0].resources.limits.tensor-fusion\.ai/vram}{"|"}{.status.phase}{"\n"}{end}')
  printf '%-28s %-7s %-8s %-8s %-12s %-9s %s\n' POD MODE PHASE GPU VRAM CANARY "WHY NATIVE"
  while IFS='|' read -r name injected canary native gpu vram phase; do
    [ -n "$name" ] || continue
    local mode=native
    [ "$injected" = true ] && mode=shared
    printf '%-28s %-7s %-8s %-8s %-12s %-9s %s\n' "$name" "$mode" "$phase" "${gpu:--}" \
      "${vram:--}" "${canary:--}" "${native:--}"
  done <<<"$rows"
}

wait_rollout() {
  kc rollout status deployment/inference -n tf-demo --timeout=120s >/dev/null
  # Old pods leave right after the rollout completes.
  for _ in $(seq 100); do
    [ "$(kc get pods -n tf-demo -l app=inference --no-headers 2>/dev/null | wc -l)" = 10 ] && return 0
    sleep 0.2
  done
}

up() {
  build
  "$E2E_DIR/scripts/cluster.sh" up >/dev/null
  start_webhook
  register_webhook

  log "applying the guide's canary example: 10 replicas, tensor-fusion.ai/enabled-replicas: \"3\""
  kc delete namespace tf-demo --ignore-not-found --wait=true >/dev/null
  kc apply -f "$E2E_DIR/manifests/demo-canary.yaml" >/dev/null
  wait_rollout
  echo
  show_pods
  local shared
  shared=$(kc get pods -n tf-demo -l tensor-fusion.ai/canary-owner -o jsonpath='{.items[0].metadata.name}')
  echo
  log "kubectl describe pod -n tf-demo $shared"
  kc describe pod -n tf-demo "$shared" | sed -n '1,/^Conditions:/p' | sed '$d'

  echo
  log "rolling back: label tensor-fusion.ai/enabled: \"false\" (one edit; nvidia.com/gpu was never removed from the manifest)"
  kc patch deployment inference -n tf-demo --type merge \
    -p '{"spec":{"template":{"metadata":{"labels":{"tensor-fusion.ai/enabled":"false"}}}}}' >/dev/null
  wait_rollout
  echo
  show_pods
  cat <<EOT

The cluster and the webhook keep running.
  export KUBECONFIG=$KUBECONFIG
  kubectl get pods -n tf-demo
  # webhook metrics
  curl -s http://127.0.0.1:$OPS_PORT/metrics | grep tensor_fusion
  # webhook log
  tail -f $WEBHOOK_DIR/webhook.log
  # stop everything
  make demo-down
EOT
}

down() {
  stop_webhook
  "$E2E_DIR/scripts/cluster.sh" down
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) die "usage: demo.sh up|down" ;;
esac
