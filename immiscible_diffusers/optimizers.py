"""The optimizer a script's flags ask for: AdamW (or its 8-bit form from bitsandbytes), RAdam, or Prodigy."""

from __future__ import annotations

import argparse
from collections.abc import Iterable

import torch

OPTIMIZERS = ("adamw", "radam", "prodigy")


def build_optimizer(
    parameters: Iterable[torch.nn.Parameter], args: argparse.Namespace, name: str = "adamw"
) -> torch.optim.Optimizer:
    """``name`` (case-insensitive) with the ``--learning_rate``/``--adam_*`` flags; ``--use_8bit_adam`` picks
    bitsandbytes' AdamW8bit. Missing optional packages raise ``ImportError`` naming what to install."""
    name = name.lower()
    if name not in OPTIMIZERS:
        raise ValueError(f"--optimizer must be one of {OPTIMIZERS}, got {name!r}")
    kwargs = {
        "lr": args.learning_rate,
        "betas": (args.adam_beta1, args.adam_beta2),
        "weight_decay": args.adam_weight_decay,
        "eps": args.adam_epsilon,
    }
    if name == "prodigy":
        try:
            import prodigyopt  # noqa: PLC0415 - optional dependency
        except ImportError:
            raise ImportError("--optimizer prodigy needs prodigyopt: pip install prodigyopt") from None
        return prodigyopt.Prodigy(parameters, **kwargs)
    if getattr(args, "use_8bit_adam", False):
        if name != "adamw":
            raise ValueError(f"--use_8bit_adam applies to --optimizer adamw, not {name!r}")
        try:
            import bitsandbytes as bnb  # noqa: PLC0415 - optional dependency
        except ImportError:
            raise ImportError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(parameters, **kwargs)
    optimizer_class = torch.optim.RAdam if name == "radam" else torch.optim.AdamW
    return optimizer_class(parameters, **kwargs)
