"""training.visualize: the first layer's filters, activation maps and class activation maps as PNGs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from core.imaging import load_input
from tests.support.servers import ROOT
from training.visualize import load_classifier


def test_visualize_writes_filters_activations_and_cams(tiny_arch_repo, tiny_data, tmp_path) -> None:
    image = sorted((tiny_data / "cls" / "val" / "star").glob("*.jpg"))[0]
    r = subprocess.run([sys.executable, "-m", "training.visualize", str(tiny_arch_repo["resnet18"]),
                        "--image", str(image), "--out", str(tmp_path / "viz"), "--top", "2"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    written = set(summary["written"])
    assert {"filters.png", "activations_layer1.png", "activations_layer4.png"} <= written
    filters = Image.open(tmp_path / "viz" / "filters.png")
    assert filters.size == (8 * 50 + 2, 8 * 50 + 2)  # ResNet's 64 first-layer filters in an 8x8 grid
    assert np.asarray(filters).std() > 10  # not a blank grid
    cams = [w for w in summary["written"] if w.startswith("cam_")]
    assert len(cams) == 2 and cams[0] == f"cam_1_{summary['top'][0]['label']}.png"
    upright = Image.open(image)
    assert Image.open(tmp_path / "viz" / cams[0]).size == upright.size
    # the top classes are the model's
    model, cfg = load_classifier(tiny_arch_repo["resnet18"])
    from training.graph import graph_contract

    spec = graph_contract(model, "classification", cfg["classes"], cfg["size"]).input
    x = torch.from_numpy(np.ascontiguousarray(load_input(image, spec)[1]))[None]
    with torch.no_grad():
        best = int(model(x)[0].argmax())
    assert summary["top"][0]["label"] == cfg["classes"][best]


def test_visualize_names_a_wrong_layer(tiny_arch_repo, tiny_data, tmp_path) -> None:
    image = sorted((tiny_data / "cls" / "val" / "star").glob("*.jpg"))[0]
    r = subprocess.run([sys.executable, "-m", "training.visualize", str(tiny_arch_repo["vgg11"]), "--image", str(image),
                        "--out", str(tmp_path), "--layers", "features.99"], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 2 and "no layer named 'features.99'" in r.stderr and "Traceback" not in r.stderr
