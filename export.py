"""A stage output of train.py, made loadable anywhere: with plain transformers, with PEFT.

    python export.py runs/stage2 exports/unime-stage2      # --dtype bf16 halves the size

OUT_DIR gets
- the merged model and its processor (`save_pretrained`): `AutoModelForImageTextToText` and
  `AutoProcessor` load it with no code of this project;
- `adapter/`: the last stage's LoRA in PEFT's layout (`adapter_config.json` and
  `adapter_model.safetensors`), for `peft.PeftModel.from_pretrained` on the model that stage
  started from; when that start is itself a stage output (stage 2 on stage 1), it is written
  too, as `adapter-base/`. A full fine-tune (--lora-r 0) has no adapter;
- `README.md`, the model card: base, stages, prompts, and the pooling in plain transformers.
The export is built in a temporary folder beside OUT_DIR and renamed into place when complete.
"""
import argparse
import json
import os
import shutil
import tempfile

import torch

import families
import model as M

MANIFEST = "export.json"  # names what an export wrote, so --overwrite removes nothing else
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def stage_chain(path):
    """[(folder, unime.json)] from this stage output back to the first one, and the model the
    first one started from (an HF id or a model folder)."""
    chain = []
    meta = M.read_stage_meta(path)
    while meta is not None:
        chain.append((path, meta))
        path = M.stage_init(path, meta)
        meta = M.read_stage_meta(path)
    return chain, path


def peft_adapter(loras, base_name):
    """PEFT's files for LoRALinear layers {name: layer}: tensors under PEFT's key names
    (`base_model.model.<name>.lora_A.weight`, the same (r, in) and (out, r) matrices) and the
    config that rebuilds them: the exact layer names as target_modules, r, alpha, dropout."""
    layer = next(iter(loras.values()))
    tensors = {f"base_model.model.{name}.lora_{x}.weight":
               getattr(m, f"lora_{x}").detach().float().contiguous().cpu()
               for name, m in loras.items() for x in "AB"}
    alpha = layer.scaling * layer.r
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_name,
              "r": layer.r, "lora_alpha": int(alpha) if alpha == int(alpha) else alpha,
              "lora_dropout": layer.dropout.p, "target_modules": sorted(loras), "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "inference_mode": True, "modules_to_save": None}
    return tensors, config


def write_adapter(folder, tensors, config):
    from safetensors.torch import save_file  # a dependency of transformers
    os.makedirs(folder)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), {"format": "pt"})
    with open(os.path.join(folder, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)


def run_settings(folder):
    """The run's settings as its last checkpoint recorded them ({} without one). mmap: only the
    small config is read, not the weights and optimizer state beside it."""
    path = os.path.join(folder, "checkpoint.pt")
    if not os.path.isfile(path):
        return {}
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("config", {})


def model_card(chain, root, family, processor, adapter_base):
    """README.md: what the model is and how to embed with it, in plain transformers."""
    stages = []
    for folder, meta in reversed(chain):
        s, lora = run_settings(folder), meta["lora"]
        what = {1: "textual discriminative knowledge distillation (§3.2)",
                2: "hard-negative enhanced instruction tuning (§3.3)"}[meta["stage"]]
        how = (f"LoRA r={lora['r']}, alpha={lora['alpha']}, dropout={lora['dropout']}, merged"
               if lora else "every weight fine-tuned")
        keys = ("data", "max_steps", "batch_size", "lr", "tau") + (
            ("teacher", "load_in_4bit") if meta["stage"] == 1 else ("k", "beta"))
        shown = ", ".join(f"{k}={s[k]}" for k in keys if s.get(k) not in (None, False))
        stages.append(f"- stage {meta['stage']}, {what}: {how}" + (f"; {shown}" if shown else ""))
    text_prompt = families.format_prompt(family, text="{text}", processor=processor)
    image_prompt = families.format_prompt(family, image=True, processor=processor)
    mmeb_prompt = families.format_prompt(family, image=True, processor=processor, instruction=(
        "<|image_1|> Represent the given image for classification."))
    last = chain[0][1]
    if not last["lora"]:
        adapter = "No adapter: the last stage fine-tuned every weight."
    else:
        base = "`adapter-base/` (the model the last stage started from, also in this folder)" \
            if adapter_base else f"`{M.stage_init(*chain[0])}`"
        adapter = (f"`adapter/` holds the last stage's LoRA in PEFT's format; it applies to "
                   f"{base}:\n`PeftModel.from_pretrained(AutoModelForImageTextToText."
                   f"from_pretrained(base), 'adapter')` gives the same embeddings as this folder.")
    phi = family == "phi3_v"  # remote code, and a processor that takes one prompt per call
    loader = "AutoModelForCausalLM" if phi else "AutoModelForImageTextToText"
    remote = ", trust_remote_code=True" if phi else ""
    one_per_call = "; Phi-3.5-V: one prompt per call" if phi else ""
    video = (f" `AutoProcessor` builds its {type(processor).__name__} with a video processor, "
             f"which needs torchvision (`pip install torchvision`)." if hasattr(
                 processor, "video_processor") or hasattr(processor, "video_processor_config")
             else "")
    return f"""# UniME embedding model from {root}

A universal multimodal embedding model trained with UniME (Gu et al. 2025, arXiv 2504.17432)
from **{root}** (family `{family}`). Stages, in order:
{chr(10).join(stages)}

This folder is the merged model: `{loader}` and `AutoProcessor` load it.{video}
{adapter}

## Prompts
Text: `{text_prompt!r}` (with `{{text}}` replaced)
Image: `{image_prompt!r}`
MMEB-style input (the data's own instruction, VLM2Vec's format): `{mmeb_prompt!r}`

## Embeddings (last token, left padding, L2-normalized)
```python
import torch, torch.nn.functional as F
from PIL import Image
from transformers import {loader}, AutoProcessor
model = {loader}.from_pretrained(FOLDER{remote}).eval()
processor = AutoProcessor.from_pretrained(FOLDER{remote})
processor.tokenizer.padding_side = "left"  # the last position is then every row's last token

def embed(prompts, images=None):  # images: one PIL image per prompt{one_per_call}
    images = [[image] for image in images] if images else None
    batch = processor(text=prompts, images=images, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model.model(**batch).last_hidden_state  # the base model: no LM head
    return F.normalize(hidden[:, -1].float(), dim=-1)

texts = embed([{text_prompt!r}.replace("{{text}}", "a red circle")])
images = embed([{image_prompt!r}], [Image.open("circle.png")])
print(texts @ images.T)  # cosine similarity
```
"""


def export(run, out, dtype=torch.float32, overwrite=False, trust_remote_code=False):
    """Write the export of stage output `run` into `out` (see the module docstring)."""
    chain, root = stage_chain(run)
    if not chain:
        raise SystemExit(f"{run} is not a finished stage output of train.py (no unime.json)")
    previous = check_out(out, overwrite)
    model, processor, family = M.load_embedder(run, "cpu", torch.float32, trust_remote_code,
                                               merge=False)
    start, last = M.stage_init(*chain[0]), chain[0][1]
    adapter_base = bool(last["lora"]) and M.read_stage_meta(start) is not None
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(os.path.abspath(out))}.tmp-")
    old = None
    try:
        loras = {name: m for name, m in model.named_modules() if isinstance(m, M.LoRALinear)}
        for name, m in loras.items():  # the plain linear layers back in place, adapters aside
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, m.base)
        model.to(dtype)  # the adapters, now outside the model, stay float32
        for config in [model.config, *(getattr(model.config, key) for key in getattr(
                model.config, "sub_configs", {}))]:  # transformers 4.x saves the configs' dtype
            if config is not None:              # (dtype="auto" reads it), not the weights'
                config.dtype = dtype
        if loras:
            write_adapter(os.path.join(tmp, "adapter"),
                          *peft_adapter(loras, "adapter-base" if adapter_base else start))
        if adapter_base:
            M.save_pretrained(os.path.join(tmp, "adapter-base"), model, processor)
        for m in loras.values():
            m.merged()  # folds B A into m.base, the layer now in the model
        M.save_pretrained(tmp, model, processor)
        check_processor(tmp, processor, family, trust_remote_code)
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(chain, root, family, processor, adapter_base))
        files = sorted(os.listdir(tmp)) + [MANIFEST]
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
            json.dump({"run": os.path.abspath(run), "run_id": last["id"], "files": files}, f)
        umask = os.umask(0)
        os.umask(umask)
        for folder, _, names in os.walk(tmp):  # usual permissions: mkdtemp's folder and
            os.chmod(folder, 0o777 & ~umask)  # safetensors' files are 0700 and 0600
            for name in names:
                os.chmod(os.path.join(folder, name), 0o666 & ~umask)
        if previous:  # an earlier export: moved aside whole, removed once the new one is in
            old = tempfile.mkdtemp(dir=parent, prefix=".old-")
            os.replace(out, os.path.join(old, "export"))
        os.replace(tmp, out)  # an empty or absent `out`: one rename, so never half-written
    except BaseException:
        if old and not os.path.exists(out):  # put the earlier export back
            os.replace(os.path.join(old, "export"), out)
            os.rmdir(old)
            old = None
        shutil.rmtree(tmp, ignore_errors=True)  # our own temporary folders
        raise
    if old:
        shutil.rmtree(old)  # only files an export wrote (check_out made sure)
    return out


def check_processor(folder, processor, family, trust_remote_code=False):
    """The processor files just written, read back as a user's machine reads them, must turn an
    image into the tensors the run's processor gives: an export never drops images (one that
    named a class transformers lacks gave users a bare tokenizer). They name the real class,
    and hold the video processor's config where the class has one: AutoProcessor builds the
    whole processor wherever torchvision is installed (families.images_only)."""
    from PIL import Image
    again = families.load_processor(folder, family, trust_remote_code=trust_remote_code)
    row = dict(texts=["a red square"], images=[Image.new("RGB", (40, 28), (200, 30, 90))])
    ours, theirs = (families.process(p, family, **row) for p in (processor, again))
    if ours.keys() != theirs.keys() or not all(torch.equal(ours[k], theirs[k]) for k in ours):
        raise SystemExit(f"the processor files written for {folder} do not process an image "
                         f"as the run's processor does ({type(again).__name__}): no export")


def check_out(out, overwrite):
    """`out` may be absent or empty; with --overwrite, an earlier export holding only what it
    wrote. Returns whether an earlier export is to be replaced."""
    present = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"{out} is a file, not a folder")
    if not present:
        return False
    manifest = os.path.join(out, MANIFEST)
    if not overwrite:
        raise SystemExit(f"{out} is not empty; choose a new folder" +
                         (", or pass --overwrite to replace this earlier export"
                          if os.path.isfile(manifest) else ""))
    if not os.path.isfile(manifest):
        raise SystemExit(f"--overwrite replaces only an earlier export, and {out} is not one "
                         f"(no {MANIFEST}); choose a new folder")
    with open(manifest, encoding="utf-8") as f:
        foreign = sorted(set(present) - set(json.load(f)["files"]))
    if foreign:
        raise SystemExit(f"{out} holds files no export wrote ({', '.join(foreign[:5])}); "
                         f"move them or choose a new folder")
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run", help="a finished stage output of train.py")
    p.add_argument("out", help="a new or empty folder for the export")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="weights as saved (merging is done in fp32 either way)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in out")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model's own code")
    args = p.parse_args(argv)
    out = export(args.run, args.out, DTYPES[args.dtype], args.overwrite, args.trust_remote_code)
    print(f"exported {args.run} to {out}")
    return out


if __name__ == "__main__":
    main()
