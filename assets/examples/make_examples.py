"""Rebuild the demo's example set: shapes scenes from the held-out test split, plus the photographs' captions.

    python assets/examples/make_examples.py

Shapes scenes are drawn at the embedded checkpoint's native 64 px and enlarged 4x with nearest-neighbour so that
they look sharp in the browser; the letterbox resize back to 64 px averages 4x4 blocks of equal pixels, so the
model sees the original scene. Each example pairs two true captions with their hard negatives (attribute swapped,
relation reversed, ...), which is what the shapes checkpoint is trained to tell apart.

The photographs (cat, coffee, astronaut, rocket) come from scikit-image's bundled data, downscaled to 320 px;
see LICENSE.md. Only their captions are written here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
SCALE = 4
N_SHAPES = 4

PHOTOS = [
    (
        "cat.jpg",
        [
            "a tabby cat lying on a rug",
            "a cup of coffee on a saucer",
            "a rocket lifting off from a launch pad",
            "an astronaut in an orange suit",
        ],
    ),
    ("coffee.jpg", ["a cup of coffee on a saucer", "a tabby cat lying on a rug", "a white cup on a wooden table"]),
    (
        "astronaut.jpg",
        [
            "an astronaut in an orange suit beside a flag",
            "a rocket lifting off from a launch pad",
            "a cup of coffee on a saucer",
        ],
    ),
    (
        "rocket.jpg",
        ["a rocket lifting off from a launch pad", "an astronaut in an orange suit", "a tabby cat lying on a rug"],
    ),
]


def main() -> None:
    sys.path.insert(0, str(HERE.parents[1]))  # run from anywhere without installing the package
    from mklvisita.data import ShapesScenes

    scenes = ShapesScenes(split="test", size=200, seed=0)
    examples = []
    for i in range(len(scenes)):
        item = scenes[i]
        if len(item["objects"]) < 2:  # one-object scenes make dull heatmaps
            continue
        name = f"shapes_{i:03d}.png"
        image = item["image"].resize((item["image"].width * SCALE, item["image"].height * SCALE), Image.NEAREST)
        image.save(HERE / name, optimize=True)
        captions = [item["captions"][0], item["negatives"][0], item["captions"][2], item["negatives"][2]]
        examples.append({"image": name, "kind": "shapes", "captions": list(dict.fromkeys(captions))})
        if len(examples) == N_SHAPES:
            break
    examples += [{"image": name, "kind": "photo", "captions": captions} for name, captions in PHOTOS]
    spec = {
        "_comment": "Example inputs for app.py, written by make_examples.py. Licences: LICENSE.md.",
        "examples": examples,
    }
    (HERE / "examples.json").write_text(json.dumps(spec, indent=2) + "\n")
    print(f"wrote {len(examples)} examples to {HERE / 'examples.json'}")


if __name__ == "__main__":
    main()
