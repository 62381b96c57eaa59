"""What the overlap tests share (tests/test_source_overlap.py, test_overlap_post_backbone.py,
test_caption_overlap.py): the example photos, a stamp with printed words, captions that name them, the worker thread's
name and the shipped photo checkpoint's Matcher (each file's module-scoped ``matcher`` fixture returns
:func:`photo_matcher`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mklvisita import Matcher
from mklvisita.matcher import EMBEDDED

EXAMPLES = EMBEDDED["photo"].parent / "examples"
SIGN = Path("/usr/share/tuxpaint/stamps/town/roadsigns/give_way_sign.png")  # a stamp with printed words
CAPTIONS = [
    "a tabby cat lying on a rug",
    "a cup of coffee on a saucer",
    "an astronaut in an orange suit",
    "a rocket lifting off from a launch pad",
    "a give way sign",
]
WORKER = "mklvisita-overlap"  # the overlap worker thread's name


def photo_matcher() -> Matcher:
    """The shipped photo checkpoint's Matcher; the test is skipped where the checkpoint is not there."""
    if not (EMBEDDED["photo"] / "model.safetensors").is_file():
        pytest.skip("no shipped photo checkpoint")
    return Matcher.default("photo")
