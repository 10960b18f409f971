"""What a stage leaves behind, and how it comes back: the one atomic writer every file goes
through; a stage output (its adapter, then `unime.json`, which marks it complete and names the
model the stage started from), the chain of outputs (stage 2 -> stage 1 -> base) that
`stage_chain` walks and `load_embedder` loads as one model; and models known by the content of
their files, so a changed or copied-and-edited model is never taken for another.
"""
import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid

import torch

import model as M
import processors

TEMP = ".tmp-unime_{}_" + os.uname()[1].replace("_", "-") + "_"  # pid, host: remove_stale_temp

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
            tmp = tempfile.mkdtemp(dir=parent, prefix=TEMP.format(os.getpid()))
            obj(tmp)
        else:
            fd, tmp = tempfile.mkstemp(dir=parent, prefix=TEMP.format(os.getpid()))
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


def save_pretrained(out, model, processor, before_rename=None):
    """write_pretrained through save_atomic; nothing else in `out`. before_rename gets the
    names written, before any is in place (a run records them)."""
    def fill(folder):
        write_pretrained(folder, model, processor)
        if before_rename:
            before_rename(os.listdir(folder))
    return save_atomic(out, fill)


def write_pretrained(folder, model, processor):
    """model's and processor's save_pretrained into `folder`, remote code's quirks (savable) too:
    a full fine-tune's stage output and an export of Phi-3.5-V save as any model does."""
    with savable(model, processor):
        model.save_pretrained(folder)
        processor.save_pretrained(folder)


@contextlib.contextmanager
def savable(model, processor):
    """While `model` and `processor` are saved: a module registered under two names is saved
    under its first only (Phi-3.5-V's `vision_embed_tokens.wte` IS `embed_tokens`: safetensors
    refuses a tensor shared by two keys; the hub's checkpoint holds it once and the model's own
    code links the second name again when it loads); a list of `_tied_weights_keys` (remote
    code written for transformers 4) is given as the dict transformers 5 reads; a processor
    whose own `__init__` skips ProcessorMixin's (Phi-3.5-V's) gets the attributes that one sets
    and saving reads (`chat_template`; 4.x: `audio_tokenizer`), as None. Restored after."""
    seen, aliases = set(), []
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in seen and not any(name.startswith(f"{a}.") for a in aliases):
            aliases.append(name)
        seen.add(id(module))
    parents = {}
    for name in aliases:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        parents.setdefault(id(parent), (parent, dict(parent._modules)))
        del parent._modules[child]
    classes = [m for m in model.modules()
               if isinstance(getattr(m, "_tied_weights_keys", None), list)]
    for module in classes:
        module._tied_weights_keys = dict.fromkeys(module._tied_weights_keys)
    unset = [name for name in {"chat_template", *getattr(processor, "optional_attributes", [])}
             if not hasattr(processor, name)]
    for name in unset:
        setattr(processor, name, None)
    try:
        yield model
    finally:
        for parent, modules in parents.values():
            parent._modules.clear()
            parent._modules.update(modules)
        for module in classes:
            del module._tied_weights_keys  # the class's list shows again
        for name in unset:
            delattr(processor, name)


TEMP_NAME = re.compile(r"\.tmp-unime_(\d+)_([^_]+)_[a-z0-9_]{8}$")  # TEMP + mkstemp's
OLD_TEMP_NAME = re.compile(r"\.tmp-[a-z0-9_]{8}$")  # save_atomic's names before it
STALE_AFTER = 24 * 3600  # s: a temporary entry of another host untouched this long is a leftover


def remove_stale_temp(folder, locked=False):
    """Remove from `folder` the temporary files and folders save_atomic left when killed: TEMP
    names whose writer no longer runs on this host, or of another host untouched for a day;
    with locked=True (a run folder whose lock this process holds: no one else writes there)
    every one, older names included. Not another program's file, not a write in progress.
    Called when the owner of a folder starts (a run, the teacher pass, the image checks, an
    export)."""
    here = TEMP.split("_")[2]  # this host
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        path, ours = os.path.join(folder, name), TEMP_NAME.match(name)
        if not (ours or locked and OLD_TEMP_NAME.match(name)):
            continue
        if not locked and not (ours[2] == here and not process_alive(int(ours[1])) or
                               time.time() - last_touched(path) > STALE_AFTER):
            continue
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)  # save_pretrained's or export's folder, and what it holds
            else:
                os.remove(path)  # a file, or a link itself (never what it points to)
        except FileNotFoundError:  # removed meanwhile by another process's start
            pass


def process_alive(pid):
    """Whether process `pid` runs on this host; this one counts as dead (its writers remove their
    own temporary files when they fail: one with its number is an earlier process's leftover)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return pid != os.getpid()


def last_touched(path):
    times = [os.lstat(path).st_mtime]
    for root, _, files in os.walk(path):  # a folder being written: its newest file
        times += [os.lstat(os.path.join(root, f)).st_mtime for f in files]
    return max(times)


# ---------------------------------------------------------------- stage outputs and their chain

def read_stage_meta(path):
    """The `unime.json` of a finished stage output, else None. It is written last, so its
    presence marks the output complete."""
    meta_path = os.path.join(str(path), "unime.json")
    if not os.path.isfile(meta_path):
        return None
    try:
        with open(meta_path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:  # torn, not JSON, not UTF-8
        raise SystemExit(f"{meta_path} is damaged ({e!r:.80}): restore it or train again") from None


def stage_init(path, meta):
    """The model a stage output started from, as its `unime.json` names it."""
    return os.path.normpath(os.path.join(str(path), meta["init"])) if meta["init_is_local"] \
        else meta["init"]


def stage_chain(path):
    """The one walker of the chain: [(folder, unime.json)] from this stage output back to the
    first one, and the model the first one started from (an HF id or a model folder)."""
    chain, path = [], str(path)
    while (meta := read_stage_meta(path)) is not None:
        chain.append((path, meta))
        path = stage_init(path, meta)
    return chain, path


def save_stage_output(out, model, processor, init, stage, family, lora, before_rename=None):
    """What a later stage or eval.py loads: the adapter (or, with lora=None, the whole model),
    then `unime.json`: what it started from, that model's identity, the LoRA shape and the
    layers it wraps (so loading rebuilds the same adapter whatever families.py says then)."""
    if lora:
        save_atomic(os.path.join(out, "adapter.pt"), M.lora_state_dict(model))
    else:  # full fine-tuning: the folder is the model
        save_pretrained(out, model, processor, before_rename)
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


def require_base(path, meta):
    """Stop in one line where a LoRA stage output was moved or copied without the model it
    adapts (recorded by a relative path)."""
    init = stage_init(path, meta)
    if meta["init_is_local"] and not os.path.exists(init):
        raise SystemExit(f"{path}: its adapter applies to {init} ({meta['init']!r} from the "
                         f"run), which is not there: copy that model along to {init}, or use "
                         f"an export of the run (python export.py RUN OUT, where the run was "
                         f"trained: it holds the merged model)")


def require_model(path, trust_remote_code=False, family=None):
    """Fail in one line, before any long work, when the model at `path` (for a LoRA stage
    output: the model its chain starts from) cannot be found, or its processor cannot take
    images: reads its config and processor files, not its weights."""
    from transformers import AutoConfig
    adapters, base = lora_base(path)
    for folder, meta in adapters:
        require_base(folder, meta)
        family = family or meta["family"]
    try:
        config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise SystemExit(M.missing_model(base, e)) from None
    processors.load_processor(base, family or getattr(config, "model_type", None),
                              trust_remote_code=trust_remote_code)


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
        require_base(folder, meta)
        init = stage_init(folder, meta)
        require_same_model(init, meta["init_identity"], f"{folder}: its adapter was trained on "
                           f"{init}")
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


# ---------------------------------------------------------------- models known by content

HASH_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                          "unime", "file-hashes.json")  # {file's stat stamp: sha256}
STATE_FILES = ("checkpoint.pt", "log.jsonl", "run-files.json")  # a run's state, beside its model
_digests = {}


def _stamp(path):
    """What any write to a file changes: a rename (new inode), the size, the mtime, and the
    ctime (which even a write that restores size and mtime, or `touch -r`, moves on)."""
    s = os.stat(path)
    return f"{os.path.realpath(path)} {s.st_ino} {s.st_size} {s.st_mtime_ns} {s.st_ctime_ns}"


def _read_digests():
    try:
        with open(HASH_CACHE, encoding="utf-8") as f:
            return {k: v for k, v in json.load(f).items() if isinstance(v, str)}
    except (OSError, ValueError, AttributeError):  # none yet, or damaged: hashed again
        return {}


def file_digest(path):
    """sha256 of a file's bytes, remembered by its stamp in HASH_CACHE (the user's cache
    folder), so an unchanged 15 GB model is read once, not on every call."""
    key = _stamp(path)
    if key not in _digests:
        _digests.update(_read_digests())
    if key not in _digests:
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if _stamp(path) != key:
            raise SystemExit(f"{path} changed while it was being hashed (is a run writing "
                             f"it?); try again once it is finished")
        _digests[key] = digest
        alive = {}
        for k, v in {**_read_digests(), **_digests}.items():  # other processes' entries too,
            try:  # those of files since changed or removed dropped
                alive.update({k: v} if _stamp(k.rsplit(" ", 4)[0]) == k else {})
            except OSError:
                pass
        try:
            save_atomic(HASH_CACHE, json.dumps(alive))
        except SystemExit:  # a read-only home: the next call hashes again, nothing worse
            pass
    return _digests[key]


def model_identity(path):
    """What a model is, by content: "sha256:" over its files' sha256. A LoRA stage output: its
    adapter.pt and unime.json, and the identity of the model it started from (the whole
    chain); any other folder: its files, hidden ones and a run's state aside; a hub id: its
    downloaded snapshot ("hub:<id>" before the download)."""
    path = str(path)
    if not os.path.isdir(path):  # a hub id: its downloaded snapshot (never a download)
        try:
            from huggingface_hub import snapshot_download
            path = snapshot_download(path, local_files_only=True)
        except Exception:  # not downloaded yet, or not a hub id
            return f"hub:{path}"
    meta, h = read_stage_meta(path), hashlib.sha256()
    if meta and meta["lora"]:
        names = ["adapter.pt", "unime.json"]
        h.update(model_identity(stage_init(path, meta)).encode())
    else:
        names = sorted(f.name for f in os.scandir(path) if f.is_file() and not
                       f.name.startswith(".") and not (meta and f.name in STATE_FILES))
    for name in names:
        h.update(f"{name} {file_digest(os.path.join(path, name))}\n".encode())
    return "sha256:" + h.hexdigest()


def require_same_model(path, recorded, what):
    """Stop unless the model at `path` is still the one recorded; `what` names the user. An
    identity recorded before content hashing cannot be compared: a warning says so."""
    if not str(recorded).startswith(("sha256:", "hub:")):
        print(f"warning: {what}, recorded by an older version ({recorded}): not checked")
    elif model_identity(path) != recorded:
        raise SystemExit(f"{what} as it was then ({recorded}); that model has changed since "
                         f"({model_identity(path)}). Retrain this stage from it.")
