"""Speed and memory: what GradCache, the embedding path, a training step and scoring cost, and
this GradCache step against the one most people run (sentence-transformers' cached loss).

    python -m tools.bench                      # 2 CPU cores, minutes: a markdown table, bench.json
    python -m tools.bench --quick              # every section at toy sizes (a smoke run)
    python -m tools.bench --gpu --seconds 300  # one GPU: stage 2 at batch 1,024, Qwen2-VL-2B size

Every figure is a ratio or a curve measured within one run (what is compared runs in turns), so
it holds on a noisy machine. Models are built from their config with random weights (speed and
memory do not depend on what a model learned), except the toy: the shipped toy/mllm. Peak
memory on the CPU is every tensor allocation and free the profiler records, summed in time
order, above what existed before: the tensors a GPU would hold (gradients, activations, the
saved graph, embeddings). Peak RSS would mix in Python objects, images and the allocator's
cache, and never goes down within a process.
"""
import argparse
import functools
import json
import os
import tempfile
import time

import torch
import torch.nn.functional as F

from tools import bench_step
from tools.bench_step import alternate, mb, peak_memory
import distill
import families
import model as M
from toy import shapes
import stages
import toy.default
import train

SIZES = {  # (full run, --quick)
    "gc": ((384, 32, 8, 2), (64, 8, 4, 1)),  # time: width, batch, chunk, repeats
    "curve": ((128, (64, 256, 1024), 16), (32, (8, 16, 32), 4)),  # memory: width, batches, chunk
    "embed": ((1536, 2, 2, 256), (64, 1, 1, 32)),  # width, layers, rows, tokens
    "toy": ((6, 2), (1, 1)), "real": ((1, 1), (1, 1)),  # steps, rounds per workers setting
    "real_batch": ((8, 4), (4, 4)), "scoring": ((1_000, 10_000, 100_000), (1_000, 3_000)),
    # the peer: LLaVA (vision, text widths, layers, image px, patch), batch, chunk, repeats
    "peer": (((256, 256, 2, 64, 16), 32, 8, 3), ((32, 32, 1, 32, 16), 8, 4, 1))}
GPU_PEER = ((1024, 1536, 1, 336, 28), 256, 32, 3)  # --gpu: real widths, one layer each


# ---------------------------------------------------------------- GradCache (§4.1)

def gradcache_setup(path, lora, n, chunk):
    """A model (LoRA r16, or every weight trainable) and n stage-1 pairs -> (model, chunks,
    grads(step): a step's flat gradients from zero, plain step, GradCache step)."""
    model, processor, family = stages.load_embedder(path)
    if lora:
        M.inject_lora(model, families.lora_targets(model, family), r=16, alpha=32, dropout=0.0)
    else:
        model.requires_grad_(True)
    params = [p for p in model.train().parameters() if p.requires_grad]
    pairs = toy.default.text_pairs(shapes.split_scenes(0)["train"], n, seed=0)
    texts = {k: [r[k] for r in pairs] for k in train.SIDES[1]}
    chunks = {k: [(list(range(a, min(a + chunk, n))), M.process(
        processor, family, texts=t[a:a + chunk])) for a in range(0, n, chunk)]
        for k, t in texts.items()}
    whole = {k: M.process(processor, family, texts=t) for k, t in texts.items()}
    teacher = F.normalize(torch.randn(2, n, 384, generator=torch.Generator().manual_seed(0)), dim=2)
    loss_fn = lambda reps: (distill.kd_loss(*reps.values(), *teacher, 0.05), {})  # noqa: E731

    def grads(step):
        model.zero_grad(set_to_none=True)
        step()
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                          for p in params])

    def plain():  # the whole batch in one forward with a graph, padded to its longest row
        loss_fn({k: M.embed(model, b) for k, b in whole.items()})[0].backward()

    def cached():
        bench_step.gradcache_step(model, chunks, loss_fn)
    return model, chunks, grads, plain, cached


def gradcache_cost(s, tmp):
    """GradCache's step time over a plain full-batch step's (LoRA and full fine-tuning) and over
    its own less the cache pass; its gradients against the plain step's (fp32, no dropout);
    peak memory against the batch."""
    (w, n, chunk, repeat), (cw, batches, cchunk) = s["gc"], s["curve"]

    def path(w):  # a LLaVA with a 2-layer decoder w wide (its vision tower does not run on text)
        return bench_step.build_llava(os.path.join(tmp, str(w)), bench_step.SMALL[0], dict(
            hidden_size=w, intermediate_size=3 * w, num_attention_heads=8, num_key_value_heads=8),
            32, 8, layers=2)
    out, rows = {"model": f"LLaVA, 2-layer Qwen2 decoder {w} wide, text pairs"}, []
    gc_path = path(w)
    for kind, ideal in (("lora", 1.5), ("full", 1.33)):
        model, chunks, grads, plain, cached = gradcache_setup(gc_path, kind == "lora", n, chunk)

        def cache_pass():  # GradCache's extra work: every chunk once more, without a graph
            with torch.no_grad():
                [M.embed(model, c) for side in chunks.values() for _, c in side]
        t = alternate({"plain": lambda: grads(plain), "gradcache": lambda: grads(cached),
                       "cache": cache_pass}, repeat)
        ref, got = grads(plain), grads(cached)
        g = out[kind] = {"batch": n, "chunk": chunk, **{f"{k}_s": v for k, v in t.items()},
                         "vs_plain": t["gradcache"] / t["plain"],
                         "vs_without_cache_pass": t["gradcache"] / (t["gradcache"] - t["cache"]),
                         "grad_max_abs_diff": float((got - ref).abs().max()),
                         "grad_max_abs": float(ref.abs().max())}
        rows += [(f"GradCache step time, {kind}, batch {n}, chunks of {chunk}",
                  f"{g['vs_plain']:.2f}x a plain step; {g['vs_without_cache_pass']:.2f}x itself "
                  "without the cache pass", f"~{ideal}x: one extra forward"),
                 (f"GradCache gradients vs the plain step's, {kind}", f"max diff "
                  f"{g['grad_max_abs_diff']:.0e} (largest {g['grad_max_abs']:.0e})", "~1e-6")]
    curve, curve_path = [], path(cw)
    for i, b in enumerate(batches):
        model, chunks, grads, plain, cached = gradcache_setup(curve_path, True, b, cchunk)
        if i == 0:  # one chunk's forward and backward with a graph: GradCache's floor
            one = mb(peak_memory(lambda: grads(lambda: M.embed(model, chunks["sent0"][0][1])
                                               .sum().backward()))[1])
        c = {"batch": b, "gradcache_mb": mb(peak_memory(lambda: grads(cached))[1]),
             "plain_mb": mb(peak_memory(lambda: grads(plain))[1]) if i < 2 else None,
             "embeddings_mb": mb(2 * 2 * b * cw * 4),  # two sides, values and gradients
             "loss_matrix_mb": mb(b * b * 4)}  # one (n, n) similarity matrix of the loss
        curve.append(c)
        rows.append((f"peak memory, batch {b} ({cw} wide, LoRA, chunks of {cchunk})", f"GradCache"
                     f" {c['gradcache_mb']} MB" + (f", plain {c['plain_mb']} MB" if i < 2 else ""),
                     f"one chunk's {one} MB + embeddings {c['embeddings_mb']} MB + the loss's "
                     f"(n, n) matrices, {c['loss_matrix_mb']} MB each"))
    out["memory"] = {"width": cw, "chunk": cchunk, "one_chunk_mb": one, "curve": curve}
    return out, rows


# ---------------------------------------------------------------- the embedding path (§3.1)

def embedding_path(s):
    """The base model's last hidden state (model.embed) against the full model with
    output_hidden_states=True (the official code's path), which also makes (n, L, V) logits."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    width, layers, n, length = s["embed"]
    text = {k: v for k, v in bench_step.QWEN2_VL_2B["text"].items() if k != "rope_parameters"}
    if width != text["hidden_size"]:  # --quick
        text.update(hidden_size=width, intermediate_size=2 * width, num_attention_heads=4)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**{**text, "num_hidden_layers": layers},
                                         tie_word_embeddings=True)).eval()
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, :length // 4] = 0  # left padding on one row
    batch = {"input_ids": torch.randint(0, text["vocab_size"], (n, length)), "attention_mask": mask}
    ours = lambda: M.embed(model, batch)  # noqa: E731
    official = lambda: F.normalize(M.last_token_pool(model(  # noqa: E731
        **batch, output_hidden_states=True, use_cache=False).hidden_states[-1], mask), dim=-1)
    with torch.no_grad():
        t = alternate({"ours": ours, "official": official}, 1, warm=False)
        (a, ours_peak), (b, official_peak) = peak_memory(ours), peak_memory(official)
    per_layer, head = t["ours"] / layers, t["official"] - t["ours"]  # seconds
    e = {"config": f"Qwen2-VL-2B's text config, {layers} of 28 layers, {n} x {length} tokens",
         "ours_s": t["ours"], "official_s": t["official"], "ours_mb": mb(ours_peak),
         "official_mb": mb(official_peak), "logits_mb": mb(n * length * text["vocab_size"] * 4),
         "max_abs_diff": float((a - b).abs().max()),  # computed from the two times, not measured:
         "official_over_ours_at_28_layers": (28 * per_layer + head) / (28 * per_layer)}
    return e, [(f"embedding, {e['config']}, no grad", f"last hidden state {e['ours_s']:.2f} s, "
                f"{e['ours_mb']} MB; output_hidden_states {e['official_s']:.2f} s, "
                f"{e['official_mb']} MB", f"same vectors (max diff {e['max_abs_diff']:.0e}); "
                f"the logits are {e['logits_mb']} MB; at 28 layers ~"
                f"{e['official_over_ours_at_28_layers']:.2f}x the time (computed)")]


# ---------------------------------------------------------------- the peer's GradCache

def peer_cached_loss(spec, tmp, device="cpu"):
    """bench_step.gradcache_step with Eq. 4 against sentence-transformers' own GradCache loss,
    CachedMultipleNegativesRankingLoss (CMNRL), on one SentenceTransformer (an untrained LLaVA
    written out as export.py writes one, LoRA r16 on every linear layer): the same rows (an
    image under an MMEB instruction -> a caption), batch and chunk size, fp32. Time per step and
    peak memory of each, and the gradients of this step with Eq. 4 replaced by the peer's loss
    (in-batch InfoNCE over cosines times scale 20, i.e. τ = 0.05) against the peer's."""
    import types
    import numpy as np
    from PIL import Image
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import \
        CachedMultipleNegativesRankingLoss
    import export
    import hardneg
    (vw, tw, layers, px, patch), n, chunk, repeat = spec
    path = bench_step.build_llava(os.path.join(tmp, "peer"), dict(
        hidden_size=vw, intermediate_size=4 * vw, num_attention_heads=vw // 64 or 2), dict(
        hidden_size=tw, intermediate_size=4 * tw, num_attention_heads=tw // 64 or 2,
        num_key_value_heads=tw // 64 or 2), px, patch, layers)
    export.write_sentence_transformers(path, *M.load_mllm(path))
    st = SentenceTransformer(path, device=device)
    net = st[0].auto_model  # this step embeds with the very same module: model.model is it
    M.inject_lora(net, families.lora_targets(net, "llava", include_vision=True), 16, 32, 0.0)
    for m in net.modules():  # B != 0, so A's gradients are compared too
        if isinstance(m, M.LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.02, generator=torch.Generator().manual_seed(0))
    net.to(device)
    params = [p for p in net.parameters() if p.requires_grad]
    rng, processor = np.random.default_rng(0), M.load_mllm(path)[1]
    images = [Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((px, px))
              for _ in range(n)]
    captions = [r["sent0"] for r in toy.default.text_pairs(shapes.split_scenes(0)["train"], n, 0)]
    task = toy.default.STAGE2_INSTRUCTIONS["i2t"]
    rows = [list(range(a, min(a + chunk, n))) for a in range(0, n, chunk)]
    ours = {"qry": [(i, M.process(processor, "llava", images=[images[j] for j in i],
                                  instructions=[task] * len(i))) for i in rows],
            "pos": [(i, M.process(processor, "llava", texts=[captions[j] for j in i]))
                    for i in rows]}
    theirs = [st.preprocess(images, prompt=task), st.preprocess(captions)]  # its collator's
    peer = CachedMultipleNegativesRankingLoss(st, scale=20.0, mini_batch_size=chunk)
    shim = types.SimpleNamespace(model=net)  # M.embed reads model.model
    losses = {}

    def step(name):  # -> the step's flat gradients
        net.zero_grad(set_to_none=True)
        if name == "peer":
            loss = peer([{k: v.to(device) if torch.is_tensor(v) else v for k, v in f.items()}
                         for f in theirs], None)
            loss.backward()
        else:
            loss = bench_step.gradcache_step(shim, ours, lambda r: (hardneg.hardneg_loss(
                r["qry"], r["pos"], k=8, beta=0.1, tau=0.02) if name == "eq4" else
                hardneg.masked_infonce_loss(r["qry"], r["pos"], None, 1 / peer.scale), {}),
                device, None)[0]
        if device != "cpu":
            torch.cuda.synchronize(device)
        losses[name] = float(loss.detach())
        return torch.cat([p.grad.flatten() for p in params]).cpu()
    steps = {name: functools.partial(step, name) for name in ("eq4", "infonce", "peer")}
    t = alternate(steps, repeat)
    mem = {name: mb(peak_memory(fn, device)[1]) for name, fn in steps.items()}
    got, ref = steps["infonce"](), steps["peer"]()
    p = {"device": torch.cuda.get_device_name(device) if device != "cpu" else "cpu", "batch": n,
         "chunk": chunk, "width": [vw, tw], "layers": layers, "image_px": px,
         **{f"{k}_s": v for k, v in t.items()}, **{f"{k}_mb": v for k, v in mem.items()},
         "eq4_over_peer": t["eq4"] / t["peer"], "infonce_over_peer": t["infonce"] / t["peer"],
         "loss_infonce": losses["infonce"], "loss_peer": losses["peer"],
         "grad_max_abs_diff": float((got - ref).abs().max()),
         "grad_max_abs": float(ref.abs().max())}
    what = f"LLaVA {vw}/{tw} wide, {layers} layer(s), {px}-px images, batch {n}, chunks of {chunk}"
    return p, [(f"one stage-2 step vs sentence-transformers' CMNRL, {what} ({p['device']})",
                f"Eq. 4 {t['eq4']:.2f} s, {mem['eq4']} MB; InfoNCE {t['infonce']:.2f} s, "
                f"{mem['infonce']} MB; CMNRL {t['peer']:.2f} s, {mem['peer']} MB",
                f"{p['eq4_over_peer']:.2f}x the peer's time with Eq. 4 (same model and rows)"),
               ("its gradients with InfoNCE at τ 0.05 vs CMNRL's (scale 20)",
                f"max diff {p['grad_max_abs_diff']:.0e} (largest {p['grad_max_abs']:.0e}); "
                f"losses {losses['infonce']:.6f} / {losses['peer']:.6f}", "~1e-6")]


# ---------------------------------------------------------------- scoring

def topk(queries, candidates, k=10, chunk=16384):
    """Each query's k best candidates by cosine, streaming the candidates in chunks with a
    running top k: memory is (queries, chunk) scores, never (queries, candidates)."""
    best = torch.full((len(queries), k), -float("inf")), torch.zeros(len(queries), k).long()
    for a in range(0, len(candidates), chunk):
        top = (queries @ candidates[a:a + chunk].T).topk(min(k, len(candidates) - a), dim=1)
        values = torch.cat([best[0], top.values], 1)
        index = torch.cat([best[1], top.indices + a], 1)
        keep = values.topk(k, dim=1).indices
        best = values.gather(1, keep), index.gather(1, keep)
    return best


def scoring(s, n_queries=1000, d=1536):
    """Time and peak memory to rank candidates for 1k queries (d: Qwen2-VL-2B's width); 1M is
    extrapolated from the largest measured: time is linear in candidates, memory flat."""
    g = torch.Generator().manual_seed(0)
    queries, out = F.normalize(torch.randn(n_queries, d, generator=g), dim=-1), []
    for n in s["scoring"]:
        cands = F.normalize(torch.randn(n, d, generator=g), dim=-1)
        t = alternate({"topk": lambda: topk(queries, cands)}, 1, warm=False)["topk"]
        out.append({"candidates": n, "seconds": t, "peak_mb": mb(peak_memory(
            lambda: topk(queries, cands))[1]), "candidates_mb": mb(cands.numel() * 4)})
    out.append({"candidates": 1_000_000, "extrapolated": True, "seconds": t * 1e6 / n,
                "peak_mb": out[-1]["peak_mb"], "candidates_mb": mb(1e6 * d * 4)})
    return out, [(f"top 10 of {r['candidates']:,} candidates for {n_queries:,} queries, d {d}" + (
        " (EXTRAPOLATED)" if r.get("extrapolated") else ""), f"{r['seconds']:.2f} s, "
        f"{r['peak_mb']} MB", f"plus the candidates' {r['candidates_mb']} MB") for r in out]


# ---------------------------------------------------------------- the report

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="every section at toy sizes")
    p.add_argument("--gpu", action="store_true", help="only stage 2 at batch 1,024 on one GPU")
    p.add_argument("--seconds", type=float, default=300, help="--gpu: keep stepping this long")
    p.add_argument("--peak-tflops", type=float, help="--gpu: the card's dense bf16 peak")
    p.add_argument("--out", default="bench.json")
    a = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the loader's workers tokenize
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # the profiler's log lines, one per call
    s, table, t0 = {k: v[a.quick] for k, v in SIZES.items()}, [], time.time()
    cpu = [x.split(":")[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name")] \
        if os.path.exists("/proc/cpuinfo") else [None]
    r = {"machine": {"cpu": cpu[0], "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                     "torch": torch.__version__, "load_before": os.getloadavg()}}
    if a.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA GPU (--quick runs its code on the CPU, at toy size)")
    with tempfile.TemporaryDirectory() as tmp:
        for name, run in [("gpu", lambda: bench_step.gpu_stage2("cuda", a.seconds, peak_flops=(
                a.peak_tflops or 0) * 1e12 or None)),
                ("peer", lambda: peer_cached_loss(GPU_PEER, tmp, "cuda"))] if a.gpu else [
                ("gradcache", lambda: gradcache_cost(s, tmp)),
                ("embedding_path", lambda: embedding_path(s)),
                ("throughput", lambda: zip(*bench_step.throughputs(s, tmp, a.quick))),
                ("scoring", lambda: scoring(s)),
                ("peer", lambda: peer_cached_loss(s["peer"], tmp))]:
            r[name], rows = run()
            table += sum(rows, []) if name == "throughput" else rows
            print(f"{name}: done at {time.time() - t0:.0f} s", flush=True)
    if a.quick:  # the GPU figure's code, on the CPU at toy size
        r["gpu_code_path"] = bench_step.gpu_stage2("cpu", 0, bench_step.TINY, 8, 4)[0]
    r["machine"].update(load_after=os.getloadavg(), seconds=time.time() - t0)
    print("\nfigure | measured | ideal / note\n---|---|---")
    print("\n".join(" | ".join(row) for row in table))
    stages.save_atomic(a.out, json.dumps(r, indent=1))
    return r


if __name__ == "__main__":
    main()
