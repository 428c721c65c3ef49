"""The two control methods of assign_noise: "shuffle" (vanilla in distribution) and "norm_matched"."""

from __future__ import annotations

import pytest
import torch

from immiscible_diffusers import assign_noise
from immiscible_diffusers.assignment import METHODS


def batch(size: int = 64, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((size, dim), generator=generator) * 2 - 1, torch.randn((size, dim), generator=generator)


def test_controls_are_methods():
    assert {"shuffle", "norm_matched"} <= set(METHODS)


def test_shuffle_is_a_seeded_random_permutation_that_shortens_nothing():
    samples, noise = batch()
    first, stats = assign_noise(samples, noise, method="shuffle", generator=torch.Generator().manual_seed(1), return_stats=True)
    again = assign_noise(samples, noise, method="shuffle", generator=torch.Generator().manual_seed(1))
    other = assign_noise(samples, noise, method="shuffle", generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other) and not torch.equal(first, noise)
    # A permutation of the rows: the same multiset of noise vectors.
    torch.testing.assert_close(first[first[:, 0].argsort()], noise[noise[:, 0].argsort()], rtol=0, atol=0)
    # Vanilla in distribution: over many batches the mean distance reduction is zero (a linear assignment's is not).
    reductions = [
        assign_noise(*batch(seed=s), method="shuffle", generator=torch.Generator().manual_seed(s), return_stats=True)[1].relative_reduction
        for s in range(200)
    ]
    assert abs(sum(reductions) / len(reductions)) < 0.005
    assert assign_noise(samples, noise, method="linear", return_stats=True)[1].relative_reduction > 0.02
    assert abs(stats.relative_reduction) < 0.1


def test_norm_matched_is_as_close_as_linear_without_re_pairing():
    samples, noise = batch()
    _, linear = assign_noise(samples, noise, method="linear", return_stats=True)
    moved, stats = assign_noise(samples, noise, method="norm_matched", return_stats=True)
    assert stats.mean_distance_after == pytest.approx(linear.mean_distance_after, rel=1e-5)
    # Each noise moved toward its OWN sample by one common factor a: moved - noise = a (samples - noise).
    a = linear.relative_reduction
    torch.testing.assert_close(moved, noise + a * (samples - noise), rtol=0, atol=1e-6)
    ratios = (moved - samples).norm(dim=1) / (noise - samples).norm(dim=1)
    torch.testing.assert_close(ratios, torch.full_like(ratios, 1 - a), rtol=0, atol=1e-5)
    # Unlike linear, nothing is re-paired: the nearest original noise of each moved row is its own.
    assert torch.equal(torch.cdist(moved, noise).argmin(dim=1), torch.arange(len(noise)))


def test_controls_keep_a_batch_of_one_as_it_is():
    samples, noise = batch(size=1)
    for method in ("shuffle", "norm_matched"):
        torch.testing.assert_close(assign_noise(samples, noise, method=method), noise, rtol=0, atol=0)
