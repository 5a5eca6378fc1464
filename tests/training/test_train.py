import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from training.checkpoints import restore
from training.datasets import CocoDetectionDataset, ImageFolderDataset, SegmentationDataset, detection_collate
from training.models import build_model
from training.train import TrainConfig, seed_everything, train


@pytest.mark.slow
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
        loss = model.loss(images, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_restore_brings_back_weights_and_optimizer_state(tiny_checkpoints: dict[str, Path]) -> None:
    last = tiny_checkpoints["classification"].parent / "last.pt"
    saved = torch.load(last, weights_only=True)
    cfg = saved["config"]
    model = build_model(cfg["task"], cfg["arch"], len(cfg["classes"]), cfg["width_mult"])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"])
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    rest = restore(last, model, opt, torch.device("cpu"))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved["model"].items())
    assert any(not torch.equal(fresh[k], v) for k, v in saved["model"].items())  # training changed them
    got, want = opt.state_dict()["state"], saved["optimizer"]["state"]
    assert got.keys() == want.keys() and got
    for key in want:
        assert all(torch.equal(got[key][n], want[key][n]) for n in ("step", "exp_avg", "exp_avg_sq"))
    assert rest["step"] == saved["step"] and rest["epoch"] == saved["epoch"] and "model" not in rest


def test_resume_continues_the_same_optimizer(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """Resuming in a copy (other tests read the original): the step count, epoch and Adam's own
    step counter carry on from the checkpoint instead of starting over."""
    out = shutil.copytree(tiny_checkpoints["classification"].parent, tmp_path / "run")
    last = torch.load(out / "last.pt", weights_only=True)
    cfg = TrainConfig(**{**last["config"], "epochs": 2, "max_steps": last["step"] + 2})
    train(cfg, out, resume=True)
    resumed = torch.load(out / "last.pt", weights_only=True)
    assert resumed["epoch"] == 1 and resumed["step"] == last["step"] + 2
    adam_steps = {float(v["step"]) for v in resumed["optimizer"]["state"].values()}
    assert adam_steps == {float(last["step"] + 2)}
    assert any(not torch.equal(resumed["model"][k], v) for k, v in last["model"].items()
               if v.is_floating_point())
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]


def test_checkpoint_records_the_shared_evaluation(tiny_checkpoints: dict[str, Path]) -> None:
    ck = torch.load(tiny_checkpoints["detection"], weights_only=True)
    assert {"map", "map_50", "map_75", "images"} <= set(ck["metrics"]) and ck["metrics"]["images"] == 8
