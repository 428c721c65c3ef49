"""Plumbing shared by the training scripts: assignment flags, per-step logs, atomic checkpoints, run files.

The scripts in ``training_scripts/`` read top to bottom like diffusers' examples; what every one of them
needs in the same form lives here, so that the output folder follows one convention (see the README):

- ``add_assignment_args`` / ``assignment_kwargs`` / ``assignment_generator`` / ``reseed_assignment_generator``:
  the ``--assignment*`` flags and what ``assign_noise`` needs from them;
- ``StepAccumulator`` and ``TrainLog``: one row per optimizer step in ``train_log.csv`` (loss, learning
  rate, assignment statistics, fingerprints of the batch and of the random draws) and the same values
  in the accelerate trackers (tensorboard);
- ``save_checkpoint`` / ``resolve_resume_checkpoint``: accelerate state written to a temporary folder and
  renamed into place, so a kill never leaves a half-written ``checkpoint-<step>``;
- ``rng_preserved`` and ``ema_weights_swapped_in``: side work (checkpoints, samples) that leaves the
  training's random stream where it was, so a resumed run draws exactly what an uninterrupted one would;
- ``save_training_config``, ``save_sample_grid``, and checks that turn bad input into clear errors.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import UNet2DModel
from PIL import Image

from .assignment import AUTO_COST_DTYPE, COST_DTYPES, DEFAULT_BLOCK_SIZE, DISTANCES, METHODS, SCOPES, AssignmentStats

CHECKPOINT_PREFIX = "checkpoint-"
# A checkpoint is written under this prefix and renamed to `checkpoint-<step>` once complete. The name
# does not start with "checkpoint-", so nothing that globs for checkpoints ever sees a partial one.
PARTIAL_CHECKPOINT_PREFIX = ".tmp-checkpoint-"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")

TRAIN_LOG_NAME = "train_log.csv"
TRAIN_LOG_COLUMNS = (
    "step",
    "epoch",
    "loss",
    "lr",
    "assign_distance_before",
    "assign_distance_after",
    "assign_seconds",
    "batch_hash",
    "noise_hash",
)
TRAINING_CONFIG_NAME = "training_config.json"


# --------------------------------------------------------------------------------------------------
# Command-line flags
# --------------------------------------------------------------------------------------------------


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value!r}")
    return number


def non_negative_int(value: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}")
    return number


def add_assignment_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add the immiscible-diffusion flags (``--assignment``, ``--knn_k``, ...) to ``parser``."""
    group = parser.add_argument_group("immiscible diffusion (noise assignment)")
    group.add_argument(
        "--assignment",
        type=str,
        default="linear",
        choices=METHODS,
        help=(
            "How each batch's noise is paired with its images: 'linear' = exact linear assignment minimising the "
            "total image-noise distance (Immiscible Diffusion); 'knn' = per image the nearest of --knn_k noise "
            "candidates (Improved Immiscible Diffusion); 'none' = vanilla training, bit-for-bit."
        ),
    )
    group.add_argument(
        "--knn_k", type=positive_int, default=4, help="Noise candidates per image for --assignment knn."
    )
    group.add_argument(
        "--assignment_distance",
        type=str,
        default="l2",
        choices=DISTANCES,
        help="Distance minimised: 'l2' (the paper's) or 'sqeuclidean' (the optimal-transport convention).",
    )
    group.add_argument(
        "--assignment_dtype",
        type=str,
        default=AUTO_COST_DTYPE,
        choices=(AUTO_COST_DTYPE, *COST_DTYPES),
        help=(
            "Precision of the distance matrix: 'auto' picks the fastest that keeps >= 99.9%% of the optimum's "
            "distance reduction on this device (fp16 on CUDA, bf16 on CPUs with native bf16, else float32); "
            "float16 is the paper's 'quantized' assignment."
        ),
    )
    group.add_argument(
        "--assignment_scope",
        type=str,
        default="global",
        choices=SCOPES,
        help=(
            "With several processes: 'global' assigns the whole world batch at once (rank 0 solves, as in the "
            "authors' code), 'local' assigns each process's batch on its own. The same with one process."
        ),
    )
    group.add_argument(
        "--assignment_block_size",
        type=positive_int,
        default=DEFAULT_BLOCK_SIZE,
        help="Batches larger than this are assigned exactly within blocks of this size (the solve is cubic).",
    )
    return group


def assignment_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``assign_noise`` that the ``--assignment*`` flags set."""
    return {
        "method": args.assignment,
        "distance": args.assignment_distance,
        "cost_dtype": args.assignment_dtype,
        "knn_k": args.knn_k,
        "scope": args.assignment_scope,
        "block_size": args.assignment_block_size,
    }


def assignment_generator(
    seed: int | None, process_index: int = 0, device: str | torch.device = "cpu"
) -> torch.Generator:
    """A generator for the KNN candidates, separate from torch's global one.

    The main stream (data order, noise, timesteps) then stays the same whatever the assignment
    method, so runs with ``--assignment none``, ``linear`` and ``knn`` see the same batches and the
    same first noise draw. Each process gets its own candidates.
    """
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        # An arbitrary odd offset keeps this stream away from the global one seeded with `seed`.
        generator.manual_seed((seed + 0x1D3F_84A5 + 7919 * process_index) % (2**63))
    return generator


def reseed_assignment_generator(
    generator: torch.Generator, seed: int, process_index: int, step: int, micro_step: int = 0, stream: str = "assignment"
) -> torch.Generator:
    """Seed ``generator`` (in place) from ``(seed, process_index, step, micro_step)`` alone; return it.

    Called before each micro-batch, it makes the KNN candidates a function of where the run is, not of
    what was drawn before: a run resumed from a checkpoint draws exactly what an uninterrupted one would,
    on every process, with no generator state to save (accelerate saves registered objects from the main
    process only, so a saved state would give every process the main one's). ``micro_step`` counts the
    micro-batches of one optimizer step (gradient accumulation); ``stream`` keeps generators that are
    reseeded at the same place (a script's noise and its KNN candidates, say) independent.
    """
    for name, value in (("process_index", process_index), ("step", step), ("micro_step", micro_step)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    key = f"immiscible-{stream}:{seed}:{process_index}:{step}:{micro_step}".encode()
    # A hash, not a sum: nearby (process, step) pairs must not share seeds, nor meet the global stream's seed.
    generator.manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1)
    return generator


class CheckpointableGenerator:
    """Wraps a ``torch.Generator`` so that ``accelerator.register_for_checkpointing`` saves and restores it.

    accelerate writes registered objects from the main process only, so with several processes every
    process resumes with the main process's state. Where each process needs its own stream after a
    resume, reseed the generator every step with ``reseed_assignment_generator`` instead.
    """

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.generator.set_state(state["state"])


def use_cpu_processes() -> bool:
    """Whether to build the ``Accelerator`` with ``cpu=True``: several processes, and no accelerator device.

    accelerate only treats ``torchrun --nproc_per_node N`` processes as one MULTI_CPU (gloo) job when
    asked for the CPU; without it, each process would silently train on its own.
    """
    launched_processes = int(os.environ.get("WORLD_SIZE", "1"))
    has_device = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return launched_processes > 1 and not has_device


# --------------------------------------------------------------------------------------------------
# Per-step statistics and train_log.csv
# --------------------------------------------------------------------------------------------------


def tensor_fingerprint(*tensors: torch.Tensor) -> str:
    """A short SHA-256 of the tensors' values (to check that two runs saw the same batches and draws)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        # Raw bytes, so every dtype works (numpy has no bfloat16) and equal hashes mean equal bits.
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class StepAccumulator:
    """Collects the micro-batches of one optimizer step (gradient accumulation) into one log row."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._sums = torch.zeros(4, dtype=torch.float64)  # loss, distance before, distance after, seconds
        self._count = 0
        self._batch_digest = hashlib.sha256()
        self._noise_digest = hashlib.sha256()

    def add(
        self,
        loss: torch.Tensor | float,
        stats: AssignmentStats,
        assign_seconds: float,
        clean: torch.Tensor,
        random_draws: Sequence[torch.Tensor],
    ) -> None:
        """Add one micro-batch: its loss, assignment statistics, and the tensors to fingerprint.

        ``random_draws`` are what the main random stream produced (noise before assignment, timesteps).
        """
        self._sums += torch.tensor(
            [float(loss), stats.mean_distance_before, stats.mean_distance_after, assign_seconds], dtype=torch.float64
        )
        self._count += 1
        self._batch_digest.update(tensor_fingerprint(clean).encode())
        self._noise_digest.update(tensor_fingerprint(*random_draws).encode())

    def reduce(self, accelerator) -> dict[str, Any]:
        """Means over the micro-batches and over all processes; fingerprints of this process's tensors."""
        if self._count == 0:
            raise RuntimeError("no micro-batch was added since the last reset")
        means = (self._sums / self._count).to(torch.float32)
        if accelerator.num_processes > 1:
            means = accelerator.reduce(means.to(accelerator.device), reduction="mean").cpu()
        loss, before, after, seconds = (float(v) for v in means)
        return {
            "loss": loss,
            "assign_distance_before": before,
            "assign_distance_after": after,
            # Seconds per micro-batch summed over the step: the time the assignment added to this step.
            "assign_seconds": seconds * self._count,
            "batch_hash": self._batch_digest.hexdigest()[:16],
            "noise_hash": self._noise_digest.hexdigest()[:16],
        }


def read_train_log(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a ``train_log.csv`` (values as strings)."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


class TrainLog:
    """``train_log.csv`` (one row per optimizer step, flushed at once) and the accelerate trackers.

    Only the main process writes. When a run resumes at ``resume_step``, rows after that step (written
    after the checkpoint, before the run was killed) are dropped, so every step appears once.
    """

    def __init__(self, output_dir: str | os.PathLike, accelerator, resume_step: int = 0) -> None:
        self.accelerator = accelerator
        self.path = Path(output_dir) / TRAIN_LOG_NAME
        self._handle = None
        if not accelerator.is_main_process:
            return
        kept = []
        if resume_step > 0 and self.path.exists():
            kept = [row for row in read_train_log(self.path) if int(row["step"]) <= resume_step]
        partial = self.path.with_name(self.path.name + ".tmp")
        with open(partial, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=TRAIN_LOG_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)
        os.replace(partial, self.path)
        self._handle = open(self.path, "a", newline="")
        self._writer = csv.DictWriter(self._handle, fieldnames=TRAIN_LOG_COLUMNS, extrasaction="ignore")

    def log(self, step: int, epoch: int, lr: float, values: Mapping[str, Any]) -> None:
        """Write one step's row and send its numbers to the trackers."""
        self.accelerator.log(
            {
                "loss": values["loss"],
                "lr": lr,
                "assignment/distance_before": values["assign_distance_before"],
                "assignment/distance_after": values["assign_distance_after"],
                "assignment/relative_reduction": relative_reduction(
                    values["assign_distance_before"], values["assign_distance_after"]
                ),
                "assignment/seconds": values["assign_seconds"],
            },
            step=step,
        )
        if self._handle is None:
            return
        self._writer.writerow({"step": step, "epoch": epoch, "lr": lr, **values})
        self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def relative_reduction(before: float, after: float) -> float:
    """Fraction by which the assignment shortened the mean image-noise distance."""
    return 0.0 if before == 0 else 1.0 - after / before


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def rng_preserved(device: str | torch.device | None = None) -> contextlib.AbstractContextManager:
    """A context after which torch's global random state (the CPU's, and ``device``'s) is as it was before.

    Wrap work that is no part of the training's random stream (checkpoints, sample grids, building a
    model to save): an uninterrupted run then draws the same numbers as one resumed from a checkpoint,
    which restarts from the random state saved in it.
    """
    device = torch.device("cpu" if device is None else device)
    if device.type in ("cpu", "meta"):
        return torch.random.fork_rng(devices=[])
    index = device.index
    if index is None:
        device_module = torch.get_device_module(device.type)
        index = device_module.current_device() if hasattr(device_module, "current_device") else 0
    return torch.random.fork_rng(devices=[index], device_type=device.type)


@contextlib.contextmanager
def ema_weights_swapped_in(ema_model, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Inside the block ``model`` holds the EMA weights of ``ema_model`` (a diffusers ``EMAModel``); on leaving,
    its training weights come back bit for bit.

    Saving or sampling the EMA weights this way builds no second model, whose random initialisation would
    draw from torch's global generator and so shift the training's random stream.
    """
    parameters = list(model.parameters())
    ema_model.store(parameters)
    ema_model.copy_to(parameters)
    try:
        yield model
    finally:
        ema_model.restore(parameters)


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``output_dir`` as ``(step, path)``, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for entry in output_dir.iterdir():
        match = _CHECKPOINT_NAME.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def checkpoint_step(path: str | os.PathLike) -> int:
    """The global step a ``checkpoint-<step>`` folder was saved at."""
    match = _CHECKPOINT_NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"{str(path)!r} is not a checkpoint folder (expected a name like 'checkpoint-500')")
    return int(match.group(1))


def resolve_resume_checkpoint(output_dir: str | os.PathLike, resume_from_checkpoint: str | None) -> Path | None:
    """The checkpoint to resume from: ``None`` (start fresh), ``"latest"``, a name in ``output_dir``, or a path.

    ``"latest"`` with no checkpoint yet returns ``None`` (a fresh start), so the same command both starts
    and resumes a run. A named checkpoint that does not exist raises ``ValueError``.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1][1] if checkpoints else None
    candidate = Path(resume_from_checkpoint)
    if not candidate.is_dir():
        candidate = Path(output_dir) / resume_from_checkpoint
    if not candidate.is_dir():
        raise ValueError(
            f"--resume_from_checkpoint {resume_from_checkpoint!r} is neither 'latest' nor an existing checkpoint "
            f"folder (checkpoints in {str(output_dir)!r}: {[p.name for _, p in list_checkpoints(output_dir)]})"
        )
    checkpoint_step(candidate)
    return candidate


def remove_partial_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Delete checkpoint folders whose write was interrupted; return what was removed."""
    output_dir = Path(output_dir)
    removed = []
    if output_dir.is_dir():
        for entry in output_dir.iterdir():
            if entry.name.startswith((PARTIAL_CHECKPOINT_PREFIX, ".old-checkpoint-")) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def prune_checkpoints(output_dir: str | os.PathLike, total_limit: int | None) -> list[Path]:
    """Delete the oldest checkpoints so that at most ``total_limit`` remain; return the deleted ones."""
    if total_limit is None:
        return []
    checkpoints = list_checkpoints(output_dir)
    doomed = [path for _, path in checkpoints[: max(0, len(checkpoints) - total_limit)]]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def save_checkpoint(
    accelerator,
    output_dir: str | os.PathLike,
    step: int,
    save_models: Callable[[Path], None] | None = None,
    total_limit: int | None = None,
) -> Path:
    """Write ``output_dir/checkpoint-<step>`` atomically; call on every process.

    The accelerate state (model, optimizer, LR scheduler, objects registered for checkpointing, each
    process's RNG state) and whatever ``save_models(folder)`` writes on the main process (``unet/``,
    ``unet_ema/`` with ``save_pretrained``) go to a temporary folder that is renamed into place once
    complete; only then are checkpoints beyond ``total_limit`` pruned (oldest first).

    The global random state is the same after the call as before it, whatever ``save_models`` draws
    (building a model initialises it at random): a run resumed from this checkpoint restarts from the
    random state saved in it, so the uninterrupted run must go on from that very state too.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    partial = output_dir / f"{PARTIAL_CHECKPOINT_PREFIX}{step}"
    with rng_preserved(accelerator.device):
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))
        if accelerator.is_main_process and save_models is not None:
            save_models(partial)
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            # Saving a step again (after resuming from an older checkpoint): swap, then delete the old copy.
            previous = output_dir / f".old-checkpoint-{step}"
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(final, previous)
            os.replace(partial, final)
            shutil.rmtree(previous)
        else:
            os.replace(partial, final)
        prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


# --------------------------------------------------------------------------------------------------
# Run files
# --------------------------------------------------------------------------------------------------


def _json_ready(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return str(value)


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


def save_sample_grid(images: Sequence[Image.Image], output_dir: str | os.PathLike, step: int) -> Path:
    """Save ``samples/step_<step:06d>.png`` under ``output_dir``; return its path."""
    path = Path(output_dir) / "samples" / f"step_{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images).save(path)
    return path


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------


def check_unet_resolution(resolution: int, down_block_types: Sequence[str]) -> None:
    """Raise ``ValueError`` unless a UNet with these down blocks can take ``resolution`` x ``resolution`` images.

    Every down block but the last halves the image, and the up path must meet the skip connections at
    the same sizes, so the side must be a multiple of ``2 ** (len(down_block_types) - 1)``.
    """
    factor = 2 ** (len(down_block_types) - 1)
    if resolution < 1 or resolution % factor:
        raise ValueError(
            f"--resolution {resolution} cannot be taken by the UNet: its {len(down_block_types)} down blocks halve "
            f"the image {len(down_block_types) - 1} times, so the resolution must be a positive multiple of {factor}"
        )


def check_batch_size(num_examples: int, train_batch_size: int, num_processes: int = 1) -> None:
    """Raise ``ValueError`` when the dataset cannot fill one batch on every process (partial batches are dropped)."""
    needed = train_batch_size * num_processes
    if num_examples < needed:
        where = f" x {num_processes} processes" if num_processes > 1 else ""
        raise ValueError(
            f"--train_batch_size {train_batch_size}{where} needs at least {needed} training examples (incomplete "
            f"batches are dropped, so every assignment sees a full batch), but the dataset has {num_examples}"
        )


def build_unet(args: argparse.Namespace) -> UNet2DModel:
    """The UNet to train: from --model_config_name_or_path, else a small default sized by the --unet_* flags."""
    if args.model_config_name_or_path is not None:
        source = args.model_config_name_or_path
        looks_like_a_path = os.path.sep in source or source.endswith(".json") or source.startswith(".")
        if looks_like_a_path and not os.path.exists(source):
            raise ValueError(f"--model_config_name_or_path {source!r} does not exist")
        config = UNet2DModel.load_config(source)
        if args.num_channels is not None and args.num_channels != config["in_channels"]:
            raise ValueError(
                f"--num_channels {args.num_channels} does not match the model config's in_channels "
                f"{config['in_channels']}"
            )
        check_unet_resolution(args.resolution, config["down_block_types"])
        return UNet2DModel.from_config(config, sample_size=args.resolution)

    widths = args.unet_block_out_channels
    levels = len(widths)
    check_unet_resolution(args.resolution, ["DownBlock2D"] * levels)
    num_channels = args.num_channels or (1 if args.dataset_name is None and args.train_data_dir is None else 3)
    # Attention only at the coarsest level, where it is cheap; GroupNorm groups must divide every width.
    return UNet2DModel(
        sample_size=args.resolution,
        in_channels=num_channels,
        out_channels=num_channels,
        layers_per_block=args.unet_layers_per_block,
        block_out_channels=widths,
        down_block_types=("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1),
        norm_num_groups=math.gcd(32, *widths),
    )


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image as a uint8 (C, H, W) tensor, for tensorboard."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)
