"""Kernel functions and late interaction: the pieces a feature source compares its features with.

Kernel functions act on the cosine c of two L2-normalised vectors:
    cosine   c
    share    c as it comes: the identity, for sources whose two sides are distributions (a dot product, not a cosine)
    poly     ((c + o) / (1 + o)) ** d,  o = 1 + softplus(theta) >= 1 keeps c + o > 0   (range (0, 1])
    rbf      exp(-gamma * ||u - v||^2) = exp(-gamma * (2 - 2c)),  gamma = exp(theta) > 0
    sigmoid  tanh(a * c + b),  a = exp(theta) > 0

Every function is non-decreasing in c, so for late interaction max_p f(c_p) = f(max_p c_p): the max over patches is
taken on cosines and the function applied once per word (:func:`local_max_cosine`), which keeps it cheap.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import KERNEL_FUNCTIONS, KernelConfig


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


class CosineKernel(KernelFunction):
    name = "cosine"

    def forward(self, cos: torch.Tensor) -> torch.Tensor:
        return cos


class ShareKernel(CosineKernel):
    """The value as it comes (the identity): a dot product of two distributions, not a cosine."""

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
    """One of :data:`~mklvisita.config.KERNEL_FUNCTIONS`, initialised from the shared kernel settings."""
    if name == "cosine":
        return CosineKernel()
    if name == "poly":
        return PolynomialKernel(cfg.poly_degree, cfg.learn_poly_degree)
    if name == "rbf":
        return RBFKernel(cfg.rbf_gamma)
    if name == "sigmoid":
        return SigmoidKernel()
    raise ValueError(f"unknown kernel function {name!r}; choose from {', '.join(KERNEL_FUNCTIONS)}")


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


def mean_over_words(values: torch.Tensor, word_mask: torch.Tensor, pairwise: bool) -> torch.Tensor:
    """values (Bi, Bt, T) or (B, T) pairwise, word_mask (Bt, T) -> the mean over each caption's words."""
    w = word_mask.float()
    w = w / w.sum(-1, keepdim=True).clamp_min(1.0)
    if not pairwise:
        w = w.unsqueeze(0)  # (1, Bt, T)
    return (values * w).sum(-1)
