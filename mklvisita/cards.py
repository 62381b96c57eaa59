"""Model cards: what a checkpoint is, what it was trained on, what it cannot know and what it measured, written once
as a Hugging Face model card and read back as data.

Decisions:

- **One writer.** :func:`render_card` (text) and :func:`write_card` (a folder's ``README.md``) write every card: a
  training run's release, the photo build, the shipped checkpoints. Nothing else formats a card.
- **Metadata is structured, in the front matter.** The card's YAML front matter holds the Hub's own fields
  (``license``, ``library_name``, ``tags``, ``base_model``, ``datasets``, and ``model-index`` with the evaluation
  results) and an ``mklvisita`` section: ``task``, ``data`` (the training data spec), ``trained_on``,
  ``cannot_know`` and ``evaluations`` (each with its metrics, the JSON file behind them and the command that writes
  it). :func:`read_card` parses that YAML; nobody reads facts out of the prose.
- **The body follows the Hub's model-card sections**: model details, intended use, training data, evaluation (a
  table of the figures, the file behind them, the command), limitations, how to use, licence. A figure names what
  produced it (a command, a file); a card tells no history of the work that led to it.
- Figures are stored as measured (4 significant digits); recalls are percentages, accuracies fractions, as in the
  evaluation JSON.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CARD_NAME = "README.md"
LICENSE = "apache-2.0"
# How a metric key of the evaluation JSON reads in a card's table.
METRIC_LABELS = {
    "i2t_r1": "image → text R@1 (%)",
    "i2t_r5": "image → text R@5 (%)",
    "i2t_r10": "image → text R@10 (%)",
    "t2i_r1": "text → image R@1 (%)",
    "t2i_r5": "text → image R@5 (%)",
    "t2i_r10": "text → image R@10 (%)",
    "rsum": "RSUM (sum of the six recalls)",
    "i2t_map": "image → text mAP (%)",
    "t2i_map": "text → image mAP (%)",
    "binding_acc": "binding accuracy (final score)",
    "binding_acc_itm": "binding accuracy (ITM alone)",
    "binding_acc_sim": "binding accuracy (S alone)",
    "binding_acc_swap": "binding accuracy, attributes swapped",
    "binding_acc_reverse": "binding accuracy, relation reversed",
    "binding_acc_replace": "binding accuracy, one object replaced",
    "binding_acc_replace_alone": "binding accuracy, one object replaced, that object alone",
    "binding_acc_change": "binding accuracy, one attribute changed",
    "binding_acc_count": "binding accuracy, count changed",
    "pointing_acc": "pointing game (phrase maps)",
    "pointing_chance": "pointing game, chance level",
    "word_pointing_acc": "word pointing game",
    "word_pointing_chance": "word pointing game, chance level",
}


class CardError(ValueError):
    """A card whose front matter cannot be read."""


@dataclass
class Evaluation:
    """One set of measured figures and where they come from."""

    name: str  # what was measured on, for people: "Tux Paint photo stamps, test half"
    data: str  # the data spec of ``python -m training.evaluate --data``: "tuxpaint", "shapes", ...
    split: str  # the split measured
    metrics: dict[str, float]  # metric key -> value, as in the evaluation JSON
    source: str = ""  # the JSON file behind the figures (a repository path)
    command: str = ""  # the command that writes that file
    note: str = ""  # one sentence under the table (protocol details)


@dataclass
class ModelCard:
    """Everything a card says. The first six fields are the structured metadata; the rest is the body."""

    title: str  # the card's heading
    summary: str  # one paragraph: what the checkpoint is
    task: str = "image-text matching"  # what the model does
    data: str = ""  # the training data spec (``python -m training.train``'s ``data.train``), "" when not trained so
    trained_on: str = ""  # one sentence: what the checkpoint has seen
    cannot_know: str = ""  # one sentence: what it cannot know, whatever the input
    details: str = ""  # Markdown: architecture, kernels, sizes
    intended_use: str = ""  # Markdown: what it is for, and what it is not for
    training_data: str = ""  # Markdown
    evaluations: list[Evaluation] = field(default_factory=list)
    limitations: str = ""  # Markdown
    how_to_use: str = ""  # Markdown; "" = the standard Matcher snippet
    reproduce: str = ""  # Markdown: the commands that rebuild the checkpoint
    sections: dict[str, str] = field(default_factory=dict)  # further sections, heading -> Markdown (at the end)
    name: str = "mklvisita"  # the model's name in the Hub's model-index
    tags: list[str] = field(default_factory=lambda: ["image-text-matching", "multi-kernel-learning"])
    base_models: list[str] = field(default_factory=list)  # Hub ids of models it builds on
    datasets: list[str] = field(default_factory=list)  # Hub ids of datasets it was trained on
    license: str = LICENSE


@dataclass
class CardMetadata:
    """What :func:`read_card` returns: the card's structured facts (empty strings / lists where it has none)."""

    task: str = ""
    data: str = ""
    trained_on: str = ""
    cannot_know: str = ""
    license: str = ""
    evaluations: list[Evaluation] = field(default_factory=list)

    def metrics(self, name: str | None = None) -> dict[str, float]:
        """The metrics of the evaluation called ``name`` (None: the first); {} when there is none."""
        for e in self.evaluations:
            if name is None or e.name == name:
                return dict(e.metrics)
        return {}


def _figure(value: Any) -> float:
    value = float(value)
    return value if not math.isfinite(value) or value == 0 else float(f"{value:.4g}")


def _shown(value: float) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4g}"


def label(key: str) -> str:
    """How a metric key reads in a card (:data:`METRIC_LABELS`, else the key itself)."""
    return METRIC_LABELS.get(key, key)


def _front_matter(card: ModelCard) -> dict[str, Any]:
    # The figures live once, in the Hub's model-index; the mklvisita section says where each set comes from.
    evaluations = [
        {
            "name": e.name,
            **({"source": e.source} if e.source else {}),
            **({"command": e.command} if e.command else {}),
        }
        for e in card.evaluations
    ]
    meta: dict[str, Any] = {"license": card.license, "library_name": "mklvisita", "tags": list(card.tags)}
    if card.base_models:
        meta["base_model"] = list(card.base_models)
    if card.datasets:
        meta["datasets"] = list(card.datasets)
    if card.evaluations:
        meta["model-index"] = [
            {
                "name": card.name,
                "results": [
                    {
                        "task": {"type": "image-text-matching", "name": "Image-text matching"},
                        "dataset": {"name": e.name, "type": e.data, "split": e.split},
                        "metrics": [{"type": k, "value": _figure(v), "name": label(k)} for k, v in e.metrics.items()],
                    }
                    for e in card.evaluations
                ],
            }
        ]
    meta["mklvisita"] = {
        "task": card.task,
        "data": card.data,
        "trained_on": card.trained_on,
        "cannot_know": card.cannot_know,
        "evaluations": evaluations,
    }
    return meta


def _evaluation_section(evaluations: list[Evaluation]) -> str:
    parts = []
    for e in evaluations:
        rows = "\n".join(f"| {METRIC_LABELS.get(k, f'`{k}`')} | {_shown(v)} |" for k, v in e.metrics.items())
        text = f"### {e.name}\n\nData `{e.data}`, split `{e.split}`.\n\n| metric | value |\n| --- | --- |\n{rows}\n"
        if e.note:
            text += f"\n{e.note}\n"
        origin = []
        if e.source:
            origin.append(f"The JSON behind these figures: `{e.source}`")
        if e.command:
            origin.append(f"written by `{e.command}`")
        if origin:
            text += "\n" + ", ".join(origin) + ".\n"
        parts.append(text)
    return "\n".join(parts)


def render_card(card: ModelCard) -> str:
    """The card as the text of a Hugging Face ``README.md``: YAML front matter, then the Markdown body."""
    meta = yaml.safe_dump(_front_matter(card), sort_keys=False, allow_unicode=True, width=100)
    how_to_use = card.how_to_use or (
        "```python\nfrom mklvisita import Matcher\n\n"
        'matcher = Matcher.from_pretrained("<this folder or Hub id>")\n'
        'r = matcher.score(["photo.jpg"], ["a cat on a sofa", "a red car"])\n'
        "print(r.score)  # the checkpoint's ranking score, one row per image\n```"
    )
    sections = [
        ("Model details", card.details),
        ("Intended use", card.intended_use),
        ("Training data", "\n\n".join(s for s in (_fact("Trained on", card.trained_on), card.training_data) if s)),
        ("Evaluation", _evaluation_section(card.evaluations)),
        ("Limitations", "\n\n".join(s for s in (_fact("It cannot know", card.cannot_know), card.limitations) if s)),
        ("How to use", how_to_use),
        ("Reproduce", card.reproduce),
        *card.sections.items(),
        ("Licence", f"Released under the {_LICENSE_NAMES.get(card.license, card.license)} licence (`LICENSE` in the "
         "repository)" + ("; the pretrained parts named above keep their own licences." if card.base_models else ".")),
    ]  # fmt: skip
    body = "\n\n".join(f"## {heading}\n\n{text.strip()}" for heading, text in sections if text and text.strip())
    return f"---\n{meta}---\n# {card.title}\n\n{card.summary.strip()}\n\n{body}\n"


_LICENSE_NAMES = {"apache-2.0": "Apache-2.0"}


def _fact(name: str, text: str) -> str:
    text = (text or "").strip()
    return f"**{name}:** {text}{'' if text.endswith('.') else '.'}" if text else ""


def write_card(folder: str | os.PathLike, card: ModelCard) -> Path:
    """Write ``card`` to ``folder/README.md`` (replacing it whole: a crash leaves the old card or the new one)."""
    folder = Path(folder)
    text = render_card(card)
    fd, tmp = tempfile.mkstemp(prefix=".README.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, folder / CARD_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return folder / CARD_NAME


def split_front_matter(text: str) -> tuple[str, str]:
    """(the front matter's YAML, or "", the Markdown body) of a card's text."""
    if not text.startswith("---\n"):
        return "", text
    end = text.find("\n---\n", 3)
    if end < 0:
        return "", text
    return text[4:end], text[end + 5 :]


def read_card(text: str) -> CardMetadata:
    """The structured facts of a card's text (its front matter's ``mklvisita`` section and licence).

    A card with no front matter, or one without the section (a card written elsewhere), gives empty facts.

    Raises:
        CardError: the front matter is not valid YAML, or the section has the wrong shape.
    """
    raw, _ = split_front_matter(text or "")
    if not raw.strip():
        return CardMetadata()
    try:
        meta = yaml.safe_load(raw) or {}
    except yaml.YAMLError as e:
        raise CardError(f"the card's front matter is not valid YAML ({e}); rewrite it with mklvisita.cards") from e
    if not isinstance(meta, dict):
        raise CardError("the card's front matter is not a mapping of field -> value; rewrite it with mklvisita.cards")
    section = meta.get("mklvisita") or {}
    if not isinstance(section, dict):
        raise CardError("the card's 'mklvisita' section is not a mapping; rewrite the card with mklvisita.cards")
    try:
        evaluations = _evaluations(meta, section)
    except (TypeError, AttributeError, KeyError, ValueError) as e:
        raise CardError(f"the card's evaluations are malformed ({e!r}); rewrite the card with mklvisita.cards") from e
    return CardMetadata(
        task=str(section.get("task") or ""),
        data=str(section.get("data") or ""),
        trained_on=str(section.get("trained_on") or ""),
        cannot_know=str(section.get("cannot_know") or ""),
        license=str(meta.get("license") or ""),
        evaluations=evaluations,
    )


def _evaluations(meta: dict[str, Any], section: dict[str, Any]) -> list[Evaluation]:
    """The model-index's results (data, split, figures) joined by name with the section's sources and commands."""
    origin = {str(e["name"]): e for e in section.get("evaluations") or []}
    out = []
    for entry in meta.get("model-index") or []:
        for result in entry.get("results") or []:
            dataset = result.get("dataset") or {}
            name = str(dataset.get("name", ""))
            metrics = {str(m["type"]): float(m["value"]) for m in result.get("metrics") or []}
            where = origin.get(name, {})
            out.append(
                Evaluation(
                    name,
                    str(dataset.get("type", "")),
                    str(dataset.get("split", "")),
                    metrics,
                    str(where.get("source", "")),
                    str(where.get("command", "")),
                )
            )
    return out


def evaluation_from_json(
    path: str | os.PathLike, name: str, keys: list[str] | None = None, group: str | None = None, note: str = ""
) -> Evaluation:
    """An :class:`Evaluation` from a JSON file written by ``python -m training.evaluate`` (its ``meta`` gives the
    data, split and command; ``group``: a nested group of metrics, e.g. ``tuxpaint_test``).

    Args:
        path: the JSON file, named in the card as given (pass a repository-relative path).
        name: the evaluation's name in the card.
        keys: the metrics to keep, in this order (None: every number).
        group: read the metrics from this key of the JSON instead of its top level.
        note: a sentence under the table.
    """
    import json

    data = json.loads(Path(path).read_text(encoding="utf-8"))
    meta = data.get("meta", {})
    values = data[group] if group else data
    numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if keys is not None:
        missing = [k for k in keys if k not in numbers]
        if missing:
            raise CardError(f"{Path(path).name} has no metric {', '.join(missing)}")
        numbers = {k: numbers[k] for k in keys}
    command = str(meta.get("command", "")).replace("<file.json>", str(path))
    return Evaluation(name, str(meta.get("data", "")), str(meta.get("split", "")), numbers, str(path), command, note)
