"""Shift-averaged kernel maps (kernels.map_shifts): the moves and realignment agree, and explanations use them."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mklvisita import MKLVisITA
from mklvisita.explain import explain_pair, realign, shift_input
from mklvisita.inputs import Processor
from mklvisita.pointing import pointing_game


@pytest.fixture()
def model(tiny_checkpoint):
    return MKLVisITA.from_pretrained(tiny_checkpoint).eval()


def _image(w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_shift_input_moves_content_down_and_right_and_fills_the_border():
    x = torch.arange(2 * 6 * 7, dtype=torch.float32).view(1, 2, 6, 7)
    fill = torch.tensor([-1.0, -2.0])
    y = shift_input(x, 2, 3, fill)
    torch.testing.assert_close(y[..., 2:, 3:], x[..., :4, :4])
    assert (y[:, 0, :2] == -1).all() and (y[:, 1, :, :3] == -2).all()
    torch.testing.assert_close(shift_input(x, -1, -2, fill)[..., :5, :5], x[..., 1:, 2:])


def test_realign_reads_the_moved_frame_and_repeats_the_border():
    m = torch.arange(20, dtype=torch.float32).view(4, 5)
    r = realign(m, 1, 2)
    torch.testing.assert_close(r[:3, :3], m[1:, 2:])
    torch.testing.assert_close(r[3, :3], m[3, 2:])  # last row: the nearest row again


def test_realigned_maps_of_moved_inputs_match_the_unmoved_map():
    """A translation-equivariant map (average pooling at the fine cell size): moving the input by k fine cells and
    realigning by k cells gives the unmoved input's map back (away from the border), so explain's moves and
    realignment point the same way."""
    cell = 4
    x = torch.zeros(1, 1, 32, 32)
    x[..., 12:20, 8:14] = 1.0  # an object
    x += 0.1 * torch.rand_like(x)
    base = F.avg_pool2d(x, cell)[0, 0]  # (8, 8)
    for ky, kx in [(1, 0), (0, 1), (1, 1), (2, 1)]:
        moved = shift_input(x, ky * cell, kx * cell, torch.zeros(1))
        back = realign(F.avg_pool2d(moved, cell)[0, 0], ky, kx)
        torch.testing.assert_close(back[: 8 - ky, : 8 - kx], base[: 8 - ky, : 8 - kx])
        wrong = realign(F.avg_pool2d(moved, cell)[0, 0], -ky, -kx)  # the opposite convention does not match
        assert not torch.allclose(wrong[2:6, 2:6], base[2:6, 2:6])


def test_explanations_with_map_shifts(model):
    processor = Processor(model.config, model.tokenizer)
    one = explain_pair(model, processor, _image(50, 30), "a red circle", method="kernel")
    model.config.kernels.map_shifts = 2
    two = explain_pair(model, processor, _image(50, 30), "a red circle", method="kernel")
    assert two.word_heatmaps.shape == one.word_heatmaps.shape == (3, 30, 50)
    assert 0 <= two.caption_heatmap.min() and two.caption_heatmap.max() == pytest.approx(1.0)
    assert set(two.kernel_maps) == set(one.kernel_maps)
    assert not np.allclose(two.word_heatmaps, one.word_heatmaps, atol=1e-3)  # four passes, not one
    assert two.similarity == pytest.approx(one.similarity)  # scores never use the shifts
    scenes = [{"image": _image(60, 40), "objects": [{"phrase": "a red circle", "mask": np.ones((40, 60), bool)}]}]
    assert pointing_game(model, processor, scenes, methods=["kernel"])["pointing_acc_kernel"] == 1.0


@pytest.mark.parametrize("bad", [0, -1, 2.5, 99])
def test_a_bad_map_shifts_is_a_plain_error(model, bad):
    model.config.kernels.map_shifts = bad
    with pytest.raises(ValueError, match="map_shifts"):
        explain_pair(model, Processor(model.config, model.tokenizer), _image(20, 20), "a circle", method="kernel")


def test_shift_averaging_of_a_linear_ramp_is_the_ramp():
    """A stub model whose 'kernel map' is the input's mean intensity per grid cell: for an input that is a linear ramp
    (in x and y), every moved pass, upsampled and realigned, is the same ramp on the fine grid (bilinear interpolation
    is exact on linear functions), so the average equals the one-pass map away from the border. A wrong move or
    realignment (e.g. k instead of 2k fine cells) shifts the ramp and fails."""
    from types import SimpleNamespace

    from mklvisita.explain import _shift_averaged

    size, gh, gw = 144, 6, 6  # a cell of 24 pixels: moves of 1/2 and 1/3 cell are whole pixels
    cell = size // gh

    def maps_of(pixels):  # (1, C, H, W) -> (1, n_maps=1, T=1, P)
        return F.avg_pool2d(pixels[:, :1], cell).reshape(1, 1, 1, gh * gw)

    stub = SimpleNamespace(
        vision=SimpleNamespace(grids=[(gh, gw)]),
        encode_image=lambda pixels: pixels,
        embed_image=lambda img: img,
        kernels=SimpleNamespace(word_patch_maps=lambda img, txt: maps_of(img)),
    )
    ys, xs = torch.meshgrid(
        torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij"
    )
    ramp = (2.0 * xs + 0.5 * ys).expand(1, 3, size, size).contiguous()
    one = maps_of(ramp)[0]  # (1, 1, P)
    for n in (2, 3):
        averaged, grid = _shift_averaged(stub, ramp, torch.zeros(3), None, one, n)
        assert grid == (2 * n * gh, 2 * n * gw)
        f = 2 * n
        single = F.interpolate(one.reshape(1, 1, gh, gw), scale_factor=f, mode="bilinear")[0, 0]
        inner = slice(2 * f, (gh - 2) * f)  # two cells from the border (clamped interpolation, moved-in padding)
        torch.testing.assert_close(averaged.reshape(grid)[inner, inner], single[inner, inner], atol=0.05, rtol=0)


def test_a_config_with_a_bad_map_shifts_is_refused_when_loaded():
    from mklvisita.config import ConfigError, MKLVisITAConfig

    data = MKLVisITAConfig.tiny().to_dict()
    data["kernels"]["map_shifts"] = 0
    with pytest.raises(ConfigError, match="map_shifts"):
        MKLVisITAConfig.from_dict(data).validate()
