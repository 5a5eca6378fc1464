"""The batchable keypoint detector (training.pose) on synthetic figures: keypoint targets at
the object's centre cell, a few training steps that lower the loss, a graph with a dynamic
batch that ONNX Runtime runs as PyTorch does, and the whole path of a keypoints model:
training.train, export.onnx_export with its parity check and contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from training.datasets import CocoDetectionDataset, detection_collate
from training.figures import FLIP, KEYPOINTS, write_keypoints
from training.pose import PoseCenterNet, pose_loss, pose_targets

SIZE = 128


@pytest.fixture(scope="module")
def figures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pose-figures")
    write_keypoints(out, 16, seed=9)
    return out


def test_the_dataset_letterboxes_keypoints_and_mirrors_left_and_right(figures: Path) -> None:
    plain = CocoDetectionDataset(figures, (SIZE, SIZE))
    image, target = plain[0]
    sample = plain.samples[0].target
    assert target["keypoints"].shape == (len(sample.boxes), len(KEYPOINTS), 3)
    scale = target["boxes"][0, 2:].numpy() / sample.boxes[0, 2:]  # the letterbox's x and y scales, from the boxes
    np.testing.assert_allclose(target["keypoints"][..., :2].numpy(), sample.keypoints[..., :2] * scale, rtol=1e-5)
    np.testing.assert_array_equal(target["keypoints"][..., 2].numpy(), sample.keypoints[..., 2])
    flipped = CocoDetectionDataset(figures, (SIZE, SIZE), augment=True)
    torch.manual_seed(0)
    np.random.seed(1)
    for _ in range(20):  # until the coin says flip
        image_f, target_f = flipped[0]
        if not torch.equal(image_f, image):
            break
    assert torch.equal(image_f, image.flip(1))
    mirrored = target["keypoints"][:, list(FLIP)]
    labelled = mirrored[..., 2] > 0
    np.testing.assert_allclose(target_f["keypoints"][..., 0][labelled].numpy(),
                               (SIZE - mirrored[..., 0])[labelled].numpy(), rtol=1e-5)
    np.testing.assert_array_equal(target_f["keypoints"][..., 2].numpy(), mirrored[..., 2].numpy())


def test_keypoint_targets_sit_at_the_centre_cell() -> None:
    kp = torch.tensor([[[20.0, 12.0, 2.0], [30.0, 40.0, 1.0], [0.0, 0.0, 0.0]]])
    target = {"boxes": torch.tensor([[8.0, 8.0, 40.0, 56.0]]), "labels": torch.tensor([0]), "keypoints": kp}
    rel, labelled, visible, heat, _, heat_mask = pose_targets([target], 3, 16, 16, 8)
    ix, iy = 3, 4  # the box centre (24, 32) in stride-8 cells
    assert rel[0, :, iy, ix].tolist() == pytest.approx([20 / 8 - 3, 12 / 8 - 4, 30 / 8 - 3, 40 / 8 - 4, 0.0, 0.0])
    assert labelled[0, :, iy, ix].tolist() == [1.0, 1.0, 0.0] and visible[0, :, iy, ix].tolist() == [1.0, 0.0, 0.0]
    assert labelled.sum() == 2
    assert heat[0, 0, 1, 2] == 1.0 and heat[0, 1, 5, 3] == 1.0 and heat[0, 2].max() == 0  # (20, 12), (30, 40) px
    assert heat_mask.sum() == 2


def test_regressed_keypoints_snap_to_their_heatmap_peak_inside_the_box() -> None:
    """One object at cell (4, 4) of a 16x16 map; keypoint 0 regressed to (34, 34) px, its
    heatmap peaking at cell (5, 3) (+0.5 offset: 44, 28 px): snapped there. Keypoint 1's only
    peak is outside the box: it stays where it was regressed."""
    model = PoseCenterNet(1, 2, width_mult=0.5, max_detections=3)
    h = w = 16
    heat = torch.full((1, 1, h, w), -10.0)
    heat[0, 0, 4, 4] = 5.0
    log_size = torch.full((1, 2, h, w), float(np.log(4.0)))  # 4 cells = 32 px around (32, 32): box (16,16)-(48,48)
    offset = torch.zeros(1, 2, h, w)
    kp_offset = torch.zeros(1, 4, h, w)
    kp_offset[0, :, 4, 4] = torch.tensor([0.25, 0.25, 0.5, 0.0])  # (34, 34) and (36, 32) px
    kp_visible = torch.zeros(1, 2, h, w)
    kp_heat = torch.full((1, 2, h, w), -10.0)
    kp_heat[0, 0, 3, 5] = 5.0     # inside the box
    kp_heat[0, 1, 12, 12] = 5.0   # outside it
    kp_heat_offset = torch.full((1, 2, h, w), 0.5)
    with torch.no_grad():
        boxes, scores, _, kps = model.decode(heat, log_size, offset, kp_offset, kp_visible, kp_heat,
                                                  kp_heat_offset)
    assert boxes[0, 0].tolist() == pytest.approx([16.0, 16.0, 48.0, 48.0])
    assert kps[0, 0, 0, :2].tolist() == pytest.approx([44.0, 28.0])
    assert kps[0, 0, 1, :2].tolist() == pytest.approx([36.0, 32.0])


def test_a_few_steps_lower_the_loss_and_the_graph_exports_with_a_dynamic_batch(figures: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    from training.convnet import Normalize

    torch.manual_seed(0)
    data = CocoDetectionDataset(figures, (SIZE, SIZE))
    images, targets = detection_collate([data[i] for i in range(8)])
    model = PoseCenterNet(1, len(KEYPOINTS), width_mult=0.5, max_detections=20)
    normalize = Normalize()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        loss = pose_loss(model(normalize(images)), [{**t, "labels": t["labels"] * 0} for t in targets], 1,
                         len(KEYPOINTS))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses

    class Graph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.normalize, self.model = normalize, model

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return self.model.decode(*self.model(self.normalize(x)))

    graph = Graph().eval()
    path = tmp_path / "pose.onnx"
    names = ["boxes", "scores", "labels", "keypoints"]
    torch.onnx.export(graph, (images[:1],), str(path), input_names=["images"], output_names=names,
                      dynamic_axes={"images": {0: "n"}, **{n: {0: "n"} for n in names}}, opset_version=17,
                      dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = images[:3]
    got = dict(zip(names, session.run(None, {"images": batch.numpy()})))
    with torch.no_grad():
        want = dict(zip(names, (t.numpy() for t in graph(batch))))
    assert got["keypoints"].shape == (3, 20, len(KEYPOINTS), 3) and got["boxes"].shape == (3, 20, 4)
    # The strongest peaks: an untrained heatmap's weak ones are near-ties that runtimes may order apart.
    for name in names:
        np.testing.assert_allclose(got[name][:, :5], want[name][:, :5], rtol=1e-3, atol=1e-3, err_msg=name)
    assert (got["keypoints"][..., 2] <= got["scores"][..., None] + 1e-6).all()  # confidence <= the object's score


def test_training_and_export_write_a_keypoint_contract_with_parity(figures: Path, tmp_path: Path) -> None:
    from core.onnx_contract import read_contract
    from export.onnx_export import export
    from training.figures import SIGMAS, SKELETON
    from training.train import TrainConfig, train

    cfg = TrainConfig(task="keypoints", train=str(figures), val=str(figures), arch="centernet_pose_mobilenet_v3_small",
                      size=SIZE, width_mult=0.5, epochs=1, batch_size=8, workers=0, max_steps=2)
    metrics = train(cfg, tmp_path / "run")
    assert {"oks_ap", "oks_ap_50", "oks_ap_75"} <= set(metrics)
    path, report = export(tmp_path / "run" / "best.pt", "kp", "1", tmp_path / "models", "figures", figures, 8)
    contract = read_contract(path)
    assert contract.task == "keypoints" and contract.labels == ["figure"]
    assert contract.keypoints is not None and contract.keypoints.names == list(KEYPOINTS)
    assert contract.keypoints.skeleton == [[KEYPOINTS.index(a), KEYPOINTS.index(b)] for a, b in SKELETON]
    assert contract.keypoints.sigmas == [SIGMAS[n] for n in KEYPOINTS]
    assert contract.provenance["metrics"]["oks_ap_50"] == metrics["oks_ap_50"]
    # an untrained heatmap has near-equal peaks, so a rare keypoint may snap apart (export/parity.py allows 1%)
    assert report["images"] == 8 and report["keypoints_differing"] <= 0.01 * report["keypoints_compared"] > 0


def test_parity_refuses_keypoints_that_moved() -> None:
    """Twin detections whose keypoints differ by a pixel between the runtimes fail the export."""
    from export.parity import ParityError, check_keypoints_agree
    from tests.support.models import contract as make_contract

    c = make_contract("keypoints", {"kind": "boxes", "boxes": "b", "scores": "s", "labels": "l", "keypoints": "k"},
                      labels=("figure",), keypoints={"names": ["a", "b"], "skeleton": [[0, 1]], "sigmas": [0.1, 0.1]})
    one = {"b": np.array([[0, 0, 8, 8], [2, 2, 6, 6]], np.float32), "s": np.array([0.9, 0.5], np.float32),
           "l": np.array([0, 0]), "k": np.array([[[1, 1, 0.5], [2, 2, 0.5]], [[3, 3, 0.2], [4, 4, 0.2]]], np.float32)}
    assert check_keypoints_agree(c, [one], [one])["keypoints_differing"] == 0
    moved = {**one, "k": one["k"] + np.array([1.0, 0.0, 0.0], np.float32)}
    with pytest.raises(ParityError, match="4 of 4 keypoints"):
        check_keypoints_agree(c, [one], [moved])


def test_a_detector_checkpoint_starts_a_keypoint_model(tiny_checkpoints: dict[str, Path]) -> None:
    """Transfer learning: a CenterNet detector's backbone, FPN and box heads load into the pose
    model; the class heatmap and keypoint heads (sized by classes and keypoints) start fresh."""
    from core.contract import KeypointSpec
    from training.checkpoints import read
    from training.models import build_model

    spec = KeypointSpec(list(KEYPOINTS), [], [0.05] * len(KEYPOINTS))
    model = build_model("keypoints", "centernet_pose_mobilenet_v3_small", 1, 0.5, keypoints=spec,
                        weights=tiny_checkpoints["detection"], freeze="backbone")
    detector = read(tiny_checkpoints["detection"])["model"]
    own = model.state_dict()
    assert torch.equal(own["core.size.1.weight"], detector["core.size.1.weight"])
    assert torch.equal(own["core.features.0.0.weight"], detector["core.features.0.0.weight"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.split(".")[1] in ("heatmap", "kp_offset", "kp_visible", "kp_heat", "kp_heat_offset")
                             for n in trainable)
