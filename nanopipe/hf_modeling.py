"""A nanopipe GPT as a Hugging Face `transformers` model (the trust_remote_code module of an exported folder).

`python -m scripts.export` copies this file into the export as `modeling_nanopipe.py`, with nanopipe/gpt_layers.py
beside it (the attention's pieces both models use); its config.json points AutoConfig and AutoModelForCausalLM
here through `auto_map`. It depends on torch, transformers and that file only (whoever loads the folder has no
nanopipe), and computes exactly what nanopipe/gpt.py's forward computes: the export's round-trip test compares
the two on real weights, so any difference fails it.

Every architectural option is an explicit field of NanopipeConfig (no implicit defaults taken from nanopipe),
and parameter names equal nanopipe's state_dict keys, so model.safetensors is nanopipe's weights as they are.
The KV cache is transformers' own Cache (DynamicCache under generate()); it stores k after RoPE and QK-norm,
as nanopipe's KVCache does, and carries smear's one extra state, the last token's normalised embedding, as an
attribute (so a search that reorders cache rows, e.g. beam search, is not supported).
"""

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .gpt_layers import (add_attention_projections, causal_attention, norm,  # the file beside this one
                         project_qkv, shift_right)

# transformers 5 renamed the output's and generate()'s `past_key_values` to `cache`
_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


class NanopipeConfig(PretrainedConfig):
    model_type = "nanopipe"
    attribute_map = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                     "num_key_value_heads": "n_kv_head", "max_position_embeddings": "sequence_len"}

    def __init__(self, vocab_size=32768, padded_vocab_size=32768, n_layer=12, n_head=6, n_kv_head=6, n_embd=768,
                 sequence_len=2048, rope_base=10000.0, logit_softcap=15.0, value_embedding_layers=(),
                 ve_gate_channels=32, ve_gate_scale=2.0, x0_mixing=True, mlp_ratio=4, qk_scale=1.0,
                 smear_gate_channels=0, backout_layer=-1, use_cache=True, **kwargs):
        self.vocab_size = vocab_size                  # logits are sliced to this
        self.padded_vocab_size = padded_vocab_size    # rows of wte, lm_head and the value embeddings
        self.n_layer, self.n_head, self.n_kv_head, self.n_embd = n_layer, n_head, n_kv_head, n_embd
        self.sequence_len = sequence_len              # the training context; RoPE is defined for any position
        self.rope_base = rope_base
        self.logit_softcap = logit_softcap
        self.value_embedding_layers = list(value_embedding_layers)  # layers whose v gets a value embedding
        self.ve_gate_channels = ve_gate_channels      # the gate reads the first channels of the block input
        self.ve_gate_scale = ve_gate_scale            # gate = scale * sigmoid(W x[:channels])
        self.x0_mixing = x0_mixing                    # x = resid_lambdas[i] * x + x0_lambdas[i] * x0 before block i
        self.mlp_ratio = mlp_ratio
        self.qk_scale = qk_scale                      # q and k are multiplied by this after QK-norm
        self.smear_gate_channels = smear_gate_channels  # 0: no smear; else x_t += lambda * sigmoid(w x_t[:n]) x_{t-1}
        self.backout_layer = backout_layer            # -1: none; else x -= backout_lambda * (x after this block)
        self.use_cache = use_cache
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


class CausalSelfAttention(nn.Module):
    def __init__(self, config: NanopipeConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        add_attention_projections(self, config.n_embd, config.n_head, config.n_kv_head, config.ve_gate_channels,
                                  layer_idx in config.value_embedding_layers)
        self.ve_gate_scale = config.ve_gate_scale
        self.scale = config.qk_scale ** 2 / self.head_dim ** 0.5  # scaling q and k, folded into SDPA's scale

    def forward(self, x, ve, cos, sin, cache, mask):
        B, T, C = x.shape
        q, k, v = project_qkv(self, x, ve, cos, sin, self.ve_gate_scale)
        past = 0
        if cache is not None:
            past = cache.get_seq_length(self.layer_idx)
            k, v = cache.update(k, v, self.layer_idx)
            k, v = k.to(q.dtype), v.to(q.dtype)
        gqa, scale = self.n_head != self.n_kv_head, self.scale
        # nanopipe's three cases (so the same kernels run), or an explicit mask for padding
        if mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
        else:
            y = causal_attention(q, k, v, past, scale, gqa)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: NanopipeConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_ratio * config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.mlp_ratio * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: NanopipeConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, cache, mask):
        x = x + self.attn(norm(x), ve, cos, sin, cache, mask)
        return x + self.mlp(norm(x))


class NanopipeForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NanopipeConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def __init__(self, config: NanopipeConfig):
        super().__init__(config)
        vocab, kv_dim = config.padded_vocab_size, config.n_kv_head * config.head_dim
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(vocab, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, vocab, bias=False)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(vocab, kv_dim) for i in config.value_embedding_layers})
        if config.x0_mixing:
            self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        if config.smear_gate_channels:
            self.smear_gate = nn.Linear(config.smear_gate_channels, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout_layer >= 0:
            self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.post_init()

    def _init_weights(self, module):
        pass  # every parameter comes from model.safetensors; this class is for inference, not training from scratch

    def get_input_embeddings(self):
        return self.transformer.wte

    def get_output_embeddings(self):
        return self.lm_head

    def _rotary(self, position_ids):
        """cos, sin (B, T, 1, D/2) in fp32 for the given positions: nanopipe's tables, computed per call."""
        half = self.config.head_dim // 2
        device = position_ids.device
        inv_freq = self.config.rope_base ** -(torch.arange(half, dtype=torch.float32, device=device) / half)
        angles = position_ids[..., None].to(torch.float32) * inv_freq
        return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]

    def _smear(self, x, attention_mask, cache, past):
        """x_t += smear_lambda * sigmoid(w x_t[:n]) * x_{t-1}: the previous position's normalised embedding, none
        for a sequence's first token (position 0, or the first after left padding); the cache keeps the last one."""
        prev = shift_right(x, None if past == 0 or cache is None else cache.nanopipe_prev_embedding)
        if cache is not None:
            cache.nanopipe_prev_embedding = x[:, -1:]
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            T = x.size(1)
            keys = attention_mask[:, -(T + 1):].to(x.dtype) if attention_mask.size(1) > T else \
                F.pad(attention_mask.to(x.dtype), (1, 0))
            prev = prev * keys[:, :T, None]  # a padding predecessor is no predecessor
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[..., :self.config.smear_gate_channels]))
        return x + gate * prev

    @staticmethod
    def _padding_mask(attention_mask, past, T):
        """(B, 1, T, past + T) boolean mask for a 2D attention_mask with padding, else None (plain causal).
        A padding query may see itself, so no row is all-masked (SDPA would return NaN for it)."""
        if attention_mask is None or attention_mask.dim() != 2 or bool(attention_mask.all()):
            return None
        S = past + T
        keys = attention_mask[:, -S:].bool() if attention_mask.size(1) >= S else attention_mask.bool()
        causal = torch.ones(T, S, dtype=torch.bool, device=attention_mask.device).tril(diagonal=past)
        own = torch.zeros(T, S, dtype=torch.bool, device=attention_mask.device)
        own[torch.arange(T), past + torch.arange(T)] = True
        return ((causal & keys[:, None, :]) | own)[:, None]

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                labels=None, use_cache=None, logits_to_keep=0, return_dict=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        if cache is not None and not isinstance(cache, Cache):
            raise TypeError("the cache must be a transformers Cache (e.g. DynamicCache)")
        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device)[None].expand(B, T)
        cos, sin = self._rotary(position_ids)
        mask = self._padding_mask(attention_mask, past, T)
        x = norm(self.transformer.wte(input_ids))
        if self.config.smear_gate_channels:
            x = self._smear(x, attention_mask, cache, past)
        x0 = x
        for i, block in enumerate(self.transformer.h):
            if self.config.x0_mixing:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](input_ids) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, cache, mask)
            if i == self.config.backout_layer:
                x_mid = x
        if self.config.backout_layer >= 0:
            x = x - self.backout_lambda.to(x.dtype) * x_mid
        x = norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)[..., :self.config.vocab_size].float()
        logits = self.config.logit_softcap * torch.tanh(logits / self.config.logit_softcap)
        loss = None
        if labels is not None:  # transformers' convention: labels are the inputs, shifted here; -100 is ignored
            shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), shifted.reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})
