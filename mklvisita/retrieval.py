"""Retrieval on cached features: a cascade whose cost grows linearly in the gallery (ALBEF / BLIP protocol).

Decisions:

- Stage 1 (``global``): the pooled kernels (global, mid, concept sources) are linearised into one vector per item,
  the concatenation of sqrt(beta_m) * u_m over pooled kernels m, so one inner product is sum_m beta_m cos_m, a
  first-order stand-in for their part of S (every kernel function is non-decreasing in the cosine). One matrix
  product over cached, normalised embeddings (or a FAISS inner-product index, ``faiss-cpu`` being a declared
  dependency, for galleries past ``FAISS_MIN``; the exact torch product is the fallback) keeps ``candidates`` per
  query, both directions.
- Stage 2 (``similarity``): the full multi-kernel S, local late interaction included, only on those pairs.
- Stage 3 (``rerank``): the ITM head re-scores each query's top ``k`` by S; pairs shared by both directions once.
- final = itm_weight * ITM + similarity_weight * S on the re-ranked pairs (:func:`mklvisita.ranking.final_score`
  on the checkpoint's ``config.ranking``, the one owner of the rule and its numbers). Pairs outside a stage keep the
  order of the stage that dropped them, below every pair that went further.
- ``candidates`` = 0 (or a model with no pooled kernel) is the exhaustive two-stage protocol: S on every pair.

The evaluation command, the trainer's evaluation and the Matcher's search all call :func:`retrieve`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .config import RankingConfig
from .inputs import ImageInput, Processor
from .kernels import KernelEmbeddings
from .model import ImageFeatures, MKLVisITA, TextFeatures
from .ranking import final_score, resolve_ranking, uses_itm

OUTSIDE_TOP_K = -100.0  # added to S outside the re-ranked top k (S and ITM are both within [-1, 2]), times the
# larger of 1 and the rule's weights summed, so a re-scored pair stays above every pair outside whatever the weights
OUTSIDE_CANDIDATES = -1000.0  # added to the stage-1 score outside the candidates (below every re-scored pair)
FAISS_MIN = 20_000  # galleries at least this large search a FAISS index (when faiss is installed)


@dataclass
class ImageBank:
    embeddings: KernelEmbeddings  # per-kernel projections, stage 1
    features: ImageFeatures | None  # fusion-level tokens, stage 2 (None for a similarity-only bank)

    def __len__(self) -> int:
        return len(self.embeddings)


@dataclass
class TextBank:
    embeddings: KernelEmbeddings
    features: TextFeatures | None

    def __len__(self) -> int:
        return len(self.embeddings)


@dataclass
class RetrievalScores:
    i2t: np.ndarray  # (n_img, n_txt) final scores ranking captions for each image
    t2i: np.ndarray  # (n_txt, n_img) final scores ranking images for each caption
    similarity: np.ndarray  # (n_img, n_txt) stage-1 multi-kernel similarity
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    itm_pairs: int = 0  # fusion passes made in the re-ranking stage
    pairs: dict[str, int] = field(default_factory=dict)  # pairs scored per stage (global, similarity, itm)


def _device(model: MKLVisITA) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def encode_images(
    model: MKLVisITA,
    processor: Processor,
    images: Sequence[ImageInput],
    batch_size: int = 64,
    keep_features: bool = True,
) -> ImageBank:
    """Encode images once: kernel embeddings for stage 1 and (optionally) fusion tokens for stage 2."""
    dev = _device(model)
    embs, feats = [], []
    keep = model.fusion.image_levels if (keep_features and model.has_itm) else None
    for i in range(0, len(images), batch_size):
        pv, _ = processor.images(list(images[i : i + batch_size]))
        img = model.encode_image(pv.to(dev))
        embs.append(model.embed_image(img))
        if keep is not None:
            feats.append(img.keep(keep))
    return ImageBank(KernelEmbeddings.cat(embs), ImageFeatures.cat(feats) if feats else None)


@torch.inference_mode()
def encode_captions(
    model: MKLVisITA, processor: Processor, captions: Sequence[str], batch_size: int = 256, keep_features: bool = True
) -> TextBank:
    """Encode captions once (truncated to text.max_length); fusion needs only the last layer's tokens."""
    dev = _device(model)
    embs, feats = [], []
    last = model.text.depth - 1
    for i in range(0, len(captions), batch_size):
        enc = processor.captions(list(captions[i : i + batch_size]))
        txt = model.encode_text(enc["input_ids"].to(dev), enc["attention_mask"].to(dev))
        embs.append(model.embed_text(txt))
        if keep_features and model.has_itm:
            feats.append(txt.keep([last]))
    return TextBank(KernelEmbeddings.cat(embs), TextFeatures.cat(feats) if feats else None)


@torch.inference_mode()
def similarity_matrix(model: MKLVisITA, images: ImageBank, texts: TextBank, chunk: int = 256) -> torch.Tensor:
    """Stage 1: S for every (image, caption) pair, (n_img, n_txt), chunked over images."""
    rows = [
        model.similarity(images.embeddings.select(slice(i, i + chunk)), texts.embeddings).similarity
        for i in range(0, len(images), chunk)
    ]
    return torch.cat(rows).float().cpu()


@torch.inference_mode()
def match_pairs(
    model: MKLVisITA,
    images: ImageBank,
    texts: TextBank,
    image_index: torch.Tensor,
    text_index: torch.Tensor,
    batch_size: int = 128,
) -> torch.Tensor:
    """ITM match probability of the pairs (image_index[k], text_index[k]): (K,)."""
    if images.features is None or texts.features is None:
        raise ValueError("these banks were encoded without fusion features; re-encode with keep_features=True")
    dev = _device(model)
    out = []
    for i in range(0, len(image_index), batch_size):
        ii = image_index[i : i + batch_size].to(dev)
        tt = text_index[i : i + batch_size].to(dev)
        uniq, inv = torch.unique(ii, return_inverse=True)  # the fusion's image-only work once per image
        img = images.features.select(uniq)
        txt = texts.features.select(tt)
        emb_i, emb_t = images.embeddings.select(uniq), texts.embeddings.select(tt)
        m = model.match(img, txt, emb_i, emb_t, image_index=inv, output_attentions=False)
        out.append(m.prob.float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def two_stage_scores(
    model: MKLVisITA, images: ImageBank, texts: TextBank, ranking: RankingConfig, batch_size: int = 128
) -> RetrievalScores:
    """Exhaustive: rank with S on every pair, re-score each query's top ``ranking.k`` with ITM (k = 0 or no fusion:
    S only); ``ranking.candidates`` is not read."""
    t0 = time.perf_counter()
    sim = similarity_matrix(model, images, texts)  # (n_img, n_txt)
    timings = {"similarity": time.perf_counter() - t0}
    pairs = {"similarity": sim.numel()}
    k = ranking.k
    if not uses_itm(ranking, model.has_itm):
        s = sim.numpy()
        return RetrievalScores(s.copy(), s.T.copy(), s, timings, 0, pairs)

    t1 = time.perf_counter()
    n_img, n_txt = sim.shape
    ki, kt = min(k, n_txt), min(k, n_img)
    top_t = sim.topk(ki, dim=1).indices  # (n_img, ki): captions to re-score per image
    top_i = sim.topk(kt, dim=0).indices  # (kt, n_txt): images to re-score per caption
    pair_i = torch.cat([torch.arange(n_img).repeat_interleave(ki), top_i.flatten()])
    pair_t = torch.cat([top_t.flatten(), torch.arange(n_txt).repeat(kt)])
    pair_id, inverse = torch.unique(pair_i * n_txt + pair_t, return_inverse=True)  # both directions share pairs
    prob = match_pairs(model, images, texts, pair_id // n_txt, pair_id % n_txt, batch_size)
    final = final_score(ranking, prob, sim.flatten()[pair_id])

    outside = _outside_top_k(ranking)
    i2t = sim + outside
    t2i = sim.T.clone() + outside
    n1 = n_img * ki
    first, second = inverse[:n1], inverse[n1:]
    i2t[pair_i[:n1], pair_t[:n1]] = final[first]
    t2i[pair_t[n1:], pair_i[n1:]] = final[second]
    timings["rerank"] = time.perf_counter() - t1
    pairs["itm"] = int(len(pair_id))
    return RetrievalScores(i2t.numpy(), t2i.numpy(), sim.numpy(), timings, int(len(pair_id)), pairs)


def _outside_top_k(ranking: RankingConfig) -> float:
    return OUTSIDE_TOP_K * max(1.0, ranking.itm_weight + ranking.similarity_weight)


# ---------------------------------------------------------------------------------------------------- cascade
def global_vectors(model: MKLVisITA, emb: KernelEmbeddings) -> torch.Tensor | None:
    """(B, D): sqrt(beta_m) * u_m over the pooled kernels, concatenated; u . v = sum_m beta_m cos_m. None when the
    model has no pooled kernel (its S is all late interaction: the cascade has no cheap first stage)."""
    beta = model.kernels.weights().detach()  # (M,)
    names = model.kernel_names
    parts = []
    for source, u in emb.pooled.items():  # u (B, n_s, d), unit rows (colour: distributions; its kernel is u . v)
        idx = [i for i, name in enumerate(names) if name.startswith(source + "/")]
        w = beta[idx].to(u.dtype).sqrt()  # (n_s,)
        parts.append((u * w[None, :, None]).flatten(1))  # (B, n_s * d)
    return torch.cat(parts, -1).float() if parts else None


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def top_candidates(
    queries: torch.Tensor, gallery: torch.Tensor, n: int, use_faiss: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n`` best gallery rows per query by inner product: (scores, indices), each (Q, n).

    ``use_faiss`` None = FAISS for galleries of at least FAISS_MIN rows when it is installed; the exact torch product
    otherwise (a flat FAISS index is exact too, so both give the same candidates up to ties)."""
    n = min(n, len(gallery))
    faiss = _faiss() if use_faiss in (None, True) else None
    if use_faiss and faiss is None:
        raise ValueError("use_faiss=True needs faiss, a declared dependency: pip install faiss-cpu")
    if faiss is not None and (use_faiss or len(gallery) >= FAISS_MIN):
        index = faiss.IndexFlatIP(gallery.shape[1])
        index.add(np.ascontiguousarray(gallery.cpu().numpy(), dtype=np.float32))
        d, i = index.search(np.ascontiguousarray(queries.cpu().numpy(), dtype=np.float32), n)
        return torch.from_numpy(d), torch.from_numpy(i).long()
    out = [(queries[j : j + 1024] @ gallery.T).topk(n, dim=1) for j in range(0, len(queries), 1024)]
    return torch.cat([o.values for o in out]).cpu(), torch.cat([o.indices for o in out]).cpu()


@torch.inference_mode()
def pair_similarity(
    model: MKLVisITA, images: ImageBank, texts: TextBank, ii: torch.Tensor, tt: torch.Tensor
) -> torch.Tensor:
    """Full multi-kernel S of the pairs (ii[k], tt[k]), ``ii`` sorted: (K,).

    Grouped by image: each image against its own captions through the all-pairs path (one matrix product per image
    for the late interaction), so no image's patch tokens are copied once per pair."""
    dev = _device(model)
    out = torch.empty(len(ii))
    starts = torch.searchsorted(ii, torch.arange(len(images) + 1))  # pairs of image i: starts[i] .. starts[i + 1]
    for i in torch.unique_consecutive(ii).tolist():
        a, b = int(starts[i]), int(starts[i + 1])
        s = model.similarity(images.embeddings.select(slice(i, i + 1)), texts.embeddings.select(tt[a:b].to(dev)))
        out[a:b] = s.similarity[0].float().cpu()
    return out


def cascade_scores(
    model: MKLVisITA,
    images: ImageBank,
    texts: TextBank,
    ranking: RankingConfig,
    batch_size: int = 128,
    use_faiss: bool | None = None,
) -> RetrievalScores:
    """Global kernels keep ``ranking.candidates`` per query, S re-scores them, ITM re-ranks the top ``ranking.k``.

    The returned ``similarity`` holds S on the candidate pairs and the stage-1 score plus OUTSIDE_CANDIDATES
    elsewhere; ``i2t`` / ``t2i`` rank every pair (see the module doc for the order of pairs dropped by a stage)."""
    dev = _device(model)
    t0 = time.perf_counter()
    with torch.inference_mode():
        gi, gt = global_vectors(model, images.embeddings), global_vectors(model, texts.embeddings)
    if gi is None or ranking.candidates <= 0:
        return two_stage_scores(model, images, texts, ranking, batch_size)
    n_img, n_txt = len(images), len(texts)
    ci, ct = min(ranking.candidates, n_txt), min(ranking.candidates, n_img)
    with torch.inference_mode():
        dense = use_faiss is not True and n_img * n_txt <= 50_000_000  # the full stage-1 matrix fits: rank all pairs
        if dense:
            g = torch.cat([gi[j : j + 1024].to(dev) @ gt.to(dev).T for j in range(0, n_img, 1024)]).cpu()
            top_t = g.topk(ci, dim=1).indices  # (n_img, ci)
            top_i = g.topk(ct, dim=0).indices.T  # (n_txt, ct)
            base = g + OUTSIDE_CANDIDATES
        else:
            _, top_t = top_candidates(gi, gt, ci, use_faiss)
            _, top_i = top_candidates(gt, gi, ct, use_faiss)
            base = torch.full((n_img, n_txt), 2 * OUTSIDE_CANDIDATES)
    t1 = time.perf_counter()
    timings = {"global": t1 - t0}
    pairs = {"global": n_img * n_txt if dense else (n_img + n_txt) * max(ci, ct)}

    # Stage 2: S on the union of both directions' candidates.
    pair_i = torch.cat([torch.arange(n_img).repeat_interleave(ci), top_i.flatten()])
    pair_t = torch.cat([top_t.flatten(), torch.arange(n_txt).repeat_interleave(ct)])
    pair_id = torch.unique(pair_i * n_txt + pair_t)
    ii, tt = pair_id // n_txt, pair_id % n_txt
    s = pair_similarity(model, images, texts, ii, tt)
    sim = base.clone()
    sim[ii, tt] = s
    t2 = time.perf_counter()
    timings["similarity"] = t2 - t1
    pairs["similarity"] = int(len(pair_id))
    sim_np = sim.numpy()
    if not uses_itm(ranking, model.has_itm):
        return RetrievalScores(sim_np.copy(), sim_np.T.copy(), sim_np, timings, 0, pairs)

    # Stage 3: ITM on each query's top k by S among its candidates (S is -1000 + g outside them).
    ki, kt = min(ranking.k, ci), min(ranking.k, ct)
    cand_s_i = sim.gather(1, top_t)  # (n_img, ci)
    rk_t = top_t.gather(1, cand_s_i.topk(ki, dim=1).indices)  # (n_img, ki)
    cand_s_t = sim.T.gather(1, top_i)  # (n_txt, ct)
    rk_i = top_i.gather(1, cand_s_t.topk(kt, dim=1).indices)  # (n_txt, kt)
    r_i = torch.cat([torch.arange(n_img).repeat_interleave(ki), rk_i.flatten()])
    r_t = torch.cat([rk_t.flatten(), torch.arange(n_txt).repeat_interleave(kt)])
    rid, inverse = torch.unique(r_i * n_txt + r_t, return_inverse=True)
    prob = match_pairs(model, images, texts, rid // n_txt, rid % n_txt, batch_size)
    final = final_score(ranking, prob, sim.flatten()[rid])
    outside = _outside_top_k(ranking)
    i2t = sim + outside
    t2i = sim.T.clone() + outside
    n1 = n_img * ki
    i2t[r_i[:n1], r_t[:n1]] = final[inverse[:n1]]
    t2i[r_t[n1:], r_i[n1:]] = final[inverse[n1:]]
    timings["rerank"] = time.perf_counter() - t2
    pairs["itm"] = int(len(rid))
    return RetrievalScores(i2t.numpy(), t2i.numpy(), sim_np, timings, int(len(rid)), pairs)


def retrieve(
    model: MKLVisITA,
    images: ImageBank,
    texts: TextBank,
    ranking: RankingConfig | None = None,
    batch_size: int = 128,
    use_faiss: bool | None = None,
) -> RetrievalScores:
    """Score every image against every caption by the model's ranking rule (``model.config.ranking`` by default)."""
    return cascade_scores(model, images, texts, resolve_ranking(ranking or model), batch_size, use_faiss)


@torch.no_grad()
def pair_scores(
    model: MKLVisITA,
    images: ImageBank,
    texts: TextBank,
    image_index: np.ndarray,
    text_index: np.ndarray,
    batch_size: int = 128,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Similarity and ITM probability of the pairs (image_index[j], text_index[j]) from cached banks.

    Args:
        images, texts: banks from :func:`encode_images` / :func:`encode_captions`.

    Returns:
        similarity (n,) and ITM probability (n,) (None for a model without the fusion branch).
    """
    ii = torch.as_tensor(np.asarray(image_index), dtype=torch.long)
    tt = torch.as_tensor(np.asarray(text_index), dtype=torch.long)
    device = next(model.parameters()).device
    sims = []
    for start in range(0, len(ii), batch_size):
        i, t = ii[start : start + batch_size].to(device), tt[start : start + batch_size].to(device)
        s = model.similarity(images.embeddings.select(i), texts.embeddings.select(t), pairwise=True)
        sims.append(s.similarity.float().cpu())
    sim = torch.cat(sims).numpy() if sims else np.zeros(0)
    if not model.has_itm:
        return sim, None
    return sim, match_pairs(model, images, texts, ii, tt, batch_size).numpy()


@dataclass
class NegativeScores:
    """Each caption and its hard negative, both scored with the caption's image (:func:`negative_scores`)."""

    pos: np.ndarray  # final score of the caption (mklvisita.ranking.final_score; the similarity without fusion)
    neg: np.ndarray  # the same for its hard negative
    pos_sim: np.ndarray
    neg_sim: np.ndarray
    pos_itm: np.ndarray | None  # None without fusion
    neg_itm: np.ndarray | None


@torch.no_grad()
def negative_scores(
    model: MKLVisITA,
    images: ImageBank,
    texts: TextBank,
    negatives: TextBank,
    txt2img: np.ndarray,
    ranking: RankingConfig | None = None,
) -> NegativeScores:
    """Scores of every caption of ``texts`` and of its hard negative in ``negatives`` (banks of equal length) with
    the caption's image, and the final score that ranks them (binding accuracy, the shape probe, the kernel analysis).

    Args:
        ranking: the rule of the final score; None = the model's ``config.ranking``.
    """
    ranking = resolve_ranking(ranking or model)
    image_of = np.asarray(txt2img)
    idx = np.arange(len(image_of))
    pos_sim, pos_itm = pair_scores(model, images, texts, image_of, idx)
    neg_sim, neg_itm = pair_scores(model, images, negatives, image_of, idx)
    pos, neg = final_score(ranking, pos_itm, pos_sim), final_score(ranking, neg_itm, neg_sim)
    return NegativeScores(pos, neg, pos_sim, neg_sim, pos_itm, neg_itm)
