"""Scores that cannot lie, models and data known by content, and a run that touches only its own
files, as tests: a tie or NaN counts against the gold item in every metric, NaN embeddings stop
evaluation, export and the held-out reports, eval's cache follows the weights' content, --resume
refuses changed data, and --overwrite (train.py and export.py) never replaces a file it did not
write, never through a symbolic link.

    python -m pytest -q tests/test_honest_scores.py
"""
import functools
import json
import os
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

import distill
import eval as ev
import export
import model as M
import runs
import stages
import toy.benchmark
import train
from test_pipeline import mmeb_row, nli_file, save_images, write_jsonl

NAN = float("nan")


def unit_rows(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


# ---------------------------------------------------------------- metrics: a tie is a miss

def test_hit_at_1_counts_ties_and_nan_against_the_gold():
    ones = torch.ones(5, 3)
    assert ev.hit_at_1(ones[:2], ones, [[0, 1, 2], [3, 4]]) == 0  # all equal: every row ties
    nan = torch.full((5, 3), NAN)
    assert ev.hit_at_1(nan[:2], nan, [[0, 1, 2], [3, 4]]) == 0  # argmax over NaN says 100%
    q = unit_rows([1, 0, 0])
    c = unit_rows([1, 0, 0], [0, 1, 0], [1, 0, 0], [0.9, 0.1, 0])
    c = torch.cat([c, torch.full((1, 3), NAN)])  # row 4: a NaN candidate
    cands = [[0, 1, 3],   # the gold strictly best: hit
             [0, 2, 1],   # the gold tied with another candidate (row 2 = row 0): miss
             [0, 1, 4],   # the gold best of the finite ones, beside a NaN: miss
             [0, 0, 3]]   # the gold's own row listed twice is the gold, not a rival: hit
    assert ev.hit_at_1(q.expand(4, 3), c, cands) == pytest.approx(2 / 4)
    assert ev.hit_at_1(torch.full((1, 3), NAN), c, [[0, 1]]) == 0  # a NaN query


def test_recall_at_k_all_equal_embeddings_rank_the_gold_last_both_ways():
    owner = [0, 1, 1, 2, 3, 3]  # images 0..3 with 1, 2, 1, 2 captions
    text, image = torch.ones(6, 4), torch.ones(4, 4)
    got = ev.recall_at_k(text, image, owner, ks=(1, 3, 4, 5, 6))
    # text->image: 1 gold among 4 tied images, ranked after the 3 others: a hit from k = 4
    assert [got[f"t2i_R@{k}"] for k in (1, 3, 4, 5, 6)] == [0, 0, 1, 1, 1]
    # image->text: an image with c captions ranks them after the 6 - c others: hit iff k > 6 - c
    assert [got[f"i2t_R@{k}"] for k in (1, 3, 4, 5, 6)] == [0, 0, 0, 0.5, 1]


def test_recall_at_k_partly_tied_and_nan_by_hand():
    image = unit_rows([1, 0, 0], [0, 1, 0], [0, 0, 1])
    text = unit_rows([1, 0, 0], [0, 1, 1], [0, 1, 1])  # captions 1, 2 tie between images 1, 2
    got = ev.recall_at_k(text, image, [0, 1, 2], ks=(1, 2))
    assert got["t2i_R@1"] == pytest.approx(1 / 3) and got["t2i_R@2"] == 1  # ties: behind
    assert got["i2t_R@1"] == pytest.approx(1 / 3) and got["i2t_R@2"] == 1
    image = torch.eye(4)
    image[2] = NAN  # one broken image among four, one exact caption each
    got = ev.recall_at_k(torch.eye(4), image, [0, 1, 2, 3], ks=(1, 2, 4))
    # text->image: caption 2's gold is NaN (never found); the others rank the NaN image first
    assert (got["t2i_R@1"], got["t2i_R@2"], got["t2i_R@4"]) == (0, 0.75, 0.75)
    # image->text: image 2's scores are all NaN (a miss); the others find their caption first
    assert (got["i2t_R@1"], got["i2t_R@4"]) == (0.75, 0.75)


def test_sugarcrepe_counts_a_tie_and_nan_as_wrong():
    image = unit_rows([1, 0], [1, 0], [1, 0], [1, 0])
    pos = unit_rows([1, 0], [1, 1], [1, 0], [1, 0])
    neg = unit_rows([0, 1], [1, 1], [0, 1], [0, 1])  # right, tie, then two made NaN below
    pos[2], image[3] = NAN, NAN
    assert ev.sugarcrepe_accuracy(image, pos, neg) == pytest.approx(1 / 4)
    ones = torch.ones(3, 2)
    assert ev.sugarcrepe_accuracy(ones, ones, ones) == 0


def test_teacher_agreement_recall_counts_a_tie_as_a_miss():
    ones, eye = torch.ones(4, 3), torch.eye(4)
    got = distill.teacher_agreement(ones, ones, eye, eye)
    assert got["t2t_R@1"] == 0  # all tied (argmax gave row 0 a hit: 1 / 4)
    assert got["teacher_t2t_R@1"] == 1


def test_toy_benchmark_of_a_nan_embedder_stops_naming_the_model():
    with pytest.raises(SystemExit, match=r"^runs/x: \d+ of \d+ embeddings are NaN or "
                                         r"infinite; a broken model is not scored"):
        toy.benchmark.score(lambda inputs: torch.full((len(inputs), 3), NAN), model="runs/x")


def test_teacher_report_stops_on_a_nan_teacher_or_student(tiny):
    pairs = [{"sent0": "a red circle", "sent1": "a circle, red"},
             {"sent0": "two blue squares", "sent1": "a pair of blue squares"}]
    texts = [t for p in pairs for t in p.values()]
    index = {t: i for i, t in enumerate(texts)}
    teacher = F.normalize(torch.randn(4, 8), dim=-1)
    teacher[2, 0] = NAN
    report = distill.teacher_report(teacher, index, pairs, "cpu", None, ("stu", "teacher T"))
    with pytest.raises(SystemExit, match=r"^teacher T: 1 of 2 embeddings are NaN"):
        report(*tiny)
    model, processor, family = tiny
    broken = distill.teacher_report(teacher.nan_to_num(), index, pairs, "cpu", None, ("stu", "T"))
    weight = model.get_input_embeddings().weight
    kept = weight.detach().clone()
    with torch.no_grad():
        weight.fill_(NAN)
    try:
        with pytest.raises(SystemExit, match=r"^stu: 2 of 2 embeddings are NaN"):
            broken(*tiny)
    finally:
        with torch.no_grad():
            weight.copy_(kept)


# ---------------------------------------------------------------- a broken model is not scored

@pytest.fixture(scope="module")
def stage1(tmp_path_factory, pretrained_path):
    """A 2-step stage-1 output of the pretrained toy, and MMEB-style data to score it on."""
    tmp = tmp_path_factory.mktemp("honest")
    run = train_stage1(tmp, pretrained_path, tmp / "s1")
    save_images(tmp / "img", ["a.png", "b.png", "c.png"])
    write_jsonl(tmp / "VOC2007.jsonl", [mmeb_row(qi=q, tt=tt, ti=[""] * len(tt)) for q, tt in (
        ("a.png", ("cat", "dog", "bird")), ("b.png", ("dog", "cat")),
        ("c.png", ("bird", "cat", "fish")), ("a.png", ("fish", "dog")))])
    return {"run": run, "tmp": tmp}


def train_stage1(tmp, model, out, *extra, cache=True):
    """A 2-step stage-1 run on tmp/nli.csv; cache=False: the teacher cache at its default
    place, named by the texts (a changed file gets its own)."""
    if not (tmp / "nli.csv").exists():
        nli_file(tmp / "nli.csv", 120)
    train.main(["--stage", "1", "--model", str(model), "--data", str(tmp / "nli.csv"),
                "--out", str(out), "--max-steps", "2", "--batch-size", "16", "--chunk-size",
                "8", "--teacher", "all-MiniLM-L6-v2", "--workers", "0", "--lr", "5e-2",
                *(["--teacher-cache", str(tmp / "t.pt")] if cache else []), *extra])
    return str(out)


def mmeb(stage1, model, cache="", *extra):
    return ev.main(["--task", "mmeb", "--data", str(stage1["tmp"] / "VOC2007.jsonl"),
                    "--image-root", str(stage1["tmp"] / "img"), "--model", model, "--out",
                    str(stage1["tmp"] / "r.json"), "--cache-dir", cache, *extra])


def copy_with_adapter(run, to, change):
    """A copy of a stage output whose adapter tensors are change(tensor)."""
    shutil.copytree(run, to)
    state = torch.load(os.path.join(to, "adapter.pt"), weights_only=True)
    stages.save_atomic(os.path.join(to, "adapter.pt"), {k: change(v) for k, v in state.items()})
    return str(to)


@pytest.mark.slow
def test_a_nan_adapter_stops_eval_even_with_the_originals_cache_and_export_refuses_it(
        stage1, tmp_path):
    cache = str(tmp_path / "cache")
    mmeb(stage1, stage1["run"], cache)  # its vectors cached
    broken = copy_with_adapter(stage1["run"], tmp_path / "nan", lambda t: torch.full_like(t, NAN))
    for cached in (cache, ""):  # the case printed the original's (or 100%) scores
        with pytest.raises(SystemExit, match=rf"^{re.escape(broken)}: \d+ of \d+ embeddings "
                                             rf"are NaN or infinite; a broken model is not"):
            mmeb(stage1, broken, cached)
    with pytest.raises(SystemExit, match=rf"^{re.escape(broken)}: \d+ weight tensors hold NaN "
                                         rf"or inf .*a broken model is not exported"):
        export.main([broken, str(tmp_path / "export")])
    assert not os.path.exists(tmp_path / "export")


@pytest.mark.slow
def test_eval_cache_follows_the_weights_not_the_folder_or_its_id(stage1, tmp_path,
                                                                monkeypatch):
    cache, calls = str(tmp_path / "cache"), []
    first = mmeb(stage1, stage1["run"], cache)["models"][stage1["run"]]
    twin = str(tmp_path / "twin")
    shutil.copytree(stage1["run"], twin)  # the same bytes elsewhere: the same model
    changed = copy_with_adapter(stage1["run"], tmp_path / "changed", lambda t: -3 * t)
    real_encode = M.encode
    monkeypatch.setattr(M, "encode", lambda *a, **k: calls.append(1) or real_encode(*a, **k))
    assert mmeb(stage1, twin, cache)["models"][twin] == first and calls == []
    scored = mmeb(stage1, changed, cache)["models"][changed]
    assert calls  # other weights, the same unime.json id: embedded afresh
    assert scored == mmeb(stage1, changed, "")["models"][changed]  # its own scores


@pytest.mark.slow
def test_a_model_that_changes_while_eval_loads_it_is_refused_and_nothing_cached(stage1,
                                                                                tmp_path,
                                                                                monkeypatch):
    run = copy_with_adapter(stage1["run"], tmp_path / "run", lambda t: t)
    real_load = ev.load_model

    def load_while_a_trainer_rewrites(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        state = torch.load(os.path.join(run, "adapter.pt"), weights_only=True)
        stages.save_atomic(os.path.join(run, "adapter.pt"), {k: v + 1 for k, v in state.items()})
        return loaded
    monkeypatch.setattr(ev, "load_model", load_while_a_trainer_rewrites)
    with pytest.raises(SystemExit, match=rf"^{re.escape(run)} changed while it was being "
                                         rf"loaded"):
        mmeb(stage1, run, str(tmp_path / "cache"))
    assert not os.path.exists(tmp_path / "cache")


# ---------------------------------------------------------------- identity by content

def test_file_hashes_are_cached_by_stat_and_any_write_rehashes(tmp_path, monkeypatch):
    monkeypatch.setattr(stages, "HASH_CACHE", str(tmp_path / "hashes.json"))
    monkeypatch.setattr(stages, "_digests", {})
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 4096)
    reads = []
    real = stages.hashlib.file_digest
    monkeypatch.setattr(stages.hashlib, "file_digest",
                        lambda f, name: reads.append(1) or real(f, name))
    import hashlib
    assert stages.file_digest(str(path)) == hashlib.sha256(b"a" * 4096).hexdigest()
    monkeypatch.setattr(stages, "_digests", {})  # a new process: the file on disk serves
    assert stages.file_digest(str(path)) == hashlib.sha256(b"a" * 4096).hexdigest()
    assert len(reads) == 1
    st = os.stat(path)
    path.write_bytes(b"b" * 4096)  # same size, and the mtime put back as it was
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert stages.file_digest(str(path)) == hashlib.sha256(b"b" * 4096).hexdigest()
    assert len(reads) == 2


def test_model_identity_is_the_content_and_a_stage_output_includes_its_base(tmp_path,
                                                                           pretrained_path):
    copy = tmp_path / "copy"
    shutil.copytree(pretrained_path, copy)
    assert stages.model_identity(str(copy)) == stages.model_identity(pretrained_path)
    (copy / "notes.md").write_text("another file: another folder")
    assert stages.model_identity(str(copy)) != stages.model_identity(pretrained_path)


# ---------------------------------------------------------------- --resume: the same data

@pytest.mark.slow
def test_resume_refuses_data_changed_since_the_checkpoint_naming_the_file(tmp_path, tiny_path,
                                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default teacher cache: runs/cache here
    run, data = tmp_path / "run", tmp_path / "nli.csv"
    run_once = functools.partial(train_stage1, tmp_path, tiny_path, run, "--max-steps", "1",
                                 cache=False)
    run_once()
    original = data.read_bytes()
    lines = original.decode().splitlines()
    data.write_text("\n".join([lines[0]] + [ln.replace("circle", "ring") for ln in lines[1:]]))
    with pytest.raises(SystemExit, match=rf"--resume: the data changed since .*checkpoint.pt "
                                         rf"was written: {data}; restore"):
        run_once("--resume")
    data.write_text("\n".join(lines[:-10]))  # ten rows removed
    with pytest.raises(SystemExit, match=rf"was written: {data}; restore"):
        run_once("--resume")
    data.write_bytes(original)  # restored: resumes
    run_once("--resume")


# ---------------------------------------------------------------- own files only: train.py

def claim_args(out, model=None, **kw):
    return dict(out=str(out), model=model, resume=False, overwrite=True, **kw)


def claim(out, **kw):
    from argparse import Namespace
    with runs.claimed(Namespace(**claim_args(out, **kw))):
        pass


def test_overwrite_refuses_another_tools_checkpoint_and_log(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"model": torch.zeros(2)}, out / "checkpoint.pt")
    (out / "log.jsonl").write_text("epoch 1 done\n")
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    with pytest.raises(SystemExit, match=r"is not empty and holds no run of train.py"):
        claim(out)
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before


def test_a_symlinked_lock_is_refused_and_the_file_it_points_to_kept(tmp_path):
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    (tmp_path / "run").mkdir()
    os.symlink(outside, tmp_path / "run" / ".lock")
    with pytest.raises(SystemExit, match=r"\.lock is a symbolic link, not a run's lock"):
        claim(tmp_path / "run")
    assert outside.read_text() == "keep me"
    os.remove(tmp_path / "run" / ".lock")
    os.link(outside, tmp_path / "run" / ".lock")
    with pytest.raises(SystemExit, match=r"\.lock is hard-linked to another file"):
        claim(tmp_path / "run")
    assert outside.read_text() == "keep me"


@pytest.mark.slow
def test_overwrite_replaces_only_files_a_run_wrote_never_through_a_link(stage1, tmp_path,
                                                                        pretrained_path):
    run = tmp_path / "run"
    shutil.copytree(stage1["run"], run)
    (run / "results.json").write_text("{}")  # the user's: no run writes that name
    outside = tmp_path / "elsewhere.pt"
    shutil.move(run / "checkpoint.pt", outside)
    os.symlink(outside, run / "checkpoint.pt")
    kept = outside.read_bytes()
    with pytest.raises(SystemExit, match=r"checkpoint.pt not written by a run of train.py "
                                         r"\(not in its run-files.json, or a symbolic link\)"):
        train_stage1(stage1["tmp"], pretrained_path, run, "--overwrite")
    assert outside.read_bytes() == kept
    os.remove(run / "checkpoint.pt")
    (run / "config.json").write_text("{}")  # a full fine-tune would write a config.json
    with pytest.raises(SystemExit, match=r"config.json, results.json not written by a run"):
        claim(run, lora_r=0)
    assert (run / "config.json").read_text() == "{}"
    os.remove(run / "config.json")
    train_stage1(stage1["tmp"], pretrained_path, run, "--overwrite")
    assert (run / "results.json").read_text() == "{}"  # left alone
    assert json.loads((run / "run-files.json").read_text())["files"] == [
        "adapter.pt", "checkpoint.pt", "log.jsonl", "unime.json"]


@pytest.mark.slow
def test_a_folder_without_the_record_is_not_a_run(stage1, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stage1["run"], run)
    os.remove(run / "run-files.json")  # whose files these are, nothing says any more
    before = {f: (run / f).read_bytes() for f in os.listdir(run)}
    with pytest.raises(SystemExit, match=r"--out .*run is not empty and holds no run of train"):
        claim(run)
    assert {f: (run / f).read_bytes() for f in os.listdir(run)} == before


# ---------------------------------------------------------------- own files only: export.py

@pytest.mark.slow
def test_export_overwrite_refuses_files_it_did_not_write_at_any_depth(stage1, tmp_path):
    from test_export import stage_run
    s2 = stage_run(tmp_path, 2, stage1["run"], tmp_path / "s2")
    out = tmp_path / "export"
    export.main([s2, str(out)])
    export.main([s2, str(out), "--overwrite"])  # only its own files: replaced
    for extra in ("adapter/my_results.json", "adapter-base/extra/keep.txt"):
        os.makedirs(os.path.dirname(out / extra), exist_ok=True)
        (out / extra).write_text("mine")
        with pytest.raises(SystemExit, match=rf"holds files no export wrote \({extra}\)"):
            export.main([s2, str(out), "--overwrite"])
        assert (out / extra).read_text() == "mine"
        os.remove(out / extra)
    os.rmdir(out / "adapter-base" / "extra")
    os.symlink(tmp_path / "s2" / "adapter.pt", out / "adapter" / "linked.pt")
    with pytest.raises(SystemExit, match=r"holds files no export wrote \(adapter/linked.pt"):
        export.main([s2, str(out), "--overwrite"])
    os.remove(out / "adapter" / "linked.pt")
    os.remove(out / "export.json")  # nothing says which files an export wrote: none replaced
    with pytest.raises(SystemExit, match=r"is not one \(no export.json\)"):
        export.main([s2, str(out), "--overwrite"])