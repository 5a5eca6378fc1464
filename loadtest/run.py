"""Headless Locust runs at one or more user counts, with CSV, HTML and a PNG chart.

    python -m loadtest.run --host http://127.0.0.1:3000 --users 1,4,16 --spawn-rate 8 \\
        --run-time 30s --out loadtest-results

For each user count, Locust runs headless for ``--run-time`` and stops by itself, writing
``<out>/u<N>_stats.csv`` (and the other Locust CSVs) and ``<out>/u<N>.html``. Then
``<out>/summary.csv`` and ``<out>/chart.png`` show throughput and p50/p95/p99 latency
against concurrency (all endpoints together, Locust's "Aggregated" row).
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def write_images(folder: Path, count: int) -> Path:
    """The image mix (loadtest/images.py) on disk, made once for all levels."""
    from loadtest.images import image_mix

    folder.mkdir(parents=True, exist_ok=True)
    for name, data, _ in image_mix(count):
        (folder / name).write_bytes(data)
    return folder


def run_level(host: str, users: int, spawn_rate: float, run_time: str, out: Path, endpoints: str | None
              ) -> dict[str, float]:
    prefix = out / f"u{users}"
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", host,
           "-u", str(users), "-r", str(spawn_rate), "-t", run_time, "--csv", str(prefix),
           "--html", f"{prefix}.html", "--only-summary", "--stop-timeout", "10", "--exit-code-on-error", "0"]
    env = {**os.environ, "PYTHONPATH": str(LOCUSTFILE.parent.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "CONVSERVE_LOAD_IMAGE_DIR": str(out / "images")}
    if endpoints:
        env["CONVSERVE_LOAD_ENDPOINTS"] = endpoints
    subprocess.run(cmd, check=True, env=env)
    with open(f"{prefix}_stats.csv", newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if r["Name"] == "Aggregated")
    if int(row["Request Count"]) == 0:
        raise SystemExit(f"no request completed at {users} users in {run_time}; is {host} up? see {prefix}.html")
    return {"users": users, "requests": int(row["Request Count"]), "failures": int(row["Failure Count"]),
            "req_s": float(row["Requests/s"]), "p50_ms": float(row["50%"]), "p95_ms": float(row["95%"]),
            "p99_ms": float(row["99%"])}


def chart(rows: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    users = [r["users"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(users, [r["req_s"] for r in rows], marker="o")
    a.set(xlabel="concurrent users", ylabel="requests / s", title="throughput")
    for key in ("p50_ms", "p95_ms", "p99_ms"):
        b.plot(users, [r[key] for r in rows], marker="o", label=key.split("_")[0])
    b.set(xlabel="concurrent users", ylabel="latency (ms)", title="latency")
    b.legend()
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="http://127.0.0.1:3000")
    p.add_argument("--users", default="1,4,16", help="comma-separated concurrency levels")
    p.add_argument("--spawn-rate", type=float, default=8)
    p.add_argument("--run-time", default="30s", help="per level, Locust syntax (30s, 2m)")
    p.add_argument("--endpoints", help="e.g. classify:1 or classify:3,detect:2,segment:1 (the default)")
    p.add_argument("--out", type=Path, default=Path("loadtest-results"))
    p.add_argument("--images", type=int, default=20, help="size of the image mix")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    write_images(a.out / "images", a.images)
    rows = [run_level(a.host, int(u), a.spawn_rate, a.run_time, a.out, a.endpoints) for u in a.users.split(",")]
    with open(a.out / "summary.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    chart(rows, a.out / "chart.png")
    print("| users | req/s | p50 ms | p95 ms | p99 ms | failures |\n|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['users']} | {r['req_s']:.1f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | "
              f"{r['failures']} |")
    print(f"wrote {a.out}/summary.csv, chart.png and per-level CSV/HTML")


if __name__ == "__main__":
    main()
