"""The losses a researcher compares UniME against (none of them is UniME), and β = ∞ for UniME's
own loss, as tests. Each expectation comes from a per-query python loop over the candidates or
from a value derived by hand, never from the function under test or its vectorized formula.

    pytest -q tests/test_variants.py       # offline, CPU, seconds
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import distill
import hardneg
from conftest import unit

STATS_KEYS = {"false_negative_share", "valid_negatives", "pos_sim", "hardneg_sim",
              "random_pair_cos"}


def batch(n_q, n_c, d=4, seed=0, tie=0.3):
    # queries and candidates; the positive c[i] leans towards q[i] by `tie`
    q, c = unit(n_q, d, seed), unit(n_c, d, seed + 1)
    c[:n_q] = F.normalize(tie * q + c[:n_q], dim=-1)
    return q, c


def filtered(s_ij, s_ii, beta):
    # the β rule written out; None means no filter (inf needs no case: nothing exceeds s + inf)
    return beta is not None and s_ij > s_ii + beta


def full_batch_by_hand(q, c, beta, tau, alpha=0.0):
    """Per query, a loop over every candidate: -log(e^{S_ii/τ} / Z_i) with
    Z_i = e^{S_ii/τ} + Σ_{j != i, not filtered} e^{α S_ij} e^{S_ij/τ}, averaged over queries."""
    total = 0.0
    for i in range(len(q)):
        s_ii = float(q[i] @ c[i])
        z = math.exp(s_ii / tau)
        for j in range(len(c)):
            s_ij = float(q[i] @ c[j])
            if j != i and not filtered(s_ij, s_ii, beta):
                z += math.exp(alpha * s_ij) * math.exp(s_ij / tau)
        total += math.log(z) - s_ii / tau
    return total / len(q)


def full_batch_reference(q, c, beta, tau, alpha=0.0, detach_weight=True):
    # the same loop in torch, one logit at a time, so autograd gives a reference gradient
    rows = []
    for i in range(len(q)):
        s_ii = q[i] @ c[i]
        logits = [s_ii / tau]
        for j in range(len(c)):
            s_ij = q[i] @ c[j]
            if j != i and not filtered(s_ij.item(), s_ii.item(), beta):
                weight = s_ij.detach() if detach_weight else s_ij
                logits.append(s_ij / tau + alpha * weight)
        logits = torch.stack(logits)
        rows.append(torch.logsumexp(logits, dim=0) - logits[0])
    return torch.stack(rows).mean()


def count_filtered(q, c, beta):
    return sum(filtered(float(q[i] @ c[j]), float(q[i] @ c[i]), beta)
               for i in range(len(q)) for j in range(len(c)) if j != i)


def grads(loss_fn, q0, c0):
    q, c = q0.clone().requires_grad_(), c0.clone().requires_grad_()
    loss_fn(q, c).backward()
    return q.grad, c.grad


# the hand-made batch of test_unime's stats test: q = I, so S = q cᵀ = cᵀ
S_HAND = torch.tensor([[0.5, 0.7, 0.2],  # 0.7 > 0.6 filtered; 0.2 kept
                       [0.1, 0.9, 0.3],  # nothing above 1.0; 0.1 and 0.3 kept
                       [0.8, 0.9, 0.4]], dtype=torch.float64)  # both filtered: no negative


# ---------------------------------------------------------------- β = ∞ for UniME's Eq. 4

@pytest.mark.parametrize("beta", [None, float("inf")])
def test_false_negative_mask_flags_nothing_when_beta_is_none_or_inf(beta):
    sim = torch.tensor([[0.0, 0.9, float("inf")],
                        [1.0, -1.0, 0.5]])
    got = hardneg.false_negative_mask(sim, beta)
    assert got.dtype == torch.bool and got.shape == (2, 3) and not got.any()


@pytest.mark.parametrize("n_c", [10, 14])
def test_hardneg_loss_without_filter_is_eq4_over_every_other_candidate(n_c):
    n_q, k, tau = 10, 3, 0.05
    q, c = batch(n_q, n_c, seed=2, tie=0.1)
    assert count_filtered(q, c, 0.1) > 0  # so "no filter" differs from β = 0.1 here
    want = 0.0
    for i in range(n_q):  # Eq. 4 with the k most similar j != i, nothing removed
        s = [float(q[i] @ c[j]) for j in range(n_c)]
        hard = sorted((j for j in range(n_c) if j != i), key=lambda j: -s[j])[:k]
        z = math.exp(s[i] / tau) + sum(math.exp(s[j] / tau) for j in hard)
        want += (math.log(z) - s[i] / tau) / n_q
    for beta in (None, float("inf")):
        loss, stats = hardneg.hardneg_loss(q, c, k=k, beta=beta, tau=tau, return_stats=True)
        assert loss.item() == pytest.approx(want, rel=1e-9)
        assert stats["false_negative_share"] == 0.0 and stats["valid_negatives"] == k
    assert hardneg.hardneg_loss(q, c, k=k, beta=0.1, tau=tau).item() != pytest.approx(want)


# ---------------------------------------------------------------- full-batch masked InfoNCE

@pytest.mark.parametrize("beta", [0.1, 0.0, None])
@pytest.mark.parametrize("n_q,n_c", [(8, 8), (6, 11)])
def test_masked_infonce_matches_per_query_loop(n_q, n_c, beta):
    q, c = batch(n_q, n_c, seed=3, tie=0.2)
    if beta is not None:
        assert count_filtered(q, c, beta) > 0  # the mask is exercised
    got = hardneg.masked_infonce_loss(q, c, beta=beta, tau=0.05)
    assert got.item() == pytest.approx(full_batch_by_hand(q, c, beta, 0.05), rel=1e-9)


@pytest.mark.parametrize("n_q,n_c", [(7, 7), (4, 10)])
def test_masked_infonce_is_log_n_c_when_all_similarities_are_equal(n_q, n_c):
    # every S_ij = 1, and the threshold is strict, so nothing is masked: n_c equal logits
    x = F.normalize(torch.ones(n_c, 16, dtype=torch.float64), dim=-1)
    loss = hardneg.masked_infonce_loss(x[:n_q], x, beta=0.0, tau=0.02)
    assert loss.item() == pytest.approx(math.log(n_c), rel=1e-9)


def test_masked_infonce_hand_made_rows_and_stats():
    # τ = 0.1, β = 0.1. Rows: log(1 + e^{(0.2-0.5)/0.1}), log(1 + e^{(0.1-0.9)/0.1} +
    # e^{(0.3-0.9)/0.1}), and 0 for the row whose negatives are all false negatives
    loss, stats = hardneg.masked_infonce_loss(torch.eye(3, dtype=torch.float64), S_HAND.T,
                                              beta=0.1, tau=0.1, return_stats=True)
    want = (math.log1p(math.exp(-3)) + math.log1p(math.exp(-8) + math.exp(-6))) / 3
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert set(stats) == STATS_KEYS and all(isinstance(v, float) for v in stats.values())
    assert stats["false_negative_share"] == pytest.approx(2 / 3)
    assert stats["valid_negatives"] == pytest.approx((1 + 2 + 0) / 3)  # left after the mask
    assert stats["pos_sim"] == pytest.approx(0.6)
    assert stats["hardneg_sim"] == pytest.approx((0.2 + 0.1 + 0.3) / 3)  # their mean
    assert stats["random_pair_cos"] == pytest.approx((0.7 + 0.2 + 0.1 + 0.3 + 0.8 + 0.9) / 6)


def test_masked_infonce_without_filter_keeps_every_other_candidate_in_the_stats():
    _, stats = hardneg.masked_infonce_loss(torch.eye(3, dtype=torch.float64), S_HAND.T,
                                           beta=None, tau=0.1, return_stats=True)
    assert stats["false_negative_share"] == 0.0 and stats["valid_negatives"] == 2.0
    assert stats["hardneg_sim"] == pytest.approx(stats["random_pair_cos"])


def test_masked_infonce_gradients_match_autograd_on_loop_reference():
    q, c = batch(9, 12, seed=5, tie=0.5)
    assert count_filtered(q, c, 0.05) > 0
    got = grads(lambda a, b: hardneg.masked_infonce_loss(a, b, beta=0.05, tau=0.1), q, c)
    want = grads(lambda a, b: full_batch_reference(a, b, 0.05, 0.1), q, c)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


# ---------------------------------------------------------------- LLaVE hardness weighting

def llave_by_hand(q, c, beta, tau, alpha):
    """LLaVE's two directions, each the per-row loop: query i against every candidate, and
    candidate i against every query (its positive is query i, its logits c_i·q_j, the β rule
    on c_i·q_i), averaged."""
    return (full_batch_by_hand(q, c, beta, tau, alpha) +
            full_batch_by_hand(c, q, beta, tau, alpha)) / 2


@pytest.mark.parametrize("alpha,beta", [(9.0, None), (9.0, 0.1), (0.5, None), (0.0, 0.1)])
@pytest.mark.parametrize("n_q,n_c", [(8, 8), (5, 9)])
def test_hardness_weighted_one_direction_matches_per_query_loop(n_q, n_c, alpha, beta):
    q, c = batch(n_q, n_c, seed=6, tie=0.2)
    got = hardneg.hardness_weighted_loss(q, c, alpha=alpha, beta=beta, tau=0.02,
                                         both_directions=False)
    assert got.item() == pytest.approx(full_batch_by_hand(q, c, beta, 0.02, alpha), rel=1e-9)


@pytest.mark.parametrize("alpha,beta", [(9.0, None), (9.0, 0.1), (0.0, None)])
def test_hardness_weighted_default_is_llaves_mean_of_both_directions(alpha, beta):
    q, c = batch(7, 7, seed=8, tie=0.3)
    if beta is not None:
        assert count_filtered(q, c, beta) > 0 and count_filtered(c, q, beta) > 0
    got = hardneg.hardness_weighted_loss(q, c, alpha=alpha, beta=beta, tau=0.02)
    assert got.item() == pytest.approx(llave_by_hand(q, c, beta, 0.02, alpha), rel=1e-9)
    # the two directions differ here, so neither alone passes for the mean
    one = full_batch_by_hand(q, c, beta, 0.02, alpha)
    assert abs(one - got.item()) > 1e-3


def test_hardness_weighted_default_with_alpha_0_is_clips_symmetric_infonce():
    # α = 0, no mask: the mean of cross-entropy over the rows of S/τ and over its columns
    q, c = batch(6, 6, seed=12, tie=0.4)
    logits = (q @ c.T) / 0.05
    target = torch.arange(6)
    want = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    got = hardneg.hardness_weighted_loss(q, c, alpha=0.0, tau=0.05)
    assert got.item() == pytest.approx(want.item(), rel=1e-9)


def test_hardness_weighted_both_directions_needs_a_square_batch():
    q, c = batch(5, 9, seed=13)
    with pytest.raises(ValueError, match="both_directions=False"):
        hardneg.hardness_weighted_loss(q, c)


@pytest.mark.parametrize("alpha", [0.0, 2.0, 9.0])
def test_hardness_weighted_equal_similarities_give_log_of_one_plus_weighted_negatives(alpha):
    # every query is (1, 0) and every candidate (0.6, 0.8), so every S_ij = 0.6 and each of
    # the n_c - 1 negatives weighs e^{0.6 α} against the positive: loss log(1 + (n_c-1) e^{0.6α});
    # square, both directions have n - 1 such negatives and the mean is the same value
    for n_q, n_c, both in ((3, 5, False), (4, 4, True)):
        q = torch.tensor([[1.0, 0.0]], dtype=torch.float64).repeat(n_q, 1)
        c = torch.tensor([[0.6, 0.8]], dtype=torch.float64).repeat(n_c, 1)
        loss = hardneg.hardness_weighted_loss(q, c, alpha=alpha, tau=0.02, both_directions=both)
        assert loss.item() == pytest.approx(math.log1p((n_c - 1) * math.exp(0.6 * alpha)),
                                            rel=1e-9)


def test_hardness_weight_is_detached_so_gradient_matches_the_stop_gradient_reference():
    q, c = batch(8, 10, seed=7, tie=0.5)
    loss_fn = lambda a, b: hardneg.hardness_weighted_loss(a, b, alpha=9.0, tau=0.05,  # noqa
                                                          both_directions=False)
    got = grads(loss_fn, q, c)
    want = grads(lambda a, b: full_batch_reference(a, b, None, 0.05, 9.0), q, c)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    # the check can tell: with the weight differentiated the gradient is another one
    undetached = grads(lambda a, b: full_batch_reference(a, b, None, 0.05, 9.0, False), q, c)
    assert not torch.allclose(got[0], undetached[0])


def test_hardness_weighted_both_directions_gradient_matches_autograd_on_the_loops():
    q, c = batch(8, 8, seed=14, tie=0.5)
    got = grads(lambda a, b: hardneg.hardness_weighted_loss(a, b, alpha=9.0, beta=0.1,
                                                            tau=0.05), q, c)
    want = grads(lambda a, b: (full_batch_reference(a, b, 0.1, 0.05, 9.0) +
                               full_batch_reference(b, a, 0.1, 0.05, 9.0)) / 2, q, c)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_hardness_weighted_stats_do_not_depend_on_alpha():
    eye = torch.eye(3, dtype=torch.float64)
    _, unweighted = hardneg.masked_infonce_loss(eye, S_HAND.T, beta=0.1, return_stats=True)
    _, weighted = hardneg.hardness_weighted_loss(eye, S_HAND.T, alpha=9.0, beta=0.1,
                                                 return_stats=True)
    assert weighted == unweighted  # the same negatives; α only re-weighs them


# ---------------------------------------------------------------- edge cases, every variant

VARIANTS = {
    "masked_infonce": lambda q, c, **kw: hardneg.masked_infonce_loss(q, c, **kw),
    "hardness_weighted": lambda q, c, **kw: hardneg.hardness_weighted_loss(q, c, alpha=9.0,
                                                                           **kw),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_row_whose_every_negative_is_filtered_has_loss_0_and_finite_zero_gradient(variant):
    # S = [[0, 1], [1, 0]]: each query's only other candidate is a false negative
    q = torch.tensor([[0.0, 1.0], [1.0, 0.0]], requires_grad=True)
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    loss, stats = VARIANTS[variant](q, c, beta=0.1, tau=0.02, return_stats=True)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(q.grad).all() and torch.isfinite(c.grad).all()
    assert (q.grad == 0).all() and (c.grad == 0).all()
    assert stats["valid_negatives"] == 0.0 and math.isnan(stats["hardneg_sim"])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_mixed_batch_with_one_fully_filtered_row_keeps_finite_gradients(variant):
    eye = torch.eye(3, dtype=torch.float64, requires_grad=True)
    c = S_HAND.T.clone().requires_grad_()
    VARIANTS[variant](eye, c, beta=0.1, tau=0.1).backward()
    assert torch.isfinite(eye.grad).all() and torch.isfinite(c.grad).all()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_beta_none_and_inf_are_the_same_unfiltered_loss(variant):
    q, c = batch(7, 7, seed=10, tie=0.1)
    assert count_filtered(q, c, 0.1) > 0
    none = VARIANTS[variant](q, c, beta=None, tau=0.05)
    inf = VARIANTS[variant](q, c, beta=float("inf"), tau=0.05)
    want = (llave_by_hand(q, c, None, 0.05, 9.0) if variant == "hardness_weighted" else
            full_batch_by_hand(q, c, None, 0.05))
    assert none.item() == inf.item()
    assert none.item() == pytest.approx(want, rel=1e-9)


def test_every_loss_logs_the_same_stats_columns():
    q, c = batch(6, 6, seed=11)
    _, unime_stats = hardneg.hardneg_loss(q, c, k=3, return_stats=True)
    for variant in VARIANTS.values():
        _, stats = variant(q, c, beta=0.1, return_stats=True)
        assert set(stats) == set(unime_stats) == STATS_KEYS
        assert all(isinstance(v, float) for v in stats.values())


# ---------------------------------------------------------------- symmetric KL distillation

def kl_by_hand(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def softmax_row(a, cols, tau):
    z = [math.exp(float(a @ x) / tau) for x in cols]
    return [v / sum(z) for v in z]


@pytest.mark.parametrize("with_negatives", [False, True])
def test_kd_symmetric_is_the_mean_of_both_kl_directions_per_row(with_negatives):
    sa, sp, sn = unit(6, 8, 20), unit(6, 8, 21), unit(4, 8, 22)
    ta, tp, tn = unit(6, 3, 23), unit(6, 3, 24), unit(4, 3, 25)
    s_cols = list(sp) + (list(sn) if with_negatives else [])
    t_cols = list(tp) + (list(tn) if with_negatives else [])
    want = 0.0
    for i in range(6):  # per row: P_s and P_t over the same columns, both KLs, halved
        ps, pt = softmax_row(sa[i], s_cols, 0.05), softmax_row(ta[i], t_cols, 0.05)
        want += (kl_by_hand(pt, ps) + kl_by_hand(ps, pt)) / 2 / 6
    negs = dict(student_neg=sn, teacher_neg=tn) if with_negatives else {}
    got = distill.kd_loss(sa, sp, ta, tp, 0.05, "symmetric", **negs)
    assert got.item() == pytest.approx(want, rel=1e-9)


def test_kd_symmetric_is_unchanged_when_student_and_teacher_swap():
    # only the n x n matrices enter, so the embedding sizes may differ
    sa, sp, ta, tp = unit(7, 8, 30), unit(7, 8, 31), unit(7, 5, 32), unit(7, 5, 33)
    one = distill.kd_loss(sa, sp, ta, tp, 0.05, "symmetric").item()
    other = distill.kd_loss(ta, tp, sa, sp, 0.05, "symmetric").item()
    assert one == pytest.approx(other, rel=1e-12) and one > 0.01
    forward = distill.kd_loss(sa, sp, ta, tp, 0.05, "teacher-student").item()
    assert forward != pytest.approx(distill.kd_loss(ta, tp, sa, sp, 0.05,
                                                    "teacher-student").item())


def symmetric_kl_plus_eps(s_logits, t_logits, eps=1e-8):
    """UniME-V2's form (Embedding/src/loss.py): softmax first, then log(p + 1e-8), both
    kl_div's with batchmean, halved."""
    p, q = s_logits.softmax(-1), t_logits.softmax(-1)
    kl_pq = (q * (q.log() - (p + eps).log())).sum() / len(q)
    kl_qp = (p * (p.log() - (q + eps).log())).sum() / len(p)
    return (kl_pq + kl_qp) / 2


def symmetric_gradients(n, tau, seed=0, t=None, s0=None):
    """d loss / d student rows for kd_loss('symmetric') and the +1e-8 form, relative L2
    difference: by default a 384-d teacher, a 64-d student, n pairs of random unit vectors."""
    t = unit(2 * n, 384, seed) if t is None else t
    s0 = unit(2 * n, 64, seed + 1) if s0 is None else s0
    grads = []
    for form in ("ours", "plus_eps"):
        s = s0.clone().requires_grad_()
        sa, sp, ta, tp = s[:n], s[n:], t[:n], t[n:]
        loss = (distill.kd_loss(sa, sp, ta, tp, tau, "symmetric") if form == "ours" else
                symmetric_kl_plus_eps(sa @ sp.T / tau, ta @ tp.T / tau))
        grads.append(torch.autograd.grad(loss, s)[0])
    return ((grads[0] - grads[1]).norm() / grads[0].norm()).item()


def test_kd_symmetric_without_plus_1e8_moves_the_gradient_only_below_p_1e8():
    # at the stage-1 tau 0.05 every probability of a 32-row batch stays above ~1e-8: the
    # gradients agree to 1e-3; at UniME-V2's tau 0.02 many fall far below it, where
    # log(p + 1e-8) flattens and the two differ by tens of percent. Measured (-s prints them).
    at_05, at_02 = symmetric_gradients(32, 0.05), symmetric_gradients(64, 0.02)
    print(f"\nrelative gradient difference, no +1e-8 vs +1e-8: tau 0.05, n 32: {at_05:.1e}; "
          f"tau 0.02, n 64: {at_02:.1e}")
    assert at_05 < 1e-3 and at_02 > 0.05


@pytest.mark.slow
def test_kd_symmetric_without_plus_1e8_on_the_toys_first_stage1_batch(tmp_path):
    # the real teacher's distributions over 64 paraphrase pairs are peaked: some columns fall
    # below 1e-8 even at tau 0.05, and the untrained student's gradient moves by a few percent
    import model as M
    import toy.default as D
    from toy import shapes
    rows = D.text_pairs(shapes.split_scenes(D.SPLIT_SEED)["train"], 64, 0)
    texts = [r["sent0"] for r in rows] + [r["sent1"] for r in rows]
    t = distill.teacher_embeddings(texts, "all-MiniLM-L6-v2", str(tmp_path / "cache")).double()
    net, processor, family = M.load_mllm(os.path.join(os.path.dirname(D.__file__), "mllm"))
    s = M.encode(net.eval(), processor, family, texts=texts)
    diff = symmetric_gradients(64, 0.05, t=t, s0=s.double())
    print(f"\nthe toy's first stage-1 batch, tau 0.05: relative gradient difference {diff:.1e}")
    assert diff > 1e-3


def test_kd_unknown_direction_is_a_clear_error():
    x = unit(3, 4, 40)
    with pytest.raises(ValueError, match="symmetric"):
        distill.kd_loss(x, x, x, x, direction="both")


# ---------------------------------------------------------------- selected from the command line

@pytest.mark.parametrize("loss, extra", [("unime", ["--k", "4"]), ("masked-infonce", []),
                                         ("hardness-weighted", ["--alpha", "2"])])
def test_the_training_step_computes_the_loss_the_flag_names(loss, extra, monkeypatch):
    """train.train_step on given embeddings (GradCache's passes stood in for): the loss value
    of the per-query loop for --loss, and the gradient at the embeddings of that loop's value."""
    import config
    import train
    args = config.resolve(config.parse_args(["--stage", "2", "--loss", loss, "--beta", "0.2",
                                             "--tau", "0.1"] + extra))
    q, c = batch(5, 5, seed=4)
    reps = {"qry": q.clone().requires_grad_(), "pos": c.clone().requires_grad_()}
    monkeypatch.setattr(train, "gradcache_embed", lambda *a: (reps, None))
    monkeypatch.setattr(train, "gradcache_backward", lambda *a: None)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
    value, _, stats = train.train_step(args, 0, None, opt, {"sides": {}}, None, None, 1, "cpu",
                                       None)
    # Eq. 4 with k = 4 of 4 others keeps every valid negative: the full-batch loop; LLaVE's
    # loss averages both directions
    expected = (llave_by_hand(q, c, 0.2, 0.1, 2.0) if loss == "hardness-weighted" else
                full_batch_by_hand(q, c, 0.2, 0.1))
    assert value == pytest.approx(expected, rel=1e-9)
    assert set(stats) == STATS_KEYS
    if loss == "hardness-weighted":  # both directions, each with its own weights
        want = grads(lambda a, b: (full_batch_reference(a, b, 0.2, 0.1, 2.0) +
                                   full_batch_reference(b, a, 0.2, 0.1, 2.0)) / 2, q, c)
    else:
        want = grads(lambda a, b: full_batch_reference(a, b, 0.2, 0.1), q, c)
    torch.testing.assert_close((reps["qry"].grad, reps["pos"].grad), want)


def test_beta_inf_and_none_on_the_command_line_mean_no_filter():
    import config
    for text in ("inf", "none", "None", "Infinity"):
        args = config.parse_args(["--stage", "2", "--beta", text])
        assert args.beta == float("inf")
        assert not hardneg.false_negative_mask(torch.ones(3, 3), args.beta).any()
    assert config.parse_args(["--stage", "2", "--beta", "-0.1"]).beta == -0.1
    with pytest.raises(SystemExit):
        config.parse_args(["--stage", "2", "--beta", "nan"])


@pytest.mark.parametrize("argv", [
    ["--stage", "2", "--alpha", "3"],  # α belongs to the hardness-weighted loss
    ["--stage", "2", "--loss", "masked-infonce", "--k", "8"],  # no top-k there
    ["--stage", "2", "--loss", "hardness-weighted", "--negatives", "random"],
    ["--stage", "1", "--loss", "masked-infonce"],  # stage-2 flags in stage 1
    ["--stage", "1", "--beta", "0.2"],
    ["--stage", "2", "--kd-direction", "symmetric"],  # and the other way round
    ["--stage", "2", "--model", "some/model", "--toy-duplicates", "0.2"],  # the toy's only
    ["--stage", "2", "--toy-duplicates", "1.5"],
])
def test_flags_that_do_not_apply_are_refused_before_anything_loads(argv, capsys):
    import config
    with pytest.raises(SystemExit) as e:
        config.parse_args(argv)
    flag = next(a for a in argv[2:] if a.startswith("--") and a != "--model")
    assert flag in capsys.readouterr().err + str(e.value.code)  # the message names the flag


def test_defaults_fill_only_the_flags_of_the_chosen_loss_and_stage():
    import config
    finish = lambda argv: config.resolve(config.parse_args(argv))  # noqa: E731
    unime = finish(["--stage", "2"])
    assert (unime.loss, unime.k, unime.negatives, unime.beta, unime.alpha) == \
        ("unime", 8, "hard", 0.1, None)
    llave = finish(["--stage", "2", "--loss", "hardness-weighted"])  # no β mask, as LLaVE
    assert (llave.alpha, llave.k, llave.beta) == (9.0, None, float("inf"))
    asked = finish(["--stage", "2", "--loss", "hardness-weighted", "--beta", "0.1"])
    assert asked.beta == 0.1  # the mask only when asked for
    assert finish(["--stage", "2", "--loss", "masked-infonce"]).beta == 0.1  # UniME's default
    stage1 = finish(["--stage", "1", "--kd-direction", "symmetric"])
    assert (stage1.kd_direction, stage1.loss, stage1.k) == ("symmetric", None, None)
    assert finish(["--stage", "1"]).kd_direction == "teacher-student"
