#!/usr/bin/env bash
# Checks deploy/keyrack.service: `systemd-analyze verify` accepts it (with ExecStart pointed at a
# built keyrack, since /usr/local/bin/keyrack is not installed here) and
# `systemd-analyze security --offline=true` rates its exposure at most 2.0. Prints the score.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${1:-$PWD/target/debug/keyrack}
[ -x "$BIN" ] || cargo build --bin keyrack >&2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
sed "s#/usr/local/bin/keyrack#$BIN#" deploy/keyrack.service > "$tmp/keyrack.service"
out=$(systemd-analyze verify "$tmp/keyrack.service" 2>&1) || { echo "$out"; exit 1; }
# verify reports problems on stderr with exit 0 in some versions: any line about our unit fails.
if grep -q "keyrack.service" <<<"$out"; then echo "$out"; exit 1; fi
score=$(systemd-analyze security --offline=true "$tmp/keyrack.service" 2>/dev/null \
  | sed -n 's/.*Overall exposure level for keyrack.service: \([0-9.]*\).*/\1/p')
[ -n "$score" ] || { echo "no exposure level from systemd-analyze security"; exit 1; }
echo "deploy/keyrack.service: systemd-analyze verify ok; security exposure $score (at most 2.0)"
awk -v s="$score" 'BEGIN { exit !(s <= 2.0) }'
