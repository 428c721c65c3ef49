"""Consistency training (Song et al., 2023) with the improved recipe (iCT, Song & Dhariwal, 2023).

The pieces ``training_scripts/train_consistency.py`` is built from, each checked against what diffusers'
``ConsistencyModelPipeline`` and ``CMStochasticIterativeScheduler`` do at sampling time, so that a model
trained here samples correctly with the stock classes:

- ``karras_sigmas``: the noise levels ``sigma_min = s_1 < ... < s_N = sigma_max`` (Karras et al., rho = 7);
- ``discretization_steps``: iCT's curriculum N(k), which doubles the number of noise levels from ``s_0`` to
  ``s_1`` over training;
- ``ConsistencyDiscretization``: the levels of one curriculum stage with iCT's discretized lognormal
  probabilities of picking each adjacent pair and the loss weights ``1 / (sigma_{i+1} - sigma_i)``;
- ``add_noise`` / ``noisy_pair``: the teacher and student inputs ``x + sigma_i z`` and ``x + sigma_{i+1} z``
  built from ONE noise ``z`` per image (with immiscible diffusion, the assigned noise);
- ``consistency_function``: ``f(x, sigma) = c_skip x + c_out F(c_in x, c_noise)``, the parameterization of the
  stock scheduler (``f(x, sigma_min) = x`` exactly);
- ``pseudo_huber_distance``: iCT's ``sqrt(||a - b||^2 + c^2) - c``, ``c = 0.00054 sqrt(d)`` by default;
- ``sample_consistency``: the evaluator's sampler (one-step or multistep sampling of a saved model).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline

# The flag types once lived here; they are re-exported for code that imports them from this module.
from .runs import RunInfo, SamplingOptions, load_unet

SIGMA_DATA = 0.5  # the data standard deviation the stock scheduler assumes (images in [-1, 1])
HUBER_C_PER_SQRT_DIM = 0.00054  # iCT: c = 0.00054 sqrt(d)
_SIGMA_EPSILON = 1e-44  # the stock scheduler's guard in log(sigma)


# --------------------------------------------------------------------------------------------------
# Noise levels and the discretization curriculum
# --------------------------------------------------------------------------------------------------


def karras_sigmas(num_sigmas: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """``num_sigmas`` Karras noise levels in ``[sigma_min, sigma_max]``, ascending, as float64.

    The very values ``CMStochasticIterativeScheduler(num_train_timesteps=num_sigmas)`` holds (it stores them
    descending), so training and sampling use the same levels.
    """
    check_sigma_range(sigma_min, sigma_max, rho)
    if isinstance(num_sigmas, bool) or not isinstance(num_sigmas, int) or num_sigmas < 2:
        raise ValueError(f"num_sigmas must be an integer >= 2, got {num_sigmas!r}")
    # numpy, in the scheduler's order of operations, so the levels match it bit for bit.
    ramp = np.linspace(0, 1, num_sigmas)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    descending = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.from_numpy(descending[::-1].copy())


def check_sigma_range(sigma_min: float, sigma_max: float, rho: float = 7.0) -> None:
    """Raise ``ValueError`` unless ``0 < sigma_min < sigma_max`` and ``rho > 0`` (all finite)."""
    for name, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max), ("rho", rho)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    if sigma_min >= sigma_max:
        raise ValueError(
            f"sigma_min must be smaller than sigma_max, got sigma_min={sigma_min} >= sigma_max={sigma_max}"
        )


def check_curriculum(s_0: int, s_1: int, skip_steps: int = 1) -> None:
    """Raise ``ValueError`` unless ``1 <= s_0 <= s_1`` and ``1 <= skip_steps <= s_0`` (so every stage has a pair)."""
    for name, value in (("discretization_s_0", s_0), ("discretization_s_1", s_1), ("skip_steps", skip_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if s_0 > s_1:
        raise ValueError(
            f"discretization_s_0 must not exceed discretization_s_1 (the curriculum doubles s_0 up to s_1), "
            f"got s_0={s_0} > s_1={s_1}"
        )
    if skip_steps > s_0:
        raise ValueError(
            f"skip_steps must be at most discretization_s_0 (the first stage has s_0 + 1 = {s_0 + 1} noise levels), "
            f"got {skip_steps}"
        )


def discretization_steps(
    global_step: int, max_train_steps: int, s_0: int = 10, s_1: int = 1280, constant: bool = False
) -> int:
    """The number of noise levels at optimizer step ``global_step``: iCT's ``N(k) + 1``.

    ``N(k) = min(s_0 * 2^floor(k / K'), s_1)`` with ``K' = floor(K / (log2(floor(s_1 / s_0)) + 1))``: the
    discretization doubles every ``K'`` steps and reaches ``s_1`` for the last ``K'`` steps. ``K'`` is at least
    1 (a run shorter than the number of doublings goes through them one step at a time). ``constant`` keeps
    ``N = s_0`` throughout.
    """
    check_curriculum(s_0, s_1)
    if constant:
        return s_0 + 1
    if isinstance(max_train_steps, bool) or not isinstance(max_train_steps, int) or max_train_steps < 1:
        raise ValueError(f"max_train_steps must be an integer >= 1, got {max_train_steps!r}")
    stage_length = max(1, math.floor(max_train_steps / (math.log2(math.floor(s_1 / s_0)) + 1)))
    doublings = max(0, global_step) // stage_length
    if doublings >= math.ceil(math.log2(s_1 / s_0)) + 1:  # past s_1 (and no huge powers of two)
        return s_1 + 1
    return min(s_0 * 2**doublings, s_1) + 1


def lognormal_index_weights(
    sigmas: torch.Tensor, p_mean: float = -1.1, p_std: float = 2.0, skip_steps: int = 1
) -> torch.Tensor:
    """Unnormalised probabilities of training on the pair starting at each index ``i`` (iCT, Eq. 10).

    ``p(i)`` is the mass a lognormal ``ln(sigma) ~ N(p_mean, p_std^2)`` puts between ``sigma_i`` and
    ``sigma_{i+1}``, for ``i = 0 .. len(sigmas) - 1 - skip_steps``.
    """
    if not (math.isfinite(p_std) and p_std > 0):
        raise ValueError(f"p_std must be a positive finite number, got {p_std!r}")
    if not math.isfinite(p_mean):
        raise ValueError(f"p_mean must be a finite number, got {p_mean!r}")
    cdf = torch.special.erf((torch.log(sigmas.double()) - p_mean) / (math.sqrt(2.0) * p_std))
    return (cdf[1:] - cdf[:-1])[: len(sigmas) - skip_steps]


def consistency_loss_weights(sigmas: torch.Tensor, skip_steps: int = 1) -> torch.Tensor:
    """iCT's loss weights ``lambda(sigma_i) = 1 / (sigma_{i+skip} - sigma_i)`` for every valid pair index ``i``."""
    return 1.0 / (sigmas[skip_steps:] - sigmas[:-skip_steps])


@dataclass(frozen=True)
class ConsistencyDiscretization:
    """The noise levels of one curriculum stage and how training samples them.

    ``sigmas`` (ascending, float32) are the levels; pair ``i`` is the teacher level ``sigmas[i]`` and the
    student level ``sigmas[i + skip_steps]``, drawn with probability proportional to ``index_weights[i]``
    and weighted by ``loss_weights[i]``.
    """

    sigmas: torch.Tensor
    index_weights: torch.Tensor
    loss_weights: torch.Tensor
    skip_steps: int

    @property
    def num_sigmas(self) -> int:
        return len(self.sigmas)

    @classmethod
    def build(
        cls,
        num_sigmas: int,
        *,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        p_mean: float = -1.1,
        p_std: float = 2.0,
        skip_steps: int = 1,
        device: str | torch.device = "cpu",
    ) -> ConsistencyDiscretization:
        if isinstance(skip_steps, bool) or not isinstance(skip_steps, int) or not 1 <= skip_steps < num_sigmas:
            raise ValueError(
                f"skip_steps must be an integer in [1, {num_sigmas - 1}] for {num_sigmas} levels, got {skip_steps!r}"
            )
        sigmas = karras_sigmas(num_sigmas, sigma_min, sigma_max, rho)
        index_weights = lognormal_index_weights(sigmas, p_mean, p_std, skip_steps)
        if not bool(index_weights.sum() > 0):
            raise ValueError(
                f"p_mean={p_mean} and p_std={p_std} put no probability on the noise levels in "
                f"[{sigma_min}, {sigma_max}]; choose a p_mean near log(sigma) of the levels to train"
            )
        return cls(
            sigmas=sigmas.float().to(device),
            index_weights=index_weights.float().to(device),
            loss_weights=consistency_loss_weights(sigmas, skip_steps).float().to(device),
            skip_steps=skip_steps,
        )

    def sample_pairs(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw ``batch_size`` pair indices; return ``(indices, teacher_sigmas, student_sigmas)``."""
        indices = torch.multinomial(self.index_weights, batch_size, replacement=True, generator=generator)
        return indices, self.sigmas[indices], self.sigmas[indices + self.skip_steps]


# --------------------------------------------------------------------------------------------------
# Noising, the consistency function and the loss
# --------------------------------------------------------------------------------------------------


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(clean: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """``clean + sigma * noise`` with one ``sigma`` per sample (the variance-exploding forward process)."""
    return clean + _per_sample(sigmas, clean) * noise


def noisy_pair(
    clean: torch.Tensor, noise: torch.Tensor, teacher_sigmas: torch.Tensor, student_sigmas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher and student inputs of a consistency step, both from the SAME noise per image.

    They are two points of one trajectory ``x + sigma z``; with immiscible diffusion ``noise`` is the
    assigned noise, so the pairing chosen by the assignment holds at both noise levels.
    """
    return add_noise(clean, noise, teacher_sigmas), add_noise(clean, noise, student_sigmas)


def boundary_condition_scalings(
    sigmas: torch.Tensor, sigma_min: float = 0.002, sigma_data: float = SIGMA_DATA
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_skip, c_out)`` of the consistency parameterization (CM paper, Appendix C).

    ``c_skip = sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2)``,
    ``c_out = (sigma - sigma_min) sigma_data / sqrt(sigma^2 + sigma_data^2)``: the formulas of
    ``CMStochasticIterativeScheduler.get_scalings_for_boundary_condition``, so ``f(x, sigma_min) = x``.
    """
    c_skip = sigma_data**2 / ((sigmas - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigmas - sigma_min) * sigma_data / (sigmas**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def model_input_scaling(sigmas: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """``c_in = 1 / sqrt(sigma^2 + sigma_data^2)``, as the scheduler's ``scale_model_input``."""
    return 1.0 / (sigmas**2 + sigma_data**2) ** 0.5


def noise_conditioning(sigmas: torch.Tensor) -> torch.Tensor:
    """``c_noise = 250 log(sigma)``: the UNet's timestep input, as the scheduler's ``sigma_to_t``."""
    return 1000 * 0.25 * torch.log(sigmas + _SIGMA_EPSILON)


def consistency_function(
    unet: torch.nn.Module,
    noisy: torch.Tensor,
    sigmas: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    sigma_min: float = 0.002,
    sigma_data: float = SIGMA_DATA,
) -> torch.Tensor:
    """``f(x, sigma) = c_skip x + c_out F(c_in x, c_noise)``: the clean-image estimate of a consistency model.

    Exactly what ``ConsistencyModelPipeline`` computes in one step before the scheduler clips it to
    ``[-1, 1]``; ``sigmas`` holds one noise level per sample.
    """
    sigmas = sigmas.to(device=noisy.device, dtype=torch.float32)
    c_skip, c_out = boundary_condition_scalings(sigmas, sigma_min, sigma_data)
    c_in = model_input_scaling(sigmas, sigma_data)
    model_output = unet(_per_sample(c_in, noisy) * noisy, noise_conditioning(sigmas), class_labels=class_labels).sample
    return _per_sample(c_skip, noisy) * noisy + _per_sample(c_out, noisy) * model_output


def default_huber_c(num_dimensions: int) -> float:
    """iCT's pseudo-Huber constant ``0.00054 * sqrt(d)`` for samples of ``d`` values."""
    return HUBER_C_PER_SQRT_DIM * math.sqrt(num_dimensions)


def pseudo_huber_distance(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """Per-sample ``sqrt(||a - b||^2 + c^2) - c`` over all but the batch dimension (iCT's metric), in float32.

    Like L2 for differences much larger than ``c`` and like squared L2 (divided by ``2c``) below it.
    """
    if not (math.isfinite(c) and c > 0):
        raise ValueError(f"the pseudo-Huber constant c must be a positive finite number, got {c!r}")
    squared = (a.float() - b.float()).pow(2).reshape(a.shape[0], -1).sum(dim=1)
    return torch.sqrt(squared + c**2) - c


@torch.no_grad()
def update_teacher(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """``theta_teacher <- decay * theta_teacher + (1 - decay) * theta_student`` (the original CT's EMA teacher)."""
    for teacher_param, student_param in zip(teacher.parameters(), student.parameters(), strict=True):
        teacher_param.lerp_(student_param.detach(), 1.0 - decay)


# --------------------------------------------------------------------------------------------------
# Class labels (for --class_conditional)
# --------------------------------------------------------------------------------------------------


def infer_num_classes(dataset, label_column: str) -> int:
    """The number of classes of ``dataset[label_column]``: its ``ClassLabel`` size, else the largest label + 1.

    Raises ``ValueError`` for a missing column or labels that are not non-negative integers.
    """
    if label_column not in dataset.column_names:
        raise ValueError(
            f"--class_label_column {label_column!r} is not a column of the dataset; its columns are "
            f"{dataset.column_names}"
        )
    feature = dataset.features[label_column]
    if getattr(feature, "num_classes", None) is not None:
        return int(feature.num_classes)
    labels = dataset[label_column]
    if not labels or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in labels):
        raise ValueError(f"--class_label_column {label_column!r} must hold integer class labels >= 0")
    return max(labels) + 1


def with_image_and_label_transform(dataset, image_column: str, label_column: str | None, transform):
    """``dataset`` yielding ``{"input": tensor}`` (plus ``"class_labels"`` when ``label_column`` is given), lazily."""

    def transform_batch(examples: dict) -> dict:
        batch = {"input": [transform(image) for image in examples[image_column]]}
        if label_column is not None:
            batch["class_labels"] = [int(label) for label in examples[label_column]]
        return batch

    return dataset.with_transform(transform_batch)


# --------------------------------------------------------------------------------------------------
# Sampling a saved model (the evaluator's sampler)
# --------------------------------------------------------------------------------------------------


def consistency_scheduler_config(run: RunInfo) -> dict[str, Any]:
    """The run's saved ``scheduler/`` config, or one rebuilt from its training settings when none is saved yet."""
    if (run.run_dir / "scheduler" / "scheduler_config.json").is_file():
        return dict(CMStochasticIterativeScheduler.load_config(run.run_dir / "scheduler"))
    needed = ("sigma_min", "sigma_max", "rho", "discretization_s_1")
    if not all(run.setting(key) is not None for key in needed):
        raise ValueError(
            f"run {str(run.run_dir)!r} has no scheduler/ folder and no training config to rebuild its noise levels from"
        )
    num_sigmas = run.setting("num_discretization_steps") or run.setting("discretization_s_1") + 1
    scheduler = CMStochasticIterativeScheduler(
        num_train_timesteps=int(num_sigmas),
        sigma_min=run.setting("sigma_min"),
        sigma_max=run.setting("sigma_max"),
        rho=run.setting("rho"),
    )
    return dict(scheduler.config)


def sample_consistency(run: RunInfo, model_dir: str | os.PathLike, options: SamplingOptions) -> torch.Tensor:
    """Sample a consistency model with the stock ``ConsistencyModelPipeline``: ``num_inference_steps`` = 1 is one-step.

    Every checkpoint of a run is sampled with the run's final scheduler (the same noise levels), from a CPU
    generator seeded with ``options.seed``; a class-conditional model gets the balanced labels
    ``0, 1, ..., num_classes - 1, 0, 1, ...``. Returns ``(N, C, H, W)`` float32 in ``[-1, 1]`` on the CPU.
    """
    scheduler = CMStochasticIterativeScheduler.from_config(consistency_scheduler_config(run))
    if options.num_inference_steps > scheduler.config.num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must be at most the run's {scheduler.config.num_train_timesteps} noise levels, "
            f"got {options.num_inference_steps} (consistency models sample in 1 or a few steps)"
        )
    unet = load_unet(model_dir, options.device)
    pipeline = ConsistencyModelPipeline(unet=unet, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    num_classes = unet.config.num_class_embeds
    generator = torch.Generator("cpu").manual_seed(options.seed)
    batches = []
    with torch.no_grad():
        for start in range(0, options.num_images, options.batch_size):
            size = min(options.batch_size, options.num_images - start)
            labels = torch.arange(start, start + size) % num_classes if num_classes else None
            images = pipeline(
                batch_size=size,
                class_labels=labels,
                num_inference_steps=options.num_inference_steps,
                generator=generator,
                output_type="pt",
            ).images
            batches.append(images.float().cpu() * 2.0 - 1.0)  # the pipeline returns [0, 1]
    return torch.cat(batches)
