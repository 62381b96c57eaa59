"""The retrieval cascade: global kernels -> multi-kernel S -> ITM, against the exhaustive two-stage protocol."""

import dataclasses

import numpy as np
import pytest
import torch
from conftest import micro_config
from PIL import Image

from mklvisita import Matcher, MKLVisITA
from mklvisita.inputs import Processor
from mklvisita.retrieval import (
    cascade_scores,
    encode_captions,
    encode_images,
    global_vectors,
    retrieve,
    top_candidates,
    two_stage_scores,
)

CAPTIONS = ["a red circle", "a blue square", "two shapes", "a green star left of a cross", "a small yellow triangle"]


@pytest.fixture(scope="module")
def banks():
    torch.manual_seed(0)
    model = MKLVisITA(micro_config()).eval()
    proc = Processor(model.config, model.tokenizer)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (24, 30, 3), dtype=np.uint8)) for _ in range(7)]
    return model, encode_images(model, proc, images), encode_captions(model, proc, CAPTIONS * 2)


def test_global_vectors_are_the_beta_weighted_pooled_cosines(banks):
    model, ib, tb = banks
    g = global_vectors(model, ib.embeddings) @ global_vectors(model, tb.embeddings).T  # (7, 10)
    beta = model.kernels.weights()
    expect = torch.zeros_like(g)
    for s, u in ib.embeddings.pooled.items():
        idx = [i for i, n in enumerate(model.kernel_names) if n.startswith(s + "/")]
        cos = torch.einsum("ind,jnd->ijn", u, tb.embeddings.pooled[s])  # (7, 10, n_s)
        expect += (cos * beta[idx]).sum(-1)
    torch.testing.assert_close(g, expect, atol=1e-5, rtol=1e-5)


def test_torch_fallback_and_faiss_pick_the_same_candidates():
    torch.manual_seed(0)
    q, gallery = torch.randn(6, 16), torch.randn(40, 16)
    s_torch, i_torch = top_candidates(q, gallery, 5, use_faiss=False)
    brute = (q @ gallery.T).argsort(1, descending=True)[:, :5]
    assert torch.equal(i_torch, brute)
    pytest.importorskip("faiss")
    s_faiss, i_faiss = top_candidates(q, gallery, 5, use_faiss=True)
    assert torch.equal(i_faiss, i_torch)
    torch.testing.assert_close(s_faiss, s_torch, atol=1e-4, rtol=1e-4)


def test_cascade_with_every_candidate_is_the_exhaustive_protocol(banks):
    model, ib, tb = banks
    ranking = dataclasses.replace(model.config.ranking, k=3, candidates=100, itm_weight=0.7, similarity_weight=1.3)
    c = cascade_scores(model, ib, tb, ranking)
    e = two_stage_scores(model, ib, tb, ranking)
    np.testing.assert_allclose(c.i2t, e.i2t, atol=1e-5)
    np.testing.assert_allclose(c.t2i, e.t2i, atol=1e-5)
    assert c.itm_pairs == e.itm_pairs and set(c.timings) == {"global", "similarity", "rerank"}


@pytest.mark.parametrize("use_faiss", [False, True])
def test_cascade_scores_only_the_candidates(banks, use_faiss):
    if use_faiss:
        pytest.importorskip("faiss")
    model, ib, tb = banks
    ranking = dataclasses.replace(model.config.ranking, k=2, candidates=3)
    c = cascade_scores(model, ib, tb, ranking, use_faiss=use_faiss)
    n_img, n_txt = len(ib), len(tb)
    assert c.pairs["similarity"] <= n_img * 3 + n_txt * 3 and c.pairs["itm"] <= n_img * 2 + n_txt * 2
    assert c.i2t.shape == (n_img, n_txt) and c.t2i.shape == (n_txt, n_img)
    assert (np.sort(c.i2t, 1)[:, -2:] > -50).all()  # each image's k re-ranked captions lead its ranking


def test_retrieve_reads_the_model_ranking_and_matcher_search_uses_it(banks):
    model, ib, tb = banks
    m = Matcher(model)
    old = model.config.ranking
    try:
        model.config.ranking = dataclasses.replace(old, k=0, candidates=4)
        s = retrieve(model, ib, tb)
        assert "rerank" not in s.timings and s.pairs["similarity"] <= 4 * (len(ib) + len(tb))
        gallery = m.index_captions(CAPTIONS)
        r = m.search_captions(gallery, Image.new("RGB", (20, 20), (200, 0, 0)), top_k=3)
        assert len(r.indices) == 3 and np.isnan(r.itm).all() and r.pairs["similarity"] <= 4 * 6
        model.config.ranking = dataclasses.replace(old, k=2, candidates=3)
        r = m.search_captions(gallery, Image.new("RGB", (20, 20), (200, 0, 0)), top_k=3)
        assert len(r.indices) == 3 and np.isfinite(r.itm).all()  # k and candidates grow to top_k
    finally:
        model.config.ranking = old
