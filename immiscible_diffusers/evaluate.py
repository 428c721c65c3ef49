"""Evaluate training runs: sample every checkpoint with a fixed seed, score the samples, plot quality vs step.

    python -m immiscible_diffusers.evaluate RUN_DIR [RUN_DIR ...] --output_dir eval \\
        --num_inference_steps 1 2 4 8 50 --num_samples 450

A run folder is what a training script of this package writes to its ``--output_dir``: ``checkpoint-<step>/``
folders holding ``unet/`` (and ``unet_ema/``), the final pipeline (``model_index.json``, ``unet/``,
``scheduler/``), ``training_config.json`` and ``train_log.csv``. Every checkpoint is sampled from the same
starting noise (``--seed``), so differences between checkpoints and between runs are the models'. With
several ``--num_inference_steps`` every checkpoint is scored at each (the NFE axis: the number of model
evaluations per sample, one per step for every sampler here), again from the same starting noise.

Few-step sampling spends every step: DDIM uses ``timestep_spacing="trailing"`` (the first step starts from
pure noise at t = T-1; diffusers' default "leading" starts 1-step sampling at t = 0), flow-matching Euler
uses uniform sigmas ``1, (n-1)/n, ..., 1/n`` then 0 (``uniform_sigma_schedule``; the stock spacing ends
at ``1/N_train`` so 2 steps equal 1), and the consistency sampler uses diffusers' multistep schedule.

Metrics (``--metrics``; by default ``digits_fd`` for runs on the bundled digits and ``fid`` otherwise):

- ``digits_fd``: the Fréchet distance in the feature space of a small digits classifier (see
  ``immiscible_diffusers.metrics``) to held-out real digits. Runs offline.
- ``fid``: FID with the standard Inception features; needs ``--inception_weights`` and ``--fid_reference``
  (an ``.npz`` of precomputed ``mu``/``sigma``, a folder of images, or a dataset name).

Beside the curve the evaluator reports two anchors per metric: the *floor* (real images scored like a
model's samples) and the *ceiling* (pure Gaussian noise). The training loss is copied into the CSV for
reference only: assigned noise is partly predictable from the image, so the loss of an immiscible run
falls without its samples getting better.

How a run is sampled depends on what it is: ``SAMPLERS`` maps a sampler name to a function, and each
sampler lists the saved pipeline classes (``model_index.json``'s ``_class_name``) it can sample.
``DEFAULT_SAMPLERS`` picks one per pipeline class. Add a sampler with ``register_sampler``. These live in
``immiscible_diffusers.runs`` (shared with the recipe modules' samplers) and are importable from here too.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler
from matplotlib.figure import Figure
from PIL import Image
from tqdm.auto import tqdm

from .arguments import add_debug_arg
from .consistency import sample_consistency
from .data import DIGITS_DATASET_NAME, load_image_dataset
from .errors import run_entry_point
from .flow_matching import sample_flow_matching
from .metrics import (
    DigitsFeatureSpace,
    GaussianStatistics,
    InceptionFeatureSpace,
    frechet_distance_between,
    real_digits,
)
from .model_card import record_scores_in_card
from .runs import (
    DEFAULT_SAMPLERS,  # noqa: F401 - re-exported: the evaluator's public names, where users import them
    SAMPLERS,
    SCRIPT_PIPELINES,  # noqa: F401
    RunInfo,
    SampleFunction,  # noqa: F401
    Sampler,
    SamplingOptions,
    load_unet,
    read_run,
    register_sampler,
    resolve_device,
    resolve_sampler,
    run_image_pipeline,
)
from .training import TRAIN_LOG_NAME, image_grid, list_checkpoints, read_train_log

RESULTS_CSV = "quality.csv"
RESULTS_MARKDOWN = "quality.md"
RESULTS_PLOT = "quality.png"
RESULTS_JSON = "evaluation.json"
METRICS = ("digits_fd", "fid")
METRIC_LABELS = {
    "digits_fd": "Fréchet distance (digits classifier features)",
    "fid": "FID (Inception features)",
}
# The training loss shown beside the metric is the mean over this many steps before the checkpoint.
LOSS_WINDOW = 50


# --------------------------------------------------------------------------------------------------
# Runs and checkpoints
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """One model to evaluate: the weights folder, the training step, and which weights (``ema`` or ``raw``)."""

    step: int
    model_dir: Path
    weights: str
    source: str


def find_checkpoints(run: RunInfo, use_ema: bool = True, include_final: bool = True) -> list[Checkpoint]:
    """Every ``checkpoint-<step>`` of a run (its ``unet_ema/`` when ``use_ema`` and present, else ``unet/``).

    With ``include_final``, the final pipeline's ``unet/`` is added at the run's ``global_step`` unless a
    checkpoint of that step exists (the final UNet holds the EMA weights when the run used EMA).
    """
    found = []
    for step, path in list_checkpoints(run.run_dir):
        if use_ema and (path / "unet_ema" / "config.json").is_file():
            found.append(Checkpoint(step, path / "unet_ema", "ema", path.name))
        elif (path / "unet" / "config.json").is_file():
            found.append(Checkpoint(step, path / "unet", "raw", path.name))
    final_step = run.setting("global_step")
    if include_final and final_step is not None and (run.run_dir / "unet" / "config.json").is_file():
        if all(c.step != int(final_step) for c in found):
            weights = "ema" if run.setting("use_ema") else "raw"
            found.append(Checkpoint(int(final_step), run.run_dir / "unet", weights, "final"))
    return sorted(found, key=lambda c: c.step)


# --------------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------------


def _ddpm_family_scheduler_config(run: RunInfo) -> dict[str, Any]:
    """The run's noise-schedule config (``scheduler/``), rebuilt from its training flags when not saved yet."""
    if (run.run_dir / "scheduler" / "scheduler_config.json").is_file():
        return dict(DDPMScheduler.load_config(run.run_dir / "scheduler"))
    keys = {
        "ddpm_num_steps": "num_train_timesteps",
        "ddpm_beta_schedule": "beta_schedule",
        "prediction_type": "prediction_type",
    }
    if not all(run.setting(key) is not None for key in keys):
        raise ValueError(
            f"run {str(run.run_dir)!r} has no scheduler/ folder and no training config to rebuild its noise "
            "schedule from"
        )
    return dict(DDPMScheduler(**{name: run.setting(key) for key, name in keys.items()}).config)


def sample_ddpm(run: RunInfo, model_dir: Path, options: SamplingOptions) -> torch.Tensor:
    """Ancestral DDPM sampling with ``DDPMPipeline`` (``num_inference_steps`` evenly spaced timesteps)."""
    scheduler = DDPMScheduler.from_config(_ddpm_family_scheduler_config(run))
    pipeline = DDPMPipeline(unet=load_unet(model_dir, options.device), scheduler=scheduler)
    return run_image_pipeline(pipeline, options)


# DDIM's spacing for few-step sampling: "trailing" starts at t = T-1 and spends every step; "leading"
# (diffusers' default) starts 1-step sampling at t = 0, i.e. returns the starting noise almost unchanged.
DDIM_TIMESTEP_SPACING = "trailing"


def sample_ddim(run: RunInfo, model_dir: Path, options: SamplingOptions) -> torch.Tensor:
    """Deterministic DDIM sampling (eta = 0, ``DDIM_TIMESTEP_SPACING``): only the starting noise is random."""
    config = {key: value for key, value in _ddpm_family_scheduler_config(run).items() if key != "_use_default_values"}
    scheduler = DDIMScheduler.from_config(config, timestep_spacing=DDIM_TIMESTEP_SPACING)
    pipeline = DDIMPipeline(unet=load_unet(model_dir, options.device), scheduler=scheduler)
    return run_image_pipeline(pipeline, options, eta=0.0)


register_sampler(
    Sampler("ddpm", sample_ddpm, ("DDPMPipeline", "DDIMPipeline"), "DDPM ancestral sampling"),
)
register_sampler(
    Sampler("ddim", sample_ddim, ("DDPMPipeline", "DDIMPipeline"), "DDIM, eta=0, trailing timesteps"),
    default_for=("DDPMPipeline", "DDIMPipeline"),
)


register_sampler(
    Sampler(
        "consistency",
        sample_consistency,
        ("ConsistencyModelPipeline",),
        "ConsistencyModelPipeline; --num_inference_steps 1 = one-step sampling",
    ),
    default_for=("ConsistencyModelPipeline",),
)


register_sampler(
    Sampler(
        "flow_euler",
        sample_flow_matching,
        ("FlowMatchingPipeline",),
        "Euler ODE (FlowMatchEulerDiscreteScheduler), uniform sigmas 1..1/n then 0",
    ),
    default_for=("FlowMatchingPipeline",),
)


# --------------------------------------------------------------------------------------------------
# Metrics with their anchors
# --------------------------------------------------------------------------------------------------


class DigitsFrechetMetric:
    """Fréchet distance in the digits classifier's feature space to the held-out reference digits.

    Protocol: the classifier is trained on a seeded half of the 1,797 digits; the other half is split into
    the *reference* set (its statistics are the target) and the *floor* set. The training scripts' digits
    default trains on all 1,797 digits, so the diffusion model may have seen the reference digits: this
    measures fit to the data distribution, not generalisation. Real digits go through the training
    transform at the run's resolution and back to 8x8, exactly as samples do.
    """

    name = "digits_fd"

    def __init__(self, space: DigitsFeatureSpace | None = None, seed: int = 0, progress: bool = True) -> None:
        self.space = space or DigitsFeatureSpace.load(progress=progress)
        self.seed = seed
        self._reference: dict[tuple[int, int], tuple[GaussianStatistics, torch.Tensor]] = {}

    def check_run(self, run: RunInfo) -> None:
        if run.dataset != DIGITS_DATASET_NAME:
            raise ValueError(
                f"--metrics digits_fd needs runs trained on the bundled digits ({DIGITS_DATASET_NAME!r}); run "
                f"{str(run.run_dir)!r} was trained on {run.dataset!r} (use --metrics fid)"
            )

    def _real(self, resolution: int, num_channels: int) -> tuple[GaussianStatistics, torch.Tensor]:
        key = (resolution, num_channels)
        if key not in self._reference:
            images, _ = real_digits(resolution, num_channels)
            split = self.space.split
            reference = GaussianStatistics.from_features(self.space.features(images[split.reference]))
            self._reference[key] = (reference, images[split.floor])
        return self._reference[key]

    def score(self, images: torch.Tensor) -> float:
        reference, _ = self._real(images.shape[-1], images.shape[1])
        return frechet_distance_between(GaussianStatistics.from_features(self.space.features(images)), reference)

    def anchors(self, resolution: int, num_channels: int, num_samples: int) -> dict[str, tuple[float, int]]:
        """``{"floor": (value, n), "ceiling": (value, n)}``: held-out real digits and Gaussian noise, scored
        as samples."""
        _, floor_images = self._real(resolution, num_channels)
        floor_count = min(num_samples, len(floor_images))
        generator = torch.Generator().manual_seed(self.seed)
        floor_subset = floor_images[torch.randperm(len(floor_images), generator=generator)[:floor_count]]
        noise = torch.randn((num_samples, num_channels, resolution, resolution), generator=generator).clamp(-1, 1)
        return {"floor": (self.score(floor_subset), floor_count), "ceiling": (self.score(noise), num_samples)}

    def describe(self) -> dict[str, Any]:
        split = self.space.split
        return {
            "metric": self.name,
            "classifier_test_accuracy": self.space.test_accuracy,
            "classifier_cache": str(self.space.cache_path) if self.space.cache_path else None,
            "classifier_train_digits": len(split.classifier_train),
            "reference_digits": len(split.reference),
            "floor_digits": len(split.floor),
            "feature_dim": self.space.config.feature_dim,
        }


class InceptionFrechetMetric:
    """FID with torch-fidelity's InceptionV3 against precomputed statistics or a set of reference images."""

    name = "fid"

    def __init__(
        self,
        inception_weights: str | os.PathLike | None,
        reference: str | os.PathLike | None,
        reference_column: str = "image",
        max_reference_images: int | None = None,
        device: str = "cpu",
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        if reference is None:
            raise ValueError(
                "--metrics fid needs --fid_reference: an .npz with 'mu' and 'sigma', a folder of images, or a "
                "dataset name"
            )
        self.space = InceptionFeatureSpace(inception_weights, device=device)
        self.reference_source = str(reference)
        self.seed = seed
        self.reference_images: torch.Tensor | None = None
        if str(reference).endswith(".npz"):
            self.reference = GaussianStatistics.load(reference)
        else:
            self.reference_images = _load_reference_images(reference, reference_column, max_reference_images, seed)
            self.reference = GaussianStatistics.from_features(self.space.features(self.reference_images))
            if cache_dir is not None:
                self.reference.save(Path(cache_dir) / "fid_reference_stats.npz")

    def check_run(self, run: RunInfo) -> None:
        pass

    def score(self, images: torch.Tensor) -> float:
        return frechet_distance_between(GaussianStatistics.from_features(self.space.features(images)), self.reference)

    def anchors(self, resolution: int, num_channels: int, num_samples: int) -> dict[str, tuple[float, int]]:
        """Noise always; the floor only when the reference is images (they are part of the reference, so it is
        optimistic)."""
        generator = torch.Generator().manual_seed(self.seed)
        noise = torch.randn((num_samples, num_channels, resolution, resolution), generator=generator).clamp(-1, 1)
        result = {"ceiling": (self.score(noise), num_samples)}
        if self.reference_images is not None:
            count = min(num_samples, len(self.reference_images))
            subset = self.reference_images[torch.randperm(len(self.reference_images), generator=generator)[:count]]
            result["floor"] = (self.score(subset), count)
        return result

    def describe(self) -> dict[str, Any]:
        return {
            "metric": self.name,
            "inception_weights": str(self.space.weights_path),
            "fid_reference": self.reference_source,
            "reference_count": self.reference.count,
        }


def _load_reference_images(source, image_column: str, max_images: int | None, seed: int) -> torch.Tensor:
    """Reference images in ``[-1, 1]`` at their own size (RGB), from a folder of images or a dataset name."""
    if os.path.isdir(source) and not (Path(source) / "dataset_info.json").is_file():
        dataset = load_image_dataset(train_data_dir=str(source), image_column=image_column)
    else:
        dataset = load_image_dataset(dataset_name=str(source), image_column=image_column)
    if max_images is not None and max_images < len(dataset):
        dataset = dataset.shuffle(seed=seed).select(range(max_images))
    arrays = [
        np.asarray(image.convert("RGB"), dtype=np.float32) for image in tqdm(dataset[image_column], desc="reference")
    ]
    sizes = {array.shape for array in arrays}
    if len(sizes) > 1:
        raise ValueError(f"--fid_reference images must all have one size, found {sorted(sizes)[:4]}; resize them first")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).div(127.5).sub(1.0)


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


@dataclass
class EvaluationResults:
    """Scores of every (run, checkpoint, metric), the anchors, and the settings they were made with."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    anchors: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    metric_info: list[dict[str, Any]] = field(default_factory=list)

    def metrics(self) -> list[str]:
        return list(dict.fromkeys(row["metric"] for row in self.rows))

    def nfes(self) -> list[int]:
        """The evaluated numbers of model evaluations per sample, ascending."""
        return sorted({int(row["nfe"]) for row in self.rows})

    def curves(self, metric: str, nfe: int | None = None) -> dict[str, list[tuple[int, float]]]:
        """``{run label: [(step, value), ...]}`` for one metric at one NFE, steps ascending.

        ``nfe`` may be left out only when a single NFE was evaluated.
        """
        if nfe is None:
            if len(self.nfes()) > 1:
                raise ValueError(f"these results hold several NFEs {self.nfes()}: pass nfe=")
            nfe = self.nfes()[0] if self.rows else None
        curves: dict[str, list[tuple[int, float]]] = {}
        for row in self.rows:
            if row["metric"] == metric and row["nfe"] == nfe:
                curves.setdefault(row["run"], []).append((row["step"], row["value"]))
        return {label: sorted(points) for label, points in curves.items()}

    def final_by_nfe(self, metric: str) -> dict[str, list[tuple[int, float]]]:
        """``{run label: [(nfe, value), ...]}``: quality vs NFE at each run's last evaluated checkpoint."""
        last = {}
        for row in self.rows:
            if row["metric"] == metric:
                last[row["run"]] = max(last.get(row["run"], row["step"]), row["step"])
        by_run: dict[str, list[tuple[int, float]]] = {}
        for row in self.rows:
            if row["metric"] == metric and row["step"] == last[row["run"]]:
                by_run.setdefault(row["run"], []).append((row["nfe"], row["value"]))
        return {label: sorted(points) for label, points in by_run.items()}


def mean_train_loss(run: RunInfo, step: int, window: int = LOSS_WINDOW) -> float | None:
    """Mean training loss over the ``window`` logged steps up to ``step`` (None without a train log)."""
    path = run.run_dir / TRAIN_LOG_NAME
    if not path.is_file():
        return None
    losses = [float(row["loss"]) for row in read_train_log(path) if step - window < int(row["step"]) <= step]
    return float(np.mean(losses)) if losses else None


def build_metric(name: str, **kwargs: Any):
    """The metric object for ``name`` (``digits_fd`` or ``fid``); ``kwargs`` go to its constructor."""
    if name == "digits_fd":
        allowed = {"space", "seed", "progress"}
        return DigitsFrechetMetric(**{k: v for k, v in kwargs.items() if k in allowed})
    if name == "fid":
        allowed = {
            "inception_weights",
            "reference",
            "reference_column",
            "max_reference_images",
            "device",
            "seed",
            "cache_dir",
        }
        return InceptionFrechetMetric(**{k: v for k, v in kwargs.items() if k in allowed})
    raise ValueError(f"metric must be one of {METRICS}, got {name!r}")


def default_metric(runs: Sequence[RunInfo]) -> str:
    """``digits_fd`` when every run trained on the bundled digits, else ``fid``."""
    return "digits_fd" if all(run.dataset == DIGITS_DATASET_NAME for run in runs) else "fid"


def evaluate_runs(
    run_dirs: Sequence[str | os.PathLike],
    *,
    labels: Sequence[str] | None = None,
    metrics: Sequence[str] | Sequence[Any] | None = None,
    scheduler: str | None = None,
    num_inference_steps: int | Sequence[int] = 50,
    num_samples: int = 450,
    seed: int = 0,
    batch_size: int = 256,
    use_ema: bool = True,
    include_final: bool = True,
    steps: Sequence[int] | None = None,
    device: str | None = None,
    progress: bool = True,
    save_samples_dir: str | os.PathLike | None = None,
    **metric_kwargs: Any,
) -> EvaluationResults:
    """Sample every checkpoint of every run and score the samples.

    Args:
        run_dirs: training runs' output folders.
        labels: names for the runs in tables and plots (default: the folder names).
        metrics: metric names (``"digits_fd"``, ``"fid"``) or metric objects; default: ``default_metric``.
        scheduler: sampler name from ``SAMPLERS`` (default: the one for each run's pipeline class).
        num_inference_steps: a step count or several (the NFE sweep): every checkpoint is scored at each.
        num_samples, seed, batch_size: how to sample; the same ``seed`` gives every checkpoint of every
            run, at every step count, the same starting noise.
        use_ema: sample a checkpoint's ``unet_ema/`` when it has one.
        include_final: also evaluate the final pipeline's ``unet/`` when no checkpoint has its step.
        steps: evaluate only checkpoints at these steps.
        save_samples_dir: save a grid of the first 64 samples of each checkpoint there.
        metric_kwargs: passed to the metric constructors (``inception_weights``, ``reference``, ...).
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples must be an integer >= 2 (a covariance needs two samples), got {num_samples!r}")
    step_counts = [num_inference_steps] if isinstance(num_inference_steps, int) else list(num_inference_steps)
    if not step_counts or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in step_counts):
        raise ValueError(f"num_inference_steps must be positive integers, got {num_inference_steps!r}")
    if len(set(step_counts)) != len(step_counts):
        raise ValueError(f"num_inference_steps must be distinct, got {step_counts}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not run_dirs:
        raise ValueError("run_dirs must name at least one run folder")
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"labels must have one entry per run ({len(run_dirs)}), got {len(labels)}")
    device = resolve_device(device)
    runs = [read_run(path, labels[i] if labels else None) for i, path in enumerate(run_dirs)]
    if len({run.label for run in runs}) != len(runs):
        raise ValueError(f"run labels must be unique, got {[run.label for run in runs]} (pass labels=...)")
    metric_objects = [
        build_metric(m, seed=seed, device=device, **metric_kwargs) if isinstance(m, str) else m
        for m in (metrics or [default_metric(runs)])
    ]
    for metric in metric_objects:
        for run in runs:
            metric.check_run(run)
    plan = []
    for run in runs:
        sampler = resolve_sampler(run, scheduler)
        checkpoints = find_checkpoints(run, use_ema=use_ema, include_final=include_final)
        if steps is not None:
            checkpoints = [c for c in checkpoints if c.step in set(steps)]
        if not checkpoints:
            raise ValueError(f"run {str(run.run_dir)!r} has no checkpoint to evaluate (no checkpoint-<step>/unet)")
        plan.extend((run, sampler, checkpoint) for checkpoint in checkpoints)

    results = EvaluationResults(
        settings={
            "num_samples": num_samples,
            "num_inference_steps": step_counts,
            "seed": seed,
            "batch_size": batch_size,
            "use_ema": use_ema,
            "device": device,
            "scheduler": scheduler,
        },
        metric_info=[metric.describe() for metric in metric_objects],
    )
    shapes: set[tuple[int, int]] = set()
    bar = tqdm([(*item, n) for item in plan for n in step_counts], desc="evaluating checkpoints", disable=not progress)
    for run, sampler, checkpoint, steps_count in bar:
        bar.set_postfix(run=run.label, step=checkpoint.step, nfe=steps_count)
        options = SamplingOptions(num_samples, steps_count, seed, batch_size, device, progress)
        images = sampler.sample(run, checkpoint.model_dir, options)
        shapes.add((images.shape[-1], images.shape[1]))
        if save_samples_dir is not None:
            suffix = "" if len(step_counts) == 1 else f"_nfe{steps_count}"
            _save_grid(images[:64], Path(save_samples_dir) / run.label / f"step_{checkpoint.step:06d}{suffix}.png")
        loss = mean_train_loss(run, checkpoint.step)
        for metric in metric_objects:
            results.rows.append(
                {
                    "run": run.label,
                    "run_dir": str(run.run_dir),
                    "assignment": run.assignment,
                    "seed": run.seed,
                    "step": checkpoint.step,
                    "checkpoint": checkpoint.source,
                    "weights": checkpoint.weights,
                    "sampler": sampler.name,
                    "num_inference_steps": steps_count,
                    # Model evaluations per sample: one per step for every registered sampler.
                    "nfe": steps_count,
                    "num_samples": num_samples,
                    "metric": metric.name,
                    "value": metric.score(images),
                    "train_loss": loss,
                }
            )
    for metric in metric_objects:
        for resolution, channels in sorted(shapes):
            for anchor, (value, count) in metric.anchors(resolution, channels, num_samples).items():
                results.anchors.append(
                    {
                        "metric": metric.name,
                        "resolution": resolution,
                        "channels": channels,
                        "anchor": anchor,
                        "value": value,
                        "num_samples": count,
                    }
                )
    return results


def _save_grid(images: torch.Tensor, path: Path) -> None:
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    mode = "L" if pixels.shape[-1] == 1 else "RGB"
    tiles = [Image.fromarray(p[..., 0] if mode == "L" else p, mode=mode) for p in pixels]
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(tiles).save(path)


# --------------------------------------------------------------------------------------------------
# Writing results
# --------------------------------------------------------------------------------------------------

CSV_COLUMNS = (
    "run",
    "run_dir",
    "assignment",
    "seed",
    "step",
    "checkpoint",
    "weights",
    "sampler",
    "num_inference_steps",
    "nfe",
    "num_samples",
    "metric",
    "value",
    "train_loss",
)


def write_csv(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike, columns: Sequence[str]) -> Path:
    """Write ``rows`` to ``path`` atomically (values missing from a row stay empty)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    with open(partial, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: ("" if row.get(key) is None else row.get(key)) for key in columns})
    os.replace(partial, path)
    return path


def _format(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def results_markdown(results: EvaluationResults) -> str:
    """Per metric: a table per NFE (a row per evaluated step, a column per run), quality vs NFE at the
    last checkpoint when several NFEs were evaluated, then the anchors."""
    lines = []
    nfes = results.nfes()
    for metric in results.metrics():
        lines += [f"### {METRIC_LABELS.get(metric, metric)} (lower is better)", ""]
        if len(nfes) > 1:
            final = results.final_by_nfe(metric)
            labels = list(final)
            lines += ["Quality vs NFE (model evaluations per sample) at each run's last checkpoint:", ""]
            lines.append("| NFE | " + " | ".join(labels) + " |")
            lines.append("|---:|" + "---:|" * len(labels))
            for nfe in nfes:
                lines.append(
                    f"| {nfe} | " + " | ".join(_format(dict(final[label]).get(nfe)) for label in labels) + " |"
                )
            lines.append("")
        lines.append("| step | NFE | " + " | ".join(dict.fromkeys(row["run"] for row in results.rows)) + " |")
        labels = list(dict.fromkeys(row["run"] for row in results.rows))
        lines.append("|---:|---:|" + "---:|" * len(labels))
        for nfe in nfes:
            curves = results.curves(metric, nfe)
            all_steps = sorted({step for points in curves.values() for step, _ in points})
            for step in all_steps:
                cells = [_format(dict(curves.get(label, [])).get(step)) for label in labels]
                lines.append(f"| {step} | {nfe} | " + " | ".join(cells) + " |")
        anchors = [a for a in results.anchors if a["metric"] == metric]
        if anchors:
            lines.append("")
            lines.append(
                "Anchors: "
                + "; ".join(
                    f"{a['anchor']} {_format(a['value'])} ({a['resolution']}x{a['resolution']}, n={a['num_samples']})"
                    for a in anchors
                )
                + " — floor: held-out real images scored as samples; ceiling: pure Gaussian noise."
            )
        lines.append("")
    settings = results.settings
    step_counts = settings.get("num_inference_steps")
    step_counts = ", ".join(map(str, step_counts)) if isinstance(step_counts, (list, tuple)) else step_counts
    lines.append(
        f"Sampler: {settings.get('scheduler') or 'default'} with {step_counts} steps, "
        f"{settings.get('num_samples')} samples per checkpoint, seed {settings.get('seed')}"
        f"{', EMA weights where saved' if settings.get('use_ema') else ''}."
    )
    for info in results.metric_info:
        if info.get("metric") == "digits_fd":
            lines.append(
                f"Digits classifier: test accuracy {info['classifier_test_accuracy']:.4f} on "
                f"{info['reference_digits'] + info['floor_digits']} held-out digits "
                f"(trained on {info['classifier_train_digits']})."
            )
    return "\n".join(lines) + "\n"


def plot_quality_curves(
    results: EvaluationResults, path: str | os.PathLike, title: str | None = None, log_scale: bool = True
) -> Path:
    """Per metric: quality vs training step (a line per run and NFE) and, with several NFEs, quality vs NFE
    at each run's last checkpoint; anchors as dashed lines."""
    metrics = results.metrics()
    if not metrics:
        raise ValueError("results hold no scores to plot")
    nfes = results.nfes()
    columns = 2 if len(nfes) > 1 else 1
    # The object-oriented Figure needs no pyplot backend and leaves no global figure behind.
    figure = Figure(figsize=(6.5 * columns, 4.5 * len(metrics)))
    axes = figure.subplots(len(metrics), columns, squeeze=False)
    labels = list(dict.fromkeys(row["run"] for row in results.rows))
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    styles = ["-", "--", ":", "-.", (0, (5, 1)), (0, (1, 3)), (0, (3, 1, 1, 1))]
    for row_axes, metric in zip(axes, metrics):
        axis = row_axes[0]
        for index, nfe in enumerate(nfes):
            for label, points in results.curves(metric, nfe).items():
                steps, values = zip(*points)
                axis.plot(
                    steps,
                    values,
                    marker="o",
                    markersize=3,
                    color=colors[label],
                    linestyle=styles[index % len(styles)],
                    label=label if len(nfes) == 1 else f"{label}, NFE {nfe}",
                )
        if columns == 2:
            nfe_axis = row_axes[1]
            for label, points in results.final_by_nfe(metric).items():
                counts, values = zip(*points)
                nfe_axis.plot(counts, values, marker="o", markersize=4, color=colors[label], label=label)
            nfe_axis.set_xscale("log", base=2)
            nfe_axis.set_xticks(nfes, [str(n) for n in nfes])
            nfe_axis.set_xlabel("NFE (model evaluations per sample)")
            nfe_axis.set_title("quality vs NFE at the last checkpoint", fontsize=9)
        for anchor in (a for a in results.anchors if a["metric"] == metric):
            style = {"floor": ("tab:green", "--"), "ceiling": ("tab:red", ":")}.get(anchor["anchor"], ("gray", "-."))
            axis.axhline(
                anchor["value"],
                color=style[0],
                linestyle=style[1],
                linewidth=1,
                label=f"{anchor['anchor']} ({anchor['resolution']}px): {anchor['value']:.1f}",
            )
            if columns == 2:
                row_axes[1].axhline(anchor["value"], color=style[0], linestyle=style[1], linewidth=1)
        axis.set_xlabel("training step")
        if columns == 2:
            axis.set_title("quality vs training step, per NFE", fontsize=9)
        for panel in row_axes:
            panel.set_ylabel(METRIC_LABELS.get(metric, metric) + " ↓")
            if log_scale:
                panel.set_yscale("log")
            panel.grid(alpha=0.3)
            panel.legend(fontsize=7)
    figure.suptitle(title or "Sample quality vs training step")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def write_results(results: EvaluationResults, output_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``quality.csv``, ``quality.md``, ``quality.png`` and ``evaluation.json`` to ``output_dir``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": write_csv(results.rows, output_dir / RESULTS_CSV, CSV_COLUMNS)}
    markdown = output_dir / RESULTS_MARKDOWN
    markdown.write_text(results_markdown(results))
    paths["markdown"] = markdown
    paths["plot"] = plot_quality_curves(results, output_dir / RESULTS_PLOT)
    summary = {
        "settings": results.settings,
        "metrics": results.metric_info,
        "anchors": results.anchors,
        "rows": results.rows,
    }
    json_path = output_dir / RESULTS_JSON
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    paths["json"] = json_path
    return paths


def add_metrics_to_model_cards(results: EvaluationResults, run_dirs: Sequence[str | os.PathLike]) -> None:
    """Record each run's last evaluated scores in its model card: ``immiscible_diffusers: metrics:`` and
    ``model-index`` (what the Hub shows as evaluation results)."""
    by_folder: dict[str, list[dict[str, Any]]] = {}
    for row in results.rows:
        by_folder.setdefault(row["run_dir"], []).append(row)
    for run_dir in run_dirs:
        card_path = Path(run_dir) / "README.md"
        rows = by_folder.get(str(Path(run_dir)))
        if not rows or not card_path.is_file():
            continue
        last_step = max(row["step"] for row in rows)
        # The headline score is the one with the most sampling steps; every NFE's score is kept in by_nfe.
        rows = sorted((row for row in rows if row["step"] == last_step), key=lambda row: row["nfe"])
        metrics = {
            row["metric"]: {
                "value": round(float(row["value"]), 4),
                "step": last_step,
                "sampler": row["sampler"],
                "num_inference_steps": row["num_inference_steps"],
                "num_samples": row["num_samples"],
                "by_nfe": {int(r["nfe"]): round(float(r["value"]), 4) for r in rows if r["metric"] == row["metric"]},
            }
            for row in rows
        }
        record_scores_in_card(card_path, metrics, METRIC_LABELS)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def parse_args(input_args: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m immiscible_diffusers.evaluate",
        description=(
            "Sample every checkpoint of training runs with a fixed seed and plot sample quality vs "
            "training step."
        ),
    )
    parser.add_argument("run_dirs", nargs="+", help="Training runs' output folders (with checkpoint-<step>/ folders).")
    parser.add_argument("--output_dir", required=True, help="Where quality.csv, quality.md, quality.png go.")
    parser.add_argument("--labels", nargs="+", default=None, help="A name per run for tables and plots.")
    parser.add_argument(
        "--metrics",
        nargs="+",
        choices=METRICS,
        default=None,
        help=(
            "digits_fd (offline, bundled digits runs only) and/or fid (Inception). Default: digits_fd for "
            "digits runs, else fid."
        ),
    )
    parser.add_argument(
        "--scheduler",
        choices=sorted(SAMPLERS),
        default=None,
        help="Sampler (default: the one registered for each run's pipeline class: ddim for DDPM runs).",
    )
    parser.add_argument(
        "--num_inference_steps",
        type=int,
        nargs="+",
        default=[50],
        help="Denoising steps per sample; several (e.g. 1 2 4 8 50) score every checkpoint at each (the NFE axis).",
    )
    parser.add_argument(
        "--num_samples",
        type=int,
        default=450,
        help=(
            "Images per checkpoint (450 = the digits floor set's size, so the floor is comparable; use >= "
            "10000 for FID)."
        ),
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="Seed of the starting noise, the same for every checkpoint."
    )
    parser.add_argument("--batch_size", type=int, default=256, help="Images generated per forward pass.")
    parser.add_argument(
        "--use_ema",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Sample a checkpoint's unet_ema/ when it has one (default), else its unet/.",
    )
    parser.add_argument(
        "--include_final",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Also evaluate the final pipeline's unet/ when no checkpoint has its step.",
    )
    parser.add_argument("--steps", type=int, nargs="+", default=None, help="Evaluate only these training steps.")
    add_debug_arg(parser)
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    parser.add_argument(
        "--num_threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's choice; 1 is fastest on a CPU shared with other jobs).",
    )
    parser.add_argument(
        "--inception_weights",
        default=None,
        help=(
            "For --metrics fid: path to torch-fidelity's InceptionV3 weights "
            "(weights-inception-2015-12-05-6726825d.pth)."
        ),
    )
    parser.add_argument(
        "--fid_reference",
        default=None,
        help="For --metrics fid: an .npz with 'mu' and 'sigma', a folder of images, or a dataset name (e.g. cifar10).",
    )
    parser.add_argument("--fid_reference_column", default="image", help="Image column of the --fid_reference dataset.")
    parser.add_argument(
        "--max_reference_images", type=int, default=None, help="Use at most this many reference images."
    )
    parser.add_argument(
        "--save_samples", action="store_true", help="Save a grid of each checkpoint's first 64 samples."
    )
    parser.add_argument(
        "--update_model_cards",
        action="store_true",
        help="Write each run's final scores into its model card (immiscible_diffusers: metrics:).",
    )
    args = parser.parse_args(input_args)
    if any(n < 1 for n in args.num_inference_steps) or len(set(args.num_inference_steps)) != len(
        args.num_inference_steps
    ):
        parser.error(f"--num_inference_steps must be distinct positive integers, got {args.num_inference_steps}")
    return args


def main(input_args: Sequence[str] | None = None) -> EvaluationResults:
    args = parse_args(input_args)
    # Checked before sampling (minutes), so that a mistyped folder fails at once with the files intact.
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        raise ValueError(f"--output_dir {args.output_dir!r} is a file, not a folder")
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    results = evaluate_runs(
        args.run_dirs,
        labels=args.labels,
        metrics=args.metrics,
        scheduler=args.scheduler,
        num_inference_steps=args.num_inference_steps,
        num_samples=args.num_samples,
        seed=args.seed,
        batch_size=args.batch_size,
        use_ema=args.use_ema,
        include_final=args.include_final,
        steps=args.steps,
        device=args.device,
        save_samples_dir=Path(args.output_dir) / "samples" if args.save_samples else None,
        inception_weights=args.inception_weights,
        reference=args.fid_reference,
        reference_column=args.fid_reference_column,
        max_reference_images=args.max_reference_images,
        cache_dir=args.output_dir,
    )
    paths = write_results(results, args.output_dir)
    if args.update_model_cards:
        add_metrics_to_model_cards(results, args.run_dirs)
    print(results_markdown(results))
    print("Wrote " + ", ".join(str(p) for p in paths.values()))
    return results


if __name__ == "__main__":
    run_entry_point(main)
