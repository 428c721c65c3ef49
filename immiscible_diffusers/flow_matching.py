"""Rectified-flow / flow-matching training helpers (the SD3 recipe) and the pipeline they train.

The path between an image ``x`` (sigma = 0) and Gaussian noise (sigma = 1) is the straight line
``x_sigma = (1 - sigma) * x + sigma * noise``; the model learns its velocity ``noise - x``. Immiscible
training assigns the batch's noise to its images first (``assign_noise``) and then builds *both* the
noisy input and the velocity target from the assigned noise (``flow_matching_inputs``).

Training sigmas are drawn as diffusers' SD3 scripts draw them (``--weighting_scheme``): a density over
``[0, 1]`` (``compute_density_for_timestep_sampling``) picks an index into the scheduler's grid of
``num_train_timesteps`` training sigmas, so ``FlowMatchEulerDiscreteScheduler``'s ``shift`` applies
to training as it does to sampling; the UNet's timestep is ``sigma * num_train_timesteps``.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling

from .model_index import name_as_shipped_code
from .pipeline_flow_matching import FlowMatchingPipeline
from .runs import RunInfo, SamplingOptions, load_unet, run_image_pipeline

__all__ = [
    "FlowMatchingPipeline",
    "WEIGHTING_SCHEMES",
    "flow_matching_inputs",
    "flow_matching_scheduler_config",
    "sample_flow_matching",
    "sample_training_sigmas",
    "save_flow_matching_pipeline",
    "training_sigma_grid",
    "validate_weighting_options",
]

# As diffusers' SD3 training scripts: `logit_normal` and `mode` shape how sigmas are drawn; `sigma_sqrt`
# and `cosmap` draw them uniformly and weight the loss instead; `none` is uniform and unweighted.
WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")
# The `mode` density maps u in [0, 1] onto [0, 1] monotonically only for scales in this range
# (the derivative -1 - s + (s * pi / 2) sin(pi u) must stay <= 0).
MODE_SCALE_RANGE = (-1.0, 2.0 / (math.pi - 2.0))
# The file `save_flow_matching_pipeline` copies next to the weights, for loading with plain diffusers.
PIPELINE_FILE = Path(__file__).with_name("pipeline_flow_matching.py")
PIPELINE_MODULE_NAME = "pipeline"


def validate_weighting_options(
    weighting_scheme: str, logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29
) -> None:
    """Raise ``ValueError`` for an unknown scheme or a setting that gives no valid sigma density."""
    if weighting_scheme not in WEIGHTING_SCHEMES:
        raise ValueError(f"weighting_scheme must be one of {WEIGHTING_SCHEMES}, got {weighting_scheme!r}")
    if not math.isfinite(logit_mean):
        raise ValueError(f"logit_mean must be a finite number, got {logit_mean!r}")
    if not (math.isfinite(logit_std) and logit_std > 0):
        raise ValueError(f"logit_std must be a finite number > 0, got {logit_std!r}")
    low, high = MODE_SCALE_RANGE
    if not (math.isfinite(mode_scale) and low <= mode_scale <= high):
        raise ValueError(
            f"mode_scale must lie in [{low}, {high:.4f}] (outside it the 'mode' density leaves [0, 1]), got "
            f"{mode_scale!r}"
        )


def training_sigma_grid(scheduler_config: dict[str, Any] | Any) -> torch.Tensor:
    """The ``num_train_timesteps`` training sigmas of a ``FlowMatchEulerDiscreteScheduler`` config, from 1 down.

    Built from the config rather than read off a scheduler object, because ``set_timesteps`` (called when
    sampling) replaces a scheduler's ``sigmas`` with the inference schedule.
    """
    config = dict(scheduler_config)
    if config.get("use_dynamic_shifting"):
        raise ValueError("use_dynamic_shifting=True has no fixed training sigmas; use a constant `shift`")
    return FlowMatchEulerDiscreteScheduler.from_config(config).sigmas.clone().float()


def sample_training_sigmas(
    sigma_grid: torch.Tensor,
    batch_size: int,
    weighting_scheme: str = "none",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    device: str | torch.device = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One training sigma per sample, shape ``(batch_size,)``, drawn as diffusers' SD3 scripts draw them.

    ``u`` in ``[0, 1]`` comes from the scheme's density; ``sigma_grid[int(u * N)]`` is the sigma (the
    grid runs from ``sigma_max`` down, so ``u`` near 0 is pure noise). ``u`` can round to exactly 1 in
    float32, so the index is clamped to the grid.
    """
    validate_weighting_options(weighting_scheme, logit_mean, logit_std, mode_scale)
    if sigma_grid.ndim != 1 or sigma_grid.numel() == 0:
        raise ValueError(f"sigma_grid must be a non-empty 1-d tensor, got shape {tuple(sigma_grid.shape)}")
    u = compute_density_for_timestep_sampling(
        weighting_scheme=weighting_scheme,
        batch_size=batch_size,
        logit_mean=logit_mean,
        logit_std=logit_std,
        mode_scale=mode_scale,
        device=device,
        generator=generator,
    )
    num_train_timesteps = sigma_grid.numel()
    indices = (u * num_train_timesteps).long().clamp_(0, num_train_timesteps - 1)
    return sigma_grid.to(device)[indices.to(device)]


def flow_matching_inputs(
    clean: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The noisy input ``(1 - sigma) * clean + sigma * noise`` and the velocity target ``noise - clean``.

    Pass the *assigned* noise: with immiscible training it is both what noises the images and what the
    target is made of. ``sigmas`` has one value per sample (shape ``(B,)``), broadcast over the rest.
    """
    if clean.shape != noise.shape:
        raise ValueError(f"noise must have the shape of clean {tuple(clean.shape)}, got {tuple(noise.shape)}")
    if sigmas.ndim != 1 or sigmas.shape[0] != clean.shape[0]:
        raise ValueError(f"sigmas must have shape ({clean.shape[0]},), got {tuple(sigmas.shape)}")
    sigmas = sigmas.to(clean.dtype).view(-1, *([1] * (clean.ndim - 1)))
    noisy = (1.0 - sigmas) * clean + sigmas * noise
    return noisy, noise - clean


def save_flow_matching_pipeline(pipeline: FlowMatchingPipeline, output_dir: str | os.PathLike) -> Path:
    """``save_pretrained`` the pipeline with its code beside it as ``pipeline.py``, named the diffusers way.

    ``model_index.json`` says ``"_class_name": ["pipeline", "FlowMatchingPipeline"]`` with the stock
    ``UNet2DModel`` and ``FlowMatchEulerDiscreteScheduler``; ``pipeline.py`` depends on torch and diffusers
    only. So ``DiffusionPipeline.from_pretrained(folder_or_repo, trust_remote_code=True)`` loads it without
    this package, locally and from the Hub, and ``FlowMatchingPipeline.from_pretrained(folder_or_repo)``
    loads it with this package's class (no remote code).
    """
    output_dir = Path(output_dir)
    pipeline.save_pretrained(output_dir)
    partial = output_dir / f"{PIPELINE_MODULE_NAME}.py.tmp"
    shutil.copyfile(PIPELINE_FILE, partial)
    os.replace(partial, output_dir / f"{PIPELINE_MODULE_NAME}.py")
    name_as_shipped_code(output_dir, PIPELINE_MODULE_NAME)
    return output_dir


# --------------------------------------------------------------------------------------------------
# Evaluation: a sampler for immiscible_diffusers.evaluate
# --------------------------------------------------------------------------------------------------


def flow_matching_scheduler_config(run: RunInfo, model_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The scheduler config to sample a flow-matching run's model with.

    In order: the ``scheduler/`` folder beside ``model_dir`` (every checkpoint of ``train_flow_matching.py``
    has one), the run's final ``scheduler/``, else rebuilt from the training settings
    (``num_train_timesteps``, ``flow_shift``).
    """
    folders = [Path(model_dir).parent / "scheduler"] if model_dir is not None else []
    folders.append(Path(run.run_dir) / "scheduler")
    for folder in folders:
        if (folder / "scheduler_config.json").is_file():
            return dict(FlowMatchEulerDiscreteScheduler.load_config(folder))
    if run.setting("num_train_timesteps") is None or run.setting("flow_shift") is None:
        raise ValueError(
            f"run {str(run.run_dir)!r} has no scheduler/ folder and no training config to rebuild its flow "
            "schedule from"
        )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=int(run.setting("num_train_timesteps")), shift=float(run.setting("flow_shift"))
    )
    return dict(scheduler.config)


def sample_flow_matching(run: RunInfo, model_dir: Path, options: SamplingOptions) -> torch.Tensor:
    """Euler sampling of a flow-matching UNet (``FlowMatchingPipeline``, ``num_inference_steps`` steps).

    A sampler for ``immiscible_diffusers.evaluate``: returns ``(N, C, H, W)`` float32 in ``[-1, 1]`` on the
    CPU, from a CPU generator seeded with ``options.seed`` (the same starting noise for every checkpoint).
    """
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(flow_matching_scheduler_config(run, model_dir))
    pipeline = FlowMatchingPipeline(unet=load_unet(model_dir, options.device), scheduler=scheduler)
    return run_image_pipeline(pipeline, options)
