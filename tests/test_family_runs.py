"""Every backbone family through the whole pipeline, the way a downloaded checkpoint goes: its
tiny random checkpoint (tiny_backbones.py) named by path to train.py for one stage-1 step and
one stage-2 step on data files in the paper's formats, then the stage-2 output scored by
`eval.py --task mmeb`.

    pytest -q tests/test_family_runs.py

Phi-3.5-V's folder holds remote code (tiny_phi3_v.py): it runs with `--trust-remote-code`, as a
download does; test_phi3_v.py takes it through every step, export included.
"""
import argparse
import csv
import functools
import json
import math
import os

import pytest
import torch
from PIL import Image

import distill
import eval as ev
import model as M
import stages
import tiny_backbones as tiny
import train
from test_families import SPECS, build, build_checkpoint, one_line_exit, rename_processor_class
from test_families import one_thread  # noqa: F401  (autouse: one torch thread here too)

@pytest.fixture(scope="module")
def paper_data(tmp_path_factory):
    """Tiny files in the real formats: SimCSE's NLI CSV, MMEB-train JSONL and two MMEB-eval
    subsets (image -> label, text -> image) with their images under one root."""
    root = tmp_path_factory.mktemp("data")
    colours = ["red", "blue", "green", "yellow"]
    for i, colour in enumerate(colours):  # sizes differ: tiling families pick other grids
        Image.new("RGB", (24 + 8 * i, 16 + 4 * (i % 2)), colour).save(root / f"{colour}.png")
    with open(root / "nli.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sent0", "sent1", "hard_neg"])
        for i, colour in enumerate(colours * 2):
            writer.writerow([f"a {colour} cat sat on a mat", f"the cat is {colour}",
                             f"a dog ran in the park {i}"])
    image_prompt = "<|image_1|>\nRepresent the given image."
    train_rows = [{"qry": "<|image_1|>\nRepresent the given image for classification.",
                   "qry_image_path": f"{c}.png", "pos_text": c, "pos_image_path": ""}
                  for c in colours]
    train_rows += [{"qry": f"Find me an everyday image that matches the given caption: {c}.",
                    "qry_image_path": "", "pos_text": image_prompt, "pos_image_path": f"{c}.png"}
                   for c in colours]
    write_jsonl(root / "mmeb_train.jsonl", train_rows)
    write_jsonl(root / "ImageNet-1K.jsonl", [
        {"qry_text": "<|image_1|>\nRepresent the given image for classification.",
         "qry_img_path": f"{c}.png", "tgt_text": [c] + [o for o in colours if o != c],
         "tgt_img_path": [""] * len(colours)} for c in colours])
    write_jsonl(root / "MSCOCO_t2i.jsonl", [
        {"qry_text": f"Find me an everyday image that matches the given caption: {c}.",
         "qry_img_path": "", "tgt_text": [image_prompt] * len(colours),
         "tgt_img_path": [f"{c}.png"] + [f"{o}.png" for o in colours if o != c]}
        for c in colours])
    return root


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def steps(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_pipeline(model, root, tmp, flags=()):
    """Stage 1 from `model`, stage 2 from its output, MMEB eval of that -> (metas, result).
    flags: more train.py flags (--family; --trust-remote-code, which eval.py gets too)."""
    common = ["--max-steps", "1", "--batch-size", "4", "--chunk-size", "2", "--lora-r", "2",
              "--lora-alpha", "4", "--workers", "0", "--device", "cpu", *flags]
    train.main(["--stage", "1", "--model", model, "--data", str(root / "nli.csv"),
                "--out", str(tmp / "stage1"), "--eval-pairs", "0", "--teacher", "all-MiniLM-L6-v2",
                "--teacher-cache", str(root / "teacher.pt"), *common])
    train.main(["--stage", "2", "--model", str(tmp / "stage1"), "--data",
                str(root / "mmeb_train.jsonl"), "--image-root", str(root), "--k", "2",
                "--out", str(tmp / "stage2"), *common])
    remote = [f for f in flags if f == "--trust-remote-code"]
    result = ev.main(["--task", "mmeb", "--model", str(tmp / "stage2"), "--data",
                      str(root / "ImageNet-1K.jsonl"), str(root / "MSCOCO_t2i.jsonl"),
                      "--image-root", str(root), "--cache-dir", "", "--out",
                      str(tmp / "results.json"), *remote])
    return [stages.read_stage_meta(tmp / s) for s in ("stage1", "stage2")], result


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SPECS))
def test_stage1_stage2_and_mmeb_eval_by_path(name, paper_data, tmp_path):
    """One step of each stage and an MMEB evaluation through train.py and eval.py's own entry
    points: the family is read from the checkpoint, stage 1 adapts the decoder only, stage 2 the
    vision side and projector too, and both steps give a finite loss and gradient."""
    family, _, decoder, projector = SPECS[name]
    remote = ("--trust-remote-code",) if name == "phi3_v" else ()
    (meta1, meta2), result = run_pipeline(build_checkpoint(name, tmp_path), paper_data, tmp_path,
                                          remote)
    assert meta1["family"] == meta2["family"] == family
    assert all(t.startswith(decoder) for t in meta1["lora"]["targets"])
    assert set(projector) <= set(meta2["lora"]["targets"])
    assert {t for t in meta2["lora"]["targets"] if t.startswith(decoder)} == \
        set(meta1["lora"]["targets"])
    for stage in ("stage1", "stage2"):
        (record,) = steps(tmp_path / stage)
        assert math.isfinite(record["loss"]) and record["grad_norm"] > 0
    scores = result["models"][str(tmp_path / "stage2")]["datasets"]
    assert scores == pytest.approx(mmeb_by_hand(tmp_path / "stage2", paper_data, family,
                                                 bool(remote)))


# VLM2Vec's MMEB evaluation sizes (`image_resolution` "high"), written out; others unresized
EVAL_SIDE = {"llava_next": 1344, "llava_onevision": 1344, "qwen2_vl": 1344, "qwen2_5_vl": 1344}


def mmeb_by_hand(path, root, family, trust_remote_code=False):
    """The MMEB scores from the model's own embeddings, one input at a time: each row's query
    against its own candidates, a hit when the first (gold) one scores highest."""
    model, processor, _ = stages.load_embedder(path, trust_remote_code=trust_remote_code)
    side = EVAL_SIDE.get(family)

    @functools.cache  # candidates repeat across rows
    def embed(text, image):
        if image:
            image = Image.open(root / image).convert("RGB")
            image = image.resize((side, side)) if side else image
        return M.encode(model.eval(), processor, family, images=[image or None],
                        instructions=[text])[0]
    scores = {}
    for subset in ("ImageNet-1K", "MSCOCO_t2i"):
        hits = []
        for line in (root / f"{subset}.jsonl").read_text().splitlines():
            row = json.loads(line)
            query = embed(row["qry_text"], row["qry_img_path"])
            scores_ = [float(embed(t, i) @ query) for t, i in zip(row["tgt_text"],
                                                                 row["tgt_img_path"])]
            hits.append(max(range(len(scores_)), key=scores_.__getitem__) == 0)
        scores[subset] = 100 * sum(hits) / len(hits)
    return scores


def test_a_model_type_without_a_family_runs_with_family(paper_data, tmp_path):
    """Qwen3-VL-MoE has no row of its own: loading it by path names --family, and with
    `--family qwen3_vl` it trains; its stage output then evaluates by path alone."""
    path = build_checkpoint("qwen3_vl_moe", tmp_path)
    with pytest.raises(SystemExit, match="unknown backbone family 'qwen3_vl_moe'.*--family"):
        M.load_mllm(path)
    (meta1, meta2), result = run_pipeline(path, paper_data, tmp_path, ("--family", "qwen3_vl"))
    assert meta1["family"] == meta2["family"] == "qwen3_vl"
    scores = result["models"][str(tmp_path / "stage2")]["datasets"]
    assert scores == pytest.approx(mmeb_by_hand(tmp_path / "stage2", paper_data, "qwen3_vl"))


@pytest.mark.parametrize("name", ["phi3_v", "llava_next"])
def test_stage2_rows_get_the_familys_max_len_and_336_px_images(name, paper_data, tmp_path):
    """train.py's stage-2 batches, as VLM2Vec's collator makes them at the official max_len
    (Phi-3.5-V: 256): a text-only row keeps its first 256 tokens; a row with an image is whole,
    as the hub's processor leaves it (its image alone is 757 tokens here), never "no room".
    Images squashed to 336 x 336 (§4.1), except Phi-3.5-V's, which its processor tiles (32 x 20
    at 4 crops: a 2 x 2 grid, 672 x 672). LLaVA-NeXT (4096): both rows whole."""
    family, model, processor = build(name, tmp_path)
    words = " ".join(f"word{i}" for i in range(300))
    image_row = f"<|image_1|>\nRepresent the given image with the following question: {words} " \
        "What is it?"
    text_row = f"Find me an everyday image that matches the given caption: {words} The end."
    rows = [{"qry": image_row, "qry_image": str(paper_data / "blue.png"), "pos": text_row,
             "pos_image": None}] * 2
    args = argparse.Namespace(stage=2, batch_size=2, seed=0, chunk_size=2, image_size=336,
                              hard_negatives=False, max_steps=1)
    source = {"n_rows": 2, "rows": lambda ids: [rows[i] for i in ids]}
    sides = train.StepBatches(args, source, processor, family, 0, 1)[0]["sides"]
    (_, images), (_, texts) = sides["qry"][0], sides["pos"][0]
    if name == "phi3_v":  # the processor by itself, untruncated, one prompt per call
        whole = processor(image_row, [Image.open(paper_data / "blue.png").convert("RGB")])
        assert (whole["input_ids"] < 0).sum() == 757
        assert images["input_ids"].tolist() == whole["input_ids"].tolist() * 2
        assert images["image_sizes"].tolist() == [[672, 672]] * 2
        first = processor(text_row)["input_ids"][0][:256].tolist()
        assert texts["input_ids"].tolist() == [first] * 2
    else:  # no official cut below 4096: the whole row
        n_tokens = images["attention_mask"].sum(1)
        assert (n_tokens > 300).all() and images["image_sizes"].tolist() == [[336, 336]] * 2
        for chunk, end in ((images, " What is it?"), (texts, " The end.")):
            ends = processor.tokenizer(end, add_special_tokens=False)["input_ids"]
            assert chunk["input_ids"][0, -len(ends):].tolist() == ends


def test_mmeb_eval_takes_the_familys_image_size_unless_told(paper_data, tmp_path):
    """VLM2Vec's MMEB evaluation resizes LLaVA-NeXT's images to 1344 x 1344; the zero-shot
    tasks and `--image-size original` keep them (UniME's own README command does)."""
    path = build_checkpoint("llava_next", tmp_path)
    model, processor, family = M.load_mllm(path)
    image = Image.open(paper_data / "red.png").convert("RGB")
    row = "<|image_1|>\nRepresent the given image for classification."

    def by_hand(side):  # the reference: the image resized here, not by the code under test
        return M.encode(model.eval(), processor, family, images=[image.resize((side, side))
                        if side else image], instructions=[row])
    x = [(None, str(paper_data / "red.png"), row)]
    official = ev.load_for_eval(path, mmeb=True)(x)
    torch.testing.assert_close(official, by_hand(1344), atol=1e-5, rtol=1e-5)
    for kept in (ev.load_for_eval(path, mmeb=True, image_size="original"), ev.load_for_eval(path)):
        torch.testing.assert_close(kept(x), by_hand(None), atol=1e-5, rtol=1e-5)
    assert (official - by_hand(None)).abs().max() > 1e-4  # the size matters to this model


# ---------------------------------------------------------------- errors, early and in one line

def stage1(model, root, out, *extra):
    return lambda: train.main(["--stage", "1", "--model", str(model), "--data",
                               str(root / "nli.csv"), "--out", str(out), "--teacher",
                               "all-MiniLM-L6-v2", "--max-steps", "1", "--batch-size", "4",
                               "--workers", "0", "--device", "cpu", *extra])


def test_a_typoed_local_folder_is_no_such_folder(paper_data, tmp_path):
    """A folder path that is not there is named as such, not as a malformed hub id."""
    for typo in (tmp_path / "modle", "./runs/stage1-typo"):
        one_line_exit(stage1(typo, paper_data, tmp_path / "out"), "no such folder", str(typo))
        one_line_exit(lambda: stages.load_embedder(str(typo)), "no such folder")


def test_the_backbone_is_checked_before_the_teacher_runs(paper_data, tmp_path, monkeypatch):
    """An unknown model_type, a text-only LLM (with or without --family llava) and processor
    files that would drop images stop before the teacher's pass (hours with NV-Embed-v2), in
    one line; --family on a text-only model is refused in stage 2 too."""
    def teacher_ran(*args, **kwargs):
        raise AssertionError("the teacher ran before the model was checked")
    monkeypatch.setattr(distill, "teacher_targets", teacher_ran)
    moe = build_checkpoint("qwen3_vl_moe", tmp_path / "moe")
    one_line_exit(stage1(moe, paper_data, tmp_path / "a"), "qwen3_vl_moe", "--family")
    llama = tiny.build_llama(str(tmp_path / "llama"))
    for family in ([], ["--family", "llava"]):
        one_line_exit(stage1(llama, paper_data, tmp_path / "b", *family), "text-only", "llama")
    one_line_exit(lambda: train.main([
        "--stage", "2", "--model", llama, "--family", "llava", "--data",
        str(paper_data / "mmeb_train.jsonl"), "--image-root", str(paper_data), "--out",
        str(tmp_path / "c"), "--max-steps", "1", "--batch-size", "4", "--workers", "0"]),
        "text-only")
    old_export = build_checkpoint("qwen2_vl", tmp_path / "qwen")
    rename_processor_class(old_export, "Qwen2VLProcessorImagesOnly")
    one_line_exit(stage1(old_export, paper_data, tmp_path / "d"), "qwen2_vl",
                  "export the run again")


def test_a_moved_run_is_told_which_base_it_needs(paper_data, tmp_path):
    """A LoRA stage output records its base by a relative path; moved without it, loading it
    (stage 2 from it, eval.py, the Python API) names that path and the two ways out, and never
    says to retrain."""
    base = build_checkpoint("llava", tmp_path / "work")
    run = tmp_path / "work" / "stage1"
    stage1(base, paper_data, run, "--eval-pairs", "0", "--teacher-cache",
           str(tmp_path / "t.pt"), "--lora-r", "2")()
    moved = tmp_path / "elsewhere" / "stage1"
    moved.parent.mkdir()
    os.replace(run, moved)
    expected = os.path.normpath(moved / ".." / "model")
    for load in (lambda: stages.load_embedder(str(moved)),
                 lambda: ev.main(["--task", "mmeb", "--model", str(moved), "--data",
                                  str(paper_data / "ImageNet-1K.jsonl"), "--image-root",
                                  str(paper_data), "--cache-dir", ""]),
                 lambda: train.main(["--stage", "2", "--model", str(moved), "--data",
                                     str(paper_data / "mmeb_train.jsonl"), "--image-root",
                                     str(paper_data), "--out", str(tmp_path / "s2"),
                                     "--max-steps", "1", "--batch-size", "4"])):
        message = one_line_exit(load, expected, "copy that model along", "export.py")
        assert "etrain" not in message


def test_the_offline_stage1_commands_name_their_teacher():
    """NV-Embed-v2 is downloaded unless --teacher names a local folder: every stage-1 command
    for a real model in the docs shows --teacher."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    docs = [os.path.join(root, "README.md")] + [
        os.path.join(root, "docs", f) for f in os.listdir(os.path.join(root, "docs"))]
    commands = [c for path in docs for c in open(path, encoding="utf-8").read()
                .replace("\\\n", " ").splitlines()
                if "train.py --stage 1" in c and "--model" in c]
    assert commands and all("--teacher" in c for c in commands), commands
