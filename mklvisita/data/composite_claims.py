"""Claims about clip-art composites: the structure of a caption, its text, and whether it holds of a scene.

Decisions:

- **Captions are claims** (as the shapes scenes): ``exists`` ("there is a red apple"), ``and``, ``relation`` ("an
  apple to the left of a lion"; left, right, above, below between object centres, with a margin of
  ``RELATION_MARGIN`` of the canvas; or ``near``, "an apple beside / next to / near a lion", which names no direction
  and holds of any two objects of a scene, in either order), ``sides`` ("an apple on the left and a lion on the
  right", "... at the top and ... at the bottom") and ``count`` ("two apples"). :func:`holds` evaluates a claim
  against a scene's objects (existential reading; a count is exact); :func:`assignment` says which objects a true
  claim names.
- **Noun phrases**: a title is plural when its last word ends in "s" (not "ss", "us", "is"); a plural takes no
  article and "there are"; counts pluralise the noun's last word ("flag of france" -> "flags of france").
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

RELATIONS = ("left", "right", "above", "below")
UNDIRECTED = "near"  # the relation of "beside", "next to", "near": no direction, no reversal, no verdict to read
UNDIRECTED_WORDS = ("beside", "next to", "near")  # by ``Claim.template``
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
RELATION_MARGIN = 0.1  # of the canvas side: centres closer than this are neither left nor right
NUMBERS = {1: "one", 2: "two", 3: "three"}
_RELATION_WORDS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
_SIDES = {
    "left": ("on the left", "on the right"),
    "right": ("on the right", "on the left"),
    "above": ("at the top", "at the bottom"),
    "below": ("at the bottom", "at the top"),
}
# Words that carry a claim's relation (targets of the relation word's verdict; no title may contain one).
RELATION_WORD_SET = frozenset({"left", "right", "above", "below", "top", "bottom"})


def plural(noun: str) -> bool:
    """Whether a noun phrase reads as a plural ("grapes", not "glass" or "cactus")."""
    last = noun.split()[-1] if noun.split() else ""
    return last.endswith("s") and not last.endswith(("ss", "us", "is")) and " of " not in noun


def pluralise(noun: str) -> str:
    """The plural of a singular noun phrase (its last word): "apple" -> "apples", "glass" -> "glasses"."""
    if plural(noun):
        return noun
    head, _, last = noun.rpartition(" ")
    if " of " in noun:  # "flag of france" -> "flags of france"
        first, _, rest = noun.partition(" of ")
        return f"{pluralise(first)} of {rest}"
    if last.endswith(("s", "x", "z", "ch", "sh")):
        last += "es"
    elif last.endswith("y") and len(last) > 1 and last[-2] not in "aeiou":
        last = last[:-1] + "ies"
    else:
        last += "s"
    return f"{head} {last}".strip()


@dataclass(frozen=True)
class Desc:
    """A noun phrase naming an object: its title's noun and, when said, its colour."""

    noun: str
    colour: str | None = None

    def matches(self, obj: SceneObject) -> bool:
        return obj.noun == self.noun and (self.colour is None or obj.colour == self.colour)

    def words(self) -> str:
        """The phrase without its article: "red apple"."""
        return f"{self.colour} {self.noun}" if self.colour else self.noun

    def text(self) -> str:
        words = self.words()
        if plural(self.noun):
            return words
        return ("an " if words[0] in "aeiou" else "a ") + words


@dataclass(frozen=True)
class Claim:
    """A caption's structure: ``kind`` is exists, and, relation, sides or count."""

    kind: str
    descs: tuple[Desc, ...] = ()
    relation: str | None = None
    count: int = 0
    template: int = 0

    def text(self) -> str:
        d = [x.text() for x in self.descs]
        if self.kind == "exists":
            there = "there are" if plural(self.descs[0].noun) else "there is"
            return ("{0}", there + " {0}", "a picture of {0}")[self.template].format(d[0])
        if self.kind == "and":
            listed = " and ".join(d) if len(d) == 2 else ", ".join(d[:-1]) + " and " + d[-1]
            return ("{0}", "a picture of {0}")[self.template].format(listed)
        if self.kind == "relation":
            if self.relation == UNDIRECTED:
                return f"{d[0]} {UNDIRECTED_WORDS[self.template]} {d[1]}"
            return f"{d[0]} {_RELATION_WORDS[self.relation]} {d[1]}"
        if self.kind == "sides":
            first, second = _SIDES[self.relation]
            return f"{d[0]} {first} and {d[1]} {second}"
        if self.kind == "count":
            noun = self.descs[0].noun if self.count == 1 else pluralise(self.descs[0].noun)
            return ("{0} {1}", "a picture of {0} {1}")[self.template].format(NUMBERS[self.count], noun)
        raise ValueError(f"unknown claim kind {self.kind!r}")


@dataclass(frozen=True)
class SceneObject:
    """A placed object: its title's noun, named colour (or None), art index and box in canvas pixels."""

    noun: str
    colour: str | None
    art: int
    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def center(self) -> tuple[float, float]:
        return (self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2


def relation_holds(a: SceneObject, b: SceneObject, relation: str, margin: float) -> bool:
    if relation == UNDIRECTED:  # two objects of one canvas are beside each other, whichever is named first
        return True
    (ax, ay), (bx, by) = a.center, b.center
    if relation == "left":
        return ax + margin < bx
    if relation == "right":
        return ax > bx + margin
    if relation == "above":
        return ay + margin < by
    if relation == "below":
        return ay > by + margin
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS + (UNDIRECTED,)}")


def assignment(claim: Claim, objects: list[SceneObject], image_size: int) -> tuple[int, ...] | None:
    """The objects (indices) a claim's descriptions name: the first assignment that makes it hold, else None."""
    margin = RELATION_MARGIN * image_size
    for chosen in itertools.permutations(range(len(objects)), len(claim.descs)):
        if not all(d.matches(objects[j]) for d, j in zip(claim.descs, chosen)):
            continue
        if claim.kind in ("relation", "sides") and not relation_holds(
            objects[chosen[0]], objects[chosen[1]], claim.relation, margin
        ):
            continue
        return chosen
    return None


def holds(claim: Claim, objects: list[SceneObject], image_size: int) -> bool:
    """Whether ``claim`` is true of a scene's objects (existential reading; a count is exact)."""
    if claim.kind == "count":
        return sum(o.noun == claim.descs[0].noun for o in objects) == claim.count
    if claim.kind not in ("exists", "and", "relation", "sides"):
        raise ValueError(f"unknown claim kind {claim.kind!r}")
    return assignment(claim, objects, image_size) is not None


@dataclass
class Scene:
    """Everything about one item except its pixels."""

    objects: list[SceneObject]
    claims: list[Claim]
    negative_claims: list[Claim]
    negative_kinds: list[str]
    background: str
    background_art: int | None = None
