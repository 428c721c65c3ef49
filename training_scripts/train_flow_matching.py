#!/usr/bin/env python
"""Train an unconditional rectified-flow (flow-matching) UNet with Immiscible Diffusion's noise assignment.

The flow-matching recipe of diffusers' SD3 training scripts, on pixels: an image ``x`` and Gaussian noise
are joined by the straight path ``x_sigma = (1 - sigma) * x + sigma * noise``; a ``UNet2DModel`` takes
``x_sigma`` and the timestep ``sigma * num_train_timesteps`` and learns the velocity ``noise - x``. Sigmas
are drawn by ``--weighting_scheme`` (with ``--logit_mean``/``--logit_std``/``--mode_scale``) from the
training grid of ``FlowMatchEulerDiscreteScheduler`` (``--num_train_timesteps``, ``--flow_shift``).

Immiscible Diffusion adds one step: before the images are noised, the batch's noise is assigned to them
(``--assignment linear``: the permutation that minimises the total image-noise distance; ``knn``: per image
the nearest of ``--knn_k`` candidates, as the follow-up paper did for flow matching with k = 4; ``none``:
vanilla training with the very same data order and random draws). The assigned noise is both the noising
input and part of the target ``noise - x``.

With no ``--dataset_name``/``--train_data_dir`` it trains on scikit-learn's bundled handwritten digits
(1,797 grayscale 8x8 images, upsampled to 16x16), so it runs offline:

    accelerate launch training_scripts/train_flow_matching.py --output_dir flow-digits --max_train_steps 2000 \\
        --assignment knn

The output folder holds a ``FlowMatchingPipeline`` (stock ``UNet2DModel`` and ``FlowMatchEulerDiscreteScheduler``)
with its code as ``pipeline.py`` (``model_index.json``: ``"_class_name": ["pipeline", "FlowMatchingPipeline"]``),
so it loads with plain diffusers: ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_loss_weighting_for_sd3
from diffusers.utils import is_wandb_available
from tqdm.auto import tqdm

from immiscible_diffusers import AssignmentStats, assign_noise
from immiscible_diffusers.data import (
    DIGITS_DEFAULT_RESOLUTION,
    dataset_display_name,
    image_transform,
    load_image_dataset,
    with_image_transform,
)
from immiscible_diffusers.flow_matching import (
    WEIGHTING_SCHEMES,
    FlowMatchingPipeline,
    flow_matching_inputs,
    sample_training_sigmas,
    save_flow_matching_pipeline,
    training_sigma_grid,
    validate_weighting_options,
)
from immiscible_diffusers.hub import create_hub_repo, push_output_dir
from immiscible_diffusers.model_card import training_card_metadata, write_model_card
from immiscible_diffusers.training import (
    build_unet,
    pil_to_tensor,
    CheckpointableGenerator,
    StepAccumulator,
    TrainLog,
    add_assignment_args,
    assignment_generator,
    assignment_kwargs,
    check_batch_size,
    checkpoint_step,
    ema_weights_swapped_in,
    non_negative_int,
    positive_int,
    remove_partial_checkpoints,
    reseed_assignment_generator,
    resolve_resume_checkpoint,
    rng_preserved,
    save_checkpoint,
    save_sample_grid,
    save_training_config,
    use_cpu_processes,
)

logger = get_logger(__name__, log_level="INFO")

SCRIPT_NAME = "train_flow_matching.py"
# What the UNet predicts, in diffusers' name for it (DPMSolver/UniPC call `noise - x` "flow_prediction").
PREDICTION_TYPE = "flow_prediction"
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def positive_float(value: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value!r}") from None
    if not (math.isfinite(number) and number > 0):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value!r}")
    return number


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help=(
            "A dataset on the Hub (or a local dataset folder) to train on, e.g. cifar10 with --image_column img. "
            "Without it and without --train_data_dir, the script trains on scikit-learn's bundled digits (offline)."
        ),
    )
    parser.add_argument("--dataset_config_name", type=str, default=None, help="The config of the Hub dataset.")
    parser.add_argument(
        "--model_config_name_or_path",
        type=str,
        default=None,
        help="A UNet2DModel config (folder, file or Hub id). Default: a small UNet sized by the --unet_* flags.",
    )
    parser.add_argument(
        "--train_data_dir", type=str, default=None, help="A folder of training images (read as an imagefolder)."
    )
    parser.add_argument("--image_column", type=str, default="image", help="The dataset column holding the images.")
    parser.add_argument(
        "--max_train_samples",
        type=positive_int,
        default=None,
        help="Train on this many examples only (picked after a shuffle with --seed), for debugging or quick runs.",
    )
    parser.add_argument(
        "--output_dir", type=str, default="flow-matching-immiscible", help="Where the pipeline and checkpoints go."
    )
    parser.add_argument("--cache_dir", type=str, default=None, help="Where downloaded datasets are cached.")
    parser.add_argument(
        "--resolution",
        type=positive_int,
        default=None,
        help=f"Side of the square training images. Default: {DIGITS_DEFAULT_RESOLUTION} for the digits, 64 otherwise.",
    )
    parser.add_argument(
        "--center_crop", action="store_true", help="Crop the center of each image (default: a random crop)."
    )
    parser.add_argument("--random_flip", action="store_true", help="Flip images horizontally at random.")
    parser.add_argument(
        "--num_channels",
        type=int,
        default=None,
        choices=(1, 3),
        help="1 (grayscale) or 3 (RGB). Default: the model config's in_channels, else 1 for the digits, 3 otherwise.",
    )
    parser.add_argument(
        "--unet_block_out_channels",
        type=str,
        default="32,64,64",
        help="Widths of the default UNet's levels, comma-separated (ignored with --model_config_name_or_path).",
    )
    parser.add_argument(
        "--unet_layers_per_block", type=positive_int, default=1, help="ResNet layers per level of the default UNet."
    )
    parser.add_argument("--train_batch_size", type=positive_int, default=16, help="Batch size per process.")
    parser.add_argument("--eval_batch_size", type=positive_int, default=16, help="Images per sample grid.")
    parser.add_argument(
        "--dataloader_num_workers",
        type=non_negative_int,
        default=0,
        help="Subprocesses that load data (0: in the main process, best on CPU).",
    )
    parser.add_argument("--num_epochs", type=positive_int, default=100)
    parser.add_argument(
        "--max_train_steps",
        type=positive_int,
        default=None,
        help="Total optimizer steps; overrides --num_epochs when given.",
    )
    parser.add_argument(
        "--save_images_epochs", type=positive_int, default=10, help="Save a sample grid every X epochs."
    )
    parser.add_argument("--save_model_epochs", type=positive_int, default=10, help="Save the pipeline every X epochs.")
    parser.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--lr_scheduler", type=str, default="cosine", choices=LR_SCHEDULERS)
    parser.add_argument("--lr_warmup_steps", type=non_negative_int, default=500)
    parser.add_argument("--adam_beta1", type=float, default=0.95)
    parser.add_argument("--adam_beta2", type=float, default=0.999)
    parser.add_argument("--adam_weight_decay", type=float, default=1e-6)
    parser.add_argument("--adam_epsilon", type=float, default=1e-08)
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    parser.add_argument("--use_ema", action="store_true", help="Keep an exponential moving average of the weights.")
    parser.add_argument("--ema_inv_gamma", type=float, default=1.0, help="EMA warmup: inverse multiplicative factor.")
    parser.add_argument("--ema_power", type=float, default=3 / 4, help="EMA warmup: power.")
    parser.add_argument("--ema_max_decay", type=float, default=0.9999, help="The largest EMA decay.")
    parser.add_argument("--push_to_hub", action="store_true", help="Upload the output folder (without checkpoints).")
    parser.add_argument("--hub_token", type=str, default=None, help="Token for the Hub (default: your login).")
    parser.add_argument(
        "--hub_model_id", type=str, default=None, help="Repository to push to (default: the folder name)."
    )
    parser.add_argument("--hub_private_repo", action="store_true", help="Create the repository as private.")
    parser.add_argument("--logger", type=str, default="tensorboard", choices=("tensorboard", "wandb"))
    parser.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder, relative to --output_dir.")
    parser.add_argument("--local_rank", type=int, default=-1, help="For distributed training: local_rank")
    parser.add_argument("--mixed_precision", type=str, default="no", choices=("no", "fp16", "bf16"))
    parser.add_argument(
        "--checkpointing_steps",
        type=positive_int,
        default=500,
        help="Save the training state every X optimizer steps (resume with --resume_from_checkpoint).",
    )
    parser.add_argument(
        "--checkpoints_total_limit", type=positive_int, default=None, help="Keep at most this many checkpoints."
    )
    parser.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help="'latest' (starts fresh when there is none yet), or a checkpoint folder name or path.",
    )
    parser.add_argument("--seed", type=int, default=None, help="Seed for reproducible training.")

    flow = parser.add_argument_group("flow matching (the SD3 recipe)")
    flow.add_argument(
        "--num_train_timesteps",
        type=positive_int,
        default=1000,
        help="Size of the scheduler's grid of training sigmas; the UNet's timestep is sigma * this.",
    )
    flow.add_argument(
        "--flow_shift",
        type=positive_float,
        default=1.0,
        help=(
            "The scheduler's `shift`: sigma -> shift * sigma / (1 + (shift - 1) * sigma), for training and sampling "
            "(SD3 uses 3.0 for 1024px latents; 1.0, the straight schedule, suits small images)."
        ),
    )
    flow.add_argument(
        "--weighting_scheme",
        type=str,
        default="none",
        choices=WEIGHTING_SCHEMES,
        help=(
            "How training sigmas are drawn and the loss weighted (as diffusers' SD3 scripts): 'logit_normal' and "
            "'mode' draw sigmas from their density; 'sigma_sqrt' and 'cosmap' draw uniformly and weight the loss; "
            "'none' is uniform and unweighted."
        ),
    )
    flow.add_argument(
        "--logit_mean",
        type=float,
        default=0.0,
        help=(
            "Mean of the 'logit_normal' scheme's normal. As in diffusers' SD3 scripts sigma is about 1 - sigmoid(n), "
            "so a positive mean favours low noise."
        ),
    )
    flow.add_argument(
        "--logit_std", type=float, default=1.0, help="Standard deviation of the 'logit_normal' scheme's normal (> 0)."
    )
    flow.add_argument(
        "--mode_scale",
        type=float,
        default=1.29,
        help="Scale of the 'mode' scheme's density (SD3 paper), in [-1, 1.75]; used by --weighting_scheme mode only.",
    )
    flow.add_argument(
        "--precondition_outputs",
        type=int,
        default=0,
        choices=(0, 1),
        help=(
            "1: precondition the output as SD3's fine-tuning script does (x_pred = x_sigma - sigma * model_output, "
            "loss against the clean image, i.e. the velocity error times sigma^2). 0 (default): the plain velocity "
            "loss of rectified-flow training from scratch. The model predicts the velocity either way."
        ),
    )
    flow.add_argument(
        "--num_inference_steps", type=positive_int, default=50, help="Euler steps for the sample grids."
    )
    add_assignment_args(parser)

    args = parser.parse_args(input_args)
    env_local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_local_rank != -1 and env_local_rank != args.local_rank:
        args.local_rank = env_local_rank
    try:
        args.unet_block_out_channels = tuple(int(w) for w in args.unet_block_out_channels.split(","))
    except ValueError:
        parser.error(
            f"--unet_block_out_channels must be integers separated by commas, got {args.unet_block_out_channels!r}"
        )
    if any(w < 1 for w in args.unet_block_out_channels):
        parser.error(f"--unet_block_out_channels must be positive, got {args.unet_block_out_channels}")
    try:
        validate_weighting_options(args.weighting_scheme, args.logit_mean, args.logit_std, args.mode_scale)
    except ValueError as error:
        parser.error(f"--{error}")
    if args.resolution is None:
        using_digits = args.dataset_name is None and args.train_data_dir is None
        args.resolution = DIGITS_DEFAULT_RESOLUTION if using_digits else 64
    return args


@dataclass
class FlowMatchingStep:
    """Everything one micro-batch's training step computed (kept for logging and for tests)."""

    loss: torch.Tensor
    noise_before_assignment: torch.Tensor
    noise: torch.Tensor
    sigmas: torch.Tensor
    timesteps: torch.Tensor
    noisy_images: torch.Tensor
    target: torch.Tensor
    model_output: torch.Tensor
    weighting: torch.Tensor
    assignment_stats: AssignmentStats
    assign_seconds: float


def compute_loss(
    unet: torch.nn.Module,
    sigma_grid: torch.Tensor,
    clean_images: torch.Tensor,
    args: argparse.Namespace,
    knn_generator: torch.Generator | None = None,
) -> FlowMatchingStep:
    """One flow-matching training step on a batch of clean images in ``[-1, 1]``, with immiscible assignment."""
    # Sample the noise at the other end of each image's path.
    noise = torch.randn(clean_images.shape, dtype=clean_images.dtype, device=clean_images.device)

    # Immiscible Diffusion: re-pair the batch's noise with its images. Linear assignment draws nothing
    # random and KNN draws its candidates from its own generator, so the main random stream (noise above,
    # sigmas below, data order) is the same for every --assignment: the runs stay comparable.
    start = time.perf_counter()
    assigned_noise, stats = assign_noise(
        clean_images, noise, **assignment_kwargs(args), generator=knn_generator, return_stats=True
    )
    assign_seconds = time.perf_counter() - start

    # Sigmas are drawn after the assignment, as timesteps are in the authors' code.
    sigmas = sample_training_sigmas(
        sigma_grid,
        clean_images.shape[0],
        weighting_scheme=args.weighting_scheme,
        logit_mean=args.logit_mean,
        logit_std=args.logit_std,
        mode_scale=args.mode_scale,
        device=clean_images.device,
    )
    timesteps = sigmas * args.num_train_timesteps

    # The assigned noise is both what noises the images and what the velocity target is made of.
    noisy_images, velocity = flow_matching_inputs(clean_images, assigned_noise, sigmas)
    model_output = unet(noisy_images, timesteps).sample

    expand = (-1,) + (1,) * (clean_images.ndim - 1)
    if args.precondition_outputs:
        # EDM-style preconditioning (SD3's script): the model's velocity turned into a clean-image estimate.
        model_output = model_output * (-sigmas.view(expand)) + noisy_images
        target = clean_images
    else:
        target = velocity
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=args.weighting_scheme, sigmas=sigmas).view(expand)
    squared_error = weighting.float() * (model_output.float() - target.float()) ** 2
    loss = squared_error.reshape(clean_images.shape[0], -1).mean(dim=1).mean()

    return FlowMatchingStep(
        loss=loss,
        noise_before_assignment=noise,
        noise=assigned_noise,
        sigmas=sigmas,
        timesteps=timesteps,
        noisy_images=noisy_images,
        target=target,
        model_output=model_output,
        weighting=weighting,
        assignment_stats=stats,
        assign_seconds=assign_seconds,
    )


def generate_samples(
    unet: UNet2DModel, noise_scheduler: FlowMatchEulerDiscreteScheduler, args: argparse.Namespace, device
) -> list:
    """A grid's worth of images from ``unet``, always from the same starting noise (seed 0)."""
    # A scheduler of its own: `set_timesteps` would otherwise change the training scheduler's state.
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(noise_scheduler.config)
    pipeline = FlowMatchingPipeline(unet=unet, scheduler=scheduler)
    pipeline.set_progress_bar_config(desc="sampling", leave=False)
    generator = torch.Generator(device=device).manual_seed(0)
    return pipeline(
        generator=generator,
        batch_size=args.eval_batch_size,
        num_inference_steps=args.num_inference_steps,
        output_type="pil",
    ).images


def save_pipeline_with_card(
    output_dir: Path,
    unet: UNet2DModel,
    noise_scheduler: FlowMatchEulerDiscreteScheduler,
    args: argparse.Namespace,
    global_step: int,
    sample_grid: Path | None,
    num_processes: int = 1,
    hub_repo_id: str | None = None,
) -> None:
    """The pipeline (with ``pipeline.py``), ``training_config.json`` and the model card ``README.md``."""
    save_flow_matching_pipeline(FlowMatchingPipeline(unet=unet, scheduler=noise_scheduler), output_dir)
    dataset = dataset_display_name(args.dataset_name, args.train_data_dir)
    save_training_config(
        output_dir,
        args,
        global_step,
        script=SCRIPT_NAME,
        dataset=dataset,
        num_processes=num_processes,
        prediction_type=PREDICTION_TYPE,
    )
    repo = hub_repo_id or str(output_dir)
    usage = f"""
from diffusers import DiffusionPipeline

# The pipeline class ships with the model as pipeline.py (torch and diffusers only), named in model_index.json.
pipeline = DiffusionPipeline.from_pretrained("{repo}", trust_remote_code=True)
images = pipeline(batch_size=16, num_inference_steps=50).images  # Euler steps, FlowMatchEulerDiscreteScheduler

# or, with immiscible-diffusers installed (no remote code):
from immiscible_diffusers.flow_matching import FlowMatchingPipeline

pipeline = FlowMatchingPipeline.from_pretrained("{repo}")
"""
    settings = (
        "assignment",
        "knn_k",
        "assignment_distance",
        "assignment_dtype",
        "assignment_scope",
        "weighting_scheme",
        "logit_mean",
        "logit_std",
        "mode_scale",
        "precondition_outputs",
        "num_train_timesteps",
        "flow_shift",
        "train_batch_size",
        "gradient_accumulation_steps",
        "resolution",
        "learning_rate",
        "lr_scheduler",
        "lr_warmup_steps",
        "use_ema",
        "mixed_precision",
        "seed",
    )
    card_args = vars(args) | {"prediction_type": PREDICTION_TYPE}
    write_model_card(
        output_dir,
        title=f"Rectified flow on {dataset}" + ("" if args.assignment == "none" else " with immiscible diffusion"),
        metadata=training_card_metadata(
            card_args,
            script=SCRIPT_NAME,
            global_step=global_step,
            dataset=dataset,
            **{key: getattr(args, key) for key in ("weighting_scheme", "num_train_timesteps", "flow_shift")},
        ),
        pipeline_tag="unconditional-image-generation",
        usage_code=usage,
        summary=(
            f"A UNet2DModel ({unet.num_parameters() / 1e6:.2f}M parameters) trained from scratch for {global_step} "
            f"steps with flow matching (rectified flow: the UNet predicts the velocity `noise - x` of the straight "
            f"path `(1 - sigma) * x + sigma * noise`) to generate {args.resolution}x{args.resolution} images like "
            f"those of `{dataset}`. The UNet and the scheduler are stock diffusers classes; the small pipeline class "
            f"that runs them ships with the model as `pipeline.py`."
        ),
        training_config={key: getattr(args, key) for key in settings} | {"global_step": global_step},
        hub_datasets=[args.dataset_name] if args.dataset_name and not os.path.isdir(args.dataset_name) else [],
        extra_tags=("unconditional-image-generation", "flow-matching", "rectified-flow"),
        sample_grid=sample_grid.relative_to(output_dir).as_posix() if sample_grid else None,
    )


def main(args: argparse.Namespace) -> None:
    output_dir = Path(args.output_dir)
    logging_dir = output_dir / args.logging_dir
    accelerator_project_config = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(logging_dir))
    if args.logger == "wandb" and not is_wandb_available():
        raise ImportError("--logger wandb needs wandb: pip install wandb")
    if args.logger == "wandb" and args.hub_token is not None:
        raise ValueError("--hub_token with --logger wandb would expose the token; log in with `hf auth login` instead")
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.logger,
        project_config=accelerator_project_config,
        cpu=use_cpu_processes(),
    )

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO
    )
    logger.info(accelerator.state, main_process_only=False)

    # The same seed everywhere for the weights (DDP also broadcasts rank 0's); each process then draws its own noise.
    if args.seed is not None:
        set_seed(args.seed)

    # Checked before anything is built, so that a mistyped checkpoint name fails at once.
    checkpoint = resolve_resume_checkpoint(output_dir, args.resume_from_checkpoint)
    hub_repo_id = None
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_partial_checkpoints(output_dir)
        if args.push_to_hub:
            hub_repo_id = create_hub_repo(
                output_dir, args.hub_model_id, token=args.hub_token, private=args.hub_private_repo
            )

    # Initialize the model
    model = build_unet(args)
    num_channels = model.config.in_channels

    # Create EMA for the model.
    ema_model = None
    if args.use_ema:
        ema_model = EMAModel(
            model.parameters(),
            decay=args.ema_max_decay,
            use_ema_warmup=True,
            inv_gamma=args.ema_inv_gamma,
            power=args.ema_power,
            model_cls=UNet2DModel,
            model_config=model.config,
        )
        accelerator.register_for_checkpointing(ema_model)

    # The stock scheduler defines the training sigmas and samples the saved pipeline; the assignment
    # happens explicitly in `compute_loss`.
    noise_scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=args.num_train_timesteps, shift=args.flow_shift
    )
    sigma_grid = training_sigma_grid(noise_scheduler.config).to(accelerator.device)

    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )

    # Get the dataset: a Hub dataset, an image folder, or the bundled digits.
    dataset = load_image_dataset(
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        train_data_dir=args.train_data_dir,
        image_column=args.image_column,
        cache_dir=args.cache_dir,
        max_train_samples=args.max_train_samples,
        seed=args.seed,
    )
    check_batch_size(len(dataset), args.train_batch_size, accelerator.num_processes)
    transform = image_transform(args.resolution, args.center_crop, args.random_flip, num_channels)
    dataset = with_image_transform(dataset, args.image_column, transform)
    logger.info(f"Dataset size: {len(dataset)}")

    # Incomplete batches are dropped: the assignment's effect depends on the batch size. The data order
    # comes from its own generator, re-seeded every epoch (below), so it depends on --seed and the epoch
    # only: a run resumed at any step, on any number of processes, sees the batches an uninterrupted one would.
    data_generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    train_dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.dataloader_num_workers,
        generator=data_generator,
    )

    # Scheduler and math around the number of training steps (per process, as diffusers' examples).
    num_update_steps_per_epoch = math.ceil(
        len(train_dataloader) / accelerator.num_processes / args.gradient_accumulation_steps
    )
    if args.max_train_steps is None:
        max_train_steps = args.num_epochs * num_update_steps_per_epoch
    else:
        max_train_steps = args.max_train_steps
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        # The prepared scheduler steps once per process per optimizer step.
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )

    # Prepare everything with our `accelerator`.
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler
    )
    if ema_model is not None:
        ema_model.to(accelerator.device)
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    num_epochs = math.ceil(max_train_steps / num_update_steps_per_epoch)

    if args.seed is not None:
        set_seed(args.seed, device_specific=True)
    knn_generator = assignment_generator(args.seed, accelerator.process_index, accelerator.device)
    # With --seed, the KNN candidates are re-seeded every micro-batch from (seed, process, step) (in the
    # loop), which resumes each process exactly; without it, the saved generator state lets a resumed run draw on.
    accelerator.register_for_checkpointing(CheckpointableGenerator(knn_generator))

    if accelerator.is_main_process:
        accelerator.init_trackers(Path(__file__).stem)

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {len(dataset)}")
    logger.info(f"  Num Epochs = {num_epochs}")
    logger.info(f"  Instantaneous batch size per device = {args.train_batch_size}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size}")
    logger.info(f"  Gradient Accumulation steps = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {max_train_steps}")
    logger.info(f"  Assignment = {args.assignment} (scope {args.assignment_scope})")
    logger.info(f"  Weighting scheme = {args.weighting_scheme}, flow shift = {args.flow_shift}")

    global_step = 0
    first_epoch = 0
    resume_batches = 0
    if args.resume_from_checkpoint and checkpoint is None:
        logger.info("No checkpoint to resume from yet: starting a new training run.")
    if checkpoint is not None:
        logger.info(f"Resuming from checkpoint {checkpoint}")
        accelerator.load_state(str(checkpoint))
        if ema_model is not None:
            ema_model.to(accelerator.device)  # its weights come back on the CPU
        global_step = checkpoint_step(checkpoint)
        first_epoch = global_step // num_update_steps_per_epoch
        resume_batches = (global_step % num_update_steps_per_epoch) * args.gradient_accumulation_steps

    @contextlib.contextmanager
    def model_for_inference() -> Iterator[UNet2DModel]:
        """The trained UNet, holding the EMA weights (if any) until the block ends."""
        unwrapped = accelerator.unwrap_model(model)
        if ema_model is None:
            yield unwrapped
            return
        # The EMA weights go into the model itself: a new UNet to hold them would draw its initial weights
        # from the global random stream, and a resumed run would go on from a different random state.
        with ema_weights_swapped_in(ema_model, unwrapped):
            yield unwrapped

    def save_models(folder: Path) -> None:
        # Plain `save_pretrained` folders, so evaluation can load any checkpoint's model without accelerate;
        # the scheduler too, so that each checkpoint says how to sample it even before the final pipeline exists.
        accelerator.unwrap_model(model).save_pretrained(folder / "unet")
        if ema_model is not None:
            with model_for_inference() as ema_unet:
                ema_unet.save_pretrained(folder / "unet_ema")
        noise_scheduler.save_pretrained(folder / "scheduler")

    def save_samples(step: int) -> Path:
        with model_for_inference() as unet:
            images = generate_samples(unet, noise_scheduler, args, accelerator.device)
        path = save_sample_grid(images, output_dir, step)
        if args.logger == "tensorboard":
            tracker = accelerator.get_tracker("tensorboard", unwrap=True)
            tracker.add_images("samples", torch.stack([pil_to_tensor(image) for image in images]), step)
        return path

    train_log = TrainLog(output_dir, accelerator, resume_step=global_step)
    step_stats = StepAccumulator()
    progress_bar = tqdm(
        total=max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process, desc="Steps"
    )

    for epoch in range(first_epoch, num_epochs):
        if global_step >= max_train_steps:
            break
        model.train()
        if data_generator is not None:
            data_generator.manual_seed(args.seed + epoch)
        batches = train_dataloader
        if epoch == first_epoch and resume_batches > 0:
            batches = accelerator.skip_first_batches(train_dataloader, resume_batches)
        micro_step = 0  # micro-batches of the current optimizer step so far (gradient accumulation)
        for batch in batches:
            clean_images = batch["input"]
            if args.seed is not None:
                # KNN candidates that depend on where the run is, not on what it drew before: exact resumes.
                reseed_assignment_generator(
                    knn_generator, args.seed, accelerator.process_index, step=global_step, micro_step=micro_step
                )
            micro_step += 1
            with accelerator.accumulate(model):
                step = compute_loss(model, sigma_grid, clean_images, args, knn_generator)
                accelerator.backward(step.loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            step_stats.add(
                step.loss.detach(),
                step.assignment_stats,
                step.assign_seconds,
                clean_images,
                (step.noise_before_assignment, step.sigmas),
            )

            # Checks if the accelerator has performed an optimization step behind the scenes
            if accelerator.sync_gradients:
                if ema_model is not None:
                    ema_model.step(model.parameters())
                global_step += 1
                micro_step = 0
                values = step_stats.reduce(accelerator)
                step_stats.reset()
                lr = lr_scheduler.get_last_lr()[0]
                train_log.log(global_step, epoch, lr, values)
                progress_bar.update(1)
                progress_bar.set_postfix(
                    loss=f"{values['loss']:.4f}",
                    lr=f"{lr:.2e}",
                    dist=f"{values['assign_distance_before']:.3f}->{values['assign_distance_after']:.3f}",
                )
                if global_step % args.checkpointing_steps == 0:
                    path = save_checkpoint(
                        accelerator, output_dir, global_step, save_models, args.checkpoints_total_limit
                    )
                    logger.info(f"Saved state to {path}")
                if global_step >= max_train_steps:
                    break

        # Sample grids and the pipeline every few epochs (the final ones are saved after the loop). A run
        # resumed after this epoch skips this work, so it must leave the random stream as it was.
        if accelerator.is_main_process and global_step < max_train_steps:
            with rng_preserved(accelerator.device):
                if epoch % args.save_images_epochs == 0:
                    save_samples(global_step)
                if epoch % args.save_model_epochs == 0:
                    with model_for_inference() as unet:
                        save_pipeline_with_card(
                            output_dir,
                            unet,
                            noise_scheduler,
                            args,
                            global_step,
                            None,
                            accelerator.num_processes,
                            hub_repo_id,
                        )

    progress_bar.close()
    train_log.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        grid = save_samples(global_step)
        with model_for_inference() as unet:
            save_pipeline_with_card(
                output_dir,
                unet,
                noise_scheduler,
                args,
                global_step,
                grid,
                accelerator.num_processes,
                hub_repo_id,
            )
        logger.info(f"Saved the pipeline, its model card and samples to {output_dir} (step {global_step})")
        if args.push_to_hub:
            url = push_output_dir(output_dir, hub_repo_id, token=args.hub_token, private=args.hub_private_repo)
            logger.info(f"Pushed to {url}")
    accelerator.end_training()



if __name__ == "__main__":
    main(parse_args())
