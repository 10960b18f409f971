"""The paper's data files, read as they are published (UniME §4.1-4.2, Tables 1, 2 and 7).

Training: SimCSE's NLI pairs (stage 1) and MMEB-train (stage 2). Evaluation: MMEB-eval, the
image-caption retrieval sets (Flickr30K, COCO, ShareGPT4V, Urban1K) and SugarCrepe. Every reader
returns plain Python rows; a malformed row is an error that names the file and the row, raised
while reading, before any training or embedding starts.

An input to embed is a tuple (text, image, instruction): `text` gets the zero-shot "in one word"
prompt, `instruction` is MMEB's own prompt text (it already holds its task instruction), `image`
is a path or a PIL image; any of them may be None.
"""
import csv
import json
import os

from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


# ---------------------------------------------------------------- records and images

def read_records(path):
    """[(row number, dict)] from JSONL (row = line number), or parquet when pyarrow imports."""
    if str(path).endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: parquet needs pyarrow; or convert it to JSONL") from None
        rows = list(enumerate(pq.read_table(path).to_pylist(), 1))
    else:
        rows = []
        for n, line in enumerate(read_lines(path), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, row {n}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, row {n}: expected a JSON object")
            rows.append((n, row))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def read_lines(path):
    """The lines of a UTF-8 text file (a byte-order mark is dropped); other encodings are an
    error naming the file."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return f.read().splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e}); re-encode it as UTF-8") from None


def image_path(rel, image_root, where):
    """The file of an image named in the data, relative to `image_root`. It must exist and may
    not leave the root (no absolute paths, no `..` out of it). `where` names the file and row."""
    if os.path.isabs(rel):
        raise ValueError(f"{where}: image path {rel!r} is absolute; paths in the data are "
                         f"relative to --image-root")
    root = os.path.realpath(image_root or ".")
    full = os.path.realpath(os.path.join(root, rel))
    if os.path.commonpath([root, full]) != root:
        raise ValueError(f"{where}: image path {rel!r} leaves the image root {root}")
    if not os.path.isfile(full):
        raise FileNotFoundError(f"{where}: image {full} not found (check --image-root)")
    return full


def load_image(image):
    """A PIL image from a PIL image or a path, in RGB (resizing is the family's:
    families.prepare_image)."""
    if isinstance(image, str):
        try:
            image = Image.open(image)
            image.load()
        except OSError as e:
            raise ValueError(f"cannot read image {image}: {e}") from None
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit: scale to 8 bits, not clip
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB")


# ---------------------------------------------------------------- stage 1: NLI (§4.2.1)

def read_nli(path):
    """SimCSE's NLI file (`nli_for_simcse.csv`: sent0, sent1, hard_neg) as CSV or JSONL ->
    [{'sent0', 'sent1'[, 'hard_neg']}]."""
    if str(path).endswith((".jsonl", ".json")):
        rows = read_records(path)
    else:
        reader = csv.DictReader(read_lines(path))
        if not reader.fieldnames or not {"sent0", "sent1"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: header must have sent0,sent1[,hard_neg], "
                             f"found {reader.fieldnames}")
        rows = list(enumerate(reader, 2))
    out = []
    for n, row in rows:
        keys = ["sent0", "sent1"] + (["hard_neg"] if row.get("hard_neg") is not None else [])
        bad = [k for k in keys if not isinstance(row.get(k), str) or not row[k].strip()]
        if bad or None in row:
            raise ValueError(f"{path}, row {n}: missing or empty {bad or 'columns'} "
                             f"(expected sent0, sent1[, hard_neg])")
        out.append({k: row[k] for k in keys})
    if not out:
        raise ValueError(f"{path}: no rows")
    return out


# ---------------------------------------------------------------- stage 2: MMEB-train (§4.2.1)

def read_mmeb_train(path, image_root="", skip_missing=False):
    """MMEB-train rows (`qry, qry_image_path, pos_text, pos_image_path`) -> ([{'qry',
    'qry_image', 'pos', 'pos_image'}], skipped). The texts are MMEB's prompts with `<|image_1|>`;
    an empty path is a side without an image. A missing or unreadable image is an error naming
    the file and row, or with skip_missing the row is dropped and counted."""
    rows, skipped = [], 0
    for n, r in read_records(path):
        if not r.get("qry") or not (r.get("pos_text") or r.get("pos_image_path")):
            raise ValueError(f"{path}, row {n}: needs qry and pos_text or pos_image_path")
        try:
            images = {side: image_path(r[key], image_root, f"{path}, row {n}")
                      if r.get(key) else None
                      for side, key in (("qry", "qry_image_path"), ("pos", "pos_image_path"))}
        except (FileNotFoundError, ValueError) as e:
            if skip_missing and isinstance(e, FileNotFoundError):
                skipped += 1
                continue
            raise type(e)(f"{e}; or pass --skip-missing-images") from None
        rows.append({"qry": r["qry"], "pos": r.get("pos_text") or "",
                     "qry_image": images["qry"], "pos_image": images["pos"]})
    return rows, skipped


# ---------------------------------------------------------------- evaluation sets (§4.2.2)

def read_mmeb_eval(path, image_root=""):
    """One MMEB-eval subset (`qry_text, qry_img_path, tgt_text[], tgt_img_path[]`) ->
    [{"qry": input, "tgt": [input, ...]}], the gold candidate first. MMEB text already holds its
    instruction and `<|image_1|>`, so it goes in the instruction slot of the input."""
    rows = []
    for n, r in read_records(path):
        where = f"{path}, row {n}"
        if not {"qry_text", "qry_img_path", "tgt_text", "tgt_img_path"} <= set(r):
            raise ValueError(f"{where}: needs qry_text, qry_img_path, tgt_text, tgt_img_path")
        texts, paths = list(r["tgt_text"] or []), list(r["tgt_img_path"] or [])
        if not texts or len(texts) != len(paths):
            raise ValueError(f"{where}: tgt_text and tgt_img_path must be non-empty lists of "
                             f"the same length")
        sides = [(r["qry_text"], r["qry_img_path"])] + list(zip(texts, paths))
        if any(not (t or p) for t, p in sides):
            raise ValueError(f"{where}: an input has neither text nor image")
        inputs = [(None, image_path(p, image_root, where) if p else None, t or "")
                  for t, p in sides]
        rows.append({"qry": inputs[0], "tgt": inputs[1:]})
    return rows


def read_caption_set(path, image_root="", max_captions=None, limit=None):
    """Image-caption set -> (image paths, captions, image index of each caption), from
    - a JSONL manifest {"image", "caption": str or [str]} (Flickr30K, COCO),
    - ShareGPT4V's json (caption = conversations[1]['value'], newlines -> spaces, Long-CLIP's
      protocol), or
    - an Urban1K folder (NAME.jpg + NAME.txt, first line; side by side or in image/, caption/).
    Paper protocols: COCO max_captions=5; ShareGPT4V limit=1000 (the first 1,000 images)."""
    if os.path.isdir(path):
        sub = lambda d: os.path.join(path, d) if os.path.isdir(os.path.join(path, d)) else path
        names = sorted(f for f in os.listdir(sub("image"))
                       if f.lower().endswith(IMAGE_SUFFIXES))[:limit]
        pairs = []
        for n, name in enumerate(names, 1):
            txt = os.path.join(sub("caption"), os.path.splitext(name)[0] + ".txt")
            if not os.path.isfile(txt):
                raise FileNotFoundError(f"{path}, row {n}: caption file {txt} not found")
            pairs.append((n, os.path.join(sub("image"), name), read_lines(txt)[0].strip()))
    elif str(path).endswith(".json"):
        with open(path, encoding="utf-8-sig") as f:
            pairs = list(enumerate(json.load(f)[:limit], 1))
        for i, (n, r) in enumerate(pairs):
            try:
                pairs[i] = (n, r["image"], r["conversations"][1]["value"].replace("\n", " "))
            except (KeyError, IndexError, TypeError):
                raise ValueError(f"{path}, row {n}: needs image, conversations[1].value") from None
    else:
        pairs = [(n, r.get("image"), r.get("caption")) for n, r in read_records(path)][:limit]
    images, captions, owner = [], [], []
    for n, image, caps in pairs:
        caps = [caps] if isinstance(caps, str) else caps
        if not image or not caps or not isinstance(caps, list) or \
                not all(isinstance(c, str) and c.strip() for c in caps):
            raise ValueError(f"{path}, row {n}: needs an image and one or more captions")
        # Urban1K's images are the folder's own files; elsewhere they are named by the data
        images.append(image if os.path.isdir(path) else
                      image_path(image, image_root, f"{path}, row {n}"))
        captions += caps[:max_captions]
        owner += [len(images) - 1] * len(caps[:max_captions])
    return images, captions, owner


def read_sugarcrepe(path, image_root=""):
    """One SugarCrepe split {id: {filename, caption, negative_caption}} -> [(image, pos, neg)]."""
    with open(path, encoding="utf-8-sig") as f:
        split = json.load(f)
    rows = []
    for n, (key, r) in enumerate(split.items(), 1):
        fields = ("filename", "caption", "negative_caption")
        if not isinstance(r, dict) or not all(isinstance(r.get(k), str) and r[k] for k in fields):
            raise ValueError(f"{path}, row {n} (id {key}): needs {', '.join(fields)}")
        rows.append((image_path(r["filename"], image_root, f"{path}, row {n}"), r["caption"],
                     r["negative_caption"]))
    return rows
