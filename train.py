"""UniME training: one hand-written loop for both stages, with GradCache inside.

  python train.py --stage 1   # §3.2 textual discriminative knowledge distillation (Eq. 2)
  python train.py --stage 2   # §3.3 hard-negative enhanced instruction tuning (Eq. 3-4)

Without --model, a stage runs the embedded default (toy/default.py: a tiny pretrained LLaVA, the
shapes world, the all-MiniLM-L6-v2 teacher). With --model, --data is the paper's data: SimCSE's
NLI file (stage 1) or MMEB-train subsets (stage 2); --preset paper sets its hyperparameters
(§4.1, Table 6). Several GPUs: the same command under torchrun; --batch-size stays global.
"""
import contextlib
import functools
import json
import math
import os
import random
import sys
import time

import torch
import torch.distributed as dist

import config
import data
import distill
import families
import hardneg
import model as M
import runs
import stages
import toy.default

SIDES = {1: ("sent0", "sent1"), 2: ("qry", "pos")}  # the two embedded sides of a pair


# ---------------------------------------------------------------- the batch

def lr_at(step, lr, warmup, max_steps, min_ratio=0.1):
    """Linear warmup, then cosine decay to min_ratio * lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, max_steps - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_rows(step, n_rows, batch_size, seed):
    """Row ids of a step's global batch: one seeded permutation per epoch, so the data position
    is a function of the step and a resumed run sees exactly the batches it would have seen."""
    per_epoch = n_rows // batch_size
    if per_epoch == 0:
        raise ValueError(f"--batch-size {batch_size} is larger than the data ({n_rows} rows)")
    epoch, i = divmod(step, per_epoch)
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + epoch))
    return order[i * batch_size:(i + 1) * batch_size].tolist()


class StepBatches(torch.utils.data.Dataset):
    """Item `step` = this rank's share of that step's global batch, ready for the model: per
    side, chunks of one modality, tokenized, images decoded and resized, padded per chunk;
    stage-2 rows in MMEB's raw format cut to the family's official max_len (families.py).
    DataLoader workers prepare the next steps while one trains; inputs stay on the CPU until
    their chunk's forward."""

    def __init__(self, args, source, processor, family, rank, world):
        self.args, self.source, self.processor, self.family = args, source, processor, family
        self.rank, self.world = rank, world
        self.max_length = families.FAMILIES[family].get("max_len") if args.stage == 2 else None

    def __len__(self):
        return self.args.max_steps

    def image(self, path):  # §4.1: 336 x 336 (--image-size); Phi-3.5-V's processor crops
        return families.prepare_image(self.family, data.load_image(path), self.args.image_size)

    def __getitem__(self, step):
        a = self.args
        ids = batch_rows(step, self.source["n_rows"], a.batch_size, a.seed)
        n = len(ids) // self.world
        ids = ids[self.rank * n:(self.rank + 1) * n]  # this rank's shard
        rows = self.source["rows"](ids)
        sides = {}
        for side in SIDES[a.stage] + (("hard_neg",) if a.hard_negatives else ()):
            if a.stage == 1:  # §3.2's sentence, cut to --max-text-tokens: memory stays bounded
                inputs = [(t, None, None) for t in distill.cut_texts(
                    self.processor, [r[side] for r in rows], a.max_text_tokens)]
            else:  # MMEB's own prompt text and image (§3.3)
                inputs = [(None, r[f"{side}_image"], r[side]) for r in rows]
            sides[side] = [(idx, M.process(
                self.processor, self.family, [inputs[i][0] for i in idx],
                [self.image(inputs[i][1]) if inputs[i][1] else None for i in idx],
                [inputs[i][2] for i in idx], self.max_length))
                for idx in M.modality_chunks([x[1] is not None for x in inputs], a.chunk_size)]
        return {"ids": torch.tensor(ids), "sides": sides}


# ---------------------------------------------------------------- GradCache (§4.1)

def gradcache_embed(model, sides, device, amp):
    """GradCache's first pass: every chunk embedded without a graph, the RNG state before each
    kept -> ({side: (n, d) leaves in row order, to receive d loss / d embedding}, the states).
    sides: {name: [(row positions, processed chunk), ...]}."""
    cuda = torch.device(device).type == "cuda"
    states, reps = {}, {}
    with torch.no_grad():
        for name, chunks in sides.items():
            states[name], outs = [], []
            for idx, chunk in chunks:
                states[name].append((torch.get_rng_state(),
                                     torch.cuda.get_rng_state(device) if cuda else None))
                outs.append((idx, chunk_forward(model, chunk, device, amp)))
            rep = torch.empty(sum(len(i) for i, _ in outs), outs[0][1].shape[1], device=device)
            for idx, e in outs:
                rep[torch.as_tensor(idx, device=device)] = e  # back to row order
            reps[name] = rep.requires_grad_()
    return reps, states


def gradcache_backward(model, sides, reps, states, device, amp):
    """GradCache's last pass, once the loss's backward filled reps[side].grad: each chunk again
    with a graph under its saved RNG state (dropout repeats), its cached gradient backpropagated:
    .grad is then that of one full-batch step (Gao et al. 2021), memory that of a chunk."""
    for name, chunks in sides.items():
        for (idx, chunk), (cpu, gpu) in zip(chunks, states[name]):
            with torch.random.fork_rng(devices=[device] if gpu is not None else []):
                torch.set_rng_state(cpu)
                if gpu is not None:
                    torch.cuda.set_rng_state(gpu, device)
                grad = reps[name].grad[torch.as_tensor(idx, device=device)]
                (chunk_forward(model, chunk, device, amp) * grad).sum().backward()


def chunk_forward(model, chunk, device, amp):
    """A chunk's embeddings, from a fresh copy of its inputs per pass: a model may edit its
    inputs in place (Phi-3.5-V clamps input_ids, erasing its image tokens), `.to()` returns the
    tensor itself on its own device, and a processor output's .to() would move the chunk itself
    (every chunk of the step would then stay on the device to its end)."""
    with M.autocast(device, amp):
        return M.embed(model, {k: v.to(device, non_blocking=True, copy=True)
                               if torch.is_tensor(v) else v for k, v in chunk.items()})


# ---------------------------------------------------------------- several GPUs

def init_distributed(device):
    """torchrun sets WORLD_SIZE, RANK and LOCAL_RANK -> (rank, world, device); one process is
    the plain single-GPU case."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1, device
    if torch.cuda.is_available():
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world, device


def gather_with_grad(t):
    """(n_local, d) on each rank -> (world * n_local, d) in rank order. all_gather returns
    copies without gradient, so the local shard is put back as `t` itself (the official example
    drops it, and its rows then get no gradient). Hard negatives are then mined over the global
    batch, "all targets across GPUs" (§3.3)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    parts[dist.get_rank()] = t
    return torch.cat(parts)


def average_gradients(params, world):
    """What DDP does, as one flat all-reduce over a fixed list of parameters: a parameter
    without a gradient on this rank (no image in its shard: no vision-tower pass) sends zeros,
    so every rank reduces the same tensor in the same order."""
    if world == 1:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for p in params])
    dist.all_reduce(flat)
    flat /= world
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p)


# ---------------------------------------------------------------- one step

def train_step(args, step, model, opt, batch, targets, generator, world, device, amp):
    """One optimizer step on the global batch -> (loss, pre-clip gradient norm, statistics).
    Each rank embeds its shard and gathers the others'; all compute the same loss L, each
    backward reaches its own shard and the gradients are averaged, so L is scaled by `world`
    to give dL/dθ. targets: stage 1's teacher embeddings of the batch's rows."""
    reps, states = gradcache_embed(model, batch["sides"], device, amp)
    e = {side: gather_with_grad(x) for side, x in reps.items()}  # (global batch, d) per side
    if args.stage == 1:  # Eq. 2: the student's in-batch similarity distributions -> the teacher's
        t = {side: gather_with_grad(x) for side, x in targets.items()}
        loss, stats = distill.kd_loss(e["sent0"], e["sent1"], t["sent0"], t["sent1"], args.tau,
                                      args.kd_direction, e.get("hard_neg"), t.get("hard_neg")), {}
    elif args.loss == "unime":  # Eq. 4 over the k hardest negatives (Eq. 3) the filter leaves
        loss, stats = hardneg.hardneg_loss(e["qry"], e["pos"], args.k, args.beta, args.tau,
                                           args.negatives, generator, return_stats=True)
    elif args.loss == "masked-infonce":  # NOT UniME: the batch minus the β mask (VLM2Vec: none)
        loss, stats = hardneg.masked_infonce_loss(e["qry"], e["pos"], args.beta, args.tau,
                                                  return_stats=True)
    else:  # NOT UniME: LLaVE's, every negative weighted by e^(α·sim), both directions averaged
        loss, stats = hardneg.hardness_weighted_loss(e["qry"], e["pos"], args.alpha, args.beta,
                                                     args.tau, return_stats=True)
    (loss * world).backward()  # d loss / d embedding, for every row of the batch
    gradcache_backward(model, batch["sides"], reps, states, device, amp)
    params = [p for group in opt.param_groups for p in group["params"]]
    average_gradients(params, world)
    # the norm before clipping is logged; --grad-clip 0 clips nothing (a factor of 1)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip or math.inf).item()
    loss = loss.item()
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise SystemExit(f"step {step + 1}: the loss ({loss}) or the gradient norm "
                         f"({grad_norm}) is not finite; this step was not applied, and "
                         f"{args.out}/checkpoint.pt (if any) is the last good state. "
                         f"Lower --lr, raise --tau, or check the data.")
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss, grad_norm, stats


# ---------------------------------------------------------------- the loop

def add_trainable(model, family, args):
    """Stage 1: a LoRA on the LLM only, vision tower and projector frozen (§3.2). Stage 2: a
    new LoRA on the whole stage-1-merged MLLM, vision side included (§3.3); layers per family:
    families.lora_targets. -> the LoRA's shape and layers; --lora-r 0: None, every weight."""
    if args.lora_r == 0:
        model.requires_grad_(True)
        return None
    lora = dict(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                targets=families.lora_targets(model, family, include_vision=args.stage == 2))
    M.inject_lora(model, **lora)
    return lora


def train(args, source, rank=0, world=1, device="cpu", lock=None, argv=None):
    """The UniME loop for either stage, in a claimed --out -> the held-out report before and
    after ({} on other ranks than the first). argv: the command line, for the resume command
    printed when a signal stops the run."""
    weights, amp = M.precision(device, args.dtype)
    report = source["report"]
    if args.stage == 1:  # first: a bad cache fails in seconds, and the teacher's memory
        stages.require_model(args.model, args.trust_remote_code)  # is freed before the student
        teacher, index, teacher_rows = distill.teacher_targets(args, source, device)  # loads
        if source["heldout"]:
            report = distill.teacher_report(teacher, index, source["heldout"], device, amp, (
                f"the student of {args.model}", f"teacher {args.teacher}"), args.max_text_tokens)
    model, processor, family = stages.load_embedder(args.model, device, weights,
                                                    args.trust_remote_code, args.family,
                                                    load_in_4bit=args.load_in_4bit)
    lora = add_trainable(model, family, args)
    if args.gradient_checkpointing:
        M.checkpoint_activations(model)
    params = [p for p in model.parameters() if p.requires_grad]
    print(f"trainable: {sum(p.numel() for p in params):,} of {M.count_parameters(model):,}")
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    generator = torch.Generator().manual_seed(args.seed)  # random negatives, on every rank
    settings = runs.run_config(args)
    start = runs.load(args.out, model, opt, generator, settings) if args.resume else 0
    before = report(model.eval(), processor, family) if report and rank == 0 else {}
    batches = iter(torch.utils.data.DataLoader(
        StepBatches(args, source, processor, family, rank, world), batch_size=None,
        sampler=range(start, args.max_steps), num_workers=args.workers,
        prefetch_factor=1 if args.workers else None,  # an item is a whole step: 1 ahead each
        pin_memory=torch.device(device).type == "cuda",
        worker_init_fn=functools.partial(runs.worker_init, lock),
        generator=torch.Generator()))  # its own: the global RNG (dropout) stays untouched
    log = runs.open_log(args.out, start) if rank == 0 else None
    history, t0 = [], time.time()
    cadence = runs.Cadence(args, sys.argv[1:] if argv is None else argv, world, device)
    for step in cadence.steps(start):  # a checkpoint by steps, by minutes, and on SIGTERM
        lr = lr_at(step, args.lr, args.warmup, args.max_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        waited = time.time()
        batch = next(batches)  # this rank's rows of the global batch, processed per chunk
        waited = time.time() - waited  # > 0: the step waited for its inputs (--workers)
        targets = {k: teacher[ids[batch["ids"]]].to(device)  # the teacher's rows, by row id:
                   for k, ids in teacher_rows.items()} if args.stage == 1 else None  # CPU matrix
        model.train()
        loss, grad_norm, stats = train_step(args, step, model, opt, batch, targets, generator,
                                            world, device, amp)
        rate = (step + 1 - start) * args.batch_size / (time.time() - t0)
        record = {"step": step + 1, "loss": round(loss, 5), "lr": lr,
                  "grad_norm": round(grad_norm, 5), "samples_per_s": round(rate, 1),
                  "input_wait_s": round(waited, 3), **{k: round(v, 4) for k, v in stats.items()}}
        if args.stage == 2:
            history.append(record)
            # collapsed, all similarities are equal and the loss is ln(1 + k): the full-batch
            # losses have batch - 1 negatives, each weighing e^α when hardness-weighted
            hardneg.collapse_guard(history, args.k if args.loss == "unime" else
                                   (args.batch_size - 1) * math.exp(args.alpha or 0.0))
        if rank != 0:
            cadence.after_step(step + 1)
            continue  # other ranks neither log nor save
        log.write(json.dumps(record) + "\n")
        if (step + 1) % args.log_every == 0 or step + 1 == args.max_steps:
            eta = (args.max_steps - step - 1) * args.batch_size / rate
            print(f"step {step + 1}/{args.max_steps} loss {loss:.4f} lr {lr:.2e} grad "
                  f"{grad_norm:.3f} {rate:.0f} samples/s ETA {eta:.0f}s", flush=True)
        cadence.after_step(step + 1, lambda: (log.flush(), runs.save(
            args.out, model, opt, step + 1, generator, settings)))  # stops after a signal
    if rank != 0:
        return {}
    log.close()
    runs.save_output(args.out, model, processor, args.model, args.stage, family, lora)
    return {"before": before, "after": report(model.eval(), processor, family) if report else {}}


# ---------------------------------------------------------------- the command line

def configure(argv=None):
    """(settings, training rows): config.py's, with the embedded default's settings and rows
    (toy/default.py) without --model, else the paper's data that --data names."""
    args = config.parse_args(argv)  # every value given is checked here, before any work
    toy_run = args.model is None
    args = config.resolve(args, toy.default.settings(args.stage, args.init) if toy_run else None)
    source = toy.default.source(args) if toy_run else config.read_data(args)
    if not toy_run:  # a text-only or unknown model: now, not after the teacher's hours
        config.backbone_family(args.model, args.family)
    return config.fit_to_data(args, source["n_rows"]), source


def main(argv=None):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the loader's workers tokenize
    args, source = configure(argv)
    if source.get("first"):  # the toy's stage 2 starts from its stage-1 output
        print("no stage-1 output yet: running stage 1 first", flush=True)
        main(source["first"])
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    rank, world, device = init_distributed(args.device)
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} does not split evenly over the "
                         f"{world} processes")
    args.data_content = runs.data_content(args)  # --resume refuses other rows
    with runs.claimed(args) if rank == 0 else contextlib.nullcontext() as lock:
        result = train(args, source, rank, world, device, lock, argv)
    if result.get("before"):
        print(f"\nstage {args.stage}, held-out | before | after\n---|---|---")
        for key in result["before"]:
            print(f"{key} | {result['before'][key]:.3f} | {result['after'][key]:.3f}")
    return result


if __name__ == "__main__":
    try:
        main()
    finally:  # left to interpreter shutdown, gloo's threads can abort the process (SIGABRT)
        if dist.is_initialized():
            dist.destroy_process_group()
