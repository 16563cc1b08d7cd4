"""The expert review page in a real browser: headless Debian chromium driven by Playwright.

One real ``bentoml serve`` over a fresh MLflow registry with two versions (1 champion, 2
challenger). The browser signs in, uploads an image, shows the prediction, draws a rectangle
(relevant) and a polygon (irrelevant), sends them and the test finds them through the API, shows
the differences (target and challenger maps), accepts the challenger and rolls back, checking
the MLflow alias and ``GET /model`` after each, and finds the feedback, the Accept and the
Roll back in ``GET /audit`` under the token's name; the recalibration panel shows the scheduler's
state (pending feedback goes up once the ROIs are sent). Screenshots go to ``reports/review_screenshots/``
(printed at the end) and are kept there as the test's artifacts.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image
from service_harness import MODEL_NAME, REPO_ROOT, Served, make_tiny_bundle, register_version, start_served

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = REPO_ROOT / "reports" / "review_screenshots"
IMAGE_W, IMAGE_H = 120, 96  # not the model's 32x32: ROIs must come back in the upload's frame
RECT = (20, 16, 30, 24)  # x, y, width, height in image pixels
POLYGON = [(70, 50), (104, 56), (92, 84), (66, 78)]


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory) -> tuple[str, Path]:
    """Version 1 champion, version 2 challenger (gated out by its lower macro-F1)."""
    from medattn.registry import assign_challenger_and_gate

    workdir = tmp_path_factory.mktemp("review")
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    v1 = register_version(uri, make_tiny_bundle(workdir / "bundle-v1", seed=1), metric=0.6)
    assert assign_challenger_and_gate(MODEL_NAME, v1, tracking_uri=uri).promoted
    v2 = register_version(uri, make_tiny_bundle(workdir / "bundle-v2", seed=2), metric=0.5)
    assert not assign_challenger_and_gate(MODEL_NAME, v2, tracking_uri=uri).promoted
    return uri, workdir


@pytest.fixture(scope="module")
def served(two_versions) -> Iterator[Served]:
    running = start_served(two_versions)
    try:
        yield running
    finally:
        running.server.stop()


@pytest.fixture(scope="module")
def upload(two_versions) -> Path:
    """A fundus-like RGB photo: dark surround, bright disc, a dark spot."""
    yy, xx = np.mgrid[0:IMAGE_H, 0:IMAGE_W]
    r = np.hypot((xx - IMAGE_W / 2) / (IMAGE_W * 0.45), (yy - IMAGE_H / 2) / (IMAGE_H * 0.45))
    base = np.clip(1.1 - r, 0, 1)
    disc = np.exp(-(((xx - 85) / 9.0) ** 2 + ((yy - 45) / 9.0) ** 2))
    spot = np.exp(-(((xx - 35) / 4.0) ** 2 + ((yy - 28) / 4.0) ** 2))
    rgb = np.stack([200 * base + 55 * disc - 80 * spot, 90 * base + 120 * disc - 60 * spot,
                    30 * base + 60 * disc], axis=-1)
    path = two_versions[1] / "fundus.png"
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(path)
    return path


def alias_version(served: Served, alias: str) -> str:
    from medattn.registry import get_model_version_info

    return get_model_version_info(MODEL_NAME, alias, tracking_uri=served.tracking_uri).version


def served_version(served: Served) -> str:
    answer = httpx.get(f"{served.url}/model", headers=served.headers("predict"), timeout=30)
    answer.raise_for_status()
    return answer.json()["model"]["version"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.is_file(), f"{CHROMIUM} missing: `make system-deps` installs Debian's chromium"
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                      args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            yield chromium
        finally:
            chromium.close()


def to_screen(page, x: float, y: float) -> tuple[float, float]:
    """Image pixel (x, y) -> page coordinates on the image panel, via the page's view transform."""
    box = page.locator('.panel[data-panel="image"] canvas').bounding_box()
    view = page.evaluate("window.reviewState.view")
    return box["x"] + view["tx"] + x * view["scale"], box["y"] + view["ty"] + y * view["scale"]


def shot(page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def test_review_page_end_to_end(served: Served, browser, upload: Path) -> None:
    page = browser.new_page(viewport={"width": 1500, "height": 860})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{served.url}/review")

    # sign in: the token is kept in sessionStorage, the name fills expert_id
    page.fill("#token", served.tokens["admin"])
    page.click("#token-save")
    page.wait_for_selector("#whoami.ok")
    assert page.inner_text("#whoami") == "admin (admin)"
    assert page.evaluate("sessionStorage.getItem('medattn.review.token')") == served.tokens["admin"]
    page.wait_for_selector('#history tr[data-version="2"]')
    assert "challenger" in page.inner_text('#history tr[data-version="2"]')
    assert "champion" in page.inner_text('#history tr[data-version="1"]')
    # the recalibration panel: no retrain, no scheduler process, nothing pending yet
    page.wait_for_selector("#sched-running:text('idle')")
    assert page.inner_text("#sched-up") == "not running"
    assert page.inner_text("#sched-pending") == "0"
    assert page.inner_text("#sched-next") == "– (no feedback waits)"

    # upload, show the prediction
    page.set_input_files("#file", str(upload))
    page.wait_for_selector("#show-prediction:not([disabled])")
    page.click("#show-prediction")
    page.wait_for_selector("#prediction:not([hidden])")
    label = page.inner_text("#pred-label")
    request_id = page.inner_text("#pred-request")
    assert label in ("healthy", "mild", "severe")
    assert page.locator("#probabilities .prob").count() == 3
    assert page.is_visible("#global-note")  # the tiny model is seed 001's global map
    image_size = page.evaluate("[window.reviewState.image.width, window.reviewState.image.height]")
    assert image_size == [IMAGE_W, IMAGE_H]

    # the probe shows image coordinates and the attention value under the pointer
    page.mouse.move(*to_screen(page, 60.5, 40.5))
    assert page.inner_text("#probe") == "x 60, y 40"
    expected = page.evaluate(f"window.reviewState.prediction.map[40 * {IMAGE_W} + 60]")
    assert page.inner_text("#probe-value").startswith(f"attention {expected:.3f}")

    # zoom on the map panel: the image panel follows (one view for all panels)
    map_box = page.locator('.panel[data-panel="attention"] canvas').bounding_box()
    scale_before = page.evaluate("window.reviewState.view.scale")
    page.mouse.move(map_box["x"] + map_box["width"] / 2, map_box["y"] + map_box["height"] / 2)
    page.mouse.wheel(0, -200)
    assert page.evaluate("window.reviewState.view.scale") > scale_before
    page.keyboard.press("0")  # fit again

    # rectangle (relevant), by keyboard shortcut R
    page.keyboard.press("r")
    x, y, w, h = RECT
    page.mouse.move(*to_screen(page, x, y))
    page.mouse.down()
    page.mouse.move(*to_screen(page, x + w / 2, y + h / 2))
    page.mouse.move(*to_screen(page, x + w, y + h))
    page.mouse.up()
    # polygon (irrelevant): 2, P, click the points, Enter
    page.keyboard.press("2")
    page.keyboard.press("p")
    for px, py in POLYGON:
        page.mouse.click(*to_screen(page, px, py))
    page.keyboard.press("Enter")
    # an extra rectangle, then undo it and redo + undo again: the list is what was drawn
    page.keyboard.press("1")
    page.keyboard.press("r")
    page.mouse.move(*to_screen(page, 5, 70))
    page.mouse.down()
    page.mouse.move(*to_screen(page, 15, 80))
    page.mouse.up()
    assert page.locator("#roi-list li").count() == 3
    page.keyboard.press("Control+z")
    assert page.locator("#roi-list li").count() == 2
    page.keyboard.press("Control+Shift+z")
    assert page.locator("#roi-list li").count() == 3
    page.keyboard.press("Control+z")
    assert page.locator("#roi-list li").count() == 2
    page.select_option("#corrected-label", "severe")
    shot(page, "01_prediction_and_rois")

    # send; find them through the API
    page.click("#send-feedback")
    page.wait_for_selector("#feedback-result.ok")
    feedback_id = page.get_attribute("#feedback-result", "data-feedback-id")
    stored = httpx.get(f"{served.url}/feedback/{feedback_id}", headers=served.headers("expert"), timeout=30)
    assert stored.status_code == 200, stored.text
    record = stored.json()
    assert record["request_id"] == request_id and record["expert_id"] == "admin"
    assert record["corrected_label"] == "severe" and (record["width"], record["height"]) == (IMAGE_W, IMAGE_H)
    rect, poly = record["rois"]
    assert rect["shape"] == "rectangle" and rect["kind"] == "relevant"
    assert [rect["x"], rect["y"], rect["width"], rect["height"]] == pytest.approx(list(RECT), abs=1.0)
    assert poly["shape"] == "polygon" and poly["kind"] == "irrelevant"
    assert np.allclose(poly["points"], POLYGON, atol=1.0)
    page.click("#sched-refresh")  # the new record now waits for a recalibration
    page.wait_for_selector("#sched-pending:text('1')")
    # before any scheduler check, the next run follows params.yaml's rules (24 h after the record)
    assert page.inner_text("#sched-next").endswith(" UTC"), page.inner_text("#sched-next")

    # differences: target raised inside the relevant rectangle, zeroed inside the irrelevant
    # polygon, the model's map elsewhere; and the challenger's map on the same image
    page.click("#show-differences")
    page.wait_for_selector('.panel[data-panel="challenger"] .title:text("Challenger map (v2)")')
    page.wait_for_function("window.reviewState.layers.values && window.reviewState.layers.values.challenger")
    checks = page.evaluate(f"""() => {{
        const v = window.reviewState.layers.values, W = {IMAGE_W};
        const at = (m, x, y) => m[y * W + x];
        return {{inRect: at(v.target, 30, 25), inPoly: at(v.target, 85, 68),
                 outside: at(v.target, 10, 90), model: at(v.attention, 10, 90),
                 challengerDiffers: v.challenger.some((c, i) => Math.abs(c - v.attention[i]) > 1e-3)}};
    }}""")
    assert checks["inRect"] == 1 and checks["inPoly"] == 0
    assert checks["outside"] == pytest.approx(checks["model"])
    assert checks["challengerDiffers"]
    shot(page, "02_differences")

    # accept: asks to confirm; cancel changes nothing, confirm moves the alias and /model
    page.click("#accept")
    page.wait_for_selector("#confirm:not([hidden])")
    shot(page, "03_confirm_accept")
    page.click("#confirm-cancel")
    assert alias_version(served, "champion") == "1"
    page.click("#accept")
    page.click("#confirm-ok")
    page.wait_for_selector("#model-result.ok")
    assert alias_version(served, "champion") == "2"
    assert served_version(served) == "2"
    page.wait_for_selector('#history tr.champion[data-version="2"]')
    assert "v2" in page.inner_text("#served")
    shot(page, "04_accepted")

    # roll back: the alias and the served model go back to version 1
    page.click("#rollback")
    page.click("#confirm-ok")
    page.wait_for_selector('#history tr.champion[data-version="1"]')
    assert alias_version(served, "champion") == "1"
    assert served_version(served) == "1"
    shot(page, "05_rolled_back")
    # both moves and the feedback are in the audit trail, under the token's name
    trail = httpx.get(f"{served.url}/audit", params={"model_name": MODEL_NAME}, headers=served.headers("admin"),
                      timeout=30).json()["items"]
    assert [(e["actor"], e["action"], e["from_version"], e["to_version"]) for e in trail] == [
        ("admin", "feedback", None, "1"), ("admin", "promote", "1", "2"), ("admin", "rollback", "2", "1")]
    assert trail[0]["details"]["feedback_id"] == feedback_id

    # open the stored prediction by its request id: same image, same frame, its version's map
    page.click("#show-differences")
    page.fill("#request-id", request_id)
    page.click("#open-request")
    page.wait_for_function(f"window.reviewState.requestId === {request_id!r} && window.reviewState.prediction")
    assert page.inner_text("#pred-label") == label
    assert page.evaluate("window.reviewState.rois.length") == 0
    shot(page, "06_stored_prediction")
    assert not errors, errors
    print(f"\nreview page screenshots: {SCREENSHOTS}")


def test_brush_window_level_and_editing(served: Served, browser, upload: Path) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 800})
    page.goto(f"{served.url}/review")
    page.fill("#token", served.tokens["expert"])
    page.click("#token-save")
    page.wait_for_selector("#whoami.ok")
    page.set_input_files("#file", str(upload))
    page.wait_for_selector("#show-prediction:not([disabled])")
    page.click("#show-prediction")
    page.wait_for_selector("#prediction:not([hidden])")

    # window / level changes the displayed pixels, not the data
    grey_before = page.evaluate("window.reviewState.image.pixels.data[4 * (48 * 120 + 60)]")
    page.fill("#window", "60")
    page.dispatch_event("#window", "input")
    assert page.inner_text("#wl") == "W 60 L 128"
    assert page.evaluate("window.reviewState.image.pixels.data[4 * (48 * 120 + 60)]") == grey_before

    # freehand brush, then edit it: select, flip to irrelevant, move the rectangle by its corner
    page.keyboard.press("b")
    page.mouse.move(*to_screen(page, 40, 40))
    page.mouse.down()
    for step in range(1, 6):
        page.mouse.move(*to_screen(page, 40 + 4 * step, 40 + 2 * step))
    page.mouse.up()
    page.keyboard.press("r")
    page.mouse.move(*to_screen(page, 80, 20))
    page.mouse.down()
    page.mouse.move(*to_screen(page, 100, 40))
    page.mouse.up()
    page.keyboard.press("v")
    page.mouse.click(*to_screen(page, 42, 41))  # on the brush stroke
    assert page.evaluate("window.reviewState.selected") == 0
    page.keyboard.press("2")
    assert page.evaluate("window.reviewState.rois[0].kind") == "irrelevant"
    page.mouse.click(*to_screen(page, 90, 30))
    page.mouse.move(*to_screen(page, 100, 40))  # bottom-right handle of the rectangle
    page.mouse.down()
    page.mouse.move(*to_screen(page, 110, 50))
    page.mouse.up()
    rect = page.evaluate("window.reviewState.rois[1]")
    assert [rect["x"], rect["y"]] == pytest.approx([80, 20], abs=0.6)
    assert [rect["width"], rect["height"]] == pytest.approx([30, 30], abs=0.6)
    shot(page, "07_brush_and_window_level")
    page.click("#send-feedback")
    page.wait_for_selector("#feedback-result.ok")
    feedback_id = page.get_attribute("#feedback-result", "data-feedback-id")
    record = httpx.get(f"{served.url}/feedback/{feedback_id}", headers=served.headers("expert"), timeout=30).json()
    assert [r["shape"] for r in record["rois"]] == ["brush", "rectangle"]
    assert record["rois"][0]["kind"] == "irrelevant" and record["expert_id"] == "expert"

    # an expert token cannot accept: the page says so and nothing moves
    page.click("#accept")
    page.click("#confirm-ok")
    page.wait_for_selector("#model-result.bad")
    assert "admin" in page.inner_text("#model-result")
    assert alias_version(served, "champion") == "1"


def test_review_api_errors(served: Served) -> None:
    expert, url = served.headers("expert"), served.url
    png = io.BytesIO()
    Image.new("RGB", (40, 30), (120, 60, 20)).save(png, format="PNG")
    files = {"image": ("x.png", png.getvalue(), "image/png")}

    unknown = httpx.post(f"{url}/review/api/predict?model=99", files=files, headers=expert, timeout=60)
    assert unknown.status_code == 404 and "no version 99" in unknown.json()["detail"]
    challenger = httpx.post(f"{url}/review/api/predict?model=challenger", files=files, headers=expert, timeout=60)
    assert challenger.status_code == 200 and challenger.json()["model"]["version"] == "2"
    assert "request_id" not in challenger.json()  # not a served prediction: feedback cannot cite it
    assert httpx.get(f"{url}/review/api/predictions/nope", headers=expert, timeout=30).status_code == 404
    assert httpx.get(f"{url}/review/api/models", timeout=30).status_code == 401
    assert httpx.get(f"{url}/review/api/models", headers=served.headers("predict"), timeout=30).status_code == 403
    notimage = httpx.post(f"{url}/review/api/render", content=b"hello", headers={**expert, "Content-Type": "image/png"})
    assert notimage.status_code in (415, 422) and notimage.json()["detail"]
    for path in ("/review/static/../routers/review.py", "/review/static/nothing.js", "/review/static/%2e%2e/app.py"):
        answer = httpx.get(url + path, timeout=30)
        assert answer.status_code == 404, path
    history = httpx.get(f"{url}/review/api/models", headers=expert, timeout=30).json()
    assert [v["version"] for v in history["versions"]] == ["2", "1"]
    assert history["versions"][1]["metric"] == pytest.approx(0.6)
    assert httpx.get(f"{url}/audit", headers=expert, timeout=30).status_code == 403
    audit = httpx.get(f"{url}/audit", params={"action": "promote"}, headers=served.headers("admin"), timeout=30)
    assert audit.status_code == 200, audit.text
    # the expert's refused Accept (403) left no row: only the admin's one promotion
    assert [(e["actor"], e["to_version"]) for e in audit.json()["items"]] == [("admin", "2")]
    bad = httpx.get(f"{url}/audit", params={"action": "delete"}, headers=served.headers("admin"), timeout=30)
    assert bad.status_code == 422 and "action" in bad.json()["detail"]
    assert httpx.get(f"{url}/review/api/scheduler", headers=served.headers("predict"), timeout=30).status_code == 403
