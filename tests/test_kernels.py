import itertools
from types import SimpleNamespace

import pytest
import torch

from mklvisita.config import KernelConfig, VisionConfig
from mklvisita.kernel_functions import CosineKernel, PolynomialKernel, RBFKernel, SigmoidKernel, local_max_cosine
from mklvisita.kernels import MultiKernelSimilarity
from mklvisita.sources import SourceContext, build_sources

torch.manual_seed(0)


@pytest.mark.parametrize("kernel", [CosineKernel(), PolynomialKernel(2.0), RBFKernel(0.7), SigmoidKernel()])
def test_kernels_are_symmetric(kernel):
    x = torch.randn(12, 8)
    k = kernel.gram(x)
    assert torch.allclose(k, k.T, atol=1e-6)


@pytest.mark.parametrize("kernel", [CosineKernel(), PolynomialKernel(2.0), PolynomialKernel(3.0), RBFKernel(1.5)])
def test_positive_semidefinite_kernels(kernel):
    x = torch.randn(20, 6, dtype=torch.float64)
    k = kernel.gram(x.float()).double()
    assert torch.linalg.eigvalsh(k).min() > -1e-4


def test_sigmoid_kernel_is_not_psd_in_general():
    # tanh(a c + b) with b < 0 has a negative diagonal term: documented as symmetric only.
    k = SigmoidKernel()
    with torch.no_grad():
        k.bias.fill_(-3.0)
    gram = k.gram(torch.randn(10, 4))
    assert torch.linalg.eigvalsh(gram.double()).min() < 0


def test_learnable_parameters_stay_in_their_domain():
    rbf, poly = RBFKernel(), PolynomialKernel(2.0, learn_degree=True)
    with torch.no_grad():
        rbf.log_gamma.fill_(-20.0)
        poly.degree_raw.fill_(-20.0)
        poly.offset_raw.fill_(-20.0)
    assert rbf.gamma > 0
    assert poly.degree >= 1.0 and poly.offset >= 1.0
    c = torch.linspace(-1, 1, 50)
    for fn in (rbf, poly, SigmoidKernel(), CosineKernel()):
        v = fn(c)
        assert torch.all(v[1:] >= v[:-1] - 1e-6), f"{fn.name} must be non-decreasing in the cosine"


def _mkl(cfg=None, d=16):
    """The kernels of the token sources over encoders of width d (stand-ins: the sources read only their sizes)."""
    cfg = cfg or KernelConfig(proj_dim=8)
    vision = SimpleNamespace(depth=2, widths=[d, d], pooled_width=d, num_prefix_tokens=0, grids=[(3, 3)] * 2)
    text = SimpleNamespace(width=d, depth=2)
    ctx = SourceContext(cfg, vision, text, VisionConfig(), None, {})
    return MultiKernelSimilarity(cfg, build_sources(ctx), d, d)


def _feats(b, length, d=16):
    """Raw features by source name: what each token source's encode step gives."""
    return {"global": {"x": torch.randn(b, d)}, "mid": {"x": torch.randn(b, d)},
            "local": {"x": torch.randn(b, length, d)}}  # fmt: skip


def test_contributions_sum_to_similarity_and_pairwise_matches_all_pairs():
    mkl = _mkl(KernelConfig(proj_dim=8, gate=True))
    with torch.no_grad():
        mkl.gate_weight.normal_()
    fi, ft = _feats(5, 9), _feats(7, 6)
    ei = mkl.embed_image(fi, fi["global"]["x"])
    mask = torch.ones(7, 6, dtype=torch.bool)
    mask[:, 4:] = False
    et = mkl.embed_text(ft, mask, ft["global"]["x"])
    out = mkl(ei, et)
    assert out.similarity.shape == (5, 7) and out.contributions.shape == (5, 7, 12)
    assert torch.allclose(out.contributions.sum(-1), out.similarity, atol=1e-6)
    assert torch.allclose(out.weights.sum(-1), torch.ones(5, 7), atol=1e-6)  # gate: beta on the simplex per pair
    idx = torch.arange(5)
    pair = mkl(ei, et.select(idx), pairwise=True)
    assert torch.allclose(pair.similarity, out.similarity[idx, idx], atol=1e-5)


def test_local_kernel_is_mean_over_words_of_max_over_patches():
    mkl = _mkl(KernelConfig(sources=["local"], functions=["cosine"], proj_dim=8))
    ei = mkl.embed_image({"local": {"x": torch.randn(3, 5, 16)}})
    mask = torch.tensor([[True, True, False], [True, True, True]])
    et = mkl.embed_text({"local": {"x": torch.randn(2, 3, 16)}}, mask)
    s = mkl(ei, et).similarity
    li, lt = ei.sources["local"]["tokens"], et.sources["local"]["tokens"]  # (B, n, L, d)
    for i, j in itertools.product(range(3), range(2)):
        cos = li[i, 0] @ lt[j, 0].T  # (P, T)
        words = cos.max(0).values[mask[j]]
        assert torch.isclose(s[i, j], words.mean(), atol=1e-5)


def test_chunked_late_interaction_equals_direct():
    img, txt = torch.randn(7, 2, 5, 4), torch.randn(6, 2, 3, 4)
    mask = torch.ones(7, 5, dtype=torch.bool)
    mask[2, 3:] = False
    direct = torch.einsum("inpd,jntd->ijntp", img, txt)
    direct = direct.masked_fill(~mask[:, None, None, None, :], -1e9).amax(-1)
    assert torch.allclose(local_max_cosine(img, mask, txt, False, budget=50), direct, atol=1e-5)


def test_fused_ranking_differs_from_a_single_cosine_kernel():
    """docs/architecture.md: MKL must change the ranking, not only rescale a cosine."""
    torch.manual_seed(1)
    mkl = _mkl()
    with torch.no_grad():
        mkl.logits.normal_()
    ei, et = mkl.embed_image(_feats(30, 9)), mkl.embed_text(_feats(30, 6), torch.ones(30, 6, dtype=torch.bool))
    fused = mkl(ei, et).similarity
    single = torch.einsum("id,jd->ij", ei.pooled["global"][:, 0], et.pooled["global"][:, 0])  # global/cosine only
    fused_rank, single_rank = fused.argsort(-1), single.argsort(-1)
    assert (fused_rank != single_rank).any(-1).float().mean() > 0.5


def test_entropy_is_maximal_for_uniform_weights():
    mkl = _mkl()
    assert torch.isclose(mkl.entropy(), torch.log(torch.tensor(12.0)))
    with torch.no_grad():
        mkl.logits[0] = 30.0
    assert mkl.entropy() < 0.01
