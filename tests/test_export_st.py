"""An export is a sentence-transformers model: `SentenceTransformer(export).encode` gives the
project's embeddings (`model.embed_inputs` on the run) for text, images, text + image and MMEB
instructions, in every family whose processor loads here, with no code of this project; and
MTEB scores it offline. sentence-transformers and mteb are test-only dependencies.

    python -m pytest -q tests/test_export_st.py
"""
import functools
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import export
import families
import model as M
import stages
import tiny_backbones as tiny

st = pytest.importorskip("sentence_transformers",
                         reason="sentence-transformers is a test-only dependency: pip install it")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHVISION = importlib.util.find_spec("torchvision") is not None
TASK = "<|image_1|> Represent the given image with the following question:"
BUILDERS = {
    "llava": tiny.build_llava, "llava_next": tiny.build_llava_next,
    "llava_onevision": tiny.build_llava_onevision, "qwen2_vl": tiny.build_qwen_vl,
    "qwen2_5_vl": functools.partial(tiny.build_qwen_vl, family="qwen2_5_vl"),
    "qwen3_vl": functools.partial(tiny.build_qwen_vl, family="qwen3_vl"),
    "idefics3": tiny.build_idefics3, "smolvlm": tiny.build_smolvlm,
    "internvl": tiny.build_internvl, "gemma3": tiny.build_gemma3}


def inputs():
    """(text, image, instruction) rows: zero-shot text, image, text + image; MMEB rows."""
    red, blue = tiny.images()
    return [("a red cat sat on a mat", None, None), (None, red, None), ("a blue dog", blue, None),
            ("a red cat", None, "Find me an everyday image that matches the given caption:"),
            (None, blue, "<|image_1|> Represent the given image for classification."),
            ("what colour is it?", red, TASK)]


def st_input(text, image):
    return text if image is None else image if text is None else {"text": text, "image": image}


def stage_output(folder, init):
    """A stage-2 output of `init` as train.py writes one (adapter.pt + unime.json), its LoRA on
    every linear layer with B random: the adapter changes every embedding."""
    model, processor, family = M.load_mllm(init)
    lora = dict(r=4, alpha=8, dropout=0.0,
                targets=families.lora_targets(model, family, include_vision=True))
    M.inject_lora(model, **lora)
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, M.LoRALinear):
            m.lora_B.data = 0.1 * torch.randn(m.lora_B.shape, generator=g)
    stages.save_stage_output(str(folder), model, processor, init, 2, family, lora)
    return str(folder)


def exported(tmp, init):
    """(run, export) of `init`, after checking the export has the files of a sentence-
    transformers model."""
    run = stage_output(tmp / "run", init)
    out = export.export(run, str(tmp / "export"))
    assert os.path.isfile(os.path.join(out, "modules.json"))
    return run, out


def project_vectors(run, rows):
    net, processor, family = stages.load_embedder(run)
    return M.embed_inputs(net.eval(), processor, family, rows)


def st_vectors(model, rows):
    """One encode call per row (each row's prompt is its own), then all zero-shot rows in one
    mixed batch: padding and batching must not change a vector."""
    one = torch.cat([model.encode([st_input(t, im)], prompt=ins, convert_to_tensor=True)
                     for t, im, ins in rows])
    zero_shot = [st_input(t, im) for t, im, ins in rows if ins is None]
    return one, model.encode(zero_shot, batch_size=len(zero_shot), convert_to_tensor=True)


def assert_parity(run, out):
    rows = inputs()
    ours = project_vectors(run, rows)
    one, batched = st_vectors(st.SentenceTransformer(out), rows)
    torch.testing.assert_close(one, ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched, ours[:3], atol=1e-5, rtol=0)
    assert len({tuple(v.round(decimals=3).tolist()) for v in ours}) == len(rows)  # all differ


@pytest.fixture(scope="module")
def toy_export(tmp_path_factory, pretrained_path):
    """The shipped toy LLaVA's (run, export)."""
    return exported(tmp_path_factory.mktemp("toy"), pretrained_path)


def test_the_toys_export_encodes_text_images_and_pairs_as_the_project(toy_export):
    assert_parity(*toy_export)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BUILDERS) + ["phi3_v"])
def test_every_familys_export_encodes_as_the_project(name, tmp_path):
    if name == "phi3_v":
        pytest.skip("Phi-3.5-V is remote code that registers AutoModelForCausalLM only, with a "
                    "processor that takes one prompt per call: no sentence-transformers files "
                    "(docs/export.md)")
    if name == "smolvlm" and importlib.util.find_spec("num2words") is None:
        pytest.skip("SmolVLM's processor needs the num2words package")
    ckpt = BUILDERS[name](str(tmp_path / "ckpt"))
    if not TORCHVISION and name in ("llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl",
                                    "smolvlm", "internvl"):
        from transformers import AutoProcessor
        with pytest.raises(ImportError, match="(?i)torchvision"):  # the only reason to skip
            AutoProcessor.from_pretrained(ckpt)
        pytest.skip(f"{name}'s processor needs torchvision (its video processor), not installed "
                    f"here; sentence-transformers loads it through AutoProcessor")
    assert_parity(*exported(tmp_path, ckpt))


def test_the_named_prompts_are_the_in_one_word_prompts_and_the_config_says_how(toy_export):
    run, out = toy_export
    model = st.SentenceTransformer(out)
    text, image = "a red circle", tiny.images()[0]
    default = model.encode([text, image], convert_to_tensor=True)
    torch.testing.assert_close(model.encode([text], prompt_name="text", convert_to_tensor=True),
                               default[:1], atol=1e-6, rtol=0)
    torch.testing.assert_close(model.encode([image], prompt_name="image", convert_to_tensor=True),
                               default[1:], atol=1e-6, rtol=0)
    other = model.encode([image], prompt_name="text", convert_to_tensor=True)
    assert (other - default[1:]).abs().max() > 1e-3  # the prompt reaches the model
    config = json.load(open(os.path.join(out, "sentence_bert_config.json")))
    assert config["processing_kwargs"]["text"]["padding_side"] == "left"
    assert json.load(open(os.path.join(out, "1_Pooling", "config.json")))["pooling_mode"] == \
        "lasttoken"
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Normalize"]
    card = open(os.path.join(out, "README.md")).read()
    assert "SentenceTransformer(FOLDER)" in card and "sentence-transformers (>= 5.4.0" in card


@pytest.mark.slow
def test_an_export_loads_with_no_code_of_this_project(toy_export, tmp_path):
    """A fresh interpreter outside the repository: the project's modules cannot be imported
    there, and its vectors are the project's."""
    run, out = toy_export
    rows = inputs()
    for i, image in enumerate(tiny.images()):
        image.save(tmp_path / f"{i}.png")
    code = f"""
import importlib.util, json, sys
from PIL import Image
from sentence_transformers import SentenceTransformer
assert importlib.util.find_spec("families") is None and importlib.util.find_spec("model") is None
red, blue = Image.open("0.png"), Image.open("1.png")
model = SentenceTransformer({out!r})
v = model.encode(["a red cat sat on a mat", red, {{"text": "a blue dog", "image": blue}}])
w = model.encode([{{"text": "what colour is it?", "image": red}}], prompt={TASK!r})
json.dump([x.tolist() for x in list(v) + list(w)], open("v.json", "w"))
print(sorted(m for m in sys.modules if m in ("families", "model", "export", "train")))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    theirs = torch.tensor(json.load(open(tmp_path / "v.json")))
    ours = project_vectors(run, [rows[0], rows[1], rows[2], rows[5]])
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_no_sentence_transformers_files_where_they_would_be_wrong(tmp_path, capsys):
    """Phi-3.5-V, a processor saved under a class transformers does not have (AutoProcessor
    would give a bare tokenizer and drop every image), and a chat template that changes the
    text: nothing is written, and one line says why."""
    (tmp_path / "processor_config.json").write_text('{"processor_class": "NoSuchProcessor"}')
    for family in ("phi3_v", "llava"):
        export.write_sentence_transformers(str(tmp_path), None, None, family)
        assert not os.path.exists(tmp_path / "modules.json")
    said = capsys.readouterr().out
    assert "phi3_v model: its remote code" in said and "saved as NoSuchProcessor" in said
    processor = M.load_mllm(tiny.build_llava(str(tmp_path / "llava")))[1]
    processor.chat_template = processor.chat_template.replace("c['text']", "c['text'] | trim")
    with pytest.raises(ValueError, match="renders .* where UniME has|changes the text"):
        export.sentence_transformers_template("llava", processor)


@pytest.mark.slow
def test_mteb_scores_an_export_offline_with_a_text_and_an_image_task(toy_export, monkeypatch):
    """MTEB 2.x's own tasks (STSBenchmark; CIFAR100ZeroShot from its image benchmark MIEB) run
    on local rows through its sentence-transformers wrapper; their scores equal the ones
    computed here from the project's own embeddings."""
    mteb = pytest.importorskip("mteb", reason="mteb is a test-only dependency: pip install it")
    import datasets
    from mteb.models import SentenceTransformerEncoderWrapper
    from scipy.stats import spearmanr
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    run, out = toy_export
    wrapped = SentenceTransformerEncoderWrapper(st.SentenceTransformer(out))
    wrapped.mteb_model_meta = wrapped.mteb_model_meta.model_copy(
        update={"name": "unime/toy", "modalities": ["image", "text"]})
    a = ["a red circle", "two blue squares", "a green cross left of a circle", "a red square"]
    b = ["a red ring", "a green circle", "a cross and a circle", "two red squares"]
    gold = [4.0, 1.0, 3.5, 2.0]
    sts = mteb.get_task("STSBenchmark")
    sts.dataset = datasets.DatasetDict({"test": datasets.Dataset.from_dict(
        {"sentence1": a, "sentence2": b, "score": gold})})
    names = ["red thing", "blue thing", "green thing"]
    images = [tiny.images()[0], tiny.images()[1], tiny.images()[0].convert("L").convert("RGB")]
    zero_shot = mteb.get_task("CIFAR100ZeroShot")
    zero_shot.dataset = datasets.DatasetDict({"test": datasets.Dataset.from_dict(
        {"img": images, "fine_label": [0, 1, 2]}, features=datasets.Features(
            {"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=names)}))})
    for task in (sts, zero_shot):
        task.data_loaded = True  # the rows above: nothing is downloaded
    result = mteb.evaluate(wrapped, [sts, zero_shot], cache=None, show_progress_bar=False,
                           encode_kwargs={"batch_size": 2})
    scores = {r.task_name: r.scores["test"][0] for r in result.task_results}
    e = project_vectors(run, [(t, None, None) for t in a + b])
    expected = spearmanr((e[:4] * e[4:]).sum(1), gold).statistic
    assert scores["STSBenchmark"]["cosine_spearman"] == pytest.approx(expected, abs=1e-6)
    labels = project_vectors(run, [(f"a photo of a {n}.", None, None) for n in names])
    pictures = project_vectors(run, [(None, im, None) for im in images])
    accuracy = ((pictures @ labels.T).argmax(1) == torch.arange(3)).float().mean()
    assert scores["CIFAR100ZeroShot"]["accuracy"] == pytest.approx(float(accuracy), abs=1e-6)
