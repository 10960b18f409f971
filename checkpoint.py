"""A training run's folder: claimed without deleting anything, checkpointed, resumed exactly.

A run writes into --out: `checkpoint.pt` every --save-every steps (the trainable weights, the
optimizer, the step, every RNG state and the run's settings), `log.jsonl`, and at the end the
stage output (model.py: the adapter, then `unime.json`, which marks it complete). `--resume`
continues from the checkpoint bit for bit, and refuses a checkpoint made with other settings.
"""
import contextlib
import json
import os
import random

import torch

import model as M

RUN_FILES = ("checkpoint.pt", "log.jsonl", "adapter.pt", "unime.json")
NOT_COMPARED = ("out", "resume", "overwrite", "log_every", "save_every", "workers", "device",
                "chunk_size", "gradient_checkpointing")  # may change when a run is resumed


def run_config(args):
    """The settings a resumed run must share with its checkpoint, the start model's identity
    included (a retrained base is another run)."""
    config = {k: v for k, v in vars(args).items() if k not in NOT_COMPARED}
    return {**config, "model_identity": M.model_identity(args.model)}


def save(out, model, opt, step, generator, config):
    M.save_atomic(os.path.join(out, "checkpoint.pt"), {
        "trainable": {k: p.detach().cpu() for k, p in model.named_parameters()
                      if p.requires_grad},
        "optimizer": opt.state_dict(), "step": step, "config": config,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                "negatives": generator.get_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}})


def load(out, model, opt, generator, config):
    """Restore a checkpoint of the same run -> the step it reached. Only tensors and plain
    values are unpickled (weights_only), so a crafted file cannot run code."""
    path = os.path.join(out, "checkpoint.pt")
    if not os.path.isfile(path):
        raise SystemExit(f"--resume: {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    differ = [k for k in sorted(set(config) | set(ckpt["config"]))
              if config.get(k) != ckpt["config"].get(k)]
    if differ:
        k = differ[0]
        raise SystemExit(f"--resume: {path} was made with {k}={ckpt['config'].get(k)!r}, this "
                         f"run has {k}={config.get(k)!r} (differing: {', '.join(differ)})")
    model.load_state_dict(ckpt["trainable"], strict=False)
    opt.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    random.setstate(ckpt["rng"]["python"])
    generator.set_state(ckpt["rng"]["negatives"])
    if ckpt["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return ckpt["step"]


def claim(args):
    """Make --out this run's folder, deleting nothing: a new or empty folder, the folder of the
    run being resumed, or with --overwrite an earlier run's folder (only its completion marker
    goes, so it reads unfinished until this run ends). A lock keeps a second run out."""
    out = os.path.realpath(args.out)
    start, chain = args.model, []
    while start and os.path.isdir(start):  # the model and every output it was built on
        chain.append(os.path.realpath(start))
        meta = M.read_stage_meta(start)
        start = os.path.join(start, meta["init"]) if meta and meta["init_is_local"] else None
    if out in chain:
        raise SystemExit(f"--out {args.out} is the model this run starts from (or one it was "
                         f"built on); choose another folder")
    present = os.listdir(out) if os.path.isdir(out) else []
    ours = [f for f in present if f in RUN_FILES]
    if present and not ours:
        raise SystemExit(f"--out {args.out} is not empty and holds no run of train.py; choose "
                         f"a new or empty folder")
    if ours and not (args.resume or args.overwrite):
        state = "finished" if "unime.json" in ours else "unfinished"
        raise SystemExit(f"--out {args.out} holds another run's output ({state}); pass "
                         f"--resume to continue it, --overwrite to replace it, or another --out")
    os.makedirs(out, exist_ok=True)
    lock = os.path.join(out, ".lock")
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        with open(lock) as f:
            pid = f.read().strip()
        raise SystemExit(f"--out {args.out} is locked by another run (pid {pid}); if no such "
                         f"process runs, delete {lock}") from None
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    if args.overwrite and os.path.exists(os.path.join(out, "unime.json")):
        os.remove(os.path.join(out, "unime.json"))
    return lock


@contextlib.contextmanager
def claimed(args):
    """claim() --out for the duration of the run; the lock goes when it ends, however."""
    lock = claim(args)
    try:
        yield
    finally:
        os.remove(lock)  # our own lock file


def open_log(out, start):
    """log.jsonl for appending one JSON record per step; on resume, what was logged after the
    checkpoint's step is dropped (those steps run again)."""
    path = os.path.join(out, "log.jsonl")
    kept = [x for x in open(path, encoding="utf-8").read().splitlines() if x and json.loads(x)["step"] <= start] \
        if start and os.path.exists(path) else []
    log = open(path, "w", encoding="utf-8")
    log.writelines(x + "\n" for x in kept)
    return log
