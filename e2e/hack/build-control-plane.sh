#!/usr/bin/env bash
# Builds kube-apiserver and etcd from their Go modules and caches them by
# version outside the repository. Idempotent: a warm cache returns at once.
#
#   e2e/hack/build-control-plane.sh            # prints the bin directory
#   K8S_VERSION=v1.36.3 e2e/hack/build-control-plane.sh
#
# Why a wrapper module: k8s.io/kubernetes replaces every staging module with
# ./staging/... and requires them at v0.0.0, so `go install` cannot build it.
# The wrapper requires k8s.io/kubernetes and replaces each staging module named
# in that version's go.mod with its published v0.<minor>.<patch> tag.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.36.3}"
CACHE_ROOT="${FERRIMESH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ferrimesh}"
OUT="$CACHE_ROOT/k8s/$K8S_VERSION"

log() { printf '[control-plane] %s\n' "$*" >&2; }

mkdir -p "$OUT"
# Tests running in parallel may all ask at once: one builds, the others wait.
exec 9>"$OUT/.lock"
flock 9

if [[ -x "$OUT/kube-apiserver" && -x "$OUT/etcd" ]]; then
  log "cached: $OUT"
  echo "$OUT"
  exit 0
fi

command -v go >/dev/null || { log "go is required (Go 1.26 or newer)"; exit 1; }
export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

log "resolving k8s.io/kubernetes@$K8S_VERSION"
gomod="$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
[[ -f "$gomod" ]] || { log "could not download the go.mod of k8s.io/kubernetes@$K8S_VERSION"; exit 1; }

ver="${K8S_VERSION#v}"
major="${ver%%.*}"
rest="${ver#*.}"
minor="${rest%%.*}"
patch="${rest#*.}"
staging_tag="v0.$minor.$patch"
go_line="$(grep -m1 -E '^go [0-9]' "$gomod")"
godebug_line="$(grep -m1 -E '^godebug ' "$gomod" || true)"
etcd_version="$(grep -m1 -E 'go.etcd.io/etcd/server/v3 v' "$gomod" | awk '{print $2}')"

# --- kube-apiserver --------------------------------------------------------
log "building kube-apiserver $K8S_VERSION (staging modules at $staging_tag)"
mkdir -p "$work/apiserver"
{
  echo "module ferrimesh.local/apiserver-build"
  echo
  echo "$go_line"
  [[ -n "$godebug_line" ]] && echo "$godebug_line"
  echo
  echo "require k8s.io/kubernetes $K8S_VERSION"
  echo
  grep -E '^\s*k8s\.io/[a-z0-9-]+ => \./staging/' "$gomod" \
    | awk -v tag="$staging_tag" '{print "replace " $1 " => " $1 " " tag}'
} >"$work/apiserver/go.mod"
cat >"$work/apiserver/tools.go" <<'GO'
//go:build tools

package tools

import _ "k8s.io/kubernetes/cmd/kube-apiserver"
GO
(
  cd "$work/apiserver"
  log "downloading modules (first run: a few minutes)"
  go mod tidy >/dev/null
  pkg=k8s.io/component-base/version
  commit="$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"Hash": "\(.*\)".*/\1/p' | head -1)"
  ldflags="-s -w -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  ldflags="$ldflags -X $pkg/verflag.programName=kube-apiserver"
  [[ -n "$commit" ]] && ldflags="$ldflags -X $pkg.gitCommit=$commit"
  log "compiling kube-apiserver (cold: 10-20 minutes on 2 cores)"
  go build -trimpath -ldflags "$ldflags" -o "$OUT/kube-apiserver.tmp" k8s.io/kubernetes/cmd/kube-apiserver
)
mv "$OUT/kube-apiserver.tmp" "$OUT/kube-apiserver"

# --- etcd --------------------------------------------------------------------
log "building etcd $etcd_version"
mkdir -p "$work/etcd"
cat >"$work/etcd/go.mod" <<GOMOD
module ferrimesh.local/etcd-build

$go_line

require go.etcd.io/etcd/server/v3 $etcd_version
GOMOD
cat >"$work/etcd/tools.go" <<'GO'
//go:build tools

package tools

import _ "go.etcd.io/etcd/server/v3"
GO
(
  cd "$work/etcd"
  go mod tidy >/dev/null
  go build -trimpath -ldflags "-s -w" -o "$OUT/etcd.tmp" go.etcd.io/etcd/server/v3
)
mv "$OUT/etcd.tmp" "$OUT/etcd"

"$OUT/kube-apiserver" --version >&2
"$OUT/etcd" --version >&2 | head -1
log "built into $OUT"
echo "$OUT"
