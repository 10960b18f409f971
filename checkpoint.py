"""A training run's folder: claimed without deleting anything, checkpointed, resumed exactly.

A run writes into --out: `checkpoint.pt` every --save-every steps (the trainable weights, the
optimizer, the step, every RNG state and the run's settings), `log.jsonl`, and at the end the
stage output (model.py: the adapter, then `unime.json`, which marks it complete). `--resume`
continues from the checkpoint bit for bit, and refuses a checkpoint made with other settings.
"""
import contextlib
import fcntl
import json
import os
import random
import socket

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


def read(out, config):
    """The checkpoint in `out`, refused unless it was made with the same settings (`config`,
    from run_config): the first differing one is named. Only tensors and plain values are
    unpickled (weights_only), so a crafted file cannot run code."""
    path = os.path.join(out, "checkpoint.pt")
    if not os.path.isfile(path):
        raise SystemExit(f"--resume: {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        made = ckpt["config"]
    except Exception as e:
        raise SystemExit(f"--resume: {path} is not a checkpoint of train.py "
                         f"({type(e).__name__}): damaged, or holding objects other than "
                         f"tensors and plain values (those are never unpickled)") from None
    differ = [k for k in sorted(set(config) | set(made)) if config.get(k) != made.get(k)]
    if differ:
        k = differ[0]
        raise SystemExit(f"--resume: {path} was made with {k}={made.get(k)!r}, this "
                         f"run has {k}={config.get(k)!r} (differing: {', '.join(differ)})")
    return ckpt


def load(out, model, opt, generator, config):
    """Restore a checkpoint of the same run (read) -> the step it reached."""
    read(out, config)  # mapped, not read: the optimizer gets tensors of its own below
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), map_location="cpu", weights_only=True)
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
    ours = [f for f in present if f in RUN_FILES or f.startswith((".lock", ".tmp-"))]
    if present and not ours:
        raise SystemExit(f"--out {args.out} is not empty and holds no run of train.py; choose "
                         f"a new or empty folder")
    if ours and not (args.resume or args.overwrite):
        state = "finished" if "unime.json" in ours else "unfinished"
        raise SystemExit(f"--out {args.out} holds another run's output ({state}); pass "
                         f"--resume to continue it, --overwrite to replace it, or another --out")
    if args.resume and "checkpoint.pt" not in present:
        raise SystemExit(f"--resume: {os.path.join(args.out, 'checkpoint.pt')} does not exist")
    os.makedirs(out, exist_ok=True)
    lock = take_lock(os.path.join(out, ".lock"), args.out)
    try:
        if args.resume:  # a missing or different checkpoint is refused now, not after the
            read(out, run_config(args))  # teacher's work and the model's loading
    except BaseException:
        release(lock)
        raise
    if args.overwrite and os.path.exists(os.path.join(out, "unime.json")):
        os.remove(os.path.join(out, "unime.json"))
    for f in present:  # save_atomic's temporary files, left by a run killed while writing
        if f.startswith(".tmp-") and os.path.isfile(os.path.join(out, f)):
            os.remove(os.path.join(out, f))
    return lock


def take_lock(path, out):
    """-> the open lock file, held until it is closed. An flock, not the file's existence, is
    the lock: the kernel releases it when its process ends in any way (kill -9 included), so a
    killed run's leftover `.lock` holds nothing and the next run takes it, while a running one,
    on this host or another sharing the folder, is refused."""
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            raise SystemExit(f"--out {out} is in use by another run ({holder}); wait for it "
                             f"to end, or choose another --out") from None
        try:  # the file we locked is still the one at `path` (its last holder removes it)
            if os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        f.close()
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


def release(lock):
    os.remove(lock.name)  # our own lock file, removed while we still hold it
    lock.close()


@contextlib.contextmanager
def claimed(args):
    """claim() --out for the duration of the run; the lock goes when it ends, however."""
    lock = claim(args)
    try:
        yield lock
    finally:
        release(lock)


def close_in_worker(lock, worker_id=None):
    """A DataLoader worker is forked holding the run's lock file open, and an flock lasts while
    any process holds it: a worker outliving its killed run (up to its 5 s watchdog) would
    keep --out locked. Each worker closes its own copy (the run keeps its lock)."""
    if lock is not None:
        lock.close()


def open_log(out, start):
    """log.jsonl for appending one JSON record per step, a line at a time (a kill tears at most
    the last line). On resume, what was logged after the checkpoint's step is dropped (those
    steps run again), a torn line with it; the shortened log replaces the old one atomically."""
    path, lines, kept = os.path.join(out, "log.jsonl"), [], []
    if start and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    for line in lines:
        try:
            if json.loads(line)["step"] <= start:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):  # a line torn by a kill: after the checkpoint
            continue
    M.save_atomic(path, "".join(kept))
    return open(path, "a", encoding="utf-8", buffering=1)
