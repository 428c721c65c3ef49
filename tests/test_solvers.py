"""The exact solvers and the per-problem solver choice: both reach the optimum, also on degenerate costs."""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from immiscible_diffusers import assign_noise, solve_linear_assignment
from immiscible_diffusers.assignment import solve_linear_assignment as reexported
from immiscible_diffusers.solvers import SOLVERS, choose_solver


def _eight_gaussians(batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    angles = torch.randint(0, 8, (batch,), generator=g).float() * (math.pi / 4)
    return torch.stack([angles.cos(), angles.sin()], dim=1) + 0.1 * torch.randn(batch, 2, generator=g)


def _total(cost: torch.Tensor, perm: torch.Tensor) -> float:
    return float(cost[torch.arange(cost.shape[0]), perm].sum())


def test_rule_sends_low_dimensional_costs_to_scipy_and_image_costs_to_lapjv():
    assert choose_solver(256, 2) == "scipy"  # the 2-D toy: lapjv measured 3x slower
    assert choose_solver(1024, 3) == "scipy"
    assert choose_solver(64, 8) == "scipy"
    assert choose_solver(128, 8) == "lapjv"
    for batch in (64, 128, 1024, 2048):
        for dim in (192, 3072, 16384):
            assert choose_solver(batch, dim) == "lapjv"
    assert choose_solver(256, None) == "lapjv"
    assert choose_solver(256, 3072, lapjv_available=False) == "scipy"


def test_solve_is_reexported_from_assignment():
    assert reexported is solve_linear_assignment


def _degenerate_costs(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(7, 2, generator=g)
    toy = _eight_gaussians(7, seed)
    repeated = toy[torch.tensor([0, 0, 0, 1, 1, 2, 2])]  # identical rows
    return {
        "toy2d": torch.cdist(toy.double(), noise.double()),
        "repeated rows": torch.cdist(repeated.double(), noise.double()),
        "constant": torch.ones(7, 7, dtype=torch.float64),
        "integer ties": torch.randint(0, 3, (7, 7), generator=g).double(),
    }


@pytest.mark.parametrize("solver", [*SOLVERS, None])
@pytest.mark.parametrize("seed", range(3))
def test_every_solver_reaches_the_brute_force_optimum_on_degenerate_costs(solver, seed):
    for name, cost in _degenerate_costs(seed).items():
        best = min(_total(cost, torch.tensor(p)) for p in itertools.permutations(range(7)))
        perm = solve_linear_assignment(cost, dim=2, solver=solver)
        assert sorted(perm.tolist()) == list(range(7)), name
        assert _total(cost, perm) == pytest.approx(best, abs=1e-12), name


@pytest.mark.parametrize("batch", [64, 256])
def test_toy2d_assignment_is_optimal_like_scipy(batch):
    samples = _eight_gaussians(batch, 0)
    noise = torch.randn(batch, 2, generator=torch.Generator().manual_seed(1))
    exact = torch.cdist(samples.double(), noise.double())
    _, columns = linear_sum_assignment(exact.numpy())
    reference = float(exact.numpy()[np.arange(batch), columns].sum())
    assigned = assign_noise(samples, noise, cost_dtype="float32")
    total = float((samples.double() - assigned.double()).norm(dim=1).sum())
    assert total == pytest.approx(reference, rel=1e-6)
    for solver in SOLVERS:
        assert _total(exact, solve_linear_assignment(exact, solver=solver)) == pytest.approx(reference, rel=1e-12)


def test_unknown_solver_is_refused():
    with pytest.raises(ValueError, match="solver must be one of"):
        solve_linear_assignment(torch.zeros(3, 3), solver="hungarian")
