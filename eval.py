"""Evaluation: the paper's benchmark protocols (UniME §4.2; Tables 1, 2, 3 and 9).

Every benchmark is cosine scores between L2-normalized embeddings:
- MMEB: hit@1 among each row's own candidates, the gold one always first (Table 1);
- image-caption retrieval (Flickr30K, COCO, ShareGPT4V, Urban1K): Recall@K both ways (Table 2);
- SugarCrepe: is the image closer to its caption than to the negative caption? (Table 2)
- UniME† (stage 1 only, §3.2.2): text and image embedded apart with their own prompts, summed.
An input is a tuple (text, image, instruction); its embedding is cached on disk per model.
Prompts (families.py): MMEB inputs are MMEB's own text in the official pipeline's raw format,
cut to the family's max_len, images at the family's evaluation size (--image-size); the
zero-shot benchmarks use the "in one word" prompts in the chat template, images as they are.

    python eval.py --model M --task mmeb --data MMEB-eval/*.jsonl --image-root MMEB-eval/images
    python eval.py --model M --task retrieval --data coco.jsonl --image-root coco --max-captions 5
    python eval.py --model M --task sugarcrepe --image-root coco/val2017   # 7 splits in assets/
"""
import argparse
import functools
import hashlib
import json
import os
import re

import numpy as np
import torch
import torch.nn.functional as F

import config
import data
import families
import model as M
import stages

SUGARCREPE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "sugarcrepe")
SUGARCREPE_GROUPS = {"Replace": ("replace_obj", "replace_att", "replace_rel"),
                     "Swap": ("swap_obj", "swap_att"), "Add": ("add_obj", "add_att")}
# Table 9: the 36 MMEB-eval datasets per meta-task, `*` = out of distribution (not in
# MMEB-train). Spelled like the MMEB-eval subsets (file stems); ALIASES maps Table 9's spellings.
MMEB_TASKS = {
    "Classification": "ImageNet-1K N24News HatefulMemes VOC2007 SUN397 *Place365 *ImageNet-A "
                      "*ImageNet-R *ObjectNet *Country211",
    "VQA": "OK-VQA A-OKVQA DocVQA InfographicsVQA ChartQA Visual7W *ScienceQA *VizWiz *GQA "
           "*TextVQA",
    "Retrieval": "VisDial CIRR VisualNews_t2i VisualNews_i2t MSCOCO_t2i MSCOCO_i2t NIGHTS WebQA "
                 "*FashionIQ *Wiki-SS-NQ *OVEN *EDIS",
    "Grounding": "MSCOCO *RefCOCO *RefCOCO-Matching *Visual7W-Pointing",
}
_norm = lambda name: re.sub(r"[^a-z0-9]", "", name.lower())  # "Country-211" == "Country211"
ALIASES = {"refcocomatch": "refcocomatching", "visual7wpoint": "visual7wpointing",
           "mscocogrd": "mscoco"}
DATASET_TASK = {_norm(n.lstrip("*")): t for t, s in MMEB_TASKS.items() for n in s.split()}
OOD = {_norm(n[1:]) for s in MMEB_TASKS.values() for n in s.split() if n.startswith("*")}


# ---------------------------------------------------------------- metrics (fractions in [0, 1])

def gold_rank(scores, gold):
    """(n, m) scores, (n, m) bool gold mask -> (n,) float: how many non-gold candidates rank
    before the best gold one. Ties count against the gold (a rival scoring exactly as well is
    ranked first), so do NaN scores; a row whose gold scores are all NaN ranks last (inf).
    The official scorers (VLM2Vec's argmax with the gold first, torch.topk) break ties by
    position instead, which gives a constant or NaN embedder a perfect MMEB score."""
    best = scores.masked_fill(~gold | scores.isnan(), float("-inf")).max(dim=1).values  # (n,)
    rivals = ((scores >= best[:, None]) | scores.isnan()) & ~gold
    return rivals.sum(dim=1).float().masked_fill(~torch.isfinite(best), float("inf"))


def hit_at_1(queries, candidates, cand_index):
    """MMEB Precision@1 (Table 1): share of rows whose first candidate (the gold) beats every
    other one strictly. queries (n, d), candidates (m, d), cand_index[i] = rows of query i's
    candidates, gold first; a candidate that is the gold's own row (the same input listed
    twice) is the gold, not a rival. One row at a time: memory follows one candidate list."""
    hits = sum(int(gold_rank((candidates[i] @ q)[None], (i == i[0])[None]).item() == 0)
               for q, i in zip(queries, map(torch.as_tensor, cand_index)))
    return hits / len(cand_index)


def recall_at_k(text, image, caption_image, ks=(1, 5, 10), chunk=1024):
    """Table 2 Recall@K as the official evaluation (deepglint/UniME, retrieval_self.py) defines
    it on scores = text @ image.T: text->image, the caption's own image is in its top k;
    image->text, ANY of the image's captions is. text (T, d), image (I, d), caption_image (T,)
    image of each caption. `chunk` queries at a time; a tie ranks the gold last (gold_rank)."""
    owner = torch.as_tensor(caption_image)

    def ranks(queries, cands, gold):  # gold(rows) -> (len(rows), m) mask
        rows = torch.arange(len(queries))
        return torch.cat([gold_rank(queries[s:s + chunk] @ cands.T, gold(rows[s:s + chunk]))
                          for s in range(0, len(queries), chunk)])
    t2i = ranks(text, image, lambda rows: owner[rows, None] == torch.arange(len(image)))
    i2t = ranks(image, text, lambda rows: rows[:, None] == owner[None, :])
    return {f"{name}_R@{k}": (r < k).float().mean().item()
            for name, r in (("t2i", t2i), ("i2t", i2t)) for k in ks}


def sugarcrepe_accuracy(image, pos, neg):
    """Correct iff cos(image, caption) > cos(image, negative), strict as in the official
    evaluation (sugar_crepe_self.py): a tie counts as wrong, so does NaN. All (n, d)
    normalized, row by row."""
    return ((image * pos).sum(1) > (image * neg).sum(1)).float().mean().item()


def _mean(v):
    return sum(v) / len(v) if v else None


def sugarcrepe_groups(split_scores):
    """Table 2's Replace / Swap / Add: unweighted means of the sub-splits present (the paper
    does not state the weighting; its Table 3 R_Compos is likewise a plain mean of the three)."""
    return {g: {"mean": _mean([split_scores[s] for s in splits if s in split_scores]),
                "n": sum(s in split_scores for s in splits), "of": len(splits)}
            for g, splits in SUGARCREPE_GROUPS.items()}


MMEB_OVERALL = ("All: mean of meta-task means", "All: mean of datasets")


def group_means(scores):
    """MMEB meta-task, IND, OOD: unweighted means of the dataset scores (Table 1). Two "All"
    conventions exist: the mean of the four meta-task means reproduces the paper's Phi-3.5-V and
    LLaVA-1.6 rows (and Table 9's "All (36)" in all eight columns), while its LLaVA-OneVision
    row and the MMEB leaderboard use the plain mean of the 36 datasets; both are reported.
    Missing datasets: the mean of those present, with their count n. A dataset outside Table 9
    goes to "other", never into a mean."""
    meta_mean, dataset_mean = MMEB_OVERALL
    members = {g: [] for g in (*MMEB_TASKS, "IND", "OOD", dataset_mean)}
    other = {}
    for name, score in scores.items():
        k = ALIASES.get(_norm(name), _norm(name))
        if k not in DATASET_TASK:
            other[name] = score
            continue
        for g in (DATASET_TASK[k], "OOD" if k in OOD else "IND", dataset_mean):
            members[g].append(score)
    total = {**{t: len(s.split()) for t, s in MMEB_TASKS.items()}, "OOD": len(OOD),
             "IND": len(DATASET_TASK) - len(OOD), dataset_mean: len(DATASET_TASK)}
    out = {g: {"mean": _mean(v), "n": len(v), "of": total[g]} for g, v in members.items()}
    out[meta_mean] = {**out[dataset_mean], "mean": _mean([out[t]["mean"] for t in MMEB_TASKS
                                                          if out[t]["n"]])}
    return {**out, "other": other}


# ---------------------------------------------------------------- embedding, with a disk cache

class EmbeddingCache:
    """Vectors per (model identity, input), kept under cache_dir/<hash of the identity>/ in
    shards written atomically, so a crash never leaves a torn file and loses at most the block
    being embedded. An input's key holds its text, instruction and the image file's content
    hash: a regenerated image is a new input. A shard stores the full identity and is checked
    on load. Without cache_dir the cache lives in memory only."""

    def __init__(self, model_id, cache_dir=None, block=512):
        self.model_id, self.vectors, self.block, self.hashes = model_id, {}, block, {}
        digest = hashlib.sha256(model_id.encode()).hexdigest()[:16]
        self.dir = os.path.join(cache_dir, digest) if cache_dir else None
        if self.dir:  # a shard being written when its writer was killed
            stages.remove_stale_temp(self.dir)
        names = sorted(os.listdir(self.dir)) if self.dir and os.path.isdir(self.dir) else []
        for path in [os.path.join(self.dir, name) for name in names if name.endswith(".pt")]:
            try:
                shard = torch.load(path, weights_only=True)
            except Exception as e:  # not written by save_atomic: bit rot, a foreign file
                raise SystemExit(f"{path}: not an embedding cache shard ({type(e).__name__}); "
                                 f"delete it and its inputs are embedded again") from None
            if shard.get("model_id") == model_id:
                self.vectors.update(zip(shard["keys"], shard["vectors"]))

    def key(self, x):
        text, image, instruction = x
        if image is not None:
            st = os.stat(image)
            stamp = (os.path.abspath(image), st.st_size, st.st_mtime_ns)
            if stamp not in self.hashes:  # hash each file once per run
                with open(image, "rb") as f:
                    self.hashes[stamp] = hashlib.sha256(f.read()).hexdigest()
            image = self.hashes[stamp]
        return json.dumps([text, image, instruction])

    def embed(self, inputs, encode_fn):
        """(n, d) for inputs [(text, image path, instruction)]. encode_fn runs on the distinct
        inputs not cached yet, a block at a time, each block saved before the next starts."""
        keys = [self.key(x) for x in inputs]
        todo = list({k: x for k, x in zip(keys, inputs) if k not in self.vectors}.items())
        report = M.progress("embedding", len(todo))
        for s in range(0, len(todo), self.block):
            block = todo[s:s + self.block]
            new = encode_fn([x for _, x in block]).float().cpu()  # (len(block), d)
            self.vectors.update(zip([k for k, _ in block], new))
            if self.dir:
                name = hashlib.sha256("\n".join(k for k, _ in block).encode()).hexdigest()[:16]
                stages.save_atomic(os.path.join(self.dir, name + ".pt"), {
                    "model_id": self.model_id, "keys": [k for k, _ in block], "vectors": new})
            report(s + len(block))
        return torch.stack([self.vectors[k] for k in keys])


def make_encoder(model, processor, family, batch_size=64, device="cpu", stage1_sum=False,
                 amp=None, max_length=None, resolution=None):
    """inputs [(text, image, instruction)] -> (n, d): M.embed_inputs, images resized to
    `resolution`, prompts cut to `max_length` tokens. stage1_sum is the UniME† protocol
    (§3.2.2): only the "in one word" prompts; an input with words and an image (MMEB:
    instruction text besides `<|image_1|>`) is embedded as text and as image separately, the
    two summed, then normalized."""
    encode = functools.partial(M.embed_inputs, model, processor, family, batch_size=batch_size,
                               device=device, amp=amp, max_length=max_length,
                               resolution=resolution)

    def summed(inputs):
        words = [families.MMEB_IMAGE_TAG.sub("", t if t is not None else ins or "").strip()
                 for t, _, ins in inputs]
        sides = [(i, (w, None, None)) for i, w in enumerate(words) if w] + \
                [(i, (None, x[1], None)) for i, x in enumerate(inputs) if x[1] is not None]
        vectors = encode([side for _, side in sides])
        total = torch.zeros(len(inputs), vectors.shape[1]).index_add_(
            0, torch.tensor([i for i, _ in sides]), vectors)
        return F.normalize(total, dim=-1)
    return summed if stage1_sum else encode


def load_model(path, device="cpu", dtype="auto", trust_remote_code=False, family=None):
    """(model in eval mode, processor, family, autocast dtype) for any model or stage output."""
    weights, amp = M.precision(device, dtype)
    model, processor, family = stages.load_embedder(path, device, weights, trust_remote_code, family)
    return model.eval(), processor, family, amp


def load_for_eval(path, device="cpu", dtype="auto", trust_remote_code=False, family=None,
                  batch_size=64, stage1_sum=False, cache_dir=None, mmeb=False,
                  image_size="official"):
    """inputs -> embeddings for one model, through a cache keyed by the model's content (NaN or
    inf embeddings stop the evaluation, naming the model: never cached or scored). mmeb: MMEB's
    protocol (VLM2Vec's, which UniME's MMEB numbers come from): prompts cut to the family's
    official max_len and, with image_size "official", images at its official evaluation size;
    the zero-shot tasks keep images as they are (deepglint's evaluation passes them to the
    processor unchanged). Any other image_size applies to all."""
    before = stages.model_identity(path) if os.path.isdir(path) else None  # a hub id: after download
    model, processor, family, amp = load_model(path, device, dtype, trust_remote_code, family)
    identity = stages.model_identity(path)  # by content: a changed copy is another model
    if before not in (None, identity):  # its vectors would be cached under the wrong weights
        raise SystemExit(f"{path} changed while it was being loaded (is a run still writing "
                         f"it?); evaluate it once it is finished")
    spec = families.FAMILIES[family]
    max_length = spec.get("max_len") if mmeb and not stage1_sum else None
    if image_size == "official":
        image_size = spec.get("eval_resolution") if mmeb else None
    # "official": rows cut as the official pipeline cuts them (families.process); the key
    # changes with the rule, so embeddings cut by an earlier rule are not reused
    cut = " truncation=official" if max_length else ""
    cache = EmbeddingCache(f"{identity} family={family} dtype={dtype} "
                           f"amp={amp} stage1_sum={stage1_sum} max_length={max_length}{cut} "
                           f"image_size={image_size}", cache_dir)
    encoder = make_encoder(model, processor, family, batch_size, device, stage1_sum, amp,
                           max_length, image_size)
    return lambda inputs: M.require_finite(cache.embed(
        inputs, lambda block: M.require_finite(encoder(block), path)), path)


# ---------------------------------------------------------------- the benchmarks

def run_mmeb(datasets, embed):
    """Table 1: hit@1 per MMEB-eval subset {path: read_mmeb_eval rows} (file stem = dataset
    name), with group means. Each distinct input is embedded once: candidates repeat."""
    scores = {}
    for path, rows in datasets.items():
        inputs = [r["qry"] for r in rows] + [t for r in rows for t in r["tgt"]]
        order = {}
        index = [order.setdefault(x, len(order)) for x in inputs]
        vectors = embed(list(order))
        ends = np.cumsum([len(rows)] + [len(r["tgt"]) for r in rows])  # candidate slices
        cands = [index[a:b] for a, b in zip(ends[:-1], ends[1:])]
        scores[dataset_name(path)] = 100 * hit_at_1(vectors[index[:len(rows)]], vectors, cands)
    return scores, group_means(scores)


def run_retrieval(datasets, embed):
    """Table 2 (left): Recall@1/5/10 text->image and image->text per caption set {path:
    read_caption_set's (images, captions, owner)}."""
    scores = {}
    for path, (images, captions, owner) in datasets.items():
        recall = recall_at_k(embed([(c, None, None) for c in captions]),
                             embed([(None, p, None) for p in images]), owner)
        scores[dataset_name(path)] = {k: 100 * v for k, v in recall.items()}
    return scores, {}


def run_sugarcrepe(datasets, embed):
    """Table 2 (right): accuracy per SugarCrepe split {path: read_sugarcrepe rows}, and the
    Replace / Swap / Add means."""
    scores = {}
    for path, rows in datasets.items():
        image, pos, neg = (embed([(None, r[0], None) for r in rows]),
                           embed([(r[1], None, None) for r in rows]),
                           embed([(r[2], None, None) for r in rows]))
        scores[dataset_name(path)] = 100 * sugarcrepe_accuracy(image, pos, neg)
    return scores, sugarcrepe_groups(scores)


def dataset_name(path):
    """A subset's name: the file stem, or its folder's name for the hub's parquet layout
    (`ImageNet-1K/test-00000-of-00001.parquet`), so subsets never overwrite each other."""
    stem = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    if re.fullmatch(r"(test|train|validation)(-\d+-of-\d+)?", stem):
        return os.path.basename(os.path.dirname(os.path.abspath(path)))
    return stem


def markdown_table(header, rows):
    cell = lambda v: "-" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] +
                     ["| " + " | ".join(map(cell, r)) + " |" for r in rows])


# ---------------------------------------------------------------- command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    a = p.add_argument
    a("--task", required=True, choices=["mmeb", "retrieval", "sugarcrepe"])
    a("--data", nargs="+", help="mmeb: a JSONL/parquet per subset; retrieval: JSONL manifest, "
                                "ShareGPT4V json or Urban1K folder; sugarcrepe: split jsons "
                                "(default: the 7 splits in assets/sugarcrepe)")
    a("--image-root", default="", help="folder the image paths are relative to")
    a("--model", nargs="+", required=True,
      help="HF ids, model folders or stage outputs: each is scored on every dataset")
    a("--family", help="backbone family, when the model type is not one (families.py)")
    a("--trust-remote-code", action="store_true", help="run the model's own code (Phi-3.5-V)")
    a("--out", default="results.json")
    a("--batch-size", type=int, default=64)
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
      help="auto: bf16 on CUDA, fp32 on the CPU")
    a("--cache-dir", default="runs/cache/eval", help="embedding cache ('' = memory only)")
    a("--stage1-sum", action="store_true", help="UniME†: one-word prompts, text + image summed")
    a("--image-size", default="official",
      type=lambda v: v if v == "official" else config.image_size(v),
      help="resize images to this square: pixels, high (1344), mid (672), mid_336, low (128) "
           "or original. official (default): MMEB at the family's evaluation size (VLM2Vec's: "
           "1344 for LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL/2.5-VL), zero-shot tasks original")
    a("--max-captions", type=int, help="retrieval: first N captions per image (COCO: 5)")
    a("--limit", type=int, help="retrieval: first N images (ShareGPT4V: 1000)")
    args = p.parse_args(argv)
    if args.task == "sugarcrepe" and not args.data:
        args.data = [os.path.join(SUGARCREPE_DIR, f"{s}.json")
                     for s in sum(SUGARCREPE_GROUPS.values(), ())]
    if not args.data:
        p.error(f"--task {args.task} needs --data")
    for name in ("batch_size", "max_captions", "limit"):  # each a count: at least one
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"{config.flag(name)} must be at least 1, got {getattr(args, name)}")
    for flag in ("max_captions", "limit"):  # used by retrieval only: refused, not ignored
        if getattr(args, flag) is not None and args.task != "retrieval":
            p.error(f"{config.flag(flag)} is a retrieval setting, not {args.task}'s")
    return args


def main(argv=None):
    args = parse_args(argv)
    read, run = {"mmeb": (data.read_mmeb_eval, run_mmeb),
                 "retrieval": (functools.partial(data.read_caption_set, limit=args.limit,
                                                 max_captions=args.max_captions), run_retrieval),
                 "sugarcrepe": (data.read_sugarcrepe, run_sugarcrepe)}[args.task]
    try:  # every dataset read and its images checked once, before any model loads
        datasets = {path: read(path, args.image_root) for path in args.data}
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    results = {}
    for path in args.model:
        embed = load_for_eval(path, args.device, args.dtype, args.trust_remote_code, args.family,
                              args.batch_size, args.stage1_sum, args.cache_dir or None,
                              args.task == "mmeb", args.image_size)
        scores, groups = run(datasets, embed)
        first = next(iter(scores.values()))
        columns = list(first) if isinstance(first, dict) else ["score"]
        rows = [(name, *(s.values() if isinstance(s, dict) else [s])) for name, s in scores.items()]
        rows += [(f"**{g}** ({v['n']}/{v['of']})", v["mean"]) for g, v in groups.items()
                 if g != "other"]
        print(f"\n{path}\n" + markdown_table([args.task] + columns, rows), flush=True)
        results[path] = {"datasets": scores, "groups": groups}
    result = {"task": args.task, "stage1_sum": args.stage1_sum, "models": results}
    stages.save_atomic(args.out, json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
