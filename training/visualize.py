"""What a trained classifier looks at, drawn the way the lecture notes draw it.

Usage::

    python -m training.visualize runs/my-classifier/best.pt --image photo.jpg --out viz/ \\
        [--layers features.3,features.6] [--top 3]

writes PNGs into ``--out``:

- ``filters.png``: the first convolution's filters as a grid (Zeiler & Fergus 2014, figure 2):
  each filter scaled to 0..255 on its own, enlarged; RGB filters in colour, others in grey;
- ``activations_<layer>.png``: the feature maps of each chosen layer for the image (up to
  64 channels in a grid, each scaled on its own); default: every stage's output
  (``Classifier.stages``, from the architecture's family in training.classifiers);
- ``cam_<k>_<label>.png``: Grad-CAM (Selvaraju et al. 2017) of the k-th best class blended
  over the image: the last feature maps weighted by the mean gradient of that class's logit,
  computed here with autograd (the exported graph's ``cam`` output computes the same without
  gradients: tests compare the two);

and prints a JSON summary (top classes, the files written). The image is prepared as the
service prepares uploads (core.imaging.load_input).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from core.errors import ConvserveError
from core.imaging import load_image, load_input
from core.postprocess import blend_heatmap
from training.graph import graph_contract
from training.models import Classifier, load_checkpoint

CELL = 48          # pixels per filter / feature map in the grids
MAX_MAPS = 64


def load_classifier(checkpoint: Path) -> tuple[Classifier, dict[str, Any]]:
    """A trained classifier in eval mode and its training config (training.checkpoints)."""
    model, cfg, _ = load_checkpoint(checkpoint)
    if not isinstance(model, Classifier):
        raise ValueError(f"{checkpoint}: a {cfg['task']} checkpoint; visualisation is for classifiers")
    return model, cfg


def _scale(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    return np.zeros(a.shape, np.uint8) if hi <= lo else np.round((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def grid(tiles: list[np.ndarray], cell: int = CELL, pad: int = 2) -> Image.Image:
    """Square-ish grid of uint8 tiles ([h, w] grey or [h, w, 3] colour), each enlarged to ``cell``."""
    cols = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    canvas = Image.new("RGB", (cols * (cell + pad) + pad, rows * (cell + pad) + pad), (255, 255, 255))
    for i, tile in enumerate(tiles):
        img = Image.fromarray(tile, "RGB" if tile.ndim == 3 else "L").convert("RGB")
        img = img.resize((cell, cell), Image.NEAREST)
        canvas.paste(img, (pad + (i % cols) * (cell + pad), pad + (i // cols) * (cell + pad)))
    return canvas


def filter_grid(model: Classifier) -> Image.Image:
    """The first convolution's filters: [out, in, k, k] -> one tile per output channel."""
    w = model.first_conv().weight.detach().cpu().numpy()
    tiles = [_scale(f.transpose(1, 2, 0)) if f.shape[0] == 3 else _scale(f.mean(0)) for f in w]
    return grid(tiles)


def activations(model: Classifier, x: torch.Tensor, layers: list[str]) -> dict[str, np.ndarray]:
    """The outputs [C, h, w] of the named submodules of the network for one image."""
    modules = dict(model.core.named_modules())
    missing = [n for n in layers if n not in modules]
    if missing:
        raise ValueError(f"no layer named {missing[0]!r}; e.g. {', '.join(model.stages())}")
    seen: dict[str, np.ndarray] = {}
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o[0].detach().cpu().numpy()))
             for n in layers]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def grad_cam(model: Classifier, x: torch.Tensor, class_id: int) -> np.ndarray:
    """Grad-CAM [h, w] of ``class_id`` for one uint8 image [1, H, W, C], by autograd."""
    from training.classifiers import head_outputs

    features = model.features(x).detach().requires_grad_(True)
    logits, _, _ = head_outputs(model.head, features, want_cam=False)
    (grad,) = torch.autograd.grad(logits[0, class_id], features)
    weights = grad[0].mean(dim=(1, 2))
    return F.relu((weights[:, None, None] * features[0]).sum(0)).detach().cpu().numpy()


def overlay(image: Image.Image, cam: np.ndarray) -> Image.Image:
    """``cam`` (any grid) stretched over ``image`` and blended in blue -> yellow -> red."""
    heat = Image.fromarray(cam.astype(np.float32), "F").resize(image.size, Image.BILINEAR)
    t = np.asarray(heat)
    t = t / t.max() if t.max() > 0 else t
    return Image.fromarray(blend_heatmap(np.asarray(image.convert("RGB")), t), "RGB")


def visualize(checkpoint: Path, image: Path, out: Path, layers: list[str] | None = None, top: int = 3
              ) -> dict[str, Any]:
    """Write the PNGs of the module docstring; returns the summary."""
    model, cfg = load_classifier(checkpoint)
    contract = graph_contract(model, "classification", cfg["classes"], cfg["size"], channels=cfg.get("channels") or 3)
    decoded, arr, _ = load_input(image, contract.input)
    x = torch.from_numpy(np.ascontiguousarray(arr))[None]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    filter_grid(model).save(out / "filters.png")
    written.append("filters.png")
    for name, maps in activations(model, x, layers or model.stages()).items():
        if maps.ndim != 3:
            continue
        path = f"activations_{name.replace('.', '_')}.png"
        grid([_scale(m) for m in maps[:MAX_MAPS]]).save(out / path)
        written.append(path)
    with torch.no_grad():
        probs = torch.softmax(model(x)[0].double(), 0).numpy()
    upright = load_image(image).image
    best = []
    for k, class_id in enumerate(np.argsort(-probs)[:top], start=1):
        label = cfg["classes"][class_id]
        path = f"cam_{k}_{label}.png"
        overlay(upright, grad_cam(model, x, int(class_id))).save(out / path)
        written.append(path)
        best.append({"label": label, "label_id": int(class_id), "score": round(float(probs[class_id]), 6)})
    return {"image": str(image), "top": best, "written": written, "out": str(out)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Draw a classifier's filters, activations and class activation maps.")
    p.add_argument("checkpoint", type=Path, help="a classification checkpoint (best.pt)")
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="folder for the PNGs")
    p.add_argument("--layers", help="comma-separated layer names (default: one per stage)")
    p.add_argument("--top", type=int, default=3, help="class activation maps for this many best classes")
    a = p.parse_args(argv)
    try:
        summary = visualize(a.checkpoint, a.image, a.out, a.layers.split(",") if a.layers else None, a.top)
    except (ConvserveError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
