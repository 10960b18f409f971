"""The toy's held-out benchmark: scenes never trained on, scored like the paper's benchmarks
with eval.py's own metric functions.

    python -m toy.benchmark runs/stage0 runs/stage1 runs/stage2-base runs/stage2    # a row each
"""
import argparse
import json
import random

import torch

import eval as ev
import model as M
import stages
from toy import shapes
from toy.default import SPLIT_SEED, TASKS, stage2_row, text_pairs


def score(embed, n=200, n_candidates=50, model="the model"):
    """The toy's held-out scenes (never trained on), scored like the paper's benchmarks with
    eval.py's metrics, in percent: MMEB-style hit@1 (mean of four sets: classification, VQA,
    text->image and image->text retrieval, `n_candidates` candidates each, gold first),
    Recall@1 both ways among n scenes (and among n scenes with unseen colour-shape
    combinations), compositional accuracy (mean of five SugarCrepe-style splits) and
    text->text Recall@1 (a caption finds its paraphrase); a tie is a miss. embed: [(text,
    image, instruction)] -> (m, d) L2-normalized; NaN or inf stops the benchmark, naming
    `model`."""
    embed = _dedup(embed, model)
    splits, rng = shapes.split_scenes(SPLIT_SEED), random.Random(SPLIT_SEED + 1)
    scenes = {s: splits[s][:n] for s in ("test", "ood")}
    images = {s: [shapes.draw(scene, rng) for scene in scenes[s]] for s in scenes}
    out, ids = {}, list(range(n))
    for split, prefix in (("test", ""), ("ood", "unseen ")):
        recall = ev.recall_at_k(embed([(shapes.caption(s), None, None) for s in scenes[split]]),
                                embed([(None, im, None) for im in images[split]]), ids, (1,))
        out[f"{prefix}t2i R@1"] = 100 * recall["t2i_R@1"]
        out[f"{prefix}i2t R@1"] = 100 * recall["i2t_R@1"]
    hits = []
    for task in TASKS[:4]:
        pairs = [stage2_row(s, task, random.Random(SPLIT_SEED * 7 + i), images["test"][i])
                 for i, s in enumerate(scenes["test"])]
        side = lambda p, k: (None, p[f"{k}_image"], p[k])  # noqa: E731
        cands = []
        for i, pair in enumerate(pairs):  # gold first, then distractors with other answers
            picked, seen = [i], {pair["pos"]}
            for j in sorted(ids, key=lambda j: rng.random()):
                if len(picked) < n_candidates and j != i and (pairs[j]["pos_image"] or
                                                              pairs[j]["pos"] not in seen):
                    picked.append(j)
                    seen.add(pairs[j]["pos"])
            cands.append(picked)
        hits.append(ev.hit_at_1(embed([side(p, "qry") for p in pairs]),
                                embed([side(p, "pos") for p in pairs]), cands))
    out["MMEB-style hit@1"] = 100 * sum(hits) / len(hits)
    accuracy = []
    for kind in ("replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj"):
        rows = []
        for scene, image in zip(scenes["test"], images["test"]):
            try:
                rows.append((image, shapes.caption(scene),
                             shapes.caption(shapes.negative(scene, rng, kind)[1])))
            except ValueError:  # e.g. no relation to replace in a one-object scene
                continue
        accuracy.append(ev.sugarcrepe_accuracy(embed([(None, r[0], None) for r in rows]),
                                               embed([(r[1], None, None) for r in rows]),
                                               embed([(r[2], None, None) for r in rows])))
    out["compositional"] = 100 * sum(accuracy) / len(accuracy)
    pairs = text_pairs(scenes["test"], n, SPLIT_SEED + 1)
    out["t2t R@1"] = 100 * ev.recall_at_k(embed([(r["sent0"], None, None) for r in pairs]),
                                          embed([(r["sent1"], None, None) for r in pairs]),
                                          ids, (1,))["t2i_R@1"]
    return out


def _dedup(embed, model):
    """Embed each distinct input once (images are compared by identity): candidates repeat."""
    def embed_unique(inputs):
        keys = [(t, id(im), ins) for t, im, ins in inputs]
        order = {k: x for k, x in zip(keys, inputs)}
        index = {k: i for i, k in enumerate(order)}
        vectors = M.require_finite(embed(list(order.values())), model)
        return vectors[torch.tensor([index[k] for k in keys])]
    return embed_unique


# ---------------------------------------------------------------- scoring models

def main(argv=None):
    p = argparse.ArgumentParser(description="Score models on the toy's held-out benchmark.")
    p.add_argument("models", nargs="+", help="stage outputs or model folders")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="write the scores as JSON here")
    args = p.parse_args(argv)
    results = {}
    for path in args.models:
        model, processor, family = stages.load_embedder(path, args.device)
        results[path] = score(ev.make_encoder(model.eval(), processor, family,
                                              device=args.device), model=path)
    columns = list(next(iter(results.values())))
    print(ev.markdown_table(["model"] + columns,
                            [(path, *r.values()) for path, r in results.items()]))
    if args.out:
        stages.save_atomic(args.out, json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
