#!/usr/bin/env python3
"""Seeds many users for the reveal benchmarks of benches/run.sh (standard library only).

Usage: many_users.py URL DB N WRITE_TOKEN SESSIONS_FILE
Creates N users through the service routes (PUT /service/users/ext:<i>, then a default OpenAI
key for each with POST /service/users/ext:<i>/api-key), then gives each a session: the
sessions are written straight into the database (a token's SHA-256, as keyrack stores them),
since N logins would spend most of the seeding on argon2. Writes one session token per line
to SESSIONS_FILE, line i for the user ext:<i>.
"""
import hashlib
import http.client
import json
import secrets
import sqlite3
import sys
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

url, db, n, write_token, sessions_file = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
u = urllib.parse.urlsplit(url)


def seed(ids):
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    headers = {"Authorization": f"Bearer {write_token}", "Content-Type": "application/json"}
    for i in ids:
        for method, path, body in (
            ("PUT", f"/service/users/ext:{i}", {"email": f"many{i}@example.com"}),
            ("POST", f"/service/users/ext:{i}/api-key", {"api_key": f"sk-many-{i:06d}-0123456789abcdef"}),
        ):
            conn.request(method, path, json.dumps(body), headers)
            resp = conn.getresponse()
            resp.read()
            if resp.status not in (200, 201):
                sys.exit(f"{method} {path}: {resp.status}")
    conn.close()


ids = list(range(n))
# Writes commit in groups: several connections at once make the groups larger.
with ThreadPoolExecutor(8) as pool:
    list(pool.map(seed, [ids[k::8] for k in range(8)]))

c = sqlite3.connect(db, timeout=30)
by_ext = dict(c.execute("SELECT external_id, id FROM users WHERE external_id IS NOT NULL"))
now = int(time.time())
tokens = []
rows = []
for i in ids:
    t = "kr_" + secrets.token_urlsafe(32)
    tokens.append(t)
    rows.append((hashlib.sha256(t.encode()).digest(), by_ext[str(i)], now, now + 86400))
with c:
    c.executemany("INSERT INTO sessions(token_hash, user_id, created_at, expires_at) VALUES (?, ?, ?, ?)", rows)
c.close()
with open(sessions_file, "w") as f:
    f.write("\n".join(tokens) + "\n")
print(f"seeded {n} users with a key and a session", file=sys.stderr)
