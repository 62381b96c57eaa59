"""Matcher: a loaded model with its preprocessing, for scoring, explaining and searching.

A Matcher holds no mutable state after construction: every call runs under ``torch.inference_mode`` (or, for
explanations, computes gradients with ``torch.autograd.grad`` so no parameter ever holds a ``.grad``), so one
Matcher can serve several threads at once.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .features import ImageFeatures
from .fusion import PreparedImage
from .inputs import (
    ImageInput,
    InvalidCaptionError,
    InvalidImageError,
    Processor,
    check_batch_size,
    check_caption,
    check_whole_number,
)
from .kernels import KernelEmbeddings
from .model import CheckpointError, FusedPairs, MKLVisITA, resolve_checkpoint
from .ranking import final_score, itm_from_final, resolve_ranking, uses_itm
from .retrieval import ImageBank, TextBank, encode_captions, encode_images, match_pairs, retrieve
from .sources.overlap import one_decision, start_torch
from .threads import uses_inference_threads

ASSETS = Path(__file__).resolve().parent.parent / "assets"
# The embedded checkpoints by name: "shapes" (tiny ViT trained on shapes scenes), "photo" (concept, colour, person and
# scene-text kernels on the pip-installed EfficientNet-Lite0 + MiniLM, whose backbones come from their packages, with
# a fusion branch, ITM head and relation reader trained on clip-art composites) and "photo-sources" (the same kernels
# without the fusion: the photo checkpoint's starting point, a similarity-only baseline).
EMBEDDED = {
    "shapes": ASSETS / "mklvisita-shapes",
    "photo": ASSETS / "mklvisita-photo",
    "photo-sources": ASSETS / "mklvisita-photo-sources",
}
DEFAULT_NAME = "photo"  # Matcher.default() with no name: the demo's default (real photographs, offline)
DEFAULT_CHECKPOINT = EMBEDDED[DEFAULT_NAME]
DEFAULT_ENV = "MKLVISITA_DEFAULT_CHECKPOINT"  # overrides the embedded checkpoint's folder


@dataclass
class ScoreResult:
    itm: np.ndarray  # (n_images, n_captions) match probability in [0, 1] (NaN for a model without fusion)
    similarity: np.ndarray  # (n_images, n_captions) multi-kernel similarity S
    kernel_contributions: np.ndarray  # (n_images, n_captions, n_kernels) beta_m K_m; sums over kernels to S
    kernel_names: list[str]
    score: np.ndarray  # (n_images, n_captions) the checkpoint's ranking score (mklvisita.ranking.final_score):
    # itm_weight * ITM + similarity_weight * S, S alone without fusion or with k = 0


@dataclass
class SearchResult:
    indices: list[int]  # gallery positions, best first
    scores: list[float]  # final score of each
    itm: list[float]  # ITM probability of each (NaN without fusion / outside the re-ranked set)
    similarity: list[float]  # stage-1 similarity of each
    timings: dict[str, float] = field(default_factory=dict)  # seconds: encode query, global, similarity, rerank
    pairs: dict[str, int] = field(default_factory=dict)  # pairs scored per retrieval stage


@dataclass
class ImageIndex:
    bank: ImageBank
    size: int


@dataclass
class TextIndex:
    bank: TextBank
    captions: list[str]


class Matcher:
    """Scores and explains image-caption pairs with an MKL-VisITA model."""

    def __init__(
        self,
        model: MKLVisITA,
        processor: Processor | None = None,
        card: str = "",
        metrics: dict[str, Any] | None = None,
        source: str = "",
        threads: int | str | None = None,
    ):
        self.model = model.eval()
        self.processor = processor or Processor(model.config, model.tokenizer)
        self.card = card
        self.metrics = metrics or {}
        self.source = source
        self.threads = threads  # CPU threads per call; None: $MKLVISITA_THREADS or 1 (mklvisita.threads)

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        revision: str | None = None,
        device: str | torch.device | None = None,
        source_options: dict[str, dict[str, Any]] | None = None,
        **hub_kwargs,
    ) -> Matcher:
        """Load a checkpoint folder or Hub id (pinned at ``revision``): model, tokenizer, card and metrics.
        ``source_options``: other settings of its feature sources (:meth:`MKLVisITA.from_pretrained`)."""
        if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
            raise CheckpointError(f"a checkpoint is a folder or a Hub id (owner/name), got {name_or_path!r}")
        folder = resolve_checkpoint(name_or_path, revision=revision, **hub_kwargs)
        model = MKLVisITA.from_pretrained(folder, source_options=source_options)
        if device is not None:
            model = model.to(device)
        card = (folder / "README.md").read_text(encoding="utf-8") if (folder / "README.md").is_file() else ""
        metrics = {}
        if (folder / "metrics.json").is_file():
            try:
                metrics = json.loads((folder / "metrics.json").read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{folder.name}/metrics.json is not valid JSON ({e})") from e
        return cls(model, card=card, metrics=metrics, source=str(name_or_path))

    @classmethod
    def default(cls, name: str | None = None, device: str | torch.device | None = None) -> Matcher:
        """An embedded checkpoint shipped in ``assets/`` (loads with no network).

        Args:
            name: "photo" (kernels over fixed sources on the pip-installed EfficientNet-Lite0 + MiniLM, with a
                fusion branch trained on clip-art composites: real photographs), "photo-sources" (the same without
                the fusion: similarity only) or "shapes" (the tiny ViT trained on shapes scenes; much cheaper to
                load, which tests and quick benchmarks want). None = the demo's default, :data:`DEFAULT_NAME`
                ("photo", as ``python app.py`` shows); ``$MKLVISITA_DEFAULT_CHECKPOINT`` overrides its folder (never
                a named one's).
            device: where to put the model.
        """
        if name is not None and name not in EMBEDDED:
            raise ValueError(f"unknown embedded checkpoint {name!r}; choose from {sorted(EMBEDDED)}")
        folder = EMBEDDED[name] if name is not None else Path(os.environ.get(DEFAULT_ENV, DEFAULT_CHECKPOINT))
        if not (folder / "model.safetensors").is_file():
            rebuild = {
                "shapes": "`python -m training.train --config training/configs/shapes.yaml` and copy the run's "
                "release folder there",
                "photo-sources": "`python -m training.photo --out assets/mklvisita-photo-sources`",
                "photo": "`python -m training.photo --out assets/mklvisita-photo-sources`, then the two training "
                "configs training/configs/photo_fusion.yaml and photo_fusion_reader.yaml (docs/training.md)",
            }[name or DEFAULT_NAME]
            raise CheckpointError(
                f"the embedded {name or 'default'} checkpoint is missing ({folder.name}). Rebuild it with {rebuild}"
                + ("" if name else f", or set {DEFAULT_ENV}")
                + "."
            )
        return cls.from_pretrained(folder, device=device)

    # ---------------------------------------------------------------------------------------------- scoring
    @uses_inference_threads
    def score(self, images: Sequence[ImageInput], captions: Sequence[str], batch_size: int = 64) -> ScoreResult:
        """Score every image against every caption. Each image and caption is encoded once."""
        with one_decision():  # the overlap's setting read once for the whole call (mklvisita.sources.overlap)
            return self._score(_as_list(images, "image"), _as_list(captions, "caption"), check_batch_size(batch_size))

    def _score(self, images: list, captions: list, batch_size: int) -> ScoreResult:
        n_i, n_t = len(images), len(captions)
        ii = torch.arange(n_i).repeat_interleave(n_t)
        tt = torch.arange(n_t).repeat(n_i)
        images_bank, texts_bank, fused = self._encode(images, captions, batch_size, ii, tt)
        with torch.inference_mode():
            sim = self.model.similarity(images_bank.embeddings, texts_bank.embeddings)
            contrib = sim.contributions.float().cpu().numpy()
            similarity = sim.similarity.float().cpu().numpy()
        ranking = resolve_ranking(self.model)
        if self.model.has_itm:
            if fused is None:
                itm = match_pairs(self.model, images_bank, texts_bank, ii, tt, batch_size)
            else:
                s = sim.similarity[ii, tt]  # each pair's S, computed above for every pair
                with torch.inference_mode():
                    probs = [self.model.finish_match(f, s[lo:hi].to(self.device)).prob for (lo, hi), f in fused]
                    itm = torch.cat(probs).float().cpu()
            itm = itm.view(n_i, n_t).numpy()
            final = final_score(ranking, itm, similarity)
        else:
            itm = np.full_like(similarity, np.nan)
            final = final_score(ranking, None, similarity)
        return ScoreResult(itm, similarity, contrib, self.model.kernel_names, final)

    @torch.inference_mode()
    def _encode(
        self, images: list, captions: list[str], batch_size: int, image_index: torch.Tensor, text_index: torch.Tensor
    ) -> tuple[ImageBank, TextBank, list[tuple[tuple[int, int], FusedPairs]] | None]:
        """Both sides of a score, and with a fusion branch the pairs' passes through it (``image_index``,
        ``text_index``: the pairs; None for more than one batch of images, encoded as
        :func:`mklvisita.retrieval.encode_images` does, before the captions, and matched after).

        One batch of images: the captions' encoder (:func:`mklvisita.retrieval.encode_captions`) starts first, on the
        overlap worker (:func:`mklvisita.sources.overlap.start_torch`), beside this thread's image backbone, and the
        detectors queue behind it (:meth:`MKLVisITA.start_match_image`). Back from the backbone, this thread computes
        the sources that need no detector (the fusion's affinity source among them) and the fusion's image side, then
        runs the pair passes (:meth:`_fuse_prepared`) while the worker runs the detectors; only then does it collect
        the other sources (taking back a detector the worker has not started), whose features S needs
        (:meth:`MKLVisITA.finish_match` adds S after). With the overlap off the same functions run here in the same
        order, so the outcome is the same. The image is read and the captions checked before either side starts, so
        a bad input fails at once, a bad image before a bad caption."""
        if len(images) > batch_size:
            images_bank = encode_images(self.model, self.processor, images, batch_size)
            return images_bank, encode_captions(self.model, self.processor, captions, batch_size), None
        pv = self.processor.images(images)[0].to(self.device)
        captions = [check_caption(c) for c in captions]
        texts = start_torch(encode_captions, self.model, self.processor, captions, batch_size)
        started = None
        try:
            started = self.model.start_match_image(pv)
            fused = None
            if self.model.has_itm and self._fusion_can_read(started.early):  # the pairs pass beside the detectors
                texts_bank = texts.collect()
                pairs = (image_index, text_index, batch_size)
                fused = self._fuse_prepared(started.early, texts_bank, started.fusion.collect(), *pairs)
            img = started.sources.collect()  # run here if the worker has not started it
            keep = self.model.fusion.image_levels if self.model.has_itm else None
            feats = None if keep is None else ImageFeatures.cat([img.keep(keep)])
            images_bank = ImageBank(KernelEmbeddings.cat([self.model.embed_image(img)]), feats)  # as encode_images
            texts_bank = texts.collect()
            if self.model.has_itm and fused is None:  # the fusion reads a source that waits for a detector
                pairs = (image_index, text_index, batch_size)
                fused = self._fuse_prepared(img, texts_bank, started.fusion.collect(), *pairs)
        except BaseException:
            for pending in (texts, started):  # not needed any more (no effect once they run)
                if pending is not None:
                    pending.cancel()
            raise
        return images_bank, texts_bank, fused

    def _fusion_can_read(self, img: ImageFeatures) -> bool:
        """Whether the fusion has what it reads in ``img`` (its affinity source's features, with the bias on)."""
        return not self.model.fusion.use_bias or self.model.kernels.affinity_source in img.sources

    @torch.inference_mode()
    def _fuse_prepared(
        self,
        img: ImageFeatures,
        texts: TextBank,
        fusion_image: PreparedImage,
        image_index: torch.Tensor,
        text_index: torch.Tensor,
        batch_size: int,
    ) -> list[tuple[tuple[int, int], FusedPairs]]:
        """The pairs' passes through the fusion (:meth:`MKLVisITA.fuse_pairs`), ``batch_size`` pairs at a time, on
        images whose fusion image side is prepared (:meth:`MKLVisITA.prepare_fusion_image`): each batch's
        ``(start, end)`` and its passes, for :meth:`MKLVisITA.finish_match` once S is known. ``img`` needs only the
        sources the fusion reads (:meth:`MKLVisITA.embed_image` embeds those it has)."""
        img_emb = self.model.embed_image(img, list(img.sources)) if self.model.fusion.use_bias else None
        out = []
        for lo in range(0, len(image_index), batch_size):
            hi = min(lo + batch_size, len(image_index))
            ii, tt = image_index[lo:hi].to(self.device), text_index[lo:hi].to(self.device)
            txt, emb_t = texts.features.select(tt), texts.embeddings.select(tt)
            out.append(((lo, hi), self.model.fuse_pairs(img, txt, img_emb, emb_t, ii, False, fusion_image)))
        return out

    @uses_inference_threads
    def explain(self, image: ImageInput, caption: str, layer: int | None = None, method: str | None = None, **kwargs):
        """Heatmaps for one pair in the original image's frame; see :func:`mklvisita.explain.explain_pair`.

        Maps are at the image's size up to ``max_side`` (default :data:`mklvisita.explain.MAP_MAX_SIDE`, 1,024) pixels
        on the longer side, scaled down beyond it, so a 16 MP image costs no more memory than a 1 MP one;
        ``Explanation.full_size`` upsamples a map on demand, ``max_side=None`` keeps every map at full size.

        ``method`` None: with the fusion branch the checkpoint's ``fusion.explain_method`` (Grad-CAM unless chosen
        otherwise at release), else the kernel maps (``photo-sources``).
        """
        from .explain import explain_pair

        if method is None:
            method = self.model.config.fusion.explain_method if self.model.has_itm else "kernel"

        return explain_pair(self.model, self.processor, image, caption, layer=layer, method=method, **kwargs)

    def kernel_weights(self) -> dict[str, float]:
        """The learned global kernel weights beta, by kernel name (sum to 1)."""
        with torch.inference_mode():
            w = self.model.kernel_weights().float().cpu().tolist()
        return dict(zip(self.model.kernel_names, w))

    def fusion_kernel_weights(self) -> list[dict[str, float]]:
        """Each fusion layer's weights over the local kernels (its attention bias); [] without them."""
        with torch.inference_mode():
            w = self.model.fusion_kernel_weights()
        if w is None:
            return []
        names = self.model.local_kernel_names
        return [dict(zip(names, row)) for row in w.float().cpu().tolist()]

    def fusion_bias_scales(self) -> list[float]:
        """Each fusion layer's scale of its attention bias (the mix :meth:`fusion_kernel_weights` gives) as served: the
        learned scale times ``fusion.affinity_bias_scale``; [] without an affinity bias."""
        fusion = self.model.fusion
        if fusion is None or not fusion.use_bias:
            return []
        served = self.model.config.fusion.affinity_bias_scale
        return [float(x) * served for x in fusion.bias_scale.detach().float().cpu()]

    # ----------------------------------------------------------------------------------------------- search
    @uses_inference_threads
    def index_images(self, images: Sequence[ImageInput], batch_size: int = 64) -> ImageIndex:
        images, batch_size = _as_list(images, "image"), check_batch_size(batch_size)
        return ImageIndex(encode_images(self.model, self.processor, images, batch_size), len(images))

    @uses_inference_threads
    def index_captions(self, captions: Sequence[str], batch_size: int = 256) -> TextIndex:
        captions, batch_size = [check_caption(c) for c in _as_list(captions, "caption")], check_batch_size(batch_size)
        return TextIndex(encode_captions(self.model, self.processor, captions, batch_size), captions)

    @uses_inference_threads
    def search_images(self, index: ImageIndex, text: str, top_k: int = 5) -> SearchResult:
        """Text -> the best images of an index by the cascade of ``config.ranking`` (ITM re-scores the top
        max(ranking.k, top_k)). ``top_k``: a whole number from 1 (more than the index holds returns all of it)."""
        _check_index(index, ImageIndex, "search_images", "index_images")
        top_k = _check_top_k(top_k)
        t0 = time.perf_counter()
        query = encode_captions(self.model, self.processor, [check_caption(text)])
        t_enc = time.perf_counter() - t0
        s = retrieve(self.model, index.bank, query, self._ranking(top_k))
        return self._top(s.t2i[0], s.similarity[:, 0], top_k, {"encode_query": t_enc, **s.timings}, s.pairs)

    @uses_inference_threads
    def search_captions(self, index: TextIndex, image: ImageInput, top_k: int = 5) -> SearchResult:
        """Image -> the best captions of an index (``top_k`` as in :meth:`search_images`)."""
        _check_index(index, TextIndex, "search_captions", "index_captions")
        top_k = _check_top_k(top_k)
        t0 = time.perf_counter()
        query = encode_images(self.model, self.processor, [image])
        t_enc = time.perf_counter() - t0
        s = retrieve(self.model, query, index.bank, self._ranking(top_k))
        return self._top(s.i2t[0], s.similarity[0], top_k, {"encode_query": t_enc, **s.timings}, s.pairs)

    @uses_inference_threads
    def search(self, index: Any, text: str, top_k: int = 5, candidates: int | None = None) -> Any:
        """Text -> the best images of a saved gallery index (a folder from ``python -m mklvisita index``, or an opened
        :class:`mklvisita.gallery.GalleryIndex`): the FAISS first stage keeps ``candidates`` (default 32), the full
        model re-ranks them from their files by the checkpoint's ranking rule. Returns a
        :class:`mklvisita.gallery.GallerySearchResult` (``files``, ``scores``, ``itm``, ``similarity``, ...).

        Raises:
            ValueError: not an index folder, or an index built by another checkpoint (IndexMismatchError).
        """
        from .gallery import search_index

        return search_index(self, index, text, top_k, candidates)

    def _ranking(self, top_k: int):
        """The model's ranking rule, re-ranking (and keeping as candidates) at least ``top_k``."""
        r = resolve_ranking(self.model)
        k = max(r.k, top_k) if r.k > 0 else 0
        return resolve_ranking(r, k=k, candidates=max(r.candidates, k) if r.candidates > 0 else 0)

    def _top(
        self, final: np.ndarray, sim: np.ndarray, top_k: int, timings: dict[str, float], pairs: dict[str, int]
    ) -> SearchResult:
        order = np.argsort(-final, kind="stable")[: max(1, top_k)]
        # The top k always lie inside the re-scored set, so ITM took part in their final score and can be read back.
        ranking = resolve_ranking(self.model)
        rescored = uses_itm(ranking, self.model.has_itm)
        itm = [itm_from_final(ranking, float(final[i]), float(sim[i])) if rescored else float("nan") for i in order]
        return SearchResult(
            [int(i) for i in order],
            [float(final[i]) for i in order],
            itm,
            [float(sim[i]) for i in order],
            timings,
            pairs,
        )


def _check_index(index: Any, kind: type, method: str, maker: str) -> None:
    if not isinstance(index, kind):
        raise ValueError(f"{method} searches a {kind.__name__} (from Matcher.{maker}), got {type(index).__name__}")


def _check_top_k(top_k: Any) -> int:
    return check_whole_number(top_k, "top_k", 1, 1_000_000)


def _as_list(items: Any, what: str) -> list:
    if isinstance(items, (str, bytes, os.PathLike)) or not isinstance(items, Sequence):
        items = [items]
    items = list(items)
    if not items:
        err = InvalidImageError if what == "image" else InvalidCaptionError
        raise err(f"no {what} given")
    return items
