"""Every backbone family on a tiny random checkpoint of its real architecture (tiny_backbones.py):
detection, prompt strings, batching of text, image and mixed chunks, embedding, truncation, LoRA
targets. test_family_runs.py trains and evaluates each of them.

    pytest -q tests/test_families.py

Each checkpoint is built offline, saved as a hub checkpoint is and loaded back by path with
`model.load_mllm`, as a downloaded one is (processors through `processors.load_processor`, which
copes without torchvision); Phi-3.5-V's folder holds remote code written here with the hub's
contract (tiny_phi3_v.py, phi3_v_remote/) and loads with trust_remote_code, as a download does.
Expected strings are written out by hand from the official code's format.
"""
import functools
import importlib.util
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from transformers import AutoProcessor

import families
import model as M
import processors
import tiny_backbones as tiny
import tiny_phi3_v

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors of width 32 gain nothing from threads, and threads that wait on a busy machine
    made each forward 100 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# name -> (family, builder, decoder prefix, projector layers that only stage 2 adapts)
LLAVA_PROJECTOR = ("model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2")
QWEN_PROJECTOR = ("model.visual.merger.mlp.0", "model.visual.merger.mlp.2")
SPECS = {
    "phi3_v": ("phi3_v", tiny_phi3_v.build_phi3_v, "model.layers.",
               ("model.vision_embed_tokens.img_projection.0",
                "model.vision_embed_tokens.img_projection.2")),
    "llava": ("llava", tiny.build_llava, "model.language_model.", LLAVA_PROJECTOR),
    "llava_next": ("llava_next", tiny.build_llava_next, "model.language_model.", LLAVA_PROJECTOR),
    "llava_onevision": ("llava_onevision", tiny.build_llava_onevision, "model.language_model.",
                        LLAVA_PROJECTOR),
    "llava_onevision_siglip_head": (
        "llava_onevision", functools.partial(tiny.build_llava_onevision, vision_use_head=True),
        "model.language_model.", LLAVA_PROJECTOR),
    "qwen2_vl": ("qwen2_vl", tiny.build_qwen_vl, "model.language_model.", QWEN_PROJECTOR),
    "qwen2_5_vl": ("qwen2_5_vl", functools.partial(tiny.build_qwen_vl, family="qwen2_5_vl"),
                   "model.language_model.", QWEN_PROJECTOR),
    "qwen3_vl": ("qwen3_vl", functools.partial(tiny.build_qwen_vl, family="qwen3_vl"),
                 "model.language_model.",
                 ("model.visual.merger.linear_fc1", "model.visual.merger.linear_fc2")),
    "idefics3": ("idefics3", tiny.build_idefics3, "model.text_model.",
                 ("model.connector.modality_projection.proj",)),
    "smolvlm": ("smolvlm", tiny.build_smolvlm, "model.text_model.",
                ("model.connector.modality_projection.proj",)),
    "internvl": ("internvl", tiny.build_internvl, "model.language_model.", LLAVA_PROJECTOR),
    # Gemma 3's projector is a weight matrix (nn.Parameter), not an nn.Linear: no adapter fits it
    "gemma3": ("gemma3", tiny.build_gemma3, "model.language_model.", ()),
}
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
TORCHVISION = importlib.util.find_spec("torchvision") is not None
NEEDS_TORCHVISION = {"llava_onevision", "llava_onevision_siglip_head", "qwen2_vl", "qwen2_5_vl",
                     "qwen3_vl", "smolvlm", "internvl"}
TEXTS = ["a red cat", "a blue dog ran in the park today and sat on a mat"]


def build_checkpoint(name, folder):
    """The tiny checkpoint `name` (a SPECS name, or "qwen3_vl_moe") saved under `folder`."""
    if name == "smolvlm" and importlib.util.find_spec("num2words") is None:
        pytest.skip("SmolVLM's processor needs the num2words package")
    if name == "smolvlm" and not TRANSFORMERS_5 and not TORCHVISION:
        pytest.skip("transformers 4.x cannot import SmolVLMProcessor without torchvision (the "
                    "loader says so in one line: test_smolvlm_is_built_or_refused_in_one_line)")
    builder = functools.partial(tiny.build_qwen_vl, family=name) if name == "qwen3_vl_moe" \
        else SPECS[name][1]
    return builder(str(folder / "model"))


def build(name, folder):
    """(family, model, processor) loaded by path as a downloaded checkpoint would be."""
    model, processor, family = M.load_mllm(build_checkpoint(name, folder),
                                           trust_remote_code=name == "phi3_v")
    return family, model.eval(), processor


@pytest.fixture(scope="module", params=sorted(SPECS))
def loaded(request, tmp_path_factory):
    return (request.param, *build(request.param, tmp_path_factory.mktemp(request.param)))


# ---------------------------------------------------------------- detection

def test_family_comes_from_the_config_and_the_processor_pads_left(loaded):
    name, family, model, processor = loaded
    assert families.family_of(model.config) == family == SPECS[name][0]
    assert families.family_of(model.config, override="llava") == "llava"
    assert processor.tokenizer.padding_side == "left"  # saved right-padded
    assert "torchvision" not in type(processor.image_processor).__module__


# ---------------------------------------------------------------- prompts

PHI_IMAGE = "<|user|>\n<|image_1|>\nSummary above image in one word:<|end|>\n<|assistant|>\n"
PHI_TEXT = "<|user|>\na red cat\nSummary above sentence in one word:<|end|>\n<|assistant|>\n"
MISTRAL_IMAGE = "[INST] <image>\nSummary above image in one word: [/INST]"
MISTRAL_TEXT = "[INST] a red cat\nSummary above sentence in one word: [/INST]"


def test_in_one_word_prompts_stay_deepglints_strings_with_the_processor(tmp_path):
    """deepglint/UniME self_evaluate/retrieval_self.py, written out by hand (test_unime.py
    checks them without a processor): neither processor's own template changes them."""
    phi = AutoProcessor.from_pretrained(tiny_phi3_v.build_phi3_v(str(tmp_path / "phi")),
                                        trust_remote_code=True)
    assert families.format_prompt("phi3_v", image=True, processor=phi) == PHI_IMAGE
    assert families.format_prompt("phi3_v", text="a red cat", processor=phi) == PHI_TEXT
    mistral = AutoProcessor.from_pretrained(tiny.build_llava_next(str(tmp_path / "m")))
    assert families.format_prompt("llava_next", image=True, processor=mistral) == MISTRAL_IMAGE
    assert families.format_prompt("llava_next", text="a red cat", processor=mistral) == \
        MISTRAL_TEXT


# the processor's own chat template, written out for one image prompt and one text prompt
CHAT_PROMPTS = {
    "llava": ("USER: <image>\nSummary above image in one word: ASSISTANT:",
              "USER: a red cat\nSummary above sentence in one word: ASSISTANT:"),
    "llava_onevision": (
        "<|im_start|>user <image>\nSummary above image in one word:<|im_end|>"
        "<|im_start|>assistant\n",
        "<|im_start|>user \na red cat\nSummary above sentence in one word:<|im_end|>"
        "<|im_start|>assistant\n"),
    "qwen2_vl": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>Summary above image in one word:<|im_end|>\n"
        "<|im_start|>assistant\n",
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "a red cat\nSummary above sentence in one word:<|im_end|>\n<|im_start|>assistant\n"),
    "qwen3_vl": (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "Summary above image in one word:<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\na red cat\nSummary above sentence in one word:<|im_end|>\n"
        "<|im_start|>assistant\n"),
    # the template's leading BOS text is dropped: the tokenizer adds BOS itself
    "idefics3": ("User:<image>Summary above image in one word:<end_of_utterance>\nAssistant:",
                 "User: a red cat\nSummary above sentence in one word:<end_of_utterance>\n"
                 "Assistant:"),
    "smolvlm": ("<|im_start|>User:<image>Summary above image in one word:<end_of_utterance>\n"
                "Assistant:",
                "<|im_start|>User: a red cat\nSummary above sentence in one word:"
                "<end_of_utterance>\nAssistant:"),
    "internvl": ("<|im_start|>user\n<IMG_CONTEXT>\nSummary above image in one word:<|im_end|>\n"
                 "<|im_start|>assistant\n",
                 "<|im_start|>user\na red cat\nSummary above sentence in one word:<|im_end|>\n"
                 "<|im_start|>assistant\n"),
    "gemma3": ("<start_of_turn>user\n<start_of_image>Summary above image in one word:"
               "<end_of_turn>\n<start_of_turn>model\n",
               "<start_of_turn>user\na red cat\nSummary above sentence in one word:<end_of_turn>\n"
               "<start_of_turn>model\n"),
}
CHAT_PROMPTS["qwen2_5_vl"] = CHAT_PROMPTS["qwen2_vl"]
CHAT_PROMPTS["llava_onevision_siglip_head"] = CHAT_PROMPTS["llava_onevision"]


def test_in_one_word_prompts_use_the_processors_chat_template(loaded):
    name, family, _, processor = loaded
    if name not in CHAT_PROMPTS:
        pytest.skip("official fixed strings: see the test above")
    image, text = CHAT_PROMPTS[name]
    assert families.format_prompt(family, image=True, processor=processor) == image
    assert families.format_prompt(family, text="a red cat", processor=processor) == text


LLAVA_NEXT_VARIANTS = {
    "llava_next_vicuna": ("llava-hf/llava-v1.6-vicuna-7b-hf",
                          "USER: <image>\nSummary above image in one word: ASSISTANT:"),
    "llava_next_llama3": ("llava-hf/llama3-llava-next-8b-hf",
                          "<|start_header_id|>user<|end_header_id|>\n\n<image>\nSummary above "
                          "image in one word:<|eot_id|><|start_header_id|>assistant"
                          "<|end_header_id|>\n\n"),
}


@pytest.mark.parametrize("variant", sorted(LLAVA_NEXT_VARIANTS))
def test_llava_next_follows_the_llm_it_wraps(tmp_path, variant):
    """vicuna and llama3 LLaVA-NeXT checkpoints share model_type llava_next with the Mistral one:
    their template is read from the processor, or, without one, chosen by the checkpoint name."""
    hub_id, expected = LLAVA_NEXT_VARIANTS[variant]
    with_template = AutoProcessor.from_pretrained(
        tiny.build_llava_next(str(tmp_path / "a"), variant))
    assert families.format_prompt("llava_next", image=True, processor=with_template) == expected
    bare = AutoProcessor.from_pretrained(tiny.build_llava_next(str(tmp_path / "b"), template=None))
    assert bare.chat_template is None
    bare.tokenizer.name_or_path = hub_id
    assert families.format_prompt("llava_next", image=True, processor=bare) == expected


# MMEB rows as MMEB-train/eval ship them (Phi-3's tag), and the official input for each backbone
ROW_IMAGE = "<|image_1|>\nRepresent the given image for classification."
ROW_TEXT = "Find me an everyday image that matches the given caption: a red cat."
OFFICIAL_MMEB = {
    # VLM2Vec / UniME-V2: raw text, the tag swapped for the backbone's placeholder
    "phi3_v": ROW_IMAGE,
    "llava_next": "<image>\nRepresent the given image for classification.",
    "qwen2_vl": "<|image_pad|>\nRepresent the given image for classification.",
    "qwen2_5_vl": "<|image_pad|>\nRepresent the given image for classification.",
    # UniME-V2 Llava_OV_process: placeholder stripped, image then text in the chat template
    "llava_onevision": "<|im_start|>user <image>\nRepresent the given image for classification."
                       "<|im_end|><|im_start|>assistant\n",
}


def test_mmeb_prompts_are_the_official_pipelines(loaded):
    name, family, _, processor = loaded
    if family not in OFFICIAL_MMEB:
        pytest.skip("no official MMEB pipeline for this family: raw text with its placeholder")
    assert families.format_prompt(family, image=True, instruction=ROW_IMAGE,
                                  processor=processor) == OFFICIAL_MMEB[family]
    text_only = families.format_prompt(family, instruction=ROW_TEXT, processor=processor)
    if family == "llava_onevision":
        assert text_only == f"<|im_start|>user \n{ROW_TEXT}<|im_end|><|im_start|>assistant\n"
    else:
        assert text_only == ROW_TEXT


def test_mmeb_placeholder_added_when_missing_and_refused_without_image():
    assert families.format_prompt("qwen2_vl", image=True, instruction="Represent it.") == \
        "<|image_pad|>\nRepresent it."
    for row in (ROW_IMAGE, " "):
        with pytest.raises(ValueError, match="without an image"):
            families.format_prompt("llava_next", instruction=row)


# ---------------------------------------------------------------- batching and pooling

def last_real_token(hidden, mask):
    """Brute force: for each row, the hidden state at the largest index whose mask is 1."""
    return torch.stack([h[max(j for j in range(len(m)) if m[j])] for h, m in zip(hidden, mask)])


CHUNKS = {"text": dict(texts=TEXTS),
          # rows 0 and 1 differ only by their image: their embeddings differ iff images count
          "image": dict(texts=[None, None, TEXTS[0]], images=tiny.images() + tiny.images()[:1]),
          "mixed": dict(texts=[TEXTS[1], None, None], images=[None] + tiny.images()),
          "mmeb": dict(instructions=[ROW_IMAGE, ROW_TEXT, "<|image_1|> Find a caption."],
                       images=[tiny.images()[0], None, tiny.images()[1]])}


@pytest.mark.parametrize("chunk", sorted(CHUNKS))
def test_chunk_embeds_at_the_last_real_token(loaded, chunk):
    """`process` gives one left-padded batch; pooling its last real token is the final hidden
    state the full model reads its next-token logits from at the last position, and each row's
    embedding is the one it gets alone (padding, position ids and image placement do not leak
    across rows); `model.encode` gives those rows normalized, in input order."""
    name, family, model, processor = loaded
    batch = families.process(processor, family, **CHUNKS[chunk])
    mask = batch["attention_mask"]
    assert (mask[:, -1] == 1).all(), "left padding"
    assert (mask[:, 0] == 0).any(), "the chunk must really be padded for the test to mean much"
    fresh = lambda: {k: v.clone() for k, v in batch.items()}  # noqa: E731  (Phi-3.5-V edits
    with torch.no_grad():                                   # input_ids in place)
        pooled = last_real_token(model.model(**fresh()).last_hidden_state, mask)
        # the logits, not hidden_states[-1]: transformers 4.x returns Qwen3-VL's before its norm
        full = model(**fresh()).logits[:, -1]
        torch.testing.assert_close(model.get_output_embeddings()(pooled), full, atol=1e-4,
                                   rtol=1e-4)
        rows = [dict(zip(CHUNKS[chunk], row)) for row in zip(*CHUNKS[chunk].values())]
        alone = torch.cat([model.model(**families.process(processor, family, **{
            k: [v] for k, v in row.items()})).last_hidden_state[:, -1] for row in rows])
    torch.testing.assert_close(pooled, alone, atol=1e-4, rtol=1e-4)
    assert (F.normalize(pooled[0], dim=-1) - F.normalize(pooled[1], dim=-1)).abs().max() > 1e-4
    # model.encode: the same rows batched by modality, back in input order, L2-normalized
    torch.testing.assert_close(M.encode(model, processor, family, **CHUNKS[chunk]),
                               F.normalize(alone, dim=-1), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- truncation

LONG = " ".join(f"word{i}" for i in range(60)) + " the last words of the text"
MMEB_LONG = f"<|image_1|>\nRepresent the image with the question: {LONG}"


def real_ids(batch, i=0):
    """Row i's token ids without its (left) padding."""
    return batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()


def common_end(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return a[len(a) - n:]


def test_mmeb_rows_are_cut_at_their_end_as_the_official_tokenizer_call_does(loaded):
    """MMEB rows (instruction first, content after) keep their first max_len tokens, image
    tokens counted, as the official `truncation=True, max_length=max_len` does (no tokenizer
    here adds an end token): a text-only row, and a row whose image comes first, in one chunk.
    Phi-3.5-V's processor never cuts a row with an image (the hub's and VLM2Vec's alike)."""
    name, family, _, processor = loaded
    rows = dict(instructions=[f"Find a caption for the photo: {LONG}", MMEB_LONG],
                images=[None, tiny.images()[0]])
    full = families.process(processor, family, **rows)
    text, image = real_ids(full, 0), real_ids(full, 1)
    m = min(len(text), len(image)) - 25
    cut = families.process(processor, family, max_length=m, **rows)
    assert real_ids(cut, 0) == text[:m]
    assert real_ids(cut, 1) == (image if family == "phi3_v" else image[:m])


@pytest.mark.parametrize("with_image", [False, True])
def test_in_one_word_prompts_lose_the_end_of_their_content_not_the_template(loaded, with_image):
    """A zero-shot prompt over max_length loses the end of its text before the template is
    applied: the template's end, where the embedding is read, stays whole, and so does the
    text's start (the template's tokens: those shared with the prompt of a one-word text)."""
    name, family, _, processor = loaded
    images = [tiny.images()[0]] if with_image else None
    full = real_ids(families.process(processor, family, texts=[LONG], images=images))
    suffix = common_end(full, real_ids(families.process(processor, family, texts=["word0"],
                                                        images=images)))
    m = len(full) - 20
    cut = families.process(processor, family, texts=[LONG], images=images, max_length=m)
    if family == "phi3_v" and with_image:  # its processor never cuts a row with an image
        assert real_ids(cut) == full
        return
    cut = real_ids(cut)
    assert m - 4 <= len(cut) <= m and len(suffix) >= 3
    assert cut[-len(suffix):] == suffix
    words = processor.tokenizer.decode([i for i in cut if i >= 0])
    assert "word0 word1" in words and "of the text" not in words


def test_truncation_refuses_a_budget_that_leaves_no_text(loaded):
    name, family, _, processor = loaded
    with pytest.raises(ValueError, match="no room"):
        families.process(processor, family, texts=[LONG], max_length=5)


def test_a_cut_through_image_tokens_is_refused_naming_the_row(loaded):
    """A max_length shorter than a row's image tokens: one line naming the row, not the
    processor's own error (Idefics3's is a TypeError) or a silent mismatch."""
    name, family, _, processor = loaded
    if family == "phi3_v":
        pytest.skip("Phi-3.5-V's processor never cuts a row with an image")
    with pytest.raises(ValueError, match=r"rows \[1\]: max_length 3 cuts into their image"):
        families.process(processor, family, instructions=["a text row", MMEB_LONG],
                         images=[None, tiny.images()[0]], max_length=3)


# ---------------------------------------------------------------- LoRA targets

def linear_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def linears_reaching_the_embedding(model, processor, family):
    """Measured: the nn.Linear layers whose weight gets a gradient from the last-token state of
    a chunk with an image row and a text row."""
    batch = families.process(processor, family, texts=[TEXTS[0], None],
                             images=[None, tiny.images()[0]])
    model.model(**batch).last_hidden_state[:, -1].sum().backward()
    used = {n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and m.weight.grad is not None}
    model.zero_grad(set_to_none=True)
    return used


def test_lora_targets_decoder_in_stage1_and_every_used_layer_in_stage2(loaded):
    """Stage 1: exactly the decoder's linear layers. Stage 2: exactly the linear layers that
    reach the embedding, the vision projector among them; not the LM head, not vision layers
    whose output is never read (their adapters would get no gradient)."""
    name, family, model, processor = loaded
    decoder, projector = SPECS[name][2], SPECS[name][3]
    used = linears_reaching_the_embedding(model, processor, family)
    stage1 = set(families.lora_targets(model, family))
    assert stage1 == {n for n in linear_names(model) if n.startswith(decoder)}
    assert stage1 <= used
    stage2 = set(families.lora_targets(model, family, include_vision=True))
    # a tied LM head (Gemma 3) shares its weight with the input embeddings, hence a gradient
    assert stage2 == used - {"lm_head"} and set(projector) <= stage2


def test_stage2_lora_starts_at_the_base_model_and_every_adapter_learns(loaded, tmp_path):
    """model.inject_lora on every stage-2 target: only the adapters are trainable, B = 0 keeps
    the embeddings exactly; with B random a mixed chunk backpropagates without breaking (SigLIP's
    pooling head in LLaVA-OneVision did) and every adapter gets a gradient (DDP needs that)."""
    family, model, processor = build(loaded[0], tmp_path)  # a fresh copy: wrapping mutates it
    inputs = dict(texts=[TEXTS[0], None], images=[None, tiny.images()[0]])
    before = M.encode(model, processor, family, **inputs)
    targets = M.inject_lora(model, families.lora_targets(model, family, include_vision=True),
                            r=2, alpha=4, dropout=0.0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}" for n in targets for ab in "AB"}
    torch.testing.assert_close(M.encode(model, processor, family, **inputs), before)
    for layer in model.modules():
        if isinstance(layer, M.LoRALinear):
            nn.init.normal_(layer.lora_B)
    batch = families.process(processor, family, **inputs)
    model.model(**batch).last_hidden_state[:, -1].sum().backward()
    missing = [n for n, p in model.named_parameters() if "lora_" in n and p.grad is None]
    assert not missing, missing[:5]


# ---------------------------------------------------------------- loading, images

def processor_classes_named(folder):
    """Every `processor_class` in the folder's JSON files, nested configs included."""
    def walk(value):
        if isinstance(value, dict):
            yield from ([value["processor_class"]] if "processor_class" in value else [])
            for v in value.values():
                yield from walk(v)
    return {name for f in os.listdir(folder) if f.endswith(".json")
            for name in walk(tiny.read_json(os.path.join(folder, f)))}


def hub_class(download):
    """The class a download names, where a hub checkpoint names it (read here by hand)."""
    return getattr(transformers, tiny.read_json(f"{download}/preprocessor_config.json")
                   ["processor_class"])


VIDEO_FAMILIES = sorted(NEEDS_TORCHVISION - {"llava_onevision_siglip_head"})


@pytest.mark.parametrize("name", VIDEO_FAMILIES)
def test_video_families_load_images_only_without_torchvision(name, tmp_path):
    """AutoProcessor refuses the download without torchvision (its video processor needs it); the
    project's loader builds the very class the download names, without a video processor."""
    if TORCHVISION:
        pytest.skip("torchvision is installed: AutoProcessor builds the whole processor")
    download = build_checkpoint(name, tmp_path)
    with pytest.raises(ImportError, match="[Tt]orchvision"):
        AutoProcessor.from_pretrained(download)
    processor = processors.load_processor(download, name)
    assert isinstance(processor, hub_class(download))
    assert type(processor).__name__ == hub_class(download).__name__
    assert "video_processor" not in vars(processor)
    assert processor.tokenizer.padding_side == "left"


@pytest.mark.parametrize("name", VIDEO_FAMILIES)
def test_a_saved_processor_names_the_real_class_and_keeps_the_video_config(name, tmp_path):
    """What a stage output or an export writes from the images-only processor: every file names
    the download's processor class; the video processor's config, read back by transformers'
    own reader, is the download's; the project's loader rebuilds from those files a processor
    that turns an image row into the same tokens and pixels. Where torchvision is installed,
    AutoProcessor builds from them the real processor, video processor as the download's."""
    from transformers.video_processing_utils import BaseVideoProcessor
    download, saved = build_checkpoint(name, tmp_path), str(tmp_path / "saved")
    processor = processors.images_only(hub_class(download)).from_pretrained(download)
    processor.save_pretrained(saved)  # what model.save_pretrained calls
    assert processor_classes_named(saved) == {hub_class(download).__name__}
    read = lambda folder: {k: v for k, v in  # noqa: E731
                           BaseVideoProcessor.get_video_processor_dict(folder)[0].items()
                           if k != "processor_class"}
    assert read(saved) == read(download)
    again = processors.load_processor(saved, name)
    assert type(again).__name__ == hub_class(download).__name__
    row = dict(texts=[None, TEXTS[0]], images=tiny.images())
    for key, value in families.process(processor, name, **row).items():
        torch.testing.assert_close(families.process(again, name, **row)[key], value)
    if TORCHVISION:
        real, rebuilt = (AutoProcessor.from_pretrained(f) for f in (download, saved))
        assert type(rebuilt) is hub_class(download) and type(real) is type(rebuilt)
        assert rebuilt.video_processor.to_dict() == real.video_processor.to_dict()


def rename_processor_class(folder, name, **image_processor):
    """Point every file of a checkpoint that names its processor class at `name`."""
    for f in os.listdir(folder):
        config = tiny.read_json(os.path.join(folder, f)) if f.endswith(".json") else {}
        if "processor_class" in config:
            tiny.write_json(os.path.join(folder, f), {**config, "processor_class": name, **(
                image_processor if f == "preprocessor_config.json" else {})})


def one_line_exit(call, *words):
    """The SystemExit message of `call()`: one line, holding each of `words`."""
    with pytest.raises(SystemExit) as exit_:
        call()
    message = str(exit_.value.code)
    assert "\n" not in message and all(w in message for w in words), message
    return message


def test_a_processor_that_cannot_take_images_is_refused_in_one_line(tmp_path):
    """Processor files that make AutoProcessor return a bare tokenizer (what export.py wrote
    before: `Qwen2VLProcessorImagesOnly`) or fail (no image processor config): the loader stops
    in one line naming the family and what to do, and `process` refuses an image given to a
    tokenizer; neither embeds the text without its image."""
    path = build_checkpoint("qwen2_vl", tmp_path)
    rename_processor_class(path, "Qwen2VLProcessorImagesOnly")
    assert isinstance(AutoProcessor.from_pretrained(path), transformers.PreTrainedTokenizerBase)
    one_line_exit(lambda: processors.load_processor(path, "qwen2_vl"), "qwen2_vl",
                  "Qwen2VLProcessorImagesOnly", "export the run again")
    rename_processor_class(path, "Qwen2VLProcessor")
    os.remove(os.path.join(path, "preprocessor_config.json"))
    one_line_exit(lambda: processors.load_processor(path, "qwen2_vl"), "qwen2_vl",
                  "preprocessor_config.json")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    with pytest.raises(ValueError, match="qwen2_vl processor given is a .* cannot take images"):
        families.process(tokenizer, "qwen2_vl", texts=[TEXTS[0]], images=tiny.images()[:1])


def test_a_processor_import_that_needs_torchvision_names_it_in_one_line(tmp_path):
    """A remote-code processor whose module imports torchvision (Phi-3.5-V's image processor
    does), loaded as a download is: the family and `pip install torchvision`, in one line."""
    if TORCHVISION:
        pytest.skip("torchvision is installed")
    (tmp_path / "processing_remote.py").write_text(
        "import torchvision\nfrom transformers import ProcessorMixin\n\n\n"
        "class RemoteProcessor(ProcessorMixin):\n    attributes = []\n")
    tiny.write_json(tmp_path / "processor_config.json", {
        "processor_class": "RemoteProcessor",
        "auto_map": {"AutoProcessor": "processing_remote.RemoteProcessor"}})
    one_line_exit(lambda: processors.load_processor(str(tmp_path), "phi3_v",
                                                  trust_remote_code=True),
                  "phi3_v", "pip install torchvision")


def test_smolvlm_is_built_or_refused_in_one_line(tmp_path):
    """SmolVLM's download without torchvision: transformers 5 builds its processor like the
    other video families, with the download's own settings (image_seq_len 4, not the class's
    169); 4.x cannot import SmolVLMProcessor at all, and the loader says so in one line."""
    if TORCHVISION:
        pytest.skip("torchvision is installed")
    if TRANSFORMERS_5:
        processor = processors.load_processor(build_checkpoint("smolvlm", tmp_path), "smolvlm")
        assert type(processor).__name__ == "SmolVLMProcessor" and processor.image_seq_len == 4
        return
    path = build_checkpoint("idefics3", tmp_path)  # SmolVLM's files, but for the class names
    rename_processor_class(path, "SmolVLMProcessor", image_processor_type="SmolVLMImageProcessor")
    one_line_exit(lambda: processors.load_processor(path, "smolvlm"), "smolvlm",
                  "pip install torchvision")


def test_prepare_image_per_family():
    image = tiny.images()[0]
    assert families.prepare_image("phi3_v", image, "high") is image  # num_crops tiles it
    assert families.prepare_image("llava_next", image, "high").size == (1344, 1344)
    assert families.prepare_image("qwen2_vl", image, 336).size == (336, 336)
    assert families.prepare_image("llava_next", image) is image
    assert families.prepare_image("llava_next", image, "original") is image
