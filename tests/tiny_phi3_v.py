"""Stand-ins for Phi-3.5-V (microsoft/Phi-3.5-vision-instruct), the paper's main backbone.

Its processor and model are remote code that cannot be fetched offline and that transformers 5
can no longer import, and transformers has no native class for it. `Phi3VStandInProcessor`
reproduces its processor's contract and `build_phi3_v` a tiny model with its module names and
forward inputs, built from transformers' Phi-3 and CLIP classes.
"""
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from tiny_backbones import W, text_config, tokenizer, vision_config


class Phi3VStandInProcessor:
    """The contract of microsoft/Phi-3.5-vision-instruct's remote `Phi3VProcessor`: text alone
    goes to the tokenizer (a list is fine); with images, `text` must be ONE string whose
    `<|image_N|>` tags (numbered from 1) match the images; each text piece is tokenized on its
    own (with BOS), the tags become `-N` repeated once per image token, and the result is a batch
    of one: input_ids, attention_mask, pixel_values (images, num_crops + 1, 3, s, s; padded
    with zero crops) and image_sizes (images, 2: the tiled height and width). The tiling is
    simplified (tiles of `s` pixels along the longer side, at most `num_crops`)."""

    def __init__(self, tokenizer, tile=16, num_crops=3, tokens_per_tile=4):
        self.tokenizer, self.tile, self.num_crops = tokenizer, tile, num_crops
        self.tokens_per_tile = tokens_per_tile

    def __call__(self, text, images=None, padding=False, truncation=None, max_length=None,
                 return_tensors="pt"):
        import numpy as np
        if images is None:
            return self.tokenizer(text, padding=padding, truncation=truncation,
                                  max_length=max_length, return_tensors=return_tensors)
        pieces = [self.tokenizer(p)["input_ids"] for p in re.split(r"<\|image_\d+\|>", text)]
        tags = [int(t) for t in re.findall(r"<\|image_(\d+)\|>", text)]
        assert sorted(set(tags)) == list(range(1, len(images) + 1)), "tags must match images"
        crops, sizes, n_tokens = [], [], []
        for image in images:
            w, h = image.size
            long_tiles = min(self.num_crops, max(1, round(max(w, h) / min(w, h))))
            rows, cols = (1, long_tiles) if w >= h else (long_tiles, 1)
            hd = np.asarray(image.convert("RGB").resize((cols * self.tile, rows * self.tile)))
            hd = torch.tensor(hd, dtype=torch.float32).permute(2, 0, 1) / 255
            glob = F.interpolate(hd[None], size=(self.tile, self.tile), mode="bilinear")[0]
            tiles = [hd[:, r * self.tile:(r + 1) * self.tile, c * self.tile:(c + 1) * self.tile]
                     for r in range(rows) for c in range(cols)]
            stack = torch.stack([glob] + tiles)
            crops.append(F.pad(stack, (0, 0, 0, 0, 0, 0, 0, self.num_crops + 1 - len(stack))))
            sizes.append([rows * self.tile, cols * self.tile])
            n_tokens.append((1 + rows * cols) * self.tokens_per_tile)
        ids = list(pieces[0])
        for tag, piece in zip(tags, pieces[1:]):
            ids += [-tag] * n_tokens[tag - 1] + piece
        ids = torch.tensor([ids])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "pixel_values": torch.stack(crops), "image_sizes": torch.tensor(sizes)}


def build_phi3_v(tile=16, patch=8):
    """A tiny model with Phi3VForCausalLM's module names and forward inputs: Phi-3 decoder
    (`model.layers`), CLIP tower (`model.vision_embed_tokens.img_processor`), MLP projector
    (`model.vision_embed_tokens.img_projection.0/.2`); image features replace the negative ids.
    In memory only: it has no Auto class, as the real one has none in transformers 5."""
    from transformers import (CLIPVisionConfig, CLIPVisionModel, Phi3Config, Phi3ForCausalLM,
                              Phi3Model)
    tok = tokenizer(["<|user|>", "<|end|>", "<|assistant|>"], bos=True)

    class ImageEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.img_processor = CLIPVisionModel(CLIPVisionConfig(
                **{**vision_config(tile, patch), "num_hidden_layers": 2}))
            self.img_projection = nn.Sequential(nn.Linear(W, W), nn.GELU(), nn.Linear(W, W))

        def forward(self, pixel_values, image_sizes):  # one image -> (its tokens, W)
            n_crops = 1 + int(image_sizes[0] // tile) * int(image_sizes[1] // tile)
            # the real model reads the second-to-last CLIP layer (config.img_processor layer_idx);
            # run by hand: a nested output_hidden_states call leaves hooks behind in transformers 5
            clip = self.img_processor
            out = clip.pre_layrnorm(clip.embeddings(pixel_values[:n_crops]))
            for layer in clip.encoder.layers[:-1]:
                out = layer(out, None)
            out = out[:, 1:]
            return self.img_projection(out.reshape(-1, out.shape[-1]))

    class Phi3VModel(Phi3Model):
        def __init__(self, config):
            super().__init__(config)
            self.vision_embed_tokens = ImageEmbedding()

        def forward(self, input_ids, attention_mask=None, pixel_values=None, image_sizes=None,
                    inputs_embeds=None, **kwargs):
            embeds = self.embed_tokens(input_ids.clamp(min=0))
            where = (input_ids < 0).nonzero(as_tuple=True)  # row-major: images in row order
            if where[0].numel():
                features = torch.cat([self.vision_embed_tokens(p, s)
                                      for p, s in zip(pixel_values, image_sizes)])
                embeds = embeds.index_put(where, features.to(embeds.dtype))
            return super().forward(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)

    config = Phi3Config(**text_config(tok), img_processor={"layer_idx": -2})
    torch.manual_seed(0)
    model = Phi3ForCausalLM(config)
    model.model = Phi3VModel(config)
    return model.eval(), Phi3VStandInProcessor(tok, tile=tile, tokens_per_tile=(tile // patch) ** 2)
