"""The path around the method, as tests: the data readers, the teacher and embedding caches,
the command lines, the toy, the pictures, and end-to-end training runs (marked slow; the
README's test command runs them too). What protects a run and its files: test_safety.py.

    python -m pytest -q tests/test_pipeline.py
"""
import csv
import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import distill
import eval as ev
import families
from experiments import figures
import model as M
import processors
from toy import shapes
import stages
import toy.default
import toy.benchmark
import toy.pretrain
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.write("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


def save_images(root, names, size=32):
    for i, name in enumerate(names):
        os.makedirs(os.path.dirname(os.path.join(root, name)) or root, exist_ok=True)
        Image.new("RGB", (size, size), (40 * i % 256, 200, 90)).save(os.path.join(root, name))


def nli_file(path, n, seed=0):
    rows = toy.default.text_pairs(shapes.split_scenes(0)["train"], n, seed=seed)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, ["sent0", "sent1", "hard_neg"])
        w.writeheader()
        w.writerows(rows)
    return str(path)


# ---------------------------------------------------------------- readers

def test_malformed_nli_row_names_file_and_row(tmp_path):
    bad = tmp_path / "nli.csv"
    bad.write_text("sent0,sent1,hard_neg\na cat,a feline,a dog\nonly one,,\n")
    with pytest.raises(ValueError, match=r"nli.csv, row 3"):
        data.read_nli(str(bad))
    bad_json = tmp_path / "nli.jsonl"
    bad_json.write_text('{"sent0": "a", "sent1": "b"}\n{"sent0": "a"\n')
    with pytest.raises(ValueError, match=r"nli.jsonl, row 2"):
        data.read_nli(str(bad_json))
    good = tmp_path / "ok.jsonl"
    good.write_text('{"sent0": "a", "sent1": "b"}\n')
    assert data.read_nli(str(good)) == [{"sent0": "a", "sent1": "b"}]


def test_mmeb_train_reader_text_only_sides_and_missing_images(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    rows = [{"qry": "<|image_1|>\nRepresent the given image for classification.",
             "qry_image_path": "a.jpg", "pos_text": "cat", "pos_image_path": ""},
            {"qry": "Find a picture of a dog.", "qry_image_path": "",
             "pos_text": "<|image_1|>\nRepresent the given image.", "pos_image_path": "b.jpg"}]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(FileNotFoundError, match=r"train.jsonl, row 2: image .*b.jpg"):
        data.read_mmeb_train(str(path), str(tmp_path))
    got, skipped = data.read_mmeb_train(str(path), str(tmp_path), skip_bad=True)
    assert len(skipped) == 1 and "row 2" in skipped[0] and len(got) == 1
    assert got[0]["qry_image"] == os.path.join(str(tmp_path), "a.jpg")
    assert got[0]["pos_image"] is None  # empty path: a text-only side
    # MMEB's raw format: Phi-3's hard-coded token becomes the family's own, no chat template
    assert families.format_prompt("llava", image=True, instruction=got[0]["qry"]) == \
        "<image>\nRepresent the given image for classification."
    assert families.format_prompt("llava_next", instruction=rows[1]["qry"]) == \
        "Find a picture of a dog."


def mmeb_row(q="<|image_1|>\nRepresent the image", qi="a.png", tt=("cat", "dog"), ti=("", "")):
    return {"qry_text": q, "qry_img_path": qi, "tgt_text": list(tt), "tgt_img_path": list(ti)}


def test_read_mmeb_eval_rows(tmp_path):
    save_images(tmp_path / "img", ["a.png", "sub/b.png"])
    path = tmp_path / "VOC2007.jsonl"
    write_jsonl(path, [mmeb_row(), mmeb_row(q="find the image", qi="", tt=("", "x"),
                                            ti=("sub/b.png", "a.png"))])
    rows = data.read_mmeb_eval(str(path), str(tmp_path / "img"))
    a, b = str(tmp_path / "img" / "a.png"), str(tmp_path / "img" / "sub/b.png")
    assert rows[0] == {"qry": (None, a, "<|image_1|>\nRepresent the image"),
                       "tgt": [(None, None, "cat"), (None, None, "dog")]}
    assert rows[1] == {"qry": (None, None, "find the image"),
                       "tgt": [(None, b, ""), (None, a, "x")]}


@pytest.mark.parametrize("bad, error, words", [
    (mmeb_row(qi="missing.png"), FileNotFoundError, "missing.png"),
    ({"qry_text": "q", "qry_img_path": ""}, ValueError, "tgt_text"),
    (mmeb_row(tt=("a", "b"), ti=("",)), ValueError, "same length"),
    (mmeb_row(tt=("", "b")), ValueError, "neither text nor image"),
    ("{not json", ValueError, "not valid JSON"),
    (mmeb_row(qi="../outside.png"), ValueError, "leaves the image root"),
    (mmeb_row(qi="/etc/passwd"), ValueError, "is absolute"),
])
def test_read_mmeb_eval_errors_name_file_and_row(tmp_path, bad, error, words):
    save_images(tmp_path, ["a.png"])
    path = tmp_path / "CIRR.jsonl"
    write_jsonl(path, [mmeb_row(), bad])
    with pytest.raises(error, match=rf"CIRR.jsonl, row 2: .*{words}"):
        data.read_mmeb_eval(str(path), str(tmp_path))


def test_parquet_without_pyarrow_says_so(tmp_path):
    try:
        import pyarrow  # noqa: F401
        pytest.skip("pyarrow installed")
    except ImportError:
        pass
    with pytest.raises(ValueError, match="pyarrow"):
        data.read_mmeb_eval(str(tmp_path / "x.parquet"))


def test_read_caption_manifest_first_captions_and_limit(tmp_path):
    save_images(tmp_path, ["0.jpg", "1.jpg", "2.jpg"])
    path = tmp_path / "coco.jsonl"
    write_jsonl(path, [{"image": "0.jpg", "caption": ["a", "b", "c"]},
                       {"image": "1.jpg", "caption": "d"},
                       {"image": "2.jpg", "caption": ["e", "f"]}])
    images, captions, owner = data.read_caption_set(str(path), str(tmp_path), max_captions=2)
    assert images == [str(tmp_path / f"{i}.jpg") for i in range(3)]
    assert (captions, owner) == (["a", "b", "d", "e", "f"], [0, 0, 1, 2, 2])
    images, captions, owner = data.read_caption_set(str(path), str(tmp_path), limit=2)
    assert (len(images), captions, owner) == (2, ["a", "b", "c", "d"], [0, 0, 0, 1])


def test_read_caption_manifest_errors(tmp_path):
    save_images(tmp_path, ["0.jpg"])
    path = tmp_path / "f30k.jsonl"
    write_jsonl(path, [{"image": "0.jpg", "caption": "a"}, {"image": "gone.jpg", "caption": "b"}])
    with pytest.raises(FileNotFoundError, match=r"f30k.jsonl, row 2: image .*gone.jpg"):
        data.read_caption_set(str(path), str(tmp_path))
    write_jsonl(path, [{"image": "0.jpg", "caption": []}])
    with pytest.raises(ValueError, match=r"f30k.jsonl, row 1"):
        data.read_caption_set(str(path), str(tmp_path))


def test_read_sharegpt4v_json(tmp_path):
    save_images(tmp_path, ["sam/1.jpg", "sam/2.jpg"])
    entries = [{"id": i, "image": f"sam/{i}.jpg", "conversations": [
        {"from": "human", "value": "<image>\nDescribe."},
        {"from": "gpt", "value": f"Line one.\nLine {i}."}]} for i in (1, 2, 3)]
    path = tmp_path / "share-captioner.json"
    path.write_text(json.dumps(entries))
    images, captions, owner = data.read_caption_set(str(path), str(tmp_path), limit=2)
    assert captions == ["Line one. Line 1.", "Line one. Line 2."] and owner == [0, 1]
    path.write_text(json.dumps([{"image": "sam/1.jpg", "conversations": []}]))
    with pytest.raises(ValueError, match="row 1"):
        data.read_caption_set(str(path), str(tmp_path))


@pytest.mark.parametrize("layout", ["flat", "subfolders"])
def test_read_urban1k_folder_first_line(tmp_path, layout):
    img_dir, cap_dir = (tmp_path, tmp_path) if layout == "flat" else \
        (tmp_path / "image", tmp_path / "caption")
    save_images(str(img_dir), ["b.jpg", "a.jpg"])
    cap_dir.mkdir(exist_ok=True)
    (cap_dir / "a.txt").write_text("long caption of a\nsecond line\n")
    (cap_dir / "b.txt").write_text("caption of b\n")
    images, captions, owner = data.read_caption_set(str(tmp_path))
    assert images == [str(img_dir / "a.jpg"), str(img_dir / "b.jpg")]
    assert (captions, owner) == (["long caption of a", "caption of b"], [0, 1])
    os.remove(cap_dir / "b.txt")
    with pytest.raises(FileNotFoundError, match=r"row 2: caption file .*b.txt"):
        data.read_caption_set(str(tmp_path))


def test_read_sugarcrepe_split(tmp_path):
    save_images(tmp_path, ["000000000139.jpg"])
    split = {"0": {"filename": "000000000139.jpg", "caption": "a cat", "negative_caption": "a dog"},
             "1": {"filename": "000000000285.jpg", "caption": "x", "negative_caption": "y"}}
    path = tmp_path / "swap_att.json"
    path.write_text(json.dumps(split))
    with pytest.raises(FileNotFoundError, match=r"swap_att.json, row 2: .*000000000285.jpg"):
        data.read_sugarcrepe(str(path), str(tmp_path))
    del split["1"]["negative_caption"]
    path.write_text(json.dumps(split))
    with pytest.raises(ValueError, match=r"swap_att.json, row 2 \(id 1\)"):
        data.read_sugarcrepe(str(path), str(tmp_path))
    del split["1"]
    path.write_text(json.dumps(split))
    assert data.read_sugarcrepe(str(path), str(tmp_path)) == [
        (str(tmp_path / "000000000139.jpg"), "a cat", "a dog")]


def test_shipped_sugarcrepe_splits_are_the_seven_groups():
    names = sorted(f[:-5] for f in os.listdir(ev.SUGARCREPE_DIR) if f.endswith(".json"))
    assert names == sorted(sum(ev.SUGARCREPE_GROUPS.values(), ()))


# ---------------------------------------------------------------- the teacher and its cache

def test_teacher_cache_refuses_other_texts_teacher_or_pooling(tmp_path):
    path = str(tmp_path / "shard.pt")
    texts = ["a red circle", "a big blue square"]
    emb = F.normalize(torch.randn(2, 4), dim=-1)
    key = {"teacher": "T", "identity": "abc", "pooling": "mean", "max_tokens": 128,
           "texts": distill.texts_hash(texts), "n": 2, "shard": distill.SHARD}
    stages.save_atomic(path, {"key": key, "embeddings": emb})
    assert torch.equal(distill.read_shard(path, key, 2), emb)
    for change, words in ((dict(texts=distill.texts_hash(["a red circle", "a big blue cross"])),
                           "other texts"), (dict(teacher="U"), "with teacher 'T', not 'U'"),
                          (dict(identity="abd"), "by T as its files were then"),
                          (dict(pooling="cls"), "with pooling 'mean', not 'cls'"),
                          (dict(max_tokens=64), "with max_tokens 128, not 64")):
        with pytest.raises(ValueError, match=words):
            distill.read_shard(path, {**key, **change}, 2)
    with pytest.raises(ValueError, match="2 rows where 3 belong"):
        distill.read_shard(path, key, 3)
    assert os.listdir(tmp_path) == ["shard.pt"]  # no temporary file left behind
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o666 & ~_umask())  # not 0600
    (tmp_path / "shard.pt").write_bytes(b"torn")
    with pytest.raises(ValueError, match="not a teacher cache shard"):
        distill.read_shard(path, key, 2)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_real_teacher_embeds_paraphrases_closer():
    model, tok = distill.load_teacher()
    e = distill.teacher_embed(model, tok, ["a small red circle", "a little red circle",
                                           "a large blue square"])
    assert e.shape == (3, 384) and torch.allclose(e.norm(dim=-1), torch.ones(3))
    assert e[0] @ e[1] > e[0] @ e[2]


# ---------------------------------------------------------------- eval.py's embedding cache

class CountingEncoder:
    """A fake model: a deterministic vector per input, counting the inputs it embeds."""

    def __init__(self, offset=0.0):
        self.calls, self.inputs, self.offset = 0, [], offset

    def __call__(self, inputs):
        self.calls += 1
        self.inputs += inputs
        seeds = [sum(map(ord, json.dumps([x[0], x[2]]))) for x in inputs]
        return F.normalize(torch.tensor([[s % 7 + 1.0, s % 5 + self.offset, 1.0] for s in seeds]),
                           dim=-1)


def test_cache_embeds_each_input_once_and_warm_cache_makes_no_calls(tmp_path):
    save_images(tmp_path, ["x.jpg"])
    x = str(tmp_path / "x.jpg")
    inputs = [("a", None, None), (None, x, "ins"), ("a", None, None), ("b", None, None)]
    enc = CountingEncoder()
    first = ev.EmbeddingCache("ckpt@1", str(tmp_path / "c")).embed(inputs, enc)
    assert enc.calls == 1 and len(enc.inputs) == 3  # the repeated input embedded once
    assert torch.equal(first[0], first[2])
    warm = CountingEncoder()
    again = ev.EmbeddingCache("ckpt@1", str(tmp_path / "c")).embed(inputs, warm)
    assert warm.calls == 0 and torch.equal(first, again)
    assert not [f for _, _, fs in os.walk(tmp_path) for f in fs if ".tmp" in f]


def test_cache_is_invalidated_by_another_model_or_a_rewritten_image(tmp_path):
    inputs = [("a", None, None), ("b", None, None)]
    old = ev.EmbeddingCache("ckpt@1", str(tmp_path)).embed(inputs, CountingEncoder())
    other = CountingEncoder(offset=10.0)
    new = ev.EmbeddingCache("ckpt@2", str(tmp_path)).embed(inputs, other)
    assert other.calls == 1 and not torch.allclose(old, new)
    save_images(tmp_path, ["x.jpg"])
    image = [(None, str(tmp_path / "x.jpg"), None)]
    ev.EmbeddingCache("ckpt@1", str(tmp_path)).embed(image, CountingEncoder())
    Image.new("RGB", (32, 32), "white").save(tmp_path / "x.jpg")  # same path, new pixels
    again = CountingEncoder()
    ev.EmbeddingCache("ckpt@1", str(tmp_path)).embed(image, again)
    assert again.calls == 1


def test_cache_keeps_the_blocks_embedded_before_a_bad_input(tmp_path):
    inputs = [(f"t{i}", None, None) for i in range(5)]

    def fails_on_t3(xs):
        if ("t3", None, None) in xs:
            raise ValueError("cannot read image")
        return CountingEncoder()(xs)
    with pytest.raises(ValueError):
        ev.EmbeddingCache("m", str(tmp_path), block=2).embed(inputs, fails_on_t3)
    warm = CountingEncoder()
    ev.EmbeddingCache("m", str(tmp_path), block=2).embed(inputs[:2], warm)
    assert warm.calls == 0  # the first block survived the failure


# ---------------------------------------------------------------- command lines of eval.py

def direct(model_path):
    """The model's own embeddings of inputs [(text, image path, instruction)], one at a time:
    the reference the command lines' scores are computed against by hand."""
    model, processor, family = stages.load_embedder(model_path)

    def embed(inputs):
        return torch.cat([M.encode(model.eval(), processor, family, [t],
                                   [Image.open(i).convert("RGB") if i else None], [ins])
                          for t, i, ins in inputs])
    return embed


def test_cli_mmeb_scores_every_model_writes_json_and_reuses_the_cache(tmp_path, tiny_path,
                                                                      pretrained_path,
                                                                      monkeypatch):
    save_images(tmp_path / "img", ["a.png", "b.png"])
    voc = [mmeb_row(tt=("cat", "dog")), mmeb_row(qi="b.png", tt=("dog", "cat", "bird"),
                                                 ti=("", "", ""))]
    write_jsonl(tmp_path / "VOC2007.jsonl", voc)
    write_jsonl(tmp_path / "Shapes.jsonl", [mmeb_row(q="a red square", qi="", tt=("", ""),
                                                     ti=("a.png", "b.png"))])
    argv = ["--task", "mmeb", "--data", str(tmp_path / "VOC2007.jsonl"),
            str(tmp_path / "Shapes.jsonl"), "--image-root", str(tmp_path / "img"), "--model",
            tiny_path, pretrained_path, "--out", str(tmp_path / "r.json"),
            "--cache-dir", str(tmp_path / "c")]
    first = ev.main(argv)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert list(saved["models"]) == [tiny_path, pretrained_path]  # both scored, in order
    for path, result in saved["models"].items():
        assert result["groups"]["Classification"]["n"] == 1
        assert "Shapes" in result["groups"]["other"]
        # by hand: each row's query against its own candidates, one input at a time
        embed, hits = direct(path), []
        for r in voc:
            img = str(tmp_path / "img" / r["qry_img_path"]) if r["qry_img_path"] else None
            q = embed([(None, img, r["qry_text"])])[0]
            c = embed([(None, None, t) for t in r["tgt_text"]])
            hits.append(int((c @ q).argmax()) == 0)
        assert result["datasets"]["VOC2007"] == pytest.approx(100 * sum(hits) / len(hits))

    def no_model(*args, **kwargs):
        raise RuntimeError("the model was called")
    monkeypatch.setattr(M, "encode", no_model)
    assert ev.main(argv)["models"] == first["models"]  # warm cache: no model call
    with pytest.raises(RuntimeError, match="model was called"):  # UniME† is another identity
        ev.main(argv + ["--stage1-sum"])


@pytest.mark.parametrize("task", ["retrieval", "sugarcrepe"])
def test_cli_retrieval_and_sugarcrepe_scores_equal_the_hand_computed_ones(tmp_path,
                                                                          pretrained_path,
                                                                          task):
    import random
    rng = random.Random(0)
    n = 40 if task == "retrieval" else 8  # 8 scenes the toy tells apart perfectly: not enough
    scenes = shapes.split_scenes(0)["test"][:n]
    for i, s in enumerate(scenes):
        shapes.draw(s, rng).save(tmp_path / f"{i}.png")
    images = [str(tmp_path / f"{i}.png") for i in range(n)]
    embed = direct(pretrained_path)
    img = embed([(None, p, None) for p in images])
    if task == "retrieval":
        path = tmp_path / "f30k.jsonl"
        caps = [[shapes.caption(s), shapes.caption(s, flip=True, synonyms=True)] for s in scenes]
        write_jsonl(path, [{"image": f"{i}.png", "caption": c} for i, c in enumerate(caps)])
        txt = embed([(c, None, None) for cs in caps for c in cs])
        owner = [i for i in range(n) for _ in range(2)]
        sim = (txt @ img.T).tolist()  # by hand: is the best image the caption's own?
        t2i = sum(max(range(n), key=lambda j: sim[t][j]) == owner[t] for t in range(2 * n)) / (2 * n)
        i2t = sum(owner[max(range(2 * n), key=lambda t: sim[t][i])] == i for i in range(n)) / n
    else:
        path = tmp_path / "swap_att.json"
        negs = [shapes.caption(shapes.negative(s, rng)[1]) for s in scenes]
        path.write_text(json.dumps({str(i): {"filename": f"{i}.png", "caption":
                                             shapes.caption(s), "negative_caption": negs[i]}
                                    for i, s in enumerate(scenes)}))
        pos = embed([(shapes.caption(s), None, None) for s in scenes])
        neg = embed([(n, None, None) for n in negs])
        right = sum(float(img[i] @ pos[i]) > float(img[i] @ neg[i]) for i in range(n)) / n
    result = ev.main(["--task", task, "--data", str(path), "--image-root", str(tmp_path),
                      "--model", pretrained_path, "--out", str(tmp_path / "r.json"),
                      "--cache-dir", ""])
    scores = result["models"][pretrained_path]["datasets"][path.stem]
    if task == "retrieval":
        assert scores["t2i_R@1"] == pytest.approx(100 * t2i)
        assert scores["i2t_R@1"] == pytest.approx(100 * i2t)
        assert 0 < t2i < 1 and 0 < i2t < 1  # a non-degenerate example: some right, some wrong
    else:
        assert scores == pytest.approx(100 * right)
        assert 0 < right < 1  # a non-degenerate example
        groups = result["models"][pretrained_path]["groups"]
        assert groups["Swap"] == {"mean": scores, "n": 1, "of": 2}


def test_hub_parquet_layout_keeps_subsets_apart():
    assert ev.dataset_name("MMEB-eval/ImageNet-1K/test-00000-of-00001.parquet") == "ImageNet-1K"
    assert ev.dataset_name("MMEB-eval/CIRR.jsonl") == "CIRR"


# ---------------------------------------------------------------- experiments/figures.py

def test_heatmap_size_and_bright_diagonal(tmp_path):
    path = tmp_path / "fig4.png"
    figures.heatmap_png({"before": np.full((5, 5), 0.5), "after": np.eye(5)}, str(path),
                        panel=100, margin=10, title_h=20)
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (20 + 100 + 10, 2 * (100 + 10) + 10, 3)  # (height, width)
    # one scale for both panels, cosine 0 -> 1 over the colour map's four anchors (dark blue,
    # blue, green, yellow): 1 is the last anchor, 0 the first, and "before"'s 0.5 lies halfway
    # between the two middle ones, (40, 90, 160) and (50, 170, 130)
    bright, dark, middle = (250, 230, 60), (20, 20, 70), (45, 130, 145)
    cell = lambda panel, i, j: tuple(img[20 + 20 * i + 10, 10 + 110 * panel + 20 * j + 10])
    for i in range(5):
        for j in range(5):
            assert cell(0, i, j) == middle
            assert cell(1, i, j) == (bright if i == j else dark)


def test_line_chart_size_and_rising_curve(tmp_path):
    path = tmp_path / "fig5.png"
    figures.line_chart_png({"hard": [1, 2, 3, 4], "easy": [1e-3, 1e-4, 1e-5, 1e-6]}, str(path),
                           "grad norm", log_y=True, size=(500, 300))
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (300, 500, 3)
    # by hand: the plot spans x 70..360 and y 34..255 (margins 70, 140, 34, 45), log10 of the
    # values from -6 (bottom) to log10(4) (top); every point is drawn in its series' colour
    lo, hi = -6, math.log10(4)
    for color, values in zip(figures.PALETTE, ([1, 2, 3, 4], [1e-3, 1e-4, 1e-5, 1e-6])):
        for i, v in enumerate(values):
            x, y = 70 + i * 290 / 3, 34 + (hi - math.log10(v)) / (hi - lo) * 221
            near = img[round(y) - 1:round(y) + 2, round(x) - 1:round(x) + 2]
            assert np.all(near == color, axis=-1).any(), (color, i)
    ys, xs = np.nonzero(np.all(img[:, :360] == figures.PALETTE[0], axis=-1))  # no legend
    assert ys[xs.argmin()] > ys[xs.argmax()]  # rising: the right end is higher up


def test_top_next_tokens_is_the_lm_head_softmax_at_the_last_token(tiny):
    model, processor, family = tiny
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    got = figures.top_next_tokens(model, processor, family, images, k=4)
    for image, tokens in zip(images, got):
        batch = M.process(processor, family, images=[image])
        hidden = M.base_model(model)(**batch).last_hidden_state[:, -1]  # one row: no padding
        probs = model.lm_head(hidden).softmax(-1)[0]
        top = probs.topk(4)
        assert [p for _, p in tokens] == pytest.approx(top.values.tolist(), abs=1e-5)
        assert [t for t, _ in tokens] == [processor.tokenizer.decode([int(i)]) for i in top.indices]
        greedy = model.generate(**batch, max_new_tokens=1, do_sample=False)[0, -1]
        assert int(greedy) == int(top.indices[0])


def test_figures_from_a_real_caption_set(tmp_path, tiny_path):
    save_images(tmp_path, [f"{i}.jpg" for i in range(3)])
    write_jsonl(tmp_path / "f30k.jsonl", [{"image": f"{i}.jpg", "caption": [f"c{i}", "x"]}
                                          for i in range(3)])
    matrices, tokens = figures.main(["--model", tiny_path, "--captions",
                                     str(tmp_path / "f30k.jsonl"), "--image-root",
                                     str(tmp_path), "--out", str(tmp_path / "fig")])
    assert matrices[tiny_path].shape == (3, 3) and len(tokens[tiny_path]) == 3
    assert os.path.isfile(tmp_path / "fig" / "heatmap.png")


# ---------------------------------------------------------------- the toy

def test_tiny_model_reloads_through_auto_classes_and_is_deterministic(tiny_path, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained(tiny_path)
    processor = AutoProcessor.from_pretrained(tiny_path)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    # by hand, from the config: a CLIP tower (patch conv, class and position embeddings,
    # pre- and post-norm, layers of biased q/k/v/o, MLP and two LayerNorms), the two-layer
    # projector, a Llama decoder (unbiased q/k/v/o and gated MLP, two RMSNorms a layer) with
    # its embedding table, final norm and untied LM head
    v, t = model.config.vision_config, model.config.text_config
    w, i, patches = v.hidden_size, v.intermediate_size, (v.image_size // v.patch_size) ** 2
    tower = (3 * v.patch_size ** 2 * w + w + (patches + 1) * w + 4 * w + v.num_hidden_layers
             * (4 * (w * w + w) + (w * i + i) + (i * w + w) + 4 * w))
    d, j, kv = t.hidden_size, t.intermediate_size, t.num_key_value_heads * t.head_dim
    decoder = 2 * t.vocab_size * d + d + t.num_hidden_layers * (2 * d * d + 2 * d * kv + 3 * d
                                                                 * j + 2 * d)
    projector = (w * d + d) + (d * d + d)
    assert M.count_parameters(model) == tower + projector + decoder
    scenes = shapes.split_scenes(0)["test"][:4]
    rng = __import__("random").Random(0)
    e_img = M.encode(model, processor, "llava", images=[shapes.draw(s, rng) for s in scenes])
    e_txt = M.encode(model, processor, "llava", texts=[shapes.caption(s) for s in scenes])
    assert e_img.shape == e_txt.shape == (4, 64)
    again = toy.pretrain.build_tiny_mllm(str(tmp_path / "again"), toy.pretrain.corpus())
    m2 = AutoModelForImageTextToText.from_pretrained(again)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                  m2.state_dict().values()))


def test_one_word_loss_is_cross_entropy_against_the_keyword_distribution(tiny):
    model, processor, _ = tiny
    texts, words = ["a red circle", "a big blue cross"], [["circle", "red"], ["blue", "cross"]]
    with torch.no_grad():
        got = toy.pretrain.one_word_loss(model, processor, words, texts=texts).item()
        logits = model(**M.process(processor, "llava", texts=texts)).logits[:, -1]
    # by hand: the mean of -log p(word) over each row's words, averaged over rows
    expect = 0.0
    for i, ws in enumerate(words):
        logp = logits[i].log_softmax(-1)
        expect += sum(-logp[processor.tokenizer.convert_tokens_to_ids("Ġ" + w)].item()
                      for w in ws) / len(ws) / len(words)
    assert got == pytest.approx(expect, rel=1e-5)


@pytest.mark.slow
def test_pretraining_lowers_the_heldout_answer_loss(tiny_path, tmp_path):
    def heldout_loss(path):
        model, processor, _ = M.load_mllm(path)
        with torch.no_grad():
            return toy.pretrain.pretraining_loss(model, processor,
                                                 shapes.split_scenes(0)["test"][:30], 0).item()
    before = heldout_loss(tiny_path)
    toy.pretrain.pretrain(str(tmp_path / "p"), steps=60, base=tiny_path)
    assert heldout_loss(str(tmp_path / "p")) < 0.5 * before


def test_toy_benchmark_of_a_constant_embedder_is_the_hand_derived_chance_row():
    """Every input the same vector: every score ties, and a tie counts against the gold item.
    Each MMEB-style row has 50 candidates and each Recall@1 query 200, all tied with the gold:
    never a hit; SugarCrepe's strict > is never true either. Chance is 0, not 100."""
    got = toy.benchmark.score(lambda inputs: F.normalize(torch.ones(len(inputs), 3), dim=-1))
    assert set(got.values()) == {0.0}


def test_toy_prompts_are_the_ones_its_pretraining_taught(pretrained_path):
    """toy/mllm learned its one-word answers after LLaVA-1.5's "USER: ... ASSISTANT:"
    turn (toy.pretrain.TEMPLATE); its processor has no chat template, so families.py must give
    exactly that turn, and the toy's stage-2 retrieval rows must carry it whole."""
    processor = processors.load_processor(pretrained_path)
    assert families.format_prompt("llava", image=True, processor=processor) == \
        "USER: <image>\nSummary above image in one word: ASSISTANT:"
    assert families.format_prompt("llava", text="a red circle", processor=processor) == \
        "USER: a red circle\nSummary above sentence in one word: ASSISTANT:"
    scene = shapes.split_scenes(0)["train"][0]
    row = toy.default.stage2_row(scene, "t2i", __import__("random").Random(0))
    assert row["pos"] == "USER: <image>\nSummary above image in one word: ASSISTANT:"
    assert row["qry"].startswith("USER: ") and row["qry"].endswith(
        "\nSummary above sentence in one word: ASSISTANT:")
    assert families.format_prompt("llava", instruction=row["qry"]) == row["qry"]  # raw MMEB


@pytest.mark.slow
def test_shipped_pretrained_toy_is_zero_shot_aligned(pretrained_path):
    """What stage 2 needs from its start (a real MLLM has it): on held-out scenes the
    "in one word" prompts already retrieve across modalities far above chance (0.5%)."""
    row = toy.benchmark.main([pretrained_path])[pretrained_path]
    assert row["t2i R@1"] > 30 and row["i2t R@1"] > 30 and row["compositional"] > 55


@pytest.mark.slow
def test_regenerated_pretrained_toy_reaches_the_shipped_ones_quality(tmp_path,
                                                                      pretrained_path):
    """`python -m toy.pretrain` from scratch gives a model as good as toy/mllm (the
    same seed; CPU float sums are not bit-identical across machines, so not the same bytes)."""
    _, after = toy.pretrain.pretrain(str(tmp_path / "again"))
    shipped = toy.benchmark.main([pretrained_path])[pretrained_path]
    for key in ("t2i R@1", "i2t R@1", "compositional"):
        assert after[key] > shipped[key] - 10, key


# ---------------------------------------------------------------- training runs, end to end

@pytest.mark.slow
def test_short_stage1_run_lowers_loss_and_raises_agreement(tiny_path, tmp_path):
    out = str(tmp_path / "stage1")
    result = train.main(["--stage", "1", "--model", tiny_path, "--data",
                         nli_file(tmp_path / "nli.csv", 330), "--out", out, "--max-steps", "40",
                         "--batch-size", "32", "--chunk-size", "16", "--lr", "3e-3",
                         "--warmup", "5", "--teacher", "all-MiniLM-L6-v2",
                         "--teacher-cache", str(tmp_path / "t.pt")])
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    first, last = sum(r["loss"] for r in log[:5]) / 5, sum(r["loss"] for r in log[-5:]) / 5
    assert last < 0.7 * first
    assert result["after"]["spearman"] > result["before"]["spearman"] + 0.1
    # the output folder is a model: it reloads with the adapter merged
    model, processor, family = stages.load_embedder(out)
    assert not any(isinstance(m, M.LoRALinear) for m in model.modules())


@pytest.mark.slow
def test_toy_stage2_from_the_pretrained_toy_raises_heldout_scores(tmp_path):
    """The embedded default's stage 2 (--init base: from the shipped pretrained toy), shortened:
    the held-out benchmark rises, and the log has the per-step statistics of Table 4."""
    out = tmp_path / "stage2"
    result = train.main(["--stage", "2", "--init", "base", "--out", str(out), "--max-steps",
                         "150", "--lr", "2e-3"])
    before, after = result["before"], result["after"]
    assert after["MMEB-style hit@1"] > before["MMEB-style hit@1"] + 10  # its training tasks
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert sum(r["loss"] for r in log[-20:]) < sum(r["loss"] for r in log[:20])
    assert {"false_negative_share", "valid_negatives", "pos_sim", "hardneg_sim"} <= set(log[0])


def _toy_mmeb(folder, n=240, tasks=toy.default.TASKS):
    """Toy pairs written as an MMEB-train file with PNG images: the real stage-2 reader path.
    `tasks`: only the rows of these toy tasks (row id % 6 names its task)."""
    scenes = shapes.split_scenes(0)["train"]
    ids = [i for i in range(n) if toy.default.TASKS[i % len(toy.default.TASKS)] in tasks]
    rows = toy.default.stage2_rows(scenes, ids, seed=0, train_scenes=set(scenes))
    out = []
    for i, r in enumerate(rows):
        for side in ("qry", "pos"):
            if r[f"{side}_image"] is not None:
                r[f"{side}_image"].save(os.path.join(folder, f"{side}{i}.png"))
        out.append({"qry": r["qry"], "pos_text": r["pos"],
                    "qry_image_path": f"qry{i}.png" if r["qry_image"] else "",
                    "pos_image_path": f"pos{i}.png" if r["pos_image"] else ""})
    write_jsonl(os.path.join(folder, "toy.jsonl"), out)
    return os.path.join(folder, "toy.jsonl")


def free_port():
    """A port no process listens on now, as the OS assigns one (a fixed port may be taken)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process_on_the_global_batch(pretrained_path,
                                                                       tmp_path):
    """train.py under torchrun (2 CPU processes, gloo), both stages: the same loss and
    gradient norm per step as one process on the same global batch."""
    nli = nli_file(tmp_path / "nli.csv", 200)
    mmeb = _toy_mmeb(tmp_path, 64)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for stage, extra in ((1, ["--data", nli, "--teacher", "all-MiniLM-L6-v2",
                              "--teacher-cache", str(tmp_path / "t.pt"), "--eval-pairs", "0"]),
                         (2, ["--data", mmeb, "--image-root", str(tmp_path)])):
        args = ["train.py", "--stage", str(stage), "--model", pretrained_path, "--max-steps",
                "2", "--batch-size", "32", "--chunk-size", "8", "--lora-r", "4",
                "--lora-dropout", "0.0", "--workers", "0", *extra]
        for name, launch in (("one", []), ("two", ["-m", "torch.distributed.run",
                                                   "--nproc_per_node", "2",
                                                   "--master_port", str(free_port())])):
            done = subprocess.run([sys.executable, *launch, *args, "--out",
                                   str(tmp_path / f"{name}{stage}")], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=300)
            # every process exits cleanly: one left to tear gloo down at exit once aborted
            assert done.returncode == 0, f"{name}{stage}: {done.stderr[-4000:]}"
        one, two = ([json.loads(x) for x in open(tmp_path / f"{name}{stage}" / "log.jsonl")]
                    for name in ("one", "two"))
        assert len(one) == len(two) == 2
        for a, b in zip(one, two):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
