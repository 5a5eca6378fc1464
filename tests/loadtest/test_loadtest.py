"""The load-test tools against the real server on loopback, briefly and bounded."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from loadtest.images import MIX, image_mix

ROOT = Path(__file__).resolve().parents[2]


def test_image_mix_spans_thumbnails_to_12mp_in_jpeg_and_png() -> None:
    mix = image_mix(20, seed=1)
    assert len(mix) == 20
    sizes = {Image.open(__import__("io").BytesIO(d)).size for _, d, _ in mix}
    assert sizes == {(w, h) for w, h, _ in MIX}
    assert {t for _, _, t in mix} == {"image/jpeg", "image/png"}


def test_locust_wrapper_writes_csv_html_and_chart(server, tmp_path: Path) -> None:
    out = tmp_path / "lt"
    r = subprocess.run([sys.executable, "-m", "loadtest.run", "--host", server.url, "--users", "1,2",
                        "--run-time", "4s", "--images", "6", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [int(x["users"]) for x in rows] == [1, 2]
    assert all(int(x["requests"]) > 0 and int(x["failures"]) == 0 for x in rows), rows
    assert (out / "u2.html").stat().st_size > 1000 and (out / "u1_stats.csv").is_file()
    assert Image.open(out / "chart.png").size[0] > 400


def test_benchmark_reports_ceiling_service_and_naive(server, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "loadtest.benchmark", "--url", server.url, "--endpoints", "classify",
                        "--concurrency", "1,4", "--requests", "12", "--ceiling-seconds", "1", "--json-out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (result,) = json.loads(out.read_text())
    assert result["endpoint"] == "classify" and result["ceiling"]["pipeline_img_s"] > 0
    assert [row["concurrency"] for row in result["service"]] == [1, 4]
    assert all(row["ok"] == 12 and row["errors"] == 0 for row in result["service"] + result["naive"])
    assert "| concurrency | service req/s" in r.stdout
