"""The embedded default: UniME on a tiny pretrained LLaVA and the shapes world, offline on a CPU.

Real MLLMs cannot be downloaded here, so `python train.py --stage 1` (no --model) trains
`toy/mllm`: a 0.22M-parameter LLaVA (CLIP tower, projector, Llama decoder) whose
next-token pretraining stands in for a real checkpoint's (toy/pretrain.py makes it), on the
shapes world (toy/shapes.py), with the real all-MiniLM-L6-v2 as the stage-1 teacher.

This file gives train.py the toy's settings (`settings`, data) and training rows (`source`);
toy/benchmark.py scores models on held-out scenes.
"""
import functools
import os
import random

import families
import stages
from toy import shapes

HERE = os.path.dirname(os.path.abspath(__file__))
PRETRAINED = os.path.join(HERE, "mllm")
SPLIT_SEED = 0  # the held-out scenes never change with --seed: the pretrained toy never saw them
TEXT_PAIRS = 2000  # stage 1's training pairs
SETTINGS = {  # minutes on 2 CPU cores; flags given on the command line win
    1: dict(model=PRETRAINED, out="runs/stage1", max_steps=300, batch_size=64, chunk_size=32,
            lr=1e-3, warmup=20, lora_r=16, lora_alpha=32, lora_dropout=0.05, tau=0.05,
            teacher="all-MiniLM-L6-v2", teacher_pooling="mean"),
    # stage 2 fine-tunes all 0.2M weights: a rank-16 adapter on 64-wide layers learned too
    # slowly for a few minutes on a CPU
    2: dict(model="runs/stage1", out="runs/stage2", max_steps=1600, batch_size=64,
            chunk_size=64, lr=1e-3, warmup=20, lora_r=0, tau=0.02,
            image_size="original"),  # drawn at the toy's 32 px
}
STAGE2_INSTRUCTIONS = {  # MMEB-style task instructions (VLM2Vec's wording)
    "cls": "<|image_1|> Represent the given image for classification.",
    "vqa": "<|image_1|> Represent the given image with the following question:",
    "t2i": "Find me an everyday image that matches the given caption:",
    "i2t": "<|image_1|> Find an image caption describing the given everyday image.",
}
TASKS = ("cls", "vqa", "t2i", "i2t", "t2i", "i2t")  # retrieval twice as often


# ---------------------------------------------------------------- training rows

def text_pairs(scenes, n, seed):
    """NLI-shaped pairs: {'sent0': caption, 'sent1': paraphrase, 'hard_neg': negative}."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        scene = scenes[i % len(scenes)] if n <= len(scenes) else rng.choice(scenes)
        rows.append({"sent0": shapes.caption(scene, flip=rng.random() < 0.5),
                     "sent1": shapes.paraphrase(scene, rng),
                     "hard_neg": shapes.caption(shapes.negative(scene, rng)[1])})
    return rows


def stage2_row(scene, task, rng, image=None):
    """One MMEB-style pair {qry, qry_image, pos, pos_image}: classification (image -> class
    name), VQA (image + question -> answer), text->image and image->text retrieval."""
    ins, image = STAGE2_INSTRUCTIONS, image or shapes.draw(scene, rng)
    first = scene[0]
    if task == "cls":  # the class is the first object's colour and shape
        return {"qry": ins["cls"], "qry_image": image, "pos": f"{first[0]} {first[1]}",
                "pos_image": None}
    if task == "vqa":
        obj = rng.choice(shapes.scene_objects(scene))
        question, answer = rng.choice([(f"What colour is the {obj[1]}?", obj[0]),
                                       (f"What shape is the {obj[0]} one?", obj[1])])
        return {"qry": f"{ins['vqa']} {question}", "qry_image": image, "pos": answer,
                "pos_image": None}
    # retrieval pairs use the paper's zero-shot "in one word" prompts, so the held-out numbers
    # measure the protocol of its retrieval benchmarks (Table 2): written out whole in the toy
    # LLaVA's chat format, they pass through MMEB's raw format unchanged
    text = families.format_prompt("llava", text=shapes.caption(scene, flip=rng.random() < 0.5))
    image_prompt = families.format_prompt("llava", image=True)
    if task == "t2i":
        return {"qry": text, "qry_image": None, "pos": image_prompt, "pos_image": image}
    return {"qry": image_prompt, "qry_image": image, "pos": text, "pos_image": None}


def stage2_rows(scenes, ids, seed, train_scenes, duplicates=0.0):
    """Rows for row ids (id -> scene id // 6, task id % 6): the tasks mix within every batch,
    as MMEB's do; images are drawn on the fly from a per-row seed. Every second row of a batch
    is a compositional variant of the row before (when that variant is itself a training scene),
    so the batch holds the near-duplicates that hard-negative mining is for: a random batch of
    64 scenes among 3,000 almost never does, while real MMEB batches (one dataset each) do.
    duplicates: the share of rows (drawn per row id) that repeat the row before's scene and
    task with their own drawing and wording, false negatives for the β filter to find."""
    rows, previous = [], None
    for j, i in enumerate(ids):
        rng = random.Random(seed * 1_000_003 + i)
        scene, task = scenes[(i // len(TASKS)) % len(scenes)], TASKS[i % len(TASKS)]
        if j > 0 and duplicates and random.Random(f"duplicate {seed} {i}").random() < duplicates:
            scene, task = previous
        elif j % 2 == 1:
            variant = shapes.negative(previous[0], rng)[1]
            scene = variant if variant in train_scenes else scene
        rows.append(stage2_row(scene, task, rng))
        previous = scene, task
    return rows


def take(rows, ids):
    return [rows[i] for i in ids]


def settings(stage, init=None):
    """This stage's SETTINGS, which train.py takes for what the command line leaves unset.
    Stage 2 starts from the toy's stage-1 output (`--init stage1`, the default), from a given
    stage-1 output (`--init FOLDER`, as experiments/ablate.py does per seed) or from the
    pretrained toy (`--init base`)."""
    if stage == 1 or init in (None, "stage1"):
        return SETTINGS[stage]
    if init == "base":
        return {**SETTINGS[2], "model": PRETRAINED, "out": "runs/stage2-base"}
    meta = stages.read_stage_meta(init)
    if meta is None or meta["stage"] != 1:
        raise SystemExit(f"--init {init}: not a finished stage-1 output (its unime.json is "
                         f"missing or says another stage)")
    return {**SETTINGS[2], "model": init}


def source(args):
    """The toy's training rows for train.py: {n_rows, rows(ids), heldout pairs, report (the
    held-out benchmark while it trains), first (a run that must finish before this one)}."""
    splits = shapes.split_scenes(SPLIT_SEED)
    if args.stage == 1:
        rows = text_pairs(splits["train"], TEXT_PAIRS, args.seed)
        return {"n_rows": len(rows), "rows": functools.partial(take, rows),
                "heldout": text_pairs(splits["test"], args.eval_pairs, SPLIT_SEED + 1),
                "report": None, "first": None}
    scenes = splits["train"]
    first = args.model == SETTINGS[2]["model"] and stages.read_stage_meta(args.model) is None
    return {"n_rows": len(TASKS) * len(scenes), "heldout": [],
            "rows": functools.partial(stage2_rows, scenes, seed=args.seed + 7,
                                      train_scenes=set(scenes),
                                      duplicates=args.toy_duplicates or 0.0),
            "report": functools.partial(report, device=args.device),
            "first": ["--stage", "1", "--seed", str(args.seed), "--device", args.device]
            if first else None}


def report(model, processor, family, device):
    """The held-out benchmark of a model being trained (imported here: only the toy scores
    itself while it trains)."""
    from toy import benchmark
    import eval as ev
    return benchmark.score(ev.make_encoder(model, processor, family, device=device))
