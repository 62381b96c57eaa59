"""MKL-VisITA: the model.

    image -> timm ViT or CNN (or a hybrid) -> tokens per level (+ CLS) and a pooled feature
    text  -> transformers encoder -> tokens per layer + CLS
      |-> feature sources (mklvisita.sources) -> multi-kernel similarity S = sum_m beta_m K_m   (ITC: all pairs)
      '-> hierarchical two-way fusion, L layers -> fused CLS -> ITM head   (ITM: one pass per pair)

Inference goes through ``encode_*`` / ``embed_*`` / ``similarity`` / ``match`` so that retrieval can cache each side
once; ``forward`` runs a training step's losses (:func:`mklvisita.losses.training_losses`). The model knows no
feature source: it builds the ones ``kernels.sources`` names from the registry and iterates over them. Checkpoints
are one folder: ``config.json`` + ``model.safetensors`` + tokenizer files, saved crash-safely and loaded strictly
(:mod:`mklvisita.checkpoint`).
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from . import checkpoint, pretrained
from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError  # noqa: F401  (re-exported)
from .checkpoint import resolve as resolve_checkpoint  # noqa: F401  (re-exported)
from .config import ConfigError, MKLVisITAConfig
from .encoders import HFTextEncoder, TimmImageEncoder, text_weights_folder
from .features import ImageFeatures, TextFeatures
from .fusion import FusionOutput, HierarchicalFusion, LayerAttentions, PreparedImage, RelationEvidence
from .kernels import KernelEmbeddings, MultiKernelSimilarity, SimilarityOutput
from .losses import MKLVisITAOutput, training_losses
from .sources import SourceContext, build_sources
from .sources.overlap import Prefetch, done, start_torch
from .tokenizer import builtin_tokenizer, load_tokenizer

__all__ = ["MKLVisITA", "ImageFeatures", "TextFeatures", "MatchOutput", "MKLVisITAOutput", "CheckpointError"]


@dataclass
class MatchOutput:
    logits: torch.Tensor  # (B, 2) ITM logits, class 1 = match
    prob: torch.Tensor  # (B,) match probability
    attentions: list[LayerAttentions]  # one per fusion layer
    text_states: torch.Tensor | None = None  # (B, T, W) fused text entering the last fusion layer (with attentions)
    relation: RelationEvidence | None = None  # the relation reader's evidence (``fusion.relation_reader``)


@dataclass
class FusedPairs:
    """:meth:`MKLVisITA.fuse_pairs`: the fusion's part of the match logit, before S is added
    (:meth:`MKLVisITA.finish_match`)."""

    head: torch.Tensor  # (B, 2) the ITM head's logits, calibrated (``fusion.itm_head_scale``)
    fusion: FusionOutput


@dataclass
class StartedMatch:
    """:meth:`MKLVisITA.start_match_image`: an image batch on its way to being matched.

    ``early``: the levels, the pooled feature and the features of the sources the fusion reads (the leading sources
    that start no work of their own beside the backbone: the concept bridge, colour naming), computed already;
    ``sources``: the same with every source, the rest (the detectors' sources) still to :meth:`Prefetch.collect`;
    ``fusion``: the fusion's caption-independent image side (None without a fusion branch)."""

    early: ImageFeatures
    sources: Prefetch
    fusion: Prefetch | None

    def cancel(self) -> None:
        """Drop what has not started (the call failed)."""
        for job in (self.sources, self.fusion):
            if job is not None:
                job.cancel()


class MKLVisITA(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="mklvisita",
    tags=["image-text-matching", "multi-kernel-learning", "vision-transformer"],
    pipeline_tag="zero-shot-image-classification",
):
    """Multi-kernel learning + ViT + hierarchical two-way cross-modal fusion for image-text matching."""

    def __init__(self, config: MKLVisITAConfig | dict, tokenizer=None):
        super().__init__()
        if isinstance(config, dict):
            config = MKLVisITAConfig.from_dict(config)
        config = copy.deepcopy(config)
        config.validate()
        self.config = config
        building = config.text.backbone_config is None  # a new model, not one being loaded
        if tokenizer is None and building:
            tokenizer = _build_tokenizer(config)
        self._tokenizer = tokenizer

        self.vision = TimmImageEncoder(config.vision)
        vocab = len(tokenizer) if tokenizer is not None else 0
        self.text = HFTextEncoder(config.text, vocab, config.text.backbone_config)
        config.text.backbone_config = self.text.backbone_config()
        ctx = SourceContext(config.kernels, self.vision, self.text, config.vision, tokenizer, {})
        sources = build_sources(ctx)  # fills config.kernels.options with every source's settings
        self.kernels = MultiKernelSimilarity(config.kernels, sources, self.vision.pooled_width, self.text.width)
        if building:
            self._build_sources(tokenizer)
        for encoder, frozen in ((self.vision, config.vision.frozen), (self.text, config.text.frozen)):
            if frozen:
                encoder.requires_grad_(False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.loss.temperature)))

        f = config.fusion
        self.fusion: HierarchicalFusion | None = None
        self.itm_head: nn.Linear | None = None
        self.itm_similarity_weight: nn.Parameter | None = None
        self.itm_relation_weight: nn.Parameter | None = None
        if f.enabled:
            levels = self._fusion_levels()
            self.fusion = HierarchicalFusion(
                f,
                self.vision.width,
                self.text.width,
                levels,
                len(self.kernels.affinity_names),
                self.vision.num_prefix_tokens,
                image_widths=[self.vision.widths[lv] for lv in levels],
                image_grids=[self.vision.grids[lv] for lv in levels],
            )
            self.itm_head = nn.Linear(f.width, 2)
            # Weight of S in the match logit (S is within [-1, 1]; 5 makes a 0.4 gap in S worth 2 nats at init).
            self.itm_similarity_weight = nn.Parameter(torch.tensor(5.0)) if f.itm_similarity else None
            # Weight of the relation reader's evidence in the match logit (fusion.RelationReader).
            self.itm_relation_weight = nn.Parameter(torch.tensor(1.0)) if f.relation_reader else None
        read = [lv for s in sources for lv in s.image_levels]
        self.image_levels = sorted({*read, self.vision.depth - 1, *(self.fusion.image_levels if self.fusion else [])})
        self.text_levels = sorted({lv for s in sources for lv in s.text_levels})
        # Training-time dense supervision (loss.patch_weight): one linear head per attribute over the last level's
        # patch tokens. Kept in the checkpoint (a release can be fine-tuned further); unused at inference.
        self.patch_heads: nn.ModuleList | None = None
        if config.loss.patch_weight > 0:
            width = self.vision.widths[-1]
            self.patch_heads = nn.ModuleList([nn.Linear(width, n) for n in config.loss.patch_classes])
        # Training-time relation verdicts (loss.relation_weight): holds / does not, from a relation word's fused state.
        self.relation_head: nn.Linear | None = None
        if config.loss.relation_weight > 0 and self.fusion is not None:
            self.relation_head = nn.Linear(config.fusion.width, 1)

    def _fusion_levels(self) -> list[int]:
        f, depth = self.config.fusion, self.vision.depth
        levels = f.image_levels or _spread(f.layers, depth)
        if len(levels) != f.layers:
            raise ConfigError(f"fusion.image_levels has {len(levels)} entries but fusion.layers = {f.layers}")
        bad = [lv for lv in levels if not -depth <= lv < depth]
        if bad:
            raise ConfigError(f"fusion.image_levels {bad} out of range for an image encoder of {depth} levels")
        return [lv % depth for lv in levels]

    # ----------------------------------------------------------------------------------------- properties
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            raise CheckpointError("this model has no tokenizer; load it with MKLVisITA.from_pretrained(folder)")
        return self._tokenizer

    @property
    def sources(self) -> nn.ModuleDict:
        """The feature sources, by name, in kernel order."""
        return self.kernels.sources

    @property
    def kernel_names(self) -> list[str]:
        return list(self.kernels.names)

    @property
    def has_itm(self) -> bool:
        return self.fusion is not None

    @property
    def fusion_levels(self) -> list[int]:
        """The image-encoder level each fusion layer reads, one per fusion layer ([] without fusion)."""
        return list(self.fusion.image_levels) if self.fusion is not None else []

    def kernel_weights(self) -> torch.Tensor:
        """The learned global kernel weights beta (M,)."""
        return self.kernels.weights()

    def fusion_kernel_weights(self) -> torch.Tensor | None:
        """Each fusion layer's weights over the local kernels (L, n), or None without fusion / affinity bias."""
        if self.fusion is None or not self.fusion.use_bias:
            return None
        return self.fusion.level_weights()

    @property
    def local_kernel_names(self) -> list[str]:
        """The kernels whose word x patch maps bias the fusion's attention (the local kernels)."""
        return self.kernels.affinity_names

    # ------------------------------------------------------------------------------------------- encoders
    def encode_image(self, pixel_values: torch.Tensor, output_attentions: bool = False) -> ImageFeatures:
        """Level tokens, pooled feature and every source's image features; ``output_attentions`` adds the ViT (or
        hybrid) blocks' attention probabilities, (B, heads, N, N) per block (a ValueError for a CNN backbone)."""
        return self.start_encode_image(pixel_values, output_attentions, overlap=False).result()

    def start_encode_image(
        self, pixel_values: torch.Tensor, output_attentions: bool = False, overlap: bool = True
    ) -> Prefetch:
        """:meth:`encode_image` in two steps, so that the caller can encode captions in between: the image backbone
        runs now, and the sources' image features (which read its output) are started on the overlap worker, where
        they run beside the caller's next work (:func:`mklvisita.sources.overlap.start_torch`: on a CPU without
        gradients, when the overlap is on; else now, as with ``overlap`` False). ``.collect()`` gives the features
        (computed here if the worker has not started them by then)."""
        started, img = self._backbone(pixel_values, output_attentions)
        if overlap and pixel_values.device.type == "cpu":
            return start_torch(self._source_features, pixel_values, img, started)
        return done(self._source_features(pixel_values, img, started))

    def start_match_image(self, pixel_values: torch.Tensor) -> StartedMatch:
        """:meth:`start_encode_image` for scoring pairs without attention maps, in the order that lets the fusion run
        beside the detectors (:class:`StartedMatch`): the image backbone; then here, the leading sources that start no
        work beside the backbone (the fusion's affinity source among them: the concept bridge) and, with a fusion
        branch, its caption-independent image side (:meth:`prepare_fusion_image`); the other sources' features
        (whose detectors started beside the backbone) are started on the overlap worker, to collect after the pair
        passes (computed here if the worker has not started them by then). The same numbers as
        :meth:`encode_image`, the same functions in the same order of sources."""
        started, img = self._backbone(pixel_values, False)
        try:
            for name, source in self.sources.items():
                if started[name] is not None:
                    break
                img.sources[name] = source.encode_image(pixel_values, img)
            early = ImageFeatures(img.levels, img.pooled, img.attentions, img.backbone_map, img.backbone_pooled)
            early.sources = dict(img.sources)  # its own dict: the rest are added to img's, maybe on the worker
            fusion = done(self.prepare_fusion_image(img)) if self.fusion is not None else None
        except BaseException:
            _drop(started)
            raise
        if pixel_values.device.type == "cpu":
            rest = start_torch(self._source_features, pixel_values, img, started)
        else:
            rest = done(self._source_features(pixel_values, img, started))
        return StartedMatch(early, rest, fusion)

    def prepare_fusion_image(self, img: ImageFeatures, output_attentions: bool = False) -> PreparedImage:
        """The fusion's caption-independent image side of these images (:meth:`HierarchicalFusion.prepare_image`),
        for :meth:`match` (``fusion_image``) on every pair that reads them; ``output_attentions`` as match will be
        called. The same numbers as match computing it itself."""
        if self.fusion is None:
            raise RuntimeError("this model has no fusion/ITM branch (fusion.enabled = false); use similarity()")
        return self.fusion.prepare_image(img.levels, output_attentions)

    def _backbone(
        self, pixel_values: torch.Tensor, output_attentions: bool
    ) -> tuple[dict[str, Prefetch | None], ImageFeatures]:
        """The sources' work from the pixels alone started (beside the backbone, :mod:`mklvisita.sources.overlap`),
        then the image backbone here: (each source's started work or None, the features without sources)."""
        started = {name: source.prefetch_image(pixel_values) for name, source in self.sources.items()}
        try:
            out = self.vision(pixel_values, self.image_levels, output_attentions=output_attentions)
        except BaseException:
            _drop(started)
            raise
        return started, ImageFeatures(out.levels, out.pooled, out.attentions, out.backbone_map, out.backbone_pooled)

    def _source_features(
        self, pixel_values: torch.Tensor, img: ImageFeatures, started: dict[str, Prefetch | None]
    ) -> ImageFeatures:
        """Every source's image features not in ``img.sources`` yet, in order (a source may read the ones before it),
        each handed what it started beside the backbone (``started``)."""
        try:
            # Here with the worker still busy (with work started before this job, such as a score's captions or
            # detectors): this thread takes the last job the worker has not started, the one it would reach last,
            # and leaves the rest to it, rather than waiting for each in turn. A no-op where they are done (the
            # worker runs them in order before this one).
            next((job for job in reversed(started.values()) if job is not None and job.claim()), None)
            for name, source in self.sources.items():
                if name in img.sources:
                    continue
                more = {} if started[name] is None else {"prefetched": started[name]}
                img.sources[name] = source.encode_image(pixel_values, img, **more)
        finally:
            _drop(started)
        return img

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextFeatures:
        """Layer tokens, [CLS], masks and every source's caption features."""
        levels, pooled = self.text(input_ids, attention_mask, self.text_levels)
        attention_mask = attention_mask.long()
        word = attention_mask.bool().clone()
        word[:, 0] = False  # [CLS]
        last = attention_mask.sum(-1) - 1  # position of [SEP]
        word[torch.arange(word.shape[0], device=word.device), last] = False
        txt = TextFeatures(levels, pooled, attention_mask, word)
        for name, source in self.sources.items():
            txt.sources[name] = source.encode_text(input_ids, txt)
        return txt

    def embed_image(self, img: ImageFeatures, names: list[str] | None = None) -> KernelEmbeddings:
        """Every base kernel's image-side features, projected; cache these for retrieval. ``names``: only these
        sources' (those ``img`` has so far, for :meth:`fuse_pairs`)."""
        return self.kernels.embed_image(img.sources, img.pooled, names)

    def embed_text(self, txt: TextFeatures) -> KernelEmbeddings:
        """Every base kernel's text-side features, projected; token features cover every position, words marked."""
        return self.kernels.embed_text(txt.sources, txt.word_mask, txt.pooled)

    # ---------------------------------------------------------------------------- weights from the packages
    def train(self, mode: bool = True) -> MKLVisITA:
        """Frozen backbones stay in eval mode (a CNN's batch-norm statistics must not drift while heads train)."""
        super().train(mode)
        for encoder, frozen in ((self.vision, self.config.vision.frozen), (self.text, self.config.text.frozen)):
            if frozen:
                encoder.eval()
        return self

    def external_weight_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes that come from installed packages (frozen backbones) and are not saved."""
        return pretrained.external_weight_prefixes(self)

    def zero_start_keys(self) -> set[str]:
        """State-dict keys of modules that leave the model's function unchanged when new: ``fusion.word_positions``'
        offset projections (they start at zero) and the training-time relation head. Fine-tuning a checkpoint
        trained without them (``init_from``) starts them fresh; every other weight must come from the checkpoint."""
        keys = {k for k in self.state_dict() if k.startswith("fusion.layers.") and ".rel_pos." in k}
        return keys | {k for k in self.state_dict() if k.startswith("relation_head.")}  # training-time only

    def fill_external_weights(self) -> None:
        """Load the frozen backbones (and what sources copy from them) from their packages, sha256 checked."""
        pretrained.fill_external_weights(self)

    def _build_sources(self, tokenizer) -> None:
        """A new model: sources fill what they take from pretrained parts (saved with it, never rebuilt on load)."""
        if self.config.vision.pretrained and self.config.vision.weights:
            pretrained.fill_source_vision_weights(self)
        if tokenizer is not None:
            for source in self.sources.values():
                source.build(self._sentence_encoder(tokenizer))

    def _sentence_encoder(self, tokenizer):
        """texts -> mean-pooled last-layer embeddings (B, D) of this model's text encoder (class prompts)."""

        @torch.no_grad()
        def encode(texts: list[str]) -> torch.Tensor:
            enc = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
            last = self.text.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            return (last * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (B, D)

        return encode

    # -------------------------------------------------------------------------------------------- scoring
    def similarity(self, img: KernelEmbeddings, txt: KernelEmbeddings, pairwise: bool = False) -> SimilarityOutput:
        """Multi-kernel similarity for all pairs (Bi, Bt), or image k with text k when ``pairwise``."""
        return self.kernels(img, txt, pairwise)

    def match(
        self,
        img: ImageFeatures,
        txt: TextFeatures,
        img_emb: KernelEmbeddings | None = None,
        txt_emb: KernelEmbeddings | None = None,
        image_index: torch.Tensor | None = None,
        output_attentions: bool = True,
        fusion_image: PreparedImage | None = None,
        similarity: torch.Tensor | None = None,
    ) -> MatchOutput:
        """ITM for image k with text k through the fusion layers; attentions come back for explanations.

        ``image_index`` (B,): pair k is image ``image_index[k]`` of ``img`` / ``img_emb`` (the fusion's
        caption-independent work runs once per image); None = image k. ``output_attentions=False`` returns no
        attention maps (cheaper: fused attention, [CLS]-only last layer). ``fusion_image``: the fusion's image side of
        ``img`` computed beforehand (:meth:`prepare_fusion_image`; the same numbers), so ``img.levels`` is not read.
        ``similarity`` (B,): each pair's S when the caller has it already (a score's all-pairs similarity; pairwise
        here it agrees to float rounding), so the kernels do not run again.
        """
        if self.fusion is None:
            raise RuntimeError("this model has no fusion/ITM branch (fusion.enabled = false); use similarity()")
        need_s = self.itm_similarity_weight is not None and similarity is None
        if self.fusion.use_bias or need_s:
            img_emb, txt_emb = self._pair_embeddings(img, txt, img_emb, txt_emb, image_index)
        fused = self._fuse(img, txt, img_emb, txt_emb, image_index, output_attentions, fusion_image)
        if need_s:
            similarity = self.similarity(img_emb, txt_emb, pairwise=True).similarity
        return self.finish_match(fused, similarity)

    def fuse_pairs(
        self,
        img: ImageFeatures,
        txt: TextFeatures,
        img_emb: KernelEmbeddings | None = None,
        txt_emb: KernelEmbeddings | None = None,
        image_index: torch.Tensor | None = None,
        output_attentions: bool = True,
        fusion_image: PreparedImage | None = None,
    ) -> FusedPairs:
        """:meth:`match` up to S: the fusion layers, the ITM head and the relation reader; :meth:`finish_match` adds
        S (the two give match's numbers exactly). With the affinity bias ``img_emb`` needs only the affinity source's
        embeddings (:meth:`MultiKernelSimilarity.embed_image` with ``names``), so the pairs can pass before the
        other sources' features are known."""
        if self.fusion is None:
            raise RuntimeError("this model has no fusion/ITM branch (fusion.enabled = false); use similarity()")
        if self.fusion.use_bias:
            img_emb, txt_emb = self._pair_embeddings(img, txt, img_emb, txt_emb, image_index)
        return self._fuse(img, txt, img_emb, txt_emb, image_index, output_attentions, fusion_image)

    def _pair_embeddings(
        self,
        img: ImageFeatures,
        txt: TextFeatures,
        img_emb: KernelEmbeddings | None,
        txt_emb: KernelEmbeddings | None,
        image_index: torch.Tensor | None,
    ) -> tuple[KernelEmbeddings, KernelEmbeddings]:
        """Both sides' embeddings (computed where not given), the image side per pair by ``image_index``."""
        img_emb = self.embed_image(img) if img_emb is None else img_emb
        txt_emb = self.embed_text(txt) if txt_emb is None else txt_emb
        return (img_emb if image_index is None else _per_pair(img_emb, image_index)), txt_emb

    def _fuse(
        self,
        img: ImageFeatures,
        txt: TextFeatures,
        img_emb: KernelEmbeddings | None,
        txt_emb: KernelEmbeddings | None,
        image_index: torch.Tensor | None,
        output_attentions: bool,
        fusion_image: PreparedImage | None,
    ) -> FusedPairs:
        """:meth:`fuse_pairs` on per-pair image embeddings."""
        affinity = None
        if self.fusion.use_bias:
            maps: list[torch.Tensor] = []  # the affinity kernels' word x patch maps (B, n, T, P), once for all layers
            served = self.config.fusion.affinity_bias_scale  # the bias's serving calibration (FusionConfig)

            def affinity(weights: torch.Tensor) -> torch.Tensor:
                if not maps:
                    maps.append(self.kernels.affinity_maps(img_emb, txt_emb))
                    if served != 1.0:
                        maps[0] = maps[0] * served
                return torch.einsum("bntp,n->btp", maps[0], weights)  # (B, T, P): this layer's mix of the kernels

        text_tokens = txt.levels[self.text.depth - 1]
        levels = img.levels if fusion_image is None else None
        out = self.fusion(
            levels, text_tokens, txt.attention_mask, affinity, image_index, output_attentions, prepared=fusion_image
        )
        logits = self.itm_head(out.cls)  # (B, 2)
        if self.config.fusion.itm_head_scale != 1.0:  # the head's calibration on a new domain (FusionConfig)
            logits = logits * self.config.fusion.itm_head_scale
        return FusedPairs(logits, out)

    def finish_match(self, fused: FusedPairs, similarity: torch.Tensor | None = None) -> MatchOutput:
        """The match logit of :meth:`fuse_pairs`' pairs: + S (``similarity`` (B,), needed with
        ``fusion.itm_similarity``) and the relation reader's evidence."""
        logits, out = fused.head, fused.fusion
        if self.itm_similarity_weight is not None:
            if similarity is None:
                raise ValueError("this checkpoint's match logit adds S (fusion.itm_similarity): pass each pair's S")
            s = similarity
            logits = logits + torch.stack([torch.zeros_like(s), self.itm_similarity_weight * s], -1)
        if self.itm_relation_weight is not None and out.relation is not None:
            r = self.itm_relation_weight * out.relation.evidence  # (B,)
            logits = logits + torch.stack([torch.zeros_like(r), r], -1)
        return MatchOutput(logits, logits.softmax(-1)[:, 1], out.attentions, out.last_input, out.relation)

    # ------------------------------------------------------------------------------------------- training
    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                **batch: Any) -> MKLVisITAOutput:  # fmt: skip
        """A training step's losses (:func:`mklvisita.losses.training_losses`, which documents ``batch``: image_ids,
        hard negatives, positives, dense targets, ``return_loss``). Called as ``model(...)`` so DDP sees it."""
        return training_losses(self, pixel_values, input_ids, attention_mask, **batch)

    # ---------------------------------------------------------------------------------------- checkpoints
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        files: dict[str, str | bytes] | None = None,
        push_to_hub: bool = False,
        repo_id: str | None = None,
        **push_to_hub_kwargs: Any,
    ) -> str | None:
        """Save crash-safely (:func:`mklvisita.checkpoint.save`): config.json + model.safetensors + tokenizer files,
        plus ``files`` by name (a card ``README.md``, ``metrics.json``); nothing of an older checkpoint is kept."""
        checkpoint.save(save_directory, self._save_pretrained, files)
        if push_to_hub:
            return self.push_to_hub(repo_id=repo_id or Path(save_directory).name, **push_to_hub_kwargs)
        return None

    def _save_pretrained(self, save_directory: Path) -> None:
        """config.json + model.safetensors + tokenizer files into a fresh folder (the Hub mixin's hook)."""
        checkpoint.write_model(self, Path(save_directory))

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        map_location: str | torch.device = "cpu",
        source_options: dict[str, dict[str, Any]] | None = None,
        **hub: Any,
    ) -> MKLVisITA:
        """Load a checkpoint folder or Hub id strictly (:func:`mklvisita.checkpoint.load_model`); ``hub``: ``revision``
        (a branch, tag or commit), ``cache_dir``, ``force_download``, ``token``, ``local_files_only``.
        ``source_options``: serve it with other settings of its feature sources, merged into ``kernels.options``
        (source name -> {setting: value}, e.g. ``{"colour": {"stride": 1}}``); no weight changes, and a source or
        setting the checkpoint does not have is refused.

        Refused with a CheckpointError naming the problem: a missing file, a pickle weights file, an unknown or
        ill-typed config field, and any missing, unexpected or mis-shaped weight.
        """
        return checkpoint.load_model(cls, pretrained_model_name_or_path, map_location, source_options, **hub)


def _drop(started: dict[str, Prefetch | None]) -> None:
    """After a failure (or once used): drop the started work that has not begun (no effect on the rest)."""
    for job in started.values():
        if job is not None:
            job.cancel()


def _per_pair(emb: KernelEmbeddings, index: torch.Tensor) -> KernelEmbeddings:
    """Per-image embeddings -> per-pair rows by ``index``; one image read by every pair is broadcast (views), not
    copied."""
    if len(emb) == 1:
        return emb.map(lambda t: t.expand(len(index), *t.shape[1:]))
    return emb.select(index)


def _spread(n: int, depth: int) -> list[int]:
    """n fusion layers over an image encoder of `depth` levels, evenly spaced, the last one on the last level."""
    return [round((i + 1) * depth / n) - 1 for i in range(n)]


def _build_tokenizer(config: MKLVisITAConfig):
    if config.text.pretrained and config.text.weights:
        return load_tokenizer(str(text_weights_folder(config.text.weights)))  # the folder ships its tokenizer
    if config.text.model_name is None:
        return builtin_tokenizer(config.text.extra_vocabulary, config.text.max_length)
    return load_tokenizer(config.text.model_name)
