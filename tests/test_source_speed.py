"""The photo sources' faster internals give the numbers of the plain formulations they replace: the concept bridge's
WordNet expansion as one sparse product (against gathering and adding link by link), and the colour cells in
channel-first layout with in-place naming (against the pixels-last formulation)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mklvisita import Matcher
from mklvisita.inputs import load_image
from mklvisita.sources import colour

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"


@pytest.fixture(scope="module")
def photo() -> Matcher:
    return Matcher.default("photo")


def test_synset_expansion_equals_the_link_by_link_sum(photo):
    bridge = photo.model.sources["concept"]
    sentence = F.normalize(
        torch.randn(6, bridge.synset_text.shape[1], generator=torch.Generator().manual_seed(0)), dim=-1
    )
    with torch.inference_mode():
        got = bridge.synset_expansion(sentence)
        r = (sentence @ bridge._synset_matrix().T / bridge.synset_temperature).softmax(-1)  # (B, N)
        rows, cols = bridge.synset_links.long()
        want = torch.zeros(6, bridge.class_text.shape[0]).index_add_(1, cols, r[:, rows] * bridge.synset_link_weight)
    assert got.shape == want.shape == (6, 1000)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    assert torch.allclose(got.sum(-1), torch.ones(6), atol=1e-4)  # still a distribution over the classes


def _cells_pixels_last(names: colour.ColourNames, pixel_values: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The colour cells as first written: Lab with the channels last, names transposed back, out-of-place exp."""
    rgb = pixel_values.float() * names.std + names.mean
    valid = ((rgb - names.pad).abs() > 0.5 / 255.0).any(1, keepdim=True).float()
    b, _, height, width = rgb.shape
    lab = colour.srgb_to_lab(rgb.permute(0, 2, 3, 1)).reshape(-1, 3).T
    protos = colour.srgb_to_lab(torch.tensor(colour.PROTOTYPES, dtype=torch.float32) / 255.0)
    d2 = (lab * lab).sum(0, keepdim=True) - 2.0 * protos @ lab + (protos * protos).sum(-1, keepdim=True)
    w = torch.exp(-(d2 - d2.amin(0, keepdim=True)) / (2.0 * names.sigma**2))
    named = (w / w.sum(0, keepdim=True)).view(colour.NUM_COLOURS, b, height, width).transpose(0, 1) * valid
    total, share = F.adaptive_avg_pool2d(named, grid), F.adaptive_avg_pool2d(valid, grid)
    return (total / share.clamp_min(1e-6)).flatten(2).transpose(1, 2)


def test_colour_cells_equal_the_pixels_last_formulation(photo):
    names = photo.model.sources["colour"].names
    grid = photo.model.sources["colour"].grid
    examples, _ = photo.processor.images([load_image(EXAMPLES / "rocket.jpg"), load_image(EXAMPLES / "shapes_004.png")])
    noise = torch.randn(1, 3, *examples.shape[-2:], generator=torch.Generator().manual_seed(1))
    pixels = torch.cat([examples, noise])  # letterboxed photos (padding left out) and out-of-range values (clamped)
    with torch.inference_mode():
        s = names.stride  # the checkpoint's colour.stride: the reference names the same pixels
        got, want = names.cells(pixels, grid), _cells_pixels_last(names, pixels[..., ::s, ::s], grid)
    assert got.shape == want.shape == (3, grid[0] * grid[1], colour.NUM_COLOURS)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (got.sum(-1)[:2] > 0).any() and (got.sum(-1) <= 1 + 1e-5).all()
