"""The demo's checkpoints: the allow-list, the loaded Matchers, their result caches, and what each one is.

No Gradio here (a test imports this module in a fresh interpreter and checks): the registry and the caches are
plain Python that the handlers and the tests use directly.

Decisions:

- Both embedded checkpoints are in every allow-list, by name: "photo" (the default: real photographs, offline) and
  "shapes" (the coloured-shapes model); they load through `Matcher.default(name)`. Hub ids and local folders given
  with `--checkpoint` / `$MKLVISITA_CHECKPOINTS` follow; nothing outside the list is ever loaded.
- Visitors see a checkpoint by its name, never by a server path: a Hub id as given, a local folder by its folder
  name (`run-7`, then `run-7 (2)` for a second folder of that name). The name -> path table is logged once when the
  demo starts (logger `mklvisita.demo`), and a load error's text has the path replaced by the name.
- The default is pinned in memory; the others are evicted least-recently-used beyond `MAX_LOADED`.
- Handler results are cached per loaded checkpoint (`ResultCache`, a bounded LRU keyed by a digest of the inputs):
  Gradio's own example cache lives on disk keyed by component id and would keep serving a previous checkpoint's
  outputs; ours is dropped with the checkpoint it belongs to.
- Errors are `ValueError`s with plain messages (`CheckpointNotAllowed`, `CheckpointLoadError`); the UI layer shows
  them as toasts.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mklvisita import Matcher
from mklvisita.cards import CardError, CardMetadata, read_card
from mklvisita.ranking import describe_ranking, resolve_ranking

EMBEDDED = ("photo", "shapes")  # Matcher.default(name); the first is the demo's default
DEFAULT_CHECKPOINT = EMBEDDED[0]
CHECKPOINTS_ENV = "MKLVISITA_CHECKPOINTS"
MAX_LOADED = 3  # checkpoints held in memory at once: photo (pinned), shapes, and one from the Hub
CACHE_ENTRIES = 64
EXPLAIN_CACHE_ENTRIES = 3  # an explanation holds full-size maps per word and per kernel: tens of MB each


log = logging.getLogger("mklvisita.demo")


class CheckpointNotAllowed(ValueError):
    """A checkpoint outside the demo's allow-list was asked for."""


class CheckpointLoadError(ValueError):
    """An allow-listed checkpoint could not be loaded."""


class ResultCache:
    """A small thread-safe LRU of handler results for one checkpoint (this is where example outputs live)."""

    def __init__(self, capacity: int = CACHE_ENTRIES) -> None:
        self.capacity = capacity
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._subs: dict[str, ResultCache] = {}
        self.hits = 0

    def sub(self, name: str, capacity: int) -> ResultCache:
        """A smaller cache for bulky results (explanations) that lives and dies with this one."""
        with self._lock:
            return self._subs.setdefault(name, ResultCache(capacity))

    def get_or_compute(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
        value = compute()  # outside the lock: a slow model call must not block cache reads
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class Loaded:
    matcher: Matcher
    cache: ResultCache = field(default_factory=ResultCache)


def allowed_checkpoints(cli: Sequence[str] = (), env: str | None = None) -> list[str]:
    """The allow-list: the embedded checkpoints, then `--checkpoint` values, then `$MKLVISITA_CHECKPOINTS`."""
    env = os.environ.get(CHECKPOINTS_ENV, "") if env is None else env
    out: list[str] = []
    for entry in (e.strip() for e in [*EMBEDDED, *cli, *env.split(",")]):
        if entry and entry not in out:
            out.append(entry)
    return out


def is_local(spec: str) -> bool:
    """Whether an allow-list entry is a local folder (not an embedded name or a Hub id `owner/name[@revision]`)."""
    name = spec.partition("@")[0] if not os.path.isdir(spec) else spec
    return os.path.isdir(name) or name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def display_names(specs: Sequence[str]) -> dict[str, str]:
    """Each allow-list entry's name as visitors see it (module docstring), in order: name -> entry."""
    names: dict[str, str] = {}
    for spec in specs:
        base = os.path.basename(os.path.normpath(os.path.expanduser(spec))) if is_local(spec) else spec
        name, n = base or "checkpoint", 1
        while name in names:
            n += 1
            name = f"{base} ({n})"
        names[name] = spec
    return names


def load_checkpoint(spec: str) -> Matcher:
    """Load an embedded checkpoint by name ("photo", "shapes") or `dir_or_hub_id[@revision]` (a pinned revision)."""
    if spec in EMBEDDED:
        return Matcher.default(spec)
    name, _, revision = spec.partition("@")
    return Matcher.from_pretrained(name, revision=revision or None)


class Registry:
    """The allow-list and the Matchers loaded from it. The default is pinned; others are evicted LRU.

    Args:
        default: the default checkpoint, already loaded (None: loaded by `loader` on first use).
        allowed: extra allow-listed specs after the embedded ones.
        loader: loads an allow-listed spec; tests pass a stub.
        default_name: the default's name in the allow-list.
    """

    def __init__(
        self,
        default: Matcher | None = None,
        allowed: Sequence[str] = (),
        loader: Callable[[str], Matcher] = load_checkpoint,
        max_loaded: int = MAX_LOADED,
        default_name: str = DEFAULT_CHECKPOINT,
    ) -> None:
        self._specs = display_names(allowed_checkpoints([default_name, *allowed], env=""))
        self.choices = list(self._specs)  # the names visitors see; the default's name is its spec
        self.default = default_name
        for name, spec in self._specs.items():
            if name != spec:
                log.info("checkpoint %r is the local folder %s", name, spec)
        self.loader = loader
        self.max_loaded = max(1, max_loaded)
        self._loaded: OrderedDict[str, Loaded] = OrderedDict()
        if default is not None:
            self._loaded[default_name] = Loaded(default)
        self._lock = threading.Lock()

    def check(self, choice: str | None) -> str:
        choice = choice or self.default
        if choice not in self.choices:
            raise CheckpointNotAllowed(
                f"Checkpoint {choice!r} is not in this demo's allow-list: {', '.join(self.choices)}."
            )
        return choice

    def get(self, choice: str | None) -> Loaded:
        choice = self.check(choice)
        with self._lock:  # one load at a time; a second request for the same id waits and reuses it
            if choice in self._loaded:
                self._loaded.move_to_end(choice)
                return self._loaded[choice]
            spec = self._specs[choice]
            try:
                matcher = self.loader(spec)
            except Exception as e:
                log.warning("could not load checkpoint %r (%s): %s: %s", choice, spec, type(e).__name__, e)
                reason = self._without_paths(str(e), spec, choice) if isinstance(e, ValueError) else type(e).__name__
                raise CheckpointLoadError(f"Could not load checkpoint {choice!r}: {reason}") from e
            self._loaded[choice] = entry = Loaded(matcher)
            while len(self._loaded) > self.max_loaded:
                oldest = next(k for k in self._loaded if k != self.default)
                del self._loaded[oldest]
            return entry

    def is_loaded(self, choice: str) -> bool:
        return choice in self._loaded

    @staticmethod
    def _without_paths(text: str, spec: str, name: str) -> str:
        """A load error's text with the entry's server path (as given and resolved) replaced by its name."""
        if not is_local(spec):
            return text
        folder = spec.partition("@")[0] if not os.path.isdir(spec) else spec
        for path in sorted({os.path.realpath(folder), os.path.abspath(folder), folder}, key=len, reverse=True):
            text = text.replace(path, name)
        return text


# ----------------------------------------------------------------------------------------- what a checkpoint is
def describe(matcher: Matcher) -> str:
    """One line: what the checkpoint was trained on and what it cannot know, from its card's metadata
    (:func:`mklvisita.cards.read_card`: the front matter's ``trained_on`` and ``cannot_know``, which the card writer
    takes from the training task); a checkpoint whose card does not say gets what its config tells."""
    try:
        meta = read_card(matcher.card or "")
    except CardError:
        meta = CardMetadata()  # an unreadable card says nothing; the Model tab still shows its text
    trained, cannot = meta.trained_on.strip().rstrip("."), meta.cannot_know.strip().rstrip(".")
    if not trained:
        fusion = "with" if matcher.model.has_itm else "without"
        trained = f"not recorded (no card); {matcher.config.vision.model_name or 'a ViT'} {fusion} a fusion head"
    return f"**Trained on:** {trained}." + (f" **It cannot know:** {cannot}." if cannot else "")


def ranking_rule(matcher: Matcher) -> str:
    """The checkpoint's ranking rule (:mod:`mklvisita.ranking`, its one owner) in words: what the "score" column is."""
    return describe_ranking(resolve_ranking(matcher), matcher.model.has_itm)
