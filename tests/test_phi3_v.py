"""Phi-3.5-V, the paper's main backbone, through its remote-code contract: a tiny checkpoint
folder laid out as the hub's (tiny_phi3_v.py; remote code in phi3_v_remote/), loaded with
`--trust-remote-code` exactly as a download is, then every step through the command line.

    pytest -q tests/test_phi3_v.py

The expectations come from the hub code's rules, worked by hand here: the HD transform's crop
grid and token count, the processor's one-prompt-per-call contract, the in-place clamp of
`input_ids`, `vision_embed_tokens.wte` being `embed_tokens`, `_tied_weights_keys` as a list.
"""
import importlib.util
import json
import os

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor

import config
import eval as ev
import export
import families
import model as M
import tiny_phi3_v
import stages
import train
from test_families import one_thread  # noqa: F401  (autouse: one torch thread here too)
from test_family_runs import paper_data  # noqa: F401  (the data files, in the real formats)

ROW = "<|image_1|>\nRepresent the given image for classification."


@pytest.fixture(scope="module")
def phi(tmp_path_factory):
    return tiny_phi3_v.build_phi3_v(str(tmp_path_factory.mktemp("phi") / "Phi-3.5-V"))


def tokens_by_hand(width, height, num_crops):
    """The hub's HD rule, by hand: transpose a tall image; the largest `scale` with
    scale * ceil(scale / ratio) <= num_crops; width scale * 336, height int(width / ratio)
    padded up to a multiple of 336; then 144 tokens per crop and for the global crop, 12
    newline tokens per row of crops and for the global one, and one separator."""
    w, h = max(width, height), min(width, height)
    scale = max(s for s in range(1, num_crops + 1) if s * -(-s * h // w) <= num_crops)
    rows, cols = -(-int(scale * 336 * h / w) // 336), scale
    if width < height:
        rows, cols = cols, rows
    return (rows * cols + 1) * 144 + 1 + (rows + 1) * 12, [rows * 336, cols * 336]


# ---------------------------------------------------------------- the download's contract

def test_the_folder_loads_as_a_download_only_with_trust_remote_code(phi):
    """config.json, preprocessor_config.json and tokenizer_config.json name the remote classes;
    the Auto classes build them from the folder's own .py files, and the project refuses the
    folder in one line without --trust-remote-code."""
    for name in ("config.json", "preprocessor_config.json", "tokenizer_config.json"):
        with open(os.path.join(phi, name)) as f:
            assert "auto_map" in json.load(f), name
    config = AutoConfig.from_pretrained(phi, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(phi, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(phi, trust_remote_code=True)
    assert (type(config).__name__, type(model).__name__, type(processor).__name__) == \
        ("Phi3VConfig", "Phi3VForCausalLM", "Phi3VProcessor")
    assert type(model).__module__.startswith("transformers_modules.")  # the folder's code
    with pytest.raises(SystemExit, match="--trust-remote-code"):
        M.load_mllm(phi)


def test_image_token_counts_and_crops_are_the_hubs(phi):
    """757 tokens for 500 x 400 at num_crops 4 (a 2 x 2 grid of 336-px crops), 313 for
    336 x 336 at 1 crop; pixel_values padded to num_crops + 1 crops of 336 px; the padding
    rows of the HD image are white."""
    assert tokens_by_hand(500, 400, 4) == (757, [672, 672])
    assert tokens_by_hand(336, 336, 1) == (313, [336, 336])
    for (w, h), crops in [((500, 400), 4), ((336, 336), 1), ((300, 700), 4), ((640, 200), 4)]:
        processor = AutoProcessor.from_pretrained(phi, trust_remote_code=True, num_crops=crops)
        out = processor(ROW, [Image.new("RGB", (w, h), (200, 0, 0))], return_tensors="pt")
        n, size = tokens_by_hand(w, h, crops)
        assert int((out["input_ids"] == -1).sum()) == n
        assert out["image_sizes"].tolist() == [size]
        assert out["pixel_values"].shape == (1, crops + 1, 3, 336, 336)
    # 500 x 400 -> 672 x 537, 67 white rows on top (CLIP-normalized white, then red)
    processor = AutoProcessor.from_pretrained(phi, trust_remote_code=True, num_crops=4)
    top_left = processor(ROW, [Image.new("RGB", (500, 400), (255, 0, 0))])["pixel_values"][0, 1]
    white = (1 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711])
    torch.testing.assert_close(top_left[:, 10, 100], white)
    assert top_left[0, 200, 100] > 1 > top_left[1, 200, 100]  # red


def test_the_processor_takes_one_prompt_per_call_and_ignores_max_length_with_images(phi):
    """With images, text is ONE string split on `<|image_N|>`: each piece tokenized with its
    own BOS, each tag -N once per image token; a list breaks it; truncation is ignored."""
    processor = AutoProcessor.from_pretrained(phi, trust_remote_code=True)
    images = [Image.new("RGB", (500, 400)), Image.new("RGB", (336, 336))]
    with pytest.raises(TypeError):
        processor([ROW, ROW], images=images)
    out = processor("<|image_1|> one <|image_2|> two", images, truncation=True, max_length=10)
    ids = out["input_ids"][0].tolist()
    assert ids.count(-1) == 757 and ids.count(-2) == 757 and len(out["input_ids"]) == 1
    assert ids.count(processor.tokenizer.bos_token_id) == 3  # three pieces, three BOS
    text = processor("a long " * 20, truncation=True, max_length=10)  # text alone is cut
    assert len(text["input_ids"][0]) == 10


def test_the_model_clamps_input_ids_in_place_and_shares_its_embedding(phi, tmp_path):
    """The hub model's quirks the project has to live with: forward erases the image ids of
    the tensor it was given (and warns); `vision_embed_tokens.wte` is `embed_tokens` and the
    tied-weights keys are a list, so plain save_pretrained fails (5.x: the list; 4.x: the
    shared tensor), as does the processor's (its __init__ skips ProcessorMixin's)."""
    model, processor, family = M.load_mllm(phi, trust_remote_code=True)
    batch = families.process(processor, family, images=[Image.new("RGB", (336, 336))],
                             instructions=[ROW])
    assert (batch["input_ids"] < 0).sum() > 0
    with pytest.warns(UserWarning, match="modifies `input_ids` in-place"), torch.no_grad():
        model.model(**batch)
    assert (batch["input_ids"] < 0).sum() == 0
    assert model.model.vision_embed_tokens.wte is model.model.embed_tokens
    assert type(model)._tied_weights_keys == ["lm_head.weight"]
    with pytest.raises((AttributeError, RuntimeError)):
        model.save_pretrained(tmp_path / "plain")
    with pytest.raises(AttributeError, match="chat_template"):
        processor.save_pretrained(tmp_path / "plain")


def test_a_full_fine_tunes_stage_output_saves_and_loads_back(phi, tmp_path):
    """--lora-r 0 writes the whole model as the stage output (stages.save_stage_output), which
    the plain save_pretrained of the test above cannot: it saves, loads back with load_embedder
    and embeds an image row and a text row as the model in memory does (a weight moved, as
    training moves it, so the base's own embeddings would not pass); the model it saved still
    has its shared embedding and its class's list of tied keys."""
    model, processor, family = M.load_mllm(phi, trust_remote_code=True)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    args = dict(images=[Image.new("RGB", (336, 336), (0, 90, 200)), None],
                instructions=[ROW, "Find me an everyday image: a red cat"])
    ours = M.encode(model.eval(), processor, family, **args)
    out = tmp_path / "stage2-full"
    stages.save_stage_output(str(out), model, processor, phi, 2, family, None)
    assert model.model.vision_embed_tokens.wte is model.model.embed_tokens
    assert type(model)._tied_weights_keys == ["lm_head.weight"] and \
        "_tied_weights_keys" not in vars(model)
    again, again_processor, again_family = stages.load_embedder(str(out), trust_remote_code=True)
    assert again_family == "phi3_v"
    assert again.model.vision_embed_tokens.wte is again.model.embed_tokens
    torch.testing.assert_close(M.encode(again.eval(), again_processor, again_family, **args), ours)
    base = M.encode(M.load_mllm(phi, trust_remote_code=True)[0].eval(), processor, family, **args)
    assert (base - ours).abs().max() > 1e-3


def test_preset_paper_reads_the_family_without_running_remote_code(phi, tmp_path):
    """--preset paper on the folder is Phi-3.5-V's row of Table 6 (config.json's model_type)."""
    args = config.resolve(config.parse_args(["--stage", "2", "--preset", "paper", "--model", phi,
                                             "--trust-remote-code", "--out", str(tmp_path / "o")]))
    assert config.preset_name(args) == "paper-phi35v"
    assert (args.lr, args.batch_size, args.lora_r, args.tau) == (1e-4, 1024, 16, 0.02)


# ---------------------------------------------------------------- LoRA on the real names

def test_lora_wrapped_layers_expose_what_the_model_reads(phi):
    """Stage 2 wraps `img_projection.0`, whose bias the hub's hd_feature_transform reads
    (`img_projection[0].bias.device`): the wrapper answers with the wrapped layer's own
    weight, bias, sizes, dtype and device, and an image row embeds as before wrapping."""
    model, processor, family = M.load_mllm(phi, trust_remote_code=True)
    image = Image.new("RGB", (336, 336), (0, 90, 200))
    before = M.encode(model.eval(), processor, family, images=[image], instructions=[ROW])
    base = model.model.vision_embed_tokens.img_projection[0]
    targets = families.lora_targets(model, family, include_vision=True)
    assert {"model.vision_embed_tokens.img_projection.0",
            "model.vision_embed_tokens.img_projection.2",
            "model.layers.0.self_attn.qkv_proj", "model.layers.0.self_attn.o_proj",
            "model.layers.0.mlp.gate_up_proj", "model.layers.0.mlp.down_proj"} <= set(targets)
    M.inject_lora(model, targets, r=2, alpha=4, dropout=0.0)
    wrapped = model.model.vision_embed_tokens.img_projection[0]
    assert isinstance(wrapped, M.LoRALinear)
    assert wrapped.weight is base.weight and wrapped.bias is base.bias
    assert (wrapped.in_features, wrapped.out_features) == (base.in_features, base.out_features)
    assert (wrapped.dtype, wrapped.device) == (base.weight.dtype, base.weight.device)
    after = M.encode(model, processor, family, images=[image], instructions=[ROW])
    torch.testing.assert_close(after, before)


def test_one_stage2_step_trains_the_vision_tower_and_projector_adapters(phi, paper_data,
                                                                        tmp_path):
    """After ONE stage-2 step on rows with images, every adapter of the vision tower's layers
    that reach the embedding and of the projector has moved from B = 0. GradCache's graph
    pass must embed a fresh copy of the chunk: the model erased the image ids of the tensor
    the no-grad pass gave it, and on the CPU `.to(device)` returns that same tensor."""
    out = tmp_path / "stage2"
    train.main(["--stage", "2", "--model", phi, "--trust-remote-code", "--data",
                str(paper_data / "mmeb_train.jsonl"), "--image-root", str(paper_data),
                "--k", "2", "--out", str(out), "--max-steps", "1", "--batch-size", "4",
                "--chunk-size", "2", "--lora-r", "2", "--lora-alpha", "4", "--lr", "1e-2",
                "--warmup", "0", "--workers", "0", "--device", "cpu"])
    adapter = torch.load(out / "adapter.pt", weights_only=True)
    vision = {k: v for k, v in adapter.items()
              if k.startswith("model.vision_embed_tokens.") and k.endswith("lora_B")}
    # the tower's first layer (its second feeds nothing: layer_idx -2) and both projections
    assert len(vision) == 6 + 2
    assert any("img_projection.0" in k for k in vision)
    still = [k for k, v in vision.items() if not v.abs().sum() > 0]
    assert not still, still


def test_a_missing_torchvision_is_named_in_one_line(tmp_path):
    """The hub's image processor module imports torchvision first: where it is missing, the
    load stops naming torchvision (not a raw traceback), text-only stage 1 included."""
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed here")
    path = tiny_phi3_v.build_phi3_v(str(tmp_path / "phi-tv"), torchvision=True)
    with pytest.raises(SystemExit, match="torchvision"):
        M.load_mllm(path, trust_remote_code=True)


# ---------------------------------------------------------------- end to end

def embed_with_plain_transformers(model, processor, rows):
    """The model card's recipe for Phi-3.5-V: one prompt per processor call, the base model's
    last position, L2-normalized. rows: [(prompt, image or None)]."""
    out = []
    for prompt, image in rows:
        batch = processor(prompt, [image] if image else None, return_tensors="pt")
        with torch.no_grad():
            out.append(model.model(**batch).last_hidden_state[0, -1])
    return F.normalize(torch.stack(out).float(), dim=-1)


@pytest.mark.slow
def test_every_step_through_the_command_line(phi, paper_data, tmp_path):
    """Stage 1, stage 2 from the base and from stage 1, MMEB evaluation with image rows, export;
    the export reloads with plain AutoModelForCausalLM / AutoProcessor (trust_remote_code) and
    PEFT, and gives the run's embeddings, as does the Python API."""
    common = ["--trust-remote-code", "--max-steps", "1", "--batch-size", "4", "--chunk-size",
              "2", "--lora-r", "2", "--lora-alpha", "4", "--lr", "1e-2", "--warmup", "0",
              "--workers", "0", "--device", "cpu"]
    stage2 = ["--stage", "2", "--data", str(paper_data / "mmeb_train.jsonl"), "--image-root",
              str(paper_data), "--k", "2", *common]
    train.main(["--stage", "1", "--model", phi, "--data", str(paper_data / "nli.csv"),
                "--out", str(tmp_path / "s1"), "--eval-pairs", "0", "--teacher",
                "all-MiniLM-L6-v2", "--teacher-cache", str(paper_data / "teacher.pt"), *common])
    train.main(["--model", phi, "--out", str(tmp_path / "s2-base"), *stage2])
    train.main(["--model", str(tmp_path / "s1"), "--out", str(tmp_path / "s2"), *stage2])
    run = str(tmp_path / "s2")
    result = ev.main(["--task", "mmeb", "--model", run, "--trust-remote-code", "--data",
                      str(paper_data / "ImageNet-1K.jsonl"), str(paper_data / "MSCOCO_t2i.jsonl"),
                      "--image-root", str(paper_data), "--cache-dir", "", "--out",
                      str(tmp_path / "results.json")])
    assert set(result["models"][run]["datasets"]) == {"ImageNet-1K", "MSCOCO_t2i"}
    out = export.main([run, str(tmp_path / "export"), "--trust-remote-code"])

    image = Image.open(paper_data / "red.png").convert("RGB")
    inputs = [(None, image, ROW), ("a red cat", None, "Find me an everyday image:")]
    model, processor, family = stages.load_embedder(run, trust_remote_code=True)
    ours = M.embed_inputs(model.eval(), processor, family, inputs)
    rows = [(ROW, image), ("Find me an everyday image: a red cat", None)]
    plain = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    plain_processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    torch.testing.assert_close(embed_with_plain_transformers(plain, plain_processor, rows), ours,
                               atol=1e-5, rtol=1e-5)
    from peft import PeftModel
    base = AutoModelForCausalLM.from_pretrained(os.path.join(out, "adapter-base"),
                                                trust_remote_code=True)
    peft = PeftModel.from_pretrained(base, os.path.join(out, "adapter")).eval()
    torch.testing.assert_close(embed_with_plain_transformers(
        peft.base_model.model, plain_processor, rows), ours, atol=1e-5, rtol=1e-5)
    # the image counts: without it the row embeds differently
    assert (ours[0] - embed_with_plain_transformers(plain, plain_processor, [
        (ROW.replace("<|image_1|>\n", ""), None)])[0]).abs().max() > 1e-3
