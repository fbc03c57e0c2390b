"""The GPT model: a decoder-only transformer whose every size follows from --depth.

The block is nanochat's, as in the fork that ran the DGX Spark speedrun:
- token embedding, then a weightless RMSNorm; its output x0 is mixed back in before every block
  through learnable per-layer scalars (x = resid_lambda * x + x0_lambda * x0)
- pre-norm blocks: attention (RoPE, then QK-norm, causal SDPA) and a 4x ReLU² MLP; no biases, no dropout
- value embeddings (ResFormer) on alternating layers, always including the last: a per-layer token
  embedding added into v through a small input-dependent gate that starts at 1.0
- untied lm_head, logits softcapped at 15 and returned in float32

Weights are kept in fp32 (the optimizer's master copy); on CUDA the training loop runs the forward under
bf16 autocast. Attention is full causal everywhere: PyTorch SDPA has no fast sliding-window path.
On CPU, losses are computed by a chunked head (no (B*T, V) logits tensor), which about halves a step's time.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

LOGIT_SOFTCAP = 15.0
VE_GATE_CHANNELS = 32  # the value-embedding gate looks at the first 32 channels of the block input


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    # 10k as in the nanochat fork whose d12 numbers we compare against (upstream moved to 100k together
    # with other changes at seq 2048). With head_dim 64..128 the slowest pair still turns only ~0.1 rad over
    # 1k positions at 10k, so both bases resolve every position we train on; 10k keeps us comparable.
    rope_base: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def config_from_depth(depth: int, vocab_size: int, max_seq_len: int = 2048, aspect_ratio: int = 64,
                      head_dim: int = 128) -> GPTConfig:
    """The depth dial: width = depth * aspect_ratio rounded up to a multiple of head_dim."""
    width = math.ceil(depth * aspect_ratio / head_dim) * head_dim
    n_head = width // head_dim
    return GPTConfig(sequence_len=max_seq_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                     n_kv_head=n_head, n_embd=width)


def padded_vocab_size(vocab_size: int, multiple: int = 64) -> int:
    """Embedding/head rows are padded to a multiple of 64 for matmul alignment; logits are sliced back."""
    return math.ceil(vocab_size / multiple) * multiple


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def has_value_embedding(layer_idx: int, n_layer: int) -> bool:
    """Alternating layers, always including the last one."""
    return layer_idx % 2 == (n_layer - 1) % 2


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + d/2) of x (B, T, H, D) by the per-position angle (half-split layout)."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class KVCache:
    """Preallocated keys/values for incremental decoding: (n_layer, B, n_kv_head, max_len, head_dim).

    Every layer writes its new k/v at `pos` and attends over [:pos + T]; GPT.forward advances `pos` by T
    after the last layer. Typical use: prefill a batch-1 cache with the prompt, `expand_from` it into an
    N-row cache, then feed one token per row per step.
    """

    def __init__(self, batch_size: int, max_len: int, config: GPTConfig, device=None, dtype=torch.float32):
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    @property
    def batch_size(self) -> int:
        return self.k.size(1)

    @property
    def max_len(self) -> int:
        return self.k.size(3)

    def reset(self):
        self.pos = 0

    def insert_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, H, T, D) at the current position; return this layer's keys/values so far."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > capacity {self.max_len}")
        self.k[layer_idx, :, :, self.pos:end] = k
        self.v[layer_idx, :, :, self.pos:end] = v
        return self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]

    def advance(self, num_tokens: int):
        self.pos += num_tokens

    def expand_from(self, other: "KVCache"):
        """Copy a batch-1 cache (e.g. a prefilled prompt) into every row of this one."""
        if other.batch_size != 1 or other.pos > self.max_len:
            raise ValueError("expand_from needs a batch-1 cache that fits into this one")
        self.k[:, :, :, :other.pos] = other.k[:, :, :, :other.pos]
        self.v[:, :, :, :other.pos] = other.v[:, :, :, :other.pos]
        self.pos = other.pos


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        assert config.n_embd % config.n_head == 0 and config.n_head % config.n_kv_head == 0
        kv_dim = self.n_kv_head * self.head_dim
        self.c_q = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_k = nn.Linear(config.n_embd, kv_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, kv_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.ve_gate_channels = min(VE_GATE_CHANNELS, config.n_embd)
        self.ve_gate = (nn.Linear(self.ve_gate_channels, self.n_kv_head, bias=False)
                        if has_value_embedding(layer_idx, config.n_layer) else None)

    def forward(self, x, ve, cos, sin, kv_cache):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            # gate in (0, 2), exactly 1 at init (ve_gate is zero-initialised)
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        gqa = self.n_head != self.n_kv_head
        if kv_cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            past = kv_cache.pos
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)
            if past == 0:  # prefill from an empty cache: plain causal attention
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            elif T == 1:  # one new token sees everything cached
                y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
            else:  # a chunk after a prefix: query i sees keys up to past + i
                mask = torch.ones(T, past + T, dtype=torch.bool, device=q.device).tril(diagonal=past)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, kv_cache):
        x = x + self.attn(norm(x), ve, cos, sin, kv_cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        """Builds the modules; call init_weights() afterwards (the usual path builds on the meta device,
        then `to_empty(device=...)`, then init_weights(), so nothing is initialised twice)."""
        super().__init__()
        self.config = config
        vocab = padded_vocab_size(config.vocab_size)
        kv_dim = config.n_kv_head * config.head_dim
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(vocab, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, vocab, bias=False)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(vocab, kv_dim) for i in range(config.n_layer)
                                           if has_value_embedding(i, config.n_layer)})
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.full((config.n_layer,), 0.1))
        # rotary tables for 10x the training length, so longer prompts at inference still get positions
        self.rotary_len = 10 * config.sequence_len
        cos, sin = self._rotary_tables(self.rotary_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _rotary_tables(self, length: int, device=None):
        half = self.config.head_dim // 2
        inv_freq = self.config.rope_base ** -(torch.arange(half, dtype=torch.float32, device=device) / half)
        angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
        return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]  # (1, T, 1, D/2)

    @torch.no_grad()
    def init_weights(self):
        n_embd = self.config.n_embd
        bound = math.sqrt(3) / math.sqrt(n_embd)  # uniform with std 1/sqrt(d)
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(linear.weight, -bound, bound)
            # zero output projections: every block starts as the identity on the residual stream
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)
        for embedding in self.value_embeds.values():
            nn.init.uniform_(embedding.weight, -bound, bound)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)
        self.cos, self.sin = self._rotary_tables(self.rotary_len, device=self.lm_head.weight.device)

    def forward(self, idx, targets=None, loss_reduction="mean", kv_cache=None):
        B, T = idx.shape
        start = 0 if kv_cache is None else kv_cache.pos
        if start + T > self.rotary_len:
            raise ValueError(f"sequence of {start + T} positions is longer than the rotary table ({self.rotary_len})")
        cos, sin = self.cos[:, start:start + T], self.sin[:, start:start + T]
        x = norm(self.transformer.wte(idx))
        x0 = x
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        x = norm(x)
        # CPU training/eval losses take the chunked path (see _ChunkedSoftcapCrossEntropy); per-token losses that
        # need gradients, and anything being compiled, take the plain one
        chunked = x.device.type == "cpu" and not torch.compiler.is_compiling() and (
            loss_reduction != "none" or not torch.is_grad_enabled())
        if targets is not None and chunked:
            return chunked_head_loss(x, self.lm_head.weight, targets, self.config.vocab_size, loss_reduction)
        logits = self.lm_head(x)
        if logits.size(-1) != self.config.vocab_size:
            logits = logits[..., :self.config.vocab_size]
        logits = logits.float()
        logits = LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)
        if targets is None:
            return logits
        return cross_entropy(logits, targets, loss_reduction)

    # ----------------------------------------------------------------------------------------------
    # sizes

    def param_counts(self) -> dict:
        """Parameters per bucket, as nanochat reports them."""
        h = sum(p.numel() for p in self.transformer.h.parameters())
        return {
            "wte": self.transformer.wte.weight.numel(),
            "value_embeds": sum(p.numel() for p in self.value_embeds.parameters()),
            "lm_head": self.lm_head.weight.numel(),
            "transformer_matrices": h,
            "scalars": self.resid_lambdas.numel() + self.x0_lambdas.numel(),
        }

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_scaling_params(self) -> int:
        """Matrices inside the blocks plus lm_head: the N of tokens = ratio * N (embedding lookups excluded)."""
        counts = self.param_counts()
        return counts["transformer_matrices"] + counts["lm_head"]

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6 * matmul params + 12 * L * H * Q * T for attention (fwd + bwd)."""
        c = self.config
        return 6 * self.num_scaling_params() + 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len


def cross_entropy(logits, targets, reduction="mean"):
    """Token cross-entropy with ignore_index=-1. "mean" averages over the counted targets and is 0 (not NaN)
    when a batch has none (a fully masked SFT micro-batch, nanochat #618)."""
    flat = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                           reduction="none" if reduction == "none" else "sum")
    if reduction == "none":
        return flat.view(targets.shape)
    if reduction == "sum":
        return flat
    if reduction == "mean":
        return flat / (targets != -1).sum().clamp(min=1)
    raise ValueError(f"unknown loss_reduction {reduction!r}: use mean, sum or none")


class _ChunkedSoftcapCrossEntropy(torch.autograd.Function):
    """Per-token CE of softcap(x @ Wᵀ), computed a chunk of rows at a time; the gradients of a plain sum over
    the tokens are produced during the forward pass, while each chunk's logits are at hand.

    On CPU the (B*T, V) logits tensor and its ~15 elementwise passes (softcap, log-softmax and their
    backwards, autograd's saved copies) cost about as much as all the matmuls; here each chunk takes ~6 passes
    and the full tensor is never materialised. Softcapped logits lie in [-15, 15], so exp() needs no
    max-subtraction.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size, chunk_rows, compute_grad):
        w = weight[:vocab_size]
        losses = torch.empty(x.size(0), dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x) if compute_grad else None
        grad_w = torch.zeros_like(weight) if compute_grad else None
        for start in range(0, x.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            xs, ts = x[rows], targets[rows]
            valid = ts != -1
            safe = ts.clamp(min=0)
            t = (xs @ w.t()).float().mul_(1 / LOGIT_SOFTCAP).tanh_()    # softcap(z) = 15 t
            e = t.mul(LOGIT_SOFTCAP).exp_()
            total = e.sum(dim=-1)
            picked = t.gather(1, safe[:, None]).squeeze(1) * LOGIT_SOFTCAP
            losses[rows] = torch.where(valid, total.log() - picked, 0.0)
            if compute_grad:
                g = e.mul_((valid / total)[:, None])                   # softmax, zero on ignored rows
                g[valid.nonzero().squeeze(1), safe[valid]] -= 1.0
                g.addcmul_(g, t.square_(), value=-1.0)                # through the softcap: * (1 - t²)
                g = g.to(x.dtype)
                grad_x[rows] = g @ w
                grad_w[:vocab_size].addmm_(g.t(), xs)
        ctx.save_for_backward(grad_x, grad_w)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        grad_x, grad_w = ctx.saved_tensors
        if grad_x is None:
            raise RuntimeError("chunked_head_loss was called without compute_grad")
        # the precomputed gradients are those of a plain sum over the tokens: only a uniform upstream
        # gradient (a sum or mean of the losses) can be applied to them
        scale = grad_losses[0]
        if not (grad_losses == scale).all():
            raise RuntimeError("chunked_head_loss supports only a sum or mean of its per-token losses")
        return grad_x * scale, grad_w * scale, None, None, None, None


def chunked_head_loss(x, weight, targets, vocab_size, reduction="mean", chunk_rows=None):
    """Loss of the softcapped lm_head on x (B, T, C): same values as `cross_entropy` on the full logits."""
    flat_x, flat_t = x.reshape(-1, x.size(-1)), targets.reshape(-1)
    # default: 64 MB of fp32 logits per chunk, small enough to avoid the full tensor's allocation and page
    # faults, large enough that per-op threading overhead stays small on a busy machine (measured: 64 rows is
    # 1.7x slower than 512 at 2 threads under load, and no faster on 1 thread)
    chunk_rows = chunk_rows or max(64, 2**24 // vocab_size)
    compute_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if compute_grad and reduction == "none":
        raise ValueError("loss_reduction='none' with gradients: use the logits path (targets=None)")
    losses = _ChunkedSoftcapCrossEntropy.apply(flat_x, weight, flat_t, vocab_size, chunk_rows, compute_grad)
    if reduction == "none":
        return losses.view(targets.shape)
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        return losses.sum() / (flat_t != -1).sum().clamp(min=1)
    raise ValueError(f"unknown loss_reduction {reduction!r}: use mean, sum or none")


def build_model(config: GPTConfig, device) -> GPT:
    """Build on the meta device (no wasted init), materialise on `device`, then initialise."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    return model
