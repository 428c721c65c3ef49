"""Random streams of a training run that resume exactly: the KNN generator, per-micro-batch reseeding, forks."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Mapping

import torch


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
    generator: torch.Generator,
    seed: int,
    process_index: int,
    step: int,
    micro_step: int = 0,
    stream: str = "assignment",
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
