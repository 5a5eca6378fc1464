"""Train a classifier, segmenter, detector, keypoint or embedding model on a dataset directory.

Usage (see README "Train on your own data")::

    python -m training.train classification --train data/cls/train --val data/cls/val \\
        --arch mobilenet_v3_small --size 128 --epochs 8 --out runs/classifier

Laid out like torchvision's references: :func:`train_one_epoch`, :func:`evaluate` and
:func:`train`, which runs them and writes ``<out>/last.pt`` every epoch and
``<out>/best.pt`` when the task's validation metric (core.tasks: top-1, mIoU, COCO mAP@.5,
keypoint OKS AP@.5 or retrieval mAP@R) improves. Validation scores the module that
export.onnx_export turns into the graph, with core.evaluation, so the metrics stored in a checkpoint are those
``export.evaluate`` reports for its ONNX file. training.checkpoints writes and reads the
checkpoints; ``--resume`` continues from ``<out>/last.pt``. What each task trains on is one
entry of :data:`TASK_DATA`.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from core.contract import NEEDS_EMBEDDING, NEEDS_KEYPOINTS, KeypointSpec
from core.errors import DatasetError
from core.evaluation import evaluate as evaluate_predictions
from core.tasks import TASKS
from training import checkpoints
from training.datasets import (
    CocoDetectionDataset,
    ImageFolderDataset,
    SegmentationDataset,
    data_channels,
    detection_collate,
    seed_worker,
)
from training.embedding import DEFAULT_DIMENSION, DEFAULT_LOSS, LOSSES
from training.graph import graph_contract, predictor
from training.models import DEFAULT_ARCH, ConvNet, build_model, default_size


@dataclass(frozen=True)
class TaskData:
    """What a task trains on: its dataset class (``(root, size, augment=, channels=)``, with
    ``classes``), how a batch is put together (None: PyTorch's default stacking), which
    sampler draws the batches (``(dataset, config) -> Sampler``; None: shuffled) and whether
    the validation set holds the training set's classes (not for identities: an embedding
    model is validated on identities it never saw) and whether mirrored images may train it."""

    dataset: Callable[..., Dataset]
    collate: Callable[[list[Any]], Any] | None = None
    sampler: Callable[[Any, TrainConfig], Any] | None = None
    same_classes: bool = True
    flips: bool = True  # horizontal flips as augmentation (a mirrored identity is another one)


def identity_batches(dataset: ImageFolderDataset, cfg: TrainConfig) -> Any:
    """Batches of ``views_per_identity`` views of each of batch / views identities
    (pytorch-metric-learning's MPerClassSampler: every anchor has positives in its batch);
    one pass is as long as the data set."""
    from pytorch_metric_learning.samplers import MPerClassSampler

    if cfg.batch_size % cfg.views_per_identity:
        raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of --views-per-identity "
                         f"{cfg.views_per_identity}")
    labels = [s.target for s in dataset.samples]
    return MPerClassSampler(labels, cfg.views_per_identity, batch_size=cfg.batch_size,
                            length_before_new_iter=max(len(labels) // cfg.batch_size, 1) * cfg.batch_size)


TASK_DATA: dict[str, TaskData] = {
    "classification": TaskData(ImageFolderDataset),
    "segmentation": TaskData(SegmentationDataset),
    "detection": TaskData(CocoDetectionDataset, detection_collate),  # images stacked, targets a list
    "keypoints": TaskData(CocoDetectionDataset, detection_collate),  # targets also hold keypoints [K, P, 3]
    # targets also hold each object's mask [K, H, W]
    "instance_segmentation": TaskData(functools.partial(CocoDetectionDataset, masks=True), detection_collate),
    # one folder per identity; validated by retrieval among identities the training never saw
    "embedding": TaskData(ImageFolderDataset, sampler=identity_batches, same_classes=False, flips=False),
}


@dataclass
class TrainConfig:
    task: str
    train: str
    val: str
    arch: str
    size: int = 128
    width_mult: float = 1.0
    channels: int = 0                 # 1 (greyscale) or 3; 0: from the data (training.datasets.data_channels)
    freeze: str | None = None         # "backbone": feature extraction, only the new head trains
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
    keypoints: dict[str, Any] | None = None  # keypoint tasks: the data's KeypointSpec (names, skeleton, sigmas)
    embedding: dict[str, Any] | None = None  # embedding tasks: training.embedding's options (dimension, loss)
    views_per_identity: int = 4              # embedding tasks: views of each identity in a batch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA when torch sees it, else CPU. ``cuda`` without CUDA is a ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but torch sees no CUDA device")
    return torch.device(name)


def make_datasets(cfg: TrainConfig) -> tuple[Any, Any]:
    """(train, val) datasets; the validation set must list the training set's classes."""
    dataset = TASK_DATA[cfg.task].dataset
    size = (cfg.size, cfg.size)
    train_ds = dataset(cfg.train, size, augment=TASK_DATA[cfg.task].flips, channels=cfg.channels or 3)
    val_ds = dataset(cfg.val, size, channels=cfg.channels or 3)
    if TASK_DATA[cfg.task].same_classes and val_ds.classes != train_ds.classes:
        raise DatasetError(f"{cfg.val}: classes {val_ds.classes} differ from the training set's {train_ds.classes}")
    if cfg.task in NEEDS_KEYPOINTS:
        names = (train_ds.data.keypoint_names, val_ds.data.keypoint_names)
        if not names[0]:
            raise DatasetError(f"{cfg.train}: no category lists 'keypoints': not a keypoint data set")
        if names[1] != names[0]:
            raise DatasetError(f"{cfg.val}: keypoints {names[1]} differ from the training set's {names[0]}")
    return train_ds, val_ds


def keypoint_spec(dataset: Any) -> KeypointSpec:
    """The keypoint names, skeleton and OKS sigmas of a keypoint training set (into the contract)."""
    data = dataset.data
    return KeypointSpec(list(data.keypoint_names), [list(e) for e in data.skeleton], list(data.sigmas))


def to_device(targets: Any, device: torch.device) -> Any:
    if isinstance(targets, torch.Tensor):
        return targets.to(device, non_blocking=True)
    return [{k: v.to(device) for k, v in t.items()} for t in targets]


def train_one_epoch(model: ConvNet, optimizer: torch.optim.Optimizer, scheduler: Any, loader: DataLoader,
                    device: torch.device, epoch: str, step: int, total_steps: int) -> tuple[list[float], int]:
    """One pass over ``loader`` (stopping at ``total_steps``); returns (losses, step)."""
    model.train()
    losses: list[float] = []
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=None)
    for images, targets in bar:
        if step >= total_steps:
            break
        loss = model.loss(images.to(device), to_device(targets, device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        scheduler.step()
        step += 1
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    return losses, step


def evaluate(model: ConvNet, cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    """The task's metrics on ``cfg.val``: core.evaluation over the module export writes."""
    model.eval()
    contract = graph_contract(model, cfg.task, cfg.classes, cfg.size, channels=cfg.channels)
    return evaluate_predictions(predictor(model, contract, device), contract, cfg.val, cfg.batch_size)


def _one_cycle(optimizer: torch.optim.Optimizer, lr: float, steps: int) -> Any:
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(steps, 1), pct_start=0.15)


def train(cfg: TrainConfig, out: Path, resume: bool = False) -> dict[str, Any]:
    """Run training; returns the best validation metrics. Checkpoints go to ``out``."""
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    if not cfg.channels:
        cfg.channels = data_channels(cfg.task, cfg.train)
    train_ds, _ = make_datasets(cfg)
    cfg.classes = list(train_ds.classes)
    if cfg.task in NEEDS_KEYPOINTS:
        cfg.keypoints = asdict(keypoint_spec(train_ds))
    if cfg.task in NEEDS_EMBEDDING and cfg.embedding is None:
        cfg.embedding = {"dimension": DEFAULT_DIMENSION, "loss": DEFAULT_LOSS}
    data = TASK_DATA[cfg.task]
    sampler = data.sampler(train_ds, cfg) if data.sampler else None
    train_dl = DataLoader(train_ds, cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                          num_workers=cfg.workers, collate_fn=data.collate,
                          generator=torch.Generator().manual_seed(cfg.seed),
                          drop_last=len(train_ds) > cfg.batch_size, persistent_workers=cfg.workers > 0,
                          worker_init_fn=seed_worker)
    model = build_model(cfg.task, cfg.arch, len(cfg.classes), cfg.width_mult, cfg.weights, cfg.channels,
                        cfg.freeze, KeypointSpec(**cfg.keypoints) if cfg.keypoints else None,
                        cfg.embedding).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.epochs * len(train_dl)
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    sched = _one_cycle(opt, cfg.lr, total)
    start_epoch, step, best, history = 0, 0, -1.0, []
    out.mkdir(parents=True, exist_ok=True)
    last, best_path = out / checkpoints.LAST, out / checkpoints.BEST
    if resume and last.is_file():
        ck = checkpoints.restore(last, model, opt, device)
        if ck["scheduler"].get("total_steps") == sched.total_steps:
            sched.load_state_dict(ck["scheduler"])
        else:  # --epochs/--max-steps changed: a fresh one-cycle over the steps that remain
            for group in opt.param_groups:
                group.pop("initial_lr", None)
            sched = _one_cycle(opt, cfg.lr, total - ck["step"])
            print("training length changed since the checkpoint: new learning-rate schedule for the rest")
        start_epoch, step, best, history = ck["epoch"] + 1, ck["step"], ck["best"], ck["history"]
        print(f"resumed from {last} at epoch {start_epoch}")
    metric = TASKS[cfg.task].metric
    best_metrics: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        losses, step = train_one_epoch(model, opt, sched, train_dl, device, f"{epoch + 1}/{cfg.epochs}", step, total)
        metrics = evaluate(model, cfg, device)
        score = float(metrics[metric])
        record = {"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else None,
                  "seconds": round(time.time() - t0, 1), **{k: v for k, v in metrics.items() if k != "iou"}}
        history.append(record)
        print(json.dumps(record), flush=True)
        if score > best:
            best, best_metrics = score, metrics
            checkpoints.save(best_path, model, asdict(cfg), metrics, epoch, step, history)
        checkpoints.save(last, model, asdict(cfg), metrics, epoch, step, history, opt, sched, best)
        if step >= total:
            break
    if not best_metrics and best_path.is_file():
        best_metrics = checkpoints.metrics(best_path)
    return best_metrics


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train a CNN; see the module docstring.")
    p.add_argument("task", choices=sorted(TASKS))
    p.add_argument("--train", required=True, help="training dataset directory")
    p.add_argument("--val", required=True, help="validation dataset directory (same format)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory")
    p.add_argument("--arch", help=f"architecture (default per task: {DEFAULT_ARCH})")
    p.add_argument("--size", type=int, help="square model input side in pixels (default: the architecture's, "
                   "32 for lenet5, 224 for the other classifiers and the segmenters, 256 for CenterNet)")
    p.add_argument("--width-mult", type=float, default=1.0,
                   help="width multiplier for MobileNetV3, AlexNet and VGG (default 1.0: the published widths)")
    p.add_argument("--channels", type=int, choices=[1, 3], help="input channels (default: 1 if every training "
                   "image is greyscale, else 3)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (one-cycle, AdamW)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--weights", help="local state-dict file to start from (torchvision's format or a checkpoint of "
                   "ours): fine-tuning; the head is replaced when the class count differs")
    p.add_argument("--freeze", choices=["backbone"],
                   help="with --weights: train only the new head (feature extraction)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps")
    p.add_argument("--loss", choices=sorted(LOSSES), default=DEFAULT_LOSS,
                   help="embedding: triplets with batch-hard mining, or contrastive pairs (Siamese)")
    p.add_argument("--dimension", type=int, default=DEFAULT_DIMENSION, help="embedding: the vectors' length")
    p.add_argument("--views-per-identity", type=int, default=4,
                   help="embedding: views of each identity in a batch (the batch size must be a multiple)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    a = p.parse_args(argv)
    arch = a.arch or DEFAULT_ARCH[a.task]
    cfg = TrainConfig(task=a.task, train=a.train, val=a.val, arch=arch, size=a.size or default_size(arch),
                      width_mult=a.width_mult, channels=a.channels or 0, freeze=a.freeze, epochs=a.epochs,
                      batch_size=a.batch_size, lr=a.lr, weight_decay=a.weight_decay, seed=a.seed, workers=a.workers,
                      device=a.device, weights=a.weights, max_steps=a.max_steps,
                      views_per_identity=a.views_per_identity,
                      embedding={"dimension": a.dimension, "loss": a.loss} if a.task in NEEDS_EMBEDDING else None)
    try:
        best = train(cfg, a.out, resume=a.resume)
    except DatasetError as exc:
        print(f"dataset error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except ValueError as exc:
        # an unknown architecture, a weights file that does not fit, --device cuda without CUDA, ...
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps({"best": best, "checkpoint": str(a.out / checkpoints.BEST)}))


if __name__ == "__main__":
    main()
