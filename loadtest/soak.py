"""A soak: the service under a steady mixed load for a long time, memory watched throughout.

Usage (see README "Soak and overload")::

    python -m loadtest.soak --minutes 10 --out soak-results
    python -m loadtest.soak --url http://127.0.0.1:3000 --server-pid PID --minutes 60 --out soak-results

Two wrk processes (loadtest/wrk.py) load the service, each one thread:

- the **mixed load**: ``--connections`` keep-alive connections cycling through /classify,
  /detect and /segment (the three shipped models) with the realistic image mix of
  loadtest/images.py (thumbnails to 12 MP photos, JPEG and PNG), multipart and raw bodies;
- the **bad inputs**: one connection, paced, sending what clients get wrong: a text file,
  a truncated JPEG, an unknown model, an option out of range, a decompression bomb, a
  missing image. Every one of them must be a 4xx.

Every ``--interval`` seconds it records a row: throughput, latency percentiles, answers by
status class for each load, and the summed RSS of the server's process tree (the
supervisor and its workers), to ``<out>/soak.csv``, and draws ``<out>/soak.png``. The
summary (also ``<out>/summary.json``) compares the RSS at the end with the RSS after the
warm-up (``--warmup-minutes``) and says whether anything but the bad inputs' 4xx went wrong.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import threading
import time
from pathlib import Path
from typing import Any

from PIL import Image

from loadtest import wrk
from loadtest.images import decompression_bomb_png, image_mix
from loadtest.processes import TreeMemory, add_service_arguments, service_at, tree_rss

MB = 1024 * 1024
ENDPOINTS = ("classify", "detect", "segment")


def good_requests(count: int = 20, seed: int = 0) -> list[tuple[str, str, bytes]]:
    """The mixed load: every image of the mix to every endpoint, as multipart or as a raw body."""
    out = []
    for i, (_name, data, ctype) in enumerate(image_mix(count, seed)):
        endpoint = ENDPOINTS[i % len(ENDPOINTS)]
        if i % 2:
            out.append((f"/{endpoint}", ctype, data))
        else:
            boundary = f"soak{i}"
            body = wrk.multipart(data, {}, boundary)
            out.append((f"/{endpoint}", f"multipart/form-data; boundary={boundary}", body))
    return out


def bad_requests() -> list[tuple[str, str, bytes]]:
    """What clients get wrong; each must be answered with a 4xx."""
    jpeg = io.BytesIO()
    Image.new("RGB", (320, 240), (200, 30, 30)).save(jpeg, format="JPEG")
    data = jpeg.getvalue()
    return [
        ("/classify", "image/jpeg", b"this is a text file, not an image"),
        ("/detect", "image/jpeg", data[: len(data) // 2]),
        ("/classify?model=no-such-model", "image/jpeg", data),
        ("/detect?score_threshold=7", "image/jpeg", data),
        ("/segment", "image/png", decompression_bomb_png(60000, 60000)),  # 3.6 gigapixels in 100 bytes
        ("/classify", "multipart/form-data; boundary=x",
         b"--x\r\nContent-Disposition: form-data; name=\"top_k\"\r\n\r\n3\r\n--x--\r\n"),
    ]


def _classes(status: dict[int, int]) -> dict[str, int]:
    out = {"2xx": 0, "4xx": 0, "5xx": 0}
    for code, n in status.items():
        out[f"{code // 100}xx"] = out.get(f"{code // 100}xx", 0) + n
    return out


def soak(url: str, pid: int | None, minutes: float, interval: float, connections: int, delay_ms: float,
         warmup_minutes: float, out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    good = wrk.write_mixed(good_requests(), out / "bodies-good")
    bad = wrk.write_mixed(bad_requests(), out / "bodies-bad")
    rows: list[dict[str, Any]] = []
    start = time.time()
    rss_start = tree_rss(pid) / MB if pid else None
    end = start + minutes * 60
    while time.time() < end - 1:
        seconds = min(interval, end - time.time())
        result: dict[str, Any] = {}
        bad_thread = threading.Thread(target=lambda found=result, secs=seconds: found.update(
            bad=wrk.run_mixed(url, bad, 1, secs, delay_ms=200)), daemon=True)
        bad_thread.start()
        if pid:
            with TreeMemory(pid) as mem:
                load = wrk.run_mixed(url, good, connections, seconds, delay_ms=delay_ms)
        else:
            load = wrk.run_mixed(url, good, connections, seconds, delay_ms=delay_ms)
        bad_thread.join(seconds + 60)
        b = result.get("bad", {"status": {}, "socket_errors": 0, "requests": 0})
        g, gb = _classes(load["status"]), _classes(b["status"])
        row = {"t_s": round(time.time() - start, 1), "req_s": round(load["req_s"], 1),
               "p50_ms": round(load["p50_ms"], 1), "p99_ms": round(load["p99_ms"], 1),
               "max_ms": round(load["max_ms"], 1), "good_2xx": g["2xx"],
               "good_4xx": g["4xx"], "good_5xx": g["5xx"], "good_other": load["requests"] - sum(g.values()),
               "good_socket_errors": load["socket_errors"], "bad_sent": b["requests"], "bad_4xx": gb["4xx"],
               "bad_not_4xx": b["requests"] - gb["4xx"], "bad_socket_errors": b["socket_errors"],
               "rss_mb": round(mem.last / MB, 1) if pid else None,
               "rss_peak_mb": round(mem.peak / MB, 1) if pid else None}
        rows.append(row)
        print(json.dumps(row), flush=True)
    with open(out / "soak.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = summarize(rows, warmup_minutes * 60, rss_start)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    chart(rows, out / "soak.png", warmup_minutes * 60)
    return summary


def summarize(rows: list[dict[str, Any]], warmup_s: float, rss_start: float | None) -> dict[str, Any]:
    """RSS after the warm-up vs at the end, throughput, and everything that went wrong."""
    after = [r for r in rows if r["t_s"] >= warmup_s] or rows
    first = next((r for r in rows if r["t_s"] >= warmup_s), rows[0])
    total = lambda key, rs=rows: sum(r[key] for r in rs)  # noqa: E731
    rss_warm, rss_end = first["rss_mb"], rows[-1]["rss_mb"]
    return {
        "minutes": round(rows[-1]["t_s"] / 60, 1), "rows": len(rows),
        "req_s_mean": round(sum(r["req_s"] for r in after) / len(after), 1),
        "p99_ms_worst_interval": max(r["p99_ms"] for r in after),
        "good_answered_2xx": total("good_2xx"),
        "good_errors": total("good_4xx") + total("good_5xx") + total("good_other") + total("good_socket_errors"),
        "bad_sent": total("bad_sent"), "bad_answered_4xx": total("bad_4xx"),
        "bad_not_4xx": total("bad_not_4xx") + total("bad_socket_errors"),
        "rss_start_mb": round(rss_start, 1) if rss_start else None, "rss_after_warmup_mb": rss_warm,
        "rss_end_mb": rss_end,
        "rss_peak_mb": max(r["rss_peak_mb"] for r in rows) if rss_end else None,
        "rss_end_vs_warmup": round(rss_end / rss_warm, 3) if rss_warm and rss_end else None,
    }


def chart(rows: list[dict[str, Any]], path: Path, warmup_s: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t_s"] / 60 for r in rows]
    fig, ax = plt.subplots(figsize=(9, 4.8))
    ax.plot(t, [r["req_s"] for r in rows], color="tab:blue", label="req/s (mixed load)")
    ax.set_xlabel("minutes")
    ax.set_ylabel("requests / s", color="tab:blue")
    ax.set_ylim(bottom=0)
    if rows[0]["rss_mb"] is not None:
        ax2 = ax.twinx()
        ax2.plot(t, [r["rss_mb"] for r in rows], color="tab:red", label="RSS MB (server tree)")
        ax2.plot(t, [r["rss_peak_mb"] for r in rows], color="tab:red", alpha=0.3, linestyle="--", label="RSS peak MB")
        ax2.set_ylabel("RSS MB", color="tab:red")
        ax2.set_ylim(bottom=0, top=max(r["rss_peak_mb"] for r in rows) * 1.3)
    ax.axvline(warmup_s / 60, color="grey", linestyle=":", label="end of warm-up")
    ax.set_title("convserve soak: throughput and memory")
    fig.legend(loc="lower center", ncol=4, fontsize="small")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--warmup-minutes", type=float, default=1.0)
    p.add_argument("--interval", type=float, default=10.0, help="seconds per recorded row")
    p.add_argument("--connections", type=int, default=8, help="keep-alive connections of the mixed load")
    p.add_argument("--delay-ms", type=float, default=0.0, help="pause of each connection between its requests")
    add_service_arguments(p)
    p.add_argument("--out", type=Path, default=Path("soak-results"))
    a = p.parse_args(argv)
    if not wrk.available():
        raise SystemExit("wrk is not installed: apt-get install wrk")
    with service_at(a.url, a.server_pid, a.env) as (url, pid):
        summary = soak(url, pid, a.minutes, a.interval, a.connections, a.delay_ms, a.warmup_minutes, a.out)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
