#!/usr/bin/env bash
# Builds istiod (`pilot-discovery`) from the istio.io/istio Go module and
# caches it by version outside the repository, next to kube-apiserver and
# etcd. Idempotent: a warm cache returns at once.
#
#   e2e/hack/build-istio.sh                    # prints the cache directory
#   ISTIO_VERSION=v0.0.0-... e2e/hack/build-istio.sh
#
# The directory it prints holds `pilot-discovery`, `version` (the module
# version it was built from) and `istio`, a link to that module's source in
# the Go module cache: the charts the e2e suite renders istiod's
# configuration from (manifests/charts) are read there, at test time only.
#
# istio.io/istio publishes no semver tags, and the Go module proxy serves only
# a few of its pseudo-versions: this is the one pin (release-1.31 branch).
set -euo pipefail

ISTIO_VERSION="${ISTIO_VERSION:-v0.0.0-20260827124520-eed52ebb66ad}"
CACHE_ROOT="${FERRIMESH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ferrimesh}"
OUT="$CACHE_ROOT/istio/$ISTIO_VERSION"

log() { printf '[istio] %s\n' "$*" >&2; }

mkdir -p "$OUT"
# Tests running in parallel may all ask at once: one builds, the others wait.
exec 9>"$OUT/.lock"
flock 9

command -v go >/dev/null || { log "go is required (Go 1.26 or newer)"; exit 1; }
export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0

# The module source (charts), also when the binary is cached but the Go
# module cache was cleaned since.
if [[ ! -d "$OUT/istio/manifests/charts" ]]; then
  log "downloading istio.io/istio@$ISTIO_VERSION"
  dir="$(cd "$(mktemp -d)" && go mod download -json "istio.io/istio@$ISTIO_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')"
  [[ -d "$dir/manifests/charts" ]] || { log "could not download istio.io/istio@$ISTIO_VERSION"; exit 1; }
  ln -sfn "$dir" "$OUT/istio"
fi

if [[ -x "$OUT/pilot-discovery" ]]; then
  log "cached: $OUT"
  echo "$OUT"
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
go_line="$(grep -m1 -E '^go [0-9]' "$OUT/istio/go.mod")"
{
  echo "module ferrimesh.local/istio-build"
  echo
  echo "$go_line"
  echo
  echo "require istio.io/istio $ISTIO_VERSION"
} >"$work/go.mod"
cat >"$work/tools.go" <<'GO'
//go:build tools

package tools

import _ "istio.io/istio/pilot/cmd/pilot-discovery"
GO
(
  cd "$work"
  log "downloading modules (first run: a few minutes)"
  go mod tidy >/dev/null
  pkg=istio.io/istio/pkg/version
  ldflags="-s -w -X $pkg.buildVersion=$(cat "$OUT/istio/VERSION")-ferrimesh-e2e -X $pkg.buildStatus=Clean"
  log "compiling pilot-discovery (cold: about 15 minutes on 2 cores)"
  start=$SECONDS
  go build -trimpath -ldflags "$ldflags" -o "$OUT/pilot-discovery.tmp" istio.io/istio/pilot/cmd/pilot-discovery
  log "compiled in $((SECONDS - start)) s"
)
mv "$OUT/pilot-discovery.tmp" "$OUT/pilot-discovery"
echo "$ISTIO_VERSION" >"$OUT/version"
"$OUT/pilot-discovery" version --short >&2 || true
log "built into $OUT"
echo "$OUT"
