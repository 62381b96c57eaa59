"""The shipped photo checkpoints score the four example photos as recorded, and each photo's own caption ranks first
(what the README's examples and the photo cards rely on): the photo sources checkpoint (similarity S only) and the
photo checkpoint (the same sources and kernel weights, plus the fusion, ITM head and relation reader)."""

import json

import numpy as np
import pytest

from mklvisita import Matcher, MKLVisITA
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
# Matcher.default("photo-sources").score(IMAGES, CAPTIONS).similarity, recorded with the code of the commit that added
# this test (feature sources as plugins); a faster code path must reproduce it within 1e-3.
RECORDED_SIMILARITY = [
    [0.242139, 0.039375, 0.03667, 0.028679, 0.037991, 0.047401],
    [0.010092, 0.212284, 0.042522, 0.066608, 0.147209, 0.055178],
    [0.01798, 0.043762, 0.109476, 0.127879, 0.072744, 0.14606],
    [0.027232, 0.03049, 0.161646, 0.026739, 0.043237, 0.040788],
]


# Matcher.default("photo").score(IMAGES, CAPTIONS).itm (the match probability: the ITM head at its tune-half scale, S
# and the relation reader's evidence), recorded when the tune half chose, with the sources' cost settings (colour
# stride 2, text detector side 224, face scale step 1.3), ITM weight 0.1, head scale 0.02, the reader's centroids from
# squared attention and the concept maps' bias at three times its learned scale
# (docs/results/photo_fusion/itm_weight_tune.json).
RECORDED_ITM = [
    [0.764268, 0.535805, 0.52009, 0.528998, 0.53381, 0.146158],
    [0.492149, 0.744833, 0.531985, 0.578523, 0.674062, 0.049548],
    [0.516291, 0.542884, 0.616111, 0.64919, 0.580332, 0.558399],
    [0.524674, 0.515728, 0.677713, 0.534844, 0.538368, 0.171895],
]
# The sources' settings the photo checkpoint serves with (its config.json); the photo sources checkpoint keeps the
# defaults (every pixel named, text detector side 256, face scale step 1.2).
SERVED = {"colour": {"stride": 2}, "scene_text": {"detector_side": 224}, "person": {"scale_step": 1.3}}


def _score(name: str):
    if not (EMBEDDED[name] / "model.safetensors").is_file():
        pytest.skip(f"no shipped {name} checkpoint")
    return Matcher.default(name).score([str(EXAMPLES / image) for image in IMAGES], CAPTIONS)


@pytest.fixture(scope="module")
def scored():
    return _score("photo-sources")


@pytest.fixture(scope="module")
def fused():
    return _score("photo")


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


def test_each_example_photo_ranks_its_own_caption_first(scored, fused):
    assert [int(np.argmax(row)) for row in scored.score] == OWN
    assert [int(np.argmax(row)) for row in fused.score] == OWN


def test_photo_checkpoint_keeps_the_sources_similarity_and_adds_its_itm(scored, fused):
    # the fusion trained with the kernel weights frozen: S is the sources checkpoint's served with the same settings,
    # exactly, and within a few thousandths of its own (every pixel named, text detector at 256)
    config = Matcher.default("photo").config.kernels.options
    assert all(config[source] | settings == config[source] for source, settings in SERVED.items())
    served = Matcher(MKLVisITA.from_pretrained(EMBEDDED["photo-sources"], source_options=SERVED))
    same = served.score([str(EXAMPLES / image) for image in IMAGES], CAPTIONS)
    np.testing.assert_allclose(fused.similarity, same.similarity, rtol=0, atol=1e-6)
    np.testing.assert_allclose(fused.similarity, scored.similarity, rtol=0, atol=5e-3)
    np.testing.assert_allclose(fused.itm, RECORDED_ITM, rtol=0, atol=1e-3)
    w = Matcher.default("photo").config.ranking.itm_weight
    assert 0 < w < 1  # chosen on the Tux Paint tune half (docs/results/photo_fusion/itm_weight_tune.json)
    np.testing.assert_allclose(fused.score, w * fused.itm + fused.similarity, atol=1e-5)
