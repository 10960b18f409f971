"""experiments/ablate.py (the paper's ablation tables over seeds, paired differences with t
intervals, the A/A pair) and the toy setting it adds for Table 4.

    pytest -q tests/test_ablate.py       # the helpers in seconds; end-to-end runs are `slow`
"""
import functools
import json
import math
import os
import random

import pytest
import torch

import config
import train
from conftest import unit
from experiments import ablate, stats
from toy import shapes
import toy.default
import toy.benchmark

SCENES = shapes.split_scenes(0)["train"]
TABLES = ("stages", "beta", "k", "losses")


# ---------------------------------------------------------------- mean ± std, t, paired intervals

def test_mean_std_of_three_hand_values_uses_n_minus_1():
    # 1, 2, 4: mean 7/3; squared deviations 16/9 + 1/9 + 25/9 = 42/9, over n - 1 = 2: 7/3
    mean, std = stats.mean_std([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3)
    assert std == pytest.approx(math.sqrt(7 / 3))
    assert stats.mean_std([5.0]) == (5.0, None)  # one seed: no spread to report


def test_cells_print_mean_and_std_to_one_decimal_or_the_mean_alone():
    assert stats.cell([1.0, 2.0, 4.0]) == "2.3 ± 1.5"
    assert stats.cell([80.0, 80.0, 80.0]) == "80.0 ± 0.0"
    assert stats.cell([61.25]) == "61.2"


def test_t_quantiles_by_hand_and_from_the_printed_table():
    # df 1 is the Cauchy: P(|T| <= t) = 2 atan(t) / π = 0.95 -> t = tan(0.475 π) = 12.7062
    assert stats.t_quantile(0.975, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-9)
    # df 2: P(|T| <= t) = t / √(2 + t²) = 0.95 -> t² = 2 · 0.9025 / 0.0975, t = 4.30265
    assert stats.t_quantile(0.975, 2) == pytest.approx(math.sqrt(2 * 0.9025 / 0.0975), rel=1e-9)
    # the rest against a printed t table (two-sided 95%): 3.182, 2.776 (5 seeds), 2.262, 2.042
    for df, printed in ((3, 3.182), (4, 2.776), (9, 2.262), (30, 2.042)):
        assert stats.t_quantile(0.975, df) == pytest.approx(printed, abs=6e-4)


def test_paired_interval_of_a_hand_computed_example_excludes_0():
    # a = 3, 5, 4 and b = 1, 2, 2 over three seeds: differences 2, 3, 2, mean 7/3; deviations
    # -1/3, 2/3, -1/3, squares 6/9 in all, over n - 1 = 2: variance 1/3, sd 1/√3, standard error
    # sd/√3 = 1/3; t(0.975, 2 df) = 4.30265 (above), so the half-width is 4.30265 / 3 = 1.43422
    # and the interval [0.899, 3.768] excludes 0: an effect, printed in bold
    mean, half = stats.paired([3.0, 5.0, 4.0], [1.0, 2.0, 2.0])
    assert mean == pytest.approx(7 / 3) and half == pytest.approx(1.43422, abs=1e-5)
    assert stats.difference([3.0, 5.0, 4.0], [1.0, 2.0, 2.0]) == "**+2.3 ± 1.4**"


def test_paired_interval_that_includes_0_is_no_effect():
    # a = 1, 3, 2 and b = 2, 1, 1: differences -1, 2, 1, mean 2/3; deviations -5/3, 4/3, 1/3,
    # squares 42/9, variance 7/3, sd 1.52753, standard error 0.88192, half-width 4.30265 ·
    # 0.88192 = 3.79458: the interval [-3.13, 4.46] holds 0, so no bold
    mean, half = stats.paired([1.0, 3.0, 2.0], [2.0, 1.0, 1.0])
    assert mean == pytest.approx(2 / 3) and half == pytest.approx(3.79458, abs=1e-5)
    assert stats.difference([1.0, 3.0, 2.0], [2.0, 1.0, 1.0]) == "+0.7 ± 3.8"


def test_pairing_is_by_seed_not_by_the_rows_spreads():
    # each seed 1 point apart, the seeds 10 apart: paired, a sure effect (differences all 1,
    # half-width 0); the old "difference > both stds added" rule saw 1 < 20 and said nothing
    assert stats.difference([10.0, 20.0, 30.0], [9.0, 19.0, 29.0]) == "**+1.0 ± 0.0**"
    # the same values in another seed order are other pairs: differences -19, 1, 21
    assert not stats.difference([10.0, 20.0, 30.0], [29.0, 19.0, 9.0]).startswith("**")
    assert stats.difference([10.0], [1.0]) == "+9.0"  # one seed: no interval, no claim
    assert stats.difference([4.0, 5.0], [4.0, 5.0]) == "+0.0 ± 0.0"  # 0 in [0, 0]: no effect
    with pytest.raises(ValueError, match="one value per seed"):
        stats.paired([1.0, 2.0], [1.0])


def test_quickstart_spread_is_seed_0_mean_sd_and_range():
    # 89, 84, 86: mean 86.33, deviations 2.67, -2.33, -0.33, squares 7.11 + 5.44 + 0.11 =
    # 12.67, over 2: 6.33, sd 2.52
    assert stats.spread([89.0, 84.0, 86.0]) == ("89.0", "86.3 ± 2.5", "84.0–89.0")
    assert stats.spread([0.961, 0.962, 0.960]) == ("0.961", "0.961 ± 0.001", "0.960–0.962")


def test_table_cells_hold_each_rows_mean_std_and_the_paired_differences():
    results = {"a": {"x": [1.0, 2.0, 4.0], "y": [10.0, 10.0, 10.0]},
               "b": {"x": [10.0, 11.0, 12.0], "y": [9.0, 10.0, 11.0]}}
    means, diffs = ablate.tables(results, [("b", "a")])
    assert means.splitlines() == ["| setting | x | y |", "|---|---|---|",
                                  "| a | 2.3 ± 1.5 | 10.0 ± 0.0 |",
                                  "| b | 11.0 ± 1.0 | 10.0 ± 1.0 |"]
    # x: differences 9, 9, 8: mean 8.67, sd 0.577, half-width 4.30265 · 0.577 / √3 = 1.43;
    # y: -1, 0, 1: mean 0, half-width 4.30265 · 1 / √3 = 2.48. The first pair is the A/A one
    assert diffs.splitlines()[2] == "| A/A, noise only: b − a | **+8.7 ± 1.4** | +0.0 ± 2.5 |"


# ---------------------------------------------------------------- the tables' rows and pairs

def test_every_table_compares_rows_that_exist_and_k_runs_the_papers_4_to_all():
    for table in TABLES:
        names = [r[1] for r in ablate.rows_of(table, 64)]
        assert len(set(names)) == len(names)
        for a, b in ablate.comparisons(table, names):
            assert a in names and b in names and a != b
    assert [r[1] for r in ablate.rows_of("k", 64)] == [
        "k4", ablate.PAPER, "k16", "k32", "k/k63", "losses/masked-infonce"]
    # against the paper's k = 8: k = 4, 16, 32 and all (Table 5's 64); the whole batch against
    # Eq. 4 in the losses table; each A/A partner once more in its own pair
    k = ablate.comparisons("k", [r[1] for r in ablate.rows_of("k", 64)])
    assert k[1:] == [("k4", ablate.PAPER), ("k16", ablate.PAPER), ("k32", ablate.PAPER),
                     ("k/k63", ablate.PAPER)]
    losses = ablate.comparisons("losses", [r[1] for r in ablate.rows_of("losses", 64)])
    assert ("losses/masked-infonce", ablate.PAPER) in losses
    assert ("k/k63", ablate.PAPER) not in losses and len(losses) == 6
    # the paper's setting is one run, whichever table asks for it
    paper = [r[1:] for table in ("stages", "k", "losses") for r in ablate.rows_of(table, 64)
             if r[1] == ablate.PAPER]
    assert paper == [(ablate.PAPER, "", [])] * 3
    beta = ablate.rows_of("beta", 64)
    assert [r[3][1] for r in beta[:-2]] == ["-0.1", "0", "0.1", "0.2", "0.3", "inf"]
    assert all("--toy-duplicates" in r[3] for r in beta)  # the filter needs something to do


def test_llave_row_is_llaves_loss_both_directions_without_a_mask():
    row = next(r for r in ablate.rows_of("losses", 64) if "LLaVE" in r[0])
    args = config.resolve(config.parse_args(["--stage", "2"] + row[3]))
    assert (args.loss, args.alpha, args.beta) == ("hardness-weighted", 9.0, float("inf"))


@pytest.mark.parametrize("table", TABLES)
def test_every_table_holds_the_a_a_pair_and_compares_it_first(table):
    rows = ablate.rows_of(table, 64)
    pair = ablate.comparisons(table, [r[1] for r in rows])[0]
    flags = {r[1]: r[3] for r in rows}
    assert flags[pair[1]][:2] == ["--k", "63"] and flags[pair[0]][:2] == ["--loss",
                                                                          "masked-infonce"]
    assert flags[pair[0]][2:] == flags[pair[1]][2:]  # the rest (the β table's batches) alike


@pytest.mark.parametrize("table", TABLES)
def test_rows_of_one_seed_pair_on_seed_stage1_output_budget_and_data(table):
    # what makes a difference paired: for a seed, every stage-2 run of the table has the same
    # --seed (data rows and their order: train.batch_rows, toy.default.setup), the same start
    # (the shared stage-1 output unless the row is about stage 1) and the same budget; only
    # the row's own flags differ
    budget = dict(ablate.BUDGET)
    for seed in (0, 3):
        runs = [(r, ablate.stage2_run("root", table, r, seed, budget, "cpu"))
                for r in ablate.rows_of(table, 64)]
        common = set()
        for row, run in runs:
            if run is None:
                continue
            argv = run[1]
            flags = argv[:len(argv) - len(row[3])]
            assert argv[len(flags):] == row[3]
            init = flags[flags.index("--init") + 1]
            assert init == ("base" if row[2] is None else
                            ablate.stage1_run("root", row[2], seed, budget, "cpu")[0])
            assert flags[flags.index("--seed") + 1] == str(seed)
            common.add(tuple(f for f in flags if f != init))
        assert len(common) == 1  # step count, batch, seed, logging: one set for all rows


@pytest.mark.parametrize("table", ("stages", "beta"))
def test_a_a_pair_flags_train_one_objective_equal_loss_and_gradient(table, monkeypatch):
    # the pair's own command lines, through config and train.stage_loss, on a batch whose β
    # mask fires: the same loss and the same gradient at every embedding
    rows = ablate.rows_of(table, 16)
    b, a = ablate.comparisons(table, [r[1] for r in rows])[0]
    flags = {r[1]: r[3] for r in rows}
    q, c = unit(16, 8, seed=1), unit(16, 8, seed=2)
    c[1] = q[0]  # candidate 1 is closer to query 0 than its positive: a false negative
    got = []
    for name in (a, b):
        args = config.resolve(config.parse_args(["--stage", "2"] + flags[name]))
        qq, cc = q.clone().requires_grad_(), c.clone().requires_grad_()
        reps = {"qry": qq, "pos": cc}
        monkeypatch.setattr(train, "gradcache_embed", lambda *a, reps=reps: (reps, None))
        monkeypatch.setattr(train, "gradcache_backward", lambda *a: None)
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
        loss, _, stats_ = train.train_step(args, 0, None, opt, {"sides": {}}, None, None, 1,
                                           "cpu", None)  # the training step's own loss
        got.append((loss, qq.grad, cc.grad, stats_["false_negative_share"]))
    (la, qa, ca, fa), (lb, qb, cb, fb) = got
    assert fa == fb > 0  # the mask removed something, in both
    assert la == pytest.approx(lb, rel=1e-12)
    torch.testing.assert_close(qa, qb, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ca, cb, rtol=1e-9, atol=1e-12)


def test_seeds_twice_or_no_jobs_are_refused():
    with pytest.raises(SystemExit, match="a seed twice"):
        ablate.main(["k", "--seeds", "0", "0"])
    with pytest.raises(SystemExit, match="--jobs"):
        ablate.main(["k", "--jobs", "0"])


# ---------------------------------------------------------------- runs, reused when finished

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

def log_losses(path):
    return [json.loads(x)["loss"] for x in open(os.path.join(path, "log.jsonl")) if x.strip()]


@pytest.mark.slow
def test_k_grid_cells_are_the_runs_own_scores_the_a_a_pair_starts_equal_and_runs_are_reused(
        tmp_path, capsys, monkeypatch):
    # a smaller held-out benchmark: this is the grid's plumbing, toy.benchmark is tested apart
    small = functools.partial(toy.benchmark.score, n=20, n_candidates=5)
    monkeypatch.setattr(toy.benchmark, "score", small)
    argv = ["k", "--seeds", "0", "1", "--steps", "2", "--stage1-steps", "2", "--batch-size", "8",
            "--root", str(tmp_path)]
    results = ablate.main(argv)  # k = 4, and the A/A pair: k = 7 = batch - 1, the whole batch
    aa_k, aa_whole = "Eq. 4, k = 7 (all; A/A)", ablate.WHOLE_BATCH
    assert list(results) == ["k = 4", aa_k, aa_whole]
    folders = {"k = 4": "k/k4", aa_k: "k/k7", aa_whole: "losses/masked-infonce"}
    import eval as ev
    import stages
    for label, folder in folders.items():
        for i, seed in enumerate((0, 1)):
            out = tmp_path / f"{folder}-s{seed}"
            # each cell is that run's model scored anew, and its logged false-negative share
            model, processor, family = stages.load_embedder(str(out), "cpu")
            scores = small(ev.make_encoder(model.eval(), processor, family, device="cpu"))
            for metric in ablate.METRICS:
                assert results[label][metric][i] == pytest.approx(scores[metric], abs=1e-9)
            share = [json.loads(x)["false_negative_share"] for x in open(out / "log.jsonl")]
            assert results[label]["false-negative share"][i] == pytest.approx(
                100 * sum(share) / len(share))
    # the A/A pair: one objective, so the same loss at step 1 for each seed
    for seed in (0, 1):
        k_all = log_losses(tmp_path / f"k/k7-s{seed}")
        whole = log_losses(tmp_path / f"losses/masked-infonce-s{seed}")
        assert k_all[0] == pytest.approx(whole[0], abs=1e-6)
    printed = capsys.readouterr().out
    assert f"| A/A, noise only: {aa_whole} − {aa_k} |" in printed
    saved = json.load(open(tmp_path / "k.json"))
    assert saved["results"] == results and saved["budget"]["steps"] == 2
    assert set(saved["differences"]) == {f"{aa_whole} − {aa_k}", f"{aa_k} − k = 4"}
    assert saved["runs"][str(tmp_path / "k/k7-s0")]["cpu_s"] > 0  # each run's cost is kept
    # a second call trains nothing and prints the same table
    stamp = {f: os.path.getmtime(tmp_path / f"{f}-s0" / "unime.json") for f in folders.values()}
    assert ablate.main(argv) == results
    assert stamp == {f: os.path.getmtime(tmp_path / f"{f}-s0" / "unime.json") for f in stamp}
    with pytest.raises(SystemExit, match="choose another --root"):
        ablate.main(argv[:5] + ["3"] + argv[6:])  # 3 steps into the 2-step runs' folders


@pytest.mark.slow
def test_parallel_runs_each_log_to_their_own_file_and_a_failure_names_its_run(tmp_path):
    # two runs in two processes whose command lines train.py refuses: both are reported by
    # folder, each one's message is in its own <run>.log, and nothing is recorded as finished
    runs = [(str(tmp_path / name), ["--stage", "2", "--k", "2", "--loss", loss])
            for name, loss in (("a", "masked-infonce"), ("b", "hardness-weighted"))]
    with pytest.raises(SystemExit) as failed:
        ablate.train_all(runs, jobs=2)
    for out, argv in runs:
        assert f"{out}: SystemExit" in str(failed.value)
        assert "--k does not apply to --loss " + argv[-1] in open(out + ".log").read()
        assert not os.path.exists(out + ".json")
