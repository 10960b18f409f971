"""How fast a UniME training step runs, and where its time goes (tools/bench.py prints it); the
measuring helpers every section of tools/bench.py uses (peak memory, timings in turns).

On the CPU: train.py's loop over real inputs (the toy; a LLaVA at real widths on text pairs and
on JPEG files), timed in parts (image decoding, processor, forward, backward, loss, gradient
exchange, optimizer), and with 0, 1, 2 loader workers preparing the next steps.

On one GPU (`python -m tools.bench --gpu`): stage 2 as the paper runs it (§4.1, Table 6): global
batch 1,024 in GradCache chunks of 32, LoRA r16 on the whole MLLM, Eq. 4 with k=8, bf16, on
Qwen2-VL-2B's architecture with random weights. A query is a 336-px image and 24 tokens, a
target 16 tokens of text; the inputs are made once and pinned, so this times the model's step
(the CPU figures give the input pipeline's cost per sample). Model FLOPs per step = 8·N·tokens:
forward 2N, backward 4N, GradCache's extra forward 2N; N·tokens is the vision tower's
parameters times its patches plus the language model's (without its embedding table) times its
tokens; attention scores are left out. With LoRA the backward skips the frozen weights'
gradients, so the hardware does about 6N of the 8N counted.
"""
import argparse
import os
import statistics
import time
from unittest import mock

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

import config
import data
import distill
import families
import hardneg
import model as M
from toy import shapes
import stages
import toy.default
import train

# LLaVA at real widths, 1 layer each: a CLIP ViT-L/14 layer (1024 wide) at 336 px with 28-px
# patches = 144 image tokens (Qwen2-VL-2B's count at 336 px) and a Qwen2-1.5B layer (1536 wide,
# 8960 MLP, 12 heads, 2 KV heads); the toy's tokenizer. SMALL: the same at toy size (--quick).
REAL = (dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16),
        dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12,
             num_key_value_heads=2), 336, 28)
SMALL = (dict(hidden_size=32, intermediate_size=64, num_attention_heads=2),
         dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2),
         64, 16)
QWEN2_VL_2B = dict(  # Qwen/Qwen2-VL-2B-Instruct's config.json
    text=dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
              num_attention_heads=12, num_key_value_heads=2, rope_parameters=dict(
                  rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 24])),
    vision=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2),
    image_token_id=151655, vision_start_token_id=151652, vision_end_token_id=151653)
TINY = dict(QWEN2_VL_2B, vision=dict(QWEN2_VL_2B["vision"], depth=1, embed_dim=32, hidden_size=64,
                                     num_heads=2),
            text=dict(QWEN2_VL_2B["text"], hidden_size=64, intermediate_size=128,
                      num_hidden_layers=1, num_attention_heads=4, rope_parameters=dict(
                          rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3])))
PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12,
             "H800": 989e12, "A100": 312e12}  # dense bf16, first match in the device name


# ---------------------------------------------------------------- on the CPU

def build_llava(path, vision, text, image_size, patch, layers=1):
    """A random-init LLaVA (CLIP tower, projector, Qwen2 decoder) with the toy's tokenizer,
    saved like a downloaded checkpoint: the bench runs a real model's code path."""
    from transformers import (AutoTokenizer, CLIPImageProcessorPil, CLIPVisionConfig,
                              LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
                              Qwen2Config)
    tok = AutoTokenizer.from_pretrained(toy.default.PRETRAINED)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=CLIPVisionConfig(**vision, num_hidden_layers=layers, image_size=image_size,
                                       patch_size=patch),
        text_config=Qwen2Config(**text, num_hidden_layers=layers, vocab_size=len(tok),
                                pad_token_id=tok.pad_token_id),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=(image_size // patch) ** 2, vision_feature_layer=-1))
    stages.save_pretrained(path, model, LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={
            "height": image_size, "width": image_size}), tokenizer=tok, patch_size=patch,
        num_additional_image_tokens=1, vision_feature_select_strategy="default"))
    return path


def jpeg_rows(folder, n):
    """Stage-2 rows on 640x480 JPEG files: the image on the query side in two rows of three, on
    the target side in the third (MMEB mixes both)."""
    os.makedirs(folder, exist_ok=True)
    rows, rng = [], np.random.default_rng(0)
    for i in range(n):
        path, q = os.path.join(folder, f"{i}.jpg"), i % 3 != 2
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).resize(
            (640, 480), Image.BICUBIC).save(path, quality=90)  # smooth, photo-like content
        rows.append({"qry": toy.default.STAGE2_INSTRUCTIONS["i2t" if q else "t2i"], "qry_image":
                     path if q else None, "pos": f"caption {i}", "pos_image": None if q else path})
    return rows


def peak_memory(fn, device="cpu"):
    """(fn(), peak bytes of tensors allocated while fn ran, above those before it): on the CPU
    from the profiler's record (tools/bench.py's docstring says why), on a GPU CUDA's own."""
    if device != "cpu":
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return fn(), torch.cuda.max_memory_allocated(device) - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        out = fn()
    now = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results
                            .events() if e.name() == "[memory]"):
        now += nbytes
        peak = max(peak, now)
    return out, peak


def alternate(fns, repeat, warm=True):
    """Median seconds of each function, run in turns (a, b, a, b, ...) so that a change of load
    hits all alike; after one unmeasured round if `warm`."""
    times = {name: [] for name in fns}
    for r in range(repeat + warm):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name] += [time.perf_counter() - t] if r or not warm else []
    return {name: statistics.median(t) for name, t in times.items()}


def mb(nbytes):
    return round(nbytes / 2**20, 1)


def timed(clock, name, f):
    """f, adding its seconds to clock[name] (clock None: f itself)."""
    def run(*a, **k):
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            clock[name] = clock.get(name, 0.0) + time.perf_counter() - t
    return f if clock is None else run


def gradcache_step(model, sides, loss_fn, device="cpu", amp=None):
    """GradCache's three steps (§4.1) around loss_fn({side: (n, d)}) -> (loss, stats), as
    train.train_step runs them around the stage's loss (one process, no optimizer step)."""
    reps, states = train.gradcache_embed(model, sides, device, amp)
    loss, stats = loss_fn(reps)
    loss.backward()
    train.gradcache_backward(model, sides, reps, states, device, amp)
    return loss.detach(), stats


def run_steps(args, source, model, processor, family, workers, steps, clock=None):
    """train.py's loop without log or checkpoint, stepping with train.train_step itself ->
    per step after the first (start-up): (seconds, seconds waiting for the loader, tokens).
    `clock` collects where time goes: forward, loss, gradient exchange and optimizer are timed
    inside the step; its backward is the rest of the step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    g = torch.Generator().manual_seed(0)
    teacher = {k: torch.randn(source["n_rows"], 384, generator=g) for k in train.SIDES[1]}
    loader = iter(torch.utils.data.DataLoader(
        train.StepBatches(args, source, processor, family, 0, 1), batch_size=None,
        sampler=range(steps + 1), num_workers=workers, prefetch_factor=1 if workers else None,
        generator=torch.Generator()))
    out = []
    for step in range(steps + 1):
        if step == 1 and clock is not None:
            clock.clear()  # the first step starts the workers and warms the allocator
        t0 = time.perf_counter()
        batch = next(loader)
        t1 = time.perf_counter()
        targets = {k: t[batch["ids"]] for k, t in teacher.items()} if args.stage == 1 else None
        # world 2 in a one-process group: the loss is doubled and the gradients averaged back,
        # so the gradient exchange runs its all-reduce as on several GPUs
        with mock.patch.object(opt, "step", timed(clock, "optimizer", opt.step)):
            timed(clock, "step", train.train_step)(args, step, model.train(), opt, batch,
                                                   targets, g, 2, "cpu", None)
        tokens = sum(int(c["attention_mask"].sum()) for v in batch["sides"].values() for _, c in v)
        out += [(time.perf_counter() - t0, t1 - t0, tokens)] if step else []
    return out


def throughput(name, args, source, steps, rounds, workers=(0, 1, 2)):
    """Samples/s and tokens/s of a stage, where a step's time goes (workers=0), and step time
    and loader wait with 0, 1, 2 workers preparing the next steps, in alternating rounds."""
    model, processor, family = stages.load_embedder(args.model)
    train.add_trainable(model, family, args)
    clock, timings = {}, {w: [] for w in workers}
    with mock.patch.object(data, "load_image", timed(clock, "decode", data.load_image)), \
            mock.patch.object(M, "process", timed(clock, "processor", M.process)), \
            mock.patch.object(M, "embed", timed(clock, "forward", M.embed)), \
            mock.patch.object(distill, "kd_loss", timed(clock, "loss", distill.kd_loss)), \
            mock.patch.object(hardneg, "hardneg_loss", timed(clock, "loss", hardneg.hardneg_loss)), \
            mock.patch.object(train, "average_gradients", timed(
                clock, "gradient exchange", train.average_gradients)):
        timings[0] += run_steps(args, {**source, "rows": timed(clock, "rows (toy: drawing)", source[
            "rows"])}, model, processor, family, 0, steps, clock)  # timed in parts, then rounds:
    for w in (workers[1:] + workers) * rounds:
        if len(timings[w]) < steps * rounds:
            timings[w] += run_steps(args, source, model, processor, family, w, steps)
    total = sum(t for t, _, _ in timings[0][:steps])
    clock["backward"] = clock.pop("step") - sum(clock[k] for k in (
        "forward", "loss", "gradient exchange", "optimizer"))
    clock["other"] = total - sum(clock.values())
    step = {w: statistics.median(t for t, _, _ in r) for w, r in timings.items()}
    inputs = sum(clock.get(k, 0) for k in ("decode", "processor", "rows (toy: drawing)"))
    t = {"config": name, "stage": args.stage, "batch": args.batch_size, "chunk": args.chunk_size,
         "samples_per_s": args.batch_size / step[0], "input_ms_per_sample": 1000 * inputs / steps
         / args.batch_size, "tokens_per_s": statistics.mean(n for *_, n in timings[0]) / step[0],
         "shares": {k: v / total for k, v in clock.items()}, "step_s": step,
         "wait_s": {w: statistics.mean(x for _, x, _ in r) for w, r in timings.items()}}
    shares = sorted(t["shares"].items(), key=lambda kv: -kv[1])
    return t, [(f"{name} stage {args.stage}, batch {args.batch_size}", f"{t['samples_per_s']:.1f}"
                f" samples/s, {t['tokens_per_s']:.0f} tokens/s; inputs "
                f"{t['input_ms_per_sample']:.1f} ms/sample", ", ".join(
                    f"{k} {v:.0%}" for k, v in shares if v >= 0.005)),
               (f"  s/step (loader wait), workers {', '.join(map(str, workers))}", ", ".join(
                   f"{step[w]:.3f} ({t['wait_s'][w]:.3f})" for w in workers), "")]


def throughputs(s, tmp, quick):
    """The toy's two stages as train.py runs them, and a real-width LLaVA on text pairs (stage
    1) and on JPEG files at 336 px (stage 2)."""
    configs, small = [], ["--batch-size", "8", "--chunk-size", "4"] if quick else []
    for stage, flags in ((1, small), (2, ["--init", "base", *small])):
        args, source = train.configure(["--stage", str(stage), *flags])
        configs.append(("toy", args, source, *s["toy"]))
    real = build_llava(os.path.join(tmp, "real"), *(SMALL if quick else REAL))
    for stage, rows in ((1, toy.default.text_pairs(shapes.split_scenes(0)["train"], 500, 0)),
                        (2, jpeg_rows(os.path.join(tmp, "jpeg"), 48))):
        n = s["real_batch"][stage - 1]
        source = {"n_rows": len(rows), "rows": lambda ids, rows=rows: [rows[i] for i in ids],
                  "heldout": [], "report": None}
        size = ["--image-size", str((SMALL if quick else REAL)[2])] if stage == 2 else []
        args = config.resolve(config.parse_args([
            "--stage", str(stage), "--model", real, "--batch-size", str(n), "--chunk-size",
            str(n // 2), "--out", os.path.join(tmp, f"out{stage}"), *size]))
        configs.append(("real-width LLaVA", config.fit_to_data(args, len(rows)), source,
                        *s["real"]))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # exchange
    out = [throughput(*run) for run in configs]
    dist.destroy_process_group()
    return out


# ---------------------------------------------------------------- one GPU

def gpu_stage2(device, seconds, spec=QWEN2_VL_2B, batch=1024, chunk=32, peak_flops=None):
    """Stage 2 at the paper's batch on one GPU (see the top of this file), stepping for
    `seconds` after one warm-up step -> (figures, table rows)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    weights, amp = M.precision(device)
    cuda = torch.device(device).type == "cuda"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(
            text_config=spec["text"], vision_config=spec["vision"], tie_word_embeddings=True,
            **{k: v for k, v in spec.items() if k.endswith("_id")})).to(weights)
    lm = model.model.language_model
    n_vision = M.count_parameters(model.model.visual)
    n_lm = M.count_parameters(lm) - lm.embed_tokens.weight.numel()
    M.inject_lora(model, families.lora_targets(model, "qwen2_vl", include_vision=True), r=16,
                  alpha=64, dropout=0.1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    v = spec["vision"]
    grid = 336 // v["patch_size"]
    merged = grid ** 2 // v["spatial_merge_size"] ** 2  # image tokens the language model reads

    def inputs(n, image):  # one chunk on the host, as Qwen2-VL's processor returns it
        ids = torch.randint(0, 150_000, (n, 2 + merged + 24 if image else 16))
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if image:
            ids[:, 0] = spec["vision_start_token_id"]
            ids[:, 1 + merged] = spec["vision_end_token_id"]
            ids[:, 1:1 + merged] = spec["image_token_id"]
            out.update(pixel_values=torch.randn(n * grid ** 2, 3 * 2 * v["patch_size"] ** 2),
                       image_grid_thw=torch.tensor([[1, grid, grid]] * n),
                       mm_token_type_ids=(ids == spec["image_token_id"]).int())
        return {k: t.pin_memory() if cuda else t for k, t in out.items()}
    rows = [list(range(a, min(a + chunk, batch))) for a in range(0, batch, chunk)]
    sides = {"qry": [(i, inputs(len(i), True)) for i in rows],
             "pos": [(i, inputs(len(i), False)) for i in rows]}
    tokens = sum(int(c["attention_mask"].sum()) for side in sides.values() for _, c in side)
    flops = 8 * (n_vision * batch * grid ** 2 + n_lm * tokens)

    args = argparse.Namespace(stage=2, loss="unime", k=min(8, batch - 1), beta=0.1, tau=0.02,
                              negatives="hard", grad_clip=1.0, out="(bench)")  # Table 6
    g = torch.Generator().manual_seed(0)

    def step():
        t = time.perf_counter()
        train.train_step(args, 0, model.train(), opt, {"sides": sides}, None, g, 1, device, amp)
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - t
    step()  # warm-up: kernels, the allocator's pools
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times, start = [], time.perf_counter()
    while not times or time.perf_counter() - start < seconds:
        times.append(step())
    t = statistics.median(times)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak_flops = peak_flops or next((f for k, f in PEAK_BF16.items() if k in name), None)
    g = {"device": name, "batch": batch, "chunk": chunk, "steps": len(times), "step_s": t,
         "samples_per_s": batch / t, "tokens_per_step": tokens,
         "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
         "params_vision": n_vision, "params_language_model": n_lm,
         "model_tflops_per_step": flops / 1e12, "peak_tflops": peak_flops and peak_flops / 1e12,
         "mfu": peak_flops and flops / t / peak_flops}
    mfu = f"MFU {g['mfu']:.1%} of {g['peak_tflops']:.0f}" if g["mfu"] else "--peak-tflops: MFU"
    return g, [(f"stage 2 on {name}, Qwen2-VL-2B size, batch {batch}, chunks of {chunk}",
                f"{g['samples_per_s']:.1f} samples/s ({t:.1f} s/step, {len(times)} steps), peak "
                f"{g['peak_memory_gib'] or 0:.1f} GiB", f"{g['model_tflops_per_step']:.0f} model "
                f"TFLOPs/step, {mfu}")]
