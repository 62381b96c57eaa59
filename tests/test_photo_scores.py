"""The shipped photo checkpoint scores the four example photos as recorded, and each photo's own caption ranks first
(what the README's examples and the photo card rely on)."""

import json

import numpy as np
import pytest

from mklvisita import Matcher
from mklvisita.matcher import EMBEDDED

EXAMPLES = EMBEDDED["photo"].parent / "examples"
IMAGES = ["cat.jpg", "coffee.jpg", "astronaut.jpg", "rocket.jpg"]
CAPTIONS = [
    "a tabby cat lying on a rug",
    "a cup of coffee on a saucer",
    "a rocket lifting off from a launch pad",
    "an astronaut in an orange suit",
    "a white cup on a wooden table",
    "an astronaut in an orange suit beside a flag",
]
OWN = [0, 1, 5, 2]  # each photo's own caption (the first of its captions in assets/examples/examples.json)
# Matcher.default("photo").score(IMAGES, CAPTIONS).similarity, recorded with the code of the commit that added this
# test (feature sources as plugins); a faster code path must reproduce it within 1e-3.
RECORDED_SIMILARITY = [
    [0.242139, 0.039375, 0.03667, 0.028679, 0.037991, 0.047401],
    [0.010092, 0.212284, 0.042522, 0.066608, 0.147209, 0.055178],
    [0.01798, 0.043762, 0.109476, 0.127879, 0.072744, 0.14606],
    [0.027232, 0.03049, 0.161646, 0.026739, 0.043237, 0.040788],
]


@pytest.fixture(scope="module")
def scored():
    if not (EMBEDDED["photo"] / "model.safetensors").is_file():
        pytest.skip("no shipped photo checkpoint")
    return Matcher.default("photo").score([str(EXAMPLES / name) for name in IMAGES], CAPTIONS)


def test_the_recorded_inputs_are_the_demo_examples():
    spec = [e for e in json.loads((EXAMPLES / "examples.json").read_text())["examples"] if e["kind"] == "photo"]
    assert [e["image"] for e in spec] == IMAGES
    assert list(dict.fromkeys(c for e in spec for c in e["captions"])) == CAPTIONS
    assert [CAPTIONS.index(e["captions"][0]) for e in spec] == OWN


def test_shipped_photo_checkpoint_scores_as_recorded(scored):
    np.testing.assert_allclose(scored.similarity, RECORDED_SIMILARITY, rtol=0, atol=1e-3)
    assert np.isnan(scored.itm).all()  # no fusion head: no ITM, and the score is S (its ranking rule)
    np.testing.assert_allclose(scored.score, scored.similarity, rtol=0, atol=0)
    np.testing.assert_allclose(scored.kernel_contributions.sum(-1), scored.similarity, atol=1e-5)


def test_each_example_photo_ranks_its_own_caption_first(scored):
    assert [int(np.argmax(row)) for row in scored.score] == OWN
