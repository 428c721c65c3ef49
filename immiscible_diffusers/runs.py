"""What the evaluator and the recipe samplers share: a run folder's description and the sampler registry.

``RunInfo`` / ``read_run`` describe a training run's output folder; ``SamplingOptions``, ``Sampler`` and
``register_sampler`` / ``resolve_sampler`` map a sampler name to a function; ``run_image_pipeline`` and
``load_unet`` are the plumbing every sampler uses. The recipe modules (``consistency``, ``flow_matching``)
and ``evaluate`` all import from here, so none of them imports another.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel

from .checkpoints import TRAINING_CONFIG_NAME
from .model_card import CARD_METADATA_KEY, read_card_metadata
from .model_index import pipeline_class_name, read_model_index

# Which saved pipeline each training script writes, for folders without model_index.json yet.
SCRIPT_PIPELINES = {
    "train_unconditional.py": "DDPMPipeline",
    "train_consistency.py": "ConsistencyModelPipeline",
    "train_flow_matching.py": "FlowMatchingPipeline",
}


@dataclass
class RunInfo:
    """What the evaluator knows about one training run's output folder."""

    run_dir: Path
    label: str
    pipeline_class: str | None
    training_config: dict[str, Any]
    card_metadata: dict[str, Any]

    def setting(self, key: str, default: Any = None) -> Any:
        """A training setting, from ``training_config.json``, else the model card's ``immiscible_diffusers`` dict."""
        if key in self.training_config:
            return self.training_config[key]
        return self.card_metadata.get(key, default)

    @property
    def dataset(self) -> str | None:
        return self.setting("dataset")

    @property
    def assignment(self) -> str | None:
        return self.setting("assignment")

    @property
    def seed(self) -> int | None:
        return self.setting("seed")


def read_run(run_dir: str | os.PathLike, label: str | None = None) -> RunInfo:
    """Read a run folder's ``training_config.json``, model card metadata and ``model_index.json`` (all optional)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run folder {str(run_dir)!r} does not exist")
    config_path = run_dir / TRAINING_CONFIG_NAME
    training_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    card_metadata: dict[str, Any] = {}
    if (run_dir / "README.md").is_file():
        card_metadata = dict(read_card_metadata(run_dir).get(CARD_METADATA_KEY) or {})
    pipeline_class = None
    if (run_dir / "model_index.json").is_file():
        pipeline_class = pipeline_class_name(read_model_index(run_dir))
    else:
        script = training_config.get("script") or card_metadata.get("script")
        pipeline_class = SCRIPT_PIPELINES.get(script)
    return RunInfo(run_dir, label or run_dir.name, pipeline_class, training_config, card_metadata)



@dataclass(frozen=True)
class SamplingOptions:
    """How to sample: ``num_images`` in batches of ``batch_size`` from a CPU generator seeded with ``seed``."""

    num_images: int
    num_inference_steps: int
    seed: int = 0
    batch_size: int = 256
    device: str = "cpu"
    progress: bool = True


# A sampler: (run, model folder, options) -> images (N, C, H, W) float32 in [-1, 1] on the CPU.
SampleFunction = Callable[[RunInfo, Path, SamplingOptions], torch.Tensor]


@dataclass(frozen=True)
class Sampler:
    """A sampling method and the saved pipeline classes (``model_index.json`` ``_class_name``) it applies to."""

    name: str
    sample: SampleFunction
    pipeline_classes: tuple[str, ...]
    description: str


SAMPLERS: dict[str, Sampler] = {}
DEFAULT_SAMPLERS: dict[str, str] = {}


def register_sampler(sampler: Sampler, default_for: Iterable[str] = ()) -> Sampler:
    """Add ``sampler`` to ``SAMPLERS``; make it the default for the pipeline classes in ``default_for``."""
    SAMPLERS[sampler.name] = sampler
    for pipeline_class in default_for:
        DEFAULT_SAMPLERS[pipeline_class] = sampler.name
    return sampler


def resolve_sampler(run: RunInfo, name: str | None) -> Sampler:
    """The sampler called ``name`` (or the default for the run's pipeline), checked against the run."""
    if name is None:
        if run.pipeline_class not in DEFAULT_SAMPLERS:
            raise ValueError(
                f"no default sampler for run {str(run.run_dir)!r} (pipeline class {run.pipeline_class!r}); "
                f"pass --scheduler, one of {sorted(SAMPLERS)}"
            )
        name = DEFAULT_SAMPLERS[run.pipeline_class]
    if name not in SAMPLERS:
        raise ValueError(f"--scheduler must be one of {sorted(SAMPLERS)}, got {name!r}")
    sampler = SAMPLERS[name]
    if run.pipeline_class is not None and run.pipeline_class not in sampler.pipeline_classes:
        raise ValueError(
            f"--scheduler {name} samples {list(sampler.pipeline_classes)}, but run {str(run.run_dir)!r} holds a "
            f"{run.pipeline_class}"
        )
    return sampler


def resolve_device(device: str | None) -> str:
    """``device``, checked to be usable here (``None``: cuda when available, else cpu); ``ValueError`` if not."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        # Allocating an empty tensor is what fails on a build or machine without that device (a CPU-only
        # torch raises AssertionError for cuda), so check it once here rather than deep in a sampler.
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(f"--device {device!r} is not usable here ({reason}); use cpu or an available device") from None
    return device


def load_unet(model_dir: str | os.PathLike, device: str) -> UNet2DModel:
    """The saved ``UNet2DModel`` in ``model_dir``, on ``device``, in eval mode."""
    return UNet2DModel.from_pretrained(model_dir).to(device).eval()


def run_image_pipeline(pipeline, options: SamplingOptions, **call_kwargs: Any) -> torch.Tensor:
    """``options.num_images`` images from ``pipeline`` in batches, from one CPU generator: (N, C, H, W) in [-1, 1]."""
    pipeline.set_progress_bar_config(disable=not options.progress, leave=False, desc="denoising")
    generator = torch.Generator("cpu").manual_seed(options.seed)
    batches = []
    remaining = options.num_images
    with torch.no_grad():
        while remaining > 0:
            size = min(options.batch_size, remaining)
            images = pipeline(
                batch_size=size,
                generator=generator,
                num_inference_steps=options.num_inference_steps,
                output_type="pt",
                **call_kwargs,
            ).images
            batches.append(images.float().cpu() * 2.0 - 1.0)  # the pipelines return [0, 1]
            remaining -= size
    return torch.cat(batches)
