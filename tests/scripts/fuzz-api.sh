#!/usr/bin/env bash
# `make fuzz-api`: schemathesis (from PyPI, into .venv-fuzz) generates requests from openapi.yaml
# against a throwaway keyrack, authenticated routes included, and checks every answer against the
# document. Passes with zero 5xx (counted from the server's own request log) and zero answers
# that break the document. Prints the number of requests the server answered.
set -euo pipefail
cd "$(dirname "$0")/../.."

MAX_EXAMPLES=${FUZZ_MAX_EXAMPLES:-300}
VENV=.venv-fuzz
if [ ! -x "$VENV/bin/schemathesis" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check 'schemathesis==4.32.5'
fi
cargo build --release --bin keyrack >&2

WORK=$(mktemp -d)
PID=
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
export KEYRACK_ENCRYPTION_KEY
KEYRACK_ENCRYPTION_KEY=$(target/release/keyrack gen-key)
export KEYRACK_ADMIN_TOKEN=fuzz-admin-token
target/release/keyrack --db "$WORK/fuzz.db" serve --listen 127.0.0.1:0 \
  --fixtures fixtures/demo.json > "$WORK/ready" 2> "$WORK/server.log" &
PID=$!
for _ in $(seq 1 500); do grep -q listening "$WORK/ready" 2>/dev/null && break; sleep 0.01; done
URL=$(sed -n 's/.*listening on \(http[^ ]*\).*/\1/p' "$WORK/ready")
TOKEN=$(curl -sf -X POST "$URL/auth/login" -H 'Content-Type: application/json' \
  -d '{"email":"ada@example.com","password":"correct horse battery"}' |
  python3 -c 'import json,sys;print(json.load(sys.stdin)["token"])')

run() { # extra schemathesis arguments...
  "$VENV/bin/schemathesis" run "$URL/openapi.yaml" --url "$URL" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance \
    --max-examples "$MAX_EXAMPLES" --seed 1 --suppress-health-check all "$@"
}
status=0
# With Ada's session everywhere but logout (which would end it)...
run -H "Authorization: Bearer $TOKEN" --exclude-path /auth/logout --exclude-path /admin/status || status=$?
# ...the admin route with the admin token, and logout last.
run -H "Authorization: Bearer fuzz-admin-token" --include-path /admin/status || status=$?
run -H "Authorization: Bearer $TOKEN" --include-path /auth/logout || status=$?

total=$(grep -cE '\] (GET|POST|DELETE|PUT|PATCH|HEAD|OPTIONS|TRACE) ' "$WORK/server.log" || true)
errors=$(grep -cE '\] [A-Z]+ [^ ]+ 5[0-9][0-9] ' "$WORK/server.log" || true)
echo "fuzz-api: the server answered $total requests, $errors of them 5xx; schemathesis exit $status"
[ "$errors" -eq 0 ] && [ "$status" -eq 0 ]
