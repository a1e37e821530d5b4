#!/usr/bin/env python3
"""The two revert cases of a database in phase dual whose column holds keys the table lacks.

1. One unmigrated column key (loaded as legacy data in phase dual).
2. Five column values that do not decrypt: three tampered or foreign, two sealed with a key the
   operator has not configured yet.

For each: what `revert --yes` prints, how many column values survive exactly, and what `status`
says afterwards. Usage: revert_cases.py BIN
"""
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile

BIN = sys.argv[1]
work = tempfile.mkdtemp(prefix="keyrack-revert-")


def gen_key():
    return subprocess.check_output([BIN, "gen-key"], text=True).strip()


def run(db, key, *args):
    env = dict(os.environ, KEYRACK_ENCRYPTION_KEY=key, RUST_LOG="warn")
    return subprocess.run([BIN, "--db", db, *args], env=env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=work)


def fixtures(name, n):
    path = os.path.join(work, name)
    users = [{"email": f"u{i}@example.com", "password": "correct horse battery",
              "openai_api_key": f"sk-column-only-{i}-0123456789"} for i in range(n)]
    with open(path, "w") as f:
        json.dump({"users": users}, f)
    return path


def columns(db):
    c = sqlite3.connect(db)
    try:
        return dict(c.execute("SELECT id, openai_api_key FROM users"))
    finally:
        c.close()


def status(db, key):
    return json.loads(run(db, key, "status", "--json").stdout)


def case(name, db, key):
    before = columns(db)
    st = status(db, key)
    out = run(db, key, "revert", "--yes")
    after = columns(db)
    kept = sum(1 for uid, v in before.items() if v is not None and after.get(uid) == v)
    st2 = status(db, key)
    print(f"{name}:")
    print(f"  before: phase {st['phase']}, column values {sum(v is not None for v in before.values())}, "
          f"unmigrated {st['unmigrated']}, undecryptable {st['undecryptable']}")
    print(f"  revert --yes exit {out.returncode}: " + " | ".join(out.stdout.strip().splitlines()))
    print(f"  after: phase {st2['phase']}, column values kept exactly {kept} of "
          f"{sum(v is not None for v in before.values())}, NULL {sum(v is None for v in after.values())}, "
          f"status undecryptable {st2['undecryptable']}")


key_a, key_b = gen_key(), gen_key()
one = os.path.join(work, "one.db")
assert run(one, key_a, "load-fixtures", fixtures("one.json", 1)).returncode == 0
case("case 1 (one unmigrated column key in phase dual)", one, key_a)

five = os.path.join(work, "five.db")
other = os.path.join(work, "other.db")
f = fixtures("five.json", 5)
assert run(five, key_a, "load-fixtures", f).returncode == 0
assert run(other, key_b, "load-fixtures", f).returncode == 0
under_b = columns(other)
c = sqlite3.connect(five)
c.execute("UPDATE users SET openai_api_key = 'kr1:' || substr(openai_api_key, 5, 17) || 'AAAA' "
          "|| substr(openai_api_key, 26) WHERE id = 1")
c.execute("UPDATE users SET openai_api_key = (SELECT openai_api_key FROM users WHERE id = 5) WHERE id = 2")
c.execute("UPDATE users SET openai_api_key = 'sk-plaintext-by-hand-0123' WHERE id = 3")
for uid in (4, 5):
    c.execute("UPDATE users SET openai_api_key = ? WHERE id = ?", (under_b[uid], uid))
c.commit()
c.close()
case("case 2 (five column values that do not decrypt, two sealed with a key not configured)",
     five, key_a)
shutil.rmtree(work, ignore_errors=True)
