"""Tests for munba_diffusion.step: the shared bargained update (the one path every trainer takes)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from munba_diffusion.bargaining import NashBargaining, SumWeighting, get_combiner, nash_bargaining_weights
from munba_diffusion.step import (
    BargainedUpdate,
    NonFiniteGradientError,
    clip_gradients_,
    gram_matrix,
    nonfinite_players,
    player_gradients,
    write_bargained_gradients,
    write_objective_gradients,
)


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

    diagnostics = write_bargained_gradients(two_losses(model), params, NashBargaining())
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
    write_bargained_gradients(two_losses(model), params, NashBargaining())
    once = [p.grad.clone() for p in params]
    write_bargained_gradients(two_losses(model), params, NashBargaining())
    for p, g in zip(params, once):
        torch.testing.assert_close(p.grad, 2 * g)


def test_frozen_parameters_and_their_stale_grads_are_untouched() -> None:
    model = tiny_model()
    frozen = model[0]
    for p in frozen.parameters():
        p.requires_grad_(False)
        p.grad = torch.full_like(p, 100.0)  # stale gradient from an earlier run
    trained = list(model[2].parameters())
    diagnostics = write_bargained_gradients(two_losses(model), trained, SumWeighting(), max_grad_norm=1e-3)
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
    diagnostics = write_bargained_gradients(losses, params, get_combiner("nash"))
    assert diagnostics.status == "zero_gradient:preserve"
    assert torch.equal(unused.grad, torch.zeros(4))
    # the forget player alone: its unit gradient
    assert diagnostics.direction_norm == pytest.approx(1.0, rel=1e-10)
    assert diagnostics.weights[0] == 0.0
    assert all(torch.isfinite(p.grad).all() for p in params)


def test_low_precision_parameters_get_grads_in_their_dtype() -> None:
    model = tiny_model().to(torch.bfloat16)
    x = torch.randn(4, 5, dtype=torch.bfloat16)
    losses = {"a": model(x).float().pow(2).mean(), "b": model(x).float().sum()}
    write_bargained_gradients(losses, list(model.parameters()), NashBargaining())
    assert all(p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all() for p in model.parameters())


def test_shared_forward_graph_between_players() -> None:
    model = tiny_model()
    out = model(torch.randn(8, 5))
    diagnostics = write_bargained_gradients(
        {"a": out[:, 0].mean(), "b": -out[:, 1].mean(), "c": out.pow(2).mean()},
        list(model.parameters()),
        NashBargaining(),
    )
    assert len(diagnostics.cosines) == 3 and diagnostics.cos_phi is None
    assert all(u > 0 for u in diagnostics.utilities)


def test_bad_inputs_are_clear_errors() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="at least one loss"):
        write_bargained_gradients({}, list(model.parameters()), NashBargaining())
    with pytest.raises(ValueError, match="scalar"):
        write_bargained_gradients({"a": model(torch.randn(2, 5))}, list(model.parameters()), NashBargaining())
    frozen = nn.Parameter(torch.ones(2), requires_grad=False)
    with pytest.raises(ValueError, match="requires_grad=False"):
        write_bargained_gradients(two_losses(model), [*model.parameters(), frozen], NashBargaining())
    with pytest.raises(ValueError, match="same players"):
        update = BargainedUpdate(list(model.parameters()), NashBargaining())
        update.accumulate_losses(two_losses(model))
        update.accumulate_losses({"forget": two_losses(model)["forget"]})
    with pytest.raises(ValueError, match="no gradients"):
        BargainedUpdate(list(model.parameters()), NashBargaining()).write_gradients()
    with pytest.raises(ValueError, match="nonfinite_gradients must be one of raise, skip; got 'ignore'"):
        BargainedUpdate(list(model.parameters()), NashBargaining(), nonfinite="ignore")


def test_write_bargained_gradients_is_bit_identical_to_the_weighted_sum_by_hand() -> None:
    """``.grad = sum_i w_i g_i`` with ``w = combiner(M)``, ``M`` the float64 Gram matrix: no hidden rescaling."""
    model = tiny_model()
    params = list(model.parameters())
    losses = two_losses(model)
    g_r = torch.autograd.grad(losses["preserve"], params, retain_graph=True)
    g_f = torch.autograd.grad(losses["forget"], params)
    weights = NashBargaining()(gram_matrix([g_r, g_f])).weights
    expected = [float(weights[0]) * a + float(weights[1]) * b for a, b in zip(g_r, g_f)]

    write_bargained_gradients(two_losses(model), params, NashBargaining())
    for p, e in zip(params, expected):
        assert torch.equal(p.grad, e)


def test_three_micro_batches_equal_one_step_on_the_concatenated_batch() -> None:
    generator = torch.Generator().manual_seed(3)
    x_r, x_f = torch.randn(24, 5, generator=generator), torch.randn(24, 5, generator=generator)
    y_r, y_f = torch.randint(0, 3, (24,), generator=generator), torch.randint(0, 3, (24,), generator=generator)

    def losses(model: nn.Module, rows: slice) -> dict[str, torch.Tensor]:
        return {
            "preserve": nn.functional.cross_entropy(model(x_r[rows]), y_r[rows]),
            "forget": nn.functional.cross_entropy(model(x_f[rows]), y_f[rows]),
        }

    whole, micro = tiny_model(), tiny_model()
    expected = write_bargained_gradients(losses(whole, slice(None)), list(whole.parameters()), NashBargaining())
    update = BargainedUpdate(list(micro.parameters()), NashBargaining())
    for start in range(0, 24, 8):
        update.accumulate_losses(losses(micro, slice(start, start + 8)), weight=1 / 3)
    diagnostics = update.write_gradients()
    for p, q in zip(micro.parameters(), whole.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-6)
    assert diagnostics.losses == pytest.approx(expected.losses, rel=1e-6)
    assert diagnostics.weights == pytest.approx(expected.weights, rel=1e-6)


def test_micro_batches_with_a_loss_scale_follow_the_documented_order_bit_for_bit() -> None:
    """``S_i = sum_m grad(c_m s L_i)``, ``g_i = S_i / s``, weights from ``M(g)``, ``.grad = sum_i w_i g_i``."""
    scale, micro_batches = 1024.0, 3
    reference, model = tiny_model(), tiny_model()
    params = list(reference.parameters())
    sums = None
    for seed in range(micro_batches):
        grads = [
            player_gradients(loss * (scale / micro_batches), params, retain_graph=True)
            for loss in two_losses(reference, seed).values()
        ]
        sums = grads if sums is None else [[a + b for a, b in zip(s, g)] for s, g in zip(sums, grads)]
    unscaled = [[g / scale for g in player] for player in sums]
    weights = NashBargaining()(gram_matrix(unscaled)).weights
    expected = [float(weights[0]) * a + float(weights[1]) * b for a, b in zip(*unscaled)]

    update = BargainedUpdate(list(model.parameters()), NashBargaining(), loss_scale=scale)
    for seed in range(micro_batches):
        update.accumulate_losses(two_losses(model, seed), weight=1 / micro_batches)
    diagnostics = update.write_gradients()
    for p, e in zip(model.parameters(), expected):
        assert torch.equal(p.grad, e)
    mean_losses = [
        sum(float(two_losses(model, seed)[name].detach()) for seed in range(micro_batches)) / micro_batches
        for name in ("preserve", "forget")
    ]
    assert diagnostics.losses == pytest.approx(mean_losses, rel=1e-12)


def test_the_loss_scale_is_removed_before_combining() -> None:
    plain, scaled = tiny_model(), tiny_model()
    expected = write_bargained_gradients(two_losses(plain), list(plain.parameters()), SumWeighting())
    update = BargainedUpdate(list(scaled.parameters()), SumWeighting(), loss_scale=3.0)
    update.accumulate_losses(two_losses(scaled))
    diagnostics = update.write_gradients()
    for p, q in zip(scaled.parameters(), plain.parameters()):  # float32 rounding of 3 * g / 3 only
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)
    assert diagnostics.grad_norms == pytest.approx(expected.grad_norms, rel=1e-6)
    assert diagnostics.losses == pytest.approx(expected.losses, rel=1e-12)


def test_reduce_is_applied_to_every_sum_before_the_gram_matrix() -> None:
    """A reduction that doubles every gradient doubles ``|g_i|`` and, with sum weights, ``.grad``."""
    plain, model = tiny_model(), tiny_model()
    expected = write_bargained_gradients(two_losses(plain), list(plain.parameters()), SumWeighting())
    calls = []

    def double(g: torch.Tensor) -> torch.Tensor:
        calls.append(g.shape)
        return 2 * g

    update = BargainedUpdate(list(model.parameters()), SumWeighting(), reduce=double)
    update.accumulate_losses(two_losses(model))
    diagnostics = update.write_gradients()
    assert len(calls) == 2 * len(list(model.parameters()))
    assert diagnostics.grad_norms == pytest.approx([2 * n for n in expected.grad_norms], rel=1e-12)
    assert diagnostics.utilities == pytest.approx([4 * u for u in expected.utilities], rel=1e-12)
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, 2 * q.grad)


def test_accumulate_gradients_matches_accumulate_losses() -> None:
    """Gradients gathered elsewhere (e.g. one forward per player) give the same update; they are not modified."""
    reference, model = tiny_model(), tiny_model()
    write_bargained_gradients(two_losses(reference), list(reference.parameters()), NashBargaining())
    params = list(model.parameters())
    losses = two_losses(model)
    per_player = {name: player_gradients(loss, params, retain_graph=True) for name, loss in losses.items()}
    copies = {name: [g.clone() for g in grads] for name, grads in per_player.items()}
    values = {name: float(loss.detach()) for name, loss in losses.items()}
    update = BargainedUpdate(params, NashBargaining())
    update.accumulate_gradients(per_player, values)
    diagnostics = update.write_gradients()
    for p, q in zip(params, reference.parameters()):
        assert torch.equal(p.grad, q.grad)
    assert diagnostics.losses == [values["preserve"], values["forget"]]
    assert all(torch.equal(a, b) for name in per_player for a, b in zip(per_player[name], copies[name]))
    with pytest.raises(ValueError, match="2 gradients for 4 parameters"):
        update.accumulate_gradients({name: grads[:2] for name, grads in per_player.items()}, values)


def test_accumulate_gradients_weights_the_given_gradients() -> None:
    """Gradients of ``s L_i`` with weight ``c``: the same sums as ``accumulate_losses`` with that weight."""
    by_losses, by_gradients = tiny_model(), tiny_model()
    expected = BargainedUpdate(list(by_losses.parameters()), SumWeighting(), loss_scale=8.0)
    update = BargainedUpdate(list(by_gradients.parameters()), SumWeighting(), loss_scale=8.0)
    for seed in range(3):
        expected.accumulate_losses(two_losses(by_losses, seed), weight=1 / 3)
        losses = two_losses(by_gradients, seed)
        grads = {
            name: player_gradients(8.0 * loss, list(by_gradients.parameters()), retain_graph=True)
            for name, loss in losses.items()
        }
        update.accumulate_gradients(grads, {name: float(loss.detach()) for name, loss in losses.items()}, weight=1 / 3)
    assert update.write_gradients().losses == pytest.approx(expected.write_gradients().losses, rel=1e-12)
    for p, q in zip(by_gradients.parameters(), by_losses.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)


def nan_forget_losses(model: nn.Module) -> dict[str, torch.Tensor]:
    losses = two_losses(model)
    losses["forget"] = losses["forget"] * float("nan")
    return losses


def stale_grads(params: list[nn.Parameter]) -> list[torch.Tensor]:
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    return [p.grad.clone() for p in params]


def test_nonfinite_policy_raise_names_the_player_and_leaves_grad_untouched() -> None:
    model = tiny_model()
    params = list(model.parameters())
    before = stale_grads(params)
    with pytest.raises(NonFiniteGradientError) as error:
        write_bargained_gradients(nan_forget_losses(model), params, NashBargaining(), max_grad_norm=1e-3)
    message = str(error.value)
    assert "forget" in message and "preserve" not in message and "\n" not in message
    assert "nonfinite_gradients='skip'" in message and error.value.players == ["forget"]
    assert isinstance(error.value, FloatingPointError)
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))


def test_nonfinite_policy_skip_leaves_grad_untouched_and_says_so() -> None:
    model = tiny_model()
    params = list(model.parameters())
    before = stale_grads(params)
    update = BargainedUpdate(params, NashBargaining(), nonfinite="skip", max_grad_norm=1e-3)
    update.accumulate_losses(nan_forget_losses(model))
    diagnostics = update.write_gradients()
    assert diagnostics.skipped and diagnostics.status == "skipped:nonfinite:forget"
    assert diagnostics.weights == [0.0, 0.0] and diagnostics.direction_norm == 0.0 and diagnostics.clip_coef is None
    assert math.isnan(diagnostics.grad_norms[1]) and math.isfinite(diagnostics.grad_norms[0])
    assert diagnostics.as_log_dict()["skipped"] is True
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))

    # the skipped step's sums are gone: the next step is the same as on a fresh update
    for p in params:
        p.grad = None
    update.accumulate_losses(two_losses(model))
    update.write_gradients()
    fresh = tiny_model()
    write_bargained_gradients(two_losses(fresh), list(fresh.parameters()), NashBargaining(), max_grad_norm=1e-3)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(params, fresh.parameters()))


def test_nonfinite_players_is_the_one_check() -> None:
    finite, infinite = [torch.ones(3), torch.zeros(2)], [torch.ones(3), torch.tensor([1.0, float("inf")])]
    assert nonfinite_players({"a": finite, "b": finite}, "raise") == []
    assert nonfinite_players({"a": infinite, "b": finite, "c": infinite}, "skip") == ["a", "c"]
    with pytest.raises(NonFiniteGradientError, match="the gradient of a, c is not finite"):
        nonfinite_players({"a": infinite, "b": finite, "c": infinite}, "raise")
    with pytest.raises(ValueError, match="must be one of raise, skip"):
        nonfinite_players({"a": finite}, "warn")


def test_objective_update_is_backward_then_policy_then_clipping_of_the_given_params():
    model = tiny_model()
    params = list(model.parameters())
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    loss = model(x).pow(2).sum()
    expected = torch.autograd.grad(loss, params, retain_graph=True)
    assert write_objective_gradients(loss, params, name="CE(retain)")
    for p, g in zip(params, expected):
        torch.testing.assert_close(p.grad, g)
    model.zero_grad(set_to_none=True)
    assert write_objective_gradients(model(x).pow(2).sum(), params, name="CE(retain)", max_grad_norm=1e-3)
    assert abs(sum(float(p.grad.pow(2).sum()) for p in params) ** 0.5 - 1e-3) < 1e-6
    model.zero_grad(set_to_none=True)
    nan_loss = model(x).sum() * float("nan")
    with pytest.raises(NonFiniteGradientError, match="CE\\(retain\\)"):
        write_objective_gradients(nan_loss, params, name="CE(retain)")
    model.zero_grad(set_to_none=True)
    assert not write_objective_gradients(model(x).sum() * float("nan"), params, name="CE(retain)", nonfinite="skip")
