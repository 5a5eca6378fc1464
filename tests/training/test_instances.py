"""The batchable instance segmenter (training.instances) on synthetic crowds: masks
letterboxed and flipped with their images, YOLACT's box crop, a few training steps that lower
the loss, and the whole path of an instance_segmentation model: training.train and
export.onnx_export with its parity check (tests/service/test_instances.py scores the shipped
model's served answers against export.evaluate)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from training.datasets import CocoDetectionDataset, detection_collate
from training.instances import InstanceCenterNet, box_window, instance_loss
from training.synthetic import write_instances

SIZE = 128


@pytest.fixture(scope="module")
def crowds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("crowds")
    write_instances(out, 16, seed=9)
    return out


def test_masks_are_letterboxed_and_flipped_with_their_image(crowds: Path) -> None:
    plain = CocoDetectionDataset(crowds, (SIZE, SIZE), masks=True)
    image, target = plain[0]
    masks = target["masks"].numpy()
    assert masks.shape == (len(target["boxes"]), SIZE, SIZE) and masks.dtype == np.uint8
    for m, box in zip(masks, target["boxes"].numpy()):  # each mask lies in its box (a pixel's rounding aside)
        ys, xs = np.nonzero(m)
        assert xs.min() >= box[0] - 1.5 and xs.max() <= box[2] + 0.5 and ys.min() >= box[1] - 1.5
        assert ys.max() <= box[3] + 0.5
    flipped = CocoDetectionDataset(crowds, (SIZE, SIZE), augment=True, masks=True)
    np.random.seed(1)
    for _ in range(20):  # until the coin says flip
        image_f, target_f = flipped[0]
        if not torch.equal(image_f, image):
            break
    assert torch.equal(image_f, image.flip(1)) and torch.equal(target_f["masks"], target["masks"].flip(2))


def test_the_crop_keeps_cells_whose_centre_is_in_the_box() -> None:
    window = box_window(torch.tensor([[[4.0, 0.0, 12.0, 8.0]]]), 4, 4, 4.0)  # cells of 4 px: centres 2, 6, 10, 14
    assert window[0, 0].tolist() == [[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_a_few_steps_lower_the_loss(crowds: Path) -> None:
    torch.manual_seed(0)
    data = CocoDetectionDataset(crowds, (SIZE, SIZE), masks=True)
    images, targets = detection_collate([data[i] for i in range(8)])
    model = InstanceCenterNet(len(data.classes), width_mult=0.5, max_detections=10)
    from training.convnet import Normalize

    normalize = Normalize()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        loss = instance_loss(model(normalize(images)), targets, len(data.classes))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses
    with torch.no_grad():
        boxes, scores, labels, masks = model.eval().decode(*model(normalize(images[:2])))
    assert masks.shape == (2, 10, SIZE // 4, SIZE // 4) and float(masks.min()) >= 0 and float(masks.max()) <= 1


def test_training_and_export_write_an_instance_model_with_parity(crowds: Path, tmp_path: Path) -> None:
    from core.onnx_contract import read_contract
    from export.onnx_export import export
    from training.train import TrainConfig, train

    cfg = TrainConfig(task="instance_segmentation", train=str(crowds), val=str(crowds),
                      arch="centernet_yolact_mobilenet_v3_small", size=SIZE, width_mult=0.5, epochs=1, batch_size=8,
                      workers=0, max_steps=2)
    metrics = train(cfg, tmp_path / "run")
    assert {"mask_ap", "mask_ap_50", "mask_ap_75"} <= set(metrics)
    path, report = export(tmp_path / "run" / "best.pt", "ins", "1", tmp_path / "models", "crowds", crowds, 8)
    contract = read_contract(path)
    assert contract.task == "instance_segmentation" and contract.outputs.masks == "masks"
    assert report["mask_cells_compared"] > 0 and report["mask_cells_differing"] <= 0.001 * report["mask_cells_compared"]
