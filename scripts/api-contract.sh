#!/usr/bin/env bash
# The API document against the running server: starts a development
# `handset serve` (SQLite in a temporary directory, sandbox providers), checks
# that /openapi.json validates (openapi-spec-validator) and matches the
# committed docs/openapi.json, then runs schemathesis with every check and
# the stateful phase (schemathesis.toml). Needs: the binary (target/debug or
# $1) and the two Python tools (.ci/run installs them).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="$(cd "${1:-$root/target/debug}" && pwd)/handset"
port="${HANDSET_CONTRACT_PORT:-18080}"
work=$(mktemp -d)
server=""
cleanup() {
  [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

(cd "$work" && HANDSET__SERVER__BIND="127.0.0.1:$port" exec "$bin" serve >"$work/server.log" 2>&1) &
server=$!
for _ in $(seq 1 100); do
  curl -fs "http://127.0.0.1:$port/ready" >/dev/null 2>&1 && break
  kill -0 "$server" 2>/dev/null || { cat "$work/server.log"; exit 1; }
  sleep 0.1
done

curl -fs "http://127.0.0.1:$port/openapi.json" -o "$work/openapi.json"
openapi-spec-validator "$work/openapi.json"
python3 -c 'import json, sys; a, b = (json.load(open(p)) for p in sys.argv[1:]); sys.exit(a != b and "the served document differs from docs/openapi.json: run `handset openapi > docs/openapi.json`")' \
  "$work/openapi.json" "$root/docs/openapi.json"

cd "$work"
schemathesis --config-file "$root/schemathesis.toml" run "http://127.0.0.1:$port/openapi.json" \
  --checks all --phases examples,coverage,fuzzing,stateful --seed 1 \
  --max-examples "${HANDSET_CONTRACT_EXAMPLES:-50}"
