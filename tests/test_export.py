"""Exports load anywhere: plain transformers gives the project's embeddings, PEFT the same
model from the adapter, and the model card says what the model is. Also the Python API.

    python -m pytest -q tests/test_export.py
"""
import csv
import functools
import json
import os
import re

import pytest
import torch
from PIL import Image

import export
import families
import model as M
from test_families import (build_checkpoint, one_line_exit, processor_classes_named,
                           rename_processor_class)
from toy import shapes
import stages
import toy.default
import train

TEXTS = ["a small red circle", "two blue squares to the left of a green cross"]


def colour_images(n=2, size=32):
    return [Image.new("RGB", (size, size), (200 * (i % 2), 60 * i % 256, 120)) for i in range(n)]


def stage_run(tmp, stage, model, out, *extra):
    """A two-step run with a large lr and LoRA dropout on: adapters far from zero."""
    if stage == 1:
        data = tmp / "nli.csv"
        with open(data, "w", newline="") as f:
            w = csv.DictWriter(f, ["sent0", "sent1", "hard_neg"])
            w.writeheader()
            w.writerows(toy.default.text_pairs(shapes.split_scenes(0)["train"], 40, seed=0))
        extra = ["--teacher", "all-MiniLM-L6-v2", "--teacher-cache", str(tmp / "t.pt"),
                 "--eval-pairs", "0", *extra]
    else:
        rows = []
        for i, image in enumerate(colour_images(8)):
            image.save(tmp / f"{i}.png")
            rows.append({"qry": "<|image_1|> Represent the given image.",
                         "qry_image_path": f"{i}.png", "pos_text": f"colour {i}",
                         "pos_image_path": ""})
        data = tmp / "mmeb.jsonl"
        data.write_text("\n".join(json.dumps(r) for r in rows))
        extra = ["--image-root", str(tmp), "--k", "4", *extra]
    train.main(["--stage", str(stage), "--model", str(model), "--data", str(data), "--out",
                str(out), "--max-steps", "2", "--batch-size", "8", "--chunk-size", "8",
                "--lr", "5e-2", "--warmup", "1", "--workers", "0", *extra])
    return str(out)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, pretrained_path):
    """A stage-1 output of the pretrained toy, a stage-2 output on it, and a full fine-tune."""
    tmp = tmp_path_factory.mktemp("runs")
    s1 = stage_run(tmp, 1, pretrained_path, tmp / "s1", "--lora-dropout", "0.1")
    return {"s1": s1, "s2": stage_run(tmp, 2, s1, tmp / "s2", "--lora-dropout", "0.1"),
            "full": stage_run(tmp, 2, pretrained_path, tmp / "full", "--lora-r", "0")}


def project_embeddings(path):
    model, processor, family = stages.load_embedder(path)
    model.eval()
    return torch.cat([M.encode(model, processor, family, texts=TEXTS),
                      M.encode(model, processor, family, images=colour_images())])


def card_code(out):
    """The Python block of the model card, as a user would copy it."""
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    return re.search(r"```python\n(.*?)```", card, re.S).group(1)


def test_export_reloads_with_plain_transformers_and_gives_the_projects_embeddings(
        outputs, tmp_path, monkeypatch):
    out = export.main([outputs["s2"], str(tmp_path / "export")])
    monkeypatch.chdir(tmp_path)
    colour_images()[0].save("circle.png")
    scope = {"FOLDER": out}
    code = card_code(out).replace("print(", "_ = (")  # the card's own snippet, run as is
    exec(code, scope)
    _, processor, family = stages.load_embedder(outputs["s2"])
    ours = project_embeddings(outputs["s2"])
    prompt = functools.partial(families.format_prompt, family, processor=processor)
    embed, text_prompt = scope["embed"], prompt(text="{text}")
    theirs = torch.cat([embed([text_prompt.replace("{text}", t) for t in TEXTS]),
                        embed([prompt(image=True)] * 2, colour_images())])
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(scope["images"], ours[2:3], atol=1e-5, rtol=0)
    assert not (ours[:2] - project_embeddings(stages.stage_init(outputs["s2"],
                stages.read_stage_meta(outputs["s2"])))[:2]).abs().max() < 1e-3  # stage 2 did change it


@pytest.mark.parametrize("stage", ["s1", "s2"])
def test_peft_adapter_on_the_stage_start_gives_identical_outputs(outputs, tmp_path, stage,
                                                                 pretrained_path):
    peft = pytest.importorskip("peft", reason="the PEFT check needs peft (test-only dependency)")
    from transformers import AutoModelForImageTextToText
    out = export.main([outputs[stage], str(tmp_path / "export")])
    config = json.load(open(os.path.join(out, "adapter", "adapter_config.json")))
    unmerged, _, _ = stages.load_embedder(outputs[stage], merge=False)
    layers = {n: m for n, m in unmerged.named_modules() if isinstance(m, M.LoRALinear)}
    meta = stages.read_stage_meta(outputs[stage])["lora"]
    assert sorted(config["target_modules"]) == sorted(layers)
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == \
        (meta["r"], meta["alpha"], meta["dropout"])
    base = os.path.join(out, "adapter-base") if stage == "s2" else pretrained_path
    assert os.path.isdir(os.path.join(out, "adapter-base")) == (stage == "s2")
    peft_model = peft.PeftModel.from_pretrained(
        AutoModelForImageTextToText.from_pretrained(base), os.path.join(out, "adapter")).eval()
    _, processor, family = stages.load_embedder(outputs[stage])
    for name, layer in layers.items():  # the very tensors, under PEFT's names
        loaded = peft_model.base_model.model.get_submodule(name)
        assert torch.equal(loaded.lora_B["default"].weight, layer.lora_B)
    with torch.no_grad():
        for batch in (M.process(processor, family, texts=TEXTS),
                      M.process(processor, family, images=colour_images())):
            ours = M.embed(unmerged.eval(), batch)
            theirs = M.embed(peft_model.base_model.model, batch)
            assert torch.equal(theirs, ours)  # identical: the same layers, unmerged
            merged = M.embed(stages.load_embedder(outputs[stage])[0].eval(), batch)
            torch.testing.assert_close(theirs, merged, atol=1e-5, rtol=0)


def test_model_card_names_the_base_stages_prompts_and_pooling(outputs, tmp_path, pretrained_path):
    out = export.main([outputs["s2"], str(tmp_path / "export")])
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert f"from **{pretrained_path}**" in card
    assert "stage 1, textual" in card and "stage 2, hard-negative" in card
    assert "LoRA r=4" not in card and "LoRA r=32, alpha=64" in card  # the DEFAULTS of stage 1
    _, processor, family = stages.load_embedder(outputs["s2"])
    assert repr(families.format_prompt(family, image=True, processor=processor)) in card
    assert "'<image> Represent the given image for classification.'" in card  # MMEB, raw
    assert "'USER: {text}\\nSummary above sentence in one word: ASSISTANT:'" in card
    assert "last_hidden_state" in card and "F.normalize" in card
    assert "it applies to `adapter-base/`" in card


def test_a_full_fine_tune_exports_the_model_and_card_only(outputs, tmp_path):
    out = export.main([outputs["full"], str(tmp_path / "export")])
    assert not os.path.exists(os.path.join(out, "adapter"))
    assert "No adapter" in open(os.path.join(out, "README.md")).read()
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained(out)
    reference = stages.load_embedder(outputs["full"])[0]
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name


def test_export_is_atomic_refuses_nonempty_folders_and_overwrites_only_an_export(
        outputs, tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        with pytest.raises(SystemExit, match="not empty|not one"):
            export.main([outputs["s1"], str(mine), *extra])
    assert os.listdir(mine) == ["notes.txt"]
    with pytest.raises(SystemExit, match="not a finished stage output"):
        export.main([str(mine), str(tmp_path / "x")])
    out = tmp_path / "export"
    export.main([outputs["s1"], str(out)])
    with pytest.raises(SystemExit, match="pass --overwrite"):
        export.main([outputs["s1"], str(out)])
    mask = os.umask(0)
    os.umask(mask)
    for folder, _, files in os.walk(out):  # usual permissions, the folder included
        for name in files + [""]:
            assert os.stat(os.path.join(folder, name)).st_mode & 0o777 in (
                0o666 & ~mask, 0o777 & ~mask), os.path.join(folder, name)
    first = os.stat(out / "model.safetensors").st_mtime_ns

    def crash(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(export, "write_adapter", crash)
    with pytest.raises(KeyboardInterrupt):  # killed half-way: the earlier export is intact
        export.main([outputs["s1"], str(out), "--overwrite"])
    assert os.stat(out / "model.safetensors").st_mtime_ns == first
    assert sorted(os.listdir(tmp_path)) == ["export", "mine"]  # no temporary folder left
    monkeypatch.undo()
    export.main([outputs["s1"], str(out), "--overwrite"])
    assert os.stat(out / "model.safetensors").st_mtime_ns != first
    (out / "mine.txt").write_text("not the export's")
    with pytest.raises(SystemExit, match="holds files no export wrote"):
        export.main([outputs["s1"], str(out), "--overwrite"])


def test_every_file_of_a_run_and_an_evaluation_cache_has_the_usual_permissions(outputs, tmp_path):
    import eval as ev
    mask = os.umask(0)
    os.umask(mask)
    cache = ev.EmbeddingCache("m", str(tmp_path / "cache"))
    cache.embed([("a", None, None)], lambda inputs: torch.ones(len(inputs), 2))
    folders = [outputs[k] for k in outputs] + [str(tmp_path / "cache")]
    files = [os.path.join(d, f) for top in folders for d, _, fs in os.walk(top) for f in fs]
    teacher = os.path.join(os.path.dirname(outputs["s1"]), "t.pt")  # the teacher cache's shards
    files += [os.path.join(teacher, f) for f in os.listdir(teacher)]
    assert len(files) > 12
    for path in files:
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask, path  # not mkstemp's 0600


# ---------------------------------------------------------------- the Python API

def test_python_api_embeds_texts_images_and_pairs_with_and_without_instructions(
        pretrained_path, tmp_path):
    model, processor, family = stages.load_embedder(pretrained_path)
    images = colour_images(2)
    images[0].save(tmp_path / "a.png")
    question = "<|image_1|> Represent the given image with the following question:"
    inputs = [("a red circle", None, None), (None, str(tmp_path / "a.png"), None),
              (None, images[1], None), ("what colour is it?", images[0], None),
              ("what colour is it?", images[0], question),
              (None, None, "Find me an everyday image that matches: a red circle")]
    e = M.embed_inputs(model, processor, family, inputs, batch_size=2)
    assert e.shape == (6, 64) and e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=1), torch.ones(6))
    one = lambda **kw: M.encode(model, processor, family, **kw)  # noqa: E731  row by row
    expected = torch.cat([
        one(texts=["a red circle"]), one(images=[images[0]]), one(images=[images[1]]),
        one(texts=["what colour is it?"], images=[images[0]]),
        one(images=[images[0]], instructions=[f"{question} what colour is it?"]),
        one(instructions=["Find me an everyday image that matches: a red circle"])])
    torch.testing.assert_close(e, expected, atol=1e-5, rtol=0)
    assert len({tuple(v.round(decimals=4).tolist()) for v in e}) == 6  # six different inputs


def test_a_bf16_export_is_half_the_size_and_embeds_alike(outputs, tmp_path):
    from transformers import AutoModelForImageTextToText
    full = export.main([outputs["s1"], str(tmp_path / "fp32")])
    half = export.main([outputs["s1"], str(tmp_path / "bf16"), "--dtype", "bf16"])
    size = lambda out: os.path.getsize(os.path.join(out, "model.safetensors"))  # noqa: E731
    assert size(half) < 0.6 * size(full)
    model = AutoModelForImageTextToText.from_pretrained(half, dtype="auto")
    assert model.dtype == torch.bfloat16
    _, processor, family = stages.load_embedder(half)
    batch = M.process(processor, family, texts=TEXTS)
    reference = M.embed(stages.load_embedder(outputs["s1"])[0].eval(), batch)
    with torch.no_grad():
        torch.testing.assert_close(M.embed(model.eval(), batch), reference, atol=3e-2, rtol=0)


# ---------------------------------------------------------------- exports keep their images

EXPORT_FAMILIES = {"qwen2_vl": "Qwen2VLProcessor", "llava_onevision": "LlavaOnevisionProcessor",
                   "smolvlm": "SmolVLMProcessor"}  # the processor classes their downloads name


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPORT_FAMILIES))
def test_an_export_embeds_an_image_as_its_run_does_or_refuses(name, tmp_path):
    """A stage-2 run of a video-processor family (built here without torchvision) and its
    export: the export's files name the processor class a download names; the Python API gives
    an image the same vector on the run and on the export. Processor files that make
    AutoProcessor return a bare tokenizer (an export of the earlier export.py) stop in one line,
    and an image given with a tokenizer is refused: never a vector without its image."""
    run = stage_run(tmp_path, 2, build_checkpoint(name, tmp_path), tmp_path / "s2",
                    "--lora-r", "2", "--lora-alpha", "4")
    out = export.main([run, str(tmp_path / "export")])
    assert processor_classes_named(out) == {EXPORT_FAMILIES[name]}
    image = [(None, str(tmp_path / "0.png"), None), ("colour 1", str(tmp_path / "1.png"), None)]
    on_run, on_export = (M.embed_inputs(*stages.load_embedder(path), image) for path in (run, out))
    torch.testing.assert_close(on_export, on_run, atol=1e-5, rtol=0)
    model, processor, family = stages.load_embedder(out)
    with pytest.raises(ValueError, match=f"the {name} processor given is a .*cannot take images"):
        M.embed_inputs(model, processor.tokenizer, family, image)
    rename_processor_class(out, f"{EXPORT_FAMILIES[name]}ImagesOnly")
    one_line_exit(lambda: stages.load_embedder(out), name, "export the run again")
