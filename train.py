"""Training: a hand-written loop with GradCache, for UniME's two stages (and the toy's stage 0).

  python train.py --stage 0   # toy only, NOT UniME: next-token pretraining of the tiny MLLM
  python train.py --stage 1   # §3.2 textual discriminative knowledge distillation
  python train.py --stage 2   # §3.3 hard-negative enhanced instruction tuning

With no other argument each stage runs the embedded default (tiny LLaVA, shapes world,
all-MiniLM-L6-v2 teacher) and first runs the stages before it when their output is missing.
"""
import argparse
import json
import math
import os
import random
import shutil
import tempfile
import time

import torch

import data
import distill
import eval as ev
import model as M

STAGE_DEFAULTS = {  # the embedded default: minutes on 2 CPU cores
    0: dict(out="runs/stage0", max_steps=1500, batch_size=60, chunk_size=60, lr=3e-3, warmup=50),
    1: dict(out="runs/stage1", max_steps=300, batch_size=64, chunk_size=32, lr=1e-3, warmup=20,
            lora_r=16, lora_alpha=32, lora_dropout=0.05, tau=0.05),
    2: dict(out="runs/stage2", max_steps=1600, batch_size=64, chunk_size=64, lr=1e-3, warmup=20,
            lora_r=16, lora_alpha=32, lora_dropout=0.05, tau=0.02, image_size=None),
}
TOY_STAGE_DEFAULTS = {2: dict(lora_r=0)}  # the toy fine-tunes all 0.2M weights in stage 2
PRESETS = {"paper": {  # SPEC §7; stage-1 epochs, not steps: 2 epochs of the NLI pairs
    1: dict(batch_size=768, chunk_size=64, lr=5e-4, lora_r=32, lora_alpha=64, lora_dropout=0.05,
            epochs=2, warmup=20, teacher="nvidia/NV-Embed-v2", teacher_pooling="nv-embed",
            model="microsoft/Phi-3.5-vision-instruct", trust_remote_code=True, save_every=100),
    2: dict(batch_size=1024, chunk_size=32, lr=1e-4, lora_r=16, lora_alpha=64, lora_dropout=0.1,
            max_steps=1000, warmup=100, tau=0.02, image_size=336, save_every=100),
}}
TOY_BASE, TOY_STAGE0 = "runs/tiny-base", "runs/stage0"


# ---------------------------------------------------------------- the pieces of the loop

def lr_at(step, lr, warmup, max_steps, min_ratio=0.1):
    """Linear warmup, then cosine decay to min_ratio * lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, max_steps - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_rows(step, n_rows, batch_size, seed):
    """Row ids of a step: one seeded permutation per epoch, so the data position is a function
    of the step and a resumed run sees exactly the batches it would have seen."""
    per_epoch = n_rows // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch size {batch_size} is larger than the data ({n_rows} rows)")
    epoch, i = divmod(step, per_epoch)
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + epoch))
    return order[i * batch_size:(i + 1) * batch_size].tolist()


def _rng_state(device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def gradcache_step(embed_fn, groups, loss_fn, device):
    """One large-batch step with memory that follows the chunk (SPEC §4, Gao et al. 2021).
    groups: {name: [chunk inputs, ...]}; embed_fn(chunk) -> (c, d); loss_fn(**{name: (n, d)})
    -> scalar. Leaves in .grad exactly the parameter gradients of one full-batch step."""
    device = torch.device(device)
    # 1. embed every chunk without building a graph; remember the RNG state before each
    states, reps, sizes = {}, {}, {}
    with torch.no_grad():
        for name, chunks in groups.items():
            states[name], outs = [], []
            for chunk in chunks:
                states[name].append(_rng_state(device))
                outs.append(embed_fn(chunk))
            sizes[name] = [len(o) for o in outs]
            reps[name] = torch.cat(outs).detach().requires_grad_()
    # 2. the loss of the whole batch, and its gradient at every embedding
    loss = loss_fn(**reps)
    loss.backward()
    # 3. re-embed each chunk with a graph, same RNG (dropout repeats), backward the surrogate
    for name, chunks in groups.items():
        grads = reps[name].grad.split(sizes[name])
        for chunk, (cpu_state, cuda_state), grad in zip(chunks, states[name], grads):
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.set_rng_state(cpu_state)
                if cuda_state is not None:
                    torch.cuda.set_rng_state(cuda_state, device)
                (embed_fn(chunk) * grad).sum().backward()
    return loss.detach(), {name: r.detach() for name, r in reps.items()}


def chunked(items, size):
    return [items[s:s + size] for s in range(0, len(items), size)]


def trainable_state(model):
    return {k: p.detach().cpu() for k, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(out, model, opt, step, args):
    distill.save_atomic({"trainable": trainable_state(model), "optimizer": opt.state_dict(),
                         "step": step, "data_position": step * args.batch_size,
                         "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                                 "cuda": torch.cuda.get_rng_state_all()
                                 if torch.cuda.is_available() else None},
                         "args": vars(args)}, os.path.join(out, "checkpoint.pt"))


def resume(out, model, opt):
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), map_location="cpu", weights_only=False)
    model.load_state_dict(ckpt["trainable"], strict=False)
    opt.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    random.setstate(ckpt["rng"]["python"])
    if ckpt["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return ckpt["step"]


def train_loop(args, model, step_fn, n_rows, on_save=None):
    """The loop, written out: LR, forward + backward (inside step_fn), clip, step, log, save."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    os.makedirs(args.out, exist_ok=True)
    start = resume(args.out, model, opt) if args.resume else 0
    max_steps = args.max_steps
    log_path = os.path.join(args.out, "log.jsonl")
    kept = [line for line in open(log_path) if json.loads(line)["step"] <= start] \
        if start else []  # drop what was logged after the checkpoint we resume from
    log = open(log_path, "w")
    log.writelines(kept)
    t0, seen = time.time(), 0
    for step in range(start, max_steps):
        lr = lr_at(step, args.lr, args.warmup, max_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        loss, stats = step_fn(batch_rows(step, n_rows, args.batch_size, args.seed))
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)  # pre-clip norm
        opt.step()
        opt.zero_grad(set_to_none=True)
        seen += args.batch_size
        rate = seen / (time.time() - t0)
        record = {"step": step + 1, "loss": round(loss.item(), 5), "lr": lr,
                  "grad_norm": round(grad_norm.item(), 5), "samples_per_s": round(rate, 1),
                  **stats}
        if not getattr(args, "is_main", True):
            continue  # other ranks of a torchrun job neither log nor save
        log.write(json.dumps(record) + "\n")
        if (step + 1) % args.log_every == 0 or step + 1 == max_steps:
            eta = (max_steps - step - 1) * args.batch_size / rate
            print(f"step {step + 1}/{max_steps} loss {loss.item():.4f} lr {lr:.2e} "
                  f"grad {grad_norm.item():.3f} {rate:.0f} samples/s ETA {eta:.0f}s", flush=True)
        if (step + 1) % args.save_every == 0 or step + 1 == max_steps:
            log.flush()
            save_checkpoint(args.out, model, opt, step + 1, args)
            if on_save:
                on_save()
    log.close()
    return model


def autocast_embed(model, args):
    """The chunk forward of GradCache: autocast goes inside it (SPEC §4)."""
    def embed_fn(batch):
        with M.autocast(args.device, args.bf16):
            return M.embed(model, batch)
    return embed_fn


def save_stage_output(args, model, processor, family, lora, stage):
    """What a later stage or eval.py loads: the adapter and `unime.json` (what it started from),
    or with --lora-r 0 the whole model. Every file is written to a temporary name, then renamed."""
    if args.lora_r > 0:
        distill.save_atomic(M.lora_state_dict(model), os.path.join(args.out, "adapter.pt"))
        meta = M.stage_meta(args.model, args.out, lora, stage=stage, family=family,
                            trust_remote_code=args.trust_remote_code)
        with open(os.path.join(args.out, "unime.json.tmp"), "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(os.path.join(args.out, "unime.json.tmp"), os.path.join(args.out, "unime.json"))
        return
    tmp = tempfile.mkdtemp(dir=args.out)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(args.out, name))
    os.rmdir(tmp)


# ---------------------------------------------------------------- stage 0 (toy only)

def caption_loss(model, processor, family, images, captions, device):
    """Next-token loss on the caption tokens only, after "Describe the image:". Left padding
    puts every caption at the end of its row, so its labels are the row's last tokens."""
    eos = processor.tokenizer.eos_token
    prompt = M.format_prompt(family, image=True, instruction="Describe the image:")
    batch = processor(text=[f"{prompt} {c}{eos}" for c in captions], images=images,
                      padding=True, return_tensors="pt").to(device)
    labels = torch.full_like(batch["input_ids"], -100)
    for i, c in enumerate(captions):
        n = len(processor.tokenizer(f" {c}{eos}", add_special_tokens=False)["input_ids"])
        labels[i, -n:] = batch["input_ids"][i, -n:]
    return model(**batch, labels=labels).loss


def one_word_loss(model, processor, family, keywords, device, texts=None, images=None):
    """Cross-entropy at the embedding position (the last prompt token) under the "in one word"
    prompts, against the uniform distribution over the scene's keywords: the expected loss of
    a one-word answer drawn at random, without the sampling noise. These answers are what
    align the two modalities (SPEC §8)."""
    batch = M.process(processor, family, texts=texts, images=images, device=device)
    logits = model(**batch).logits[:, -1]  # (n, vocab)
    target = torch.zeros_like(logits)
    for i, words in enumerate(keywords):
        ids = [processor.tokenizer(f" {w}", add_special_tokens=False)["input_ids"][0]
               for w in words]
        target[i, ids] = 1 / len(ids)
    return -(target * logits.float().log_softmax(-1)).sum(-1).mean()


def stage0_loss(model, processor, family, scenes, seed, device):
    """A pretrained MLLM's skills, in three equal parts: captioning an image, and naming the
    scene in one word after the image prompt and after the sentence prompt."""
    rngs = [random.Random(f"{seed}-{i}-{scene}") for i, scene in enumerate(scenes)]
    third = len(scenes) // 3
    cap, img, txt = scenes[:third], scenes[third:2 * third], scenes[2 * third:]
    draw = [data.draw(s, r) for s, r in zip(scenes, rngs)]
    texts = [data.paraphrase(s, r) if r.random() < 0.5 else data.caption(s)
             for s, r in zip(txt, rngs[2 * third:])]
    losses = [caption_loss(model, processor, family, draw[:third],
                           [data.caption(s) for s in cap], device),
              one_word_loss(model, processor, family, [data.keywords(s) for s in img], device,
                            images=draw[third:2 * third]),
              one_word_loss(model, processor, family, [data.keywords(s) for s in txt], device,
                            texts=texts)]
    return sum(losses) / 3


def run_stage0(args):
    if not os.path.exists(os.path.join(TOY_BASE, "config.json")):
        M.build_tiny_mllm(TOY_BASE, data.corpus(), seed=args.seed)
    model, processor, family = M.load_mllm(TOY_BASE, device=args.device)
    scenes = data.split_scenes(args.seed)["pretrain"]

    def step_fn(rows):
        with M.autocast(args.device, args.bf16):
            loss = stage0_loss(model, processor, family, [scenes[r] for r in rows],
                               args.seed + rows[0], args.device)
        loss.backward()
        return loss.detach(), {}

    before = toy_heldout(model, processor, family, args)
    train_loop(args, model, step_fn, len(scenes))
    after = toy_heldout(model, processor, family, args)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(args.out)))  # then rename
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    for f in ("log.jsonl", "checkpoint.pt"):
        shutil.move(os.path.join(args.out, f), os.path.join(tmp, f))
    shutil.rmtree(args.out)
    os.replace(tmp, args.out)
    print_table("stage 0 (toy pretraining, not UniME): zero-shot retrieval on held-out scenes",
                before, after)


def print_table(title, before, after):
    print(f"\n{title}\n| metric | before | after |\n|---|---|---|")
    for k in before:
        print(f"| {k} | {before[k]:.3f} | {after[k]:.3f} |")


# ---------------------------------------------------------------- stage 1 (§3.2)

def stage1_data(args):
    """(train rows, held-out rows): the NLI file of --data, or the toy's text pairs."""
    if args.data:
        rows = data.read_nli(args.data)
        n_eval = min(args.eval_pairs, len(rows) // 10)
        return rows[:-n_eval] if n_eval else rows, rows[-n_eval:] if n_eval else rows[:0]
    splits = data.split_scenes(args.seed)
    return (data.toy_text_pairs(splits["train"], 2000, args.seed),
            data.toy_text_pairs(splits["test"], args.eval_pairs, args.seed + 1))


def run_stage1(args):
    train_rows, eval_rows = stage1_data(args)
    keys = ("sent0", "sent1", "hard_neg") if args.hard_negatives else ("sent0", "sent1")
    texts, index = distill.unique_texts(train_rows + eval_rows, keys)
    cache = args.teacher_cache or os.path.join(
        "runs", "cache", f"teacher-{args.teacher.replace('/', '_')}-"
        f"{distill.texts_hash(texts)[:12]}.pt")
    t0 = time.time()
    teacher = distill.teacher_embeddings(texts, args.teacher, cache, args.teacher_pooling,
                                         args.device, args.trust_remote_code)
    print(f"teacher embeddings: {len(texts)} texts, {teacher.shape[1]}-d, "
          f"{time.time() - t0:.1f}s (cache {cache})")
    model, processor, family = M.load_embedder(args.model, args.device, args.weights_dtype,
                                               args.trust_remote_code, args.family)
    lora = dict(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout)
    M.inject_lora(model, **lora)  # the LLM only: vision tower and projector stay frozen
    print(f"trainable: {M.count_parameters(model, True):,} of {M.count_parameters(model):,}")

    embed_fn = autocast_embed(model, args)

    def step_fn(rows):
        rows = [train_rows[r] for r in rows]
        groups = {k: [M.process(processor, family, texts=[r[k] for r in c], device=args.device)
                      for c in chunked(rows, args.chunk_size)] for k in keys}
        t = {k: teacher[[index[r[k]] for r in rows]].to(args.device) for k in keys}

        def loss_fn(sent0, sent1, hard_neg=None):
            return distill.kd_loss(sent0, sent1, t["sent0"], t["sent1"], args.tau,
                                   args.kd_direction, hard_neg, t.get("hard_neg"))
        loss, _ = gradcache_step(embed_fn, groups, loss_fn, args.device)
        return loss, {}

    def agreement():
        model.eval()
        a = M.encode(model, processor, family, texts=[r["sent0"] for r in eval_rows],
                     device=args.device)
        p = M.encode(model, processor, family, texts=[r["sent1"] for r in eval_rows],
                     device=args.device)
        ta = teacher[[index[r["sent0"]] for r in eval_rows]]
        tp = teacher[[index[r["sent1"]] for r in eval_rows]]
        return distill.teacher_agreement(a, p, ta, tp)

    before = agreement() if eval_rows else {}
    train_loop(args, model, step_fn, len(train_rows),
               on_save=lambda: save_stage_output(args, model, processor, family, lora, 1))
    after = agreement() if eval_rows else {}
    if eval_rows:
        print_table(f"stage 1: agreement with the teacher on {len(eval_rows)} held-out pairs",
                    before, after)
    return before, after


# ---------------------------------------------------------------- stage 2 (§3.3)

def modality_chunks(rows, side, chunk_size, processor, family, device, image_size=None):
    """Process one side ("qry" or "pos") of a batch in chunks of a single modality (one
    processor call each, padding per chunk). Returns the chunks and `order`: the row of each
    embedding in concatenation order."""
    chunks, order = [], []
    for with_image in (False, True):
        ids = [i for i, r in enumerate(rows) if (r[f"{side}_image"] is not None) == with_image]
        for c in chunked(ids, chunk_size):
            images = [data.load_image(rows[i][f"{side}_image"], image_size) for i in c] \
                if with_image else None
            chunks.append(M.process(processor, family, images=images,
                                    instructions=[rows[i][side] for i in c], device=device))
            order += c
    return chunks, order


def init_distributed(args):
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; one process is the plain single-GPU case."""
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(args.device)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def run_stage2(args):
    import hardneg
    import torch.distributed as dist
    rank, world = init_distributed(args)
    args.is_main = rank == 0
    model, processor, family = M.load_embedder(args.model, args.device, args.weights_dtype,
                                               args.trust_remote_code, args.family)
    lora = dict(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                include_vision=True)  # a new LoRA on the whole MLLM, vision tower included
    if args.lora_r > 0:
        M.inject_lora(model, **lora)
    else:  # --lora-r 0: full fine-tuning (the toy's default: a LoRA on 64-wide layers is slow)
        for p in model.parameters():
            p.requires_grad_(True)
    print(f"trainable: {M.count_parameters(model, True):,} of {M.count_parameters(model):,}")
    if args.data:
        table, skipped = [], 0
        for path in args.data.split(","):
            rows, n_skip = data.read_mmeb_train(path, args.image_root, args.skip_missing_images)
            table, skipped = table + rows, skipped + n_skip
        print(f"MMEB-train: {len(table)} pairs, {skipped} rows skipped for missing images")
        get_rows, n_rows = (lambda ids: [table[i] for i in ids]), len(table)
    else:
        scenes = data.split_scenes(args.seed)["train"]
        seen = set(scenes)
        get_rows, n_rows = (lambda ids: data.toy_stage2_rows(scenes, ids, args.seed + 7, seen)), \
            len(data.TASKS) * len(scenes)
    generator = torch.Generator().manual_seed(args.seed)  # random negatives: same on all ranks
    history = []

    embed_fn = autocast_embed(model, args)

    def step_fn(ids):
        n_local = len(ids) // world
        rows = get_rows(ids[rank * n_local:(rank + 1) * n_local])
        groups, inverse = {}, {}
        for side in ("qry", "pos"):
            groups[side], order = modality_chunks(rows, side, args.chunk_size, processor,
                                                  family, args.device, args.image_size)
            inverse[side] = torch.tensor(order).argsort().to(args.device)
        stats = {}

        def loss_fn(qry, pos):  # back to row order: query i and candidate i are a pair
            loss, st = hardneg.distributed_hardneg_loss(
                qry[inverse["qry"]], pos[inverse["pos"]], k=args.k, beta=args.beta,
                tau=args.tau, negatives=args.negatives, generator=generator, return_stats=True)
            stats.update(st)
            return loss
        loss, _ = gradcache_step(embed_fn, groups, loss_fn, args.device)
        if world > 1:  # what DDP would do: average the gradients over the ranks
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world
        loss = loss / world
        collapse_guard(args, history, loss.item(), stats)
        return loss, {k: round(v, 4) for k, v in stats.items()}

    toy = not args.data
    before = toy_heldout(model, processor, family, args) if toy and args.is_main else {}
    train_loop(args, model, step_fn, n_rows,
               on_save=lambda: save_stage_output(args, model, processor, family, lora, 2))
    after = toy_heldout(model, processor, family, args) if toy and args.is_main else {}
    if before:
        print_table("stage 2: held-out shapes world (200 scenes each)", before, after)
        log = [json.loads(x) for x in open(os.path.join(args.out, "log.jsonl"))]
        share = sum(r["false_negative_share"] for r in log) / len(log)
        print(f"queries with >= 1 filtered false negative: {100 * share:.1f}% (mean over steps)")
    return before, after


def collapse_guard(args, history, loss, stats, window=50):
    """Stop a run whose embeddings have become one vector (SPEC §8); warn at the early sign.
    Healthy toy runs pass briefly through a high cosine and recover, so the test is on the
    mean over `window` steps (the toy's healthy runs stayed below 0.95 there)."""
    history.append((loss, stats["random_pair_cos"]))
    if len(history) == window and sum(h[0] for h in history) / window > math.log(args.k + 1):
        print(f"warning: mean loss over the first {window} steps is above ln(k+1) = "
              f"{math.log(args.k + 1):.2f}; every collapsed toy run showed this. If the loss "
              f"stays flat, start from a checkpoint whose prompts already align the modalities.")
    cos = sum(h[1] for h in history[-window:]) / window
    if len(history) >= window and cos > args.collapse_cos:
        raise SystemExit(
            f"collapse: over the last {window} steps the mean cosine between unrelated "
            f"query-candidate pairs is {cos:.3f} (> --collapse-cos {args.collapse_cos}): all "
            f"embeddings are nearly the same vector and the loss sits near ln(k+1) = "
            f"{math.log(args.k + 1):.2f}. The hard negatives of a model without zero-shot "
            f"alignment outrank its positives, and making everything identical is the quickest "
            f"way down. Start from a pretrained MLLM (for the toy: after stage 0), or lower --lr.")


def toy_heldout(model, processor, family, args, n=200):
    """Held-out shapes world with the paper's zero-shot prompts: text<->image Recall@1 among n
    in-distribution scenes, the same among n scenes with unseen colour-shape combinations, and
    compositional accuracy (image closer to its caption than to a hard negative, strict >)."""
    splits, rng, out = data.split_scenes(args.seed), random.Random(args.seed + 1), {}
    model.eval()
    for split in ("test", "ood"):
        scenes = splits[split][:n]
        img = M.encode(model, processor, family, images=[data.draw(s, rng) for s in scenes],
                       device=args.device)
        txt = M.encode(model, processor, family, texts=[data.caption(s) for s in scenes],
                       device=args.device)
        recall = ev.recall_at_k(txt, img, list(range(len(scenes))), ks=(1,))
        out[f"{split}_t2i_R@1"], out[f"{split}_i2t_R@1"] = recall["t2i_R@1"], recall["i2t_R@1"]
        if split == "test":
            neg = M.encode(model, processor, family, device=args.device,
                           texts=[data.caption(data.negative(s, rng)[1]) for s in scenes])
            out["compositional"] = ev.sugarcrepe_accuracy(img, txt, neg)
    return out


# ---------------------------------------------------------------- command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    a = p.add_argument
    a("--stage", type=int, choices=[0, 1, 2], required=True)
    a("--preset", choices=sorted(PRESETS), help="the paper's settings for this stage (SPEC §7)")
    a("--model", help="HF id, model folder or stage output to start from (default: the toy)")
    a("--family", help="prompt family when the model type is not enough (see model.FAMILIES)")
    a("--trust-remote-code", action="store_true", default=None)
    a("--teacher", help=f"stage 1 teacher, HF id or folder (default {distill.DEFAULT_TEACHER})")
    a("--teacher-pooling", choices=["mean", "cls", "last", "nv-embed"])
    a("--teacher-cache", help="file of cached teacher embeddings (default under runs/cache)")
    a("--data", help="stage 1: NLI CSV/JSONL (sent0,sent1[,hard_neg]); default: toy pairs")
    a("--eval-pairs", type=int, default=200, help="held-out pairs for teacher agreement")
    a("--hard-negatives", action="store_true", help="stage 1: NLI hard_neg as extra columns")
    a("--out", help="output folder")
    a("--max-steps", type=int)
    a("--epochs", type=float, help="train this many passes over the data instead of --max-steps")
    a("--batch-size", type=int)
    a("--chunk-size", type=int, help="GradCache chunk: memory follows it, not the batch")
    a("--lr", type=float)
    a("--warmup", type=int)
    a("--weight-decay", type=float, default=0.0)
    a("--grad-clip", type=float, default=1.0)
    a("--lora-r", type=int)
    a("--lora-alpha", type=float)
    a("--lora-dropout", type=float)
    a("--tau", type=float, help="temperature: stage 1 0.05 (paper: not given), stage 2 0.02")
    a("--init", default="stage1", choices=["stage1", "base"],
      help="stage 2 on the toy: start from stage 1's output, or from the base (ablation)")
    a("--image-root", default="", help="stage 2: folder the MMEB image paths are relative to")
    a("--skip-missing-images", action="store_true", help="drop (and count) rows, not fail")
    a("--image-size", type=int, help="resize images to this square (paper stage 2: 336)")
    a("--k", type=int, default=8, help="stage 2: hard negatives per query (Eq. 3)")
    a("--beta", type=float, default=0.1, help="stage 2: false-negative margin (§3.3.1)")
    a("--negatives", default="hard", choices=["hard", "random", "easy"],
      help="stage 2: which k negatives (the paper's gradient analysis)")
    a("--collapse-cos", type=float, default=0.97,
      help="stage 2: stop when unrelated pairs are this close (mean over 50 steps)")
    a("--kd-direction", default="teacher-student", choices=["teacher-student", "student-teacher"])
    a("--save-every", type=int)
    a("--log-every", type=int, default=25)
    a("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
      help="auto: bf16 autocast and bf16 frozen weights on CUDA, fp32 on CPU")
    a("--seed", type=int, default=0)
    args = p.parse_args(argv)
    preset = PRESETS[args.preset].get(args.stage, {}) if args.preset else {}
    toy = TOY_STAGE_DEFAULTS.get(args.stage, {}) if args.model is None else {}
    for key, value in {**STAGE_DEFAULTS.get(args.stage, {}), **toy, **preset}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.teacher = args.teacher or distill.DEFAULT_TEACHER
    args.teacher_pooling = args.teacher_pooling or "mean"
    args.trust_remote_code = bool(args.trust_remote_code)
    args.save_every = args.save_every or args.max_steps
    cuda = torch.device(args.device).type == "cuda"
    args.bf16 = args.dtype == "bf16" or (args.dtype == "auto" and cuda)
    args.weights_dtype = torch.bfloat16 if args.bf16 and cuda else torch.float32
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    if args.stage == 0:
        return run_stage0(args)
    toy = args.model is None
    if toy:  # the embedded default starts from the pretrained toy
        if not os.path.exists(os.path.join(TOY_STAGE0, "config.json")):
            print("no pretrained toy yet: running stage 0 first")
            run_stage0(parse_args(["--stage", "0", "--device", args.device, "--seed",
                                   str(args.seed)]))
        args.model = TOY_STAGE0
    if toy and args.stage == 2 and args.init == "stage1":
        if not os.path.exists(os.path.join("runs/stage1", "unime.json")):
            print("no stage-1 output yet: running stage 1 first")
            run_stage1(parse_args(["--stage", "1", "--device", args.device, "--model",
                                   TOY_STAGE0, "--seed", str(args.seed)]))
        args.model = "runs/stage1"
    if args.stage == 2:
        if args.init == "base" and args.out == STAGE_DEFAULTS[2]["out"]:
            args.out = "runs/stage2-base"
        return run_stage2(args)
    if args.epochs:
        n_rows = len(stage1_data(args)[0])
        args.max_steps = int(args.epochs * (n_rows // args.batch_size))
    return run_stage1(args)


if __name__ == "__main__":
    main()
