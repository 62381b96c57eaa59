"""benchmarks.run --quick: every benchmark runs and saves a table of the expected shape (no time is asserted)."""

import json

import pytest

from benchmarks import run


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    in_process = [b for b in run.BENCHMARKS if b != "explain_memory"]  # that one has its own test below
    return run.main(["--quick", "--out", str(out), "--only", ",".join(in_process)]), out


def test_every_benchmark_saves_its_json(summary):
    s, out = summary
    assert set(s["results"]) == set(run.BENCHMARKS) - {"explain_memory"}
    for name in s["results"]:
        saved = json.loads((out / f"{name}.json").read_text())
        assert saved["quick"] and saved["rows"] and saved["machine"]["cpu_count"] >= 1
    assert json.loads((out / "summary.json").read_text())["results"].keys() == s["results"].keys()


def test_rows_have_the_documented_columns(summary):
    r = summary[0]["results"]
    lat = r["latency"]["rows"][0]
    assert {"match_p50_ms", "match_p95_ms", "dual_p50_ms", "match_over_dual", "explain_p95_ms"} <= set(lat)
    assert lat["match_p50_ms"] > 0 and lat["match_over_dual"] > 0
    assert r["flops"]["rows"][0]["of_matmul"] == 1.0 and r["flops"]["rows"][1]["gflop"] > 0
    sizes = r["retrieval_scaling"]["rows"]
    assert [row["images"] for row in sizes] == [8, 16, 32]
    assert all(row["captions"] == 5 * row["images"] for row in sizes)
    (growth,) = r["retrieval_scaling"]["growth_x4"]  # N = 8 -> 32, as 500 -> 2,000 in the full run
    assert growth["from"] == 8 and growth["to"] == 32 and growth["cascade_s"] > 0
    assert growth["exhaustive_pairs"] == pytest.approx(16.0) and growth["global_pairs"] == pytest.approx(16.0)
    assert {"global_s", "similarity_s", "rerank_s", "similarity_pairs", "itm_pairs", "exhaustive_similarity_s"} <= set(
        sizes[0]
    )
    mem = r["memory"]["rows"][0]
    assert mem["requests"] == 40 and mem["rss_mb"] > 0
    step = r["training_step"]["rows"][0]
    assert {"data_ms", "preprocess_ms", "forward_ms", "backward_ms", "optimizer_ms", "steps_per_s"} <= set(step)
    assert step["cached"] is True


def test_the_training_step_also_times_the_uncached_path():
    from benchmarks import training_step

    overrides = ["data.train_size=8", "batch_size=2"]
    row = training_step.measure("training/configs/shapes.yaml", overrides, steps=1, uncached=True)
    assert row["cached"] is False and row["data_ms"] > 0 and row["step_ms"] > 0


@pytest.mark.slow  # two child processes, each importing torch
def test_explain_memory_quick_reports_capped_maps(tmp_path):
    from benchmarks import explain_memory

    out = explain_memory.main(["--quick", "--cases", "default,full", "--out", str(tmp_path)])
    capped, full = out["rows"]
    assert json.loads((tmp_path / "explain_memory.json").read_text())["rows"] == out["rows"]
    for row in out["rows"]:
        assert "error" not in row, row
        assert {"peak_rss_mb", "rss_before_mb", "explain_extra_mb", "explain_s", "maps_mb"} <= set(row)
        assert row["peak_rss_mb"] >= row["rss_before_mb"] > 0 and row["dtype"] == "float32"
    assert capped["word_heatmaps_shape"] == [10, 768, 1024]  # the quick image is 1,200 x 900
    assert full["word_heatmaps_shape"] == [10, 900, 1200] and full["maps_mb"] > capped["maps_mb"]


def test_latency_base_variants_change_only_the_fusion(monkeypatch):
    """--configs base-w768 / base-pool3 / base-pool4 / base-layers4: the base preset with its fusion changed (width
    and heads together, or one field), the same backbones and tokenizer as the base row; unknown names are refused.
    (Models are not built: a stand-in records the config.)"""
    import mklvisita
    from benchmarks import latency

    monkeypatch.setattr(mklvisita, "MKLVisITA", lambda cfg, tokenizer=None: (cfg, tokenizer))
    monkeypatch.setattr(mklvisita, "Matcher", lambda model: model)
    built = {name: build() for name, build in latency.matchers(False, ["base", *latency.BASE_VARIANTS]).items()}
    assert len(built) == 1 + len(latency.BASE_VARIANTS)
    (base, tok), *variants = built.values()
    diffs = []
    for cfg, t in variants:
        assert t is tok and (cfg.vision, cfg.text, cfg.kernels) == (base.vision, base.text, base.kernels)
        diffs.append({k: v for k, v in vars(cfg.fusion).items() if v != getattr(base.fusion, k)})
    assert diffs == [{"width": 768, "heads": 12}, {"image_pool": 3}, {"image_pool": 4}, {"layers": 4}]
    with pytest.raises(SystemExit, match="base-pool5"):
        latency.matchers(False, ["base-pool5"])


def test_photo_score_times_scoring_and_both_kinds_of_maps(tmp_path):
    """benchmarks/photo_score.py on the photo checkpoint: score and explain timings saved (no time is asserted)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "photo_score.py"
    spec = importlib.util.spec_from_file_location("photo_score", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "photo.json"
    assert module.main(["--repeats", "2", "--explain", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["checkpoint"] == "mklvisita-photo" and saved["score_1x5_median_ms"] > 0
    assert saved["explain_map_shifts_2_median_ms"] > 0 and saved["explain_map_shifts_1_median_ms"] > 0
    # the fusion's maps: Grad-CAM and the checkpoint's own default method, the one the demo shows
    assert saved["explain_gradcam_median_ms"] > 0 and saved["explain_default_median_ms"] > 0
    config = json.loads((path.parent.parent / "assets" / "mklvisita-photo" / "config.json").read_text())
    assert saved["explain_default_method"] == config["fusion"]["explain_method"]
