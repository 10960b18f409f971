"""Test stand-in for Phi-3.5-V's remote `image_processing_phi3_v.py`, written for this
project's tests (not copied).

The hub's HD transform, step by step: an image taller than wide is transposed; with
ratio = width / height, `scale` is the largest integer with scale * ceil(scale / ratio) <=
num_crops; the image is resized to width scale * 336 and height int(width / ratio), its height
padded with white to a multiple of 336 (centred), transposed back. The tensor (CLIP mean and
std) is cut into 336-px crops in row order, after a global crop (the whole image resized to
336 x 336, bicubic), and padded with zero crops to num_crops + 1. `image_sizes` holds the
padded (height, width); the image then takes (h//336 * w//336 + 1) * 144 + 1 + (h//336 + 1) * 12
tokens. The hub's module imports torchvision for its resize, pad and normalize; this one uses
PIL and torch, so that it runs where torchvision cannot be installed.
"""
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, make_list_of_images

CROP = 336


def hd_transform(image, hd_num):
    """PIL image -> PIL image of whole 336-px crops, aspect ratio kept (see the docstring)."""
    width, height = image.size
    transposed = width < height
    if transposed:
        image = image.transpose(Image.TRANSPOSE)
        width, height = image.size
    ratio = width / height
    scale = 1
    while scale * np.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    new_w = int(scale * CROP)
    new_h = int(new_w / ratio)
    image = image.resize((new_w, new_h), Image.BILINEAR)
    target = int(np.ceil(new_h / CROP) * CROP)
    top = int((target - new_h) / 2)
    padded = Image.new("RGB", (new_w, target), (255, 255, 255))
    padded.paste(image, (0, top))
    return padded.transpose(Image.TRANSPOSE) if transposed else padded


def num_image_tokens(h, w):
    return int((h // CROP * w // CROP + 1) * 144 + 1 + (h // CROP + 1) * 12)


class Phi3VImageProcessor(BaseImageProcessor):
    model_input_names = ["pixel_values"]

    def __init__(self, num_crops=1, image_mean=None, image_std=None, do_convert_rgb=True,
                 **kwargs):
        super().__init__(**kwargs)
        self.num_crops = num_crops
        self.image_mean = image_mean if image_mean is not None else OPENAI_CLIP_MEAN
        self.image_std = image_std if image_std is not None else OPENAI_CLIP_STD
        self.do_convert_rgb = do_convert_rgb

    def calc_num_image_tokens(self, images):
        images = [hd_transform(im.convert("RGB"), self.num_crops)
                  for im in make_list_of_images(images)]
        return [num_image_tokens(im.size[1], im.size[0]) for im in images]

    def preprocess(self, images, image_mean=None, image_std=None, do_convert_rgb=None,
                   return_tensors=None):
        mean = torch.tensor(image_mean if image_mean is not None else self.image_mean)
        std = torch.tensor(image_std if image_std is not None else self.image_std)
        crops, shapes = [], []
        for image in make_list_of_images(images):
            hd = hd_transform(image.convert("RGB"), self.num_crops)
            x = torch.from_numpy(np.asarray(hd, dtype=np.float32) / 255).permute(2, 0, 1)
            x = (x - mean[:, None, None]) / std[:, None, None]  # (3, h, w)
            h, w = x.shape[1:]
            glb = F.interpolate(x[None], size=(CROP, CROP), mode="bicubic")
            tiles = (x.reshape(1, 3, h // CROP, CROP, w // CROP, CROP).permute(0, 2, 4, 1, 3, 5)
                     .reshape(-1, 3, CROP, CROP))
            stack = torch.cat([glb, tiles])
            pad = torch.zeros(self.num_crops + 1 - len(stack), 3, CROP, CROP)
            crops.append(torch.cat([stack, pad]))
            shapes.append([h, w])
        data = {"pixel_values": torch.stack(crops), "image_sizes": shapes,
                "num_img_tokens": [num_image_tokens(h, w) for h, w in shapes]}
        return BatchFeature(data=data, tensor_type=return_tensors)
