"""Stage 2 of UniME: hard-negative enhanced instruction tuning, the loss (UniME §3.3).

For n queries q and their n positive candidates c (L2-normalized), S = q cᵀ. Per query i:
1. drop false negatives, the candidates j != i with S[i, j] > S[i, i] + β (§3.3.1);
2. keep the k hardest of the remaining candidates (Eq. 3), chosen by index, without gradient;
3. InfoNCE over {positive + those k negatives} only, not the whole batch (Eq. 4).

Similarity matrices may be rectangular, (n_q, n_c) with n_c >= n_q: the positive of query i is
candidate i, and columns n_q.. are extra candidates (e.g. explicit hard negatives from the data)
that are negatives of every query.
"""
import math

import torch
import torch.nn.functional as F


def _positive_mask(sim):
    # (n_q, n_c) bool, True at [i, i]: the positive of query i is candidate i
    n_q, n_c = sim.shape
    return torch.eye(n_q, n_c, dtype=torch.bool, device=sim.device)


# §3.3.1 false-negative filter: threshold α_i = S[i, i] + β
def false_negative_mask(sim, beta):
    # sim (n_q, n_c) -> (n_q, n_c) bool; strict ">", the positive itself is never flagged.
    # beta None or inf: no filter, the ∞ column of Table 4 (said outright, not left to inf
    # arithmetic, so None works too and an inf similarity cannot slip through)
    if beta is None or beta == float("inf"):
        return torch.zeros_like(sim, dtype=torch.bool)
    threshold = sim.diagonal()[:, None] + beta  # (n_q, 1)
    return (sim > threshold) & ~_positive_mask(sim)


# Eq. 3: Rank_k over the candidates that are neither the positive nor false negatives
@torch.no_grad()
def hard_negative_topk(sim, k, beta, negatives="hard", generator=None):
    """Returns idx (n_q, k) long and valid (n_q, k) bool.

    negatives: "hard" = the k most similar valid candidates (the paper), "easy" = the k least
    similar, "random" = k distinct valid candidates drawn uniformly (the Fig. 5 analysis).
    A row with fewer than k valid candidates gets valid=False in its extra slots; the paper
    would duplicate hard negatives there, the official code re-scores masked ones.
    """
    candidate = ~(false_negative_mask(sim, beta) | _positive_mask(sim))  # (n_q, n_c)
    if negatives == "hard":
        score = sim.clone()
    elif negatives == "easy":
        score = -sim
    elif negatives == "random":
        # the top k of i.i.d. uniform keys is a uniformly random k-subset
        # drawn on the CPU generator, then moved: the same keys on every device and rank
        score = torch.rand(sim.shape, generator=generator).to(sim.device)
    else:
        raise ValueError(f"negatives must be 'hard', 'easy' or 'random', not {negatives!r}")
    score = score.masked_fill(~candidate, float("-inf"))  # valid ones rank first
    idx = score.topk(min(k, sim.shape[1]), dim=1).indices  # (n_q, <= k)
    valid = candidate.gather(1, idx)
    if idx.shape[1] < k:  # batch smaller than k + 1: pad with invalid slots
        pad = k - idx.shape[1]
        idx = torch.cat([idx, idx.new_zeros(idx.shape[0], pad)], dim=1)
        valid = torch.cat([valid, valid.new_zeros(valid.shape[0], pad)], dim=1)
    return idx, valid


# Eq. 4: -log( e^{S_ii/τ} / (e^{S_ii/τ} + Σ_l e^{S_i,h_l/τ}) ), mean over queries
def hardneg_loss(q, c, k=8, beta=0.1, tau=0.02, negatives="hard", generator=None,
                 return_stats=False):
    # q (n_q, d), c (n_c, d) with n_c >= n_q, both L2-normalized; c[i] is the positive of q[i].
    # beta=None or inf: no false-negative filter (Table 4, ∞)
    sim = q @ c.T  # (n_q, n_c), carries the gradient
    idx, valid = hard_negative_topk(sim.detach(), k, beta, negatives, generator)  # (n_q, k)
    pos = sim.diagonal()  # (n_q,)
    neg = sim.gather(1, idx)  # (n_q, k): gradient flows only into the chosen entries
    # invalid picks are -inf, so each row uses exactly its valid negatives; a row without any
    # is the log-softmax of one finite logit: loss 0 and gradient 0, never NaN
    logits = torch.cat([pos[:, None], neg.masked_fill(~valid, float("-inf"))], dim=1) / tau
    target = torch.zeros(len(logits), dtype=torch.long, device=logits.device)  # positive first
    loss = F.cross_entropy(logits, target)
    if not return_stats:
        return loss
    return loss, hardneg_stats(sim.detach(), neg.detach(), valid, beta)


@torch.no_grad()
def hardneg_stats(sim, neg, valid, beta):
    # logged each step; sim (n_q, n_c), neg and valid (n_q, k): the negatives in each row's
    # denominator (the full-batch losses below pass (n_q, n_c) for both)
    n_q, n_c = sim.shape
    pos = sim.diagonal()
    off_diagonal = sim.sum() - pos.sum()  # over the n_q * n_c - n_q pairs (i, j != i)
    return {
        # share of queries with >= 1 filtered false negative: the FalseNeg column of Table 4
        "false_negative_share": false_negative_mask(sim, beta).any(dim=1).float().mean().item(),
        "valid_negatives": valid.sum(dim=1).float().mean().item(),
        "pos_sim": pos.mean().item(),
        "hardneg_sim": neg[valid].mean().item() if valid.any() else float("nan"),
        # near 1 means every embedding is the same vector: the collapse of a run started
        # from a model without zero-shot alignment
        "random_pair_cos": (off_diagonal / (n_q * n_c - n_q)).item() if n_c > 1 else float("nan"),
    }


# ---------------------------------------------------------------- not UniME: the baselines
# Losses a researcher compares Eq. 4 against. Same inputs, same rectangular layout, and the same
# stats keys as hardneg_loss, so a training log has the same columns for every loss. For these
# full-batch losses every valid candidate is in the denominator, so in the stats
# "valid_negatives" is the number of negatives left in a row after the β mask and
# "hardneg_sim" is their mean similarity (for Eq. 4 both refer to the k picked negatives).

def _full_batch_loss(sim, alpha, beta, tau):
    # sim (n_q, n_c), positive of row i at column i. Negative j's logit is S_ij/τ + α·sg(S_ij),
    # i.e. weight e^{α S_ij} in the denominator (α = 0: plain InfoNCE); false negatives are -inf.
    with torch.no_grad():
        positive = _positive_mask(sim)
        dropped = false_negative_mask(sim, beta)
        log_weight = (alpha * sim).masked_fill(positive, 0.0)  # detached: a weight, not a target
    logits = (sim / tau + log_weight).masked_fill(dropped, float("-inf"))
    # a row whose negatives are all dropped keeps one finite logit: loss 0, gradient 0
    target = torch.arange(len(sim), device=sim.device)
    return F.cross_entropy(logits, target), ~(dropped | positive)  # loss, valid (n_q, n_c)


def masked_infonce_loss(q, c, beta=0.1, tau=0.02, return_stats=False):
    """NOT UniME: InfoNCE over the whole batch of candidates (no top-k), with UniME's false-
    negative mask (S_ij > S_ii + β, j != i) removing the flagged candidates from the denominator.
    Of Qwen3-Embedding's loss (arXiv 2506.05176) this is one term of its denominator Z_i, the
    query-to-other-documents sum Σ_{j != i} m_ij e^{S_ij/τ}, with the similarity half of its
    mask m_ij (margin 0.1; its other half drops a document equal to the positive as a string);
    its mined hard negatives and its query-query and document-document sums are left out, so
    this is not Qwen3-Embedding's loss. beta=None or inf: no mask, i.e. VLM2Vec's in-batch
    InfoNCE. q (n_q, d), c (n_c, d), n_c >= n_q; c[i] is the positive of q[i] and columns
    n_q.. are negatives of every query."""
    sim = q @ c.T  # (n_q, n_c)
    loss, valid = _full_batch_loss(sim, 0.0, beta, tau)
    if not return_stats:
        return loss
    return loss, hardneg_stats(sim.detach(), sim.detach(), valid, beta)


def hardness_weighted_loss(q, c, alpha=9.0, beta=None, tau=0.02, both_directions=True,
                           return_stats=False):
    """NOT UniME: LLaVE's hardness-weighted contrastive loss (Lan et al. 2025, arXiv 2503.04812;
    code: DeepLearnXMU/LLaVE, llava/model/language_model/loss.py, WeightedClipLoss). Every
    negative's logit is S_ij/τ + α·sg(S_ij): in the full-batch denominator negative j weighs
    e^{α S_ij}, so the hard ones count more, while the gradient still flows only through S_ij/τ.
    As LLaVE does, the loss is the mean of two directions: query -> candidates (row i of S) and
    candidate -> queries (row i of Sᵀ, each direction with its own weights), which needs a
    square batch. both_directions=False keeps query -> candidates only, like Eq. 4.

    Defaults follow LLaVE's released training script: α = 9 (its ALPHA=9; the argument's
    dataclass default is 0.5) and logit scale 50, i.e. τ = 0.02. LLaVE has no false-negative
    filter, so beta=None (off; train.py's --loss hardness-weighted defaults to --beta inf); a
    float β adds UniME's mask on top, in both directions. Layout and stats as
    masked_infonce_loss (stats are for the query -> candidate direction)."""
    sim = q @ c.T  # (n_q, n_c)
    loss, valid = _full_batch_loss(sim, alpha, beta, tau)
    if both_directions:
        if sim.shape[0] != sim.shape[1]:
            raise ValueError(f"LLaVE's loss averages query->candidate and candidate->query and "
                             f"needs as many candidates as queries, got {tuple(sim.shape)}; "
                             f"both_directions=False keeps the first direction only")
        loss = (loss + _full_batch_loss(sim.T, alpha, beta, tau)[0]) / 2
    if not return_stats:
        return loss
    return loss, hardneg_stats(sim.detach(), sim.detach(), valid, beta)


# ---------------------------------------------------------------- when Eq. 4 collapses

def collapse_guard(history, k, window=50):
    """Stop a run whose embeddings have collapsed to one vector: over the last `window` steps
    the positive is no better than unrelated pairs and the loss sits at ln(k+1), where every
    logit is equal. Anisotropy alone (unrelated pairs at cosine 0.9, positives above them,
    common in real MLLMs' last-token states) does not trigger it."""
    if len(history) < window:
        return
    recent = history[-window:]
    gap = sum(s["pos_sim"] - s["random_pair_cos"] for s in recent) / window
    loss = sum(s["loss"] for s in recent) / window
    if gap < 0.01 and abs(loss - math.log(k + 1)) < 0.05:
        raise SystemExit(
            f"collapse: over the last {window} steps positives are no closer than unrelated "
            f"pairs (mean gap {gap:.4f}) and the loss sits at ln(k+1) = {math.log(k + 1):.2f}: "
            f"every embedding is nearly the same vector. The hard negatives of a model without "
            f"zero-shot alignment outrank its positives, and making everything identical is the "
            f"quickest way down. Start from a pretrained MLLM, or lower --lr.")
