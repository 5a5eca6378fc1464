"""The start-up check, as a command: the installed BentoML is the one convserve's workarounds
were written for (service.bentoml_patches), settings valid, every model in the repository
readable with a contract that agrees with its graph, CUDA there if CONVSERVE_DEVICE=cuda.

    python -m service.check        # exit 0, or one line on stderr and exit 2

On success it prints the models' measured profiles (service.placement) as one JSON line,
which the hook hands to the workers so that they do not measure again.

ConvServe's on_deployment hook runs it in a short-lived process, so ``bentoml serve``'s
supervising process never loads ONNX or ONNX Runtime (it holds no model, and stays small).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

from core.errors import ConvserveError
from service import bentoml_patches
from service.repository import check_repository
from service.settings import Settings


def main() -> None:
    try:
        bentoml_patches.check_version()  # the version only: bentoml serve's process checked the rest at import
    except RuntimeError as exc:
        _stop(exc)
    try:
        _, profiles = check_repository(Settings.from_env())
    except ConvserveError as exc:
        _stop(exc)
    print(json.dumps({key: asdict(p) for key, p in profiles.items()}))


def _stop(exc: Exception) -> None:
    print(f"convserve: cannot start: {exc}", file=sys.stderr)
    raise SystemExit(2) from None


if __name__ == "__main__":
    main()
