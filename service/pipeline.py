"""What the service does to one uploaded image, without any HTTP: decode and fit it to the
model input with core.imaging.load_input, under the service's byte and pixel limits.

The training loaders call the same function, so a model is served exactly the pixels it
was trained on (tests/service/test_tiny_server.py checks it for the awkward formats).
"""

from __future__ import annotations

import numpy as np

from core.contract import ModelContract
from core.geometry import Geometry
from core.imaging import DecodedImage, load_input
from service.settings import Settings


def preprocess(data: bytes, contract: ModelContract, settings: Settings) -> tuple[DecodedImage, np.ndarray, Geometry]:
    """Decode ``data`` and resize it to ``contract``'s input; InvalidImage / ImageTooLarge."""
    return load_input(data, contract.input, max_bytes=settings.max_bytes, max_pixels=settings.max_pixels)
