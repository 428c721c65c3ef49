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
    TRAINING_CONFIG_NAME,
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


# Sample grids: tiles smaller than this are upscaled (nearest neighbour, so pixels stay sharp) until a
# person can read them; a 16x16 digit becomes 48x48.
GRID_MIN_TILE_SIZE = 48
# Pixels between tiles (and around the grid), so strokes of neighbouring samples do not run together.
GRID_GAP = 2
# Mid grey: distinct from both a black background and white strokes.
GRID_BACKGROUND = (128, 128, 128)


def image_grid(
    images: Sequence[Image.Image],
    columns: int | None = None,
    *,
    min_tile_size: int = GRID_MIN_TILE_SIZE,
    gap: int = GRID_GAP,
) -> Image.Image:
    """Tile equally sized images row by row, ``gap`` grey pixels between and around the tiles.

    ``columns`` defaults to a near-square grid. Images smaller than ``min_tile_size`` pixels (on their
    shorter side) are upscaled by the smallest integer factor that reaches it, with nearest-neighbour
    resampling. Every sample grid of the package (training scripts, evaluator, demo) is made here.
    """
    if not images:
        raise ValueError("images must not be empty")
    if min_tile_size < 1 or gap < 0:
        raise ValueError(f"min_tile_size must be >= 1 and gap >= 0, got {min_tile_size} and {gap}")
    sizes = {image.size for image in images}
    if len(sizes) > 1:
        raise ValueError(f"images must all have one size, got {sorted(sizes)}")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    scale = max(1, math.ceil(min_tile_size / min(width, height)))
    tile_width, tile_height = width * scale, height * scale
    mode = images[0].mode
    grid_size = (columns * (tile_width + gap) + gap, rows * (tile_height + gap) + gap)
    grid = Image.new("RGB", grid_size, GRID_BACKGROUND).convert(mode)
    for index, image in enumerate(images):
        if scale > 1:
            image = image.resize((tile_width, tile_height), Image.Resampling.NEAREST)
        x = gap + (index % columns) * (tile_width + gap)
        y = gap + (index // columns) * (tile_height + gap)
        grid.paste(image, (x, y))
    return grid


def save_sample_grid(
    images: Sequence[Image.Image], output_dir: str | os.PathLike, step: int, columns: int | None = None
) -> Path:
    """Save the grid of ``images`` as ``samples/step_<step:06d>.png`` under ``output_dir``; return its path."""
    path = Path(output_dir) / "samples" / f"step_{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, columns).save(path)
    return path


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image as a uint8 (C, H, W) tensor, for tensorboard."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)
