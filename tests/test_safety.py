"""What protects a run and its files, as tests: bad data and images refused while reading,
bad arguments refused before any work, the run folder (nothing deleted, a lock, completion,
resume), atomic writes under crashes and a full disk, kill -9 then --resume bit for bit, the
collapse guard, and files that cannot run code. Kill tests are marked slow (the README's test
command runs them too).

    python -m pytest -q tests/test_safety.py
"""
import ast
import errno
import functools
import glob
import io
import json
import math
import os
import re
import signal
import struct
import subprocess
import sys
import time
import stages
import zlib
from argparse import Namespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import distill
import eval as ev
import hardneg
import model as M
import runs
from toy import shapes
import toy.default
import train
from test_pipeline import _toy_mmeb, _umask, nli_file, save_images, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
REAL_SAVE = torch.save


def umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normal_permissions(path):
    return os.stat(path).st_mode & 0o777 == 0o666 & ~umask()  # not mkstemp's 0600


def temp_files(folder):
    return glob.glob(os.path.join(folder, "**", ".tmp-*"), recursive=True)


# ---------------------------------------------------------------- images, checked when read

def truncated_jpeg(path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        path, quality=90)
    whole = open(path, "rb").read()
    open(path, "wb").write(whole[:len(whole) // 2])  # an interrupted download


def png_claiming(path, width, height):
    """A valid 1x1 PNG whose header says width x height (a decompression bomb's header)."""
    Image.new("L", (1, 1)).save(path)
    b = open(path, "rb").read()
    chunk = b"IHDR" + struct.pack(">II", width, height) + b[24:29]
    open(path, "wb").write(b[:12] + chunk + struct.pack(">I", zlib.crc32(chunk)) + b[33:])


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_mmeb_train_images_are_checked_when_read_naming_file_and_row(tmp_path):
    good = {"gray.png": Image.new("L", (8, 8), 7), "palette.png": Image.new("P", (8, 8)),
            "cmyk.jpg": Image.new("CMYK", (8, 8)), "rgba.png": Image.new("RGBA", (8, 8)),
            "one.png": Image.new("RGB", (1, 1)),
            "deep.png": Image.fromarray(np.full((8, 8), 40000, np.uint16))}
    for name, image in good.items():
        image.save(tmp_path / name)
    truncated_jpeg(tmp_path / "cut.jpg")
    (tmp_path / "text.png").write_text("not an image")
    png_claiming(tmp_path / "huge.png", 9500, 9500)  # 90.3 MP: over Pillow's 89.5 MP limit
    bad = {"cut.jpg": "cannot be decoded .*truncated", "text.png": "cannot be decoded",
           "huge.png": "is 9500x9500, over the 89.5 MP limit", "gone.jpg": "not found"}
    row = lambda name: {"qry": "<|image_1|> Represent the image.",  # noqa: E731
                        "qry_image_path": name, "pos_text": "x", "pos_image_path": ""}
    path = tmp_path / "train.jsonl"
    for name, words in bad.items():
        write_jsonl(path, [row(g) for g in good] + [row(name)])
        with pytest.raises((ValueError, FileNotFoundError),
                           match=rf"train.jsonl, row 7: image .*{name} {words}.*; or pass "
                                 rf"--skip-missing-images"):
            data.read_mmeb_train(str(path), str(tmp_path))
    write_jsonl(path, [row(name) for name in list(good) + list(bad)])
    kept, skipped = data.read_mmeb_train(str(path), str(tmp_path), skip_bad=True)
    assert [os.path.basename(r["qry_image"]) for r in kept] == list(good)
    assert [w.split(":")[0].split(", ")[-1] for w in skipped] == \
        ["row 10", "row 7", "row 8", "row 9"]  # missing ones are found first
    for r in kept:  # and each of them loads as RGB
        assert data.load_image(r["qry_image"]).mode == "RGB"


def test_image_paths_outside_the_root_are_an_error_even_when_skipping(tmp_path):
    save_images(tmp_path, ["root/a.png", "b.png"])
    for rel in ("../b.png", str(tmp_path / "b.png")):
        write_jsonl(tmp_path / "t.jsonl", [{"qry": "q", "qry_image_path": rel, "pos_text": "x",
                                            "pos_image_path": ""}])
        with pytest.raises(ValueError, match=r"t.jsonl, row 1: image path .*(leaves|absolute)"):
            data.read_mmeb_train(str(tmp_path / "t.jsonl"), str(tmp_path / "root"), True)


def test_mmeb_train_row_without_an_image_key_is_an_error_naming_it(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", [{"qry": "q", "qry_image_path": "", "pos_text": "x",
                                        "pos_image_path": ""}, {"qry": "q", "pos_text": "x"}])
    with pytest.raises(ValueError, match=r"t.jsonl, row 2: no qry_image_path, pos_image_path"):
        data.read_mmeb_train(str(tmp_path / "t.jsonl"))


@pytest.mark.parametrize("reader", ["mmeb", "captions", "sugarcrepe"])
def test_eval_readers_refuse_an_unreadable_image_naming_file_and_row(tmp_path, reader):
    save_images(tmp_path, ["a.png"])
    truncated_jpeg(tmp_path / "b.jpg")
    if reader == "mmeb":
        path = tmp_path / "CIRR.jsonl"
        write_jsonl(path, [{"qry_text": "q", "qry_img_path": "a.png", "tgt_text": ["x", ""],
                            "tgt_img_path": ["", "b.jpg"]}] * 2)
        read = lambda: data.read_mmeb_eval(str(path), str(tmp_path))  # noqa: E731
    elif reader == "captions":
        path = tmp_path / "coco.jsonl"
        write_jsonl(path, [{"image": "a.png", "caption": "x"}, {"image": "b.jpg", "caption": "y"}])
        read = lambda: data.read_caption_set(str(path), str(tmp_path))  # noqa: E731
    else:
        path = tmp_path / "swap_att.json"
        path.write_text(json.dumps({str(i): {"filename": f, "caption": "x",
                                             "negative_caption": "y"}
                                    for i, f in enumerate(["a.png", "b.jpg"])}))
        read = lambda: data.read_sugarcrepe(str(path), str(tmp_path))  # noqa: E731
    row = 1 if reader == "mmeb" else 2
    with pytest.raises(ValueError, match=rf"{path.name}, row {row}: image .*b.jpg cannot be "
                                         rf"decoded"):
        read()


def test_load_image_gives_rgb_for_every_mode_and_scales_16_bit():
    ramp = np.arange(0, 65536, 256, dtype=np.uint16).reshape(16, 16)  # 0 ... 65280
    deep = data.load_image(Image.fromarray(ramp))
    assert deep.mode == "RGB"
    assert np.array_equal(np.asarray(deep)[..., 0], (ramp // 256).astype(np.uint8))  # not 255
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent black
    assert np.asarray(data.load_image(clear)).min() == 255  # white, as transformers composites
    half = data.load_image(Image.new("RGBA", (1, 1), (0, 0, 255, 128))).getpixel((0, 0))
    assert half == (127, 127, 255)  # 128/255 blue over white
    palette = Image.new("P", (2, 2))
    palette.putpalette([10, 20, 30])
    assert data.load_image(palette).getpixel((0, 0)) == (10, 20, 30)
    assert data.load_image(Image.new("L", (2, 2), 9)).getpixel((0, 0)) == (9, 9, 9)
    assert data.load_image(Image.new("CMYK", (2, 2), (0, 0, 0, 0))).getpixel((0, 0)) == \
        (255, 255, 255)


def test_bad_data_stops_train_and_eval_in_one_line_before_any_model_loads(tmp_path,
                                                                          monkeypatch):
    save_images(tmp_path, ["a.png"])
    truncated_jpeg(tmp_path / "cut.jpg")
    write_jsonl(tmp_path / "t.jsonl", [{"qry": "q", "qry_image_path": "cut.jpg",
                                        "pos_text": "x", "pos_image_path": ""}])
    monkeypatch.setattr(stages, "load_embedder", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(SystemExit, match=r"^error: .*t.jsonl, row 1: image .*cut.jpg cannot "
                                         r"be decoded"):
        train.main(["--stage", "2", "--model", "m", "--data", str(tmp_path / "t.jsonl"),
                    "--image-root", str(tmp_path), "--out", str(tmp_path / "run")])
    write_jsonl(tmp_path / "VOC2007.jsonl", [{"qry_text": "q", "qry_img_path": "a.png",
                                              "tgt_text": ["x"], "tgt_img_path": [""]}])
    write_jsonl(tmp_path / "CIRR.jsonl", [{"qry_text": "q", "qry_img_path": "cut.jpg",
                                           "tgt_text": ["x"], "tgt_img_path": [""]}])
    monkeypatch.setattr(ev, "load_for_eval", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(SystemExit, match=r"^error: .*CIRR.jsonl, row 1: image .*cut.jpg"):
        ev.main(["--task", "mmeb", "--data", str(tmp_path / "VOC2007.jsonl"),
                 str(tmp_path / "CIRR.jsonl"), "--image-root", str(tmp_path), "--model", "m",
                 "--out", str(tmp_path / "r.json")])
    assert not os.path.exists(tmp_path / "run") and not os.path.exists(tmp_path / "r.json")


def test_text_files_with_a_bom_are_read_and_other_encodings_named(tmp_path):
    (tmp_path / "bom.csv").write_bytes("sent0,sent1\ncafé,a café\n".encode("utf-8-sig"))
    assert data.read_nli(str(tmp_path / "bom.csv")) == [{"sent0": "café", "sent1": "a café"}]
    (tmp_path / "latin.csv").write_bytes("sent0,sent1\ncafé,a café\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.csv: not UTF-8 text"):
        data.read_nli(str(tmp_path / "latin.csv"))


# ---------------------------------------------------------------- arguments, before any work

@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One NLI file and one teacher cache for every short run of this module."""
    folder = tmp_path_factory.mktemp("shared")
    return {"nli": nli_file(folder / "nli.csv", 120), "cache": str(folder / "teacher.pt")}


def stage1(shared, model, out, *extra):
    """A two-step stage-1 run on the tiny model (seconds); --epochs replaces --max-steps."""
    length = [] if "--epochs" in extra else ["--max-steps", "2"]
    return train.main(["--stage", "1", "--model", str(model), "--data", shared["nli"], "--out",
                       str(out), *length, "--batch-size", "16", "--chunk-size", "8",
                       "--teacher", "all-MiniLM-L6-v2", "--teacher-cache", shared["cache"],
                       "--workers", "0", *extra])


def test_bad_arguments_fail_fast_naming_the_flag(shared, tiny_path, tmp_path, monkeypatch):
    monkeypatch.setattr(stages, "load_embedder", lambda *a, **k: pytest.fail("model loaded"))
    for extra, words in ((["--chunk-size", "0"], "--chunk-size must be at least 1, got 0"),
                         (["--chunk-size", "-3"], "--chunk-size must be at least 1, got -3"),
                         (["--batch-size", "0"], r"--batch-size must be at least 2 .*, got 0"),
                         (["--batch-size", "-8"], r"--batch-size must be at least 2 .*, got -8"),
                         (["--max-steps", "0"], "--max-steps must be at least 1"),
                         (["--save-every", "-1"], "--save-every must be at least 1"),
                         (["--lr", "-1"], "--lr must be a positive number, got -1.0"),
                         (["--lr", "0"], "--lr must be a positive number, got 0.0"),
                         (["--tau", "0"], "--tau must be a positive number, got 0.0"),
                         (["--eval-pairs", "-1"], "--eval-pairs must be 0 or more"),
                         (["--batch-size", "1"], "--batch-size must be at least 2"),
                         (["--batch-size", "5000"], "larger than the data"),
                         (["--epochs", "0.001"], r"--max-steps must be at least 1, got 0 "
                                                 r"\(from --epochs\)"),
                         (["--hard-negatives"], "--hard-negatives: .* has rows without "
                                                "hard_neg")):
        if extra == ["--hard-negatives"]:  # an NLI file without the hard_neg column
            (tmp_path / "pairs.csv").write_text("sent0,sent1\n" + "a,b\n" * 40)
            extra = extra + ["--data", str(tmp_path / "pairs.csv")]
        with pytest.raises(SystemExit, match=words):
            stage1(shared, tiny_path, tmp_path / "x", *extra)
    with pytest.raises(SystemExit, match="needs --data"):
        train.main(["--stage", "1", "--model", tiny_path, "--out", str(tmp_path / "y")])
    with pytest.raises(SystemExit):  # argparse's error: --init is the toy's
        train.main(["--stage", "2", "--model", tiny_path, "--init", "base"])
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")


# ---------------------------------------------------------------- the run folder

def test_out_is_never_deleted_and_another_runs_output_is_refused(shared, tiny_path, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="not empty and holds no run"):
        stage1(shared, tiny_path, mine)
    assert (mine / "notes.txt").read_text() == "keep me"
    with pytest.raises(SystemExit, match="is the model this run starts from"):
        stage1(shared, tiny_path, tiny_path)
    run = tmp_path / "run"
    stage1(shared, tiny_path, run)
    with pytest.raises(SystemExit, match=r"holds another run's output \(finished\)"):
        stage1(shared, tiny_path, run)
    with pytest.raises(SystemExit, match="is the model this run starts from"):
        stage1(shared, run, run, "--overwrite")
    first = stages.read_stage_meta(run)["id"]
    stage1(shared, tiny_path, run, "--overwrite")
    assert stages.read_stage_meta(run)["id"] != first
    assert sorted(os.listdir(run)) == ["adapter.pt", "checkpoint.pt", "log.jsonl",
                                       "run-files.json", "unime.json"]
    for name in os.listdir(run):  # readable by others, as files normally are
        assert normal_permissions(run / name), name


def claim_args(out, **kw):
    return Namespace(out=str(out), model=None, resume=False, overwrite=True, **kw)


def test_a_running_runs_lock_is_respected_and_a_killed_ones_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, argparse, runs; lock = runs.claim("
         "argparse.Namespace(out=sys.argv[1], model=None, resume=False, overwrite=False)); "
         "print('locked', flush=True); time.sleep(120)", str(tmp_path / "run")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match=rf"in use by another run \(pid {holder.pid} on "):
            runs.claim(claim_args(tmp_path / "run"))
    finally:
        holder.send_signal(signal.SIGKILL)  # its .lock stays behind, held by nobody
        holder.wait()
    assert f"pid {holder.pid}" in (tmp_path / "run" / ".lock").read_text()
    with runs.claimed(claim_args(tmp_path / "run")):
        assert f"pid {os.getpid()}" in (tmp_path / "run" / ".lock").read_text()
        with pytest.raises(SystemExit, match=rf"in use by another run \(pid {os.getpid()}"):
            runs.claim(claim_args(tmp_path / "run"))  # a second claim, even from here
    assert os.listdir(tmp_path / "run") == []  # our own lock file went


def test_nonfinite_loss_stops_and_the_last_checkpoint_stays_good(shared, tiny_path, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="not finite; this step was not applied") as e:
        stage1(shared, tiny_path, out, "--lr", "1e6", "--max-steps", "4", "--save-every",
               "1", "--warmup", "1")
    assert stages.read_stage_meta(out) is None  # not marked finished
    failed = int(re.match(r"step (\d+): ", str(e.value)).group(1))
    logged = [json.loads(line)["step"] for line in open(out / "log.jsonl")]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    # checkpointed every step: the checkpoint is the state after the last step applied, the
    # one before the failing step, and the log ends there too
    assert ckpt["step"] == failed - 1 == logged[-1] and logged == list(range(1, failed))
    assert all(torch.isfinite(v).all() for v in ckpt["trainable"].values())


def test_resume_refuses_other_settings_or_a_crafted_file_before_any_work(shared, tiny_path,
                                                                         pretrained_path,
                                                                         tmp_path, monkeypatch):
    run = tmp_path / "run"
    stage1(shared, tiny_path, run, "--max-steps", "1")
    monkeypatch.setattr(distill, "teacher_embeddings", lambda *a, **k: pytest.fail("teacher"))
    for extra, words in ((["--lr", "1e-3"], r"lr=0\.0005, this run has lr=0\.001"),
                         (["--batch-size", "8"], "batch_size=16, this run has batch_size=8"),
                         (["--model", pretrained_path], re.escape(
                             f"model='{tiny_path}', this run has model='{pretrained_path}'"))):
        with pytest.raises(SystemExit, match=rf"--resume: .*checkpoint.pt was made with {words}"):
            stage1(shared, tiny_path, run, "--resume", "--max-steps", "1", *extra)
    with pytest.raises(SystemExit, match=r"--resume: .*other.checkpoint.pt does not exist"):
        stage1(shared, tiny_path, tmp_path / "other", "--resume")

    class Payload:  # unpickling this without weights_only would create a file
        def __reduce__(self):
            return open, (str(tmp_path / "code-ran"), "w")
    torch.save({"config": {}, "payload": Payload()}, run / "checkpoint.pt")
    with pytest.raises(SystemExit, match=r"checkpoint.pt is not a checkpoint of train.py "
                                         r"\(UnpicklingError"):
        stage1(shared, tiny_path, run, "--resume", "--max-steps", "1")
    assert not (tmp_path / "code-ran").exists()
    assert ".lock" not in os.listdir(run)  # a refused run leaves no lock behind


def test_a_stage_output_refuses_a_base_that_changed_and_an_unfinished_run(shared, tiny_path,
                                                                          tmp_path):
    import shutil
    base = tmp_path / "base"
    shutil.copytree(tiny_path, base)
    stage1(shared, base, tmp_path / "s1")
    stages.load_embedder(str(tmp_path / "s1"))  # fine while the base is what it trained on
    config = json.loads((base / "config.json").read_text())
    config["text_config"]["rms_norm_eps"] = 1e-5  # "retrained": another model now
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match="has changed since"):
        stages.load_embedder(str(tmp_path / "s1"))
    os.remove(tmp_path / "s1" / "unime.json")  # as if killed before the end
    with pytest.raises(SystemExit, match="unfinished training run"):
        stages.load_embedder(str(tmp_path / "s1"))


def test_a_full_fine_tune_over_a_lora_output_loads_as_itself(shared, tiny_path, tmp_path):
    run = tmp_path / "run"
    stage1(shared, tiny_path, run)  # a LoRA output: adapter.pt
    stage1(shared, tiny_path, run, "--overwrite", "--lora-r", "0")  # the whole model
    assert "adapter.pt" in os.listdir(run)  # the older run's file stays (nothing is deleted)
    loaded = dict(stages.load_embedder(str(run))[0].named_parameters())  # but unime.json decides
    final = torch.load(run / "checkpoint.pt", weights_only=True)["trainable"]  # every weight
    assert final and all(torch.equal(loaded[k], v) for k, v in final.items())
    for name in os.listdir(run):  # the exported model files too
        assert normal_permissions(run / name), name


def test_remote_code_only_from_the_command_line(shared, tiny_path, tmp_path, monkeypatch):
    stage1(shared, tiny_path, tmp_path / "s1")
    meta = json.loads((tmp_path / "s1" / "unime.json").read_text())
    (tmp_path / "s1" / "unime.json").write_text(json.dumps({**meta, "trust_remote_code": True}))
    asked = []
    real = M.load_mllm
    monkeypatch.setattr(M, "load_mllm", lambda path, dtype, device, trust, *rest:
                        asked.append(trust) or real(path, dtype, device, trust, *rest))
    stages.load_embedder(str(tmp_path / "s1"))
    stages.load_embedder(str(tmp_path / "s1"), trust_remote_code=True)
    assert asked == [False, True]


def test_every_torch_load_unpickles_only_weights():
    """Every torch.load in the project passes weights_only=True (a checkpoint, adapter or
    cache may come from anywhere)."""
    calls = written = 0
    for path in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True):
        if os.path.basename(path).startswith("test_") or os.sep + "tests" + os.sep in path:
            continue
        source = open(path).read()
        written += len(re.findall(r"\btorch\.load\(", source))  # counted apart, as text
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                calls += 1
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                assert kw.get("weights_only") == "True", f"{path}:{node.lineno}"
    assert calls == written > 0  # the walk checked every call the files hold


# ---------------------------------------------------------------- crashes and a full disk

class Killed(BaseException):
    """Stands for the process dying mid-write: no `except Exception` stops it on the way."""


def failing_save(after_bytes, error):
    """torch.save that writes `after_bytes` of the real output, then fails like a crash or a
    full disk would."""
    def save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        REAL_SAVE(obj, buffer)
        f.write(buffer.getvalue()[:after_bytes])
        f.flush()
        raise error
    return save


def test_a_crash_inside_save_atomic_keeps_the_old_file_and_leaves_no_temp(tmp_path,
                                                                        monkeypatch):
    path = tmp_path / "checkpoint.pt"
    stages.save_atomic(str(path), {"step": 1})
    monkeypatch.setattr(torch, "save", failing_save(100, Killed()))
    with pytest.raises(Killed):
        stages.save_atomic(str(path), {"step": 2, "big": torch.zeros(1000)})
    monkeypatch.setattr(torch, "save", failing_save(100, OSError(errno.ENOSPC,
                                                                 "No space left on device")))
    with pytest.raises(SystemExit, match=r"cannot write .*checkpoint.pt: No space left on "
                                         r"device \(\d+ MiB free there\); the file there "
                                         r"before \(if any\) is unchanged"):
        stages.save_atomic(str(path), {"step": 2, "big": torch.zeros(1000)})
    assert torch.load(path, weights_only=True) == {"step": 1}
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O")))
    with pytest.raises(SystemExit, match=r"cannot write .*unime.json: I/O"):
        stages.save_atomic(str(tmp_path / "unime.json"), "{}")
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temporary file, no torn file


def test_a_folder_through_save_atomic_appears_whole_or_not_at_all(tmp_path):
    """A folder (a model, an export) is built in a temporary folder: a writer that dies midway
    leaves neither it nor a partial folder; a new folder appears in one rename; into a run's
    folder only the entries written are replaced; claim removes a killed writer's leftovers."""
    def writer(files, die=False):
        def write(folder):
            for name, text in files.items():
                with open(os.path.join(folder, name), "w") as f:
                    f.write(text)
                if die:
                    raise Killed()
        return write
    with pytest.raises(Killed):
        stages.save_atomic(str(tmp_path / "model"), writer({"a.json": "1", "b.json": "2"}, True))
    assert os.listdir(tmp_path) == []
    stages.save_atomic(str(tmp_path / "model"), writer({"a.json": "1", "b.json": "2"}))
    assert sorted(os.listdir(tmp_path)) == ["model"]
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    (run / "run-files.json").write_text('{"files": ["log.jsonl"]}')  # a run's, by its record
    (run / "a.json").write_text("old")
    stages.save_atomic(str(run), writer({"a.json": "new", "c.json": "3"}))
    assert {f: (run / f).read_text() for f in os.listdir(run) if f != "run-files.json"} == {
        "log.jsonl": '{"step": 1, "loss": 0.5}\n', "a.json": "new", "c.json": "3"}
    assert oct((run / "c.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    killed = run / (stages.TEMP.format(4194304) + "k1ll3d_x")  # a writer killed in the folder
    killed.mkdir()
    (killed / "model.safetensors").write_text("torn")
    runs.release(runs.claim(Namespace(out=str(run), model=None, resume=False, overwrite=True)))
    assert sorted(os.listdir(run)) == ["a.json", "c.json", "log.jsonl", "run-files.json"]


def test_a_full_disk_mid_run_names_the_file_and_the_run_resumes_exactly(shared, tiny_path,
                                                                        tmp_path, monkeypatch):
    stage1(shared, tiny_path, tmp_path / "straight", "--max-steps", "3")
    saves = []

    def full_on_second_checkpoint(obj, f, *args, **kwargs):
        saves.append(1) if "optimizer" in obj else None
        if len(saves) == 2:
            return failing_save(500, OSError(errno.ENOSPC, "No space left on device"))(obj, f)
        return REAL_SAVE(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", full_on_second_checkpoint)
    run = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"cannot write .*run/checkpoint.pt: No space left"):
        stage1(shared, tiny_path, run, "--max-steps", "3", "--save-every", "1")
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 1
    assert sorted(os.listdir(run)) == ["checkpoint.pt", "log.jsonl", "run-files.json"]  # no lock
    monkeypatch.setattr(torch, "save", REAL_SAVE)  # space again
    stage1(shared, tiny_path, run, "--max-steps", "3", "--save-every", "1", "--resume")
    a, b = (torch.load(d / "adapter.pt", weights_only=True) for d in (run, tmp_path / "straight"))
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert [json.loads(x)["loss"] for x in open(run / "log.jsonl")] == \
        [json.loads(x)["loss"] for x in open(tmp_path / "straight" / "log.jsonl")]


def test_a_run_killed_after_its_last_checkpoint_resumes_to_write_its_output(shared,
                                                                            tiny_path,
                                                                            tmp_path):
    run = tmp_path / "run"
    stage1(shared, tiny_path, run)
    final = torch.load(run / "adapter.pt", weights_only=True)
    for name in ("unime.json", "adapter.pt"):  # as if killed right after the checkpoint
        os.remove(run / name)
    with pytest.raises(SystemExit, match="unfinished training run"):
        stages.load_embedder(str(run))
    stage1(shared, tiny_path, run, "--resume")
    again = torch.load(run / "adapter.pt", weights_only=True)
    assert stages.read_stage_meta(run) and all(torch.equal(final[k], again[k]) for k in final)


def test_teacher_cache_survives_a_crash_and_a_full_disk_and_a_bad_one_is_refused_early(
        shared, tiny_path, tmp_path, monkeypatch, capsys):
    texts, cache = ["a red circle", "a blue square"], tmp_path / "t.pt"
    monkeypatch.setattr(torch, "save", failing_save(200, Killed()))
    with pytest.raises(Killed):  # killed while writing: no cache, no torn file
        distill.teacher_embeddings(texts, distill.MINILM, str(cache))
    monkeypatch.setattr(torch, "save", failing_save(200, OSError(errno.ENOSPC, "No space")))
    emb = distill.teacher_embeddings(texts, distill.MINILM, str(cache))  # the work is kept
    assert emb.shape == (2, 384) and "continuing without a cache" in capsys.readouterr().out
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    cache.write_bytes(b"not a cache")
    monkeypatch.setattr(stages, "load_embedder", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(SystemExit, match=r"teacher all-MiniLM-L6-v2: .*t\.pt: not a teacher "
                                         r"cache of this code .*delete it to recompute"):
        train.main(["--stage", "1", "--model", tiny_path, "--data", shared["nli"], "--out",
                    str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "16",
                    "--teacher", "all-MiniLM-L6-v2", "--teacher-cache", str(cache)])
    assert cache.read_bytes() == b"not a cache"  # refused, not overwritten: maybe not ours


class Encoder:
    def __init__(self):
        self.calls = 0

    def __call__(self, inputs):
        self.calls += 1
        return F.normalize(torch.tensor([[len(x[0]), 1.0] for x in inputs]), dim=-1)


def test_eval_cache_keeps_its_shards_through_a_crash_and_refuses_a_bad_one(tmp_path,
                                                                           monkeypatch):
    inputs = [(f"text {i}" + "!" * i, None, None) for i in range(4)]
    shards = []

    def crash_on_second_shard(obj, f, *args, **kwargs):
        shards.append(1)
        if len(shards) == 2:
            return failing_save(100, Killed())(obj, f)
        return REAL_SAVE(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", crash_on_second_shard)
    with pytest.raises(Killed):
        ev.EmbeddingCache("m", str(tmp_path), block=2).embed(inputs, Encoder())
    monkeypatch.undo()
    assert temp_files(tmp_path) == []
    warm = Encoder()
    ev.EmbeddingCache("m", str(tmp_path), block=2).embed(inputs[:2], warm)
    assert warm.calls == 0  # the first shard was kept
    shard = glob.glob(os.path.join(tmp_path, "*", "*.pt"))[0]
    open(shard, "wb").write(b"rot")
    with pytest.raises(SystemExit, match=r"\.pt: not an embedding cache shard .*delete it"):
        ev.EmbeddingCache("m", str(tmp_path))


def test_eval_results_get_normal_permissions(tmp_path, tiny_path):
    save_images(tmp_path, ["0.jpg", "1.jpg"])
    write_jsonl(tmp_path / "f30k.jsonl", [{"image": f"{i}.jpg", "caption": "c"} for i in (0, 1)])
    ev.main(["--task", "retrieval", "--data", str(tmp_path / "f30k.jsonl"), "--image-root",
             str(tmp_path), "--model", tiny_path, "--out", str(tmp_path / "r.json"),
             "--cache-dir", str(tmp_path / "cache")])
    assert normal_permissions(tmp_path / "r.json")
    assert all(normal_permissions(p) for p in glob.glob(str(tmp_path / "cache" / "*" / "*")))


def test_a_log_line_torn_by_a_kill_is_dropped_on_resume(tmp_path):
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3)]
    (tmp_path / "log.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "lo')
    log = runs.open_log(str(tmp_path), 2)
    log.write(json.dumps({"step": 3, "loss": 0.5}) + "\n")  # reaches the disk at once
    assert (tmp_path / "log.jsonl").read_text().splitlines() == \
        lines[:2] + [json.dumps({"step": 3, "loss": 0.5})]
    log.close()
    assert normal_permissions(tmp_path / "log.jsonl")


# ---------------------------------------------------------------- kill -9, then --resume

def kill_then_resume(argv, tmp_path, max_steps):
    """Run `python train.py argv` three times: straight through; killed with SIGKILL once its
    first checkpoint is on disk; resumed. -> (straight output folder, resumed output folder)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same kernels and sums in every run
    def run(out, *extra):
        err = open(tmp_path / f"{os.path.basename(out)}{len(extra)}.err", "w+")
        p = subprocess.Popen([sys.executable, "train.py", *argv, "--out", str(out), *extra],
                             cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
        p.output = lambda: (err.seek(0), err.read()[-3000:])[1]
        return p
    straight, killed = run(tmp_path / "straight"), run(tmp_path / "killed")
    ckpt, deadline = tmp_path / "killed" / "checkpoint.pt", time.time() + 120
    while not ckpt.exists():
        assert killed.poll() is None, killed.output()
        assert time.time() < deadline
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    step = torch.load(ckpt, weights_only=True)["step"]
    assert step < max_steps and not (tmp_path / "killed" / "unime.json").exists()
    assert ".lock" in os.listdir(tmp_path / "killed")  # stale: its holder is dead
    resumed = run(tmp_path / "killed", "--resume")
    for p in (straight, resumed):
        assert p.wait(timeout=300) == 0, p.output()
    return tmp_path / "straight", tmp_path / "killed"


def same_weights_and_losses(a, b):
    wa, wb = (torch.load(d / "adapter.pt", weights_only=True) for d in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    la, lb = ([(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, open(d /
              "log.jsonl"))] for d in (a, b))
    assert la == lb


@pytest.mark.slow
def test_sigkill_mid_stage1_then_resume_gives_the_uninterrupted_weights(shared, tiny_path,
                                                                        tmp_path):
    stage1(shared, tiny_path, tmp_path / "warm", "--max-steps", "1")  # the teacher cache
    max_steps = 12
    a, b = kill_then_resume(["--stage", "1", "--model", tiny_path, "--data", shared["nli"],
                             "--teacher", "all-MiniLM-L6-v2", "--teacher-cache",
                             shared["cache"], "--max-steps", str(max_steps), "--batch-size",
                             "16", "--chunk-size", "8", "--save-every", "3", "--workers", "0"],
                            tmp_path, max_steps)
    same_weights_and_losses(a, b)


@pytest.mark.slow
def test_sigkill_mid_stage2_with_random_negatives_then_resume_gives_the_same_weights(
        pretrained_path, tmp_path):
    """Random negatives draw from their own generator, restored from the checkpoint; dropout
    (LoRA 0.1) from the global one; a DataLoader worker prepares the batches."""
    max_steps = 10
    a, b = kill_then_resume(["--stage", "2", "--model", pretrained_path, "--data",
                             _toy_mmeb(str(tmp_path), 48), "--image-root", str(tmp_path),
                             "--negatives", "random", "--k", "4", "--lora-r", "4",
                             "--lora-dropout", "0.1", "--max-steps", str(max_steps),
                             "--batch-size", "16", "--chunk-size", "16", "--save-every", "3",
                             "--workers", "1"], tmp_path, max_steps)
    same_weights_and_losses(a, b)


# ---------------------------------------------------------------- the collapse guard

def test_collapse_guard_tells_collapse_from_anisotropy():
    k = 8
    healthy = [{"loss": 1.0, "pos_sim": 0.95, "random_pair_cos": 0.9}] * 60  # anisotropic
    hardneg.collapse_guard(healthy, k)
    early = [{"loss": math.log(9), "pos_sim": 0.99, "random_pair_cos": 0.99}] * 49
    hardneg.collapse_guard(early, k)  # not enough steps to judge
    collapsed = [{"loss": math.log(9) + 0.01, "pos_sim": 0.999, "random_pair_cos": 0.998}] * 50
    with pytest.raises(SystemExit, match="collapse"):
        hardneg.collapse_guard(collapsed, k)
    plateau = [{"loss": math.log(9), "pos_sim": 0.6, "random_pair_cos": 0.3}] * 50
    hardneg.collapse_guard(plateau, k)  # a high loss alone is not collapse


def test_an_anisotropic_but_healthy_stage2_run_is_not_stopped(pretrained_path, tmp_path,
                                                              monkeypatch):
    """The pretrained toy with one direction added to every embedding before it is
    normalized, as a shared instruction does to a real MLLM's last-token states: unrelated
    pairs stay above cosine 0.97 (a threshold on them alone would stop this run). The
    positives stay above them and the loss falls, far from ln(k+1), so the guard (its window
    shortened to fit a short test) lets it run."""
    rows = toy.default.text_pairs(shapes.split_scenes(0)["train"], 64, seed=0)
    write_jsonl(tmp_path / "t.jsonl", [{"qry": r["sent0"], "qry_image_path": "",
                                        "pos_text": r["sent1"], "pos_image_path": ""}
                                       for r in rows])
    common, embed = F.normalize(torch.ones(64), dim=0), M.embed
    monkeypatch.setattr(M, "embed", lambda model, batch:
                        F.normalize(embed(model, batch) + 5 * common, dim=-1))
    monkeypatch.setattr(hardneg, "collapse_guard", functools.partial(hardneg.collapse_guard,
                                                                     window=10))
    train.main(["--stage", "2", "--model", pretrained_path, "--data", str(tmp_path / "t.jsonl"),
                "--out", str(tmp_path / "run"), "--max-steps", "14", "--batch-size", "16",
                "--chunk-size", "16", "--lora-r", "0", "--lr", "1e-3", "--warmup", "2",
                "--workers", "0"])
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert len(log) == 14 and min(r["random_pair_cos"] for r in log) > 0.97
    assert sum(r["pos_sim"] - r["random_pair_cos"] for r in log) / len(log) > 0.01
    assert sum(r["loss"] for r in log[-4:]) < sum(r["loss"] for r in log[:4]) < 4 * math.log(9)


@pytest.mark.slow
def test_stage2_from_an_unaligned_model_collapses_and_is_stopped(tiny_path, tmp_path):
    """From random weights the paper's loss makes every embedding the same vector. Here every
    input ends in the same chat-template tokens (the toy's retrieval rows: the "in one word"
    prompts), so a random model's last-token states start nearly alike; the rows in MMEB's raw
    format, which end in their own words, kept this run from collapsing (loss below ln 9)."""
    with pytest.raises(SystemExit, match="collapse"):
        train.main(["--stage", "2", "--model", tiny_path, "--data",
                    _toy_mmeb(tmp_path, 320, tasks=("t2i", "i2t")),
                    "--image-root", str(tmp_path), "--out", str(tmp_path / "s2"),
                    "--max-steps", "200", "--batch-size", "64", "--lora-r", "0",
                    "--lr", "2e-3"])
