"""Train a classifier, segmenter or detector on a dataset directory.

Usage (see README "Train on your own data")::

    python -m training.train classification --train data/cls/train --val data/cls/val \\
        --arch mobilenet_v3_small --size 128 --epochs 8 --out runs/classifier

Writes ``<out>/last.pt`` every epoch and ``<out>/best.pt`` when the validation metric
improves (top-1, mIoU or COCO mAP@.5). Checkpoints are plain dicts of tensors and
JSON-like values: ``torch.load(path, weights_only=True)`` reads them. ``--resume`` continues
from ``<out>/last.pt``. CPU or CUDA is chosen automatically unless ``--device`` says.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from training.datasets import (CocoDetectionDataset, DatasetError, ImageFolderDataset, SegmentationDataset,
                               detection_collate)
from training.metrics import ClassificationMeter, ConfusionMatrix, coco_detection_metrics, load_coco
from training.models import build_model

DEFAULT_ARCH = {"classification": "mobilenet_v3_small", "segmentation": "lraspp_mobilenet_v3_large",
                "detection": "centernet_mobilenet_v3_small"}
PRIMARY_METRIC = {"classification": "top1", "segmentation": "miou", "detection": "map_50"}


@dataclass
class TrainConfig:
    task: str
    train: str
    val: str
    arch: str
    size: int = 128
    width_mult: float = 1.0
    epochs: int = 10
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    workers: int = 2
    device: str = "auto"
    weights: str | None = None
    max_steps: int | None = None      # stop early after this many optimiser steps (tests, smoke runs)
    classes: list[str] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch sees no CUDA device")
    return torch.device(name)


def make_datasets(cfg: TrainConfig) -> tuple[Any, Any]:
    size = (cfg.size, cfg.size)
    if cfg.task == "classification":
        tr = ImageFolderDataset(cfg.train, size, augment=True)
        return tr, ImageFolderDataset(cfg.val, size, classes=tr.classes)
    if cfg.task == "segmentation":
        tr = SegmentationDataset(cfg.train, size, augment=True)
        va = SegmentationDataset(cfg.val, size)
        if va.classes != tr.classes:
            raise DatasetError(f"{cfg.val}/classes.txt lists {va.classes}, train lists {tr.classes}")
        return tr, va
    tr = CocoDetectionDataset(cfg.train, size, augment=True)
    va = CocoDetectionDataset(cfg.val, size)
    if va.classes != tr.classes:
        raise DatasetError(f"{cfg.val}: categories {va.classes} differ from train's {tr.classes}")
    return tr, va


def compute_loss(task: str, model: torch.nn.Module, images: torch.Tensor, targets: Any, num_classes: int) -> torch.Tensor:
    if task == "detection":
        from training.centernet import centernet_loss

        if getattr(model, "takes_uint8", False):  # torchvision detector: computes its own losses
            return model(images, targets)
        return centernet_loss(model.core(model.normalize(images)), targets, num_classes)
    return F.cross_entropy(model(images), targets)


def to_device(targets: Any, device: torch.device) -> Any:
    if isinstance(targets, torch.Tensor):
        return targets.to(device, non_blocking=True)
    return [{k: v.to(device) for k, v in t.items()} for t in targets]


@torch.no_grad()
def validate(task: str, model: torch.nn.Module, loader: DataLoader, classes: list[str], device: torch.device,
             val_root: str) -> dict[str, Any]:
    """Score the model on the validation loader; returns the task's metrics as a dict."""
    model.eval()
    if task == "classification":
        meter = ClassificationMeter(len(classes))
        for images, targets in loader:
            meter.update(model(images.to(device)).float().cpu().numpy(), targets.numpy())
        return meter.compute()
    if task == "segmentation":
        cm = ConfusionMatrix(len(classes))
        for images, masks in loader:
            cm.update(model(images.to(device)).argmax(1).cpu().numpy(), masks.numpy())
        return cm.compute(classes)
    from training.centernet import CenterNetExport

    if getattr(model, "takes_uint8", False):
        predict = model.predict
    else:
        decoder = CenterNetExport(model)
        predict = lambda x: list(zip(*decoder(x)))  # noqa: E731
    coco = load_coco(str(Path(val_root) / "annotations.json"))
    label_to_cat = sorted(coco.getCatIds())
    dets: list[dict[str, Any]] = []
    for images, targets in loader:
        for (boxes, scores, labels), t in zip(predict(images.to(device)), targets):
            boxes, scores, labels = boxes.cpu().numpy(), scores.cpu().numpy(), labels.cpu().numpy()
            keep = scores > 0.01
            bx = boxes[keep].copy()
            sx, sy = t["scale"].tolist()
            bx[:, [0, 2]] /= sx
            bx[:, [1, 3]] /= sy
            for (x1, y1, x2, y2), s, lab in zip(bx, scores[keep], labels[keep]):
                dets.append({"image_id": int(t["image_id"]), "category_id": label_to_cat[int(lab)],
                             "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)], "score": float(s)})
    return coco_detection_metrics(coco, dets)


def train(cfg: TrainConfig, out: Path, resume: bool = False) -> dict[str, Any]:
    """Run training; returns the best validation metrics. Checkpoints go to ``out``."""
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    train_ds, val_ds = make_datasets(cfg)
    cfg.classes = list(train_ds.classes)
    collate = detection_collate if cfg.task == "detection" else None
    g = torch.Generator().manual_seed(cfg.seed)
    train_dl = DataLoader(train_ds, cfg.batch_size, shuffle=True, num_workers=cfg.workers, collate_fn=collate,
                          generator=g, drop_last=len(train_ds) > cfg.batch_size, persistent_workers=cfg.workers > 0,
                          worker_init_fn=lambda w: np.random.seed(cfg.seed * 1000 + w + int(torch.initial_seed()) % 997))
    val_dl = DataLoader(val_ds, cfg.batch_size, shuffle=False, num_workers=cfg.workers, collate_fn=collate)
    model = build_model(cfg.task, cfg.arch, len(cfg.classes), cfg.width_mult, cfg.weights).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.epochs * len(train_dl)
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(total, 1), pct_start=0.15)
    start_epoch, step, best, history = 0, 0, -1.0, []
    out.mkdir(parents=True, exist_ok=True)
    if resume and (out / "last.pt").is_file():
        ck = torch.load(out / "last.pt", map_location=device, weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if ck["scheduler"].get("total_steps") == sched.total_steps:
            sched.load_state_dict(ck["scheduler"])
        else:  # --epochs/--max-steps changed: a fresh one-cycle over the steps that remain
            for group in opt.param_groups:
                group.pop("initial_lr", None)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(total - ck["step"], 1),
                                                        pct_start=0.15)
            print("training length changed since the checkpoint: new learning-rate schedule for the rest")
        start_epoch, step, best, history = ck["epoch"] + 1, ck["step"], ck["best"], ck["history"]
        print(f"resumed from {out / 'last.pt'} at epoch {start_epoch}")
    metric_name = PRIMARY_METRIC[cfg.task]
    best_metrics: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t0, losses = time.time(), []
        bar = tqdm(train_dl, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=None)
        for images, targets in bar:
            if step >= total:
                break
            loss = compute_loss(cfg.task, model, images.to(device), to_device(targets, device), len(cfg.classes))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            sched.step()
            step += 1
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        metrics = validate(cfg.task, model, val_dl, cfg.classes, device, cfg.val)
        score = float(metrics[metric_name])
        record = {"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else None,
                  "seconds": round(time.time() - t0, 1), **{k: v for k, v in metrics.items() if k != "iou"}}
        history.append(record)
        print(json.dumps(record), flush=True)
        state = {"model": model.state_dict(), "config": asdict(cfg), "metrics": metrics, "epoch": epoch,
                 "step": step, "history": history}
        if score > best:
            best, best_metrics = score, metrics
            torch.save(state, out / "best.pt")
        torch.save({**state, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "best": best},
                   out / "last.pt")
        if step >= total:
            break
    if not best_metrics and (out / "best.pt").is_file():
        best_metrics = torch.load(out / "best.pt", weights_only=True)["metrics"]
    return best_metrics


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train a CNN; see the module docstring.")
    p.add_argument("task", choices=sorted(DEFAULT_ARCH))
    p.add_argument("--train", required=True, help="training dataset directory")
    p.add_argument("--val", required=True, help="validation dataset directory (same format)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory")
    p.add_argument("--arch", help="architecture (default per task: %s)" % DEFAULT_ARCH)
    p.add_argument("--size", type=int, default=128, help="square model input side in pixels (default 128)")
    p.add_argument("--width-mult", type=float, default=1.0, help="MobileNetV3 width multiplier (default 1.0)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (one-cycle, AdamW)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--weights", help="local state-dict file to initialise from (optional)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps")
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    a = p.parse_args(argv)
    cfg = TrainConfig(task=a.task, train=a.train, val=a.val, arch=a.arch or DEFAULT_ARCH[a.task], size=a.size,
                      width_mult=a.width_mult, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                      weight_decay=a.weight_decay, seed=a.seed, workers=a.workers, device=a.device,
                      weights=a.weights, max_steps=a.max_steps)
    try:
        best = train(cfg, a.out, resume=a.resume)
    except DatasetError as exc:
        print(f"dataset error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps({"best": best, "checkpoint": str(a.out / "best.pt")}))


if __name__ == "__main__":
    main()
