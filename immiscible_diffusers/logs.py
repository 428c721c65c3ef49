"""``train_log.csv``: one row per optimizer step (loss, lr, assignment statistics, fingerprints), and the trackers."""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .assignment import AssignmentStats

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
