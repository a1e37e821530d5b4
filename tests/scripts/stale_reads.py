#!/usr/bin/env python3
"""Counts reads that answer a replaced key across revert / set / migrate cycles.

A database of N users loaded from a fixtures file (column keys), migrated; one more user, created last so that the
backfill reaches it last. Each cycle: the user sets K1 in phase dual, `revert --yes`, sets K2 in
phase legacy (column only; the table still holds K1), then `migrate` runs while the user reads
`GET /user/api-key?reveal=true` in a loop. Every read answered after K2 was acknowledged must be
K2. Prints the number of reads made during the migrates and how many answered something else.

Usage: stale_reads.py BIN [USERS] [CYCLES]
"""
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading

from keyrack_http import request, serve

BIN = sys.argv[1]
USERS = int(sys.argv[2]) if len(sys.argv) > 2 else 1500
CYCLES = int(sys.argv[3]) if len(sys.argv) > 3 else 10

work = tempfile.mkdtemp(prefix="keyrack-stale-")
db = os.path.join(work, "k.db")
key = subprocess.check_output([BIN, "gen-key"], text=True).strip()
env = dict(os.environ, KEYRACK_ENCRYPTION_KEY=key, RUST_LOG="warn")
fixtures = os.path.join(work, "users.json")
with open(fixtures, "w") as f:
    json.dump({"users": [{"email": f"user{i}@example.com", "password": "correct horse battery",
                          "openai_api_key": f"sk-fixture-{i:06d}-abcdefgh"}
                         for i in range(USERS)]}, f)
subprocess.run([BIN, "--db", db, "load-fixtures", fixtures], env=env, check=True,
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run(*args):
    return subprocess.run([BIN, "--db", db, *args], env=env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


assert run("migrate").returncode == 0
server, host, port = serve(BIN, db, env)


def call(conn, method, path, body=None, token=None):
    status, data = request(conn, method, path, body, token)
    return status, json.loads(data or b"null")


c = http.client.HTTPConnection(host, port, timeout=30)
creds = {"email": "last@example.com", "password": "correct horse battery"}
call(c, "POST", "/auth/register", creds)
token = call(c, "POST", "/auth/login", creds)[1]["token"]

reads = stale = other = 0
for cycle in range(CYCLES):
    k1, k2 = f"sk-cycle{cycle}-K1-0123456789", f"sk-cycle{cycle}-K2-0123456789"
    assert call(c, "POST", "/user/api-key", {"api_key": k1}, token)[0] == 200
    out = run("revert", "--yes")
    assert out.returncode == 0, out.stderr
    assert call(c, "POST", "/user/api-key", {"api_key": k2}, token)[0] == 200
    stop = threading.Event()
    seen = {"reads": 0, "stale": 0, "other": 0}

    def reader():
        rc = http.client.HTTPConnection(host, port, timeout=30)
        while not stop.is_set():
            status, body = call(rc, "GET", "/user/api-key?reveal=true", None, token)
            seen["reads"] += 1
            if status != 200:
                seen["other"] += 1
            elif body.get("api_key") != k2:
                seen["stale"] += 1

    t = threading.Thread(target=reader)
    t.start()
    out = run("migrate")
    stop.set()
    t.join()
    if out.returncode != 0:
        print(f"cycle {cycle}: migrate exited {out.returncode}: {out.stdout.strip()} {out.stderr.strip()}")
    reads += seen["reads"]
    stale += seen["stale"]
    other += seen["other"]
    print(f"cycle {cycle}: {seen['reads']} reads during migrate, {seen['stale']} answered a replaced key")

server.terminate()
server.wait()
shutil.rmtree(work, ignore_errors=True)
print(f"{USERS} users, {CYCLES} cycles: {reads} reads during migrate, {stale} answered a replaced key, {other} not 200")
sys.exit(1 if stale or other else 0)
