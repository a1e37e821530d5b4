#!/usr/bin/env bash
# Cost per request, for a machine shared with other work (where throughput is noise):
# instructions per request under callgrind for the baseline's /healthz and keyrack's /healthz,
# reveal, listing of 10 keys and dual-write POST, each counted over N requests on one
# keep-alive connection after a warm-up, from `callgrind_control --zero` to `--dump`, with the
# flusher's next pass (usage counters, events of reveals) included. Not a test; CI does not run it.
#
#   bash benches/cost.sh [N]        (default 2000; needs valgrind, curl, python3)
#
# Profiles are left in target/cost/ (callgrind_annotate --inclusive=yes FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-2000}
cargo build --profile profiling --bin keyrack --example baseline >&2
BIN=$PWD/target/profiling/keyrack
EX=$PWD/target/profiling/examples
OUT=$PWD/target/cost
rm -rf "$OUT"; mkdir -p "$OUT"
PIDS=()
trap 'for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done' EXIT

drive() { # url count method path [token] [body]
  python3 - "$@" <<'PY'
import http.client, sys, urllib.parse
url, n, method, path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
token = sys.argv[5] if len(sys.argv) > 5 and sys.argv[5] else None
body = sys.argv[6] if len(sys.argv) > 6 else None
u = urllib.parse.urlparse(url)
c = http.client.HTTPConnection(u.hostname, u.port)
h = {"Authorization": "Bearer " + token} if token else {}
if body: h["Content-Type"] = "application/json"
for _ in range(n):
    c.request(method, path, body=body, headers=h)
    r = c.getresponse(); r.read()
    if r.status >= 300: sys.exit(f"{method} {path}: {r.status}")
PY
}
start() { # name, command...: sets URL and VPID (valgrind's pid)
  local name=$1; shift
  valgrind --tool=callgrind --callgrind-out-file="$OUT/$name.%p" "$@" > "$OUT/$name.ready" 2> "$OUT/$name.log" &
  VPID=$!; PIDS+=("$VPID")
  for _ in $(seq 1 3000); do grep -q "listening on" "$OUT/$name.ready" 2>/dev/null && break; sleep 0.01; done
  URL=$(sed -n 's/.*listening on \(http[^ ]*\).*/\1/p' "$OUT/$name.ready")
  [ -n "$URL" ] || { echo "$name did not start" >&2; cat "$OUT/$name.log" >&2; exit 1; }
}
measure() { # label, drive arguments after the url...
  local label=$1; shift
  drive "$URL" 200 "$@"; sleep 2.5
  callgrind_control -z "$VPID" >/dev/null
  drive "$URL" "$N" "$@"
  sleep 2.5
  callgrind_control -d "$label" "$VPID" >/dev/null
  local f; f=$(grep -l "^desc: Trigger: dump $label\$" "$OUT"/*.* | head -1)
  awk -v n="$N" -v l="$label" '/^totals:/ {printf "%-18s %6.1f k instructions/request\n", l, $2/n/1000}' "$f"
}

start baseline "$EX/baseline" 127.0.0.1:0 4
measure baseline_healthz GET /healthz
kill "$VPID"

export KEYRACK_ENCRYPTION_KEY
KEYRACK_ENCRYPTION_KEY=$("$BIN" gen-key)
start keyrack "$BIN" --db "$OUT/serve.db" serve --listen 127.0.0.1:0 --workers 4
. benches/seed.sh
seed_bench_users
measure healthz GET /healthz
measure reveal GET "/user/api-key?reveal=true" "$T_REVEAL"
measure list10 GET /user/api-keys "$T_LIST"
measure post_dual POST /user/api-key "$T_REVEAL" '{"api_key":"sk-bench-0123456789abcdef"}'
