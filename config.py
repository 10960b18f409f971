"""train.py's command line: the flags, the paper's presets, the defaults, and the data named.

Each value comes from the first of: the command line, `--preset paper` (§4.1, Table 6), the
embedded default (toy.py, when no --model is given), DEFAULTS. Every value is checked before
any model loads, so a bad one fails in a second with the flag's name.
"""
import argparse
import functools

import torch

import data

PRESETS = {"paper": {  # §4.1 and Table 6; stage 1 counts 2 epochs of the NLI pairs, not steps
    1: dict(batch_size=768, chunk_size=64, lr=5e-4, lora_r=32, lora_alpha=64, lora_dropout=0.05,
            epochs=2, warmup=20, teacher="nvidia/NV-Embed-v2", teacher_pooling="nv-embed",
            save_every=100),
    2: dict(batch_size=1024, chunk_size=32, lr=1e-4, lora_r=16, lora_alpha=64, lora_dropout=0.1,
            max_steps=1000, warmup=100, tau=0.02, image_size=336, save_every=100),
}}
DEFAULTS = {  # what neither the command line, a preset nor the toy set
    1: dict(max_steps=1000, batch_size=64, chunk_size=32, lr=5e-4, warmup=20, lora_r=32,
            lora_alpha=64, lora_dropout=0.05, tau=0.05, teacher="nvidia/NV-Embed-v2"),
    2: dict(max_steps=1000, batch_size=256, chunk_size=32, lr=1e-4, warmup=50, lora_r=16,
            lora_alpha=64, lora_dropout=0.1, tau=0.02),
}

def parse_args(argv=None):
    """The command line, then --preset; what neither sets stays None for the toy or DEFAULTS."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    a = p.add_argument
    a("--stage", type=int, choices=[1, 2], required=True)
    a("--preset", choices=sorted(PRESETS), help="the paper's settings for this stage")
    a("--model", help="HF id, model folder or stage output to start from (default: the toy)")
    a("--family", help="prompt family when the model type is not enough (see model.FAMILIES)")
    a("--trust-remote-code", action="store_true", help="run the model's own code (Phi-3.5-V)")
    a("--data", help="stage 1: NLI CSV/JSONL (sent0,sent1[,hard_neg]); stage 2: MMEB-train "
                     "JSONL/parquet files, comma-separated")
    a("--image-root", default="", help="stage 2: folder the image paths are relative to")
    a("--skip-missing-images", action="store_true", help="drop (and count) rows, not fail")
    a("--image-size", type=int, help="resize images to this square (paper stage 2: 336)")
    a("--teacher", help="stage 1 teacher, HF id or folder (paper: nvidia/NV-Embed-v2)")
    a("--teacher-pooling", choices=["mean", "cls", "last", "nv-embed"])
    a("--teacher-cache", help="file of cached teacher embeddings (default under runs/cache)")
    a("--eval-pairs", type=int, default=200, help="stage 1: held-out pairs for agreement")
    a("--hard-negatives", action="store_true", help="stage 1: NLI hard_neg as extra columns")
    a("--kd-direction", default="teacher-student",
      choices=["teacher-student", "student-teacher"], help="stage 1: the KL of Eq. 2")
    a("--k", type=int, default=8, help="stage 2: hard negatives per query (Eq. 3)")
    a("--beta", type=float, default=0.1, help="stage 2: false-negative margin (§3.3.1)")
    a("--negatives", default="hard", choices=["hard", "random", "easy"],
      help="stage 2: which k negatives (the paper's Fig. 5 analysis)")
    a("--init", choices=["stage1", "base"],
      help="the toy's stage 2: start from its stage-1 output (default) or its base (ablation)")
    a("--out", help="output folder (default for the toy: runs/stage1, runs/stage2)")
    a("--overwrite", action="store_true", help="replace an earlier run's output in --out")
    a("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    a("--max-steps", type=int)
    a("--epochs", type=float, help="train this many passes over the data instead of --max-steps")
    a("--batch-size", type=int, help="the global batch: the similarity matrix is this big")
    a("--chunk-size", type=int, help="GradCache chunk: memory follows it, not the batch")
    a("--lr", type=float)
    a("--warmup", type=int)
    a("--weight-decay", type=float, default=0.0)
    a("--grad-clip", type=float, default=1.0)
    a("--lora-r", type=int, help="LoRA rank; 0 fine-tunes every weight")
    a("--lora-alpha", type=float)
    a("--lora-dropout", type=float)
    a("--tau", type=float, help="temperature: stage 1 0.05 (paper: not given), stage 2 0.02")
    a("--save-every", type=int, help="checkpoint every N steps (default: at the end)")
    a("--log-every", type=int, default=25)
    a("--workers", type=int, default=1, help="processes preparing the next batches")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
      help="auto: bf16 frozen weights and bf16 autocast on CUDA, fp32 on the CPU")
    a("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.preset and args.model is None:
        p.error("--preset paper needs --model (e.g. microsoft/Phi-3.5-vision-instruct)")
    if args.init and args.model is not None:
        p.error("--init chooses where the toy's stage 2 starts; with --model, the model is the "
                "start")
    preset = PRESETS[args.preset][args.stage] if args.preset else {}
    for key, value in preset.items():  # a length given on the command line beats the preset's
        given = {"epochs": args.max_steps, "max_steps": args.epochs}.get(key)
        if getattr(args, key) is None and given is None:
            setattr(args, key, value)
    return args


def finish_args(args, source):
    """DEFAULTS for what is still unset, the length in steps, and every value checked."""
    for key, value in DEFAULTS[args.stage].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.stage == 1:
        args.teacher_pooling = args.teacher_pooling or (
            "nv-embed" if "nv-embed" in args.teacher.lower() else "mean")
    if args.epochs is not None:
        args.max_steps = int(args.epochs * (source["n_rows"] // args.batch_size))
    args.save_every = args.save_every or args.max_steps
    if args.eval_pairs < 0:
        raise SystemExit(f"--eval-pairs must be 0 or more, got {args.eval_pairs}")
    for name in ("max_steps", "batch_size", "chunk_size", "save_every", "log_every", "k"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1, got "
                             f"{getattr(args, name)}" + (" (from --epochs)" if name ==
                                                          "max_steps" and args.epochs else ""))
    for name in ("lr", "tau"):
        if not getattr(args, name) > 0:
            raise SystemExit(f"--{name} must be positive, got {getattr(args, name)}")
    if args.batch_size > source["n_rows"]:
        raise SystemExit(f"--batch-size {args.batch_size} is larger than the data "
                         f"({source['n_rows']} rows)")
    if args.batch_size < 2:
        raise SystemExit("--batch-size must be at least 2: a batch of one has no negatives")
    return args


def read_data(args):
    """The paper's training data: SimCSE's NLI pairs (stage 1; the last --eval-pairs rows are
    held out for teacher agreement) or MMEB-train subsets (stage 2)."""
    if not args.data:
        raise SystemExit(f"--model {args.model} needs --data: " + (
            "SimCSE's NLI pairs (nli_for_simcse.csv: sent0,sent1,hard_neg)" if args.stage == 1
            else "MMEB-train subsets (JSONL or parquet, comma-separated) and --image-root"))
    if args.stage == 1:
        rows = data.read_nli(args.data)
        if args.hard_negatives and any("hard_neg" not in r for r in rows):
            raise SystemExit(f"--hard-negatives: {args.data} has rows without hard_neg")
        n_eval = min(args.eval_pairs, len(rows) // 10)
        train_rows, heldout = rows[:len(rows) - n_eval], rows[len(rows) - n_eval:]
        return {"n_rows": len(train_rows), "rows": functools.partial(take, train_rows),
                "heldout": heldout, "report": None}
    table, skipped = [], 0
    for path in args.data.split(","):
        rows, n = data.read_mmeb_train(path, args.image_root, args.skip_missing_images)
        table, skipped = table + rows, skipped + n
    print(f"MMEB-train: {len(table)} pairs, {skipped} rows skipped for missing images")
    return {"n_rows": len(table), "rows": functools.partial(take, table), "heldout": [],
            "report": None}


def take(table, ids):
    return [table[i] for i in ids]
