#!/usr/bin/env bash
# Builds the local control plane's binaries on first use and caches them outside the checkout,
# keyed by version: kube-apiserver, kube-controller-manager, kube-scheduler, etcd, kwok, and
# helm (only on request: `build-binaries.sh helm`; the control plane does not need it).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

export CGO_ENABLED=0 GOFLAGS=-buildvcs=false

build_kubernetes() {
  [ -x "$K8S_BIN/kube-scheduler" ] && return 0
  log "building Kubernetes $K8S_VERSION control plane (first time only; 10-25 min on 2 cores)"
  local minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  local pkg=k8s.io/component-base/version
  local ldflags="-s -w -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  local tmp="$K8S_BIN.tmp.$$"
  mkdir -p "$tmp"
  (cd "$E2E_DIR/k8s" && with_progress "kubernetes" go build -trimpath -ldflags "$ldflags" -o "$tmp/" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler)
  rm -rf "$K8S_BIN" && mv "$tmp" "$K8S_BIN"
}

build_etcd() {
  [ -x "$ETCD_BIN/etcd" ] && return 0
  log "building etcd $ETCD_VERSION (first time only)"
  local tmp="$ETCD_BIN.tmp.$$"
  mkdir -p "$tmp"
  (cd "$E2E_DIR/etcd" && with_progress "etcd" go build -trimpath -ldflags "-s -w" -o "$tmp/etcd" \
    go.etcd.io/etcd/server/v3)
  rm -rf "$ETCD_BIN" && mv "$tmp" "$ETCD_BIN"
}

build_kwok() {
  [ -x "$KWOK_BIN/kwok" ] && return 0
  log "building kwok $KWOK_VERSION (first time only)"
  local tmp="$KWOK_BIN.tmp.$$"
  mkdir -p "$tmp"
  GOBIN="$tmp" with_progress "kwok" go install -trimpath -ldflags "-s -w" \
    "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
  rm -rf "$KWOK_BIN" && mv "$tmp" "$KWOK_BIN"
}

build_helm() {
  [ -x "$HELM_BIN/helm" ] && return 0
  log "building helm $HELM_VERSION (first time only)"
  local tmp="$HELM_BIN.tmp.$$"
  mkdir -p "$tmp"
  GOBIN="$tmp" with_progress "helm" go install -trimpath -ldflags "-s -w" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  rm -rf "$HELM_BIN" && mv "$tmp" "$HELM_BIN"
}

mkdir -p "$BIN_CACHE"
case "${1:-all}" in
  kubernetes) build_kubernetes ;;
  etcd) build_etcd ;;
  kwok) build_kwok ;;
  helm) build_helm ;;
  all) build_etcd; build_kwok; build_kubernetes ;;
  *) die "unknown target ${1}: use kubernetes, etcd, kwok, helm or all" ;;
esac
