"""The paper's data files, read as they are published (UniME §4.1-4.2, Tables 1, 2 and 7).

Training: SimCSE's NLI pairs (stage 1) and MMEB-train (stage 2). Evaluation: MMEB-eval, the
image-caption retrieval sets (Flickr30K, COCO, ShareGPT4V, Urban1K) and SugarCrepe. Every reader
returns plain Python rows; a malformed row is an error that names the file and the row, raised
while reading, before any training or embedding starts.

An input to embed is a tuple (text, image, instruction): `text` gets the zero-shot "in one word"
prompt, `instruction` is MMEB's own prompt text (it already holds its task instruction), `image`
is a path or a PIL image; any of them may be None.
"""
import concurrent.futures
import csv
import json
import os
import time
import warnings

from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # Pillow's decompression-bomb limit, 89.5 MP (8000 x 8000 fits)
warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # check_image refuses them itself


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
    families.prepare_image). Transparency is composited onto white, as transformers' own
    convert_to_rgb does."""
    if isinstance(image, str):
        try:
            image = Image.open(image)
            image.load()
        except (OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"cannot read image {image}: {e}") from None
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit: scale to 8 bits, not clip
        image = image.point(lambda v: v / 256).convert("L")
    if "A" in image.getbands() or "transparency" in image.info:
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"),
                                      image.convert("RGBA"))
    return image.convert("RGB")


def check_image(path):
    """Why the image file `path` cannot be used, or None. Reads the header (format, size) and
    the last bytes: a file cut short (an interrupted download or unzip) lacks the JPEG or PNG
    end marker and is then decoded to be sure; other formats are always decoded. About as
    cheap as opening the file, where decoding costs 20-40 times more; a file that is complete
    but damaged inside fails when a batch loads it, and load_image names it."""
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                return f"is {im.width}x{im.height}, over the {MAX_PIXELS / 1e6:.1f} MP limit"
            end = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}.get(im.format)
            with open(path, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - 16))
                complete = end is not None and f.read().endswith(end)
            if not complete:
                im.draft("RGB", (1, 1))  # a JPEG decodes at 1/8 scale, still reading every byte
                im.load()
    except Image.DecompressionBombError as e:
        return f"is over the {MAX_PIXELS / 1e6:.1f} MP limit ({str(e).split(',')[0]})"
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        return f"cannot be decoded ({e})"
    return None


def check_images(paths, threads=16, block=1024):
    """{path: why not} for the unusable ones among `paths` (check_image), each distinct file
    checked once, in threads (file reads and decoding release the GIL); a long pass prints
    its progress."""
    todo = sorted(set(paths))
    blocks = [todo[s:s + block] for s in range(0, len(todo), block)]
    bad, done, t0, shown = {}, 0, time.time(), time.time()
    with concurrent.futures.ThreadPoolExecutor(min(threads, os.cpu_count() or 1)) as pool:
        for part, reasons in zip(blocks, pool.map(lambda b: list(map(check_image, b)), blocks)):
            bad.update((p, why) for p, why in zip(part, reasons) if why)
            done += len(part)
            if time.time() - shown > 20:
                print(f"checking images: {done:,} of {len(todo):,} ({time.time() - t0:.0f}s)",
                      flush=True)
                shown = time.time()
    return bad


def require_images(located):
    """Raise for the first unusable image of [(where it is named, path)]."""
    bad = check_images([p for _, p in located])
    for where, p in located:
        if p in bad:
            raise ValueError(f"{where}: image {p} {bad[p]}")


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

MMEB_TRAIN_KEYS = ("qry", "qry_image_path", "pos_text", "pos_image_path")


def read_mmeb_train(path, image_root="", skip_bad=False):
    """MMEB-train rows (`qry, qry_image_path, pos_text, pos_image_path`) -> ([{'qry',
    'qry_image', 'pos', 'pos_image'}], [why each skipped row was skipped]). The texts are MMEB's
    prompts with `<|image_1|>`; an empty path is a side without an image, a missing key an
    error (the published files always have all four: another schema is no silent text-only
    run). A missing or unusable image (check_image) is an error naming the file and row, or
    with skip_bad the row is dropped and its reason kept."""
    found, skipped = [], []
    for n, r in read_records(path):
        where = f"{path}, row {n}"
        if any(k not in r for k in MMEB_TRAIN_KEYS):
            raise ValueError(f"{where}: no {', '.join(k for k in MMEB_TRAIN_KEYS if k not in r)}"
                             f" (MMEB-train rows have {', '.join(MMEB_TRAIN_KEYS)}; an empty "
                             f"path means no image)")
        if not r["qry"] or not (r["pos_text"] or r["pos_image_path"]):
            raise ValueError(f"{where}: needs qry and pos_text or pos_image_path")
        try:
            images = {side: image_path(r[f"{side}_image_path"], image_root, where)
                      if r[f"{side}_image_path"] else None for side in ("qry", "pos")}
        except FileNotFoundError as e:
            if not skip_bad:
                raise FileNotFoundError(f"{e}; or pass --skip-missing-images") from None
            skipped.append(str(e))
            continue
        found.append((where, {"qry": r["qry"], "pos": r["pos_text"] or "",
                              "qry_image": images["qry"], "pos_image": images["pos"]}))
    bad = check_images([r[k] for _, r in found for k in ("qry_image", "pos_image") if r[k]])
    rows = []
    for where, r in found:
        why = [f"{where}: image {r[k]} {bad[r[k]]}" for k in ("qry_image", "pos_image")
               if r[k] in bad]
        if why and not skip_bad:
            raise ValueError(f"{why[0]}; or pass --skip-missing-images")
        skipped += why[:1]
        rows += [] if why else [r]
    return rows, skipped


# ---------------------------------------------------------------- evaluation sets (§4.2.2)

def read_mmeb_eval(path, image_root=""):
    """One MMEB-eval subset (`qry_text, qry_img_path, tgt_text[], tgt_img_path[]`) ->
    [{"qry": input, "tgt": [input, ...]}], the gold candidate first. MMEB text already holds its
    instruction and `<|image_1|>`, so it goes in the instruction slot of the input."""
    rows, located = [], []
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
        located += [(where, x[1]) for x in inputs if x[1]]
        rows.append({"qry": inputs[0], "tgt": inputs[1:]})
    require_images(located)
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
    images, captions, owner, located = [], [], [], []
    for n, image, caps in pairs:
        caps = [caps] if isinstance(caps, str) else caps
        if not image or not caps or not isinstance(caps, list) or \
                not all(isinstance(c, str) and c.strip() for c in caps):
            raise ValueError(f"{path}, row {n}: needs an image and one or more captions")
        # Urban1K's images are the folder's own files; elsewhere they are named by the data
        images.append(image if os.path.isdir(path) else
                      image_path(image, image_root, f"{path}, row {n}"))
        located.append((f"{path}, row {n}", images[-1]))
        captions += caps[:max_captions]
        owner += [len(images) - 1] * len(caps[:max_captions])
    require_images(located)
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
    require_images([(f"{path}, row {n}", r[0]) for n, r in enumerate(rows, 1)])
    return rows
