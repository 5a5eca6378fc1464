"""The compose fleet for real (deploy/fleet/docker-compose.yml): three convserve replicas behind
HAProxy, scraped by Prometheus, on this machine's Docker engine.

One fleet for the module, on a temporary copy of models/ (the checkout is never written), with
a unique compose project name and ports, torn down with ``down -v`` whatever happens. For the
test, replicas look at the repository every POLL_S seconds and Prometheus scrapes every second
with 15 s rule windows (an override file; the shipped configuration is otherwise what runs).

1. the load spreads: each replica's request counter within 2x of the others';
2. kill -9 of one replica's container under load: no client request fails (HAProxy retries
   on another replica), the engine restarts the replica and HAProxy routes to it again;
3. a rolling restart (each replica drained by SIGTERM, then started, one at a time) under
   load: no request fails;
4. a new model version published in the shared repository is served by every replica within
   the poll interval (plus loading), while requests pinned to the old version never fail;
5. the autoscaling recording rule, evaluated by the real Prometheus, rises under load and
   falls back at rest.

Figures (failed requests, recovery and convergence times, signal values) are printed: run
with ``-s`` or ``-rP`` to see them. Load goes only to 127.0.0.1 and the containers' addresses.
"""

from __future__ import annotations

import csv
import http.client
import io
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.commands import run as _run
from tests.support.http import multipart_body
from tests.support.images import jpeg, scene
from tests.support.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
FLEET_DIR = ROOT / "deploy" / "fleet"
COMPOSE = FLEET_DIR / "docker-compose.yml"
REPLICAS = ("convserve-1", "convserve-2", "convserve-3")
POLL_S = 2          # CONVSERVE_POLL_S for the test
SIGNAL = "convserve:requests_in_flight:avg1m"   # the autoscaling recording rule (deploy/fleet/prometheus/rules.yml)


def _get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Fleet:
    def __init__(self, project: str, files: list[Path], env: dict[str, str], port: int, stats_port: int,
                 prom_port: int, models: Path, grpc_port: int) -> None:
        self.project, self.files, self.env = project, files, env
        self.url = f"http://127.0.0.1:{port}"
        self.grpc = f"127.0.0.1:{grpc_port}"
        self.stats = f"http://127.0.0.1:{stats_port}"
        self.prometheus = f"http://127.0.0.1:{prom_port}"
        self.models = models

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        cmd = ["docker-compose", "-p", self.project]
        for f in self.files:
            cmd += ["-f", str(f)]
        return _run(cmd + list(args), timeout=timeout, env=self.env, check=check)

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"

    def inspect(self, service: str, fmt: str) -> str:
        return _run(["docker", "inspect", "-f", fmt, self.container(service)]).stdout.strip()

    def replica_url(self, service: str) -> str:
        ip = self.inspect(service, "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}")
        return f"http://{ip}:3000"

    def requests_served(self, service: str) -> float:
        """The replica's own count of answered inference requests (its /metrics)."""
        status, body = _get(self.replica_url(service) + "/metrics")
        assert status == 200
        return sum(float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
                   if line.startswith("convserve_request_seconds_count"))

    def balancer_status(self, backend: str = "replicas") -> dict[str, str]:
        """HAProxy's view of each replica in ``backend`` (replicas: REST, replicas-grpc): UP,
        DOWN, MAINT, "UP 1/2", ..."""
        status, body = _get(self.stats + "/stats;csv")
        assert status == 200, body[:300]
        rows = csv.DictReader(io.StringIO(body.decode().lstrip("# ")))
        return {r["svname"]: r["status"] for r in rows if r["pxname"] == backend and r["svname"] in REPLICAS}

    def wait_balancer(self, service: str, up: bool, timeout: float, backend: str = "replicas") -> float:
        """Seconds until HAProxy reports ``service`` UP (``up``) or anything but UP."""
        t0 = time.time()
        while time.time() - t0 < timeout:
            try:
                st = self.balancer_status(backend).get(service, "")
            except Exception:   # HAProxy's stats page did not answer: ask again
                st = None
            if st and (st == "UP" if up else not st.startswith("UP")):
                return time.time() - t0
            time.sleep(0.2)
        raise AssertionError(f"HAProxy did not report {service} {'UP' if up else 'down'} within {timeout} s: "
                             f"{self.balancer_status(backend)}")

    def query(self, expr: str) -> dict[str, float]:
        q = urllib.parse.urlencode({"query": expr})
        status, body = _get(f"{self.prometheus}/api/v1/query?{q}")
        assert status == 200, body[:300]
        result = json.loads(body)["data"]["result"]
        return {s["metric"].get("instance", s["metric"].get("job", "")): float(s["value"][1]) for s in result}


class Load:
    """Closed-loop clients through HAProxy, each on its own keep-alive connection; every request
    that does not come back 200 (or raises) is a failure."""

    def __init__(self, url: str, clients: int, fields: dict[str, str] | None = None, seed: int = 3) -> None:
        u = urllib.parse.urlparse(url)
        self.host, self.port = u.hostname, u.port
        boundary = uuid.uuid4().hex
        parts = [(k, None, v.encode()) for k, v in (fields or {}).items()]
        self.body = multipart_body(parts + [("image", "a.jpg", jpeg(scene(seed).image))], boundary,
                                   file_type="image/jpeg")
        self.headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        self.ok, self.failures, self.versions = 0, [], Counter()
        self.latencies: list[float] = []
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self) -> None:
        conn = None
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
                conn.request("POST", "/classify", body=self.body, headers=self.headers)
                resp = conn.getresponse()
                data = resp.read()
                if resp.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
                with self._lock:
                    if resp.status == 200:
                        self.ok += 1
                        self.versions[json.loads(data)["model"]["version"]] += 1
                        self.latencies.append(time.perf_counter() - t0)
                    else:
                        self.failures.append(f"{resp.status} {data[:200]!r}")
            except Exception as exc:  # a failed request: the balancer should never let one through
                with self._lock:
                    self.failures.append(repr(exc))
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=90)

    def summary(self) -> str:
        lat = sorted(self.latencies) or [0.0]
        return (f"{self.ok} ok, {len(self.failures)} failed, p50 {lat[len(lat) // 2] * 1e3:.0f} ms, "
                f"max {lat[-1] * 1e3:.0f} ms")


def _test_prometheus_config(folder: Path) -> tuple[Path, Path]:
    """The shipped Prometheus configuration with a 1 s scrape and 15 s rule windows."""
    src = FLEET_DIR / "prometheus"
    cfg = (src / "prometheus.yml").read_text()
    for key in ("scrape_interval", "evaluation_interval"):
        cfg = cfg.replace(f"{key}: 5s", f"{key}: 1s")
    cfg = cfg.replace("scrape_timeout: 4s", "scrape_timeout: 1s")
    rules = (src / "rules.yml").read_text().replace("[1m]", "[15s]").replace("[5m]", "[15s]")
    assert "1s" in cfg and "[15s]" in rules
    (folder / "prometheus.yml").write_text(cfg)
    (folder / "rules.yml").write_text(rules)
    for p in (folder, folder / "prometheus.yml", folder / "rules.yml"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return folder / "prometheus.yml", folder / "rules.yml"


@pytest.fixture(scope="module")
def fleet(image: str) -> Iterator[Fleet]:
    if not shutil.which("docker-compose"):
        pytest.skip("docker-compose is not installed (../shared/tools/container-engine installs it)")
    # Not pytest's tmp_path: its folders are private to root, and the replicas run as another user.
    work = Path(tempfile.mkdtemp(prefix="convserve-fleet-"))
    work.chmod(0o755)
    models = work / "models"
    shutil.copytree(ROOT / "models", models)
    (work / "prometheus").mkdir(mode=0o755)
    prom_cfg, prom_rules = _test_prometheus_config(work / "prometheus")
    override = work / "test-override.yml"
    override.write_text(json.dumps({"services": {"prometheus": {"volumes": [
        f"{prom_cfg}:/etc/prometheus/prometheus.yml:ro", f"{prom_rules}:/etc/prometheus/rules.yml:ro"]}}}))
    port, stats_port, prom_port, grpc_port = free_port(), free_port(), free_port(), free_port()
    env = {"CONVSERVE_IMAGE": image, "CONVSERVE_MODELS": str(models), "CONVSERVE_POLL_S": str(POLL_S),
           "CONVSERVE_PORT": str(port), "FLEET_STATS_PORT": str(stats_port), "FLEET_PROMETHEUS_PORT": str(prom_port),
           "FLEET_GRPC_PORT": str(grpc_port), "DOCKER_BUILDKIT": "0", "COMPOSE_DOCKER_CLI_BUILD": "0"}
    f = Fleet(f"csfleet{uuid.uuid4().hex[:8]}", [COMPOSE, override], env, port, stats_port, prom_port, models,
              grpc_port)
    try:
        t0 = time.time()
        f.compose("up", "-d", "--build", timeout=900)
        for service in REPLICAS:
            f.wait_balancer(service, up=True, timeout=300)
        print(f"\nfleet: up, every replica routed by HAProxy, {time.time() - t0:.1f} s after `up`")
        yield f
    finally:
        logs = f.compose("logs", "--no-color", "--tail", "30", check=False, timeout=120)
        print("\n".join(logs.stdout.splitlines()[-60:]))
        f.compose("down", "-v", "--remove-orphans", "-t", "30", check=False, timeout=300)
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.slow  # runs the fleet
def test_load_spreads_over_every_replica(fleet: Fleet) -> None:
    before = {s: fleet.requests_served(s) for s in REPLICAS}
    with Load(fleet.url, clients=6) as load:
        deadline = time.time() + 60
        while load.ok + len(load.failures) < 300 and time.time() < deadline:
            time.sleep(0.2)
    served = {s: fleet.requests_served(s) - before[s] for s in REPLICAS}
    print(f"spread: {load.summary()}; served per replica {served}")
    assert not load.failures, load.failures[:5]
    assert min(served.values()) > 0 and max(served.values()) <= 2 * min(served.values()), served


@pytest.mark.slow  # runs the fleet
def test_grpc_calls_and_streams_are_balanced_over_the_replicas(fleet: Fleet) -> None:
    """Through HAProxy's HTTP/2 frontend: unary calls from one client connection reach every
    replica (balanced per call), a stream of 30 frames is answered in order, equal to REST."""
    import numpy as np
    import tritonclient.grpc as tg

    from tests.support.http import post

    for service in REPLICAS:  # checked like the REST backend: /readyz on port 3000
        fleet.wait_balancer(service, up=True, timeout=60, backend="replicas-grpc")
    image = jpeg(scene(11).image)
    client = tg.InferenceServerClient(fleet.grpc)
    assert client.is_server_ready() and client.is_model_ready("shapes-detector")

    def frame(k: int) -> list[tg.InferInput]:
        inp = tg.InferInput("images", [1], "BYTES")
        inp.set_data_from_numpy(np.array([image], dtype=object))
        return [inp]

    before = {s: fleet.requests_served(s) for s in REPLICAS}
    for k in range(60):
        boxes = client.infer("shapes-detector", frame(k)).as_numpy("detection_boxes")
    served = {s: fleet.requests_served(s) - before[s] for s in REPLICAS}
    print(f"gRPC through HAProxy: 60 calls on one connection, served per replica {served}")
    assert min(served.values()) > 0, served
    status, _, rest = post(fleet.url + "/detect", files={"image": ("a.jpg", image)},
                           fields={"model": "shapes-detector"})
    assert status == 200 and len(rest["detections"]) == boxes.shape[1] > 0
    assert np.allclose(boxes[0], [d["box"] for d in rest["detections"]], atol=0.01)
    answers: list[str] = []
    client.start_stream(callback=lambda result, error: answers.append(error or result.get_response().id))
    for k in range(30):
        client.async_stream_infer("shapes-detector", frame(k), request_id=str(k))
    client.stop_stream()  # waits for every answer
    assert answers == [str(k) for k in range(30)]


@pytest.mark.slow  # runs the fleet
def test_kill_9_of_a_replica_loses_no_request(fleet: Fleet) -> None:
    victim = "convserve-2"
    restarts = int(fleet.inspect(victim, "{{.RestartCount}}"))
    with Load(fleet.url, clients=4) as load:
        time.sleep(3)
        # The container's main process, killed from the host: as an OOM kill or a crash would.
        # (`docker kill -s KILL` would not do: the engine takes it for a deliberate stop and its
        # restart policy does not restart the container.)
        os.kill(int(fleet.inspect(victim, "{{.State.Pid}}")), signal.SIGKILL)
        t_kill = time.time()
        detected = fleet.wait_balancer(victim, up=False, timeout=15)
        fleet.wait_balancer(victim, up=True, timeout=180)
        recovered = time.time() - t_kill
        time.sleep(3)   # traffic reaches the new container
    assert int(fleet.inspect(victim, "{{.RestartCount}}")) == restarts + 1
    served_after = fleet.requests_served(victim)  # the new container's own count
    print(f"kill -9: {load.summary()}; HAProxy took the replica out {detected:.1f} s after the kill, "
          f"routed to it again {recovered:.1f} s after (restarted by the engine, models loaded and warmed up); "
          f"it has served {served_after:.0f} requests since")
    assert not load.failures, load.failures[:5]
    assert served_after > 0


@pytest.mark.slow  # runs the fleet
def test_rolling_restart_loses_no_request(fleet: Fleet) -> None:
    cycle = {}
    with Load(fleet.url, clients=4) as load:
        for service in REPLICAS:
            t0 = time.time()
            fleet.compose("restart", "-t", "30", service, timeout=120)   # SIGTERM: drain, exit; then start
            fleet.wait_balancer(service, up=False, timeout=15)
            fleet.wait_balancer(service, up=True, timeout=180)
            cycle[service] = round(time.time() - t0, 1)
    print(f"rolling restart: {load.summary()}; seconds from SIGTERM to routed again per replica {cycle}")
    assert not load.failures, load.failures[:5]
    for service in REPLICAS:
        logs = _run(["docker", "logs", fleet.container(service)], check=False)
        assert "SIGTERM: draining" in logs.stdout + logs.stderr, service


def _versions(url: str) -> set[str]:
    status, body = _get(url + "/models")
    assert status == 200
    return {m["version"] for m in json.loads(body)["models"] if m["name"] == "shapes-classifier"}


@pytest.mark.slow  # runs the fleet
def test_new_model_version_rolls_out_to_every_replica(fleet: Fleet) -> None:
    urls = {s: fleet.replica_url(s) for s in REPLICAS}
    assert all(_versions(u) == {"1"} for u in urls.values())
    folder = fleet.models / "shapes-classifier"
    with Load(fleet.url, clients=3, fields={"model": "shapes-classifier:1", "top_k": "1"}) as pinned:
        time.sleep(2)
        staging = folder / ".staging-2"
        shutil.copytree(folder / "1", staging)   # dotted: ignored by the replicas until renamed
        os.rename(staging, folder / "2")
        t0, converged = time.time(), {}
        while len(converged) < len(urls) and time.time() - t0 < POLL_S + 30:
            for service, url in urls.items():
                if service not in converged and "2" in _versions(url):
                    converged[service] = round(time.time() - t0, 2)
            time.sleep(0.1)
        time.sleep(1)
    print(f"model roll: version 2 served by each replica after {converged} s (CONVSERVE_POLL_S={POLL_S}); "
          f"pinned to version 1 during the roll: {pinned.summary()}, versions answered {dict(pinned.versions)}")
    assert len(converged) == len(urls), converged
    assert max(converged.values()) <= POLL_S + 10, converged   # the poll interval, plus loading and warming up
    assert not pinned.failures, pinned.failures[:5]
    assert set(pinned.versions) == {"1"}
    with Load(fleet.url, clients=2) as latest:
        deadline = time.time() + 30
        while latest.ok + len(latest.failures) < 12 and time.time() < deadline:
            time.sleep(0.1)
    assert not latest.failures and set(latest.versions) == {"2"}, (latest.failures[:3], latest.versions)


@pytest.mark.slow  # runs the fleet
def test_autoscaling_signal_rises_under_load_and_falls_at_rest(fleet: Fleet) -> None:
    up = fleet.query("up")
    assert len(up) == 4 and all(v == 1 for v in up.values()), f"Prometheus targets: {up}"

    def settle(limit: float, timeout: float) -> tuple[dict[str, float], float | None]:
        t0 = time.time()
        while True:
            value = fleet.query(SIGNAL)
            if len(value) == 3 and max(value.values()) <= limit:
                return value, time.time() - t0
            if time.time() - t0 > timeout:
                return value, None
            time.sleep(0.5)

    rest, _ = settle(0.0, 60)   # earlier tests' load leaves the 15 s windows
    assert len(rest) == 3 and max(rest.values()) == 0.0, rest
    clients, risen = 12, None
    with Load(fleet.url, clients=clients) as load:
        t0 = time.time()
        while time.time() - t0 < 18:   # a whole 15 s window under load
            loaded = fleet.query(SIGNAL)
            if risen is None and min(loaded.values()) > 1.0:
                risen = time.time() - t0
            time.sleep(0.5)
        loaded = fleet.query(SIGNAL)
        queue_wait = fleet.query("convserve:queue_wait_seconds:mean1m")
    after, fallen = settle(0.0, 45)
    queue_wait_rest = fleet.query("convserve:queue_wait_seconds:mean1m")

    def fmt(d: dict[str, float], scale: float = 1.0) -> str:
        return ", ".join(f"{k} {v * scale:.2f}" for k, v in sorted(d.items()))

    print(f"autoscaling signal ({SIGNAL}, 1 s scrape, [15s] windows): at rest {fmt(rest)}; under {clients} clients "
          f"above 1 per replica after {risen and round(risen, 1)} s, after 18 s {fmt(loaded)} "
          f"(sum {sum(loaded.values()):.1f} of {clients} clients; {load.summary()}); back to 0 "
          f"{fallen and round(fallen, 1)} s after the load stopped. For comparison, queue wait per image (ms): "
          f"under load {fmt(queue_wait, 1e3)}, at rest {fmt(queue_wait_rest, 1e3)}")
    assert not load.failures, load.failures[:5]
    assert risen is not None and min(loaded.values()) > 2.0, loaded
    assert sum(loaded.values()) <= clients + 0.5, loaded   # never more held than there are clients
    assert fallen is not None, after


def test_fleet_files_agree_with_the_service() -> None:
    """Static, no engine: the drain outlasts its grace, HAProxy checks /readyz and retries, every
    replica is balanced and scraped, and the rules use metrics the service really defines."""
    import yaml

    compose = yaml.safe_load(COMPOSE.read_text())
    default = re.compile(r"\$\{[A-Z_]+:-([^}]*)\}")
    haproxy = (FLEET_DIR / "haproxy" / "haproxy.cfg").read_text()
    purge_s = int(re.search(r"pool-purge-delay (\d+)s", haproxy).group(1))
    for name in REPLICAS:
        svc = compose["services"][name]
        env = {k: default.sub(r"\1", str(v)) for k, v in svc["environment"].items()}
        assert int(svc["stop_grace_period"].removesuffix("s")) > int(env["CONVSERVE_GRACE_S"])
        assert int(env["CONVSERVE_KEEPALIVE_S"]) > purge_s   # HAProxy closes idle connections first
        assert svc["restart"] == "unless-stopped" and "/readyz" in " ".join(svc["healthcheck"]["test"])
        assert env["CONVSERVE_MODEL_ROOT"] == "/models" and svc["volumes"][0].endswith(":/models:ro")
        assert re.search(rf"^\s*server {name} {name}:3000\s*$", haproxy, re.M), name
        assert re.search(rf"^\s*server {name} {name}:8001\s*$", haproxy, re.M), name  # gRPC
    assert "http-check send meth GET uri /readyz" in haproxy and "balance leastconn" in haproxy
    assert re.search(r"bind :8001 proto h2", haproxy) and re.search(r"http-check connect port 3000 proto h1", haproxy)
    assert re.search(r"retry-on conn-failure empty-response .*response-timeout", haproxy)
    assert "option redispatch" in haproxy and re.search(r"retries [1-9]", haproxy)
    assert re.search(r"fall 2 rise 2", haproxy) and "use-service prometheus-exporter" in haproxy
    prom = yaml.safe_load((FLEET_DIR / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert set(jobs["convserve"]["static_configs"][0]["targets"]) == {f"{n}:3000" for n in REPLICAS}
    assert jobs["haproxy"]["static_configs"][0]["targets"] == ["haproxy:8404"]
    rules = (FLEET_DIR / "prometheus" / "rules.yml").read_text()
    defined = set(re.findall(r'name="(convserve_[a-z_]+)"', (ROOT / "service" / "metrics.py").read_text()))
    used = {re.sub(r"_(sum|count|bucket)$", "", m) for m in re.findall(r"\b(convserve_[a-z_]+)", rules)}
    assert used and used <= defined, used - defined
    recorded = {r["record"] for g in yaml.safe_load(rules)["groups"] for r in g["rules"] if "record" in r}
    assert SIGNAL in recorded
