"""Tests for munba_diffusion.step: the shared bargained update."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from munba_diffusion.bargaining import NashBargaining, SumWeighting, get_combiner, nash_bargaining_weights
from munba_diffusion.step import bargained_step, clip_gradients_, gram_matrix


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def two_losses(model: nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x_r, x_f = torch.randn(16, 5, generator=generator), torch.randn(16, 5, generator=generator)
    y_r, y_f = torch.randint(0, 3, (16,), generator=generator), torch.randint(0, 3, (16,), generator=generator)
    return {
        "preserve": nn.functional.cross_entropy(model(x_r), y_r),
        "forget": nn.functional.cross_entropy(model(x_f), y_f),
    }


def test_combined_gradient_matches_manual_computation() -> None:
    model = tiny_model()
    params = list(model.parameters())
    manual = two_losses(model)
    g_r = torch.autograd.grad(manual["preserve"], params)
    g_f = torch.autograd.grad(manual["forget"], params)
    flat_r = torch.cat([g.reshape(-1) for g in g_r]).double()
    flat_f = torch.cat([g.reshape(-1) for g in g_f]).double()
    gram = torch.stack([flat_r, flat_f]) @ torch.stack([flat_r, flat_f]).T
    alpha = nash_bargaining_weights(gram).weights

    diagnostics = bargained_step(two_losses(model), params, NashBargaining())
    for p, a, b in zip(params, g_r, g_f):
        torch.testing.assert_close(p.grad, float(alpha[0]) * a + float(alpha[1]) * b, rtol=1e-6, atol=1e-8)
    assert diagnostics.weights == pytest.approx(alpha.tolist(), rel=1e-10)
    d = alpha[0] * flat_r + alpha[1] * flat_f
    assert diagnostics.utilities == pytest.approx([float(flat_r @ d), float(flat_f @ d)], rel=1e-8)
    assert diagnostics.direction_norm == pytest.approx(math.sqrt(2), rel=1e-8)
    cos_phi = float(flat_r @ flat_f / (flat_r.norm() * flat_f.norm()))
    assert diagnostics.cos_phi == pytest.approx(cos_phi, rel=1e-8)
    assert diagnostics.grad_norms == pytest.approx([float(flat_r.norm()), float(flat_f.norm())], rel=1e-10)
    assert diagnostics.status == "ok" and diagnostics.clip_coef is None
    log = diagnostics.as_log_dict()
    assert log["weight/forget"] == diagnostics.weights[1]
    assert log["loss/preserve"] == pytest.approx(float(manual["preserve"].detach()))
    assert log["cos/preserve,forget"] == diagnostics.cos_phi == log["cos_phi"]


def test_gram_matrix_is_per_tensor_float64_dot_products() -> None:
    generator = torch.Generator().manual_seed(0)
    players = [[torch.randn(4, 3, generator=generator), 1e3 * torch.randn(7, generator=generator)] for _ in range(3)]
    flat = torch.stack([torch.cat([t.reshape(-1) for t in p]).double() for p in players])
    assert gram_matrix(players).dtype == torch.float64
    torch.testing.assert_close(gram_matrix(players), flat @ flat.T, rtol=1e-14, atol=0)


def test_accumulation_adds_like_backward() -> None:
    model = tiny_model()
    params = list(model.parameters())
    bargained_step(two_losses(model), params, NashBargaining())
    once = [p.grad.clone() for p in params]
    bargained_step(two_losses(model), params, NashBargaining())
    for p, g in zip(params, once):
        torch.testing.assert_close(p.grad, 2 * g)


def test_frozen_parameters_and_their_stale_grads_are_untouched() -> None:
    model = tiny_model()
    frozen = model[0]
    for p in frozen.parameters():
        p.requires_grad_(False)
        p.grad = torch.full_like(p, 100.0)  # stale gradient from an earlier run
    trained = list(model[2].parameters())
    diagnostics = bargained_step(two_losses(model), trained, SumWeighting(), max_grad_norm=1e-3)
    for p in frozen.parameters():
        assert torch.equal(p.grad, torch.full_like(p, 100.0))
    trained_norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in trained))
    assert trained_norm == pytest.approx(1e-3, rel=1e-3)
    assert 0 < diagnostics.clip_coef < 1


def test_clip_gradients_reports_norm_and_leaves_small_grads() -> None:
    p = nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    assert clip_gradients_([p], 10.0) == (pytest.approx(5.0), 1.0)
    assert torch.equal(p.grad, torch.tensor([3.0, 4.0]))
    total, coef = clip_gradients_([p], 1.0)
    assert total == pytest.approx(5.0) and coef == pytest.approx(0.2, rel=1e-5)
    assert float(p.grad.norm()) == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="positive"):
        clip_gradients_([p], 0.0)


def test_unused_parameter_and_constant_loss() -> None:
    model = tiny_model()
    unused = nn.Parameter(torch.ones(4))
    params = [*model.parameters(), unused]
    losses = two_losses(model)
    losses["preserve"] = torch.tensor(0.0)  # e.g. an exactly-zero preserve loss without a graph at step 0
    diagnostics = bargained_step(losses, params, get_combiner("nash"))
    assert diagnostics.status == "zero_gradient:preserve"
    assert torch.equal(unused.grad, torch.zeros(4))
    # the forget player alone: its unit gradient
    assert diagnostics.direction_norm == pytest.approx(1.0, rel=1e-10)
    assert diagnostics.weights[0] == 0.0
    assert all(torch.isfinite(p.grad).all() for p in params)


def test_reduce_gradient_is_applied_to_every_players_tensors() -> None:
    model = tiny_model()
    params = list(model.parameters())
    plain = tiny_model()
    bargained_step(two_losses(plain), list(plain.parameters()), SumWeighting())
    calls = []

    def double(g: torch.Tensor) -> torch.Tensor:
        calls.append(g.shape)
        return 2 * g

    bargained_step(two_losses(model), params, SumWeighting(), reduce_gradient=double)
    assert len(calls) == 2 * len(params)
    for p, q in zip(params, plain.parameters()):
        torch.testing.assert_close(p.grad, 2 * q.grad)


def test_low_precision_parameters_get_grads_in_their_dtype() -> None:
    model = tiny_model().to(torch.bfloat16)
    x = torch.randn(4, 5, dtype=torch.bfloat16)
    losses = {"a": model(x).float().pow(2).mean(), "b": model(x).float().sum()}
    bargained_step(losses, list(model.parameters()), NashBargaining())
    assert all(p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all() for p in model.parameters())


def test_shared_forward_graph_between_players() -> None:
    model = tiny_model()
    out = model(torch.randn(8, 5))
    diagnostics = bargained_step(
        {"a": out[:, 0].mean(), "b": -out[:, 1].mean(), "c": out.pow(2).mean()},
        list(model.parameters()),
        NashBargaining(),
    )
    assert len(diagnostics.cosines) == 3 and diagnostics.cos_phi is None
    assert all(u > 0 for u in diagnostics.utilities)


def test_bad_inputs_are_clear_errors() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="at least one loss"):
        bargained_step({}, list(model.parameters()), NashBargaining())
    with pytest.raises(ValueError, match="scalar"):
        bargained_step({"a": model(torch.randn(2, 5))}, list(model.parameters()), NashBargaining())
    frozen = nn.Parameter(torch.ones(2), requires_grad=False)
    with pytest.raises(ValueError, match="requires_grad=False"):
        bargained_step(two_losses(model), [*model.parameters(), frozen], NashBargaining())


def test_apply_player_gradients_matches_bargained_step() -> None:
    """Gradients gathered elsewhere (e.g. summed over micro-batches) give the same update as bargained_step."""
    from munba_diffusion.step import apply_player_gradients, player_gradients

    reference, model = tiny_model(), tiny_model()
    bargained_step(two_losses(reference), list(reference.parameters()), NashBargaining())
    params = list(model.parameters())
    losses = two_losses(model)
    per_player = {name: player_gradients(loss, params, retain_graph=True) for name, loss in losses.items()}
    values = {name: float(loss.detach()) for name, loss in losses.items()}
    diagnostics = apply_player_gradients(per_player, params, NashBargaining(), losses=values)
    for p, q in zip(params, reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-8)
    assert diagnostics.losses == [values["preserve"], values["forget"]]
