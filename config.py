"""train.py's settings: the command line, the paper's presets, the defaults, and one resolver.

Each value comes from the first of: the command line, a preset (§4.1, Table 6: one per paper
backbone; `--preset paper` picks --model's), the embedded default's settings (toy/default.py,
which train.py passes when no --model is given), in stage 2 LOSSES of its loss, then DEFAULTS
of the stage. `resolve` is the one place that applies this order. Every value given on the
command line is checked when it is parsed, before any work, and every resolved one again: a bad
value fails in a second naming the flag and what it allows, and a flag that this run would not
use is refused, never ignored.
"""
import argparse
import functools
import importlib.util
import math

import torch

import data
import families
import model as M
import stages

PAPER = {  # §4.1 and Table 6; stage 1 counts 2 epochs of the NLI pairs, not steps
    1: dict(batch_size=768, chunk_size=64, lr=5e-4, lora_r=32, lora_alpha=64, lora_dropout=0.05,
            epochs=2, warmup=20, teacher="nvidia/NV-Embed-v2", teacher_pooling="nv-embed",
            save_every=100),
    2: dict(batch_size=1024, chunk_size=32, lora_r=16, lora_alpha=64, lora_dropout=0.1,
            max_steps=1000, warmup=100, tau=0.02, image_size=336, save_every=100),
}
PRESETS = {  # per backbone: Table 6's stage-2 lr is what differs
    "paper-phi35v": {1: PAPER[1], 2: {**PAPER[2], "lr": 1e-4}},
    "paper-llava16": {1: PAPER[1], 2: {**PAPER[2], "lr": 2e-5}},
    # the paper reports LLaVA-OneVision (336 px) without its settings; UniME-V2's lr for it
    "paper-llava-ov": {1: PAPER[1], 2: {**PAPER[2], "lr": 1e-4}},
}
PAPER_PRESET = {"phi3_v": "paper-phi35v", "llava_next": "paper-llava16",
                "llava_onevision": "paper-llava-ov"}  # what --preset paper picks per family
DEFAULTS = {  # what neither the command line, a preset nor the toy set
    1: dict(max_steps=1000, batch_size=64, chunk_size=32, lr=5e-4, warmup=20, lora_r=32,
            lora_alpha=64, lora_dropout=0.05, tau=0.05, teacher="nvidia/NV-Embed-v2",
            kd_direction="teacher-student", eval_pairs=200, max_text_tokens=128, save_minutes=30),
    2: dict(max_steps=1000, batch_size=256, chunk_size=32, lr=1e-4, warmup=50, lora_r=16,
            lora_alpha=64, lora_dropout=0.1, tau=0.02, loss="unime", beta=0.1,
            image_size=336, image_root="", save_minutes=30),
}
LOSSES = {  # stage 2's loss -> the flags only it takes, with their defaults
    "unime": dict(k=8, negatives="hard"),  # Eq. 4
    "masked-infonce": {},  # not UniME: the whole batch minus the β mask
    # not UniME: LLaVE, α = 9 as in its training script, both directions, no β mask as LLaVE
    "hardness-weighted": dict(alpha=9.0, beta=float("inf")),
}
STAGE_FLAGS = {  # refused in the other stage
    1: ("kd_direction", "hard_negatives", "teacher", "teacher_pooling", "teacher_cache",
        "eval_pairs", "load_in_4bit", "max_text_tokens"),
    2: ("loss", "k", "beta", "negatives", "alpha", "init", "toy_duplicates", "image_size",
        "image_root", "skip_missing_images")}
REAL_DATA_FLAGS = ("data", "image_root", "skip_missing_images")  # the toy makes its own data
LENGTH = ("max_steps", "epochs")  # one sets the run's length; the first layer to set one wins
RANGES = {  # flag -> (allowed?, in words); NaN fails every comparison, so it is refused
    "max_steps": (lambda v: v >= 1, "at least 1"),
    "epochs": (lambda v: 0 < v < math.inf, "a positive number"),
    "batch_size": (lambda v: v >= 2, "at least 2 (a batch of one has no negatives)"),
    "chunk_size": (lambda v: v >= 1, "at least 1"),
    "save_every": (lambda v: v >= 1, "at least 1"),
    "log_every": (lambda v: v >= 1, "at least 1"),
    "lr": (lambda v: 0 < v < math.inf, "a positive number"),
    "warmup": (lambda v: v >= 0, "0 or more"),
    "weight_decay": (lambda v: 0 <= v < math.inf, "0 or more"),
    "grad_clip": (lambda v: v >= 0, "0 or more (0: no clipping)"),
    "lora_r": (lambda v: v >= 0, "0 or more (0: every weight is trained)"),
    "lora_alpha": (lambda v: 0 < v < math.inf, "a positive number"),
    "lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "tau": (lambda v: 0 < v < math.inf, "a positive number"),
    "k": (lambda v: v >= 1, "at least 1"),
    "beta": (lambda v: v > -math.inf, "a number, inf or none"),
    "alpha": (lambda v: 0 <= v < math.inf, "0 or more (0: plain InfoNCE)"),
    "eval_pairs": (lambda v: v >= 0, "0 or more"),
    "toy_duplicates": (lambda v: 0 <= v < 1, "a share of a batch, in [0, 1)"),
    "workers": (lambda v: v >= 0, "0 or more"),
    "save_minutes": (lambda v: 0 <= v < math.inf, "0 or more (0: by steps only)"),
    "max_text_tokens": (lambda v: v >= 1, "at least 1"),
}


def flag(key):
    return "--" + key.replace("_", "-")


def margin(text):
    """--beta: a number, or inf / none for no false-negative filter (Table 4's ∞ column)."""
    value = float("inf") if text.lower() in ("inf", "none") else float(text)
    if math.isnan(value):
        raise argparse.ArgumentTypeError("β must be a number, inf or none")
    return value


def image_size(value):
    """--image-size: a side in pixels, a name of families.RESOLUTIONS, or "original"."""
    if value in families.RESOLUTIONS or value == "original":
        return value
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise argparse.ArgumentTypeError(f"{value!r}: a positive number of pixels, original, or one "
                                     f"of {sorted(families.RESOLUTIONS)}")


def parse_args(argv=None):
    """The command line alone, every value given checked; what it leaves None, `resolve`
    fills."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    a = p.add_argument
    a("--stage", type=int, choices=[1, 2], required=True)
    a("--preset", choices=["paper", *PRESETS], help="the paper's settings for this stage "
      "(paper: the preset of --model's family)")
    a("--model", help="HF id, model folder or stage output to start from (default: the toy)")
    a("--family", help="backbone family, when the model type is not one (families.py)")
    a("--trust-remote-code", action="store_true", help="run the model's own code (Phi-3.5-V)")
    a("--data", help="stage 1: NLI CSV/JSONL (sent0,sent1[,hard_neg]); stage 2: MMEB-train "
                     "JSONL/parquet files, comma-separated")
    a("--image-root", help="stage 2: folder the image paths are relative to")
    a("--skip-missing-images", action="store_true",
      help="drop (and count) rows whose image is missing or unreadable, not fail")
    a("--image-size", type=image_size, help="stage 2: resize images to this square, in pixels "
      "or VLM2Vec's names (high 1344, mid 672, mid_336, low 128), or keep them: original "
      "(default 336, §4.1; Phi-3.5-V is never resized, its processor crops)")
    a("--teacher", help="stage 1 teacher, HF id or folder (paper: nvidia/NV-Embed-v2)")
    a("--teacher-pooling", choices=["mean", "cls", "last", "nv-embed"])
    a("--teacher-cache", help="folder of the teacher's embeddings, written in shards as they "
      "are computed (default under runs/cache)")
    a("--eval-pairs", type=int, help="stage 1: held-out pairs for agreement")
    a("--hard-negatives", action="store_true", help="stage 1: NLI hard_neg as extra columns")
    a("--max-text-tokens", type=int, help="stage 1: each sentence cut at its end to this many "
      "tokens, for the student and the teacher alike (default 128; the paper gives none)")
    a("--kd-direction", choices=["teacher-student", "student-teacher", "symmetric"],
      help="stage 1: the KL of Eq. 2 (default teacher-student; symmetric = the mean of both, "
           "UniME-V2's)")
    a("--loss", choices=list(LOSSES), help="stage 2: unime = Eq. 4, top-k hard negatives (the "
      "default); NOT UniME, for comparison: masked-infonce = every in-batch negative minus the "
      "β mask (with --beta inf: VLM2Vec's InfoNCE), hardness-weighted = LLaVE's loss, every "
      "negative weighted by e^(α·sim), both directions averaged, no β mask unless --beta is given")
    a("--k", type=int, help="stage 2, unime: hard negatives per query (Eq. 3; default 8)")
    a("--beta", type=margin, help="stage 2: false-negative margin (§3.3.1; default 0.1, and "
                                  "inf for hardness-weighted); inf or none: no filter")
    a("--negatives", choices=["hard", "random", "easy"],
      help="stage 2, unime: which k negatives (default hard; the paper's Fig. 5 analysis)")
    a("--alpha", type=float, help="stage 2, hardness-weighted: the hardness weight α (default 9)")
    a("--init", help="the toy's stage 2: stage1 = start from its stage-1 output (default), "
                     "base = from its base (ablation), or a folder holding a toy stage-1 output")
    a("--toy-duplicates", type=float, help="the toy's stage 2: this share of a batch's rows "
      "repeat the row before with new wording and drawing, i.e. false negatives (default 0)")
    a("--out", help="output folder; required with --model (the toy's: runs/stage1, runs/stage2)")
    a("--overwrite", action="store_true", help="replace an earlier run's output in --out")
    a("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    a("--max-steps", type=int)
    a("--epochs", type=float, help="train this many passes over the data instead of --max-steps")
    a("--batch-size", type=int, help="the global batch: the similarity matrix is this big")
    a("--chunk-size", type=int, help="GradCache chunk: memory follows it, not the batch")
    a("--lr", type=float)
    a("--warmup", type=int)
    a("--weight-decay", type=float, default=0.0)
    a("--grad-clip", type=float, default=1.0,
      help="clip the gradient norm to this (0: no clipping, as HF's max_grad_norm=0)")
    a("--lora-r", type=int, help="LoRA rank; 0 fine-tunes every weight")
    a("--lora-alpha", type=float)
    a("--lora-dropout", type=float)
    a("--tau", type=float, help="temperature: stage 1 0.05 (paper: not given), stage 2 0.02")
    a("--save-every", type=int, help="checkpoint every N steps (default: at the end)")
    a("--save-minutes", type=float, help="checkpoint every N minutes of training too (default "
      "30; 0: off); SIGTERM and Ctrl-C checkpoint at the next step and stop")
    a("--log-every", type=int, default=25)
    a("--workers", type=int, help="processes preparing the next steps' inputs (default: 2 "
                                   "on a GPU; 0 on the CPU, whose cores the model computes on)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
      help="auto: bf16 frozen weights and bf16 autocast on CUDA, fp32 on the CPU")
    a("--seed", type=int, default=0)
    a("--gradient-checkpointing", action="store_true",
      help="keep only each layer's input and recompute the layer in the backward: less memory "
           "for activations, one more forward per chunk")
    a("--load-in-4bit", action="store_true",
      help="stage 1: the base's weights in 4-bit NF4 (QLoRA, §4.1); needs CUDA and bitsandbytes")
    args = p.parse_args(argv)
    check_values(args)
    check_flags(p.error, args)
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch sees no CUDA GPU here; use --device cpu")
    if args.load_in_4bit:
        check_4bit(p.error, args)
    return args


def check_4bit(error, args):
    """QLoRA's 4-bit base (stage 1): bitsandbytes on CUDA, a LoRA to train, a plain model."""
    if importlib.util.find_spec("bitsandbytes") is None or not args.device.startswith("cuda"):
        error("--load-in-4bit needs a CUDA --device and bitsandbytes (pip install bitsandbytes); "
              "without them, leave it out: bf16 weights need about 4x the memory of 4-bit ones")
    if args.lora_r == 0:
        error("--load-in-4bit trains a LoRA over frozen 4-bit weights; --lora-r 0 cannot")
    if stages.read_stage_meta(args.model):
        error(f"--load-in-4bit quantizes a plain model (an HF id or a folder); {args.model} is "
              f"a stage output")


def check_flags(error, args):
    """Refuse what this run would not use: every flag given is honoured, or named here."""
    for name in STAGE_FLAGS[3 - args.stage]:
        if getattr(args, name) not in (None, False):
            error(f"{flag(name)} is a stage-{3 - args.stage} flag, this is stage {args.stage}")
    loss = args.loss or "unime"
    for name in ("k", "negatives", "alpha"):
        if getattr(args, name) is not None and name not in LOSSES[loss]:
            error(f"--{name} does not apply to --loss {loss}; it is for --loss " +
                  " / ".join(n for n, flags in LOSSES.items() if name in flags))
    if args.model is None:
        for name in REAL_DATA_FLAGS:
            if getattr(args, name) not in (None, False):
                error(f"{flag(name)} belongs with --model: the toy makes its own data")
        if args.preset:
            error("--preset needs --model (e.g. microsoft/Phi-3.5-vision-instruct)")
    elif args.init:
        error("--init chooses where the toy's stage 2 starts; with --model, the model is the "
              "start")
    elif args.toy_duplicates is not None:
        error("--toy-duplicates changes the toy's stage-2 batches; with --model the data is "
              "--data")
    elif args.out is None:
        error("--model needs --out: the folder for this run's checkpoints, log and output")
    if args.epochs is not None and args.max_steps is not None:
        error("--epochs and --max-steps both set the run's length: give one")
    if args.resume and args.overwrite:
        error("--resume continues the run in --out, --overwrite replaces it: give one")


def preset_name(args):
    """--preset paper -> the preset of --model's family: --family, a stage output's
    unime.json, or the model_type in its config.json (read without running remote code)."""
    if args.preset != "paper":
        return args.preset
    family = backbone_family(args.model, args.family)
    if family not in PAPER_PRESET:
        raise SystemExit(f"--preset paper: the paper trained Phi-3.5-V, LLaVA-1.6 and "
                         f"LLaVA-OneVision; {args.model} is {family!r}. Name a preset "
                         f"({', '.join(PRESETS)}) or give the settings as flags")
    return PAPER_PRESET[family]


def backbone_family(name, family=None):
    """The family of --model (--family, a stage output's unime.json, or its config.json's
    model_type, read without running remote code), refused unless known and with a vision
    tower: --family cannot make a text-only LLM embed images (they would be dropped)."""
    meta = stages.read_stage_meta(name)
    if meta:
        return family or meta["family"]
    from transformers import PretrainedConfig
    try:
        config = PretrainedConfig.get_config_dict(name)[0]
    except OSError as e:
        raise SystemExit(M.missing_model(name, e))
    if not {"vision_config", "img_processor"} & set(config):  # Phi-3.5-V: img_processor
        raise SystemExit(f"--model {name} is a text-only {config.get('model_type')} model (no "
                         f"vision tower in its config.json): UniME trains an MLLM, which "
                         f"--family cannot make of it")
    try:
        return families.family_of(config.get("model_type"), family)
    except ValueError as e:
        raise SystemExit(f"--model {name}: {e}") from None


def resolve(args, settings=None):
    """Every value from the first layer that sets it (the module docstring's order; LLaVE's loss
    has no β mask unless asked), then the values that follow from them, every one checked. The
    length in steps waits for the data (fit_to_data)."""
    given = {key for key, value in vars(args).items() if value is not None}
    layers = [PRESETS[preset_name(args)][args.stage] if args.preset else {}, settings or {},
              DEFAULTS[args.stage]]
    loss = next((layer["loss"] for layer in [vars(args), *layers] if layer.get("loss")), None)
    for layer in layers[:2] + [LOSSES.get(loss, {}), layers[2]]:
        for key, value in layer.items():
            length_set = any(getattr(args, k) is not None for k in LENGTH)
            if getattr(args, key) is None and not (key in LENGTH and length_set):
                setattr(args, key, value)
    if args.lora_r == 0 and {"lora_alpha", "lora_dropout"} & given:
        raise SystemExit("--lora-alpha and --lora-dropout shape a LoRA, and --lora-r 0 "
                         "(the toy's stage 2 too) fine-tunes every weight instead")
    if args.stage == 1:
        args.teacher_pooling = args.teacher_pooling or (
            "nv-embed" if "nv-embed" in args.teacher.lower() else "mean")
    if args.workers is None:  # tools/bench.py: on the CPU, workers only take the model's cores
        args.workers = 2 if torch.device(args.device).type == "cuda" else 0
    check_values(args)  # the preset's, the toy's and the defaults' values too
    return args


def check_values(args):
    """Every number against RANGES, in one line naming the flag and what it allows."""
    for key, (allowed, words) in RANGES.items():
        if getattr(args, key) is not None and not allowed(getattr(args, key)):
            raise SystemExit(f"{flag(key)} must be {words}, got {getattr(args, key)}")


def fit_to_data(args, n_rows):
    """The run's length in steps (--epochs: passes over the `n_rows` training rows), a
    checkpoint at the end unless --save-every says otherwise, and the batch against the data."""
    if args.epochs is not None:
        args.max_steps = int(args.epochs * (n_rows // args.batch_size))
        if args.max_steps < 1:
            raise SystemExit(f"--max-steps must be at least 1, got {args.max_steps} (from "
                             f"--epochs): {n_rows} rows make {n_rows // args.batch_size} "
                             f"batches of {args.batch_size}")
    args.save_every = args.save_every or args.max_steps
    if args.batch_size > n_rows:
        raise SystemExit(f"--batch-size {args.batch_size} is larger than the data ({n_rows} "
                         f"rows)")
    return args


def read_data(args):
    """The paper's training data: SimCSE's NLI pairs (stage 1; the last --eval-pairs rows are
    held out for teacher agreement) or MMEB-train subsets (stage 2)."""
    if not args.data:
        raise SystemExit(f"--model {args.model} needs --data: " + (
            "SimCSE's NLI pairs (nli_for_simcse.csv: sent0,sent1,hard_neg)" if args.stage == 1
            else "MMEB-train subsets (JSONL or parquet, comma-separated) and --image-root"))
    try:
        return read_rows(args)
    except (OSError, ValueError) as e:  # the message names the file and row
        raise SystemExit(f"error: {e}") from None


def read_rows(args):
    if args.stage == 1:
        rows = data.read_nli(args.data)
        if args.hard_negatives and any("hard_neg" not in r for r in rows):
            raise SystemExit(f"--hard-negatives: {args.data} has rows without hard_neg")
        n_eval = min(args.eval_pairs, len(rows) // 10)
        table, heldout = rows[:len(rows) - n_eval], rows[len(rows) - n_eval:]
    else:
        table, skipped, heldout = [], [], []
        for path in args.data.split(","):
            rows, why = data.read_mmeb_train(path, args.image_root, args.skip_missing_images)
            table, skipped = table + rows, skipped + why
        print(f"MMEB-train: {len(table)} pairs, {len(skipped)} rows skipped for missing or "
              f"unreadable images" + "".join(f"\n  {w}" for w in skipped[:3]) +
              ("\n  ..." if len(skipped) > 3 else ""))
    return {"n_rows": len(table), "rows": functools.partial(take, table), "heldout": heldout,
            "report": None}


def take(table, ids):
    return [table[i] for i in ids]
