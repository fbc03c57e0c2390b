import copy

import pytest
import torch

from nanopipe.optim import Muon, orthogonalize, setup_optimizers
from tests.conftest import tiny_gpt


@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (3, 64, 256)])
def test_orthogonalize_gives_near_orthogonal_output(shape):
    torch.manual_seed(0)
    G = torch.randn(*shape)
    X = orthogonalize(G)
    assert X.shape == G.shape
    s = torch.linalg.svdvals(X)
    # Polar Express maps all singular values into a band around 1 (not exactly 1: it trades accuracy for speed)
    assert s.min() > 0.8 and s.max() < 1.2
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    polar = U @ Vh
    assert ((X - polar).norm() / polar.norm()) < 0.15
    # invariant to the scale of its input
    torch.testing.assert_close(orthogonalize(1000 * G), X, atol=1e-4, rtol=1e-4)


def test_param_groups_and_lr_scaling():
    model = tiny_gpt(vocab=256)  # width 64
    adamw, muon = setup_optimizers(model, matrix_lr=0.02, embedding_lr=0.3, unembedding_lr=0.004, scalar_lr=0.5,
                                   weight_decay=0.1)
    scale = (64 / 768) ** -0.5
    # upstream's per-group settings: lm_head, wte, value embeddings (half LR), resid, x0, smear/backout
    lrs = [g["lr"] for g in adamw.param_groups]
    assert lrs == pytest.approx([0.004 * scale, 0.3 * scale, 0.15 * scale, 0.005, 0.5, 0.2])
    assert [g["betas"] for g in adamw.param_groups] == [(0.8, 0.96), (0.8, 0.995), (0.8, 0.995), (0.8, 0.95),
                                                        (0.96, 0.95), (0.8, 0.95)]
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.01, 0.001, 0.01, 0.05, 0.0, 0.0]
    assert adamw.param_groups[5]["params"] == [model.smear_gate.weight, model.smear_lambda, model.backout_lambda]
    assert all(g["beta2"] == 0.9 for g in muon.param_groups)
    muon_params = [p for g in muon.param_groups for p in g["params"]]
    assert all(p.ndim == 2 for p in muon_params)
    assert len(muon_params) == len(list(model.transformer.h.parameters()))
    for opt in (adamw, muon):
        for g in opt.param_groups:
            assert g["initial_lr"] == g["lr"]
    assert all(g["weight_decay"] == 0.1 for g in muon.param_groups)
    total = sum(len(g["params"]) for o in (adamw, muon) for g in o.param_groups)
    assert total == len(list(model.parameters()))


def test_weight_decay_shrinks_every_group_by_its_lr_times_its_decay():
    """With zero gradients the only change a step makes is the decay: each weight is multiplied by
    1 - lr * wd, with Muon's shape-aware LR (AdamW groups carry their own decays, Muon the one passed in)."""
    model = tiny_gpt(vocab=256)
    optimizers = setup_optimizers(model, weight_decay=0.5)
    before = {p: p.detach().clone() for p in model.parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for opt in optimizers:
        opt.step()
    decayed = 0
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                lr = group["lr"] * (max(1.0, p.shape[0] / p.shape[1]) ** 0.5 if opt is optimizers[1] else 1.0)
                torch.testing.assert_close(p.detach(), before[p] * (1 - lr * group["weight_decay"]))
                decayed += group["weight_decay"] > 0 and not torch.equal(p.detach(), before[p])
    assert decayed >= len(list(model.transformer.h.parameters()))  # every Muon matrix at least


def test_muon_weight_decay_is_cautious():
    """Muon decays only the coordinates its update also pulls towards 0, by lr * wd of the weight."""
    torch.manual_seed(0)
    w0, grad = torch.randn(16, 8), torch.randn(16, 8)
    after = {}
    for wd in (0.0, 0.5):
        w = torch.nn.Parameter(w0.clone())
        w.grad = grad.clone()
        Muon([w], lr=0.1, momentum=0.9, weight_decay=wd).step()
        after[wd] = w.detach()
    lr = 0.1 * 2 ** 0.5  # the shape-aware LR of a 16 x 8 matrix
    update = (w0 - after[0.0]) / lr
    agree = (update * w0 >= 0).float()
    assert 0 < agree.mean() < 1  # both kinds of coordinate are present
    torch.testing.assert_close(after[0.5], after[0.0] - lr * 0.5 * w0 * agree)


@pytest.mark.parametrize("shape", [(16, 8), (8, 24)])
def test_muon_update_has_the_exact_polar_norm_and_ignores_row_scale(shape):
    """Muon+: the update's Frobenius norm is that of a semi-orthogonal matrix, sqrt(min(m, n)), times the
    shape-aware LR. MuonEq: rows are equalised first, so rescaling one gradient row changes nothing."""
    rows, cols = shape
    torch.manual_seed(0)
    grad = torch.randn(rows, cols)
    updates = []
    for g in (grad, grad * torch.tensor([10.0] + [1.0] * (rows - 1))[:, None]):
        w = torch.nn.Parameter(torch.randn(rows, cols))
        before = w.detach().clone()
        opt = Muon([w], lr=0.1, momentum=0.9, weight_decay=0.0)
        w.grad = g.clone()
        opt.step()
        updates.append(before - w.detach())
    lr = 0.1 * max(1.0, rows / cols) ** 0.5
    assert updates[0].norm().item() == pytest.approx(lr * min(rows, cols) ** 0.5, rel=1e-5)
    torch.testing.assert_close(updates[1], updates[0], atol=1e-5, rtol=1e-4)


def test_muon_rejects_non_matrices():
    with pytest.raises(ValueError):
        Muon([torch.nn.Parameter(torch.zeros(3))])


def test_tiny_model_overfits_a_fixed_batch():
    model = tiny_gpt(vocab=256)
    optimizers = setup_optimizers(model)
    torch.manual_seed(1)
    batch = torch.randint(0, 256, (4, 33))
    x, y = batch[:, :-1], batch[:, 1:]
    losses = []
    for _ in range(50):
        loss = model(x, y)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[0] > 5.0
    assert losses[-1] < 0.5, losses[::10]


def train_steps(model, optimizers, batches):
    for x, y in batches:
        model(x, y).backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)


def test_optimizer_state_dict_resume_is_exact():
    torch.manual_seed(2)
    batches = [(b[:, :-1], b[:, 1:]) for b in torch.randint(0, 256, (6, 2, 17))]
    model = tiny_gpt(vocab=256)
    optimizers = setup_optimizers(model, weight_decay=0.1)
    train_steps(model, optimizers, batches[:3])
    saved_model = copy.deepcopy(model.state_dict())
    saved_opts = [copy.deepcopy(o.state_dict()) for o in optimizers]
    train_steps(model, optimizers, batches[3:])

    resumed = tiny_gpt(vocab=256, seed=99)  # different init: everything must come from the saved state
    resumed.load_state_dict(saved_model)
    resumed_opts = setup_optimizers(resumed, weight_decay=0.1)
    for opt, state in zip(resumed_opts, saved_opts):
        opt.load_state_dict(state)
    train_steps(resumed, resumed_opts, batches[3:])
    for (k, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_muon_momentum_and_weight_decay_are_per_group_settings():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 16))
    opt = Muon([w], lr=0.1, momentum=0.9, weight_decay=0.0)
    w.grad = torch.zeros(8, 16)
    before = w.detach().clone()
    opt.step()  # zero gradient and no decay: no change
    torch.testing.assert_close(w.detach(), before)
    opt.param_groups[0]["weight_decay"] = 1.0
    w.grad = torch.randn(8, 16)
    opt.step()
    assert not torch.equal(w.detach(), before)
