"""The noising step of latent diffusion training (Stable Diffusion) with immiscible noise assignment.

``prepare_noise_and_target`` is the part of ``training_scripts/train_text_to_image.py`` that the paper
changes, kept in one function so that the order of its steps is written down once and tested:

1. draw Gaussian noise the shape of the latents (``vae.encode(pixels).latent_dist.sample() * scaling_factor``);
2. assign it to the latents (``assign_noise``: linear assignment, KNN, or none);
3. add ``noise_offset`` to the *assigned* noise (one random constant per sample and channel);
4. noise the latents with that noise plus ``input_perturbation`` extra Gaussian noise;
5. build the target from the assigned (+ offset) noise, without the perturbation: the noise itself
   (epsilon prediction) or ``get_velocity(latents, noise, t)`` (v-prediction).

``snr_weighted_mse`` is the loss, with the optional Min-SNR weighting (``--snr_gamma``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from .assignment import AssignmentStats, assign_noise
from .schedulers import ImmiscibleNoiseScheduler

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class NoisedLatents:
    """What ``prepare_noise_and_target`` drew and built for one batch of latents.

    Attributes:
        noise_before_assignment: the Gaussian draw, as the vanilla pairing would use it.
        assigned_noise: that draw after ``assign_noise`` (a permutation of it for the linear assignment).
        offset: the ``noise_offset`` draw, shape ``(B, C, 1, 1)`` (``None`` when the offset is 0).
        perturbation: the ``input_perturbation`` draw (``None`` when the perturbation is 0).
        noise: ``assigned_noise + noise_offset * offset``: the noise the target is built from.
        timesteps: one training timestep per sample.
        noisy_latents: the latents noised with ``noise + input_perturbation * perturbation``.
        target: what the model learns to predict.
        assignment_stats: mean latent-noise distance before and after the assignment.
        assign_seconds: wall time of the assignment.
    """

    noise_before_assignment: torch.Tensor
    assigned_noise: torch.Tensor
    offset: torch.Tensor | None
    perturbation: torch.Tensor | None
    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy_latents: torch.Tensor
    target: torch.Tensor
    assignment_stats: AssignmentStats
    assign_seconds: float


def _check_non_negative(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")


def prepare_noise_and_target(
    latents: torch.Tensor,
    noise_scheduler,
    *,
    prediction_type: str,
    assignment: Mapping[str, Any],
    noise_offset: float = 0.0,
    input_perturbation: float = 0.0,
    knn_generator: torch.Generator | None = None,
) -> NoisedLatents:
    """Draw noise for ``latents``, assign it, and build the noisy latents and the training target.

    Random draws come from torch's global generator, in this order: the noise, the offset (only when
    ``noise_offset`` > 0), the perturbation (only when ``input_perturbation`` > 0), the timesteps. The
    assignment draws nothing from it (KNN candidates come from ``knn_generator``), so runs that differ
    only in the assignment method see the same draws.

    Args:
        latents: scaled VAE latents, shape ``(B, C, H, W)``.
        noise_scheduler: a diffusers scheduler with ``add_noise`` and ``get_velocity`` (``DDPMScheduler``).
        prediction_type: ``"epsilon"`` or ``"v_prediction"``.
        assignment: keyword arguments of ``assign_noise`` (``method``, ``distance``, ...), e.g.
            ``immiscible_diffusers.training.assignment_kwargs(args)``.
        noise_offset: scale of the offset noise (https://www.crosslabs.org/blog/diffusion-with-offset-noise),
            added to the noise after the assignment; it is part of the target.
        input_perturbation: scale of the input perturbation (Ning et al., arXiv:2301.11706): extra noise
            in the noisy latents that the target does not contain.
        knn_generator: generator for the KNN candidates.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    _check_non_negative("noise_offset", noise_offset)
    _check_non_negative("input_perturbation", input_perturbation)
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
        raise ValueError(
            f"latents must be a (batch, channels, height, width) tensor, got "
            f"{tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__}"
        )
    if (
        isinstance(noise_scheduler, ImmiscibleNoiseScheduler)
        and noise_scheduler.config.drop_in_assignment
        and noise_scheduler.config.assignment != "none"
    ):
        # This function assigns the noise itself; a drop-in scheduler would assign the derived tensors
        # (offset, perturbation) a second time and pair the model input with other noise than the target.
        raise ValueError(
            "noise_scheduler is an immiscible drop-in scheduler, but prepare_noise_and_target assigns the noise "
            "itself: pass its stock scheduler (noise_scheduler.to_stock_scheduler()) or set drop_in_assignment=False"
        )
    batch, channels = latents.shape[:2]

    noise_before_assignment = torch.randn(latents.shape, dtype=latents.dtype, device=latents.device)

    # Immiscible Diffusion: pair the batch's noise with its latents before anything else touches it, so
    # that the assignment sees the Gaussian draw it was designed for (the authors' code does the same).
    start = time.perf_counter()
    assigned_noise, stats = assign_noise(
        latents, noise_before_assignment, **assignment, generator=knn_generator, return_stats=True
    )
    assign_seconds = time.perf_counter() - start

    noise = assigned_noise
    offset = None
    if noise_offset:
        offset = torch.randn((batch, channels, 1, 1), dtype=latents.dtype, device=latents.device)
        noise = noise + noise_offset * offset
    perturbation = None
    noising_noise = noise
    if input_perturbation:
        perturbation = torch.randn(latents.shape, dtype=latents.dtype, device=latents.device)
        noising_noise = noise + input_perturbation * perturbation

    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), device=latents.device)
    noisy_latents = noise_scheduler.add_noise(latents, noising_noise, timesteps)
    # The target is built from the assigned noise (with its offset) but never from the perturbation:
    # the model learns to remove the noise it was trained to expect, not the extra jitter.
    if prediction_type == "epsilon":
        target = noise
    else:
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    return NoisedLatents(
        noise_before_assignment=noise_before_assignment,
        assigned_noise=assigned_noise,
        offset=offset,
        perturbation=perturbation,
        noise=noise,
        timesteps=timesteps,
        noisy_latents=noisy_latents,
        target=target,
        assignment_stats=stats,
        assign_seconds=assign_seconds,
    )


def snr_weighted_mse(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    noise_scheduler,
    timesteps: torch.Tensor,
    prediction_type: str,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """The mean squared error, optionally weighted per sample by Min-SNR (Hang et al., arXiv:2303.09556).

    With ``snr_gamma`` each sample's error is weighted by ``min(SNR(t), gamma) / SNR(t)`` for epsilon
    prediction and ``min(SNR(t), gamma) / (SNR(t) + 1)`` for v-prediction, as diffusers' examples do.
    """
    if snr_gamma is None:
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    if not snr_gamma > 0:
        raise ValueError(f"snr_gamma must be > 0, got {snr_gamma!r}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    snr = compute_snr(noise_scheduler, timesteps)
    weights = snr.clamp(max=snr_gamma)
    weights = weights / snr if prediction_type == "epsilon" else weights / (snr + 1)
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    return (loss.mean(dim=list(range(1, loss.ndim))) * weights).mean()
