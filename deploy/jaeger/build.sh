#!/usr/bin/env bash
# Build Jaeger v2 (its all-in-one `jaeger` binary, an OpenTelemetry Collector distribution with
# Jaeger's storage and query extensions) into .tools/jaeger from the Go module pinned in
# deploy/jaeger/go.mod (a tool dependency: `go get -tool github.com/jaegertracing/jaeger/cmd/jaeger@VERSION`).
#
# Jaeger's own go.mod has replace directives, so `go install pkg@version` refuses it; building it
# as a tool of this small module works. Does nothing when .tools/jaeger was built from go.mod as
# it is now. Needs `go` and the Go module proxy; concurrent runs wait for each other.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

MODULE=deploy/jaeger
TOOLS=.tools
BINARY="$TOOLS/jaeger"
HASH_FILE="$TOOLS/jaeger.gomod.sha256"

mkdir -p "$TOOLS"
exec 9>"$TOOLS/jaeger.lock"
flock 9

want_hash="$(cat "$MODULE/go.mod" "$MODULE/go.sum" | sha256sum | cut -d' ' -f1)"
if [[ -x "$BINARY" && -f "$HASH_FILE" && "$(cat "$HASH_FILE")" == "$want_hash" ]]; then
    echo "$BINARY is up to date with $MODULE/go.mod"
    exit 0
fi

if ! command -v go >/dev/null 2>&1; then
    echo "build.sh: $BINARY must be (re)built but 'go' is not on PATH; Jaeger is built from Go modules" >&2
    exit 1
fi

start_ns=$(date +%s%N)
echo "building github.com/jaegertracing/jaeger/cmd/jaeger ($(grep -o 'jaegertracing/jaeger v[^ ]*' "$MODULE/go.mod")) into $BINARY"
(cd "$MODULE" && go build -o "$ROOT/$BINARY.partial" github.com/jaegertracing/jaeger/cmd/jaeger)
mv "$BINARY.partial" "$BINARY"
echo "$want_hash" > "$HASH_FILE"
echo "built $BINARY in $(( ($(date +%s%N) - start_ns) / 1000000000 ))s"
