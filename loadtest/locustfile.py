"""Locust load test for /classify, /detect and /segment with a realistic image mix.

Run it through the wrapper (headless, bounded, with CSV/HTML/PNG output)::

    python -m loadtest.run --host http://127.0.0.1:3000 --users 8 --spawn-rate 4 --run-time 30s

or directly: ``locust -f loadtest/locustfile.py --headless --host ... -u 8 -r 4 -t 30s``.
CONVSERVE_LOAD_ENDPOINTS picks the endpoints and their weights (default
``classify:3,detect:2,segment:1``); CONVSERVE_LOAD_IMAGES the size of the image mix
(loadtest/images.py), or CONVSERVE_LOAD_IMAGE_DIR a folder of images to use instead.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from locust import HttpUser, between, events, task

from loadtest.images import image_mix

IMAGES: list[tuple[str, bytes, str]] = []


def _endpoints() -> list[tuple[str, int]]:
    raw = os.environ.get("CONVSERVE_LOAD_ENDPOINTS", "classify:3,detect:2,segment:1")
    out = []
    for item in raw.split(","):
        name, _, weight = item.partition(":")
        out.append((name.strip(), int(weight or 1)))
    return out


@events.init.add_listener
def _make_images(environment, **_kw) -> None:
    folder = os.environ.get("CONVSERVE_LOAD_IMAGE_DIR")
    if folder:  # written once by loadtest.run, so each level does not pay for making them
        for p in sorted(Path(folder).iterdir()):
            IMAGES.append((p.name, p.read_bytes(), "image/png" if p.suffix == ".png" else "image/jpeg"))
    else:
        IMAGES.extend(image_mix(int(os.environ.get("CONVSERVE_LOAD_IMAGES", "20"))))


class ImageClient(HttpUser):
    """Posts a random image of the mix to a weighted random endpoint, back to back."""

    wait_time = between(0, 0.01)

    def on_start(self) -> None:
        self.rng = random.Random(id(self))
        self.choices = [name for name, w in _endpoints() for _ in range(w)]

    @task
    def post_image(self) -> None:
        endpoint = self.rng.choice(self.choices)
        name, data, ctype = self.rng.choice(IMAGES)
        size = name.rsplit("_", 1)[1].split(".")[0]
        with self.client.post(f"/{endpoint}", files={"image": (name, data, ctype)},
                              name=f"/{endpoint} [{size}]", catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
