"""``TrainingRun``: the plumbing every training script shares, once.

A script builds its model, data, loss and samples and hands the rest to a ``TrainingRun``: the accelerator
and its trackers, seeding, ``accelerator.prepare``, the EMA moved with the model (after preparing and after
every resume), resuming (recipe checked, newer checkpoints set aside), the micro-batch loop with the
per-micro-batch reseeding of the run's generators, one ``train_log.csv`` row per optimizer step,
checkpoints, and the final save and push. The order of every random draw is that of the scripts before
this class existed, so their train logs are unchanged (``tests/golden``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.utils import is_wandb_available
from tqdm.auto import tqdm

from .checkpoints import (
    check_recipe,
    checkpoint_step,
    remove_partial_checkpoints,
    resolve_resume_checkpoint,
    save_checkpoint,
    set_aside_newer_checkpoints,
)
from .data import dataset_display_name, image_transform, load_image_dataset, with_image_transform
from .hub import create_hub_repo, push_output_dir
from .logs import StepAccumulator, TrainLog
from .model_card import training_card_metadata, write_model_card
from .models import ema_weights_swapped_in
from .processes import check_batch_size, use_cpu_processes
from .randomness import CheckpointableGenerator, assignment_generator, reseed_assignment_generator, rng_preserved
from .training import save_sample_grid, save_training_config

logger = get_logger(__name__, log_level="INFO")

# What one micro-batch's step function returns besides its loss: assignment statistics, seconds spent
# assigning, the clean batch, and the main random stream's draws (fingerprinted in train_log.csv).
StepRecord = tuple[Any, float, torch.Tensor, Sequence[torch.Tensor]]

# The flags every card's training table shows first (a script adds its own).
CARD_SETTINGS = (
    "assignment", "knn_k", "assignment_distance", "assignment_dtype", "assignment_scope", "train_batch_size",
    "gradient_accumulation_steps", "resolution", "learning_rate", "lr_scheduler", "lr_warmup_steps", "use_ema",
    "mixed_precision", "seed",
)  # fmt: skip


def as_loss_and_record(result) -> tuple[torch.Tensor, StepRecord]:
    """A step function's result as ``(loss, record)``: a pair already, or a step object with ``loss``,
    ``assignment_stats``, ``assign_seconds``, ``clean_images`` and ``draws`` (what the main stream drew)."""
    if isinstance(result, tuple):
        return result
    return result.loss, (result.assignment_stats, result.assign_seconds, result.clean_images, result.draws)


def load_dataset_from_args(args: argparse.Namespace):
    """``load_image_dataset`` with the script's ``--dataset_name``/``--train_data_dir``/... flags."""
    return load_image_dataset(
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        train_data_dir=args.train_data_dir,
        image_column=args.image_column,
        cache_dir=args.cache_dir,
        max_train_samples=args.max_train_samples,
        seed=args.seed,
    )


def training_dataloader(
    dataset, args: argparse.Namespace, num_processes: int, collate_fn: Callable | None = None
) -> tuple[torch.utils.data.DataLoader, torch.Generator | None]:
    """The shuffled training loader (incomplete batches dropped) and its data-order generator.

    Incomplete batches are dropped: the assignment's effect depends on the batch size. The data order comes
    from its own generator, reseeded every epoch by ``TrainingRun.train`` from (--seed, epoch), so a run
    resumed at any step, on any number of processes, sees the batches an uninterrupted one would.
    """
    check_batch_size(len(dataset), args.train_batch_size, num_processes)
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.dataloader_num_workers,
        generator=generator,
        collate_fn=collate_fn,
    )
    return loader, generator


def image_dataloader(
    args: argparse.Namespace, num_channels: int, num_processes: int
) -> tuple[torch.utils.data.DataLoader, torch.Generator | None]:
    """The loader of ``{"input": image tensor}`` batches of the pixel-space scripts, and its data-order generator."""
    transform = image_transform(args.resolution, args.center_crop, args.random_flip, num_channels)
    dataset = with_image_transform(load_dataset_from_args(args), args.image_column, transform)
    return training_dataloader(dataset, args, num_processes)


class TrainingRun:
    """One training run: accelerator, trackers, resume, the optimizer-step loop, checkpoints and the final save.

    ``report_to`` is the tracker flag's value ("tensorboard", "wandb" or "all"); ``recipe`` what checkpoints
    record and a resume must match (the model config is added in ``prepare``).
    """

    def __init__(
        self,
        args: argparse.Namespace,
        *,
        script: str,
        report_to: str,
        tracker_project: str,
        prediction_type: str | None,
    ) -> None:
        self.args = args
        # Columns of the saved sample grids (None: near-square); a recipe whose grid has a meaning per row sets it.
        self.grid_columns: int | None = None
        self.output_dir = Path(args.output_dir)
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise ValueError(f"--output_dir {args.output_dir!r} is a file, not a folder")
        if (report_to == "wandb" or (report_to == "all" and is_wandb_available())) and args.hub_token is not None:
            raise ValueError("--hub_token with wandb would expose the token; log in with `hf auth login` instead")
        if report_to == "wandb" and not is_wandb_available():
            raise ImportError("--report_to wandb needs wandb: pip install wandb")
        self.report_to = report_to
        self.tracker_project = tracker_project
        self.recipe: dict[str, Any] = {"script": script, "prediction_type": prediction_type}
        self.accelerator = accelerator = Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision=args.mixed_precision,
            log_with=report_to,
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / args.logging_dir)
            ),
            cpu=use_cpu_processes(),
        )
        logging.basicConfig(
            format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
            datefmt="%m/%d/%Y %H:%M:%S",
            level=logging.INFO,
        )
        logger.info(accelerator.state, main_process_only=False)
        # The same seed everywhere for the weights (DDP also broadcasts rank 0's); each process then draws its
        # own noise.
        if args.seed is not None:
            set_seed(args.seed)
        # Checked before anything is built or written, so that a mistyped checkpoint name fails at once.
        self.checkpoint = resolve_resume_checkpoint(self.output_dir, args.resume_from_checkpoint)
        self.hub_repo_id = None
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            remove_partial_checkpoints(self.output_dir)
            if args.push_to_hub:
                self.hub_repo_id = create_hub_repo(
                    self.output_dir, args.hub_model_id, token=args.hub_token, private=args.hub_private_repo
                )
        self.ema = None
        self._moved_with_model: list[Any] = []
        self.reseeded: list[tuple[torch.Generator, str]] = []
        self.global_step = 0
        self.save_models: Callable[[Path], None] = self.save_unet_folders

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def track_ema(self, ema, register: bool = True) -> None:
        """Step ``ema`` (a diffusers ``EMAModel``) after every optimizer step; keep it on the model's device."""
        self.ema = ema
        self.move_with_model(ema, register)

    def move_with_model(self, obj, register: bool = True) -> None:
        """Keep ``obj`` (``.to(device)``) on the model's device after ``prepare`` and every resume; checkpoint it."""
        self._moved_with_model.append(obj)
        if register:
            self.accelerator.register_for_checkpointing(obj)

    def prepare(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        dataloader: torch.utils.data.DataLoader,
        *,
        num_epochs: int,
        data_generator: torch.Generator | None,
        epoch_seed: Callable[[int, int], int] = lambda seed, epoch: seed + epoch,
        extra_generators: Sequence[tuple[Callable[..., torch.Generator], str]] = (),
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.utils.data.DataLoader, Any]:
        """Build the LR scheduler, ``accelerator.prepare`` everything, make the generators, and resume.

        ``extra_generators``: ``(factory(seed, process_index, device), stream)`` pairs for streams of the
        recipe's own (made before the KNN generator, checkpointed, reseeded every micro-batch like it).
        """
        args, accelerator = self.args, self.accelerator
        steps_per_epoch = math.ceil(len(dataloader) / accelerator.num_processes / args.gradient_accumulation_steps)
        self.max_train_steps = args.max_train_steps or num_epochs * steps_per_epoch
        lr_scheduler = get_scheduler(
            args.lr_scheduler,
            optimizer=optimizer,
            # The prepared scheduler steps once per process per optimizer step.
            num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=self.max_train_steps * accelerator.num_processes,
        )
        model, optimizer, dataloader, lr_scheduler = accelerator.prepare(model, optimizer, dataloader, lr_scheduler)
        self.model, self.optimizer, self.dataloader, self.lr_scheduler = model, optimizer, dataloader, lr_scheduler
        self.data_generator, self.epoch_seed = data_generator, epoch_seed
        for obj in self._moved_with_model:
            obj.to(self.device)
        self.steps_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
        self.num_epochs = math.ceil(self.max_train_steps / self.steps_per_epoch)
        config = accelerator.unwrap_model(model).config
        self.recipe["model_config"] = {k: v for k, v in dict(config).items() if not k.startswith("_")}

        if args.seed is not None:
            set_seed(args.seed, device_specific=True)
        for factory, stream in extra_generators:
            generator = factory(args.seed, accelerator.process_index, self.device)
            self.reseeded.append((generator, stream))
        self.knn_generator = assignment_generator(args.seed, accelerator.process_index, self.device)
        self.reseeded.append((self.knn_generator, "assignment"))
        # With --seed the generators are reseeded every micro-batch from (seed, process, step), which resumes
        # each process exactly; their saved states let runs without --seed draw on after a resume.
        for generator, _ in self.reseeded:
            accelerator.register_for_checkpointing(CheckpointableGenerator(generator))
        if accelerator.is_main_process:
            accelerator.init_trackers(self.tracker_project)
        total = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
        logger.info("***** Running training *****")
        logger.info(f"  Num examples = {len(dataloader.dataset)}")
        logger.info(f"  Num Epochs = {self.num_epochs}")
        logger.info(f"  Instantaneous batch size per device = {args.train_batch_size}")
        logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total}")
        logger.info(f"  Gradient Accumulation steps = {args.gradient_accumulation_steps}")
        logger.info(f"  Total optimization steps = {self.max_train_steps}")
        logger.info(f"  Assignment = {args.assignment} (scope {args.assignment_scope})")
        self._resume()
        return model, optimizer, dataloader, lr_scheduler

    def _resume(self) -> None:
        """Load ``self.checkpoint`` (if any): recipe checked, newer checkpoints set aside, EMA back on the device."""
        self.first_epoch = self.resume_batches = 0
        if self.args.resume_from_checkpoint and self.checkpoint is None:
            logger.info("No checkpoint to resume from yet: starting a new training run.")
        if self.checkpoint is None:
            return
        check_recipe(self.checkpoint, self.recipe)
        self.global_step = checkpoint_step(self.checkpoint)
        if self.is_main_process and self.checkpoint.parent.resolve() == self.output_dir.resolve():
            set_aside_newer_checkpoints(self.output_dir, self.global_step)
        self.accelerator.wait_for_everyone()
        logger.info(f"Resuming from checkpoint {self.checkpoint}")
        self.accelerator.load_state(str(self.checkpoint))
        for obj in self._moved_with_model:
            obj.to(self.device)  # registered objects' weights come back on the CPU
        self.first_epoch = self.global_step // self.steps_per_epoch
        self.resume_batches = (self.global_step % self.steps_per_epoch) * self.args.gradient_accumulation_steps

    @contextlib.contextmanager
    def model_for_inference(self) -> Iterator[torch.nn.Module]:
        """The trained model, holding the EMA weights (if any) until the block ends.

        The EMA weights go into the model itself: a new model to hold them would draw its initial weights
        from the global random stream, and a resumed run would go on from a different random state.
        """
        unwrapped = self.accelerator.unwrap_model(self.model)
        if self.ema is None:
            yield unwrapped
            return
        with ema_weights_swapped_in(self.ema, unwrapped):
            yield unwrapped

    def save_unet_folders(self, folder: Path) -> None:
        """Plain ``save_pretrained`` folders (``unet/``, ``unet_ema/``): checkpoints load without accelerate."""
        self.accelerator.unwrap_model(self.model).save_pretrained(folder / "unet")
        if self.ema is not None:
            with self.model_for_inference() as ema_model:
                ema_model.save_pretrained(folder / "unet_ema")

    def train(
        self,
        step_fn: Callable[[dict], tuple[torch.Tensor, StepRecord]],
        *,
        clip_parameters: Sequence[torch.nn.Parameter] | None = None,
        after_step: Callable[[int], None] | None = None,
        after_epoch: Callable[[int], None] | None = None,
    ) -> None:
        """The optimizer-step loop.

        ``step_fn(batch)`` computes one micro-batch's loss and its record (see ``as_loss_and_record``);
        ``after_step(global_step)`` runs on every process after each optimizer step (before its checkpoint);
        ``after_epoch(epoch)`` on the main process after each epoch but the last, with the random state
        preserved (a resumed run skips it).
        """
        args, accelerator, model = self.args, self.accelerator, self.model
        clip_parameters = list(model.parameters()) if clip_parameters is None else clip_parameters
        train_log = TrainLog(self.output_dir, accelerator, resume_step=self.global_step)
        step_stats = StepAccumulator()
        progress_bar = tqdm(
            total=self.max_train_steps,
            initial=self.global_step,
            disable=not accelerator.is_local_main_process,
            desc="Steps",
        )
        for epoch in range(self.first_epoch, self.num_epochs):
            if self.global_step >= self.max_train_steps:
                break
            model.train()
            if self.data_generator is not None:
                self.data_generator.manual_seed(self.epoch_seed(args.seed, epoch))
            batches = self.dataloader
            if epoch == self.first_epoch and self.resume_batches > 0:
                batches = accelerator.skip_first_batches(self.dataloader, self.resume_batches)
            micro_step = 0  # micro-batches of the current optimizer step so far (gradient accumulation)
            for batch in batches:
                if args.seed is not None:
                    # Draws that depend on where the run is, not on what was drawn before: exact resumes, and
                    # each process keeps its own stream (accelerate restores registered objects from rank 0).
                    for generator, stream in self.reseeded:
                        reseed_assignment_generator(
                            generator, args.seed, accelerator.process_index, self.global_step, micro_step, stream
                        )
                micro_step += 1
                with accelerator.accumulate(model):
                    loss, record = as_loss_and_record(step_fn(batch))
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(clip_parameters, args.max_grad_norm)
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad()
                step_stats.add(loss.detach(), *record)
                if not accelerator.sync_gradients:
                    continue
                if self.ema is not None:
                    self.ema.step(model.parameters())
                self.global_step += 1
                micro_step = 0
                values = step_stats.reduce(accelerator)
                step_stats.reset()
                lr = self.lr_scheduler.get_last_lr()[0]
                train_log.log(self.global_step, epoch, lr, values)
                progress_bar.update(1)
                progress_bar.set_postfix(
                    loss=f"{values['loss']:.4f}",
                    lr=f"{lr:.2e}",
                    dist=f"{values['assign_distance_before']:.3f}->{values['assign_distance_after']:.3f}",
                )
                if after_step is not None:
                    after_step(self.global_step)
                if self.global_step % args.checkpointing_steps == 0:
                    path = save_checkpoint(
                        accelerator,
                        self.output_dir,
                        self.global_step,
                        self.save_models,
                        args.checkpoints_total_limit,
                        recipe=self.recipe,
                    )
                    logger.info(f"Saved state to {path}")
                if self.global_step >= self.max_train_steps:
                    break
            if after_epoch is not None and accelerator.is_main_process and self.global_step < self.max_train_steps:
                with rng_preserved(self.device):
                    after_epoch(epoch)
        progress_bar.close()
        train_log.close()
        accelerator.wait_for_everyone()

    def log_images(self, images: Sequence, step: int, tag: str = "samples") -> None:
        """Send ``images`` (PIL) to the trackers that take images (tensorboard)."""
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                array = np.stack([np.asarray(image.convert("RGB")) for image in images])
                tracker.writer.add_images(tag, array, step, dataformats="NHWC")

    def save_samples(self, generate: Callable[[torch.nn.Module], list]) -> Path:
        """``samples/step_<step>.png`` of ``generate(model)`` (EMA weights, if any), also sent to the trackers."""
        with self.model_for_inference() as model:
            images = generate(model)
        self.log_images(images, self.global_step)
        return save_sample_grid(images, self.output_dir, self.global_step, columns=self.grid_columns)

    def save_pipeline(self, save: Callable[[torch.nn.Module, Path | None], None], grid: Path | None = None) -> None:
        """Call ``save(model, grid)`` with the model holding the EMA weights (if any)."""
        with self.model_for_inference() as model:
            save(model, grid)

    def periodic_saves(
        self, generate: Callable[[torch.nn.Module], list], save: Callable[[torch.nn.Module, Path | None], None]
    ) -> Callable[[int], None]:
        """An ``after_epoch`` hook: a grid every --save_images_epochs, the pipeline every --save_model_epochs."""

        def after_epoch(epoch: int) -> None:
            if epoch % self.args.save_images_epochs == 0:
                self.save_samples(generate)
            if epoch % self.args.save_model_epochs == 0:
                self.save_pipeline(save)

        return after_epoch

    def save_final(
        self, generate: Callable[[torch.nn.Module], list], save: Callable[[torch.nn.Module, Path | None], None]
    ) -> None:
        """The end-of-run sample grid, then the pipeline (with the grid in its card)."""
        self.save_pipeline(save, self.save_samples(generate))

    @property
    def dataset(self) -> str:
        """What the card and ``training_config.json`` call the data: the Hub id, the folder, or the digits."""
        return dataset_display_name(self.args.dataset_name, self.args.train_data_dir)

    def save_card(
        self,
        grid: Path | None,
        *,
        title: str,
        settings: Sequence[str] = (),
        config: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        table: dict[str, Any] | None = None,
        **card: Any,
    ) -> None:
        """``training_config.json`` (every flag, the step, ``config``) and the model card ``README.md``.

        The card's training table shows the assignment and optimisation flags, then ``settings``; ``card`` goes
        to ``write_model_card`` (``pipeline_tag``, ``usage_code``, ``summary``, ``extra_tags``, ...); ``table`` adds
        values the flags do not hold.
        """
        args, step, script = self.args, self.global_step, self.recipe["script"]
        extra = {"num_processes": self.accelerator.num_processes, **(config or {})}
        save_training_config(self.output_dir, args, step, script=script, dataset=self.dataset, **extra)
        shown = (*CARD_SETTINGS, *settings)
        hub = args.dataset_name and not os.path.isdir(args.dataset_name)
        values = vars(args) | {"prediction_type": self.recipe["prediction_type"]}
        write_model_card(
            self.output_dir,
            title=title + ("" if args.assignment == "none" else " with immiscible diffusion"),
            metadata=training_card_metadata(
                values, script=script, global_step=step, dataset=self.dataset, **(metadata or {})
            ),
            training_config={key: getattr(args, key) for key in shown} | (table or {}) | {"global_step": step},
            hub_datasets=[args.dataset_name] if hub else [],
            sample_grid=grid.relative_to(self.output_dir).as_posix() if grid else None,
            **card,
        )

    def finish(self, save_final: Callable[[], None], required_file: str = "model_index.json") -> None:
        """On the main process: ``save_final()`` (pipeline, samples, card), then the push; end the trackers."""
        if self.is_main_process:
            save_final()
            logger.info(f"Saved the run to {self.output_dir} (step {self.global_step})")
            if self.args.push_to_hub:
                url = push_output_dir(
                    self.output_dir,
                    self.hub_repo_id,
                    token=self.args.hub_token,
                    private=self.args.hub_private_repo,
                    required_file=required_file,
                )
                logger.info(f"Pushed to {url}")
        self.accelerator.end_training()
