"""The Litestream drill (tests/scripts/replicate-drill.sh runs it).

keyrack serves under `litestream replicate -exec` while writers add keys, with a file replica
(DRILL_REPLICA=file, the default) or an S3 one (DRILL_REPLICA=s3: the shell script starts an
S3-compatible server, moto, on 127.0.0.1 and gives its address in DRILL_S3_ENDPOINT and the
bucket in DRILL_S3_BUCKET). The S3 configuration is deploy/litestream.yml itself with only the
database's path, the bucket, the endpoint and the intervals replaced, so the drill also proves the
example users deploy; the restore reads the same configuration, as on a new machine.

The whole process group (Litestream and keyrack) is killed with SIGKILL, as when the machine
dies. The replica is restored into a new directory and served with the same key (a key file that
travels on its own: it is not in the replica). Then:

- every write acknowledged longer ago than the sync interval plus the monitor interval plus a
  slack (DRILL_SLACK) before the kill is in the copy (the drill fails otherwise). The slack is the
  time a sync itself may run late on a busy machine: Litestream's timers and its copy of the WAL
  compete for the CPU with the load (2 cores saturated by the writers and keyrack, and whatever
  else the machine runs); the drill reports the lost writes older than the sync interval, and
  than sync plus monitor interval, so the figures show where the window really ended;
- the copy passes `PRAGMA integrity_check`;
- `keyrack status --json` on the copy shows zero undecryptable values;
- the copy without the key refuses to start (exit 2).

It prints the replication lag at the crash (how long before the kill the newest write found in
the copy was acknowledged), the writes lost in the host-crash window and the restore time.
"""

import http.client
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

KEYRACK, LITESTREAM = sys.argv[1], sys.argv[2]
SECONDS = float(sys.argv[3])
SYNC_INTERVAL = sys.argv[4]
WRITERS = int(sys.argv[5])
MONITOR_INTERVAL = sys.argv[6]
SLACK_INTERVAL = sys.argv[7]
REPLICA = os.environ.get("DRILL_REPLICA", "file")
if REPLICA not in ("file", "s3"):
    raise SystemExit(f"DRILL_REPLICA={REPLICA!r}: file or s3")


def seconds_of(interval):
    units = {"ms": 0.001, "s": 1.0, "m": 60.0}
    for u in ("ms", "s", "m"):
        if interval.endswith(u):
            return float(interval[: -len(u)]) * units[u]
    raise SystemExit(f"interval {interval!r}: give e.g. 1s or 500ms")


SYNC = seconds_of(SYNC_INTERVAL)
# A write reaches the replica at Litestream's next WAL read (monitor interval) and then at its
# next replica sync (sync interval): together, the host-crash window of an idle machine. On a
# busy one the sync runs late by as much as the scheduler makes it (lag up to 1.64 s seen with a
# 1 s sync interval on 2 saturated cores), hence the slack in the drill's bound.
WINDOW = SYNC + seconds_of(MONITOR_INTERVAL)
BOUND = WINDOW + seconds_of(SLACK_INTERVAL)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port, method, path, token=None, body=None, conn=None):
    own = conn is None
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    c.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
    r = c.getresponse()
    data = r.read()
    if own:
        c.close()
    return r.status, (json.loads(data) if data else None)


def wait_healthy(port, proc, limit=60):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode} before answering")
        try:
            if request(port, "GET", "/healthz")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit("the server did not answer /healthz in time")


def s3_config(db):
    """deploy/litestream.yml with the drill's database, bucket, endpoint and intervals."""
    import yaml  # the S3 drill runs in moto's virtual environment, which has PyYAML

    with open(os.path.join(os.path.dirname(__file__), "..", "..", "deploy", "litestream.yml")) as f:
        config = yaml.safe_load(f)
    (entry,) = config["dbs"]
    replica = entry["replica"]
    if replica.get("type") != "s3":
        raise SystemExit("deploy/litestream.yml: the drill expects its replica to be of type s3")
    entry["path"] = db
    entry["monitor-interval"] = MONITOR_INTERVAL
    replica["bucket"] = os.environ["DRILL_S3_BUCKET"]
    replica["endpoint"] = os.environ["DRILL_S3_ENDPOINT"]
    replica["sync-interval"] = SYNC_INTERVAL
    return yaml.safe_dump(config, sort_keys=False)


def s3_client():
    """A boto3 client of the drill's S3 server (moto's environment has boto3)."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=os.environ["DRILL_S3_ENDPOINT"],
                        region_name="us-east-1", config=Config(s3={"addressing_style": "path"}),
                        aws_access_key_id=os.environ["LITESTREAM_ACCESS_KEY_ID"],
                        aws_secret_access_key=os.environ["LITESTREAM_SECRET_ACCESS_KEY"])


def save_bucket(into):
    """Copies the drill's bucket (the S3 replica) into a directory."""
    s3 = s3_client()
    bucket = os.environ["DRILL_S3_BUCKET"]
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            path = os.path.join(into, obj["Key"])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            s3.download_file(bucket, obj["Key"], path)


WORK = None  # the drill's directory, kept when it fails


def main():
    global WORK
    work = WORK = tempfile.mkdtemp(prefix="keyrack-drill-")
    primary = os.path.join(work, "primary")
    replica = os.path.join(work, "replica")
    restored_dir = os.path.join(work, "restored")
    os.makedirs(primary)
    db = os.path.join(primary, "keyrack.db")
    key_file = os.path.join(work, "encryption.key")  # outside the database's directory
    with open(key_file, "w") as f:
        f.write(subprocess.check_output([KEYRACK, "gen-key"], text=True))
    os.chmod(key_file, 0o600)
    env = dict(os.environ, KEYRACK_ENCRYPTION_KEY_FILE=key_file,
               KEYRACK_MAX_KEYS_PER_USER="1000000", RUST_LOG="warn")
    env.pop("KEYRACK_ENCRYPTION_KEY", None)
    env.pop("AWS_CA_BUNDLE", None)

    config = os.path.join(work, "litestream.yml")
    with open(config, "w") as f:
        if REPLICA == "s3":
            f.write(s3_config(db))
        else:
            f.write(
                f"dbs:\n  - path: {db}\n    monitor-interval: {MONITOR_INTERVAL}\n"
                f"    replica:\n      type: file\n      path: {replica}\n"
                f"      sync-interval: {SYNC_INTERVAL}\n"
            )
    # The database exists before Litestream watches it.
    fixtures = os.path.join(work, "none.json")
    with open(fixtures, "w") as f:
        f.write('{"users": []}')
    subprocess.run([KEYRACK, "--db", db, "load-fixtures", fixtures], env=env, check=True,
                   stdout=subprocess.DEVNULL)

    port = free_port()
    log = open(os.path.join(work, "primary.log"), "w")
    proc = subprocess.Popen(
        [LITESTREAM, "replicate", "-config", config, "-exec",
         f"{KEYRACK} serve --db {db} --listen 127.0.0.1:{port}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_healthy(port, proc)

    # One account per writer, made and logged in before the load.
    tokens = []
    for i in range(WRITERS):
        email = f"writer{i}@example.com"
        st, _ = request(port, "POST", "/auth/register", body={"email": email, "password": "drill-password-1"})
        assert st in (200, 201), st
        st, b = request(port, "POST", "/auth/login", body={"email": email, "password": "drill-password-1"})
        assert st == 200, st
        tokens.append(b["token"])
    time.sleep(SYNC * 3)  # the accounts are replicated before the load begins

    acked = []  # (writer, name, monotonic time of the 2xx)
    lock = threading.Lock()
    stop = threading.Event()

    def writer(i):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        n = 0
        while not stop.is_set():
            name = f"w{i}-{n}"
            try:
                st, _ = request(port, "POST", "/user/api-keys", tokens[i],
                                {"provider": "openai", "name": name,
                                 "api_key": f"sk-drill-{i}-{n}-0123456789"}, conn)
            except OSError:
                return
            if st == 201:
                t = time.monotonic()
                with lock:
                    acked.append((i, name, t))
            n += 1

    threads = [threading.Thread(target=writer, args=(i,), daemon=True) for i in range(WRITERS)]
    started = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(SECONDS)
    # The machine dies: Litestream and keyrack at once, no chance to flush anything.
    os.killpg(proc.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    stop.set()
    proc.wait()
    for t in threads:
        t.join(timeout=30)
    load_seconds = killed_at - started

    # Restore into a new directory, from the replica alone.
    os.makedirs(restored_dir)
    copy = os.path.join(restored_dir, "keyrack.db")
    t0 = time.monotonic()
    if REPLICA == "s3":
        # As on a new machine: the same configuration, the database's path names the replica.
        source = ["-config", config, db]
    else:
        source = [f"file://{replica}"]
    subprocess.run([LITESTREAM, "restore", "-o", copy, *source], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    restore_seconds = time.monotonic() - t0

    integrity = sqlite3.connect(copy).execute("PRAGMA integrity_check").fetchone()[0]

    # Without the key (it is not in the replica): refused, exit 2.
    no_key = {k: v for k, v in env.items() if not k.startswith("KEYRACK_ENCRYPTION_KEY")}
    refused = subprocess.run([KEYRACK, "--db", copy, "status"], env=no_key,
                             capture_output=True, text=True)

    status = json.loads(subprocess.check_output([KEYRACK, "--db", copy, "status", "--json"], env=env))

    # Serve the copy with the same key and ask it for every writer's keys.
    port2 = free_port()
    proc2 = subprocess.Popen([KEYRACK, "serve", "--db", copy, "--listen", f"127.0.0.1:{port2}"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(port2, proc2)
        present = set()
        for i, tok in enumerate(tokens):
            st, b = request(port2, "GET", "/user/api-keys", tok)
            assert st == 200, (st, b)
            present.update((i, k["name"]) for k in b["keys"])
    finally:
        proc2.send_signal(signal.SIGTERM)
        proc2.wait(timeout=30)

    lost = [(i, n, t) for (i, n, t) in acked if (i, n) not in present]
    old_lost = [x for x in lost if killed_at - x[2] > SYNC]
    past_window = [x for x in lost if killed_at - x[2] > WINDOW]
    past_bound = [x for x in lost if killed_at - x[2] > BOUND]
    in_window = [x for x in acked if killed_at - x[2] <= SYNC]
    lost_in_window = [x for x in lost if killed_at - x[2] <= SYNC]
    kept_times = [t for (i, n, t) in acked if (i, n) in present]
    lag = killed_at - max(kept_times) if kept_times else float("nan")

    print(f"litestream {subprocess.check_output([LITESTREAM, 'version'], text=True).strip()}, "
          f"{REPLICA} replica, sync-interval {SYNC_INTERVAL}, monitor-interval {MONITOR_INTERVAL}, "
          f"{WRITERS} writers, bound {BOUND * 1000:.0f} ms (slack {SLACK_INTERVAL})")
    print(f"writes acknowledged: {len(acked)} in {load_seconds:.1f} s "
          f"({len(acked) / load_seconds:.0f}/s)")
    print(f"in the restored copy: {len(acked) - len(lost)}; lost: {len(lost)}")
    print(f"replication lag at the crash (newest restored write acknowledged before the kill): "
          f"{lag * 1000:.0f} ms")
    print(f"lost writes acknowledged within the sync interval ({SYNC_INTERVAL}) of the kill: "
          f"{len(lost_in_window)} of {len(in_window)}")
    print(f"lost writes acknowledged longer ago than the sync interval: {len(old_lost)}; "
          f"than sync plus monitor interval ({WINDOW * 1000:.0f} ms): {len(past_window)}; "
          f"than the bound ({BOUND * 1000:.0f} ms): {len(past_bound)}")
    if lost:
        print(f"oldest lost write: acknowledged {(killed_at - min(t for _, _, t in lost)) * 1000:.0f} ms "
              f"before the kill")
    print(f"restore time: {restore_seconds * 1000:.0f} ms "
          f"({os.path.getsize(copy) / 1e6:.1f} MB database)")
    print(f"integrity_check: {integrity}; undecryptable: {status['undecryptable']}; "
          f"without the key: exit {refused.returncode}")

    ok = (not past_bound and integrity == "ok" and status["undecryptable"] == 0
          and refused.returncode == 2 and len(acked) > 0)
    if not ok:
        sys.exit(1)
    shutil.rmtree(work)
    print("drill passed")


if __name__ == "__main__":
    try:
        main()
    except BaseException as e:
        if isinstance(e, SystemExit) and e.code in (0, None):
            raise
        if WORK:
            if REPLICA == "s3":
                # moto keeps the bucket in memory only: a copy for the post-mortem.
                save_bucket(os.path.join(WORK, "replica"))
            print(f"DRILL FAILED (files kept in {WORK})", file=sys.stderr)
        raise
