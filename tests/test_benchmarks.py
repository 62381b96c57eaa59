import json

import numpy as np
import pytest
from PIL import Image

from mklvisita.data import RetrievalSet, load_hf, load_karpathy, load_lavis, load_retrieval_set, shapes_retrieval_set


def _png(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), colour).save(path)


def _karpathy(tmp_path, coco=False):
    """Five images: test a (2 captions), train b (1), restval c (2), val d (1), test e (3)."""
    rows = [("a", "test", 2), ("b", "train", 1), ("c", "restval", 2), ("d", "val", 1), ("e", "test", 3)]
    images = []
    for k, (name, split, n) in enumerate(rows):
        rec = {"filename": f"{name}.png", "split": split, "imgid": k}
        rec["sentences"] = [{"raw": f" {name} caption {j} ", "tokens": [name, "caption", str(j)]} for j in range(n)]
        if coco:
            rec["filepath"] = "val2014"
        images.append(rec)
        _png(tmp_path / "img" / ("val2014" if coco else "") / f"{name}.png", (10 * k, 0, 0))
    path = tmp_path / ("dataset_coco.json" if coco else "dataset_flickr30k.json")
    path.write_text(json.dumps({"images": images, "dataset": "coco" if coco else "flickr30k"}))
    return path


@pytest.mark.parametrize("coco", [False, True])
def test_karpathy_test_split(tmp_path, coco):
    path = _karpathy(tmp_path, coco)
    rs = load_karpathy(path, tmp_path / "img", split="test")
    assert len(rs) == 2 and rs.captions == ["a caption 0", "a caption 1", "e caption 0", "e caption 1", "e caption 2"]
    assert rs.txt2img.tolist() == [0, 0, 1, 1, 1] and rs.txt2img.dtype == np.int64
    assert rs.img2txt == [[0, 1], [2, 3, 4]]
    assert rs.images[1].endswith("val2014/e.png" if coco else "img/e.png")
    assert rs.load_image(1).getpixel((0, 0)) == (40, 0, 0)
    assert rs.split == "test"


def test_karpathy_restval(tmp_path):
    path = _karpathy(tmp_path)
    train = load_karpathy(path, tmp_path / "img", split="train")
    assert [p.rsplit("/", 1)[1] for p in train.images] == ["b.png", "c.png"] and len(train.captions) == 3
    only_train = load_karpathy(path, tmp_path / "img", split="train", include_restval=False)
    assert len(only_train) == 1
    assert len(load_karpathy(path, tmp_path / "img", split="restval")) == 1
    assert len(load_karpathy(path, tmp_path / "img", split="val").captions) == 1


def test_karpathy_errors(tmp_path):
    path = _karpathy(tmp_path)
    with pytest.raises(ValueError, match=r"split 'dev'.*\['restval', 'test', 'train', 'val'\]"):
        load_karpathy(path, tmp_path / "img", split="dev")
    with pytest.raises(FileNotFoundError, match=r"a\.png.*image root.*nowhere"):
        load_karpathy(path, tmp_path / "nowhere", split="test")
    rs = load_karpathy(path, tmp_path / "nowhere", split="test", check_files=False)
    with pytest.raises(FileNotFoundError, match=r"e\.png"):
        rs.load_image(1)
    with pytest.raises(FileNotFoundError, match="2 of 2"):
        rs.check_images()
    data = json.loads(path.read_text())
    del data["images"][3]["sentences"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"record 3 has no 'sentences'"):
        load_karpathy(path, tmp_path / "img", split="test")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ValueError, match="not a Karpathy"):
        load_karpathy(tmp_path / "list.json", tmp_path / "img")


def _lavis(tmp_path):
    for name in "abc":
        _png(tmp_path / "img" / "flickr30k-images" / f"{name}.png", (0, 0, 0))
    train = [
        {"image": "flickr30k-images/a.png", "caption": "a one", "image_id": "0"},
        {"image": "flickr30k-images/b.png", "caption": "b one", "image_id": "1"},
        {"image": "flickr30k-images/a.png", "caption": "a two", "image_id": "0"},
    ]
    test = [
        {"image": "flickr30k-images/b.png", "caption": ["b one", "b two"]},
        {"image": "flickr30k-images/c.png", "caption": ["c one"]},
    ]
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "flickr30k_train.json").write_text(json.dumps(train))
    (tmp_path / "ann" / "flickr30k_test.json").write_text(json.dumps(test))
    return tmp_path / "ann"


def test_lavis(tmp_path):
    ann = _lavis(tmp_path)
    train = load_lavis(ann / "flickr30k_train.json", tmp_path / "img", split="train")
    # Rows are grouped by image in order of first appearance.
    assert train.captions == ["a one", "a two", "b one"] and train.txt2img.tolist() == [0, 0, 1]
    assert train.img2txt == [[0, 1], [2]]
    test = load_lavis(ann, tmp_path / "img", split="test")  # a folder picks flickr30k_test.json
    assert len(test) == 2 and test.txt2img.tolist() == [0, 0, 1] and test.captions[2] == "c one"
    with pytest.raises(ValueError, match="holds the 'train' split"):
        load_lavis(ann / "flickr30k_train.json", tmp_path / "img", split="test")
    (ann / "bad_test.json").write_text(json.dumps([{"image": "x.png"}]))
    with pytest.raises(ValueError, match=r"record 0 has no 'caption'"):
        load_lavis(ann / "bad_test.json", tmp_path / "img", split="test")


def test_spec_parsing(tmp_path):
    path = _karpathy(tmp_path)
    rs = load_retrieval_set(f"karpathy:{path}:{tmp_path / 'img'}", split="test")
    assert len(rs) == 2 and len(rs.captions) == 5
    ann = _lavis(tmp_path)
    assert len(load_retrieval_set(f"lavis:{ann}:{tmp_path / 'img'}", split="train").captions) == 3
    for bad in ("coco:x.json:img", "karpathy:", f"karpathy:{path}", "nonsense"):
        with pytest.raises(ValueError, match="karpathy:<json>:<image root>"):
            load_retrieval_set(bad)
    shapes = shapes_retrieval_set(split="test")
    assert len(shapes) == 1000 and len(shapes.captions) == 5000 and shapes.load_image(3).size == (64, 64)


def test_pairs_subset_folds():
    images = [f"{i}.png" for i in range(10)]
    captions = [f"c{i}{j}" for i in range(10) for j in range(2)]
    rs = RetrievalSet(images, captions, np.repeat(np.arange(10), 2), [[2 * i, 2 * i + 1] for i in range(10)])
    pairs = rs.pairs()
    assert len(pairs) == 20 and pairs[5] == ("2.png", "c21", 2) and list(pairs)[-1] == ("9.png", "c91", 9)
    folds = rs.folds(5)
    assert [len(f) for f in folds] == [2] * 5
    assert folds[1].images == ["2.png", "3.png"] and folds[1].captions == ["c20", "c21", "c30", "c31"]
    assert folds[1].txt2img.tolist() == [0, 0, 1, 1] and folds[1].img2txt == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="inconsistent"):
        RetrievalSet(images, captions[:3], np.zeros(3), [[0]] * 10)


def _hf_dataset():
    datasets = pytest.importorskip("datasets")
    ims = [Image.new("RGB", (8, 8), (30 * i, 0, 0)) for i in range(4)]
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.Sequence(datasets.Value("string")),
            "split": datasets.Value("string"),
            "filename": datasets.Value("string"),
        }
    )
    ds = datasets.Dataset.from_dict(
        {
            "image": ims,
            "caption": [["r0 a", "r0 b"], ["r1 a"], ["r2 a", "r2 b", "r2 c"], ["r3 a"]],
            "split": ["train", "test", "test", "val"],
            "filename": [f"{i}.jpg" for i in range(4)],
        },
        features=features,
    )
    # nlphuji/flickr30k keeps every row in one "test" split and marks the real split in a column.
    return datasets.DatasetDict({"test": ds})


def test_hf_reader(tmp_path):
    dd = _hf_dataset()
    test = load_hf(dd, split="test")
    assert test.captions == ["r1 a", "r2 a", "r2 b", "r2 c"] and test.txt2img.tolist() == [0, 1, 1, 1]
    assert test.images[1].getpixel((0, 0)) == (60, 0, 0) and test.load_image(0).mode == "RGB"
    train = load_hf(dd, split="train")
    assert train.captions == ["r0 a", "r0 b"] and len(train) == 1
    with pytest.raises(ValueError, match=r"no rows with split='dev'.*\['test', 'train', 'val'\]"):
        load_hf(dd, split="dev")
    with pytest.raises(ValueError, match="no column 'text'"):
        load_hf(dd, caption_column="text")
    dd.save_to_disk(str(tmp_path / "saved"))
    assert load_retrieval_set(f"hf:{tmp_path / 'saved'}", split="val").captions == ["r3 a"]


def test_hf_missing_package(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(ImportError, match="pip install datasets"):
        load_hf("nlphuji/flickr30k")
