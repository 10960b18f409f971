"""The paper's ablations on the toy, one command per table, each over five seeds.

  python -m experiments.ablate stages       # Table 3 in shape: no / stage 1 / stage 2 / both
  python -m experiments.ablate beta         # Table 4: β, with the false-negative share
  python -m experiments.ablate k            # Table 5: k hard negatives per query
  python -m experiments.ablate losses       # Eq. 4 next to losses that are NOT UniME
  python -m experiments.ablate quickstart   # the Quickstart's two commands, per seed
  (--seeds 0 1 2 for a quick look; --jobs 2 trains two runs at once, one thread each)

Each run is train.py's toy (train.main) with its own --out, runs/ablate/<table>/<row>-s<seed>,
scored on the toy's held-out benchmark (toy.benchmark). Stage 2 starts from one stage-1 output
per seed, runs/ablate/stage1-s<seed>, shared by every table, and a run that two tables hold
(the paper's setting, runs/ablate/stages/both-s<seed>; the A/A pair) is trained once. A finished
run is reused and an interrupted one resumed (nothing is deleted), so a killed grid continues
where it stopped; run the tables one after another (a run's folder is locked while it trains).

Differences are paired: two rows of one seed start from the same stage-1 output and see the same
rows in the same order (train.py draws the toy's data and its order from --seed), so each seed
gives one difference. A table prints their mean over seeds ± the half-width of its 95% interval
(t distribution, seeds - 1 degrees of freedom), in bold only when the interval excludes 0.
Every table holds an A/A pair, two runs under two names that train one objective: Eq. 4 with
k = batch - 1 (every negative the β mask leaves) and the whole-batch loss with the same mask
(equal losses, gradients equal up to rounding). Their difference is noise only, the floor that
any other difference in the table has to clear. Writes runs/ablate/<table>.json.

Shorter runs than `python train.py --stage 2` (1,600 steps) keep the grids to hours on 2 CPU
cores: --steps sets the stage-2 budget, --stage1-steps stage 1's. `quickstart` runs the
Quickstart's own commands, `train.py --stage 1 --seed S` then `--stage 2 --init` its output,
under runs/quick/, and prints seed 0, mean ± sd and min-max of every held-out number.
"""
import argparse
import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import time

import torch

import eval as ev
import stages
from experiments.stats import cell, difference, paired, spread
import toy.default
import toy.benchmark
import train

METRICS = ("MMEB-style hit@1", "t2i R@1", "i2t R@1", "unseen t2i R@1", "unseen i2t R@1",
           "compositional", "t2t R@1")
BUDGET = dict(steps=600, stage1_steps=300, batch_size=64)  # see the module docstring
SEEDS = [0, 1, 2, 3, 4]
DUPLICATES = 0.25  # the β table's share of duplicated rows (toy.default.stage2_rows)
PAPER = "stages/both"  # the paper's setting (k = 8, β = 0.1, Eq. 4): one run per seed, shared
WHOLE_BATCH = "NOT UniME: whole batch, β = 0.1 mask (A/A)"


# ---------------------------------------------------------------- the tables

def a_a_rows(batch_size, duplicates=()):
    """The A/A pair: Eq. 4 keeping all batch - 1 negatives, and the whole-batch loss, both with
    the β = 0.1 mask. The same objective under two names (test_ablate proves equal losses)."""
    # the stages, k and losses tables share one pair; the β table's trains on its own batches
    k_all, whole = ("beta/k", "beta/") if duplicates else ("k/k", "losses/")
    return [(f"Eq. 4, k = {batch_size - 1} (all; A/A)", f"{k_all}{batch_size - 1}", "",
             ["--k", str(batch_size - 1)] + list(duplicates)),
            (WHOLE_BATCH, whole + "masked-infonce", "",
             ["--loss", "masked-infonce"] + list(duplicates))]


def rows_of(table, batch_size):
    """A table's rows: (label, name, stage 1, stage-2 flags). The run's folder is
    <table>/<name>-s<seed>, or <name>-s<seed> when the name holds a folder (PAPER, the A/A
    pair). Stage 1 None: stage 2 starts from the pretrained toy (--init base); "": from the
    shared stage-1 output; else its --kd-direction. Stage-2 flags None: no stage 2, the row
    scores its starting model."""
    if table == "stages":  # Table 3
        return [("none (the pretrained toy)", "none", None, None),
                ("stage 1 only", "stage1", "", None),
                ("stage 2 only", "stage2", None, []),
                ("stage 1 + stage 2", PAPER, "", [])] + a_a_rows(batch_size)
    if table == "beta":  # Table 4, on batches that hold duplicates (see DUPLICATES)
        dup = ["--toy-duplicates", str(DUPLICATES)]
        return [(f"β = {b}".replace("inf", "∞ (no filter)"), f"beta{b}", "",
                 ["--beta", b] + dup) for b in ("-0.1", "0", "0.1", "0.2", "0.3", "inf")
                ] + a_a_rows(batch_size, dup)
    if table == "k":  # Table 5 (k = 4 to 64); k = batch - 1 takes every negative the mask leaves
        return [(f"k = {k}", PAPER if k == 8 else f"k{k}", "", [] if k == 8 else ["--k", str(k)])
                for k in (4, 8, 16, 32) if k < batch_size - 1] + a_a_rows(batch_size)
    if table == "losses":  # Eq. 4 and the losses the field uses instead (hardneg.py)
        return [("UniME Eq. 4: top-8 hard negatives, β = 0.1", PAPER, "", []),
                ("NOT UniME: whole batch, no mask (VLM2Vec)", "infonce", "",
                 ["--loss", "masked-infonce", "--beta", "inf"]),
                ("NOT UniME: LLaVE, hardness-weighted α = 9, both directions, no mask",
                 "llave", "", ["--loss", "hardness-weighted"]),
                ("stage 1 KL symmetric (UniME-V2), then Eq. 4", "kd-symmetric",
                 "symmetric", []),
                ("stage 1 KL(P_s ‖ P_t) (the printed Eq. 2), then Eq. 4", "kd-student-teacher",
                 "student-teacher", [])] + a_a_rows(batch_size)
    raise ValueError(f"no table {table!r}")


def comparisons(table, names):
    """(row, row it is compared with) by name: the A/A pair first, then the paper's claims for
    Table 3, else the other rows against the paper's setting (β = 0.1, k = 8, Eq. 4): in the k
    table k = all too, in the losses table the whole batch too."""
    a_a = [(names[-1], names[-2])]  # whole batch - Eq. 4 with k = all
    if table == "stages":
        return a_a + [("stage1", "none"), ("stage2", "none"), (PAPER, "stage2"),
                      (PAPER, "stage1")]
    reference = "beta0.1" if table == "beta" else PAPER
    reference = reference if reference in names else names[0]  # k = 8 needs a batch of 10
    rows = {"beta": names[:-2], "k": names[:-1], "losses": names[:-2] + names[-1:]}[table]
    return a_a + [(name, reference) for name in rows if name != reference]


# ---------------------------------------------------------------- runs, reused when finished

def score_model(path, result_path, device):
    """toy.benchmark.score of a finished model, kept in result_path (JSON) once computed."""
    if os.path.isfile(result_path):
        return json.load(open(result_path, encoding="utf-8"))
    model, processor, family = stages.load_embedder(path, device)
    scores = toy.benchmark.score(ev.make_encoder(model.eval(), processor, family, device=device))
    stages.save_atomic(result_path, json.dumps({"model": path, "scores": scores}, indent=1))
    return {"model": path, "scores": scores}


def train_once(out, argv):
    """train.main(argv + --out) unless `out` already holds its finished output: --resume
    after a checkpoint, --overwrite when a run died before its first one (it starts over).
    -> {"argv", "before", "after" (train's held-out report, if any), "train_s", "cpu_s"}, kept
    in <out>.json; a second call with other flags for the same folder is refused."""
    record_path = out + ".json"
    if os.path.isfile(record_path):
        record = json.load(open(record_path, encoding="utf-8"))
        if record["argv"] != argv:
            raise SystemExit(f"{out} was trained with {' '.join(record['argv'])}, not "
                             f"{' '.join(argv)}: choose another --root for this budget")
        return record
    present = os.listdir(out) if os.path.isdir(out) else []
    report, train_s, cpu_s = {}, None, None
    if "unime.json" not in present:  # else finished, but stopped before its record was written
        again = (["--resume"] if "checkpoint.pt" in present else
                 ["--overwrite"] if "log.jsonl" in present else [])
        print(f"\n=== {out}: train.py {' '.join(argv + again)}", flush=True)
        t0, c0 = time.time(), time.process_time()
        report = train.main(argv + ["--out", out] + again)
        train_s, cpu_s = round(time.time() - t0, 1), round(time.process_time() - c0, 1)
    record = {"argv": argv, "before": report.get("before", {}), "after": report.get("after", {}),
              "train_s": train_s, "cpu_s": cpu_s}
    stages.save_atomic(record_path, json.dumps(record, indent=1))
    return record


def _train_logged(out, argv):
    """train_once in a pool process, its output in <out>.log instead of interleaved."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".log", "a", encoding="utf-8") as log, \
            contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        return train_once(out, argv)


def train_all(runs, jobs):
    """Train every (out, argv) not finished yet, `jobs` at a time, each in its own process
    with cores / jobs threads; a failed run is named and the others go on. -> the CPU seconds
    of the runs trained here."""
    todo = []
    for out, argv in dict(runs).items():
        if os.path.isfile(out + ".json"):
            train_once(out, argv)  # finished: only checks that these flags trained it
        else:
            todo.append((out, argv))
    if jobs == 1 or len(todo) < 2:
        return sum(train_once(out, argv)["cpu_s"] or 0.0 for out, argv in todo)
    failed, cpu = [], 0.0
    threads = max(1, (os.cpu_count() or 1) // jobs)  # the runs share the cores, not fight
    with concurrent.futures.ProcessPoolExecutor(
            jobs, mp_context=multiprocessing.get_context("spawn"),
            initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        started = {pool.submit(_train_logged, out, argv): out for out, argv in todo}
        print(f"{time.strftime('%H:%M:%S')} training {len(todo)} runs, {jobs} at a time "
              f"(each one's output in <run>.log)", flush=True)
        for future in concurrent.futures.as_completed(started):
            try:
                record = future.result()
            except BaseException as e:  # a run's SystemExit too: say which, keep the rest
                failed.append(f"{started[future]}: {type(e).__name__}: {e}")
                print(f"{time.strftime('%H:%M:%S')} FAILED {failed[-1]}", flush=True)
                continue
            cpu += record["cpu_s"] or 0.0
            print(f"{time.strftime('%H:%M:%S')} done {started[future]} ({record['train_s']} s, "
                  f"CPU {record['cpu_s']} s)", flush=True)
    if failed:
        raise SystemExit("runs that failed (see each <run>.log; the finished ones are kept):\n"
                         + "\n".join(failed))
    return cpu


def stage1_run(root, kd_direction, seed, budget, device):
    """(folder, train.py argv) of the stage-1 output a seed's stage-2 runs start from."""
    out = os.path.join(root, "stage1" + (f"-{kd_direction}" if kd_direction else "") +
                       f"-s{seed}")
    return out, (["--stage", "1", "--max-steps", str(budget["stage1_steps"]),
                  "--save-every", str(max(1, budget["stage1_steps"] // 3)), "--seed", str(seed),
                  "--device", device, "--log-every", "100"] +
                 (["--kd-direction", kd_direction] if kd_direction else []))


def stage2_run(root, table, row, seed, budget, device):
    """(folder, train.py argv) of a row's stage-2 run for a seed, or None (no stage 2)."""
    label, name, stage1, stage2 = row
    if stage2 is None:
        return None
    init = "base" if stage1 is None else stage1_run(root, stage1, seed, budget, device)[0]
    out = os.path.join(root, name if "/" in name else os.path.join(table, name)) + f"-s{seed}"
    return out, ["--stage", "2", "--init", init, "--max-steps", str(budget["steps"]),
                 "--batch-size", str(budget["batch_size"]),
                 "--save-every", str(max(1, budget["steps"] // 4)), "--seed", str(seed),
                 "--device", device, "--log-every", "100"] + stage2


def mean_from_log(out, key):
    """The mean over a run's steps of one logged statistic (log.jsonl)."""
    values = [json.loads(x)[key] for x in open(os.path.join(out, "log.jsonl"), encoding="utf-8")
              if x.strip()]
    return sum(values) / len(values)


def run_row(root, table, row, seed, budget, device):
    """One cell of the grid -> {metric: value} for a row and a seed (trained here if needed)."""
    label, name, stage1, stage2 = row
    if stage1 is not None:
        train_once(*stage1_run(root, stage1, seed, budget, device))
    run = stage2_run(root, table, row, seed, budget, device)
    if run is None:  # the stage-1 output itself, or the pretrained toy
        model = (toy.default.PRETRAINED if stage1 is None else
                 stage1_run(root, stage1, seed, budget, device)[0])
        name = "pretrained" if stage1 is None else os.path.basename(model)
        return score_model(model, os.path.join(root, f"{name}.scores.json"), device)["scores"]
    record = train_once(*run)
    scores = dict(record["after"] or score_model(run[0], run[0] + ".scores.json",
                                                 device)["scores"])
    scores["false-negative share"] = 100 * mean_from_log(run[0], "false_negative_share")
    return scores


# ---------------------------------------------------------------- the tables printed

def tables(results, pairs):
    """results: {label: {column: [value per seed, seeds in one order]}}, pairs: [(label,
    label)] -> (markdown table of mean ± std, markdown table of each pair's paired difference)."""
    columns = list(next(iter(results.values())))
    means = ev.markdown_table(["setting"] + columns, [
        (label, *(cell(row[c]) for c in columns)) for label, row in results.items()])
    diffs = ev.markdown_table(["difference"] + columns, [
        (("A/A, noise only: " if i == 0 else "") + f"{a} − {b}",
         *(difference(results[a][c], results[b][c]) for c in columns))
        for i, (a, b) in enumerate(pairs)])
    return means, diffs


# ---------------------------------------------------------------- the command line

def quickstart(args):
    """The Quickstart's two commands per seed (default budgets) -> {stage: {number: [...]}}."""
    s1 = {s: (os.path.join(args.root, f"s1-{s}"), ["--stage", "1", "--seed", str(s)])
          for s in args.seeds}
    train_all(s1.values(), args.jobs)
    s2 = {s: (os.path.join(args.root, f"s2-{s}"), ["--stage", "2", "--seed", str(s), "--init",
                                                   s1[s][0]]) for s in args.seeds}
    train_all(s2.values(), args.jobs)
    results = {}
    for stage, runs in (("stage 1", s1), ("stage 2", s2)):
        records = [train_once(*runs[s]) for s in args.seeds]
        results[stage] = {f"{key} ({when})": [r[when][key] for r in records]
                          for when in ("before", "after") for key in records[0][when]}
    for stage, numbers in results.items():
        print(f"\n{stage}: seeds {args.seeds}\n\n" + ev.markdown_table(
            ["held-out", f"seed {args.seeds[0]}", "mean ± sd", "min–max"],
            [(key, *spread(v)) for key, v in numbers.items()]))
    M.save_atomic(os.path.join(args.root, "quickstart.json"), json.dumps({
        "seeds": args.seeds, "results": results, "runs": {
            out: {k: train_once(out, argv)[k] for k in ("argv", "train_s", "cpu_s")}
            for runs in (s1, s2) for out, argv in runs.values()}}, indent=1))
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", choices=["stages", "beta", "k", "losses", "quickstart"])
    p.add_argument("--seeds", type=int, nargs="+", default=SEEDS,
                   help="5 for the tables (default); 3 for a quick look")
    p.add_argument("--steps", type=int, default=BUDGET["steps"], help="stage-2 steps per run")
    p.add_argument("--stage1-steps", type=int, default=BUDGET["stage1_steps"])
    p.add_argument("--batch-size", type=int, default=BUDGET["batch_size"], help="stage 2")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once, each in its own "
                   "process with cores / jobs threads (results differ from one thread count "
                   "to another in the last bits, so keep one setting per --root)")
    p.add_argument("--root", help="folder of the runs (default runs/ablate, the quickstart's "
                   "runs/quick; another budget: another root)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(f"--seeds {args.seeds}: a seed twice would pair a run with itself")
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be at least 1, got {args.jobs}")
    t0, c0 = time.time(), time.process_time()
    if args.table == "quickstart":
        args.root = args.root or os.path.join("runs", "quick")
        results = quickstart(args)
        print(f"\nwall time {(time.time() - t0) / 60:.1f} min (runs reused from an earlier call "
              f"count 0)")
        return results
    args.root = args.root or os.path.join("runs", "ablate")
    budget = dict(steps=args.steps, stage1_steps=args.stage1_steps, batch_size=args.batch_size)
    if args.batch_size < 3:
        raise SystemExit("--batch-size must be at least 3: k = all is batch - 1 negatives")
    rows = rows_of(args.table, args.batch_size)
    stage1 = [stage1_run(args.root, r[2], s, budget, args.device) for r in rows
              for s in args.seeds if r[2] is not None]
    cpu = train_all(stage1, args.jobs)
    stage2 = [run for r in rows for s in args.seeds
              if (run := stage2_run(args.root, args.table, r, s, budget, args.device))]
    cpu += train_all(stage2, args.jobs)
    every_run = dict(stage1 + stage2)
    columns = METRICS if args.table == "stages" else ("false-negative share",) + METRICS
    results = {}
    for row in rows:
        scores = [run_row(args.root, args.table, row, seed, budget, args.device)
                for seed in args.seeds]  # in seed order: differences pair by position
        results[row[0]] = {c: [r[c] for r in scores] for c in columns}
    label_of = {r[1]: r[0] for r in rows}
    pairs = [(label_of[a], label_of[b]) for a, b in comparisons(args.table, [r[1] for r in rows])]
    means, diffs = tables(results, pairs)
    wall, cpu = time.time() - t0, cpu + time.process_time() - c0
    print(f"\n{args.table}: seeds {args.seeds}, stage-2 {args.steps} steps of batch "
          f"{args.batch_size}, stage-1 {args.stage1_steps} steps"
          + (f", {DUPLICATES:.0%} of each batch's rows duplicated" if args.table == "beta"
             else "") + "; mean ± standard deviation over seeds, in %\n")
    print(means + "\n\n" + diffs + "\n\nPaired differences: mean over seeds ± the half-width "
          "of its 95% interval (t, seeds - 1 df); bold: the interval excludes 0.\n"
          f"wall time {wall / 60:.1f} min, CPU {cpu / 60:.1f} min (runs reused from an "
          "earlier call count 0)")
    stages.save_atomic(os.path.join(args.root, f"{args.table}.json"), json.dumps({
        "table": args.table, "seeds": args.seeds, "budget": budget, "jobs": args.jobs,
        "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
        "duplicates": DUPLICATES if args.table == "beta" else 0.0, "results": results,
        "runs": {out: {k: train_once(out, argv)[k] for k in ("train_s", "cpu_s")}
                 for out, argv in every_run.items()},  # each run's cost when it was trained
        "differences": {f"{a} − {b}": {c: dict(zip(("mean", "half_width"), paired(
            results[a][c], results[b][c]))) for c in columns} for a, b in pairs}},
        indent=1))
    return results


if __name__ == "__main__":
    main()
