"""The paper's analyses as pictures (UniME §5, Figs. 4-6), for the toy or a real caption set.
Figure numbers are arXiv v4's, the current version (v1 numbers the same figures 3-5).

- Fig. 4 discrimination: cross-modal cosine matrices of 50 image-caption pairs per model.
- Fig. 5 hard vs random vs easy negatives: stage-2 loss and pre-clip gradient norm per step,
  from the logs of `train.py --stage 2 --negatives hard|random|easy` runs.
- Fig. 6 "what the embedding says in one word": the LM head's top-5 next tokens at the
  embedding position under the image prompt.

    python -m experiments.figures --model toy/mllm runs/stage1 runs/stage2 --logs runs/neg-*/log.jsonl
    python -m experiments.figures --model MODEL --captions coco_test.jsonl --image-root coco   # real data
Models load exactly as in eval.py (--family, --trust-remote-code, --dtype).
"""
import argparse
import io
import json
import os
import random

import numpy as np
import torch
from PIL import Image, ImageDraw

import data
import eval as ev
import model as M
from toy import shapes
import stages
import toy.default

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def _colormap(x):
    """[0, 1] -> RGB uint8, dark blue to yellow: brightness rises with the value."""
    anchors = np.array([[20, 20, 70], [40, 90, 160], [50, 170, 130], [250, 230, 60]], float)
    pos = np.linspace(0, 1, len(anchors))
    return np.stack([np.interp(x, pos, anchors[:, c]) for c in range(3)], -1).astype(np.uint8)


def save_png(img, path):
    png = io.BytesIO()
    img.save(png, format="PNG")
    stages.save_atomic(path, png.getvalue())


def heatmap_png(matrices, path, panel=300, margin=20, title_h=24):
    """Fig. 4: cross-modal cosine matrices {title: (n, n)} side by side, on one shared colour
    scale so panels compare. Image size: width len(matrices) * (panel + margin) + margin,
    height title_h + panel + margin (the scale is written in the bottom margin)."""
    mats = {name: np.asarray(m, dtype=float) for name, m in matrices.items()}
    lo, hi = min(m.min() for m in mats.values()), max(m.max() for m in mats.values())
    img = Image.new("RGB", (len(mats) * (panel + margin) + margin, title_h + panel + margin),
                    "white")
    draw = ImageDraw.Draw(img)
    for j, (name, m) in enumerate(mats.items()):
        x = margin + j * (panel + margin)
        cells = Image.fromarray(_colormap((m - lo) / max(hi - lo, 1e-12)))
        img.paste(cells.resize((panel, panel), Image.NEAREST), (x, title_h))
        draw.text((x, 6), name, fill="black")
    draw.text((margin, title_h + panel + 4), f"cosine {lo:.2f} (dark) to {hi:.2f} (bright)",
              fill="black")
    save_png(img, path)


def line_chart_png(series, path, title, log_y=False, xlabel="step", ylabel="", size=(640, 400)):
    """Fig. 5: one curve per series {name: values per step} (loss, or pre-clip grad norm with
    log_y, for hard / random / easy negatives), with axes, tick labels and a legend."""
    W, H = size
    left, right, top, bottom = 70, 140, 34, 45  # the legend sits in the right margin
    f = (lambda y: np.log10(np.maximum(y, 1e-30))) if log_y else (lambda y: y)
    ys = {name: f(np.asarray(v, dtype=float)) for name, v in series.items()}
    finite = np.concatenate([y[np.isfinite(y)] for y in ys.values()] + [np.zeros(0)])
    lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    n = max((len(y) for y in ys.values()), default=1)
    px = lambda i: left + i / max(n - 1, 1) * (W - left - right)
    py = lambda y: top + (hi - y) / (hi - lo) * (H - top - bottom)
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    for t in np.linspace(lo, hi, 5):
        draw.line([(left - 4, py(t)), (left, py(t))], fill="black")
        draw.text((4, py(t) - 6), f"{10 ** t if log_y else t:.3g}", fill="black")
    for i in sorted({0, (n - 1) // 2, n - 1}):
        draw.text((px(i) - 6, H - bottom + 4), str(i), fill="black")
    draw.text(((W - right) // 2, H - 18), xlabel, fill="black")
    draw.text((4, top - 14), ylabel + (" (log scale)" if log_y else ""), fill="black")
    draw.text((W // 3, 4), title, fill="black")
    for j, (name, y) in enumerate(ys.items()):
        color, ly = PALETTE[j % len(PALETTE)], top + 8 + 16 * j
        points = [(px(i), py(v)) for i, v in enumerate(y) if np.isfinite(v)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        draw.line([(W - right + 10, ly), (W - right + 30, ly)], fill=color, width=3)
        draw.text((W - right + 36, ly - 6), name, fill="black")
    save_png(img, path)


@torch.no_grad()
def top_next_tokens(model, processor, family, images, k=5, device="cpu"):
    """Fig. 6, "what the embedding says in one word": the full model's LM-head softmax at the
    embedding position (last real token) under the image prompt -> per image [(token, prob)].
    One image per forward (Phi-3.5-V takes one at a time). Call model.eval() first."""
    out = []
    for image in images:
        batch = M.process(processor, family, images=[data.load_image(image)], device=device)
        logits = M.last_token_pool(model(**batch).logits, batch["attention_mask"])  # (1, V)
        probs, ids = logits.float().softmax(-1)[0].topk(k)
        out.append([(processor.tokenizer.decode([int(i)]), float(p)) for p, i in zip(probs, ids)])
    return out


def pairs(args, n=50):
    """(captions, images) of n image-caption pairs: the first n of --captions (one caption per
    image), or the toy's held-out scenes."""
    if args.captions:
        images, captions, owner = data.read_caption_set(args.captions, args.image_root)
        first = {}
        for c, i in zip(captions, owner):
            first.setdefault(i, c)
        keep = sorted(first)[:n]
        return [first[i] for i in keep], [data.load_image(images[i]) for i in keep]
    rng = random.Random(toy.default.SPLIT_SEED + 1)
    scenes = shapes.split_scenes(toy.default.SPLIT_SEED)["test"][:n]
    return [shapes.caption(s) for s in scenes], [shapes.draw(s, rng) for s in scenes]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    a = p.add_argument
    a("--model", nargs="+", required=True, help="models or stage outputs, one panel each")
    a("--logs", nargs="+", help="Fig. 5: log.jsonl of stage-2 runs (hard / random / easy)")
    a("--captions", help="a caption set (as eval.py --task retrieval reads); default: the toy")
    a("--image-root", default="")
    a("--family")
    a("--trust-remote-code", action="store_true")
    a("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--out", default=os.path.join("runs", "figures"), help="folder for the pictures")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    captions, images = pairs(args)
    matrices, tokens = {}, {}
    for path in args.model:
        model, processor, family, amp = ev.load_model(path, args.device, args.dtype,
                                                      args.trust_remote_code, args.family)
        image = M.encode(model, processor, family, images=images, device=args.device, amp=amp)
        text = M.encode(model, processor, family, texts=captions, device=args.device, amp=amp)
        matrices[path] = (text @ image.T).numpy()
        tokens[path] = top_next_tokens(model, processor, family, images[:4], 5, args.device)
    heatmap_png(matrices, os.path.join(args.out, "heatmap.png"))
    for i, caption in enumerate(captions[:4]):
        print(f"\n{caption}")
        for path, t in tokens.items():
            print(f"  {path:>20}: " + ", ".join(f"{w} {100 * q:.1f}%" for w, q in t[i]))
    stages.save_atomic(os.path.join(args.out, "next_tokens.json"),
                  json.dumps({"captions": captions[:4], "tokens": tokens}, indent=1))
    if args.logs:
        logs = {os.path.basename(os.path.dirname(os.path.abspath(f))):
                [json.loads(x) for x in data.read_lines(f) if x.strip()] for f in args.logs}
        for key, log_y in (("loss", False), ("grad_norm", True)):
            line_chart_png({n: [r[key] for r in rows] for n, rows in logs.items()},
                           os.path.join(args.out, f"negatives_{key}.png"),
                           f"stage 2: {key} per step", log_y=log_y, ylabel=key)
    print(f"\npictures in {args.out}/")
    return matrices, tokens


if __name__ == "__main__":
    main()
