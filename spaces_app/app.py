#!/usr/bin/env python
"""Vanilla vs immiscible diffusion, side by side: a Gradio app (and Hugging Face Space).

It loads two unconditional pipelines, one trained with the vanilla noise pairing and one with Immiscible
Diffusion's noise assignment, and samples both from the same seed and the same starting noise, with the
sampler, number of steps and number of images you choose. It shows each model card's training facts
(steps, assignment method, quality figures where evaluation added them).

Run it locally with one command (after ``make demo``, which trains the two default models)::

    python spaces_app/app.py                        # or: make space
    python spaces_app/app.py --vanilla user/ddpm-digits-vanilla --immiscible ./my-run --port 7861

Models are Hub ids or local folders (saved pipelines with ``model_index.json``), chosen by, in order:
``--vanilla``/``--immiscible``, the environment variables ``VANILLA_MODEL``/``IMMISCIBLE_MODEL``, then
the defaults: the main job's ``outputs/demo/vanilla`` and ``outputs/demo/immiscible``, or, on a Space
(``SPACE_ID`` is set), the two ids listed under ``models:`` in this folder's ``README.md``.

Space mode (``SPACE_ID`` set, or ``--public``): models are Hub ids only, optionally only those of
``--allowed_models``/``ALLOWED_MODELS``; every other text is refused with one message, without looking at
the server's filesystem (a message that differed for existing and missing folders would let visitors probe it).

Supported pipelines (read from ``model_index.json``'s ``_class_name``), all with a pixel-space ``UNet2DModel``:
``DDPMPipeline``/``DDIMPipeline`` (samplers DDIM, DPM-Solver, Euler, DDPM, all clipping their estimate of the
clean image like DDPM and DDIM do), ``ConsistencyModelPipeline`` (one-step and few-step) and this project's
``FlowMatchingPipeline`` (Euler), saved either the stock way or with its code beside it
(``"_class_name": ["pipeline", "FlowMatchingPipeline"]``, loaded with ``trust_remote_code``). The app needs only
stock diffusers, torch, gradio and huggingface_hub: it runs each sampling loop itself, so both models can start
from one noise tensor, and it never imports the immiscible-diffusers package. Flow models are sampled with
uniform sigmas (every Euler step covers 1/n of the path), the spacing of the package's ``uniform_sigma_schedule``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import os
import re
import sys
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import torch
from diffusers import (
    CMStochasticIterativeScheduler,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UNet2DModel,
)
from diffusers.utils import logging as diffusers_logging
from huggingface_hub import EvalResult, ModelCard, hf_hub_download, metadata_load, snapshot_download
from huggingface_hub import errors as hub_errors
from PIL import Image

logger = logging.getLogger("immiscible_space")

APP_DIR = Path(__file__).resolve().parent

# The checkout this app sits in (spaces_app/..): relative local paths are also looked up there.
REPO_ROOT = APP_DIR.parent
DEMO_DIR = Path("outputs") / "demo"
DEFAULT_LOCAL_MODELS = {"vanilla": str(DEMO_DIR / "vanilla"), "immiscible": str(DEMO_DIR / "immiscible")}
ENV_VARS = {"vanilla": "VANILLA_MODEL", "immiscible": "IMMISCIBLE_MODEL"}
SIDES = ("vanilla", "immiscible")

# Pipeline classes the app samples, by the kind of sampling loop they need.
PIPELINE_KINDS = {
    "DDPMPipeline": "diffusion",
    "DDIMPipeline": "diffusion",
    "ConsistencyModelPipeline": "consistency",
    "FlowMatchingPipeline": "flow",
}
KIND_NAMES = {"diffusion": "DDPM/DDIM", "consistency": "consistency model", "flow": "flow matching"}


@dataclass(frozen=True)
class Sampler:
    kind: str  # the pipeline kind it samples
    scheduler_class: type
    default_steps: int
    min_steps: int = 1
    fixed_steps: int | None = None  # one-step samplers ignore the steps control


SAMPLERS = {
    "DDIM": Sampler("diffusion", DDIMScheduler, default_steps=50),
    "DPM-Solver": Sampler("diffusion", DPMSolverMultistepScheduler, default_steps=20),
    "Euler": Sampler("diffusion", EulerDiscreteScheduler, default_steps=50),
    "DDPM": Sampler("diffusion", DDPMScheduler, default_steps=100),
    "Consistency one-step": Sampler("consistency", CMStochasticIterativeScheduler, default_steps=1, fixed_steps=1),
    "Consistency few-step": Sampler("consistency", CMStochasticIterativeScheduler, default_steps=2, min_steps=2),
    "Flow Euler": Sampler("flow", FlowMatchEulerDiscreteScheduler, default_steps=50),
}
# What a visitor sees first, per pipeline kind: (sampler, steps). Flow models (what `make demo` trains) open at
# 2 Euler steps: few-step flow sampling is where the assignment's gain is largest and plain to see. At 2 steps
# the main job's immiscible model scores digits FD 37.6 against vanilla's 134 (docs/results/main_job.md), and
# the 3-seed benchmark 47 against 128 on 8x8 digits (benchmarks/results/speedup_summary.md, digits8_flow);
# at 1 step both models are far from digits (FD 183 vs 740), at 20 steps the gap shrinks to 7.2 vs 8.9.
# DDPM-family models keep DDIM at 50 steps: in the same file (digits8) DDPM's gain is at 2-4 DDIM steps, where
# both models are still far from digits (FD 75 vs 120 at 4), and at 20 steps the assignment hurts (54 vs 38).
DEFAULT_SAMPLING = {"diffusion": ("DDIM", 50), "consistency": ("Consistency one-step", 1), "flow": ("Flow Euler", 2)}

SAMPLER_HINT = (
    "DDPM/DDIM pipelines: DDIM, DPM-Solver, Euler, DDPM; consistency models: one-step, few-step; "
    "flow matching: Flow Euler."
)
MAX_STEPS = 1000  # for flow models; DDPM-family and consistency models allow their num_train_timesteps at most
MAX_IMAGES = 16
DEFAULT_IMAGES = 16
MAX_SEED = 2**32 - 1
# Work allowed per request, in UNet parameters x pixels per image x images x steps, summed over both models.
# 1e12 is both 1.1M-parameter digits models (16x16) at 16 images x 100 steps: a few seconds to a minute on a
# 2-vCPU CPU Space. Larger requests (big models, DDPM's 1000 steps) are capped, with a warning.
DEFAULT_COMPUTE_BUDGET = 1e12
# Models above this many UNet parameters are refused before their weights are downloaded.
DEFAULT_MAX_PARAMETERS = 200_000_000
MODEL_CACHE_SIZE = 4
DISPLAY_MIN_SIDE = 128  # small images are enlarged (nearest neighbour) so their pixels stay visible
# A Hub model id, owner/name (what Space mode accepts; the Hub's own rules are checked by the Hub).
HUB_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
PUBLIC_REFUSAL = (
    "This Space loads models from the Hugging Face Hub only: enter a model id like `owner/name` "
    "(local paths are not accepted here)."
)


class SpaceError(Exception):
    """A problem to show the user as is (bad input, a model that does not load)."""


# --------------------------------------------------------------------------------------------------
# Models: where they come from, what they are, what their cards say
# --------------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    source: str
    kind: str
    pipeline_class: str
    unet: UNet2DModel
    scheduler_config: dict[str, Any]
    card: dict[str, Any] = field(default_factory=dict)  # the card's YAML metadata, {} without a card
    eval_results: list[EvalResult] = field(default_factory=list)  # the card's `model-index`

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.unet.parameters())

    @property
    def image_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (self.unet.config.in_channels, height, width)

    @property
    def cost_per_image_step(self) -> float:
        return float(self.num_parameters * self.image_shape[1] * self.image_shape[2])

    @property
    def max_steps(self) -> int:
        """The most sampling steps: a DDPM-family or consistency schedule has num_train_timesteps steps."""
        if self.kind == "flow":
            return MAX_STEPS
        return min(MAX_STEPS, int(self.scheduler_config.get("num_train_timesteps") or MAX_STEPS))


def is_hub_id(source: str) -> bool:
    """Whether ``source`` has the form of a Hub model id (``owner/name``); the filesystem is not looked at."""
    return HUB_ID_PATTERN.fullmatch(source) is not None and ".." not in source


@dataclass(frozen=True)
class ModelPolicy:
    """Which models the app loads. Locally: any folder or Hub id. In Space mode (``public``): Hub ids only."""

    public: bool = False
    allowed: frozenset[str] = frozenset()  # Space mode: only these Hub ids (empty: any)
    # Space mode: the ids whose own pipeline code (``pipeline.py``) may run, the operator's choices.
    trusted: frozenset[str] = frozenset()

    def check(self, source: str) -> None:
        """Raise ``SpaceError`` if ``source`` may not be loaded; the message depends on the text alone."""
        if not self.public:
            return
        if not is_hub_id(source):
            raise SpaceError(PUBLIC_REFUSAL)
        if self.allowed and source not in self.allowed:
            raise SpaceError(f"This Space loads only these models: {', '.join(sorted(self.allowed))}.")

    def may_run_code(self, source: str) -> bool:
        return not self.public or source in self.trusted or source in self.allowed


def _looks_like_path(source: str) -> bool:
    """Whether a source that is not an existing folder was meant as one (rather than a Hub id)."""
    return source.startswith((".", "/", "~")) or "\\" in source or source.count("/") > 1 or source.endswith("/")


def resolve_local_folder(source: str) -> Path | None:
    """The existing folder ``source`` names: as given, then relative to the repository root; else None."""
    for candidate in (Path(source).expanduser(), REPO_ROOT / source):
        if candidate.is_dir():
            return candidate
    return None


def _missing_folder_message(source: str) -> str:
    message = f"Local folder `{source}` not found."
    if Path(source).parts[:2] == DEMO_DIR.parts:
        message += " Run `make demo` first: it trains the two default models into `outputs/demo/`."
    return (
        message + " Or give a Hub id or another folder (flags `--vanilla`/`--immiscible`, "
        "env `VANILLA_MODEL`/`IMMISCIBLE_MODEL`)."
    )


def _hub_error_message(source: str, error: Exception) -> str:
    # LocalEntryNotFoundError (offline, nothing cached) is also an EntryNotFoundError: test it first.
    if isinstance(error, hub_errors.LocalEntryNotFoundError):
        return (
            f"Could not reach the Hub to load `{source}` (no connection, or `HF_HUB_OFFLINE=1`), "
            "and it is not in the local cache."
        )
    if isinstance(error, hub_errors.HFValidationError):
        return f"`{source}` is neither a local folder nor a valid Hub model id (expected `owner/name`)."
    if isinstance(error, hub_errors.RepositoryNotFoundError):  # also gated repositories
        return f"Hub model `{source}` not found (or private/gated: set `HF_TOKEN`). Check the id."
    if isinstance(error, hub_errors.EntryNotFoundError):
        return (
            f"Hub repository `{source}` lacks a file diffusers needs ({error}): it is not a saved diffusers pipeline."
        )
    return f"Could not load `{source}` from the Hub: {type(error).__name__}: {error}"


class _Files:
    """Reads the files of a pipeline, from a local folder or a Hub repository.

    With ``hub_only`` (Space mode) the source is never looked up on the filesystem: everything comes from the
    Hub (or its cache), and diffusers only ever sees folders of the Hub cache.
    """

    def __init__(self, source: str, hub_only: bool = False):
        self.source = source
        self.folder = None if hub_only else resolve_local_folder(source)
        if self.folder is None and not hub_only and _looks_like_path(source):
            raise SpaceError(_missing_folder_message(source))

    def path(self, filename: str, required: bool = True) -> Path | None:
        if self.folder is not None:
            path = self.folder / filename
            if path.is_file():
                return path
            if required:
                raise SpaceError(f"`{self.source}` has no `{filename}`: it is not a saved diffusers pipeline.")
            return None
        try:
            return Path(hf_hub_download(self.source, filename))
        except hub_errors.EntryNotFoundError as error:  # the file is not there (or not cached, offline)
            if required:
                raise SpaceError(_hub_error_message(self.source, error)) from error
            return None
        except Exception as error:  # noqa: BLE001 - every Hub failure becomes a message
            raise SpaceError(_hub_error_message(self.source, error)) from error

    def json(self, filename: str) -> dict[str, Any]:
        path = self.path(filename)
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise SpaceError(f"`{self.source}`: cannot read `{filename}` ({error}).") from error

    def local_folder(self, patterns: list[str]) -> Path:
        """A local folder with the files matching ``patterns``: the model's own, or its Hub snapshot."""
        if self.folder is not None:
            return self.folder
        try:
            return Path(snapshot_download(self.source, allow_patterns=patterns))
        except Exception as error:  # noqa: BLE001
            raise SpaceError(_hub_error_message(self.source, error)) from error


def load_model(
    source: str, max_parameters: int = DEFAULT_MAX_PARAMETERS, policy: ModelPolicy = ModelPolicy()
) -> LoadedModel:  # noqa: B008 - a frozen dataclass default is immutable
    """Load the UNet, scheduler config and card metadata of a saved pipeline (Hub id or local folder).

    Raises ``SpaceError`` with a message for the user when it cannot: a source ``policy`` refuses, a missing
    folder, an unknown Hub id, an unsupported pipeline class, a model above ``max_parameters`` (checked before
    downloading weights).
    """
    source = (source or "").strip()
    if not source:
        raise SpaceError("No model given: enter a Hub id or a local folder.")
    policy.check(source)
    files = _Files(source, hub_only=policy.public)
    index = files.json("model_index.json")
    class_name = index.get("_class_name")
    # A pipeline shipped as code beside the model: ["module", "ClassName"] (the module is `module.py`).
    custom_code = isinstance(class_name, list)
    pipeline_class = class_name[-1] if custom_code and class_name else class_name
    kind = PIPELINE_KINDS.get(pipeline_class) if isinstance(pipeline_class, str) else None
    if kind is None:
        raise SpaceError(
            f"`{source}` is a `{pipeline_class}`; this app samples unconditional pixel-space pipelines: "
            f"{', '.join(PIPELINE_KINDS)}."
        )
    if custom_code and not policy.may_run_code(source):
        raise SpaceError(
            f"`{source}` ships its own pipeline code (`{class_name[0]}.py`): this Space runs such code only for "
            "the models its operator chose (`ALLOWED_MODELS`)."
        )
    if list(index.get("unet") or [None, None])[1] != "UNet2DModel":
        raise SpaceError(f"`{source}`: expected a `UNet2DModel` as `unet`, model_index.json says {index.get('unet')}.")
    scheduler_config = files.json("scheduler/scheduler_config.json")
    unet_config = files.json("unet/config.json")
    if unet_config.get("in_channels") not in (1, 3):
        raise SpaceError(
            f"`{source}`: the UNet has {unet_config.get('in_channels')} input channels; only grayscale (1) or "
            "RGB (3) pixel models are supported (latent models need a VAE)."
        )
    # Count parameters on the meta device: no memory, no weights downloaded yet.
    try:
        with torch.device("meta"):
            num_parameters = sum(p.numel() for p in UNet2DModel.from_config(unet_config).parameters())
    except Exception as error:  # noqa: BLE001
        raise SpaceError(f"`{source}`: invalid UNet config ({type(error).__name__}: {error}).") from error
    if num_parameters > max_parameters:
        raise SpaceError(
            f"`{source}` is too large for this Space: {num_parameters:,} UNet parameters "
            f"(limit {max_parameters:,}, `--max_parameters`)."
        )
    if custom_code:
        unet = _custom_pipeline_unet(files, class_name[0])
    else:
        folder = files.local_folder(["unet/*"])
        try:
            unet = UNet2DModel.from_pretrained(folder, subfolder="unet")
        except Exception as error:  # noqa: BLE001
            raise SpaceError(f"`{source}`: the UNet weights do not load. {type(error).__name__}: {error}") from error
    unet.eval().requires_grad_(False)
    card, eval_results = _card(files)
    return LoadedModel(source, kind, pipeline_class, unet, scheduler_config, card=card, eval_results=eval_results)


def _custom_pipeline_unet(files: _Files, module: str) -> UNet2DModel:
    """The UNet of a pipeline shipped as code, loaded the diffusers way (which runs ``<module>.py``)."""
    folder = files.local_folder(["model_index.json", f"{module}.py", "scheduler/*", "unet/*"])
    try:
        pipeline = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    except Exception as error:  # noqa: BLE001
        raise SpaceError(
            f"`{files.source}`: the pipeline does not load with its own code. {type(error).__name__}: {error}"
        ) from error
    if not isinstance(getattr(pipeline, "unet", None), UNet2DModel):
        raise SpaceError(f"`{files.source}`: the pipeline has no `UNet2DModel` as `unet`.")
    return pipeline.unet


def _card(files: _Files) -> tuple[dict[str, Any], list[EvalResult]]:
    """The card's YAML metadata and its `model-index` results; ({}, []) without a card."""
    try:
        path = files.path("README.md", required=False)
        if path is None:
            return {}, []
        data = ModelCard.load(path).data
        return data.to_dict(), list(data.eval_results or [])
    except Exception:  # noqa: BLE001 - a broken card only loses the training facts
        logger.warning("could not read the model card of %s:\n%s", files.source, traceback.format_exc())
        return {}, []


class ModelCache:
    """The last few loaded models, shared by all sessions (loading from the Hub is slow)."""

    def __init__(
        self,
        size: int = MODEL_CACHE_SIZE,
        max_parameters: int = DEFAULT_MAX_PARAMETERS,
        policy: ModelPolicy = ModelPolicy(),  # noqa: B008 - immutable
    ):
        self.size = size
        self.max_parameters = max_parameters
        self.policy = policy
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, source: str, reload: bool = False) -> LoadedModel:
        source = (source or "").strip()
        self.policy.check(source)  # before the cache: a refused source must not be served from it either
        with self._lock:
            if not reload and source in self._models:
                self._models.move_to_end(source)
                return self._models[source]
            model = load_model(source, self.max_parameters, self.policy)
            self._models[source] = model
            while len(self._models) > self.size:
                self._models.popitem(last=False)
            return model

    def peek(self, source: Any) -> LoadedModel | None:
        """The model if it is loaded already (never loads)."""
        with self._lock:
            return self._models.get(source.strip()) if isinstance(source, str) else None


def card_facts_markdown(model: LoadedModel) -> str:
    """The training facts of a model's card (steps, assignment, data, quality figures) as Markdown."""
    channels, height, width = model.image_shape
    lines = [
        f"`{model.source}`: {model.pipeline_class}, {model.num_parameters / 1e6:.2f}M parameters, "
        f"{width}x{height} {'grayscale' if channels == 1 else 'RGB'}"
    ]
    facts = model.card.get("immiscible_diffusers")
    if not isinstance(facts, dict):
        lines.append("\n*The model card has no `immiscible_diffusers` training facts.*")
        return "\n".join(lines + eval_results_markdown(model.eval_results))
    method = facts.get("assignment")
    if method == "knn":
        method = f"knn (k = {facts.get('knn_k')})"
    rows = [
        ("assignment", method if method != "none" else "none (vanilla pairing)"),
        ("training steps", facts.get("global_step")),
        ("batch size", facts.get("train_batch_size")),
        ("dataset", facts.get("dataset")),
        ("resolution", facts.get("resolution")),
        ("prediction type", facts.get("prediction_type")),
        ("seed", facts.get("seed")),
        ("script", facts.get("script")),
    ]
    lines += ["", "| training | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows if value is not None]
    metrics = facts.get("metrics")
    if model.eval_results:  # the Hub's standard place for quality figures; it supersedes the facts' copy
        lines += eval_results_markdown(model.eval_results)
    elif isinstance(metrics, dict) and metrics:
        lines += ["", "| quality | value |", "|---|---|"]
        for name, value in metrics.items():
            if isinstance(value, dict):
                detail = ", ".join(
                    f"{label} {value[key]}"
                    for key, label in (
                        ("step", "step"),
                        ("sampler", "sampler"),
                        ("num_inference_steps", "steps"),
                        ("num_samples", "samples"),
                    )
                    if value.get(key) is not None
                )
                lines.append(f"| {name} | **{value.get('value')}** ({detail}) |")
            else:
                lines.append(f"| {name} | **{value}** |")
    return "\n".join(lines)


def eval_results_markdown(results: list[EvalResult]) -> list[str]:
    """The lines of a table of a card's `model-index` results (metric, value, dataset); [] without any."""
    if not results:
        return []
    lines = ["", "| quality (card's model-index) | value | dataset |", "|---|---|---|"]
    for result in results:
        dataset = result.dataset_name or result.dataset_type
        if result.dataset_split:
            dataset += f" ({result.dataset_split})"
        lines.append(f"| {result.metric_name or result.metric_type} | **{result.metric_value}** | {dataset} |")
    return lines


# --------------------------------------------------------------------------------------------------
# Sampling: one noise tensor, each model's own scheduler loop
# --------------------------------------------------------------------------------------------------


def initial_noise(seed: int, num_images: int, image_shape: tuple[int, int, int]) -> torch.Tensor:
    """The starting noise, drawn once from ``seed`` (on the CPU, so it is the same on every machine)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((num_images, *image_shape), generator=generator)


def clip_range(model: LoadedModel) -> float | None:
    """The range DDPM-family samplers clip their clean-image estimate to, from the model's scheduler config
    (``clip_sample``/``clip_sample_range``, on by default in DDPM and DDIM); None when the model turns it off."""
    if model.kind != "diffusion" or not model.scheduler_config.get("clip_sample", True):
        return None
    return float(model.scheduler_config.get("clip_sample_range", 1.0))


def make_scheduler(model: LoadedModel, sampler_name: str):
    """The sampler's scheduler, configured from the pipeline's saved scheduler config.

    DDPM-family samplers differ from the saved config in two ways, both because the app samples from pure noise
    with any number of steps:

    - ``timestep_spacing="trailing"``: the first step is the last training timestep at every step count. The
      config's ``"leading"`` (DDPM's default) starts 1-step DDIM and Euler at t = 0, on the noise itself, and
      breaks DPM-Solver at as many steps as training timesteps (all timesteps 0, then an IndexError).
    - DPM-Solver gets ``thresholding`` with ``sample_max_value`` = the clip range: its way of clipping the
      clean-image estimate, which DDPM and DDIM do with ``clip_sample``. Without it an estimate made at high
      noise (at t = 999 the image is divided by sqrt(alpha_bar) ~ 0.006) turns small errors of the model into
      saturated tiles. (Euler has no such option; ``sample_model`` clips its estimate itself.)
    """
    config = {key: value for key, value in model.scheduler_config.items() if key != "_use_default_values"}
    if model.kind == "diffusion":
        config["timestep_spacing"] = "trailing"
        limit = clip_range(model)
        if sampler_name == "DPM-Solver" and limit is not None:
            config.update(thresholding=True, sample_max_value=limit)
        if sampler_name == "Euler" and limit is not None:
            config["prediction_type"] = "epsilon"  # sample_model hands it the epsilon of the clipped estimate
    return SAMPLERS[sampler_name].scheduler_class.from_config(config)


def clipped_euler_epsilon(
    scheduler: EulerDiscreteScheduler, prediction_type: str, sample: torch.Tensor, output: torch.Tensor, limit: float
) -> torch.Tensor:
    """The epsilon whose Euler step lands on the model's clean-image estimate clipped to ``[-limit, limit]``.

    Euler's denoised estimate is ``x0 = x - sigma * eps`` (epsilon models); the step is ``x + (sigma_next -
    sigma) * (x - x0) / sigma``. Clipping ``x0`` before the step is what DDIM's ``clip_sample`` does.
    """
    sigma = scheduler.sigmas[scheduler.step_index].to(sample.dtype)
    if prediction_type == "epsilon":
        estimate = sample - sigma * output
    elif prediction_type == "v_prediction":
        estimate = output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
    else:  # "sample"
        estimate = output
    return (sample - estimate.clamp(-limit, limit)) / sigma


@torch.no_grad()
def sample_model(
    model: LoadedModel,
    sampler_name: str,
    num_steps: int,
    noise: torch.Tensor,
    seed: int,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Denoise ``noise`` with the model and sampler; return images in ``[0, 1]``, ``(N, C, H, W)`` on the CPU.

    Stochastic samplers draw their per-step noise from a generator seeded with ``seed``, so two models
    sampled with the same seed also get the same per-step noise.
    """
    scheduler = make_scheduler(model, sampler_name)
    if model.kind == "flow":  # the stock spacing ends at sigma 1/N_train: its last of n steps does almost nothing
        # Uniform sigmas 1, (n-1)/n, ..., 1/n (then 0), as immiscible_diffusers' uniform_sigma_schedule.
        scheduler.set_timesteps(sigmas=[1.0 - i / num_steps for i in range(num_steps)])
    else:
        scheduler.set_timesteps(num_steps)
    device, dtype = model.unet.device, model.unet.dtype
    generator = torch.Generator("cpu").manual_seed(seed)
    # Schedulers that work in sigma space (Euler, consistency models) start from noise scaled to sigma_max.
    sample = noise.to(device=device, dtype=dtype) * getattr(scheduler, "init_noise_sigma", 1.0)
    num_classes = model.unet.config.num_class_embeds
    class_labels = (torch.arange(len(noise)) % num_classes).to(device) if num_classes else None
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    euler_clip = clip_range(model) if isinstance(scheduler, EulerDiscreteScheduler) else None
    timesteps = scheduler.timesteps
    for index, t in enumerate(timesteps):
        model_input = scheduler.scale_model_input(sample, t) if hasattr(scheduler, "scale_model_input") else sample
        output = model.unet(model_input, t.to(device), class_labels=class_labels).sample
        if euler_clip is not None:
            prediction_type = model.scheduler_config.get("prediction_type", "epsilon")
            output = clipped_euler_epsilon(scheduler, prediction_type, sample, output, euler_clip)
        sample = scheduler.step(output, t, sample, **step_kwargs).prev_sample
        if on_step is not None:
            on_step(index + 1, len(timesteps))
    return (sample.float().cpu() / 2 + 0.5).clamp(0, 1)


def to_display_images(images: torch.Tensor, captions: list[str]) -> list[tuple[Image.Image, str]]:
    """PIL images for the gallery, small ones enlarged with nearest-neighbour so each pixel stays a square."""
    array = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    gallery = []
    for pixels, caption in zip(array, captions, strict=True):
        image = (
            Image.fromarray(pixels[..., 0], mode="L") if pixels.shape[-1] == 1 else Image.fromarray(pixels, mode="RGB")
        )
        scale = math.ceil(DISPLAY_MIN_SIDE / min(image.size))
        if scale > 1:
            image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
        gallery.append((image, caption))
    return gallery


# --------------------------------------------------------------------------------------------------
# Requests: checking the controls, capping the work
# --------------------------------------------------------------------------------------------------


def _as_int(value: Any, name: str, low: int, high: int) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SpaceError(f"{name} must be a whole number between {low} and {high}, got {value!r}.") from None
    if not number.is_integer() or not low <= number <= high:
        raise SpaceError(f"{name} must be a whole number between {low} and {high}, got {value!r}.")
    return int(number)


def check_request(sampler_name: Any, steps: Any, seed: Any, num_images: Any) -> tuple[str, int, int, int]:
    """Validate the controls; return ``(sampler_name, steps, seed, num_images)`` or raise ``SpaceError``."""
    if sampler_name not in SAMPLERS:
        raise SpaceError(f"Unknown sampler {sampler_name!r}; choose one of {', '.join(SAMPLERS)}.")
    sampler = SAMPLERS[sampler_name]
    steps = sampler.fixed_steps or _as_int(steps, f"Steps for {sampler_name}", sampler.min_steps, MAX_STEPS)
    seed = _as_int(seed, "Seed", 0, MAX_SEED)
    num_images = _as_int(num_images, "Number of images", 1, MAX_IMAGES)
    return sampler_name, steps, seed, num_images


def check_model_sampler(model: LoadedModel, sampler_name: str, steps: int) -> None:
    sampler = SAMPLERS[sampler_name]
    if sampler.kind != model.kind:
        choices = [name for name, s in SAMPLERS.items() if s.kind == model.kind]
        raise SpaceError(
            f"`{model.source}` is a {KIND_NAMES[model.kind]} ({model.pipeline_class}); sample it with "
            f"{' or '.join(choices)}, not {sampler_name}."
        )
    if steps > model.max_steps:
        raise SpaceError(f"`{model.source}` was trained with {model.max_steps} timesteps: use at most that many steps.")


def cap_request(models: list[LoadedModel], steps: int, num_images: int, budget: float) -> tuple[int, int, str]:
    """Fewer images (then fewer steps) when the request exceeds the compute budget; returns a note if capped."""
    cost = sum(model.cost_per_image_step for model in models)
    if cost * num_images * steps <= budget:
        return steps, num_images, ""
    capped_images = max(1, int(budget // (cost * steps)))
    capped_steps = steps if cost * capped_images * steps <= budget else max(1, int(budget // cost))
    largest = max(models, key=lambda m: m.cost_per_image_step)
    channels, height, width = largest.image_shape
    note = (
        f"Request capped to {capped_images} image{'s' * (capped_images > 1)} x {capped_steps} steps "
        f"(asked: {num_images} x {steps}) to keep this CPU Space responsive: the largest model, `{largest.source}`, "
        f"has {largest.num_parameters / 1e6:.1f}M parameters at {channels}x{height}x{width} "
        f"(compute budget {budget:.2g}, `--compute_budget`)."
    )
    return capped_steps, capped_images, note


# --------------------------------------------------------------------------------------------------
# The UI
# --------------------------------------------------------------------------------------------------


@dataclass
class AppConfig:
    vanilla: str
    immiscible: str
    compute_budget: float = DEFAULT_COMPUTE_BUDGET
    max_parameters: int = DEFAULT_MAX_PARAMETERS
    max_queue: int = 16
    policy: ModelPolicy = field(default_factory=ModelPolicy)


def plain(message: str) -> str:
    """A Markdown message as plain text, for toasts (which show Markdown's backticks and asterisks as typed)."""
    return message.replace("`", "").replace("**", "")


INTRO = """\
# Immiscible Diffusion: vanilla vs immiscible, side by side

Diffusion training pairs each image with random Gaussian noise. [Immiscible Diffusion](https://arxiv.org/abs/2406.12303)
first *assigns* the batch's noise to its images (a linear assignment minimising the total image-noise
distance; or, [KNN](https://arxiv.org/abs/2505.18521), the nearest of k candidates) and trains on that pairing.
Sampling works as usual. Both models below start from **the same noise** (drawn from the seed), and stochastic
samplers give both the same per-step noise, so the differences come from the training alone.
"""


# An empty block of the height of Gradio's progress text and bar (an empty HTML component collapses, and the
# bar would then cover the status line below it).
PROGRESS_STRIP = '<div style="height: 64px"></div>'


def _gallery(label: str, elem_id: str) -> gr.Gallery:
    return gr.Gallery(
        label=label,
        columns=4,
        height="fit-content",  # "auto" would keep Gradio's 450 px minimum, mostly empty for a few small images
        format="png",
        object_fit="contain",
        buttons=["download", "download_all", "fullscreen"],
        interactive=False,
        elem_id=elem_id,
    )


def build_demo(config: AppConfig) -> gr.Blocks:
    """The Gradio app; launch it with ``.launch()`` (the queue is already set up)."""
    cache = ModelCache(max_parameters=config.max_parameters, policy=config.policy)
    # The message of each session's last failed Generate, for the status line (Gradio's failure event gets none).
    last_errors: OrderedDict[str, str] = OrderedDict()
    errors_lock = threading.Lock()

    def remember_error(request: gr.Request | None, message: str) -> None:
        with errors_lock:
            last_errors[getattr(request, "session_hash", None) or ""] = message
            while len(last_errors) > 1000:
                last_errors.popitem(last=False)

    def load_side(source: Any, reload: bool = False) -> tuple[LoadedModel | None, str]:
        if not isinstance(source, str):
            return None, f"A model must be given as text (a Hub id or a folder), got {source!r}."
        try:
            model = cache.get(source, reload=reload)
        except SpaceError as error:
            return None, str(error)
        except Exception as error:  # noqa: BLE001 - the app must not crash on any model
            logger.error("loading %s failed:\n%s", source, traceback.format_exc())
            return None, f"`{source}` does not load: {type(error).__name__}: {error}"
        return model, ""

    def on_page_load(vanilla_source: str, immiscible_source: str, current_sampler: str, current_steps: float):
        """A new visitor: show the (cached) models' training facts."""
        return show_models(vanilla_source, immiscible_source, current_sampler, current_steps, reload=False)

    def on_load_click(vanilla_source: str, immiscible_source: str, current_sampler: str, current_steps: float):
        """The Load button: (re)load both models from their folders or the Hub."""
        return show_models(vanilla_source, immiscible_source, current_sampler, current_steps, reload=True)

    def show_models(vanilla_source, immiscible_source, current_sampler, current_steps, reload: bool):
        """Load both models; show their training facts; offer only the samplers (and steps) that fit them."""
        facts, problems, models = [], [], []
        for side, source in zip(SIDES, (vanilla_source, immiscible_source), strict=True):
            model, error = load_side(source, reload=reload)
            if model is None:
                facts.append(f"**Not loaded.** {error}")
                problems.append(f"**{side.capitalize()} model:** {error}")
                continue
            facts.append(card_facts_markdown(model))
            models.append(model)
        if problems:
            gr.Warning(plain(" ".join(problems)))
            status = "\n\n".join(problems)
        else:
            status = "Both models loaded. Choose a sampler and press **Generate**."
        kinds = [model.kind for model in models]
        fitting = [name for name, s in SAMPLERS.items() if s.kind in kinds] or list(SAMPLERS)
        max_steps = min((model.max_steps for model in models), default=MAX_STEPS)
        if current_sampler in fitting:
            sampler, steps = current_sampler, current_steps
        elif kinds:
            sampler, steps = DEFAULT_SAMPLING[kinds[0]]
        else:
            sampler, steps = fitting[0], SAMPLERS[fitting[0]].default_steps
        hint = f"For these models: {', '.join(fitting)}." if kinds else SAMPLER_HINT
        return (
            facts[0],
            facts[1],
            status,
            gr.update(choices=fitting, value=sampler, info=hint),
            steps_update(sampler, steps, max_steps),
        )

    def steps_update(sampler_name: str, steps: Any, max_steps: int) -> dict[str, Any]:
        """The steps slider for a sampler: its range for the loaded models, ``steps`` kept inside it."""
        sampler = SAMPLERS[sampler_name]
        try:
            steps = int(steps)
        except (TypeError, ValueError):
            steps = sampler.default_steps
        if sampler.fixed_steps is not None:
            return gr.update(value=sampler.fixed_steps, minimum=1, maximum=max_steps, interactive=False)
        steps = min(max(steps, sampler.min_steps), max_steps)
        return gr.update(value=steps, minimum=sampler.min_steps, maximum=max_steps, interactive=True)

    def on_sampler_change(sampler_name: str, vanilla_source: str, immiscible_source: str):
        if sampler_name not in SAMPLERS:
            return gr.update()
        loaded = [cache.peek(source) for source in (vanilla_source, immiscible_source)]
        max_steps = min((model.max_steps for model in loaded if model is not None), default=MAX_STEPS)
        return steps_update(sampler_name, SAMPLERS[sampler_name].default_steps, max_steps)

    def on_generate(
        vanilla_source: Any,
        immiscible_source: Any,
        sampler_name: Any,
        steps: Any,
        seed: Any,
        num_images: Any,
        request: gr.Request,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - how Gradio injects its progress tracker
    ):
        """Sample both models from the same seed and noise; return both galleries, timings and a status line.

        The inputs arrive as sent (the event does not preprocess them), so that a wrong type from an API client
        gets the same clear message as a wrong value.
        """
        try:
            return _generate(vanilla_source, immiscible_source, sampler_name, steps, seed, num_images, progress)
        except SpaceError as error:
            remember_error(request, str(error))
            raise gr.Error(plain(str(error)), print_exception=False) from None
        except Exception as error:  # noqa: BLE001 - report, never crash
            logger.error("generation failed:\n%s", traceback.format_exc())
            message = f"Sampling failed: {type(error).__name__}: {error}"
            remember_error(request, message)
            raise gr.Error(plain(message), print_exception=False) from None

    def on_generate_failed(request: gr.Request):
        """After a failed Generate: no stale images or timings from the previous run; the reason as the status."""
        with errors_lock:
            message = last_errors.pop(getattr(request, "session_hash", None) or "", "the request failed.")
        return [], "", [], "", f"**Not sampled:** {message}"

    def _generate(vanilla_source, immiscible_source, sampler_name, steps, seed, num_images, progress):
        sampler_name, steps, seed, num_images = check_request(sampler_name, steps, seed, num_images)
        progress(0, desc="Loading models")
        models, errors = {}, {}
        for side, source in zip(SIDES, (vanilla_source, immiscible_source), strict=True):
            model, error = load_side(source)
            if model is not None:
                try:
                    check_model_sampler(model, sampler_name, steps)
                except SpaceError as mismatch:
                    model, error = None, str(mismatch)
            if model is None:
                errors[side] = error
            else:
                models[side] = model
        if not models:
            raise SpaceError(" ".join(f"{side.capitalize()} model: {error}" for side, error in errors.items()))

        steps, num_images, cap_note = cap_request(list(models.values()), steps, num_images, config.compute_budget)
        if cap_note:
            gr.Warning(plain(cap_note))
        shapes = {model.image_shape for model in models.values()}
        noises = {shape: initial_noise(seed, num_images, shape) for shape in shapes}
        total = steps * len(models)
        outputs, notes = {}, []
        for done_before, (side, model) in enumerate(models.items()):
            # The progress shows in the status line above both panels, so it may name the side.
            def on_step(step: int, num: int, side: str = side, offset: int = done_before * steps) -> None:
                progress((offset + step, total), desc=f"Sampling the {side} model: step {step}/{num}", unit="steps")

            started = time.perf_counter()
            images = sample_model(model, sampler_name, steps, noises[model.image_shape], seed, on_step)
            seconds = time.perf_counter() - started
            captions = [f"seed {seed} · #{i}" for i in range(num_images)]
            outputs[side] = (to_display_images(images, captions), seconds)
        for side, error in errors.items():
            gr.Warning(plain(f"{side.capitalize()} model: {error}"))
            notes.append(f"**{side.capitalize()} model:** {error}")

        timing = {}
        for side in SIDES:
            if side in outputs:
                seconds = outputs[side][1]
                timing[side] = (
                    f"**{seconds:.2f} s** for {num_images} image{'s' * (num_images > 1)}, {sampler_name}, "
                    f"{steps} step{'s' * (steps > 1)} ({1000 * seconds / steps:.0f} ms per step)"
                )
            else:
                timing[side] = f"**Not sampled.** {errors[side]}"
        if len(models) == 1:
            status = [f"Seed {seed}: only the {next(iter(models))} model sampled."]
        elif len(shapes) == 1:
            status = [f"Seed {seed}: both models sampled from the same starting noise."]
        else:
            status = [f"Seed {seed}: both models sampled from noise of the same seed (their image shapes differ)."]
        if cap_note:
            status.append(f"**Capped:** {cap_note}")
        status += notes
        return (
            outputs.get("vanilla", ([], 0))[0],
            timing["vanilla"],
            outputs.get("immiscible", ([], 0))[0],
            timing["immiscible"],
            "\n\n".join(status),
        )

    default_sampler, default_steps = DEFAULT_SAMPLING["diffusion"]
    with gr.Blocks(title="Immiscible Diffusion: vanilla vs immiscible") as demo:
        gr.Markdown(INTRO)
        models_label = "Models (Hub ids)" if config.policy.public else "Models (Hub ids or local folders)"
        with gr.Accordion(models_label, open=False):
            with gr.Row():
                vanilla_box = gr.Textbox(config.vanilla, label="Vanilla model", elem_id="vanilla-model")
                immiscible_box = gr.Textbox(config.immiscible, label="Immiscible model", elem_id="immiscible-model")
            load_button = gr.Button("Load models", elem_id="load-button")
        with gr.Row():
            with gr.Column(scale=3):
                sampler_radio = gr.Radio(
                    list(SAMPLERS), value=default_sampler, label="Sampler", info=SAMPLER_HINT, elem_id="sampler"
                )
            with gr.Column(scale=2):
                steps_slider = gr.Slider(1, MAX_STEPS, value=default_steps, step=1, label="Steps", elem_id="steps")
        with gr.Row():
            seed_box = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED, elem_id="seed")
            images_slider = gr.Slider(
                1, MAX_IMAGES, value=DEFAULT_IMAGES, step=1, label="Number of images", elem_id="num-images"
            )
            generate_button = gr.Button("Generate", variant="primary", elem_id="generate-button", scale=1)
        # Progress and Gradio's error badge get a strip of their own, above both panels: on a panel the progress
        # of the other side would show, and on the status line the badge would cover its text.
        progress_strip = gr.HTML(PROGRESS_STRIP, elem_id="progress", padding=False)
        status_md = gr.Markdown(elem_id="status")
        with gr.Row():
            with gr.Column():
                gr.Markdown("## Vanilla (random noise pairing)")
                vanilla_gallery = _gallery("Vanilla", "vanilla-gallery")
                vanilla_time = gr.Markdown(elem_id="vanilla-time")
                vanilla_facts = gr.Markdown(elem_id="vanilla-facts")
            with gr.Column():
                gr.Markdown("## Immiscible (assigned noise)")
                immiscible_gallery = _gallery("Immiscible", "immiscible-gallery")
                immiscible_time = gr.Markdown(elem_id="immiscible-time")
                immiscible_facts = gr.Markdown(elem_id="immiscible-facts")

        load_outputs = [vanilla_facts, immiscible_facts, status_md, sampler_radio, steps_slider]
        load_inputs = [vanilla_box, immiscible_box, sampler_radio, steps_slider]
        # Raw inputs here too: the sampler choices an API session last saw must not make Gradio refuse its value.
        demo.load(on_page_load, load_inputs, load_outputs, api_visibility="private", preprocess=False)
        load_button.click(on_load_click, load_inputs, load_outputs, api_name="load_models", preprocess=False)
        sampler_radio.input(
            on_sampler_change, [sampler_radio, vanilla_box, immiscible_box], steps_slider, api_visibility="private"
        )
        generate_outputs = [vanilla_gallery, vanilla_time, immiscible_gallery, immiscible_time, status_md]
        generate_button.click(
            on_generate,
            [vanilla_box, immiscible_box, sampler_radio, steps_slider, seed_box, images_slider],
            generate_outputs,
            api_name="generate",
            preprocess=False,  # check_request checks the raw inputs: clear messages for wrong types too
            show_progress_on=[progress_strip],
        ).failure(on_generate_failed, None, generate_outputs, api_visibility="private", show_progress="hidden")
    # Sampling is CPU-bound: one request at a time, the others wait in a bounded queue.
    demo.queue(max_size=config.max_queue, default_concurrency_limit=1)
    return demo


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def space_models(readme: Path = APP_DIR / "README.md") -> list[str]:
    """The model ids under ``models:`` in the Space's README front matter (vanilla first, then immiscible)."""
    try:
        return list(metadata_load(readme).get("models") or []) if readme.is_file() else []
    except Exception:  # noqa: BLE001 - a broken README only loses the defaults
        return []


def default_model(side: str, flag_value: str | None) -> str:
    """The model for one side: the flag, else its environment variable, else the Space's or the main job's."""
    if flag_value:
        return flag_value
    if os.environ.get(ENV_VARS[side]):
        return os.environ[ENV_VARS[side]]
    listed = space_models()
    if os.environ.get("SPACE_ID") and len(listed) == len(SIDES):
        return listed[SIDES.index(side)]
    return DEFAULT_LOCAL_MODELS[side]


def available_cpus() -> int:
    """CPUs this process may use: its CPU affinity, lowered by a cgroup v2 CPU quota (Spaces run in containers,
    where torch's default thread count can be the host's core count: oversubscribed threads slow sampling down)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cpus


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--vanilla", help=f"Hub id or folder (default: ${ENV_VARS['vanilla']} or {DEFAULT_LOCAL_MODELS['vanilla']})."
    )
    parser.add_argument(
        "--immiscible",
        help=f"Hub id or folder (default: ${ENV_VARS['immiscible']} or {DEFAULT_LOCAL_MODELS['immiscible']}).",
    )
    parser.add_argument(
        "--host", default=None, help="Address to listen on (default: $GRADIO_SERVER_NAME or 127.0.0.1)."
    )
    parser.add_argument("--port", type=int, default=None, help="Port (default: $GRADIO_SERVER_PORT or 7860).")
    parser.add_argument(
        "--public", action="store_true",
        help="Space mode (also on whenever $SPACE_ID is set): models are Hub ids only, never local paths.",
    )  # fmt: skip
    parser.add_argument(
        "--allowed_models", default=os.environ.get("ALLOWED_MODELS", ""),
        help="Space mode: the only Hub ids visitors may load, comma-separated (default: $ALLOWED_MODELS; empty: any).",
    )  # fmt: skip
    parser.add_argument(
        "--max_queue", type=int, default=int(os.environ.get("MAX_QUEUE", 16)), help="Requests waiting at most."
    )
    parser.add_argument(
        "--compute_budget", type=float, default=float(os.environ.get("COMPUTE_BUDGET", DEFAULT_COMPUTE_BUDGET)),
        help="Work per request (UNet parameters x pixels x images x steps, both models); larger requests are capped.",
    )  # fmt: skip
    parser.add_argument(
        "--max_parameters", type=int, default=int(os.environ.get("MAX_PARAMETERS", DEFAULT_MAX_PARAMETERS)),
        help="Refuse models with more UNet parameters than this.",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=int(os.environ.get("TORCH_NUM_THREADS", 0)) or None,
        help="torch CPU threads (default: torch's default, at most the CPUs this container may use).",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    for name in ("max_queue", "compute_budget", "max_parameters"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name} must be > 0, got {getattr(args, name)}")
    args.public = args.public or bool(os.environ.get("SPACE_ID"))
    args.allowed_models = [model.strip() for model in args.allowed_models.split(",") if model.strip()]
    for model in args.allowed_models:
        if not is_hub_id(model):
            parser.error(f"--allowed_models must be Hub ids (owner/name), got {model!r}")
    if args.allowed_models and not args.public:
        parser.error("--allowed_models applies to Space mode: add --public (or run with $SPACE_ID set)")
    return args


def model_policy(args: argparse.Namespace, vanilla: str, immiscible: str) -> ModelPolicy:
    """What visitors may load. Space mode: the operator's two models must be Hub ids (and allowed); they, and
    the allowed ids, may run their own pipeline code."""
    if not args.public:
        return ModelPolicy()
    for side, model in zip(SIDES, (vanilla, immiscible), strict=True):
        if not is_hub_id(model):
            print(f"error: --{side} must be a Hub id (owner/name) in Space mode, got {model!r}", file=sys.stderr)
            raise SystemExit(2)
    allowed = frozenset(args.allowed_models)
    if allowed:
        allowed |= {vanilla, immiscible}
    return ModelPolicy(public=True, allowed=allowed, trusted=frozenset({vanilla, immiscible}))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)  # ours only: httpx would log every request at INFO
    # from_config across scheduler classes logs every config key the other class does not use.
    diffusers_logging.set_verbosity_error()
    torch.set_num_threads(args.threads or min(torch.get_num_threads(), available_cpus()))
    vanilla, immiscible = default_model("vanilla", args.vanilla), default_model("immiscible", args.immiscible)
    config = AppConfig(
        vanilla=vanilla,
        immiscible=immiscible,
        compute_budget=args.compute_budget,
        max_parameters=args.max_parameters,
        max_queue=args.max_queue,
        policy=model_policy(args, vanilla, immiscible),
    )
    logger.info(
        "vanilla model: %s; immiscible model: %s; %d torch threads; %s",
        config.vanilla,
        config.immiscible,
        torch.get_num_threads(),
        "Space mode (Hub ids only)" if args.public else "local mode (folders and Hub ids)",
    )
    build_demo(config).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
