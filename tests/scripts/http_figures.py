#!/usr/bin/env python3
"""Figures for the HTTP layer under hostile clients (items 1, 2 and 4 of the hardening issue).

    python3 tests/scripts/http_figures.py target/debug/keyrack [h2|trickle|loris|all]

Starts the given binary on port 0 with a fresh database in a temporary directory, attacks it,
and prints what a healthy client sees. Nothing here is part of `cargo test`.
"""
import os, socket, subprocess, sys, tempfile, time

KEY = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="


def start(binary, workers=4, env_extra=None):
    d = tempfile.mkdtemp()
    env = {"PATH": os.environ["PATH"], "KEYRACK_ENCRYPTION_KEY": KEY, "RUST_LOG": "warn"}
    env.update(env_extra or {})
    p = subprocess.Popen([binary, "--db", os.path.join(d, "k.db"), "serve", "--listen",
                          "127.0.0.1:0", "--workers", str(workers)], env=env, cwd=d,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    line = p.stdout.readline().decode()
    port = int(line.strip().rsplit(":", 1)[1])
    return p, port


def proc(pid):
    f = {}
    for l in open(f"/proc/{pid}/status"):
        k, _, v = l.partition(":")
        f[k] = v.split()[0] if v.split() else ""
    return int(f["Threads"]), int(f["VmRSS"])


def healthz(port, timeout=15.0):
    t = time.monotonic()
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        s.settimeout(timeout)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = s.recv(100)
        s.close()
        ok = data.startswith(b"HTTP/1.1 200")
    except OSError:
        ok = False
    return ok, time.monotonic() - t


def h2(binary):
    p, port = start(binary)
    t0, _ = proc(p.pid)
    answered = 0
    for i in range(1030):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.settimeout(0.2 if answered == 0 and i > 0 else 2)
        s.sendall(b"GET / HTTP/2.0\r\n\r\n")
        try:
            if s.recv(100).startswith(b"HTTP/1.1 505"):
                answered += 1
        except OSError:
            pass
        s.close()
    time.sleep(3)
    t1, _ = proc(p.pid)
    ok, dt = healthz(port, timeout=5)
    print(f"h2: 1030 HTTP/2.0 requests, {answered} answered 505; threads {t0} before, {t1} 3 s after;"
          f" a new client served: {ok} ({dt*1000:.0f} ms)")
    p.kill()


def trickle(binary):
    p, port = start(binary, workers=4)
    heads = [
        b"POST /auth/login HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 50\r\n\r\n{",
        b"POST /auth/login HTTP/1.1\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n20\r\n{",
        b"POST /auth/login HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: x\r\nContent-Length: 50\r\n\r\n{",
        b"POST /auth/login HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: x\r\nContent-Length: 50\r\n\r\n{",
    ]
    socks = []
    for h in heads:
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(h)
        socks.append(s)
    worst = 0.0
    fails = 0
    end = time.monotonic() + 12
    n = 0
    while time.monotonic() < end:
        for s in socks:
            try:
                s.send(b" ")
            except OSError:
                pass
        ok, dt = healthz(port)
        n += 1
        worst = max(worst, dt)
        fails += not ok
        time.sleep(1)
    print(f"trickle: 4 tricklers (Expect x2, Upgrade x2) on 4 workers: {n} /healthz tries, worst"
          f" {worst*1000:.0f} ms, {fails} failed")
    p.kill()


def loris(binary, n=1000):
    p, port = start(binary, workers=4)
    socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(f"GET /healthz HTTP/1.1\r\nX-Slow-{i}: ".encode())
        socks.append(s)
    time.sleep(0.5)
    threads, rss = proc(p.pid)
    times = []
    fails = 0
    for _ in range(20):
        for s in socks:
            try:
                s.send(b"a")
            except OSError:
                pass
        ok, dt = healthz(port)
        fails += not ok
        times.append(dt)
        time.sleep(0.2)  # all 20 tries well within the 10 s head deadline
    threads2, rss2 = proc(p.pid)
    times.sort()
    print(f"loris: {n} slow connections: worst of 20 /healthz {times[-1]*1000:.0f} ms, median"
          f" {times[10]*1000:.1f} ms, {fails} failed; threads {threads}/{threads2}, resident"
          f" {rss/1024:.1f}/{rss2/1024:.1f} MiB (start/end)")
    p.kill()


if __name__ == "__main__":
    binary = sys.argv[1]
    what = sys.argv[2] if len(sys.argv) > 2 else "all"
    for name, f in [("h2", h2), ("trickle", trickle), ("loris", loris)]:
        if what in (name, "all"):
            f(binary)
