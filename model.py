"""An MLLM as an embedding model (UniME §3.1), a hand-written LoRA, and the embedded tiny MLLM.

The embedding of an input is the final-layer hidden state of its *last real token* under a
summarizing prompt ("... Summary above image in one word:"), L2-normalized. Any Hugging Face
image-text-to-text model works; the prompt template depends on the backbone family.
"""
import json
import math
import os
import shutil
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F

TEXT_INSTRUCTION = "Summary above sentence in one word:"
IMAGE_INSTRUCTION = "Summary above image in one word:"
MMEB_IMAGE_TOKEN = "<|image_1|>"  # MMEB-train/eval text hard-codes Phi-3-V's image token

# Backbone family -> (chat template around the user turn, the family's image placeholder).
# Phi-3.5-V and LLaVA-1.6 give exactly the strings of the official evaluation code (SPEC §1).
FAMILIES = {
    "phi3_v": ("<|user|>\n{}<|end|>\n<|assistant|>\n", "<|image_1|>"),
    "llava_next": ("[INST] {} [/INST]", "<image>"),  # LLaVA-1.6 (Mistral)
    "llava": ("USER: {} ASSISTANT:", "<image>"),  # LLaVA-1.5 and the embedded tiny model
    "llava_onevision": ("<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n", "<image>"),
    "qwen2_vl": ("<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
                 "<|vision_start|><|image_pad|><|vision_end|>"),
    "qwen2_5_vl": ("<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
                   "<|vision_start|><|image_pad|><|vision_end|>"),
    "idefics3": ("<|im_start|>User:{}<end_of_utterance>\nAssistant:", "<image>"),
}


def family_of(model_type):
    if model_type not in FAMILIES:
        raise ValueError(f"unknown backbone family {model_type!r}: known families are "
                         f"{sorted(FAMILIES)}; pass --family to choose one of them")
    return model_type


def format_prompt(family, text=None, image=False, instruction=None):
    """The prompt string for one input. Without `instruction`, the "in one word" prompts (§3.1):
    an image alone gets the image prompt, anything with text the sentence prompt. With an
    `instruction` (stage 2, MMEB), it is used as given, MMEB's `<|image_1|>` swapped for the
    family's placeholder (added in front when an image is present but not mentioned)."""
    template, image_token = FAMILIES[family_of(family)]
    if instruction is None:
        if text is None and not image:
            raise ValueError("an input needs text, an image, or both")
        if text is not None and not text.strip():
            raise ValueError("empty text: every input needs some content to embed")
        body = f"{text}\n{TEXT_INSTRUCTION}" if text is not None else IMAGE_INSTRUCTION
        if image:
            body = f"{image_token}\n{body}"
        return template.format(body)
    body = instruction.replace(MMEB_IMAGE_TOKEN, image_token)
    if image and image_token not in body:
        body = f"{image_token}\n{body}"
    if not image and image_token in body:
        raise ValueError(f"prompt mentions an image but none was given: {instruction!r}")
    return template.format(body)


# ---------------------------------------------------------------- loading any MLLM

def load_mllm(name_or_path, dtype=torch.float32, device="cpu", trust_remote_code=False,
              family=None):
    """(model, processor, family) from a Hugging Face id or a local folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, \
        AutoProcessor
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    family = family_of(family or config.model_type)
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    try:
        model = AutoModelForImageTextToText.from_pretrained(name_or_path, **kwargs)
    except ValueError:  # remote-code families (Phi-3.5-V) register only as causal LMs
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    processor = AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    processor.tokenizer.padding_side = "left"  # the official code pads left; pooling handles both
    return model.to(device), processor, family


# ---------------------------------------------------------------- last-token embedding

def last_token_pool(hidden, attention_mask):
    """(n, L, d), (n, L) -> (n, d): the hidden state at the last position whose mask is 1.
    Right for left padding, right padding and none: the last 1 has the largest index."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask.long() * positions).argmax(dim=1)  # (n,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def base_model(model):
    """The MLLM without its LM head: it returns `last_hidden_state`, not vocabulary logits."""
    return model.model


def embed(model, batch):
    """Processed inputs (token ids, mask, optional pixels) -> L2-normalized embeddings (n, d)."""
    out = base_model(model)(**batch, use_cache=False)
    return F.normalize(last_token_pool(out.last_hidden_state, batch["attention_mask"]).float(),
                       dim=-1)


def process(processor, family, texts=None, images=None, instruction=None, instructions=None,
            device="cpu"):
    """Tokenize (and process images for) one chunk of inputs; texts/images are lists where an
    entry may be None. `instructions` gives one instruction per row (stage 2)."""
    n = len(next(x for x in (texts, images, instructions) if x is not None))
    texts = texts if texts is not None else [None] * n
    images = images if images is not None else [None] * n
    instructions = instructions if instructions is not None else [instruction] * n
    prompts = [format_prompt(family, t, img is not None, ins)
               for t, img, ins in zip(texts, images, instructions)]
    present = [img for img in images if img is not None]
    if present and len(present) != n:
        raise ValueError("a chunk must be all-image or all-text for this processor; "
                         "split mixed chunks by modality (train.py does)")
    kwargs = dict(text=prompts, padding=True, return_tensors="pt")
    if present:
        kwargs["images"] = present
    return processor(**kwargs).to(device)


def autocast(device, bf16=None):
    """bf16 autocast, on CUDA by default; on CPU only when asked (bf16=True)."""
    device_type = torch.device(device).type
    enabled = device_type == "cuda" if bf16 is None else bf16
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def encode(model, processor, family, texts=None, images=None, instructions=None, batch_size=64,
           device="cpu"):
    """Embed many inputs without gradients -> (n, d) float32 on CPU. Rows with and without an
    image are batched separately (one processor call per modality), then put back in order."""
    n = len(next(x for x in (texts, images, instructions) if x is not None))
    texts = texts if texts is not None else [None] * n
    images = images if images is not None else [None] * n
    instructions = instructions if instructions is not None else [None] * n
    out = [None] * n
    for has_image in (False, True):
        rows = [i for i in range(n) if (images[i] is not None) == has_image]
        for s in range(0, len(rows), batch_size):
            idx = rows[s:s + batch_size]
            batch = process(processor, family, [texts[i] for i in idx], [images[i] for i in idx],
                            instructions=[instructions[i] for i in idx], device=device)
            with autocast(device):
                e = embed(model, batch).cpu()
            for j, i in enumerate(idx):
                out[i] = e[j]
    return torch.stack(out) if n else torch.empty(0)


# ---------------------------------------------------------------- LoRA, written out

class LoRALinear(nn.Module):
    """y = W x + (alpha / r) * B A dropout(x), with A (r, in) random and B (out, r) zero, so
    training starts exactly at the base model."""

    def __init__(self, base: nn.Linear, r=8, alpha=16, dropout=0.0):
        super().__init__()
        self.base, self.r, self.scaling = base, r, alpha / r
        # fp32 adapters even on a bf16 base: the optimizer then updates full-precision weights
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        update = self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.T @ self.lora_B.T
        return self.base(x) + (self.scaling * update).to(x.dtype)

    def merged(self):
        """The plain nn.Linear with the adapter folded into its weight."""
        with torch.no_grad():
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
            self.base.weight += delta.to(self.base.weight.dtype)
        return self.base


# Sub-modules that belong to the vision side in the supported families; stage 1 leaves them
# untouched (§3.2: only the LLM learns), stage 2 adapts them too (§3.3: the whole MLLM).
VISION_PARTS = ("vision_tower", "vision_model", "visual", "vision_embed_tokens", "img_processor",
                "img_projection", "multi_modal_projector", "connector")
LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "out_proj", "gate_proj",
                   "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2", "linear_1", "linear_2",
                   "qkv", "proj", "mlp.0", "mlp.2")


def inject_lora(model, r, alpha, dropout, include_vision=False, suffixes=LINEAR_SUFFIXES):
    """Freeze every parameter, then wrap each nn.Linear whose name ends with one of `suffixes`
    (the LM head never matches), skipping the vision side unless `include_vision`.
    Returns the wrapped module names."""
    for p in model.parameters():
        p.requires_grad_(False)
    targets = [name for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name.endswith(suffixes)
               and (include_vision or not set(name.split(".")) & set(VISION_PARTS))]
    if not targets:
        raise ValueError(f"no linear layer name ends with one of {suffixes}")
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout))
    return targets


def merge_lora(model):
    """Fold every adapter into its base weight and put the plain nn.Linear back."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, m.merged())
    return model


def lora_state_dict(model):
    return {k: v.detach().cpu() for k, v in model.state_dict().items()
            if k.endswith(("lora_A", "lora_B"))}


def load_embedder(path_or_id, device="cpu", dtype=torch.float32, trust_remote_code=False,
                  family=None):
    """(model, processor, family) for an HF id, a model folder, or a stage output of train.py:
    a folder with `unime.json` (what it started from, the LoRA shape) and `adapter.pt`. A stage
    output is loaded by loading what it started from (recursively), then merging its adapter."""
    meta_path = os.path.join(str(path_or_id), "unime.json")
    if not os.path.isfile(meta_path):
        return load_mllm(path_or_id, dtype, device, trust_remote_code, family)
    with open(meta_path) as f:
        meta = json.load(f)
    init = meta["init"]
    if meta.get("init_is_local"):
        init = os.path.normpath(os.path.join(str(path_or_id), init))
    model, processor, family = load_embedder(init, device, dtype,
                                             meta.get("trust_remote_code", False),
                                             family or meta.get("family"))
    inject_lora(model, **meta["lora"])
    load_lora(model, torch.load(os.path.join(str(path_or_id), "adapter.pt"), map_location="cpu"))
    return merge_lora(model).to(device), processor, family


def stage_meta(init, out, lora, **extra):
    """What `load_embedder` needs to rebuild a stage output from the model it started from."""
    local = os.path.exists(init)
    return {"init": os.path.relpath(init, out) if local else init, "init_is_local": local,
            "lora": lora, **extra}


def load_lora(model, state):
    missing = set(lora_state_dict(model)) ^ set(state)
    if missing:
        raise ValueError(f"adapter does not fit this model: {sorted(missing)[:4]} ...")
    model.load_state_dict(state, strict=False)


# ---------------------------------------------------------------- the embedded tiny MLLM

TINY_CONFIG = dict(width=64, layers=2, heads=2, image_size=32, patch_size=8, vocab_size=400)


def build_tiny_mllm(path, corpus, seed=0, **overrides):
    """A LLaVA-architecture MLLM (CLIP vision tower, projector, Llama decoder) with random
    weights and a byte-level BPE tokenizer trained on `corpus`, saved like a downloaded model.
    Deterministic from `seed`. Written to a temporary folder and renamed, so a crash leaves
    no half-built model behind."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor,
                              PreTrainedTokenizerFast)
    c = {**TINY_CONFIG, **overrides}
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=c["vocab_size"], special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>",
                                        extra_special_tokens={"image_token": "<image>"},
                                        padding_side="left")
    n_patches = (c["image_size"] // c["patch_size"]) ** 2
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=c["width"], intermediate_size=2 * c["width"],
            num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
            image_size=c["image_size"], patch_size=c["patch_size"], projection_dim=c["width"]),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=c["width"], intermediate_size=2 * c["width"],
            num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
            num_key_value_heads=c["heads"], max_position_embeddings=256,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=n_patches, vision_feature_layer=-1,
        vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    size = {"height": c["image_size"], "width": c["image_size"]}
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": c["image_size"]},
                                              crop_size=size),
        tokenizer=tokenizer, patch_size=c["patch_size"], vision_feature_select_strategy="default",
        num_additional_image_tokens=1)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def count_parameters(model, trainable_only=False):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
