import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mklvisita import MKLVisITA
from mklvisita.inputs import (
    MAX_PIXELS,
    InvalidCaptionError,
    InvalidImageError,
    Letterbox,
    Processor,
    check_caption,
    load_image,
)


def _png_bytes(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "L", "1", "CMYK", "P", "I;16", "I", "F", "YCbCr"])
def test_every_mode_becomes_rgb(mode):
    img = Image.new("RGB", (20, 10), (200, 30, 40)).convert(mode)
    out = load_image(img)
    assert out.mode == "RGB" and out.size == (20, 10)


def test_palette_transparency_is_composited_on_white():
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0] * 256)
    img.info["transparency"] = 0
    assert load_image(img).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_keeps_its_range():
    a = np.zeros((4, 4), dtype=np.uint16)
    a[0, 0] = 4000  # a 12-bit sensor value; plain convert() would clip everything to white
    a[1, 1] = 2000
    out = np.asarray(load_image(Image.fromarray(a)))
    assert out[0, 0, 0] == 255 and 120 < out[1, 1, 0] < 135 and out[2, 2, 0] == 0


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (30, 10), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = _png_bytes(img, "JPEG", exif=exif.tobytes())
    assert load_image(data).size == (10, 30)


def test_animated_gif_gives_the_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    r, g, b = load_image(buf.getvalue()).getpixel((0, 0))
    assert r > 200 and b < 50


def test_truncated_and_non_image_bytes_are_clear_errors(tmp_path):
    noise = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    data = _png_bytes(Image.fromarray(noise), "JPEG")
    with pytest.raises(InvalidImageError, match="truncated or corrupt"):
        load_image(data[: len(data) // 2])
    with pytest.raises(InvalidImageError, match="not an image"):
        load_image(b"hello, this is text")
    with pytest.raises(InvalidImageError, match="not found"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "notes.png").write_text("not really a png")
    with pytest.raises(InvalidImageError, match="notes.png"):
        load_image(tmp_path / "notes.png")


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero on this system")
def test_a_device_or_pipe_is_not_a_regular_file_and_is_not_read(tmp_path):
    with pytest.raises(InvalidImageError, match="zero is not a regular file") as caught:
        load_image("/dev/zero")  # reading it would never end
    assert "not found" not in str(caught.value) and "/dev" not in str(caught.value)
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(InvalidImageError, match="pipe.png is not a regular file"):
        load_image(fifo)  # opening a FIFO with no writer would block forever


def test_decompression_bomb_is_refused_before_decoding():
    side = int(MAX_PIXELS**0.5) + 10
    data = _png_bytes(Image.new("1", (side, side)))  # tiny file, huge image
    with pytest.raises(InvalidImageError, match="too large"):
        load_image(data)


def test_arrays_are_accepted_and_bad_arrays_refused():
    assert load_image(np.random.rand(5, 7, 3)).size == (7, 5)
    with pytest.raises(InvalidImageError, match="NaN"):
        load_image(np.full((4, 4), np.nan))
    with pytest.raises(InvalidImageError, match="shape"):
        load_image(np.zeros((4, 4, 5)))


@pytest.mark.parametrize("size", [(1, 1), (3000, 2), (2, 3000), (64, 64), (100, 37)])
def test_letterbox_geometry(size):
    box = Letterbox.fit(*size, 32)
    assert max(box.inner_w, box.inner_h) == 32 and min(box.inner_w, box.inner_h) >= 1
    assert box.pad_x + box.inner_w <= 32 and box.pad_y + box.inner_h <= 32
    back = box.to_original(np.ones((4, 4), np.float32))
    assert back.shape == (size[1], size[0])


def test_letterbox_maps_a_hot_cell_back_to_the_right_place():
    box = Letterbox.fit(200, 100, 64)  # landscape: padded top and bottom
    grid = np.zeros((64, 64), np.float32)
    # The input pixel of original (150, 75) -> x = 150 * 0.32 = 48, y = 16 + 75 * 0.32 = 40
    grid[40, 48] = 1.0
    back = box.to_original(grid)
    y, x = np.unravel_index(back.argmax(), back.shape)
    assert abs(x - 150) <= 3 and abs(y - 75) <= 3


def test_captions_are_checked():
    assert check_caption("  a dog ") == "a dog"
    for bad in ["", "   \n\t", None, 3]:
        with pytest.raises(InvalidCaptionError):
            check_caption(bad)


def test_processor_truncates_and_accepts_any_unicode(tiny_checkpoint):
    model = MKLVisITA.from_pretrained(tiny_checkpoint)
    proc = Processor(model.config, model.tokenizer)
    enc = proc.captions(["word " * 60, "日本語のキャプション 🐱", "café crème"])  # 300 characters at most
    assert enc["input_ids"].shape == (3, model.config.text.max_length)
    pv, boxes = proc.images([Image.new("RGB", (10, 1000)), Image.new("RGB", (1, 1))])
    assert pv.shape == (2, 3, model.config.vision.image_size, model.config.vision.image_size)
    words, token_word = proc.words("A man's  dog, running")
    assert words == ["A", "man's", "dog,", "running"]
    assert token_word[0] is None and token_word[-1] is None
    assert sorted({w for w in token_word if w is not None}) == [0, 1, 2, 3]
    with pytest.raises(InvalidCaptionError):
        proc.captions(["fine", "  "])
