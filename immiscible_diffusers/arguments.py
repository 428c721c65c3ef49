"""Command-line value types and the flags every training script shares (``--assignment*`` and friends)."""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

from .assignment import AUTO_COST_DTYPE, COST_DTYPES, DEFAULT_BLOCK_SIZE, DISTANCES, METHODS, SCOPES
from .data import DIGITS_DEFAULT_RESOLUTION

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
# Trackers that `--report_to` accepts; "all" is every installed one (as in diffusers' examples).
TRACKERS = ("tensorboard", "wandb", "all")


def _number(value: str, convert, accept, expected: str):
    """``convert(value)`` if it converts and ``accept`` takes it; otherwise argparse's error naming ``expected``."""
    try:
        number = convert(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}") from None
    if not accept(number):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}")
    return number


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1."""
    return _number(value, int, lambda n: n >= 1, "an integer >= 1")


def non_negative_int(value: str) -> int:
    """argparse type: an integer >= 0."""
    return _number(value, int, lambda n: n >= 0, "an integer >= 0")


def non_negative_float(value: str) -> float:
    """argparse type: a finite number >= 0."""
    return _number(value, float, lambda n: math.isfinite(n) and n >= 0, "a number >= 0")


def positive_float(value: str) -> float:
    """argparse type: a finite number > 0."""
    return _number(value, float, lambda n: math.isfinite(n) and n > 0, "a number > 0")


def unit_interval_float(value: str) -> float:
    """argparse type: a number in ``[0, 1)`` (an EMA decay)."""
    return _number(value, float, lambda n: 0.0 <= n < 1.0, "a number in [0, 1)")


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
            "candidates (Improved Immiscible Diffusion); 'none' = vanilla training, bit-for-bit. Two controls, "
            "diagnostics for attributing a result, not for training a model to use: 'shuffle' = a random "
            "re-pairing (vanilla in distribution); 'norm_matched' = noise moved toward its own image by as much "
            "as 'linear' closes the distance, without re-pairing."
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


def add_image_training_args(parser: argparse.ArgumentParser, output_dir: str) -> None:
    """The flags the pixel-space scripts (unconditional DDPM, flow matching) share, with diffusers' defaults."""
    add = parser.add_argument
    add("--dataset_name", type=str, default=None, help=(
        "A dataset on the Hub (or a local dataset folder) to train on, e.g. cifar10 with --image_column img. "
        "Without it and without --train_data_dir, the script trains on scikit-learn's bundled digits (offline)."))
    add("--dataset_config_name", type=str, default=None, help="The config of the Hub dataset.")
    add("--model_config_name_or_path", type=str, default=None,
        help="A UNet2DModel config (folder, file or Hub id). Default: a small UNet sized by the --unet_* flags.")
    add("--train_data_dir", type=str, default=None, help="A folder of training images (read as an imagefolder).")
    add("--image_column", type=str, default="image", help="The dataset column holding the images.")
    add("--max_train_samples", type=positive_int, default=None,
        help="Train on this many examples only (picked after a shuffle with --seed), for debugging or quick runs.")
    add("--output_dir", type=str, default=output_dir, help="Where the pipeline and checkpoints go.")
    add("--cache_dir", type=str, default=None, help="Where downloaded datasets are cached.")
    add("--resolution", type=positive_int, default=None,
        help=f"Side of the square training images. Default: {DIGITS_DEFAULT_RESOLUTION} for the digits, 64 otherwise.")
    add("--center_crop", action="store_true", help="Crop the center of each image (default: a random crop).")
    add("--random_flip", action="store_true", help="Flip images horizontally at random.")
    add("--num_channels", type=int, default=None, choices=(1, 3),
        help="1 (grayscale) or 3 (RGB). Default: the model config's in_channels, else 1 for the digits, 3 otherwise.")
    add("--unet_block_out_channels", type=str, default="32,64,64",
        help="Widths of the default UNet's levels, comma-separated (ignored with --model_config_name_or_path).")
    add("--unet_layers_per_block", type=positive_int, default=1, help="ResNet layers per level of the default UNet.")
    add("--train_batch_size", type=positive_int, default=16, help="Batch size per process.")
    add("--eval_batch_size", type=positive_int, default=16, help="Images per sample grid.")
    add("--dataloader_num_workers", type=non_negative_int, default=0,
        help="Subprocesses that load data (0: in the main process, best on CPU).")
    add("--num_epochs", type=positive_int, default=100)
    add("--max_train_steps", type=positive_int, default=None,
        help="Total optimizer steps; overrides --num_epochs when given.")
    add("--save_images_epochs", type=positive_int, default=10, help="Save a sample grid every X epochs.")
    add("--save_model_epochs", type=positive_int, default=10, help="Save the pipeline every X epochs.")
    add("--gradient_accumulation_steps", type=positive_int, default=1)
    add("--learning_rate", type=float, default=1e-4)
    add("--lr_scheduler", type=str, default="cosine", choices=LR_SCHEDULERS)
    add("--lr_warmup_steps", type=non_negative_int, default=500)
    add_adam_args(parser)
    add("--use_ema", action="store_true", help="Keep an exponential moving average of the weights.")
    add("--ema_inv_gamma", type=float, default=1.0, help="EMA warmup: inverse multiplicative factor.")
    add("--ema_power", type=float, default=3 / 4, help="EMA warmup: power.")
    add("--ema_max_decay", type=float, default=0.9999, help="The largest EMA decay.")
    add("--mixed_precision", type=str, default="no", choices=("no", "fp16", "bf16"))
    add_run_args(parser, logger_flag=True)


def add_adam_args(
    parser: argparse.ArgumentParser, beta1: float = 0.95, weight_decay: float = 1e-6, grad_norm_type=float
) -> None:
    """The optimizer's ``--adam_*`` flags and ``--max_grad_norm`` (defaults: diffusers' unconditional example)."""
    add = parser.add_argument
    add("--adam_beta1", type=float, default=beta1)
    add("--adam_beta2", type=float, default=0.999)
    add("--adam_weight_decay", type=float, default=weight_decay)
    add("--adam_epsilon", type=float, default=1e-08)
    add("--max_grad_norm", type=grad_norm_type, default=1.0, help="Gradient clipping norm.")


def add_run_args(parser: argparse.ArgumentParser, logger_flag: bool = False) -> None:
    """Checkpointing, resuming, seeding, trackers, the Hub, and ``--debug``: the same in every script."""
    add = parser.add_argument
    add("--checkpointing_steps", type=positive_int, default=500,
        help="Save the training state every X optimizer steps (resume with --resume_from_checkpoint).")
    add("--checkpoints_total_limit", type=positive_int, default=None, help="Keep at most this many checkpoints.")
    add("--resume_from_checkpoint", type=str, default=None,
        help="'latest' (starts fresh when there is none yet), or a checkpoint folder name or path.")
    add("--seed", type=int, default=None, help="Seed for reproducible training.")
    add("--push_to_hub", action="store_true", help="Upload the output folder (without checkpoints).")
    add("--hub_token", type=str, default=None, help="Token for the Hub (default: your login).")
    add("--hub_model_id", type=str, default=None, help="Repository to push to (default: the folder name).")
    add("--hub_private_repo", action="store_true", help="Create the repository as private.")
    if logger_flag:  # the scripts that mirror diffusers' unconditional example call it --logger
        add("--logger", "--report_to", dest="logger", type=str, default="tensorboard", choices=TRACKERS,
            help="Where to report the metrics: tensorboard, wandb, or all installed trackers.")
    add("--logging_dir", type=str, default="logs", help="Tracker folder, relative to --output_dir.")
    add("--local_rank", type=int, default=-1, help="For distributed training: local_rank")
    add_debug_arg(parser)


def add_debug_arg(parser: argparse.ArgumentParser) -> None:
    """``--debug``: show the traceback of a user error (``immiscible_diffusers.errors``)."""
    parser.add_argument("--debug", action="store_true", help="On an error, print the full traceback.")


def finish_image_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Checks and defaults that depend on several flags: the local rank, the UNet widths, the resolution."""
    env_local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_local_rank != -1 and env_local_rank != args.local_rank:
        args.local_rank = env_local_rank
    if isinstance(args.unet_block_out_channels, str):
        try:
            args.unet_block_out_channels = tuple(int(w) for w in args.unet_block_out_channels.split(","))
        except ValueError:
            parser.error(
                f"--unet_block_out_channels must be integers separated by commas, got {args.unet_block_out_channels!r}"
            )
    if any(w < 1 for w in args.unet_block_out_channels):
        parser.error(f"--unet_block_out_channels must be positive integers, got {args.unet_block_out_channels}")
    if args.resolution is None:
        args.resolution = DIGITS_DEFAULT_RESOLUTION if uses_digits(args) else 64
    return args


def uses_digits(args: argparse.Namespace) -> bool:
    """Whether the run trains on the bundled digits (no --dataset_name, no --train_data_dir)."""
    return args.dataset_name is None and args.train_data_dir is None
