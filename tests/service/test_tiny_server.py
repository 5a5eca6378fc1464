"""The real server on the tiny test models: fixed-batch graphs served like dynamic ones, the
same pixels as the training loader for awkward image formats, and contract errors at start-up."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from core.contract import METADATA_KEY, ModelContract
from core.runtime import OnnxModel
from service.pipeline import preprocess
from service.settings import Settings
from tests.support.http import post
from tests.support.images import jpeg, scene
from tests.support.servers import start_server
from training.datasets import ImageFolderDataset

pytestmark = pytest.mark.slow  # every test trains, exports or starts a server


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def awkward_images() -> dict[str, bytes]:
    """An RGBA PNG, a 16-bit PNG, a palette PNG with transparency, an EXIF-rotated JPEG."""
    base = scene(41, 90, 70).image
    rgba = base.convert("RGBA")
    alpha = np.full((70, 90), 255, np.uint8)
    alpha[:, :45] = 90
    rgba.putalpha(Image.fromarray(alpha))
    grey16 = Image.fromarray((np.asarray(base.convert("L")).astype(np.uint16) * 257 + 100).clip(0, 65535))
    palette = base.quantize(16)
    exif = Image.Exif()
    exif[0x0112] = 6
    return {"rgba.png": _encode(rgba, "PNG"), "grey16.png": _encode(grey16, "PNG"),
            "palette.png": _encode(palette, "PNG", transparency=3),
            "rotated.jpg": _encode(base.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif, quality=92)}


def test_training_loader_and_service_see_identical_arrays(tiny_server, tiny_served_repo, tmp_path) -> None:
    model = OnnxModel.load(tiny_served_repo / "tiny-cls" / "1" / "model.onnx", "tiny-cls", "1", "cpu", 1)
    c = model.contract
    images = awkward_images()
    for cls in ("a", "b"):  # an ImageFolder of the four files (two classes, as ImageFolder needs)
        (tmp_path / cls).mkdir()
        for name, data in images.items():
            (tmp_path / cls / name).write_bytes(data)
    ds = ImageFolderDataset(tmp_path, (c.input.height, c.input.width))
    assert len(ds) == 8
    settings = Settings.from_env()
    for sample, (arr, _) in zip(ds.samples, (ds[i] for i in range(len(ds)))):
        data = sample.image.read_bytes()
        served = preprocess(data, c, settings).array
        np.testing.assert_array_equal(arr.numpy(), served, err_msg=sample.image.name)
        # ... and the answer over HTTP is the model's answer on the training loader's pixels
        status, _, body = post(tiny_server.url + "/classify", {"image": (sample.image.name, data)},
                               {"model": "tiny-cls", "top_k": "5"})
        assert status == 200, body
        logits = model.infer(arr.numpy()[None])[0][c.outputs.scores].astype(np.float64)
        probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        got = {d["label_id"]: d["score"] for d in body["labels"]}
        for label_id, score in got.items():
            assert score == pytest.approx(probs[label_id], abs=2e-6), sample.image.name
    rotated = next(s for s in ds.samples if s.image.name == "rotated.jpg")
    _, _, body = post(tiny_server.url + "/classify", {"image": ("r.jpg", rotated.image.read_bytes())},
                      {"model": "tiny-cls"})
    assert body["image"] == {"width": 90, "height": 70, "format": "JPEG"}  # upright size, as displayed


@pytest.mark.parametrize("sub,endpoint", [("cls", "classify"), ("seg", "segment")])
@pytest.mark.parametrize("size", [1, 3])
def test_fixed_batch_models_are_served_like_dynamic_ones(tiny_server, sub, endpoint, size) -> None:
    images = [jpeg(scene(500 + i, 160, 120).image) for i in range(7)]
    fields = {"classify": {"top_k": "5"}, "segment": {"mask_format": "png"}}[endpoint]

    def ask(model: str, data: bytes):
        return post(f"{tiny_server.url}/{endpoint}", {"image": ("x.jpg", data)}, {**fields, "model": model})

    with ThreadPoolExecutor(7) as pool:  # concurrent: the batcher forms batches of up to `size`
        fixed = list(pool.map(lambda d: ask(f"tiny-{sub}-fixed{size}", d), images))
    dynamic = [ask(f"tiny-{sub}", d) for d in images]
    for (fs, _, fb), (ds, _, db) in zip(fixed, dynamic):
        assert fs == ds == 200, (fb, db)
        assert fb["model"]["name"] == f"tiny-{sub}-fixed{size}" and 1 <= fb["timing"]["batch_size"] <= size
        if endpoint == "classify":
            want = {d["label"]: d["score"] for d in db["labels"]}
            assert {d["label"]: pytest.approx(want[d["label"]], abs=1e-3) for d in fb["labels"]} == \
                {d["label"]: d["score"] for d in fb["labels"]}
        else:
            import base64
            a = np.asarray(Image.open(io.BytesIO(base64.b64decode(fb["mask_png"]))))
            b = np.asarray(Image.open(io.BytesIO(base64.b64decode(db["mask_png"]))))
            assert a.shape == b.shape == (120, 160) and (a == b).mean() >= 0.999


def _with_contract(src: Path, dst: Path, edit) -> Path:
    proto = onnx.load(str(src))
    doc = json.loads({p.key: p.value for p in proto.metadata_props}[METADATA_KEY])
    edit(doc)
    for p in proto.metadata_props:
        if p.key == METADATA_KEY:
            p.value = json.dumps(doc)
    dst.parent.mkdir(parents=True)
    onnx.save(proto, str(dst))
    return dst


@pytest.mark.parametrize("edit,field", [
    (lambda d: d["input"].update(pad_value="x"), "input.pad_value: expected an integer, got a string 'x'"),
    (lambda d: d["batch"].update(dynamic=False, size="4"), "batch.size: expected an integer, got a string '4'"),
    (lambda d: d.update(labels="ab"), "labels: expected a list, got a string 'ab'"),
    (lambda d: d["input"].update(normalized_in_graph=False), "input.normalized_in_graph: false is not supported"),
])
def test_a_contract_error_stops_start_up_with_one_line(tiny_repo, tmp_path, edit, field) -> None:
    bad = _with_contract(tiny_repo / "tiny-cls" / "1" / "model.onnx", tmp_path / "repo" / "bad" / "1" / "model.onnx",
                         edit)
    document = {p.key: p.value for p in onnx.load(str(bad)).metadata_props}[METADATA_KEY]
    with pytest.raises(ValueError):  # the document really is invalid
        ModelContract.from_json(json.dumps(json.loads(document)))
    lines, log = _refused_start_up(tmp_path)
    assert lines == [f"convserve: cannot start: {bad}: invalid model: {field}" + lines[0].split(field, 1)[1]], log
    assert "Traceback" not in log


def _refused_start_up(tmp_path: Path) -> tuple[list[str], str]:
    """Start a server on tmp_path/repo that must refuse to start; its "cannot start" lines and whole log."""
    with pytest.raises(RuntimeError) as exc:
        start_server(tmp_path / "repo", tmp_path / "serve.log", timeout=90)
    assert str(exc.value)
    log = (tmp_path / "serve.log").read_text()
    return [ln for ln in log.splitlines() if "cannot start" in ln], log


def _one_row_classifier(path: Path, threshold: float = 200.0) -> Path:
    """A classifier whose graph passes every start-up check (symbolic batch axes, a clean
    warm-up on grey images) but returns a single row for any batch holding a bright image:
    the output split then fails for such batches of more than one."""
    from onnx import TensorProto, helper

    def const(name: str, values: list, dtype: int = TensorProto.INT64):
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, [len(values)], values))

    nodes = [
        helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=[1, 2, 3], keepdims=0),   # [N]
        helper.make_node("Shape", ["mean"], ["n"]),                                    # [1] == N
        helper.make_node("ReduceMax", ["mean"], ["brightest"], keepdims=1),            # [1]
        const("threshold", [threshold], TensorProto.FLOAT),
        helper.make_node("Greater", ["brightest", "threshold"], ["bright"]),
        const("one", [1]),
        helper.make_node("Where", ["bright", "one", "n"], ["end"]),                    # 1 if bright else N
        const("start", [0]), const("axis0", [0]),
        helper.make_node("Slice", ["mean", "start", "end", "axis0"], ["rows"]),
        const("axis1", [1]),
        helper.make_node("Unsqueeze", ["rows", "axis1"], ["col"]),
        helper.make_node("Neg", ["col"], ["neg"]),
        helper.make_node("Concat", ["col", "neg"], ["logits"], axis=1),               # [?, 2]
    ]
    graph = helper.make_graph(nodes, "one_row",
                              [helper.make_tensor_value_info("images", TensorProto.UINT8, ["n", 16, 16, 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["rows", 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    contract = ModelContract.from_dict({"task": "classification", "labels": ["a", "b"],
                                        "input": {"name": "images", "height": 16, "width": 16},
                                        "outputs": {"kind": "logits", "scores": "logits"}})
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, contract.to_json()
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True)
    onnx.save(model, str(path))
    return path


def test_a_model_onnx_runtime_cannot_load_stops_start_up_with_one_line(tmp_path) -> None:
    path = _one_row_classifier(tmp_path / "repo" / "too-new" / "1" / "model.onnx")
    proto = onnx.load(str(path))
    proto.ir_version = 99  # a file from a newer exporter than this ONNX Runtime reads
    onnx.save(proto, str(path))
    lines, log = _refused_start_up(tmp_path)
    assert len(lines) == 1
    assert lines[0].startswith(f"convserve: cannot start: {path}: invalid model: ONNX Runtime cannot load it")
    assert "Traceback" not in log


def test_a_model_that_fails_its_warm_up_stops_start_up_with_one_line(tmp_path) -> None:
    # grey 114 is "bright"
    path = _one_row_classifier(tmp_path / "repo" / "fails" / "1" / "model.onnx", threshold=100.0)
    lines, log = _refused_start_up(tmp_path)
    assert len(lines) == 1
    assert lines[0].startswith(f"convserve: cannot start: {path}: the model fails on a warm-up batch")
    assert "Traceback" not in log


def test_a_failing_output_split_is_a_500_json_not_a_hang(tmp_path) -> None:
    from tests.support.http import MULTIPART, multipart_body, request
    from tests.support.servers import stop_server

    _one_row_classifier(tmp_path / "repo" / "one-row" / "1" / "model.onnx")
    # One inference thread, so the three images queued together run as one batch of three.
    srv = start_server(tmp_path / "repo", tmp_path / "serve.log",
                       env={"CONVSERVE_DEVICE": "cpu", "CONVSERVE_INFERENCE_THREADS": "1"})
    try:
        data = jpeg(Image.new("RGB", (64, 48), (250, 250, 250)))  # bright: the graph returns one row
        status, _, body = request(srv.url, "POST", "/classify",
                                  multipart_body([("image", f"{i}.jpg", data) for i in range(3)]),
                                  MULTIPART, timeout=30)
        assert status == 500 and body["error"]["type"] == "internal", body  # one batch of 3 -> one row back
        status, _, body = post(srv.url + "/classify", {"image": ("x.jpg", data)})
        assert status == 200 and len(body["labels"]) == 2, body  # the batcher is alive; a batch of one works
        assert "expected rank 1 per image plus a batch axis of at least 3" in (tmp_path / "serve.log").read_text()
    finally:
        stop_server(srv.proc)
