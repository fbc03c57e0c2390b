"""Optimizers: Muon for the 2-D weights inside the blocks, AdamW for embeddings, lm_head and scalars.

Muon (as in nanochat and modded-nanogpt) takes the Nesterov momentum of the gradient, equalises its row
norms (MuonEq), replaces it by its nearest semi-orthogonal matrix (Polar Express iterations, renormalised to
the exact norm: Muon+), rescales rows/columns by a factored second moment (NorMuon), and applies it with a
shape-aware LR and cautious weight decay. Both optimizers are plain
local torch.optim optimizers: under torchrun, DistributedDataParallel has already averaged the gradients.
Every param group records `initial_lr` so the training loop's schedule can scale `lr` from it.
"""

import torch

# Polar Express (Amsel et al. 2025, arXiv 2505.16932) coefficients for 5 iterations, as used by
# modded-nanogpt and nanochat: each step maps X -> a X + (b A + c A²) X with A = X Xᵀ.
POLAR_EXPRESS_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def orthogonalize(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U Vᵀ of G = U S Vᵀ (all singular values pushed to ~1), batched over leading dims.

    Runs in bf16 on CUDA (the iteration is robust to it and tensor cores make it cheap), fp32 elsewhere.
    """
    assert G.ndim >= 2 and 1 <= steps <= len(POLAR_EXPRESS_COEFFS)
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    tall = X.size(-2) > X.size(-1)
    if tall:  # iterate on the wide orientation so X Xᵀ is the small Gram matrix
        X = X.mT
    # scale so the spectral norm is below 1 (Frobenius >= spectral), with a 1% safety margin (upstream's; 2%
    # before): a smaller margin leaves the small singular values less far from 1 after 5 iterations
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if tall else X


def muon_update(params, grads, bufs, seconds, lr, momentum, beta2, weight_decay, ns_steps: int):
    """One Muon update of same-shape matrices, in place; the hyperparameters are 0-d tensors, so a compiled
    version of this function serves every LR, momentum and weight decay without recompiling."""
    rows, cols = params[0].shape
    # NorMuon keeps one second-moment value per row (tall/square) or per column (wide) of the update
    reduce_dim = -1 if rows >= cols else -2
    grads = torch.stack([g.float() for g in grads])
    buf = torch.stack(bufs)
    second = torch.stack(seconds)

    # Nesterov momentum: update the buffer, then look ahead along it
    buf.lerp_(grads, 1 - momentum)
    update = grads.lerp_(buf, momentum)
    # MuonEq: give every row the mean row norm first, so no single output unit dominates the polar factor
    row_norms = update.norm(dim=-1, keepdim=True)
    target = update.norm(dim=(-2, -1), keepdim=True) / rows ** 0.5
    update = update * (target / row_norms.clamp_min(1e-6))
    update = orthogonalize(update, ns_steps).float()
    # Muon+: Polar Express only approximates the polar factor; restore the exact one's norm sqrt(min(m, n))
    update = update * (min(rows, cols) ** 0.5 / update.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10))

    # NorMuon: normalise rows (or columns) by their running RMS, then restore the overall norm
    v_mean = update.square().mean(dim=reduce_dim, keepdim=True)
    reduced = update.size(reduce_dim)
    norm_before = (v_mean.sum(dim=(-2, -1), keepdim=True) * reduced).sqrt()
    second.lerp_(v_mean, 1 - beta2)
    step_size = second.clamp_min(1e-10).rsqrt()
    norm_after = (v_mean * reduced * step_size.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    update = update * step_size * (norm_before / norm_after.clamp_min(1e-10))

    # shape-aware LR: an orthogonal update of a tall matrix has smaller entries, compensate by sqrt(rows/cols)
    lr = lr * max(1.0, rows / cols) ** 0.5
    weights = torch.stack([p.float() for p in params])
    # cautious weight decay: only decay coordinates where the update also pulls the weight towards 0
    decay = (update * weights >= 0).to(weights.dtype)
    weights.sub_(lr * update + (lr * weight_decay) * weights * decay)

    for i, p in enumerate(params):
        p.copy_(weights[i])
        bufs[i].copy_(buf[i])
        seconds[i].copy_(second[i])


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton–Schulz/Polar Express, for 2-D weight matrices only.

    Per group: lr, momentum (Nesterov), beta2 (NorMuon second moment), weight_decay (cautious), ns_steps.
    Parameters of the same shape are updated as one stacked batch. `compile=True` runs the update through
    torch.compile (one fused graph per shape instead of hundreds of small kernels); the schedule's values
    reach it as device tensors, so changing them never recompiles.
    """

    HYPER = ("lr", "momentum", "beta2", "weight_decay")

    def __init__(self, params, lr=0.02, momentum=0.95, beta2=0.9, weight_decay=0.0, ns_steps=5, compile=False):
        defaults = dict(lr=lr, momentum=momentum, beta2=beta2, weight_decay=weight_decay, ns_steps=ns_steps)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only takes 2-D parameters, got shape {tuple(p.shape)}")
        self._update_fn = torch.compile(muon_update, dynamic=False, fullgraph=True) if compile else muon_update
        self._hyper = {}  # (group index) -> 0-d tensors on the group's device, refilled every step

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None
        for index, group in enumerate(self.param_groups):
            by_shape = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(p.shape, []).append(p)
            if not by_shape:
                continue
            hyper = self._hyper_tensors(index, group)
            for params in by_shape.values():
                self._update(params, group, hyper)

    def _hyper_tensors(self, index, group):
        device = group["params"][0].device
        tensors = self._hyper.get(index)
        if tensors is None or tensors[0].device != device:
            tensors = self._hyper[index] = [torch.zeros((), dtype=torch.float32, device=device) for _ in self.HYPER]
        for t, name in zip(tensors, self.HYPER):
            t.fill_(group[name])  # a tiny kernel, no host sync
        return tensors

    def _update(self, params, group, hyper):
        rows, cols = params[0].shape
        for p in params:
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
                stat_shape = (rows, 1) if rows >= cols else (1, cols)
                state["second_momentum_buffer"] = torch.zeros(stat_shape, dtype=torch.float32, device=p.device)
        self._update_fn(params, [p.grad for p in params], [self.state[p]["momentum_buffer"] for p in params],
                        [self.state[p]["second_momentum_buffer"] for p in params], *hyper, group["ns_steps"])


def setup_optimizers(model, matrix_lr=0.02, embedding_lr=0.3, unembedding_lr=0.008, scalar_lr=0.5,
                     weight_decay=0.0, muon_momentum=0.95, compile=False) -> list[torch.optim.Optimizer]:
    """[AdamW, Muon] over the model's parameters, grouped as upstream nanochat does.

    AdamW LRs of the embedding/head matrices scale with 1/sqrt(d_model / 768) (a wider model needs smaller
    steps per coordinate); Muon's update is already normalised, and the scalars are width-independent.
    `weight_decay` is Muon's (scheduled by the training loop); the AdamW groups carry their own constants.
    `compile` compiles Muon's update (see Muon).
    """
    model_dim = model.config.n_embd
    scale = (model_dim / 768) ** -0.5
    matrices = list(model.transformer.h.parameters())
    # betas and decoupled weight decay per group (upstream's tuning): rarely-seen embedding rows need a long
    # second-moment memory (beta2 0.995); small decays keep the tables and head from drifting in norm
    adam_groups = [
        dict(params=[model.lm_head.weight], lr=unembedding_lr * scale, betas=(0.8, 0.96), weight_decay=0.01),
        dict(params=[model.transformer.wte.weight], lr=embedding_lr * scale, betas=(0.8, 0.995), weight_decay=0.001),
        # value embeddings at half the embedding LR: they feed v directly, where a step moves outputs more
        dict(params=list(model.value_embeds.parameters()), lr=0.5 * embedding_lr * scale, betas=(0.8, 0.995),
             weight_decay=0.01),
        dict(params=[model.resid_lambdas], lr=scalar_lr * 0.01, betas=(0.8, 0.95), weight_decay=0.05),
        dict(params=[model.x0_lambdas], lr=scalar_lr, betas=(0.96, 0.95), weight_decay=0.0),
        # smear gate and the smear/backout scalars: 0.4x the scalar LR (upstream's 0.2 at scalar LR 0.5)
        dict(params=[model.smear_gate.weight, model.smear_lambda, model.backout_lambda], lr=0.4 * scalar_lr,
             betas=(0.8, 0.95), weight_decay=0.0),
    ]
    adam_groups = [g for g in adam_groups if g["params"]]
    n_grouped = sum(len(g["params"]) for g in adam_groups) + len(matrices)
    assert n_grouped == len(list(model.parameters())), "every parameter must be in exactly one group"
    adamw = torch.optim.AdamW(adam_groups, eps=1e-10, fused=_fused_adamw_ok(model))
    # one Muon group per shape, so each group's params stack into one batched orthogonalisation
    shapes = sorted({tuple(p.shape) for p in matrices})
    muon = Muon([dict(params=[p for p in matrices if tuple(p.shape) == s]) for s in shapes],
                lr=matrix_lr, momentum=muon_momentum, weight_decay=weight_decay, compile=compile)
    optimizers = [adamw, muon]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def _fused_adamw_ok(model) -> bool:
    """The fused AdamW kernel exists for CPU and CUDA float tensors (one pass over all params per step)."""
    device = next(model.parameters()).device.type
    return device in ("cpu", "cuda")
