#!/usr/bin/env python3
"""How much one account makes the database grow (the audit trail's bound).

One account (self-registered), 8 keep-alive connections for SECONDS: `reveal` sends only
`GET /user/api-key?reveal=true`; `mix` sends reveals, key writes (set, add, delete), logins and listings.
Prints the requests answered by status, the events' row count and the database's size (file plus
WAL) before and after, the growth per second and extrapolated to 10 minutes. Standard library only.

Usage: audit_growth.py BIN reveal|mix [SECONDS] [CONNECTIONS]
"""
import collections
import http.client
import json
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

from keyrack_http import request, serve

BIN, MODE = sys.argv[1], sys.argv[2]
SECONDS = float(sys.argv[3]) if len(sys.argv) > 3 else 20
CONNECTIONS = int(sys.argv[4]) if len(sys.argv) > 4 else 8
work = tempfile.mkdtemp(prefix="keyrack-audit-")
db = os.path.join(work, "audit.db")
env = dict(os.environ, RUST_LOG="warn")
env["KEYRACK_ENCRYPTION_KEY"] = subprocess.check_output([BIN, "gen-key"], text=True).strip()
server, host, port = serve(BIN, db, env, stderr=open(os.path.join(work, "server.log"), "w"))

setup = http.client.HTTPConnection(host, port, timeout=30)
PASSWORD = "correct horse battery"
request(setup, "POST", "/auth/register", {"email": "one@example.com", "password": PASSWORD})
_, data = request(setup, "POST", "/auth/login", {"email": "one@example.com", "password": PASSWORD})
TOKEN = json.loads(data)["token"]
request(setup, "POST", "/user/api-key", {"api_key": "sk-audit-0123456789abcdef"}, TOKEN)
setup.close()


def size():
    """The database file's size once the WAL is checkpointed into it (the WAL's own size is
    bounded by the checkpoints and reused, so it is not growth)."""
    c = sqlite3.connect(db, timeout=30)
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    c.close()
    return os.path.getsize(db)


def raw(method, path, body=None):
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
    if body is not None:
        b = json.dumps(body).encode()
        return (head + f"Content-Type: application/json\r\nContent-Length: {len(b)}\r\n\r\n").encode() + b
    return (head + "\r\n").encode()


REVEAL = raw("GET", "/user/api-key?reveal=true")
statuses = collections.Counter()
lock = threading.Lock()
stop = threading.Event()


def read_reply(f):
    first = f.readline().split()
    if len(first) < 2:
        return None, b""
    status = int(first[1])
    length = 0
    while True:
        line = f.readline()
        if line in (b"\r\n", b""):
            break
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v)
    body = f.read(length)
    return status, body


def client(n):
    s = socket.create_connection((host, port))
    f = s.makefile("rb")
    mine = collections.Counter()
    i = 0
    while not stop.is_set():
        i += 1
        if MODE == "mix" and i % 4 == 0:
            k = i % 16
            if k == 0:
                req = raw("POST", "/user/api-key", {"api_key": f"sk-audit-{n}-{i}-0123456789"})
            elif k == 4:
                req = raw("POST", "/user/api-keys", {"provider": "anthropic", "api_key": f"sk-ant-{n}-{i}-0123456789"})
            elif k == 8:
                req = raw("DELETE", "/user/api-key?provider=anthropic")
            elif k == 12:
                req = raw("POST", "/auth/login", {"email": "one@example.com", "password": PASSWORD})
            else:
                req = raw("GET", "/user/api-keys")
        else:
            req = REVEAL
        try:
            s.sendall(req)
            status, body = read_reply(f)
        except OSError:
            status = None
        if status is None or body.startswith(b'{"error":{"code":"x'):
            mine["closed"] += 1
            s.close()
            s = socket.create_connection((host, port))
            f = s.makefile("rb")
            continue
        if status >= 400 and status != 429:
            mine[f"{status} {body[:60]!r}"] += 1
        mine[status] += 1
    s.close()
    with lock:
        statuses.update(mine)


time.sleep(1.5)  # the first flush
before = size()
rows_before = sqlite3.connect(f"file:{db}?mode=ro", uri=True).execute("SELECT count(*) FROM events").fetchone()[0]
threads = [threading.Thread(target=client, args=(n,)) for n in range(CONNECTIONS)]
t0 = time.time()
for t in threads:
    t.start()
time.sleep(SECONDS)
stop.set()
for t in threads:
    t.join()
elapsed = time.time() - t0
time.sleep(2.5)  # the last flush
server.terminate()
server.wait()
after = size()
rows_after = sqlite3.connect(f"file:{db}?mode=ro", uri=True).execute("SELECT count(*) FROM events").fetchone()[0]
growth = after - before
total = sum(statuses.values())
print(f"mode={MODE} connections={CONNECTIONS} seconds={elapsed:.1f} requests={total} "
      f"({total / elapsed:.0f}/s) statuses={dict(statuses)}")
print(f"events rows {rows_before} -> {rows_after} (+{rows_after - rows_before})")
print(f"database {before / 1e6:.2f} MB -> {after / 1e6:.2f} MB: +{growth / 1e6:.2f} MB, "
      f"{growth / elapsed / 1e6:.3f} MB/s, 10 minutes: {growth / elapsed * 600 / 1e6:.1f} MB")
