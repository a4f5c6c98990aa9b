r"""One bargained update: per-player gradients -> float64 Gram matrix -> weights -> ``.grad``.

For players ``i = 1..K`` with losses ``L_i`` over the trainable parameters ``theta``:

.. math::

    g_i = \nabla_\theta L_i, \qquad M_{ij} = g_i \cdot g_j = \sum_{p} \langle g_i^{(p)}, g_j^{(p)} \rangle,
    \qquad w = \mathrm{combiner}(M), \qquad \theta.\mathrm{grad} \mathrel{+}= \sum_i w_i g_i,

where the Gram matrix is accumulated in float64 as a sum over parameter tensors ``p`` (no concatenation of all
gradients). The direction's utilities ``g_i . d = (M w)_i``, its norm ``sqrt(w^T M w)`` and the players' cosines
come from the same Gram matrix.

With micro-batches ``m = 1..n`` of weights ``c_m`` (e.g. ``1/n`` for gradient accumulation), a constant loss scale
``s`` (fp16 training) and a reduction ``R`` across processes (e.g. the all-reduce mean), :class:`BargainedUpdate`
bargains once per optimizer step over the whole batch's gradients:

.. math::

    S_i = \sum_m c_m \nabla_\theta (s\, L_i^{(m)}), \qquad g_i = R(S_i) / s, \qquad
    \bar L_i = \frac{\sum_m c_m L_i^{(m)}}{\sum_m c_m},

then, in this order: a non-finite ``g_i`` raises :class:`NonFiniteGradientError` (policy ``raise``) or skips the
update (policy ``skip``: ``.grad`` untouched); ``M``, ``w`` and ``theta.grad += sum_i w_i g_i`` as above; and, if
``max_grad_norm`` is set, ``theta.grad`` is scaled by ``min(1, max_grad_norm / (|theta.grad| + 1e-6))``, where
``theta`` are the trained parameters only (never frozen ones with stale gradients). The reduction comes before the
Gram matrix because ``M`` is quadratic in the gradients: the mean of per-process Gram matrices is not the Gram
matrix of the mean gradient; reduced gradients also let every process take the same skip decision. The loss scale
is removed before ``M`` so that the weights, the clipping and the diagnostics see the true gradients.

Where the ``g_i`` come from (:class:`PlayerGradientSource`, for players whose losses each read only their own rows
of a batch): ``per_player``, one forward and one backward per player, or ``fast`` (the default), one forward and
one backward over all players' rows, each player's gradient of every Linear/Conv2d layer (a LoRA's factors) being
the product of the layer's input and output gradient summed over that player's rows
(:mod:`munba_diffusion.row_gradients`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .bargaining.base import Combiner, name_players
from .config import option
from .row_gradients import RowGroupGradients

NONFINITE_POLICIES: tuple[str, ...] = ("raise", "skip")
PLAYER_GRADIENT_SOURCES: tuple[str, ...] = ("fast", "per_player")

logger = logging.getLogger(__name__)


def nonfinite_gradients_option() -> Any:
    """The configuration field every trainer shares for the non-finite policy (declared once, here)."""
    return option(
        "raise",
        "what to do when a player's gradient is not finite: raise (stop with a one-line error) or "
        "skip (leave the parameters unchanged for that step and log it)",
        choices=NONFINITE_POLICIES,
    )


def player_gradients_option() -> Any:
    """The configuration field that chooses how per-player gradients are computed (declared once, here)."""
    return option(
        "fast",
        "how each player's gradient is computed: fast (one forward and one backward over all players' rows; "
        "each player's gradient of the LoRA's Linear/Conv2d layers from per-row products summed over its rows, "
        "anything else by per_player passes, said once in the log) or per_player (one forward and one backward "
        "per player over its own rows: the reference; the same gradients to float rounding, 1.2x to 2x the time "
        "for 2 to 9 players, less activation memory)",
        choices=PLAYER_GRADIENT_SOURCES,
    )


def max_grad_norm_option(default: float | None = None) -> Any:
    """The configuration field every trainer shares for clipping the trained parameters' combined gradient."""
    return option(
        default,
        "clip the total gradient norm of the trained parameters to this (none: no clipping)",
        low=0.0,
        low_open=True,
    )


class NonFiniteGradientError(FloatingPointError):
    """A player's gradient holds NaN or inf under the non-finite policy ``raise``; ``players`` names them."""

    def __init__(self, players: Sequence[str]) -> None:
        self.players = list(players)
        super().__init__(
            f"the gradient of {', '.join(self.players)} is not finite (NaN or inf); lower the learning rate, keep the "
            "trained parameters and losses in float32, or set nonfinite_gradients='skip' to skip such steps"
        )


@dataclass
class StepDiagnostics:
    """What one bargained update saw and did (before any clipping, except ``clip_coef``).

    Attributes:
        names: player names, in the order of the other lists.
        losses: each player's loss value (weighted mean over the micro-batches).
        weights: the combiner's weight per player (``d = sum_i w_i g_i``); zeros for a skipped update.
        grad_norms: ``|g_i|`` (NaN or inf for a non-finite gradient).
        utilities: ``g_i . d``, the first-order decrease of ``L_i`` per unit learning rate of a step along ``-d``
            (zeros for a skipped update, which writes ``d = 0``).
        cosines: ``K x K`` cosine similarities of the players' gradients (0 where a gradient is zero).
        cos_phi: ``cosines[0][1]`` for two players, else ``None``.
        direction_norm: ``|d|``.
        status: the combiner's status with player names, e.g. ``"ok"`` or ``"zero_gradient:preserve"``, or
            ``"skipped:nonfinite:<players>"``.
        clip_coef: factor the trained gradients were scaled by (1.0 when under the limit), ``None`` if no clipping.
        skipped: the update was skipped because a gradient was not finite (``.grad`` left untouched).
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
    skipped: bool = False

    def as_log_dict(self) -> dict[str, float | str | bool]:
        """Flat keys for loggers: ``loss/<name>``, ``weight/<name>``, ``grad_norm/<name>``, ``utility/<name>``,
        ``cos/<a>,<b>``, ``cos_phi``, ``direction_norm``, ``status``, ``skipped`` and ``clip_coef`` (when set)."""
        log: dict[str, float | str | bool] = {}
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
        log["skipped"] = self.skipped
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


@dataclass
class RowPlayers:
    """The players of one micro-batch as the gradient sources see them: each player's loss is a mean or sum over
    its own rows of one batch (no loss reads another player's rows).

    Attributes:
        names: the players, in order.
        player_loss: ``name -> L_name`` from a forward over that player's rows only (the ``per_player`` source,
            and the fallback of the ``fast`` one).
        module: holds the layers of the trained parameters (e.g. the UNet with its LoRA); ``None``: no fast path.
        rows: each player's number of rows in the joint forward, in ``names`` order; ``None``: no fast path.
        joint_losses: ``() -> {name: L_name}`` from ONE forward over all players' rows, laid out in ``names``
            order with ``rows`` rows each, every loss from its own rows only; ``None``: no fast path.
    """

    names: list[str]
    player_loss: Callable[[str], torch.Tensor]
    module: torch.nn.Module | None = None
    rows: Sequence[int] | None = None
    joint_losses: Callable[[], Mapping[str, torch.Tensor]] | None = None


class PlayerGradientSource:
    r"""Each player's gradient of ``loss_scale * L_i`` over the trained parameters, and each ``L_i``'s value.

    ``per_player`` (the reference): per player, one forward over its rows (:attr:`RowPlayers.player_loss`) and one
    ``torch.autograd.grad``; one player's graph is alive at a time.

    ``fast``: one forward over all players' rows (:attr:`RowPlayers.joint_losses`) and one backward of
    ``loss_scale * sum_i L_i``. Since ``L_i`` reads only player ``i``'s rows, every row's output gradient in that
    backward is its own player's; each Linear/Conv2d layer owning trained parameters (a LoRA's ``lora_A`` and
    ``lora_B``) adds, per player, the product of its input and output gradient over that player's rows
    (:class:`munba_diffusion.row_gradients.RowGroupGradients`): player ``i``'s gradient, at the cost of the one
    product an ordinary backward computes over all rows. Parameters it does not cover (not the weight or bias of
    such a layer, or of a layer that does not run on the batch's rows) get per_player passes restricted to them,
    and the first time a parameter set falls back the log says which. Players without a joint forward
    (:attr:`RowPlayers.joint_losses` ``None``) get per_player passes.

    Both give the same gradients to float rounding (the joint batch and the per-player batches round
    differently): within 1e-5 relative in float32 (``tests/test_fast_gradients.py``).
    """

    def __init__(self, source: str = "fast") -> None:
        if source not in PLAYER_GRADIENT_SOURCES:
            raise ValueError(f"player_gradients must be one of {', '.join(PLAYER_GRADIENT_SOURCES)}; got {source!r}")
        self.source = source
        self._said: set[str] = set()
        self._layers: tuple[tuple[int, ...], RowGroupGradients] | None = None

    def _grouped(self, module: torch.nn.Module, params: list[torch.nn.Parameter]) -> RowGroupGradients:
        """The layers of ``params`` in ``module``, found once per (module, parameters)."""
        key = (id(module), *map(id, params))
        if self._layers is None or self._layers[0] != key:
            self._layers = (key, RowGroupGradients(module, params))
        return self._layers[1]

    def __call__(
        self, players: RowPlayers, params: Sequence[torch.nn.Parameter], *, loss_scale: float = 1.0
    ) -> tuple[dict[str, list[torch.Tensor]], dict[str, float]]:
        params = list(params)
        fast = players.joint_losses is not None and players.module is not None and players.rows is not None
        if self.source == "per_player" or not fast:
            if self.source == "fast":
                self._say("the players have no joint forward: per-player gradients come from one pass per player")
            return self._per_player(players, params, loss_scale)
        grouped = self._grouped(players.module, params)
        with grouped.rows(players.rows):
            losses = dict(players.joint_losses())
            _check_scalar_losses(losses)
            if list(losses) != list(players.names):
                raise ValueError(f"joint_losses gave players {list(losses)}; expected {list(players.names)}")
            per_player = grouped.backward(sum(loss * loss_scale for loss in losses.values()))
        values = {name: float(loss.detach()) for name, loss in losses.items()}
        grads = dict(zip(players.names, per_player))
        fallback = [j for j, g in enumerate(per_player[0]) if g is None]
        if fallback:
            names = grouped.fallback
            self._say(
                f"per-player passes for {len(names)} of {len(params)} trained parameters the one-backward path does "
                f"not cover (not a Linear/Conv2d weight or bias run on the batch's rows): {', '.join(names[:5])}"
                + (", ..." if len(names) > 5 else "")
            )
            subset = [params[j] for j in fallback]
            for name in players.names:
                extra = player_gradients(players.player_loss(name) * loss_scale, subset, retain_graph=False)
                for j, g in zip(fallback, extra):
                    grads[name][j] = g
        return grads, values

    def _per_player(
        self, players: RowPlayers, params: list[torch.nn.Parameter], loss_scale: float
    ) -> tuple[dict[str, list[torch.Tensor]], dict[str, float]]:
        grads, values = {}, {}
        for name in players.names:
            loss = players.player_loss(name)
            _check_scalar_losses({name: loss})
            values[name] = float(loss.detach())
            grads[name] = player_gradients(loss * loss_scale, params, retain_graph=False)
        return grads, values

    def _say(self, message: str) -> None:
        if message not in self._said:
            self._said.add(message)
            logger.warning(message)


def _check_scalar_losses(losses: Mapping[str, torch.Tensor]) -> None:
    for name, loss in losses.items():
        if loss.numel() != 1:
            raise ValueError(f"loss {name!r} has shape {tuple(loss.shape)}; reduce it to a scalar (e.g. .mean())")


GRAM_CHUNK_ELEMENTS = 1 << 18
"""Parameter elements per player that :func:`gram_matrix` and the combination flatten into one tensor at a time
(bounds their extra memory to about ``12 * K * GRAM_CHUNK_ELEMENTS`` bytes while a LoRA needs only a few)."""


def _chunks(tensors: Sequence[torch.Tensor]) -> list[slice]:
    """Consecutive runs of ``tensors`` of about :data:`GRAM_CHUNK_ELEMENTS` elements."""
    chunks, start, size = [], 0, 0
    for index, tensor in enumerate(tensors):
        size += tensor.numel()
        if size >= GRAM_CHUNK_ELEMENTS or index == len(tensors) - 1:
            chunks.append(slice(start, index + 1))
            start, size = index + 1, 0
    return chunks


def _flat(per_player_grads: Sequence[Sequence[torch.Tensor]], chunk: slice) -> torch.Tensor:
    """The chunk's tensors of every player flattened: ``K x elements`` (one copy, made in C++)."""
    pieces = [g for grads in per_player_grads for g in grads[chunk]]
    return _flatten_dense_tensors(pieces).view(len(per_player_grads), -1)


def gram_matrix(per_player_grads: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """``M_ij = sum_p <g_i^(p), g_j^(p)>`` in float64, accumulated over consecutive parameter tensors taken together
    up to :data:`GRAM_CHUNK_ELEMENTS` elements (no concatenation of all gradients)."""
    return _gram_and_flats(per_player_grads, keep=False)[0]


def _gram_and_flats(
    per_player_grads: Sequence[Sequence[torch.Tensor]], *, keep: bool
) -> tuple[torch.Tensor, list[tuple[slice, torch.Tensor]]]:
    """:func:`gram_matrix` and, with ``keep``, each chunk's flattened ``K x elements`` gradients (for the
    combination, which then needs no second copy)."""
    k = len(per_player_grads)
    device = per_player_grads[0][0].device if per_player_grads and per_player_grads[0] else "cpu"
    gram = torch.zeros(k, k, dtype=torch.float64, device=device)  # one transfer at the end, not one per tensor
    flats = []
    for chunk in _chunks(per_player_grads[0]) if per_player_grads else []:
        flat = _flat(per_player_grads, chunk)
        if keep:
            flats.append((chunk, flat))
        flat = flat.to(torch.float64)
        gram += (flat @ flat.T).to(device)
    return gram.cpu(), flats


def clip_gradients_(params: Sequence[torch.nn.Parameter], max_norm: float) -> tuple[float, float]:
    """Scale the ``.grad`` of ``params`` (only) so that their total L2 norm is at most ``max_norm``.

    Returns:
        ``(total_norm, clip_coef)`` with ``clip_coef = min(1, max_norm / (total_norm + 1e-6))`` as in
        ``torch.nn.utils.clip_grad_norm_``.
    """
    if max_norm <= 0:
        raise ValueError(f"max_grad_norm must be positive, got {max_norm}")
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch._foreach_norm([g.detach() for g in grads], 2, dtype=torch.float64) if grads else []
    total_norm = float(torch.stack(norms).norm()) if grads else 0.0  # one device sync
    clip_coef = min(1.0, max_norm / (total_norm + 1e-6))
    if clip_coef < 1.0:
        torch._foreach_mul_(grads, clip_coef)
    return total_norm, clip_coef


def _check_policy(policy: str) -> None:
    if policy not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite_gradients must be one of {', '.join(NONFINITE_POLICIES)}; got {policy!r}")


def nonfinite_players(named_grads: Mapping[str, Sequence[torch.Tensor]], policy: str) -> list[str]:
    """The players (or objectives) whose gradient holds NaN or inf, handled by the non-finite ``policy``.

    ``raise``: any such player raises :class:`NonFiniteGradientError` naming them all. ``skip``: they are returned
    and a warning is logged; the caller then leaves the parameters unchanged for this step. An empty list means
    every gradient is finite.
    """
    _check_policy(policy)
    nonfinite = [
        name
        for name, grads in named_grads.items()
        if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
    ]
    return _apply_policy(nonfinite, policy)


def _apply_policy(nonfinite: list[str], policy: str) -> list[str]:
    if nonfinite and policy == "raise":
        raise NonFiniteGradientError(nonfinite)
    if nonfinite:
        logger.warning("skipping the update: the gradient of %s is not finite", ", ".join(nonfinite))
    return nonfinite


def write_objective_gradients(
    objective: torch.Tensor,
    params: Sequence[torch.nn.Parameter],
    *,
    name: str,
    max_grad_norm: float | None = None,
    nonfinite: str = "raise",
) -> bool:
    """An ordinary (un-bargained) update through the same owner, for the baselines: ``objective.backward()`` adds
    its gradient to ``.grad``, then the non-finite policy (``name`` names the objective in its message) and clipping
    of ``params`` only. Returns False when the step must be skipped (policy ``skip``); never steps the optimizer."""
    objective.backward()
    if nonfinite_players({name: [p.grad for p in params if p.grad is not None]}, nonfinite):
        return False
    if max_grad_norm is not None:
        clip_gradients_(params, max_grad_norm)
    return True


class BargainedUpdate:
    """Owns one bargained update: per-player gradients (:class:`PlayerGradientSource`, or ``autograd.grad`` per
    player of given losses), accumulation over
    micro-batches, reduction across processes, the non-finite policy, combination into ``.grad`` and clipping of
    the trained parameters (the order and the math are in the module doc). Never steps the optimizer.

    One object serves a whole training run: :meth:`write_gradients` resets it for the next step. Every
    micro-batch of a step must have the same players in the same order.

    Args:
        params: the trainable parameters only; nothing else is read or written.
        combiner: turns the float64 Gram matrix into weights (e.g. ``get_combiner("nash")``).
        max_grad_norm: if set, clip the total gradient norm of ``params`` after writing.
        nonfinite: one of :data:`NONFINITE_POLICIES`: ``raise`` (:class:`NonFiniteGradientError`) or ``skip``
            (``.grad`` untouched, ``StepDiagnostics.skipped``) when a player's gradient is not finite.
        reduce: applied to every per-tensor gradient sum before anything else, on every process in the same order,
            e.g. ``lambda g: accelerator.reduce(g, reduction="mean")`` (``torch.autograd.grad`` bypasses DDP's
            gradient hooks).
        loss_scale: the constant ``s`` each loss is multiplied by before its backward (fp16 training), divided out
            after the reduction.
        player_gradients: the gradient source of :meth:`accumulate_players`, one of
            :data:`PLAYER_GRADIENT_SOURCES` (:class:`PlayerGradientSource`): ``fast`` (one backward over all
            players' rows, the default) or ``per_player`` (one pass per player, the reference).
    """

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        combiner: Combiner,
        *,
        max_grad_norm: float | None = None,
        nonfinite: str = "raise",
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        loss_scale: float = 1.0,
        player_gradients: str = "fast",
    ) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("BargainedUpdate got no parameters; pass the trainable parameters")
        if any(not p.requires_grad for p in self.params):
            raise ValueError(
                "BargainedUpdate got a parameter with requires_grad=False; pass only the trainable parameters"
            )
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm}")
        _check_policy(nonfinite)
        if not (math.isfinite(loss_scale) and loss_scale > 0):
            raise ValueError(f"loss_scale must be a positive finite number, got {loss_scale}")
        self.combiner = combiner
        self.max_grad_norm = max_grad_norm
        self.nonfinite = nonfinite
        self.reduce = reduce
        self.loss_scale = loss_scale
        self.gradient_source = PlayerGradientSource(player_gradients)
        self._grad_sums: dict[str, list[torch.Tensor]] = {}
        self._loss_sums: dict[str, float] = {}
        self._weight_sum = 0.0

    def accumulate_losses(self, losses: Mapping[str, torch.Tensor], *, weight: float = 1.0) -> None:
        """Add ``grad(weight * loss_scale * L_i)`` to player ``i``'s running sum, for each player in ``losses``
        (the weight enters the backward's seed, so no extra pass over the gradients).

        Each gradient comes from ``torch.autograd.grad`` with the graph kept until the last player (the losses may
        share a forward pass); parameters a loss does not reach get zeros. The loss values enter the step's
        weighted mean with ``weight``.
        """
        self._check_players(list(losses), weight)
        _check_scalar_losses(losses)
        factor = weight * self.loss_scale
        last = len(losses) - 1
        grads = {
            name: player_gradients(loss * factor, self.params, retain_graph=i < last)
            for i, (name, loss) in enumerate(losses.items())
        }
        self._add(grads, {name: float(loss.detach()) for name, loss in losses.items()}, weight)

    def accumulate_players(self, players: RowPlayers, *, weight: float = 1.0) -> dict[str, float]:
        """Add ``grad(weight * loss_scale * L_i)`` of each of ``players`` to its running sum, the gradients coming
        from this update's gradient source (``player_gradients``); returns the loss values ``L_i``."""
        self._check_players(list(players.names), weight)
        grads, values = self.gradient_source(players, self.params, loss_scale=self.loss_scale)
        self.accumulate_gradients(grads, values, weight=weight)
        return values

    def accumulate_gradients(
        self,
        per_player: Mapping[str, Sequence[torch.Tensor]],
        losses: Mapping[str, float],
        *,
        weight: float = 1.0,
    ) -> None:
        """:meth:`accumulate_losses` for gradients obtained some other way (e.g. one LoRA forward per player):
        add ``weight * per_player[i]`` to player ``i``'s running sum.

        Args:
            per_player: player -> its gradients of ``loss_scale * L_i``, aligned with ``params`` (scale the loss
                before its backward so that fp16 gradients do not underflow); they are not modified.
            losses: player -> the unscaled loss value ``L_i``.
            weight: the micro-batch's weight ``c_m``, for its gradients and in the loss values' weighted mean.
        """
        self._check_players(list(per_player), weight)
        if set(losses) != set(per_player):
            raise ValueError(f"losses name players {sorted(losses)} but the gradients are of {sorted(per_player)}")
        for name, grads in per_player.items():
            if len(grads) != len(self.params):
                raise ValueError(f"player {name!r} has {len(grads)} gradients for {len(self.params)} parameters")
        weighted = {
            name: list(grads) if weight == 1.0 else list(torch._foreach_mul(list(grads), weight))
            for name, grads in per_player.items()
        }
        self._add(weighted, losses, weight)

    def write_gradients(self) -> StepDiagnostics:
        """Reduce, unscale, check, bargain and add ``sum_i w_i g_i`` to ``.grad`` of ``params``; clip; reset.

        Like ``backward()``, the result is added to existing ``.grad`` (created when ``None``) in the parameter's
        dtype. A skipped update (policy ``skip``) leaves ``.grad`` untouched and returns diagnostics with
        ``skipped=True``, zero weights and status ``"skipped:nonfinite:<players>"``.
        """
        if not self._grad_sums:
            raise ValueError("write_gradients found no gradients; call accumulate_losses or accumulate_gradients first")
        names = list(self._grad_sums)
        losses = {name: self._loss_sums[name] / self._weight_sum for name in names}
        grads_by_player = [self._grad_sums[name] for name in names]
        self._grad_sums, self._loss_sums, self._weight_sum = {}, {}, 0.0  # the next step starts clean, even on error
        if self.reduce is not None:
            grads_by_player = [[self.reduce(g) for g in grads] for grads in grads_by_player]
        if self.loss_scale != 1.0:
            grads_by_player = [list(torch._foreach_div(grads, self.loss_scale)) for grads in grads_by_player]
        gram, flats = _gram_and_flats(grads_by_player, keep=True)
        # a NaN or inf anywhere in g_i makes |g_i|^2 = M_ii NaN or inf (float32 squares cannot overflow float64)
        finite = torch.isfinite(gram.diagonal()).tolist()
        nonfinite = _apply_policy([name for name, ok in zip(names, finite) if not ok], self.nonfinite)
        if nonfinite:
            no_weights = torch.zeros(len(names), dtype=torch.float64)
            status = "skipped:nonfinite:" + ",".join(nonfinite)
            return _diagnostics(names, losses, gram, no_weights, status, None, skipped=True)
        weighting = self.combiner(gram)
        weights = weighting.weights.to(torch.float64)
        with torch.no_grad():
            for chunk, flat in flats:  # sum_i w_i g_i, one operation per player on each flattened chunk
                flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
                combined = sum(float(w) * flat[i] for i, w in enumerate(weights))
                params = self.params[chunk]
                for param, direction in zip(params, _unflatten_dense_tensors(combined, params)):
                    if param.grad is None:
                        param.grad = direction if direction.dtype == param.dtype else direction.to(param.dtype)
                    else:
                        param.grad.add_(direction.to(param.grad.dtype))
        clip_coef = clip_gradients_(self.params, self.max_grad_norm)[1] if self.max_grad_norm is not None else None
        return _diagnostics(names, losses, gram, weights, name_players(weighting.status, names), clip_coef)

    def _check_players(self, names: list[str], weight: float) -> None:
        if not names:
            raise ValueError(
                "a bargained update needs at least one loss; pass a mapping like {'preserve': l_r, 'forget': l_f}"
            )
        if self._grad_sums and names != list(self._grad_sums):
            raise ValueError(
                f"players {names} differ from this step's {list(self._grad_sums)}; give every "
                "micro-batch the same players in the same order"
            )
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight must be a positive finite number, got {weight}")

    def _add(self, grads: Mapping[str, list[torch.Tensor]], losses: Mapping[str, float], weight: float) -> None:
        for name, player_grads in grads.items():
            running = self._grad_sums.get(name)
            self._grad_sums[name] = player_grads if running is None else list(torch._foreach_add(running, player_grads))
            self._loss_sums[name] = self._loss_sums.get(name, 0.0) + weight * float(losses[name])
        self._weight_sum += weight


def write_bargained_gradients(
    losses: Mapping[str, torch.Tensor],
    params: Sequence[torch.nn.Parameter],
    combiner: Combiner,
    *,
    max_grad_norm: float | None = None,
    nonfinite: str = "raise",
) -> StepDiagnostics:
    """One micro-batch: add ``sum_i w_i g_i`` of the players ``losses`` (e.g. ``{"preserve": l_r, "forget": l_f}``)
    to the ``.grad`` of ``params`` and clip them; ``BargainedUpdate(...).accumulate_losses(losses)`` then
    :meth:`BargainedUpdate.write_gradients`."""
    update = BargainedUpdate(params, combiner, max_grad_norm=max_grad_norm, nonfinite=nonfinite)
    update.accumulate_losses(losses)
    return update.write_gradients()


def _diagnostics(
    names: list[str],
    losses: Mapping[str, float],
    gram: torch.Tensor,
    weights: torch.Tensor,
    status: str,
    clip_coef: float | None,
    *,
    skipped: bool = False,
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
        utilities=[0.0] * len(names) if skipped else (gram @ weights).tolist(),
        cosines=cosines.tolist(),
        cos_phi=float(cosines[0, 1]) if len(names) == 2 else None,
        direction_norm=0.0 if skipped else math.sqrt(max(float(weights @ gram @ weights), 0.0)),
        status=status,
        clip_coef=clip_coef,
        skipped=skipped,
    )
