"""Model cards: one writer (mklvisita.cards), structured metadata in the front matter, read back without parsing
prose."""

import pytest
import yaml

from mklvisita.cards import CardError, Evaluation, ModelCard, read_card, render_card, split_front_matter, write_card


def _card() -> ModelCard:
    return ModelCard(
        title="Test checkpoint",
        summary="A checkpoint for the test.",
        data="shapes",
        trained_on="shapes scenes only",
        cannot_know="photographs",
        details="Two kernels.",
        evaluations=[
            Evaluation(
                "Shapes, test split",
                "shapes",
                "test",
                {"i2t_r1": 18.912345, "binding_acc": 0.975},
                "a.json",
                "python -m training.evaluate --out a.json",
                "k = 16.",
            ),  # fmt: skip
            Evaluation("Shapes, compositional", "shapes-compositional", "test_compositional", {"rsum": 219.48}),
        ],
        base_models=["timm/tf_efficientnet_lite0.in1k"],
    )


def test_render_then_read_gives_the_facts_back():
    text = render_card(_card())
    meta = read_card(text)
    assert (meta.task, meta.data, meta.trained_on, meta.cannot_know) == (
        "image-text matching", "shapes", "shapes scenes only", "photographs"
    )  # fmt: skip
    assert meta.license == "apache-2.0"
    assert meta.metrics() == {"i2t_r1": 18.91, "binding_acc": 0.975}  # 4 significant digits
    assert meta.metrics("Shapes, compositional") == {"rsum": 219.5} and meta.metrics("nothing") == {}
    assert meta.evaluations[0].source == "a.json" and meta.evaluations[0].command.endswith("--out a.json")


def test_the_card_is_a_hub_model_card():
    text = render_card(_card())
    front, body = split_front_matter(text)
    meta = yaml.safe_load(front)
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "mklvisita"
    assert meta["base_model"] == ["timm/tf_efficientnet_lite0.in1k"]
    (entry,) = meta["model-index"]
    assert [r["dataset"]["type"] for r in entry["results"]] == ["shapes", "shapes-compositional"]
    assert {"type": "i2t_r1", "value": 18.91, "name": "image → text R@1 (%)"} in entry["results"][0]["metrics"]
    assert body.startswith("# Test checkpoint\n")
    order = [body.index(f"## {h}") for h in ("Model details", "Training data", "Evaluation", "Limitations", "Licence")]
    assert order == sorted(order)
    assert "**It cannot know:** photographs" in body and "The JSON behind these figures: `a.json`" in body


def test_cards_without_the_section_read_as_empty_and_bad_ones_are_refused():
    assert read_card("") == read_card("# just a heading\n") == read_card("---\nlicense: mit\n---\n# x\n").__class__()
    assert read_card("---\nlicense: mit\n---\n# x\n").license == "mit"
    with pytest.raises(CardError, match="not valid YAML"):
        read_card("---\nlicense: [unclosed\n---\n")
    with pytest.raises(CardError, match="evaluations are malformed"):
        read_card("---\nmklvisita:\n  evaluations: [3]\n---\n")
    assert issubclass(CardError, ValueError)


def test_write_card_replaces_the_readme_whole(tmp_path):
    (tmp_path / "README.md").write_text("old card")
    path = write_card(tmp_path, _card())
    assert path == tmp_path / "README.md" and read_card(path.read_text()).data == "shapes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]  # no temporary file left
