"""Reading a model contract straight from an ONNX file (the onnx protobuf, no session), and
the checks every reader of a contract applies on top of core.contract's.

Used by the exporter to write a contract into a graph (:func:`set_contract`), by ONNX
Runtime's loader (core.runtime) and by tools that only need to know what a file is. The
``onnx`` package is imported inside the functions that handle protobufs: core.runtime
imports this module in every serving worker, which never needs ``onnx`` (0.2 s and 10 MB).

On top of the document's own validation (core.contract), a contract is bounded
(:data:`MAX_CONTRACT_BYTES`, :data:`MAX_LABELS`, :data:`MAX_LABEL_CHARS`) and its label count
must be the graph's class count (:func:`check_classes`): statically where the graph declares
that dimension, and on the outputs of a real run (the service's warm-up) otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from core.contract import METADATA_KEY, IOSpec, ModelContract, check_io
from core.errors import ContractError, InvalidModel

# Bounds on what a model may carry. /models lists every contract to every client and the
# service holds them all, so a file must not make either large: real label sets are at most
# tens of thousands of classes (ImageNet-21k's 21,841 is the large end; 10,000 covers every
# common benchmark), a class name is a few words, and a whole contract of 1 MB is already
# hundreds of times the shipped ones.
MAX_CONTRACT_BYTES = 1_000_000
MAX_LABELS = 10_000
MAX_LABEL_CHARS = 200

# Where one image's output tensor counts the classes, per task: (output field, outputs.kind it
# applies to or None for any, axis from the end). Counted from the end, the axis is the same
# whether or not the graph keeps the batch axis (a fixed batch of 1 may leave it out).
# Detection's labels output holds class indices: there is no class axis to count (an index
# beyond the labels is answered as the bare index by core.postprocess), nor in a class_map.
CLASS_AXES: Mapping[str, tuple[tuple[str, str | None, int], ...]] = {
    "classification": (("scores", None, -1), ("cam", None, -3)),
    "segmentation": (("masks", "mask_logits", -3),),
    "detection": (),
    "keypoints": (),
    "instance_segmentation": (),
}


def parse_contract(text: str | None) -> ModelContract:
    """The contract document ``text`` parsed, validated and within the bounds above
    (ContractError naming what is wrong)."""
    if text is not None:
        size = len(text.encode())
        if size > MAX_CONTRACT_BYTES:
            raise ContractError(f"contract: {size} bytes, more than the {MAX_CONTRACT_BYTES} a model may carry")
    contract = ModelContract.from_json(text)
    if len(contract.labels) > MAX_LABELS:
        raise ContractError(f"labels: {len(contract.labels)} labels, more than the {MAX_LABELS} a model may have")
    for i, name in enumerate(contract.labels):
        if len(name) > MAX_LABEL_CHARS:
            raise ContractError(f"labels[{i}]: {len(name)} characters, more than the {MAX_LABEL_CHARS} "
                                "a class name may have")
    return contract


def check_classes(contract: ModelContract, shapes: Mapping[str, Sequence[Any]], source: str = "the graph's") -> None:
    """ContractError unless every class axis in ``shapes`` (output name -> dims: ints, or
    names/None where symbolic) has one entry per label. ``source`` says whose shapes they are
    ("the graph's", or the outputs of a run)."""
    n = len(contract.labels)
    for field_name, kind, axis in CLASS_AXES.get(contract.task, ()):
        tensor = getattr(contract.outputs, field_name)
        if not tensor or (kind is not None and contract.outputs.kind != kind) or tensor not in shapes:
            continue
        shape = shapes[tensor]
        dim = shape[axis] if len(shape) >= -axis else None
        if isinstance(dim, int) and dim != n:
            raise ContractError(f"labels: the contract lists {n} labels, but {source} {field_name} output "
                                f"{tensor!r} has {dim} classes")


def checked_contract(text: str | None, inputs: Iterable[IOSpec], outputs: Iterable[IOSpec]) -> ModelContract:
    """The contract document ``text`` parsed (:func:`parse_contract`) and checked against the
    graph's inputs and outputs (core.contract.check_io, then :func:`check_classes`)."""
    contract = parse_contract(text)
    outputs = list(outputs)
    check_io(contract, inputs, outputs)
    check_classes(contract, {name: shape for name, _, shape in outputs})
    return contract


def graph_io(values: Iterable[Any]) -> list[IOSpec]:
    """(name, "tensor(<numpy dtype>)", dims) for graph inputs or outputs, as check_io wants."""
    import onnx

    out = []
    for v in values:
        t = v.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
        dtype = {"float32": "float", "float64": "double"}.get(dtype, dtype)
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
        out.append((v.name, f"tensor({dtype})", dims))
    return out


def contract_of(model: Any) -> ModelContract:
    """Parse the contract of ``model`` (an onnx.ModelProto) and check it against the graph
    (ContractError if not)."""
    meta = {p.key: p.value for p in model.metadata_props}
    return checked_contract(meta.get(METADATA_KEY), graph_io(model.graph.input), graph_io(model.graph.output))


def set_contract(model: Any, contract: ModelContract) -> Any:
    """``model`` (an onnx.ModelProto, changed in place and returned) carrying ``contract`` as
    its metadata, checked against the graph (:func:`contract_of`) and by onnx.checker."""
    import onnx

    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, contract.to_json()
    contract_of(model)  # the document parses and agrees with the graph
    onnx.checker.check_model(model, full_check=True)
    return model


def read_contract(path: Path) -> ModelContract:
    """Load ``path`` (weights stay unparsed where external) and return its checked contract.
    Raises InvalidModel (ContractError for the document)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise InvalidModel(f"not a readable ONNX file ({exc.__class__.__name__}: {exc})") from None
    return contract_of(model)
