"""Key writes under a flood of failed logins: the figure of docs/security.md ("Password hashing").

    python3 tests/scripts/login_flood.py [BINARY] [--flooders N] [--writes N] [--env NAME=VALUE]...

Starts BINARY (default target/release/keyrack) on a new database, registers one user, then
times that user's `POST /user/api-key` one at a time, first with nothing else running (idle),
then while N connections (default 32, over 4 processes) send failed logins as fast as they are
answered, each with a fresh random email, so the per-email throttle never counts one twice. Prints the median
and the largest time of the key writes in each case, and what the flooders were answered.
`--env KEYRACK_LOGIN_FAILURES_PER_ADDRESS=0` measures the hashing pool alone: otherwise the
flood, all from 127.0.0.1, is soon answered 429 by the throttle per address.
Standard library only.
"""
import argparse
import http.client
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from keyrack_http import request, serve  # noqa: E402

PASSWORD = "correct horse battery"


def time_writes(host, port, token, n):
    conn = http.client.HTTPConnection(host, port, timeout=60)
    took = []
    for i in range(n):
        start = time.perf_counter()
        status, body = request(conn, "POST", "/user/api-key",
                               {"api_key": f"sk-flood-{i:08d}-abcdefgh"}, token)
        took.append(time.perf_counter() - start)
        assert status == 200, (status, body)
    return took


def flood_process(host, port, threads, stop, results):
    """`threads` flooding connections in a process of their own: the timed writes then never
    wait for this interpreter's lock while the flood's answers come quickly (429s)."""
    answers, lock = {}, threading.Lock()
    ts = [threading.Thread(target=flood, args=(host, port, stop, answers, lock))
          for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    results.put(answers)


def flood(host, port, stop, answers, lock):
    conn = http.client.HTTPConnection(host, port, timeout=60)
    seen = {}
    while not stop.is_set():
        email = f"{uuid.uuid4().hex}@flood.example"
        try:
            status, _ = request(conn, "POST", "/auth/login",
                                {"email": email, "password": "wrong password 123"})
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=60)
            status = "error"
        seen[status] = seen.get(status, 0) + 1
    with lock:
        for k, v in seen.items():
            answers[k] = answers.get(k, 0) + v


FLOOD_PROCESSES = 4


def split(n, parts):
    """`n` connections over `parts` processes, as evenly as may be (none empty)."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts) if i < n]


def summary(name, took):
    ms = [t * 1000 for t in took]
    return f"{name}: median {statistics.median(ms):.1f} ms, max {max(ms):.1f} ms over {len(ms)} writes"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary", nargs="?", default="target/release/keyrack")
    ap.add_argument("--flooders", type=int, default=32)
    ap.add_argument("--writes", type=int, default=100)
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE for the server")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        env = {"PATH": os.environ.get("PATH", ""), "RUST_LOG": "warn"}
        env.update(kv.split("=", 1) for kv in args.env)
        p, host, port = serve(args.binary, os.path.join(d, "k.db"), env)
        try:
            conn = http.client.HTTPConnection(host, port, timeout=60)
            status, body = request(conn, "POST", "/auth/register",
                                   {"email": "writer@example.com", "password": PASSWORD})
            assert status == 201, (status, body)
            status, body = request(conn, "POST", "/auth/login",
                                   {"email": "writer@example.com", "password": PASSWORD})
            assert status == 200, (status, body)
            import json
            token = json.loads(body)["token"]
            time_writes(host, port, token, 10)  # warm up
            idle = time_writes(host, port, token, args.writes)
            print(summary("idle", idle))

            stop, results = multiprocessing.Event(), multiprocessing.Queue()
            procs = [multiprocessing.Process(target=flood_process,
                                             args=(host, port, n, stop, results))
                     for n in split(args.flooders, FLOOD_PROCESSES)]
            for p_ in procs:
                p_.start()
            time.sleep(2)  # the flood reaches its pace
            flooded = time_writes(host, port, token, args.writes)
            stop.set()
            answers = {}
            for _ in procs:
                for k, v in results.get().items():
                    answers[k] = answers.get(k, 0) + v
            for p_ in procs:
                p_.join()
            print(summary(f"{args.flooders} flooding connections", flooded))
            print(f"ratio of medians: {statistics.median(flooded) / statistics.median(idle):.1f}")
            print(f"the flood's answers: {dict(sorted(answers.items(), key=str))}")
        finally:
            p.terminate()
            p.wait()


if __name__ == "__main__":
    main()
