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
import functools
import hashlib
import io
import json
import os
import re
import time
import warnings

from PIL import Image

import families

# an image placeholder of any family, or an MMEB tag (`<|image_1|>`): never in text alone
IMAGE_TAG = re.compile("|".join([families.MMEB_IMAGE_TAG.pattern] + sorted(
    {re.escape(spec["raw"]) for spec in families.FAMILIES.values()})))

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


def read_text(path):
    """A UTF-8 text file (a byte-order mark dropped); another encoding is an error naming it."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e}); re-encode it as UTF-8") from None


def read_lines(path):
    """The lines of a UTF-8 text file, split at line feeds only: JSON and CSV text may hold
    U+2028, U+0085 or a form feed, which str.splitlines would take for line ends."""
    return [line.removesuffix("\r") for line in read_text(path).split("\n")]


def text_field(row, key, where, empty=False):
    """row[key] as text, else an error naming file, row and field (a number where text
    belongs: a tokenizer would fail on it mid-run). empty: None or "" are allowed ("")."""
    value = row.get(key)
    if empty and value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key} is {value!r:.40} ({type(value).__name__}), not text")
    if not (empty or value.strip()):
        raise ValueError(f"{where}: {key} is empty")
    return value


def require_image_for_tags(text, has_image, where, key, path_key=None):
    """An image placeholder (`<|image_1|>`, `<image>`, any family's) in text without its image
    would make the model wait for image features that never come: an error at read.
    path_key: the field that names the image; None for text-only data (stage 1)."""
    tag = IMAGE_TAG.search(text or "")
    if tag and not has_image:
        raise ValueError(f"{where}: {key} holds the image tag {tag[0]!r} " + (
            f"but {path_key} is empty: give the image, or remove the tag" if path_key else
            "in text-only data (stage 1), where it would make the model expect an image: "
            "remove it"))


def image_path(rel, image_root, where):
    """The file of an image named in the data, relative to `image_root`. It must exist and may
    not leave the root (no absolute paths, no `..` out of it). `where` names the file and row."""
    if os.path.isabs(rel):
        raise ValueError(f"{where}: image path {rel!r} is absolute; paths in the data are "
                         f"relative to --image-root")
    root = real_root(os.path.abspath(image_root or "."))
    full = os.path.realpath(os.path.join(root, rel))
    if os.path.commonpath([root, full]) != root:
        raise ValueError(f"{where}: image path {rel!r} leaves the image root {root}")
    if not os.path.isfile(full):
        raise FileNotFoundError(f"{where}: image {full} not found (check --image-root)")
    return full


@functools.lru_cache(maxsize=16)
def real_root(root):  # resolved once, not per row: ~30 s of a 1.3M-row read
    return os.path.realpath(root)


def load_image(image):
    """A PIL image from a PIL image or a path, in RGB (resizing is the family's:
    families.prepare_image). Transparency is composited onto white, as transformers' own
    convert_to_rgb does."""
    if isinstance(image, str):
        path = image
        try:
            image = Image.open(path)
            image.load()
        except (OSError, SyntaxError, ValueError) as e:  # the file, not the PIL object, named
            raise ValueError(f"cannot read image {path}: {e}") from None
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit: scale to 8 bits, not clip
        image = image.point(lambda v: v / 256).convert("L")
    if "A" in image.getbands() or "transparency" in image.info:
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"),
                                      image.convert("RGBA"))
    return image.convert("RGB")


def check_image(path):
    """Why the image file `path` cannot be used, or None. It is decoded whole, as a batch
    would (a file cut short or damaged inside, a PNG whose data is broken though its end marker
    is intact, fails here, before step 1, not mid-run), after its header has been read to refuse
    a decompression bomb without decoding it."""
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                return f"is {im.width}x{im.height}, over the {MAX_PIXELS / 1e6:.1f} MP limit"
            im.load()
    except Image.DecompressionBombError as e:
        return f"is over the {MAX_PIXELS / 1e6:.1f} MP limit ({str(e).split(',')[0]})"
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        return f"cannot be decoded ({e})"
    return None


CHECKED = os.path.join("runs", "cache", "images")  # check_images' verdicts, per data file


def check_images(paths, threads=16, block=1024, memo=None):
    """{path: why not} for the unusable ones among `paths` (check_image), each distinct file
    decoded once, in threads (decoding releases the GIL); a long pass prints its progress.
    memo: a JSON file of verdicts, each under a hash of the file's path, size, mtime, ctime and
    inode (ctime moves with any write), saved as the pass goes: a rerun or a --resume decodes
    only new or changed files, and a killed pass keeps what it checked."""
    import stages  # which imports this module
    todo, verdicts = sorted(set(paths)), {}
    if memo:
        stages.remove_stale_temp(os.path.dirname(memo))
        try:
            verdicts = dict(json.loads(read_text(memo)))
        except (OSError, ValueError, TypeError):  # none yet, or not ours: check again
            pass
    stamps = {p: file_stamp(p) for p in todo}
    bad = {p: verdicts[stamps[p]] for p in todo if verdicts.get(stamps[p])}
    todo = [p for p in todo if stamps[p] not in verdicts]
    blocks = [todo[s:s + block] for s in range(0, len(todo), block)]
    done, t0, shown, saved = 0, time.time(), time.time(), time.time()
    with concurrent.futures.ThreadPoolExecutor(min(threads, os.cpu_count() or 1)) as pool:
        for part, reasons in zip(blocks, pool.map(lambda b: list(map(check_image, b)), blocks)):
            bad.update((p, why) for p, why in zip(part, reasons) if why)
            verdicts.update((stamps[p], why or "") for p, why in zip(part, reasons) if stamps[p])
            done += len(part)
            if time.time() - shown > 20:
                print(f"checking images: {done:,} of {len(todo):,} ({time.time() - t0:.0f}s)",
                      flush=True)
                shown = time.time()
            if memo and (time.time() - saved > 60 or done == len(todo)):
                try:
                    stages.save_atomic(memo, json.dumps(verdicts))
                except SystemExit as e:  # a full disk: checked again next time
                    print(f"warning: {e}", flush=True)
                saved = time.time()
    return bad


def file_stamp(path):
    try:
        st = os.stat(path)
    except OSError:
        return None  # gone: check_image says so
    key = f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}"
    return hashlib.sha256(key.encode()).hexdigest()[:24]


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
    else:  # the csv module finds the line ends: a quoted field may hold any character
        reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
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
        for k in keys:  # stage 1 is text only: an image tag here would expect an image
            require_image_for_tags(row[k], False, f"{path}, row {n}", k)
        out.append({k: row[k] for k in keys})
    if not out:
        raise ValueError(f"{path}: no rows")
    return out


# ---------------------------------------------------------------- stage 2: MMEB-train (§4.2.1)

MMEB_TRAIN_KEYS = ("qry", "qry_image_path", "pos_text", "pos_image_path")


def read_mmeb_train(path, image_root="", skip_bad=False, memo_dir=CHECKED):
    """MMEB-train rows (`qry, qry_image_path, pos_text, pos_image_path`) -> ([{'qry',
    'qry_image', 'pos', 'pos_image'}], [why each skipped row was skipped]). The texts are MMEB's
    prompts with `<|image_1|>`; an empty path is a side without an image, a missing key an
    error (the published files always have all four: another schema is no silent text-only
    run), so is a field that is not text or an image tag without its image. A missing or
    unusable image (check_image, decoded whole; verdicts kept in memo_dir) is an error naming
    the file and row, or with skip_bad the row is dropped and its reason kept."""
    found, skipped = [], []
    for n, r in read_records(path):
        where = f"{path}, row {n}"
        if any(k not in r for k in MMEB_TRAIN_KEYS):
            raise ValueError(f"{where}: no {', '.join(k for k in MMEB_TRAIN_KEYS if k not in r)}"
                             f" (MMEB-train rows have {', '.join(MMEB_TRAIN_KEYS)}; an empty "
                             f"path means no image)")
        qry, pos = text_field(r, "qry", where), text_field(r, "pos_text", where, empty=True)
        paths = {side: text_field(r, f"{side}_image_path", where, empty=True)
                 for side in ("qry", "pos")}
        if not (pos or paths["pos"]):
            raise ValueError(f"{where}: needs qry and pos_text or pos_image_path")
        require_image_for_tags(qry, paths["qry"], where, "qry", "qry_image_path")
        require_image_for_tags(pos, paths["pos"], where, "pos_text", "pos_image_path")
        try:
            images = {side: image_path(paths[side], image_root, where) if paths[side] else None
                      for side in ("qry", "pos")}
        except FileNotFoundError as e:
            if not skip_bad:
                raise FileNotFoundError(f"{e}; or pass --skip-missing-images") from None
            skipped.append(str(e))
            continue
        found.append((where, {"qry": qry, "pos": pos,
                              "qry_image": images["qry"], "pos_image": images["pos"]}))
    memo = memo_dir and os.path.join(memo_dir, hashlib.sha256(
        os.path.realpath(path).encode()).hexdigest()[:16] + ".json")
    bad = check_images([r[k] for _, r in found for k in ("qry_image", "pos_image") if r[k]],
                       memo=memo)
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
        for i, (t, p) in enumerate(sides):
            key = "qry" if i == 0 else f"tgt[{i - 1}]"
            if not all(x is None or isinstance(x, str) for x in (t, p)):
                raise ValueError(f"{where}: {key} text or image path is not text ({t!r:.40}, "
                                 f"{p!r:.40})")
            require_image_for_tags(t, p, where, f"{key} text", f"{key} image path")
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
        pairs = list(enumerate(json.loads(read_text(path))[:limit], 1))
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
    rows = []
    for n, (key, r) in enumerate(json.loads(read_text(path)).items(), 1):
        fields = ("filename", "caption", "negative_caption")
        if not isinstance(r, dict) or not all(isinstance(r.get(k), str) and r[k] for k in fields):
            raise ValueError(f"{path}, row {n} (id {key}): needs {', '.join(fields)}")
        rows.append((image_path(r["filename"], image_root, f"{path}, row {n}"), r["caption"],
                     r["negative_caption"]))
    require_images([(f"{path}, row {n}", r[0]) for n, r in enumerate(rows, 1)])
    return rows
