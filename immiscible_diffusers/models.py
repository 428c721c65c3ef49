"""The models the scripts train: the default UNet, its checks, and EMA weights swapped in for saving or sampling."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
from collections.abc import Iterator, Sequence

import torch
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel


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


def check_unet_widths(widths: Sequence[int], attention_head_dim: int = 8) -> None:
    """Raise ``ValueError`` unless the default UNet's attention (at its coarsest level) gets at least one head.

    diffusers' attention blocks use ``width // attention_head_dim`` heads: a coarsest width below the head
    size gives zero heads, which fails deep inside attention (ZeroDivisionError) instead of here.
    """
    if widths[-1] < attention_head_dim:
        raise ValueError(
            f"--unet_block_out_channels {','.join(map(str, widths))}: the last width {widths[-1]} holds the "
            f"attention layers and must be at least the attention head size {attention_head_dim}"
        )


def load_unet_config(source: str) -> dict:
    """A ``UNet2DModel`` config from a folder, a JSON file or a Hub id; ``ValueError`` with a clear reason if not."""
    looks_like_a_path = source.startswith(("/", ".", "~")) or source.endswith(".json") or source.count("/") > 1
    if looks_like_a_path and not os.path.exists(source):
        raise ValueError(f"--model_config_name_or_path {source!r} does not exist")
    try:
        return UNet2DModel.load_config(source)
    except OSError as error:
        if not os.path.exists(source) and os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
            raise ValueError(
                f"--model_config_name_or_path {source!r} is no local folder or file, and the Hub is offline "
                "(HF_HUB_OFFLINE=1): download it once online, or give a local path"
            ) from None
        raise ValueError(f"--model_config_name_or_path {source!r} could not be loaded: {error}") from None


def build_unet(args: argparse.Namespace, dropout: float | None = None, **config: int) -> UNet2DModel:
    """The UNet to train: from --model_config_name_or_path, else a small default sized by the --unet_* flags.

    ``config`` (e.g. ``num_class_embeds``) goes into either; ``dropout`` into the default UNet only.
    """
    if args.model_config_name_or_path is not None:
        loaded = load_unet_config(args.model_config_name_or_path)
        if args.num_channels is not None and args.num_channels != loaded["in_channels"]:
            raise ValueError(
                f"--num_channels {args.num_channels} does not match the model config's in_channels "
                f"{loaded['in_channels']}"
            )
        check_unet_resolution(args.resolution, loaded["down_block_types"])
        return UNet2DModel.from_config(loaded, sample_size=args.resolution, **config)

    widths = args.unet_block_out_channels
    levels = len(widths)
    check_unet_resolution(args.resolution, ["DownBlock2D"] * levels)
    check_unet_widths(widths)
    num_channels = args.num_channels or (1 if args.dataset_name is None and args.train_data_dir is None else 3)
    if dropout is not None:
        config["dropout"] = dropout
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
        **config,
    )


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


def ema_of(model: torch.nn.Module, args: argparse.Namespace, **overrides) -> EMAModel:
    """The EMA of diffusers' unconditional example: ``--ema_max_decay`` with the ``--ema_inv_gamma``/``--ema_power``
    warmup, saved as the model's class and config. ``overrides`` go to ``EMAModel`` (e.g. ``min_decay``)."""
    settings = dict(decay=args.ema_max_decay, use_ema_warmup=True, inv_gamma=args.ema_inv_gamma, power=args.ema_power)
    return EMAModel(
        model.parameters(), model_cls=type(model), model_config=model.config, **(settings | overrides)
    )
