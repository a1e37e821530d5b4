#!/usr/bin/env python3
"""keyrack under load while the phase changes (`make load`).

64 keep-alive connections for SECONDS (default 60) mix reveals, writes, deletes and logins over
50 users, while `remove-legacy-column --yes`, `revert --yes` and `migrate` run against the same
file in a loop. Passes with zero 5xx answers, no "database is locked" text reaching a client, and
`keyrack status` showing zero conflicts and zero undecryptable values at the end. 503 `busy` is
counted on its own (goal zero). Standard library only.

Usage: load.py BIN [SECONDS]
"""
import collections
import http.client
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time

from keyrack_http import request, serve

BIN = sys.argv[1]
SECONDS = float(sys.argv[2]) if len(sys.argv) > 2 else 60
USERS, CONNECTIONS = 50, 64
work = tempfile.mkdtemp(prefix="keyrack-load-")
db = os.path.join(work, "load.db")
env = dict(os.environ, RUST_LOG="warn")
env["KEYRACK_ENCRYPTION_KEY"] = subprocess.check_output([BIN, "gen-key"], text=True).strip()
PASSWORD = "correct horse battery"

server, host, port = serve(BIN, db, env, stderr=open(os.path.join(work, "server.log"), "w"))


setup = http.client.HTTPConnection(host, port, timeout=30)
tokens = []
for i in range(USERS):
    email = f"user{i}@example.com"
    request(setup, "POST", "/auth/register", {"email": email, "password": PASSWORD})
    _, data = request(setup, "POST", "/auth/login", {"email": email, "password": PASSWORD})
    token = json.loads(data)["token"]
    tokens.append(token)
    request(setup, "POST", "/user/api-key", {"api_key": f"sk-load-{i}-0123456789"}, token)
    request(setup, "POST", "/user/api-keys", {"provider": "anthropic", "api_key": f"sk-ant-{i}-0123456789"}, token)

statuses = collections.Counter()
locked_text = [0]
lock = threading.Lock()
stop = threading.Event()


def client(n):
    rng = random.Random(n)
    conn = http.client.HTTPConnection(host, port, timeout=60)
    while not stop.is_set():
        i = rng.randrange(USERS)
        t = tokens[i]
        roll = rng.random()
        try:
            if roll < 0.55:
                status, body = request(conn, "GET", "/user/api-key?reveal=true", token=t)
            elif roll < 0.80:
                status, body = request(conn, "POST", "/user/api-key",
                                       {"api_key": f"sk-load-{i}-{rng.randrange(10**6):06d}-x"}, t)
            elif roll < 0.90:
                status, body = request(conn, "POST", "/user/api-keys",
                                       {"provider": "extra", "api_key": f"sk-extra-{i}-{rng.randrange(10**6)}"}, t)
                if status == 201:
                    kid = json.loads(body)["key"]["id"]
                    status, body = request(conn, "DELETE", f"/user/api-keys/{kid}", token=t)
            elif roll < 0.97:
                status, body = request(conn, "GET", "/user/api-keys", token=t)
            else:
                status, body = request(conn, "POST", "/auth/login",
                                       {"email": f"user{i}@example.com", "password": PASSWORD})
        except Exception as e:  # a dropped connection counts as a failure
            with lock:
                statuses["connection error"] += 1
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=60)
            continue
        with lock:
            statuses[status] += 1
            if b"locked" in body.lower():
                locked_text[0] += 1


threads = [threading.Thread(target=client, args=(n,)) for n in range(CONNECTIONS)]
for t in threads:
    t.start()

phase_runs = collections.Counter()
deadline = time.monotonic() + SECONDS
n = 0
while time.monotonic() < deadline:
    for args in (["remove-legacy-column", "--yes", "--backup", os.path.join(work, f"backup-{n}.db")],
                 ["revert", "--yes", "--backup", os.path.join(work, f"revert-backup-{n}.db")],
                 ["migrate"]):
        if time.monotonic() >= deadline:
            break
        out = subprocess.run([BIN, "--db", db] + args, env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        phase_runs[f"{args[0]} exit {out.returncode}"] += 1
        n += 1
        time.sleep(1.0)
stop.set()
for t in threads:
    t.join()
# End in a settled phase: migrate once more, then check.
subprocess.run([BIN, "--db", db, "migrate"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
status = json.loads(subprocess.check_output([BIN, "--db", db, "status", "--json"], env=env, text=True))
server.terminate()
server.wait()

total = sum(statuses.values())
five = sum(v for k, v in statuses.items() if isinstance(k, int) and k >= 500 and k != 503)
busy = statuses.get(503, 0)
errors = statuses.get("connection error", 0)
print(f"load: {total} requests in {SECONDS:.0f} s over {CONNECTIONS} connections ({total / SECONDS:.0f}/s)")
print("  answers: " + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items(), key=str)))
print("  phase commands: " + ", ".join(f"{k}: {v}" for k, v in sorted(phase_runs.items())))
print(f"  5xx other than 503: {five}; 503 busy: {busy}; 'locked' in a body: {locked_text[0]}; "
      f"connection errors: {errors}")
print(f"  status at the end: conflicts {status['conflicts']}, undecryptable {status['undecryptable']}, phase {status['phase']}")
failed = five or locked_text[0] or errors or status["conflicts"] or status["undecryptable"] \
    or any("exit 0" not in k for k in phase_runs)
print(f"{0 if failed else 1} passed, {1 if failed else 0} failed")
sys.exit(1 if failed else 0)
