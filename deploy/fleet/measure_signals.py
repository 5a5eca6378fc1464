"""Measure the autoscaling signal candidates on a running fleet (deploy/fleet/docker-compose.yml).

For each concurrency level, wrk drives /classify through HAProxy (640x480 JPEGs, closed loop)
for --seconds, then the script asks Prometheus, per replica, over that level's window:

- in flight: avg_over_time(convserve_requests_in_flight[w]): requests held (read, decoded,
  queued, run), the candidate "requests held per pod";
- queue wait: rate(convserve_queue_wait_seconds_sum[w]) / rate(..._count[w]): average wait
  of an image for its batch, the candidate "queue time per request" (Triton's HPA signal);
- CPU: each replica container's CPU seconds (its cgroup) over the level, in % of one core;

and after each level it rests --rest seconds and asks again (does the signal fall back?).
Load goes only to the fleet's HAProxy on 127.0.0.1.

    python3 deploy/fleet/measure_signals.py --project fleet --url http://127.0.0.1:3000 \
        --prometheus http://127.0.0.1:9090 [--levels 1,4,16,32] [--seconds 30] [--rest 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

REPLICAS = ("convserve-1", "convserve-2", "convserve-3")


def prom(base: str, expr: str, at: float) -> dict[str, float]:
    """An instant query at time ``at``: {instance: value}."""
    q = urllib.parse.urlencode({"query": expr, "time": f"{at:.3f}"})
    with urllib.request.urlopen(f"{base}/api/v1/query?{q}", timeout=10) as r:
        body = json.load(r)
    return {s["metric"].get("instance", "all"): float(s["value"][1]) for s in body["data"]["result"]}


def container_id(project: str, service: str) -> str:
    out = subprocess.run(["docker", "inspect", "-f", "{{.Id}}", f"{project}_{service}_1"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def cpu_seconds(cid: str) -> float | None:
    """A container's CPU time from its cgroup (v1 cgroupfs, v2 cgroupfs or systemd)."""
    for path, scale in ((f"/sys/fs/cgroup/cpuacct/docker/{cid}/cpuacct.usage", 1e-9),
                        (f"/sys/fs/cgroup/cpu,cpuacct/docker/{cid}/cpuacct.usage", 1e-9),
                        (f"/sys/fs/cgroup/docker/{cid}/cpu.stat", 1e-6),
                        (f"/sys/fs/cgroup/system.slice/docker-{cid}.scope/cpu.stat", 1e-6)):
        p = Path(path)
        if p.is_file():
            text = p.read_text()
            if path.endswith("cpu.stat"):
                usage = next(line.split()[1] for line in text.splitlines() if line.startswith("usage_usec"))
                return int(usage) * scale
            return int(text.strip()) * scale
    return None


def images(count: int = 8) -> list[bytes]:
    import numpy as np

    from training.synthetic import render_scene

    rng = np.random.default_rng(21)
    out = []
    for _ in range(count):
        img = render_scene(rng, 640, 480, int(rng.integers(1, 5)), 40, 110).image
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def signals(base: str, window: int, at: float) -> dict[str, dict[str, float]]:
    w = f"[{window}s]"
    return {
        "in_flight": prom(base, f'avg_over_time(convserve_requests_in_flight{{job="convserve"}}{w})', at),
        "queue_wait_ms": {k: v * 1e3 for k, v in prom(
            base, f'sum by (instance) (rate(convserve_queue_wait_seconds_sum{{job="convserve"}}{w})) / '
                  f'sum by (instance) (rate(convserve_queue_wait_seconds_count{{job="convserve"}}{w}))', at).items()},
        "req_s": prom(base, f'sum by (instance) (rate(convserve_request_seconds_count{{job="convserve"}}{w}))', at),
        # cross-check: BentoML's own gauge (every request in the ASGI app, also those waiting for admission)
        "bentoml_in_progress": prom(base, f'sum by (instance) (avg_over_time('
                                          f'bentoml_service_request_in_progress{{job="convserve"}}{w}))', at),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--project", required=True, help="the compose project name (docker-compose -p)")
    ap.add_argument("--url", default="http://127.0.0.1:3000", help="HAProxy")
    ap.add_argument("--prometheus", default="http://127.0.0.1:9090")
    ap.add_argument("--levels", default="1,4,16,32")
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--rest", type=float, default=20)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from loadtest import wrk

    wrk.raise_fd_limit()
    bodies = wrk.write_bodies(images(), {"top_k": "1"})
    ids = {s: container_id(args.project, s) for s in REPLICAS}
    rows = []
    for clients in [int(c) for c in args.levels.split(",")]:
        cpu0, t0 = {s: cpu_seconds(c) for s, c in ids.items()}, time.time()
        res = wrk.run(args.url + "/classify", bodies, clients, args.seconds)
        t1 = time.time()
        cpu1 = {s: cpu_seconds(c) for s, c in ids.items()}
        time.sleep(2)  # the last scrape of the level
        window = max(5, int(t1 - t0) - 4)
        load = signals(args.prometheus, window, t1)
        time.sleep(args.rest)
        rest_window = max(5, int(args.rest) - 4)
        rest = signals(args.prometheus, rest_window, time.time())
        cpu = {s: (None if cpu0[s] is None or cpu1[s] is None else 100 * (cpu1[s] - cpu0[s]) / (t1 - t0))
               for s in REPLICAS}
        row = {"clients": clients, "req_s": round(res["req_s"], 1), "p50_ms": res["p50_ms"], "p99_ms": res["p99_ms"],
               "non_2xx": res["non_2xx"], "socket_errors": res["socket_errors"], "cpu_pct": cpu,
               "load": load, "rest": rest}
        rows.append(row)
        print(json.dumps(row), flush=True)

    def fmt(d: dict[str, float], s: str, spec: str = ".2f") -> str:
        v = d.get(s)
        return "-" if v is None or v != v else format(v, spec)

    print("\n| clients | req/s | p50 ms | p99 ms | in flight per replica (load / rest) | queue wait ms per replica "
          "(load / rest) | CPU % of a core per replica |")
    print("|---:|---:|---:|---:|---|---|---|")
    for r in rows:
        inflight = " ".join(f"{fmt(r['load']['in_flight'], s)}/{fmt(r['rest']['in_flight'], s)}" for s in REPLICAS)
        qwait = " ".join(f"{fmt(r['load']['queue_wait_ms'], s)}/{fmt(r['rest']['queue_wait_ms'], s)}"
                         for s in REPLICAS)
        cpu = " ".join(fmt(r["cpu_pct"], s, ".0f") for s in REPLICAS)
        head = f"| {r['clients']} | {r['req_s']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f}"
        print(f"{head} | {inflight} | {qwait} | {cpu} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
