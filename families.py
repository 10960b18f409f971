"""Backbone families: what differs between MLLMs when they embed. Prompts, batching, truncation,
image size and LoRA targets, as one table and plain functions.

Two prompt formats:
- zero-shot "in one word" prompts (stage 1, retrieval, SugarCrepe) are wrapped in the family's
  chat template. deepglint/UniME's evaluation (`self_evaluate/retrieval_self.py`,
  `sugar_crepe_self.py`) fixes the strings for Phi-3.5-V and LLaVA-1.6 (Mistral); other
  families use their processor's own chat template, system turn included.
- MMEB rows (stage 2, MMEB eval) follow VLM2Vec v1, which UniME's MMEB numbers come from, and
  UniME-V2: the text is used as the data gives it, no chat template, its `<|image_1|>` replaced
  by `<image>` (LLaVA-NeXT) or `<|image_pad|>` (Qwen2-VL, Qwen2.5-VL) (VLM2Vec
  `src/model_utils.py::vlm_image_tokens`, `src/dataset.py`). LLaVA-OneVision is the exception:
  UniME-V2's `Llava_OV_process` strips `<image>` from the text and sends it, after the image,
  through the processor's chat template with the generation prompt. Families the official code
  never ran get VLM2Vec's raw format with their own image placeholder.
The official code batches MMEB rows (VLM2Vec `src/model_utils.py::Phi3V_process_fn` and
siblings, UniME-V2 `Embedding/src/model_utils.py`) one processor call per row (one string,
`[image]`, `max_length=max_len, truncation=True`: the tokenizer cuts the row's end, image tokens
counted; Phi-3.5-V's processor, the hub's and VLM2Vec's copy alike, ignores both arguments when
there is an image and cuts only text-only rows), then `tokenizer.pad`. UniME's MMEB commands
(VLM2Vec's eval.py): max_len 256 for Phi-3.5-V (num_crops 4), 4096 for LLaVA-1.6; UniME-V2's:
4096. process() passes the same arguments to the same processors.
"""
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

import processors

TEXT_INSTRUCTION = "Summary above sentence in one word:"
IMAGE_INSTRUCTION = "Summary above image in one word:"
MMEB_IMAGE_TAG = re.compile(r"<\|image_\d+\|>")  # MMEB text hard-codes Phi-3-V's tags

CHATML_TURN = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"

# family -> raw: image placeholder in MMEB text; turn, chat_image: the user turn and the image
# in it, used where the official strings are fixed (phi3_v, llava_next Mistral) or the processor
# has no chat template; vision: module names of the vision tower and projector; max_len: the
# official MMEB max_len; eval_resolution: the official MMEB eval image size (see prepare_image).
FAMILIES = {
    "phi3_v": dict(raw="<|image_1|>", turn="<|user|>\n{}<|end|>\n<|assistant|>\n",
                   chat_image="<|image_1|>\n", vision=("vision_embed_tokens",), max_len=256),
    "llava": dict(raw="<image>", turn="USER: {} ASSISTANT:", chat_image="<image>\n",
                  vision=("vision_tower", "multi_modal_projector")),
    "llava_next": dict(raw="<image>", turn="[INST] {} [/INST]", chat_image="<image>\n",
                       vision=("vision_tower", "multi_modal_projector"), max_len=4096,
                       eval_resolution="high"),
    "llava_onevision": dict(raw="<image>", chat_image="<image>\n", eval_resolution="high",
                            turn="<|im_start|>user {}<|im_end|><|im_start|>assistant\n",
                            vision=("vision_tower", "multi_modal_projector")),
    "qwen2_vl": dict(raw="<|image_pad|>",
                     turn="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                          "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
                     chat_image="<|vision_start|><|image_pad|><|vision_end|>",
                     vision=("visual",), max_len=4096, eval_resolution="high"),
    "qwen3_vl": dict(raw="<|image_pad|>", turn=CHATML_TURN,
                     chat_image="<|vision_start|><|image_pad|><|vision_end|>", vision=("visual",)),
    "idefics3": dict(raw="<image>", turn="User:{}<end_of_utterance>\nAssistant:",
                     chat_image="<image>", vision=("vision_model", "connector")),
    "internvl": dict(raw="<IMG_CONTEXT>", turn=CHATML_TURN, chat_image="<IMG_CONTEXT>\n",
                     vision=("vision_tower", "multi_modal_projector")),
    "gemma3": dict(raw="<start_of_image>",
                   turn="<start_of_turn>user\n{}<end_of_turn>\n<start_of_turn>model\n",
                   chat_image="<start_of_image>", vision=("vision_tower", "multi_modal_projector")),
}
FAMILIES["qwen2_5_vl"] = FAMILIES["qwen2_vl"]  # same tokens, template and official settings
FAMILIES["smolvlm"] = {**FAMILIES["idefics3"],
                       "turn": "<|im_start|>User:{}<end_of_utterance>\nAssistant:"}

# LLaVA-NeXT checkpoints share model_type `llava_next` whatever LLM they wrap; the user turn of
# each, for processors without a chat template (picked by the checkpoint's name).
LLAVA_NEXT_TURNS = {
    "mistral": FAMILIES["llava_next"]["turn"],
    "vicuna": "USER: {} ASSISTANT:",
    "llama3": "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "chatml": CHATML_TURN,  # 34B, 72B, 110B
}


def family_of(config, override=None):
    """The family of a model config (its `model_type`), or `override` when given."""
    family = override or getattr(config, "model_type", config)
    if family not in FAMILIES:
        raise ValueError(f"unknown backbone family {family!r}: known families are "
                         f"{sorted(FAMILIES)}; pass --family to choose one of them")
    return family


def _tokenizer(processor):
    return getattr(processor, "tokenizer", processor)


def _chat_template(processor):
    return processor and (getattr(processor, "chat_template", None)
                          or _tokenizer(processor).chat_template)


def llava_next_variant(processor):
    """The user turn of a LLaVA-NeXT checkpoint: "mistral" (the paper's LLaVA-1.6, official
    strings) for Mistral's `[INST]` chat template, "own" for any other chat template; without a
    template, the turn of the LLM its name says (LLAVA_NEXT_TURNS), else Mistral's."""
    template = _chat_template(processor)
    if template:
        return "mistral" if "[INST]" in template else "own"
    name = str(getattr(_tokenizer(processor), "name_or_path", "")).lower() if processor else ""
    for variant, marks in (("vicuna", ("vicuna",)), ("llama3", ("llama3", "llama-3")),
                           ("chatml", ("34b", "72b", "110b"))):
        if any(mark in name for mark in marks):
            return variant
    return "mistral"


def _wrap(family, text, image, processor):
    """One user turn holding (image, text) in the family's chat format."""
    spec, template = FAMILIES[family], _chat_template(processor)
    turn = spec["turn"]
    variant = llava_next_variant(processor) if family == "llava_next" else None
    if variant in LLAVA_NEXT_TURNS:
        turn, template = LLAVA_NEXT_TURNS[variant], None
    if family == "phi3_v" or not template:  # the official strings, or no template to follow
        return turn.format((spec["chat_image"] if image else "") + text)
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
    tokenizer = _tokenizer(processor)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                           chat_template=template, tokenize=False,
                                           add_generation_prompt=True)
    # templates that open with the BOS text (Gemma 3, Idefics3) would get a second BOS from a
    # tokenizer that adds its own
    bos = tokenizer.bos_token
    adds_bos = tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
    if bos and prompt.startswith(bos) and adds_bos:
        prompt = prompt[len(bos):]
    return prompt


def format_prompt(family, text=None, image=False, instruction=None, processor=None):
    """The prompt string of one input. Without `instruction`: the "in one word" prompt (§3.1) in
    the family's chat template; an image alone gets the image prompt, anything with text the
    sentence prompt. With `instruction` (a whole MMEB row's text, stage 2 and MMEB eval): the
    official MMEB format, `<|image_1|>` swapped for the family's placeholder, which is put in
    front when an image is given but not mentioned."""
    family = family_of(family)
    raw = FAMILIES[family]["raw"]
    if instruction is None:
        if text is None and not image:
            raise ValueError("an input needs text, an image, or both")
        if text is not None and not text.strip():
            raise ValueError("empty text: every input needs some content to embed")
        body = f"{text}\n{TEXT_INSTRUCTION}" if text is not None else IMAGE_INSTRUCTION
        return _wrap(family, body, image, processor)
    body = MMEB_IMAGE_TAG.sub(raw, instruction)
    if image and raw not in body:
        body = f"{raw}\n{body}"
    if not image and (raw in body or not body.strip()):
        raise ValueError(f"an MMEB input without an image needs text, and no image tag: "
                         f"{instruction!r}")
    if family == "llava_onevision":  # UniME-V2's Llava_OV_process
        body = body.replace(f"{raw}\n", "").replace(raw, "").strip()
        return _wrap(family, body, image, processor)
    return body


# ---------------------------------------------------------------- one chunk -> tensors

def process(processor, family, texts=None, images=None, instructions=None, max_length=None):
    """One chunk of inputs (lists; an entry may be None) -> a left-padded batch of CPU tensors
    for `model.model(**batch)`. Rows with and without an image may share a chunk in every
    family. `max_length` (the family's official max_len) cuts rows as the official pipeline
    does: an MMEB row at its end, by the processor's tokenizer (`truncation=True`), image
    tokens counted, except a Phi-3.5-V row with an image, which its processor never cuts; an
    "in one word" prompt in its content (`fit_content`), so the template's end stays."""
    n = len(next(x for x in (texts, images, instructions) if x is not None))
    texts, images, instructions = (list(x) if x is not None else [None] * n
                                   for x in (texts, images, instructions))
    if not processors.takes_images(processor) and any(im is not None for im in images):
        raise ValueError(f"the {family} processor given is a {type(processor).__name__}, which "
                         f"cannot take images: load it with processors.load_processor (it says "
                         f"what to install) rather than drop them")
    if max_length:
        texts = fit_content(processor, family, texts, images, instructions, max_length)
    prompts = [format_prompt(family, t, im is not None, ins, processor)
               for t, im, ins in zip(texts, images, instructions)]
    try:
        batch = _batch(processor, family, prompts, images, max_length)
    except (ValueError, TypeError) as error:  # HF processors refuse a cut through image tokens
        if max_length and family != "phi3_v":
            _refuse_cut_images(processor, family, prompts, images, max_length, error)
        raise
    if max_length and family != "phi3_v":
        _refuse_cut_images(processor, family, prompts, images, max_length, batch=batch)
    return batch


def _batch(processor, family, prompts, images, max_length=None):
    cut = dict(truncation=True, max_length=max_length) if max_length else {}
    if family == "phi3_v":
        return _one_prompt_per_call(processor, prompts, images, cut)
    # every processor here accepts images nested per sample; Idefics3, SmolVLM and Gemma 3 need it
    nested = [[im] if im is not None else [] for im in images]
    return dict(processor(text=prompts, images=nested if any(nested) else None, padding=True,
                          padding_side="left", return_tensors="pt", **cut))


def _one_prompt_per_call(processor, prompts, images, cut):
    """Phi-3.5-V's processor takes one prompt string per call when it has an image (it splits on
    `<|image_N|>` and returns a batch of one): process row by row, then left-pad and stack, as
    VLM2Vec's collator does. Image tokens are negative ids; the model places the images' features
    at them in row order, so `pixel_values` holds only the rows that have an image."""
    rows = [processor(p, [im] if im is not None else None, return_tensors="pt", **cut)
            for p, im in zip(prompts, images)]
    width, pad = max(r["input_ids"].shape[1] for r in rows), _tokenizer(processor).pad_token_id

    def left_pad(t, value=0):  # (1, L) -> (1, width)
        return F.pad(t, (width - t.shape[1], 0), value=value)
    batch = {"input_ids": torch.cat([left_pad(r["input_ids"], pad) for r in rows]),
             "attention_mask": torch.cat([left_pad(r["attention_mask"]) for r in rows])}
    with_image = [r for r in rows if "pixel_values" in r]
    if with_image:  # the processor pads every image to num_crops + 1 crops
        batch["pixel_values"] = torch.cat([r["pixel_values"] for r in with_image])
        batch["image_sizes"] = torch.cat([r["image_sizes"] for r in with_image])
    return batch


def fit_content(processor, family, texts, images, instructions, max_length):
    """`texts` with each "in one word" prompt's content cut at its end until the whole prompt
    fits in `max_length` tokens. The official evaluation never cuts these prompts; cutting the
    whole prompt at its end would drop the template's suffix ("...in one word:", the assistant
    turn), where the embedding is read. Phi-3.5-V rows with an image are left whole, as its
    processor leaves them."""
    texts = list(texts)
    rows = [i for i, (t, im, ins) in enumerate(zip(texts, images, instructions))
            if t is not None and ins is None and not (family == "phi3_v" and im is not None)]
    tokenizer, tries = _tokenizer(processor), 4
    while rows:  # re-tokenizing a cut text may merge tokens differently: measure again
        prompts = [format_prompt(family, texts[i], images[i] is not None, None, processor)
                   for i in rows]
        lengths = _batch(processor, family, prompts, [images[i] for i in rows])[
            "attention_mask"].sum(1).tolist()
        over = [(i, n) for i, n in zip(rows, lengths) if n > max_length]
        rows, tries = [i for i, _ in over], tries - 1
        if over and not tries:
            raise ValueError(f"could not fit the texts of rows {rows} into {max_length} tokens")
        for i, n in over:
            ids = tokenizer(texts[i], add_special_tokens=False)["input_ids"]
            keep = len(ids) - (n - max_length)
            if keep <= 0:
                raise ValueError(f"max_length {max_length} leaves no room for the text "
                                 f"{texts[i][:60]!r}...: raise it")
            texts[i] = tokenizer.decode(ids[:keep])
    return texts


def _refuse_cut_images(processor, family, prompts, images, max_length, error=None, batch=None):
    """Stop in one line, naming the rows, where max_length cuts into a row's image tokens: most
    processors raise an error that names no row (Idefics3's is a TypeError), a processor that
    does not check would give the model fewer image tokens than image features."""
    image_token = getattr(processor, "image_token_id", None)
    cut = []
    for i, image in enumerate(images):
        if image is None or (batch is not None and (
                image_token is None or batch["attention_mask"][i].sum() < max_length)):
            continue
        whole = _batch(processor, family, [prompts[i]], [image])["input_ids"][0]
        if batch is None:
            cut += [i] if len(whole) > max_length else []
        elif (whole == image_token).sum() != (batch["input_ids"][i] == image_token).sum():
            cut.append(i)
    if cut:
        why = f" ({str(error).splitlines()[0]})" if error else ""
        raise ValueError(f"rows {cut}: max_length {max_length} cuts into their image tokens"
                         f"{why}; raise max_length or use smaller images") from error


# ---------------------------------------------------------------- images

RESOLUTIONS = {"high": 1344, "mid": 672, "mid_336": 336, "low": 128}


def prepare_image(family, image, resolution=None):
    """VLM2Vec's `_process_image` / UniME-V2's `process_image`: Phi-3.5-V images are never
    resized, its processor tiles them into 336-px crops (at most `num_crops`, a processor
    argument: 4 in UniME's MMEB eval); other families are squashed to a square of the named side
    ("high" 1344, "mid" 672, "mid_336" 336, "low" 128, or pixels; the paper's stage 2: 336).
    None or "original" keeps the image. Official MMEB eval: FAMILIES[family]["eval_resolution"]."""
    if image is None or resolution in (None, "original") or family_of(family) == "phi3_v":
        return image
    side = RESOLUTIONS[resolution] if isinstance(resolution, str) else int(resolution)
    return image.resize((side, side))


# ---------------------------------------------------------------- LoRA targets

def lora_targets(model, family, include_vision=False):
    """Names of the nn.Linear layers that get an adapter. Stage 1 (§3.2, only the LLM learns):
    the decoder's. Stage 2 (§3.3, all linear layers of the MLLM): the vision tower's and the
    projector's too. Never the LM head; never a layer owned by nn.MultiheadAttention, which reads
    its weight directly (a wrapper breaks it); never SigLIP's pooling head, whose output
    LLaVA-OneVision and Gemma 3 do not use (its adapters would get no gradient)."""
    vision = set(FAMILIES[family_of(family)]["vision"])
    unused = unused_vision_layers(model, family)
    head = model.get_output_embeddings()
    owned = {id(m) for mha in model.modules() if isinstance(mha, nn.MultiheadAttention)
             for m in mha.modules()}
    targets = []
    for name, module in model.named_modules():
        parts = set(name.split("."))
        layer = re.search(r"\.layers\.(\d+)\.", name)
        if (not isinstance(module, nn.Linear) or module is head or id(module) in owned
                or (parts & vision and ("head" in parts or not include_vision
                                        or (layer and int(layer.group(1)) in unused)))):
            continue
        targets.append(name)
    if not targets:
        raise ValueError(f"no linear layers to adapt in this {family} model")
    return targets


def unused_vision_layers(model, family):
    """Indices of the vision tower's layers after the one the projector reads. LLaVA-1.5 and
    LLaVA-NeXT (`vision_feature_layer` -2) and Phi-3.5-V (`img_processor.layer_idx`, -2) read the
    second-to-last CLIP layer: the last one runs but never reaches the embedding."""
    config = model.config
    layer = getattr(config, "vision_feature_layer", None)
    if family == "phi3_v":
        layer = (getattr(config, "img_processor", None) or {}).get("layer_idx", -2)
    if layer is None:
        return set()
    vision = set(FAMILIES[family]["vision"])
    found = [re.search(r"\.layers\.(\d+)$", name) for name, _ in model.named_modules()
             if set(name.split(".")) & vision]
    n = len({m.group(1) for m in found if m})
    # hidden states: n + 1 of them, the k-th after k layers; a negative index counts from the end
    reads = max(i % (n + 1) for i in (layer if isinstance(layer, (list, tuple)) else [layer]))
    return set(range(reads, n))
