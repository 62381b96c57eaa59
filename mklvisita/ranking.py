"""The ranking rule: how a checkpoint's scores combine into the one score that ranks, and how deep retrieval goes.

Decisions:

- **One owner.** :class:`mklvisita.config.RankingConfig`, saved in every checkpoint's ``config.json``, holds the
  numbers (``itm_weight``, ``similarity_weight``, ``k``, ``candidates``); this module holds the rule. The Matcher
  (Match and Matrix), retrieval (Search, the evaluation command, training's validation), the binding metrics, the
  kernel analysis and the demo's wording all go through :func:`resolve_ranking` and :func:`final_score`.
- **The rule.** final = itm_weight x ITM + similarity_weight x S for a pair the ITM head scored; S alone where there
  is no ITM (a model without the fusion branch, or ``k`` = 0: similarity only). A positive weight on S alone changes
  no order, and S alone stays equal to the sum of the kernel contributions a user sees.
- **Overrides** (an evaluation flag, a run's ``eval`` section) replace single fields; None keeps the checkpoint's.
  Weights must be finite, ``similarity_weight`` > 0 (S orders everything the ITM head does not re-score) and
  ``itm_weight`` >= 0; ``k`` and ``candidates`` are whole numbers >= 0. Anything else is a :class:`RankingError`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, TypeVar

from .config import MKLVisITAConfig, RankingConfig

Scores = TypeVar("Scores")  # numpy arrays, torch tensors or floats: the rule is elementwise


class RankingError(ValueError):
    """A ranking rule (or an override of one) that cannot rank."""


def _config_of(source: Any) -> RankingConfig:
    if isinstance(source, RankingConfig):
        return source
    if isinstance(source, MKLVisITAConfig):
        return source.ranking
    config = getattr(source, "config", None)  # a model or a Matcher
    if isinstance(config, MKLVisITAConfig):
        return config.ranking
    raise RankingError(f"a ranking rule comes from a model, a Matcher, a config or a RankingConfig, got {source!r}")


def check_ranking(ranking: RankingConfig) -> RankingConfig:
    """``ranking`` itself when it can rank; a :class:`RankingError` naming the field otherwise."""
    for name in ("itm_weight", "similarity_weight"):
        value = getattr(ranking, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RankingError(f"ranking.{name} must be a finite number, got {value!r}")
    if ranking.itm_weight < 0:
        raise RankingError(f"ranking.itm_weight must be >= 0 (0: S alone orders), got {ranking.itm_weight!r}")
    if ranking.similarity_weight <= 0:
        raise RankingError(
            f"ranking.similarity_weight must be > 0 (S orders every pair ITM does not re-score), "
            f"got {ranking.similarity_weight!r}"
        )
    for name in ("k", "candidates"):
        value = getattr(ranking, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise RankingError(f"ranking.{name} must be a whole number >= 0 (0: {_ZERO[name]}), got {value!r}")
    return ranking


_ZERO = {"k": "similarity only", "candidates": "exhaustive S"}


def resolve_ranking(source: Any, **overrides: Any) -> RankingConfig:
    """The ranking rule in force: the checkpoint's (``source``: a model, Matcher, config or RankingConfig) with each
    override that is not None (``itm_weight``, ``similarity_weight``, ``k``, ``candidates``).

    Raises:
        RankingError: an unknown override name or a value that cannot rank.
    """
    ranking = _config_of(source)
    fields = {f.name for f in dataclasses.fields(RankingConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise RankingError(f"unknown ranking field(s) {', '.join(unknown)}; choose from {', '.join(sorted(fields))}")
    ranking = dataclasses.replace(ranking, **{f: v for f, v in overrides.items() if v is not None})
    return check_ranking(ranking)


def uses_itm(ranking: RankingConfig, has_itm: bool) -> bool:
    """Whether the ITM head takes part in the final score (a model with fusion and ``k`` > 0)."""
    return bool(has_itm) and ranking.k > 0


def final_score(ranking: RankingConfig, itm: Scores | None, similarity: Scores) -> Scores:
    """The score that ranks: itm_weight x ITM + similarity_weight x S, or S alone when ``itm`` is None or the rule
    uses no ITM (``k`` = 0). Elementwise over arrays, tensors or floats; ``similarity`` itself is never modified."""
    if itm is None or ranking.k <= 0:
        return similarity * 1.0  # a copy: callers may write into it
    return ranking.itm_weight * itm + ranking.similarity_weight * similarity


def itm_from_final(ranking: RankingConfig, final: float, similarity: float) -> float:
    """The ITM probability read back from a pair's final score and S (the inverse of :func:`final_score` where ITM
    took part; NaN where it cannot be read back: ``itm_weight`` 0)."""
    if ranking.itm_weight == 0:
        return float("nan")
    return (final - ranking.similarity_weight * similarity) / ranking.itm_weight


def describe_ranking(ranking: RankingConfig, has_itm: bool, retrieval: bool = False) -> str:
    """The rule in words, for the demo and model cards: what the "score" is (``retrieval``: and how retrieval reaches
    it: the cascade's candidates and the re-ranking depth)."""
    if not has_itm:
        rule = "score = S (no fusion head, so no ITM)"
    elif ranking.k <= 0:
        rule = "score = S (k = 0: similarity only)"
    else:
        rule = f"score = {ranking.itm_weight:g} × ITM + {ranking.similarity_weight:g} × S"
    if not retrieval:
        return rule
    cascade = (
        f"{ranking.candidates} candidates per query from the global kernels" if ranking.candidates else "exhaustive S"
    )
    rerank = f", the ITM head re-ranks the top k = {ranking.k} per query" if uses_itm(ranking, has_itm) else ""
    return f"{rule}; retrieval: {cascade}{rerank}"
