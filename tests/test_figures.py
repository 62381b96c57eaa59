"""Figures: PIL images for the app, PNG/SVG files, nothing left open, and the figure-set command."""

import gc
import resource
import weakref

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from mklvisita import figures

IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8))
NAMES = ["global/cosine", "mid/rbf", "local/poly", "local/sigmoid"]


def _ramp(h: int = 30, w: int = 50) -> np.ndarray:
    return np.tile(np.linspace(0, 1, w, dtype=np.float32), (h, 1))


def _not_blank(img: Image.Image) -> bool:
    return np.asarray(img).std() > 5


def test_overlay_blends_without_a_figure():
    h = _ramp()
    assert figures.overlay(IMAGE, h, alpha=0.0).tobytes() == IMAGE.tobytes()
    full = np.asarray(figures.overlay(IMAGE, h, alpha=1.0, cmap="gray"))
    assert full.shape == (30, 50, 3)
    assert full[:, 0].max() == 0 and full[:, -1].min() == 255  # the ramp's 0 and 1 through a grey colour map
    small = figures.overlay(IMAGE, _ramp(4, 6), alpha=0.5)  # other shape: resized onto the image
    assert small.size == IMAGE.size
    assert not plt.get_fignums()


def test_every_plot_returns_a_pil_image():
    rng = np.random.default_rng(1)
    weights = dict(zip(NAMES, [0.1, 0.2, 0.3, 0.4]))
    images = [
        figures.plot_heatmap(IMAGE, _ramp(), title="caption"),
        figures.plot_word_maps(IMAGE, ["a", "red", "circle"], rng.random((3, 30, 50)), caption_map=_ramp()),
        figures.plot_kernel_weights(weights),
        figures.plot_kernel_weights(weights, pair_weights=dict(zip(NAMES, [0.4, 0.3, 0.2, 0.1]))),
        figures.plot_fusion_kernel_weights(rng.random((3, 2)), ["local/poly", "local/sigmoid"], image_levels=[0, 1, 3]),
        figures.plot_fusion_kernel_weights([{"local/poly": 0.3, "local/sigmoid": 0.7}] * 2),
        figures.plot_contributions(rng.normal(size=(3, 4)), NAMES, ["one", "two", "three"]),
        figures.plot_score_matrix(rng.random((2, 3)), ["img 0", "img 1"], ["a", "b", "c"]),
    ]
    for img in images:
        assert isinstance(img, Image.Image) and img.mode == "RGB"
        assert img.width > 100 and img.height > 100 and _not_blank(img)
    assert not plt.get_fignums()


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="n_captions"):
        figures.plot_contributions(np.zeros((2, 3)), NAMES, ["a", "b"])
    with pytest.raises(ValueError, match="n_images"):
        figures.plot_score_matrix(np.zeros((2, 2)), ["i"], ["a", "b"])
    with pytest.raises(ValueError, match="layers, kernels"):
        figures.plot_fusion_kernel_weights(np.zeros(3))


def test_save_png_and_svg(tmp_path):
    png = figures.save_figure(figures.plot_heatmap(IMAGE, _ramp(), figure=True), tmp_path / "a" / "map.png")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 100
    svg = figures.save_figure(lambda: figures.plot_kernel_weights({"k": 1.0}, figure=True), tmp_path / "w.svg")
    assert "<svg" in svg.read_text()[:2000]
    img = figures.plot_score_matrix(np.eye(2), ["x", "y"], ["a", "b"], save=tmp_path / "m.svg")
    assert isinstance(img, Image.Image) and (tmp_path / "m.svg").stat().st_size > 1000
    with pytest.raises(ValueError, match="format"):
        figures.save_figure(figures.plot_heatmap(IMAGE, _ramp(), figure=True), tmp_path / "map.jpg")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def test_figures_are_released_after_rendering():
    fig = figures.plot_heatmap(IMAGE, _ramp(), figure=True)
    assert isinstance(fig, Figure) and fig.axes
    figures.render(fig)
    assert not fig.axes  # cleared: nothing held beyond the returned image
    ref = weakref.ref(fig)
    del fig
    gc.collect()
    assert ref() is None  # no registry (pyplot) keeps it alive

    def batch(n: int) -> None:
        for _ in range(n):
            figures.plot_kernel_weights(dict(zip(NAMES, [0.25] * 4)))
            figures.plot_heatmap(IMAGE, _ramp())
        gc.collect()

    batch(20)  # warm caches and the allocator (RSS plateaus after ~50 figures) (fonts, colour maps)
    live = sum(type(o) is Figure for o in gc.get_objects())
    before = _rss_bytes()
    batch(30)
    grown = _rss_bytes() - before
    assert sum(type(o) is Figure for o in gc.get_objects()) <= live
    assert not plt.get_fignums()
    assert grown < 15_000_000, f"memory grew by {grown / 1e6:.1f} MB over 60 figures"


def test_figure_set_command(tiny_checkpoint, tmp_path, capsys):
    image = tmp_path / "photo.png"
    IMAGE.save(image)
    rc = figures.main(
        [
            "--checkpoint",
            str(tiny_checkpoint),
            "--image",
            str(image),
            "--caption",
            "a red circle",
            "--caption",
            "two squares",
            "--out",
            str(tmp_path / "out"),
            "--format",
            "png",
            "svg",
        ]
    )
    assert rc == 0
    written = {p.name for p in (tmp_path / "out").iterdir()}
    for stem in [
        "00_a_red_circle_caption",
        "00_a_red_circle_words",
        "01_two_squares_kernels",
        "rollout",
        "kernel_weights",
        "fusion_kernel_weights",
        "contributions",
        "scores",
    ]:
        assert {f"{stem}.png", f"{stem}.svg"} <= written
    assert str(tmp_path / "out" / "scores.png") in capsys.readouterr().out
    assert (
        figures.main(
            [
                "--checkpoint",
                str(tmp_path / "missing"),
                "--image",
                str(image),
                "--caption",
                "x",
                "--out",
                str(tmp_path / "o2"),
            ]
        )
        == 2
    )
    with pytest.raises(SystemExit):
        figures.main(["--out", str(tmp_path / "o3")])  # neither an image nor a shapes scene
    assert not plt.get_fignums()


def test_figure_set_command_defaults_fit_the_checkpoint(tmp_path):
    """No --checkpoint: a shapes scene gets the shapes checkpoint (Grad-CAM through its fusion); a photo gets the
    demo's default, the photo checkpoint, which has no fusion, so its maps default to the kernel method."""
    image = tmp_path / "photo.png"
    IMAGE.save(image)
    assert figures.main(["--image", str(image), "--caption", "a red circle", "--out", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "00_a_red_circle_words.png").is_file()
    assert figures.main(["--shapes", "3", "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "fusion_kernel_weights.png").is_file()  # the shapes model (it has fusion) was used
    assert not plt.get_fignums()


def test_contribution_bars_draw_the_chart_without_a_figure():
    """The Match tab's bars (PIL): each kernel's colour on its side of zero in its row, the totals' ticks in black."""
    c = np.array([[0.3, 0.1], [0.0, -0.2]])
    live = sum(type(o) is Figure for o in gc.get_objects())
    img = figures.contribution_bars(c, ["global/cosine", "local/rbf"], ["first", "second"])
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.width == 800 and _not_blank(img)
    assert sum(type(o) is Figure for o in gc.get_objects()) <= live and not plt.get_fignums()
    a = np.asarray(img).astype(int)
    frame = np.nonzero(((a == 0).all(-1)).sum(0) > a.shape[0] / 2)[0]  # the axes' left and right edges
    a = a[:, : frame.max()]  # the legend (right of the axes) repeats the colours
    blue, light = (figures._colour_table("tab20")[:2] * 255).round().astype(int)

    def where(colour: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.nonzero((np.abs(a - colour) <= 1).all(-1))

    by, bx = where(blue)  # kernel 0: row 0 only, right of zero
    ly, lx = where(light)  # kernel 1: row 0 right of kernel 0's bar, row 1 left of zero
    assert by.size and ly.size
    rows = np.unique(ly > a.shape[0] / 2)
    assert by.max() < a.shape[0] / 2 and set(rows) == {False, True}
    zero = bx.min()  # kernel 0's bar starts at zero
    assert lx[ly < a.shape[0] / 2].min() >= bx.max() and lx[ly > a.shape[0] / 2].max() < zero
    with pytest.raises(ValueError, match="n_captions"):
        figures.contribution_bars(np.zeros((2, 3)), NAMES, ["a", "b"])


def test_fallback_text_takes_each_glyph_from_the_first_font_that_has_it():
    text = figures.FallbackText()
    runs = text.runs("a cat 猫")
    assert runs[0] == (0, "a cat ")  # Latin and its spaces: the first font
    if len(text.paths) > 1 and any(f in figures.FONT_FAMILIES for f in ("Noto Sans CJK JP", "Droid Sans Fallback")):
        assert runs[-1][0] > 0 and runs[-1][1] == "猫"
        only_first = figures.FallbackText(["DejaVu Sans"])
        assert only_first.runs("猫") == [(0, "猫")]  # no other font: a missing-glyph box, as matplotlib draws
    assert text.length("a cat", 11) > text.length("a", 11) > 0


def test_overlay_colours_are_the_colour_maps():
    """The overlays' colour table gives the colour map's own colours, bin for bin."""
    import matplotlib

    h = np.linspace(0, 1, 1001, dtype=np.float32)
    for cmap in ("jet", "inferno", "gray"):
        want = matplotlib.colormaps[cmap](h)[:, :3]
        assert np.allclose(figures._colours(cmap, h), want, atol=1e-6)


def test_contribution_bars_take_any_numbers():
    """Bars narrower than a pixel, all zeros, one row, many rows, NaN: a chart every time."""
    rng = np.random.default_rng(3)
    for c in [np.zeros((2, 3)), np.array([[1e-9, 0.0, 0.3], [0.0, 0.2, -1e-9]]), rng.normal(size=(16, 4)) * 1e-3]:
        img = figures.contribution_bars(c, NAMES[: c.shape[1]], [f"caption {i}" for i in range(len(c))])
        assert img.width == 800 and img.height > 100
    for width in np.linspace(0.0, 0.01, 41):  # every sub-pixel offset of a narrow bar next to a wide one
        figures.contribution_bars(np.array([[1.0, width], [0.5, -width]]), NAMES[:2], ["a", "b"])
    assert figures.contribution_bars(np.array([[np.nan, 1.0]]), NAMES[:2], ["a"]).height > 100
