"""The processes of a run: whether accelerate must treat them as CPU processes, and whether the data fills them."""

from __future__ import annotations

import os

import torch


def use_cpu_processes() -> bool:
    """Whether to build the ``Accelerator`` with ``cpu=True``: several processes, and no accelerator device.

    accelerate only treats ``torchrun --nproc_per_node N`` processes as one MULTI_CPU (gloo) job when
    asked for the CPU; without it, each process would silently train on its own.
    """
    launched_processes = int(os.environ.get("WORLD_SIZE", "1"))
    has_device = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return launched_processes > 1 and not has_device


def check_batch_size(num_examples: int, train_batch_size: int, num_processes: int = 1) -> None:
    """Raise ``ValueError`` when the dataset cannot fill one batch on every process (partial batches are dropped)."""
    needed = train_batch_size * num_processes
    if num_examples < needed:
        where = f" x {num_processes} processes" if num_processes > 1 else ""
        raise ValueError(
            f"--train_batch_size {train_batch_size}{where} needs at least {needed} training examples (incomplete "
            f"batches are dropped, so every assignment sees a full batch), but the dataset has {num_examples}"
        )
