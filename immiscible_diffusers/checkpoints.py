"""Checkpoints: atomic ``checkpoint-<step>`` folders, the recipe each records, and which one a run resumes from.

A checkpoint is written to a temporary folder and renamed into place, so a kill never leaves a half-written
``checkpoint-<step>``. Each records its recipe (``recipe.json``: script, prediction type, model config) so that
a resume with another script or model is refused instead of silently training the wrong thing. Resuming
from an older checkpoint moves the newer ones aside (to ``.superseded-checkpoints/``), so that ``latest``, the
weights and ``train_log.csv`` always describe one run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .randomness import rng_preserved

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TRAINING_CONFIG_NAME = "training_config.json"
# A checkpoint is written under this prefix and renamed to `checkpoint-<step>` once complete. The name
# does not start with "checkpoint-", so nothing that globs for checkpoints ever sees a partial one.
PARTIAL_CHECKPOINT_PREFIX = ".tmp-checkpoint-"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
RECIPE_NAME = "recipe.json"
# Hidden (a leading dot), so that pushing the output folder to the Hub leaves them out like other scratch folders.
SUPERSEDED_DIR = ".superseded-checkpoints"


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
    recipe: Mapping[str, Any] | None = None,
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
        if accelerator.is_main_process and recipe is not None:
            (partial / RECIPE_NAME).write_text(json.dumps(_json_ready(recipe), indent=2, sort_keys=True) + "\n")
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


def check_recipe(checkpoint: str | os.PathLike, recipe: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` when ``checkpoint`` was written by another recipe (script, prediction type, model).

    Checkpoints written before recipes were recorded have no ``recipe.json`` and are accepted.
    """
    path = Path(checkpoint) / RECIPE_NAME
    if not path.is_file():
        logger.warning(f"{str(checkpoint)!r} records no recipe (an older checkpoint); resuming without checking it")
        return
    saved = json.loads(path.read_text())
    wanted = _json_ready(recipe)
    for key in ("script", "prediction_type", "model_config"):
        if key in saved and key in wanted and saved[key] != wanted[key]:
            if key == "model_config":
                keys = set(saved[key]) | set(wanted[key])
                differ = sorted(k for k in keys if saved[key].get(k) != wanted[key].get(k))
                what = f"a model config that differs in {differ}"
            else:
                what = f"{key} {saved[key]!r}, not {wanted[key]!r}"
            raise ValueError(
                f"--resume_from_checkpoint {str(checkpoint)!r} was written with {what}; resume it with the script and "
                f"settings that wrote it, or start a new run in another --output_dir"
            )


def set_aside_newer_checkpoints(output_dir: str | os.PathLike, step: int) -> list[Path]:
    """Move the checkpoints newer than ``step`` into ``output_dir/.superseded-checkpoints/``; return their new paths.

    A run resumed from an older checkpoint rewrites that history: left in place, the newer checkpoints of the
    abandoned run would be what ``--resume_from_checkpoint latest`` picks after the next interruption.
    """
    aside = Path(output_dir) / SUPERSEDED_DIR
    moved = []
    for found_step, path in list_checkpoints(output_dir):
        if found_step <= step:
            continue
        aside.mkdir(exist_ok=True)
        target = aside / path.name
        shutil.rmtree(target, ignore_errors=True)
        os.replace(path, target)
        moved.append(target)
    if moved:
        logger.warning(
            f"resuming from step {step}: moved the {len(moved)} newer checkpoint(s) of the abandoned run to "
            f"{str(aside)!r} ({', '.join(p.name for p in moved)})"
        )
    return moved
