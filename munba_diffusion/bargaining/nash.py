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
Newton steps in float64 (backtracking keeps ``beta > 0`` and ensures decrease); the Newton system is solved in the
scaled form ``(I + B C B) y = -r`` (``B = diag(beta)``, ``r_i = beta_i (C beta)_i - 1``, step ``beta * y``), whose
matrix has every eigenvalue ``>= 1`` for a PSD ``C``, so it is never singular (no ``LinAlgError``). The solution
exists iff no non-negative combination of the gradients vanishes (Gordan); for two players the solver reproduces
the closed form.

Guarantees (``B = 1 / sqrt(opposite_tol)``, 1000 by default; ``eps`` the float64 machine epsilon). For every
symmetric PSD Gram matrix (rank-deficient, zero rows and norm ratios included) the weights are finite and no
exception is raised (a NaN/inf Gram matrix is a ``ValueError`` from :func:`~.base.check_gram`). Status ``"ok"``
means (for ``K >= 3`` checked on the Gram matrix itself before it is returned; for two players it follows from the
closed form, ``beta_i = 1 / sqrt(1 + cos(phi)) < B`` as ``1 + cos(phi) > opposite_tol``):

- ``max_i beta_i = max_i alpha_i |g_i| <= B``;
- ``|alpha_i (M alpha)_i - 1| <= tol + 8 eps beta_i (|C| beta)_i <= tol + 8 eps K B^2`` (about ``1.8e-9 K`` at the
  defaults; the second term is the float64 rounding error of the residual itself, which grows like ``beta^2``
  and is why ``beta`` is bounded);
- hence every player strictly gains: ``g_i . d = (M alpha)_i >= (1 - rho) / alpha_i > 0`` with ``rho`` that
  bound, and ``cos(g_i, d) >= (1 - rho) / (B sqrt(K (1 + rho)))`` since ``|d|^2 = sum_i alpha_i (M alpha)_i ~ K``.

Anything else gets a non-``"ok"`` status naming the players and a direction no player loses from (two players
with opposite gradients excepted, below).

Degenerate cases (reported in ``Weighting.status`` as ``name:i,j`` with player indices, never NaN):

- ``zero_gradient:i``: ``|g_i| <= zero_rtol * max_j |g_j|`` (e.g. a preserve loss that is exactly 0 at step 0).
  No direction changes that player's utility, so it gets weight 0 and the others bargain among themselves; a
  single remaining player gets its unit gradient ``alpha = 1 / |g|`` (``|d| = 1``); all zero gives zero weights.
- ``opposite_gradients:i,j`` (two players, ``1 + cos(phi) <= opposite_tol``): no direction helps both, so no
  bargaining solution exists. Following Remark 2.7 the smaller-norm gradient ``g_s`` is perturbed by noise
  ``e``. A random vector in parameter space is almost surely orthogonal to both gradients, so we model it
  exactly in Gram space as ``e`` orthogonal to both with ``|e| = perturbation * |g_s|``: ``|g_s|^2`` grows by the
  factor ``1 + perturbation^2`` and the cross term is unchanged. The closed form on the perturbed Gram matrix
  gives the weights, which are applied to the true gradients (the noise itself carries no information and is
  not added). For exactly opposite gradients the result is a short step of length about
  ``perturbation / sqrt(2)`` along the larger player's unit gradient (on a tie the first player counts as the
  smaller), so the smaller player loses a little: the one documented case where a player's utility is negative.
  Deterministic: no random numbers are drawn.
- ``conflicting_gradients:i,j,...`` (``K >= 3``, no solution with ``max_i beta_i <= B``, the ``K``-player
  analogue of the two-player threshold). Detected before any Newton step when ``|sum_i g_i / |g_i||^2 < K / B^2``
  (a bounded solution has ``u_i . d >= 1 / B`` for every unit gradient ``u_i`` and ``|d| = sqrt(K)``, so the sum
  of the unit gradients is at least ``sqrt(K) / B`` long; three concepts at 120 degrees sum to zero), otherwise
  when the Newton iterate leaves ``B`` or does not certify as above. Fallback direction: the minimum-norm point
  ``v = sum_i lambda_i u_i`` of the convex hull of the unit gradients (MGDA on unit gradients, exact active-set
  solve), i.e. ``alpha_i = lambda_i / |g_i|``. It is the direction maximising the smallest cosine with the
  players' gradients, and every player gains ``u_i . v >= |v|^2``: nothing is lost. It is short
  (``|v|^2 < K / B^2 = K opposite_tol`` whenever no bounded solution exists). The tag names the players with
  ``lambda_i > 0``: those whose (near-)vanishing combination blocks the bargain. Where that gain is not
  resolvable in float64 (some ``g_i . d <= 8 K eps (|M| alpha)_i``, e.g. gradients that cancel exactly, or an
  exactly opposite pair among three), the weights are zero: no step, and the status says why.
- ``not_converged:i,j,...`` (``K >= 3``): a bounded solution provably exists (``|v|^2 >= K / B^2``) but Newton
  did not certify it within ``max_iter``; same fallback. Not observed in the property tests.
- ``parallel_gradients:i,j`` (two players, ``cos(phi) >= 1 - parallel_tol``): informational only. The symmetric
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


_EPS = torch.finfo(torch.float64).eps
# Largest rounding error of the residual ``beta_i (C beta)_i - 1`` (``8 eps beta_i (|C| beta)_i``) we accept as
# "solved": below 1 every utility is still positive; 1e-3 keeps it meaningful. It caps beta at
# sqrt(_MAX_ROUNDING / (8 eps K)) (about 4e5 for K = 3), far above the default B = 1000.
_MAX_ROUNDING = 1e-3


def _rounding(beta: torch.Tensor, cos_matrix: torch.Tensor) -> torch.Tensor:
    """Float64 rounding error of evaluating ``beta_i (C beta)_i``; it grows like ``beta^2``."""
    return 8 * _EPS * beta * (cos_matrix.abs() @ beta)


def _beta_cap(k: int) -> float:
    """Largest ``beta`` whose residual is still resolvable in float64 (see ``_MAX_ROUNDING``)."""
    return math.sqrt(_MAX_ROUNDING / (8 * _EPS * k))


def _negative_log_nash(beta: torch.Tensor, cos_matrix: torch.Tensor) -> torch.Tensor:
    return 0.5 * beta @ cos_matrix @ beta - torch.log(beta).sum()


def _is_solved(beta: torch.Tensor, cos_matrix: torch.Tensor, tol: float, max_beta: float) -> bool:
    """``max(beta) <= max_beta`` and ``|beta_i (C beta)_i - 1| <= tol`` up to the rounding error of the residual.

    The bound is tested first: a huge ``beta`` has a huge rounding allowance and would "solve" anything.
    """
    if not bool((beta > 0).all()) or float(beta.max()) > max_beta:
        return False
    residual = beta * (cos_matrix @ beta) - 1.0
    return bool((residual.abs() <= tol + _rounding(beta, cos_matrix)).all())


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

    Minimises ``f(beta) = beta^T C beta / 2 - sum log beta`` with Newton steps ``delta = beta * y``,
    ``(I + B C B) y = -r`` (``B = diag(beta)``, ``r = beta * (C beta) - 1``; the same step as
    ``(C + diag(1 / beta^2)) delta = -(C beta - 1 / beta)``, but its matrix is ``>= I`` for a PSD ``C``), halving
    the step until ``beta`` stays positive and ``f`` decreases by the Armijo amount (or, near the solution where
    ``f`` is flat in float64, ``|grad f|`` does; the Newton direction descends both). Never raises.

    Returns:
        ``(beta, converged)``; ``converged`` is ``max(beta) <= max_beta`` and then
        ``max_i |beta_i (C beta)_i - 1| <= tol`` plus the float64 rounding error of that residual. ``max_beta``
        is capped where that rounding error would reach ``1e-3``. When the unit gradients sum to less than
        ``sqrt(K) / max_beta`` no solution within ``max_beta`` exists and no Newton step is taken.
    """
    cos_matrix = cos_matrix.to(torch.float64)
    k = cos_matrix.shape[0]
    max_beta = min(max_beta, _beta_cap(k))
    ones = torch.ones(k, dtype=torch.float64)
    total = float(ones @ cos_matrix @ ones)  # |sum_i u_i|^2 for the unit gradients u_i
    # A solution within max_beta has u_i . d = 1 / beta_i >= 1 / max_beta and |d|^2 = K, so |sum_i u_i| sqrt(K) >=
    # K / max_beta. Below that (e.g. concepts at 120 degrees: the sum vanishes) there is nothing to solve, and the
    # best start on the ray beta = s * 1, s = sqrt(K / total), would explode.
    if not total * max_beta**2 >= k:
        return ones, False
    beta = ones * math.sqrt(k / total)  # <= max_beta
    eye = torch.eye(k, dtype=torch.float64)
    for _ in range(max_iter):
        if float(beta.max()) > max_beta:  # no bounded solution along the way: stop before rounding takes over
            return beta, False
        if _is_solved(beta, cos_matrix, tol, max_beta):
            return beta, True
        residual = beta * (cos_matrix @ beta) - 1.0
        factor, info = torch.linalg.cholesky_ex(eye + beta[:, None] * cos_matrix * beta[None, :])
        if int(info) != 0:  # only if C is far from PSD (not a Gram matrix): report no solution, do not raise
            return beta, False
        delta = -beta * torch.cholesky_solve(residual[:, None], factor)[:, 0]
        gradient = residual / beta  # C beta - 1 / beta
        step = 1.0
        while not _is_acceptable(beta, delta, step, gradient, cos_matrix):
            step *= 0.5
            if step < 1e-12:  # no descent left at float64 precision
                return beta, _is_solved(beta, cos_matrix, tol, max_beta)
        beta = beta + step * delta
    return beta, _is_solved(beta, cos_matrix, tol, max_beta)


def min_norm_unit_weights(cos_matrix: torch.Tensor) -> torch.Tensor:
    r"""``lambda`` in the simplex minimising ``|sum_i lambda_i u_i|^2 = lambda^T C lambda`` for a cosine matrix.

    The minimum-norm point of the convex hull of the unit gradients, by the Lawson-Hanson active-set method on
    the equivalent non-negative least squares problem ``min_{mu >= 0} mu^T C mu + (1 - 1^T mu)^2`` (for fixed
    ``s = 1^T mu`` it is ``s^2 m + (1 - s)^2`` with ``m`` the minimum, so ``lambda = mu / 1^T mu``). Finite and
    exact on the support up to float64; never raises (a numerically singular sub-problem ends the search with
    the current feasible point). Optimality gives ``(C lambda)_i >= lambda^T C lambda`` for every ``i``.
    """
    cos_matrix = cos_matrix.to(torch.float64)
    k = cos_matrix.shape[0]
    normal = cos_matrix + 1.0  # the normal matrix C + 1 1^T of the least squares problem
    mu = torch.zeros(k, dtype=torch.float64)
    passive = torch.zeros(k, dtype=torch.bool)
    threshold = 16 * k * _EPS  # a descent direction below this is rounding
    for _ in range(10 * k):
        descent = 1.0 - normal @ mu  # minus half the gradient of the objective
        descent[passive] = -math.inf
        entering = int(torch.argmax(descent))
        if float(descent[entering]) <= threshold:
            break
        passive[entering] = True
        for _ in range(k + 1):  # each pass drops at least one coordinate, so k + 1 passes suffice
            index = torch.nonzero(passive).flatten()
            factor, info = torch.linalg.cholesky_ex(normal[index][:, index])
            if int(info) != 0:  # the entering column depends on the others to float64 precision: keep mu
                return _to_simplex(mu)
            z = torch.cholesky_solve(torch.ones(len(index), 1, dtype=torch.float64), factor)[:, 0]
            if bool((z > 0).all()):
                mu = torch.zeros(k, dtype=torch.float64)
                mu[index] = z
                break
            # move from mu towards z until the first passive coordinate reaches zero, and drop it
            current = mu[index]
            blocking = z <= 0
            gaps = current[blocking] - z[blocking]  # >= 0; 0 only for an entering coordinate with z = 0
            ratios = torch.where(gaps > 0, current[blocking] / gaps.clamp_min(_EPS), torch.zeros_like(gaps))
            t = float(ratios.min())
            moved = current + t * (z - current)
            dropped = index[blocking][torch.argmin(ratios)]
            moved[index == dropped] = 0.0
            mu = torch.zeros(k, dtype=torch.float64)
            mu[index] = moved.clamp_min(0.0)
            passive = mu > 0
            if not bool(passive.any()):
                break
        else:
            break
    return _to_simplex(mu)


def _to_simplex(mu: torch.Tensor) -> torch.Tensor:
    total = float(mu.sum())
    return mu / total if total > 0 else torch.zeros_like(mu)


def _players(indices: torch.Tensor) -> str:
    return ",".join(map(str, indices.tolist()))


def _certified_ok(gram: torch.Tensor, alpha: torch.Tensor, tol: float, max_beta: float) -> bool:
    """The "ok" promise, checked on the Gram matrix itself: bounded, KKT residual small, every utility > 0."""
    if not bool(torch.isfinite(alpha).all()) or not bool((alpha > 0).all()):
        return False
    norms = gram.diagonal().sqrt()
    beta = alpha * norms
    if float(beta.max()) > min(max_beta, _beta_cap(len(alpha))):
        return False
    utilities = gram @ alpha
    rounding = 8 * _EPS * alpha * (gram.abs() @ alpha)
    residual = alpha * utilities - 1.0
    return bool((residual.abs() <= tol + rounding).all()) and bool((utilities > 0).all())


def _no_loss_fallback(gram: torch.Tensor, cos_matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Weights of the min-norm point of the unit gradients' hull (zero where its gains are below rounding).

    Returns ``(alpha, support, m)``: ``support`` are the players with ``lambda_i > 0`` and ``m = |v|^2``.
    """
    k = gram.shape[0]
    lam = min_norm_unit_weights(cos_matrix)
    norms = gram.diagonal().sqrt()
    alpha = lam / norms
    utilities = gram @ alpha
    floor = 8 * k * _EPS * (gram.abs() @ alpha)
    support = torch.nonzero(lam > 0).flatten()
    if len(support) == 0:
        support = torch.arange(k)
    m = float(lam @ cos_matrix @ lam)
    # Nothing lost: a gain we cannot tell from rounding might be a loss, so then we do not move at all.
    if not bool(torch.isfinite(alpha).all()) or not bool((utilities > floor).all()):
        alpha = torch.zeros(k, dtype=torch.float64)
    return alpha, support, m


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
        gram: ``G^T G`` of the players' gradients (symmetric PSD; symmetrised here).
        perturbation: relative norm of the modelled noise that makes two opposite gradients solvable.
        zero_rtol: a gradient with ``|g_i| <= zero_rtol * max_j |g_j|`` counts as zero.
        opposite_tol: two players with ``1 + cos(phi) <= opposite_tol`` count as opposite; for ``K >= 3`` a
            solution with ``max beta > B = 1 / sqrt(opposite_tol)`` counts as non-existent (conflicting).
        parallel_tol: two players with ``cos(phi) >= 1 - parallel_tol`` are reported as parallel.
        tol, max_iter: convergence of the ``K >= 3`` Newton solve.

    Returns:
        Finite weights; ``"ok"`` only with the guarantees of the module doc (every utility ``> 0``, checked).
    """
    gram = check_gram(gram)
    gram = 0.5 * (gram + gram.T)
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
        weights[active] = beta / norms
    elif len(active) == 2:
        cos_phi = cos_matrix[0, 1].item()
        if 1.0 + cos_phi <= opposite_tol:
            tag = "opposite_gradients:" + _players(active)
            smaller = int(torch.argmin(norms))
            cos_matrix[smaller, smaller] += perturbation**2
        elif cos_phi >= 1.0 - parallel_tol:
            tag = "parallel_gradients:" + _players(active)
        # alpha_i |g_i| from the closed form on the (possibly perturbed) unit Gram matrix; 1 + cos > opposite_tol
        # keeps beta_i = 1 / sqrt(1 + cos) <= B, the same bound as K >= 3
        beta = nash_weights_closed_form(cos_matrix)
        weights[active] = beta / norms
    else:
        max_beta = 1.0 / math.sqrt(opposite_tol) if opposite_tol > 0 else math.inf  # capped by the solver
        beta, converged = solve_unit_nash_system(cos_matrix, tol=tol, max_iter=max_iter, max_beta=max_beta)
        alpha = beta / norms
        # certify on the Gram matrix itself: "ok" must mean every player gains, whatever Newton believed
        if not (converged and _certified_ok(sub_gram, alpha, tol, max_beta)):
            alpha, support, m = _no_loss_fallback(sub_gram, cos_matrix)
            if m > 0 and m * max_beta**2 >= len(active):  # a bounded solution exists; Newton did not certify it
                tag = "not_converged:" + _players(active)
            else:
                tag = "conflicting_gradients:" + _players(active[support])
        weights[active] = alpha
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
