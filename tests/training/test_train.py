from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from training.datasets import CocoDetectionDataset, ImageFolderDataset, SegmentationDataset, detection_collate
from training.models import build_model
from training.train import compute_loss, seed_everything


@pytest.mark.parametrize("task,arch,size", [
    ("classification", "mobilenet_v3_small", 64),
    ("segmentation", "lraspp_mobilenet_v3_large", 64),
    ("detection", "centernet_mobilenet_v3_small", 128),
])
def test_a_few_steps_reduce_the_loss(tiny_data: Path, task: str, arch: str, size: int) -> None:
    seed_everything(0)
    sub = {"classification": "cls", "segmentation": "seg", "detection": "det"}[task]
    root = tiny_data / sub / "train"
    ds = {"classification": ImageFolderDataset, "segmentation": SegmentationDataset,
          "detection": CocoDetectionDataset}[task](root, (size, size))
    collate = detection_collate if task == "detection" else None
    images, targets = next(iter(DataLoader(ds, 8, shuffle=False, collate_fn=collate)))
    model = build_model(task, arch, len(ds.classes), width_mult=0.5).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(8):
        loss = compute_loss(task, model, images, targets, len(ds.classes))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_checkpoint_loads_weights_only_and_resumes(tiny_checkpoints: dict[str, Path]) -> None:
    from training.train import TrainConfig, train

    ck = torch.load(tiny_checkpoints["classification"], weights_only=True)
    assert ck["config"]["task"] == "classification" and "model" in ck
    out = tiny_checkpoints["classification"].parent
    last = torch.load(out / "last.pt", weights_only=True)
    cfg = TrainConfig(**{**last["config"], "epochs": 2, "max_steps": last["step"] + 2})
    train(cfg, out, resume=True)
    resumed = torch.load(out / "last.pt", weights_only=True)
    assert resumed["epoch"] == 1 and resumed["step"] == last["step"] + 2
