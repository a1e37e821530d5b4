#!/usr/bin/env python3
"""keyrack's fault suite (`make faults`).

kill -9 at random moments of `migrate`, `remove-legacy-column`, `revert` and
`rotate-encryption-key` over a database of 20,000 keys, and of the server under a concurrent
write load. After each kill: `PRAGMA integrity_check` is ok, every key that was acknowledged
decrypts to its exact value (checked here, independently of keyrack, with AES-GCM from the
`cryptography` package), and a rerun of the command finishes. Prints the tally; exits 1 on any
failure.

Usage: faults.py BIN SEED_BIN [ROUNDS] [KEYS]
"""
import base64
import hashlib
import http.client
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyrack_http import request, serve

BIN, SEED = sys.argv[1], sys.argv[2]
ROUNDS = int(sys.argv[3]) if len(sys.argv) > 3 else 20
KEYS = int(sys.argv[4]) if len(sys.argv) > 4 else 20000
rng = random.Random(int(os.environ.get("FAULTS_SEED", "20261125")))
work = tempfile.mkdtemp(prefix="keyrack-faults-")
tally = {}
failures = []


def gen_key():
    return subprocess.check_output([BIN, "gen-key"], text=True).strip()


def key_id(b64):
    return hashlib.sha256(b"keyrack key id v1\0" + base64.b64decode(b64)).hexdigest()[:16]


def opener(*keys):
    ciphers = {key_id(k): AESGCM(base64.b64decode(k)) for k in keys}

    def open_value(user_id, provider, sealed):
        prefix, kid, body = sealed.split(":", 2)
        raw = base64.b64decode(body)
        aad = f"keyrack/v1/user:{user_id}/provider:{provider}".encode()
        return ciphers[kid].decrypt(raw[:12], raw[12:], aad).decode()

    return open_value


def seed_key(uid):
    return f"sk-legacy-{uid:08d}-abcdefgh"


def env_with(key, old=None):
    e = dict(os.environ, KEYRACK_ENCRYPTION_KEY=key, RUST_LOG="warn")
    e.pop("KEYRACK_OLD_ENCRYPTION_KEYS", None)
    if old:
        e["KEYRACK_OLD_ENCRYPTION_KEYS"] = old
    return e


def copy_db(src, dst):
    for suffix in ["", "-wal", "-shm"]:
        if os.path.exists(dst + suffix):
            os.remove(dst + suffix)
        if os.path.exists(src + suffix):
            shutil.copy(src + suffix, dst + suffix)


def integrity_ok(db):
    c = sqlite3.connect(db)
    try:
        return c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        c.close()


def check_seeded_keys(db, open_value):
    """Every seeded user's OpenAI key, in the store the phase reads, is the seeded plaintext."""
    c = sqlite3.connect(db)
    try:
        phase = c.execute("SELECT value FROM keyrack_meta WHERE name='phase'").fetchone()[0]
        has_column = any(r[1] == "openai_api_key" for r in c.execute("PRAGMA table_info(users)"))
        bad = 0
        for uid, column, table in c.execute(
            "SELECT u.id, " + ("u.openai_api_key" if has_column else "NULL") + ", k.sealed_key "
            "FROM users u LEFT JOIN api_keys k ON k.user_id = u.id AND k.provider = 'openai' "
            "AND k.is_default = 1"
        ):
            want = seed_key(uid)
            if phase == "legacy":
                found = column
            else:
                found = table if table is not None else column
            if found is None or open_value(uid, "openai", found) != want:
                bad += 1
        return phase, bad
    finally:
        c.close()


def run(args, env):
    return subprocess.run([BIN] + args, env=env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def fault_rounds(name, start_db, args_for_round, env, open_value):
    db = os.path.join(work, f"{name}.db")
    copy_db(start_db, db)
    t0 = time.monotonic()
    out = run(["--db", db] + args_for_round(-1), env)
    full = time.monotonic() - t0
    if out.returncode != 0:
        failures.append(f"{name}: a full run failed: {out.stderr}")
        return
    counts = {"rounds": 0, "interrupted": 0, "ok": 0}
    for r in range(ROUNDS):
        copy_db(start_db, db)
        wait = rng.uniform(0, full)
        p = subprocess.Popen([BIN, "--db", db] + args_for_round(r), env=env,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        time.sleep(wait)
        p.kill()
        code = p.wait()
        counts["rounds"] += 1
        # Killed before it finished (a run that ended on its own exits 0, or fails below).
        if code == -signal.SIGKILL:
            counts["interrupted"] += 1
        problems = []
        if not integrity_ok(db):
            problems.append("integrity_check failed after the kill")
        phase, bad = check_seeded_keys(db, open_value)
        if bad:
            problems.append(f"{bad} keys wrong after the kill (phase {phase})")
        rerun = run(["--db", db] + args_for_round(r + 1000), env)
        if rerun.returncode != 0:
            problems.append(f"the rerun failed ({rerun.returncode}): {rerun.stderr.strip()[-300:]}")
        phase, bad = check_seeded_keys(db, open_value)
        if bad or not integrity_ok(db):
            problems.append(f"{bad} keys wrong after the rerun (phase {phase})")
        if problems:
            failures.append(f"{name} round {r} (killed after {wait * 1000:.0f} ms): {'; '.join(problems)}")
        else:
            counts["ok"] += 1
        # The backups of the round (a kill may leave a partial one behind): not needed again.
        for f in os.listdir(work):
            if f.startswith("backup-round-"):
                os.remove(os.path.join(work, f))
    counts["full_run_ms"] = round(full * 1000)
    tally[name] = counts
    if counts["interrupted"] == 0:
        failures.append(f"{name}: no kill landed inside a run ({ROUNDS} rounds, a run takes "
                        f"{full * 1000:.0f} ms); the rounds proved nothing")


def server_rounds(key, open_value):
    db = os.path.join(work, "server.db")
    env = env_with(key)
    users = 16
    counts = {"rounds": 0, "writes_sent": 0, "ok": 0}
    tokens = None
    expected = {}
    for r in range(ROUNDS):
        p, host, port = serve(BIN, db, env)

        def call(method, path, body=None, token=None):
            c = http.client.HTTPConnection(host, port, timeout=30)
            try:
                return request(c, method, path, body, token)
            finally:
                c.close()

        if tokens is not None:
            # The restart after the kill: every value the database held reveals, exactly.
            for i, want in expected.items():
                status, data = call("GET", "/user/api-key?reveal=true", token=tokens[i])
                got = json.loads(data).get("api_key") if status == 200 else f"status {status}"
                if got != want:
                    failures.append(f"server round {r}: user {i} reveals {got!r}, expected {want!r}")
        if tokens is None:
            tokens = {}
            for i in range(users):
                email = f"load{i}@example.com"
                call("POST", "/auth/register", {"email": email, "password": "correct horse battery"})
                _, data = call("POST", "/auth/login", {"email": email, "password": "correct horse battery"})
                tokens[i] = json.loads(data)["token"]
        acked = {}
        sent = {i: [] for i in range(users)}
        stop = threading.Event()

        def writer(i):
            n = 0
            conn = http.client.HTTPConnection(host, port, timeout=30)
            while not stop.is_set():
                n += 1
                value = f"sk-round{r}-user{i}-{n:06d}"
                sent[i].append(value)
                try:
                    conn.request("POST", "/user/api-key", json.dumps({"api_key": value}),
                                 {"Content-Type": "application/json",
                                  "Authorization": f"Bearer {tokens[i]}"})
                    resp = conn.getresponse()
                    resp.read()
                    if resp.status == 200:
                        acked[i] = value
                except Exception:
                    return

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(users)]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.2, 1.0))
        p.kill()
        p.wait()
        stop.set()
        for t in threads:
            t.join()
        counts["rounds"] += 1
        counts["writes_sent"] += sum(len(v) for v in sent.values())
        problems = []
        if not integrity_ok(db):
            problems.append("integrity_check failed")
        c = sqlite3.connect(db)
        for i in range(users):
            uid = c.execute("SELECT id FROM users WHERE email = ?", (f"load{i}@example.com",)).fetchone()[0]
            row = c.execute("SELECT sealed_key FROM api_keys WHERE user_id = ? AND provider = 'openai' "
                            "AND is_default = 1", (uid,)).fetchone()
            stored = open_value(uid, "openai", row[0]) if row else None
            if stored is not None:
                expected[i] = stored
            if i not in acked:
                continue
            # The last acknowledged value, or one sent after it whose answer the kill cut off.
            allowed = sent[i][sent[i].index(acked[i]):]
            if stored not in allowed:
                problems.append(f"user {i}: stored {stored!r}, last acknowledged {acked[i]!r}")
        c.close()
        if problems:
            failures.append(f"server round {r}: {'; '.join(problems[:3])}")
        else:
            counts["ok"] += 1
    # The restart after the last kill, checked the same way.
    p, host, port = serve(BIN, db, env)
    for i, want in expected.items():
        c = http.client.HTTPConnection(host, port, timeout=30)
        c.request("GET", "/user/api-key?reveal=true", headers={"Authorization": f"Bearer {tokens[i]}"})
        resp = c.getresponse()
        got = json.loads(resp.read()).get("api_key")
        if got != want:
            failures.append(f"server, last restart: user {i} reveals {got!r}, expected {want!r}")
    p.terminate()
    p.wait()
    tally["server under write load"] = counts


def main():
    old_key = gen_key()
    new_key = gen_key()
    both = opener(old_key, new_key)
    legacy = os.path.join(work, "legacy.db")
    subprocess.run([SEED, legacy, str(KEYS)], env=env_with(old_key), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env_old = env_with(old_key)

    fault_rounds("migrate", legacy, lambda r: ["migrate"], env_old, both)
    dual = os.path.join(work, "dual.db")
    copy_db(legacy, dual)
    run(["--db", dual, "migrate"], env_old)
    fault_rounds("remove-legacy-column", dual,
                 lambda r: ["remove-legacy-column", "--yes", "--backup",
                            os.path.join(work, f"backup-round-{r}-{time.monotonic_ns()}.db")],
                 env_old, both)
    new_only = os.path.join(work, "new_only.db")
    copy_db(dual, new_only)
    run(["--db", new_only, "remove-legacy-column", "--yes", "--backup",
         os.path.join(work, "backup-start.db")], env_old)
    # revert writes a backup first; each run gets its own path.
    fault_rounds("revert", new_only,
                 lambda r: ["revert", "--yes", "--backup",
                            os.path.join(work, f"backup-round-{r}-{time.monotonic_ns()}.db")],
                 env_old, both)
    fault_rounds("rotate-encryption-key", dual, lambda r: ["rotate-encryption-key"],
                 env_with(new_key, old_key), both)
    server_rounds(old_key, both)

    print(f"fault suite over {KEYS} keys, {ROUNDS} kills each:")
    for name, c in tally.items():
        print(f"  {name}: " + ", ".join(f"{k} {v}" for k, v in c.items()))
    for f in failures:
        print(f"  FAILED: {f}")
    print(f"{sum(c['ok'] for c in tally.values())} passed, {len(failures)} failed")
    shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if failures else 0)


main()
