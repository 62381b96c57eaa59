"""benchmarks/photo_score.py: the floor, the ratio and every part's share are reported, each part found in the code
as it is (a renamed method would fall out of the shares silently otherwise); scores saved and compared. No time is
asserted."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def photo_score():
    spec = importlib.util.spec_from_file_location("photo_score", ROOT / "benchmarks" / "photo_score.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_floor_ratio_and_parts(photo_score, tmp_path):
    out = tmp_path / "photo.json"
    assert photo_score.main(["--repeats", "3", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["parts_not_found"] == []  # every part of PARTS exists in the installed code
    assert saved["floor_median_ms"] > 0 and saved["score_1x5_median_ms"] > 0
    assert saved["score_with_part_timers_median_ms"] > 0  # the shares come from calls of their own
    assert saved["ratio"] == pytest.approx(saved["score_1x5_median_ms"] / saved["floor_median_ms"], rel=0.05)
    # the like-for-like floor on two cores: the better of its two ways, and the score over it
    two = saved["floor_two_cores_variants_median_ms"]
    assert set(two) == {"two_threads", "concurrent"} and saved["floor_two_cores_median_ms"] == min(two.values())
    assert two[saved["floor_two_cores_how"]] == saved["floor_two_cores_median_ms"]
    ratio = saved["score_1x5_median_ms"] / saved["floor_two_cores_median_ms"]
    assert saved["ratio_two_cores"] == pytest.approx(ratio, rel=0.05)
    parts = saved["score_parts_median_ms"]
    named = {"image backbone", "text backbone", "colour naming", "face detection", "text detection"}
    named |= {"concept bridge (image)", "concept bridge (captions)", "scene text (captions)"}
    named |= {"fusion (image side)", "fusion (pairs)"}  # the default photo checkpoint has the fusion branch
    assert named | {"text recognition", "kernels", "scene text (rest)", "waiting for the worker", "other"} <= set(parts)
    assert all(parts[p] > 0 for p in named)  # each was timed inside score
    assert parts["text recognition"] == 0  # the cat has no text line: nothing is read
    assert saved["command"].startswith("python benchmarks/photo_score.py --repeats 3")


def test_saved_scores_compare(photo_score, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert photo_score.main(["--save-scores", str(a)]) == 0
    saved = json.loads(a.read_text())
    assert {"cat.jpg", "rocket.jpg", "astronaut.jpg"} <= set(saved)
    cat = saved["cat.jpg"]
    assert len(cat["similarity"]) == len(cat["captions"]) and len(cat["kernel_contributions"][0]) == len(
        cat["kernel_names"]
    )
    changed = dict(saved, **{"cat.jpg": dict(cat, similarity=[s + 0.25 for s in cat["similarity"]])})
    b.write_text(json.dumps(changed))
    result = photo_score.compare_scores(saved, json.loads(b.read_text()))
    assert result["images_compared"] == len(saved) and result["max_abs_diff"] == pytest.approx(0.25)
    assert result["per_image"]["cat.jpg"] == pytest.approx(0.25) and result["per_image"]["rocket.jpg"] == 0


def test_alternations_time_two_ways_to_the_same_scores(photo_score, tmp_path):
    from mklvisita.sources import person

    out = tmp_path / "ab.json"
    shipped = person.MIN_FACE
    options = '{"colour": {"stride": 4}}'
    args = ["--repeats", "2", "--schedule-ab", "--min-face-ab", "24", "--options-ab", options, "--out", str(out)]
    assert photo_score.main(args) == 0
    assert person.MIN_FACE == shipped  # put back after the alternation
    saved = json.loads(out.read_text())
    faces = saved["min_face_ab"]
    assert set(faces) == {
        f"min_face_{shipped}_median_ms", "min_face_24_median_ms", "floor_median_ms",
        f"min_face_{shipped}_ratio", "min_face_24_ratio", f"min_face_{shipped}_over_min_face_24",
    }  # fmt: skip
    ratio = faces[f"min_face_{shipped}_median_ms"] / faces["floor_median_ms"]
    assert faces[f"min_face_{shipped}_ratio"] == pytest.approx(ratio, rel=0.02)
    schedule = saved["schedule_ab"]
    over = schedule["fusion_beside_detectors_median_ms"] / schedule["fusion_after_sources_median_ms"]
    assert schedule["fusion_beside_detectors_over_fusion_after_sources"] == pytest.approx(over, rel=0.02)
    served = saved["options_ab"]  # another colour stride: other colour features, so other scores
    assert served["options"] == {"colour": {"stride": 4}} and served["largest_output_difference"] > 0
    over = served["as_configured_median_ms"] / served["with_options_median_ms"]
    assert served["as_configured_over_with_options"] == pytest.approx(over, rel=0.02)


def test_a_size_that_changes_the_faces_found_is_refused(photo_score):
    astronaut = ROOT / "assets" / "examples" / "astronaut.jpg"  # a face the cascade finds at 32 px, not at 200
    with pytest.raises(AssertionError):
        photo_score.main(["--repeats", "2", "--image", str(astronaut), "--min-face-ab", "200"])
