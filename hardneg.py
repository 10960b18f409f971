"""Stage 2 of UniME: hard-negative enhanced instruction tuning, the loss (UniME §3.3).

For n queries q and their n positive candidates c (L2-normalized), S = q cᵀ. Per query i:
1. drop false negatives, the candidates j != i with S[i, j] > S[i, i] + β (§3.3.1);
2. keep the k hardest of the remaining candidates (Eq. 3), chosen by index, without gradient;
3. InfoNCE over {positive + those k negatives} only, not the whole batch (Eq. 4).

Similarity matrices may be rectangular, (n_q, n_c) with n_c >= n_q: the positive of query i is
candidate i, and columns n_q.. are extra candidates (e.g. explicit hard negatives from the data)
that are negatives of every query.
"""
import torch
import torch.distributed as dist
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
    similar, "random" = k distinct valid candidates drawn uniformly (for the §6 ablation).
    A row with fewer than k valid candidates gets valid=False in its extra slots; the paper
    would duplicate hard negatives there, the official code re-scores masked ones (SPEC §3).
    """
    candidate = ~(false_negative_mask(sim, beta) | _positive_mask(sim))  # (n_q, n_c)
    if negatives == "hard":
        score = sim.clone()
    elif negatives == "easy":
        score = -sim
    elif negatives == "random":
        # the top k of i.i.d. uniform keys is a uniformly random k-subset
        score = torch.rand(sim.shape, generator=generator, device=sim.device)
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
    # what SPEC §3 asks to log each step; sim (n_q, n_c), neg and valid (n_q, k)
    n_q, n_c = sim.shape
    pos = sim.diagonal()
    off_diagonal = sim.sum() - pos.sum()  # over the n_q * n_c - n_q pairs (i, j != i)
    return {
        # share of queries with >= 1 filtered false negative: the FalseNeg column of Table 4
        "false_negative_share": false_negative_mask(sim, beta).any(dim=1).float().mean().item(),
        "valid_negatives": valid.sum(dim=1).float().mean().item(),
        "pos_sim": pos.mean().item(),
        "hardneg_sim": neg[valid].mean().item() if valid.any() else float("nan"),
        # near 1 means every embedding is the same vector: the collapse of SPEC §8
        "random_pair_cos": (off_diagonal / (n_q * n_c - n_q)).item() if n_c > 1 else float("nan"),
    }


# Several GPUs: hard negatives are mined over the global batch (§3.3, "all targets across GPUs")
def gather_with_grad(t):
    # (n_local, d) on each rank -> (world * n_local, d), rank order; every rank must hold the
    # same n_local. all_gather returns copies without gradient, so the local shard is put back
    # as `t` itself: the official code drops it, and its rows then get no gradient.
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    parts[dist.get_rank()] = t
    return torch.cat(parts)


def distributed_hardneg_loss(q_local, c_local, **kw):
    """hardneg_loss over the batch gathered from all ranks, scaled by the world size.

    Scaling convention: every rank computes the same global-batch mean loss L, but only its
    own shard of q and c carries gradient, so its backward gives g_r, the part of dL/dθ that
    flows through its shard, and dL/dθ = Σ_r g_r. DDP averages gradients over ranks, so the loss
    is multiplied by world_size W: (1/W) Σ_r W g_r = dL/dθ. Log loss / W (the returned stats
    are unscaled). With negatives="random", seed `generator` identically on every rank.
    Shards are square here (c_local[i] is the positive of q_local[i]): extra negative columns
    per rank would break the "positive of query i is candidate i" layout after the gather.
    """
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    out = hardneg_loss(gather_with_grad(q_local), gather_with_grad(c_local), **kw)
    if kw.get("return_stats"):
        return out[0] * world, out[1]
    return out * world
