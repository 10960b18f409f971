"""Tiny random checkpoints of every supported backbone family, built offline from config.

Each builder writes a folder the way a downloaded checkpoint looks (`save_pretrained` of the
model and of the processor, the processor class named as on the hub), so the tests load it
through the Auto classes like any hub id. Tokenizers are trained here with the `tokenizers`
library; chat templates render the same strings as the real checkpoints' templates for the
conversations used here (image first, then text, one user turn). Phi-3.5-V, whose code is
remote, has its own builder: tiny_phi3_v.py (the folder a download is, remote code included).
"""
import json
import os

import torch
import torch.nn as nn
import transformers
from PIL import Image

import processors

V5 = int(transformers.__version__.split(".")[0]) >= 5

W = 32  # hidden width of every tiny tower
CORPUS = ["a red cat sat on a mat", "a blue dog ran in the park today",
          "Summary above image in one word:", "Summary above sentence in one word:",
          "Represent the given image for classification.", "Find a caption for the photo.",
          "You are a helpful assistant. user assistant system model USER ASSISTANT"] * 3

# ---------------------------------------------------------------- chat templates (test data)
# The real checkpoints' templates, reduced to what one user turn with images and text renders.

def _template(before, image, text, after, generation):
    """Jinja source: per message `before`, each image, each text part (`text`, an expression of
    `c['text']`), `after`; then `generation` when a generation prompt is asked for."""
    return ("{% for message in messages %}" + before
            + "{% for c in message['content'] | selectattr('type', 'equalto', 'image') %}{{ "
            + image + " }}{% endfor %}"
            + "{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}{{ "
            + text + " }}{% endfor %}" + after + "{% endfor %}"
            + "{% if add_generation_prompt %}" + generation + "{% endif %}")


IDEFICS_ROLE = ("{{ message['role'] | capitalize }}"
                "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}"
                "{% endif %}")
IM_START_ASSISTANT = "{{ '<|im_start|>assistant\\n' }}"
TEMPLATES = {
    # llava-hf/llava-1.5-7b-hf
    "llava": _template("{{ message['role'].upper() + ': ' }}", "'<image>\\n'",
                       "c['text'] + ' '", "", "{{ 'ASSISTANT:' }}"),
    # llava-hf/llava-v1.6-mistral-7b-hf
    "llava_next_mistral": _template("{{ '[INST] ' }}", "'<image>\\n'", "c['text']",
                                    "{{ ' [/INST]' }}", ""),
    # llava-hf/llava-v1.6-vicuna-7b-hf
    "llava_next_vicuna": _template("{{ message['role'].upper() + ': ' }}", "'<image>\\n'",
                                   "c['text'] + ' '", "", "{{ 'ASSISTANT:' }}"),
    # llava-hf/llama3-llava-next-8b-hf
    "llava_next_llama3": _template(
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}",
        "'<image>\\n'", "c['text'] + '<|eot_id|>'", "",
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"),
    # llava-hf/llava-onevision-qwen2-*-ov-hf
    "llava_onevision": _template("{{ '<|im_start|>' + message['role'] + ' ' }}", "'<image>'",
                                 "'\\n' + c['text']", "{{ '<|im_end|>' }}", IM_START_ASSISTANT),
    # Qwen/Qwen2-VL-*-Instruct and Qwen2.5-VL: a default system turn comes first
    "qwen2_vl": ("{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
                 "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
                 "{{ '<|im_start|>' + message['role'] + '\\n' }}{% for c in message['content'] %}"
                 "{% if c['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
                 "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
                 "{{ '<|im_end|>\\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}" + IM_START_ASSISTANT + "{% endif %}"),
    # Qwen/Qwen3-VL-*-Instruct: no default system turn
    "qwen3_vl": _template("{{ '<|im_start|>' + message['role'] + '\\n' }}",
                          "'<|vision_start|><|image_pad|><|vision_end|>'", "c['text']",
                          "{{ '<|im_end|>\\n' }}", IM_START_ASSISTANT),
    # HuggingFaceM4/Idefics3-8B-Llama3 (its template opens with the tokenizer's BOS text)
    "idefics3": "{{ bos_token }}" + _template(IDEFICS_ROLE, "'<image>'", "c['text']",
                                              "{{ '<end_of_utterance>\\n' }}",
                                              "{{ 'Assistant:' }}"),
    # HuggingFaceTB/SmolVLM-*-Instruct
    "smolvlm": "{{ '<|im_start|>' }}" + _template(IDEFICS_ROLE, "'<image>'", "c['text']",
                                                  "{{ '<end_of_utterance>\\n' }}",
                                                  "{{ 'Assistant:' }}"),
    # OpenGVLab/InternVL3-*-hf
    "internvl": _template("{{ '<|im_start|>' + message['role'] + '\\n' }}", "'<IMG_CONTEXT>\\n'",
                          "c['text']", "{{ '<|im_end|>\\n' }}", IM_START_ASSISTANT),
    # google/gemma-3-*-it
    "gemma3": "{{ bos_token }}" + _template("{{ '<start_of_turn>user\\n' }}", "'<start_of_image>'",
                                            "c['text']", "{{ '<end_of_turn>\\n' }}",
                                            "{{ '<start_of_turn>model\\n' }}"),
}


# ---------------------------------------------------------------- shared pieces

def tokenizer(specials, bos=False, fast_class="PreTrainedTokenizerFast", **attributes):
    """A byte-level BPE tokenizer trained on CORPUS. `bos`: it adds `<s>` in front of every
    input, as Llama, Mistral, Gemma and Phi tokenizers do; Qwen's add nothing. `fast_class`: the
    class the checkpoint names, for processors of transformers 4.x that check it (Qwen-VL's);
    transformers 5 builds every tokenizer.json alike."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing  # not the project's processors.py
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<s>", "</s>", "<unk>"] + specials
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    if bos:
        bpe.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    # saved right-padded on purpose: the code under test must pad on the left itself
    tokenizer_class = PreTrainedTokenizerFast if V5 else getattr(transformers, fast_class)
    return tokenizer_class(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                           pad_token="<pad>", unk_token="<unk>", padding_side="right",
                           **attributes)


def text_config(tok, **extra):
    return dict(vocab_size=len(tok), hidden_size=W, intermediate_size=2 * W, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, **extra)


def pil(name):
    """The image processor class `name` that runs without torchvision: transformers 5 calls it
    `<name>Pil`, 4.x `<name>` (its fast twin, `<name>Fast`, needs torchvision)."""
    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


def rope(**mrope):
    """A Qwen-VL text config's rope settings: `rope_parameters` in transformers 5, `rope_theta`
    and `rope_scaling` in 4.x."""
    parameters = dict(rope_type="default", **mrope)
    if V5:
        return dict(rope_parameters={**parameters, "rope_theta": 10000.0})
    return dict(rope_theta=10000.0, rope_scaling=parameters)


def vision_config(image_size, patch_size, **extra):
    return dict(hidden_size=W, intermediate_size=2 * W, num_hidden_layers=1, num_attention_heads=2,
                image_size=image_size, patch_size=patch_size, **extra)


def save(path, model, processor, video_processor=None):
    """Write model and processor as a hub download is laid out: the image processor's settings in
    preprocessor_config.json, the processor's own (if any) in processor_config.json, each naming
    the processor class; the chat template and the tokenizer files. `video_processor` (a class
    name): the checkpoint ships a video_preprocessor_config.json naming it (loading it needs
    torchvision). Qwen2-VL's and Qwen2.5-VL's downloads ship none: AutoVideoProcessor reads their
    preprocessor_config.json, as it warns."""
    model.save_pretrained(path)
    processor.save_pretrained(path)
    # the transformers class, not a test-side subclass (processors.images_only builds some here)
    name = next(c.__name__ for c in type(processor).__mro__ if c.__module__.startswith("transf"))
    files = {f: os.path.join(path, f"{f}.json") for f in
             ("processor_config", "preprocessor_config", "video_preprocessor_config")}
    found = {k: read_json(f) for k, f in files.items() if os.path.isfile(f)}
    config = found.get("processor_config", {})
    # transformers 5 nests every sub-processor in processor_config.json, 4.x writes them apart
    image = config.pop("image_processor", None) or found.get("preprocessor_config")
    config.pop("video_processor", None)
    for f in found:
        os.remove(files[f])
    if image is not None:
        write_json(files["preprocessor_config"], {**image, "processor_class": name})
    if video_processor:
        write_json(files["video_preprocessor_config"],
                   {"video_processor_type": video_processor, "processor_class": name})
    if set(config) - {"processor_class"}:
        write_json(files["processor_config"], {**config, "processor_class": name})
    return path


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)


def images():
    # different sizes and aspect ratios: tiling families pick different grids, so image prompts
    # get different lengths and are left-padded
    return [Image.new("RGB", (20, 12), (255, 0, 0)), Image.new("RGB", (12, 40), (0, 0, 255))]


# ---------------------------------------------------------------- one builder per family

def build_llava(path):
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)
    tok = tokenizer(["<image>"], bos=True)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**vision_config(16, 8)),
                         text_config=LlamaConfig(**text_config(tok)),
                         image_token_index=tok.convert_tokens_to_ids("<image>"),
                         image_seq_length=4, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    processor = LlavaProcessor(
        image_processor=pil("CLIPImageProcessor")(size={"shortest_edge": 16},
                                                  crop_size={"height": 16, "width": 16}),
        tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=TEMPLATES["llava"])
    return save(path, LlavaForConditionalGeneration(config), processor)


def build_llava_next(path, template="llava_next_mistral"):
    from transformers import (CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextProcessor, MistralConfig)
    tok = tokenizer(["<image>"], bos=True)
    img, patch = 16, 8
    pinpoints = [[img, 2 * img], [2 * img, img], [2 * img, 2 * img]]
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**vision_config(img, patch)),
        text_config=MistralConfig(sliding_window=None, **text_config(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    processor = LlavaNextProcessor(
        image_processor=pil("LlavaNextImageProcessor")(
            size={"shortest_edge": img}, crop_size={"height": img, "width": img},
            image_grid_pinpoints=pinpoints),
        tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=TEMPLATES[template] if template else None)
    return save(path, LlavaNextForConditionalGeneration(config), processor)


def build_llava_onevision(path, vision_use_head=False):
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionProcessor, Qwen2Config, SiglipVisionConfig)
    tok = tokenizer(["<image>", "<video>", "<|im_start|>", "<|im_end|>"])
    img, patch = 16, 8
    pinpoints = [[img, 2 * img], [2 * img, img], [2 * img, 2 * img]]
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(vision_use_head=vision_use_head,
                                         **vision_config(img, patch)),
        text_config=Qwen2Config(**text_config(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"), image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1, vision_feature_select_strategy="full")
    torch.manual_seed(0)
    processor = processors.images_only(LlavaOnevisionProcessor)(
        image_processor=pil("LlavaOnevisionImageProcessor")(
            size={"height": img, "width": img}, image_grid_pinpoints=pinpoints),
        tokenizer=tok, video_processor=None, num_image_tokens=(img // patch) ** 2,
        vision_feature_select_strategy="full", chat_template=TEMPLATES["llava_onevision"])
    return save(path, LlavaOnevisionForConditionalGeneration(config), processor,
                "LlavaOnevisionVideoProcessor")


QWEN_SPECIALS = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>",
                 "<|im_start|>", "<|im_end|>"]


def _qwen_ids(tok):
    ids = tok.convert_tokens_to_ids
    return dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                vision_start_token_id=ids("<|vision_start|>"),
                vision_end_token_id=ids("<|vision_end|>"))


def _qwen_image_processor(patch):
    # at most 4x4 merged tokens per image: a few dozen positions in all
    return pil("Qwen2VLImageProcessor")(min_pixels=(2 * patch) ** 2,
                                        max_pixels=(8 * patch) ** 2, patch_size=patch,
                                        merge_size=2, temporal_patch_size=2)


# family -> (class name prefix, vision config, extra text config, template, the video processor
# named by a video_preprocessor_config.json, which Qwen2-VL's and Qwen2.5-VL's downloads lack)
QWEN = {
    "qwen2_vl": ("Qwen2VL", dict(depth=1, embed_dim=W, hidden_size=W, num_heads=2, patch_size=4),
                 {}, "qwen2_vl", None),
    "qwen2_5_vl": ("Qwen2_5_VL", dict(depth=1, hidden_size=W, intermediate_size=2 * W,
                                      num_heads=2, patch_size=4, out_hidden_size=W,
                                      window_size=16, fullatt_block_indexes=[0]),
                   {}, "qwen2_vl", None),
    "qwen3_vl": ("Qwen3VL", dict(depth=2, hidden_size=W, intermediate_size=2 * W, num_heads=2,
                                 patch_size=4, out_hidden_size=W, num_position_embeddings=16,
                                 deepstack_visual_indexes=[0]),
                 dict(head_dim=16), "qwen3_vl", "Qwen3VLVideoProcessor"),
}
# Qwen3-VL-MoE: a model type without a row in families.FAMILIES (it runs with --family qwen3_vl)
QWEN["qwen3_vl_moe"] = ("Qwen3VLMoe", QWEN["qwen3_vl"][1],
                        dict(head_dim=16, num_experts=4, num_experts_per_tok=2,
                             moe_intermediate_size=W), "qwen3_vl", "Qwen3VLVideoProcessor")


def build_qwen_vl(path, family="qwen2_vl"):
    """Qwen2-VL, Qwen2.5-VL, Qwen3-VL or Qwen3-VL-MoE: one tokenizer, one image processor, the
    classes named by the family."""
    prefix, vision, extra, template, video = QWEN[family]
    tok = tokenizer(QWEN_SPECIALS, fast_class="Qwen2TokenizerFast")
    mrope = dict(mrope_section=[2, 3, 3],
                 **({"mrope_interleaved": True} if prefix.startswith("Qwen3") else {}))
    config = getattr(transformers, f"{prefix}Config")(
        text_config=text_config(tok, **rope(**mrope), **extra), vision_config=vision,
        **_qwen_ids(tok))
    torch.manual_seed(0)
    processor_class = "Qwen3VLProcessor" if prefix.startswith("Qwen3") else f"{prefix}Processor"
    processor = processors.images_only(getattr(transformers, processor_class))(
        image_processor=_qwen_image_processor(4), tokenizer=tok, video_processor=None,
        chat_template=TEMPLATES[template])
    model = getattr(transformers, f"{prefix}ForConditionalGeneration")(config)
    return save(path, model, processor, video)


IDEFICS_SPECIALS = (["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>",
                     "<|im_start|>"]
                    + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)])


def build_idefics3(path):
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor,
                              Idefics3VisionConfig, LlamaConfig)
    tok = tokenizer(IDEFICS_SPECIALS, bos=True)
    img, patch, scale = 16, 4, 2
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(**vision_config(img, patch)),
        text_config=LlamaConfig(**text_config(tok)),
        image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=scale,
        pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    processor = Idefics3Processor(
        image_processor=pil("Idefics3ImageProcessor")(size={"longest_edge": 2 * img},
                                                      max_image_size={"longest_edge": img}),
        tokenizer=tok, image_seq_len=(img // patch) ** 2 // scale ** 2,
        chat_template=TEMPLATES["idefics3"])
    return save(path, Idefics3ForConditionalGeneration(config), processor)


def build_smolvlm(path):
    from transformers import (LlamaConfig, SmolVLMConfig, SmolVLMForConditionalGeneration,
                              SmolVLMProcessor, SmolVLMVisionConfig)
    tok = tokenizer(IDEFICS_SPECIALS)
    img, patch, scale = 16, 4, 2
    config = SmolVLMConfig(
        vision_config=SmolVLMVisionConfig(**vision_config(img, patch)),
        text_config=LlamaConfig(**text_config(tok)),
        image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=scale)
    torch.manual_seed(0)
    processor = processors.images_only(SmolVLMProcessor)(
        image_processor=pil("SmolVLMImageProcessor")(size={"longest_edge": 2 * img},
                                                     max_image_size={"longest_edge": img}),
        tokenizer=tok, video_processor=None, image_seq_len=(img // patch) ** 2 // scale ** 2,
        chat_template=TEMPLATES["smolvlm"])
    return save(path, SmolVLMForConditionalGeneration(config), processor,
                "SmolVLMVideoProcessor")


def build_gemma3(path):
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor,
                              Gemma3TextConfig, SiglipVisionConfig)
    tok = tokenizer(["<start_of_image>", "<end_of_image>", "<image_soft_token>",
                     "<start_of_turn>", "<end_of_turn>"], bos=True,
                    extra_special_tokens={"boi_token": "<start_of_image>",
                                          "eoi_token": "<end_of_image>",
                                          "image_token": "<image_soft_token>"})
    img, patch, tokens = 16, 4, 4
    ids = tok.convert_tokens_to_ids
    config = Gemma3Config(
        text_config=Gemma3TextConfig(head_dim=16, query_pre_attn_scalar=16, sliding_window=64,
                                     **text_config(tok)),
        vision_config=SiglipVisionConfig(vision_use_head=False, **vision_config(img, patch)),
        mm_tokens_per_image=tokens, boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"), image_token_index=ids("<image_soft_token>"))
    torch.manual_seed(0)
    processor = Gemma3Processor(
        image_processor=pil("Gemma3ImageProcessor")(size={"height": img, "width": img}),
        tokenizer=tok, image_seq_length=tokens, chat_template=TEMPLATES["gemma3"])
    model = Gemma3ForConditionalGeneration(config)
    # its projector starts at zero, which would make every image embed alike
    nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight)
    return save(path, model, processor)


def build_internvl(path):
    from transformers import (InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor,
                              Qwen2Config)
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig
    tok = tokenizer(["<img>", "</img>", "<IMG_CONTEXT>", "<video>", "<|im_start|>", "<|im_end|>"],
                    extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                                          "context_image_token": "<IMG_CONTEXT>",
                                          "video_token": "<video>"})
    img, patch = 16, 4
    tokens = (img // patch) ** 2 // 4  # downsample_ratio 0.5 per side
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(hidden_size=W, intermediate_size=2 * W,
                                           num_hidden_layers=1, num_attention_heads=2,
                                           image_size=[img, img], patch_size=[patch, patch]),
        text_config=Qwen2Config(**text_config(tok)),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=tokens)
    torch.manual_seed(0)
    processor = processors.images_only(InternVLProcessor)(
        image_processor=pil("GotOcr2ImageProcessor")(size={"height": img, "width": img},
                                                     crop_to_patches=True, max_patches=3),
        tokenizer=tok, image_seq_length=tokens, chat_template=TEMPLATES["internvl"])
    return save(path, InternVLForConditionalGeneration(config), processor,
                "InternVLVideoProcessor")


def build_llama(path):
    """A text-only LLM (Llama), which no --family turns into an MLLM."""
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = tokenizer([], bos=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**text_config(tok)))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
