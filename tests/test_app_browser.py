"""The demo in a real browser: Debian's chromium driven by playwright uploads an image, types captions, submits,
reads the ranked result and sees a heatmap. The screenshot goes to a temporary folder: tests never modify tracked
files. ``MKLVISITA_REFRESH_SCREENSHOT=1`` (with the embedded checkpoint) refreshes assets/screenshot.png for the README.

Skipped where /usr/bin/chromium is missing, unless CI is set (then it fails: CI installs chromium).
Never runs `playwright install`: no browser download happens here.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import Image

from tests.app_fixtures import ROOT, SHAPES, app_checkpoint, matcher, server, server_matcher  # noqa: F401

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
SCREENSHOT = ROOT / "assets" / "screenshot.png"
SCREENSHOT_MAX_BYTES = 300_000
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing; CI must install Debian's chromium (apt-get install chromium)")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium); set CI=1 to make this a failure")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def save_small_png(png: bytes, path: Path, limit: int = SCREENSHOT_MAX_BYTES) -> None:
    """Keep the README's screenshot small: quantise to a palette (UI colours survive) and shrink if needed."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    while True:
        buffer = io.BytesIO()
        image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(buffer, format="PNG", optimize=True)
        if buffer.tell() <= limit or image.width < 600:
            break
        image = image.resize((image.width * 4 // 5, image.height * 4 // 5), Image.Resampling.LANCZOS)
    path.write_bytes(buffer.getvalue())


def test_match_in_the_browser(browser, server, server_matcher, matcher, tmp_path: Path) -> None:  # noqa: F811
    _, url = server
    # The README's picture is refreshed only on request, and only from the embedded (trained) checkpoint.
    refresh = os.environ.get("MKLVISITA_REFRESH_SCREENSHOT") == "1" and server_matcher is not matcher
    screenshot = SCREENSHOT if refresh else tmp_path / "screenshot.png"
    image = SHAPES[2]  # a purple cross and a yellow star, see assets/examples/examples.json
    captions = [
        "a purple cross to the left of a large star",
        "a purple cross to the right of a large star",
        "a large purple cross and a yellow star",
        "a red circle",
    ]
    page = browser.new_page(viewport={"width": 1280, "height": 1400})
    page.set_default_timeout(60_000)
    page.goto(url)
    page.locator("#match-image input[type=file]").set_input_files(str(image))
    page.locator("#match-image img").first.wait_for(state="visible")  # the upload landed and is previewed
    page.locator("#match-captions textarea").fill("\n".join(captions))
    page.locator("#match-button").click()

    ranking = page.locator("#match-ranking")
    ranking.get_by_text(captions[3], exact=True).wait_for()
    text = ranking.inner_text()
    positions = sorted((text.index(c), c) for c in captions if c in text)
    assert len(positions) == len(captions), text
    ranked = [c for _, c in positions]

    heatmap = page.locator("#caption-heatmap img").first
    heatmap.wait_for(state="visible")
    loaded = (
        "() => { const i = document.querySelector('#caption-heatmap img'); return i && i.complete && i.naturalWidth; }"
    )
    page.wait_for_function(loaded)
    size = heatmap.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert size == list(Image.open(image).size)  # the overlay is drawn at the uploaded image's size
    page.locator("#word-maps img").first.wait_for(state="visible")
    assert page.locator("#explain-caption input").input_value() == ranked[0]  # the top caption is explained

    save_small_png(page.screenshot(), screenshot)  # the viewport: inputs, ranking, heatmaps
    assert 0 < screenshot.stat().st_size <= SCREENSHOT_MAX_BYTES
    page.close()
