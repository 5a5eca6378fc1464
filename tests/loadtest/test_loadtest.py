"""The load-test tools against the real server on loopback, briefly and bounded."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
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


@pytest.mark.slow
def test_ceiling_runs_the_service_machinery_in_process() -> None:
    """The ceiling decodes real JPEGs, runs real ONNX Runtime and computes real answers."""
    from core.repository import discover
    from core.runtime import OnnxModel
    from loadtest.benchmark import ceiling, make_images
    from service.settings import Settings

    settings = Settings.from_env()
    entry = next(e for e in discover(ROOT / "models") if e.name == "shapes-classifier")
    model = OnnxModel.load(entry.path, entry.name, entry.version, "cpu", 1)
    result = ceiling(model, make_images(4, 320, 240), settings, seconds=0.5)
    assert result["pipeline_img_s"] > 0 and result["ort_only_img_s"] > result["pipeline_img_s"] / 10
    assert result["max_batch"] == settings.max_batch_for(model.providers)


def test_benchmark_without_wrk_says_how_to_get_it() -> None:
    r = subprocess.run([sys.executable, "-m", "loadtest.benchmark", "--models", "shapes-classifier"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120, env={"PATH": "/nonexistent"})
    assert r.returncode != 0 and "apt-get install wrk" in r.stderr


@pytest.mark.skipif(shutil.which("wrk") is None,
                    reason="wrk is not installed (apt-get install wrk): the benchmark's load generator")
def test_benchmark_reports_ceiling_service_and_naive(server, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "loadtest.benchmark", "--url", server.url,
                        "--server-pid", str(server.proc.pid),
                        "--models", "shapes-classifier", "--concurrency", "1,4", "--seconds", "1",
                        "--warmup-seconds", "1", "--ceiling-seconds", "0.5", "--json-out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (result,) = json.loads(out.read_text())["models"]
    assert result["endpoint"] == "classify" and result["ceiling"]["pipeline_img_s"] > 0
    for rows in (result["service"], result["naive"]):
        assert [row["connections"] for row in rows] == [1, 4]
        assert all(row["requests"] > 0 and row["non_2xx"] == 0 and row["socket_errors"] == 0 for row in rows), rows
        assert all(0 < row["p50_ms"] <= row["p99_ms"] <= row["max_ms"] for row in rows), rows
    assert all(row["rss_peak_mb"] > 50 for row in result["service"])
    assert "| clients | service req/s" in r.stdout


WRK = pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)")


@WRK
def test_soak_records_throughput_errors_and_memory(server, tmp_path: Path) -> None:
    out = tmp_path / "soak"
    r = subprocess.run([sys.executable, "-m", "loadtest.soak", "--url", server.url,
                        "--server-pid", str(server.proc.pid),
                        "--minutes", "0.3", "--interval", "6", "--warmup-minutes", "0.1", "--connections", "2",
                        "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = list(csv.DictReader(open(out / "soak.csv")))
    assert len(rows) >= 2 and all(float(x["rss_mb"]) > 50 and float(x["req_s"]) > 0 for x in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["good_errors"] == 0 and summary["good_answered_2xx"] > 0
    assert summary["bad_sent"] > 0 and summary["bad_not_4xx"] == 0
    assert summary["bad_answered_4xx"] == summary["bad_sent"]
    assert Image.open(out / "soak.png").size[0] > 400


@WRK
def test_overload_answers_every_request(server, tmp_path: Path) -> None:
    out = tmp_path / "overload.json"
    r = subprocess.run([sys.executable, "-m", "loadtest.benchmark", "--url", server.url,
                        "--server-pid", str(server.proc.pid),
                        "--models", "shapes-detector", "--overload", "200", "--seconds", "4", "--warmup-seconds", "1",
                        "--json-out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads(out.read_text())["models"][0]["overload"]
    status = {int(k): v for k, v in row["status"].items()}
    assert row["socket_errors"] == 0 and set(status) <= {200, 503} and row["503_without_retry_after"] == 0
    assert status.get(200, 0) > 0 and row["probe"]["admitted"] > 0


@pytest.mark.skipif(not shutil.which("h2load"), reason="h2load (nghttp2-client) is not installed; .ci/run installs it")
def test_grpc_load_from_h2load_counts_calls_the_service_refused_as_errors(server, tmp_path: Path) -> None:
    """h2load sees only HTTP statuses (gRPC errors are 200s with a grpc-status trailer): the
    benchmark checks its count of OK calls against the service's own counter."""
    from loadtest.benchmark import make_images
    from loadtest.transports import h2load_grpc

    image = make_images(1, 320, 240)[0]
    ok = h2load_grpc(server.url, server.grpc, "shapes-classifier", "images", image, 2, 1, tmp_path)
    assert ok["requests"] > 5 and ok["errors"] == 0 and ok["p50_ms"] > 0
    refused = h2load_grpc(server.url, server.grpc, "no-such-model", "images", image, 2, 1, tmp_path)
    assert refused["requests"] > 5 and refused["errors"] == refused["requests"]
    again = h2load_grpc(server.url, server.grpc, "shapes-classifier", "images", image, 2, 1, tmp_path)
    assert again["errors"] == 0 and again["requests"] < 2 * ok["requests"] + 50  # a run counts its own calls only


@WRK
def test_galleries_benchmark_measures_enrolment_search_and_recall_at_each_size(server, tmp_path: Path) -> None:
    """Tiny settings of loadtest.galleries against the started service: real enrolments over
    HTTP, synthetic vectors written into its SQLite file, every level's row, no error, and the
    exact store's recall measured as 1.0 at each size."""
    from loadtest import galleries

    out = tmp_path / "galleries.json"
    port = server.url.rsplit(":", 1)[1]
    galleries.main(["--url", server.url, "--server-pid", str(server.proc.pid),
                    "--db", str(server.log.parent / f"galleries-{port}.db"), "--gallery", "bench-test",
                    "--enrol", "20", "--sizes", "20,200", "--clients", "1,2", "--seconds", "1", "--queries", "10",
                    "--batch", "50", "--json-out", str(out)])
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["operation"], r["items"], r["clients"]) for r in rows if r["operation"] == "search"] == [
        ("search", 20, 1), ("search", 20, 2), ("search", 200, 1), ("search", 200, 2)]
    assert [(r["operation"], r["clients"]) for r in rows if r["operation"] == "enrol"] == [("enrol", 1), ("enrol", 2)]
    assert all(r["requests"] > 0 and r["errors"] == 0 and 0 < r["p50_ms"] <= r["p99_ms"] for r in rows), rows
    assert all(r["rss_peak_mb"] > 50 for r in rows)
    assert [(s["items"], s["items_in_file"], s["recall_at_10"]) for s in result["sizes"]] == [
        (20, 20, 1.0), (200, 200, 1.0)]
    assert all(0 < s["data_mb"] <= s["disk_mb"] and s["search_ms_p50"] > 0 for s in result["sizes"])
    # the benchmark's galleries are gone afterwards
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"{server.url}/galleries/bench-test", timeout=30)
