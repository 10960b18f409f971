"""A training run's folder: claimed without deleting anything, locked, checkpointed, resumed exactly.

A run writes into --out: `checkpoint.pt` every --save-every steps (trainable weights, optimizer,
step, every RNG state, the run's settings, the data by content), `log.jsonl`, and at the end its
stage output (stages.py). `--resume` continues from the checkpoint bit for bit, and refuses a
checkpoint made with other settings or other data. `run-files.json` names every file runs wrote
here: `--overwrite` replaces no other.
"""
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import random
import shutil
import socket

import torch

import stages

RUN_FILES = ("checkpoint.pt", "log.jsonl", "adapter.pt", "unime.json")
MANIFEST = "run-files.json"  # the files runs of train.py wrote in --out
NOT_COMPARED = ("out", "resume", "overwrite", "log_every", "save_every", "workers", "device",
                "chunk_size", "gradient_checkpointing")  # may change when a run is resumed


# ---------------------------------------------------------------- checkpoints, resumed exactly

def run_config(args):
    """The settings a resumed run must share with its checkpoint, the start model's identity
    included (a retrained base is another run)."""
    config = {k: v for k, v in vars(args).items() if k not in NOT_COMPARED}
    return {**config, "model_identity": stages.model_identity(args.model)}


def data_content(args, source):
    """The data a run trains on, by content (train.py stores it in args.data_content): the rows
    read (their count and a hash) and each --data file's sha256, which names what changed. None
    for the toy, whose rows follow from --seed. Measured on 2 busy cores: 4-7 us a row, 5.6 s
    for 1.3M MMEB-train-like rows (a file's sha256 is cached as a model file's is)."""
    if not getattr(args, "data", None):
        return None
    rows, h = source["rows"](range(source["n_rows"])) + list(source["heldout"]), hashlib.sha256()
    for s in range(0, len(rows), 10_000):  # the fields in order; repr is 3x faster than JSON
        h.update(repr(rows[s:s + 10_000]).encode())
    return {"rows": len(rows), "rows_sha256": h.hexdigest(),
            "files": {p: stages.file_digest(p) for p in args.data.split(",") if os.path.isfile(p)}}


def save(out, model, opt, step, generator, config):
    record(out, ["checkpoint.pt"])
    stages.save_atomic(os.path.join(out, "checkpoint.pt"), {
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
    if "data_content" not in made:  # an older version's: no content identities to compare
        print(f"warning: {path} is an older version's; its model and data are not checked")
        made = {**made, **{k: config.get(k) for k in ("data_content", "model_identity")}}
    rows = lambda content: content and (content["rows"], content["rows_sha256"])  # noqa: E731
    if rows(made.get("data_content")) == rows(config.get("data_content")):  # files may differ
        made = {**made, "data_content": config.get("data_content")}  # in bytes, not in rows
    differ = [k for k in sorted(set(config) | set(made)) if config.get(k) != made.get(k)]
    if "data_content" in differ and "data" not in differ:  # the same --data, other rows
        then, now = made["data_content"], config["data_content"]
        files = [p for p, digest in now["files"].items() if then["files"].get(p) != digest]
        raise SystemExit(f"--resume: the data changed since {path} was written: "
                         f"{', '.join(files) or 'the same files, other rows read'} ("
                         f"{then['rows']} rows then, {now['rows']} now); restore the data it "
                         f"trained on, or start a new run")
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
    goes, so it reads unfinished until this run ends). A file no run wrote (own_files) is never
    replaced. A lock keeps a second run out."""
    out = os.path.realpath(args.out)
    chain, root = stages.stage_chain(args.model) if args.model else ([], None)
    built_on = [folder for folder, _ in chain] + [root]  # the model and every output before it
    if out in [os.path.realpath(f) for f in built_on if f and os.path.isdir(f)]:
        raise SystemExit(f"--out {args.out} is the model this run starts from (or one it was "
                         f"built on); choose another folder")
    present = sorted(f for f in (os.listdir(out) if os.path.isdir(out) else [])
                     if not f.startswith((".lock", ".tmp-")))
    ours, foreign = own_files(out, present)
    if present and not ours:
        raise SystemExit(f"--out {args.out} is not empty and holds no run of train.py; choose "
                         f"a new or empty folder")
    if ours and not (args.resume or args.overwrite):
        state = "finished" if "unime.json" in ours else "unfinished"
        raise SystemExit(f"--out {args.out} holds another run's output ({state}); pass "
                         f"--resume to continue it, --overwrite to replace it, or another --out")
    # a full fine-tune writes whatever files save_pretrained names: no foreign file may stay
    at_risk = [f for f in foreign if f in RUN_FILES or getattr(args, "lora_r", None) == 0]
    if at_risk:
        raise SystemExit(f"--out {args.out}: {', '.join(at_risk)} not written by a run of "
                         f"train.py (not in its {MANIFEST}, or a symbolic link), and this run "
                         f"would replace them; move them away, or choose another --out")
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
    if ours and recorded_files(out) is None:  # a folder of an older version gets its record
        record(out, ours)
    if args.overwrite and "unime.json" in ours:
        os.remove(os.path.join(out, "unime.json"))
    for f in os.listdir(out):  # save_atomic's temporary files and folders, left by a killed run
        if f.startswith(".tmp-"):
            path = os.path.join(out, f)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return lock


# ---------------------------------------------------------------- the run's own files

def recorded_files(out):
    """The names in out's run-files.json (every file runs of train.py wrote there), or None
    where there is none (a new folder, or one from before the record existed)."""
    path = os.path.join(out, MANIFEST)
    if os.path.islink(path):
        raise SystemExit(f"{path} is a symbolic link, not the record a run writes; remove it")
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return {str(name) for name in json.load(f)["files"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{path} is damaged ({type(e).__name__}); it names the files runs "
                         f"wrote here: restore it, or move the folder's files away") from None


def record(out, names):
    """Add `names` to out's run-files.json before they are written: a kill in between leaves
    a name without its file, never a file of the run unaccounted for."""
    known = recorded_files(out) or set()
    if not set(names) <= known:
        stages.save_atomic(os.path.join(out, MANIFEST),
                      json.dumps({"files": sorted(known | set(names))}, indent=1))


def own_files(out, present):
    """(the runs' files among `present`, the others). The runs' are those run-files.json names;
    in a folder from before it, train.py's own files recognised by content (made_by_train). A
    symbolic link is never a run's: nothing is written through one."""
    recorded, ours, foreign = recorded_files(out), [], []
    for f in present:
        path = os.path.join(out, f)
        mine = not os.path.islink(path) and (
            f == MANIFEST or (f in recorded if recorded is not None else made_by_train(path)))
        (ours if mine else foreign).append(f)
    return ours, foreign


def made_by_train(path):
    """Is `path` a file train.py writes, judged by its content: a checkpoint's keys, an
    adapter's LoRA tensors, unime.json's fields, a log of steps (its last line may be torn)."""
    name = os.path.basename(path)
    try:
        if name in ("checkpoint.pt", "adapter.pt"):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return isinstance(obj, dict) and bool(obj) and (
                {"trainable", "optimizer", "step", "config", "rng"} <= set(obj)
                if name == "checkpoint.pt" else
                all(str(k).endswith(("lora_A", "lora_B")) for k in obj))
        with open(path, encoding="utf-8") as f:
            if name == "unime.json":
                return {"stage", "family", "lora", "id", "init", "init_identity"} <= set(
                    json.load(f))
            lines = f.read().splitlines() if name == "log.jsonl" else None
    except Exception:  # unreadable, not a dict, not tensors only: not train.py's
        return False
    good = [line.startswith('{"step": ') and '"loss": ' in line for line in lines or []]
    return lines is not None and (all(good) or (len(good) > 1 and all(good[:-1])))


def save_output(out, model, processor, init, stage, family, lora):
    """model.save_stage_output, each of its files recorded before it is in place."""
    record(out, ["adapter.pt", "unime.json"] if lora else ["unime.json"])
    stages.save_stage_output(out, model, processor, init, stage, family, lora,
                        before_rename=lambda names: record(out, names))


def take_lock(path, out):
    """-> the open lock file, held until it is closed. An flock, not the file, is the lock: the
    kernel releases it when its process ends (kill -9 too), so a killed run's `.lock` holds
    nothing and the next run takes it, while a running one, on any host sharing it, refuses.
    Opened without following a symbolic link, and refused when hard-linked: truncating it
    never reaches another file."""
    nofollow = lambda p, flags: os.open(p, flags | os.O_NOFOLLOW, 0o666)  # noqa: E731
    while True:
        try:
            f = open(path, "a+", opener=nofollow)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            raise SystemExit(f"--out {out}: .lock is a symbolic link, not a run's lock; "
                             f"remove it") from None
        if os.fstat(f.fileno()).st_nlink > 1:
            f.close()
            raise SystemExit(f"--out {out}: .lock is hard-linked to another file, not a run's "
                             f"lock; remove it")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            raise SystemExit(f"--out {out} is in use by another run ({holder}); wait for it "
                             f"to end, or choose another --out") from None
        try:  # the file we locked is still the one at `path` (its last holder removes it)
            if os.path.samestat(os.fstat(f.fileno()), os.lstat(path)):
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
    record(out, ["log.jsonl"])
    if start and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    for line in lines:
        try:
            if json.loads(line)["step"] <= start:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):  # a line torn by a kill: after the checkpoint
            continue
    stages.save_atomic(path, "".join(kept))
    return open(path, "a", encoding="utf-8", buffering=1)
