"""Explanations: shapes, ranges, alignment with the original image, no gradient state left behind, thread safety."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from conftest import micro_config
from PIL import Image

from mklvisita import MKLVisITA
from mklvisita.explain import (
    MAP_MAX_SIDE,
    attention_rollout,
    default_layer,
    explain_pair,
    grad_cam,
    image_rollout,
    layer_maps,
)
from mklvisita.inputs import InvalidCaptionError, Letterbox, Processor
from mklvisita.pointing import pointing_game, word_pointing_game, word_pointing_hits

CAPTION = "a large red circle left of a blue square"


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return MKLVisITA.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def processor(model):
    return Processor(model.config, model.tokenizer)


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("method", ["gradcam", "attention", "kernel"])
@pytest.mark.parametrize("normalize", ["per_map", "shared"])
def test_shapes_and_ranges_in_the_original_frame(model, processor, method, normalize):
    e = explain_pair(model, processor, _image(50, 30), CAPTION, method=method, normalize=normalize)
    n = len(CAPTION.split())
    assert e.tokens == CAPTION.split()
    assert e.word_heatmaps.shape == (n, 30, 50) and e.word_heatmaps.dtype == np.float32
    assert e.caption_heatmap.shape == (30, 50)
    for m in [e.word_heatmaps, e.caption_heatmap, e.rollout, *e.kernel_maps.values()]:
        assert np.isfinite(m).all() and m.min() >= 0.0 and m.max() <= 1.0
    assert e.caption_heatmap.max() == pytest.approx(1.0)
    peaks = e.word_heatmaps.max(axis=(1, 2))
    if normalize == "shared":
        assert peaks.max() == pytest.approx(1.0) and peaks.min() < 1.0 - 1e-4  # one scale: only the top word hits 1
    else:
        assert np.allclose(peaks[peaks > 0], 1.0)
    assert set(e.kernel_maps) == set(model.local_kernel_names)
    assert all(m.shape == (n, 30, 50) for m in e.kernel_maps.values())
    assert e.rollout.shape == (30, 50)
    assert sum(e.kernel_weights.values()) == pytest.approx(1.0, abs=1e-5)
    assert sum(e.contributions.values()) == pytest.approx(e.similarity, abs=1e-5)
    assert 0.0 <= e.itm <= 1.0
    assert e.method == method and e.layer == default_layer(model)
    assert len(e.fusion_kernel_weights) == len(model.fusion.layers)


def test_sub_word_pieces_merge_back_into_words(model, processor):
    caption = "xylophonists juxtapose unbelievably"
    _, token_word = processor.words(caption)
    assert len(token_word) > len(caption.split()) + 2, "the caption should be split into word pieces"
    e = explain_pair(model, processor, _image(40, 40), caption)
    assert e.tokens == caption.split()
    assert e.word_heatmaps.shape[0] == 3


def test_heads_and_layers(model, processor):
    img = _image(30, 50)
    e = explain_pair(model, processor, img, CAPTION, heads=True, layer=0)
    heads = model.config.fusion.heads
    assert e.head_heatmaps.shape == (heads, len(e.tokens), 50, 30)
    assert e.head_heatmaps.min() >= 0 and e.head_heatmaps.max() <= 1
    lm = layer_maps(model, processor, img, CAPTION)
    n_layers = len(model.fusion.layers)
    assert lm.word_heatmaps.shape == (n_layers, len(e.tokens), 50, 30)
    assert lm.caption_heatmaps.shape == (n_layers, 50, 30)
    np.testing.assert_allclose(lm.word_heatmaps[0], e.word_heatmaps, atol=1e-5)
    # The ITM head reads only the last layer's [CLS]: the words' own attention there gets no gradient.
    assert lm.word_heatmaps[-1].max() == 0.0
    assert default_layer(model) == n_layers - 2


def test_with_cross_first_the_last_layer_word_maps_reach_the_score():
    cfg = micro_config()
    cfg.fusion.cross_first = True
    torch.manual_seed(0)
    model = MKLVisITA(cfg).eval()
    processor = Processor(model.config, model.tokenizer)
    lm = layer_maps(model, processor, _image(30, 50), CAPTION)
    assert lm.word_heatmaps[-1].max() > 0.0  # words read the image before the [CLS] reads the words
    assert default_layer(model) == len(model.fusion.layers) - 1


def test_grad_cam_keeps_only_positive_gradients():
    a = torch.rand(2, 3, 4)
    g = torch.tensor([1.0, -1.0, 2.0, -0.5]).expand(2, 3, 4)
    cam = grad_cam(a, g)
    assert (cam[..., [1, 3]] == 0).all()
    torch.testing.assert_close(cam[..., [0, 2]], a[..., [0, 2]] * g[..., [0, 2]])


def test_grad_cam_differs_from_raw_attention(model, processor):
    img = _image(48, 48, seed=3)
    cam = explain_pair(model, processor, img, CAPTION, method="gradcam")
    att = explain_pair(model, processor, img, CAPTION, method="attention")
    assert not np.allclose(cam.word_heatmaps, att.word_heatmaps, atol=1e-3)


def test_no_gradients_or_grad_mode_left_behind(model, processor):
    assert torch.is_grad_enabled()
    explain_pair(model, processor, _image(40, 20), CAPTION)
    layer_maps(model, processor, _image(40, 20), CAPTION)
    assert torch.is_grad_enabled()
    with torch.no_grad():
        e = explain_pair(model, processor, _image(40, 20), CAPTION)  # still gets its gradient inside
        assert not torch.is_grad_enabled()
    assert e.caption_heatmap.max() > 0
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


def test_training_mode_is_restored(processor):
    torch.manual_seed(1)
    m = MKLVisITA(micro_config(), tokenizer=processor.tokenizer).train()
    p = Processor(m.config, m.tokenizer)
    a = explain_pair(m, p, _image(32, 32), CAPTION)
    b = explain_pair(m, p, _image(32, 32), CAPTION)
    assert m.training
    np.testing.assert_array_equal(a.word_heatmaps, b.word_heatmaps)  # dropout was off during the call


def test_threads_give_the_same_maps_as_serial_calls(model, processor):
    captions = [CAPTION, "a blue square", "two shapes", CAPTION]
    jobs = [(_image(40 + 8 * i, 30, seed=i), c) for i, c in enumerate(captions)]
    serial = [explain_pair(model, processor, im, c) for im, c in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(lambda j: explain_pair(model, processor, *j), jobs * 2))
    for s, t in zip(serial * 2, threaded):
        assert s.tokens == t.tokens
        np.testing.assert_allclose(t.word_heatmaps, s.word_heatmaps, atol=1e-5)
        np.testing.assert_allclose(t.rollout, s.rollout, atol=1e-5)
        assert t.itm == pytest.approx(s.itm, abs=1e-6)


# ------------------------------------------------------------------------------------------ alignment
def _expected_pixel(box: Letterbox, grid: tuple[int, int], cell: tuple[int, int]) -> tuple[float, float]:
    """Centre of patch ``cell`` (row, col) in the original image's pixels (y, x)."""
    ph, pw = box.size / grid[0], box.size / grid[1]
    y = ((cell[0] + 0.5) * ph - box.pad_y) / box.inner_h * box.height
    x = ((cell[1] + 0.5) * pw - box.pad_x) / box.inner_w * box.width
    return y, x


@pytest.mark.parametrize("size", [(120, 40), (40, 120), (64, 64), (91, 37)])
def test_letterbox_puts_a_hot_cell_on_the_right_original_pixel(size):
    w, h = size
    box = Letterbox.fit(w, h, 32)
    grid = (8, 8)
    # A cell inside the image part of the input (not the padding).
    for cell in [(4, 4), (3, 5)]:
        g = np.zeros(grid, np.float32)
        g[cell] = 1.0
        full = box.to_original(g)
        assert full.shape == (h, w)
        y, x = np.unravel_index(np.argmax(full), full.shape)
        ey, ex = _expected_pixel(box, grid, cell)
        tol_y, tol_x = box.height / box.inner_h * box.size / grid[0], box.width / box.inner_w * box.size / grid[1]
        assert abs(y - ey) <= tol_y / 2 + 1 and abs(x - ex) <= tol_x / 2 + 1


def test_vit_patch_tokens_are_row_major(model):
    """A change in one image patch changes exactly the token the maps put at that grid cell."""
    gh, gw = model.vision.grid
    s = model.config.vision.image_size
    ph, pw = s // gh, s // gw
    x = torch.zeros(1, 3, s, s)
    y = x.clone()
    y[..., 2 * ph : 3 * ph, 1 * pw : 2 * pw] = 1.0  # patch (2, 1)
    with torch.no_grad():
        diff = (model.vision.model.patch_embed(y) - model.vision.model.patch_embed(x)).abs().sum(-1)[0]  # (P,)
    assert diff.nonzero().flatten().tolist() == [2 * gw + 1]


@pytest.mark.parametrize("size", [(100, 40), (40, 100)])
def test_model_maps_land_on_the_right_object_after_padding(model, processor, size, monkeypatch):
    """End to end: a local-kernel map hot on one patch peaks at that patch's place in the original image."""
    gh, gw = model.vision.grid
    cell = (gh // 2, gw // 2 - 1) if size[0] > size[1] else (gh // 2 - 1, gw // 2)
    local = model.sources["local"]
    real = local.word_maps

    def hot(feature, img, txt):
        out = torch.zeros_like(real(feature, img, txt))  # (B, n, T, P)
        out[..., cell[0] * gw + cell[1]] = 1.0
        return out

    monkeypatch.setattr(local, "word_maps", hot)
    e = explain_pair(model, processor, _image(*size), "a red circle", method="kernel")
    box = Letterbox.fit(*size, model.config.vision.image_size)
    y, x = np.unravel_index(np.argmax(e.caption_heatmap), e.caption_heatmap.shape)
    ey, ex = _expected_pixel(box, (gh, gw), cell)
    cell_h = box.height / box.inner_h * box.size / gh
    cell_w = box.width / box.inner_w * box.size / gw
    assert abs(y - ey) <= cell_h / 2 + 1 and abs(x - ex) <= cell_w / 2 + 1
    for m in e.kernel_maps.values():
        assert np.unravel_index(np.argmax(m[0]), m[0].shape) == (y, x)


# ------------------------------------------------------------------------------------------ rollout
def test_rollout_rows_are_distributions_and_identity_is_fixed():
    a = torch.rand(2, 3, 5, 5).softmax(-1)
    r = attention_rollout([a, a.flip(-1)])
    torch.testing.assert_close(r.sum(-1), torch.ones(2, 5))
    eye = torch.eye(5).expand(1, 2, 5, 5)
    torch.testing.assert_close(attention_rollout([eye, eye, eye]), torch.eye(5).expand(1, 5, 5))


def test_encoder_attentions_reproduce_each_vit_block(model):
    """encode_image(output_attentions=True): probabilities that, applied to the values, give each block's output."""
    pv = torch.randn(1, 3, model.config.vision.image_size, model.config.vision.image_size)
    inputs = []
    hooks = [b.attn.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for b in model.vision.model.blocks]
    try:
        with torch.no_grad():
            img = model.encode_image(pv, output_attentions=True)
    finally:
        for h in hooks:
            h.remove()
    assert len(img.attentions) == len(model.vision.model.blocks) == len(inputs)
    for block, xn, a in zip(model.vision.model.blocks, inputs, img.attentions):
        attn = block.attn
        b, n, c = xn.shape
        v = attn.qkv(xn).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)[2]
        mine = attn.proj((a @ v).transpose(1, 2).reshape(b, n, c))
        torch.testing.assert_close(mine, attn(xn), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]))
    assert model.encode_image(pv).attentions is None  # only when asked


# ------------------------------------------------------------------------------------------ errors, no fusion
def test_bad_inputs_raise_value_errors(model, processor):
    with pytest.raises(InvalidCaptionError):
        explain_pair(model, processor, _image(20, 20), "   ")
    with pytest.raises(ValueError, match="method"):
        explain_pair(model, processor, _image(20, 20), CAPTION, method="saliency")
    with pytest.raises(ValueError, match="layer"):
        explain_pair(model, processor, _image(20, 20), CAPTION, layer=7)
    with pytest.raises(ValueError, match="normalize"):
        explain_pair(model, processor, _image(20, 20), CAPTION, normalize="global")


def test_model_without_fusion_still_has_kernel_maps(processor):
    cfg = micro_config()
    cfg.fusion.enabled = False
    m = MKLVisITA(cfg, tokenizer=processor.tokenizer).eval()
    p = Processor(m.config, m.tokenizer)
    with pytest.raises(ValueError, match="kernel"):
        explain_pair(m, p, _image(30, 20), CAPTION)
    e = explain_pair(m, p, _image(30, 20), CAPTION, method="kernel")
    assert e.word_heatmaps.shape == (len(CAPTION.split()), 20, 30) and np.isnan(e.itm)
    assert e.caption_heatmap.max() == pytest.approx(1.0)
    scores = pointing_game(m, p, _FakeScenes(full=True), n=2)
    assert "pointing_acc_gradcam" not in scores and scores["pointing_acc_kernel"] == 1.0


# ------------------------------------------------------------------------------------------ pointing game
class _FakeScenes:
    """Two scenes with one object each whose mask is the whole image (full) or nothing."""

    def __init__(self, full: bool):
        self.full = full

    def __len__(self):
        return 2

    def __getitem__(self, i):
        mask = np.full((24, 40), self.full)
        return {"image": _image(40, 24, seed=i), "objects": [{"phrase": "a red circle", "mask": mask}]}


def test_pointing_game_counts_hits_and_chance(model, processor):
    hit = pointing_game(model, processor, _FakeScenes(full=True))
    miss = pointing_game(model, processor, _FakeScenes(full=False))
    for key in ("gradcam", "attention", "kernel", "rollout"):
        assert hit[f"pointing_acc_{key}"] == 1.0 and miss[f"pointing_acc_{key}"] == 0.0
    assert hit["pointing_chance"] == 1.0 and miss["pointing_chance"] == 0.0
    assert hit["pointing_n"] == 2 and hit["pointing_acc"] == hit["pointing_acc_gradcam"]


def test_pointing_headline_is_the_checkpoints_default_map(model, processor, monkeypatch):
    """pointing_acc / word_pointing_acc report fusion.explain_method's maps (what the demo shows by default)."""
    import mklvisita.pointing as pointing

    def maps(model, processor, image, caption, methods, layer, words=True):
        on, off = np.zeros((24, 40)), np.zeros((24, 40))
        on[12, 20], off[0, 0] = 1.0, 1.0  # Grad-CAM peaks inside the mask below, attention outside it
        return {m: (np.stack([on if m == "gradcam" else off] * 3), on if m == "gradcam" else off) for m in methods}

    monkeypatch.setattr(pointing, "method_maps", maps)
    mask = np.zeros((24, 40), bool)
    mask[10:14, 18:22] = True
    scenes = [{"image": None, "objects": [{"phrase": "a red circle", "mask": mask}]}]
    words = [{"image": None, "caption": "a red circle", "targets": [(1, mask)]}]
    both = ("gradcam", "attention")
    for default, acc in (("gradcam", 1.0), ("attention", 0.0)):
        monkeypatch.setattr(model.config.fusion, "explain_method", default)
        got = pointing_game(model, processor, scenes, methods=both) | word_pointing_game(model, processor, words, both)
        assert (got["pointing_acc_gradcam"], got["pointing_acc_attention"]) == (1.0, 0.0)
        assert got["pointing_acc"] == got["word_pointing_acc"] == acc


def test_pointing_game_on_shapes(model, processor):
    from mklvisita.data import ShapesScenes

    ds = ShapesScenes(split="test", size=1000, seed=0)
    out = pointing_game(model, processor, ds, n=2, methods=("kernel", "rollout"))
    objects = [o for i in range(2) for o in ds[i]["objects"]]
    assert out["pointing_n"] == len(objects)
    assert out["pointing_chance"] == pytest.approx(np.mean([o["mask"].mean() for o in objects]))
    assert set(out) == {"pointing_acc_kernel", "pointing_acc_rollout", "pointing_acc", "pointing_chance", "pointing_n"}


def test_word_pointing_hits_on_a_synthetic_map():
    maps = np.zeros((3, 8, 8), dtype=np.float32)
    maps[0, 1, 1] = 1.0  # word 0 peaks at (1, 1)
    maps[1, 6, 5] = 2.0  # word 1 peaks at (6, 5)
    maps[2] = 0.5  # a flat map peaks at its first pixel (0, 0)
    left, right = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    left[:, :4], right[:, 4:] = True, True
    targets = [(0, left), (1, right), (1, left), (2, left), (2, right), (7, left)]  # word 7 was cut off: a miss
    assert word_pointing_hits(maps, targets) == [True, True, False, True, False, False]


def test_word_pointing_game_counts_words_and_chance(model, processor):
    full, empty = np.full((24, 40), True), np.full((24, 40), False)
    examples = [{"image": _image(40, 24, seed=0), "caption": "a red circle and a blue square", "targets": []}]
    examples.append({"image": _image(40, 24, seed=1), "caption": "a red circle", "targets": [(1, full), (2, empty)]})
    out = word_pointing_game(model, processor, examples)
    for m in ("gradcam", "attention", "kernel"):
        assert out[f"word_pointing_acc_{m}"] == 0.5  # the full mask is always hit, the empty one never
    assert out["word_pointing_n"] == 2 and out["word_pointing_chance"] == 0.5
    assert out["word_pointing_acc"] == out["word_pointing_acc_gradcam"]


def test_pointing_headline_is_never_the_caption_blind_rollout():
    from conftest import micro_config

    from mklvisita import MKLVisITA
    from mklvisita.data import ShapesScenes
    from mklvisita.inputs import Processor

    cfg = micro_config()
    cfg.kernels.sources, cfg.kernels.functions, cfg.fusion.enabled = ["global"], ["cosine"], False
    model = MKLVisITA(cfg).eval()
    out = pointing_game(model, Processor(model.config, model.tokenizer), ShapesScenes("test", size=1), n=1)
    assert "pointing_acc_rollout" in out and "pointing_acc" not in out


# ------------------------------------------------------------------------------------------ large images
def _explain_numpy_peak(model, processor, image, **kwargs):
    """The explanation and the peak of numpy memory (tracemalloc traces every numpy allocation) during the call."""
    import tracemalloc

    tracemalloc.start()
    try:
        e = explain_pair(model, processor, image, CAPTION, **kwargs)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return e, peak


def test_maps_of_a_large_image_are_capped_and_cost_what_a_capped_image_costs(model, processor):
    """Maps in the original frame must not cost memory in proportion to the image (7.8 GB at 16 MP before capping)."""
    n = len(CAPTION.split())
    big, _ = _explain_numpy_peak(model, processor, _image(400, 300), heads=True)  # warm-up: lazy one-off allocations
    big, peak_big = _explain_numpy_peak(model, processor, _image(4000, 3000), heads=True)
    small, peak_small = _explain_numpy_peak(model, processor, _image(MAP_MAX_SIDE, MAP_MAX_SIDE * 3 // 4), heads=True)
    w, h = MAP_MAX_SIDE, MAP_MAX_SIDE * 3 // 4  # the frame kept, scaled down to MAP_MAX_SIDE on its longer side
    assert big.image_size == (4000, 3000) and big.map_size == (w, h) == small.map_size
    maps = [big.word_heatmaps, big.caption_heatmap, big.rollout, big.head_heatmaps, *big.kernel_maps.values()]
    assert big.word_heatmaps.shape == (n, h, w) and all(m.shape[-2:] == (h, w) for m in maps)
    assert all(m.dtype == np.float32 and m.min() >= 0 and m.max() <= 1 for m in maps)
    # A 12 MP image costs the same numpy memory as a 0.8 MP one (deterministic: bytes allocated, not time), and the
    # peak is the returned maps plus one transient map kind at most.
    assert peak_big <= peak_small * 1.02 + 2**20
    assert peak_big <= 1.5 * sum(m.nbytes for m in maps)
    assert sum(m.nbytes for m in maps) < n * 4000 * 3000 * 4  # less than one full-size float32 map per word
    full = big.full_size(big.caption_heatmap)  # on demand, one map at the image's own size
    assert full.shape == (3000, 4000) and full.dtype == np.float32 and 0 <= full.min() and full.max() <= 1


def test_max_side_none_keeps_the_image_size_and_bad_values_are_refused(model, processor):
    img = _image(300, 200)
    capped = explain_pair(model, processor, img, CAPTION, max_side=64)
    assert capped.word_heatmaps.shape[1:] == (43, 64) and capped.map_size == (64, 43)
    assert capped.full_size(capped.word_heatmaps).shape == capped.word_heatmaps.shape[:1] + (200, 300)
    full = explain_pair(model, processor, img, CAPTION, max_side=None)
    assert full.word_heatmaps.shape[1:] == (200, 300) and full.map_size == full.image_size == (300, 200)
    # The same maps at another resolution: upsampled back, the capped ones match the full-size ones.
    np.testing.assert_allclose(capped.full_size(capped.word_heatmaps), full.word_heatmaps, atol=0.05)
    np.testing.assert_allclose(capped.full_size(capped.caption_heatmap), full.caption_heatmap, atol=0.05)
    assert layer_maps(model, processor, img, CAPTION, max_side=64).word_heatmaps.shape[-2:] == (43, 64)
    assert image_rollout(model, processor, img, max_side=64).shape == (43, 64)
    for bad in (0, -5, 2.5, "abc", True):
        with pytest.raises(ValueError, match="max_side"):
            explain_pair(model, processor, img, CAPTION, max_side=bad)
