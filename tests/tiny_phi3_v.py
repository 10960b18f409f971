"""A tiny Phi-3.5-V checkpoint folder, laid out as microsoft/Phi-3.5-vision-instruct is on the
hub, for `--model FOLDER --trust-remote-code`.

The remote code is the stand-in in tests/phi3_v_remote/ (written here; see its files for which
facts of the hub's code it shares). The folder holds what a download holds: `config.json`,
`preprocessor_config.json` and `tokenizer_config.json` with `auto_map`, the five .py files beside
them, `tokenizer.json` (a Llama-style BPE with Phi's special tokens and ids in the hub's order)
and `model.safetensors` with random weights under the hub's key names. The weights are written
with safetensors directly, as the hub's own files are: one key for the embedding shared by
`embed_tokens` and `vision_embed_tokens.wte` (transformers 5.25's save_pretrained refuses this
class: its `_tied_weights_keys` is a list). Sizes: decoder width 32, 2 layers; CLIP width 32,
2 layers, at 336 px / patch 14, so that an image costs the hub's token count (313 at 1 crop,
757 for 500 x 400 at 4).
"""
import json
import os
import shutil

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REMOTE = os.path.join(HERE, "phi3_v_remote")
FILES = ["configuration_phi3_v.py", "modeling_phi3_v.py", "image_embedding_phi3_v.py",
         "image_processing_phi3_v.py", "processing_phi3_v.py"]
W = 32
CORPUS = ["a red cat sat on a mat", "a blue dog ran in the park today", "the cat is green",
          "Summary above image in one word:", "Summary above sentence in one word:",
          "Represent the given image for classification.", "Find a caption for the photo.",
          "Represent the given image with the following question: What is it?",
          "Find me an everyday image that matches the given caption: yellow."] * 3
# the hub's added tokens from id 32000 on, in its order (the first 11 of them)
ADDED = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>",
         "<|placeholder3|>", "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>",
         "<|placeholder6|>", "<|user|>"]
RSTRIP = {"<|assistant|>"} | {t for t in ADDED if "placeholder" in t}  # as the hub marks them
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + "
                 "message['content'] + '<|end|>\n' }}{% endfor %}{% if add_generation_prompt "
                 "and messages[-1]['role'] != 'assistant' %}{{- '<|assistant|>\n' -}}{% endif %}")


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)


def build_tokenizer(path):
    """tokenizer.json and tokenizer_config.json as Phi-3's: BPE with byte fallback, `▁` for
    spaces, BOS added, Phi's chat template, LlamaTokenizer named."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from tokenizers import trainers
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                               normalizers.Replace(" ", "▁")])
    alphabet = [chr(c) for c in range(33, 127)] + ["▁"]
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=200, initial_alphabet=alphabet, show_progress=False))
    learnt = json.loads(trained.to_str())["model"]
    # Llama's layout: <unk>, <s>, </s>, the 256 byte tokens (byte fallback), then the BPE vocab
    order = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + sorted(
        learnt["vocab"], key=learnt["vocab"].get)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learnt["merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(order)}, merges=merges,
                               unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = trained.normalizer
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t in ("<unk>", "<s>", "</s>")])
    tok.add_special_tokens([AddedToken(t, rstrip=t in RSTRIP, normalized=False, special=True)
                            for t in ADDED])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok.save(os.path.join(path, "tokenizer.json"))
    decoder = {str(tok.token_to_id(t)): dict(content=t, lstrip=False, normalized=False,
                                              rstrip=t in RSTRIP, single_word=False,
                                              special=True)
               for t in ["<unk>", "<s>", "</s>"] + ADDED}
    write_json(os.path.join(path, "tokenizer_config.json"), {
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": decoder,
        "auto_map": {"AutoProcessor": "processing_phi3_v.Phi3VProcessor"},
        "bos_token": "<s>", "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False, "eos_token": "<|endoftext|>", "legacy": False,
        "model_max_length": 131072, "pad_token": "<|endoftext|>", "padding_side": "right",
        "processor_class": "Phi3VProcessor", "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>"})
    return tok


def build_phi3_v(path, num_crops=4, torchvision=False, seed=0):
    """Write the tiny checkpoint folder `path` and return it. torchvision=True: its image
    processor module imports torchvision first, as the hub's does."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM
    os.makedirs(path, exist_ok=True)
    for name in FILES:
        shutil.copy(os.path.join(REMOTE, name), path)
    if torchvision:
        module = os.path.join(path, "image_processing_phi3_v.py")
        with open(module) as f:
            source = f.read()
        with open(module, "w") as f:
            f.write("import torchvision  # noqa: F401  (the hub's module needs it)\n" + source)
    tok = build_tokenizer(path)
    vocab = 2 * ((tok.get_vocab_size() + 1) // 2)  # the hub's 32064 is also padded past it
    write_json(os.path.join(path, "config.json"), {
        "architectures": ["Phi3VForCausalLM"], "model_type": "phi3_v",
        "auto_map": {"AutoConfig": "configuration_phi3_v.Phi3VConfig",
                     "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM"},
        "embd_layer": {"embedding_cls": "image", "hd_transform_order": "sub_glb",
                       "projection_cls": "mlp", "use_hd_transform": True,
                       "with_learnable_separator": True},
        "img_processor": {"image_dim_out": W, "model_name": "openai/clip-vit-large-patch14-336",
                          "name": "clip_vision_model", "num_img_tokens": 144,
                          "clip": {"hidden_size": W, "intermediate_size": 2 * W,
                                   "num_hidden_layers": 2, "num_attention_heads": 2}},
        "hidden_size": W, "intermediate_size": 2 * W, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 2, "hidden_act": "silu",
        "vocab_size": vocab, "bos_token_id": 1, "eos_token_id": tok.token_to_id("<|endoftext|>"),
        "pad_token_id": tok.token_to_id("<|endoftext|>"), "max_position_embeddings": 4096,
        "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "float32",
        "use_cache": True, "_attn_implementation": "eager"})
    write_json(os.path.join(path, "preprocessor_config.json"), {
        "auto_map": {"AutoProcessor": "processing_phi3_v.Phi3VProcessor",
                     "AutoImageProcessor": "image_processing_phi3_v.Phi3VImageProcessor"},
        "num_crops": num_crops, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Phi3VImageProcessor", "processor_class": "Phi3VProcessor",
        "num_img_tokens": 144})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(path, trust_remote_code=True), trust_remote_code=True)
    embedding = model.model.vision_embed_tokens
    for separator in (embedding.glb_GN, embedding.sub_GN):  # learnt on the hub, zero at init
        torch.nn.init.normal_(separator, std=0.5)
    # the hub's key names: CLIP's weights under `vision_model.` (transformers 5 drops that
    # level from CLIPVisionModel and renames on load), no key for `wte` (= embed_tokens)
    clip = "model.vision_embed_tokens.img_processor."

    def hub_name(key):
        if key.startswith(clip) and not key.startswith(clip + "vision_model."):
            return clip + "vision_model." + key[len(clip):]
        return key
    state = {hub_name(k): v.contiguous() for k, v in model.state_dict().items()
             if not k.startswith("model.vision_embed_tokens.wte.")}
    save_file(state, os.path.join(path, "model.safetensors"), {"format": "pt"})
    return path
