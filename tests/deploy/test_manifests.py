"""The Kubernetes and KServe manifests (deploy/kubernetes, deploy/kserve), checked offline: no
cluster runs here.

- rendered: every kustomization (and the overlays with the optional components), by the
  kustomize that `kubectl kustomize` embeds (see :func:`_kustomize`);
- validated: every core object against the Kubernetes API schemas of a current release
  (kubernetes-validate, strict: an unknown field is an error), the KServe and KEDA objects
  against their CRDs' schemas (vendored in tests/deploy/schemas/, with unknown fields refused
  the same way);
- checked by policy: checkov's Kubernetes checks, none failed (the few skipped carry their
  reason in an annotation on the object);
- consistent with the service: probe paths and ports are routes and the port convserve serves,
  the grace period outlasts preStop + CONVSERVE_GRACE_S, every metric an autoscaling query
  reads is one service/metrics.py exports, and the query is the same everywhere.

The last test serves a KServe-style /mnt/models (one model file, named by the runtime's
CONVSERVE_MODEL_NAME) with the real server.
"""

from __future__ import annotations

import ast
import copy
import functools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
KSERVE = ROOT / "deploy" / "kserve"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
# The Kubernetes API schemas kubernetes-validate checks against: the newest release it knows and
# an older one still common in clusters (PodDisruptionBudget.unhealthyPodEvictionPolicy: 1.26+).
KUBERNETES_VERSIONS = ("1.30", "1.37")

# Every kustomization that renders on its own; the components (deploy/kubernetes/components/*)
# are rendered through OVERLAYS below.
KUSTOMIZATIONS = {
    "base": K8S / "base",
    "cpu": K8S / "overlays" / "cpu",
    "gpu": K8S / "overlays" / "gpu",
    "kserve": KSERVE,
}
# Overlays a user writes to take the options: (what they build on, the components they add).
OVERLAYS = {
    "cpu+keda": ("overlays/cpu", ["components/keda"]),
    "cpu+model-volume": ("overlays/cpu", ["components/model-volume"]),
    "gpu+keda+model-volume": ("overlays/gpu", ["components/keda", "components/model-volume"]),
}
CRD_SCHEMAS = {  # (apiVersion, kind) -> vendored CRD schema
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "kserve-servingruntime-v1alpha1.json",
    ("serving.kserve.io/v1beta1", "InferenceService"): "kserve-inferenceservice-v1beta1.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "keda-scaledobject-v1alpha1.json",
}
BENTOML_HEALTH_ROUTES = {"/livez", "/readyz"}  # BentoML's own (checked in its source below)
KSERVE_MODEL_DIR = "/mnt/models"  # KServe's constants.DefaultModelLocalMountPath


# --- rendering --------------------------------------------------------------------------------------


def _kustomize_command() -> list[str] | None:
    """``kubectl kustomize`` when its embedded kustomize is v5 (components, `labels:`); a
    standalone ``kustomize`` v5 otherwise; None when neither is here."""
    if shutil.which("kubectl"):
        r = subprocess.run(["kubectl", "version", "--client", "-o", "json"], capture_output=True, text=True,
                           timeout=60)
        version = json.loads(r.stdout or "{}").get("kustomizeVersion", "") if r.returncode == 0 else ""
        if re.match(r"v?([5-9]|\d{2,})\.", version):
            return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        r = subprocess.run(["kustomize", "version"], capture_output=True, text=True, timeout=60)
        if re.search(r"v?([5-9]|\d{2,})\.\d+", r.stdout):
            return ["kustomize", "build"]
    return None


@functools.cache
def _kustomize_tool() -> list[str]:
    cmd = _kustomize_command()
    if cmd is None:
        pytest.skip("no kustomize v5: neither `kubectl kustomize` (kubectl 1.27+) nor `kustomize` is on PATH")
    return cmd


def _render(path: Path) -> list[dict[str, Any]]:
    r = subprocess.run([*_kustomize_tool(), str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"kustomize {path}:\n{r.stderr}"
    return [doc for doc in yaml.safe_load_all(r.stdout) if doc]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Every kustomization and option overlay, rendered: name -> objects."""
    out = {name: _render(path) for name, path in KUSTOMIZATIONS.items()}
    for name, (base, components) in OVERLAYS.items():
        folder = tmp_path_factory.mktemp(name.replace("+", "-"))
        (folder / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [os.path.relpath(K8S / base, folder)],
            "components": [os.path.relpath(K8S / c, folder) for c in components]}))
        out[name] = _render(folder)
    return out


def _one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''} in {[o['kind'] for o in objects]}"
    return found[0]


def _kinds(objects: list[dict[str, Any]]) -> list[str]:
    return sorted(o["kind"] for o in objects)


def test_every_kustomization_renders_what_it_should(rendered: dict[str, list[dict[str, Any]]]) -> None:
    core = ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Namespace", "NetworkPolicy", "PodDisruptionBudget",
            "Secret", "Service"]
    assert _kinds(rendered["base"]) == _kinds(rendered["cpu"]) == _kinds(rendered["gpu"]) == core
    keda = sorted([*core, "ScaledObject"])
    keda.remove("HorizontalPodAutoscaler")  # KEDA makes and owns the HPA
    assert _kinds(rendered["cpu+keda"]) == keda
    assert _kinds(rendered["cpu+model-volume"]) == sorted([*core, "PersistentVolumeClaim"])
    assert _kinds(rendered["gpu+keda+model-volume"]) == sorted([*keda, "PersistentVolumeClaim"])
    assert _kinds(rendered["kserve"]) == ["InferenceService", "PodDisruptionBudget", "ServingRuntime"]
    for name, objects in rendered.items():
        assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {"convserve"}, name

    # The generated ConfigMap and Secret are referenced under their hashed names.
    for name in ("base", "gpu", "cpu+model-volume"):
        objects = rendered[name]
        spec = _one(objects, "Deployment")["spec"]["template"]["spec"]
        config = _one(objects, "ConfigMap")["metadata"]["name"]
        secret = _one(objects, "Secret")["metadata"]["name"]
        assert config.startswith("convserve-settings-") and secret.startswith("convserve-keys-")
        assert spec["containers"][0]["envFrom"] == [{"configMapRef": {"name": config}}]
        assert {"name": "keys", "secret": {"secretName": secret, "defaultMode": 0o440}} in spec["volumes"]

    gpu = _one(rendered["gpu"], "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert gpu["image"] == "convserve:gpu" and gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert _settings(rendered["gpu"])["CONVSERVE_DEVICE"] == "cuda"
    cpu = _one(rendered["cpu"], "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert cpu["image"] == "convserve:cpu" and "nvidia.com/gpu" not in cpu["resources"]["limits"]
    assert _settings(rendered["cpu"])["CONVSERVE_DEVICE"] == "cpu"

    volume = _one(rendered["cpu+model-volume"], "Deployment")["spec"]["template"]["spec"]
    mount = {"name": "models", "mountPath": "/models", "readOnly": True}
    assert mount in volume["containers"][0]["volumeMounts"]
    assert _settings(rendered["cpu+model-volume"])["CONVSERVE_MODEL_ROOT"] == "/models"
    assert "CONVSERVE_MODEL_ROOT" not in _settings(rendered["cpu"])  # the image's own models/


def _settings(objects: list[dict[str, Any]]) -> dict[str, str]:
    return _one(objects, "ConfigMap")["data"]


# --- schemas ----------------------------------------------------------------------------------------


def test_core_objects_are_valid_for_a_current_kubernetes(rendered: dict[str, list[dict[str, Any]]]) -> None:
    import kubernetes_validate

    checked = 0
    for name, objects in rendered.items():
        for obj in objects:
            if (obj["apiVersion"], obj["kind"]) in CRD_SCHEMAS:
                continue
            for version in KUBERNETES_VERSIONS:
                try:
                    kubernetes_validate.validate(obj, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    raise AssertionError(f"{name}: {obj['kind']} {obj['metadata']['name']} (Kubernetes {version}): "
                                         f"{exc.message} at {'.'.join(map(str, exc.path))}") from None
            checked += 1
    print(f"kubernetes-validate {kubernetes_validate.version.__version__} (Kubernetes "
          f"{' and '.join(KUBERNETES_VERSIONS)}, strict): {checked} objects valid")
    assert checked >= 40


def _strict(schema: Any) -> Any:
    """A CRD's structural schema with unknown fields refused, as the API server's strict field
    validation (kubectl's default) refuses them: additionalProperties false wherever an object
    lists its properties and does not preserve unknown fields."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def _crd_validator(file: str) -> Any:
    import jsonschema

    doc = json.loads((SCHEMAS / file).read_text())
    schema = _strict(doc["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _crd_errors(obj: dict[str, Any]) -> list[str]:
    validator = _crd_validator(CRD_SCHEMAS[obj["apiVersion"], obj["kind"]])
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


def test_kserve_and_keda_objects_are_valid_for_their_crds(rendered: dict[str, list[dict[str, Any]]]) -> None:
    checked = 0
    for name, objects in rendered.items():
        for obj in objects:
            if (obj["apiVersion"], obj["kind"]) in CRD_SCHEMAS:
                assert not _crd_errors(obj), f"{name}: {obj['kind']}: {_crd_errors(obj)}"
                checked += 1
    print(f"CRD schemas (jsonschema, strict): {checked} objects valid")
    assert checked == 4  # the runtime, the InferenceService, two ScaledObjects


def test_the_crd_schemas_refuse_what_the_api_server_would(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The vendored schemas really check: a misspelt field, a wrong type, a bad enum value."""
    isvc = _one(rendered["kserve"], "InferenceService")
    bad = copy.deepcopy(isvc)
    bad["spec"]["predictor"]["minReplica"] = 2
    assert any("minReplica" in e for e in _crd_errors(bad))
    bad = copy.deepcopy(isvc)
    bad["spec"]["predictor"]["autoScaling"]["metrics"][0]["type"] = "Externals"
    assert _crd_errors(bad)
    runtime = copy.deepcopy(_one(rendered["kserve"], "ServingRuntime"))
    runtime["spec"]["containers"][0]["ports"][0]["containerPort"] = "3000"
    assert _crd_errors(runtime)
    scaled = copy.deepcopy(_one(rendered["cpu+keda"], "ScaledObject"))
    del scaled["spec"]["triggers"]
    assert _crd_errors(scaled)


# --- policy -----------------------------------------------------------------------------------------


def test_checkov_finds_no_failed_check(rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    checkov = str(ROOT / ".tools" / "checkov" / "bin" / "checkov")  # its own venv: see pyproject's dev extra
    if not Path(checkov).exists():
        pytest.skip("checkov is not installed: python3 -m venv .tools/checkov && .tools/checkov/bin/pip install "
                    "checkov==3.3.30 (.ci/run does)")
    for name, objects in rendered.items():
        (tmp_path / f"{name.replace('+', '-')}.yaml").write_text(yaml.safe_dump_all(objects, sort_keys=False))
    r = subprocess.run([checkov, "--directory", str(tmp_path), "--framework", "kubernetes", "--output", "json",
                        "--compact", "--skip-download"],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "LOG_LEVEL": "WARNING"})
    assert r.returncode in (0, 1), r.stderr[-3000:]
    report = json.loads(r.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [(c["check_id"], c["resource"], c["file_path"]) for rep in reports
              for c in rep.get("results", {}).get("failed_checks", [])]
    summary = {k: sum(rep.get("summary", {}).get(k, 0) for rep in reports) for k in ("passed", "failed", "skipped")}
    skipped = sorted({(c["check_id"], c["check_result"].get("suppress_comment", "")) for rep in reports
                      for c in rep.get("results", {}).get("skipped_checks", [])})
    print(f"checkov (kubernetes): {summary}; skipped: {skipped}")
    assert not failed, failed
    assert summary["passed"] > 100
    assert {check for check, _ in skipped} <= {"CKV_K8S_43", "CKV_K8S_15", "CKV_K8S_40"}
    assert all(reason for _, reason in skipped), skipped


# --- consistency with the service ---------------------------------------------------------------------


def _service_routes() -> set[str]:
    from service.routes import ROUTES

    return {r.path for r in ROUTES}


def test_bentoml_serves_the_health_routes_the_probes_use() -> None:
    import bentoml

    source = "".join(p.read_text(errors="replace") for p in (Path(bentoml.__file__).parent / "_internal" /
                                                            "server").rglob("*.py"))
    for path in BENTOML_HEALTH_ROUTES:
        assert f'"{path}"' in source, path


def _probes(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: container[k]["httpGet"] for k in ("startupProbe", "readinessProbe", "livenessProbe")}


def _port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return number


def _serving_port() -> int:
    """The port convserve's container listens on: BentoML's default, as service.service sets none."""
    import bentoml

    config = yaml.safe_load((Path(bentoml.__file__).parent / "_internal" / "configuration" / "v2" /
                             "default_configuration.yaml").read_text())
    service_source = (ROOT / "service" / "service.py").read_text()
    assert "port" not in re.sub(r"#.*", "", service_source.split("@bentoml.service(")[1].split("\n)")[0])
    return int(config["services"]["http"]["port"])


def _containers(rendered: dict[str, list[dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    out = [(name, _one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0])
           for name, objects in rendered.items() if name != "kserve"]
    out.append(("kserve", _one(rendered["kserve"], "ServingRuntime")["spec"]["containers"][0]))
    return out


def test_probes_ask_routes_the_service_has_on_the_port_it_serves(rendered: dict[str, list[dict[str, Any]]]) -> None:
    routes = _service_routes() | BENTOML_HEALTH_ROUTES
    assert "/v2/health/ready" in routes and "/v2/health/live" in routes
    port = _serving_port()
    assert port == 3000
    for name, container in _containers(rendered):
        for probe, get in _probes(container).items():
            assert get["path"] in routes, (name, probe, get)
            assert _port_number(container, get["port"]) == port, (name, probe, get)
        assert container["ports"][0]["containerPort"] == port
        # startup: the readiness route (models loaded and warmed up), with minutes to get there
        startup = container["startupProbe"]
        assert startup["httpGet"]["path"] == container["readinessProbe"]["httpGet"]["path"]
        assert startup["httpGet"]["path"] in ("/readyz", "/v2/health/ready")
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    runtime = _one(rendered["kserve"], "ServingRuntime")["spec"]["containers"][0]
    assert runtime["name"] == "kserve-container" and runtime["ports"][0]["name"] == "http1"
    assert runtime["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    service = _one(rendered["cpu"], "Service")["spec"]["ports"][0]
    container = _one(rendered["cpu"], "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert _port_number(container, service["targetPort"]) == port
    for name, objects in rendered.items():  # Prometheus scrapes /metrics on that port
        pod = (_one(objects, "ServingRuntime")["spec"] if name == "kserve" else
               _one(objects, "Deployment")["spec"]["template"]["metadata"])
        notes = pod["annotations"]
        assert (notes["prometheus.io/scrape"], notes["prometheus.io/port"], notes["prometheus.io/path"]) == \
               ("true", str(port), "/metrics")


def _sleep_seconds(container: dict[str, Any]) -> float:
    """The pause a preStop hook makes (exec of Python's time.sleep, or sleep N)."""
    command = " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    match = re.search(r"time\.sleep\(([\d.]+)\)", command) or re.fullmatch(r"(?:/bin/)?sleep ([\d.]+)", command)
    assert match, command
    return float(match.group(1))


def _grace_s(env: dict[str, str]) -> float:
    from service.settings import Settings

    default = Settings.__dataclass_fields__["grace_s"].default
    return float(env.get("CONVSERVE_GRACE_S", default))


def test_the_grace_period_outlasts_the_pause_and_the_drain(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name, objects in rendered.items():
        if name == "kserve":
            container = _one(objects, "ServingRuntime")["spec"]["containers"][0]
            env = {e["name"]: e["value"] for e in container["env"]}
            grace = _one(objects, "InferenceService")["spec"]["predictor"]["terminationGracePeriodSeconds"]
        else:
            spec = _one(objects, "Deployment")["spec"]["template"]["spec"]
            container, env, grace = spec["containers"][0], _settings(objects), spec["terminationGracePeriodSeconds"]
        pause, drain = _sleep_seconds(container), _grace_s(env)
        assert pause >= 3, name  # endpoints need a moment to stop routing
        assert grace >= pause + drain + 5, (name, grace, pause, drain)


def test_the_pods_run_as_the_images_user_with_writable_scratch_only(rendered: dict[str, list[dict[str, Any]]]) -> None:
    from bentoml._internal.container.generate import BENTO_UID_GID

    for name, objects in rendered.items():
        if name == "kserve":
            runtime = _one(objects, "ServingRuntime")["spec"]
            container, volumes = runtime["containers"][0], runtime["volumes"]
            user = container["securityContext"]["runAsUser"]
            env = {e["name"]: e["value"] for e in container["env"]}
        else:
            spec = _one(objects, "Deployment")["spec"]["template"]["spec"]
            container, volumes, user = spec["containers"][0], spec["volumes"], spec["securityContext"]["runAsUser"]
            env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
            assert spec["enableServiceLinks"] is False  # no CONVSERVE_PORT=tcp://... from a Service
        assert user == BENTO_UID_GID, name
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] and not context["allowPrivilegeEscalation"], name
        scratch = {v["name"] for v in volumes if "emptyDir" in v}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts["/tmp"] in scratch and mounts[env["BENTOML_HOME"]] in scratch, name


def test_every_setting_is_one_the_service_reads(rendered: dict[str, list[dict[str, Any]]]) -> None:
    known = {name for package in ("service", "core") for path in (ROOT / package).rglob("*.py")
             for name in re.findall(r"CONVSERVE_[A-Z_]+", path.read_text())}
    known |= {f"{name}_FILE" for name in known}  # service.settings._keys: NAME and NAME_FILE
    for name, objects in rendered.items():
        if name == "kserve":
            env = [e["name"] for e in _one(objects, "ServingRuntime")["spec"]["containers"][0]["env"]]
        else:
            container = _one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
            env = [*_settings(objects), *(e["name"] for e in container["env"])]
        unknown = {k for k in env if k.startswith("CONVSERVE_")} - known
        assert not unknown, (name, unknown)


# --- the autoscaling query ----------------------------------------------------------------------------


def _exported_metrics() -> set[str]:
    """The series names service/metrics.py exports: a histogram's _bucket, _sum and _count, a
    counter's _total, a gauge as named."""
    names = set()
    for node in ast.walk(ast.parse((ROOT / "service" / "metrics.py").read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                ast.unparse(node.func.value) == "bentoml.metrics":
            name = next(k.value.value for k in node.keywords if k.arg == "name")
            kind = node.func.attr
            if kind == "Histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            elif kind == "Counter":
                names.add(name if name.endswith("_total") else f"{name}_total")
            else:
                names.add(name)
    return names


@functools.cache
def _queries() -> dict[str, str]:
    """Every autoscaling query as written: the adapter's per-pod query, KEDA's, KServe's."""
    adapter = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())["rules"]["custom"]
    assert len(adapter) == 1
    keda = yaml.safe_load((K8S / "components" / "keda" / "scaledobject.yaml").read_text())
    isvc = yaml.safe_load((KSERVE / "inferenceservice.yaml").read_text())
    (metric,) = isvc["spec"]["predictor"]["autoScaling"]["metrics"]
    return {"adapter": adapter[0]["metricsQuery"], "keda": keda["spec"]["triggers"][0]["metadata"]["query"],
            "kserve": metric["external"]["metric"]["query"]}


def _series(query: str) -> set[str]:
    """The metric names a PromQL expression reads (its parsed vector selectors)."""
    import promql_parser

    names = set()

    def walk(node: Any) -> None:
        kind = type(node).__name__
        if kind == "VectorSelector":
            names.add(node.name)
            return
        for attr in ("expr", "lhs", "rhs", "vector_selector", "param"):
            child = getattr(node, attr, None)
            if child is not None and not isinstance(child, (str, int, float)):
                walk(child)
        for arg in getattr(node, "args", None) or []:
            walk(arg)

    walk(promql_parser.parse(query))
    return names


def _adapter_as_prometheus_gets_it(query: str) -> str:
    """The adapter's template filled in as it fills it for pods of a namespace."""
    return (query.replace("<<.LabelMatchers>>", 'namespace="convserve",pod=~"convserve-a|convserve-b"')
            .replace("<<.GroupBy>>", "pod"))


def test_every_autoscaling_query_parses_and_reads_metrics_the_service_exports() -> None:
    exported = _exported_metrics()
    assert "convserve_requests_in_flight" in exported  # the autoscaling signal, a gauge
    for where, query in _queries().items():
        query = _adapter_as_prometheus_gets_it(query) if where == "adapter" else query
        read = _series(query)
        assert read and read <= exported, (where, read - exported)


def _per_pod(query: str, where: str) -> str:
    """A query reduced to its per-pod expression, selectors blanked, whitespace normalised."""
    query = " ".join(query.split())
    if where == "adapter":
        query = query.replace("<<.GroupBy>>", "pod")
    else:
        assert query.startswith("sum(") and query.endswith(")"), (where, query)
        query = query[4:-1]
    return re.sub(r"\{[^}]*\}", "{}", query)


def test_the_autoscaling_query_is_the_same_everywhere(rendered: dict[str, list[dict[str, Any]]]) -> None:
    queries = _queries()
    per_pod = {where: _per_pod(q, where) for where, q in queries.items()}
    assert len(set(per_pod.values())) == 1, per_pod
    # the selectors: the adapter's (namespace and pod, filled in by the adapter); the others' pick
    # the pods of their namespace and workload
    assert set(re.findall(r"\{([^}]*)\}", queries["adapter"])) == {"<<.LabelMatchers>>"}
    keda_selectors = set(re.findall(r"\{([^}]*)\}", queries["keda"]))
    assert keda_selectors == {'namespace="convserve",pod=~"convserve-.*"'}
    isvc = _one(rendered["kserve"], "InferenceService")
    name, namespace = isvc["metadata"]["name"], isvc["metadata"]["namespace"]
    assert set(re.findall(r"\{([^}]*)\}", queries["kserve"])) == {
        f'namespace="{namespace}",pod=~"{name}-predictor-.*"'}
    deployment = _one(rendered["cpu"], "Deployment")["metadata"]
    assert keda_selectors == {f'namespace="{deployment["namespace"]}",pod=~"{deployment["name"]}-.*"'}

    # the adapter's series and name are the HPA's metric; targets and bounds agree
    rule = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())["rules"]["custom"][0]
    hpa = _one(rendered["cpu"], "HorizontalPodAutoscaler")["spec"]
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert re.fullmatch(rule["name"]["matches"], rule["seriesQuery"].split("{")[0])
    assert rule["seriesQuery"].split("{")[0] in _exported_metrics()
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    scaled = _one(rendered["cpu+keda"], "ScaledObject")["spec"]
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "prometheus" and trigger.get("metricType", "AverageValue") == "AverageValue"
    target = float(metric["pods"]["target"]["averageValue"])
    assert float(trigger["metadata"]["threshold"]) == target
    (external,) = isvc["spec"]["predictor"]["autoScaling"]["metrics"]
    assert float(external["external"]["target"]["value"]) == target
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (scaled["minReplicaCount"], scaled["maxReplicaCount"]) == \
           (isvc["spec"]["predictor"]["minReplicas"], isvc["spec"]["predictor"]["maxReplicas"])
    assert scaled["scaleTargetRef"]["name"] == hpa["scaleTargetRef"]["name"] == deployment["name"]


# --- KServe's /mnt/models --------------------------------------------------------------------------


def test_the_runtime_serves_what_kserve_mounts() -> None:
    runtime = yaml.safe_load((KSERVE / "servingruntime.yaml").read_text())["spec"]
    env = {e["name"]: e["value"] for e in runtime["containers"][0]["env"]}
    assert env["CONVSERVE_MODEL_ROOT"] == KSERVE_MODEL_DIR
    assert env["CONVSERVE_MODEL_NAME"] == "{{.Name}}"  # KServe's ReplacePlaceholders: the InferenceService's name
    assert runtime["protocolVersions"] == ["v2", "grpc-v2"]
    ports = {p["name"]: p["containerPort"] for p in runtime["containers"][0]["ports"]}
    assert ports == {"http1": 3000, "h2c": int(env["CONVSERVE_GRPC_PORT"])}  # REST first: KServe's port 80 goes there
    formats = {f["name"]: f for f in runtime["supportedModelFormats"]}
    isvc = yaml.safe_load((KSERVE / "inferenceservice.yaml").read_text())
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == yaml.safe_load((KSERVE / "servingruntime.yaml").read_text())["metadata"]["name"]
    assert model["modelFormat"]["name"] in formats and model["protocolVersion"] == "v2"
    assert not formats["onnx"]["autoSelect"]  # never picked for someone else's ONNX InferenceService
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] in ("Standard", "RawDeployment")
    assert isvc["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "keda"


def test_an_inference_service_name_is_a_valid_model_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """CONVSERVE_MODEL_NAME takes what KServe fills in (a DNS label) and refuses what a request
    could not name in a path (/v2/models/<name>/infer) or a model reference (name:version)."""
    from core.errors import ConfigError
    from service.settings import Settings

    for name in ("shapes-classifier", "m1", "x" * 63):
        monkeypatch.setenv("CONVSERVE_MODEL_NAME", name)
        assert Settings.from_env().model_name == name
    monkeypatch.setenv("CONVSERVE_MODEL_NAME", "")
    assert Settings.from_env().model_name is None
    for bad in ("a/b", "a:1", ".hidden", "a b", "x" * 129):
        monkeypatch.setenv("CONVSERVE_MODEL_NAME", bad)
        with pytest.raises(ConfigError, match="CONVSERVE_MODEL_NAME"):
            Settings.from_env()


@pytest.mark.slow
def test_the_server_serves_one_model_file_named_by_the_runtime(tmp_path: Path) -> None:
    """/mnt/models as the storage initializer leaves a single-file storageUri
    (gs://bucket/path/model.onnx -> /mnt/models/model.onnx), with the runtime's environment
    (CONVSERVE_MODEL_NAME={{.Name}} filled in as KServe does)."""
    import base64

    from tests.support.http import get, request
    from tests.support.images import jpeg, scene
    from tests.support.servers import SHIPPED_MODELS, start_server, stop_server

    mnt = tmp_path / "mnt-models"
    mnt.mkdir()
    shutil.copy(SHIPPED_MODELS / "shapes-classifier" / "1" / "model.onnx", mnt / "model.onnx")
    runtime = yaml.safe_load((KSERVE / "servingruntime.yaml").read_text())["spec"]["containers"][0]
    env = {e["name"]: e["value"].replace("{{.Name}}", "mymodel") for e in runtime["env"]
           if e["name"].startswith("CONVSERVE_") and e["name"] != "CONVSERVE_MODEL_ROOT"}
    assert env["CONVSERVE_MODEL_NAME"] == "mymodel"
    server = start_server(mnt, tmp_path / "server.log", env=env)
    try:
        assert get(server.url + "/v2/health/ready")[0] == 200
        status, _, body = get(server.url + "/v2/models/mymodel/ready")
        assert status == 200 and body == {"name": "mymodel", "ready": True}
        status, _, body = get(server.url + "/models")
        assert [(m["name"], m["version"]) for m in body["models"]] == [("mymodel", "1")]
        doc = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                           "data": [{"b64": base64.b64encode(jpeg(scene(5).image)).decode()}]}],
               "outputs": [{"name": "logits", "parameters": {"classification": 1}}]}
        status, _, body = request(server.url, "POST", "/v2/models/mymodel/infer", json.dumps(doc).encode(),
                                  {"Content-Type": "application/json"})
        assert status == 200, body
        assert body["model_name"] == "mymodel" and body["model_version"] == "1"
        (out,) = body["outputs"]
        assert out["shape"] == [1, 1] and out["data"][0].count(":") == 2
        assert get(server.url + "/v2/models/shapes-classifier/ready")[0] == 404
    finally:
        stop_server(server.proc)


# --- the pod specs, run as a container --------------------------------------------------------------


def _docker(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    r = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n"
                             f"{r.stderr[-2000:]}")
    return r


def _memory_bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    return int(quantity[:-2]) * units[quantity[-2:]] if quantity[-2:] in units else int(quantity)


def _run_like_the_kubelet(image: str, container: dict[str, Any], pod: dict[str, Any], env: dict[str, str],
                          mounts: list[str]) -> tuple[str, str]:
    """``container`` of a pod spec as a Docker container, with what the kubelet would enforce:
    its user, read-only root filesystem, dropped capabilities, no privilege escalation, CPU and
    memory limits, and a fresh writable tmpfs where the spec mounts an emptyDir. Returns (its
    name, its URL)."""
    from tests.support.servers import free_port

    context = {**pod.get("securityContext", {}), **container["securityContext"]}
    emptydirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    args = ["run", "-d", "--name", f"convserve-pod-{os.urandom(4).hex()}",
            "--user", f"{context['runAsUser']}:{context.get('runAsGroup', context['runAsUser'])}",
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "--cpus", str(container["resources"]["limits"]["cpu"]),
            "--memory", str(_memory_bytes(container["resources"]["limits"]["memory"]))]
    if context.get("readOnlyRootFilesystem"):
        args.append("--read-only")
    for mount in container["volumeMounts"]:
        if mount["name"] in emptydirs:
            args += ["--tmpfs", f"{mount['mountPath']}:rw,mode=1777"]
    for path in mounts:
        args += ["-v", path]
    for key, value in env.items():
        args += ["-e", f"{key}={value}"]
    port = free_port()
    args += ["-p", f"127.0.0.1:{port}:{container['ports'][0]['containerPort']}", image]
    name = args[args.index("--name") + 1]
    _docker(*args)
    return name, f"http://127.0.0.1:{port}"


def _until_ready(name: str, url: str, path: str, timeout: float = 300) -> None:
    import time

    from tests.support.http import get

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if get(url + path, timeout=3)[0] == 200:
                return
        except Exception:
            pass
        if _docker("inspect", "-f", "{{.State.Running}}", name).stdout.strip() != "true":
            break
        time.sleep(1)
    raise AssertionError(f"{name} not ready:\n{_docker('logs', name, check=False).stderr[-3000:]}")


def _stop_like_the_kubelet(name: str, container: dict[str, Any], grace: float) -> str:
    """preStop (run in the container: its command must exist there), then SIGTERM with the rest
    of the grace period; the container must exit by itself (drained), not be killed."""
    import time

    t0 = time.time()
    _docker("exec", name, *container["lifecycle"]["preStop"]["exec"]["command"])
    paused = time.time() - t0
    _docker("stop", "-t", str(int(grace - paused)), name, timeout=grace + 30)
    assert _docker("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip() != "137", "killed, not drained"
    logs = _docker("logs", name, check=False)
    return logs.stdout + logs.stderr


@pytest.mark.slow
def test_the_deployments_pod_serves_with_a_read_only_root_as_the_images_user(
        image: str, rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    """The cpu overlay's pod spec in Docker: settings from its ConfigMap, keys from its Secret,
    emptyDirs only for scratch; every probe answers, a request is served and shows up in the
    autoscaling metric, and preStop + SIGTERM drain it within the grace period."""
    import base64

    from tests.support.http import get, post
    from tests.support.images import jpeg, scene

    objects = rendered["cpu"]
    pod = _one(objects, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    keys = tmp_path / "keys"
    keys.mkdir()
    for key, value in _one(objects, "Secret")["data"].items():
        (keys / key).write_bytes(base64.b64decode(value))
        (keys / key).chmod(0o444)  # the kubelet gives them to the pod's fsGroup
    (keys_mount,) = [m["mountPath"] for m in container["volumeMounts"] if m["name"] == "keys"]
    env = {**_settings(objects), **{e["name"]: e["value"] for e in container["env"]}}
    name, url = _run_like_the_kubelet(image, container, pod, env,
                                      [f"{keys}:{keys_mount}:ro"])
    try:
        _until_ready(name, url, container["startupProbe"]["httpGet"]["path"])
        for probe in _probes(container).values():
            assert get(url + probe["path"])[0] == 200, probe
        status, _, body = post(url + "/classify", {"image": ("a.jpg", jpeg(scene(9).image))})
        assert status == 200, body
        status, _, metrics = get(url + "/metrics")
        # the autoscaling gauge: a multiprocess "livesum" gauge is exported summed over the workers,
        # without a pid label (no labels at all: "convserve_requests_in_flight 0.0")
        assert status == 200 and re.search(r"^convserve_requests_in_flight[ {]", metrics, re.MULTILINE), \
            metrics[-3000:]
        assert _docker("exec", name, "id", "-u").stdout.strip() == str(pod["securityContext"]["runAsUser"])
        logs = _stop_like_the_kubelet(name, container, pod["terminationGracePeriodSeconds"])
    finally:
        _docker("rm", "-f", name, check=False)
    assert "SIGTERM: draining" in logs and "Traceback" not in logs and "Read-only file system" not in logs, logs[-3000:]


@pytest.mark.slow
def test_the_kserve_runtime_serves_a_single_file_storage_uri(
        image: str, rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    """The ServingRuntime's container in Docker, /mnt/models as the storage initializer leaves a
    single-file storageUri, read-only: the model is served under the InferenceService's name."""
    from tests.support.http import get
    from tests.support.servers import SHIPPED_MODELS

    runtime = _one(rendered["kserve"], "ServingRuntime")["spec"]
    isvc = _one(rendered["kserve"], "InferenceService")
    (container,) = runtime["containers"]
    mnt = tmp_path / "mnt-models"
    mnt.mkdir()
    shutil.copy(SHIPPED_MODELS / "shapes-classifier" / "1" / "model.onnx", mnt / "model.onnx")
    (mnt / "model.onnx").chmod(0o444)
    model = isvc["metadata"]["name"]
    env = {e["name"]: e["value"].replace("{{.Name}}", model) for e in container["env"]}
    pod = {"securityContext": isvc["spec"]["predictor"]["securityContext"], "volumes": runtime["volumes"]}
    name, url = _run_like_the_kubelet(image, container, pod, env, [f"{mnt}:{KSERVE_MODEL_DIR}:ro"])
    try:
        _until_ready(name, url, container["startupProbe"]["httpGet"]["path"])
        for probe in _probes(container).values():
            assert get(url + probe["path"])[0] == 200, probe
        status, _, body = get(url + f"/v2/models/{model}/ready")
        assert status == 200 and body == {"name": model, "ready": True}
        logs = _stop_like_the_kubelet(name, container, isvc["spec"]["predictor"]["terminationGracePeriodSeconds"])
    finally:
        _docker("rm", "-f", name, check=False)
    assert "Traceback" not in logs and "Read-only file system" not in logs, logs[-3000:]


def test_the_grpc_port_is_declared_where_traffic_meets_it(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The port settings.env gives CONVSERVE_GRPC_PORT is the container's "grpc" port, which the
    Service (as h2c) and the NetworkPolicy let in."""
    objects = rendered["cpu"]
    settings = _settings(objects)
    container = _one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert _port_number(container, "grpc") == int(settings["CONVSERVE_GRPC_PORT"])
    (service_port,) = [p for p in _one(objects, "Service")["spec"]["ports"] if p["name"] == "grpc"]
    assert service_port["targetPort"] == "grpc" and service_port["appProtocol"] == "kubernetes.io/h2c"
    allowed = {p["port"] for rule in _one(objects, "NetworkPolicy")["spec"]["ingress"] for p in rule["ports"]}
    assert {"http", "grpc"} <= allowed
