#!/usr/bin/env bash
# keyrack's benchmark (`make bench`). Builds the release binary and measures, in one run, over
# throwaway servers and databases:
#   - start to ready line, on a fresh database and on one holding 100,000 users with keys
#   - start to ready line against the bare tiny_http server, on :memory: and a fresh file, and
#     fifty servers started at once (benches/start.py; `make bench-start` runs only this part)
#   - requests/s and p50/p99 latency at 1, 16 and 64 keep-alive connections (wrk), for
#     /healthz, reveal, the dual-write POST, the 10-key listing, and logins; and two reveals over
#     BENCH_USERS users (default 1,000), a random user per request: one with each user's own
#     session (/user/api-key), one with a read service token (/service/users/ext:{i}/api-key)
#   - a baseline tiny_http server (benches/baseline.rs) answering /healthz, and the disk's sync
#     ceiling (benches/sync_ceiling.rs); throughputs are reported as ratios of these
#   - migrate over 1,000,000 legacy keys and remove-legacy-column over the result: seconds, peak RSS
#   - the server's peak RSS idle and after the 64-connection loads
# Prints a table and writes target/bench/results.json. Not a test; CI does not run it.
#
# Knobs: BENCH_SECONDS (per wrk run, default 3), BENCH_ROUNDS (default 3), BENCH_MIGRATE_KEYS
# (default 1000000), BENCH_USERS (default 1000), BENCH_CONNECTIONS (default "1 16 64"),
# BENCH_ONLY=many_users (only the baseline and the two many-user reveals: a quick check).
#
# The machine is noisy (on a shared 2-core VM, one binary measured twice in a row gave ratios
# from 0.57 to 0.85): each connection count runs BENCH_ROUNDS rounds, each round the baseline
# right before and right after the keyrack runs, and the table gives the median over rounds of
# each round's ratio (keyrack's req/s over the mean of that round's two baseline runs).
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_RUN=${BENCH_SECONDS:-3}
ROUNDS=${BENCH_ROUNDS:-3}
ROUND=1
MIGRATE_KEYS=${BENCH_MIGRATE_KEYS:-1000000}
MANY_USERS=${BENCH_USERS:-1000}
CONNECTIONS=${BENCH_CONNECTIONS:-1 16 64}
ONLY=${BENCH_ONLY:-}
everything() { [ -z "$ONLY" ]; }

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v hyperfine >/dev/null || need+=(hyperfine)
command -v curl >/dev/null || need+=(curl)
[ -x /usr/bin/time ] || need+=(time)
command -v python3 >/dev/null || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]} from Debian's packages" >&2
  apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
fi

cargo build --release --bin keyrack --example baseline --example sync_ceiling --example seed_legacy \
  --example start_to_ready >&2
BIN=$PWD/target/release/keyrack
EX=$PWD/target/release/examples
OUT=$PWD/target/bench
mkdir -p "$OUT"
WORK=$(mktemp -d)
RAW="$OUT/raw.txt"
: > "$RAW"
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

export KEYRACK_ENCRYPTION_KEY
KEYRACK_ENCRYPTION_KEY=$("$BIN" gen-key)
# The benchmark writes and logs in flat out as one account: lift the per-account write rate
# (docs/operations.md, "The audit trail") so that it measures the writes, not the 429s.
export KEYRACK_WRITE_RATE=1000000
WORKERS=$(( $(nproc) * 2 < 4 ? 4 : $(nproc) * 2 ))

record() { echo "$1 $2" >> "$RAW"; }

# Starts a server writing its ready line to a file; sets SERVER_PID and SERVER_URL.
start_server() { # name, command...
  local name=$1; shift
  local ready="$WORK/$name.ready"
  "$@" > "$ready" 2> "$WORK/$name.log" &
  SERVER_PID=$!
  PIDS+=("$SERVER_PID")
  for _ in $(seq 1 500); do
    grep -q "listening on" "$ready" 2>/dev/null && break
    sleep 0.01
  done
  SERVER_URL=$(sed -n 's/.*listening on \(http[^ ]*\).*/\1/p' "$ready")
  [ -n "$SERVER_URL" ] || { echo "$name did not start" >&2; cat "$WORK/$name.log" >&2; exit 1; }
}

# The reveals over many users, a random user per request: with each user's own session, and
# with one read service token naming the user.
many_session() {
  run_wrk reveal_many_session "$1" "$URL" KR_PATH="/user/api-key?reveal=true" \
    KR_SESSIONS_FILE="$WORK/sessions.txt"
}
many_service() {
  run_wrk reveal_many_service "$1" "$URL" KR_TOKEN="$T_SERVICE_READ" KR_USERS="$MANY_USERS" \
    KR_PATH_TEMPLATE="/service/users/ext:{i}/api-key?reveal=true"
}

peak_rss_kib() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; }

run_wrk() { # label, connections, url, env assignments...
  local label=$1 conns=$2 url=$3; shift 3
  local threads=$(( conns < 2 ? 1 : 2 ))
  local line
  line=$(env "$@" wrk -t"$threads" -c"$conns" -d"${SECONDS_PER_RUN}s" --latency \
    -s benches/wrk/request.lua "$url" | sed -n 's/^WRKJSON //p')
  record "wrk:$label:$conns:$ROUND" "$line"
  echo "  $label c=$conns round $ROUND $line" >&2
}

if everything; then
echo "== start to ready line" >&2
cat > "$WORK/ready.sh" <<EOF
#!/usr/bin/env bash
rm -f "$WORK/fifo"; mkfifo "$WORK/fifo"
"$BIN" --db "\$1" serve --listen 127.0.0.1:0 > "$WORK/fifo" 2>/dev/null &
pid=\$!
head -n1 "$WORK/fifo" > /dev/null
kill \$pid; wait \$pid 2>/dev/null || true
EOF
chmod +x "$WORK/ready.sh"
hyperfine -N --warmup 3 --runs 20 --export-json "$WORK/ready-fresh.json" \
  --prepare "rm -f $WORK/fresh.db $WORK/fresh.db-wal $WORK/fresh.db-shm" \
  "$WORK/ready.sh $WORK/fresh.db" >&2
"$EX/seed_legacy" "$WORK/big.db" 100000 2>&1 | tail -1 >&2
"$BIN" --db "$WORK/big.db" migrate >/dev/null 2>&1
hyperfine -N --warmup 3 --runs 20 --export-json "$WORK/ready-big.json" \
  "$WORK/ready.sh $WORK/big.db" >&2
record ready:fresh "$(python3 -c "import json;print(json.load(open('$WORK/ready-fresh.json'))['results'][0]['median'])")"
record ready:100k "$(python3 -c "import json;print(json.load(open('$WORK/ready-big.json'))['results'][0]['median'])")"
# The same script around a process that exits at once: what the harness itself costs.
cat > "$WORK/noop.sh" <<EOF
#!/usr/bin/env bash
rm -f "$WORK/fifo"; mkfifo "$WORK/fifo"
echo ready > "$WORK/fifo" &
head -n1 "$WORK/fifo" > /dev/null
wait
EOF
chmod +x "$WORK/noop.sh"
hyperfine -N --warmup 3 --runs 20 --export-json "$WORK/ready-noop.json" "$WORK/noop.sh" >&2
record ready:harness "$(python3 -c "import json;print(json.load(open('$WORK/ready-noop.json'))['results'][0]['median'])")"

echo "== start-up against the bare server, fifty servers at once (target/bench/start.json)" >&2
python3 benches/start.py "$BIN" "$EX/baseline" "$EX/start_to_ready" >&2

echo "== sync ceiling" >&2
record sync_ceiling "$("$EX/sync_ceiling" "$WORK" 3)"
fi

echo "== throughput: baseline and keyrack, interleaved" >&2
start_server baseline "$EX/baseline" 127.0.0.1:0 "$WORKERS"
BASE=$SERVER_URL
start_server keyrack "$BIN" --db "$WORK/serve.db" serve --listen 127.0.0.1:0 --workers "$WORKERS"
KEYRACK_PID=$SERVER_PID
URL=$SERVER_URL
. benches/seed.sh
seed_bench_users
# Many users, each with a key and a session; a write token seeds them, a read token reveals.
T_SERVICE_WRITE=$("$BIN" --db "$WORK/serve.db" service-token create bench-write --scope write 2>/dev/null)
T_SERVICE_READ=$("$BIN" --db "$WORK/serve.db" service-token create bench-read 2>/dev/null)
python3 benches/many_users.py "$URL" "$WORK/serve.db" "$MANY_USERS" "$T_SERVICE_WRITE" "$WORK/sessions.txt"
record rss_idle_kib "$(peak_rss_kib "$KEYRACK_PID")"
# The machine is noisy: the baseline is measured right before and right after each round of
# keyrack runs with the same connection count, and each round's ratios use the mean of the two.
for c in $CONNECTIONS; do
  for ROUND in $(seq 1 "$ROUNDS"); do
    run_wrk baseline_before "$c" "$BASE"
    if everything; then
      run_wrk healthz "$c" "$URL"
      run_wrk reveal "$c" "$URL" KR_PATH="/user/api-key?reveal=true" KR_TOKEN="$T_REVEAL"
      run_wrk list10 "$c" "$URL" KR_PATH=/user/api-keys KR_TOKEN="$T_LIST"
      run_wrk post_dual "$c" "$URL" KR_METHOD=POST KR_PATH=/user/api-key KR_TOKEN="$T_REVEAL" \
        KR_BODY='{"api_key":"sk-bench-0123456789abcdef"}'
    fi
    # The two are compared with each other: which runs first alternates from round to round.
    if (( ROUND % 2 )); then
      many_session "$c"; many_service "$c"
    else
      many_service "$c"; many_session "$c"
    fi
    run_wrk baseline_after "$c" "$BASE"
  done
done
record rss_peak_kib "$(peak_rss_kib "$KEYRACK_PID")"
if everything; then
# Logins last, one round: argon2 is slow and memory-hungry on purpose; reported on their own.
ROUND=1
for c in 1 16 64; do
  run_wrk login "$c" "$URL" KR_METHOD=POST KR_PATH=/auth/login \
    KR_BODY='{"email":"list@example.com","password":"correct horse battery"}'
done
record rss_peak_with_logins_kib "$(peak_rss_kib "$KEYRACK_PID")"
kill "$KEYRACK_PID" "${PIDS[0]}"; wait 2>/dev/null || true

echo "== migrate over $MIGRATE_KEYS legacy keys" >&2
"$EX/seed_legacy" "$WORK/million.db" "$MIGRATE_KEYS" 2>&1 | tail -1 >&2
measure() { # label, command...
  local label=$1; shift
  /usr/bin/time -f "%e %M" -o "$WORK/time.txt" "$@" > "$WORK/$label.out" 2>&1
  cat "$WORK/$label.out" | tail -2 >&2
  record "cmd:$label" "$(cat "$WORK/time.txt")"
}
measure migrate "$BIN" --db "$WORK/million.db" migrate
measure status "$BIN" --db "$WORK/million.db" status --json
measure remove_legacy_column "$BIN" --db "$WORK/million.db" remove-legacy-column --yes \
  --backup "$WORK/million-backup.db"
else
  kill "$KEYRACK_PID" "${PIDS[0]}"; wait 2>/dev/null || true
fi

python3 benches/report.py "$RAW" "$OUT/results.json"
