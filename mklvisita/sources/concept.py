"""Concept features: a pretrained ImageNet classifier's classes as a bridge into the sentence encoder's space.

Decisions:
    - Image -> class probabilities p = softmax(classifier(pooled CNN feature) / T) -> sum_c p_c e_c, where e_c is
      the unit sentence embedding of class c's prompts. Caption -> its mean-pooled sentence embedding (how
      all-MiniLM-L6-v2 was trained to embed sentences). The "concept" kernel compares the two (the bridge).
    - "concept_class" compares distributions over the 1000 classes: sqrt(p) against sqrt(q), with
      q = softmax(cos(caption, e_c) / tau); the cosine of two square-rooted distributions is their Bhattacharyya
      coefficient. It rewards agreeing on *which* class rather than on a blurred average embedding.
    - "concept_local": the classifier applied to every position of the CNN's final feature map (a linear head, so
      per-position logits are well defined, as in class activation maps) against each word's class distribution
      q_w = softmax(cos(token_w, e_c) / tau) from the encoder's last-layer token. Both are centred over the classes,
      so their cosine is the correlation between "which classes this position shows" and "which classes this word
      names"; late interaction (mean over words of the max over positions) as for the local kernels, and the
      word x position values are the per-word maps. (Chosen on the tune half and on the four example photos over
      the plain per-position bridge, whose maps were flat: softmax-then-average blurs a position's evidence.)
    - Class prompts: for each ImageNet class, the ensemble (mean of unit embeddings, renormalised) of three
      prompts built from timm's ImageNet synset lemmas and WordNet definitions: "<lemmas>", "<lemmas>: <definition>"
      and "a photo of a <first lemma>, <definition>". Chosen, with T = 0.5 and tau = 0.02, on the tune half of the
      Tux Paint photo stamps (mklvisita.tasks.tuxpaint), never on its test half.
    - WordNet expansion (``kernels.options.concept.synsets`` > 0): a caption naming something outside the 1,000 classes
      ("A sitting gnu", "A yak") lands on the wrong class when compared with the class prompts alone (MiniLM puts "yak"
      near "yawl"). The bridge also holds the lemma embeddings of ImageNet-21k's WordNet synsets and, for each, the
      ImageNet-1k classes under its nearest WordNet ancestor that has any (gnu -> antelope -> hartebeest, impala,
      gazelle; yak -> ox). The caption's class distribution becomes (1 - w) q + w r @ M, where r = softmax(cos(caption,
      synset lemmas) / tau_s) and M spreads each synset uniformly over its classes. Only the sentence-level q
      (``concept_class``) is expanded; the per-word maps keep the class prompts. The buffers are built by
      ``training.photo`` (timm's synset lemmas, the WordNet noun hierarchy) and saved with the checkpoint (fp16).
    - Fusion affinity (``affinity_feature`` = "concept_local"): the word x position maps, which need no training
      and hold on photos, bias the fusion's text->image attention (the paper's affinity bias from local kernels),
      zero on rows that are not words. They live on the final map's grid; ``affinity_grid`` > 0 resamples them
      (bilinear) to the fusion's finer grid (``vision.level_grid``). Only a model with fusion reads them.
    - The classifier is a frozen copy of the backbone package's ImageNet head (buffers: not trained, not saved in
      a release folder whose vision backbone comes from a package); the prompt embeddings are a buffer saved with
      the checkpoint (computing them again needs ~3,000 encoder passes).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import KERNEL_FUNCTIONS, ConfigError
from ..features import ImageFeatures, TextFeatures
from ..kernel_functions import local_max_cosine, make_kernel_function, mean_over_words
from .base import FeatureSource, SourceContext, SourceEmbeddings, register_source
from .overlap import start_torch

NUM_CLASSES = 1000


@dataclass
class ConceptOptions:
    """Settings of the concept source (``kernels.options.concept``)."""

    functions: list[str] = field(default_factory=lambda: ["cosine"])  # kernel functions of each concept feature
    prompts: str = "ensemble"  # class prompts: "ensemble" (lemmas, definition, photo) or "photo" (only "a photo of
    # a <first lemma>", the plain bridge)
    temperature: float = 0.5  # T of the image's class probabilities softmax(logits / T)
    text_temperature: float = 0.02  # tau of a caption's class distribution softmax(cos(caption, class) / tau)
    synsets: int = 0  # WordNet synsets expanding a caption's class distribution; 0 = off
    synset_links: int = 0  # (synset, ImageNet class) links of that expansion (fixes the buffers' shapes)
    synset_temperature: float = 0.02  # temperature of the caption's distribution over those synsets
    synset_weight: float = 0.5  # share of the synset expansion in the caption's class distribution
    affinity_grid: int = 0  # side of the grid the concept_local maps are resampled to when they bias the fusion's
    # attention (its image stream's grid: vision.level_grid); 0 = the final feature map's own grid

    def validate(self) -> None:
        bad = [f for f in self.functions if f not in KERNEL_FUNCTIONS]
        if bad or not self.functions:
            raise ConfigError(
                f"kernels.options.concept.functions: unknown or no function {bad}; choose from {list(KERNEL_FUNCTIONS)}"
            )
        if self.prompts not in ("ensemble", "photo"):
            raise ConfigError(f"kernels.options.concept.prompts must be 'ensemble' or 'photo', not {self.prompts!r}")
        if self.affinity_grid < 0:
            raise ConfigError(
                f"kernels.options.concept.affinity_grid must be 0 or a grid side, not {self.affinity_grid}"
            )
        if (self.synsets > 0) != (self.synset_links > 0):
            raise ConfigError("kernels.options.concept.synsets and .synset_links are both 0 or both > 0")


def class_prompts(kind: str = "ensemble") -> list[list[str]]:
    """For each ImageNet-1k class (timm's index order), the prompts whose embeddings are averaged.

    ``kind`` "ensemble": the three prompts of the module docstring; "photo": "a photo of a <first lemma>" alone.
    """
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    prompts = []
    for i in range(NUM_CLASSES):
        lemmas = [w.strip() for w in info.index_to_description(i).split(",") if w.strip()]
        definition = info.index_to_description(i, detailed=True).split(": ", 1)[-1]
        names = ", ".join(lemmas)
        if kind == "photo":
            prompts.append([f"a photo of a {lemmas[0]}"])
        else:
            prompts.append([names, f"{names}: {definition}", f"a photo of a {lemmas[0]}, {definition}"])
    return prompts


@register_source
class ConceptBridge(FeatureSource):
    """The concept source: maps CNN features to class probabilities and both modalities' features to the concept
    features "concept", "concept_class" and "concept_local" (module docstring)."""

    name = "concept"
    features = ("concept", "concept_class", "concept_local")
    config_class = ConceptOptions
    pooled_features = ("concept", "concept_class")
    map_features = ("concept_local",)
    affinity_feature = "concept_local"

    def __init__(self, ctx: SourceContext, enabled: list[str], options: ConceptOptions):
        super().__init__(ctx, enabled, options)
        image_width = int(getattr(ctx.vision.model, "num_features", 0))
        text_width, num_classes = ctx.text.width, NUM_CLASSES
        self.prompts = options.prompts
        self.temperature = options.temperature
        self.text_temperature = options.text_temperature
        self.sources = self.enabled
        self.last_text = ctx.text.depth - 1
        self.map_grid = tuple(ctx.vision.grids[-1])  # the final feature map's grid (concept_local's positions)
        self.affinity_grid = (options.affinity_grid,) * 2 if options.affinity_grid > 0 else self.map_grid
        for f in self.enabled:
            self.functions[f] = nn.ModuleList([make_kernel_function(fn, ctx.kernels) for fn in options.functions])
        # Buffers, not frozen parameters: DDP must not wait for a gradient that never comes.
        self.register_buffer("class_weight", torch.zeros(num_classes, image_width))  # (K, C) ImageNet head
        self.register_buffer("class_bias", torch.zeros(num_classes))  # (K,)
        self.register_buffer("class_text", torch.zeros(num_classes, text_width))  # (K, D) unit prompt embeddings
        self.synset_weight = options.synset_weight
        self.synset_temperature = options.synset_temperature
        self.expands = options.synsets > 0
        if self.expands:
            n, links = options.synsets, options.synset_links
            self.register_buffer("synset_text", torch.zeros(n, text_width, dtype=torch.float16))  # (N, D) unit lemmas
            self.register_buffer("synset_links", torch.zeros(2, links, dtype=torch.int32))  # (synset, class) pairs
            self.register_buffer("synset_link_weight", torch.zeros(links))  # (L,) each synset's weights sum to 1

    # ------------------------------------------------------------------------------------ source hooks
    def build(self, encode_sentences: Callable[[list[str]], torch.Tensor]) -> None:
        self.fill_class_text(encode_sentences)

    def vision_weights(self) -> tuple[str, ...]:
        return ("class_weight", "class_bias")

    def load_vision_weights(self, state: dict[str, torch.Tensor], classifier: str) -> None:
        self.load_classifier(state, classifier)

    def encode_image(self, pixel_values: torch.Tensor, img: ImageFeatures) -> dict[str, torch.Tensor]:
        if img.backbone_pooled is None:
            raise ConfigError("concept kernels need a CNN (or hybrid) image encoder with an ImageNet head")
        return self.image_features(img.backbone_pooled, img.backbone_map)

    def encode_text(self, input_ids: torch.Tensor, txt: TextFeatures) -> dict[str, torch.Tensor]:
        last = txt.levels[self.last_text]
        mask = txt.attention_mask.unsqueeze(-1).float()
        # Mean over every real token, [CLS] and [SEP] included: how sentence-transformers pools.
        sentence = (last * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (B, D)
        return self.text_features(sentence, last)

    def _embed(self, feats: dict[str, torch.Tensor], mask: torch.Tensor | None) -> SourceEmbeddings:
        pooled, other = {}, {}
        for f in self.enabled:
            if f == "concept_local":
                local = F.normalize(feats[f], dim=-1)  # (B, L, D): one embedding for all its kernels
                if mask is None:
                    mask = torch.ones(local.shape[:2], dtype=torch.bool, device=local.device)
                other = {"local": local, "mask": mask}
            else:
                x = F.normalize(feats[f], dim=-1)  # (B, D)
                pooled[f] = x.unsqueeze(1).expand(-1, len(self.functions[f]), -1)  # (B, n, D), a view
        return SourceEmbeddings(pooled, other)

    def embed_image(self, feats: dict[str, torch.Tensor]) -> SourceEmbeddings:
        return self._embed(feats, None)

    def embed_text(self, feats: dict[str, torch.Tensor], word_mask: torch.Tensor) -> SourceEmbeddings:
        return self._embed(feats, word_mask)

    def kernel_values(self, feature: str, img: dict, txt: dict, pairwise: bool) -> torch.Tensor:
        # One embedding per position, so the late interaction runs once (n = 1) for all concept_local kernels.
        cos = local_max_cosine(img["local"].unsqueeze(1), img["mask"], txt["local"].unsqueeze(1), pairwise)[..., 0, :]
        return torch.stack([mean_over_words(fn(cos), txt["mask"], pairwise) for fn in self.functions[feature]], -1)

    def word_maps(self, feature: str, img: dict, txt: dict) -> torch.Tensor:
        """Word x position values of every concept_local kernel for paired (image k, text k): (B, n_c, T, P)."""
        cos = torch.einsum("bpd,btd->btp", img["local"], txt["local"])
        return torch.stack([fn(cos) for fn in self.functions[feature]], 1)

    def affinity_maps(self, img: dict, txt: dict) -> torch.Tensor:
        """concept_local's word x position maps (B, n, T, P') on ``affinity_grid``, zero on rows that are not words."""
        maps = self.word_maps("concept_local", img, txt) * txt["mask"][:, None, :, None]  # (B, n, T, P)
        if self.affinity_grid == self.map_grid:
            return maps
        b, n, t, _ = maps.shape
        grid = maps.reshape(b * n * t, 1, *self.map_grid)
        fine = F.interpolate(grid, size=self.affinity_grid, mode="bilinear", align_corners=False)
        return fine.reshape(b, n, t, -1)

    # ----------------------------------------------------------------------------------------- the bridge
    def load_classifier(self, state: dict[str, torch.Tensor], prefix: str = "classifier") -> None:
        """Copy the ImageNet head ``<prefix>.weight`` / ``<prefix>.bias`` of a timm state dict."""
        for name, buf in (("weight", self.class_weight), ("bias", self.class_bias)):
            key = f"{prefix}.{name}"
            if key not in state or tuple(state[key].shape) != tuple(buf.shape):
                got = tuple(state[key].shape) if key in state else "nothing"
                raise ValueError(
                    f"concept kernels need the backbone's {tuple(buf.shape)} ImageNet head {key}; the weights give "
                    f"{got}. Use an ImageNet-1k classifier backbone with vision.weights set"
                )
            buf.copy_(state[key])

    @torch.no_grad()
    def fill_class_text(self, encode: Callable[[list[str]], torch.Tensor], batch_size: int = 256) -> None:
        """class_text <- the renormalised mean of each class's unit prompt embeddings; ``encode`` (N,) -> (N, D)."""
        prompts = class_prompts(self.prompts)
        flat = [p for ps in prompts for p in ps]
        emb = torch.cat(
            [F.normalize(encode(flat[i : i + batch_size]).float(), dim=-1) for i in range(0, len(flat), batch_size)]
        )  # (K * 3, D)
        emb = emb.view(len(prompts), len(prompts[0]), -1).sum(1)  # (K, prompts, D) -> (K, D)
        self.class_text.copy_(F.normalize(emb, dim=-1))

    @torch.no_grad()
    def fill_synsets(self, text: torch.Tensor, synset: torch.Tensor, cls: torch.Tensor, weight: torch.Tensor) -> None:
        """The WordNet expansion: ``text`` (N, D) synset lemma embeddings; link l maps synset ``synset[l]`` to class
        ``cls[l]`` with ``weight[l]`` (each synset's weights sum to 1)."""
        if not self.expands or tuple(text.shape) != tuple(self.synset_text.shape) or len(cls) != len(weight):
            raise ValueError(f"the expansion needs {tuple(self.synset_text.shape)} lemma embeddings and matching links")
        if len(weight) != self.synset_link_weight.shape[0]:
            raise ValueError(f"the expansion has {self.synset_link_weight.shape[0]} links; got {len(weight)}")
        self.synset_text.copy_(F.normalize(text.float(), dim=-1).half())
        self.synset_links.copy_(torch.stack([synset, cls]).int())
        self.synset_link_weight.copy_(weight.float())

    def _synset_matrix(self) -> torch.Tensor:
        # The fp16 buffer halves the checkpoint; converting 20k x D rows on every call cost ~10 ms, so the float copy
        # is kept until the buffer changes (a load, fill_synsets or .to() gives a new version or storage).
        buf = self.synset_text
        # A model loaded under torch.inference_mode() holds inference tensors, which have no version counter (they
        # cannot be changed in place outside that mode, so their storage alone identifies them).
        key = (buf.data_ptr(), None if buf.is_inference() else buf._version, buf.device)
        if getattr(self, "_synset_cache", (None,))[0] != key:
            self._synset_cache = (key, buf.float())
        return self._synset_cache[1]

    def _link_matrix(self) -> torch.Tensor:
        """The links as a sparse (K, N) CSR matrix of weights, kept until the link buffers change (as
        :meth:`_synset_matrix`). One sparse product replaces gathering (B, L) masses and adding them into classes one
        link at a time (~25x faster for 97k links), summing each class's links in the same (synset) order."""
        bufs = (self.synset_links, self.synset_link_weight)
        key = tuple((b.data_ptr(), None if b.is_inference() else b._version, b.device) for b in bufs)
        if getattr(self, "_link_cache", (None,))[0] != key:
            rows, cols = self.synset_links.long()
            shape = (self.class_text.shape[0], self.synset_text.shape[0])
            # torch calls its sparse CSR support "beta"; this product is checked against the loop it replaces
            # (tests/test_source_speed.py)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                coo = torch.sparse_coo_tensor(torch.stack([cols, rows]), self.synset_link_weight.float(), shape)
                self._link_cache = (key, coo.coalesce().to_sparse_csr())
        return self._link_cache[1]

    def _synset_cosines(self, sentence: torch.Tensor) -> torch.Tensor:
        """sentence (B, D) unit -> (B, N) its cosine with every synset's lemmas.

        (N, D) @ (D, B), not (B, D) @ (D, N): MKL copies (packs) a transposed right-hand matrix, here all 20k x D
        floats, on every call; this way it reads the rows once (~3x faster for a few captions; scores within 1e-7 of
        the other order: benchmarks/photo_score.py --compare-scores). Reading 30 MB is most of its time, so the second
        half of the rows goes to the overlap worker (idle by then in a Matcher call), or runs here when the worker has
        not started it by the time the first half is done; either way the same products, in the same halves.
        """
        return self._start_synset_cosines(sentence)()

    def _start_synset_cosines(self, sentence: torch.Tensor) -> Callable[[], torch.Tensor]:
        """:meth:`_synset_cosines` in two steps: the worker's half starts now; the returned function computes this
        thread's half and gives the (B, N) cosines, so the caller can do other work while the worker reads its rows."""
        matrix = self._synset_matrix()
        half = matrix.shape[0] // 2
        second = start_torch(torch.matmul, matrix[half:], sentence.T)

        def finish() -> torch.Tensor:
            first = matrix[:half] @ sentence.T
            rest = second.collect()
            return torch.cat([first, rest]).T

        return finish

    def synset_expansion(self, sentence: torch.Tensor) -> torch.Tensor:
        """sentence (B, D) unit -> (B, K) class distribution through the WordNet synsets."""
        return self._expansion(self._synset_cosines(sentence))

    def _expansion(self, cosines: torch.Tensor) -> torch.Tensor:
        """(B, N) synset cosines -> (B, K) class distribution (:meth:`synset_expansion`)."""
        r = (cosines / self.synset_temperature).softmax(-1)  # (B, N)
        return (self._link_matrix() @ r.T).T  # (K, N) @ (N, B): each class's links' weight x synset mass, summed

    def class_logits(self, features: torch.Tensor) -> torch.Tensor:
        """(..., C) CNN features -> (..., K) ImageNet logits."""
        return F.linear(features, self.class_weight, self.class_bias)

    def image_features(self, pooled: torch.Tensor, feature_map: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """pooled (B, C), feature_map (B, P, C) -> the image side of each concept source."""
        p = (self.class_logits(pooled) / self.temperature).softmax(-1)  # (B, K)
        out = {"concept": p @ self.class_text, "concept_class": p.sqrt()}  # (B, D), (B, K)
        if "concept_local" in self.sources:
            if feature_map is None:
                raise ValueError("kernels.sources 'concept_local' needs a CNN image encoder (its final feature map)")
            logits = self.class_logits(feature_map)  # (B, P, K)
            out["concept_local"] = logits - logits.mean(-1, keepdim=True)  # centred over classes
        return out

    def text_features(self, sentence: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """sentence (B, D) mean-pooled, tokens (B, T, D) -> the text side of each concept source."""
        unit = F.normalize(sentence, dim=-1)
        # the WordNet expansion's synset cosines start first: the worker reads half of the rows while this thread
        # computes the rest below (the same products either way: synset_expansion)
        cosines = self._start_synset_cosines(unit) if self.expands else None
        local = {}
        if "concept_local" in self.sources:
            qw = (F.normalize(tokens, dim=-1) @ self.class_text.T / self.text_temperature).softmax(-1)  # (B, T, K)
            local["concept_local"] = qw - 1.0 / qw.shape[-1]  # centred over classes
        q = (unit @ self.class_text.T / self.text_temperature).softmax(-1)  # (B, K)
        if cosines is not None:
            q = (1 - self.synset_weight) * q + self.synset_weight * self._expansion(cosines())
        return {"concept": sentence, "concept_class": q.sqrt(), **local}
