r"""One bargained update: per-player gradients -> float64 Gram matrix -> weights -> ``.grad``.

For players ``i = 1..K`` with losses ``L_i`` over the trainable parameters ``theta``:

.. math::

    g_i = \nabla_\theta L_i, \qquad M_{ij} = g_i \cdot g_j = \sum_{p} \langle g_i^{(p)}, g_j^{(p)} \rangle,
    \qquad w = \mathrm{combiner}(M), \qquad \theta.\mathrm{grad} \mathrel{+}= \sum_i w_i g_i,

where the Gram matrix is accumulated in float64 as a sum over parameter tensors ``p`` (no concatenation of all
gradients). The direction's utilities ``g_i . d = (M w)_i``, its norm ``sqrt(w^T M w)`` and the players' cosines
come from the same Gram matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .bargaining.base import Combiner, name_players


@dataclass
class StepDiagnostics:
    """What one :func:`bargained_step` saw and did (before any clipping, except ``clip_coef``).

    Attributes:
        names: player names, in the order of the other lists.
        losses: each player's loss value.
        weights: the combiner's weight per player (``d = sum_i w_i g_i``).
        grad_norms: ``|g_i|``.
        utilities: ``g_i . d``, the first-order decrease of ``L_i`` per unit learning rate of a step along ``-d``.
        cosines: ``K x K`` cosine similarities of the players' gradients (0 where a gradient is zero).
        cos_phi: ``cosines[0][1]`` for two players, else ``None``.
        direction_norm: ``|d|``.
        status: the combiner's status with player names, e.g. ``"ok"`` or ``"zero_gradient:preserve"``.
        clip_coef: factor the trained gradients were scaled by (1.0 when under the limit), ``None`` if no clipping.
    """

    names: list[str]
    losses: list[float]
    weights: list[float]
    grad_norms: list[float]
    utilities: list[float]
    cosines: list[list[float]]
    cos_phi: float | None
    direction_norm: float
    status: str
    clip_coef: float | None

    def as_log_dict(self) -> dict[str, float | str]:
        """Flat keys for loggers: ``loss/<name>``, ``weight/<name>``, ``grad_norm/<name>``, ``utility/<name>``,
        ``cos/<a>,<b>``, ``cos_phi``, ``direction_norm``, ``status`` and ``clip_coef`` (when set)."""
        log: dict[str, float | str] = {}
        for i, name in enumerate(self.names):
            log[f"loss/{name}"] = self.losses[i]
            log[f"weight/{name}"] = self.weights[i]
            log[f"grad_norm/{name}"] = self.grad_norms[i]
            log[f"utility/{name}"] = self.utilities[i]
            for j in range(i + 1, len(self.names)):
                log[f"cos/{name},{self.names[j]}"] = self.cosines[i][j]
        if self.cos_phi is not None:
            log["cos_phi"] = self.cos_phi
        log["direction_norm"] = self.direction_norm
        log["status"] = self.status
        if self.clip_coef is not None:
            log["clip_coef"] = self.clip_coef
        return log


def player_gradients(
    loss: torch.Tensor, params: Sequence[torch.nn.Parameter], *, retain_graph: bool
) -> list[torch.Tensor]:
    """``d loss / d p`` for each parameter, zeros for parameters the loss does not reach (or a constant loss)."""
    if not loss.requires_grad:
        return [torch.zeros_like(p) for p in params]
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def gram_matrix(per_player_grads: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """``M_ij = sum_p <g_i^(p), g_j^(p)>`` in float64, one parameter tensor at a time."""
    k = len(per_player_grads)
    device = per_player_grads[0][0].device if per_player_grads and per_player_grads[0] else "cpu"
    gram = torch.zeros(k, k, dtype=torch.float64, device=device)  # one transfer at the end, not one per tensor
    for tensors in zip(*per_player_grads):
        flat = torch.stack([t.reshape(-1) for t in tensors]).to(torch.float64)
        gram += (flat @ flat.T).to(device)
    return gram.cpu()


def clip_gradients_(params: Sequence[torch.nn.Parameter], max_norm: float) -> tuple[float, float]:
    """Scale the ``.grad`` of ``params`` (only) so that their total L2 norm is at most ``max_norm``.

    Returns:
        ``(total_norm, clip_coef)`` with ``clip_coef = min(1, max_norm / (total_norm + 1e-6))`` as in
        ``torch.nn.utils.clip_grad_norm_``.
    """
    if max_norm <= 0:
        raise ValueError(f"max_grad_norm must be positive, got {max_norm}")
    grads = [p.grad for p in params if p.grad is not None]
    total_norm = math.sqrt(sum(float(g.detach().to(torch.float64).pow(2).sum()) for g in grads))
    clip_coef = min(1.0, max_norm / (total_norm + 1e-6))
    if clip_coef < 1.0:
        for g in grads:
            g.mul_(clip_coef)
    return total_norm, clip_coef


def _validate(losses: Mapping[str, torch.Tensor], params: Sequence[torch.nn.Parameter]) -> None:
    if not losses:
        raise ValueError("bargained_step needs at least one loss; pass a mapping like {'preserve': l_r, 'forget': l_f}")
    if not params:
        raise ValueError("bargained_step got no parameters; pass the trainable parameters")
    if any(not p.requires_grad for p in params):
        raise ValueError("bargained_step got a parameter with requires_grad=False; pass only the trainable parameters")
    for name, loss in losses.items():
        if loss.numel() != 1:
            raise ValueError(f"loss {name!r} has shape {tuple(loss.shape)}; reduce it to a scalar (e.g. .mean())")


def bargained_step(
    losses: Mapping[str, torch.Tensor],
    params: Sequence[torch.nn.Parameter],
    combiner: Combiner,
    *,
    max_grad_norm: float | None = None,
    reduce_gradient: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> StepDiagnostics:
    """Add the combined gradient ``sum_i w_i g_i`` of the players ``losses`` to the ``.grad`` of ``params``.

    Args:
        losses: player name -> scalar loss, e.g. ``{"preserve": l_r, "forget": l_f}``.
        params: the trainable parameters only; nothing else is read or written.
        combiner: turns the float64 Gram matrix into weights (e.g. ``get_combiner("nash")``).
        max_grad_norm: if set, clip the total gradient norm of ``params`` after writing (call it on the last
            micro-step when accumulating).
        reduce_gradient: applied to each player's per-tensor gradient before the Gram matrix, e.g. an all-reduce
            mean across processes (``torch.autograd.grad`` bypasses DDP's gradient hooks).

    Like ``backward()``, the result is added to existing ``.grad`` (created when ``None``), in the parameter's
    dtype, so gradient accumulation works. Each player's gradient comes from ``torch.autograd.grad`` with the
    graph kept until the last player (losses may share a forward pass).
    """
    params = list(params)
    _validate(losses, params)
    names = list(losses)
    per_player = {}
    for i, name in enumerate(names):
        grads = player_gradients(losses[name], params, retain_graph=i < len(names) - 1)
        if reduce_gradient is not None:
            grads = [reduce_gradient(g) for g in grads]
        per_player[name] = grads
    loss_values = {name: float(loss.detach()) for name, loss in losses.items()}
    return apply_player_gradients(per_player, params, combiner, losses=loss_values, max_grad_norm=max_grad_norm)


def apply_player_gradients(
    per_player: Mapping[str, Sequence[torch.Tensor]],
    params: Sequence[torch.nn.Parameter],
    combiner: Combiner,
    *,
    losses: Mapping[str, float],
    max_grad_norm: float | None = None,
) -> StepDiagnostics:
    """The second half of :func:`bargained_step`, for gradients gathered some other way.

    ``per_player`` maps each player to its per-parameter gradients (aligned with ``params``), e.g. summed over
    gradient-accumulation micro-batches so that the bargaining sees the whole batch's gradients once.
    """
    params = list(params)
    names = list(per_player)
    grads_by_player = [per_player[name] for name in names]
    gram = gram_matrix(grads_by_player)
    weighting = combiner(gram)
    weights = weighting.weights.to(torch.float64)

    with torch.no_grad():
        for index, param in enumerate(params):
            compute_dtype = torch.promote_types(param.dtype, torch.float32)
            combined = sum(float(w) * grads[index].to(compute_dtype) for w, grads in zip(weights, grads_by_player))
            if param.grad is None:
                param.grad = combined.to(param.dtype)
            else:
                param.grad.add_(combined.to(param.grad.dtype))
    clip_coef = clip_gradients_(params, max_grad_norm)[1] if max_grad_norm is not None else None
    return _diagnostics(names, losses, gram, weights, name_players(weighting.status, names), clip_coef)


def _diagnostics(
    names: list[str],
    losses: Mapping[str, float],
    gram: torch.Tensor,
    weights: torch.Tensor,
    status: str,
    clip_coef: float | None,
) -> StepDiagnostics:
    norms = gram.diagonal().clamp_min(0).sqrt()
    denominator = torch.outer(norms, norms)
    cosines = torch.where(denominator > 0, gram / denominator.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    cosines = cosines.clamp(-1.0, 1.0)
    return StepDiagnostics(
        names=names,
        losses=[float(losses[name]) for name in names],
        weights=weights.tolist(),
        grad_norms=norms.tolist(),
        utilities=(gram @ weights).tolist(),
        cosines=cosines.tolist(),
        cos_phi=float(cosines[0, 1]) if len(names) == 2 else None,
        direction_norm=math.sqrt(max(float(weights @ gram @ weights), 0.0)),
        status=status,
        clip_coef=clip_coef,
    )
