#!/usr/bin/env bash
# A local Kubernetes control plane without containers, for the e2e tests:
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok, all on 127.0.0.1,
# plus N fake GPU nodes that kwok keeps Ready (pods bound to them become Running).
#
#   cluster.sh up               start the cluster (no-op when it already runs)
#   cluster.sh down [--keep]    stop it and remove the state dir (--keep: keep logs and data)
#   cluster.sh status           show the components and the nodes
#   cluster.sh logs [-f] NAME   print (or follow) a component's log
#
# Environment: TF_E2E_STATE (state dir), TF_E2E_NODES (fake nodes, default 3),
# TF_E2E_PORT_OFFSET (added to every default port) or one TF_E2E_*_PORT per port.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

STATE=$(realpath -m "${TF_E2E_STATE:-$E2E_DIR/.cluster}")
NODES=${TF_E2E_NODES:-3}
PORT_OFFSET=${TF_E2E_PORT_OFFSET:-0}
ETCD_PORT=${TF_E2E_ETCD_PORT:-$((23790 + PORT_OFFSET))}
ETCD_PEER_PORT=${TF_E2E_ETCD_PEER_PORT:-$((23800 + PORT_OFFSET))}
APISERVER_PORT=${TF_E2E_APISERVER_PORT:-$((16443 + PORT_OFFSET))}
CONTROLLER_MANAGER_PORT=${TF_E2E_CONTROLLER_MANAGER_PORT:-$((16257 + PORT_OFFSET))}
SCHEDULER_PORT=${TF_E2E_SCHEDULER_PORT:-$((16259 + PORT_OFFSET))}

SERVICE_CIDR=10.96.0.0/16
CLUSTER_CIDR=10.244.0.0/16
MANIFESTS=$E2E_DIR/manifests
# Marks a directory as ours, so `down` never deletes anything else.
MARKER=.tf-e2e-cluster
# In start order.
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)

PKI=$STATE/pki
KUBECONFIG_FILE=$STATE/kubeconfig

kc() { kubectl --kubeconfig "$KUBECONFIG_FILE" --cache-dir "$STATE/kubectl-cache" "$@"; }

pid_file() { echo "$STATE/run/$1.pid"; }
log_file() { echo "$STATE/logs/$1.log"; }

# True when the process's command line points into this state dir, so a pid that was
# reused by an unrelated process is never mistaken for ours.
started_here() {
  local cmdline
  cmdline=$(tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline") || return 1
  [[ "$cmdline" == *"$STATE/"* ]]
}

# Prints the pid of a component if it runs.
component_pid() {
  local file pid
  file=$(pid_file "$1")
  [ -f "$file" ] || return 1
  pid=$(<"$file")
  started_here "$pid" || return 1
  echo "$pid"
}

# Every process started from this state dir, including any whose pid file was lost.
state_pids() {
  local proc exe
  for proc in /proc/[0-9]*; do
    exe=$(readlink "$proc/exe" 2>/dev/null) || continue
    case "$exe" in "$K8S_BIN"/* | "$ETCD_BIN"/* | "$KWOK_BIN"/*) ;; *) continue ;; esac
    started_here "${proc#/proc/}" && echo "${proc#/proc/}"
  done
  return 0
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# ---------------------------------------------------------------- certificates and config

generate_pki() {
  log "generating certificates, service-account key and admin token in $PKI"
  mkdir -p "$PKI"
  (
    cd "$PKI"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=tf-e2e-ca" \
      -keyout ca.key -out ca.crt \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
    openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
      -keyout apiserver.key -out apiserver.csr
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 \
      -out apiserver.crt -extfile <(printf '%s\n' \
        "subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc" \
        "keyUsage=critical,digitalSignature,keyEncipherment" \
        "extendedKeyUsage=serverAuth")
    openssl genrsa -out sa.key 2048
    openssl rsa -in sa.key -pubout -out sa.pub
    printf '%s,admin,admin,"system:masters"\n' "$(openssl rand -hex 24)" >tokens.csv
  ) 2>"$STATE/logs/openssl.log" || die "openssl failed, see $STATE/logs/openssl.log"
}

write_kubeconfig() {
  local token
  token=$(cut -d, -f1 "$PKI/tokens.csv")
  cat >"$KUBECONFIG_FILE" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: tf-e2e
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority-data: $(base64 -w0 "$PKI/ca.crt")
users:
- name: admin
  user:
    token: $token
contexts:
- name: tf-e2e
  context:
    cluster: tf-e2e
    user: admin
current-context: tf-e2e
EOF
  chmod 600 "$KUBECONFIG_FILE"
}

# ---------------------------------------------------------------- processes

# start NAME BINARY ARGS...: runs a component detached in its own session, logging to a file.
start() {
  local name=$1; shift
  log "starting $name"
  setsid "$@" </dev/null >"$(log_file "$name")" 2>&1 &
  local pid=$! tries
  echo "$pid" >"$(pid_file "$name")"
  # Until it execs, the child's command line is this script's, and `component_pid` would
  # take it for a process that died (on a loaded machine the exec can lag the fork).
  for ((tries = 0; tries < 200; tries++)); do
    started_here "$pid" && return 0
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.05
  done
}

# wait_until NAME SECONDS DESCRIPTION COMMAND...: polls COMMAND; fails early if NAME died.
wait_until() {
  local name=$1 timeout=$2 what=$3; shift 3
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if ! component_pid "$name" >/dev/null; then
      tail -n 20 "$(log_file "$name")" >&2 || true
      die "$name exited while waiting for $what; log: $(log_file "$name")"
    fi
    [ "$SECONDS" -lt "$deadline" ] || die "timed out after ${timeout}s waiting for $what"
    sleep 0.5
  done
}

url_ok() { curl -fsS --max-time 2 "$@"; }

start_etcd() {
  start etcd "$ETCD_BIN/etcd" \
    --name=tf-e2e \
    --data-dir="$STATE/etcd" \
    --listen-client-urls="http://127.0.0.1:$ETCD_PORT" \
    --advertise-client-urls="http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster="tf-e2e=http://127.0.0.1:$ETCD_PEER_PORT" \
    --unsafe-no-fsync
  wait_until etcd 60 "etcd to be healthy" url_ok "http://127.0.0.1:$ETCD_PORT/health"
}

# --requestheader-*: kube-controller-manager and kube-scheduler read these (for delegated
# authentication) and log errors without them. --endpoint-reconciler-type=none: the `kubernetes`
# Service's endpoints may not be a loopback address, and nothing here needs them.
start_apiserver() {
  start kube-apiserver "$K8S_BIN/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --bind-address=127.0.0.1 \
    --advertise-address=127.0.0.1 \
    --secure-port="$APISERVER_PORT" \
    --cert-dir="$PKI" \
    --tls-cert-file="$PKI/apiserver.crt" \
    --tls-private-key-file="$PKI/apiserver.key" \
    --client-ca-file="$PKI/ca.crt" \
    --requestheader-client-ca-file="$PKI/ca.crt" \
    --requestheader-allowed-names=front-proxy-client \
    --requestheader-username-headers=X-Remote-User \
    --requestheader-group-headers=X-Remote-Group \
    --requestheader-extra-headers-prefix=X-Remote-Extra- \
    --token-auth-file="$PKI/tokens.csv" \
    --authorization-mode=Node,RBAC \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$PKI/sa.pub" \
    --service-account-signing-key-file="$PKI/sa.key" \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --endpoint-reconciler-type=none \
    --allow-privileged=true
  wait_until kube-apiserver 120 "kube-apiserver to be ready" \
    url_ok --cacert "$PKI/ca.crt" "https://127.0.0.1:$APISERVER_PORT/readyz"
}

start_controllers() {
  local common=(
    --kubeconfig="$KUBECONFIG_FILE"
    --authentication-kubeconfig="$KUBECONFIG_FILE"
    --authorization-kubeconfig="$KUBECONFIG_FILE"
    --bind-address=127.0.0.1
    --leader-elect=false
  )
  start kube-controller-manager "$K8S_BIN/kube-controller-manager" "${common[@]}" \
    --secure-port="$CONTROLLER_MANAGER_PORT" \
    --service-account-private-key-file="$PKI/sa.key" \
    --root-ca-file="$PKI/ca.crt" \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --cluster-cidr="$CLUSTER_CIDR" \
    --allocate-node-cidrs=false \
    --flex-volume-plugin-dir="$STATE/flexvolume"
  start kube-scheduler "$K8S_BIN/kube-scheduler" "${common[@]}" \
    --secure-port="$SCHEDULER_PORT"
  start kwok "$KWOK_BIN/kwok" \
    --kubeconfig="$KUBECONFIG_FILE" \
    --config="$MANIFESTS/kwok.yaml"
  wait_until kube-controller-manager 60 "kube-controller-manager to be healthy" \
    url_ok -k "https://127.0.0.1:$CONTROLLER_MANAGER_PORT/healthz"
  wait_until kube-scheduler 60 "kube-scheduler to be healthy" \
    url_ok -k "https://127.0.0.1:$SCHEDULER_PORT/healthz"
}

# Sends TERM to the given pids, then KILL to any still alive after a grace period.
# (An exited process counts as stopped even before it is reaped: a zombie has no command line.)
terminate() {
  [ $# -gt 0 ] || return 0
  kill -TERM "$@" 2>/dev/null || true
  local pid deadline=$((SECONDS + 10))
  for pid in "$@"; do
    while started_here "$pid" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
  done
  for pid in "$@"; do
    if started_here "$pid"; then
      log "pid $pid did not stop after TERM; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
}

stop_all() {
  local name pid pids=()
  # The API clients and the apiserver first, then etcd, so none of them logs a lost backend.
  for name in kwok kube-scheduler kube-controller-manager kube-apiserver; do
    pid=$(component_pid "$name") && pids+=("$pid")
  done
  terminate "${pids[@]}"
  pid=$(component_pid etcd) && terminate "$pid"
  # Anything left that was started from this state dir (e.g. its pid file was lost).
  mapfile -t pids < <(state_pids)
  terminate "${pids[@]}"
  rm -f "$STATE"/run/*.pid
}

remove_state() {
  [ -d "$STATE" ] || return 0
  if [ -f "$STATE/$MARKER" ] || [ -z "$(ls -A "$STATE")" ]; then
    rm -rf "$STATE"
  else
    die "$STATE is not a cluster state dir (no $MARKER); not removing it"
  fi
}

# ---------------------------------------------------------------- nodes

create_nodes() {
  log "creating $NODES fake GPU nodes"
  local i
  for ((i = 1; i <= NODES; i++)); do
    # shellcheck disable=SC2016 # envsubst takes the variable names literally
    NODE_NAME=gpu-node-$i NODE_IP=10.0.0.$i envsubst '${NODE_NAME} ${NODE_IP}' \
      <"$MANIFESTS/gpu-node.yaml"
    echo ---
  done | kc create -f - >/dev/null
}

# True when all NODES nodes are Ready and carry no taints (the not-ready taint is gone).
nodes_ready() {
  local ready
  ready=$(kc get nodes -l type=kwok -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}/{.spec.taints}{"\n"}{end}' |
    grep -c '^True/$' || true)
  [ "$ready" -eq "$NODES" ]
}

# ---------------------------------------------------------------- subcommands

cluster_healthy() {
  local name
  [ -f "$KUBECONFIG_FILE" ] || return 1
  for name in "${COMPONENTS[@]}"; do component_pid "$name" >/dev/null || return 1; done
  url_ok --cacert "$PKI/ca.crt" "https://127.0.0.1:$(apiserver_port)/readyz" >/dev/null 2>&1
}

# The port of the running cluster, from its kubeconfig (the environment may differ now).
apiserver_port() { sed -n 's|.*server: https://127.0.0.1:\([0-9]*\)$|\1|p' "$KUBECONFIG_FILE"; }

# Best effort: also runs when up is interrupted or its output pipe was closed.
on_up_failure() {
  set +e
  trap '' PIPE
  log "up failed; stopping what was started (logs kept in $STATE/logs)"
  stop_all
}

cmd_up() {
  if [ -f "$STATE/$MARKER" ] && cluster_healthy; then
    log "cluster in $STATE is already running"
    echo "export KUBECONFIG=$KUBECONFIG_FILE"
    return 0
  fi
  if ! [[ "$NODES" =~ ^[0-9]+$ ]] || [ "$NODES" -lt 1 ] || [ "$NODES" -gt 250 ]; then
    die "TF_E2E_NODES must be between 1 and 250, got '$NODES'"
  fi
  "$E2E_DIR/scripts/build-binaries.sh"

  if [ -d "$STATE" ]; then
    log "cleaning up the stale cluster state in $STATE"
    stop_all
    remove_state
  fi
  local port
  for port in "$ETCD_PORT" "$ETCD_PEER_PORT" "$APISERVER_PORT" "$CONTROLLER_MANAGER_PORT" "$SCHEDULER_PORT"; do
    port_in_use "$port" && die "port 127.0.0.1:$port is in use; set TF_E2E_PORT_OFFSET or TF_E2E_*_PORT"
  done

  local started=$SECONDS
  mkdir -p "$STATE/run" "$STATE/logs"
  touch "$STATE/$MARKER"
  trap on_up_failure EXIT
  trap 'exit 130' INT TERM HUP PIPE

  generate_pki
  write_kubeconfig
  start_etcd
  start_apiserver
  start_controllers
  create_nodes
  log "waiting for the nodes to be Ready and untainted"
  wait_until kwok 120 "$NODES nodes to be Ready" nodes_ready
  log "waiting for the default service account"
  wait_until kube-controller-manager 60 "the default service account" kc get serviceaccount default -n default

  trap - EXIT INT TERM HUP PIPE
  log "cluster is up in $((SECONDS - started))s: https://127.0.0.1:$APISERVER_PORT, state in $STATE"
  kc get nodes >&2
  echo "export KUBECONFIG=$KUBECONFIG_FILE"
}

cmd_down() {
  local keep=false
  case "${1:-}" in
    --keep) keep=true ;;
    "") ;;
    *) die "usage: cluster.sh down [--keep]" ;;
  esac
  if [ ! -d "$STATE" ]; then
    log "no cluster state in $STATE; nothing to stop"
    return 0
  fi
  log "stopping the cluster in $STATE"
  stop_all
  if $keep; then
    log "kept $STATE"
  else
    remove_state
    log "removed $STATE"
  fi
}

cmd_status() {
  local name pid
  if [ ! -d "$STATE" ]; then
    echo "no cluster in $STATE"
    return 0
  fi
  echo "state: $STATE"
  for name in "${COMPONENTS[@]}"; do
    if pid=$(component_pid "$name"); then
      printf '  %-24s running (pid %s)\n' "$name" "$pid"
    else
      printf '  %-24s not running\n' "$name"
    fi
  done
  if cluster_healthy; then
    echo "export KUBECONFIG=$KUBECONFIG_FILE"
    kc get nodes -o wide
  fi
}

cmd_logs() {
  local follow=()
  if [ "${1:-}" = -f ]; then follow=(-F); shift; fi
  local name=${1:-}
  [[ " ${COMPONENTS[*]} " == *" $name "* ]] ||
    die "usage: cluster.sh logs [-f] COMPONENT (one of: ${COMPONENTS[*]})"
  local file
  file=$(log_file "$name")
  [ -f "$file" ] || die "no log for $name in $STATE/logs"
  tail -n 100 "${follow[@]}" "$file"
}

case "${1:-}" in
  up) shift; cmd_up "$@" ;;
  down) shift; cmd_down "$@" ;;
  status) shift; cmd_status "$@" ;;
  logs) shift; cmd_logs "$@" ;;
  *)
    sed -n '2,12s/^# \{0,1\}//p' "$0" >&2
    exit 2
    ;;
esac
