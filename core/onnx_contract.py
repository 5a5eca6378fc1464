"""Reading a model contract straight from an ONNX file (the onnx protobuf, no session).

Used by the exporter after writing a file, by the service's pre-flight check (a broken
repository stops start-up with a message naming the file) and by tools that only need to
know what a file is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import onnx

from core.contract import METADATA_KEY, ModelContract, check_io
from core.errors import InvalidModel


def graph_io(values: Iterable[Any]) -> list[tuple[str, str, list[Any]]]:
    """(name, "tensor(<numpy dtype>)", dims) for graph inputs or outputs, as check_io wants."""
    out = []
    for v in values:
        t = v.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
        dtype = {"float32": "float", "float64": "double"}.get(dtype, dtype)
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
        out.append((v.name, f"tensor({dtype})", dims))
    return out


def contract_of(model: onnx.ModelProto) -> ModelContract:
    """Parse the model's contract and check it against the graph (ContractError if not)."""
    meta = {p.key: p.value for p in model.metadata_props}
    contract = ModelContract.from_json(meta.get(METADATA_KEY))
    check_io(contract, graph_io(model.graph.input), graph_io(model.graph.output))
    return contract


def read_contract(path: Path) -> ModelContract:
    """Load ``path`` (weights stay unparsed where external) and return its checked contract.
    Raises InvalidModel (ContractError for the document)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise InvalidModel(f"not a readable ONNX file ({exc.__class__.__name__}: {exc})") from None
    return contract_of(model)
