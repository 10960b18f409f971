"""Evaluation (UniME §4.2; Tables 1, 2, 9) and the analysis pictures (Figs. 4-6).

Every benchmark is cosine scores between L2-normalized embeddings:
- MMEB: hit@1 among each row's own candidates, the gold one always first;
- image-caption retrieval (Flickr30K, COCO, ShareGPT4V, Urban1K): Recall@K both ways;
- SugarCrepe: is the image closer to its caption than to the negative caption?
An input is a tuple (text, image path, instruction); its embedding is cached on disk per model.

    python eval.py --task mmeb --data MMEB-eval/*.jsonl --image-root MMEB-eval/images
    python eval.py --task retrieval --data coco.jsonl --image-root coco --max-captions 5
    python eval.py --task sugarcrepe --image-root coco/val2017   # the 7 splits in shared/data
"""
import argparse
import hashlib
import json
import os
import random
import re

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import data
import distill
import model as M

SUGARCREPE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data",
                              "sugarcrepe")
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


# ---------------------------------------------------------------- readers

def _image(path, n, rel, image_root):
    """Full path of row n's image (None for an empty path); a missing file is an error."""
    if not rel:
        return None
    full = os.path.join(image_root, rel)
    if not os.path.isfile(full):
        raise FileNotFoundError(f"{path}, row {n}: image {full} not found (check --image-root)")
    return full


def read_mmeb_eval(path, image_root=""):
    """One MMEB-eval subset -> [{"qry": input, "tgt": [input, ...]}], gold = tgt[0]. MMEB text
    already holds its instruction and `<|image_1|>`, so it goes in the instruction slot."""
    rows = []
    for n, r in data.read_records(path):
        if not {"qry_text", "qry_img_path", "tgt_text", "tgt_img_path"} <= set(r):
            raise ValueError(f"{path}, row {n}: needs qry_text, qry_img_path, tgt_text, "
                             f"tgt_img_path")
        texts, paths = list(r["tgt_text"] or []), list(r["tgt_img_path"] or [])
        if not texts or len(texts) != len(paths):
            raise ValueError(f"{path}, row {n}: tgt_text and tgt_img_path must be non-empty "
                             f"lists of the same length")
        sides = [(r["qry_text"], r["qry_img_path"])] + list(zip(texts, paths))
        if any(not (t or p) for t, p in sides):
            raise ValueError(f"{path}, row {n}: an input has neither text nor image")
        inputs = [(None, _image(path, n, p, image_root), t or "") for t, p in sides]
        rows.append({"qry": inputs[0], "tgt": inputs[1:]})
    return rows


def _first_line(folder, n, txt):
    if not os.path.isfile(txt):
        raise FileNotFoundError(f"{folder}, row {n}: caption file {txt} not found")
    with open(txt, encoding="utf-8") as f:
        return f.readline().strip()


def read_caption_set(path, image_root="", max_captions=None, limit=None):
    """Image-caption set -> (image paths, captions, image index of each caption), from a JSONL
    manifest {"image", "caption": str or [str]}, a ShareGPT4V json (caption =
    conversations[1]['value'], newlines -> spaces, Long-CLIP's protocol), or an Urban1K folder
    (NAME.jpg + NAME.txt, first line; side by side or in image/ and caption/). Paper protocols
    (§7): COCO max_captions=5; ShareGPT4V limit=1000 (the first 1,000 images)."""
    if os.path.isdir(path):
        sub = lambda d: os.path.join(path, d) if os.path.isdir(os.path.join(path, d)) else path
        names = sorted(f for f in os.listdir(sub("image"))
                       if f.lower().endswith((".jpg", ".jpeg", ".png", ".webp")))[:limit]
        pairs = [(n, os.path.join(sub("image"), f), _first_line(
            path, n, os.path.join(sub("caption"), os.path.splitext(f)[0] + ".txt")))
                 for n, f in enumerate(names, 1)]
    elif str(path).endswith(".json"):
        with open(path, encoding="utf-8") as f:
            pairs = list(enumerate(json.load(f)[:limit], 1))
        for i, (n, r) in enumerate(pairs):
            try:
                pairs[i] = (n, r["image"], r["conversations"][1]["value"].replace("\n", " "))
            except (KeyError, IndexError, TypeError):
                raise ValueError(f"{path}, row {n}: needs image, conversations[1].value") from None
    else:
        pairs = [(n, r.get("image"), r.get("caption")) for n, r in data.read_records(path)][:limit]
    images, captions, owner = [], [], []
    for n, image, caps in pairs:
        caps = [caps] if isinstance(caps, str) else caps
        if not image or not caps or not isinstance(caps, list) or \
                not all(isinstance(c, str) and c.strip() for c in caps):
            raise ValueError(f"{path}, row {n}: needs an image and one or more captions")
        images.append(_image(path, n, image, image_root))
        captions += caps[:max_captions]
        owner += [len(images) - 1] * len(caps[:max_captions])
    return images, captions, owner


def read_sugarcrepe(path, image_root=""):
    """One SugarCrepe split {id: {filename, caption, negative_caption}} -> [(image, pos, neg)]."""
    with open(path, encoding="utf-8") as f:
        split = json.load(f)
    rows = []
    for n, (key, r) in enumerate(split.items(), 1):
        fields = ("filename", "caption", "negative_caption")
        if not isinstance(r, dict) or not all(isinstance(r.get(k), str) and r[k] for k in fields):
            raise ValueError(f"{path}, row {n} (id {key}): needs {', '.join(fields)}")
        rows.append((_image(path, n, r["filename"], image_root), r["caption"],
                     r["negative_caption"]))
    return rows


# ---------------------------------------------------------------- metrics (fractions in [0, 1])

def hit_at_1(queries, candidates, cand_index):
    """MMEB Precision@1 (§7): share of rows whose best candidate is their first. queries (n, d),
    candidates (m, d), cand_index[i] = rows of query i's candidates, gold first. One row at a
    time, so memory follows one candidate list. Ties: argmax returns the first maximum, so a
    candidate scoring exactly like the gold does not beat it (as VLM2Vec's np.argmax)."""
    hits = [int((candidates[idx] @ q).argmax()) == 0 for q, idx in zip(queries, cand_index)]
    return sum(hits) / len(hits)


def recall_at_k(text, image, caption_image, ks=(1, 5, 10), chunk=1024):
    """Table 2 Recall@K as R1's retrieval_self.py computes it from scores = text @ image.T:
    text->image, the caption's own image is in its top k; image->text, ANY of the image's
    captions is in its top k. text (T, d), image (I, d), caption_image (T,) image of each
    caption. `chunk` queries at a time; ties inside the top k follow torch.topk."""
    owner = torch.as_tensor(caption_image)

    def hits(queries, cands, gold, label):  # (n, kmax): is the j-th best candidate a gold one?
        kmax = min(max(ks), len(cands))
        return torch.cat([label[(queries[s:s + chunk] @ cands.T).topk(kmax, dim=1).indices]
                          == gold[s:s + chunk, None] for s in range(0, len(queries), chunk)])
    t2i = hits(text, image, owner, torch.arange(len(image)))
    i2t = hits(image, text, torch.arange(len(image)), owner)  # a caption stands for its image
    return {f"{name}_R@{k}": h[:, :k].any(1).float().mean().item()
            for name, h in (("t2i", t2i), ("i2t", i2t)) for k in ks}


def sugarcrepe_accuracy(image, pos, neg):
    """Correct iff cos(image, caption) > cos(image, negative) (R1 sugar_crepe_self.py); strict,
    so a tie counts as wrong. All (n, d) normalized, compared row by row."""
    return ((image * pos).sum(1) > (image * neg).sum(1)).float().mean().item()


def _mean(v):
    return sum(v) / len(v) if v else None


def sugarcrepe_groups(split_scores):
    """Table 2's Replace / Swap / Add: unweighted means of the sub-splits present (the paper
    does not state the weighting; its Table 3 R_Compos is likewise a plain mean of the three)."""
    return {g: {"mean": _mean([split_scores[s] for s in splits if s in split_scores]),
                "n": sum(s in split_scores for s in splits), "of": len(splits)}
            for g, splits in SUGARCREPE_GROUPS.items()}


def group_means(scores):
    """MMEB meta-task, IND, OOD: unweighted means of the dataset scores (Table 1). "Overall" is
    the mean of the meta-task means: the only reading that reproduces Table 9's "All (36)" row in
    all eight columns (the 36-dataset mean gives e.g. 60.0 for VLM2Vec, printed 63.3); that
    dataset mean is "Datasets". Missing datasets: the mean of those present, with their count n.
    A dataset outside Table 9 goes to "other", never into a mean."""
    members = {g: [] for g in (*MMEB_TASKS, "IND", "OOD", "Datasets")}
    other = {}
    for name, score in scores.items():
        k = ALIASES.get(_norm(name), _norm(name))
        if k not in DATASET_TASK:
            other[name] = score
            continue
        for g in (DATASET_TASK[k], "OOD" if k in OOD else "IND", "Datasets"):
            members[g].append(score)
    total = {**{t: len(s.split()) for t, s in MMEB_TASKS.items()}, "OOD": len(OOD),
             "IND": len(DATASET_TASK) - len(OOD), "Datasets": len(DATASET_TASK)}
    out = {g: {"mean": _mean(v), "n": len(v), "of": total[g]} for g, v in members.items()}
    out["Overall"] = {**out["Datasets"], "mean": _mean([out[t]["mean"] for t in MMEB_TASKS
                                                        if out[t]["n"]])}
    return {**out, "other": other}


# ---------------------------------------------------------------- embedding, with a disk cache

def input_key(x):
    text, image, instruction = x
    return json.dumps([text, os.path.abspath(image) if image else None, instruction])


class EmbeddingCache:
    """Vectors per (model identity, input), kept under cache_dir/<hash of the identity>/ in
    shards written atomically (temp file in the same folder, then os.replace), so a crash never
    leaves a torn file. A shard stores the full identity and is checked on load: a different
    model never reads another's vectors. Without cache_dir the cache lives in memory only."""

    def __init__(self, model_id, cache_dir=None):
        self.model_id, self.vectors = model_id, {}
        digest = hashlib.sha256(model_id.encode()).hexdigest()[:16]
        self.dir = os.path.join(cache_dir, digest) if cache_dir else None
        for name in sorted(os.listdir(self.dir)) if self.dir and os.path.isdir(self.dir) else []:
            shard = torch.load(os.path.join(self.dir, name)) if name.endswith(".pt") else {}
            if shard.get("model_id") == model_id:
                self.vectors.update(zip(shard["keys"], shard["vectors"]))

    def embed(self, inputs, encode_fn):
        """(n, d) for inputs [(text, image path, instruction)]. encode_fn runs once, on the
        distinct inputs not cached yet; not at all when the cache is warm."""
        keys = [input_key(x) for x in inputs]
        todo = {k: x for k, x in zip(keys, inputs) if k not in self.vectors}
        if todo:
            new = encode_fn(list(todo.values())).float().cpu()  # (len(todo), d)
            self.vectors.update(zip(todo, new))
            if self.dir:
                name = hashlib.sha256("\n".join(todo).encode()).hexdigest()[:16]
                distill.save_atomic({"model_id": self.model_id, "keys": list(todo),
                                     "vectors": new}, os.path.join(self.dir, name + ".pt"))
        return torch.stack([self.vectors[k] for k in keys])


def embed_unique(inputs, embed_fn):
    """(vectors of the distinct inputs (u, d), row of each input): MMEB candidates repeat."""
    order = {}
    index = [order.setdefault(x, len(order)) for x in inputs]
    return embed_fn(list(order)), index


def make_encoder(model, processor, family, batch_size=64, device="cpu", stage1_sum=False):
    """inputs [(text, image path, instruction)] -> (n, d), opening images one batch at a time.
    stage1_sum is the UniME† protocol (§3.2.2): only the "in one word" prompts; an input with
    words and an image (MMEB: instruction text besides `<|image_1|>`) is embedded as text and
    as image separately, the two summed, then normalized."""
    def encode(inputs):
        out = []
        for s in range(0, len(inputs), batch_size):
            texts, paths, instructions = map(list, zip(*inputs[s:s + batch_size]))
            out.append(M.encode(model, processor, family, texts, [
                data.load_image(p) if p else None for p in paths], instructions, batch_size,
                device))
        return torch.cat(out)

    def summed(inputs):
        words = [(t if t is not None else ins or "").replace(M.MMEB_IMAGE_TOKEN, "").strip()
                 for t, _, ins in inputs]
        sides = [(i, (w, None, None)) for i, w in enumerate(words) if w] + \
                [(i, (None, x[1], None)) for i, x in enumerate(inputs) if x[1]]
        vectors = encode([side for _, side in sides])
        total = torch.zeros(len(inputs), vectors.shape[1]).index_add_(
            0, torch.tensor([i for i, _ in sides]), vectors)
        return F.normalize(total, dim=-1)
    return summed if stage1_sum else encode


def model_identity(path):
    """A hub id as given; a folder by its absolute path and the names, sizes and mtimes of its
    files (cheap; rewritten weights change it), plus, for a stage output, the identity of the
    model its adapter was merged onto."""
    if not os.path.isdir(path):
        return str(path)
    stats = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in os.scandir(path)
                   if f.is_file())
    ident = f"{os.path.abspath(path)}@{hashlib.sha256(repr(stats).encode()).hexdigest()[:16]}"
    if os.path.isfile(os.path.join(path, "unime.json")):
        with open(os.path.join(path, "unime.json")) as f:
            meta = json.load(f)
        ident += " <- " + model_identity(os.path.join(path, meta["init"])
                                         if meta.get("init_is_local") else meta["init"])
    return ident


# ---------------------------------------------------------------- pictures (Pillow + numpy)

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def _colormap(x):
    """[0, 1] -> RGB uint8, dark blue to yellow: brightness rises with the value."""
    anchors = np.array([[20, 20, 70], [40, 90, 160], [50, 170, 130], [250, 230, 60]], float)
    pos = np.linspace(0, 1, len(anchors))
    return np.stack([np.interp(x, pos, anchors[:, c]) for c in range(3)], -1).astype(np.uint8)


def heatmap_png(matrices, path, panel=300, margin=20, title_h=24):
    """Fig. 4: cross-modal cosine matrices {title: (n, n)} side by side, on one shared colour
    scale so panels compare. Image size: width len(matrices) * (panel + margin) + margin,
    height title_h + panel + margin (the scale is written in the bottom margin)."""
    mats = {name: np.asarray(m, dtype=float) for name, m in matrices.items()}
    lo, hi = min(m.min() for m in mats.values()), max(m.max() for m in mats.values())
    img = Image.new("RGB", (len(mats) * (panel + margin) + margin, title_h + panel + margin),
                    "white")
    draw = ImageDraw.Draw(img)
    for j, (name, m) in enumerate(mats.items()):
        x = margin + j * (panel + margin)
        cells = Image.fromarray(_colormap((m - lo) / max(hi - lo, 1e-12)))
        img.paste(cells.resize((panel, panel), Image.NEAREST), (x, title_h))
        draw.text((x, 6), name, fill="black")
    draw.text((margin, title_h + panel + 4), f"cosine {lo:.2f} (dark) to {hi:.2f} (bright)",
              fill="black")
    img.save(path)


def line_chart_png(series, path, title, log_y=False, xlabel="step", ylabel="", size=(640, 400)):
    """Fig. 5: one curve per series {name: values per step} (loss, or pre-clip grad norm with
    log_y, for hard / random / easy negatives), with axes, tick labels and a legend."""
    W, H = size
    left, right, top, bottom = 70, 140, 34, 45  # the legend sits in the right margin
    f = (lambda y: np.log10(np.maximum(y, 1e-30))) if log_y else (lambda y: y)
    ys = {name: f(np.asarray(v, dtype=float)) for name, v in series.items()}
    finite = np.concatenate([y[np.isfinite(y)] for y in ys.values()] + [np.zeros(0)])
    lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    n = max((len(y) for y in ys.values()), default=1)
    px = lambda i: left + i / max(n - 1, 1) * (W - left - right)
    py = lambda y: top + (hi - y) / (hi - lo) * (H - top - bottom)
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    for t in np.linspace(lo, hi, 5):
        draw.line([(left - 4, py(t)), (left, py(t))], fill="black")
        draw.text((4, py(t) - 6), f"{10 ** t if log_y else t:.3g}", fill="black")
    for i in sorted({0, (n - 1) // 2, n - 1}):
        draw.text((px(i) - 6, H - bottom + 4), str(i), fill="black")
    draw.text(((W - right) // 2, H - 18), xlabel, fill="black")
    draw.text((4, top - 14), ylabel + (" (log scale)" if log_y else ""), fill="black")
    draw.text((W // 3, 4), title, fill="black")
    for j, (name, y) in enumerate(ys.items()):
        color, ly = PALETTE[j % len(PALETTE)], top + 8 + 16 * j
        points = [(px(i), py(v)) for i, v in enumerate(y) if np.isfinite(v)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        draw.line([(W - right + 10, ly), (W - right + 30, ly)], fill=color, width=3)
        draw.text((W - right + 36, ly - 6), name, fill="black")
    img.save(path)


@torch.no_grad()
@torch.no_grad()
def top_next_tokens(model, processor, family, images, k=5, device="cpu"):
    """Fig. 6, "what the embedding says in one word": the full model's LM-head softmax at the
    embedding position (last real token) under the image prompt -> per image [(token, prob)].
    One image per forward (Phi-3.5-V takes one at a time). Call model.eval() first."""
    out = []
    for image in images:
        batch = M.process(processor, family, images=[data.load_image(image)], device=device)
        logits = M.last_token_pool(model(**batch).logits, batch["attention_mask"])  # (1, V)
        probs, ids = logits.float().softmax(-1)[0].topk(k)
        out.append([(processor.tokenizer.decode([int(i)]), float(p)) for p, i in zip(probs, ids)])
    return out


# ---------------------------------------------------------------- benchmarks, command line

def markdown_table(header, rows):
    cell = lambda v: "-" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] +
                     ["| " + " | ".join(map(cell, r)) + " |" for r in rows])


def run_mmeb(args, embed):
    scores = {}
    for path in args.data:
        rows = read_mmeb_eval(path, args.image_root)
        vectors, index = embed_unique([r["qry"] for r in rows] + [t for r in rows
                                                                   for t in r["tgt"]], embed)
        ends = np.cumsum([len(rows)] + [len(r["tgt"]) for r in rows])  # candidate slices
        cands = [index[a:b] for a, b in zip(ends[:-1], ends[1:])]
        scores[_name(path)] = 100 * hit_at_1(vectors[index[:len(rows)]], vectors, cands)
    return scores, group_means(scores)


def run_retrieval(args, embed):
    scores = {}
    for path in args.data:
        images, captions, owner = read_caption_set(path, args.image_root, args.max_captions,
                                                   args.limit)
        recall = recall_at_k(embed([(c, None, None) for c in captions]),
                             embed([(None, p, None) for p in images]), owner)
        scores[_name(path)] = {k: 100 * v for k, v in recall.items()}
    return scores, {}


def run_sugarcrepe(args, embed):
    scores = {}
    for path in args.data:
        rows = read_sugarcrepe(path, args.image_root)
        image, pos, neg = (embed([(None, r[0], None) for r in rows]),
                           embed([(r[1], None, None) for r in rows]),
                           embed([(r[2], None, None) for r in rows]))
        scores[_name(path)] = 100 * sugarcrepe_accuracy(image, pos, neg)
    return scores, sugarcrepe_groups(scores)


# ---------------------------------------------------------------- the toy, through the same code

TOY_LABELS = {"runs/stage0": "no UniME training", "runs/stage1": "stage 1 only",
              "runs/stage2-base": "stage 2 only", "runs/stage2": "stage 1 + stage 2"}


def write_toy_benchmark(folder, seed=0, n=200, n_candidates=50):
    """The shapes world's held-out scenes written in the published formats (PNG images, MMEB
    JSONL, caption manifests, SugarCrepe JSON), so the toy is scored by the very readers and
    metrics the real benchmarks use. Returns {task: [files]}; a finished folder is reused."""
    done = os.path.join(folder, "files.json")
    if os.path.isfile(done):
        with open(done) as f:
            return json.load(f)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    splits, files = data.split_scenes(seed), {"mmeb": [], "retrieval": [], "sugarcrepe": []}
    rng = random.Random(seed + 1)
    names = {}
    for split in ("test", "ood"):
        rows = []
        for i, scene in enumerate(splits[split][:n]):
            names[scene] = f"{split}_{i}.png"
            data.draw(scene, rng).save(os.path.join(folder, "images", names[scene]))
            rows.append({"image": f"images/{names[scene]}", "caption": data.caption(scene)})
        files["retrieval"].append(_write_jsonl(os.path.join(folder, f"toy_{split}.jsonl"), rows))
    scenes = splits["test"][:n]
    for task in data.TASKS[:4]:  # MMEB-style: gold first, then distractors of the same task
        pairs = [data.toy_stage2_row(s, task, random.Random(seed * 7 + i))
                 for i, s in enumerate(scenes)]
        path = lambda j, side: f"images/{names[scenes[j]]}" if pairs[j][side] else ""  # noqa
        rows = []
        for i, pair in enumerate(pairs):
            tgt, seen = [i], {pair["pos"]}
            for j in sorted(range(len(pairs)), key=lambda j: rng.random()):
                if len(tgt) < n_candidates and j != i and (pairs[j]["pos_image"] or
                                                           pairs[j]["pos"] not in seen):
                    tgt.append(j)  # distinct class names / answers; any other image
                    seen.add(pairs[j]["pos"])
            rows.append({"qry_text": pair["qry"], "qry_img_path": path(i, "qry_image"),
                         "tgt_text": [pairs[j]["pos"] for j in tgt],
                         "tgt_img_path": [path(j, "pos_image") for j in tgt]})
        files["mmeb"].append(_write_jsonl(os.path.join(folder, f"toy_{task}.jsonl"), rows))
    for kind in ("replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj"):
        split = {}
        for i, scene in enumerate(scenes):
            try:
                negative = data.caption(data.negative(scene, rng, kind)[1])
            except ValueError:  # e.g. no relation to replace in a one-object scene
                continue
            split[str(i)] = {"filename": names[scene], "caption": data.caption(scene),
                             "negative_caption": negative}
        files["sugarcrepe"].append(os.path.join(folder, f"{kind}.json"))
        with open(files["sugarcrepe"][-1], "w") as f:
            json.dump(split, f)
    with open(done, "w") as f:
        json.dump(files, f)
    return files


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_toy(args, embed, files):
    """One row of the toy stage ablation (the shape of the paper's Table 3)."""
    folder = os.path.dirname(files["mmeb"][0])
    sub = argparse.Namespace(**{**vars(args), "image_root": folder, "max_captions": None,
                                "limit": None})
    mmeb, _ = run_mmeb(argparse.Namespace(**{**vars(sub), "data": files["mmeb"]}), embed)
    ret, _ = run_retrieval(argparse.Namespace(**{**vars(sub), "data": files["retrieval"]}),
                           embed)
    sub.image_root = os.path.join(folder, "images")
    comp, _ = run_sugarcrepe(argparse.Namespace(**{**vars(sub), "data": files["sugarcrepe"]}),
                             embed)
    pairs = data.toy_text_pairs(data.split_scenes(args.seed)["test"], 200, args.seed + 1)
    t2t = recall_at_k(embed([(r["sent0"], None, None) for r in pairs]),
                      embed([(r["sent1"], None, None) for r in pairs]), list(range(200)), (1,))
    return {"MMEB-style hit@1": _mean(list(mmeb.values())),
            "t2i R@1": ret["toy_test"]["t2i_R@1"], "i2t R@1": ret["toy_test"]["i2t_R@1"],
            "unseen combos t2i R@1": ret["toy_ood"]["t2i_R@1"],
            "compositional": _mean(list(comp.values())), "t2t R@1": 100 * t2t["t2i_R@1"],
            "per set": {**mmeb, **{k: v["t2i_R@1"] for k, v in ret.items()}, **comp}}


def _name(path):
    return os.path.splitext(os.path.basename(os.path.normpath(path)))[0]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    a = p.add_argument
    a("--task", required=True, choices=["mmeb", "retrieval", "sugarcrepe", "toy", "figures"])
    a("--logs", nargs="+", help="figures: stage-2 log.jsonl files of hard/random/easy runs")
    a("--data", nargs="+", help="mmeb: a JSONL/parquet per subset; retrieval: JSONL manifest, "
                                "ShareGPT4V json or Urban1K folder; sugarcrepe: split jsons")
    a("--image-root", default="", help="folder the image paths are relative to")
    a("--model", nargs="+", help="HF id, model folder or stage output (default: runs/stage2, "
      "else runs/stage1); --task toy takes several and prints one table")
    a("--seed", type=int, default=0)
    a("--family", help="prompt family when the model type is not enough (see model.FAMILIES)")
    a("--trust-remote-code", action="store_true", help="needed by Phi-3.5-V")
    a("--out", default="results.json")
    a("--batch-size", type=int, default=64)
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--cache-dir", default="runs/cache/eval", help="embedding cache ('' = memory only)")
    a("--stage1-sum", action="store_true", help="UniME†: one-word prompts, text + image summed")
    a("--max-captions", type=int, help="retrieval: first N captions per image (COCO: 5)")
    a("--limit", type=int, help="retrieval: first N images (ShareGPT4V: 1000)")
    args = p.parse_args(argv)
    if args.model is None:
        args.model = ["runs/stage2" if os.path.exists("runs/stage2") else "runs/stage1"]
    if args.task == "sugarcrepe" and not args.data:
        args.data = [os.path.join(SUGARCREPE_DIR, f"{s}.json")
                     for s in sum(SUGARCREPE_GROUPS.values(), ())]
    if args.task not in ("toy", "figures") and not args.data:
        p.error(f"--task {args.task} needs --data")
    return args


def cached_embedder(args, path):
    dtype = torch.bfloat16 if torch.device(args.device).type == "cuda" else torch.float32
    model, processor, family = M.load_embedder(path, args.device, dtype,
                                               args.trust_remote_code, args.family)
    model.eval()
    cache = EmbeddingCache(f"{model_identity(path)} family={family} dtype={dtype} "
                           f"stage1_sum={args.stage1_sum}", args.cache_dir or None)
    encoder = make_encoder(model, processor, family, args.batch_size, args.device,
                           args.stage1_sum)
    return lambda inputs: cache.embed(inputs, encoder)


def main_toy(args):
    files = write_toy_benchmark(os.path.join("runs", "toy-bench"), args.seed)
    results = {path: run_toy(args, cached_embedder(args, path), files) for path in args.model}
    columns = [c for c in next(iter(results.values())) if c != "per set"]
    print(markdown_table(["model"] + columns, [
        (f"{TOY_LABELS.get(os.path.normpath(p), p)} (`{p}`)", *(r[c] for c in columns))
        for p, r in results.items()]))
    _write_json(args.out, {"task": "toy", "models": results})
    return results


def main_figures(args, folder=os.path.join("runs", "figures")):
    """The paper's analyses as pictures: cross-modal cosine heatmaps of 50 held-out pairs per
    checkpoint (Fig. 4), the LM head's top-5 next tokens at the embedding position (Fig. 6),
    and, from stage-2 logs of --negatives hard|random|easy runs, loss and pre-clip gradient
    norm per step (Fig. 5)."""
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(args.seed + 1)
    scenes = data.split_scenes(args.seed)["test"][:50]
    images = [data.draw(s, rng) for s in scenes]
    matrices, tokens = {}, {}
    for path in args.model:
        model, processor, family = M.load_embedder(path, args.device)
        model.eval()
        image = M.encode(model, processor, family, images=images, device=args.device)
        text = M.encode(model, processor, family, texts=[data.caption(s) for s in scenes],
                        device=args.device)
        label = TOY_LABELS.get(os.path.normpath(path), path)
        matrices[label] = (text @ image.T).numpy()
        tokens[label] = top_next_tokens(model, processor, family, images[:4], 5, args.device)
    heatmap_png(matrices, os.path.join(folder, "heatmap.png"))
    for i, scene in enumerate(scenes[:4]):
        print(f"\n{data.caption(scene)}")
        for label, t in tokens.items():
            print(f"  {label:>20}: " + ", ".join(f"{w} {100 * p:.1f}%" for w, p in t[i]))
    _write_json(os.path.join(folder, "next_tokens.json"),
                {"captions": [data.caption(s) for s in scenes[:4]], "tokens": tokens})
    if args.logs:
        logs = {os.path.basename(os.path.dirname(p)): [json.loads(x) for x in open(p)]
                for p in args.logs}
        for key, log_y in (("loss", False), ("grad_norm", True)):
            line_chart_png({n: [r[key] for r in rows] for n, rows in logs.items()},
                           os.path.join(folder, f"negatives_{key}.png"),
                           f"stage 2: {key} per step", log_y=log_y, ylabel=key)
    print(f"\npictures in {folder}/")
    return matrices, tokens


def _write_json(path, result):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)


def main(argv=None):
    args = parse_args(argv)
    if args.task in ("toy", "figures"):
        return (main_toy if args.task == "toy" else main_figures)(args)
    args.model = args.model[0]
    run = {"mmeb": run_mmeb, "retrieval": run_retrieval, "sugarcrepe": run_sugarcrepe}[args.task]
    scores, groups = run(args, cached_embedder(args, args.model))
    first = next(iter(scores.values()))
    columns = list(first) if isinstance(first, dict) else ["score"]
    rows = [(name, *(s.values() if isinstance(s, dict) else [s])) for name, s in scores.items()]
    rows += [(f"**{g}** ({v['n']}/{v['of']})", v["mean"]) for g, v in groups.items()
             if g != "other"]
    print(markdown_table([args.task] + columns, rows))
    result = {"task": args.task, "model": args.model, "stage1_sum": args.stage1_sum,
              "datasets": scores, "groups": groups}
    _write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
