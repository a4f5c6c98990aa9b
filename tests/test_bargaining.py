"""Property tests for the combination rules in munba_diffusion.bargaining."""

from __future__ import annotations

import math
import re

import pytest
import torch

from munba_diffusion.bargaining import (
    COMBINERS,
    MGDAWeighting,
    NashBargaining,
    PCGradWeighting,
    SumWeighting,
    get_combiner,
    mgda_weights,
    name_players,
    nash_bargaining_weights,
    nash_weights_closed_form,
    nash_weights_iterative,
    normalized_weights,
    pcgrad_weights,
)
from munba_diffusion.bargaining.nash import min_norm_unit_weights, solve_unit_nash_system
from munba_diffusion.step import gram_matrix

SHAPES = [(3,), (17, 5), (4, 3, 3, 3), (1000,), (2, 64)]


def random_gradients(seed: int, k: int) -> list[list[torch.Tensor]]:
    """K players' float32 gradients over a few tensors of assorted shapes, norms up to 1e6 apart."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [SHAPES[i] for i in torch.randperm(len(SHAPES), generator=generator)[:3].tolist()]
    players = []
    for _ in range(k):
        scale = 10.0 ** (6 * torch.rand((), generator=generator).item() - 3)
        players.append([(scale * torch.randn(shape, generator=generator)).float() for shape in shapes])
    return players


def flatten(player: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in player]).double()


def vectors_gram(*vectors: torch.Tensor) -> torch.Tensor:
    stacked = torch.stack([v.double() for v in vectors])
    return stacked @ stacked.T


def kkt_residual(gram: torch.Tensor, weights: torch.Tensor) -> float:
    """max_i |alpha_i (G^T G alpha)_i - 1|: the relative error of G^T G alpha = 1/alpha."""
    return float((weights * (gram @ weights) - 1).abs().max())


@pytest.mark.parametrize("seed", range(40))
def test_two_player_closed_form_properties(seed: int) -> None:
    players = random_gradients(seed, 2)
    gram = gram_matrix(players)
    weighting = nash_bargaining_weights(gram)
    alpha = weighting.weights
    assert weighting.status == "ok"
    assert kkt_residual(gram, alpha) < 1e-8
    utilities = gram @ alpha
    assert (utilities > 0).all()
    assert float(alpha @ gram @ alpha) == pytest.approx(2.0, rel=1e-10)
    assert torch.allclose(alpha, nash_weights_closed_form(gram), rtol=1e-12, atol=0)
    iterative, converged = nash_weights_iterative(gram)
    assert converged
    assert torch.allclose(iterative, alpha, rtol=1e-8, atol=0)

    # d is the scaled bisector of the unit gradients
    g_r, g_f = flatten(players[0]), flatten(players[1])
    d = alpha[0] * g_r + alpha[1] * g_f
    bisector = g_r / g_r.norm() + g_f / g_f.norm()
    assert torch.allclose(d, math.sqrt(2) * bisector / bisector.norm(), rtol=1e-7, atol=1e-9)

    # scaling either loss by beta > 0 leaves d unchanged
    beta = 10.0 ** (torch.rand((), generator=torch.Generator().manual_seed(seed)).item() * 8 - 4)
    scaled_gram = gram_matrix([players[0], [beta * t for t in players[1]]])
    scaled_alpha = nash_bargaining_weights(scaled_gram).weights
    scaled_d = scaled_alpha[0] * g_r + scaled_alpha[1] * (beta * g_f)
    assert torch.allclose(scaled_d, d, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("k", [3, 4, 5])
@pytest.mark.parametrize("seed", range(8))
def test_iterative_solver_satisfies_kkt(k: int, seed: int) -> None:
    players = random_gradients(100 * k + seed, k)
    gram = gram_matrix(players)
    weighting = nash_bargaining_weights(gram)
    assert weighting.status == "ok"
    assert kkt_residual(gram, weighting.weights) < 1e-8
    assert (weighting.weights > 0).all()
    assert (gram @ weighting.weights > 0).all()
    # Nash bargaining is scale-free: |d|^2 = alpha^T M alpha = sum_i alpha_i / alpha_i = K
    assert float(weighting.weights @ gram @ weighting.weights) == pytest.approx(k, rel=1e-8)


def test_iterative_solver_maximises_nash_product_on_the_sphere() -> None:
    """The KKT point is the maximiser of sum log(g_i . d) over |d| = sqrt(K): no random direction beats it."""
    players = random_gradients(7, 3)
    g = torch.stack([flatten(p) for p in players])
    weights = nash_bargaining_weights(g @ g.T).weights
    d = weights @ g
    best = torch.log(g @ d).sum()
    generator = torch.Generator().manual_seed(0)
    feasible = 0
    for _ in range(500):
        candidate = d + 0.3 * d.norm() * torch.randn(d.shape, generator=generator, dtype=torch.float64) / math.sqrt(
            d.numel()
        )
        candidate = candidate * d.norm() / candidate.norm()
        utilities = g @ candidate
        if (utilities > 0).all():
            feasible += 1
            assert torch.log(utilities).sum() <= best + 1e-12
    assert feasible > 100


def test_zero_gradient_uses_other_players_unit_direction() -> None:
    g_f = torch.tensor([3.0, 4.0])
    gram = vectors_gram(torch.zeros(2), g_f)
    weighting = nash_bargaining_weights(gram)
    assert weighting.status == "zero_gradient:0"
    assert weighting.weights.tolist() == [0.0, pytest.approx(0.2)]
    assert name_players(weighting.status, ["preserve", "forget"]) == "zero_gradient:preserve"


def test_all_zero_gradients_give_zero_weights() -> None:
    weighting = nash_bargaining_weights(torch.zeros(2, 2))
    assert weighting.status == "zero_gradient:0,1"
    assert weighting.weights.tolist() == [0.0, 0.0]


def test_tiny_but_nonzero_gradient_is_still_a_player() -> None:
    gram = vectors_gram(torch.tensor([1e-6, 0.0]), torch.tensor([0.0, 1e3]))
    weighting = nash_bargaining_weights(gram)
    assert weighting.status == "ok"
    assert kkt_residual(gram, weighting.weights) < 1e-12


@pytest.mark.parametrize("ratio", [-1.0, -3.0, -1e-4])
def test_opposite_gradients_perturb_and_favour_the_larger(ratio: float) -> None:
    g_r = torch.tensor([1.0, -2.0, 0.5])
    g_f = ratio * g_r
    gram = vectors_gram(g_r, g_f)
    weighting = NashBargaining(perturbation=1e-2)(gram)
    assert weighting.status == "opposite_gradients:0,1"
    assert torch.isfinite(weighting.weights).all() and (weighting.weights > 0).all()
    d = weighting.weights[0] * g_r.double() + weighting.weights[1] * g_f.double()
    larger = g_f if abs(ratio) >= 1 else g_r  # on a tie the first player's gradient is perturbed
    assert float(d @ larger.double()) > 0
    # a short step, about perturbation / sqrt(2), along the larger unit gradient
    assert float(d.norm()) == pytest.approx(1e-2 / math.sqrt(2), rel=1e-3)


def test_nearly_opposite_gradients_above_tolerance_keep_the_closed_form() -> None:
    g_r = torch.tensor([1.0, 0.0], dtype=torch.float64)
    angle = math.pi - 1e-2  # 1 + cos = 5e-5 > opposite_tol
    g_f = torch.tensor([math.cos(angle), math.sin(angle)], dtype=torch.float64)
    gram = vectors_gram(g_r, g_f)
    weighting = nash_bargaining_weights(gram)
    assert weighting.status == "ok"
    assert kkt_residual(gram, weighting.weights) < 1e-8
    assert (gram @ weighting.weights > 0).all()


def test_parallel_gradients_are_the_continuous_limit_of_the_closed_form() -> None:
    g_r = torch.tensor([1.0, 2.0, 2.0])
    gram = vectors_gram(g_r, 2.0 * g_r)
    weighting = nash_bargaining_weights(gram)
    assert weighting.status == "parallel_gradients:0,1"
    assert weighting.weights.tolist() == pytest.approx([1 / (math.sqrt(2) * 3), 1 / (math.sqrt(2) * 6)], rel=1e-12)
    near = vectors_gram(g_r, 2.0 * g_r + torch.tensor([0.0, 1e-4, -1e-4]))
    assert nash_bargaining_weights(near).weights.tolist() == pytest.approx(weighting.weights.tolist(), rel=1e-6)


def test_three_cancelling_players_get_no_step() -> None:
    g = torch.randn(2, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    vectors = [g[0], g[1], -(g[0] + g[1])]  # g_0 + g_1 + g_2 = 0: every direction makes someone lose
    weighting = nash_bargaining_weights(vectors_gram(*vectors))
    assert weighting.status == "conflicting_gradients:0,1,2"
    assert weighting.weights.tolist() == [0.0, 0.0, 0.0]  # nothing lost, and the status says why


def test_zero_player_among_three_reduces_to_two_player_closed_form() -> None:
    players = random_gradients(3, 2)
    g_r, g_f = flatten(players[0]), flatten(players[1])
    gram = vectors_gram(g_r, torch.zeros_like(g_r), g_f)
    weighting = nash_bargaining_weights(gram)
    assert weighting.status == "zero_gradient:1"
    expected = nash_weights_closed_form(vectors_gram(g_r, g_f))
    assert weighting.weights[[0, 2]].tolist() == pytest.approx(expected.tolist(), rel=1e-12)
    assert weighting.weights[1] == 0


def test_non_finite_gram_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="NaN or inf"):
        nash_bargaining_weights(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="square"):
        nash_bargaining_weights(torch.ones(2, 3))


def test_mgda_two_players_matches_brute_force_grid() -> None:
    for seed in range(10):
        players = random_gradients(200 + seed, 2)
        g_r, g_f = flatten(players[0]), flatten(players[1])
        weights = mgda_weights(vectors_gram(g_r, g_f)).weights
        assert weights.sum().item() == pytest.approx(1.0) and (weights >= 0).all()
        best = (weights[0] * g_r + weights[1] * g_f).norm() ** 2
        t = torch.linspace(0, 1, 100001, dtype=torch.float64)
        a, b, c = g_r @ g_r, g_f @ g_f, g_r @ g_f  # |t g_r + (1 - t) g_f|^2 expanded
        grid_best = (t**2 * a + (1 - t) ** 2 * b + 2 * t * (1 - t) * c).min()
        assert best <= grid_best * (1 + 1e-9)


@pytest.mark.parametrize("k", [3, 4, 5])
def test_mgda_min_norm_optimality(k: int) -> None:
    g = torch.stack([flatten(p) for p in random_gradients(300 + k, k)])
    g = g / g.norm(dim=1, keepdim=True) * torch.linspace(1, 3, k, dtype=torch.float64)[:, None]
    gram = g @ g.T
    weights = MGDAWeighting()(gram).weights
    assert weights.sum().item() == pytest.approx(1.0) and (weights >= 0).all()
    d = weights @ g
    norm_sq = float(d @ d)
    products = g @ d
    # min-norm point: g_i . d >= |d|^2 for every player, with equality on the support
    assert (products >= norm_sq - 1e-6 * float(gram.diagonal().max())).all()
    support = weights > 1e-6
    assert torch.allclose(products[support], torch.full_like(products[support], norm_sq), rtol=1e-4)
    samples = torch.distributions.Dirichlet(torch.ones(k, dtype=torch.float64)).sample((5000,))
    assert norm_sq <= ((samples @ g).norm(dim=1) ** 2).min() * (1 + 1e-9)


def test_pcgrad_two_players_removes_conflict() -> None:
    g_1 = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    g_2 = torch.tensor([-2.0, 1.0, 0.0], dtype=torch.float64)
    gram = vectors_gram(g_1, g_2)
    weights = pcgrad_weights(gram).weights
    projected_1 = g_1 - (g_1 @ g_2) / (g_2 @ g_2) * g_2
    projected_2 = g_2 - (g_2 @ g_1) / (g_1 @ g_1) * g_1
    assert torch.allclose(weights[0] * g_1 + weights[1] * g_2, projected_1 + projected_2, rtol=1e-12)
    assert float(projected_1 @ g_2) == pytest.approx(0.0, abs=1e-12)
    assert float(projected_2 @ g_1) == pytest.approx(0.0, abs=1e-12)
    for seed in range(20):
        players = random_gradients(400 + seed, 2)
        gram = gram_matrix(players)
        w = pcgrad_weights(gram).weights
        c = gram[0, 1]
        coefficients = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        if c < 0:  # each projected gradient is orthogonal to the other player's gradient
            coefficients = torch.tensor([[1.0, -c / gram[1, 1]], [-c / gram[0, 0], 1.0]], dtype=torch.float64)
        assert torch.allclose(w, coefficients.sum(0), rtol=1e-12)
        assert (coefficients @ gram).diagonal(offset=1).item() >= -1e-9 * float(gram.diagonal().max())


def test_pcgrad_is_reproducible_with_a_seed_and_fresh_per_call() -> None:
    gram = gram_matrix(random_gradients(9, 4))
    first, second = PCGradWeighting(seed=3), PCGradWeighting(seed=3)
    a = [first(gram).weights for _ in range(5)]
    b = [second(gram).weights for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_normalized_is_the_sum_of_unit_vectors() -> None:
    players = random_gradients(11, 3)
    g = torch.stack([flatten(p) for p in players])
    weighting = normalized_weights(g @ g.T)
    assert torch.allclose(weighting.weights @ g, (g / g.norm(dim=1, keepdim=True)).sum(0), rtol=1e-10)
    zero_case = normalized_weights(vectors_gram(torch.zeros(3), torch.ones(3)))
    assert zero_case.status == "zero_gradient:0"
    assert zero_case.weights.tolist() == [0.0, pytest.approx(1 / math.sqrt(3))]


def test_sum_weighting() -> None:
    gram = torch.eye(3, dtype=torch.float64)
    assert SumWeighting()(gram).weights.tolist() == [1.0, 1.0, 1.0]
    assert SumWeighting(weights=(1.0, 0.5, 2.0))(gram).weights.tolist() == [1.0, 0.5, 2.0]
    with pytest.raises(ValueError, match="one weight per loss"):
        SumWeighting(weights=(1.0, 2.0))(gram)


def test_get_combiner() -> None:
    assert COMBINERS == ("nash", "sum", "normalized", "mgda", "pcgrad")
    for name in COMBINERS:
        assert get_combiner(name).name == name
    assert get_combiner("nash", perturbation=0.1).perturbation == 0.1
    with pytest.raises(ValueError) as error:
        get_combiner("nashh")
    assert "\n" not in str(error.value) and "nash, sum, normalized, mgda, pcgrad" in str(error.value)
    with pytest.raises(ValueError, match="no option"):
        get_combiner("mgda", seed=1)


def test_iterative_solver_on_many_low_dimensional_games() -> None:
    """Few parameters make K >= 3 players often conflict: always finite, 'ok' solutions always exact."""
    generator = torch.Generator().manual_seed(0)
    statuses = set()
    for _ in range(300):
        k = int(torch.randint(3, 6, (1,), generator=generator))
        dim = int(torch.randint(2, 8, (1,), generator=generator))
        scales = 10 ** (6 * torch.rand(k, 1, generator=generator, dtype=torch.float64) - 3)
        g = scales * torch.randn(k, dim, generator=generator, dtype=torch.float64)
        weighting = assert_nash_promise(g @ g.T)
        statuses.add(weighting.status.partition(":")[0])
        if weighting.status == "ok":
            assert kkt_residual(g @ g.T, weighting.weights) < 1e-8
    assert statuses == {"ok", "conflicting_gradients"}


# --- The promise, for every accepted input: "every player gains, or the status says why not" -------------------

EPS = torch.finfo(torch.float64).eps
MAX_BETA = 1000.0  # 1 / sqrt(opposite_tol) at the defaults
NOISES = [0.0, 1e-12, 1e-10, 1e-8, 1e-6, 1e-3]


def assert_nash_promise(gram: torch.Tensor):
    """Nash bargaining on ``gram`` keeps the module doc's promise; returns the weighting.

    No exception, finite weights. Players that are not flagged zero either all strictly gain with the bounded,
    certified KKT solution (``ok``, possibly with ``zero_gradient``/``parallel_gradients`` tags), or the status
    names players and nobody loses from the returned direction (or it is zero); the documented exception is two
    opposite players, where the larger one gains.
    """
    weighting = nash_bargaining_weights(gram)
    alpha, k = weighting.weights, gram.shape[0]
    assert alpha.dtype == torch.float64 and torch.isfinite(alpha).all(), weighting
    tags = dict(tag.partition(":")[::2] for tag in weighting.status.split(";"))
    if weighting.status != "ok":
        assert all(re.fullmatch(r"\d+(,\d+)*", players) for players in tags.values()), weighting.status
    zero = {int(i) for i in tags.get("zero_gradient", "").split(",") if i}
    active = [i for i in range(k) if i not in zero]
    assert (alpha[sorted(zero)] == 0).all()
    if not active:
        return weighting
    sub, w = gram[active][:, active], alpha[active]
    utilities = sub @ w  # g_i . d: check utilities, not only residuals
    if set(tags) <= {"ok", "zero_gradient", "parallel_gradients"}:
        assert (w > 0).all() and (utilities > 0).all(), (weighting, utilities)
        bound = 1e-12 + 8 * EPS * len(active) * MAX_BETA**2  # the documented residual bound
        assert kkt_residual(sub, w) <= 2 * bound, (weighting, kkt_residual(sub, w))
        cosines = utilities / (sub.diagonal().sqrt() * (w @ sub @ w).sqrt())
        assert (cosines >= 0.99 / (MAX_BETA * math.sqrt(len(active)))).all(), (weighting, cosines)
    elif "opposite_gradients" in tags:
        larger = int(torch.argmax(sub.diagonal()))
        assert utilities[larger] > 0, weighting
    else:
        assert set(tags) <= {"zero_gradient", "conflicting_gradients", "not_converged"}, weighting.status
        floor = 8 * k * EPS * (gram.abs() @ alpha.abs())[active]
        assert (w == 0).all() or (utilities > floor).all(), (weighting, utilities)
    return weighting


def regular_simplex(k: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` unit vectors summing to zero (a regular simplex's directions), randomly rotated into ``R^dim``."""
    directions = torch.eye(k, dtype=torch.float64) - 1.0 / k
    directions = directions / directions.norm(dim=1, keepdim=True)
    coordinates = directions @ torch.linalg.svd(directions).Vh[: k - 1].T  # (k, k - 1), the same Gram matrix
    padded = torch.cat([coordinates, torch.zeros(k, dim - k + 1, dtype=torch.float64)], dim=1)
    rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    return padded @ rotation


def player_norms(k: int, generator: torch.Generator) -> torch.Tensor:
    return 10 ** (6 * torch.rand(k, 1, generator=generator, dtype=torch.float64) - 3)  # 1e-3 .. 1e3


@pytest.mark.parametrize("noise", NOISES)
def test_promise_for_simplex_players(noise: float) -> None:
    """Concepts at 120 degrees and their K-player analogues (measured on main: LinAlgError, and "ok" with losers)."""
    generator = torch.Generator().manual_seed(int(-math.log10(noise)) if noise else 0)
    statuses = set()
    for k in range(3, 9):
        for _ in range(4):
            dim = k + int(torch.randint(0, 3, (1,), generator=generator))
            units = regular_simplex(k, dim, generator)
            g = player_norms(k, generator) * (
                units + noise * torch.randn(k, dim, generator=generator, dtype=torch.float64)
            )
            statuses.add(assert_nash_promise(g @ g.T).status.partition(":")[0])
    if noise <= 1e-6:  # sum of unit gradients < sqrt(K) / B: provably no bounded bargain
        assert statuses == {"conflicting_gradients"}


def test_promise_for_rank_deficient_gram_matrices() -> None:
    generator = torch.Generator().manual_seed(1)
    for k in range(3, 9):
        for rank in range(1, k):
            for _ in range(3):
                g = player_norms(k, generator) * torch.randn(k, rank, generator=generator, dtype=torch.float64)
                assert_nash_promise(g @ g.T)
        duplicated = torch.randn(k, 4, generator=generator, dtype=torch.float64)
        duplicated[-1] = 7.0 * duplicated[0]  # the same player twice
        assert_nash_promise(duplicated @ duplicated.T)


@pytest.mark.parametrize("zeros", [1, 2])
def test_promise_with_zero_gradients(zeros: int) -> None:
    generator = torch.Generator().manual_seed(2 + zeros)
    for k in range(3, 9):
        for trial in range(8):
            dim = int(torch.randint(2, 8, (1,), generator=generator))
            g = player_norms(k, generator) * torch.randn(k, dim, generator=generator, dtype=torch.float64)
            if trial % 2:  # zero players among conflicting ones
                g[: k - 1] = player_norms(k - 1, generator) * regular_simplex(k - 1, dim + k, generator)[:, :dim]
            chosen = torch.randperm(k, generator=generator)[:zeros]
            g[chosen] = 0.0
            weighting = assert_nash_promise(g @ g.T)
            assert weighting.status.startswith("zero_gradient:" + ",".join(map(str, sorted(chosen.tolist()))))


def test_promise_for_opposite_and_parallel_pairs_among_three() -> None:
    generator = torch.Generator().manual_seed(4)
    for trial in range(120):
        dim = int(torch.randint(2, 6, (1,), generator=generator))
        g = torch.randn(3, dim, generator=generator, dtype=torch.float64)
        gap = 10 ** (-12 * torch.rand((), generator=generator).item())
        jitter = gap * torch.randn(dim, generator=generator, dtype=torch.float64)
        g[1] = [-g[0], -g[0] + jitter, g[0] + jitter, g[0]][trial % 4]
        g = player_norms(3, generator) * g[torch.randperm(3, generator=generator)]
        weighting = assert_nash_promise(g @ g.T)
        if trial % 4 == 0:  # an exactly opposite pair: no direction helps both, and neither may lose
            assert weighting.status.startswith("conflicting_gradients:")
            assert (weighting.weights == 0).all()


def test_promise_for_two_players_near_opposite() -> None:
    for exponent in range(0, 13):
        angle = math.pi - 10.0**-exponent
        gram = vectors_gram(torch.tensor([1e-3, 0.0]), 1e3 * torch.tensor([math.cos(angle), math.sin(angle)]))
        weighting = assert_nash_promise(gram)
        assert (weighting.status == "ok") == (1 + math.cos(angle) > 1e-6)


def test_three_concepts_at_120_degrees_with_tiny_noise_never_raise() -> None:
    """The measured failure: 120-degree concepts plus noise in [0, 1e-8] raised LinAlgError mid-training."""
    generator = torch.Generator().manual_seed(5)
    for trial in range(60):
        units = regular_simplex(3, 3, generator)
        noise = 1e-8 * torch.rand((), generator=generator).item() * (trial % 3 != 0)
        g = units + noise * torch.randn(3, 3, generator=generator, dtype=torch.float64)
        weighting = assert_nash_promise(g @ g.T)
        assert weighting.status.startswith("conflicting_gradients:")
    beta, converged = solve_unit_nash_system(regular_simplex(3, 3, generator) @ regular_simplex(3, 3, generator).T)
    assert not converged and torch.isfinite(beta).all()


def test_conflicting_fallback_is_the_min_norm_point_of_the_unit_gradients() -> None:
    """A tetrahedron's directions plus a small common part eps: the Nash solution (beta = 1 / (2 eps)) is beyond B."""
    eps = 1e-4
    units = torch.cat(
        [
            math.sqrt(1 - eps**2) * regular_simplex(4, 3, torch.Generator().manual_seed(6)),
            torch.full((4, 1), eps, dtype=torch.float64),
        ],
        dim=1,
    )
    g = torch.tensor([[1e-2], [1.0], [30.0], [1e2]], dtype=torch.float64) * units
    weighting = assert_nash_promise(g @ g.T)
    assert weighting.status == "conflicting_gradients:0,1,2,3"
    d = weighting.weights @ g
    # the min-norm point of the unit gradients' hull is v = eps e_4 (lambda = 1/4 each): a short step all gain from
    assert torch.allclose(weighting.weights * g.norm(dim=1), torch.full((4,), 0.25, dtype=torch.float64), rtol=1e-8)
    assert torch.allclose(d, torch.tensor([0.0, 0.0, 0.0, eps], dtype=torch.float64), atol=1e-12)
    assert (g @ d > 0).all() and float(d @ d) < 4 / MAX_BETA**2  # |v|^2 < K / B^2
    # optimality of the min-norm point: u_i . v >= |v|^2; no worse than Frank-Wolfe MGDA
    lam = min_norm_unit_weights(units @ units.T)
    v = lam @ units
    assert ((units @ v) >= float(v @ v) - 16 * EPS).all()
    assert float(v @ v) <= float((mgda_weights(units @ units.T).weights @ units).norm() ** 2) * (1 + 1e-6)
