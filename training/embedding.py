"""Similarity learning: a network whose unit-length output vectors lie close for views of one
identity and far apart for different ones.

The network (:class:`Embedder`) is a classification architecture's convolutional features
(training.classifiers: any of its families, so ``--weights`` takes torchvision's or our own
classifier checkpoints), global-average pooled, then a projection head (linear, batch norm,
ReLU, linear to ``dimension``) and L2 normalisation inside the graph: the service and the
galleries compare embeddings by their dot product (cosine similarity).

Losses (:data:`LOSSES`, pytorch-metric-learning's, on Euclidean distances of the normalised
vectors): ``contrastive`` (the default: the Siamese loss of Chopra, Hadsell and LeCun,
2005/2006, over every pair of a batch; a positive pair is pulled together, a negative one
pushed beyond a margin of 1.0) and ``triplet`` (anchor, positive and negative, margin 0.2,
with FaceNet's semi-hard mining: Schroff, Kalenichenko and Philbin, 2015). Batches hold
``views_per_identity`` views of each of batch / views identities (pytorch-metric-learning's
MPerClassSampler, training.train.identity_batches), so every anchor has positives to mine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.contract import EmbeddingSpec, OutputSpec
from training import classifiers
from training.convnet import ConvNet, Normalize

DEFAULT_DIMENSION = 128
HIDDEN = 512  # the projection head's hidden width
PROBE_SIDE = 64  # the side of the dummy image that measures the features' width (LeNet-5: its own 32)


def _contrastive() -> tuple[nn.Module, nn.Module | None]:
    from pytorch_metric_learning import losses

    return losses.ContrastiveLoss(pos_margin=0.0, neg_margin=1.0), None  # None: every pair of the batch


def _triplet() -> tuple[nn.Module, nn.Module | None]:
    from pytorch_metric_learning import losses, miners

    # FaceNet's semi-hard triplets: negatives farther than the positive but within the margin.
    # Batch-hard mining (each anchor's hardest pair) collapsed every embedding onto one point
    # from random weights here (loss stuck at the margin, recall@1 0.05 after 9 epochs).
    return losses.TripletMarginLoss(margin=0.2), miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard")


# loss name -> (loss, miner or None); the miner picks which pairs or triplets of a batch count
LOSSES: dict[str, Callable[[], tuple[nn.Module, nn.Module | None]]] = {
    "triplet": _triplet, "contrastive": _contrastive,
}
# Measured (400 identities x 8 views, 6 epochs, lr 2e-3, validation on 100 unseen identities):
# contrastive recall@1 0.363 / mAP@R 0.217, semi-hard triplets 0.172 / 0.080.
DEFAULT_LOSS = "contrastive"


class Embedder(ConvNet):
    """Normalize, a classifier architecture's features, average pooling, the projection head,
    L2 normalisation: [N, dimension] unit vectors (see the module docstring)."""

    output_spec = OutputSpec(kind="l2_normalized", embedding="embedding")

    def __init__(self, arch: str, dimension: int = DEFAULT_DIMENSION, width_mult: float = 1.0, channels: int = 3,
                 loss: str = DEFAULT_LOSS, probe_side: int = PROBE_SIDE) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; known: {sorted(LOSSES)}")
        family = classifiers.family_of(arch)
        self.arch, self._family, self.loss_name = arch, family, loss
        self.normalize = Normalize(channels=channels if family.input_channels_from_data else 3)
        # The network's own classifier head is never run: one class keeps it small (and out of the graph).
        self.core = family.build(arch, 1, width_mult, channels)
        self.last_layers = family.last_layer  # what a weights file of another class count does not fill
        with torch.no_grad():
            width = self._pooled(torch.zeros(2, probe_side, probe_side, channels, dtype=torch.uint8)).shape[1]
        self.head = nn.Sequential(nn.Linear(width, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(inplace=True),
                                  nn.Linear(HIDDEN, dimension))
        self.embedding_spec = EmbeddingSpec(dimension=dimension, metric="cosine")
        self._criterion = LOSSES[loss]()

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        was = self.core.training
        self.core.eval()  # the probe must not move batch-norm statistics
        try:
            return self._family.features(self.core, self.normalize(x)).mean(dim=(2, 3))
        finally:
            self.core.train(was)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self._family.features(self.core, self.normalize(x)).mean(dim=(2, 3))
        return F.normalize(self.head(pooled), dim=1)

    def loss(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss, miner = self._criterion
        embeddings = self(images)
        mined: Any = miner(embeddings, targets) if miner is not None else None
        return loss(embeddings, targets, mined)
