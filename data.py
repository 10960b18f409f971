"""Data: the synthetic shapes world of the embedded default, and readers for the paper's files.

The shapes world stands in for real image-text data on a CPU: 32-pixel Pillow drawings of one or
two coloured shapes, their captions, paraphrases (stage 1) and compositional hard negatives in
the SugarCrepe styles (replace / swap an attribute, an object or the relation). Some colour-shape
combinations appear only in the held-out split, to test generalization to unseen compositions.
"""
import csv
import itertools
import json
import random

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (60, 100, 240),
          "yellow": (235, 215, 40), "purple": (160, 70, 210), "orange": (245, 140, 30)}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 4, "large": 7}  # radius in pixels
SYNONYMS = {"small": "little", "large": "big"}
HELD_OUT = {("red", "triangle"), ("green", "circle"), ("blue", "cross"), ("yellow", "square")}
# A two-object scene is (first, second, relation) with the first left of / above the second;
# captions may say it either way round, so every scene has exactly one canonical key.
RELATIONS = {"left": ("to the left of", "to the right of"), "above": ("above", "below")}
IMAGE_SIZE = 32

OBJECTS = [(c, s, z) for c in COLORS for s in SHAPES for z in SIZES]  # 48 objects


def is_held_out(scene):
    return any((c, s) in HELD_OUT for c, s, _ in scene_objects(scene))


def scene_objects(scene):
    return scene[:2] if len(scene) == 3 else scene[:1]


def all_scenes():
    """Every distinct scene: 48 single objects and 48*47*2 ordered pairs."""
    singles = [(o,) for o in OBJECTS]
    pairs = [(a, b, rel) for a, b in itertools.permutations(OBJECTS, 2) for rel in RELATIONS]
    return singles + pairs


def split_scenes(seed=0, n_test=200):
    """{'train', 'test', 'ood', 'pretrain'}: test scenes never occur in training; 'ood' scenes
    contain a colour-shape combination that no 'train' scene (UniME's stages 1 and 2) contains.
    'pretrain' (the toy's stage 0) stands in for a real MLLM's pretraining, which has seen red
    triangles too: every scene but the two test sets."""
    scenes = all_scenes()
    random.Random(seed).shuffle(scenes)
    ood = [s for s in scenes if is_held_out(s)]
    seen = [s for s in scenes if not is_held_out(s)]
    return {"train": seen[n_test:], "test": seen[:n_test], "ood": ood[:n_test],
            "pretrain": seen[n_test:] + ood[n_test:]}


# ---------------------------------------------------------------- words

def object_phrase(obj, synonyms=False):
    color, shape, size = obj
    return f"a {SYNONYMS[size] if synonyms else size} {color} {shape}"


def caption(scene, flip=False, synonyms=False):
    """"a small red circle to the left of a large blue square"; with flip=True the same scene
    said from the other object ("a large blue square to the right of a small red circle")."""
    if len(scene) == 1:
        return object_phrase(scene[0], synonyms)
    a, b, rel = scene
    if flip:
        return f"{object_phrase(b, synonyms)} {RELATIONS[rel][1]} {object_phrase(a, synonyms)}"
    return f"{object_phrase(a, synonyms)} {RELATIONS[rel][0]} {object_phrase(b, synonyms)}"


def paraphrase(scene, rng):
    """Same scene, said differently: flipped relation and/or size synonyms (never identical)."""
    if len(scene) == 1:
        return caption(scene, synonyms=True)
    flip, syn = rng.choice([(True, False), (True, True), (False, True)])
    return caption(scene, flip=flip, synonyms=syn)


def keywords(scene):
    """The one-word answers of the toy's pretraining: colours and shapes in the scene."""
    return sorted({w for c, s, _ in scene_objects(scene) for w in (c, s)})


def _replace(obj, index, choices, rng):
    new = list(obj)
    new[index] = rng.choice([x for x in choices if x != obj[index]])
    return tuple(new)


def negative(scene, rng, kind=None):
    """A compositional hard negative (SugarCrepe styles) -> (kind, scene'), scene' != scene."""
    kinds = ["replace_att", "replace_obj"]
    if len(scene) == 3:
        a, b, rel = scene
        kinds.append("replace_rel")
        if a[0] != b[0]:
            kinds.append("swap_att")
        if a[1] != b[1]:
            kinds.append("swap_obj")
    kind = kind or rng.choice(kinds)
    if kind not in kinds:
        raise ValueError(f"negative kind {kind!r} does not apply to scene {scene}")
    objs = list(scene_objects(scene))
    i = rng.randrange(len(objs))
    if kind == "replace_att":
        objs[i] = _replace(objs[i], 0, list(COLORS), rng)
    elif kind == "replace_obj":
        objs[i] = _replace(objs[i], 1, SHAPES, rng)
    elif kind == "swap_att":
        objs = [(b[0], a[1], a[2]), (a[0], b[1], b[2])]
    elif kind == "swap_obj":
        objs = [(a[0], b[1], a[2]), (b[0], a[1], b[2])]
    if kind == "replace_rel":  # "left of" becomes "right of": the objects trade places
        return kind, (b, a, rel)
    return kind, tuple(objs) + scene[2:]


# ---------------------------------------------------------------- pictures

def draw(scene, rng):
    """A 32x32 RGB Pillow image of the scene, positions jittered by `rng`."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (24, 24, 24))
    pen = ImageDraw.Draw(img)
    h = IMAGE_SIZE // 2
    if len(scene) == 1:
        centers = [(h, h)]
    elif scene[2] == "left":
        centers = [(h // 2, h), (h + h // 2, h)]
    else:
        centers = [(h, h // 2), (h, h + h // 2)]
    jitter = 3 if len(scene) == 1 else 1
    for (color, shape, size), (x, y) in zip(scene_objects(scene), centers):
        x, y, r = x + rng.randint(-jitter, jitter), y + rng.randint(-jitter, jitter), SIZES[size]
        fill = COLORS[color]
        if shape == "circle":
            pen.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif shape == "square":
            pen.rectangle((x - r + 1, y - r + 1, x + r - 1, y + r - 1), fill=fill)
        elif shape == "triangle":
            pen.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
        else:  # cross
            w = max(1, r // 3)
            pen.rectangle((x - r, y - w, x + r, y + w), fill=fill)
            pen.rectangle((x - w, y - r, x + w, y + r), fill=fill)
    return img


def corpus():
    """Every word and phrase the toy model will read: its tokenizer is trained on this."""
    from model import FAMILIES, IMAGE_INSTRUCTION, TEXT_INSTRUCTION
    rng = random.Random(0)
    lines = [FAMILIES["llava"][0], TEXT_INSTRUCTION, IMAGE_INSTRUCTION, "Describe the image:"]
    lines += list(STAGE2_INSTRUCTIONS.values()) + [
        f"What colour is the {s}? What shape is the {c} one?" for s in SHAPES for c in COLORS]
    for scene in all_scenes()[::7]:
        lines += [caption(scene), caption(scene, flip=True, synonyms=True), *keywords(scene)]
        lines.append(caption(negative(scene, rng)[1]))
    return lines


# ---------------------------------------------------------------- stage 1: text pairs

def toy_text_pairs(scenes, n, seed):
    """NLI-shaped toy pairs: {'sent0': caption, 'sent1': paraphrase, 'hard_neg': negative}."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        scene = scenes[i % len(scenes)] if n <= len(scenes) else rng.choice(scenes)
        rows.append({"sent0": caption(scene, flip=rng.random() < 0.5),
                     "sent1": paraphrase(scene, rng),
                     "hard_neg": caption(negative(scene, rng)[1])})
    return rows


def read_nli(path):
    """SimCSE's NLI file (`nli_for_simcse.csv`: sent0, sent1, hard_neg) as CSV or JSONL.
    Returns a list of dicts; `hard_neg` is optional. A malformed row names file and row."""
    if str(path).endswith((".jsonl", ".json")):
        rows = read_records(path)
    else:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"sent0", "sent1"} <= set(reader.fieldnames):
                raise ValueError(f"{path}: header must have sent0,sent1[,hard_neg], "
                                 f"found {reader.fieldnames}")
            rows = [(line_no, row) for line_no, row in enumerate(reader, 2)]
    out = []
    for line_no, row in rows:
        keys = ["sent0", "sent1"] + (["hard_neg"] if row.get("hard_neg") is not None else [])
        bad = [k for k in keys if not isinstance(row.get(k), str) or not row[k].strip()]
        if bad or None in row:
            raise ValueError(f"{path}, row {line_no}: missing or empty {bad or 'columns'} "
                             f"(expected sent0, sent1[, hard_neg])")
        out.append({k: row[k] for k in keys})
    if not out:
        raise ValueError(f"{path}: no rows")
    return out


# ---------------------------------------------------------------- files

def read_records(path):
    """[(row number, dict)] from JSONL (row = line number), or parquet when pyarrow imports."""
    if str(path).endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: parquet needs pyarrow; or convert it to JSONL") from None
        rows = list(enumerate(pq.read_table(path).to_pylist(), 1))
    else:
        rows = _jsonl(path)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _jsonl(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, row {n}: not valid JSON ({e})") from None
            if not isinstance(rows[-1][1], dict):
                raise ValueError(f"{path}, row {n}: expected a JSON object")
    return rows



# ---------------------------------------------------------------- stage 2: instruction pairs

STAGE2_INSTRUCTIONS = {  # MMEB-style task instructions (VLM2Vec's wording) for the toy
    "cls": "<|image_1|> Represent the given image for classification.",
    "vqa": "<|image_1|> Represent the given image with the following question:",
    "t2i": "Find me an everyday image that matches the given caption:",
    "i2t": "<|image_1|> Find an image caption describing the given everyday image.",
    "target_image": "<|image_1|> Represent the given image.",
}
TASKS = ("cls", "vqa", "t2i", "i2t", "t2i", "i2t")  # retrieval twice as often


def toy_stage2_row(scene, task, rng):
    from model import IMAGE_INSTRUCTION, TEXT_INSTRUCTION
    """One MMEB-style pair {qry, qry_image, pos, pos_image}: classification (image -> class
    name), VQA (image + question -> answer), text->image and image->text retrieval."""
    ins, image = STAGE2_INSTRUCTIONS, draw(scene, rng)
    first = scene[0]
    if task == "cls":  # the class is the first object's colour and shape
        return {"qry": ins["cls"], "qry_image": image, "pos": f"{first[0]} {first[1]}",
                "pos_image": None}
    if task == "vqa":
        obj = rng.choice(scene_objects(scene))
        question, answer = rng.choice([(f"What colour is the {obj[1]}?", obj[0]),
                                       (f"What shape is the {obj[0]} one?", obj[1])])
        return {"qry": f"{ins['vqa']} {question}", "qry_image": image, "pos": answer,
                "pos_image": None}
    # retrieval pairs use the paper's zero-shot "in one word" prompts, so the held-out numbers
    # measure the protocol of its retrieval benchmarks (Table 2)
    text = f"{caption(scene, flip=rng.random() < 0.5)}\n{TEXT_INSTRUCTION}"
    if task == "t2i":
        return {"qry": text, "qry_image": None, "pos": IMAGE_INSTRUCTION, "pos_image": image}
    return {"qry": IMAGE_INSTRUCTION, "qry_image": image, "pos": text, "pos_image": None}


def toy_stage2_rows(scenes, ids, seed, train_scenes=None):
    """Rows for row ids (id -> scene id // 6, task id % 6): the tasks mix within every batch,
    as MMEB's do; images are drawn on the fly from a per-row seed. Every second row of a batch
    is a compositional variant of the row before (when that variant is itself a training scene),
    so the batch holds the near-duplicates that hard-negative mining is for: a random batch of
    64 scenes among 3,000 almost never does, while real MMEB batches (one dataset each) do."""
    train_scenes = train_scenes if train_scenes is not None else set(scenes)
    rows, previous = [], None
    for j, i in enumerate(ids):
        rng = random.Random(seed * 1_000_003 + i)
        scene, task = scenes[(i // len(TASKS)) % len(scenes)], TASKS[i % len(TASKS)]
        if j % 2 == 1:
            variant = negative(previous, rng)[1]
            scene = variant if variant in train_scenes else scene
        rows.append(toy_stage2_row(scene, task, rng))
        previous = scene
    return rows


def read_mmeb_train(path, image_root="", skip_missing=False):
    """MMEB-train rows (`qry, qry_image_path, pos_text, pos_image_path[, neg_text,
    neg_image_path]`) from JSONL, or parquet when pyarrow is installed. Image paths are relative
    to `image_root`; an empty path is a text-only side. A missing image is an error naming the
    file and row, or with skip_missing the row is dropped and counted (returned as `skipped`)."""
    import os
    rows, skipped = [], 0
    for n, r in read_records(path):
        if not r.get("qry") or not (r.get("pos_text") or r.get("pos_image_path")):
            raise ValueError(f"{path}, row {n}: needs qry and pos_text or pos_image_path")
        sides = {"qry": r["qry_image_path"], "pos": r.get("pos_image_path", "")}
        missing = [os.path.join(image_root, p) for p in sides.values()
                   if p and not os.path.isfile(os.path.join(image_root, p))]
        if missing:
            if skip_missing:
                skipped += 1
                continue
            raise FileNotFoundError(f"{path}, row {n}: image {missing[0]} not found "
                                    f"(check --image-root, or pass --skip-missing-images)")
        rows.append({"qry": r["qry"], "pos": r.get("pos_text") or "",
                     **{f"{k}_image": os.path.join(image_root, p) if p else None
                        for k, p in sides.items()}})
    return rows, skipped


def load_image(image, size=None):
    """A PIL image from a PIL image or a path, RGB, optionally resized to size x size."""
    if isinstance(image, str):
        try:
            image = Image.open(image).convert("RGB")
        except OSError as e:
            raise ValueError(f"cannot read image {image}: {e}") from None
    return image.resize((size, size), Image.BICUBIC) if size and image.size != (size, size) \
        else image
