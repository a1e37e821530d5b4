#!/usr/bin/env python3
"""keyrack's start-up against a bare tiny_http server (benches/baseline.rs), in one run.

1. Start to ready line (fork and exec to the first line on stdout), RUNS starts of each, taken in
   turn (benches/start_to_ready.rs): the baseline, keyrack on `:memory:`, keyrack on a fresh
   database file (a new file each start, on the ordinary disk under target/bench/start/). Default
   settings, KEYRACK_ENCRYPTION_KEY set (a file database without it also writes its key file).
2. Fifty servers started at once, each on `:memory:`: the time until every one has printed its
   ready line, then each one's proportional set size (PSS, /proc/PID/smaps_rollup) and threads;
   the same for fifty baselines.

    python3 benches/start.py BIN BASELINE START_TO_READY [RUNS]

Prints a summary and writes target/bench/start.json. `make bench-start` runs it alone, and
`make bench` runs it among the rest.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

FIFTY = 50


def start_to_ready(tool, runs, bin_, baseline, work):
    out = subprocess.run(
        [tool, str(runs),
         f"baseline={baseline}", "127.0.0.1:0", "4", "--",
         f"memory={bin_}", "--db", ":memory:", "serve", "--listen", "127.0.0.1:0", "--",
         f"file={bin_}", "--db", os.path.join(work, "fresh-{n}.db"), "serve", "--listen",
         "127.0.0.1:0"],
        check=True, capture_output=True, text=True).stdout
    result = {}
    for line in out.splitlines():
        name, median, low, high = line.split()
        result[name] = {"median_ms": float(median), "min_ms": float(low), "max_ms": float(high)}
    return result


def kib(pid, field):
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def fifty(cmd):
    """Starts FIFTY copies of cmd at once; seconds until all are ready, PSS and threads each."""
    start = time.monotonic()
    procs = [subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for _ in range(FIFTY)]
    try:
        for p in procs:
            line = p.stdout.readline()
            if "listening on" not in line:
                raise SystemExit(f"{cmd[0]}: no ready line ({line!r})")
        ready = time.monotonic() - start
        pss = [kib(p.pid, "Pss") for p in procs]
        threads = [len(os.listdir(f"/proc/{p.pid}/task")) for p in procs]
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait()
    return {
        "all_ready_s": round(ready, 3),
        "pss_mib_mean": round(sum(pss) / len(pss) / 1024, 2),
        "pss_mib_max": round(max(pss) / 1024, 2),
        "threads_max": max(threads),
    }


def main():
    bin_, baseline, tool = sys.argv[1:4]
    runs = int(sys.argv[4]) if len(sys.argv) > 4 else 30
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    out_dir = os.path.join(root, "target", "bench")
    work = os.path.join(out_dir, "start")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    os.environ.setdefault("KEYRACK_ENCRYPTION_KEY",
                          subprocess.run([bin_, "gen-key"], check=True, capture_output=True,
                                         text=True).stdout.strip())
    os.environ.pop("RUST_LOG", None)
    s = start_to_ready(tool, runs, bin_, baseline, work)
    shutil.rmtree(work, ignore_errors=True)
    base = s["baseline"]["median_ms"]
    many = {
        "keyrack_memory": fifty([bin_, "--db", ":memory:", "serve", "--listen", "127.0.0.1:0"]),
        "baseline": fifty([baseline, "127.0.0.1:0", "4"]),
    }
    results = {"start_to_ready": s, "fifty_at_once": many, "runs": runs}
    with open(os.path.join(out_dir, "start.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"start to ready line, median of {runs} (min-max), same run:")
    for name in ("baseline", "memory", "file"):
        r = s[name]
        print(f"  {name:8} {r['median_ms']:6.2f} ms ({r['min_ms']:.2f}-{r['max_ms']:.2f})"
              f"  {r['median_ms'] / base:4.2f}x the baseline")
    for name, m in many.items():
        print(f"fifty {name} at once: all ready in {m['all_ready_s']:.2f} s, PSS "
              f"{m['pss_mib_mean']:.2f} MiB each (max {m['pss_mib_max']:.2f}), "
              f"threads at most {m['threads_max']}")


if __name__ == "__main__":
    main()
