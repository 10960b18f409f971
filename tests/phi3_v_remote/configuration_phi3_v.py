"""Test stand-in for microsoft/Phi-3.5-vision-instruct's remote `configuration_phi3_v.py`.

Written for this project's tests, not copied: the same class name, `model_type` and fields as the
hub's config (a Phi-3 decoder; `embd_layer` turns on the image embedding, `img_processor` names
its CLIP tower). One addition: the hub code hard-codes CLIP ViT-L/14-336 (width 1024, 24 layers);
here `img_processor["clip"]` gives the tower's width and depth so that a test checkpoint stays
tiny. Image size 336 and patch 14 stay fixed, as on the hub.
"""
from transformers import PretrainedConfig


class Phi3VConfig(PretrainedConfig):
    model_type = "phi3_v"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=32064, hidden_size=3072, intermediate_size=8192,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None,
                 resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, hidden_act="silu",
                 max_position_embeddings=131072, original_max_position_embeddings=4096,
                 initializer_range=0.02, rms_norm_eps=1e-5, use_cache=True,
                 tie_word_embeddings=False, rope_theta=10000.0, rope_scaling=None,
                 bos_token_id=1, eos_token_id=2, pad_token_id=32000, sliding_window=None,
                 embd_layer="default", img_processor=None, **kwargs):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.intermediate_size, self.num_hidden_layers = intermediate_size, num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.resid_pdrop, self.embd_pdrop = resid_pdrop, embd_pdrop
        self.attention_dropout, self.hidden_act = attention_dropout, hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.original_max_position_embeddings = original_max_position_embeddings
        self.initializer_range, self.rms_norm_eps = initializer_range, rms_norm_eps
        self.use_cache, self.rope_theta, self.rope_scaling = use_cache, rope_theta, rope_scaling
        self.sliding_window, self.embd_layer = sliding_window, embd_layer
        self.img_processor = img_processor
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         pad_token_id=pad_token_id, tie_word_embeddings=tie_word_embeddings,
                         **kwargs)
