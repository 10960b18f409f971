"""UniME training: one hand-written loop for both stages, with GradCache inside.

  python train.py --stage 1   # §3.2 textual discriminative knowledge distillation (Eq. 2)
  python train.py --stage 2   # §3.3 hard-negative enhanced instruction tuning (Eq. 3-4)

Without --model, a stage runs the embedded default (toy/default.py: a tiny pretrained LLaVA, the shapes
world, the all-MiniLM-L6-v2 teacher). With --model, --data is the paper's data: SimCSE's NLI
file (stage 1) or MMEB-train subsets (stage 2); --preset paper sets the paper's hyperparameters
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

import checkpoint
import config
import data
import distill
import families
import hardneg
import model as M
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


def pair_input(stage, row, side):
    """(text, image, instruction) of one side of a pair: stage 1 embeds a sentence under the
    "in one word" prompt (§3.2); stage 2 embeds MMEB's own prompt text and image (§3.3)."""
    if stage == 1:
        return row[side], None, None
    return None, row[f"{side}_image"], row[side]


class StepBatches(torch.utils.data.Dataset):
    """Item `step` = this rank's share of that step's global batch, ready for the model: per
    side, chunks of one modality, tokenized with their images decoded and resized (padding per
    chunk). Stage-2 rows are MMEB's: its raw format, cut to the family's official max_len
    (families.py). DataLoader workers prepare the next steps while the current one trains; the
    inputs stay on the CPU until their chunk's forward."""

    def __init__(self, args, source, processor, family, rank, world):
        self.args, self.source, self.processor, self.family = args, source, processor, family
        self.rank, self.world = rank, world
        self.max_length = families.FAMILIES[family].get("max_len") if args.stage == 2 else None

    def __len__(self):
        return self.args.max_steps

    def image(self, path):
        # §4.1: 336 x 336 in stage 2 (--image-size); Phi-3.5-V's processor crops instead
        image = data.load_image(path)
        return families.prepare_image(self.family, image, self.args.image_size)

    def __getitem__(self, step):
        a = self.args
        ids = batch_rows(step, self.source["n_rows"], a.batch_size, a.seed)
        n = len(ids) // self.world
        ids = ids[self.rank * n:(self.rank + 1) * n]  # this rank's shard
        rows = self.source["rows"](ids)
        sides = {}
        for side in SIDES[a.stage] + (("hard_neg",) if a.hard_negatives else ()):
            inputs = [pair_input(a.stage, r, side) for r in rows]
            if a.stage == 1:  # each sentence cut to --max-text-tokens: memory stays bounded
                texts = distill.cut_texts(self.processor, [x[0] for x in inputs], a.max_text_tokens)
                inputs = [(t, None, None) for t in texts]
            sides[side] = [(idx, M.process(
                self.processor, self.family, [inputs[i][0] for i in idx],
                [self.image(inputs[i][1]) if inputs[i][1] else None for i in idx],
                [inputs[i][2] for i in idx], self.max_length))
                for idx in M.modality_chunks([x[1] is not None for x in inputs], a.chunk_size)]
        return {"ids": torch.tensor(ids), "sides": sides}


# ---------------------------------------------------------------- GradCache (§4.1)

def gradcache_step(model, sides, loss_fn, device, amp):
    """One large-batch step whose memory follows the chunk (Gao et al. 2021). sides: {name:
    [(row positions, processed chunk), ...]}; loss_fn({name: (n, d)}) -> (loss, stats). Leaves
    in .grad exactly the parameter gradients of one full-batch step."""
    def forward(chunk):  # a copy on the device: a processor output's .to() would move the
        # chunk itself, and every chunk of the step would then stay on the device to its end
        with M.autocast(device, amp):
            return M.embed(model, {k: v.to(device, non_blocking=True) if torch.is_tensor(v)
                                   else v for k, v in chunk.items()})

    def rng_state():
        return torch.get_rng_state(), torch.cuda.get_rng_state(device) if cuda else None
    cuda = torch.device(device).type == "cuda"
    # 1. embed every chunk without a graph, remembering the RNG state before each
    states, reps = {}, {}
    with torch.no_grad():
        for name, chunks in sides.items():
            states[name], outs = [], []
            for idx, chunk in chunks:
                states[name].append(rng_state())
                outs.append((idx, forward(chunk)))
            rep = torch.empty(sum(len(i) for i, _ in outs), outs[0][1].shape[1], device=device)
            for idx, e in outs:
                rep[torch.as_tensor(idx, device=device)] = e  # back to row order
            reps[name] = rep.requires_grad_()
    # 2. the loss of the whole batch, and its gradient at every embedding
    loss, stats = loss_fn(reps)
    loss.backward()
    # 3. re-embed each chunk with a graph under its saved RNG state (dropout repeats), and
    #    backpropagate the cached gradient through it
    for name, chunks in sides.items():
        for (idx, chunk), (cpu, gpu) in zip(chunks, states[name]):
            with torch.random.fork_rng(devices=[device] if cuda else []):
                torch.set_rng_state(cpu)
                if gpu is not None:
                    torch.cuda.set_rng_state(gpu, device)
                grad = reps[name].grad[torch.as_tensor(idx, device=device)]
                (forward(chunk) * grad).sum().backward()
    return loss.detach(), stats


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


# ---------------------------------------------------------------- the stage's loss

def stage_loss(args, reps, teacher, generator, world):
    """Eq. 2 (stage 1) or Eq. 4 (stage 2) over the global batch: each rank holds its shard's
    embeddings and gathers the others'. Every rank computes the same loss L, but its backward
    reaches only its own shard; DDP-style averaging divides by `world`, so the loss is scaled
    by it and the averaged gradient is dL/dθ."""
    g = {side: gather_with_grad(e) for side, e in reps.items()}
    if args.stage == 1:
        t = {side: gather_with_grad(rows) for side, rows in teacher.items()}
        loss = distill.kd_loss(g["sent0"], g["sent1"], t["sent0"], t["sent1"], args.tau,
                               args.kd_direction, g.get("hard_neg"), t.get("hard_neg"))
        stats = {}
    elif args.loss == "unime":
        loss, stats = hardneg.hardneg_loss(g["qry"], g["pos"], args.k, args.beta, args.tau,
                                           args.negatives, generator, return_stats=True)
    elif args.loss == "masked-infonce":  # not UniME: a baseline to compare Eq. 4 with
        loss, stats = hardneg.masked_infonce_loss(g["qry"], g["pos"], args.beta, args.tau,
                                                  return_stats=True)
    else:  # "hardness-weighted", not UniME: LLaVE's loss, a baseline
        loss, stats = hardneg.hardness_weighted_loss(g["qry"], g["pos"], args.alpha, args.beta,
                                                     args.tau, return_stats=True)
    return loss * world, stats


# ---------------------------------------------------------------- the loop

def add_trainable(model, family, args):
    """Stage 1: a LoRA on the LLM only, vision tower and projector frozen (§3.2). Stage 2: a
    new LoRA on the whole stage-1-merged MLLM, vision side included (§3.3); the layers per
    family are families.lora_targets. --lora-r 0 fine-tunes every weight instead. Returns the
    LoRA shape and its layers (None for full fine-tuning)."""
    if args.lora_r == 0:
        for p in model.parameters():
            p.requires_grad_(True)
        return None
    lora = dict(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                targets=families.lora_targets(model, family, include_vision=args.stage == 2))
    M.inject_lora(model, **lora)
    return lora


def checkpoint_activations(model):
    """HF's gradient checkpointing (activation checkpointing from transformers 5.24), non-reentrant:
    its recomputation restores the RNG state, so LoRA dropout repeats, as GradCache needs."""
    enable = getattr(model, "activation_checkpointing_enable", None) or \
        model.gradient_checkpointing_enable
    enable({"use_reentrant": False})


def train(args, source, argv=None):
    """The UniME loop for either stage -> the held-out report before and after (or {}).
    argv: the command line, for the resume command printed when a signal stops the run."""
    rank, world, device = init_distributed(args.device)
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} does not split evenly over the "
                         f"{world} processes")
    main_rank = rank == 0
    with checkpoint.claimed(args) if main_rank else contextlib.nullcontext() as lock:
        weights, amp = M.precision(device, args.dtype)
        report = source["report"]
        if args.stage == 1:  # first: a bad cache fails in seconds, and the teacher's memory
            M.require_model(args.model, args.trust_remote_code)  # is freed before the student
            teacher, index, teacher_rows = distill.teacher_targets(args, source, device)  # loads
            if source["heldout"]:
                report = distill.teacher_report(teacher, index, source["heldout"], device, amp,
                                                args.max_text_tokens)
        model, processor, family = M.load_embedder(args.model, device, weights,
                                                   args.trust_remote_code, args.family,
                                                   load_in_4bit=args.load_in_4bit)
        lora = add_trainable(model, family, args)
        if args.gradient_checkpointing:
            checkpoint_activations(model)
        params = [p for p in model.parameters() if p.requires_grad]
        print(f"trainable: {sum(p.numel() for p in params):,} of {M.count_parameters(model):,}")
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
        generator = torch.Generator().manual_seed(args.seed)  # random negatives, on every rank
        settings = checkpoint.run_config(args)
        start = checkpoint.load(args.out, model, opt, generator, settings) if args.resume else 0
        before = report(model.eval(), processor, family) if report and main_rank else {}
        batches = iter(torch.utils.data.DataLoader(
            StepBatches(args, source, processor, family, rank, world), batch_size=None,
            sampler=range(start, args.max_steps), num_workers=args.workers,
            prefetch_factor=1 if args.workers else None,  # an item is a whole step: 1 ahead each
            pin_memory=torch.device(device).type == "cuda",
            worker_init_fn=functools.partial(checkpoint.worker_init, lock),
            generator=torch.Generator()))  # its own: the global RNG (dropout) stays untouched
        log = checkpoint.open_log(args.out, start) if main_rank else None
        history, t0 = [], time.time()
        cadence = checkpoint.Cadence(args, sys.argv[1:] if argv is None else argv, world, device)
        for step in cadence.steps(start):
            lr = lr_at(step, args.lr, args.warmup, args.max_steps)
            for group in opt.param_groups:
                group["lr"] = lr
            waited = time.time()
            batch = next(batches)  # this rank's rows of the global batch, processed per chunk
            waited = time.time() - waited  # > 0: the step waited for its inputs (--workers)
            if args.stage == 1:  # the teacher's embeddings of the same sentences, by row id: the
                targets = {k: teacher[ids[batch["ids"]]].to(device)  # matrix stays on the CPU
                           for k, ids in teacher_rows.items()}
            model.train()
            loss, stats = gradcache_step(model, batch["sides"], lambda reps: stage_loss(
                args, reps, targets if args.stage == 1 else None, generator, world), device, amp)
            average_gradients(params, world)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip).item()  # pre-clip
            loss = loss.item() / world
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise SystemExit(f"step {step + 1}: the loss ({loss}) or the gradient norm "
                                 f"({grad_norm}) is not finite; this step was not applied, and "
                                 f"{args.out}/checkpoint.pt (if any) is the last good state. "
                                 f"Lower --lr, raise --tau, or check the data.")
            opt.step()
            opt.zero_grad(set_to_none=True)
            rate = (step + 1 - start) * args.batch_size / (time.time() - t0)
            record = {"step": step + 1, "loss": round(loss, 5), "lr": lr,
                      "grad_norm": round(grad_norm, 5), "samples_per_s": round(rate, 1),
                      "input_wait_s": round(waited, 3),
                      **{k: round(v, 4) for k, v in stats.items()}}
            if args.stage == 2:
                history.append(record)
                # collapsed, all similarities are equal and the loss is ln(1 + k): the full-
                # batch losses have batch - 1 negatives, each weighing e^α when hardness-weighted
                hardneg.collapse_guard(history, args.k if args.loss == "unime" else
                               (args.batch_size - 1) * math.exp(args.alpha or 0.0))
            if not main_rank:
                cadence.after_step(step + 1)
                continue  # other ranks neither log nor save
            log.write(json.dumps(record) + "\n")
            if (step + 1) % args.log_every == 0 or step + 1 == args.max_steps:
                eta = (args.max_steps - step - 1) * args.batch_size / rate
                print(f"step {step + 1}/{args.max_steps} loss {loss:.4f} lr {lr:.2e} grad "
                      f"{grad_norm:.3f} {rate:.0f} samples/s ETA {eta:.0f}s", flush=True)
            cadence.after_step(step + 1, lambda: (log.flush(), checkpoint.save(
                args.out, model, opt, step + 1, generator, settings)))  # stops after a signal
        if not main_rank:
            return {}
        log.close()
        M.save_stage_output(args.out, model, processor, args.model, args.stage, family, lora)
        after = report(model.eval(), processor, family) if report else {}
    if before:
        print(f"\nstage {args.stage}, held-out | before | after\n---|---|---")
        for key in before:
            print(f"{key} | {before[key]:.3f} | {after[key]:.3f}")
    return {"before": before, "after": after}


# ---------------------------------------------------------------- the command line

def main(argv=None):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the loader's workers tokenize
    args = config.parse_args(argv)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    if args.model is None:  # the embedded default: toy/default.py's pretrained tiny LLaVA and data
        source = toy.default.setup(args, run_train=main)
    else:
        source = config.read_data(args)
    return train(config.finish_args(args, source), source, argv)


if __name__ == "__main__":
    main()
