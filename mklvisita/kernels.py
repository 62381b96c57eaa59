"""The multi-kernel learning module.

A *base kernel* m is a pair (feature source, kernel function) with its own projection heads phi_m (image side)
and psi_m (text side). The fused similarity is

    S(x, y) = sum_m beta_m * K_m(x, y),   beta = softmax(w)            (or softmax(w + g(x, y)) with the gate)

Feature sources:
    global  image CLS  <-> text CLS of the last encoder level
    mid     mean-pooled tokens of an intermediate level of each encoder
    local   word <-> patch late interaction: mean over words of the max over patches (FILIP / ColBERT)

Concept sources (pretrained, no projection heads: both sides already live in the sentence encoder's space; see
:mod:`mklvisita.sources.concept`, which computes their features):
    concept        image: its classifier's class probabilities times the sentence embeddings of class prompts;
                   text: the caption's mean-pooled sentence embedding
    concept_class  sqrt of the image's class distribution <-> sqrt of the caption's (its cosine is the Bhattacharyya
                   coefficient of the two distributions)
    concept_local  per-position class logits <-> each word's class distribution (both centred: a correlation),
                   late interaction as local
Their kernel functions are ``KernelConfig.concept_functions``.

Fixed sources (no parameters):
    colour         the image's saliency-weighted colour names h <-> the caption's colour words q; one kernel,
                   "colour/share" = q . h (not a cosine: the share of the image in the caption's colours, 0 for a
                   caption that names none); its per-word maps are each colour word's share in every cell
                   (:mod:`mklvisita.sources.colour`)
    scene_text     words read in the image by OCR <-> the caption's words, as trigram vectors; one kernel,
                   "scene_text/match" = mean over the image's words of their best soft match in the caption (0 for
                   an image with no text); per-word maps spread a caption word's matches over the matched words'
                   text lines (:mod:`mklvisita.sources.scene_text`)
    person         a frontal face found in the image f <-> the caption's person mass pi; one kernel, "person/share"
                   = f * pi; per-word maps: each token's own person mass times the cells the faces cover
                   (:mod:`mklvisita.sources.person`)

Kernel functions act on the cosine c of the two L2-normalised projections:
    cosine   c
    poly     ((c + o) / (1 + o)) ** d,  o = 1 + softplus(theta) >= 1 keeps c + o > 0   (range (0, 1])
    rbf      exp(-gamma * ||u - v||^2) = exp(-gamma * (2 - 2c)),  gamma = exp(theta) > 0
    sigmoid  tanh(a * c + b),  a = exp(theta) > 0

Every function is non-decreasing in c, so for the local source max_p f(c_p) = f(max_p c_p): the max over patches
is taken on cosines and the function applied once per word, which keeps late interaction cheap.

Why separate projections: on one shared embedding each kernel above is a monotone function of the same cosine,
so a global convex mix would rank exactly like plain cosine and change no Recall@K. Own projections (and the
different sources, and the optional pair-conditioned gate) are what let MKL change the ranking.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import CONCEPT_SOURCES, FIXED_SOURCES, KernelConfig
from .sources.scene_text import soft_match


class KernelFunction(nn.Module):
    """A kernel as a function of the cosine between two unit vectors."""

    name = "kernel"

    def forward(self, cos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def gram(self, u: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
        """K(u_i, v_j) for rows of ``u`` and ``v`` (normalised here). (N, M)"""
        u = F.normalize(u, dim=-1)
        v = u if v is None else F.normalize(v, dim=-1)
        return self(u @ v.T)


class MatchKernel(KernelFunction):
    """The scene-text kernel's word match: max(0, (cos - theta) / (1 - theta)) of two trigram vectors."""

    name = "match"

    def __init__(self, theta: float):
        super().__init__()
        self.theta = float(theta)

    def forward(self, cos: torch.Tensor) -> torch.Tensor:
        return soft_match(cos, self.theta)


class CosineKernel(KernelFunction):
    name = "cosine"

    def forward(self, cos: torch.Tensor) -> torch.Tensor:
        return cos


class ShareKernel(CosineKernel):
    """The colour kernel's value as it comes (the identity): a dot product of two distributions, not a cosine."""

    name = "share"


class PolynomialKernel(KernelFunction):
    name = "poly"

    def __init__(self, degree: float = 2.0, learn_degree: bool = False):
        super().__init__()
        self.offset_raw = nn.Parameter(torch.zeros(()))  # offset o = 1 + softplus(raw)
        self.learn_degree = learn_degree
        # degree = 1 + softplus(raw) when learnable, so the kernel stays monotone in c
        raw = torch.tensor(math.log(math.expm1(max(degree - 1.0, 1e-3))))
        if learn_degree:
            self.degree_raw = nn.Parameter(raw)
        else:  # a buffer, not a frozen parameter: DDP must not wait for a gradient that never comes
            self.register_buffer("degree_raw", raw)

    @property
    def offset(self) -> torch.Tensor:
        return 1.0 + F.softplus(self.offset_raw)

    @property
    def degree(self) -> torch.Tensor:
        return 1.0 + F.softplus(self.degree_raw)

    def forward(self, cos: torch.Tensor) -> torch.Tensor:
        o = self.offset
        return ((cos + o) / (1.0 + o)).clamp_min(1e-12) ** self.degree


class RBFKernel(KernelFunction):
    name = "rbf"

    def __init__(self, gamma: float = 1.0):
        super().__init__()
        self.log_gamma = nn.Parameter(torch.tensor(math.log(gamma)))

    @property
    def gamma(self) -> torch.Tensor:
        return self.log_gamma.exp()

    def forward(self, cos: torch.Tensor) -> torch.Tensor:
        return torch.exp(-self.gamma * (2.0 - 2.0 * cos).clamp_min(0.0))


class SigmoidKernel(KernelFunction):
    name = "sigmoid"

    def __init__(self):
        super().__init__()
        self.log_slope = nn.Parameter(torch.tensor(math.log(2.0)))
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, cos: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.log_slope.exp() * cos + self.bias)


def make_kernel_function(name: str, cfg: KernelConfig) -> KernelFunction:
    if name == "cosine":
        return CosineKernel()
    if name == "poly":
        return PolynomialKernel(cfg.poly_degree, cfg.learn_poly_degree)
    if name == "rbf":
        return RBFKernel(cfg.rbf_gamma)
    if name == "sigmoid":
        return SigmoidKernel()
    raise ValueError(f"unknown kernel function {name!r}; choose from cosine, poly, rbf, sigmoid")


@dataclass
class KernelEmbeddings:
    """Projected, L2-normalised features of one modality for every base kernel; cacheable for retrieval.

    ``pooled[s]`` is (B, M_s, d) for the pooled sources (global, mid, concept, concept_class); ``local`` is
    (B, M_local, L, d) with ``local_mask`` (B, L) marking real words (text) or patches (image); ``gate`` is
    (B, d_gate) or None; ``concept_local`` is (B, L_c, d_c) (one unprojected embedding per position, shared by the
    concept_local kernels) with ``concept_mask`` (B, L_c); ``colour_local`` is (B, L, 11) colour names per cell
    (image) or colour-word one-hots per token (text), for the colour kernel's per-word maps; ``scene`` is (B, L, DIM)
    trigram vectors of the words read in the image (with ``scene_mask`` (B, L) and ``scene_cells`` (B, L, P), their
    text lines over the grid) or of the caption's words (on each word's first piece; zero rows elsewhere).
    """

    pooled: dict[str, torch.Tensor]
    local: torch.Tensor | None
    local_mask: torch.Tensor | None
    gate: torch.Tensor | None
    concept_local: torch.Tensor | None = None
    concept_mask: torch.Tensor | None = None
    colour_local: torch.Tensor | None = None
    scene: torch.Tensor | None = None
    scene_mask: torch.Tensor | None = None
    scene_cells: torch.Tensor | None = None
    person_local: torch.Tensor | None = None

    def __len__(self) -> int:
        for t in [*self.pooled.values(), self.local, self.concept_local]:
            if t is not None:
                return t.shape[0]
        return 0

    def select(self, index: torch.Tensor | slice) -> KernelEmbeddings:
        def pick(t):
            return None if t is None else t[index]

        return KernelEmbeddings(
            {k: v[index] for k, v in self.pooled.items()},
            pick(self.local),
            pick(self.local_mask),
            pick(self.gate),
            pick(self.concept_local),
            pick(self.concept_mask),
            pick(self.colour_local),
            pick(self.scene),
            pick(self.scene_mask),
            pick(self.scene_cells),
            pick(self.person_local),
        )

    def to(self, device: torch.device | str) -> KernelEmbeddings:
        def mv(t):
            return None if t is None else t.to(device)

        return KernelEmbeddings(
            {k: v.to(device) for k, v in self.pooled.items()},
            mv(self.local),
            mv(self.local_mask),
            mv(self.gate),
            mv(self.concept_local),
            mv(self.concept_mask),
            mv(self.colour_local),
            mv(self.scene),
            mv(self.scene_mask),
            mv(self.scene_cells),
            mv(self.person_local),
        )

    @staticmethod
    def cat(parts: list[KernelEmbeddings]) -> KernelEmbeddings:
        def cat(ts):
            return None if ts[0] is None else torch.cat(ts)

        if parts[0].local is not None:
            # Captions of different batches are padded to different lengths: pad to the longest.
            n = max(p.local.shape[2] for p in parts)
            parts = [_pad_local(p, n) for p in parts]
        if parts[0].concept_local is not None:
            n = max(p.concept_local.shape[1] for p in parts)
            parts = [_pad_concept(p, n) for p in parts]

        def padded(get):  # (B, L, ...) per part, L differing between batches of captions -> (sum B, max L, ...)
            if get(parts[0]) is None:
                return None
            n = max(get(p).shape[1] for p in parts)
            return torch.cat([F.pad(get(p), (0, 0) * (get(p).dim() - 2) + (0, n - get(p).shape[1])) for p in parts])

        return KernelEmbeddings(
            {k: torch.cat([p.pooled[k] for p in parts]) for k in parts[0].pooled},
            cat([p.local for p in parts]),
            cat([p.local_mask for p in parts]),
            cat([p.gate for p in parts]),
            cat([p.concept_local for p in parts]),
            cat([p.concept_mask for p in parts]),
            padded(lambda p: p.colour_local),
            padded(lambda p: p.scene),
            padded(lambda p: p.scene_mask),
            padded(lambda p: p.scene_cells),
            padded(lambda p: p.person_local),
        )


def _pad_local(e: KernelEmbeddings, n: int) -> KernelEmbeddings:
    extra = n - e.local.shape[2]
    if extra == 0:
        return e
    local = F.pad(e.local, (0, 0, 0, extra))
    mask = F.pad(e.local_mask, (0, extra))
    return dataclasses.replace(e, local=local, local_mask=mask)


def _pad_concept(e: KernelEmbeddings, n: int) -> KernelEmbeddings:
    extra = n - e.concept_local.shape[1]
    if extra == 0:
        return e
    local = F.pad(e.concept_local, (0, 0, 0, extra))  # (B, n, d)
    mask = F.pad(e.concept_mask, (0, extra))
    return dataclasses.replace(e, concept_local=local, concept_mask=mask)


@dataclass
class SimilarityOutput:
    similarity: torch.Tensor  # (Bi, Bt) or (B,) pairwise
    contributions: torch.Tensor  # (Bi, Bt, M) or (B, M); sums over M to `similarity`
    weights: torch.Tensor  # (M,) global beta, or (Bi, Bt, M) / (B, M) with the gate


class MultiKernelSimilarity(nn.Module):
    """S(x, y) = sum_m beta_m K_m(x, y) over base kernels (source, function), each with its own projections."""

    def __init__(self, cfg: KernelConfig, image_dims: dict[str, int], text_dims: dict[str, int]):
        super().__init__()
        self.cfg = cfg
        order = ("global", "mid", "local", *CONCEPT_SOURCES, *FIXED_SOURCES)
        self.sources = [s for s in order if s in cfg.sources]  # fixed order
        self.functions = list(cfg.functions)
        d = cfg.proj_dim
        self.image_proj = nn.ModuleDict()
        self.text_proj = nn.ModuleDict()
        self.kernel_fns = nn.ModuleDict()
        for s in self.sources:
            if s in ("colour", "person"):  # fixed features, one kernel: no projections, no function to choose
                self.kernel_fns[s] = nn.ModuleList([ShareKernel()])
                continue
            if s == "scene_text":
                self.kernel_fns[s] = nn.ModuleList([MatchKernel(cfg.scene_text_match)])
                continue
            if s in CONCEPT_SOURCES:  # pretrained features in one space already: no projection heads
                self.kernel_fns[s] = nn.ModuleList([make_kernel_function(f, cfg) for f in cfg.concept_functions])
                continue
            n = len(self.functions)
            # One Linear producing all n projections of a source at once: (D -> n * d), split afterwards.
            self.image_proj[s] = nn.Linear(image_dims[s], n * d)
            self.text_proj[s] = nn.Linear(text_dims[s], n * d)
            self.kernel_fns[s] = nn.ModuleList([make_kernel_function(f, cfg) for f in self.functions])
        self.names = [f"{s}/{fn.name}" for s in self.sources for fn in self.kernel_fns[s]]
        self.logits = nn.Parameter(torch.zeros(len(self.names)))  # beta = softmax(logits)
        if cfg.gate:
            if "global" not in image_dims or "global" not in self.sources:
                raise ValueError("kernels.gate reads the global features: add 'global' to kernels.sources")
            self.gate_image = nn.Linear(image_dims["global"], d)
            self.gate_text = nn.Linear(text_dims["global"], d)
            # Diagonal bilinear gate: g_m(x, y) = sum_k W_mk u_k v_k, an all-pairs product with no (Bi, Bt, d) tensor.
            self.gate_weight = nn.Parameter(torch.zeros(len(self.names), d))

    @property
    def num_kernels(self) -> int:
        return len(self.names)

    def weights(self) -> torch.Tensor:
        """Global kernel weights beta (M,), on the simplex (the gate, when on, adds a pair-dependent term)."""
        return self.logits.softmax(-1)

    def _embed(
        self, proj: nn.ModuleDict, feats: dict[str, torch.Tensor], mask: torch.Tensor | None, gate: nn.Module | None
    ) -> KernelEmbeddings:
        n, d = len(self.functions), self.cfg.proj_dim
        pooled, local, concept_local = {}, None, None
        for s in self.sources:
            if s == "scene_text":
                continue  # kept whole below: late interaction between words
            if s in ("colour", "person"):
                pooled[s] = feats[s].unsqueeze(1)  # (B, 1, 11) distributions or (B, 1, 1): compared as they are
                continue
            if s == "concept_local":
                concept_local = F.normalize(feats[s], dim=-1)  # (B, L, D): one embedding for all its kernels
                continue
            if s in CONCEPT_SOURCES:
                x = F.normalize(feats[s], dim=-1)  # (B, D)
                pooled[s] = x.unsqueeze(1).expand(-1, len(self.kernel_fns[s]), -1)  # (B, n_s, D), a view
                continue
            x = proj[s](feats[s])
            if s == "local":
                local = F.normalize(x.unflatten(-1, (n, d)).transpose(1, 2), dim=-1)  # (B, n, L, d)
            else:
                pooled[s] = F.normalize(x.unflatten(-1, (n, d)), dim=-1)  # (B, n, d)
        g = F.normalize(gate(feats["global"]), dim=-1) if gate is not None else None
        cmask = None
        if concept_local is not None:
            cmask = feats.get("concept_mask")
            if cmask is None:
                cmask = mask if mask is not None and mask.shape[1] == concept_local.shape[1] else None
            if cmask is None:
                cmask = torch.ones(concept_local.shape[:2], dtype=torch.bool, device=concept_local.device)
        colour_local = feats.get("colour_local") if "colour" in self.sources else None
        scene = scene_mask = scene_cells = None
        if "scene_text" in self.sources:
            scene = feats["scene_text"]
            scene_mask = feats.get("scene_text_mask")
            scene_mask = scene.abs().sum(-1) > 0 if scene_mask is None else scene_mask  # text: the words' rows
            scene_cells = feats.get("scene_text_cells")
        return KernelEmbeddings(
            pooled,
            local,
            mask if local is not None else None,
            g,
            concept_local,
            cmask,
            colour_local,
            scene,
            scene_mask,
            scene_cells,
            feats.get("person_local") if "person" in self.sources else None,
        )

    def embed_image(self, feats: dict[str, torch.Tensor], mask: torch.Tensor | None = None) -> KernelEmbeddings:
        """feats: global (B, D), mid (B, D), local (B, P, D) patch tokens (and concept sources); mask (B, P)."""
        if mask is None and "local" in feats:
            mask = torch.ones(feats["local"].shape[:2], dtype=torch.bool, device=feats["local"].device)
        return self._embed(self.image_proj, feats, mask, getattr(self, "gate_image", None))

    def embed_text(self, feats: dict[str, torch.Tensor], mask: torch.Tensor | None = None) -> KernelEmbeddings:
        """feats: global (B, D), mid (B, D), local (B, T, D) word tokens; mask (B, T) marks words."""
        return self._embed(self.text_proj, feats, mask, getattr(self, "gate_text", None))

    def kernel_values(self, img: KernelEmbeddings, txt: KernelEmbeddings, pairwise: bool = False) -> torch.Tensor:
        """K_m for every base kernel: (Bi, Bt, M), or (B, M) when ``pairwise`` (image k with text k)."""
        values = []
        for s in self.sources:
            if s == "concept_local":
                values.append(self._concept_local_values(img, txt, pairwise))
            elif s == "scene_text":
                values.append(self._scene_text_values(img, txt, pairwise))
            elif s == "local":
                cos = local_max_cosine(img.local, img.local_mask, txt.local, pairwise)  # (..., n, T)
                k = torch.stack([fn(cos[..., i, :]) for i, fn in enumerate(self.kernel_fns[s])], -2)
                w = txt.local_mask.float()  # (Bt, T)
                w = w / w.sum(-1, keepdim=True).clamp_min(1.0)
                if not pairwise:
                    w = w.unsqueeze(0)  # (1, Bt, T)
                values.append((k * w.unsqueeze(-2)).sum(-1))  # mean over words
            else:
                if pairwise:
                    cos = (img.pooled[s] * txt.pooled[s]).sum(-1)  # (B, n)
                else:
                    cos = torch.einsum("ind,jnd->ijn", img.pooled[s], txt.pooled[s])  # (Bi, Bt, n)
                values.append(torch.stack([fn(cos[..., i]) for i, fn in enumerate(self.kernel_fns[s])], -1))
        return torch.cat(values, -1)

    def _concept_local_values(self, img: KernelEmbeddings, txt: KernelEmbeddings, pairwise: bool) -> torch.Tensor:
        # One embedding per position, so the late interaction runs once (n = 1) for all concept_local kernels.
        cos = local_max_cosine(
            img.concept_local.unsqueeze(1), img.concept_mask, txt.concept_local.unsqueeze(1), pairwise
        )[..., 0, :]  # (Bi, Bt, T) or (B, T)
        w = txt.concept_mask.float()
        w = w / w.sum(-1, keepdim=True).clamp_min(1.0)  # (Bt, T): mean over words
        if not pairwise:
            w = w.unsqueeze(0)
        return torch.stack([(fn(cos) * w).sum(-1) for fn in self.kernel_fns["concept_local"]], -1)

    def _scene_text_values(self, img: KernelEmbeddings, txt: KernelEmbeddings, pairwise: bool) -> torch.Tensor:
        """Mean over the image's words of their best match among the caption's: (Bi, Bt, 1) or (B, 1). Most images
        say nothing, so only the images with a word are compared, chunked so a (ci, Bt, W, T) block stays near 2^24."""
        fn = self.kernel_fns["scene_text"][0]
        w = img.scene_mask.float()  # (Bi, W)
        count = w.sum(-1)  # (Bi,)
        if pairwise:
            best = fn(torch.einsum("bwd,btd->bwt", img.scene, txt.scene)).amax(-1)  # (B, W)
            return ((best * w).sum(-1) / count.clamp_min(1.0)).unsqueeze(-1)
        out = torch.zeros(img.scene.shape[0], txt.scene.shape[0], 1, dtype=txt.scene.dtype, device=txt.scene.device)
        rows = torch.nonzero(count > 0).flatten()
        chunk = max(1, 2**24 // max(1, txt.scene.shape[0] * txt.scene.shape[1] * img.scene.shape[1]))
        for i in range(0, len(rows), chunk):
            r = rows[i : i + chunk]
            best = fn(torch.einsum("iwd,jtd->ijwt", img.scene[r], txt.scene)).amax(-1)  # (ci, Bt, W)
            out[r, :, 0] = (best * w[r, None, :]).sum(-1) / count[r, None]
        return out

    def concept_local_maps(self, img: KernelEmbeddings, txt: KernelEmbeddings) -> torch.Tensor:
        """Word x position values of every concept_local kernel for paired (image k, text k): (B, n_c, T, P)."""
        cos = torch.einsum("bpd,btd->btp", img.concept_local, txt.concept_local)
        return torch.stack([fn(cos) for fn in self.kernel_fns["concept_local"]], 1)

    @property
    def word_map_names(self) -> list[str]:
        """The kernels with a word x patch map (local, concept_local, colour), in ``word_patch_maps`` order."""
        mapped = ("local/", "concept_local/", "colour/", "scene_text/", "person/")
        return [n for n in self.names if n.startswith(mapped)]

    def word_patch_maps(self, img: KernelEmbeddings, txt: KernelEmbeddings) -> torch.Tensor:
        """Word x patch values of every kernel in ``word_map_names`` for paired inputs: (B, n_maps, T, P)."""
        maps = []
        if "local" in self.sources:
            maps.append(self.local_kernel_maps(img, txt))
        if "concept_local" in self.sources:
            maps.append(self.concept_local_maps(img, txt))
        if "colour" in self.sources:  # each colour word's share in every cell; 0 for other words
            maps.append(torch.einsum("bpc,btc->btp", img.colour_local, txt.colour_local).unsqueeze(1))
        if "scene_text" in self.sources:  # a caption word's matches, over the matched words' text lines
            m = self.kernel_fns["scene_text"][0](torch.einsum("bwd,btd->bwt", img.scene, txt.scene))
            m = m * img.scene_mask.unsqueeze(-1)
            maps.append(torch.einsum("bwt,bwp->btp", m, img.scene_cells).unsqueeze(1))
        if "person" in self.sources:  # each token's own person mass over the cells the faces cover
            maps.append((txt.person_local.unsqueeze(-1) * img.person_local.unsqueeze(1)).unsqueeze(1))
        if not maps:
            raise ValueError(
                "no kernel with word x patch maps: add 'local', 'concept_local' or 'colour' to kernels.sources"
            )
        return torch.cat(maps, 1)

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

    def local_kernel_maps(self, img: KernelEmbeddings, txt: KernelEmbeddings) -> torch.Tensor:
        """Per local kernel word x patch values K_m(word, patch) for paired (image k, text k): (B, n, T, P)."""
        cos = torch.einsum("bnpd,bntd->bntp", img.local, txt.local)
        return torch.stack([fn(cos[:, i]) for i, fn in enumerate(self.kernel_fns["local"])], 1)


def local_max_cosine(
    img: torch.Tensor, img_mask: torch.Tensor, txt: torch.Tensor, pairwise: bool, budget: int = 2**24
) -> torch.Tensor:
    """Max over patches of the word-patch cosine.

    img (Bi, n, P, d), txt (Bt, n, T, d) -> (Bi, Bt, n, T), or (B, n, T) when pairwise. All-pairs work is chunked
    over images so the (n, ci*P, Bt*T) cosine block stays near ``budget`` elements (one image at least).
    """
    neg = torch.finfo(img.dtype).min
    if pairwise:
        cos = torch.einsum("bnpd,bntd->bntp", img, txt)
        return cos.masked_fill(~img_mask[:, None, None, :].bool(), neg).amax(-1)
    bi, n, p, d = img.shape
    bt, _, t, _ = txt.shape
    masked = not bool(img_mask.all())
    txt_n = txt.transpose(0, 1).reshape(n, bt * t, d)  # (n, Bt*T, d)
    ci = max(1, budget // (n * p * bt * t))
    out = []
    for i in range(0, bi, ci):
        im = img[i : i + ci]
        c = im.shape[0]
        cos = torch.bmm(im.transpose(0, 1).reshape(n, c * p, d), txt_n.transpose(1, 2))  # (n, c*P, Bt*T)
        cos = cos.view(n, c, p, bt, t)
        if masked:
            cos = cos.masked_fill(~img_mask[i : i + ci].bool()[None, :, :, None, None], neg)
        out.append(cos.amax(2).permute(1, 2, 0, 3))  # (c, Bt, n, T)
    return torch.cat(out)
