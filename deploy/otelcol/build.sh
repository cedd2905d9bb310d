#!/usr/bin/env bash
# Build the StreamBus OpenTelemetry Collector into .tools/otelcol (repository-relative) with the
# Collector's official builder and deploy/otelcol/builder-config.yaml.
#
# Does nothing when .tools/otelcol exists and was built from the manifest as it is now (its
# sha256 is kept in .tools/otelcol.manifest.sha256). Go's own caches (GOPATH, GOCACHE) are left
# at their defaults, so downloaded modules and compiled packages are reused by later builds on
# this machine. Needs `go` on PATH and the Go module proxy. Concurrent runs wait for each other.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

MANIFEST=deploy/otelcol/builder-config.yaml
TOOLS=.tools
BINARY="$TOOLS/otelcol"
HASH_FILE="$TOOLS/otelcol.manifest.sha256"

mkdir -p "$TOOLS"
# One build at a time (say `make otelcol` while the tests build it): the second waits, then
# finds the binary up to date.
exec 9>"$TOOLS/otelcol.lock"
flock 9

want_hash="$(sha256sum "$MANIFEST" | cut -d' ' -f1)"
if [[ -x "$BINARY" && -f "$HASH_FILE" && "$(cat "$HASH_FILE")" == "$want_hash" ]]; then
    echo "$BINARY is up to date with $MANIFEST"
    exit 0
fi

if ! command -v go >/dev/null 2>&1; then
    echo "build.sh: $BINARY must be (re)built but 'go' is not on PATH; the collector is built from Go modules (Go >= 1.26)" >&2
    exit 1
fi

# The builder's version is pinned in the manifest (a `# builder_version: vX.Y.Z` line) so that
# it changes, and triggers a rebuild, together with the component versions.
builder_version="$(sed -n 's/^# builder_version: *\(v[0-9][0-9.]*\) *$/\1/p' "$MANIFEST")"
if [[ -z "$builder_version" ]]; then
    echo "build.sh: no '# builder_version: vX.Y.Z' line in $MANIFEST" >&2
    exit 1
fi

start_ns=$(date +%s%N)
builder_dir="$TOOLS/builder-$builder_version"
if [[ ! -x "$builder_dir/builder" ]]; then
    echo "installing go.opentelemetry.io/collector/cmd/builder@$builder_version into $builder_dir"
    GOBIN="$ROOT/$builder_dir" go install "go.opentelemetry.io/collector/cmd/builder@$builder_version"
fi

echo "building $BINARY from $MANIFEST (the first build on a machine downloads and compiles a few hundred Go modules: minutes; later ones reuse Go's caches: seconds)"
rm -f "$HASH_FILE"
# output_path in the manifest is .tools/otelcol-build, relative to the repository root.
"$builder_dir/builder" --config "$MANIFEST"
cp .tools/otelcol-build/otelcol "$BINARY.tmp"
mv -f "$BINARY.tmp" "$BINARY"
echo "$want_hash" >"$HASH_FILE"

elapsed_ms=$((($(date +%s%N) - start_ns) / 1000000))
printf 'built %s (%s) in %d.%01d s\n' "$BINARY" "$("$BINARY" --version)" \
    $((elapsed_ms / 1000)) $((elapsed_ms % 1000 / 100))
