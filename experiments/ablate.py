"""The paper's ablations on the toy, one command per table, each over several seeds.

  python -m experiments.ablate stages --seeds 0 1 2   # Table 3 in shape: no / stage 1 / stage 2 / both
  python -m experiments.ablate beta --seeds 0 1 2     # Table 4: β, with the false-negative share
  python -m experiments.ablate k --seeds 0 1 2        # Table 5: k hard negatives per query
  python -m experiments.ablate losses --seeds 0 1 2   # Eq. 4 next to losses that are NOT UniME

Each run is train.py's toy (train.main) with its own --out, runs/ablate/<table>/<row>-s<seed>,
scored on the toy's held-out benchmark (toy.benchmark). Stage 2 starts from one stage-1 output
per seed, runs/ablate/stage1-s<seed>, shared by every table, and the paper's own setting is one
run per seed for all tables (runs/ablate/stages/both-s<seed>). A finished run is reused and an
interrupted one resumed (nothing is deleted), so a killed grid continues where it stopped; run
the tables one after another (a run's folder is locked while it trains).
Prints a markdown table of mean ± standard deviation over the seeds, then the differences the
table is about (Table 3: the paper's claims; the others: each row minus the paper's setting),
marked * where larger than the spread (the two rows' standard deviations added); writes
runs/ablate/<table>.json.

Shorter runs than `python train.py --stage 2` (1,600 steps) keep a grid of 5 rows x 3 seeds
near half an hour on 2 CPU cores: --steps sets the stage-2 budget, --stage1-steps stage 1's.
"""
import argparse
import json
import math
import os
import time

import torch

import eval as ev
import stages
import toy.default
import toy.benchmark
import train

METRICS = ("MMEB-style hit@1", "t2i R@1", "i2t R@1", "unseen t2i R@1", "unseen i2t R@1",
           "compositional", "t2t R@1")
BUDGET = dict(steps=600, stage1_steps=300, batch_size=64)  # see the module docstring
DUPLICATES = 0.25  # the β table's share of duplicated rows (toy.default.stage2_rows)
PAPER = "stages/both"  # the paper's setting (k = 8, β = 0.1, Eq. 4): one run per seed, shared


# ---------------------------------------------------------------- the tables

def rows_of(table, batch_size):
    """A table's rows: (label, name, stage 1, stage-2 flags). The run's folder is
    <table>/<name>-s<seed>, or <name>-s<seed> when the name holds a folder (PAPER, another
    table's run). Stage 1 None: stage 2 starts from the pretrained toy (--init base); "": from
    the shared stage-1 output; else its --kd-direction. Stage-2 flags None: no stage 2, the row
    scores its starting model."""
    if table == "stages":  # Table 3
        return [("none (the pretrained toy)", "none", None, None),
                ("stage 1 only", "stage1", "", None),
                ("stage 2 only", "stage2", None, []),
                ("stage 1 + stage 2", PAPER, "", [])]
    if table == "beta":  # Table 4, on batches that hold duplicates (see DUPLICATES)
        dup = ["--toy-duplicates", str(DUPLICATES)]
        return [(f"β = {b}".replace("inf", "∞ (no filter)"), f"beta{b}", "",
                 ["--beta", b] + dup) for b in ("-0.1", "0", "0.1", "0.3", "inf")]
    if table == "k":  # Table 5; k = batch - 1 takes every negative the β mask leaves
        ks = [str(k) for k in (1, 4, 8, 16) if k < batch_size - 1] + [str(batch_size - 1)]
        return [(f"k = {k}" + (" (all)" if k == str(batch_size - 1) else ""),
                 PAPER if k == "8" else f"k{k}", "", [] if k == "8" else ["--k", k]) for k in ks]
    if table == "losses":  # Eq. 4 and the losses the field uses instead (hardneg.py)
        return [("UniME Eq. 4: top-8 hard negatives, β = 0.1", PAPER, "", []),
                ("NOT UniME: whole batch, β = 0.1 mask (Qwen3-Embedding)", "masked-infonce",
                 "", ["--loss", "masked-infonce"]),
                ("NOT UniME: whole batch, no mask (VLM2Vec)", "infonce", "",
                 ["--loss", "masked-infonce", "--beta", "inf"]),
                ("NOT UniME: hardness-weighted α = 9, no mask (LLaVE)", "hardness-weighted", "",
                 ["--loss", "hardness-weighted", "--beta", "inf"]),
                ("stage 1 KL symmetric (UniME-V2), then Eq. 4", "kd-symmetric",
                 "symmetric", []),
                ("stage 1 KL(P_s ‖ P_t) (the printed Eq. 2), then Eq. 4", "kd-student-teacher",
                 "student-teacher", [])]
    raise ValueError(f"no table {table!r}")


def comparisons(table, names):
    """(row, row it is compared with) by name: the paper's claims for Table 3, else every row
    against the paper's setting (β = 0.1, k = 8, Eq. 4)."""
    if table == "stages":
        return [("stage1", "none"), ("stage2", "none"), (PAPER, "stage2"), (PAPER, "stage1")]
    reference = "beta0.1" if table == "beta" else PAPER
    reference = reference if reference in names else names[0]  # k = 8 needs a batch of 10
    return [(name, reference) for name in names if name != reference]


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
    -> {"argv", "after" (train's held-out report, if any), "train_s"}, kept in <out>.json; a
    second call with other flags for the same folder is refused."""
    record_path = out + ".json"
    if os.path.isfile(record_path):
        record = json.load(open(record_path, encoding="utf-8"))
        if record["argv"] != argv:
            raise SystemExit(f"{out} was trained with {' '.join(record['argv'])}, not "
                             f"{' '.join(argv)}: choose another --root for this budget")
        return record
    present = os.listdir(out) if os.path.isdir(out) else []
    after, train_s = {}, None
    if "unime.json" not in present:  # else finished, but stopped before its record was written
        again = (["--resume"] if "checkpoint.pt" in present else
                 ["--overwrite"] if "log.jsonl" in present else [])
        print(f"\n=== {out}: train.py {' '.join(argv + again)}", flush=True)
        t0 = time.time()
        after = train.main(argv + ["--out", out] + again)["after"]
        train_s = round(time.time() - t0, 1)
    record = {"argv": argv, "after": after, "train_s": train_s}
    stages.save_atomic(record_path, json.dumps(record, indent=1))
    return record


def mean_from_log(out, key):
    """The mean over a run's steps of one logged statistic (log.jsonl)."""
    values = [json.loads(x)[key] for x in open(os.path.join(out, "log.jsonl"), encoding="utf-8")
              if x.strip()]
    return sum(values) / len(values)


def run_row(root, table, row, seed, budget, device):
    """One cell of the grid -> {metric: value} for a row and a seed."""
    label, name, stage1, stage2 = row
    common = ["--seed", str(seed), "--device", device, "--log-every", "100"]
    init = "base"
    if stage1 is not None:  # the stage-1 output this row starts from, shared by the tables
        init = os.path.join(root, "stage1" + (f"-{stage1}" if stage1 else "") + f"-s{seed}")
        train_once(init, ["--stage", "1", "--max-steps", str(budget["stage1_steps"]),
                          "--save-every", str(max(1, budget["stage1_steps"] // 3))] + common +
                   (["--kd-direction", stage1] if stage1 else []))
    if stage2 is None:  # the stage-1 output itself, or the pretrained toy
        model = toy.default.PRETRAINED if stage1 is None else init
        name = "pretrained" if stage1 is None else os.path.basename(init)
        return score_model(model, os.path.join(root, f"{name}.scores.json"), device)["scores"]
    out = os.path.join(root, name if "/" in name else os.path.join(table, name)) + f"-s{seed}"
    record = train_once(out, ["--stage", "2", "--init", init,
                              "--max-steps", str(budget["steps"]),
                              "--batch-size", str(budget["batch_size"]),
                              "--save-every", str(max(1, budget["steps"] // 4))] + common + stage2)
    scores = dict(record["after"] or score_model(out, out + ".scores.json", device)["scores"])
    scores["false-negative share"] = 100 * mean_from_log(out, "false_negative_share")
    return scores


# ---------------------------------------------------------------- mean ± std and the table

def mean_std(values):
    """(mean, sample standard deviation with n - 1; None for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def cell(values):
    mean, std = mean_std(values)
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def difference(values, reference):
    """Row minus reference in means, with * when larger than the spread (sum of both stds)."""
    (m, s), (m0, s0) = mean_std(values), mean_std(reference)
    larger = s is not None and s0 is not None and abs(m - m0) > s + s0
    return f"{m - m0:+.1f}" + ("*" if larger else "")


def tables(results, pairs):
    """results: {label: {column: [value per seed]}}, pairs: [(label, label)] -> (markdown table
    of mean ± std, markdown table of each pair's difference in means)."""
    columns = list(next(iter(results.values())))
    means = ev.markdown_table(["setting"] + columns, [
        (label, *(cell(row[c]) for c in columns)) for label, row in results.items()])
    diffs = ev.markdown_table(["difference"] + columns, [
        (f"{a} − {b}", *(difference(results[a][c], results[b][c]) for c in columns))
        for a, b in pairs])
    return means, diffs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", choices=["stages", "beta", "k", "losses"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=BUDGET["steps"], help="stage-2 steps per run")
    p.add_argument("--stage1-steps", type=int, default=BUDGET["stage1_steps"])
    p.add_argument("--batch-size", type=int, default=BUDGET["batch_size"], help="stage 2")
    p.add_argument("--root", default=os.path.join("runs", "ablate"),
                   help="folder of the runs (another budget: another root)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    budget = dict(steps=args.steps, stage1_steps=args.stage1_steps, batch_size=args.batch_size)
    if args.batch_size < 3:
        raise SystemExit("--batch-size must be at least 3: k = all is batch - 1 negatives")
    t0, rows = time.time(), rows_of(args.table, args.batch_size)
    columns = METRICS if args.table == "stages" else ("false-negative share",) + METRICS
    results = {}
    for label, name, stage1, stage2 in rows:
        scores = [run_row(args.root, args.table, (label, name, stage1, stage2), seed, budget,
                          args.device) for seed in args.seeds]
        results[label] = {c: [r[c] for r in scores] for c in columns}
    label_of = {r[1]: r[0] for r in rows}
    means, diffs = tables(results, [(label_of[a], label_of[b]) for a, b in
                                    comparisons(args.table, [r[1] for r in rows])])
    wall = time.time() - t0
    print(f"\n{args.table}: seeds {args.seeds}, stage-2 {args.steps} steps of batch "
          f"{args.batch_size}, stage-1 {args.stage1_steps} steps"
          + (f", {DUPLICATES:.0%} of each batch's rows duplicated" if args.table == "beta"
             else "") + "; mean ± standard deviation over seeds, in %\n")
    print(means + "\n\n" + diffs + "\n\n* larger than the spread (the two standard deviations "
          f"added)\nwall time {wall / 60:.1f} min (runs reused from an earlier call count 0)")
    stages.save_atomic(os.path.join(args.root, f"{args.table}.json"), json.dumps({
        "table": args.table, "seeds": args.seeds, "budget": budget, "wall_s": round(wall, 1),
        "duplicates": DUPLICATES if args.table == "beta" else 0.0, "results": results},
        indent=1))
    return results


if __name__ == "__main__":
    main()
