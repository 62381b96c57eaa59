"""Captions in Chinese, Japanese, Korean or with emoji draw in the figures, not as missing-glyph boxes."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

from mklvisita import figures

CAPTIONS = ["一只猫躺在地毯上", "ソファの上の猫", "고양이 한 마리", "a cat 🐱 on a rug 🚀"]


def test_cjk_and_emoji_captions_have_their_glyphs() -> None:
    missing = [f for f in ("Noto Sans CJK JP", "Symbola") if f not in figures.FONT_FAMILIES]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"fonts {missing} are missing; CI installs fonts-noto-cjk and fonts-symbola")
        pytest.skip(f"fonts {missing} are missing (apt-get install fonts-noto-cjk fonts-symbola)")
    contributions = np.full((len(CAPTIONS), 2), 0.25, dtype=np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = figures.plot_contributions(contributions, ["global/cosine", "local/rbf"], CAPTIONS)
        figures.plot_score_matrix(np.eye(2), ["猫.jpg", "🚀.png"], CAPTIONS[:2])
    boxes = [str(w.message) for w in caught if "missing from font" in str(w.message)]
    assert boxes == [] and image.size[0] > 0, boxes


def test_without_the_fallback_fonts_the_same_captions_draw_boxes() -> None:
    """The check above can fail: DejaVu Sans alone has none of these glyphs, and matplotlib says so."""
    import matplotlib

    contributions = np.full((len(CAPTIONS), 2), 0.25, dtype=np.float32)
    with matplotlib.rc_context({"font.family": ["DejaVu Sans"]}), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        figures.plot_contributions(contributions, ["global/cosine", "local/rbf"], CAPTIONS)
    assert any("missing from font" in str(w.message) for w in caught)
