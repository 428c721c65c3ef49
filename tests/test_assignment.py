"""The assignment engine: optimality, permutation property, KNN, determinism, shapes and bad input."""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from immiscible_diffusers import (
    AssignmentStats,
    assign_noise,
    cost_matrix,
    linear_assignment_permutation,
    solve_linear_assignment,
)


def _digits_like(batch: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Structured 'images': a few smooth prototypes plus a little noise, in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.rand((4, *shape), generator=g) * 2 - 1
    labels = torch.randint(0, 4, (batch,), generator=g)
    return (prototypes[labels] + 0.1 * torch.randn((batch, *shape), generator=g)).clamp(-1, 1)


def _pair_costs(samples: torch.Tensor, noise: torch.Tensor, distance: str) -> torch.Tensor:
    """Exact float64 pairwise cost, independent of the engine's GEMM formulation."""
    d = torch.cdist(samples.flatten(1).double(), noise.flatten(1).double())
    return d if distance == "l2" else d**2


def _total(samples: torch.Tensor, assigned: torch.Tensor, distance: str) -> float:
    d = (samples.flatten(1).double() - assigned.flatten(1).double()).norm(dim=1)
    return float(d.sum() if distance == "l2" else (d**2).sum())


@pytest.mark.parametrize("distance", ["l2", "sqeuclidean"])
@pytest.mark.parametrize("seed", range(5))
def test_linear_assignment_matches_brute_force(distance, seed):
    batch = 6
    samples = _digits_like(batch, (3, 4, 4), seed)
    noise = torch.randn(batch, 3, 4, 4, generator=torch.Generator().manual_seed(100 + seed))
    costs = _pair_costs(samples, noise, distance)
    best = min(sum(float(costs[i, p[i]]) for i in range(batch)) for p in itertools.permutations(range(batch)))

    assigned = assign_noise(samples, noise, distance=distance)

    assert _total(samples, assigned, distance) == pytest.approx(best, rel=1e-9)
    assert _total(samples, assigned, distance) <= _total(samples, noise, distance) + 1e-9


@pytest.mark.parametrize("distance", ["l2", "sqeuclidean"])
def test_result_is_a_permutation_of_the_noise(distance):
    samples = _digits_like(64, (3, 8, 8))
    noise = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    assigned = assign_noise(samples, noise, distance=distance)
    flat_in = noise.flatten(1)
    flat_out = assigned.flatten(1)
    # every output row is an input row, each input row used exactly once
    matches = (flat_out[:, None, :] == flat_in[None, :, :]).all(-1)
    assert matches.sum(1).eq(1).all() and matches.sum(0).eq(1).all()
    assert not torch.equal(assigned, noise), "a 64-sample batch of structured data should get re-paired"


@pytest.mark.parametrize(
    "cost_dtype,min_kept",
    [("bfloat16", 0.99), ("float16", 0.99)],
)
def test_quantized_cost_keeps_the_distance_reduction(cost_dtype, min_kept):
    samples = _digits_like(96, (3, 16, 16), seed=3)
    noise = torch.randn(96, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    exact = assign_noise(samples, noise, cost_dtype="float32")
    quantized = assign_noise(samples, noise, cost_dtype=cost_dtype)
    base, best, got = (_total(samples, t, "l2") for t in (noise, exact, quantized))
    assert best < base
    kept = (base - got) / (base - best)
    assert kept >= min_kept, f"{cost_dtype} cost kept only {kept:.4f} of the optimal distance reduction"


def test_cost_matrix_matches_exact_distances():
    samples = _digits_like(10, (2, 5, 5))
    noise = torch.randn(10, 2, 5, 5)
    dim = samples[0].numel()
    l2 = cost_matrix(samples, noise, "l2")
    # scaled by 1/sqrt(D): same ordering, same optimum
    expected = _pair_costs(samples, noise, "l2") / math.sqrt(dim)
    torch.testing.assert_close(l2.double(), expected, rtol=1e-4, atol=1e-5)
    sq = cost_matrix(samples, noise, "sqeuclidean")
    # -2<x,n>/D differs from |x-n|^2/D by per-row and per-column constants only
    diff = expected**2 - sq.double()
    row_const = diff - diff[:, :1]
    torch.testing.assert_close(row_const, row_const[:1].expand_as(row_const), rtol=0, atol=1e-4)


def test_lapjv_solver_agrees_with_scipy_including_ties():
    g = torch.Generator().manual_seed(0)
    for cost in (torch.rand(50, 50, generator=g), torch.randint(0, 3, (40, 40), generator=g).float()):
        perm = solve_linear_assignment(cost)
        rows, cols = linear_sum_assignment(cost.double().numpy())
        assert sorted(perm.tolist()) == list(range(cost.shape[0]))
        assert float(cost[torch.arange(cost.shape[0]), perm].sum()) == pytest.approx(float(cost.double().numpy()[rows, cols].sum()))


@pytest.mark.parametrize("shape", [(16, 12), (16, 3, 4, 4), (16, 2, 3, 4, 4)])
@pytest.mark.parametrize("method", ["none", "linear", "knn"])
def test_shapes_dtype_and_device_are_preserved(shape, method):
    samples = torch.rand(shape) * 2 - 1
    noise = torch.randn(shape)
    assigned = assign_noise(samples, noise, method=method, generator=torch.Generator().manual_seed(0))
    assert assigned.shape == noise.shape and assigned.dtype == noise.dtype and assigned.device == noise.device


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("method", ["linear", "knn"])
def test_low_and_high_precision_inputs(dtype, method):
    samples = _digits_like(12, (3, 4, 4)).to(dtype)
    noise = torch.randn(12, 3, 4, 4).to(dtype)
    assigned = assign_noise(samples, noise, method=method, generator=torch.Generator().manual_seed(0))
    assert assigned.dtype == dtype
    if method == "linear":
        assert sorted(assigned.flatten(1).sum(1).tolist()) == sorted(noise.flatten(1).sum(1).tolist())


def test_batch_of_one_returns_the_noise_unchanged_for_linear():
    samples, noise = torch.rand(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    assert torch.equal(assign_noise(samples, noise), noise)


def test_none_returns_the_noise_as_is():
    samples, noise = _digits_like(8, (3, 4, 4)), torch.randn(8, 3, 4, 4)
    assert torch.equal(assign_noise(samples, noise, method="none"), noise)


def test_inputs_are_never_modified():
    samples, noise = _digits_like(8, (3, 4, 4)), torch.randn(8, 3, 4, 4)
    s0, n0 = samples.clone(), noise.clone()
    for method in ("linear", "knn"):
        assign_noise(samples, noise, method=method)
    assert torch.equal(samples, s0) and torch.equal(noise, n0)


def test_knn_picks_the_nearest_of_k_candidates():
    k = 6
    samples = _digits_like(10, (3, 4, 4), seed=5)
    noise = torch.randn(10, 3, 4, 4, generator=torch.Generator().manual_seed(6))
    assigned = assign_noise(samples, noise, method="knn", knn_k=k, generator=torch.Generator().manual_seed(7))
    # rebuild the candidates: the given noise, then k - 1 draws from the same generator
    extra = torch.randn((k - 1, *noise.shape), generator=torch.Generator().manual_seed(7))
    candidates = torch.cat([noise[None], extra])  # (k, B, ...)
    distances = (candidates - samples[None]).flatten(2).norm(dim=-1)  # (k, B)
    expected = candidates[distances.argmin(0), torch.arange(10)]
    assert torch.equal(assigned, expected)
    assert (assigned - samples).flatten(1).norm(dim=1).le((noise - samples).flatten(1).norm(dim=1) + 1e-6).all()


def test_knn_works_at_batch_one_and_k_one_is_the_identity():
    samples, noise = _digits_like(1, (3, 8, 8)), torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    moved = assign_noise(samples, noise, method="knn", knn_k=16, generator=torch.Generator().manual_seed(0))
    assert (moved - samples).norm() < (noise - samples).norm()
    assert torch.equal(assign_noise(samples, noise, method="knn", knn_k=1), noise)


@pytest.mark.parametrize("method", ["linear", "knn"])
def test_deterministic_for_a_given_generator(method):
    samples, noise = _digits_like(32, (3, 8, 8)), torch.randn(32, 3, 8, 8)
    a = assign_noise(samples, noise, method=method, generator=torch.Generator().manual_seed(11))
    b = assign_noise(samples, noise, method=method, generator=torch.Generator().manual_seed(11))
    assert torch.equal(a, b)


def test_stats_report_the_distance_reduction():
    samples, noise = _digits_like(64, (3, 8, 8)), torch.randn(64, 3, 8, 8)
    assigned, stats = assign_noise(samples, noise, return_stats=True)
    assert isinstance(stats, AssignmentStats)
    before = float((samples - noise).flatten(1).norm(dim=1).mean())
    after = float((samples - assigned).flatten(1).norm(dim=1).mean())
    assert stats.mean_distance_before == pytest.approx(before, rel=1e-5)
    assert stats.mean_distance_after == pytest.approx(after, rel=1e-5)
    assert 0 < stats.relative_reduction < 1


def test_batches_above_block_size_are_assigned_exactly_within_blocks():
    samples, noise = _digits_like(10, (3, 4, 4), seed=9), torch.randn(10, 3, 4, 4)
    with pytest.warns(UserWarning, match="block_size=4"):
        perm = linear_assignment_permutation(samples, noise, block_size=4)
    # three blocks of sizes 4, 3, 3; noise stays inside its block and each block is optimal
    for start, end in ((0, 4), (4, 7), (7, 10)):
        block = perm[start:end]
        assert sorted(block.tolist()) == list(range(start, end))
        alone = solve_linear_assignment(cost_matrix(samples[start:end], noise[start:end])) + start
        assert torch.equal(block, alone)
    assert torch.equal(linear_assignment_permutation(samples, noise, block_size=None), solve_linear_assignment(cost_matrix(samples, noise)))


def test_global_scope_without_a_process_group_is_local():
    samples, noise = _digits_like(16, (3, 4, 4)), torch.randn(16, 3, 4, 4)
    assert torch.equal(assign_noise(samples, noise, scope="global"), assign_noise(samples, noise, scope="local"))


# --- bad input -------------------------------------------------------------------------------


def _ok():
    return torch.rand(4, 3, 2, 2), torch.randn(4, 3, 2, 2)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"method": "hungarian"}, ValueError, "method"),
        ({"distance": "cosine"}, ValueError, "distance"),
        ({"cost_dtype": "int8"}, ValueError, "cost_dtype"),
        ({"cost_dtype": torch.float64}, ValueError, "cost_dtype"),
        ({"scope": "world"}, ValueError, "scope"),
        ({"knn_k": 0}, ValueError, "knn_k"),
        ({"knn_k": 2.5}, ValueError, "knn_k"),
        ({"knn_k": True}, ValueError, "knn_k"),
        ({"block_size": 0}, ValueError, "block_size"),
    ],
)
def test_bad_options_name_the_argument(kwargs, error, match):
    samples, noise = _ok()
    with pytest.raises(error, match=match):
        assign_noise(samples, noise, **kwargs)


def test_bad_tensors_name_the_argument():
    samples, noise = _ok()
    with pytest.raises(ValueError, match="noise must have the shape"):
        assign_noise(samples, noise[:3])
    with pytest.raises(ValueError, match="noise must be on the device"):
        assign_noise(samples, noise.to("meta"))
    with pytest.raises(ValueError, match="samples must have a batch dimension"):
        assign_noise(torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(TypeError, match="samples must be a torch.Tensor"):
        assign_noise(samples.numpy(), noise)
    with pytest.raises(TypeError, match="noise must be a floating-point"):
        assign_noise(samples, noise.long())
    for bad in (float("nan"), float("inf")):
        broken = samples.clone()
        broken[1, 0, 0, 0] = bad
        with pytest.raises(ValueError, match="samples contains NaN or Inf"):
            assign_noise(broken, noise)
        broken = noise.clone()
        broken[2, 1, 1, 1] = bad
        with pytest.raises(ValueError, match="noise contains NaN or Inf"):
            assign_noise(samples, broken)


def test_fp16_overflow_is_reported_not_silently_wrong():
    samples = torch.full((4, 8), 1.0e6)
    noise = torch.randn(4, 8)
    with pytest.raises(ValueError, match="overflowed"):
        assign_noise(samples, noise, cost_dtype="float16")


def test_numpy_free_of_global_rng_side_effects():
    """Linear assignment consumes no randomness, so vanilla and immiscible runs see the same streams."""
    samples, noise = _digits_like(16, (3, 4, 4)), torch.randn(16, 3, 4, 4)
    torch.manual_seed(123)
    np.random.seed(123)
    assign_noise(samples, noise)
    after = (torch.rand(1).item(), np.random.rand())
    torch.manual_seed(123)
    np.random.seed(123)
    assert after == (torch.rand(1).item(), np.random.rand())


# --- issue 11: edge cases that crashed ----------------------------------------------------------------


@pytest.mark.parametrize("method", ["none", "linear", "knn"])
def test_an_empty_batch_returns_empty_noise_and_zero_stats(method):
    samples, noise = torch.rand(0, 3, 4, 4), torch.randn(0, 3, 4, 4)
    assigned, stats = assign_noise(samples, noise, method=method, return_stats=True)
    assert assigned.shape == (0, 3, 4, 4)
    assert stats == AssignmentStats(0.0, 0.0) and stats.relative_reduction == 0.0
    assert assign_noise(samples, noise, method=method).shape == (0, 3, 4, 4)


@pytest.mark.parametrize("method", ["linear", "knn"])
def test_samples_without_values_return_the_noise(method):
    samples, noise = torch.rand(4, 0), torch.randn(4, 0)
    assigned, stats = assign_noise(samples, noise, method=method, return_stats=True)
    assert assigned.shape == (4, 0) and stats.mean_distance_before == 0.0


def test_generator_of_the_wrong_type_names_the_argument():
    samples, noise = _ok()
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        assign_noise(samples, noise, method="knn", generator=5)


def test_meta_tensors_are_refused_clearly():
    samples, noise = (t.to("meta") for t in _ok())
    with pytest.raises(ValueError, match="meta tensors"):
        assign_noise(samples, noise)


def test_knn_k_too_large_for_memory_names_the_memory_before_allocating():
    samples, noise = _ok()
    with pytest.raises(ValueError, match=r"knn_k=1000000000000 needs about [\d.]+ GiB .* available on cpu"):
        assign_noise(samples, noise, method="knn", knn_k=10**12)


def test_float32_overflow_does_not_suggest_float32():
    samples = torch.full((4, 8), 3.0e38)
    noise = torch.randn(4, 8)
    with pytest.raises(ValueError, match="overflowed") as error:
        assign_noise(samples, noise, cost_dtype="float32")
    assert "cost_dtype='float32'" not in str(error.value) and "rescale" in str(error.value)


@pytest.mark.parametrize("bad", [{}, [], 3])
def test_cost_dtype_of_the_wrong_type_names_the_argument(bad):
    samples, noise = _ok()
    with pytest.raises((TypeError, ValueError), match="cost_dtype"):
        assign_noise(samples, noise, cost_dtype=bad)


@pytest.mark.parametrize("method", ["linear", "knn"])
def test_mixed_float_dtypes_are_assigned_in_a_common_dtype(method):
    samples = _digits_like(12, (3, 4, 4))
    noise = torch.randn(12, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    mixed = assign_noise(samples.half(), noise, method=method, generator=torch.Generator().manual_seed(0))
    same = assign_noise(samples.half().float(), noise, method=method, generator=torch.Generator().manual_seed(0))
    assert mixed.dtype == torch.float32 and torch.equal(mixed, same)
