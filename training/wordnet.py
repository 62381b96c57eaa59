"""The WordNet expansion of the photo checkpoint's concept kernels: ImageNet-21k synsets -> ImageNet-1k classes.

Decisions:
    - Synsets and their lemmas: timm's ``imagenet_synset_to_lemma.txt`` (the 21,844 ImageNet-21k synsets, WordNet 3.0
      noun offsets as ids, e.g. ``n02421449 gnu, wildebeest``). The hierarchy: WordNet 3.0's ``data.noun`` (Debian
      ``wordnet-base``; Princeton WordNet licence), hypernym and instance-hypernym pointers, read here with no NLTK.
    - A synset's classes: the ImageNet-1k classes under its nearest ancestor-or-self that has any (breadth first,
      level by level), uniformly weighted: gnu -> antelope -> {hartebeest, impala, gazelle}; yak -> {ox}; a 1k class
      -> itself. Synsets whose nearest such ancestor covers more than ``max_classes`` classes (e.g. "cow" in its
      whale sense -> every placental) say too little and are left out.
    - Everything here runs when the checkpoint is built; the result (lemma embeddings and links) is saved in the
      checkpoint, so loading needs neither file.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

DEFAULT_DATA_NOUN = "/usr/share/wordnet/data.noun"  # Debian package wordnet-base
WORDNET_ENV = "MKLVISITA_WORDNET_DATA_NOUN"
MAX_CLASSES = 64


def data_noun_path(path: str | os.PathLike | None = None) -> Path:
    p = Path(path or os.environ.get(WORDNET_ENV) or DEFAULT_DATA_NOUN)
    if not p.is_file():
        raise FileNotFoundError(
            f"WordNet 3.0 data.noun not found at {p}: `apt-get install wordnet-base` (Debian/Ubuntu), or name the file "
            f"with ${WORDNET_ENV}"
        )
    return p


def read_hypernyms(path: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """WordNet noun synset id ("n" + 8-digit offset) -> its hypernyms' ids (instance hypernyms included)."""
    hypernyms: dict[str, list[str]] = {}
    with open(data_noun_path(path), encoding="latin-1") as f:
        for line in f:
            if line.startswith("  "):  # licence header
                continue
            fields = line.split(" | ")[0].split()
            words = int(fields[3], 16)
            i = 4 + 2 * words
            count = int(fields[i])
            ptrs = [fields[i + 1 + 4 * k : i + 5 + 4 * k] for k in range(count)]  # (symbol, offset, pos, source/target)
            hypernyms["n" + fields[0]] = ["n" + o for sym, o, pos, _ in ptrs if sym in ("@", "@i") and pos == "n"]
    return hypernyms


def synset_lemmas() -> dict[str, str]:
    """timm's ImageNet-21k synset id -> its lemmas ("gnu, wildebeest")."""
    import timm

    path = Path(timm.__file__).parent / "data" / "_info" / "imagenet_synset_to_lemma.txt"
    pairs = (line.rstrip("\n").split("\t", 1) for line in path.read_text(encoding="utf-8").splitlines() if line)
    return dict(pairs)


def synset_classes(
    synsets: list[str], classes: list[str], hypernyms: dict[str, list[str]], max_classes: int = MAX_CLASSES
) -> dict[str, list[int]]:
    """Each synset's ImageNet-1k classes (indices into ``classes``): those under its nearest ancestor-or-self that
    has any; synsets with none, or with more than ``max_classes``, are left out."""
    below: dict[str, set[int]] = defaultdict(set)  # synset -> the 1k classes at or under it
    for index, cls in enumerate(classes):
        seen, stack = set(), [cls]
        while stack:
            s = stack.pop()
            if s not in seen:
                seen.add(s)
                below[s].add(index)
                stack.extend(hypernyms.get(s, []))
    out = {}
    for synset in synsets:
        frontier, seen = [synset], set()
        while frontier:
            hit = set().union(*(below.get(s, set()) for s in frontier))
            if hit:
                if len(hit) <= max_classes:
                    out[synset] = sorted(hit)
                break
            seen.update(frontier)
            frontier = [h for s in frontier for h in hypernyms.get(s, []) if h not in seen]
    return out
