"""Test stand-in for Phi-3.5-V's remote `image_embedding_phi3_v.py`: the image features that
replace the negative image ids, written for this project's tests (not copied).

What it shares with the hub's `Phi3ImageEmbedding`, because the project's code meets it:
- `wte` IS the decoder's `embed_tokens` module (one tensor under two names in the state dict);
- `forward` clamps `input_ids` IN PLACE (and warns that it does): a second forward on the same
  tensor sees no image tokens and embeds the images' positions as token 0;
- `hd_feature_transform` reads `self.img_projection[0].bias.device` and `.dtype`;
- a CLIP tower at 336 px, patch 14 (24 x 24 patches per crop), whose second-to-last hidden
  state (`layer_idx` -2) is read with `output_hidden_states=True`, class token dropped;
- the HD layout: each crop's 24 x 24 patches merged 2 x 2 into 12 x 12 tokens of width
  4 * image_dim_out, a learnt `sub_GN` newline after every row of tokens, the sub-crops first,
  then `glb_GN`, then the global crop: (h_crop * w_crop + 1) * 144 + 1 + (h_crop + 1) * 12
  tokens per image; the projector `img_projection` = Linear(4 * dim, hidden), GELU, Linear.
"""
import warnings

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

MAX_INPUT_ID = int(1e9)
CROP, PATCH = 336, 14
GRID = CROP // PATCH  # 24 patches per side of a crop


class Phi3ImageEmbedding(nn.Module):

    def __init__(self, config, wte=None, **kwargs):
        super().__init__()
        self.drop = nn.Dropout(config.embd_pdrop)
        self.wte = wte
        spec = config.img_processor
        assert isinstance(spec, dict) and spec.get("name") == "clip_vision_model", spec
        clip = spec.get("clip", {})  # the one addition: the tower's size (the hub: ViT-L)
        self.img_processor = CLIPVisionModel(CLIPVisionConfig(
            image_size=CROP, patch_size=PATCH, hidden_act="quick_gelu", **clip))
        self.image_dim_out = spec["image_dim_out"]
        self.num_img_tokens = spec["num_img_tokens"]
        self.layer_idx = spec.get("layer_idx", -2)
        self.type_feature = spec.get("type_feature", "patch")
        self.use_hd_transform = kwargs.get("use_hd_transform", False)
        self.hd_transform_order = kwargs.get("hd_transform_order", "glb_sub")
        assert self.use_hd_transform == kwargs.get("with_learnable_separator", False)
        assert kwargs.get("projection_cls") == "mlp" and self.use_hd_transform
        width = 4 * self.image_dim_out  # 2 x 2 patches merged into one token
        self.glb_GN = nn.Parameter(torch.zeros([1, 1, width]))
        self.sub_GN = nn.Parameter(torch.zeros([1, 1, 1, width]))
        self.img_projection = nn.Sequential(nn.Linear(width, config.hidden_size), nn.GELU(),
                                            nn.Linear(config.hidden_size, config.hidden_size))
        self.vocab_size = config.vocab_size

    def get_img_features(self, img_embeds):  # (crops, 3, 336, 336) -> (crops, 576, dim)
        hidden = self.img_processor(img_embeds, output_hidden_states=True).hidden_states
        assert self.type_feature == "patch"
        return hidden[self.layer_idx][:, 1:]

    def forward(self, input_ids, pixel_values, image_sizes=None):
        input_ids = input_ids.view(-1, input_ids.shape[-1])  # a view: the caller's tensor
        positions = torch.nonzero((input_ids < 0) & (input_ids > -MAX_INPUT_ID), as_tuple=True)
        has_image = len(positions[0].tolist()) > 0
        input_ids.clamp_min_(0).clamp_max_(self.vocab_size)
        warnings.warn("Phi-3-V modifies `input_ids` in-place and the tokens indicating images "
                      "will be removed after model forward. If your workflow requires multiple "
                      "forward passes on the same `input_ids`, please make a copy of `input_ids` "
                      "before passing it to the model.")
        hidden_states = self.wte(input_ids)
        if has_image:
            num_images, num_crops, c, h, w = pixel_values.shape
            assert c == 3 and h == w == CROP
            features = self.get_img_features(pixel_values.flatten(0, 1)).reshape(
                num_images, num_crops, -1, self.image_dim_out)
            projected = self.hd_feature_transform(features, image_sizes)
            hidden_states = hidden_states.index_put(positions, projected, accumulate=False)
        return self.drop(hidden_states)

    def hd_feature_transform(self, image_features, image_sizes):
        """(images, 1 + crops, 576, dim), [(h, w)] -> (all images' tokens, hidden)."""
        assert self.hd_transform_order == "sub_glb", self.hd_transform_order
        target_device = self.img_projection[0].bias.device
        target_dtype = self.img_projection[0].bias.dtype
        glb = self.add_image_newline(self.reshape_hd_patches_2x2merge(image_features[:, 0], 1, 1))
        pieces = []
        for i, (h, w) in enumerate(image_sizes):
            h_crop, w_crop = int(h) // CROP, int(w) // CROP
            subs = image_features[i, 1:1 + h_crop * w_crop]  # the rest is zero padding
            subs = self.add_image_newline(self.reshape_hd_patches_2x2merge(subs, h_crop, w_crop))
            pieces += [subs.squeeze(0), self.glb_GN.squeeze(0), glb[i]]
        return self.img_projection(torch.cat(pieces).to(target_device).to(target_dtype))

    def reshape_hd_patches_2x2merge(self, features, h_crop, w_crop):
        """(images * h_crop * w_crop, 576, dim) -> (images, h_crop * 12, w_crop * 12, 4 * dim):
        each 2 x 2 block of patches becomes one token, crops laid out in their grid."""
        n, length, dim = features.shape
        assert length == GRID * GRID and dim == self.image_dim_out and n % (h_crop * w_crop) == 0
        half = GRID // 2
        merged = (features.reshape(n, half, 2, half, 2, dim).permute(0, 1, 3, 2, 4, 5)
                  .reshape(n // (h_crop * w_crop), h_crop, w_crop, half, half, 4 * dim))
        return merged.permute(0, 1, 3, 2, 4, 5).reshape(-1, h_crop * half, w_crop * half,
                                                        4 * dim)

    def add_image_newline(self, features):
        """(images, rows, cols, width) -> (images, rows * (cols + 1), width)."""
        n, rows, _, width = features.shape
        newline = self.sub_GN.expand(n, rows, -1, -1)
        return torch.cat([features, newline], dim=2).reshape(n, -1, width)
