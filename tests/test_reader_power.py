"""fusion.reader_attention_power: the relation reader's centroids from the last layer's attention raised to a power.
1 is the trained reading (nothing changes); another power moves only the reader's evidence, and the folded attention
(scoring) and the materialised one (explanations) give it the same."""

from __future__ import annotations

import pytest
import torch

from mklvisita import Matcher
from mklvisita.config import ConfigError, MKLVisITAConfig
from mklvisita.fusion import centroid, seen_positions
from mklvisita.matcher import EMBEDDED

EXAMPLES = EMBEDDED["photo"].parent / "examples"
CAPTIONS = ["a tabby cat to the left of a rug", "a rug to the left of a tabby cat", "a cup of coffee on a saucer"]


@pytest.fixture(scope="module")
def photo() -> Matcher:
    if not (EMBEDDED["photo"] / "model.safetensors").is_file():
        pytest.skip("no shipped photo checkpoint")
    return Matcher.default("photo")


def _set_power(model, power: float) -> None:
    model.config.fusion.reader_attention_power = power
    model.fusion.layers[-1].centroid_power = power


def test_powers_outside_one_to_four_are_refused():
    config = MKLVisITAConfig()
    config.fusion.reader_attention_power = 0.5
    with pytest.raises(ConfigError, match="reader_attention_power"):
        config.validate()


def test_a_power_sharpens_the_centroid_toward_the_peak():
    attn = torch.tensor([[[[0.6, 0.3, 0.1]]]])  # (B, h, Tq, N): most mass on the first of three patches
    positions = torch.tensor([[[0.0, 0.0, 1.0], [0.5, 0.0, 1.0], [1.0, 0.0, 1.0]]])  # (1, N, 3): x, y, is_patch
    mean = centroid(seen_positions(attn, positions, 1.0))[0, 0, 0]
    sharp = centroid(seen_positions(attn, positions, 2.0))[0, 0, 0]
    assert mean == pytest.approx(0.25) and sharp == pytest.approx((0.3**2 * 0.5 + 0.1**2) / (0.36 + 0.09 + 0.01))
    assert sharp < mean


def test_another_power_moves_the_evidence_alike_on_both_attention_paths(photo):
    model = photo.model
    trained = model.config.fusion.reader_attention_power
    with torch.inference_mode():
        pv, _ = photo.processor.images([str(EXAMPLES / "cat.jpg")])
        img = model.encode_image(pv)
        enc = photo.processor.captions(CAPTIONS)
        txt = model.encode_text(enc["input_ids"], enc["attention_mask"])
        index = torch.zeros(len(CAPTIONS), dtype=torch.long)
        try:
            out = {}
            for power in (1.0, 2.0):
                _set_power(model, power)
                for maps in (False, True):  # scoring (folded attention) and explanations (materialised)
                    out[power, maps] = model.match(img, txt, image_index=index, output_attentions=maps).relation
        finally:
            _set_power(model, trained)
    for power in (1.0, 2.0):
        torch.testing.assert_close(out[power, False].evidence, out[power, True].evidence, rtol=0, atol=1e-4)
    assert (out[1.0, False].evidence - out[2.0, False].evidence).abs().max() > 1e-4
