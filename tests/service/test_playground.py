"""The playground in a real headless Chromium (Debian's chromium, driven by Playwright): pick a
model, upload an image, wait for the drawing, and check the page's answer and the pixels of a
screenshot; a file that is not an image shows the service's error message; an embedding model
enrols images in a gallery and searches it.

Needs ``apt-get install chromium`` (``.ci/run`` installs it); skipped, saying so, where no
browser is installed."""

from __future__ import annotations

import io
import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.render import colour
from tests.support.http import post
from tests.support.images import jpeg, scene

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here: apt-get install chromium")
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


# Records every Content-Security-Policy violation of a page (the pages are served with a CSP,
# service/pages.py): the browser fires this event for each thing the policy blocks.
CSP_PROBE = """document.addEventListener("securitypolicyviolation", (e) => {
  (window.cspViolations = window.cspViolations || []).push(`${e.violatedDirective} ${e.blockedURI}`);
});"""


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def csp_messages() -> list[str]:
    """The console's CSP messages ("Refused to ... Content Security Policy") of the playground page."""
    return []


def _watched_page(browser, requests: list[str], csp_messages: list[str]):
    """A new page that records the URLs it asks for and the CSP violations it meets."""
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    context.on("request", lambda r: requests.append(r.url))
    context.add_init_script(CSP_PROBE)
    pg = context.new_page()
    pg.on("console", lambda m: "Content Security Policy" in m.text and csp_messages.append(m.text))
    return pg


@pytest.fixture(scope="module")
def page(server, browser, csp_messages) -> Iterator:
    requests: list[str] = []
    pg = _watched_page(browser, requests, csp_messages)
    pg.goto(server.url + "/playground/")
    # a function: a bare expression is eval'ed, which the CSP refuses
    pg.wait_for_function("() => document.body.dataset.models > 0")
    yield pg
    assert all(u.startswith(server.url) or u.startswith("data:") or u.startswith("blob:") for u in requests), requests
    pg.context.close()


def _settle(page, action) -> None:
    """Does ``action`` (a click, a choice) and waits until the page has its answer or its error."""
    page.evaluate("document.body.dataset.state = ''")
    action()
    page.wait_for_function("() => ['done', 'error'].includes(document.body.dataset.state)", timeout=30000)


def _upload(page, path: Path) -> dict:
    """Chooses the file at ``path``; the answer the page got (the last good one after an error)."""
    _settle(page, lambda: page.set_input_files("#file", str(path)))
    return page.evaluate("window.lastAnswer")


def _canvas(page) -> np.ndarray:
    shot = page.locator("#canvas").screenshot()
    return np.asarray(Image.open(io.BytesIO(shot)).convert("RGB")).astype(int)[1:-1, 1:-1]  # without its border


def test_detections_are_listed_and_drawn(page, server, tmp_path) -> None:
    img = scene(500, 400, 300).image
    path = tmp_path / "shapes.jpg"
    path.write_bytes(jpeg(img))
    _, _, answer = post(server.url + "/detect", {"image": ("a.jpg", path.read_bytes())})
    page.select_option("#model", "shapes-detector:1")
    _upload(page, path)
    status = page.text_content("#status")
    assert status.startswith(f"Done: {len(answer['detections'])} detection(s)")
    for d in answer["detections"]:
        assert d["label"] in status
    assert "inference" in page.text_content("#timing")
    pixels = _canvas(page)
    assert pixels.shape[:2] == (300, 400)  # the canvas at the image's size, shown 1:1 here
    d = answer["detections"][0]
    x1, y1, x2, y2 = (int(round(v)) for v in d["box"])
    edge = pixels[y1 + 5:y2 - 5, max(x1, 1)]
    assert (np.abs(edge - np.array(colour(d["label_id"]))).sum(axis=1) < 60).mean() > 0.5


def test_masks_are_overlaid_with_a_legend(page, tmp_path) -> None:
    path = tmp_path / "seg.png"
    scene(501, 320, 240).image.save(path)
    page.select_option("#model", "shapes-segmenter:1")
    answer = _upload(page, path)
    assert page.text_content("#status").startswith("Done:")
    legend = page.text_content("#legend")
    assert answer["classes"] and all(c["label"] in legend for c in answer["classes"])
    import base64

    cmap = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["mask_png"]))))
    pixels = _canvas(page)
    plain = np.asarray(Image.open(path).convert("RGB")).astype(int)
    fg = cmap > 0
    # a masked pixel is the average of the image and the class colour
    want = (plain[fg] + np.array([colour(int(v)) for v in cmap[fg]])) / 2
    assert np.abs(pixels[fg] - want).mean() < 6 and np.abs(pixels[~fg] - plain[~fg]).mean() < 3


def test_keypoints_are_drawn_as_a_skeleton(page, tmp_path) -> None:
    """Each drawn keypoint is a white dot; each skeleton edge between two drawn keypoints is a
    line in the object's colour (sampled at its middle, away from the dots)."""
    from training.figures import render_figures

    img, _ = render_figures(np.random.default_rng(5), 320, 256, 1, 0)
    path = tmp_path / "figure.png"
    img.save(path)
    page.select_option("#model", "figures-keypoints:1")
    answer = _upload(page, path)
    assert page.text_content("#status").startswith(f"Done: {len(answer['detections'])} detection(s)")
    skeleton = page.evaluate("models.find((m) => m.name === 'figures-keypoints').keypoints.skeleton")
    pixels = _canvas(page)
    d = answer["detections"][0]
    drawn = [k for k in d["keypoints"] if k["score"] >= 0.3]  # KEYPOINT_DRAW_SCORE
    assert len(drawn) >= 8
    for k in drawn:
        assert (pixels[round(k["y"]), round(k["x"])] >= 235).all(), k
    kps = d["keypoints"]
    edges = [(kps[a], kps[b]) for a, b in skeleton if kps[a]["score"] >= 0.3 and kps[b]["score"] >= 0.3
             and np.hypot(kps[a]["x"] - kps[b]["x"], kps[a]["y"] - kps[b]["y"]) > 16]
    assert edges
    plain = np.asarray(img.convert("RGB")).astype(int)

    def near_colour(image: np.ndarray, x: float, y: float) -> bool:  # a 2-px anti-aliased line: 2 px around
        patch = image[round(y) - 2:round(y) + 3, round(x) - 2:round(x) + 3].reshape(-1, 3)
        return bool((np.abs(patch - np.array(colour(d["label_id"]))).sum(axis=1) < 60).any())

    middles = [((a["x"] + b["x"]) / 2, (a["y"] + b["y"]) / 2) for a, b in edges]
    middles = [m for m in middles if not near_colour(plain, *m)]  # the figure itself is not that colour there
    hits = [near_colour(pixels, *m) for m in middles]
    assert middles and np.mean(hits) > 0.8, hits


def test_instances_are_overlaid_each_in_its_own_colour(page, tmp_path) -> None:
    """Each object's mask (its PNG inside mask_box) blended half-half with the colour of its
    rank: two touching shapes of one class show in two colours."""
    from training.synthetic import render_scene

    img = render_scene(np.random.default_rng(7), 320, 240, 4, 25, 60, cluster=True, class_ids=[0, 0, 0, 0]).image
    path = tmp_path / "crowd.png"
    img.save(path)
    page.select_option("#model", "shapes-instances:1")
    answer = _upload(page, path)
    assert page.text_content("#status").startswith(f"Done: {len(answer['detections'])} detection(s)")
    assert len(answer["detections"]) >= 2
    import base64

    pixels = _canvas(page)
    plain = np.asarray(img.convert("RGB")).astype(int)
    masks = []
    for d in answer["detections"]:
        x1, y1, x2, y2 = d["mask_box"]
        full = np.zeros(plain.shape[:2], bool)
        full[y1:y2, x1:x2] = np.asarray(Image.open(io.BytesIO(base64.b64decode(d["mask_png"])))) > 127
        masks.append(full)
    alone = np.sum(masks, axis=0) == 1  # pixels of exactly one object: blended once
    for rank, mask in enumerate(masks):
        inner = mask & alone
        for other in answer["detections"]:  # away from every box's outline and label
            x1, y1, x2, y2 = (int(v) for v in other["box"])
            inner[max(0, y1 - 20):y1 + 3, x1:x2 + 1] = False
            inner[y1:y2 + 1, max(0, x1 - 2):x1 + 3] = inner[y1:y2 + 1, max(0, x2 - 2):x2 + 3] = False
            inner[max(0, y2 - 2):y2 + 3, x1:x2 + 1] = False
        if inner.sum() < 20:
            continue
        want = (plain[inner] + np.array(colour(rank))) / 2
        assert np.abs(pixels[inner] - want).mean() < 8, rank


def test_labels_for_a_classifier(page, tmp_path) -> None:
    path = tmp_path / "one.jpg"
    path.write_bytes(jpeg(scene(502, 200, 160, shapes=1).image))
    page.select_option("#model", "shapes-classifier:1")
    answer = _upload(page, path)
    items = page.locator("#labels li").all_text_contents()
    assert len(items) == len(answer["labels"]) == 5 and items[0].startswith(answer["labels"][0]["label"])


def test_a_bad_file_shows_the_services_message(page, tmp_path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not an image")
    page.select_option("#model", "shapes-classifier:1")
    _upload(page, path)
    assert page.text_content("#status") == "400: the data is not an image Pillow can identify"
    # and the next image is served
    good = tmp_path / "good.jpg"
    good.write_bytes(jpeg(scene(503, 160, 120).image))
    _upload(page, good)
    assert page.text_content("#status").startswith("Done:")
    page.screenshot(path=str(tmp_path / "playground.png"))


def test_an_embedding_model_enrols_in_and_searches_a_gallery(page, tmp_path) -> None:
    """shapes-identities: the embedding's dimension and first values instead of a drawing; two
    identities enrolled (ids first, second) in a new gallery, then a search with the first image
    lists first (score 1.000) before second; a search in a gallery that does not exist shows the
    service's 404 message."""
    from training.identities import write_identities

    write_identities(tmp_path / "ids", 2, 1, seed=5, size=96)
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    first.write_bytes((tmp_path / "ids" / "id-00000" / "0000.png").read_bytes())
    second.write_bytes((tmp_path / "ids" / "id-00001" / "0000.png").read_bytes())
    page.select_option("#model", "shapes-identities:1")
    assert page.locator("#gallery").is_visible() and page.input_value("#gallery_name") == "playground"
    answer = _upload(page, first)
    assert answer["dimensions"] == len(answer["embedding"]) == 128
    assert page.text_content("#status") == "Done: a 128-dimensional embedding"
    summary = page.text_content("#embedding")
    assert summary.startswith("128 dimensions (cosine), the first 8: [")
    assert all(f"{v:.4f}" in summary for v in answer["embedding"][:8]), summary
    assert page.input_value("#item_id") == "a.png"  # the file's name, until another is typed

    name = f"playground-test-{uuid.uuid4().hex[:8]}"
    page.fill("#gallery_name", name)
    page.fill("#item_id", "first")
    _settle(page, lambda: page.click("#enrol"))
    assert page.text_content("#status") == f"Done: enrolled first in the new gallery {name} (1 item)"
    _upload(page, second)
    assert page.input_value("#item_id") == "b.png"
    page.fill("#item_id", "second")
    _settle(page, lambda: page.click("#enrol"))
    assert page.text_content("#status") == f"Done: enrolled second in gallery {name} (2 items)"

    _upload(page, first)
    _settle(page, lambda: page.click("#search"))
    assert page.text_content("#status") == f"Done: 2 match(es) in gallery {name}, the nearest first (1.000)"
    rows = [row.locator("td").all_text_contents() for row in page.locator("#matches tbody tr").all()]
    assert [r[0] for r in rows] == ["first", "second"], rows
    assert rows[0][1] == "1.000" and float(rows[1][1]) < 1.0, rows
    assert [json.loads(r[2]) for r in rows] == [{"file": "a.png"}, {"file": "b.png"}]
    assert "search" in page.text_content("#timing")

    page.fill("#gallery_name", "no-such-gallery")
    _settle(page, lambda: page.click("#search"))
    assert page.text_content("#status") == "404: there is no gallery 'no-such-gallery'"
    assert page.get_attribute("#status", "class") == "error" and page.locator("#matches").is_hidden()

    _settle(page, lambda: page.select_option("#model", "shapes-classifier:1"))  # the panel is the embedding's
    assert page.locator("#gallery").is_hidden() and page.text_content("#embedding") == ""
    assert page.evaluate("window.cspViolations || []") == []


def test_the_playground_works_under_its_content_security_policy(page, csp_messages, tmp_path) -> None:
    """A classification with class activation maps (data: PNGs, styled bars) after the tests
    above (boxes, masks and their legend): the policy blocked nothing."""
    path = tmp_path / "cam.jpg"
    path.write_bytes(jpeg(scene(504, 200, 160, shapes=1).image))
    page.select_option("#model", "shapes-classifier:1")
    page.check("#cam")
    _upload(page, path)
    assert page.text_content("#status").startswith("Done:")
    assert page.evaluate("window.lastAnswer.labels[0].heatmap_png")
    assert page.locator("#labels li .bar").first.evaluate("e => e.style.width").endswith("px")
    assert page.evaluate("window.cspViolations || []") == [] and csp_messages == []


def test_the_api_page_works_under_its_content_security_policy(server, browser) -> None:
    """The API page (Swagger UI, its inline script and style allowed by hash) renders every
    route, and the policy blocked nothing."""
    requests: list[str] = []
    messages: list[str] = []
    pg = _watched_page(browser, requests, messages)
    try:
        response = pg.goto(server.url + "/")
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
        pg.wait_for_selector(".opblock-summary-path[data-path='/classify']", timeout=30000)
        pg.locator(".opblock-summary-path[data-path='/models']").first.click()  # expand one route
        pg.wait_for_selector(".opblock.is-open", timeout=10000)
        assert pg.evaluate("window.cspViolations || []") == [] and messages == []
        assert all(u.startswith(server.url) or u.startswith("data:") for u in requests), requests
    finally:
        pg.context.close()
