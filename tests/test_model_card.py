"""The release's model card states the ranking rule the run's evaluation used: the effective k, never "k = None"."""

import dataclasses

from conftest import micro_config

from mklvisita import MKLVisITA
from mklvisita.config import RankingConfig
from mklvisita.inputs import Processor
from training.config import RunConfig
from training.train import effective_ranking, model_card, write_release


def test_card_states_the_models_k_when_the_run_leaves_it_to_the_model():
    cfg = RunConfig()
    assert cfg.eval.k is None and cfg.eval.itm_weight is None  # the defaults defer to the model's ranking
    card = model_card(cfg, {"i2t_r1": 12.5}, 10, RankingConfig(k=16, candidates=128, itm_weight=1.0))
    assert "None" not in card.split("## Training config")[0]
    assert "top k = 16" in card and "128 candidates per query" in card and "1 × ITM + 1 × S" in card


def test_card_applies_the_runs_overrides_and_says_when_there_is_no_itm():
    cfg = RunConfig()
    cfg.eval.k, cfg.eval.itm_weight = 4, 0.5
    ranking = RankingConfig(k=16, candidates=0)
    assert effective_ranking(cfg, ranking) == dataclasses.replace(ranking, k=4, itm_weight=0.5)
    card = model_card(cfg, {}, 1, ranking)
    assert "top k = 4" in card and "0.5 × ITM" in card and "exhaustive S" in card
    assert "score = S (no fusion head" in model_card(cfg, {}, 1, ranking, fusion=False)


def test_card_says_a_fine_tune_started_from_another_release():
    cfg = RunConfig()
    ranking = RankingConfig(k=16, candidates=0)
    assert "fine-tuned" not in model_card(cfg, {}, 1, ranking)
    cfg.init_from = "runs/shapes/release"
    head = model_card(cfg, {}, 1, ranking).split("## Metrics")[0]
    assert "starting from the weights of `runs/shapes/release` (fine-tuned)" in head


def test_written_release_card_has_the_effective_k(tmp_path):
    model = MKLVisITA(micro_config())
    write_release(model, Processor(model.config, model.tokenizer), RunConfig(), {}, tmp_path / "release", 3)
    card = (tmp_path / "release" / "README.md").read_text()
    assert f"top k = {model.config.ranking.k}" in card and "k = None" not in card


def test_card_metadata_comes_from_the_task_and_reads_back():
    from mklvisita.cards import read_card

    cfg = RunConfig()  # trains on shapes
    meta = read_card(model_card(cfg, {"i2t_r1": 12.5, "rsum": 100.0}, 10, RankingConfig(k=16, candidates=0)))
    assert meta.data == "shapes" and meta.license == "apache-2.0"
    assert "shapes" in meta.trained_on and "photographs" in meta.cannot_know
    assert meta.metrics() == {"i2t_r1": 12.5, "rsum": 100.0}
