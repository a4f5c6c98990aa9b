r"""Nash bargaining weights (MUNBa, Wu & Harandi 2024; Nash-MTL, Navon et al. 2022).

Each player ``i`` has a gradient ``g_i``; the utility of an update direction ``d`` is ``u_i = g_i . d`` and the
disagreement point is 0. The Nash bargaining solution maximises ``sum_i log(g_i . d)`` over a small ball; its KKT
conditions give

.. math::

    d = \sum_i \alpha_i g_i, \qquad G^\top G \alpha = 1 / \alpha \quad (\alpha > 0,\ \text{element-wise}),

so every player gains ``g_i . d = 1 / \alpha_i > 0``.

Two players (closed form). With ``a = |g_0|^2``, ``b = |g_1|^2``, ``c = g_0 . g_1`` and
``cos(phi) = c / sqrt(ab)``:

.. math::

    \alpha_i = \frac{1}{|g_i| \sqrt{1 + \cos\phi}}

(the symmetric form of the paper's Eq. 8; never ``alpha_1 = (1 - a alpha_0^2) / (c alpha_0)``, which is 0/0 for
orthogonal gradients). Then ``d = sqrt(2) (u_0 + u_1) / |u_0 + u_1|`` with ``u_i = g_i / |g_i|``: the bisector
of the unit gradients, ``|d|^2 = 2``, unchanged when a loss is scaled by ``beta > 0``.

``K >= 3`` players (iterative). Writing ``alpha_i = beta_i / |g_i|`` turns the system into ``C beta = 1 / beta``
with the cosine matrix ``C`` (unit diagonal), which is scale-free. Its solution is the unique minimiser of the
strictly convex ``f(beta) = beta^T C beta / 2 - sum_i log beta_i`` on the positive orthant, found by damped
Newton steps in float64 (backtracking keeps ``beta > 0`` and ensures decrease) until
``max_i |beta_i (C beta)_i - 1| <= tol`` (up to float64 rounding), i.e. every utility equals ``1 / alpha_i`` to
``tol`` relative; the solution exists when no non-negative combination of the gradients vanishes.
For two players the solver reproduces the closed form.

Degenerate cases (reported in ``Weighting.status``, never NaN):

- ``zero_gradient:i``: ``|g_i| <= zero_rtol * max_j |g_j|`` (e.g. a preserve loss that is exactly 0 at step 0).
  No direction changes that player's utility, so it gets weight 0 and the others bargain among themselves; a
  single remaining player gets its unit gradient ``alpha = 1 / |g|`` (``|d| = 1``); all zero gives zero weights.
- ``opposite_gradients`` (two players, ``1 + cos(phi) <= opposite_tol``): no direction helps both, so no
  bargaining solution exists. Following Remark 2.7 the smaller-norm gradient ``g_s`` is perturbed by noise
  ``e``. A random vector in parameter space is almost surely orthogonal to both gradients, so we model it
  exactly in Gram space as ``e`` orthogonal to both with ``|e| = perturbation * |g_s|``: ``|g_s|^2`` grows by the
  factor ``1 + perturbation^2`` and the cross term is unchanged. The closed form on the perturbed Gram matrix
  gives the weights, which are applied to the true gradients (the noise itself carries no information and is
  not added). For exactly opposite gradients the result is a short step of length about
  ``perturbation / sqrt(2)`` along the larger player's unit gradient (on a tie the first player counts as the
  smaller). Deterministic: no random numbers are drawn.
- ``conflicting_gradients`` (``K >= 3``, no solution with ``max_i beta_i <= 1 / sqrt(opposite_tol)``, the
  ``K``-player analogue of the two-player threshold): every unit gradient is perturbed by its own orthogonal
  noise of norm ``perturbation``, i.e. ``C + perturbation^2 I``, which is positive definite and always solvable.
- ``parallel_gradients`` (two players, ``cos(phi) >= 1 - parallel_tol``): informational only. The symmetric
  closed form is regular there and gives ``alpha_i = 1 / (sqrt(2) |g_i|)``, i.e. weight 1/2 on each unit
  gradient scaled to ``|d|^2 = 2`` (the paper's ``alpha = (1/2, 1/2)``, made scale-invariant and continuous).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Weighting, check_gram, join_tags, zero_gradient_mask, zero_gradient_tag


def nash_weights_closed_form(gram: torch.Tensor) -> torch.Tensor:
    r"""Two-player weights ``alpha_i = 1 / (|g_i| sqrt(1 + cos(phi)))`` for a ``(2, 2)`` Gram matrix.

    Requires non-zero gradients with ``cos(phi) > -1``; :func:`nash_bargaining_weights` handles the rest.
    """
    gram = gram.to(torch.float64)
    norms = gram.diagonal().sqrt()
    cos_phi = (gram[0, 1] / (norms[0] * norms[1])).clamp(-1.0, 1.0)
    return 1.0 / (norms * torch.sqrt(1.0 + cos_phi))


def _negative_log_nash(beta: torch.Tensor, cos_matrix: torch.Tensor) -> torch.Tensor:
    return 0.5 * beta @ cos_matrix @ beta - torch.log(beta).sum()


def _is_solved(beta: torch.Tensor, cos_matrix: torch.Tensor, tol: float) -> bool:
    """``|beta_i (C beta)_i - 1| <= tol`` up to the rounding error of evaluating it in float64."""
    residual = beta * (cos_matrix @ beta) - 1.0
    rounding = 8 * torch.finfo(torch.float64).eps * beta * (cos_matrix.abs() @ beta)
    return bool((residual.abs() <= tol + rounding).all())


def _is_acceptable(
    beta: torch.Tensor, delta: torch.Tensor, step: float, gradient: torch.Tensor, cos_matrix: torch.Tensor
) -> bool:
    """Positive, and the Armijo decrease of ``f`` or (where ``f`` is flat to float64) of ``|grad f|``."""
    candidate = beta + step * delta
    if not (candidate > 0).all():
        return False
    value = _negative_log_nash(beta, cos_matrix)
    if _negative_log_nash(candidate, cos_matrix) <= value + 1e-4 * step * (gradient @ delta):
        return True
    candidate_gradient = cos_matrix @ candidate - 1.0 / candidate
    return bool(candidate_gradient.norm() <= (1 - 1e-4 * step) * gradient.norm())


def solve_unit_nash_system(
    cos_matrix: torch.Tensor, *, tol: float = 1e-12, max_iter: int = 100, max_beta: float = math.inf
) -> tuple[torch.Tensor, bool]:
    r"""Solve ``C beta = 1 / beta`` (``beta > 0``) for a cosine matrix ``C`` by damped Newton in float64.

    Minimises ``f(beta) = beta^T C beta / 2 - sum log beta`` with Newton steps
    ``(C + diag(1 / beta^2)) delta = -(C beta - 1 / beta)``, halving the step until ``beta`` stays positive and
    ``f`` decreases by the Armijo amount (or, near the solution where ``f`` is flat in float64, ``|grad f|`` does;
    the Newton direction descends both).

    Returns:
        ``(beta, converged)``; ``converged`` is ``max_i |beta_i (C beta)_i - 1| <= tol`` (plus the float64
        rounding error of that residual, which matters for ill-conditioned ``C``) with ``max(beta) <= max_beta``.
        An iterate that leaves ``max_beta`` stops the solve (no bounded solution).
    """
    cos_matrix = cos_matrix.to(torch.float64)
    k = cos_matrix.shape[0]
    ones = torch.ones(k, dtype=torch.float64)
    total = ones @ cos_matrix @ ones
    # The best point on the ray beta = s * 1 is a cheap, well-scaled start.
    beta = ones * (math.sqrt(k / total.item()) if total > 0 else 1.0)
    for _ in range(max_iter):
        if _is_solved(beta, cos_matrix, tol):
            return beta, True
        gradient = cos_matrix @ beta - 1.0 / beta
        hessian = cos_matrix + torch.diag(1.0 / beta**2)
        delta = -torch.linalg.solve(hessian, gradient)
        step = 1.0
        while not _is_acceptable(beta, delta, step, gradient, cos_matrix):
            step *= 0.5
            if step < 1e-12:  # no descent left at float64 precision
                return beta, _is_solved(beta, cos_matrix, tol)
        beta = beta + step * delta
        if beta.max() > max_beta:
            return beta, False
    return beta, _is_solved(beta, cos_matrix, tol)


def nash_weights_iterative(gram: torch.Tensor, *, tol: float = 1e-12, max_iter: int = 100) -> tuple[torch.Tensor, bool]:
    """Weights ``alpha`` solving ``G^T G alpha = 1 / alpha`` for any ``K``, via :func:`solve_unit_nash_system`.

    Requires non-zero gradients. Returns ``(alpha, converged)``.
    """
    gram = gram.to(torch.float64)
    norms = gram.diagonal().sqrt()
    beta, converged = solve_unit_nash_system(gram / torch.outer(norms, norms), tol=tol, max_iter=max_iter)
    return beta / norms, converged


def nash_bargaining_weights(
    gram: torch.Tensor,
    *,
    perturbation: float = 1e-2,
    zero_rtol: float = 1e-10,
    opposite_tol: float = 1e-6,
    parallel_tol: float = 1e-6,
    tol: float = 1e-12,
    max_iter: int = 100,
) -> Weighting:
    """Nash bargaining weights for a ``(K, K)`` Gram matrix, degenerate cases included (see the module doc).

    Args:
        gram: ``G^T G`` of the players' gradients.
        perturbation: relative norm of the modelled noise that makes opposite/conflicting gradients solvable.
        zero_rtol: a gradient with ``|g_i| <= zero_rtol * max_j |g_j|`` counts as zero.
        opposite_tol: two players with ``1 + cos(phi) <= opposite_tol`` count as opposite; for ``K >= 3`` a
            solution with ``max beta > 1 / sqrt(opposite_tol)`` counts as non-existent.
        parallel_tol: two players with ``cos(phi) >= 1 - parallel_tol`` are reported as parallel.
        tol, max_iter: convergence of the ``K >= 3`` Newton solve.
    """
    gram = check_gram(gram)
    weights = torch.zeros(gram.shape[0], dtype=torch.float64)
    zero = zero_gradient_mask(gram, zero_rtol)
    active = torch.nonzero(~zero).flatten()
    if len(active) == 0:
        return Weighting(weights, join_tags(zero_gradient_tag(zero)))
    sub_gram = gram[active][:, active]
    norms = sub_gram.diagonal().sqrt()
    cos_matrix = (sub_gram / torch.outer(norms, norms)).clamp(-1.0, 1.0)
    cos_matrix.fill_diagonal_(1.0)
    tag = None
    if len(active) == 1:
        beta = torch.ones(1, dtype=torch.float64)
    elif len(active) == 2:
        cos_phi = cos_matrix[0, 1].item()
        if 1.0 + cos_phi <= opposite_tol:
            tag = "opposite_gradients"
            smaller = int(torch.argmin(norms))
            cos_matrix[smaller, smaller] += perturbation**2
        elif cos_phi >= 1.0 - parallel_tol:
            tag = "parallel_gradients"
        # alpha_i |g_i| from the closed form on the (possibly perturbed) unit Gram matrix
        beta = nash_weights_closed_form(cos_matrix)
    else:
        beta, converged = solve_unit_nash_system(
            cos_matrix, tol=tol, max_iter=max_iter, max_beta=1.0 / math.sqrt(opposite_tol)
        )
        if not converged:
            tag = "conflicting_gradients"
            perturbed = cos_matrix + perturbation**2 * torch.eye(len(active), dtype=torch.float64)
            beta, converged = solve_unit_nash_system(perturbed, tol=tol, max_iter=max_iter)
            if not converged:
                tag += ";not_converged"
    weights[active] = beta / norms
    return Weighting(weights, join_tags(zero_gradient_tag(zero), tag))


@dataclass(frozen=True)
class NashBargaining:
    """MUNBa's combiner: Nash bargaining weights (closed form for two players, Newton for more).

    The fields are the keyword arguments of :func:`nash_bargaining_weights`.
    """

    name: ClassVar[str] = "nash"
    perturbation: float = 1e-2
    zero_rtol: float = 1e-10
    opposite_tol: float = 1e-6
    parallel_tol: float = 1e-6
    tol: float = 1e-12
    max_iter: int = 100

    def __call__(self, gram: torch.Tensor) -> Weighting:
        return nash_bargaining_weights(
            gram,
            perturbation=self.perturbation,
            zero_rtol=self.zero_rtol,
            opposite_tol=self.opposite_tol,
            parallel_tol=self.parallel_tol,
            tol=self.tol,
            max_iter=self.max_iter,
        )
