"""The start-up check, as a command: settings valid, every model in the repository readable
with a contract that agrees with its graph, CUDA there if CONVSERVE_DEVICE=cuda.

    python -m service.check        # exit 0, or one line on stderr and exit 2

ConvServe's on_deployment hook runs it in a short-lived process, so ``bentoml serve``'s
supervising process never loads ONNX or ONNX Runtime (it holds no model, and stays small).
"""

from __future__ import annotations

import sys

from core.errors import ConvserveError
from service.repository import check_repository
from service.settings import Settings


def main() -> None:
    try:
        check_repository(Settings.from_env())
    except ConvserveError as exc:
        print(f"convserve: cannot start: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
