"""The shipped examples (assets/examples/examples.json) and which embedded checkpoint each one is for.

No Gradio here. Each example has a `kind`: "photo" examples run on the photo checkpoint and "shapes" examples on
the shapes checkpoint (a photo means nothing to a model that has only seen coloured shapes, and the other way
round), so loading an example also switches the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = ROOT / "assets" / "examples"


def load_examples(examples_dir: Path = EXAMPLES_DIR) -> list[dict]:
    """The examples, photo ones first (the Match tab opens on the photo checkpoint)."""
    path = examples_dir / "examples.json"
    examples = json.loads(path.read_text())["examples"] if path.exists() else []
    return sorted(examples, key=lambda e: e.get("kind") != "photo")  # stable: file order within a kind


def checkpoint_for(example: dict, default: str) -> str:
    """The embedded checkpoint an example is meant for: its `kind` when that names one, else the default."""
    kind = example.get("kind")
    return kind if kind in ("photo", "shapes") else default
