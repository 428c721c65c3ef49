#!/usr/bin/env python
"""Fine-tune Stable Diffusion (text-to-image, in latent space) with Immiscible Diffusion's noise assignment.

Mirrors diffusers' ``examples/text_to_image/train_text_to_image.py`` (same flags, same behaviour) and,
with ``--rank``, its LoRA sibling ``train_text_to_image_lora.py``. One step is added to each training
step, as in the authors' Stable Diffusion code: after the images are encoded
(``vae.encode(pixels).latent_dist.sample() * scaling_factor``), the batch's Gaussian noise is assigned to
the latents (``--assignment linear``: the permutation minimising the total latent-noise distance;
``knn``: per latent the nearest of ``--knn_k`` candidates; ``none``: vanilla training, with the same
random draws). Then ``--noise_offset`` is added to the assigned noise, ``--input_perturbation`` noises
the latents a little more, and the target (epsilon, or ``get_velocity`` for v-prediction) is built from
the assigned noise (see ``immiscible_diffusers.latent.prepare_noise_and_target``).

    accelerate launch training_scripts/train_text_to_image.py \\
      --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --dataset_name lambdalabs/naruto-blip-captions --resolution 512 --train_batch_size 16 \\
      --mixed_precision fp16 --gradient_checkpointing --use_ema --max_train_steps 15000 \\
      --output_dir sd-naruto-immiscible

Add ``--rank 4`` to train LoRA adapters of the UNet's attention projections instead of the whole UNet.
"""

from __future__ import annotations

import argparse
import os
import random
from dataclasses import dataclass
from pathlib import Path

import datasets
import diffusers
import numpy as np
import torch
import transformers
from accelerate.logging import get_logger
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import EMAModel, cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from diffusers.utils.import_utils import is_xformers_available
from transformers import CLIPTextModel, CLIPTokenizer

from immiscible_diffusers.arguments import (
    LR_SCHEDULERS,
    TRACKERS,
    add_adam_args,
    add_assignment_args,
    add_debug_arg,
    assignment_kwargs,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from immiscible_diffusers.data import dataset_display_name, image_transform
from immiscible_diffusers.errors import run_entry_point
from immiscible_diffusers.latent import PREDICTION_TYPES, NoisedLatents, prepare_noise_and_target, snr_weighted_mse
from immiscible_diffusers.model_card import training_card_metadata, write_model_card
from immiscible_diffusers.optimizers import build_optimizer
from immiscible_diffusers.processes import check_batch_size
from immiscible_diffusers.run import CARD_SETTINGS, TrainingRun, load_dataset_from_args, training_dataloader
from immiscible_diffusers.training import save_sample_grid, save_training_config

logger = get_logger(__name__, log_level="INFO")

SCRIPT_NAME = "train_text_to_image.py"
# The attention projections of the UNet, as in diffusers' LoRA example.
LORA_TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# Captions of the bundled digits, the offline default dataset.
DIGITS_CAPTION = "a handwritten digit {label}"
PRETRAINED_HELP = (
    "A Stable Diffusion pipeline (Hub id or folder) with vae/, text_encoder/, tokenizer/, unet/, scheduler/."
)


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained_model_name_or_path", type=str, required=True, help=PRETRAINED_HELP)
    parser.add_argument("--revision", type=str, default=None, help="Revision of the pretrained model on the Hub.")
    parser.add_argument("--variant", type=str, default=None, help="Variant of the model files, e.g. 'fp16'.")
    parser.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help=(
            "A dataset on the Hub (or a local dataset folder) with images and captions. Without it and without "
            "--train_data_dir, the script trains on scikit-learn's bundled digits captioned "
            f"'{DIGITS_CAPTION.format(label='N')}' (offline)."
        ),
    )
    parser.add_argument("--dataset_config_name", type=str, default=None, help="The config of the Hub dataset.")
    parser.add_argument("--train_data_dir", type=str, default=None,
                        help="A folder of images read as an imagefolder; a metadata.jsonl in it gives the captions.")
    parser.add_argument("--image_column", type=str, default="image", help="The dataset column holding the images.")
    parser.add_argument("--caption_column", type=str, default="text",
                        help="The dataset column holding a caption or a list of captions (one is picked at random per "
                             "step).")
    parser.add_argument("--max_train_samples", type=positive_int, default=None,
                        help="Train on this many examples only (picked after a shuffle with --seed), for debugging or "
                             "quick runs.")
    parser.add_argument("--validation_prompts", type=str, default=None, nargs="+",
                        help="Prompts sampled every --validation_epochs and at the end (samples/step_<step>.png, "
                             "tensorboard).")
    parser.add_argument("--validation_epochs", type=positive_int, default=5, help="Validate every X epochs.")
    parser.add_argument("--validation_inference_steps", type=positive_int, default=20,
                        help="Denoising steps of validation images.")
    parser.add_argument("--output_dir", type=str, default="sd-model-finetuned",
                        help="Where the pipeline and checkpoints go.")
    parser.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and datasets go.")
    parser.add_argument("--seed", type=int, default=None, help="Seed for reproducible training.")
    parser.add_argument("--resolution", type=positive_int, default=512,
                        help="Side of the square training images (a multiple of the VAE's downsampling factor, 8 for "
                             "SD).")
    parser.add_argument("--center_crop", action="store_true",
                        help="Crop the center of each image (default: a random crop).")
    parser.add_argument("--random_flip", action="store_true", help="Flip images horizontally at random.")
    parser.add_argument("--train_batch_size", type=positive_int, default=16, help="Batch size per process.")
    parser.add_argument("--num_train_epochs", type=positive_int, default=100)
    parser.add_argument("--max_train_steps", type=positive_int, default=None,
                        help="Total optimizer steps; overrides --num_train_epochs when given.")
    parser.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    parser.add_argument("--gradient_checkpointing", action="store_true",
                        help="Recompute activations in the backward pass: far less memory, a slower step.")
    parser.add_argument("--learning_rate", type=positive_float, default=1e-4)
    parser.add_argument("--scale_lr", action="store_true",
                        help="Multiply the learning rate by the number of processes, accumulation steps and batch "
                             "size.")
    parser.add_argument("--lr_scheduler", type=str, default="constant", choices=LR_SCHEDULERS)
    parser.add_argument("--lr_warmup_steps", type=non_negative_int, default=500)
    parser.add_argument("--snr_gamma", type=positive_float, default=None,
                        help="Min-SNR loss weighting gamma (arXiv:2303.09556); 5.0 is the recommended value.")
    parser.add_argument("--use_8bit_adam", action="store_true", help="8-bit AdamW from bitsandbytes.")
    parser.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere and newer GPUs.")
    parser.add_argument("--use_ema", action="store_true", help="Keep an EMA of the UNet (full fine-tuning only).")
    parser.add_argument("--foreach_ema", action="store_true", help="Update the EMA with torch._foreach ops (faster).")
    parser.add_argument("--dataloader_num_workers", type=non_negative_int, default=0,
                        help="Subprocesses that load data (0: in the main process).")
    add_adam_args(parser, beta1=0.9, weight_decay=1e-2)
    parser.add_argument("--push_to_hub", action="store_true", help="Upload the output folder (without checkpoints).")
    parser.add_argument("--hub_token", type=str, default=None, help="Token for the Hub (default: your login).")
    parser.add_argument("--hub_model_id", type=str, default=None,
                        help="Repository to push to (default: the folder name).")
    parser.add_argument("--hub_private_repo", action="store_true", help="Create the repository as private.")
    parser.add_argument("--license", type=str, default="creativeml-openrail-m",
                        help="License in the model card. A fine-tune inherits its base model's license: creativeml-"
                             "openrail-m for Stable Diffusion 1.x (what diffusers' example writes), openrail++ for "
                             "2.x.")
    parser.add_argument("--prediction_type", type=str, default=None, choices=PREDICTION_TYPES,
                        help="What the UNet learns to predict. Default: the pretrained scheduler's prediction_type.")
    parser.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder, relative to --output_dir.")
    parser.add_argument("--mixed_precision", type=str, default=None, choices=("no", "fp16", "bf16"),
                        help="Mixed precision; the frozen VAE and text encoder run in it too. Default: accelerate's "
                             "config.")
    parser.add_argument("--report_to", type=str, default="tensorboard", choices=TRACKERS,
                        help="tensorboard, wandb, or all installed.")
    parser.add_argument("--tracker_project_name", type=str, default="text2image-fine-tune")
    parser.add_argument("--local_rank", type=int, default=-1, help="For distributed training: local_rank")
    parser.add_argument("--checkpointing_steps", type=positive_int, default=500,
                        help="Save the training state every X optimizer steps (resume with --resume_from_checkpoint).")
    parser.add_argument("--checkpoints_total_limit", type=positive_int, default=None,
                        help="Keep at most this many checkpoints.")
    parser.add_argument("--resume_from_checkpoint", type=str, default=None,
                        help="'latest' (starts fresh when there is none yet), or a checkpoint folder name or path.")
    parser.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                        help="Use xformers' attention.")
    parser.add_argument("--noise_offset", type=non_negative_float, default=0.0,
                        help="Scale of the offset noise (a constant per sample and channel), added after the "
                             "assignment; try 0.1.")
    parser.add_argument("--input_perturbation", type=non_negative_float, default=0.0,
                        help="Scale of the input perturbation (extra noise in the UNet's input, not in the target); "
                             "0.1 is usual.")
    parser.add_argument("--rank", type=positive_int, default=None,
                        help="Train LoRA adapters of this rank on the UNet's attention projections (to_q, to_k, to_v, "
                             "to_out.0) instead of the whole UNet; saves pytorch_lora_weights.safetensors. Needs peft.")
    add_debug_arg(parser)
    add_assignment_args(parser)

    args = parser.parse_args(input_args)
    env_local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_local_rank != -1 and env_local_rank != args.local_rank:
        args.local_rank = env_local_rank
    if args.rank is not None and args.use_ema:
        parser.error("--use_ema applies to full fine-tuning; it cannot be combined with --rank (LoRA)")
    return args


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def load_captioned_dataset(args: argparse.Namespace):
    """The training split with ``--image_column`` images and ``--caption_column`` captions (checked)."""
    dataset = load_dataset_from_args(args)
    if args.dataset_name is None and args.train_data_dir is None and args.caption_column not in dataset.column_names:
        captions = [DIGITS_CAPTION.format(label=label) for label in dataset["label"]]
        dataset = dataset.add_column(args.caption_column, captions)
    if args.caption_column not in dataset.column_names:
        hint = " (an imagefolder takes captions from a metadata.jsonl)" if args.train_data_dir is not None else ""
        raise ValueError(
            f"--caption_column {args.caption_column!r} is not a column of the dataset{hint}; "
            f"its columns are {dataset.column_names}"
        )
    if len(dataset) > 0:
        check_caption(dataset[0][args.caption_column], args.caption_column)
    return dataset


def check_caption(caption, caption_column: str) -> None:
    """Raise ``ValueError`` unless ``caption`` is a string or a non-empty list of strings."""
    if isinstance(caption, str):
        return
    if isinstance(caption, (list, tuple, np.ndarray)) and len(caption) > 0 and all(isinstance(c, str) for c in caption):
        return
    raise ValueError(
        f"--caption_column {caption_column!r} must hold strings or lists of strings, got {type(caption).__name__}: "
        f"{caption!r}"
    )


def tokenize_captions(tokenizer: CLIPTokenizer, captions, caption_column: str, is_train: bool = True) -> torch.Tensor:
    """Token ids, padded to the tokenizer's length; of a list of captions one is chosen (at random in training)."""
    chosen = []
    for caption in captions:
        check_caption(caption, caption_column)
        if not isinstance(caption, str):
            caption = random.choice(list(caption)) if is_train else caption[0]
        chosen.append(caption)
    return tokenizer(
        chosen, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt"
    ).input_ids


def with_text_to_image_transform(dataset, args: argparse.Namespace, tokenizer: CLIPTokenizer):
    """``dataset`` yielding ``pixel_values`` (RGB in ``[-1, 1]``) and ``input_ids``, transformed on access."""
    transform = image_transform(args.resolution, args.center_crop, args.random_flip, num_channels=3)

    def preprocess(examples: dict) -> dict:
        return {
            "pixel_values": [transform(image) for image in examples[args.image_column]],
            "input_ids": list(tokenize_captions(tokenizer, examples[args.caption_column], args.caption_column)),
        }

    return dataset.with_transform(preprocess)


def collate_fn(examples: list[dict]) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]).contiguous().float(),
        "input_ids": torch.stack([e["input_ids"] for e in examples]),
    }


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def check_pretrained_path(name_or_path: str) -> None:
    """Raise ``ValueError`` for a local path (not a Hub id such as ``user/model``) that is no folder."""
    looks_local = name_or_path.startswith(("/", ".")) or name_or_path.count("/") > 1
    if looks_local and not os.path.isdir(name_or_path):
        raise ValueError(
            f"--pretrained_model_name_or_path {name_or_path!r} is not a folder (nor a Hub id like 'user/model')"
        )


def check_resolution(resolution: int, vae: AutoencoderKL) -> None:
    """Raise ``ValueError`` unless the VAE maps ``resolution`` to whole latents and back."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if resolution % factor:
        raise ValueError(
            f"--resolution {resolution} is not a multiple of the VAE's downsampling factor {factor}: the latents "
            f"would not decode back to {resolution}x{resolution} images"
        )


def add_lora_adapter(unet: UNet2DConditionModel, rank: int) -> list[torch.nn.Parameter]:
    """Freeze ``unet`` and add LoRA adapters of ``rank`` to its attention projections; return the trainable ones."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise ImportError("--rank (LoRA) needs peft: pip install peft") from None
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(LORA_TARGET_MODULES)
        )
    )
    return [p for p in unet.parameters() if p.requires_grad]


def save_lora_weights(folder: str | os.PathLike, unet: UNet2DConditionModel) -> Path:
    """Save the UNet's LoRA adapters in diffusers' format (``pytorch_lora_weights.safetensors``)."""
    from peft.utils import get_peft_model_state_dict

    state_dict = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=state_dict,
        safe_serialization=True,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
    )
    return Path(folder) / LORA_WEIGHT_NAME


def load_lora_weights_into(unet: UNet2DConditionModel, folder: str | os.PathLike) -> None:
    """Load LoRA weights saved by ``save_lora_weights`` into ``unet``'s (already added) adapters."""
    from peft import set_peft_model_state_dict

    state_dict, _ = StableDiffusionPipeline.lora_state_dict(str(folder), weight_name=LORA_WEIGHT_NAME)
    unet_state_dict = {k.removeprefix("unet."): v for k, v in state_dict.items() if k.startswith("unet.")}
    incompatible = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(unet_state_dict), "default")
    unexpected = getattr(incompatible, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"the LoRA weights in {str(folder)!r} do not fit the UNet: unexpected keys {unexpected[:5]}")


def build_pipeline(args: argparse.Namespace, **components) -> StableDiffusionPipeline:
    """The pretrained pipeline with ``components`` replaced; its stock scheduler predicts ``args.prediction_type``.

    The scheduler is the pretrained pipeline's own (e.g. ``PNDMScheduler``), so the pipeline loads with plain
    diffusers; its ``prediction_type`` is set to what was trained, or inference would misread the UNet.
    """
    pipeline = StableDiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path,
        revision=args.revision,
        variant=args.variant,
        cache_dir=args.cache_dir,
        **components,
    )
    if pipeline.scheduler.config.prediction_type != args.prediction_type:
        pipeline.scheduler = type(pipeline.scheduler).from_config(
            pipeline.scheduler.config, prediction_type=args.prediction_type
        )
    return pipeline


# --------------------------------------------------------------------------------------------------
# The training step
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainingStep:
    """Everything one micro-batch's training step computed (kept for logging and for tests)."""

    loss: torch.Tensor
    latents: torch.Tensor
    noised: NoisedLatents
    encoder_hidden_states: torch.Tensor
    model_pred: torch.Tensor


def compute_loss(
    unet: torch.nn.Module,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    noise_scheduler: DDPMScheduler,
    batch: dict[str, torch.Tensor],
    args: argparse.Namespace,
    weight_dtype: torch.dtype = torch.float32,
    knn_generator: torch.Generator | None = None,
) -> TrainingStep:
    """One latent-diffusion training step on a batch of ``pixel_values`` and caption ``input_ids``."""
    # Convert images to latent space.
    with torch.no_grad():
        latents = vae.encode(batch["pixel_values"].to(weight_dtype)).latent_dist.sample()
        latents = latents * vae.config.scaling_factor

    # Noise, its assignment to the latents, noise offset, input perturbation, timesteps and target, in
    # that order (see immiscible_diffusers.latent): the target is built from the assigned noise.
    noised = prepare_noise_and_target(
        latents,
        noise_scheduler,
        prediction_type=args.prediction_type,
        assignment=assignment_kwargs(args),
        noise_offset=args.noise_offset,
        input_perturbation=args.input_perturbation,
        knn_generator=knn_generator,
    )

    # Get the text embedding for conditioning.
    with torch.no_grad():
        encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]

    model_pred = unet(noised.noisy_latents, noised.timesteps, encoder_hidden_states, return_dict=False)[0]
    loss = snr_weighted_mse(
        model_pred, noised.target, noise_scheduler, noised.timesteps, args.prediction_type, args.snr_gamma
    )
    return TrainingStep(
        loss=loss,
        latents=latents,
        noised=noised,
        encoder_hidden_states=encoder_hidden_states,
        model_pred=model_pred,
    )


# --------------------------------------------------------------------------------------------------
# Validation images and the saved run
# --------------------------------------------------------------------------------------------------


def generate_validation_images(pipeline: StableDiffusionPipeline, args: argparse.Namespace, accelerator) -> list:
    """One image per ``--validation_prompts`` prompt, always from the same starting noise (``--seed`` or 0)."""
    pipeline = pipeline.to(accelerator.device)
    pipeline.set_progress_bar_config(disable=True)
    if args.enable_xformers_memory_efficient_attention:
        pipeline.enable_xformers_memory_efficient_attention()
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed if args.seed is not None else 0)
    images = []
    with accelerator.autocast():
        for prompt in args.validation_prompts:
            images.append(
                pipeline(prompt, num_inference_steps=args.validation_inference_steps, generator=generator).images[0]
            )
    return images


def log_validation_images(images: list, output_dir: Path, step: int, accelerator, args: argparse.Namespace) -> Path:
    """Save the grid as ``samples/step_<step>.png`` and send the images to tensorboard."""
    path = save_sample_grid(images, output_dir, step)
    names = {tracker.name for tracker in accelerator.trackers}
    if "tensorboard" in names:
        tracker = accelerator.get_tracker("tensorboard", unwrap=True)
        tracker.add_images("validation", np.stack([np.asarray(image) for image in images]), step, dataformats="NHWC")
    if "wandb" in names:
        import wandb

        tracker = accelerator.get_tracker("wandb", unwrap=True)
        tracker.log(
            {"validation": [wandb.Image(im, caption=p) for im, p in zip(images, args.validation_prompts)]}, step=step
        )
    return path


def save_run_files(
    output_dir: Path,
    args: argparse.Namespace,
    global_step: int,
    sample_grid: Path | None,
    num_processes: int = 1,
    hub_repo_id: str | None = None,
    base_prediction_type: str | None = None,
) -> None:
    """``training_config.json`` and the model card ``README.md`` (pipeline or LoRA weights are saved apart)."""
    dataset = dataset_display_name(args.dataset_name, args.train_data_dir)
    save_training_config(
        output_dir, args, global_step, script=SCRIPT_NAME, dataset=dataset, num_processes=num_processes
    )
    base = args.pretrained_model_name_or_path
    repo = hub_repo_id or str(output_dir)
    prompt = args.validation_prompts[0] if args.validation_prompts else "a photo of an astronaut riding a horse"
    lora = args.rank is not None
    if lora:
        load = (
            f'pipeline = StableDiffusionPipeline.from_pretrained("{base}", torch_dtype=torch.float16).to("cuda")\n'
            f'pipeline.load_lora_weights("{repo}")'
        )
        if base_prediction_type is not None and base_prediction_type != args.prediction_type:
            # LoRA weights carry no scheduler, so the base's would misread the UNet.
            load += (
                "\npipeline.scheduler = type(pipeline.scheduler).from_config("
                f'pipeline.scheduler.config, prediction_type="{args.prediction_type}")'
            )
    else:
        load = f'pipeline = StableDiffusionPipeline.from_pretrained("{repo}", torch_dtype=torch.float16).to("cuda")'
    usage = f"""
import torch
from diffusers import StableDiffusionPipeline

{load}
image = pipeline({prompt!r}).images[0]
image.save("image.png")
"""
    settings = ("pretrained_model_name_or_path", "rank", *CARD_SETTINGS, "prediction_type", "noise_offset",
                "input_perturbation", "snr_gamma")  # fmt: skip
    what = f"LoRA adapters (rank {args.rank}) for the UNet of" if lora else "A fine-tune of"
    is_local = os.path.isdir(base)
    write_model_card(
        output_dir,
        title=f"{'LoRA' if lora else 'Text-to-image'} fine-tune of {Path(base).name if is_local else base} on {dataset}"
        + ("" if args.assignment == "none" else " with immiscible diffusion"),
        metadata=training_card_metadata(
            args,
            script=SCRIPT_NAME,
            global_step=global_step,
            dataset=dataset,
            pretrained_model_name_or_path=base,
            rank=args.rank,
            noise_offset=args.noise_offset,
            input_perturbation=args.input_perturbation,
            snr_gamma=args.snr_gamma,
            use_ema=args.use_ema,
        ),
        pipeline_tag="text-to-image",
        usage_code=usage,
        summary=(
            f"{what} `{base}`, trained for {global_step} steps at {args.resolution}x{args.resolution} on the "
            f"captioned images of `{dataset}`."
        ),
        training_config={key: getattr(args, key) for key in settings} | {"global_step": global_step},
        hub_datasets=[args.dataset_name] if args.dataset_name and not os.path.isdir(args.dataset_name) else [],
        # A local folder is no Hub id; the card's `immiscible_diffusers` metadata still names it.
        base_model=None if is_local else base,
        extra_tags=("stable-diffusion", "stable-diffusion-diffusers", "text-to-image", *(("lora",) if lora else ())),
        sample_grid=sample_grid.relative_to(output_dir).as_posix() if sample_grid else None,
        license=args.license,
    )


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def checkpoint_in_diffusers_format(run: TrainingRun, unet, ema_unet: EMAModel | None, lora: bool, weight_dtype) -> None:
    """Checkpoints hold the UNet in diffusers' format only (``unet/`` and ``unet_ema/``, or the LoRA weights), not
    a second copy in accelerate's: these hooks skip accelerate's own copy and read the diffusers one on resume."""
    accelerator = run.accelerator

    def save_model_hook(models, weights, folder):
        while weights:
            weights.pop()

    def load_model_hook(models, folder):
        while models:
            model = accelerator.unwrap_model(models.pop())
            if lora:
                load_lora_weights_into(model, folder)
                if weight_dtype != torch.float32:
                    cast_training_params(model, dtype=torch.float32)
            else:
                loaded = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
                model.load_state_dict(loaded.state_dict())
                del loaded
        if ema_unet is not None:
            loaded = EMAModel.from_pretrained(os.path.join(folder, "unet_ema"), UNet2DConditionModel)
            ema_unet.load_state_dict(loaded.state_dict())
            del loaded

    def save_models(folder: Path) -> None:
        if lora:
            save_lora_weights(folder, accelerator.unwrap_model(unet))
            return
        accelerator.unwrap_model(unet).save_pretrained(folder / "unet")
        if ema_unet is not None:
            ema_unet.save_pretrained(folder / "unet_ema")

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)
    run.save_models = save_models


def quiet_libraries_off_the_main_process(accelerator) -> None:
    """Library logs: warnings on the local main process (diffusers' info too), errors only elsewhere."""
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_info()
    else:
        for library in (datasets, transformers, diffusers):
            library.utils.logging.set_verbosity_error()


def main(args: argparse.Namespace) -> None:
    # Checked before anything is built, so that a mistyped path fails at once.
    check_pretrained_path(args.pretrained_model_name_or_path)
    run = TrainingRun(
        args, script=SCRIPT_NAME, report_to=args.report_to, tracker_project=args.tracker_project_name,
        prediction_type=None,
    )  # fmt: skip
    accelerator = run.accelerator
    # Recorded as resolved: the flag defaults to accelerate's config.
    args.mixed_precision = accelerator.mixed_precision
    quiet_libraries_off_the_main_process(accelerator)

    # Load scheduler, tokenizer and models. Training uses a DDPMScheduler with the pretrained schedule; the
    # saved pipeline keeps the pretrained (stock) inference scheduler.
    pretrained = {"revision": args.revision, "cache_dir": args.cache_dir}
    noise_scheduler = DDPMScheduler.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="scheduler", **pretrained
    )
    base_prediction_type = noise_scheduler.config.prediction_type
    if args.prediction_type is None:
        if base_prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"the pretrained scheduler predicts {base_prediction_type!r}; pass --prediction_type with one of "
                f"{PREDICTION_TYPES}"
            )
        args.prediction_type = base_prediction_type
    run.recipe["prediction_type"] = args.prediction_type
    noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    tokenizer = CLIPTokenizer.from_pretrained(args.pretrained_model_name_or_path, subfolder="tokenizer", **pretrained)
    text_encoder = CLIPTextModel.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="text_encoder", variant=args.variant, **pretrained
    )
    vae = AutoencoderKL.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="vae", variant=args.variant, **pretrained
    )
    unet = UNet2DConditionModel.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="unet", variant=args.variant, **pretrained
    )
    check_resolution(args.resolution, vae)

    # Freeze vae and text_encoder; train the UNet, or only its LoRA adapters.
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.train()

    # For mixed precision the frozen weights (VAE, text encoder, and the UNet under LoRA) are cast to half
    # precision: they are only used for inference, so full precision is not needed.
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=weight_dtype)

    lora = args.rank is not None
    if lora:
        unet.to(accelerator.device, dtype=weight_dtype)
        trainable_params = add_lora_adapter(unet, args.rank)
        if weight_dtype != torch.float32:
            # The adapters train in float32, whatever the frozen weights' precision.
            cast_training_params(unet, dtype=torch.float32)
            trainable_params = [p for p in unet.parameters() if p.requires_grad]
    else:
        trainable_params = list(unet.parameters())

    # An EMA of the unet, moved with it by the run (checkpointed as unet_ema/ by the hooks below).
    ema_unet = None
    if args.use_ema:
        ema_unet = EMAModel(
            unet.parameters(), model_cls=UNet2DConditionModel, model_config=unet.config, foreach=args.foreach_ema
        )
        run.track_ema(ema_unet, register=False)

    if args.enable_xformers_memory_efficient_attention:
        if not is_xformers_available():
            raise ValueError("--enable_xformers_memory_efficient_attention needs xformers: pip install xformers")
        unet.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True

    checkpoint_in_diffusers_format(run, unet, ema_unet, lora, weight_dtype)

    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = build_optimizer(trainable_params, args)

    # Get the dataset: a Hub dataset, an image folder with captions, or the bundled digits.
    with accelerator.main_process_first():
        dataset = load_captioned_dataset(args)
    check_batch_size(len(dataset), args.train_batch_size, accelerator.num_processes)
    train_dataset = with_text_to_image_transform(dataset, args, tokenizer)
    train_dataloader, data_generator = training_dataloader(
        train_dataset, args, accelerator.num_processes, collate_fn=collate_fn
    )
    unet, optimizer, train_dataloader, lr_scheduler = run.prepare(
        unet, optimizer, train_dataloader, num_epochs=args.num_train_epochs, data_generator=data_generator
    )
    logger.info(f"  Trainable parameters = {sum(p.numel() for p in trainable_params):,} ({'LoRA' if lora else 'UNet'})")
    logger.info(f"  Prediction type = {args.prediction_type}")

    def train_step(batch: dict) -> tuple:
        step = compute_loss(unet, vae, text_encoder, noise_scheduler, batch, args, weight_dtype, run.knn_generator)
        noised = step.noised
        draws = [noised.noise_before_assignment, noised.timesteps]
        draws += [d for d in (noised.offset, noised.perturbation) if d is not None]
        return step.loss, (noised.assignment_stats, noised.assign_seconds, batch["pixel_values"], draws)

    def validate(epoch: int) -> None:
        """Sample the validation prompts with the current (EMA, if any) weights every few epochs."""
        if not args.validation_prompts or epoch % args.validation_epochs:
            return
        with run.model_for_inference() as trained_unet:
            components = {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "unet": trained_unet}
            pipeline = build_pipeline(args, **components, safety_checker=None, torch_dtype=weight_dtype)
            images = generate_validation_images(pipeline, args, accelerator)
        log_validation_images(images, run.output_dir, run.global_step, accelerator, args)

    def save_final() -> None:
        trained_unet = accelerator.unwrap_model(unet)
        if lora:
            save_lora_weights(run.output_dir, trained_unet)
            # As a user would: the base pipeline plus the saved file, which this also checks.
            pipeline = build_pipeline(args, safety_checker=None, torch_dtype=weight_dtype)
            pipeline.load_lora_weights(run.output_dir, weight_name=LORA_WEIGHT_NAME)
        else:
            if ema_unet is not None:
                ema_unet.copy_to(trained_unet.parameters())
            # The frozen VAE and text encoder are reloaded, so they are saved as they were, never in the
            # half precision they ran in; the safety checker (if any) is kept.
            pipeline = build_pipeline(args, unet=trained_unet)
            pipeline.save_pretrained(run.output_dir)
        grid = None
        if args.validation_prompts:
            images = generate_validation_images(pipeline, args, accelerator)
            grid = log_validation_images(images, run.output_dir, run.global_step, accelerator, args)
        save_run_files(
            run.output_dir, args, run.global_step, grid, accelerator.num_processes, run.hub_repo_id,
            base_prediction_type,
        )  # fmt: skip

    run.train(train_step, clip_parameters=trainable_params, after_epoch=validate)
    run.finish(save_final, required_file=LORA_WEIGHT_NAME if lora else "model_index.json")


if __name__ == "__main__":
    run_entry_point(lambda: main(parse_args()))
