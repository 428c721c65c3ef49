"""Run files of the training scripts (``training_config.json``, sample grids), and the shared plumbing's names.

The plumbing lives in small modules, re-exported here for the scripts and tests that import it from here:
``arguments`` (flag types, ``--assignment*`` flags), ``randomness`` (generators that resume exactly),
``logs`` (``train_log.csv``), ``checkpoints`` (atomic checkpoints, recipes, resume), ``models`` (the default
UNet, EMA swaps) and ``run`` (``TrainingRun``, the loop itself).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .arguments import add_assignment_args, assignment_kwargs, non_negative_int, positive_int
from .checkpoints import (
    _CHECKPOINT_NAME,
    CHECKPOINT_PREFIX,
    PARTIAL_CHECKPOINT_PREFIX,
    _json_ready,
    checkpoint_step,
    list_checkpoints,
    prune_checkpoints,
    remove_partial_checkpoints,
    resolve_resume_checkpoint,
    save_checkpoint,
)
from .logs import (
    TRAIN_LOG_COLUMNS,
    TRAIN_LOG_NAME,
    StepAccumulator,
    TrainLog,
    read_train_log,
    relative_reduction,
    tensor_fingerprint,
)
from .models import build_unet, check_unet_resolution, ema_weights_swapped_in
from .processes import check_batch_size, use_cpu_processes
from .randomness import CheckpointableGenerator, assignment_generator, reseed_assignment_generator, rng_preserved

__all__ = [
    "CHECKPOINT_PREFIX", "PARTIAL_CHECKPOINT_PREFIX", "TRAIN_LOG_COLUMNS", "TRAIN_LOG_NAME", "TRAINING_CONFIG_NAME",
    "_CHECKPOINT_NAME", "CheckpointableGenerator", "StepAccumulator", "TrainLog", "add_assignment_args",
    "assignment_generator", "assignment_kwargs", "build_unet", "check_batch_size", "check_unet_resolution",
    "checkpoint_step", "ema_weights_swapped_in", "image_grid", "list_checkpoints", "non_negative_int",
    "pil_to_tensor", "positive_int", "prune_checkpoints", "read_train_log", "relative_reduction",
    "remove_partial_checkpoints", "reseed_assignment_generator", "resolve_resume_checkpoint", "rng_preserved",
    "save_checkpoint", "save_sample_grid", "save_training_config", "tensor_fingerprint", "use_cpu_processes",
    "write_json_atomically",
]  # fmt: skip

TRAINING_CONFIG_NAME = "training_config.json"


def write_json_atomically(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as JSON through a temporary file and a rename."""
    path = Path(path)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(_json_ready(data), indent=2, sort_keys=True) + "\n")
    os.replace(partial, path)
    return path


def save_training_config(
    output_dir: str | os.PathLike, args: argparse.Namespace | Mapping[str, Any], global_step: int, **extra: Any
) -> Path:
    """``training_config.json``: every argument of the run, the final ``global_step``, and ``extra``."""
    config = dict(vars(args) if isinstance(args, argparse.Namespace) else args)
    config.pop("hub_token", None)  # never write a secret to a file that may be published
    config.update(extra, global_step=global_step)
    return write_json_atomically(Path(output_dir) / TRAINING_CONFIG_NAME, config)


def image_grid(images: Sequence[Image.Image], columns: int | None = None) -> Image.Image:
    """Tile equally sized images into one image, row by row (``columns`` defaults to a near-square grid)."""
    if not images:
        raise ValueError("images must not be empty")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new(images[0].mode, (columns * width, rows * height))
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    return grid


def save_sample_grid(images: Sequence[Image.Image], output_dir: str | os.PathLike, step: int) -> Path:
    """Save ``samples/step_<step:06d>.png`` under ``output_dir``; return its path."""
    path = Path(output_dir) / "samples" / f"step_{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images).save(path)
    return path


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image as a uint8 (C, H, W) tensor, for tensorboard."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)
