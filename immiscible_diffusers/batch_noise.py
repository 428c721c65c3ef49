"""The step Immiscible Diffusion adds to a training step: draw the batch's noise, then assign it to the images."""

from __future__ import annotations

import argparse
import time

import torch

from .arguments import assignment_kwargs
from .assignment import AssignmentStats, assign_noise


def draw_assigned_noise(
    clean: torch.Tensor,
    args: argparse.Namespace,
    knn_generator: torch.Generator | None = None,
    noise_generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, AssignmentStats, float]:
    """Gaussian noise shaped like ``clean`` and its assignment by the ``--assignment*`` flags.

    Returns ``(noise, assigned_noise, stats, seconds)``; the assigned noise is what noises the images and
    what the target is built from. Linear assignment draws nothing random and KNN draws its candidates from
    ``knn_generator``, so the main random stream (this noise from ``noise_generator`` or torch's global
    generator, the timesteps drawn after it, the data order) is the same for every ``--assignment``: runs
    with ``none``, ``linear`` and ``knn`` stay comparable.
    """
    noise = torch.randn(clean.shape, dtype=clean.dtype, device=clean.device, generator=noise_generator)
    start = time.perf_counter()
    assigned, stats = assign_noise(clean, noise, **assignment_kwargs(args), generator=knn_generator, return_stats=True)
    return noise, assigned, stats, time.perf_counter() - start
