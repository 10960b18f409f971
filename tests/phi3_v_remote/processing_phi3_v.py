"""Test stand-in for Phi-3.5-V's remote `processing_phi3_v.py`, written for this project's tests
(not copied). Its contract, as the hub's:
- text alone goes to the tokenizer, with `padding`, `truncation` and `max_length` (a list is
  fine);
- with images, `text` must be ONE string: it is split on `<|image_N|>` (N from 1, one tag per
  image), each piece tokenized on its own (each with BOS), and each tag replaced by -N repeated
  once per image token; `truncation` and `max_length` are ignored, nothing is padded; the result
  is a batch of one with `pixel_values` (images, num_crops + 1, 3, 336, 336) and `image_sizes`.
"""
import re

import torch
import transformers
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .image_processing_phi3_v import Phi3VImageProcessor

transformers.Phi3VImageProcessor = Phi3VImageProcessor  # how the hub's file names its class

IMAGE_TAG = r"<\|image_\d+\|>"


class Phi3VProcessor(ProcessorMixin):
    attributes = ["image_processor", "tokenizer"]
    image_processor_class = "Phi3VImageProcessor"
    tokenizer_class = ("LlamaTokenizer", "LlamaTokenizerFast")
    special_image_token = "<|image|>"

    def __init__(self, image_processor, tokenizer):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.num_img_tokens = image_processor.num_img_tokens

    def __call__(self, text, images=None, padding=False, truncation=None, max_length=None,
                 return_tensors="pt"):
        if images is None:
            return BatchFeature(data={**self.tokenizer(
                text, return_tensors=return_tensors, padding=padding, truncation=truncation,
                max_length=max_length)})
        image_inputs = self.image_processor(images, return_tensors=return_tensors)
        chunks = [self.tokenizer(chunk).input_ids for chunk in re.split(IMAGE_TAG, text)]
        ids = [int(tag[len("<|image_"):-2]) for tag in re.findall(IMAGE_TAG, text)]
        assert sorted(set(ids)) == list(range(1, len(set(ids)) + 1)), f"image ids {ids}"
        assert len(set(ids)) == len(image_inputs["pixel_values"]), "one image per tag"
        counts = image_inputs["num_img_tokens"]
        input_ids = list(chunks[0])
        for i, chunk in zip(ids, chunks[1:]):
            input_ids += [-i] * counts[i - 1] + chunk
        input_ids = torch.tensor(input_ids, dtype=torch.long)[None]
        return BatchFeature(data={"input_ids": input_ids,
                                  "attention_mask": (input_ids > -1000000).long(),
                                  "pixel_values": image_inputs["pixel_values"],
                                  "image_sizes": image_inputs["image_sizes"]})

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self):
        return list(dict.fromkeys(self.tokenizer.model_input_names
                                  + self.image_processor.model_input_names))
