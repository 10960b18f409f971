"""Test stand-in for Phi-3.5-V's remote `modeling_phi3_v.py`, written for this project's tests
(not copied): a Phi-3 decoder whose input embeddings come from `Phi3ImageEmbedding` when pixels
are given.

Shared with the hub's code, because the project's code meets it: the class names and `auto_map`
entries; the module names LoRA targets (`model.layers.N.self_attn.qkv_proj` / `o_proj`,
`mlp.gate_up_proj` / `down_proj`, `model.vision_embed_tokens.img_processor...`,
`...img_projection.0/.2`); `vision_embed_tokens.wte` IS `embed_tokens`; `_tied_weights_keys` as a
list (transformers 4's form; transformers 5 expects {target: source}); positions 0..L-1 whatever
the padding (RoPE is relative, so left padding shifts nothing); the 4-d causal mask built with
transformers' `_prepare_4d_causal_attention_mask`; the image embedding runs only when both
`pixel_values` and `image_sizes` are given. No KV cache: the project never generates.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_attn_mask_utils import _prepare_4d_causal_attention_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel

from .configuration_phi3_v import Phi3VConfig
from .image_embedding_phi3_v import Phi3ImageEmbedding


class Phi3RMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


def rotary(x, position_ids, theta):  # x (b, heads, L, d), positions (b, L)
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, device=x.device).float() / d)
    angles = position_ids[:, None, :, None].float() * inv_freq  # (b, 1, L, d/2)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    half = torch.cat([-x[..., d // 2:], x[..., :d // 2]], dim=-1)
    return (x.float() * cos + half.float() * sin).to(x.dtype)


class Phi3Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // self.heads
        self.theta, self.dropout = config.rope_theta, config.attention_dropout
        self.qkv_proj = nn.Linear(config.hidden_size,
                                  (self.heads + 2 * self.kv_heads) * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden_states, attention_mask, position_ids):
        b, length, _ = hidden_states.shape
        q, k, v = self.qkv_proj(hidden_states).split(
            [self.heads * self.head_dim, self.kv_heads * self.head_dim,
             self.kv_heads * self.head_dim], dim=-1)
        q, k, v = (t.view(b, length, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q, k = rotary(q, position_ids, self.theta), rotary(k, position_ids, self.theta)
        k, v = (t.repeat_interleave(self.heads // self.kv_heads, dim=1) for t in (k, v))
        scores = q @ k.transpose(2, 3) / math.sqrt(self.head_dim) + attention_mask
        weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
        weights = F.dropout(weights, p=self.dropout, training=self.training)
        return self.o_proj((weights @ v).transpose(1, 2).reshape(b, length, -1))


class Phi3MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size,
                                      bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, hidden_states):
        gate, up = self.gate_up_proj(hidden_states).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


class Phi3DecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self_attn, self.mlp = Phi3Attention(config), Phi3MLP(config)
        self.input_layernorm = Phi3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Phi3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.resid_attn_dropout = nn.Dropout(config.resid_pdrop)
        self.resid_mlp_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden_states, attention_mask, position_ids):
        hidden_states = hidden_states + self.resid_attn_dropout(self.self_attn(
            self.input_layernorm(hidden_states), attention_mask, position_ids))
        return hidden_states + self.resid_mlp_dropout(self.mlp(
            self.post_attention_layernorm(hidden_states)))


class Phi3VPreTrainedModel(PreTrainedModel):
    config_class = Phi3VConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Phi3DecoderLayer"]
    _supports_sdpa = False

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)


class Phi3VModel(Phi3VPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         config.pad_token_id)
        self.embed_dropout = nn.Dropout(config.embd_pdrop)
        self.vision_embed_tokens = None
        if isinstance(config.embd_layer, dict):
            self.vision_embed_tokens = Phi3ImageEmbedding(config, wte=self.embed_tokens,
                                                          **config.embd_layer)
        self.layers = nn.ModuleList([Phi3DecoderLayer(config)
                                     for _ in range(config.num_hidden_layers)])
        self.norm = Phi3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, pixel_values=None, image_sizes=None,
                use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You have to specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            if pixel_values is not None and image_sizes is not None:
                inputs_embeds = self.vision_embed_tokens(input_ids, pixel_values=pixel_values,
                                                         image_sizes=image_sizes)
            else:
                inputs_embeds = self.embed_tokens(input_ids)
        batch, length = inputs_embeds.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(length, device=inputs_embeds.device)[None]
        position_ids = position_ids.view(-1, length).long().expand(batch, -1)
        mask = _prepare_4d_causal_attention_mask(attention_mask, (batch, length), inputs_embeds,
                                                 0, sliding_window=self.config.sliding_window)
        hidden_states, all_hidden = inputs_embeds, ()
        for layer in self.layers:
            all_hidden += (hidden_states,)
            if self.gradient_checkpointing and self.training:
                hidden_states = self._gradient_checkpointing_func(
                    layer.__call__, hidden_states, mask, position_ids)
            else:
                hidden_states = layer(hidden_states, mask, position_ids)
        hidden_states = self.norm(hidden_states)
        all_hidden += (hidden_states,)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, hidden_states=all_hidden
                                       if output_hidden_states else None)


class Phi3VForCausalLM(Phi3VPreTrainedModel):
    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config):
        super().__init__(config)
        self.model = Phi3VModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_decoder(self):
        return self.model

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, pixel_values=None, image_sizes=None,
                labels=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, inputs_embeds=inputs_embeds,
                         pixel_values=pixel_values, image_sizes=image_sizes,
                         output_hidden_states=output_hidden_states)
        logits = self.lm_head(out.last_hidden_state).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states)
