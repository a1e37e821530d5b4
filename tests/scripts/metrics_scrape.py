"""The time of one `GET /metrics` scrape: the figure of docs/security.md ("The metrics' lag").

    KEYRACK_ENCRYPTION_KEY=… python3 tests/scripts/metrics_scrape.py BINARY DB [--scrapes N]

Starts BINARY on DB (a copy is not made: scrapes only read), scrapes once (the first may wait
for the background survey), then times N scrapes (default 50) one after another and prints the
median and the largest. Seed a large database first, for instance:

    target/release/examples/seed_legacy bench.db 100000 && keyrack --db bench.db migrate

Standard library only.
"""
import argparse
import http.client
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from keyrack_http import serve  # noqa: E402

ADMIN = "scrape-admin-token"


def scrape(conn):
    conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {ADMIN}"})
    resp = conn.getresponse()
    body = resp.read()
    assert resp.status == 200, (resp.status, body)
    return body.decode()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("db")
    ap.add_argument("--scrapes", type=int, default=50)
    args = ap.parse_args()
    env = {"PATH": os.environ.get("PATH", ""), "RUST_LOG": "warn",
           "KEYRACK_ENCRYPTION_KEY": os.environ["KEYRACK_ENCRYPTION_KEY"],
           "KEYRACK_ADMIN_TOKEN": ADMIN}
    p, host, port = serve(args.binary, args.db, env)
    try:
        conn = http.client.HTTPConnection(host, port, timeout=120)
        text = scrape(conn)
        took = []
        for _ in range(args.scrapes):
            start = time.perf_counter()
            text = scrape(conn)
            took.append((time.perf_counter() - start) * 1000)
        for line in text.splitlines():
            if line.startswith(("keyrack_keys", "keyrack_undecryptable", "keyrack_users")):
                print(line)
        print(f"scrape: median {statistics.median(took):.1f} ms, max {max(took):.1f} ms "
              f"over {len(took)} scrapes")
    finally:
        p.terminate()
        p.wait()


if __name__ == "__main__":
    main()
