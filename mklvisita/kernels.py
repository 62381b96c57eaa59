"""The multi-kernel learning module.

A *base kernel* m is a pair (feature, kernel function) offered by a feature source (:mod:`mklvisita.sources`),
with the source's own projections where it learns them. The fused similarity is

    S(x, y) = sum_m beta_m * K_m(x, y),   beta = softmax(w)            (or softmax(w + g(x, y)) with the gate)

This module knows no source: it asks each one for its embeddings, scores the *pooled* features (one vector per
item and kernel, compared by a dot product, the kernel function applied to it) itself and lets the source score the
rest (late interaction, word matches), mixes every kernel with beta, and collects the word x cell maps of the
sources that give them. The kernel functions are in :mod:`mklvisita.kernel_functions`.

Why separate projections: on one shared embedding each kernel function is a monotone function of the same cosine,
so a global convex mix would rank exactly like plain cosine and change no Recall@K. Own projections (and the
different sources, and the optional pair-conditioned gate) are what let MKL change the ranking.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import KernelConfig
from .features import SourceTensors, cat_padded, cat_sources, map_sources
from .kernel_functions import (  # noqa: F401  (re-exported: the kernel functions moved to mklvisita.kernel_functions)
    CosineKernel,
    KernelFunction,
    PolynomialKernel,
    RBFKernel,
    ShareKernel,
    SigmoidKernel,
    local_max_cosine,
    make_kernel_function,
)
from .sources import FeatureSource


@dataclass
class KernelEmbeddings:
    """Every base kernel's features of one modality, projected and normalised; cacheable for retrieval.

    ``pooled[feature]`` is (B, n_kernels, d) for the pooled features (the retrieval cascade's first stage reads
    them); ``sources[name]`` holds whatever else source ``name`` compares (batch first: token embeddings with their
    masks, word vectors, per-cell values for its maps); ``gate`` is (B, d_gate) or None.
    """

    pooled: dict[str, torch.Tensor]
    sources: SourceTensors
    gate: torch.Tensor | None = None

    def __len__(self) -> int:
        for t in [*self.pooled.values(), *(v for part in self.sources.values() for v in part.values())]:
            return t.shape[0]
        return 0

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> KernelEmbeddings:
        """``fn`` applied to every tensor."""
        return KernelEmbeddings(
            {k: fn(v) for k, v in self.pooled.items()},
            map_sources(self.sources, fn),
            None if self.gate is None else fn(self.gate),
        )

    def select(self, index: torch.Tensor | slice) -> KernelEmbeddings:
        return self.map(lambda t: t[index])

    def to(self, device: torch.device | str) -> KernelEmbeddings:
        return self.map(lambda t: t.to(device))

    @staticmethod
    def cat(parts: list[KernelEmbeddings]) -> KernelEmbeddings:
        """Concatenate batches; captions of different batches are padded to the longest."""
        gates = [p.gate for p in parts]
        return KernelEmbeddings(
            {k: torch.cat([p.pooled[k] for p in parts]) for k in parts[0].pooled},
            cat_sources([p.sources for p in parts]),
            None if gates[0] is None else cat_padded(gates),
        )


@dataclass
class SimilarityOutput:
    similarity: torch.Tensor  # (Bi, Bt) or (B,) pairwise
    contributions: torch.Tensor  # (Bi, Bt, M) or (B, M); sums over M to `similarity`
    weights: torch.Tensor  # (M,) global beta, or (Bi, Bt, M) / (B, M) with the gate


class MultiKernelSimilarity(nn.Module):
    """S(x, y) = sum_m beta_m K_m(x, y) over the base kernels of every feature source."""

    def __init__(self, cfg: KernelConfig, sources: list[FeatureSource], image_width: int, text_width: int):
        """``image_width`` / ``text_width``: the encoders' pooled features, which the gate reads."""
        super().__init__()
        self.cfg = cfg
        self.sources = nn.ModuleDict({s.name: s for s in sources})  # kernel order
        self.names = [n for s in sources for n in s.kernel_names()]
        self.logits = nn.Parameter(torch.zeros(len(self.names)))  # beta = softmax(logits)
        if cfg.gate:
            d = cfg.proj_dim
            self.gate_image = nn.Linear(image_width, d)
            self.gate_text = nn.Linear(text_width, d)
            # Diagonal bilinear gate: g_m(x, y) = sum_k W_mk u_k v_k, an all-pairs product with no (Bi, Bt, d) tensor.
            self.gate_weight = nn.Parameter(torch.zeros(len(self.names), d))

    @property
    def num_kernels(self) -> int:
        return len(self.names)

    def weights(self) -> torch.Tensor:
        """Global kernel weights beta (M,), on the simplex (the gate, when on, adds a pair-dependent term)."""
        return self.logits.softmax(-1)

    # ---------------------------------------------------------------------------------------- embeddings
    def _embed(self, parts: dict, pooled: torch.Tensor | None, gate: nn.Module | None) -> KernelEmbeddings:
        out = KernelEmbeddings({}, {})
        for name, e in parts.items():
            out.pooled |= e.pooled
            out.sources[name] = e.other
        if gate is not None:
            if pooled is None:
                raise ValueError("kernels.gate reads the encoders' pooled features: pass them")
            out.gate = F.normalize(gate(pooled), dim=-1)
        return out

    def embed_image(
        self, feats: SourceTensors, pooled: torch.Tensor | None = None, names: list[str] | None = None
    ) -> KernelEmbeddings:
        """Each source's raw image features (by source name) -> embeddings; ``pooled`` (B, Dv) feeds the gate.
        ``names``: only these sources (the fusion's affinity source before the others are known); None: all."""
        parts = {name: s.embed_image(feats[name]) for name, s in self.sources.items() if names is None or name in names}
        return self._embed(parts, pooled, getattr(self, "gate_image", None))

    def embed_text(
        self, feats: SourceTensors, word_mask: torch.Tensor, pooled: torch.Tensor | None = None
    ) -> KernelEmbeddings:
        """Each source's raw caption features -> embeddings; ``word_mask`` (B, T) marks the words."""
        parts = {name: s.embed_text(feats[name], word_mask) for name, s in self.sources.items()}
        return self._embed(parts, pooled, getattr(self, "gate_text", None))

    # -------------------------------------------------------------------------------------------- scoring
    def kernel_values(self, img: KernelEmbeddings, txt: KernelEmbeddings, pairwise: bool = False) -> torch.Tensor:
        """K_m for every base kernel: (Bi, Bt, M), or (B, M) when ``pairwise`` (image k with text k)."""
        values = []
        for name, s in self.sources.items():
            for f in s.enabled:
                if f not in s.pooled_features:
                    values.append(s.kernel_values(f, img.sources[name], txt.sources[name], pairwise))
                    continue
                if pairwise:
                    cos = (img.pooled[f] * txt.pooled[f]).sum(-1)  # (B, n)
                else:
                    cos = torch.einsum("ind,jnd->ijn", img.pooled[f], txt.pooled[f])  # (Bi, Bt, n)
                values.append(torch.stack([fn(cos[..., i]) for i, fn in enumerate(s.functions[f])], -1))
        return torch.cat(values, -1)

    def pair_weights(self, img: KernelEmbeddings, txt: KernelEmbeddings, pairwise: bool = False) -> torch.Tensor:
        """beta: (M,) without the gate; (Bi, Bt, M) or (B, M) with it."""
        if not self.cfg.gate:
            return self.weights()
        if pairwise:
            g = (img.gate * txt.gate) @ self.gate_weight.T  # (B, M)
        else:
            g = torch.einsum("id,md,jd->ijm", img.gate, self.gate_weight, txt.gate)  # (Bi, Bt, M)
        return (self.logits + g).softmax(-1)

    def forward(self, img: KernelEmbeddings, txt: KernelEmbeddings, pairwise: bool = False) -> SimilarityOutput:
        k = self.kernel_values(img, txt, pairwise)
        beta = self.pair_weights(img, txt, pairwise)
        contributions = k * beta
        return SimilarityOutput(contributions.sum(-1), contributions, beta)

    def entropy(self, beta: torch.Tensor | None = None) -> torch.Tensor:
        """Entropy of the kernel weights (mean over pairs with the gate); log(M) is the uniform mix."""
        beta = self.weights() if beta is None else beta
        return -(beta * beta.clamp_min(1e-12).log()).sum(-1).mean()

    # ----------------------------------------------------------------------------------------------- maps
    def _kernels_of(self, features: list[tuple[str, str]]) -> list[str]:
        return [f"{f}/{fn.name}" for name, f in features for fn in self.sources[name].functions[f]]

    def _map_features(self) -> list[tuple[str, str]]:
        return [(name, f) for name, s in self.sources.items() for f in s.enabled if f in s.map_features]

    @property
    def word_map_names(self) -> list[str]:
        """The kernels with a word x cell map, in ``word_patch_maps`` order."""
        return self._kernels_of(self._map_features())

    def word_patch_maps(self, img: KernelEmbeddings, txt: KernelEmbeddings) -> torch.Tensor:
        """Word x cell values of every kernel in ``word_map_names`` for paired inputs: (B, n_maps, T, P)."""
        features = self._map_features()
        if not features:
            raise ValueError("no kernel with word x patch maps: add a source that gives them to kernels.sources")
        return torch.cat([self.sources[n].word_maps(f, img.sources[n], txt.sources[n]) for n, f in features], 1)

    def _affinity(self) -> tuple[str, str] | None:
        for name, s in self.sources.items():
            if s.affinity_feature in s.enabled:
                return name, s.affinity_feature
        return None

    @property
    def affinity_source(self) -> str | None:
        """The source whose word x patch maps bias the fusion's attention (None when no source gives them)."""
        found = self._affinity()
        return found[0] if found else None

    @property
    def affinity_names(self) -> list[str]:
        """The kernels whose word x patch maps can bias the fusion's attention ([] when no source gives them)."""
        found = self._affinity()
        return self._kernels_of([found]) if found else []

    def affinity_maps(self, img: KernelEmbeddings, txt: KernelEmbeddings) -> torch.Tensor:
        """Those kernels' word x patch values for paired (image k, text k), zero off the words: (B, n, T, P)."""
        found = self._affinity()
        if found is None:
            raise ValueError("no source of kernels.sources gives the fusion an affinity bias")
        return self.sources[found[0]].affinity_maps(img.sources[found[0]], txt.sources[found[0]])
