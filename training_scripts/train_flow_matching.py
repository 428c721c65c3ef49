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
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel
from diffusers.training_utils import compute_loss_weighting_for_sd3

from immiscible_diffusers import AssignmentStats
from immiscible_diffusers.arguments import (
    add_assignment_args,
    add_image_training_args,
    finish_image_args,
    positive_float,
    positive_int,
)
from immiscible_diffusers.batch_noise import draw_assigned_noise
from immiscible_diffusers.errors import run_entry_point
from immiscible_diffusers.flow_matching import (
    WEIGHTING_SCHEMES,
    FlowMatchingPipeline,
    flow_matching_inputs,
    sample_training_sigmas,
    save_flow_matching_pipeline,
    training_sigma_grid,
    validate_weighting_options,
)
from immiscible_diffusers.models import build_unet, ema_of
from immiscible_diffusers.optimizers import OPTIMIZERS, build_optimizer
from immiscible_diffusers.run import TrainingRun, image_dataloader
from immiscible_diffusers.sampling import sample_images

SCRIPT_NAME = "train_flow_matching.py"
# What the UNet predicts, in diffusers' name for it (DPMSolver/UniPC call `noise - x` "flow_prediction").
PREDICTION_TYPE = "flow_prediction"


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_image_training_args(parser, output_dir="flow-matching-immiscible")
    # Flags of diffusers' SD3 training script that apply to a pixel UNet.
    parser.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for memory in the UNet.")
    parser.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere or newer GPUs.")
    parser.add_argument("--optimizer", type=str.lower, default="adamw", choices=OPTIMIZERS, help="The optimizer.")
    parser.add_argument("--use_8bit_adam", action="store_true", help="8-bit AdamW from bitsandbytes (CUDA).")

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
    # The density parameters of the SD3 scripts' sigma sampling.
    for flag, default, help_text in (
        ("--logit_mean", 0.0, "Mean of the 'logit_normal' scheme's normal. As in diffusers' SD3 scripts sigma is "
                              "about 1 - sigmoid(n), so a positive mean favours low noise."),
        ("--logit_std", 1.0, "Standard deviation of the 'logit_normal' scheme's normal (> 0)."),
        ("--mode_scale", 1.29, "Scale of the 'mode' scheme's density (SD3 paper), in [-1, 1.75]; used by "
                               "--weighting_scheme mode only."),
    ):  # fmt: skip
        flow.add_argument(flag, type=float, default=default, help=help_text)
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
    flow.add_argument("--num_inference_steps", type=positive_int, default=50, help="Euler steps for the sample grids.")
    add_assignment_args(parser)
    args = finish_image_args(parser, parser.parse_args(input_args))
    try:
        validate_weighting_options(args.weighting_scheme, args.logit_mean, args.logit_std, args.mode_scale)
    except ValueError as error:
        parser.error(f"--{error}")
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
    clean_images: torch.Tensor | None = None

    @property
    def draws(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What the main random stream drew (fingerprinted in train_log.csv): the noise, then the sigmas."""
        return self.noise_before_assignment, self.sigmas


def compute_loss(
    unet: torch.nn.Module,
    sigma_grid: torch.Tensor,
    clean_images: torch.Tensor,
    args: argparse.Namespace,
    knn_generator: torch.Generator | None = None,
) -> FlowMatchingStep:
    """One flow-matching training step on a batch of clean images in ``[-1, 1]``, with immiscible assignment."""
    # Sample the batch's noise and assign it to the images (Immiscible Diffusion), before anything else is drawn.
    noise, assigned_noise, stats, assign_seconds = draw_assigned_noise(clean_images, args, knn_generator)

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
        clean_images=clean_images,
    )


def generate_samples(
    unet: UNet2DModel, noise_scheduler: FlowMatchEulerDiscreteScheduler, args: argparse.Namespace, device
) -> list:
    """A grid's worth of images from ``unet``, always from the same starting noise (seed 0)."""
    # A scheduler of its own: `set_timesteps` would otherwise change the training scheduler's state.
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(noise_scheduler.config)
    pipeline = FlowMatchingPipeline(unet=unet, scheduler=scheduler)
    return sample_images(pipeline, args.eval_batch_size, args.num_inference_steps, device)


def save_pipeline_with_card(
    run: TrainingRun, unet: UNet2DModel, noise_scheduler: FlowMatchEulerDiscreteScheduler, grid: Path | None
) -> None:
    """The pipeline (with ``pipeline.py``), ``training_config.json`` and the model card ``README.md``."""
    save_flow_matching_pipeline(FlowMatchingPipeline(unet=unet, scheduler=noise_scheduler), run.output_dir)
    repo = run.hub_repo_id or str(run.output_dir)
    usage = f"""
from diffusers import DiffusionPipeline

# The pipeline class ships with the model as pipeline.py (torch and diffusers only), named in model_index.json.
pipeline = DiffusionPipeline.from_pretrained("{repo}", trust_remote_code=True)
images = pipeline(batch_size=16, num_inference_steps=50).images  # Euler steps, FlowMatchEulerDiscreteScheduler

# or, with immiscible-diffusers installed (no remote code):
from immiscible_diffusers.flow_matching import FlowMatchingPipeline

pipeline = FlowMatchingPipeline.from_pretrained("{repo}")
"""
    args = run.args
    flow_settings = ("weighting_scheme", "num_train_timesteps", "flow_shift")
    run.save_card(
        grid,
        title=f"Rectified flow on {run.dataset}",
        settings=(*flow_settings, "logit_mean", "logit_std", "mode_scale", "precondition_outputs"),
        config={"prediction_type": PREDICTION_TYPE},
        metadata={key: getattr(args, key) for key in flow_settings},
        pipeline_tag="unconditional-image-generation",
        usage_code=usage,
        summary=(
            f"A UNet2DModel ({unet.num_parameters() / 1e6:.2f}M parameters) trained from scratch for "
            f"{run.global_step} steps with flow matching (rectified flow: the UNet predicts the velocity `noise - x` "
            f"of the straight path `(1 - sigma) * x + sigma * noise`) to generate {args.resolution}x{args.resolution} "
            f"images like those of `{run.dataset}`. The UNet and the scheduler are stock diffusers classes; the small "
            f"pipeline class that runs them ships with the model as `pipeline.py`."
        ),
        extra_tags=("unconditional-image-generation", "flow-matching", "rectified-flow"),
    )


def main(args: argparse.Namespace) -> None:
    run = TrainingRun(
        args, script=SCRIPT_NAME, report_to=args.logger, tracker_project="train_flow_matching",
        prediction_type=PREDICTION_TYPE,
    )  # fmt: skip

    # Initialize the model, and an EMA of its weights (moved and checkpointed with it by the run).
    model = build_unet(args)
    if args.use_ema:
        run.track_ema(ema_of(model, args))
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True

    # The stock scheduler defines the training sigmas and samples the saved pipeline; the assignment
    # happens explicitly in `compute_loss`.
    noise_scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=args.num_train_timesteps, shift=args.flow_shift
    )
    optimizer = build_optimizer(model.parameters(), args, args.optimizer)

    # The data (a Hub dataset, an image folder, or the bundled digits) as [-1, 1] tensors, and its loader.
    num_processes, num_channels = run.accelerator.num_processes, model.config.in_channels
    train_dataloader, data_generator = image_dataloader(args, num_channels, num_processes)
    model, optimizer, train_dataloader, lr_scheduler = run.prepare(
        model, optimizer, train_dataloader, num_epochs=args.num_epochs, data_generator=data_generator
    )
    sigma_grid = training_sigma_grid(noise_scheduler.config).to(run.device)

    def generate(unet: UNet2DModel) -> list:
        return generate_samples(unet, noise_scheduler, args, run.device)

    def save(unet: UNet2DModel, grid: Path | None) -> None:
        save_pipeline_with_card(run, unet, noise_scheduler, grid)

    def train_step(batch: dict) -> FlowMatchingStep:
        return compute_loss(model, sigma_grid, batch["input"], args, run.knn_generator)

    def save_models(folder: Path) -> None:
        # The scheduler too, so that each checkpoint says how to sample it even before the final pipeline exists.
        run.save_unet_folders(folder)
        noise_scheduler.save_pretrained(folder / "scheduler")

    run.save_models = save_models

    run.train(train_step, after_epoch=run.periodic_saves(generate, save))
    run.finish(lambda: run.save_final(generate, save))


if __name__ == "__main__":
    run_entry_point(lambda: main(parse_args()))
