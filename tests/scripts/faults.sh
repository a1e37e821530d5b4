#!/usr/bin/env bash
# `make faults`: the fault suite (tests/scripts/faults.py). Installs the `cryptography` package
# from PyPI into .venv-faults to check the stored values independently of keyrack.
# FAULTS_ROUNDS (default 20) and FAULTS_KEYS (default 20000) size it.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=.venv-faults
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import cryptography' 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check 'cryptography>=42'
fi
cargo build --release --bin keyrack --example seed_legacy >&2
exec "$VENV/bin/python" tests/scripts/faults.py target/release/keyrack \
  target/release/examples/seed_legacy "${FAULTS_ROUNDS:-20}" "${FAULTS_KEYS:-20000}"
