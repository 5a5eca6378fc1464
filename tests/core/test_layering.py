"""core/ is the torch-free, HTTP-free leaf; service/ never imports torch. Checked two ways:
statically (every import statement, including those inside functions) and by importing."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "core": {"torch", "torchvision", "bentoml", "starlette", "fastapi", "uvicorn", "httpx", "requests", "aiohttp",
             "multipart", "service", "training", "export", "loadtest"},
    "service": {"torch", "torchvision", "training", "export", "loadtest"},
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_forbidden_import_statements(package: str) -> None:
    bad = {str(p.relative_to(ROOT)): sorted(_imports(p) & FORBIDDEN[package]) for p in (ROOT / package).rglob("*.py")}
    assert not {k: v for k, v in bad.items() if v}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_importing_every_module_loads_nothing_forbidden(package: str) -> None:
    modules = [f"{package}." + ".".join(p.relative_to(ROOT / package).with_suffix("").parts)
               for p in (ROOT / package).rglob("*.py") if p.name != "__init__.py"]
    forbidden = sorted(FORBIDDEN[package] - {package})
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({forbidden!r})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]"


def test_the_supervisor_never_loads_the_model_stack() -> None:
    """BentoML's long-lived supervising process imports service.service (to read the service's
    settings and start workers): that must not load ONNX Runtime, NumPy or Pillow (measured:
    34 MB more resident memory for the supervisor when it did)."""
    code = ("import sys, service.service\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'onnxruntime', 'numpy', 'PIL', 'onnx', 'cv2'}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"


def _module_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports (every import statement, those inside
    functions and under TYPE_CHECKING included)."""
    modules = {}
    for package in ("core", "service", "training", "export", "loadtest"):
        for p in (ROOT / package).rglob("*.py"):
            modules[".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")] = p
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for m, p in modules.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            graph[m] |= {t for t in targets if t in modules and t != m}
    return graph


def test_no_module_imports_itself_through_others() -> None:
    """Imports run one way: no cycle among the project's modules, not even one hidden inside a
    function (core.contract and core.tasks, service.app and service.service, training.models
    and the detectors each had one)."""
    graph = _module_graph()
    cycles = []
    for start in graph:  # a path from a module's imports back to itself
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    cycles.append(" -> ".join([*path, start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    assert not cycles, cycles[:5]
