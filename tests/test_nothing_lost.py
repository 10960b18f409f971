"""Nothing lost, nothing stale, inputs named early, memory bounded, as tests: the teacher's
cache keyed by its files' content and written in shards that a killed pass resumes from; a
checkpoint every --save-minutes, and at the step boundary after SIGTERM or Ctrl-C, then the
resume command; what killed writers left removed at the next start, and nothing else; images
decoded whole before step 1, their verdicts remembered; every row-level problem one line
naming file and row; stage-1 text cut to --max-text-tokens. Kill-and-resume runs are slow.

    python -m pytest -q tests/test_nothing_lost.py
"""
import builtins
import errno
import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import types
from argparse import Namespace

import numpy as np
import pytest
import torch
from PIL import Image

import runs
import stages
import data
import distill
import families
import model as M
import train
from test_pipeline import _toy_mmeb, nli_file, save_images, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


def dead_pid():
    """The number of a process that has ended (a killed writer's)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def bert_teacher(folder, seed):
    """A small BERT saved as a download is (config, safetensors, MiniLM's real tokenizer)."""
    from transformers import AutoTokenizer, BertConfig, BertModel
    torch.manual_seed(seed)
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(distill.teacher_path(distill.MINILM)).save_pretrained(folder)
    return str(folder)


def pairs_source(n=6):
    rows = [{"sent0": f"a red circle number {i}", "sent1": f"a crimson ring, {i}"}
            for i in range(n)]
    return {"rows": lambda ids: [rows[i] for i in ids], "n_rows": n, "heldout": []}


def teacher_args(teacher, **kw):
    return Namespace(hard_negatives=False, teacher=teacher, teacher_pooling="mean",
                     teacher_cache=None, trust_remote_code=False, max_text_tokens=128, **kw)


# ---------------------------------------------------------------- the teacher's cache

def test_a_teacher_folder_whose_weights_were_replaced_is_embedded_again(tmp_path,
                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default cache, runs/cache, is made here
    teacher, source = bert_teacher(tmp_path / "teacher", seed=0), pairs_source()
    old, _, _ = distill.teacher_targets(teacher_args(teacher), source, "cpu")
    bert_teacher(tmp_path / "teacher", seed=1)  # new weights in the same folder, same name
    new, index, _ = distill.teacher_targets(teacher_args(teacher), source, "cpu")
    model, tokenizer = distill.load_teacher(teacher)  # the teacher as it is now, embedded anew
    expected = distill.teacher_embed(model, tokenizer, list(index), "mean")
    assert torch.allclose(new, expected, atol=1e-6)
    assert not torch.allclose(new, old, atol=1e-3)


def test_a_killed_teacher_pass_resumes_from_its_last_shard_as_an_uninterrupted_one(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(distill, "SHARD", 4)
    teacher = bert_teacher(tmp_path / "teacher", seed=0)
    texts = [f"sentence {i} about a {c} square" for i, c in enumerate("rgbcmykwrgbcmy")]
    real, calls, kill = distill.teacher_embed, [], [True]

    def embed(model, tokenizer, chunk, *args, **kwargs):
        calls.append(list(chunk))
        if kill[0] and len(calls) == 3:
            raise KeyboardInterrupt  # killed while embedding the third shard
        return real(model, tokenizer, chunk, *args, **kwargs)
    monkeypatch.setattr(distill, "teacher_embed", embed)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        distill.teacher_embeddings(texts, teacher, str(cache))
    assert sorted(os.listdir(cache)) == ["shard-0000000000.pt", "shard-0000000004.pt"]
    stale = cache / (stages.TEMP.format(dead_pid()) + "k1ll3d_x")  # a shard torn by a kill -9
    stale.write_bytes(b"half a shard")
    calls.clear()
    kill[0] = False
    resumed = distill.teacher_embeddings(texts, teacher, str(cache))
    assert calls == [texts[8:12], texts[12:]]  # only the missing shards
    assert not stale.exists()
    calls.clear()
    straight = distill.teacher_embeddings(texts, teacher, str(tmp_path / "straight"))
    assert len(calls) == 4 and torch.equal(resumed, straight)


@pytest.mark.slow
def test_a_teacher_pass_killed_with_sigkill_keeps_its_shards(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    texts = [f"a {c} {s} number {i}" for i, (c, s) in enumerate(
        (c, s) for c in ("red", "blue", "green", "pink") for s in ("circle", "square") * 64)]
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    cache = tmp_path / "cache"
    killed = subprocess.Popen(
        [sys.executable, "-c", "import json, sys, distill; distill.SHARD = 64; "
         "distill.teacher_embeddings(json.load(open('texts.json')), distill.MINILM, 'cache')"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while len([f for f in os.listdir(cache) if f.endswith(".pt")] if cache.exists() else []) < 2:
        assert killed.poll() is None and time.time() < deadline
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    kept = len([f for f in os.listdir(cache) if f.endswith(".pt")])
    assert 2 <= kept < len(texts) // 64
    monkeypatch.setattr(distill, "SHARD", 64)
    real, calls = distill.teacher_embed, []
    monkeypatch.setattr(distill, "teacher_embed", lambda *a, **k: (calls.append(1),
                                                                   real(*a, **k))[1])
    resumed = distill.teacher_embeddings(texts, distill.MINILM, str(cache))
    assert len(calls) == len(texts) // 64 - kept  # only the shards the kill lost
    straight = distill.teacher_embeddings(texts, distill.MINILM, str(tmp_path / "straight"))
    assert torch.allclose(resumed, straight, atol=1e-6)


def test_the_teacher_matrix_stays_on_the_cpu(tmp_path, monkeypatch):
    """Only each step's rows go to the device (train.py); the whole matrix of a 4,096-d teacher
    over the NLI file would take 6.5-11 GB of the GPU for all of stage 1."""
    monkeypatch.chdir(tmp_path)
    teacher, source = bert_teacher(tmp_path / "teacher", seed=0), pairs_source()
    on_cpu, _, _ = distill.teacher_targets(teacher_args(teacher), source, "cpu")
    elsewhere, _, _ = distill.teacher_targets(teacher_args(teacher), source, "meta")  # cached
    assert elsewhere.device.type == "cpu" and torch.equal(elsewhere, on_cpu)


# ---------------------------------------------------------------- bounded memory

LONG = "first " + "red circle " * 1500 + "last"  # 3,002 words


def test_stage1_text_is_cut_at_its_end_to_max_text_tokens(pretrained_path):
    model, processor, family = M.load_mllm(pretrained_path)
    tokens = lambda text: len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    cut = distill.cut_texts(processor, [LONG, "a blue square"], 32)
    # its first 32 tokens, as a tokenizer's truncation=True keeps them
    assert tokens(cut[0]) == 32 and LONG.startswith(cut[0]) and not cut[0].endswith(" last")
    assert cut[1] == "a blue square"  # short text untouched
    rows = [{"sent0": LONG if i == 0 else "a red circle", "sent1": "a blue square"}
            for i in range(4)]
    args = Namespace(stage=1, batch_size=4, seed=0, hard_negatives=False, chunk_size=4,
                     max_steps=1, max_text_tokens=32, image_size=None)
    item = train.StepBatches(args, {"rows": lambda ids: [rows[i] for i in ids], "n_rows": 4},
                             processor, family, 0, 1)[0]
    lengths = item["sides"]["sent0"][0][1]["attention_mask"].sum(1)
    prompt = families.process(processor, family, ["red"])["attention_mask"].sum() - 1
    assert lengths.max() <= prompt + 32 + 1  # the prompt, 32 text tokens, a merge at the seam


def test_the_teacher_cuts_by_the_same_rule_counting_its_own_tokens():
    model, tokenizer = distill.load_teacher(distill.MINILM)
    cut = distill.cut_texts(tokenizer, [LONG], 32)[0]
    assert len(tokenizer(cut, add_special_tokens=False)["input_ids"]) == 32
    assert cut.split()[0] == "first" and "last" not in cut  # the start kept, the end cut
    got = distill.teacher_embed(model, tokenizer, [LONG], max_tokens=32)
    assert torch.allclose(got, distill.teacher_embed(model, tokenizer, [cut]), atol=1e-6)


# ---------------------------------------------------------------- checkpoints: time, signals

def cadence_args(**kw):
    return Namespace(**{"save_every": 1000, "save_minutes": 30, "max_steps": 1000,
                        "out": "runs/x", **kw})


def test_a_checkpoint_every_save_minutes_without_save_every(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(runs, "time", types.SimpleNamespace(
        monotonic=lambda: clock[0], time=time.time))
    cadence, saved = runs.Cadence(cadence_args(max_steps=100), []), []
    for step in cadence.steps(0):
        clock[0] += 60  # a step takes a minute
        cadence.after_step(step + 1, lambda: saved.append(step + 1))
    assert saved == [30, 60, 90, 100]  # every 30 minutes, and at the end
    cadence, saved = runs.Cadence(cadence_args(max_steps=5, save_minutes=0), []), []
    for step in cadence.steps(0):
        clock[0] += 3600
        cadence.after_step(step + 1, lambda: saved.append(step + 1))
    assert saved == [5]  # 0: off


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_checkpoints_at_the_next_step_boundary_then_stops_with_the_resume_command(
        signum, capsys):
    before = signal.getsignal(signum)
    cadence, saved = runs.Cadence(cadence_args(), ["--stage", "1", "--out", "r x",
                                                         "--overwrite"]), []
    with pytest.raises(SystemExit) as stop:
        for step in cadence.steps(0):
            if step == 3:
                os.kill(os.getpid(), signum)  # arrives in the middle of step 4
            cadence.after_step(step + 1, lambda: saved.append(step + 1))
    assert stop.value.code == 128 + signum and saved == [4]
    assert "python train.py --stage 1 --out 'r x' --resume" in capsys.readouterr().err
    assert signal.getsignal(signum) == before  # the handler is the loop's only
    cadence = runs.Cadence(cadence_args(), [])
    with pytest.raises(SystemExit, match="again: stopped at once"):
        for step in cadence.steps(0):
            os.kill(os.getpid(), signum)  # twice in one step: now, without a checkpoint
            os.kill(os.getpid(), signum)
            cadence.after_step(step + 1, lambda: pytest.fail("saved"))


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shared")
    return {"nli": nli_file(folder / "nli.csv", 120), "cache": str(folder / "teacher")}


def stage1_argv(shared, model, out, *extra):
    return ["--stage", "1", "--model", str(model), "--data", shared["nli"], "--out", str(out),
            "--batch-size", "16", "--chunk-size", "8", "--teacher", "all-MiniLM-L6-v2",
            "--teacher-cache", shared["cache"], *extra]


def test_a_run_checkpoints_every_save_minutes(shared, tiny_path, tmp_path, monkeypatch):
    real, steps = runs.save, []
    monkeypatch.setattr(runs, "save", lambda out, model, opt, step, *a: (
        steps.append(step), real(out, model, opt, step, *a)))
    train.main(stage1_argv(shared, tiny_path, tmp_path / "a", "--max-steps", "3",
                           "--workers", "0", "--save-minutes", "1e-9"))
    assert steps == [1, 2, 3]  # each step takes longer than 1e-9 minutes
    steps.clear()
    train.main(stage1_argv(shared, tiny_path, tmp_path / "b", "--max-steps", "3",
                           "--workers", "0"))
    assert steps == [3]  # the default, 30 minutes: only at the end of a short run


def weights(out):
    return torch.load(os.path.join(out, "adapter.pt"), weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("signum, workers", [(signal.SIGTERM, "1"), (signal.SIGINT, "0")],
                         ids=["SIGTERM-to-the-group", "SIGINT"])
def test_a_signal_mid_run_checkpoints_and_the_printed_command_resumes_to_the_same_weights(
        shared, tiny_path, tmp_path, signum, workers):
    """SIGTERM goes to the whole process group, as a scheduler sends it (the loader's worker
    too); SIGINT to the run alone."""
    train.main(stage1_argv(shared, tiny_path, tmp_path / "warm", "--max-steps", "1",
                           "--workers", "0"))  # the teacher's cache, shared by the runs below
    argv = stage1_argv(shared, tiny_path, tmp_path / "run", "--max-steps", "12", "--workers",
                       workers)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda a: subprocess.Popen([sys.executable, "train.py", *a], cwd=ROOT, env=env,  # noqa: E731
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
    straight = run(stage1_argv(shared, tiny_path, tmp_path / "straight", "--max-steps", "12",
                               "--workers", workers))
    assert straight.wait(timeout=300) == 0, straight.stderr.read()
    killed, log, deadline = run(argv), tmp_path / "run" / "log.jsonl", time.time() + 300
    while not (log.exists() and len(log.read_text().splitlines()) >= 2):
        assert killed.poll() is None and time.time() < deadline, killed.stderr.read()
        time.sleep(0.01)
    (os.killpg if signum == signal.SIGTERM else os.kill)(killed.pid, signum)
    err = killed.communicate(timeout=300)[1]
    assert killed.returncode == 128 + signum, err
    step = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"]
    assert 2 <= step < 12 and not (tmp_path / "run" / "unime.json").exists()
    command = shlex.split(err.split("Continue with:")[1].strip().splitlines()[0])
    assert command[:2] == ["python", "train.py"] and command[-1] == "--resume"
    resumed = run(command[2:])
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "run")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- killed writers' leftovers

def test_a_start_removes_only_what_killed_writers_of_this_project_left(tmp_path):
    here, dead, alive = stages.TEMP.split("_")[2], dead_pid(), os.getppid()
    name = lambda pid, host, tail: f".tmp-unime_{pid}_{host}_{tail}"  # noqa: E731 (+8 chars)
    run, outside = tmp_path / "run", tmp_path / "outside.txt"
    run.mkdir()
    outside.write_text("keep")
    kept = [name(alive, here, "ab12cd_x"),  # a write in progress on this host
            name(dead, "elsewhere", "ab12cd_x"),  # another host's, recent: maybe in progress
            ".tmp-notours", "notes.txt", ".tmp-ab12cd_x"]  # not this project's own names
    gone = [name(dead, here, "ab12cd_x"), name(dead, "elsewhere", "ol78mn_w")]
    for n in kept + gone:
        (run / n).write_text("x")
    os.utime(run / gone[1], (time.time() - 2 * 86400,) * 2)  # untouched for two days
    (run / name(dead, here, "ef34gh_y")).mkdir()  # save_pretrained's folder, half written
    (run / name(dead, here, "ef34gh_y") / "model.safetensors").write_text("half")
    (run / name(dead, here, "ln56kl_z")).symlink_to(outside)
    stages.remove_stale_temp(str(run))
    assert sorted(os.listdir(run)) == sorted(kept)
    assert outside.read_text() == "keep"  # a link goes, never what it points to
    stages.remove_stale_temp(str(run), locked=True)  # a run folder this process holds
    assert sorted(os.listdir(run)) == [".tmp-notours", "notes.txt"]


def test_a_run_folder_loses_a_killed_writers_temporary_folder_when_claimed(tmp_path):
    run = tmp_path / "run"
    left = run / (stages.TEMP.format(dead_pid()) + "ab12cd_x")  # save_pretrained, killed mid-way
    left.mkdir(parents=True)
    (left / "model.safetensors").write_bytes(b"\0" * 1000)
    (run / "log.jsonl").write_text("")
    (run / "run-files.json").write_text('{"files": ["log.jsonl"]}')  # a run's, by its record
    with runs.claimed(Namespace(out=str(run), model=None, resume=False, overwrite=True)):
        assert sorted(os.listdir(run)) == [".lock", "log.jsonl", "run-files.json"]


# ---------------------------------------------------------------- folders, named in one line

def test_an_unwritable_out_or_one_without_flock_stops_in_one_line(tmp_path, monkeypatch):
    """A read-only disk is simulated (a test running as root may write anywhere): every open
    for writing inside `out` fails with EROFS."""
    out, real_open, real_os_open = tmp_path / "ro", builtins.open, os.open
    out.mkdir()
    inside = lambda path: str(path).startswith(str(out))  # noqa: E731
    write = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def os_open(path, flags, *args, **kwargs):
        if inside(path) and flags & write:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_os_open(path, flags, *args, **kwargs)

    def open_(path, mode="r", *args, **kwargs):
        if inside(path) and set(mode) & set("wax+"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, mode, *args, **kwargs)
    args = Namespace(out=str(out), model=None, resume=False, overwrite=False)
    with monkeypatch.context() as m:
        m.setattr(os, "open", os_open)
        m.setattr(builtins, "open", open_)
        with pytest.raises(SystemExit, match=r"^--out .*ro: cannot write there \(Read-only "
                                             r"file system\); choose a folder"):
            runs.claim(args)

    def no_locks(*a):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(SystemExit, match=r"^--out .*ro: its filesystem has no file locks "
                                         r"\(flock: No locks available\)"):
        runs.claim(args)


def test_a_damaged_unime_json_stops_in_one_line_naming_it(tmp_path, shared):
    (tmp_path / "stage1").mkdir()
    (tmp_path / "stage1" / "unime.json").write_text('{"stage": 1, "fam')  # torn
    words = r"stage1/unime.json is damaged \(JSONDecodeError.*\): restore it or train again"
    with pytest.raises(SystemExit, match=words):
        stages.load_embedder(str(tmp_path / "stage1"))
    with pytest.raises(SystemExit, match=words):
        train.main(stage1_argv(shared, tmp_path / "stage1", tmp_path / "next"))


# ---------------------------------------------------------------- images, decoded before step 1

def damaged_png(path, seed=0):
    """A PNG whose image data is broken while its end marker (IEND) is intact."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(path)
    b = bytearray(open(path, "rb").read())
    i = b.index(b"IDAT") + 40
    b[i:i + 40] = bytes(x ^ 0xFF for x in b[i:i + 40])
    open(path, "wb").write(bytes(b))
    assert bytes(b).endswith(b"IEND\xaeB`\x82")


def mmeb_rows(names):
    return [{"qry": "<|image_1|> Represent the image.", "qry_image_path": n, "pos_text": "x",
             "pos_image_path": ""} for n in names]


def test_a_png_damaged_inside_is_named_with_its_row_before_step_1(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_images(tmp_path, ["a.png", "b.png"])
    damaged_png(tmp_path / "bad.png")
    write_jsonl(tmp_path / "t.jsonl", mmeb_rows(["a.png", "bad.png", "b.png"]))
    with pytest.raises(ValueError, match=r"t.jsonl, row 2: image .*bad.png cannot be decoded "
                                         r"\(.*\); or pass --skip-missing-images"):
        data.read_mmeb_train(str(tmp_path / "t.jsonl"), str(tmp_path))
    kept, skipped = data.read_mmeb_train(str(tmp_path / "t.jsonl"), str(tmp_path), True)
    assert len(kept) == 2 and len(skipped) == 1 and "row 2" in skipped[0]
    with pytest.raises(ValueError, match=r"^cannot read image .*bad.png: "):  # not a PIL object
        data.load_image(str(tmp_path / "bad.png"))


def test_image_verdicts_are_remembered_so_a_rerun_decodes_only_changed_files(tmp_path,
                                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = [f"{i}.png" for i in range(5)]
    save_images(tmp_path, names)
    write_jsonl(tmp_path / "t.jsonl", mmeb_rows(names))
    real, decoded = data.check_image, []
    monkeypatch.setattr(data, "check_image", lambda p: (decoded.append(p), real(p))[1])
    read = lambda: data.read_mmeb_train(str(tmp_path / "t.jsonl"), str(tmp_path))  # noqa: E731
    read()
    assert len(decoded) == 5
    decoded.clear()
    read()
    assert decoded == []  # a resume re-checks nothing
    damaged_png(tmp_path / "3.png")  # rewritten since
    with pytest.raises(ValueError, match=r"row 4: image .*3.png cannot be decoded"):
        read()
    assert decoded == [str(tmp_path / "3.png")]


def test_a_resume_may_add_skip_missing_images_after_an_image_broke(pretrained_path, tmp_path,
                                                                   monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    mmeb = _toy_mmeb(str(tmp_path), 48)
    argv = ["--stage", "2", "--model", pretrained_path, "--data", mmeb, "--image-root",
            str(tmp_path), "--max-steps", "3", "--batch-size", "16", "--chunk-size", "16",
            "--lora-r", "4", "--save-every", "1", "--workers", "0", "--out", str(tmp_path / "r")]
    real, calls = train.gradcache_embed, []

    def killed_in_step_2(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    with monkeypatch.context() as m:
        m.setattr(train, "gradcache_embed", killed_in_step_2)
        with pytest.raises(KeyboardInterrupt):
            train.main(argv)
    damaged_png(tmp_path / "qry0.png")  # broken after the run started
    with pytest.raises(SystemExit, match=r"row 1: image .*qry0.png cannot be decoded .*; or "
                                         r"pass --skip-missing-images"):
        train.main(argv + ["--resume"])
    train.main(argv + ["--resume", "--skip-missing-images"])
    assert "47 pairs, 1 rows skipped" in capsys.readouterr().out
    assert stages.read_stage_meta(tmp_path / "r")["stage"] == 2


# ---------------------------------------------------------------- rows, named when read

def test_text_holding_u2028_and_other_unicode_line_ends_is_read_as_text(tmp_path):
    odd = ["a line\u2028sep", "next\u2029para", "c\u0085d", "e\x0cf", "two\nlines"]
    csv_path = tmp_path / "nli.csv"
    csv_path.write_text("sent0,sent1\n" + "".join(f'"{t}",plain {i}\n' for i, t in
                                                  enumerate(odd)), newline="")
    expected = [{"sent0": t, "sent1": f"plain {i}"} for i, t in enumerate(odd)]
    assert data.read_nli(str(csv_path)) == expected
    jsonl = tmp_path / "nli.jsonl"
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in expected),
                     encoding="utf-8")
    assert data.read_nli(str(jsonl)) == expected
    train_rows = [{"qry": t, "qry_image_path": "", "pos_text": "x", "pos_image_path": ""}
                  for t in odd]
    write_jsonl(tmp_path / "t.jsonl", train_rows)  # json.dumps escapes; and raw:
    (tmp_path / "raw.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                for r in train_rows), encoding="utf-8")
    for path in ("t.jsonl", "raw.jsonl"):
        rows, _ = data.read_mmeb_train(str(tmp_path / path))
        assert [r["qry"] for r in rows] == odd


@pytest.mark.parametrize("reader, rows, words", [
    ("mmeb", [{"qry": "<|image_1|> Represent it.", "qry_image_path": "", "pos_text": "x",
               "pos_image_path": ""}],
     r"row 2: qry holds the image tag '<\|image_1\|>' but qry_image_path is empty"),
    ("mmeb", [{"qry": "Find it.", "qry_image_path": "", "pos_text": "<image> a dog",
               "pos_image_path": None}],
     r"row 2: pos_text holds the image tag '<image>' but pos_image_path is empty"),
    ("mmeb", [{"qry": 5, "qry_image_path": "", "pos_text": "x", "pos_image_path": ""}],
     r"row 2: qry is 5 \(int\), not text"),
    ("mmeb", [{"qry": "q", "qry_image_path": 7, "pos_text": "x", "pos_image_path": ""}],
     r"row 2: qry_image_path is 7 \(int\), not text"),
    ("nli", [{"sent0": "a cat", "sent1": "see the <image> here"}],
     r"row 2: sent1 holds the image tag '<image>' in text-only data \(stage 1\)"),
    ("eval", [{"qry_text": "<|image_1|> q", "qry_img_path": "", "tgt_text": ["x"],
               "tgt_img_path": [""]}],
     r"row 2: qry text holds the image tag '<\|image_1\|>' but qry image path is empty"),
    ("eval", [{"qry_text": "q", "qry_img_path": "", "tgt_text": [3.5], "tgt_img_path": [""]}],
     r"row 2: tgt\[0\] text or image path is not text \(3.5"),
])
def test_each_row_problem_is_one_line_naming_file_and_row_at_read(tmp_path, reader, rows,
                                                                 words):
    good = {"mmeb": {"qry": "q", "qry_image_path": "", "pos_text": "x", "pos_image_path": ""},
            "nli": {"sent0": "a", "sent1": "b"},
            "eval": {"qry_text": "q", "qry_img_path": "", "tgt_text": ["x"],
                     "tgt_img_path": [""]}}[reader]
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [good] + rows)
    read = {"mmeb": data.read_mmeb_train, "nli": data.read_nli,
            "eval": data.read_mmeb_eval}[reader]
    with pytest.raises(ValueError, match=r"rows.jsonl, " + words):
        read(str(path))


def test_a_row_problem_stops_train_in_one_line_before_any_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(stages, "load_embedder", lambda *a, **k: pytest.fail("model loaded"))
    write_jsonl(tmp_path / "t.jsonl", [{"qry": "<|image_1|> Represent it.", "qry_image_path":
                                        "", "pos_text": "x", "pos_image_path": ""}])
    with pytest.raises(SystemExit, match=r"^error: .*t.jsonl, row 1: qry holds the image tag"):
        train.main(["--stage", "2", "--model", "m", "--data", str(tmp_path / "t.jsonl"),
                    "--out", str(tmp_path / "run")])
