"""The toy's pretraining (NOT UniME): how toy/mllm was made, and how to make it again.

A real MLLM comes pretrained; the tiny LLaVA of the embedded default is pretrained here, on the
shapes world, by next-token prediction ("stage 0"). It learns three skills in equal parts:
captioning an image, and naming the scene's colours and shapes in one word after the paper's
"Summary above image / sentence in one word:" prompts. The one-word answers are what give it
zero-shot cross-modal alignment; from a model without it, UniME's stage-2 loss collapses (every
embedding the same vector, the loss stuck at ln(k+1)).

    python -m toy.pretrain --out toy/mllm --overwrite   # about 2 minutes on 2 CPU cores
"""
import argparse
import os
import random
import tempfile
import time

import torch

import eval as ev
import families
import model as M
from toy import shapes
import stages
import toy.default
import toy.benchmark
import train

TEMPLATE = "USER: {} ASSISTANT:"  # LLaVA-1.5's chat format, which the tiny LLaVA speaks
CAPTION_PROMPT = "Describe the image:"


# ---------------------------------------------------------------- the tiny LLaVA

TINY_CONFIG = dict(width=64, layers=2, heads=2, image_size=32, patch_size=8, vocab_size=400)


def build_tiny_mllm(path, corpus, seed=0, **overrides):
    """A LLaVA-architecture MLLM (CLIP vision tower, projector, Llama decoder) with random
    weights and a byte-level BPE tokenizer trained on `corpus`, saved like a downloaded model.
    Deterministic from `seed`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor,
                              PreTrainedTokenizerFast)
    c = {**TINY_CONFIG, **overrides}
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=c["vocab_size"], special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>",
                                        extra_special_tokens={"image_token": "<image>"},
                                        padding_side="left")
    n_patches = (c["image_size"] // c["patch_size"]) ** 2
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=c["width"], intermediate_size=2 * c["width"],
            num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
            image_size=c["image_size"], patch_size=c["patch_size"], projection_dim=c["width"]),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=c["width"], intermediate_size=2 * c["width"],
            num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
            num_key_value_heads=c["heads"], max_position_embeddings=256,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=n_patches, vision_feature_layer=-1,
        vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    size = {"height": c["image_size"], "width": c["image_size"]}
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": c["image_size"]},
                                              crop_size=size),
        tokenizer=tokenizer, patch_size=c["patch_size"], vision_feature_select_strategy="default",
        num_additional_image_tokens=1)
    stages.save_pretrained(path, model, processor)
    return path


def corpus():
    """Every word and phrase the toy model will read: its tokenizer is trained on this."""
    rng = random.Random(0)
    lines = [TEMPLATE, families.TEXT_INSTRUCTION, families.IMAGE_INSTRUCTION, CAPTION_PROMPT]
    lines += list(toy.default.STAGE2_INSTRUCTIONS.values()) + [
        f"What colour is the {s}? What shape is the {c} one?"
        for s in shapes.SHAPES for c in shapes.COLORS]
    for scene in shapes.all_scenes()[::7]:
        lines += [shapes.caption(scene), shapes.caption(scene, flip=True, synonyms=True),
                  *shapes.keywords(scene), shapes.caption(shapes.negative(scene, rng)[1])]
    return lines


# ---------------------------------------------------------------- the pretraining losses

def caption_loss(model, processor, images, captions):
    """Next-token loss on the caption tokens only, after "Describe the image:". Left padding
    puts every caption at the end of its row, so its labels are the row's last tokens."""
    eos = processor.tokenizer.eos_token
    prompt = TEMPLATE.format(f"<image>\n{CAPTION_PROMPT}")
    batch = processor(text=[f"{prompt} {c}{eos}" for c in captions], images=images,
                      padding=True, return_tensors="pt")
    labels = torch.full_like(batch["input_ids"], -100)
    for i, c in enumerate(captions):
        n = len(processor.tokenizer(f" {c}{eos}", add_special_tokens=False)["input_ids"])
        labels[i, -n:] = batch["input_ids"][i, -n:]
    return model(**batch, labels=labels).loss


def one_word_loss(model, processor, keywords, texts=None, images=None):
    """Cross-entropy at the embedding position (the last prompt token) under the "in one word"
    prompts, against the uniform distribution over the scene's keywords: the expected loss of
    a one-word answer drawn at random, without the sampling noise (a sampled word gave 1-7%
    zero-shot Recall@1 after 1,500 steps, and stage 2 then collapsed from two of three runs)."""
    batch = M.process(processor, "llava", texts=texts, images=images)
    logits = model(**batch).logits[:, -1]  # (n, vocab)
    target = torch.zeros_like(logits)
    for i, words in enumerate(keywords):
        ids = [processor.tokenizer(f" {w}", add_special_tokens=False)["input_ids"][0]
               for w in words]
        target[i, ids] = 1 / len(ids)
    return -(target * logits.float().log_softmax(-1)).sum(-1).mean()


def pretraining_loss(model, processor, scenes, seed):
    """A pretrained MLLM's skills, in three equal parts: captioning an image, and naming the
    scene in one word after the image prompt and after the sentence prompt."""
    rngs = [random.Random(f"{seed}-{i}-{scene}") for i, scene in enumerate(scenes)]
    third = len(scenes) // 3
    cap, img, txt = scenes[:third], scenes[third:2 * third], scenes[2 * third:]
    drawn = [shapes.draw(s, r) for s, r in zip(scenes, rngs)]
    texts = [shapes.paraphrase(s, r) if r.random() < 0.5 else shapes.caption(s)
             for s, r in zip(txt, rngs[2 * third:])]
    losses = [caption_loss(model, processor, drawn[:third], [shapes.caption(s) for s in cap]),
              one_word_loss(model, processor, [shapes.keywords(s) for s in img],
                            images=drawn[third:2 * third]),
              one_word_loss(model, processor, [shapes.keywords(s) for s in txt], texts=texts)]
    return sum(losses) / 3


# ---------------------------------------------------------------- the loop

def pretrain(out, steps=1500, batch_size=60, lr=3e-3, warmup=50, seed=0, base=None):
    """Build the tiny LLaVA (or load `base`), pretrain it, save it to `out`; prints the toy
    benchmark's zero-shot numbers before and after."""
    torch.manual_seed(seed)
    random.seed(seed)
    with tempfile.TemporaryDirectory() as tmp:  # saved and reloaded like a downloaded model
        model, processor, _ = M.load_mllm(base or build_tiny_mllm(tmp, corpus(), seed=seed))
    # the scenes of every split but the two held-out test sets, unseen colour-shape
    # combinations included, as a real MLLM's pretraining has seen red triangles too
    scenes = shapes.split_scenes(toy.default.SPLIT_SEED)["pretrain"]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    before = toy.benchmark.score(ev.make_encoder(model.eval(), processor, "llava"))
    t0 = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = train.lr_at(step, lr, warmup, steps)
        model.train()
        rows = train.batch_rows(step, len(scenes), batch_size, seed)
        loss = pretraining_loss(model, processor, [scenes[r] for r in rows], seed + rows[0])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 100 == 0 or step + 1 == steps:
            eta = (time.time() - t0) / (step + 1) * (steps - step - 1)
            print(f"step {step + 1}/{steps} loss {loss.item():.4f} ETA {eta:.0f}s", flush=True)
    after = toy.benchmark.score(ev.make_encoder(model.eval(), processor, "llava"))
    stages.save_pretrained(out, model, processor)
    print(ev.markdown_table(["zero-shot, held-out scenes", "before", "after"],
                            [(k, before[k], after[k]) for k in before]))
    return before, after


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=os.path.join("runs", "toy-mllm"))
    p.add_argument("--overwrite", action="store_true", help="replace the model files in --out")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if os.path.exists(os.path.join(args.out, "config.json")) and not args.overwrite:
        raise SystemExit(f"{args.out} already holds a model; pass --overwrite to replace it")
    return pretrain(args.out, args.steps, seed=args.seed)


if __name__ == "__main__":
    main()
