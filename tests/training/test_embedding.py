"""Similarity learning (training.embedding): identity batches, both losses learn, unit-length
embeddings, and the whole path of an embedding model: training.train with retrieval metrics,
export.onnx_export with its parity check and contract; a classifier checkpoint starts one."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from training.identities import write_identities

SIZE = 64


@pytest.fixture(scope="module")
def identities(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("identities")
    write_identities(root / "train", 12, 4, seed=3, size=SIZE)
    write_identities(root / "val", 6, 3, seed=4, size=SIZE)
    return {"train": root / "train", "val": root / "val"}


def test_batches_hold_several_views_of_each_identity(identities: dict[str, Path]) -> None:
    from training.datasets import ImageFolderDataset
    from training.train import TrainConfig, identity_batches

    data = ImageFolderDataset(identities["train"], (SIZE, SIZE))
    cfg = TrainConfig(task="embedding", train="", val="", arch="mobilenet_v3_small", batch_size=16,
                      views_per_identity=4)
    order = list(identity_batches(data, cfg))
    for start in range(0, len(order), 16):
        counts = Counter(data.samples[i].target for i in order[start:start + 16])
        assert set(counts.values()) == {4} and len(counts) == 4
    with pytest.raises(ValueError, match="multiple of --views-per-identity"):
        identity_batches(data, TrainConfig(task="embedding", train="", val="", arch="x", batch_size=10))


@pytest.mark.parametrize("loss", ["contrastive", "triplet"])
def test_each_loss_pulls_views_of_an_identity_together(loss: str) -> None:
    """Eight images, two views each of four random patterns: a few steps of either loss raise
    the gap between same-identity and other-identity similarity."""
    from training.models import build_model

    torch.manual_seed(0)
    model = build_model("embedding", "mobilenet_v3_small", 4, 0.5, embedding={"dimension": 16, "loss": loss})
    patterns = torch.randint(0, 256, (4, SIZE, SIZE, 3), dtype=torch.uint8)
    noise = torch.randint(-20, 21, (8, SIZE, SIZE, 3))
    images = (patterns.repeat_interleave(2, 0).int() + noise).clamp(0, 255).to(torch.uint8)
    targets = torch.arange(4).repeat_interleave(2)
    same = targets[:, None] == targets[None]
    off_diagonal = ~torch.eye(8, dtype=torch.bool)

    def gap() -> float:  # with the batch's own statistics: a few steps leave the running ones behind
        model.train()
        with torch.no_grad():
            e = model(images)
        sim = e @ e.T
        return float(sim[same & off_diagonal].mean() - sim[~same].mean())

    before = gap()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(12):
        model.train()
        loss_value = model.loss(images, targets)
        opt.zero_grad()
        loss_value.backward()
        opt.step()
    assert gap() > before + 0.05
    model.eval()
    with torch.no_grad():
        norms = model(images).norm(dim=1)
    np.testing.assert_allclose(norms.numpy(), 1.0, rtol=1e-5)


def test_training_and_export_write_an_embedding_contract_with_parity(identities: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    from core.onnx_contract import read_contract
    from core.runtime import OnnxModel
    from export.evaluate import evaluate
    from export.onnx_export import export
    from training.train import TrainConfig, train

    cfg = TrainConfig(task="embedding", train=str(identities["train"]), val=str(identities["val"]),
                      arch="mobilenet_v3_small", size=SIZE, width_mult=0.5, epochs=1, batch_size=16, workers=0,
                      max_steps=3, embedding={"dimension": 24, "loss": "contrastive"})
    metrics = train(cfg, tmp_path / "run")
    assert {"recall_at_1", "recall_at_5", "map_at_r"} <= set(metrics) and metrics["queries"] == 18
    path, report = export(tmp_path / "run" / "best.pt", "ids", "1", tmp_path / "models", "identities",
                          identities["val"], 8)
    contract = read_contract(path)
    assert contract.task == "embedding" and contract.labels == []
    assert contract.embedding is not None and contract.embedding.dimension == 24
    assert contract.outputs.kind == "l2_normalized" and contract.outputs.embedding == "embedding"
    assert report["min_cosine"] >= 0.9999 and report["nearest_neighbours_compared"] == 8
    model = OnnxModel.load(path, "ids", "1", "cpu", 1)
    (out,) = model.infer(np.zeros((1, SIZE, SIZE, 3), np.uint8))
    assert out["embedding"].shape == (24,) and abs(float(np.linalg.norm(out["embedding"])) - 1) < 1e-5
    # the metrics in the provenance are what export.evaluate reports for the file
    scored = evaluate(path, identities["val"])
    assert contract.provenance["metrics"]["map_at_r"] == pytest.approx(scored["map_at_r"], abs=0.02)


def test_embedding_parity_refuses_moved_vectors() -> None:
    from export.parity import ParityError, check_embeddings_agree
    from tests.support.models import contract as make_contract

    c = make_contract("embedding", {"kind": "l2_normalized", "embedding": "e"}, labels=(),
                      embedding={"dimension": 4})
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(6, 4)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    same = [{"e": v} for v in vectors]
    assert check_embeddings_agree(c, same, same)["min_cosine"] == pytest.approx(1.0)
    moved = [{"e": v + np.float32(0.01)} for v in vectors]
    with pytest.raises(ParityError, match="embeddings differ by up to"):
        check_embeddings_agree(c, same, moved)


def test_a_classifier_checkpoint_starts_an_embedding_model(tiny_checkpoints: dict[str, Path]) -> None:
    """Transfer learning: a classifier's convolutional features load into the embedding model
    (its class-sized layer is never run); the projection head starts fresh."""
    from training.checkpoints import read
    from training.models import build_model

    model = build_model("embedding", "mobilenet_v3_small", 1, 0.5, weights=tiny_checkpoints["classification"],
                        embedding={"dimension": 16, "loss": "contrastive"})
    classifier = read(tiny_checkpoints["classification"])["model"]
    own = model.state_dict()
    for key in ("core.features.0.0.weight", "core.features.3.block.0.0.weight"):
        assert torch.equal(own[key], classifier[key])
    assert own["head.3.weight"].shape == (16, 512)
