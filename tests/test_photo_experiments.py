"""training.photo_experiments: the clip-art captions it trains on and the weight grid it reports."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from training import photo_experiments as pe

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"


def _clipart(root: Path, rel: str, title: str | None) -> None:
    png = root / "png" / rel
    png.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGBA", (8, 8), (255, 0, 0, 255)).save(png)
    if title is not None:
        svg = root / "svg" / Path(rel).with_suffix(".svg")
        svg.parent.mkdir(parents=True, exist_ok=True)
        svg.write_text(f"<svg><metadata><dc:title>{title}</dc:title></metadata></svg>")


def test_clipart_captions_come_from_titles_that_name_something(tmp_path, monkeypatch):
    _clipart(tmp_path, "animals/chipmunk.png", "Clipart by Nicu Buculei - contour_chipmunk")
    _clipart(tmp_path, "food/apple_01.png", "Red Apple &amp; Leaf")
    _clipart(tmp_path, "signs_and_symbols/flags/europe/ireland.png", "ireland")
    _clipart(tmp_path, "signs_and_symbols/flags/kansasflag.png", "Kansas flag")
    _clipart(tmp_path, "computer/icons/printer.png", "printer")  # icon sets are left out
    _clipart(tmp_path, "office/icon_pen.png", "Part of the Flat Icon Collection")  # generic title
    _clipart(tmp_path, "tools/no_svg.png", None)  # no metadata: no caption
    for i in range(9):  # a title shared by more than 8 files says nothing about any one of them
        _clipart(tmp_path, f"people/card_{i}.png", "card game")
    monkeypatch.setattr(pe, "CLIPART", tmp_path)
    pairs = {p.relative_to(tmp_path / "png").as_posix(): t for p, t in pe.clipart_pairs()}
    assert pairs == {
        "animals/chipmunk.png": "contour chipmunk",
        "food/apple_01.png": "Red Apple & Leaf",
        "signs_and_symbols/flags/europe/ireland.png": "the flag of ireland",
        "signs_and_symbols/flags/kansasflag.png": "Kansas flag",
    }
    monkeypatch.setattr(pe, "CLIPART", tmp_path / "absent")
    with pytest.raises(SystemExit, match="apt-get install openclipart"):
        pe.clipart_pairs()


def test_scores_reports_shipped_and_best_weights():
    rng = np.random.default_rng(0)
    n = 20
    perfect = np.eye(n) + 0.01 * rng.random((n, n))  # kernel 0 ranks every pair right
    noise = rng.random((n, n, 2))
    txt2img = np.arange(n)
    out = pe.scores(np.concatenate([perfect[..., None], noise], -1), txt2img)
    assert out["best"][:2] == [100.0, 100.0] and out["best_w"][0] > 0
    alone = pe.scores(noise[..., :1], txt2img)  # one kernel: no grid, its own figures
    assert alone["best_w"] == [1.0] and alone["best"] == alone["shipped_w"] and alone["best"][0] < 100.0


def test_bench_recombines_the_checkpoints_own_kernel_values():
    """Bench.values(*Bench.sources()) equals the model's own similarity, every kernel (colour, scene text included)."""
    from mklvisita.inputs import Processor
    from mklvisita.model import MKLVisITA

    torch.set_grad_enabled(False)
    try:
        b = pe.Bench.__new__(pe.Bench)  # the tune half is not needed: two example photos, a sign, four captions
        b.model = MKLVisITA.from_pretrained(str(pe.CHECKPOINT)).eval()
        b.bridge, b.processor, b.pixels = b.model.sources["concept"], Processor(b.model.config, b.model.tokenizer), []
        sign = Image.new("RGB", (448, 448), "white")
        ImageDraw.Draw(sign).text((40, 180), "STOP", fill="black", font=ImageFont.load_default(size=72))
        images = [EXAMPLES / "cat.jpg", EXAMPLES / "coffee.jpg", sign]
        captions = ["a tabby cat lying on a rug", "a white cup on a wooden table", "an orange cat", "a stop sign"]
        b.pooled, b.maps = b.images(images, keep_pixels=True)
        b.text = b.captions(captions)
        got = b.values(*b.sources())
        m = b.model
        pv, _ = b.processor.images(images)
        enc = b.processor.captions(captions)
        out = m.similarity(m.embed_image(m.encode_image(pv)), m.embed_text(m.encode_text(**enc)))
        want = (out.contributions / out.weights).float().numpy()
    finally:
        torch.set_grad_enabled(True)
    for name in ("colour/share", "scene_text/match"):  # both fixed sources present and at work
        assert np.abs(want[..., m.kernel_names.index(name)]).max() > 0.01
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_domain_accuracy_tells_separate_sets_apart_and_not_alike_ones():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(60, 16, generator=g)
    apart = pe.domain_accuracy(a + 3.0 * torch.eye(16)[0], a.flip(0) - 3.0 * torch.eye(16)[0])  # one axis splits them
    alike = pe.domain_accuracy(torch.randn(60, 16, generator=g), torch.randn(60, 16, generator=g))  # one distribution
    assert apart > 0.95 and 0.3 < alike < 0.7
