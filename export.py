"""A stage output of train.py, made loadable anywhere: with plain transformers, with PEFT.

    python export.py runs/stage2 exports/unime-stage2      # --dtype bf16 halves the size

OUT_DIR gets
- the merged model and its processor (`save_pretrained`): `AutoModelForImageTextToText` and
  `AutoProcessor` load it with no code of this project;
- `adapter/`: the last stage's LoRA in PEFT's layout (`adapter_config.json` and
  `adapter_model.safetensors`), for `peft.PeftModel.from_pretrained` on the model that stage
  started from; when that start is itself a stage output (stage 2 on stage 1), it is written
  too, as `adapter-base/`. A full fine-tune (--lora-r 0) has no adapter;
- `README.md`, the model card: base, stages, prompts, and the pooling in plain transformers;
- a sentence-transformers model's files (`modules.json` ...): `SentenceTransformer(OUT_DIR)`
  embeds as the project does, with no code of it (`write_sentence_transformers`).
The export is built in a temporary folder beside OUT_DIR and renamed into place when complete.
"""
import argparse
import json
import os
import shutil
import tempfile
import uuid

import torch
import transformers

import families
import model as M
import processors
import stages

MANIFEST = "export.json"  # names what an export wrote, so --overwrite removes nothing else
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")


def asset(name):
    """A text template of assets/: the model card's sections, the sentence-transformers prompts."""
    with open(os.path.join(ASSETS, name), encoding="utf-8") as f:
        return f.read()


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
    save_file(tensors, os.path.join(folder, ADAPTER_FILES[1]), {"format": "pt"})
    with open(os.path.join(folder, ADAPTER_FILES[0]), "w", encoding="utf-8") as f:
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
    lines = []
    for folder, meta in reversed(chain):
        s, lora = run_settings(folder), meta["lora"]
        what = {1: "textual discriminative knowledge distillation (§3.2)",
                2: "hard-negative enhanced instruction tuning (§3.3)"}[meta["stage"]]
        how = (f"LoRA r={lora['r']}, alpha={lora['alpha']}, dropout={lora['dropout']}, merged"
               if lora else "every weight fine-tuned")
        keys = ("data", "max_steps", "batch_size", "lr", "tau") + (
            ("teacher", "load_in_4bit") if meta["stage"] == 1 else ("k", "beta"))
        shown = ", ".join(f"{k}={s[k]}" for k in keys if s.get(k) not in (None, False))
        lines.append(f"- stage {meta['stage']}, {what}: {how}" + (f"; {shown}" if shown else ""))
    text_prompt = families.format_prompt(family, text="{text}", processor=processor)
    image_prompt = families.format_prompt(family, image=True, processor=processor)
    mmeb_prompt = families.format_prompt(family, image=True, processor=processor, instruction=(
        "<|image_1|> Represent the given image for classification."))
    last = chain[0][1]
    if not last["lora"]:
        adapter = "No adapter: the last stage fine-tuned every weight."
    else:
        base = "`adapter-base/` (the model the last stage started from, also in this folder)" \
            if adapter_base else f"`{stages.stage_init(*chain[0])}`"
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
    return asset("model-card.md").format(
        root=root, family=family, stages="\n".join(lines), loader=loader, video=video,
        adapter=adapter, text_prompt=text_prompt, image_prompt=image_prompt,
        mmeb_prompt=mmeb_prompt, remote=remote, one_per_call=one_per_call)


# ---------------------------------------------------------------- a sentence-transformers model

ST_VERSION = "5.4.0"  # the first with multimodal Transformer modules, processing_kwargs, prompts
ST_MODULES = [("", "sentence_transformers.base.modules.transformer.Transformer"),
              ("1_Pooling", "sentence_transformers.sentence_transformer.modules.pooling.Pooling"),
              ("2_Normalize", "sentence_transformers.sentence_transformer.modules.normalize."
                              "Normalize")]  # 5.4's paths; 6.x maps them to its own


def sentence_transformers_template(family, processor):
    """assets/sentence-transformers.jinja after this family's strings, as `set` lines, checked
    against families.format_prompt."""
    text, parts = "UNIME-TEXT-7f3a", {}
    for k, image in (("T", False), ("I", True)):
        prompt = families.format_prompt(family, text=text, image=image, processor=processor)
        pieces = prompt.split(f"{text}\n{families.TEXT_INSTRUCTION}")
        if len(pieces) != 2:
            raise ValueError(f"its chat template changes the text it is given: {prompt!r}")
        parts.update({f"{k}_PRE": pieces[0], f"{k}_POST": pieces[1]})
    parts.update(TEXT=families.TEXT_INSTRUCTION, IMAGE=families.IMAGE_INSTRUCTION,
                 RAW=families.FAMILIES[family]["raw"], CHAT_MMEB=family == "llava_onevision")
    template = "".join(f"{{%- set {name} = {json.dumps(value, ensure_ascii=False)} -%}}\n"
                       for name, value in parts.items()) + asset("sentence-transformers.jinja")
    task = "Represent the given image with the following question:"
    for text, image, prompt in [(" a red\ncat ", 0, None), (None, 1, None), ("two dogs", 1, None),
                                ("a cat", 0, "Find it:"), ("what?", 1, f"<|image_12|> {task}"),
                                (None, 1, task)]:
        content = [{"type": "image"}] * image + [{"type": "text", "text": text}] * bool(text)
        chat = [{"role": "system", "content": [{"type": "text", "text": prompt}]}] * bool(prompt)
        tokenizer = getattr(processor, "tokenizer", processor)  # renders alike, loads no video
        got = tokenizer.apply_chat_template(chat + [{"role": "user", "content": content}],
                                            chat_template=template, tokenize=False)
        instruction = prompt and (f"{prompt} {text}" if text is not None else prompt)
        expected = families.format_prompt(family, None if prompt else text, image, instruction,
                                           processor)
        if got != expected:  # a chat template that does not keep the text as it is given
            raise ValueError(f"its prompt template renders {got!r} where UniME has {expected!r}")
    return template


def write_sentence_transformers(out, model, processor, family):
    """The files that make `out` a sentence-transformers model (modules.json and each module's
    config: the model's own forward and processor -> last-token pooling -> L2 normalization,
    the prompt template above, left padding, no truncation), and their section of the model
    card. The merged model files next to them are the module's weights: nothing is copied."""
    try:
        if family == "phi3_v":
            raise ValueError("its remote code registers AutoModelForCausalLM only (sentence-"
                             "transformers loads AutoModel) and its processor takes one prompt "
                             "per call")
        # the class AutoProcessor builds from the files (transformers 4.x may write no
        # processor_config.json); one transformers lacks would give a bare tokenizer
        saved = processors.processor_class_name(out) or None
        if not hasattr(transformers, str(saved)):
            raise ValueError(f"its processor is saved as {saved}, a class transformers does "
                             f"not have, and sentence-transformers would drop every image")
        template = sentence_transformers_template(family, processor)
    except ValueError as e:
        print(f"{out}: no sentence-transformers files for this {family} model: {e}")
        return
    forward = {"method": "forward", "method_output_name": "last_hidden_state"}
    files = {"modules.json": [{"idx": i, "name": str(i), "path": path, "type": kind}
                              for i, (path, kind) in enumerate(ST_MODULES)],
             "sentence_bert_config.json": {
                 "transformer_task": "feature-extraction",
                 "module_output_name": "token_embeddings",
                 "modality_config": {"text": forward, "image": forward, "image+text": forward,
                                     "message": {**forward, "format": "structured"}},
                 "processing_kwargs": {"text": {"padding_side": "left", "truncation": False},
                                       "chat_template": {"chat_template": template}}},
             "1_Pooling/config.json": {"pooling_mode": "lasttoken", "include_prompt": True,
                                       "embedding_dimension": model.config.get_text_config()
                                       .hidden_size}, "2_Normalize/config.json": {},
             "config_sentence_transformers.json": {
                 "__version__": {"sentence_transformers": ST_VERSION}, "default_prompt_name": None,
                 "model_type": "SentenceTransformer", "similarity_fn_name": "cosine", "prompts": {
                     "text": families.TEXT_INSTRUCTION, "image": families.IMAGE_INSTRUCTION}}}
    for name, content in files.items():
        os.makedirs(os.path.dirname(os.path.join(out, name)), exist_ok=True)
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=1)
    with open(os.path.join(out, "README.md"), "a", encoding="utf-8") as f:
        f.write("\n" + asset("model-card-sentence-transformers.md").format(version=ST_VERSION))


def export(run, out, dtype=torch.float32, overwrite=False, trust_remote_code=False):
    """Write the export of stage output `run` into `out` (see the module docstring)."""
    chain, root = stages.stage_chain(run)
    if not chain:
        raise SystemExit(f"{run} is not a finished stage output of train.py (no unime.json)")
    previous = check_out(out, overwrite)
    parent, name = os.path.split(os.path.abspath(out))
    stages.remove_stale_temp(parent)  # what an export killed while writing left
    model, processor, family = stages.load_embedder(run, "cpu", torch.float32, trust_remote_code,
                                                    merge=False)
    require_finite_weights(model, run)
    start, last = stages.stage_init(*chain[0]), chain[0][1]
    adapter_base = bool(last["lora"]) and stages.read_stage_meta(start) is not None

    def write(folder):  # the whole export, in save_atomic's temporary folder
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
            write_adapter(os.path.join(folder, "adapter"),
                          *peft_adapter(loras, "adapter-base" if adapter_base else start))
        if adapter_base:
            stages.write_pretrained(os.path.join(folder, "adapter-base"), model, processor)
        for m in loras.values():
            m.merged()  # folds B A into m.base, the layer now in the model
        stages.write_pretrained(folder, model, processor)
        check_processor(folder, processor, family, trust_remote_code)
        with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(chain, root, family, processor, adapter_base))
        write_sentence_transformers(folder, model, processor, family)
        with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as f:
            json.dump({"run": os.path.abspath(run), "run_id": last["id"],
                       "paths": sorted(files_under(folder) + [MANIFEST])}, f)
    if not previous:
        return stages.save_atomic(out, write)  # an empty or absent `out`: one rename
    # an earlier export: the new one is complete beside it before the two are swapped (both
    # under temporary names a later start removes if this one is killed)
    temp = stages.TEMP.format(os.getpid())
    new = stages.save_atomic(os.path.join(parent, temp + uuid.uuid4().hex[:8]), write)
    old = tempfile.mkdtemp(dir=parent, prefix=temp)
    os.replace(out, os.path.join(old, "export"))
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(os.path.join(old, "export"), out)  # the earlier export back in place
        shutil.rmtree(new)
        raise
    shutil.rmtree(old)  # only files an export wrote (check_out made sure)
    return out


def check_processor(folder, processor, family, trust_remote_code=False):
    """The processor files just written, read back as a user's machine reads them, must turn an
    image into the tensors the run's processor gives: an export never drops images (one that
    named a class transformers lacks gave users a bare tokenizer). They name the real class,
    and hold the video processor's config where the class has one: AutoProcessor builds the
    whole processor wherever torchvision is installed (processors.images_only)."""
    from PIL import Image
    again = processors.load_processor(folder, family, trust_remote_code=trust_remote_code)
    row = dict(texts=["a red square"], images=[Image.new("RGB", (40, 28), (200, 30, 90))])
    ours, theirs = (families.process(p, family, **row) for p in (processor, again))
    if ours.keys() != theirs.keys() or not all(torch.equal(ours[k], theirs[k]) for k in ours):
        raise SystemExit(f"the processor files written for {folder} do not process an image "
                         f"as the run's processor does ({type(again).__name__}): no export")


def check_out(out, overwrite):
    """`out` may be absent or empty; with --overwrite, an earlier export holding only files it
    wrote (at any depth) and no symbolic link. Returns whether an earlier export is replaced."""
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
    if os.path.islink(out):
        raise SystemExit(f"{out} is a symbolic link: name the folder itself, or a new one")
    if not os.path.isfile(manifest) or os.path.islink(manifest):
        raise SystemExit(f"--overwrite replaces only an earlier export, and {out} is not one "
                         f"(no {MANIFEST}); choose a new folder")
    links = [p for p in files_under(out, links=True) if os.path.islink(os.path.join(out, p))]
    foreign = sorted(set(files_under(out)) - exported_paths(manifest) | set(links))
    if foreign:
        raise SystemExit(f"{out} holds files no export wrote ({', '.join(foreign[:5])}); "
                         f"move them or choose a new folder")
    return True


def files_under(folder, links=False):
    """Every file below `folder` as a relative path (and, with links, every symbolic link)."""
    return [os.path.relpath(os.path.join(top, name), folder)
            for top, dirs, names in os.walk(folder)
            for name in names + ([d for d in dirs if os.path.islink(os.path.join(top, d))]
                                 if links else [])]


def exported_paths(manifest):
    """The files an export wrote, as its export.json names them."""
    with open(manifest, encoding="utf-8") as f:
        return set(json.load(f)["paths"])


def require_finite_weights(model, run):
    """Stop before writing anything when a weight holds NaN or inf (an exported model would
    embed everything as NaN, which the official scorer counts as perfect)."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise SystemExit(f"{run}: {len(bad)} weight tensors hold NaN or inf ({bad[0]}, ...); "
                         f"a broken model is not exported")


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
