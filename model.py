"""An MLLM as an embedding model (UniME §3.1), and the LoRA it trains.

The embedding of an input is the final-layer hidden state of its *last real token* under a
summarizing prompt ("... Summary above image in one word:"), L2-normalized. Any Hugging Face
image-text-to-text model of a family in families.py works; that file holds what differs
between families (prompts, batching, truncation, image sizes, LoRA targets), processors.py how
a family's processor loads. What a stage of train.py writes, and how it loads back: stages.py.
"""
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import families
import processors


# ---------------------------------------------------------------- loading any MLLM

def load_mllm(name_or_path, dtype=torch.float32, device="cpu", trust_remote_code=False,
              family=None, load_in_4bit=False):
    """(model, processor, family) from a Hugging Face id or a local folder; the family comes
    from the config's model_type unless `family` names one (families.FAMILIES). load_in_4bit:
    the linear layers' weights in 4-bit NF4 (QLoRA, bitsandbytes on CUDA), computed in `dtype`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise SystemExit(missing_model(name_or_path, e))
    try:
        family = families.family_of(config, family)
    except ValueError as e:
        raise SystemExit(f"{name_or_path}: {e}") from None
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    if load_in_4bit:  # placed on `device` while loading: a 4-bit model cannot be moved after
        from transformers import BitsAndBytesConfig
        kwargs.update(device_map={"": device}, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype))
    try:
        model = AutoModelForImageTextToText.from_pretrained(name_or_path, **kwargs)
    except ValueError:  # remote-code families (Phi-3.5-V) register only as causal LMs
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    # Phi-3.5-V: at most 4 crops of 336 px per image, as UniME's MMEB evaluation runs it
    crops = {"num_crops": 4} if family == "phi3_v" else {}
    processor = processors.load_processor(name_or_path, family,
                                          trust_remote_code=trust_remote_code, **crops)
    return (model if load_in_4bit else model.to(device)), processor, family


def missing_model(name, error, what="model"):
    """One line for a model that does not load: which, why, and what to do offline."""
    name = str(name)
    if not os.path.exists(name) and (name.startswith((".", "~", os.sep)) or name.count("/") > 1
                                     or os.path.isdir(os.path.dirname(name) or "\0")):
        return f"no such folder: {name} (the {what}); check the path"  # not a hub id's problem
    return (f"cannot load {what} {name!r}: {str(error).strip().splitlines()[0]} Offline, pass "
            f"a local folder (save_pretrained) or set HF_HOME to a cache that holds it; "
            f"remote-code models also need trust_remote_code (--trust-remote-code).")


def precision(device, dtype="auto"):
    """The one place that decides precision -> (dtype of the frozen weights, autocast dtype or
    None). auto: bf16 weights and bf16 autocast on CUDA (the paper trains in BF16), fp32 on the
    CPU; fp32: fp32 everywhere; bf16: bf16 autocast on any device, fp32 weights on the CPU."""
    cuda = torch.device(device).type == "cuda"
    if dtype == "fp32":
        return torch.float32, None
    if dtype == "bf16" or (dtype == "auto" and cuda):
        return (torch.bfloat16 if cuda else torch.float32), torch.bfloat16
    if dtype != "auto":
        raise ValueError(f"dtype must be auto, fp32 or bf16, not {dtype!r}")
    return torch.float32, None


def autocast(device, amp):
    """Autocast to `amp` (a dtype from `precision`), or a no-op when it is None."""
    return torch.autocast(torch.device(device).type, dtype=amp or torch.bfloat16,
                          enabled=amp is not None)


# ---------------------------------------------------------------- last-token embedding (§3.1)

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


def modality_chunks(has_image, chunk_size):
    """Row indices grouped into chunks of one modality (text-only rows, then rows with an
    image), at most chunk_size each: one processor call per chunk, padding per chunk, so short
    text rows are not padded to the length of image prompts (mixed chunks work too)."""
    chunks = []
    for with_image in (False, True):
        rows = [i for i, h in enumerate(has_image) if bool(h) == with_image]
        chunks += [rows[s:s + chunk_size] for s in range(0, len(rows), chunk_size)]
    return chunks


def process(processor, family, texts=None, images=None, instructions=None, max_length=None,
            device="cpu"):
    """One chunk of inputs (lists; an entry may be None) -> the model's input tensors on
    `device`: families.process, which formats each row's prompt (the "in one word" prompt for
    text and images, MMEB's format for an instruction) and batches rows with left padding."""
    batch = families.process(processor, family, texts, images, instructions, max_length)
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def encode(model, processor, family, texts=None, images=None, instructions=None, batch_size=64,
           device="cpu", amp=None, max_length=None):
    """Embed many inputs without gradients -> (n, d) float32 on the CPU, in input order.
    Rows with and without an image are batched apart (`modality_chunks`)."""
    n = len(next(x for x in (texts, images, instructions) if x is not None))
    texts, images, instructions = (x if x is not None else [None] * n
                                   for x in (texts, images, instructions))
    out = torch.empty(0)
    for idx in modality_chunks([img is not None for img in images], batch_size):
        batch = process(processor, family, [texts[i] for i in idx], [images[i] for i in idx],
                        [instructions[i] for i in idx], max_length, device)
        with autocast(device, amp):
            e = embed(model, batch).cpu()
        out = out if len(out) else torch.empty(n, e.shape[1])
        out[idx] = e
    return out


def require_finite(vectors, model):
    """vectors (n, d), or a stop naming `model` and how many rows hold NaN or inf: scored, they
    would look perfect to a metric that breaks ties by position."""
    bad = int((~torch.isfinite(vectors)).any(dim=-1).sum())
    if bad:
        raise SystemExit(f"{model}: {bad} of {len(vectors)} embeddings are NaN or infinite; a "
                         f"broken model is not scored (check its weights and --dtype)")
    return vectors


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

    # what model code reads of the wrapped layer (Phi-3.5-V: img_projection[0].bias.device)
    weight, bias = property(lambda s: s.base.weight), property(lambda s: s.base.bias)
    in_features, out_features = (property(lambda s: s.base.in_features),
                                 property(lambda s: s.base.out_features))
    dtype, device = property(lambda s: s.weight.dtype), property(lambda s: s.weight.device)

    def forward(self, x):
        update = self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.T @ self.lora_B.T
        return self.base(x) + (self.scaling * update).to(x.dtype)

    def merged(self):
        """The plain nn.Linear with the adapter folded into its weight."""
        if not self.base.weight.is_floating_point():
            raise ValueError("an adapter cannot be folded into 4-bit weights: keep it apart "
                             "(a stage output does) and merge into the base loaded in bf16")
        with torch.no_grad():
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
            self.base.weight += delta.to(self.base.weight.dtype)
        return self.base


def inject_lora(model, targets, r, alpha, dropout):
    """Freeze every parameter, then wrap each nn.Linear named in `targets` (which layers a stage
    adapts: families.lora_targets) in a LoRALinear. Returns `targets`."""
    for p in model.parameters():
        p.requires_grad_(False)
    if not targets:
        raise ValueError("no layers to adapt")
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


def load_lora(model, state):
    missing = set(lora_state_dict(model)) ^ set(state)
    if missing:
        raise ValueError(f"adapter does not fit this model: {sorted(missing)[:4]} ...")
    model.load_state_dict(state, strict=False)


def checkpoint_activations(model):
    """HF's gradient checkpointing (activation checkpointing from transformers 5.24), non-reentrant:
    its recomputation restores the RNG state, so LoRA dropout repeats, as GradCache needs."""
    enable = getattr(model, "activation_checkpointing_enable", None) or \
        model.gradient_checkpointing_enable
    enable({"use_reentrant": False})


# ---------------------------------------------------------------- the Python API

def embed_inputs(model, processor, family, inputs, batch_size=64, device="cpu", amp=None,
                 max_length=None, resolution=None):
    """[(text, image, instruction)] -> (n, d) L2-normalized float32 embeddings, in order, for a
    model from load_embedder (a stage output, an export or an HF id). `image` is a path or a PIL
    image, opened a batch at a time (resized by families.prepare_image to `resolution`); any
    entry may be None. Without an instruction, text and images get the zero-shot "in one word"
    prompts (§3.1); with one, the MMEB format, the text after the instruction (cut to
    `max_length` tokens as the official pipeline cuts it)."""
    out = []
    for s in range(0, len(inputs), batch_size):
        texts, images, instructions = map(list, zip(*inputs[s:s + batch_size]))
        instructions = [ins if ins is None or t is None else f"{ins} {t}"
                        for t, ins in zip(texts, instructions)]
        texts = [t if ins is None else None for t, ins in zip(texts, instructions)]
        images = [families.prepare_image(family, data.load_image(im), resolution)
                  if im is not None else None for im in images]
        out.append(encode(model, processor, family, texts, images, instructions, batch_size,
                          device, amp, max_length))
    return torch.cat(out)


def progress(label, total, every=30.0):
    """A function to call with how many of `total` items are done. It prints `label: done/total
    (elapsed, ETA)` at most every `every` seconds, and a last line at the end of a pass that
    printed any: short passes stay quiet."""
    start = last = time.time()

    def update(done):
        nonlocal last
        now = time.time()
        if now - last < every and not (done >= total and last > start):
            return
        last = now
        eta = (total - done) * (now - start) / max(done, 1)
        print(f"{label}: {done}/{total} ({now - start:.0f}s, ETA {eta:.0f}s)", flush=True)
    return update


def count_parameters(model, trainable_only=False):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
