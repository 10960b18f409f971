"""A training run's folder, from its claim to its finished stage output, and the one atomic writer.

A run writes into --out: `checkpoint.pt` every --save-every steps (trainable weights, optimizer,
step, every RNG state, the run's settings), `log.jsonl`, and at the end the stage output: the
adapter (a full fine-tune: the model), then `unime.json`, which marks it complete and names the
model the stage started from: a chain (stage 2 -> stage 1 -> base) that `stage_chain` walks and
`load_embedder` loads as one model. `--resume` continues from the checkpoint bit for bit.
"""
import contextlib
import fcntl
import hashlib
import json
import os
import random
import shutil
import socket
import tempfile
import uuid

import torch

import model as M

RUN_FILES = ("checkpoint.pt", "log.jsonl", "adapter.pt", "unime.json")
NOT_COMPARED = ("out", "resume", "overwrite", "log_every", "save_every", "workers", "device",
                "chunk_size", "gradient_checkpointing")  # may change when a run is resumed


# ---------------------------------------------------------------- the one atomic writer

def save_atomic(path, obj):
    """Write `obj` (text, bytes, anything torch.save takes, or a function that fills the empty
    folder it is given) under a temporary name with the usual permissions, then rename it onto
    `path`: a crash never leaves a torn file where a good one was expected. A folder replaces an
    absent or empty `path` in one rename; into a folder holding other files (a run's) each entry
    is renamed. A failed write (a full disk) stops naming `path`, which is left as it was."""
    into = callable(obj) and os.path.isdir(path) and os.listdir(path)
    parent = path if into else os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(parent, exist_ok=True)
        if callable(obj):
            tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
            obj(tmp)
        else:
            fd, tmp = tempfile.mkstemp(dir=parent, prefix=".tmp-")
            data = obj.encode() if isinstance(obj, str) else obj
            with os.fdopen(fd, "wb") as f:
                f.write(data) if isinstance(data, bytes) else torch.save(data, f)
                f.flush()
                os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        for folder, _, names in os.walk(tmp):  # a folder: it and all it holds
            os.chmod(folder, 0o777 & ~umask)
            for name in names:
                os.chmod(os.path.join(folder, name), 0o666 & ~umask)
        os.chmod(tmp, (0o777 if callable(obj) else 0o666) & ~umask)
        for name in os.listdir(tmp) if into else []:
            os.replace(os.path.join(tmp, name), os.path.join(path, name))
        os.rmdir(tmp) if into else os.replace(tmp, path)
    except BaseException as e:
        if tmp and os.path.exists(tmp):  # our own temporary file or folder, nothing else
            shutil.rmtree(tmp, ignore_errors=True) if os.path.isdir(tmp) else os.remove(tmp)
        if isinstance(e, (OSError, RuntimeError)):  # torch.save reports a failed write as either
            disk = os.statvfs(parent) if os.path.isdir(parent) else None
            free = disk.f_bavail * disk.f_frsize / 2**20 if disk else 0
            raise SystemExit(f"cannot write {path}: {getattr(e, 'strerror', None) or e} "
                             f"({free:.0f} MiB free there); the file there before (if any) "
                             f"is unchanged") from e
        raise
    return path


def save_pretrained(out, model, processor):
    """model's and processor's save_pretrained through save_atomic; nothing else in `out`."""
    return save_atomic(out, lambda folder: (model.save_pretrained(folder),
                                            processor.save_pretrained(folder)))


# ---------------------------------------------------------------- stage outputs and their chain

def read_stage_meta(path):
    """The `unime.json` of a finished stage output, else None. It is written last, so its
    presence marks the output complete."""
    meta_path = os.path.join(str(path), "unime.json")
    if not os.path.isfile(meta_path):
        return None
    with open(meta_path, encoding="utf-8") as f:
        return json.load(f)


def stage_init(path, meta):
    """The model a stage output started from, as its `unime.json` names it."""
    return os.path.normpath(os.path.join(str(path), meta["init"])) if meta["init_is_local"] \
        else meta["init"]


def stage_chain(path):
    """The one walker of the chain: [(folder, unime.json)] from this stage output back to the
    first one, and the model the first one started from (an HF id or a model folder)."""
    chain, path = [], str(path)
    meta = read_stage_meta(path)
    while meta is not None:
        chain.append((path, meta))
        path = stage_init(path, meta)
        meta = read_stage_meta(path)
    return chain, path


def model_identity(path):
    """What a model is: a stage output's id; a folder's file names, sizes and contents (large
    weight files by size and mtime: hashing GBs is slow); a hub id as given."""
    meta = read_stage_meta(path)
    if meta:
        return meta["id"]
    if not os.path.isdir(path):
        return str(path)
    h = hashlib.sha256()
    for f in sorted(os.scandir(path), key=lambda f: f.name):
        if f.is_file() and not f.name.startswith("."):
            st = f.stat()
            h.update(f"{f.name} {st.st_size}".encode())
            if st.st_size < 64 << 20:
                with open(f.path, "rb") as fh:
                    h.update(fh.read())
            else:
                h.update(str(st.st_mtime_ns).encode())
    return f"{os.path.basename(os.path.normpath(path))}@{h.hexdigest()[:16]}"


def save_stage_output(out, model, processor, init, stage, family, lora):
    """What a later stage or eval.py loads: the adapter (or, with lora=None, the whole model),
    then `unime.json`: what it started from, that model's identity, the LoRA shape and the
    layers it wraps (so loading rebuilds the same adapter whatever families.py says then)."""
    if lora:
        save_atomic(os.path.join(out, "adapter.pt"), M.lora_state_dict(model))
    else:  # full fine-tuning: the folder is the model
        save_pretrained(out, model, processor)
    local = os.path.exists(init)
    meta = {"stage": stage, "family": family, "lora": lora, "id": uuid.uuid4().hex,
            "init": os.path.relpath(init, out) if local else init, "init_is_local": local,
            "init_identity": model_identity(init)}
    save_atomic(os.path.join(out, "unime.json"), json.dumps(meta, indent=1))


def lora_base(path):
    """(the stages whose adapters go on top, newest first; the model they go on: a full
    fine-tune's stage output, or the model the chain starts from)."""
    chain, root = stage_chain(path)
    full = next((i for i, (_, meta) in enumerate(chain) if not meta["lora"]), len(chain))
    return chain[:full], chain[full][0] if full < len(chain) else root


def require_model(path, trust_remote_code=False):
    """Fail in one line, before any long work, when the model at `path` (for a LoRA stage
    output: the model its chain starts from) cannot be found: reads its config only."""
    from transformers import AutoConfig
    path = lora_base(path)[1]
    try:
        AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise SystemExit(M.missing_model(path, e)) from None


def load_embedder(path_or_id, device="cpu", dtype=torch.float32, trust_remote_code=False,
                  family=None, merge=True, load_in_4bit=False):
    """(model, processor, family) for an HF id, a model folder, or a stage output of train.py:
    the model its chain starts from, each stage's start checked to be the model its adapter was
    trained on, the adapters merged in order. Remote code runs only when the caller passes
    trust_remote_code, never because a file says so. merge=False leaves the last adapter as
    LoRALinear layers (export.py); load_in_4bit: a plain model's weights in 4 bits (load_mllm)."""
    top, (adapters, base) = read_stage_meta(path_or_id), lora_base(path_or_id)
    if top and load_in_4bit:
        raise ValueError(f"{path_or_id} is a stage output: only a plain model loads in 4 bits")
    if not top and os.path.isfile(os.path.join(str(base), "checkpoint.pt")):
        raise SystemExit(f"{base} is an unfinished training run (a checkpoint but no "
                         f"unime.json): finish it with train.py --resume --out {base}")
    for folder, meta in adapters:
        init = stage_init(folder, meta)
        if model_identity(init) != meta["init_identity"]:
            raise SystemExit(f"{folder}: its adapter was trained on {init} as it was then "
                             f"({meta['init_identity']}); that model has changed since "
                             f"({model_identity(init)}). Retrain this stage from it.")
    family = family or (top and top["family"])
    model, processor, family = M.load_mllm(base, dtype, device, trust_remote_code, family,
                                           load_in_4bit)
    for i, (folder, meta) in enumerate(reversed(adapters)):  # the oldest adapter first
        M.inject_lora(model, **meta["lora"])
        M.load_lora(model, torch.load(os.path.join(folder, "adapter.pt"), map_location="cpu",
                                      weights_only=True))
        if merge or i < len(adapters) - 1:
            M.merge_lora(model)
        model = model.to(device)
    return model, processor, family


# ---------------------------------------------------------------- checkpoints, resumed exactly

def run_config(args):
    """The settings a resumed run must share with its checkpoint, the start model's identity
    included (a retrained base is another run)."""
    config = {k: v for k, v in vars(args).items() if k not in NOT_COMPARED}
    return {**config, "model_identity": model_identity(args.model)}


def save(out, model, opt, step, generator, config):
    save_atomic(os.path.join(out, "checkpoint.pt"), {
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
    chain, root = stage_chain(args.model) if args.model else ([], None)
    built_on = [folder for folder, _ in chain] + [root]  # the model and every output before it
    if out in [os.path.realpath(f) for f in built_on if f and os.path.isdir(f)]:
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
    for f in present:  # save_atomic's temporary files and folders, left by a killed run
        if f.startswith(".tmp-"):
            path = os.path.join(out, f)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return lock


def take_lock(path, out):
    """-> the open lock file, held until it is closed. An flock, not the file, is the lock: the
    kernel releases it when its process ends (kill -9 too), so a killed run's `.lock` holds
    nothing and the next run takes it, while a running one, on any host sharing it, refuses."""
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
    """A DataLoader worker is forked holding the run's lock file, and a worker outliving its
    killed run (up to its 5 s watchdog) would keep --out locked: each closes its own copy."""
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
    save_atomic(path, "".join(kept))
    return open(path, "a", encoding="utf-8", buffering=1)
