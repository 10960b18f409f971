"""experiments/ablate.py (the paper's ablation tables over seeds) and the toy setting it adds for Table 4.

    pytest -q tests/test_ablate.py       # the helpers in a second; the end-to-end grid is `slow`
"""
import functools
import json
import math
import os
import random

import pytest

from experiments import ablate
from toy import shapes
import toy.default
import toy.benchmark

SCENES = shapes.split_scenes(0)["train"]


# ---------------------------------------------------------------- mean ± std and the table

def test_mean_std_of_three_hand_values_uses_n_minus_1():
    # 1, 2, 4: mean 7/3; squared deviations 16/9 + 1/9 + 25/9 = 42/9, over n - 1 = 2: 7/3
    mean, std = ablate.mean_std([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3)
    assert std == pytest.approx(math.sqrt(7 / 3))
    assert ablate.mean_std([5.0]) == (5.0, None)  # one seed: no spread to report


def test_cells_print_mean_and_std_to_one_decimal_or_the_mean_alone():
    assert ablate.cell([1.0, 2.0, 4.0]) == "2.3 ± 1.5"
    assert ablate.cell([80.0, 80.0, 80.0]) == "80.0 ± 0.0"
    assert ablate.cell([61.25]) == "61.2"


def test_difference_is_starred_only_beyond_the_sum_of_both_spreads():
    # means 11 and 2, stds 1 and 1: 9 > 2
    assert ablate.difference([10.0, 11.0, 12.0], [1.0, 2.0, 3.0]) == "+9.0*"
    # means 2 and 3.5, stds 1 and 1.5: 1.5 < 2.5
    assert ablate.difference([1.0, 2.0, 3.0], [2.0, 3.5, 5.0]) == "-1.5"
    assert ablate.difference([10.0], [1.0]) == "+9.0"  # no spread, no claim


def test_table_cells_hold_each_rows_mean_std_and_the_named_differences():
    results = {"a": {"x": [1.0, 2.0, 4.0], "y": [10.0, 10.0, 10.0]},
               "b": {"x": [10.0, 11.0, 12.0], "y": [9.0, 10.0, 11.0]}}
    means, diffs = ablate.tables(results, [("b", "a")])
    assert means.splitlines() == ["| setting | x | y |", "|---|---|---|",
                                  "| a | 2.3 ± 1.5 | 10.0 ± 0.0 |",
                                  "| b | 11.0 ± 1.0 | 10.0 ± 1.0 |"]
    # x: 11 - 7/3 = 8.7 > 1.5 + 1.0; y: 0 is not
    assert diffs.splitlines()[2] == "| b − a | +8.7* | +0.0 |"


def test_every_table_compares_rows_that_exist_and_k_all_is_batch_minus_1():
    for table in ("stages", "beta", "k", "losses"):
        names = [r[1] for r in ablate.rows_of(table, 64)]
        assert len(names) == len(set(names))
        for a, b in ablate.comparisons(table, names):
            assert a in names and b in names
    assert [r[1] for r in ablate.rows_of("k", 64)] == ["k1", "k4", ablate.PAPER, "k16", "k63"]
    # the paper's setting is one run, whichever table asks for it
    paper = [r[1:] for table in ("stages", "k", "losses") for r in ablate.rows_of(table, 64)
             if r[1] == ablate.PAPER]
    assert paper == [(ablate.PAPER, "", [])] * 3
    beta = ablate.rows_of("beta", 64)
    assert [r[3][1] for r in beta] == ["-0.1", "0", "0.1", "0.3", "inf"]
    assert all("--toy-duplicates" in r[3] for r in beta)  # the filter needs something to do


@pytest.mark.parametrize("left, passed", [([], []), (["log.jsonl"], ["--overwrite"]),
                                          (["log.jsonl", "checkpoint.pt"], ["--resume"])])
def test_an_interrupted_run_is_continued_not_deleted(tmp_path, monkeypatch, left, passed):
    out = tmp_path / "run"
    out.mkdir()
    for name in left:  # what a run killed before (or after) its first checkpoint leaves
        (out / name).write_text("")
    calls = []
    monkeypatch.setattr(ablate.train, "main",
                        lambda argv: calls.append(argv) or {"after": {"x": 1.0}})
    record = ablate.train_once(str(out), ["--stage", "2"])
    assert calls == [["--stage", "2", "--out", str(out)] + passed]
    assert record["after"] == {"x": 1.0} and sorted(os.listdir(out)) == sorted(left)
    assert ablate.train_once(str(out), ["--stage", "2"]) == record  # from <out>.json now
    assert len(calls) == 1


def test_a_finished_run_without_its_record_is_not_trained_again(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "unime.json").write_text("{}")
    monkeypatch.setattr(ablate.train, "main", lambda argv: pytest.fail("trained again"))
    assert ablate.train_once(str(out), ["--stage", "2"])["after"] == {}  # scored from disk


# ---------------------------------------------------------------- the toy's duplicates

def shuffled_ids(n, seed=0):
    # row ids in a shuffled order, as train.py's batches have them
    return random.Random(seed).sample(range(len(toy.default.TASKS) * len(SCENES)), n)


def scenes_and_tasks(monkeypatch, duplicates, ids):
    # stage2_rows with each row replaced by the (scene, task) it was drawn from
    with monkeypatch.context() as m:
        m.setattr(toy.default, "stage2_row", lambda scene, task, rng, image=None: (scene, task))
        return toy.default.stage2_rows(SCENES, ids, seed=7, train_scenes=set(SCENES),
                               duplicates=duplicates)


@pytest.mark.parametrize("share", [0.25, 0.5])
def test_toy_duplicates_repeat_the_row_before_in_about_that_share_of_rows(monkeypatch, share):
    rows = scenes_and_tasks(monkeypatch, share, shuffled_ids(3000))
    repeats = sum(rows[j] == rows[j - 1] for j in range(1, len(rows))) / (len(rows) - 1)
    assert abs(repeats - share) < 0.03  # 3,000 draws: the binomial std is under 0.01


def test_without_duplicates_no_row_repeats_the_one_before(monkeypatch):
    rows = scenes_and_tasks(monkeypatch, 0.0, shuffled_ids(3000))
    assert sum(rows[j] == rows[j - 1] for j in range(1, len(rows))) <= 3  # chance only


def test_duplicated_rows_are_drawn_anew_from_their_own_seed(monkeypatch):
    ids = shuffled_ids(600, seed=1)
    drawn_from = scenes_and_tasks(monkeypatch, 0.5, ids)
    twins = [j for j in range(1, len(ids)) if drawn_from[j] == drawn_from[j - 1]]
    rows = toy.default.stage2_rows(SCENES, ids, seed=7, train_scenes=set(SCENES), duplicates=0.5)
    images = [r["qry_image"] or r["pos_image"] for r in rows]
    # the same scene drawn again moves each object by 1-3 pixels: rarely the same pixel grid
    same = sum(images[j].tobytes() == images[j - 1].tobytes() for j in twins)
    assert len(twins) > 200 and same < 0.1 * len(twins)


# ---------------------------------------------------------------- one command, end to end

@pytest.mark.slow
def test_k_grid_runs_scores_reuses_its_runs_and_refuses_another_budget(tmp_path, capsys,
                                                                      monkeypatch):
    # a smaller held-out benchmark: this is the grid's plumbing, toy.benchmark is tested apart
    monkeypatch.setattr(toy.benchmark, "score", functools.partial(toy.benchmark.score, n=20,
                                                            n_candidates=5))
    argv = ["k", "--seeds", "0", "--steps", "2", "--stage1-steps", "2", "--batch-size", "4",
            "--root", str(tmp_path)]
    results = ablate.main(argv)  # k = 1 and k = 3 = batch - 1
    assert list(results) == ["k = 1", "k = 3 (all)"]
    for row in results.values():
        assert len(row["MMEB-style hit@1"]) == 1 and 0 <= row["compositional"][0] <= 100
    printed = capsys.readouterr().out
    assert "| k = 1 |" in printed and "| k = 3 (all) − k = 1 |" in printed
    saved = json.load(open(tmp_path / "k.json"))
    assert saved["results"] == results and saved["budget"]["steps"] == 2
    assert sorted(os.listdir(tmp_path / "k")) == ["k1-s0", "k1-s0.json", "k3-s0", "k3-s0.json"]
    # a second call trains nothing and prints the same table
    stamp = {f: os.path.getmtime(tmp_path / "k" / f / "unime.json") for f in ("k1-s0", "k3-s0")}
    assert ablate.main(argv) == results
    assert stamp == {f: os.path.getmtime(tmp_path / "k" / f / "unime.json") for f in stamp}
    with pytest.raises(SystemExit, match="choose another --root"):
        ablate.main(argv[:4] + ["3"] + argv[5:])  # 3 steps into the 2-step runs' folders
