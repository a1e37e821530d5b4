#!/usr/bin/env python3
"""Turns the raw lines of benches/run.sh into a table (stdout, Markdown) and a JSON file."""
import json
import os
import platform
import sys
import time

raw_path, json_path = sys.argv[1], sys.argv[2]
raw = {}
for line in open(raw_path):
    key, _, value = line.strip().partition(" ")
    raw[key] = value


def rounds(label, conns):
    """The runs of `label` at `conns` connections, by round."""
    out = {}
    for key, value in raw.items():
        parts = key.split(":")
        if len(parts) == 4 and parts[0] == "wrk" and parts[1] == label and parts[2] == str(conns):
            out[int(parts[3])] = json.loads(value)
    return out


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return (xs[n // 2] + xs[(n - 1) // 2]) / 2 if xs else None


def baseline_rounds(conns):
    """Each round's baseline: the mean of its runs before and after the keyrack runs."""
    before, after = rounds("baseline_before", conns), rounds("baseline_after", conns)
    out = {}
    for r in before:
        runs = [x for x in (before.get(r), after.get(r)) if x]
        out[r] = {k: sum(x[k] for x in runs) / len(runs) for k in runs[0]}
    return out


def wrk(label, conns):
    """Medians over the rounds of req/s and latencies; for keyrack's measures also the median
    of each round's ratio to that round's baseline, and the ratios of every round."""
    runs = baseline_rounds(conns) if label == "baseline" else rounds(label, conns)
    if not runs:
        return None
    out = {k: median([r[k] for r in runs.values()]) for k in next(iter(runs.values()))}
    out["runs"] = [runs[r]["rps"] for r in sorted(runs)]
    for k in ("non2xx", "socket_errors"):
        # Every round's errors count.
        out[k] = sum(r.get(k, 0) for r in runs.values())
    if label != "baseline":
        base = baseline_rounds(conns)
        ratios = [runs[r]["rps"] / base[r]["rps"] for r in sorted(runs) if r in base and base[r]["rps"]]
        out["ratios"] = ratios
        out["ratio_to_baseline"] = median(ratios)
    return out


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# BENCH_ONLY=many_users runs only the baseline and the many-user reveals: the rest is absent.
everything = "sync_ceiling" in raw
sync_ceiling = float(raw.get("sync_ceiling", "nan"))
results = {
    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    "machine": f"{os.cpu_count()} cores, {cpu_model()}, Linux {platform.release()}",
    "start_to_ready_ms": {
        "fresh": float(raw.get("ready:fresh", "nan")) * 1000,
        "users_100k": float(raw.get("ready:100k", "nan")) * 1000,
        "harness_only": float(raw.get("ready:harness", "nan")) * 1000,
    },
    "sync_ceiling_commits_per_s": sync_ceiling,
    "throughput": {},
    "commands": {},
    "server_rss_mib": {
        "idle": int(raw["rss_idle_kib"]) / 1024,
        "peak_after_64_connections": int(raw["rss_peak_kib"]) / 1024,
        "peak_after_login_loads": int(raw.get("rss_peak_with_logins_kib", "0")) / 1024,
    },
}

# With the audit trail (events of reveals) and usage counters on.
targets = {"healthz": 0.9, "reveal": 0.75, "list10": 0.45, "post_dual": 0.12}
rows = []
for label in ["healthz", "reveal", "reveal_many_session", "reveal_many_service", "post_dual", "list10", "login"]:
    for c in [1, 16, 64]:
        r, b = wrk(label, c), wrk("baseline", c)
        if not r:
            continue
        entry = dict(r)
        if label == "post_dual":
            entry["ratio_to_sync_ceiling"] = r["rps"] / sync_ceiling
        results["throughput"][f"{label}@{c}"] = entry
        rows.append((label, c, entry))
for c in [1, 16, 64]:
    b = wrk("baseline", c)
    if b:
        results["throughput"][f"baseline@{c}"] = b

for label in ["migrate", "status", "remove_legacy_column"]:
    v = raw.get(f"cmd:{label}")
    if v:
        secs, kib = v.split()
        results["commands"][label] = {"seconds": float(secs), "peak_rss_mib": int(kib) / 1024}

# The service reveal against the user reveal over the same many users: each round's ratio to
# the baseline, service minus session; the target is a difference of at most 0.05.
many_gap = {}
for c in [1, 16, 64]:
    a, b = wrk("reveal_many_session", c), wrk("reveal_many_service", c)
    if a and b:
        gaps = [y - x for x, y in zip(a["ratios"], b["ratios"])]
        many_gap[c] = {"session": a["ratio_to_baseline"], "service": b["ratio_to_baseline"],
                       "difference": b["ratio_to_baseline"] - a["ratio_to_baseline"],
                       "round_differences": gaps}
results["service_reveal_vs_session_reveal"] = many_gap

json.dump(results, open(json_path, "w"), indent=2)

print(f"keyrack benchmark, {results['date']}, {results['machine']}\n")
print("Medians over the rounds; the ratio is the median of each round's ratio (every round's in brackets).\n")
print("| measure | connections | req/s | p50 ms | p99 ms | ratio to baseline | target | non-2xx |")
print("|---|---|---|---|---|---|---|---|")
for c in [1, 16, 64]:
    b = wrk("baseline", c)
    if b:
        spread = "/".join(f"{x:.0f}" for x in b["runs"])
        print(f"| baseline /healthz | {c} | {b['rps']:.0f} ({spread}) | {b['p50_us']/1000:.2f} | {b['p99_us']/1000:.2f} | 1.00 | | {b['non2xx']:.0f} |")
for label, c, e in rows:
    ratio = e["ratio_to_baseline"]
    target = targets.get(label)
    extra = ""
    if label == "post_dual":
        extra = f" ({e['ratio_to_sync_ceiling']:.2f} of sync ceiling, target 0.8)"
    if label.startswith("reveal_many"):
        tgt = "service within 0.05 of session"
    else:
        tgt = f"≥ {target}" if target else "(argon2, on its own)"
    each = "/".join(f"{x:.2f}" for x in e.get("ratios", []))
    shown = "—" if label == "login" else f"{ratio:.2f} ({each}){extra}"
    print(f"| {label} | {c} | {e['rps']:.0f} | {e['p50_us']/1000:.2f} | {e['p99_us']/1000:.2f} | {shown} | {tgt} | {e['non2xx']:.0f} |")
print()
for c, g in many_gap.items():
    each = "/".join(f"{x:+.2f}" for x in g["round_differences"])
    ok = "within" if abs(g["difference"]) <= 0.05 else "NOT within"
    print(f"- reveal over many users at {c} connections: service token {g['service']:.2f}, "
          f"own session {g['session']:.2f} of the baseline; difference {g['difference']:+.2f} "
          f"({each}), {ok} the target of 0.05")
if not everything:
    print(f"\nwritten to {json_path}")
    sys.exit(0)
s = results["start_to_ready_ms"]
print()
print(f"- start to ready line (median of 20): fresh {s['fresh']:.1f} ms (target < 20), "
      f"100,000 users {s['users_100k']:.1f} ms (target < 50); the measuring script alone {s['harness_only']:.1f} ms")
start_json = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "bench", "start.json")
if os.path.exists(start_json):
    st = json.load(open(start_json))
    r = st["start_to_ready"]
    base = r["baseline"]["median_ms"]
    print(f"- start to ready line against the bare server (median of {st['runs']}, same run): baseline "
          f"{base:.2f} ms, :memory: {r['memory']['median_ms']:.2f} ms ({r['memory']['median_ms'] / base:.2f}x), "
          f"fresh file {r['file']['median_ms']:.2f} ms ({r['file']['median_ms'] / base:.2f}x) (target < 2x)")
    m = st["fifty_at_once"]["keyrack_memory"]
    print(f"- fifty servers on :memory: at once: all ready in {m['all_ready_s']:.2f} s, "
          f"PSS {m['pss_mib_mean']:.2f} MiB each (target < 3), {m['threads_max']} threads")
print(f"- disk sync ceiling: {sync_ceiling:.0f} single-row commits/s (synchronous=FULL)")
for label, v in results["commands"].items():
    print(f"- {label}: {v['seconds']:.2f} s, peak RSS {v['peak_rss_mib']:.1f} MiB")
m = results["server_rss_mib"]
print(f"- server peak RSS: idle {m['idle']:.1f} MiB, after the 1/16/64-connection loads {m['peak_after_64_connections']:.1f} MiB (target < 32), "
      f"after the login loads too {m['peak_after_login_loads']:.1f} MiB")
print(f"\nwritten to {json_path}")
