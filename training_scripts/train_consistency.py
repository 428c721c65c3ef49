#!/usr/bin/env python
"""Train a consistency model from scratch (improved consistency training) with Immiscible Diffusion's noise assignment.

Mirrors diffusers' research example ``examples/research_projects/consistency_training/train_cm_ct_unconditional.py``
(the iCT recipe of Song & Dhariwal, 2023: Karras noise levels, lognormal sampling of the noise level
``--p_mean/--p_std``, the discretization curriculum ``--discretization_s_0/_1``, the pseudo-Huber loss
``--huber_c``, ``--class_conditional``) and adds the paper's one step: before the images are noised, the
batch's Gaussian noise is assigned to them (``--assignment linear``: the permutation that minimises the total
image-noise distance; ``knn``: per image the nearest of ``--knn_k`` candidates; ``none``: vanilla consistency
training with the very same data order and random draws).

One noise per image and step: the assigned noise ``z`` gives both the student input ``x + sigma_{i+1} z`` and
the teacher input ``x + sigma_i z``, two points of the same trajectory, and the student is trained to map its
point to what the teacher maps its own to.

The teacher: with ``--teacher_ema_decay 0`` (the default, iCT) it is the student itself, evaluated without
gradient (a stop-gradient copy of the current weights, with the same dropout mask as the student). With
``--teacher_ema_decay mu > 0`` it is a separate copy updated as an exponential moving average of the student
after every optimizer step (the original consistency training of Song et al., 2023). ``--use_ema`` keeps a
further EMA of the student for sampling, as in the example; it never acts as the teacher.

With no ``--dataset_name``/``--train_data_dir`` it trains on scikit-learn's bundled handwritten digits
(1,797 grayscale 8x8 images, upsampled to 16x16), so it runs offline:

    accelerate launch training_scripts/train_consistency.py --output_dir cm-digits --max_train_steps 3000

The output folder holds a ``ConsistencyModelPipeline`` with the stock ``CMStochasticIterativeScheduler``:

    pipeline = ConsistencyModelPipeline.from_pretrained("cm-digits")
    images = pipeline(batch_size=16, num_inference_steps=1).images  # or 2 for two-step sampling

Multi-process: ``accelerate launch --num_processes 2 ...`` or ``torchrun --nproc_per_node 2 ...``.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate.logging import get_logger
from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline, UNet2DModel
from PIL import Image

from immiscible_diffusers import AssignmentStats
from immiscible_diffusers.arguments import (
    LR_SCHEDULERS,
    add_adam_args,
    add_assignment_args,
    add_run_args,
    finish_image_args,
    non_negative_int,
    positive_float,
    positive_int,
    unit_interval_float,
)
from immiscible_diffusers.batch_noise import draw_assigned_noise
from immiscible_diffusers.consistency import (
    ConsistencyDiscretization,
    check_curriculum,
    check_sigma_range,
    consistency_function,
    default_huber_c,
    discretization_steps,
    infer_num_classes,
    noisy_pair,
    pseudo_huber_distance,
    update_teacher,
    with_image_and_label_transform,
)
from immiscible_diffusers.data import DIGITS_DEFAULT_RESOLUTION, image_transform
from immiscible_diffusers.errors import run_entry_point
from immiscible_diffusers.models import build_unet as build_default_unet
from immiscible_diffusers.models import check_unet_resolution, ema_of
from immiscible_diffusers.optimizers import build_optimizer
from immiscible_diffusers.processes import check_batch_size
from immiscible_diffusers.randomness import rng_preserved
from immiscible_diffusers.run import TrainingRun, load_dataset_from_args, training_dataloader

logger = get_logger(__name__, log_level="INFO")

SCRIPT_NAME = "train_consistency.py"


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # ------------ Model ------------
    parser.add_argument("--model_config_name_or_path", type=str, default=None,
                        help="A UNet2DModel config (folder, file or Hub id). Default: a small UNet sized by the "
                             "--unet_* flags.")
    parser.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                        help="Start from these UNet weights (a pipeline folder or Hub id with a unet/ subfolder), not "
                             "from scratch.")
    parser.add_argument("--revision", type=str, default=None, help="Revision of --pretrained_model_name_or_path.")
    parser.add_argument("--variant", type=str, default=None, help="Weights variant of --pretrained_model_name_or_path.")
    parser.add_argument("--unet_block_out_channels", type=str, default="32,64,64",
                        help="Widths of the default UNet's levels, comma-separated (ignored with a model config or "
                             "pretrained model).")
    parser.add_argument("--unet_layers_per_block", type=positive_int, default=1,
                        help="ResNet layers per level of the default UNet.")
    parser.add_argument("--unet_dropout", type=unit_interval_float, default=0.0,
                        help="Dropout of the default UNet (iCT uses 0.3 on CIFAR-10).")
    # ------------ Data ------------
    parser.add_argument("--dataset_name", type=str, default=None,
                        help="A dataset on the Hub (or a local dataset folder) to train on. Without it and without "
                             "--train_data_dir, the script trains on scikit-learn's bundled handwritten digits "
                             "(offline).")
    parser.add_argument("--dataset_config_name", type=str, default=None, help="The config of the Hub dataset.")
    parser.add_argument("--train_data_dir", type=str, default=None,
                        help="A folder of training images (read as an imagefolder).")
    parser.add_argument("--image_column", "--dataset_image_column_name", dest="image_column", type=str, default="image",
                        help="The dataset column holding the images.")
    parser.add_argument(
        "--class_label_column",
        "--dataset_class_label_column_name",
        dest="class_label_column",
        type=str,
        default="label",
        help="With --class_conditional: the dataset column holding the integer class labels.",
    )
    parser.add_argument("--max_train_samples", type=positive_int, default=None,
                        help="Train on this many examples only (picked after a shuffle with --seed), for debugging or "
                             "quick runs.")
    parser.add_argument("--cache_dir", type=str, default=None, help="Where downloaded datasets are cached.")
    parser.add_argument(
        "--resolution",
        type=positive_int,
        default=None,
        help=f"Side of the square training images. Default: {DIGITS_DEFAULT_RESOLUTION} for the digits, 64 otherwise.",
    )
    parser.add_argument("--center_crop", action="store_true",
                        help="Crop the center of each image (default: a random crop).")
    parser.add_argument("--random_flip", action="store_true", help="Flip images horizontally at random.")
    parser.add_argument("--num_channels", type=int, default=None, choices=(1, 3),
                        help="1 (grayscale) or 3 (RGB). Default: the model config's in_channels, else 1 for the "
                             "digits, 3 otherwise.")
    parser.add_argument("--class_conditional", action="store_true",
                        help="Train a class-conditional model on the labels of --class_label_column (UNet2DModel "
                             "num_class_embeds).")
    parser.add_argument("--num_classes", type=positive_int, default=None,
                        help="With --class_conditional: the number of classes (default: read from the dataset's "
                             "labels).")
    parser.add_argument("--class_embed_type", type=str, default=None, choices=("timestep", "identity"),
                        help="With --class_conditional: UNet2DModel's class_embed_type (default: a learned embedding "
                             "per class).")
    parser.add_argument("--dataloader_num_workers", type=non_negative_int, default=0,
                        help="Subprocesses that load data (0: in the main process, best on CPU).")
    # ------------ Training ------------
    parser.add_argument("--output_dir", type=str, default="cm-immiscible",
                        help="Where the pipeline and checkpoints go.")
    parser.add_argument("--train_batch_size", type=positive_int, default=16, help="Batch size per process.")
    parser.add_argument("--num_epochs", "--num_train_epochs", dest="num_epochs", type=positive_int, default=100)
    parser.add_argument("--max_train_steps", type=positive_int, default=None,
                        help="Total optimizer steps; overrides --num_epochs when given. The curriculum is laid out "
                             "over it.")
    parser.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    parser.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for memory in the UNet.")
    parser.add_argument("--learning_rate", type=positive_float, default=1e-4)
    parser.add_argument("--scale_lr", action="store_true",
                        help="Multiply the learning rate by processes x gradient accumulation x batch size.")
    parser.add_argument("--lr_scheduler", type=str, default="cosine", choices=LR_SCHEDULERS)
    parser.add_argument("--lr_warmup_steps", type=non_negative_int, default=500)
    parser.add_argument("--optimizer_type", type=str, default="adamw", choices=("adamw", "radam"),
                        help="iCT uses RAdam.")
    add_adam_args(parser, grad_norm_type=positive_float)
    parser.add_argument("--mixed_precision", type=str, default="no", choices=("no", "fp16", "bf16"))
    parser.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere or newer GPUs.")
    # ------------ Consistency training ------------
    ct = parser.add_argument_group("consistency training (iCT)")
    ct.add_argument("--prediction_type", type=str, default="sample", choices=("sample",),
                    help="The consistency function predicts the clean sample (the only choice, as in the example).")
    ct.add_argument("--sigma_min", type=positive_float, default=0.002, help="Smallest noise level (the boundary).")
    ct.add_argument("--sigma_max", type=positive_float, default=80.0, help="Largest noise level (the prior's std).")
    ct.add_argument("--rho", type=positive_float, default=7.0, help="rho of the Karras noise-level discretization.")
    ct.add_argument("--huber_c", type=positive_float, default=None,
                    help="Pseudo-Huber constant c. Default: iCT's 0.00054 * sqrt(d), d = channels x resolution^2.")
    ct.add_argument("--discretization_s_0", type=positive_int, default=10,
                    help="Noise-level intervals at the start of the curriculum N(k) (doubled over training up to s_1).")
    ct.add_argument("--discretization_s_1", type=positive_int, default=1280,
                    help="Noise-level intervals at the end of the curriculum N(k).")
    ct.add_argument("--constant_discretization_steps", action="store_true",
                    help="Keep N(k) = s_0 throughout instead of the doubling curriculum.")
    ct.add_argument("--p_mean", type=float, default=-1.1, help="Mean of log(sigma) of the lognormal level sampling.")
    ct.add_argument("--p_std", type=positive_float, default=2.0,
                    help="Std of log(sigma) of the lognormal level sampling.")
    ct.add_argument("--skip_steps", type=positive_int, default=1,
                    help="Index gap between the teacher's and the student's noise levels (iCT: 1).")
    ct.add_argument("--teacher_ema_decay", type=unit_interval_float, default=0.0,
                    help="0 (iCT): the teacher is the student without gradient; mu > 0: an EMA of the student "
                         "(original CT).")
    # ------------ EMA of the student (the weights saved for sampling) ------------
    parser.add_argument("--use_ema", action="store_true", help="Keep an exponential moving average of the weights.")
    parser.add_argument("--ema_min_decay", type=unit_interval_float, default=None,
                        help="Smallest EMA decay (default: --ema_max_decay, a constant decay as in iCT).")
    parser.add_argument("--ema_max_decay", type=unit_interval_float, default=0.99993, help="The largest EMA decay.")
    parser.add_argument("--use_ema_warmup", action="store_true",
                        help="Ramp the EMA decay up (--ema_inv_gamma, --ema_power).")
    parser.add_argument("--ema_inv_gamma", type=positive_float, default=1.0,
                        help="EMA warmup: inverse multiplicative factor.")
    parser.add_argument("--ema_power", type=positive_float, default=3 / 4, help="EMA warmup: power.")
    # ------------ Samples, checkpoints, logging, Hub ------------
    parser.add_argument("--eval_batch_size", type=positive_int, default=16, help="Images per row of a sample grid.")
    parser.add_argument("--eval_num_inference_steps", type=str, default="1,2",
                        help="Sampling steps of each row of the sample grids, comma-separated (1 = one-step sampling).")
    parser.add_argument("--validation_steps", type=positive_int, default=200,
                        help="Save a sample grid every X optimizer steps.")
    parser.add_argument("--save_model_epochs", type=positive_int, default=10, help="Save the pipeline every X epochs.")
    parser.add_argument("--tracker_project_name", type=str, default="consistency-training")
    add_run_args(parser, logger_flag=True)
    add_assignment_args(parser)

    args = parser.parse_args(input_args)
    for flag in ("unet_block_out_channels", "eval_num_inference_steps"):
        text = getattr(args, flag)
        try:
            values = tuple(int(v) for v in text.split(","))
        except ValueError:
            parser.error(f"--{flag} must be integers separated by commas, got {text!r}")
        if any(v < 1 for v in values):
            parser.error(f"--{flag} must be positive integers, got {text!r}")
        setattr(args, flag, values)
    finish_image_args(parser, args)
    try:
        check_args(args)
    except ValueError as error:
        parser.error(str(error))
    return args


def check_args(args: argparse.Namespace) -> None:
    """Raise ``ValueError`` for settings that are valid one by one but not together."""
    check_sigma_range(args.sigma_min, args.sigma_max, args.rho)
    check_curriculum(args.discretization_s_0, args.discretization_s_1, args.skip_steps)
    if args.huber_c is not None and not (math.isfinite(args.huber_c) and args.huber_c > 0):
        raise ValueError(f"--huber_c must be a positive number, got {args.huber_c!r}")
    if args.ema_min_decay is not None and args.ema_min_decay > args.ema_max_decay:
        raise ValueError(f"--ema_min_decay {args.ema_min_decay} must not exceed --ema_max_decay {args.ema_max_decay}")
    if not args.class_conditional and (args.num_classes is not None or args.class_embed_type is not None):
        raise ValueError("--num_classes and --class_embed_type need --class_conditional")
    # Checked here, not per step: a distribution that puts no mass on [sigma_min, sigma_max] fails at once.
    discretization_with(args.discretization_s_0 + 1, args)


def build_unet(args: argparse.Namespace, num_classes: int | None) -> UNet2DModel:
    """The student UNet: pretrained weights, a config, or a small default sized by the --unet_* flags."""
    class_kwargs = {"num_class_embeds": num_classes, "class_embed_type": args.class_embed_type} if num_classes else {}
    if args.pretrained_model_name_or_path is None:
        return build_default_unet(args, dropout=args.unet_dropout, **class_kwargs)
    unet = UNet2DModel.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="unet", revision=args.revision, variant=args.variant
    )
    check_unet_resolution(args.resolution, unet.config.down_block_types)
    if num_classes and unet.config.num_class_embeds != num_classes:
        raise ValueError(
            f"the pretrained UNet has num_class_embeds={unet.config.num_class_embeds}, but the data has "
            f"{num_classes} classes"
        )
    return unet


def build_discretization(
    global_step: int, max_train_steps: int, args: argparse.Namespace, device: str | torch.device
) -> ConsistencyDiscretization:
    """The noise levels of the curriculum stage at ``global_step`` (the same on every process and after a resume)."""
    num_sigmas = discretization_steps(
        global_step,
        max_train_steps,
        args.discretization_s_0,
        args.discretization_s_1,
        constant=args.constant_discretization_steps,
    )
    return discretization_with(num_sigmas, args, device)


def discretization_with(
    num_sigmas: int, args: argparse.Namespace, device: str | torch.device = "cpu"
) -> ConsistencyDiscretization:
    """``num_sigmas`` Karras noise levels and their sampling probabilities, from the --sigma_*/--rho/--p_* flags."""
    return ConsistencyDiscretization.build(
        num_sigmas,
        sigma_min=args.sigma_min,
        sigma_max=args.sigma_max,
        rho=args.rho,
        p_mean=args.p_mean,
        p_std=args.p_std,
        skip_steps=args.skip_steps,
        device=device,
    )


@dataclass
class ConsistencyTrainingStep:
    """Everything one micro-batch's consistency step computed (kept for logging and for tests)."""

    loss: torch.Tensor
    noise_before_assignment: torch.Tensor
    noise: torch.Tensor
    pair_indices: torch.Tensor
    teacher_sigmas: torch.Tensor
    student_sigmas: torch.Tensor
    teacher_noisy_images: torch.Tensor
    student_noisy_images: torch.Tensor
    teacher_denoised: torch.Tensor
    student_denoised: torch.Tensor
    assignment_stats: AssignmentStats
    assign_seconds: float


def _fork_devices(device: torch.device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []


def compute_loss(
    unet: torch.nn.Module,
    teacher_unet: torch.nn.Module,
    clean_images: torch.Tensor,
    class_labels: torch.Tensor | None,
    discretization: ConsistencyDiscretization,
    huber_c: float,
    args: argparse.Namespace,
    noise_generator: torch.Generator | None = None,
    knn_generator: torch.Generator | None = None,
) -> ConsistencyTrainingStep:
    """One consistency-training step on a batch of clean images in ``[-1, 1]``, with immiscible assignment.

    ``teacher_unet`` is evaluated without gradient; pass the (unwrapped) student itself for iCT's teacher.
    The noise and the noise levels are drawn from ``noise_generator`` (torch's global generator when ``None``),
    the KNN candidates from ``knn_generator``.
    """
    # Sample the batch's noise and assign it to the images (Immiscible Diffusion), before anything else is drawn.
    noise, assigned_noise, stats, assign_seconds = draw_assigned_noise(
        clean_images, args, knn_generator, noise_generator
    )

    # Noise levels are drawn after the assignment (timesteps come after it in the authors' code): pair i is
    # (sigma_i, sigma_{i+skip}), picked with iCT's discretized lognormal probabilities.
    indices, teacher_sigmas, student_sigmas = discretization.sample_pairs(clean_images.shape[0], noise_generator)

    # The same assigned noise makes both inputs: two points of one trajectory x + sigma z.
    teacher_noisy, student_noisy = noisy_pair(clean_images, assigned_noise, teacher_sigmas, student_sigmas)

    # The teacher and the student see the same dropout mask: the student starts from the RNG state the teacher had.
    with torch.random.fork_rng(devices=_fork_devices(clean_images.device)):
        with torch.no_grad():
            teacher_denoised = consistency_function(
                teacher_unet, teacher_noisy, teacher_sigmas, class_labels, args.sigma_min
            )
    student_denoised = consistency_function(unet, student_noisy, student_sigmas, class_labels, args.sigma_min)

    distance = pseudo_huber_distance(student_denoised, teacher_denoised, huber_c)
    loss = (discretization.loss_weights[indices] * distance).mean()

    return ConsistencyTrainingStep(
        loss=loss,
        noise_before_assignment=noise,
        noise=assigned_noise,
        pair_indices=indices,
        teacher_sigmas=teacher_sigmas,
        student_sigmas=student_sigmas,
        teacher_noisy_images=teacher_noisy,
        student_noisy_images=student_noisy,
        teacher_denoised=teacher_denoised,
        student_denoised=student_denoised,
        assignment_stats=stats,
        assign_seconds=assign_seconds,
    )


def noise_generator_for(seed: int | None, process_index: int, device: str | torch.device) -> torch.Generator:
    """The generator of the noise and the noise levels: one stream per process, checkpointed with the run.

    Not torch's global generator: data loading draws from that one at every new iterator, so a run resumed in
    the middle of an epoch would otherwise draw other noise than the uninterrupted run.
    """
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        state = np.random.SeedSequence([seed % 2**63, process_index, 1]).generate_state(1, dtype=np.uint64)
        generator.manual_seed(int(state[0] % 2**63))
    return generator


def epoch_seed(seed: int, epoch: int) -> int:
    """The data-order seed of one epoch: a function of (seed, epoch) only, distinct for every pair."""
    return int(np.random.SeedSequence([seed % 2**63, epoch]).generate_state(1, dtype=np.uint64)[0] % 2**63)


def stock_scheduler(num_sigmas: int, args: argparse.Namespace) -> CMStochasticIterativeScheduler:
    """The stock scheduler whose noise levels are those of the curriculum stage with ``num_sigmas`` levels."""
    return CMStochasticIterativeScheduler(
        num_train_timesteps=num_sigmas, sigma_min=args.sigma_min, sigma_max=args.sigma_max, rho=args.rho
    )


def generate_sample_rows(
    unet: UNet2DModel, scheduler: CMStochasticIterativeScheduler, args: argparse.Namespace, device
) -> list[Image.Image]:
    """Samples for one grid row per entry of --eval_num_inference_steps, each from the same noise (seed 0)."""
    pipeline = ConsistencyModelPipeline(unet=unet, scheduler=copy.deepcopy(scheduler))
    pipeline.set_progress_bar_config(disable=True)
    num_classes = unet.config.num_class_embeds
    labels = torch.arange(args.eval_batch_size) % num_classes if num_classes else None
    images = []
    for steps in args.eval_num_inference_steps:
        steps = min(steps, scheduler.config.num_train_timesteps)
        generator = torch.Generator(device=device).manual_seed(0)
        images += pipeline(
            batch_size=args.eval_batch_size, class_labels=labels, num_inference_steps=steps, generator=generator
        ).images
    return images


def save_pipeline_with_card(
    run: TrainingRun, unet: UNet2DModel, scheduler: CMStochasticIterativeScheduler, grid: Path | None, huber_c: float
) -> None:
    """The pipeline (stock consistency classes), ``training_config.json`` and the model card ``README.md``."""
    ConsistencyModelPipeline(unet=unet, scheduler=scheduler).save_pretrained(run.output_dir)
    args, num_sigmas = run.args, scheduler.config.num_train_timesteps
    repo = run.hub_repo_id or str(run.output_dir)
    labels = "class_labels=[0, 1, 2, 3], " if unet.config.num_class_embeds else ""
    usage = f"""
from diffusers import ConsistencyModelPipeline

pipeline = ConsistencyModelPipeline.from_pretrained("{repo}")
images = pipeline(batch_size=4, {labels}num_inference_steps=1).images  # one-step sampling
images = pipeline(batch_size=4, {labels}num_inference_steps=2).images  # two-step sampling
"""
    ct_settings = ("sigma_min", "sigma_max", "rho", "p_mean", "p_std", "discretization_s_0", "discretization_s_1")
    card_extra = {key: getattr(args, key) for key in ct_settings}
    card_extra |= {"huber_c": huber_c, "teacher_ema_decay": args.teacher_ema_decay}
    base_model = args.pretrained_model_name_or_path
    teacher = (
        "the student itself without gradient (iCT)."
        if args.teacher_ema_decay == 0
        else f"an exponential moving average of the student (decay {args.teacher_ema_decay})."
    )
    run.save_card(
        grid,
        title=f"Consistency model on {run.dataset}",
        settings=("optimizer_type", *ct_settings, "teacher_ema_decay", "ema_max_decay", "class_conditional"),
        config={"num_discretization_steps": num_sigmas, "num_classes": unet.config.num_class_embeds,
                "huber_c_used": huber_c},
        metadata={"num_discretization_steps": num_sigmas, **card_extra, "class_conditional": args.class_conditional},
        table={"huber_c": huber_c, "num_discretization_steps": num_sigmas},
        pipeline_tag="unconditional-image-generation",
        usage_code=usage,
        summary=(
            f"A UNet2DModel ({unet.num_parameters() / 1e6:.2f}M parameters) trained "
            + ("from scratch" if base_model is None else f"from `{base_model}`")
            + f" by improved consistency training (iCT) for {run.global_step} steps to generate "
            f"{args.resolution}x{args.resolution} images like those of `{run.dataset}` in one or a few steps. At "
            "every step one noise z per image gave both the student's input x + sigma_(i+1) z and the teacher's "
            "input x + sigma_i z" + ("" if args.assignment == "none" else " (z being the assigned noise)")
            + "; the teacher was " + teacher
        ),
        base_model=base_model if base_model and not os.path.isdir(base_model) else None,
        extra_tags=("unconditional-image-generation", "consistency-models", "consistency-training"),
    )  # fmt: skip


def main(args: argparse.Namespace) -> None:
    check_args(args)
    run = TrainingRun(
        args, script=SCRIPT_NAME, report_to=args.logger, tracker_project=args.tracker_project_name,
        prediction_type=args.prediction_type,
    )  # fmt: skip
    run.grid_columns = args.eval_batch_size  # one row per entry of --eval_num_inference_steps

    # Get the dataset first: a class-conditional UNet needs the number of classes.
    dataset = load_dataset_from_args(args)
    check_batch_size(len(dataset), args.train_batch_size, run.accelerator.num_processes)
    num_classes = None
    if args.class_conditional:
        found = infer_num_classes(dataset, args.class_label_column)
        num_classes = args.num_classes or found
        if found > num_classes:
            raise ValueError(f"--num_classes {num_classes} is too small: the dataset has labels up to {found - 1}")

    # Initialize the student model.
    model = build_unet(args, num_classes)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    huber_c = args.huber_c or default_huber_c(model.config.in_channels * args.resolution**2)

    # An EMA of the student (the weights sampled and saved; never the teacher), moved and checkpointed by the run.
    if args.use_ema:
        min_decay = args.ema_max_decay if args.ema_min_decay is None else args.ema_min_decay
        run.track_ema(ema_of(model, args, min_decay=min_decay, use_ema_warmup=args.use_ema_warmup))
    # The original CT's EMA teacher: a separate copy, saved with every checkpoint. iCT's teacher (decay 0) is the
    # student itself, evaluated without gradient in `compute_loss`.
    ema_teacher = None
    if args.teacher_ema_decay > 0:
        ema_teacher = copy.deepcopy(model).requires_grad_(False)
        run.move_with_model(ema_teacher)

    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * run.accelerator.num_processes
    optimizer = build_optimizer(model.parameters(), args, args.optimizer_type)

    transform = image_transform(args.resolution, args.center_crop, args.random_flip, model.config.in_channels)
    label_column = args.class_label_column if args.class_conditional else None
    dataset = with_image_and_label_transform(dataset, args.image_column, label_column, transform)
    train_dataloader, data_generator = training_dataloader(dataset, args, run.accelerator.num_processes)
    model, optimizer, train_dataloader, lr_scheduler = run.prepare(
        model, optimizer, train_dataloader, num_epochs=args.num_epochs, data_generator=data_generator,
        epoch_seed=epoch_seed, extra_generators=[(noise_generator_for, "consistency-noise")],
    )  # fmt: skip
    noise_generator, knn_generator = run.reseeded[0][0], run.knn_generator
    logger.info(f"  Pseudo-Huber c = {huber_c:.5f}; teacher EMA decay = {args.teacher_ema_decay}")

    # The curriculum depends on the step only, so a resumed run continues at the same stage.
    stage = {"discretization": build_discretization(run.global_step, run.max_train_steps, args, run.device)}

    def train_step(batch: dict) -> tuple:
        teacher = ema_teacher if ema_teacher is not None else run.accelerator.unwrap_model(model)
        clean_images = batch["input"]
        step = compute_loss(
            model, teacher, clean_images, batch.get("class_labels"), stage["discretization"], huber_c, args,
            noise_generator, knn_generator,
        )  # fmt: skip
        draws = (step.noise_before_assignment, step.pair_indices)
        return step.loss, (step.assignment_stats, step.assign_seconds, clean_images, draws)

    def scheduler() -> CMStochasticIterativeScheduler:
        return stock_scheduler(stage["discretization"].num_sigmas, args)

    def generate(unet: UNet2DModel) -> list:
        was_training = unet.training
        images = generate_sample_rows(unet.eval(), scheduler(), args, run.device)
        unet.train(was_training)
        return images

    def save(unet: UNet2DModel, grid: Path | None) -> None:
        save_pipeline_with_card(run, unet, scheduler(), grid, huber_c)

    def after_step(global_step: int) -> None:
        if ema_teacher is not None:
            update_teacher(ema_teacher, run.accelerator.unwrap_model(model), args.teacher_ema_decay)
        num_sigmas = stage["discretization"].num_sigmas
        run.accelerator.log({"consistency/num_discretization_steps": num_sigmas}, step=global_step)
        # Every process moves to the next stage of the curriculum at the same step.
        if discretization_steps(
            global_step, run.max_train_steps, args.discretization_s_0, args.discretization_s_1,
            constant=args.constant_discretization_steps,
        ) != num_sigmas:  # fmt: skip
            stage["discretization"] = build_discretization(global_step, run.max_train_steps, args, run.device)
        if run.is_main_process and global_step % args.validation_steps == 0 and global_step < run.max_train_steps:
            with rng_preserved(run.device):
                run.save_samples(generate)

    def after_epoch(epoch: int) -> None:
        if epoch % args.save_model_epochs == 0:
            run.save_pipeline(save)

    run.train(train_step, after_step=after_step, after_epoch=after_epoch)
    run.finish(lambda: run.save_final(generate, save))


if __name__ == "__main__":
    run_entry_point(lambda: main(parse_args()))
