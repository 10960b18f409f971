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
import json
import os
import random
import shlex
import signal
import socket
import sys
import tempfile
import threading
import time

import torch
import torch.distributed as dist

import stages

RUN_FILES = ("checkpoint.pt", "log.jsonl", "adapter.pt", "unime.json")
MANIFEST = "run-files.json"  # the files runs of train.py wrote in --out
NOT_COMPARED = ("out", "resume", "overwrite", "log_every", "save_every", "workers", "device",
                "chunk_size", "gradient_checkpointing",  # may change when a run is resumed
                "save_minutes", "skip_missing_images")  # a resume may skip what broke it


# ---------------------------------------------------------------- checkpoints, resumed exactly

def run_config(args):
    """The settings a resumed run must share with its checkpoint, the start model's identity
    included (a retrained base is another run)."""
    config = {k: v for k, v in vars(args).items() if k not in NOT_COMPARED}
    return {**config, "model_identity": stages.model_identity(args.model)}


def data_content(args):
    """The data a run trains on, by content (train.py keeps it in args.data_content): each --data
    file's sha256 (stages.file_digest), so --resume on edited files is refused; rows skipped for
    a broken image do not count (a resume may add --skip-missing-images). None for the toy,
    whose rows follow from --seed."""
    return {p: stages.file_digest(p) for p in args.data.split(",") if os.path.isfile(p)} \
        if getattr(args, "data", None) else None


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
    differ = [k for k in sorted(set(config) | set(made)) if config.get(k) != made.get(k)]
    if "data_content" in differ and "data" not in differ:  # the same --data, other contents
        then, now = made["data_content"] or {}, config["data_content"] or {}
        raise SystemExit(f"--resume: the data changed since {path} was written: "
                         f"{', '.join(p for p in now if then.get(p) != now[p])}; restore the "
                         f"data it trained on, or start a new run")
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
    """Make --out this run's folder, deleting nothing: new or empty, the run being resumed, or
    with --overwrite an earlier run's (only its completion marker goes: it reads unfinished
    until this run ends). A file no run wrote (own_files) is never replaced; a lock keeps a
    second run out."""
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
    require_writable(out, "--out " + args.out)
    lock = take_lock(os.path.join(out, ".lock"), args.out)
    try:
        if args.resume:  # a missing or different checkpoint is refused now, not after the
            read(out, run_config(args))  # teacher's work and the model's loading
    except BaseException:
        release(lock)
        raise
    if args.overwrite and "unime.json" in ours:
        os.remove(os.path.join(out, "unime.json"))
    stages.remove_stale_temp(out, locked=True)  # what a run killed while writing left
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
    a folder from an older version, without it, holds none. A symbolic link is never a run's:
    nothing is written through one."""
    recorded, ours, foreign = recorded_files(out) or (), [], []
    for f in present:
        mine = not os.path.islink(os.path.join(out, f)) and (f == MANIFEST or f in recorded)
        (ours if mine else foreign).append(f)
    return ours, foreign


def save_output(out, model, processor, init, stage, family, lora):
    """stages.save_stage_output, each of its files recorded before it is in place."""
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


# ---------------------------------------------------------------- nothing lost

def require_writable(folder, name):
    """Make `folder`, and stop in one line unless it can hold a run: writable (not a
    read-only disk, not another user's) and on a filesystem with flock (some network mounts
    have none), which the run's lock needs. `name` says what the folder is (a flag)."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=stages.TEMP.format(os.getpid()))
    except OSError as e:
        raise SystemExit(f"{name}: cannot write there ({e.strerror or e}); choose a folder "
                         f"you can write to") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError as e:
        raise SystemExit(f"{name}: its filesystem has no file locks (flock: {e.strerror or e}),"
                         f" which keep a second run out of a folder; choose a folder on a "
                         f"local disk") from None
    finally:
        os.close(fd)
        os.remove(probe)


def worker_init(lock, worker_id=None):
    """A DataLoader worker, forked holding the run's lock file: it closes its own copy (a worker
    outliving its killed run, up to its 5 s watchdog, would keep --out locked), and leaves
    SIGINT and SIGTERM to the run, which finishes its step and saves (Cadence); a worker killed
    by them would make the loader raise in the middle of that step. Workers end with the run."""
    if lock is not None:
        lock.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def resume_command(argv):
    """The command that continues the run started with `argv` (train.py's arguments)."""
    argv = [a for a in argv if a != "--overwrite"]
    return shlex.join(["python", "train.py", *argv] + ["--resume"] * ("--resume" not in argv))


class Cadence:
    """When the loop writes its checkpoint: every --save-every steps, every --save-minutes of
    wall time, at the last step, and at the first step boundary after SIGTERM (what a cluster
    scheduler sends) or SIGINT (Ctrl-C); after a signal the run then stops with exit code
    128 + its number and prints the command that resumes it. A second signal stops at once
    (the step in progress is lost; the last checkpoint stays good). The signal handlers are
    the run's only while its steps run (`steps`)."""

    def __init__(self, args, argv, world=1, device="cpu"):
        self.args, self.argv, self.world, self.device = args, argv, world, device
        self.signum, self.last, self.previous = None, time.monotonic(), {}

    def steps(self, start):
        """The loop's steps, range(start, --max-steps), with SIGTERM and SIGINT noted while
        it runs (the handlers before it come back when it ends, however it ends)."""
        if threading.current_thread() is threading.main_thread():  # where Python allows it
            for s in (signal.SIGTERM, signal.SIGINT):
                self.previous[s] = signal.signal(s, self.note)
        try:
            yield from range(start, self.args.max_steps)
        finally:
            self.restore()

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def note(self, signum, frame):
        if self.signum is not None:  # asked twice: now
            self.restore()
            raise SystemExit(f"{signal.Signals(signum).name} again: stopped at once; the last "
                             f"checkpoint in {self.args.out} stays good")
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint "
              f"(send it again to stop at once)", file=sys.stderr, flush=True)

    def after_step(self, step, save=None):
        """Call on every process after each step; `save` writes the checkpoint (the main
        process gives it, the others None). Raises SystemExit after a signal."""
        signum = self.signum or 0
        if self.world > 1:  # stop together: a process left alone would wait forever
            flag = torch.tensor([signum], device=self.device)  # NCCL reduces on the GPU
            dist.all_reduce(flag, dist.ReduceOp.MAX)
            signum = int(flag)
        a = self.args
        minutes = a.save_minutes and time.monotonic() - self.last >= a.save_minutes * 60
        if save and (signum or minutes or step % a.save_every == 0 or step == a.max_steps):
            save()
            self.last = time.monotonic()
        if not signum:
            return
        if self.world > 1:
            dist.barrier()  # the checkpoint is written before any process exits
        if save:
            print(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint "
                  f"{os.path.join(a.out, 'checkpoint.pt')}. Continue with:\n  "
                  f"{resume_command(self.argv)}", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)
