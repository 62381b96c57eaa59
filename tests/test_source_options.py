"""The sources' cost settings (kernels.options: colour.stride, scene_text.detector_side, person.scale_step) and serving
a checkpoint with other settings (MKLVisITA.from_pretrained(source_options=...)): each setting reaches the part it
tunes, bad values are refused with the field named, and the defaults keep the features as they were."""

from __future__ import annotations

import pytest
import torch

from mklvisita import Matcher, MKLVisITA
from mklvisita.checkpoint import CheckpointError
from mklvisita.config import ConfigError
from mklvisita.matcher import EMBEDDED
from mklvisita.sources.colour import ColourNames, ColourOptions
from mklvisita.sources.person import PersonOptions
from mklvisita.sources.scene_text import DET_SIDE, SceneTextOptions
from mklvisita.tokenizer import load_tokenizer

PHOTO = EMBEDDED["photo"]
EXAMPLES = PHOTO.parent / "examples"
CHEAP = {"colour": {"stride": 2}, "scene_text": {"detector_side": 224}, "person": {"scale_step": 1.3}}


def _shipped() -> None:
    if not (PHOTO / "model.safetensors").is_file():
        pytest.skip("no shipped photo checkpoint")


def test_the_defaults_are_the_settings_before_the_options_existed():
    assert ColourOptions().stride == 1
    assert SceneTextOptions().detector_side == DET_SIDE == 256
    assert PersonOptions(classes=[981]).scale_step == 1.2


@pytest.mark.parametrize(
    "options, field",
    [
        (ColourOptions(stride=0), "colour.stride"),
        (ColourOptions(stride=1.5), "colour.stride"),
        (SceneTextOptions(detector_side=200), "scene_text.detector_side"),
        (SceneTextOptions(detector_side=16), "scene_text.detector_side"),
        (PersonOptions(classes=[981], scale_step=1.0), "person.scale_step"),
    ],
)
def test_bad_settings_are_refused_by_name(options, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        options.validate()


def test_a_colour_stride_names_every_other_pixel():
    _shipped()
    tok = load_tokenizer(str(PHOTO))
    whole = ColourNames(15.0, 4.0, tok, (0.5,) * 3, (0.5,) * 3, (128,) * 3)
    strided = ColourNames(15.0, 4.0, tok, (0.5,) * 3, (0.5,) * 3, (128,) * 3, stride=2)
    torch.manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 7, 7) * 2 - 1, size=(224, 224), mode="bilinear")
    got = strided.cells(smooth, (7, 7))
    assert torch.equal(got, whole.cells(smooth[..., ::2, ::2], (7, 7)))  # the same pixels, named the same way
    assert (got - whole.cells(smooth, (7, 7))).abs().max() < 0.05  # smooth gradients: cells within a few hundredths


def test_a_checkpoint_serves_with_other_source_settings():
    _shipped()
    model = MKLVisITA.from_pretrained(PHOTO, source_options=CHEAP)
    sources = model.kernels.sources
    assert sources["colour"].names.stride == 2
    assert sources["scene_text"].reader._engine.text_det.limit_side_len == 224
    assert sources["person"].detector.scale_step == 1.3
    for source, settings in CHEAP.items():
        assert model.config.kernels.options[source] | settings == model.config.kernels.options[source]
    shipped = MKLVisITA.from_pretrained(PHOTO)
    for name, p in shipped.state_dict().items():  # settings only: every weight the same
        assert torch.equal(p, model.state_dict()[name]), name


def test_other_settings_change_the_features_they_tune():
    _shipped()
    shipped = Matcher.default("photo")
    stride = shipped.model.config.kernels.options["colour"].get("stride", 1)
    other = Matcher(MKLVisITA.from_pretrained(PHOTO, source_options={"colour": {"stride": 4 if stride != 4 else 1}}))
    captions = ["a tabby cat lying on a rug", "a white cup on a wooden table"]
    a = shipped.score([str(EXAMPLES / "cat.jpg")], captions)
    b = other.score([str(EXAMPLES / "cat.jpg")], captions)
    colour = shipped.model.kernel_names.index("colour/share")
    assert (a.kernel_contributions[..., colour] != b.kernel_contributions[..., colour]).any()
    rest = [i for i in range(len(shipped.model.kernel_names)) if i != colour]
    assert (a.kernel_contributions[..., rest] == b.kernel_contributions[..., rest]).all()


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"nope": {"stride": 2}}, ValueError, "no source 'nope'"),
        ({"colour": 2}, ValueError, "must map settings"),
        ({"colour": {"strid": 2}}, CheckpointError, "did you mean 'stride'"),
        ({"colour": {"stride": 0}}, CheckpointError, "colour.stride"),
    ],
)
def test_bad_source_options_are_refused(options, error, message):
    _shipped()
    with pytest.raises(error, match=message):
        MKLVisITA.from_pretrained(PHOTO, source_options=options)
