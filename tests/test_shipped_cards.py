"""The shipped checkpoints' cards are what the one card writer writes from their JSON files, and say what the demo
shows about them."""

import re

import pytest

from mklvisita.cards import read_card, split_front_matter
from mklvisita.matcher import EMBEDDED
from training import shipped_cards

HISTORY = re.compile(r"session ?[0-9]|issue ?[0-9]|\bs[0-9]_", re.I)


@pytest.fixture(scope="module")
def written():
    if not all((EMBEDDED[n] / "model.safetensors").is_file() for n in ("photo", "photo-sources", "shapes")):
        pytest.skip("no shipped checkpoints")
    return shipped_cards.shipped_cards()


def test_shipped_cards_are_what_the_writer_writes(written):
    for folder, text in written.items():
        shipped = (shipped_cards.ROOT / folder / "README.md").read_text(encoding="utf-8")
        assert shipped == text, f"{folder}/README.md is stale: run python -m training.shipped_cards"


def test_shipped_cards_are_hub_model_cards_with_their_facts(written):
    photo, shapes = read_card(written[shipped_cards.PHOTO]), read_card(written[shipped_cards.SHAPES])
    sources = read_card(written[shipped_cards.PHOTO_SOURCES])
    for meta, folder in (
        (photo, shipped_cards.PHOTO),
        (sources, shipped_cards.PHOTO_SOURCES),
        (shapes, shipped_cards.SHAPES),
    ):
        text = written[folder]
        assert meta.license == "apache-2.0" and meta.trained_on and meta.cannot_know and meta.evaluations
        body = split_front_matter(text)[1]
        for heading in ("Intended use", "Training data", "Evaluation", "Limitations", "Licence"):
            assert f"\n## {heading}\n" in body, heading
        assert not HISTORY.search(text), HISTORY.search(text)
        for e in meta.evaluations:
            assert (shipped_cards.ROOT / e.source).is_file() and e.command.startswith("python -m training.")
    assert "ImageNet" in sources.trained_on and "colour" in sources.cannot_know
    assert sources.metrics("Tux Paint photo stamps, test half")["i2t_r1"] == pytest.approx(35.84)
    assert "clip art" in photo.trained_on and "left of" in photo.cannot_know
    assert photo.metrics("Tux Paint photo stamps, test half")["i2t_r1"] == pytest.approx(36.99)
    assert photo.metrics("Tux Paint relations, test half")["binding_acc_reverse"] == pytest.approx(0.86)
    assert shapes.data == "shapes" and "photographs" in shapes.cannot_know
    assert shapes.metrics("Shapes scenes, held-out test split")["binding_acc"] == pytest.approx(0.9754)
