#!/usr/bin/env python
"""Does immiscible diffusion reach the same sample quality in fewer training steps — at which sampling budget?

For each regime (a data set and a training recipe: DDPM/DDIM, flow matching or consistency training) this
trains vanilla diffusion (``--assignment none``), linear assignment and KNN with the same seeds (so the same
batches, the same noise draws before assignment and the same initial weights for every method), scores
every checkpoint at several sampling budgets (NFE, model evaluations per sample: 1, 2, 4, 8 and many) from
the same starting noise, and reports per (regime, NFE):

- each method's mean and spread (standard deviation, min, max) across seeds at every checkpoint;
- steps-to-target ratios: for a quality level ``q(f)`` (vanilla's seed-mean quality at the fraction ``f``
  of the training budget), the steps vanilla needs to reach it divided by the steps the immiscible
  method needs, from the seed-mean curves, and per seed (seed pairs share their batches); a curve that
  never reaches the level is reported as a bound (``>`` or ``<``), never as a number;
- a one-line verdict: is the final quality better, worse or within noise of vanilla's (difference of the
  seed means against twice its standard error), and the steps-to-target ratio at vanilla's final quality;
- the mean image-noise distance reduction the assignment achieved (it predicts how much it can matter);
- the wall-clock cost per step, and the training loss beside the quality (never as evidence: assigned
  noise is partly predictable from the image, so the loss falls without the samples getting better).

Controls (``--controls_in``, by default the 2-D toys, where the assignment shortens distances most):
``shuffle`` (a random re-pairing: vanilla in distribution) and ``norm_matched`` (noise moved toward its own
image by the same mean distance the linear assignment saves, without re-pairing), so that "closer noise"
and "better pairing" can be told apart.

Regimes (``--regimes``): ``toy2d`` and ``toy2d_flow`` (8 Gaussians in 2-D, a small MLP trained by the loops
below with the DDPM epsilon loss / the rectified-flow velocity loss, quality = exact 2-Wasserstein distance
to held-out points); ``digits8``, ``digits8_flow`` and ``digits8_cm`` (the bundled digits at native 8x8 with
``training_scripts/train_unconditional.py``, ``train_flow_matching.py`` and ``train_consistency.py``, the
offline digits Fréchet distance); opt-in: ``digits16*`` and ``digits32*`` (the same at 16x16 and 32x32,
where the assignment shortens distances far less) and ``cifar10`` (the DDPM/DDIM CIFAR-10 UNet, Inception
FID; needs a GPU, the dataset and ``--inception_weights``). Samplers: DDIM with trailing timesteps, Euler
with uniform sigmas, the consistency model's multistep sampler (see ``immiscible_diffusers.evaluate``).

    python benchmarks/speedup.py --output_dir benchmarks/results       # the default regimes (~1 h of one CPU core)
    python benchmarks/speedup.py --quick --output_dir /tmp/speedup     # a few minutes: a smoke test
    python benchmarks/speedup.py --regimes digits32 digits32_flow --output_dir results-32
    python benchmarks/speedup.py --regimes cifar10 --device cuda --output_dir results-cifar10 \\
        --inception_weights weights-inception-2015-12-05-6726825d.pth --fid_reference cifar10 --fid_reference_column img

Writes to ``--output_dir``: ``speedup.csv`` (every evaluated point), ``speedup_summary.csv`` (ratios and
verdicts), ``speedup.md`` (the full report), ``speedup_summary.md`` (the verdict table, for the docs),
``speedup.png`` and ``speedup.json``; each records its provenance (command, git commit, code version,
machine, date). Training runs go to ``--runs_dir`` and are reused when the benchmark is run again with the
same settings AND the same code version (``immiscible_diffusers.provenance.code_version``): a killed
benchmark resumes; a killed training run resumes from its last checkpoint; a code change retrains.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import hashlib
import importlib.util
import json
import logging
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.training_utils import EMAModel
from torch import nn
from tqdm.auto import tqdm

from immiscible_diffusers import assign_noise
from immiscible_diffusers.evaluate import DDIM_TIMESTEP_SPACING, build_metric, evaluate_runs, write_csv
from immiscible_diffusers.metrics import wasserstein2
from immiscible_diffusers.provenance import code_version, command_line, provenance, provenance_markdown
from immiscible_diffusers.training import TRAIN_LOG_NAME, read_train_log

REPO_ROOT = Path(__file__).resolve().parents[1]
CIFAR10_UNET_CONFIG = REPO_ROOT / "benchmarks" / "configs" / "ddpm_cifar10_unet.json"
# Checkpoints of all runs take gigabytes: by default they go to the git-ignored outputs/ folder.
DEFAULT_RUNS_DIR = REPO_ROOT / "outputs" / "speedup_runs"
METHODS = ("none", "linear", "knn")
CONTROLS = ("shuffle", "norm_matched")
METHOD_NAMES = {"none": "vanilla", "linear": "linear", "knn": "knn", "shuffle": "shuffle", "norm_matched": "norm-matched"}
METHOD_COLORS = {"none": "tab:gray", "linear": "tab:blue", "knn": "tab:orange", "shuffle": "tab:purple", "norm_matched": "tab:green"}
RECIPES = {"ddpm": "DDPM (DDIM sampling)", "flow": "flow matching (Euler)", "consistency": "consistency training"}
# Each recipe's training script, its evaluator sampler.
RECIPE_SCRIPTS = {"ddpm": "train_unconditional.py", "flow": "train_flow_matching.py", "consistency": "train_consistency.py"}
RECIPE_SAMPLERS = {"ddpm": "ddim", "flow": "flow_euler", "consistency": "consistency"}
DEFAULT_NFES = (1, 2, 4, 8, 20)
LOSS_WINDOW = 50
# A difference of the final seed means counts as real beyond this many standard errors, and beyond this share.
VERDICT_STANDARD_ERRORS = 2.0
VERDICT_MIN_RELATIVE = 0.05


# --------------------------------------------------------------------------------------------------
# Regimes
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Regime:
    """One regime: what is trained with which recipe, for how long, and how its checkpoints are scored."""

    name: str
    kind: str  # "toy" (the loops in this file) or "images" (a training script)
    recipe: str  # a key of RECIPES
    description: str
    resolution: int  # image side; 0 for the 2-D toy
    num_channels: int
    max_train_steps: int
    checkpointing_steps: int
    train_batch_size: int
    learning_rate: float
    num_samples: int
    nfes: tuple[int, ...]  # sampling budgets; the largest is "many"
    metric: str  # "w2" (toy), "digits_fd" or "fid"
    unet_block_out_channels: str = ""
    lr_warmup_steps: int = 50
    extra_train_args: tuple[str, ...] = ()

    @property
    def dimension(self) -> int:
        return 2 if self.kind == "toy" else self.num_channels * self.resolution**2

    @property
    def train_script(self) -> str:
        return RECIPE_SCRIPTS[self.recipe]

    @property
    def sampler(self) -> str:
        return RECIPE_SAMPLERS[self.recipe]


# Settings that only change how checkpoints are evaluated: left out of a run's folder hash.
EVALUATION_FIELDS = ("name", "description", "num_samples", "nfes", "metric")


def _toy(recipe: str, steps: int, every: int, samples: int, nfes: tuple[int, ...]) -> Regime:
    name = "toy2d" if recipe == "ddpm" else f"toy2d_{recipe}"
    loss = "epsilon (DDPM) loss, DDIM sampling" if recipe == "ddpm" else "velocity (rectified flow) loss, Euler sampling"
    return Regime(
        name, "toy", recipe, f"8 Gaussians in 2-D, 3-layer MLP, {loss}, exact W2 to held-out points", 0, 0,
        max_train_steps=steps, checkpointing_steps=every, train_batch_size=256, learning_rate=1e-3,
        num_samples=samples, nfes=nfes, metric="w2",
    )


def _digits(
    recipe: str, resolution: int, steps: int, every: int, samples: int, nfes: tuple[int, ...], widths: str, lr: float = 1e-3,
    warmup: int = 50,
) -> Regime:
    name = f"digits{resolution}" + ("" if recipe == "ddpm" else "_flow" if recipe == "flow" else "_cm")
    where = "at native 8x8" if resolution == 8 else f"upsampled to {resolution}x{resolution}"
    return Regime(
        name, "images", recipe, f"digits {where} (D={resolution**2}), {RECIPES[recipe]}, UNet {widths}",
        resolution, 1, max_train_steps=steps, checkpointing_steps=every, train_batch_size=64, learning_rate=lr,
        num_samples=samples, nfes=nfes, metric="digits_fd", unet_block_out_channels=widths, lr_warmup_steps=warmup,
    )


def _cifar10(steps: int, every: int, samples: int) -> Regime:
    return Regime(
        "cifar10", "images", "ddpm", "CIFAR-10 32x32, the DDPM/DDIM CIFAR-10 UNet (35.7M parameters), Inception FID",
        resolution=32, num_channels=3, max_train_steps=steps, checkpointing_steps=every, train_batch_size=128,
        learning_rate=2e-4, num_samples=samples, nfes=(1, 2, 4, 8, 100), metric="fid", lr_warmup_steps=1000,
        extra_train_args=(
            "--dataset_name", "cifar10", "--image_column", "img", "--random_flip",
            "--model_config_name_or_path", str(CIFAR10_UNET_CONFIG),
        ),
    )


def _full_preset() -> dict[str, Regime]:
    regimes = [
        # The exact W2 of 500 points and the 256 x 256 assignment per step dominate the toys' cost.
        _toy("ddpm", 1000, 200, 500, DEFAULT_NFES),
        _toy("flow", 1000, 200, 500, DEFAULT_NFES),
        *(_digits(recipe, 8, FULL_DIGITS8_STEPS, FULL_DIGITS8_STEPS // 4, 450, DEFAULT_NFES, "32,64") for recipe in RECIPES),
        *(_digits(recipe, 16, 600, 120, 450, DEFAULT_NFES, "16,32") for recipe in RECIPES),
        *(_digits(recipe, 32, 300, 60, 256, (1, 2, 4, 8, 10), "16,32,32,64") for recipe in RECIPES),
        _cifar10(steps=20000, every=2500, samples=10000),
    ]
    return {regime.name: regime for regime in regimes}


def _quick_preset() -> dict[str, Regime]:
    nfes = (1, 2, 4, 10)
    regimes = [
        _toy("ddpm", 400, 100, 500, nfes),
        _toy("flow", 400, 100, 500, nfes),
        *(_digits(recipe, 8, 150, 75, 256, nfes, "32,64", warmup=20) for recipe in RECIPES),
        *(_digits(recipe, 16, 100, 50, 128, nfes, "16,32", warmup=20) for recipe in RECIPES),
        *(_digits(recipe, 32, 40, 20, 64, (1, 2, 5), "16,32,32,64", warmup=10) for recipe in RECIPES),
        _cifar10(steps=2000, every=500, samples=2000),
    ]
    return {regime.name: regime for regime in regimes}


# Training steps of the default digits regimes: one CPU core trains their 27 runs in about 35 minutes.
FULL_DIGITS8_STEPS = 800
PRESETS: dict[str, dict[str, Regime]] = {"full": _full_preset(), "quick": _quick_preset()}
# In the order they run: the cheap toys first, and every finished regime is written out at once.
DEFAULT_REGIMES = ("toy2d_flow", "toy2d", "digits8_flow", "digits8", "digits8_cm")
DEFAULT_CONTROL_REGIMES = ("toy2d", "toy2d_flow")


# --------------------------------------------------------------------------------------------------
# The 2-D toy: data, model, training loops
# --------------------------------------------------------------------------------------------------


def eight_gaussians(num_points: int, generator: torch.Generator, radius: float = 1.0, std: float = 0.1) -> torch.Tensor:
    """Points from 8 Gaussians centred on a circle (a standard toy for mode coverage)."""
    angles = torch.randint(0, 8, (num_points,), generator=generator).float() * (math.pi / 4)
    centers = torch.stack([angles.cos(), angles.sin()], dim=1) * radius
    return centers + std * torch.randn((num_points, 2), generator=generator)


class ToyDenoiser(nn.Module):
    """An MLP mapping a 2-D point and a sinusoidal embedding of its timestep to the noise (or velocity)."""

    def __init__(self, hidden: int = 128, time_dim: int = 32) -> None:
        super().__init__()
        self.time_dim = time_dim
        self.net = nn.Sequential(
            nn.Linear(2 + time_dim, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, 2),
        )

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        half = self.time_dim // 2
        frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        angles = timesteps.float()[:, None] * frequencies[None, :]
        return self.net(torch.cat([x, angles.sin(), angles.cos()], dim=1))


@dataclass
class ToyData:
    train: torch.Tensor
    reference: torch.Tensor
    floor: torch.Tensor


def toy_data(num_eval: int) -> ToyData:
    """A fixed training set, and two disjoint held-out sets: the W2 reference and the floor."""
    generator = torch.Generator().manual_seed(20240612)
    return ToyData(eight_gaussians(20000, generator), eight_gaussians(num_eval, generator), eight_gaussians(num_eval, generator))


@functools.cache
def toy_scheduler() -> DDPMScheduler:
    """The toy's noise schedule (one shared instance: only read, never stepped)."""
    # No clipping of the predicted sample: the toy's points are not confined to [-1, 1] as images are.
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)


TOY_FLOW_TIMESTEPS = 1000  # the flow toy's model takes sigma * 1000 as its timestep, as the SD3 recipe does


@torch.no_grad()
def sample_toy(model: nn.Module, recipe: str, num_samples: int, num_inference_steps: int, seed: int) -> torch.Tensor:
    """Samples from a fixed starting noise: DDIM (eta = 0, trailing timesteps) or Euler with uniform sigmas."""
    x = torch.randn((num_samples, 2), generator=torch.Generator().manual_seed(seed))
    if recipe == "flow":
        sigmas = torch.linspace(1.0, 0.0, num_inference_steps + 1)
        for sigma, next_sigma in zip(sigmas[:-1], sigmas[1:]):
            x = x + (next_sigma - sigma) * model(x, (sigma * TOY_FLOW_TIMESTEPS).expand(num_samples))
        return x
    scheduler = DDIMScheduler.from_config(toy_scheduler().config, timestep_spacing=DDIM_TIMESTEP_SPACING)
    scheduler.set_timesteps(num_inference_steps)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t.expand(num_samples)), t, x).prev_sample
    return x


def toy_loss(model: nn.Module, recipe: str, x: torch.Tensor, assigned: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The training loss on a batch; the assigned noise is both the noising input and (part of) the target."""
    if recipe == "flow":
        sigmas = torch.rand((len(x), 1), generator=generator)
        noisy = (1.0 - sigmas) * x + sigmas * assigned
        return F.mse_loss(model(noisy, sigmas[:, 0] * TOY_FLOW_TIMESTEPS), assigned - x)
    scheduler = toy_scheduler()
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(x),), generator=generator)
    return F.mse_loss(model(scheduler.add_noise(x, assigned, timesteps), timesteps), assigned)


def train_toy_run(
    regime: Regime, method: str, seed: int, knn_k: int, data: ToyData, eval_seed: int, progress: bool
) -> dict[str, Any]:
    """Train the toy model; return its curves ``{nfe: [(step, W2, loss)]}``, assignment statistics and timing.

    Batches, noise and timesteps come from generators seeded with ``seed`` only, and the KNN candidates
    (and the shuffle control's permutation) from a separate one, so every method sees the same batches and
    the same noise before assignment.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ToyDenoiser()
    ema = EMAModel(model.parameters(), decay=0.999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    optimizer = torch.optim.AdamW(model.parameters(), lr=regime.learning_rate, weight_decay=1e-6)
    data_generator = torch.Generator().manual_seed(seed)
    noise_generator = torch.Generator().manual_seed(seed + 1_000_003)
    knn_generator = torch.Generator().manual_seed(seed + 2_000_003)
    curves: dict[int, list[tuple[int, float, float]]] = {nfe: [] for nfe in regime.nfes}
    losses, reductions = [], []
    train_seconds = assign_seconds = 0.0
    for step in tqdm(range(1, regime.max_train_steps + 1), desc=f"{regime.name} {method} seed {seed}", leave=False, disable=not progress):
        start = time.perf_counter()
        x = data.train[torch.randint(0, len(data.train), (regime.train_batch_size,), generator=data_generator)]
        noise = torch.randn(x.shape, generator=noise_generator)
        assign_start = time.perf_counter()
        assigned, stats = assign_noise(x, noise, method=method, knn_k=knn_k, generator=knn_generator, return_stats=True)
        assign_seconds += time.perf_counter() - assign_start
        loss = toy_loss(model, regime.recipe, x, assigned, noise_generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.step(model.parameters())
        train_seconds += time.perf_counter() - start
        losses.append(loss.item())
        reductions.append(stats.relative_reduction)
        if step % regime.checkpointing_steps == 0 or step == regime.max_train_steps:
            ema_model = copy.deepcopy(model)
            ema.copy_to(ema_model.parameters())
            for nfe in regime.nfes:
                samples = sample_toy(ema_model, regime.recipe, regime.num_samples, nfe, eval_seed)
                curves[nfe].append((step, wasserstein2(samples, data.reference), float(np.mean(losses[-LOSS_WINDOW:]))))
    return {
        "curves": curves,
        "distance_reduction": float(np.mean(reductions)),
        "seconds_per_step": train_seconds / regime.max_train_steps,
        "assign_seconds_per_step": assign_seconds / regime.max_train_steps,
        "batch_fingerprint": None,
    }


def _curves_from_json(curves: dict[str, list]) -> dict[int, list[tuple]]:
    return {int(nfe): [tuple(point) for point in curve] for nfe, curve in curves.items()}


def toy_run(regime: Regime, method: str, seed: int, args: argparse.Namespace, data: ToyData, progress: bool) -> dict[str, Any]:
    """``train_toy_run``, reusing the result an earlier benchmark saved in ``--runs_dir`` with the same settings and code."""
    settings = {
        "regime": asdict(regime), "method": method, "seed": seed, "knn_k": args.knn_k, "eval_seed": args.eval_seed,
        "code_version": args.code_version,
    }
    settings = json.loads(json.dumps(settings))  # tuples become lists, as in the saved file
    settings_hash = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    path = Path(args.runs_dir) / regime.name / f"{METHOD_NAMES[method]}-seed{seed}-{settings_hash}.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("settings") == settings:
            return saved["result"] | {"curves": _curves_from_json(saved["result"]["curves"]), "reused": True}
    started = time.perf_counter()
    result = train_toy_run(regime, method, seed, args.knn_k, data, args.eval_seed, progress)
    result["run_seconds"] = time.perf_counter() - started
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps({"settings": settings, "result": result}, indent=1))
    os.replace(partial, path)
    return result | {"reused": False}


def toy_anchors(data: ToyData, num_samples: int, seed: int) -> dict[str, float]:
    noise = torch.randn((num_samples, 2), generator=torch.Generator().manual_seed(seed))
    return {"floor": wasserstein2(data.floor, data.reference), "ceiling": wasserstein2(noise, data.reference)}


# --------------------------------------------------------------------------------------------------
# Image regimes: the training script, then the evaluator
# --------------------------------------------------------------------------------------------------


def training_arguments(regime: Regime, method: str, seed: int, knn_k: int, run_dir: Path) -> list[str]:
    """The training script's command line for one run (the same for every method but ``--assignment``).

    The script's own sample grids are not used here: they are made rare and cheap, with the flags each
    script accepts (train_consistency.py and train_flow_matching.py reject the DDPM-only ones).
    """
    if regime.recipe == "consistency":
        grids = ["--validation_steps", "1000000", "--save_model_epochs", "1000000"]
    elif regime.recipe == "flow":
        grids = ["--num_inference_steps", "4", "--save_images_epochs", "1000000", "--save_model_epochs", "1000000"]
    else:
        grids = [
            "--eval_scheduler", "ddim", "--ddpm_num_inference_steps", "4",
            "--save_images_epochs", "1000000", "--save_model_epochs", "1000000",
        ]
    args = [
        "--output_dir", str(run_dir),
        "--resolution", str(regime.resolution),
        "--train_batch_size", str(regime.train_batch_size),
        "--max_train_steps", str(regime.max_train_steps),
        "--checkpointing_steps", str(regime.checkpointing_steps),
        "--learning_rate", str(regime.learning_rate),
        # A constant rate after warmup: a decaying schedule would tie every curve's shape to the budget.
        "--lr_scheduler", "constant_with_warmup",
        "--lr_warmup_steps", str(regime.lr_warmup_steps),
        "--use_ema", "--ema_max_decay", "0.999",
        "--seed", str(seed),
        "--assignment", method,
        "--knn_k", str(knn_k),
        *grids,
        "--resume_from_checkpoint", "latest",
    ]
    if regime.unet_block_out_channels:
        args += ["--unet_block_out_channels", regime.unet_block_out_channels]
    return args + list(regime.extra_train_args)


def load_training_script(path: Path):
    """Import a training script file as a module (to call its ``parse_args`` and ``main`` in this process)."""
    name = f"speedup_{path.stem}"
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses in the script look their module up there
    spec.loader.exec_module(module)
    return module


def run_training(args: list[str], run_dir: Path, launcher: str, train_script: Path, num_threads: int | None) -> float:
    """Train one run (in this process, or with ``launcher`` in a subprocess); return the wall-clock seconds."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "speedup_train.log"
    start = time.perf_counter()
    if launcher == "inprocess":
        module = load_training_script(train_script)
        with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            module.main(module.parse_args(args))
    else:
        command = [sys.executable, str(train_script)] if launcher == "python" else [*shlex.split(launcher), str(train_script)]
        env = dict(os.environ)
        if num_threads is not None:
            env["OMP_NUM_THREADS"] = str(num_threads)
        with open(log_path, "a") as log:
            completed = subprocess.run([*command, *args], stdout=log, stderr=subprocess.STDOUT, env=env)
        if completed.returncode != 0:
            raise RuntimeError(f"training failed (exit {completed.returncode}); see {log_path}")
    return time.perf_counter() - start


def run_is_complete(run_dir: Path, args: list[str], max_train_steps: int) -> bool:
    """Whether ``run_dir`` holds a finished run trained with exactly ``args``."""
    record, config = run_dir / "speedup_run.json", run_dir / "training_config.json"
    if not (record.is_file() and config.is_file()):
        return False
    saved = json.loads(record.read_text())
    return saved.get("args") == args and saved.get("finished") and json.loads(config.read_text()).get("global_step") == max_train_steps


def train_log_summary(run_dir: Path) -> dict[str, Any]:
    """Mean assignment statistics and the batch/noise fingerprints of a run's ``train_log.csv``."""
    rows = read_train_log(run_dir / TRAIN_LOG_NAME)
    before = np.array([float(r["assign_distance_before"]) for r in rows])
    after = np.array([float(r["assign_distance_after"]) for r in rows])
    return {
        "distance_reduction": float(np.mean(1.0 - after / before)),
        "assign_seconds_per_step": float(np.mean([float(r["assign_seconds"]) for r in rows])),
        "batch_fingerprint": "".join(r["batch_hash"] for r in rows),
        "noise_fingerprint": "".join(r["noise_hash"] for r in rows),
    }


def regime_train_script(regime: Regime, args: argparse.Namespace) -> Path:
    """The training script of an image regime: its recipe's, or ``--train_script`` for DDPM regimes."""
    if regime.recipe == "ddpm" and args.train_script:
        return Path(args.train_script)
    return REPO_ROOT / "training_scripts" / regime.train_script


def image_run(
    regime: Regime, method: str, seed: int, args: argparse.Namespace, metric, progress: bool
) -> dict[str, Any]:
    """Train (or reuse) one run of an image regime and evaluate all its checkpoints at every NFE (or reuse that too)."""
    train_script = regime_train_script(regime, args)
    # The folder name carries a hash of the training settings and the code version: runs trained with other
    # settings or by other code are never reused. Evaluation-only settings are left out of it.
    settings = {key: value for key, value in asdict(regime).items() if key not in EVALUATION_FIELDS}
    script_name = str(train_script.relative_to(REPO_ROOT)) if train_script.is_relative_to(REPO_ROOT) else str(train_script)
    settings_hash = hashlib.sha256(json.dumps([settings, args.knn_k, script_name, args.code_version]).encode()).hexdigest()[:8]
    run_dir = Path(args.runs_dir) / regime.name / f"{METHOD_NAMES[method]}-seed{seed}-{settings_hash}"
    train_args = training_arguments(regime, method, seed, args.knn_k, run_dir)
    record_path = run_dir / "speedup_run.json"
    reused = run_is_complete(run_dir, train_args, regime.max_train_steps)
    started = time.perf_counter()
    if not reused:
        if record_path.is_file() and json.loads(record_path.read_text()).get("args") != train_args:
            shutil.rmtree(run_dir)  # the same folder with other flags (another --launcher, say): start over
        run_dir.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps({"args": train_args, "finished": False, "code_version": args.code_version}, indent=2))
        seconds = run_training(train_args, run_dir, args.launcher, train_script, args.num_threads)
        record_path.write_text(
            json.dumps({"args": train_args, "finished": True, "train_seconds": seconds, "code_version": args.code_version}, indent=2)
        )
    record = json.loads(record_path.read_text())

    eval_settings = {
        "metric": regime.metric, "num_samples": regime.num_samples, "nfes": list(regime.nfes),
        "seed": args.eval_seed, "sampler": regime.sampler, "use_ema": True, "code_version": args.code_version,
    }
    eval_path = run_dir / "speedup_eval.json"
    cached = json.loads(eval_path.read_text()) if eval_path.is_file() else {}
    if cached.get("settings") != eval_settings:
        results = evaluate_runs(
            [run_dir], metrics=[metric], scheduler=regime.sampler, num_inference_steps=list(regime.nfes),
            num_samples=regime.num_samples, seed=args.eval_seed, batch_size=args.eval_batch_size, use_ema=True,
            device=args.device, progress=progress,
        )
        curves = {
            nfe: [(row["step"], row["value"], row["train_loss"]) for row in sorted(results.rows, key=lambda r: r["step"]) if row["nfe"] == nfe]
            for nfe in regime.nfes
        }
        cached = {"settings": eval_settings, "curves": curves}
        partial = eval_path.with_name(eval_path.name + ".tmp")
        partial.write_text(json.dumps(cached, indent=2))
        os.replace(partial, eval_path)
    log = train_log_summary(run_dir)
    return {
        "curves": _curves_from_json(cached["curves"]),
        "distance_reduction": log["distance_reduction"],
        # Whole-run wall clock over steps: includes start-up and checkpoint writing, the same for every method.
        "seconds_per_step": record.get("train_seconds", float("nan")) / regime.max_train_steps,
        "assign_seconds_per_step": log["assign_seconds_per_step"],
        "batch_fingerprint": log["batch_fingerprint"],
        "noise_fingerprint": log["noise_fingerprint"],
        "run_dir": str(run_dir),
        "reused": reused,
        # Training and evaluation time of this invocation (0 when both came from an earlier benchmark).
        "run_seconds": time.perf_counter() - started,
    }


# --------------------------------------------------------------------------------------------------
# Steps-to-target arithmetic
# --------------------------------------------------------------------------------------------------


def first_step_reaching(curve: Sequence[tuple[int, float]], target: float) -> float | None:
    """The first training step at which a lower-is-better curve reaches ``target``, or None if it never does.

    Between two checkpoints the curve is interpolated linearly, so the answer can fall between them; a
    curve already at the target at its first checkpoint returns that checkpoint's step (an upper bound).
    """
    previous = None
    for step, value in curve:
        if value <= target:
            if previous is None or previous[1] == value:
                return float(step)
            step0, value0 = previous
            return step0 + (value0 - target) / (value0 - value) * (step - step0)
        previous = (step, value)
    return None


def value_at_step(curve: Sequence[tuple[int, float]], step: float) -> float:
    """A curve's value at ``step``, interpolated linearly between checkpoints."""
    steps = [s for s, _ in curve]
    if not steps[0] <= step <= steps[-1]:
        raise ValueError(f"step {step} is outside the evaluated steps {steps[0]}..{steps[-1]}")
    return float(np.interp(step, steps, [v for _, v in curve]))


def mean_curve(curves: Sequence[Sequence[tuple[int, float]]]) -> list[tuple[int, float]]:
    """The seed-mean curve over the steps every seed was evaluated at."""
    common = sorted(set.intersection(*(set(s for s, _ in curve) for curve in curves)))
    return [(step, float(np.mean([dict(curve)[step] for curve in curves]))) for step in common]


@dataclass(frozen=True)
class Ratio:
    """A steps-to-target ratio ``vanilla steps / method steps``, or a bound when a curve never reached the target.

    ``kind`` is ``"="`` (both reached), ``">"`` (only the method reached it: the ratio is above ``value``),
    ``"<"`` (only vanilla reached it: below ``value``), or ``"n/a"`` (neither).
    """

    kind: str
    value: float | None

    def __str__(self) -> str:
        if self.kind == "n/a":
            return "n/a"
        return f"{'' if self.kind == '=' else self.kind}{self.value:.2f}"


def steps_ratio(vanilla_steps: float | None, method_steps: float | None, max_steps: int) -> Ratio:
    """``vanilla_steps / method_steps``, with an unreached target counted as "more than ``max_steps``"."""
    if vanilla_steps is not None and method_steps is not None:
        return Ratio("=", vanilla_steps / method_steps)
    if vanilla_steps is None and method_steps is not None:
        return Ratio(">", max_steps / method_steps)
    if vanilla_steps is not None and method_steps is None:
        return Ratio("<", vanilla_steps / max_steps)
    return Ratio("n/a", None)


def steps_to_target(
    curves: dict[str, dict[int, list[tuple[int, float]]]], target_fractions: Sequence[float], max_steps: int
) -> list[dict[str, Any]]:
    """Steps-to-target ratios of every method against vanilla (``"none"``), for each target fraction.

    ``curves[method][seed]`` is a lower-is-better curve ``[(step, value), ...]``. The target ``q(f)`` is
    vanilla's seed-mean value at ``f * max_steps``. Reported per method: the steps its seed-mean curve
    needs to reach ``q(f)`` and the ratio to vanilla's, and the ratio of each seed pair (same seed for
    both methods, hence the same batches).
    """
    if "none" not in curves:
        raise ValueError("steps_to_target needs the vanilla curves (method 'none')")
    vanilla_mean = mean_curve(list(curves["none"].values()))
    rows = []
    for fraction in target_fractions:
        target = value_at_step(vanilla_mean, fraction * max_steps)
        vanilla_steps = first_step_reaching(vanilla_mean, target)
        for method, by_seed in curves.items():
            method_steps = first_step_reaching(mean_curve(list(by_seed.values())), target)
            per_seed = []
            for seed, curve in sorted(by_seed.items()):
                if seed in curves["none"]:
                    per_seed.append(
                        steps_ratio(first_step_reaching(curves["none"][seed], target), first_step_reaching(curve, target), max_steps)
                    )
            rows.append(
                {
                    "method": method,
                    "target_fraction": fraction,
                    "target_value": target,
                    "vanilla_steps": vanilla_steps,
                    "method_steps": method_steps,
                    "ratio": steps_ratio(vanilla_steps, method_steps, max_steps),
                    "per_seed_ratios": per_seed,
                    "seeds_reached": sum(first_step_reaching(c, target) is not None for c in by_seed.values()),
                    "num_seeds": len(by_seed),
                }
            )
    return rows


# --------------------------------------------------------------------------------------------------
# Verdicts
# --------------------------------------------------------------------------------------------------


def compare_final(vanilla: Sequence[float], method: Sequence[float]) -> str:
    """``"better"``, ``"worse"`` or ``"same"``: the method's final seed-mean quality against vanilla's (lower is better).

    Different only when the seed means differ by more than ``VERDICT_STANDARD_ERRORS`` standard errors of
    their difference AND by more than ``VERDICT_MIN_RELATIVE`` of vanilla's mean.
    """
    vanilla, method = np.asarray(vanilla, dtype=float), np.asarray(method, dtype=float)
    difference = method.mean() - vanilla.mean()
    variance = sum(v.var(ddof=1) / len(v) if len(v) > 1 else 0.0 for v in (vanilla, method))
    if abs(difference) <= VERDICT_STANDARD_ERRORS * math.sqrt(variance) or abs(difference) <= VERDICT_MIN_RELATIVE * abs(vanilla.mean()):
        return "same"
    return "better" if difference < 0 else "worse"


VERDICT_WORDS = {"better": "helps", "worse": "hurts", "same": "no clear difference"}


def nfe_verdicts(
    curves: dict[str, dict[int, list[tuple]]], targets: list[dict[str, Any]], max_steps: int
) -> dict[str, dict[str, Any]]:
    """Per method: final quality (seed mean, sd) against vanilla's, the comparison, and the ratio at q(1)."""
    finals = {m: [curve[-1][1] for curve in by_seed.values() if curve[-1][0] == max_steps] for m, by_seed in curves.items()}
    verdicts = {}
    for method, values in finals.items():
        ratio = next((r["ratio"] for r in targets if r["method"] == method and r["target_fraction"] == 1.0), None)
        comparison = "same" if method == "none" or not values or not finals["none"] else compare_final(finals["none"], values)
        verdicts[method] = {
            "final_mean": float(np.mean(values)) if values else None,
            "final_sd": float(np.std(values, ddof=1)) if len(values) > 1 else None,
            "vanilla_final_mean": float(np.mean(finals["none"])) if finals["none"] else None,
            "comparison": comparison,
            "verdict": "reference" if method == "none" else VERDICT_WORDS[comparison],
            "ratio_at_vanilla_final": str(ratio) if ratio is not None else None,
        }
    return verdicts


def verdict_line(regime: dict[str, Any], nfe: int) -> str:
    """One line: how each method compares with vanilla in this regime at this NFE."""
    verdicts = regime["by_nfe"][nfe]["verdicts"]
    parts = []
    for method in regime["methods"]:
        if method == "none":
            continue
        v = verdicts[method]
        parts.append(
            f"{METHOD_NAMES[method]} {v['verdict']} ({v['final_mean']:.3g} vs {v['vanilla_final_mean']:.3g}"
            + (f", steps ratio {v['ratio_at_vanilla_final']}" if v["ratio_at_vanilla_final"] else "")
            + ")"
        )
    return f"{regime['name']} ({RECIPES[regime['recipe']]}), NFE {nfe}: " + "; ".join(parts)


# --------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------


def curve_statistics(by_seed: dict[int, list[tuple]]) -> list[dict[str, float]]:
    """Mean, standard deviation, min and max across seeds at every step all seeds share."""
    steps = sorted(set.intersection(*(set(p[0] for p in curve) for curve in by_seed.values())))
    rows = []
    for step in steps:
        values = np.array([next(p[1] for p in curve if p[0] == step) for curve in by_seed.values()])
        losses = [next(p[2] for p in curve if p[0] == step) for curve in by_seed.values()]
        losses = [loss for loss in losses if loss is not None]
        rows.append(
            {
                "step": step, "mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else None,
                "min": float(values.min()), "max": float(values.max()),
                "train_loss": float(np.mean(losses)) if losses else None,
            }
        )
    return rows


def _mean_sd(point: dict[str, Any]) -> str:
    return f"{point['mean']:.3g}" + ("" if point["std"] is None else f" ± {point['std']:.2g}")


def _ratio_cells(regime: dict[str, Any], nfe: int, method: str, fractions: Sequence[float]) -> list[str]:
    cells = []
    for fraction in fractions:
        row = next((r for r in regime["by_nfe"][nfe]["targets"] if r["method"] == method and r["target_fraction"] == fraction), None)
        if row is None:
            cells.append("–")
            continue
        seeds = ", ".join(str(r) for r in row["per_seed_ratios"])
        cells.append(f"{row['ratio']} ({seeds})")
    return cells


def summary_markdown(report: dict[str, Any], with_provenance: bool = True) -> str:
    """The verdict table: one row per (regime, NFE, method), and one verdict line per (regime, NFE)."""
    fractions = report["target_fractions"]
    lines = [provenance_markdown(report["provenance"]), ""] if with_provenance else []
    lines += [
        f"Seeds {report['seeds']}; lower quality values are better; ratio = vanilla's training steps to a quality "
        "target / the method's (>1: fewer steps than vanilla; in brackets per seed; < or >: a bound, the curve never "
        "got there); verdict: final quality beyond 2 standard errors and 5% of vanilla's.",
        "",
        "| regime | recipe | D | NFE | method | distance reduction | final quality (mean ± sd) | "
        + " | ".join(f"ratio at q({f:g})" for f in fractions) + " | verdict |",
        "|---|---|---:|---:|---|---:|---:|" + "---|" * len(fractions) + "---|",
    ]
    for regime in report["regimes"]:
        for nfe in regime["nfes"]:
            stats = regime["by_nfe"][nfe]["statistics"]
            for method in regime["methods"]:
                lines.append(
                    f"| {regime['name']} | {RECIPES[regime['recipe']]} | {regime['dimension']} | {nfe} | {METHOD_NAMES[method]} | "
                    f"{100 * regime['distance_reduction'][method]:.1f}% | {_mean_sd(stats[method][-1])} | "
                    + " | ".join(_ratio_cells(regime, nfe, method, fractions))
                    + f" | {regime['by_nfe'][nfe]['verdicts'][method]['verdict']} |"
                )
    lines += ["", "Verdicts, one per (regime, NFE):", ""]
    lines += [f"- {verdict_line(regime, nfe)}" for regime in report["regimes"] for nfe in regime["nfes"]]
    return "\n".join(lines) + "\n"


def markdown_report(report: dict[str, Any]) -> str:
    """The benchmark's Markdown: provenance, protocol, verdicts, per-regime curves per NFE, timing."""
    lines = [
        "# Immiscible diffusion: training steps to the same sample quality, per sampling budget (NFE)",
        "",
        provenance_markdown(report["provenance"]),
        "",
        ("" if report["complete"] else "**Partial: the benchmark is still running or was stopped; regimes not listed have no results.** ")
        + f"{report['preset']} preset, {report['elapsed_minutes']:.1f} min for this invocation"
        + (f", which reused {report['reused_runs']} of {report['total_runs']} runs from an earlier one" if report["reused_runs"] else "")
        + f"; {report['threads']}.",
        "",
        "Protocol: every method is trained with the same seeds — the same batches, the same noise before "
        "assignment, the same initial weights (checked for the image regimes: the batch and noise fingerprints of "
        "train_log.csv agree) — and a constant learning rate after warmup, with EMA weights. Every checkpoint is "
        "sampled at each NFE from the same starting noise (DDIM eta = 0 with trailing timesteps; flow matching: Euler "
        "with uniform sigmas; consistency: the multistep sampler) and scored (lower is better). The target q(f) is "
        "vanilla's seed-mean quality at the fraction f of the budget, at the same NFE; the ratio is the steps vanilla's "
        "seed-mean curve needs to reach it divided by the steps the method's seed-mean curve needs (linear "
        "interpolation between checkpoints).",
        "",
        "## Summary",
        "",
        summary_markdown(report, with_provenance=False),
        "## Quality vs training step (mean ± sd across seeds)",
        "",
    ]
    for regime in report["regimes"]:
        lines += [
            f"### {regime['name']}: {regime['description']}",
            "",
            f"Metric: {regime['metric_label']}. Floor {regime['anchors']['floor']:.3g}, ceiling "
            f"{regime['anchors']['ceiling']:.3g}. Training budget {regime['max_train_steps']} steps at batch "
            f"{regime['train_batch_size']}.",
            "",
            "| step | NFE | " + " | ".join(METHOD_NAMES[m] for m in regime["methods"]) + " | train loss (vanilla; not a quality measure) |",
            "|---:|---:|" + "---:|" * len(regime["methods"]) + "---:|",
        ]
        for nfe in regime["nfes"]:
            stats = regime["by_nfe"][nfe]["statistics"]
            for index, point in enumerate(stats[regime["methods"][0]]):
                cells = [_mean_sd(stats[m][index]) for m in regime["methods"]]
                loss = point["train_loss"]
                lines.append(f"| {point['step']} | {nfe} | " + " | ".join(cells) + f" | {'–' if loss is None else f'{loss:.4f}'} |")
        lines.append("")
    lines += [
        "## Wall-clock cost per step",
        "",
        "Seconds per step of the whole run (start-up and checkpoint writing included, the same work for every "
        "method), and the assignment's own time per step. On a CPU shared with other jobs the whole-run figures vary "
        "by tens of percent from run to run; the assignment's own time is the direct measure of its cost.",
        "",
        "| regime | method | s/step (whole run) | assignment ms/step | assignment / vanilla step |",
        "|---|---|---:|---:|---:|",
    ]
    for regime in report["regimes"]:
        base = regime["timing"]["none"]["seconds_per_step"]
        for method in regime["methods"]:
            timing = regime["timing"][method]
            share = "–" if not base else f"{100 * timing['assign_seconds_per_step'] / base:.1f}%"
            lines.append(
                f"| {regime['name']} | {METHOD_NAMES[method]} | {timing['seconds_per_step']:.3f} | "
                f"{1000 * timing['assign_seconds_per_step']:.2f} | {share} |"
            )
    lines += ["", f"Same batches across methods: {report['same_batches']}.", ""]
    return "\n".join(lines)


def plot_report(report: dict[str, Any], path: Path) -> Path:
    """A row per regime: a panel per NFE (seed-mean curves with min-max bands) and quality vs NFE at the end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = report["regimes"]
    columns = max(len(r["nfes"]) for r in regimes) + 1
    figure, axes = plt.subplots(len(regimes), columns, figsize=(3.4 * columns, 3.0 * len(regimes)), squeeze=False)
    for row_axes, regime in zip(axes, regimes):
        for axis in row_axes[len(regime["nfes"]) : -1]:
            axis.axis("off")
        for axis, nfe in zip(row_axes, regime["nfes"]):
            for method in regime["methods"]:
                stats = regime["by_nfe"][nfe]["statistics"][method]
                steps = [s["step"] for s in stats]
                axis.plot(steps, [s["mean"] for s in stats], marker="o", markersize=2, color=METHOD_COLORS.get(method), label=METHOD_NAMES[method])
                axis.fill_between(steps, [s["min"] for s in stats], [s["max"] for s in stats], color=METHOD_COLORS.get(method), alpha=0.15)
            _anchor_lines(axis, regime)
            axis.set_title(f"{regime['name']}, NFE {nfe}", fontsize=8)
            axis.set_xlabel("training step", fontsize=7)
        final_axis = row_axes[-1]
        for method in regime["methods"]:
            finals = [regime["by_nfe"][nfe]["statistics"][method][-1] for nfe in regime["nfes"]]
            final_axis.errorbar(
                regime["nfes"], [f["mean"] for f in finals], yerr=[f["std"] or 0.0 for f in finals], marker="o", markersize=3,
                color=METHOD_COLORS.get(method), label=METHOD_NAMES[method] + ("" if method == "none" else f" (-{100 * regime['distance_reduction'][method]:.0f}%)"),
                capsize=2,
            )
        _anchor_lines(final_axis, regime)
        final_axis.set_xscale("log", base=2)
        final_axis.set_xticks(regime["nfes"], [str(n) for n in regime["nfes"]])
        final_axis.set_title(f"{regime['name']}: final checkpoint vs NFE", fontsize=8)
        final_axis.set_xlabel("NFE", fontsize=7)
        final_axis.legend(fontsize=6)
        for axis in [*row_axes[: len(regime["nfes"])], final_axis]:
            axis.set_yscale("log")
            axis.grid(alpha=0.3)
            axis.tick_params(labelsize=6)
        row_axes[0].set_ylabel(regime["metric_label"] + " ↓", fontsize=7)
    figure.suptitle(f"Sample quality vs training step per NFE: seed mean, min-max band over {len(report['seeds'])} seed(s)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _anchor_lines(axis, regime: dict[str, Any]) -> None:
    for anchor, color, style in (("floor", "tab:green", "--"), ("ceiling", "tab:red", ":")):
        if math.isfinite(regime["anchors"].get(anchor, float("nan"))):
            axis.axhline(regime["anchors"][anchor], color=color, linestyle=style, linewidth=0.8)


METRIC_LABELS = {
    "w2": "W2 to held-out points",
    "digits_fd": "Fréchet distance, digits classifier features",
    "fid": "FID (Inception)",
}


def _serialisable(value: Any) -> Any:
    """JSON-ready: ratios as text, NFE keys as strings."""
    return json.loads(json.dumps(value, default=lambda o: str(o) if isinstance(o, Ratio) else o))


def write_report(report: dict[str, Any], output_dir: Path) -> dict[str, Path]:
    """``speedup.csv`` (+ ``speedup.csv.json`` provenance), ``speedup_summary.csv`` (+ provenance json),
    ``speedup.md``, ``speedup_summary.md``, ``speedup.png`` and ``speedup.json``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    points = [
        {"regime": regime["name"], "recipe": regime["recipe"], "method": METHOD_NAMES[method], "seed": seed, "nfe": nfe,
         "step": step, "metric": regime["metric"], "value": value, "train_loss": loss}
        for regime in report["regimes"]
        for method, by_seed in regime["curves"].items()
        for seed, by_nfe in sorted(by_seed.items())
        for nfe, curve in sorted(by_nfe.items())
        for step, value, loss in curve
    ]
    summary = []
    for regime in report["regimes"]:
        for nfe in regime["nfes"]:
            verdicts = regime["by_nfe"][nfe]["verdicts"]
            for row in regime["by_nfe"][nfe]["targets"]:
                method = row["method"]
                summary.append(
                    {
                        "regime": regime["name"], "recipe": regime["recipe"], "dimension": regime["dimension"],
                        "train_batch_size": regime["train_batch_size"], "nfe": nfe, "method": METHOD_NAMES[method],
                        "distance_reduction": regime["distance_reduction"][method],
                        "target_fraction": row["target_fraction"], "target_value": row["target_value"],
                        "vanilla_steps": row["vanilla_steps"], "method_steps": row["method_steps"], "ratio": str(row["ratio"]),
                        "per_seed_ratios": " ".join(str(r) for r in row["per_seed_ratios"]),
                        "seeds_reached": row["seeds_reached"], "num_seeds": row["num_seeds"],
                        "final_mean": verdicts[method]["final_mean"], "final_sd": verdicts[method]["final_sd"],
                        "verdict": verdicts[method]["verdict"],
                        "seconds_per_step": regime["timing"][method]["seconds_per_step"],
                        "assign_seconds_per_step": regime["timing"][method]["assign_seconds_per_step"],
                        "floor": regime["anchors"]["floor"], "ceiling": regime["anchors"]["ceiling"],
                    }
                )
    paths = {
        "csv": write_csv(points, output_dir / "speedup.csv", ("regime", "recipe", "method", "seed", "nfe", "step", "metric", "value", "train_loss")),
        "summary": write_csv(summary, output_dir / "speedup_summary.csv", tuple(summary[0]) if summary else ("regime",)),
    }
    # The CSVs' provenance, in a sibling file each.
    for key in ("csv", "summary"):
        sibling = paths[key].with_name(paths[key].name + ".json")
        sibling.write_text(json.dumps({"provenance": report["provenance"], "file": paths[key].name}, indent=1) + "\n")
        paths[key + "_provenance"] = sibling
    paths["markdown"] = output_dir / "speedup.md"
    paths["markdown"].write_text(markdown_report(report))
    paths["summary_markdown"] = output_dir / "speedup_summary.md"
    paths["summary_markdown"].write_text(summary_markdown(report))
    paths["plot"] = plot_report(report, output_dir / "speedup.png")
    paths["json"] = output_dir / "speedup.json"
    paths["json"].write_text(json.dumps(_serialisable(report), indent=1) + "\n")
    return paths


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def parse_args(input_args: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="Where the speedup* results files go.")
    parser.add_argument(
        "--runs_dir", default=None, help=f"Where the training runs go (default: {DEFAULT_RUNS_DIR.relative_to(REPO_ROOT)}/ in the repository)."
    )
    parser.add_argument("--quick", action="store_true", help="Short runs (a few minutes on 2 CPU cores): a smoke test, not a result.")
    parser.add_argument(
        "--regimes", nargs="+", default=list(DEFAULT_REGIMES), choices=list(PRESETS["full"]),
        help="Regimes to run (default: %(default)s).",
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS + CONTROLS, help="'none' (vanilla) is required.")
    parser.add_argument(
        "--controls_in", nargs="*", default=None, choices=list(PRESETS["full"]),
        help=f"Regimes that also run the controls {CONTROLS} (default: those of {list(DEFAULT_CONTROL_REGIMES)} that "
        "are selected; pass the flag alone for none).",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="Training seeds (default: 0 1 2; --quick: 0 1).")
    parser.add_argument("--knn_k", type=int, default=4, help="Candidates per image for the KNN method.")
    parser.add_argument(
        "--target_fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0],
        help="Quality targets: vanilla's seed-mean quality at these fractions of the training budget.",
    )
    overrides = parser.add_argument_group("override every selected regime's preset")
    overrides.add_argument("--max_train_steps", type=int, default=None)
    overrides.add_argument("--checkpointing_steps", type=int, default=None)
    overrides.add_argument("--train_batch_size", type=int, default=None)
    overrides.add_argument("--learning_rate", type=float, default=None)
    overrides.add_argument("--num_samples", type=int, default=None, help="Samples per checkpoint.")
    overrides.add_argument("--nfes", type=int, nargs="+", default=None, help="Sampling steps (NFE) to score every checkpoint at.")
    overrides.add_argument("--unet_block_out_channels", default=None, help="UNet widths of the digits regimes, e.g. 16,16.")
    data = parser.add_argument_group("cifar10 regime")
    data.add_argument("--dataset_name", default=None, help="Replace CIFAR-10 by another Hub dataset or local dataset folder.")
    data.add_argument("--train_data_dir", default=None, help="Replace CIFAR-10 by a folder of images (imagefolder).")
    data.add_argument("--image_column", default=None, help="Image column of that dataset (CIFAR-10: img).")
    data.add_argument("--inception_weights", default=None, help="torch-fidelity's InceptionV3 weights file (for FID).")
    data.add_argument(
        "--fid_reference", default=None, help="FID reference: an .npz with mu/sigma, a folder of images, or a dataset name."
    )
    data.add_argument("--fid_reference_column", default="image", help="Image column of the --fid_reference dataset.")
    data.add_argument("--max_reference_images", type=int, default=None, help="Use at most this many reference images.")
    running = parser.add_argument_group("running")
    running.add_argument(
        "--launcher", default="inprocess",
        help="'inprocess' (import the training script: fastest on a CPU), 'python', or a launcher command such as "
        "'accelerate launch --num_processes 8' (the training script's path and flags are appended).",
    )
    running.add_argument(
        "--train_script", default=None,
        help="Benchmark another DDPM training script (default: training_scripts/train_unconditional.py).",
    )
    running.add_argument("--device", default=None, help="Evaluation device (default: cuda when available, else cpu).")
    running.add_argument(
        "--num_threads", type=int, default=None,
        help="CPU threads for torch (default: 1 without a GPU — on a shared 2-core machine more threads run slower).",
    )
    running.add_argument("--eval_seed", type=int, default=0, help="Seed of the sampling noise, the same for every checkpoint.")
    running.add_argument("--eval_batch_size", type=int, default=512, help="Images sampled per forward pass.")
    running.add_argument("--no_progress", action="store_true", help="Hide progress bars.")
    args = parser.parse_args(input_args)
    args.regimes = list(dict.fromkeys(args.regimes))
    if "none" not in args.methods:
        parser.error("--methods must include 'none': the ratios are against vanilla training")
    if args.seeds is None:
        args.seeds = [0, 1] if args.quick else [0, 1, 2]
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct, got {args.seeds}")
    if any(not 0 < f <= 1 for f in args.target_fractions):
        parser.error(f"--target_fractions must lie in (0, 1], got {args.target_fractions}")
    if args.nfes is not None and (any(n < 1 for n in args.nfes) or len(set(args.nfes)) != len(args.nfes)):
        parser.error(f"--nfes must be distinct positive integers, got {args.nfes}")
    if args.controls_in is None:
        args.controls_in = [name for name in DEFAULT_CONTROL_REGIMES if name in args.regimes]
    elif not set(args.controls_in) <= set(args.regimes):
        parser.error(f"--controls_in must name regimes that run (--regimes {args.regimes}), got {args.controls_in}")
    if args.runs_dir is None:
        args.runs_dir = str(DEFAULT_RUNS_DIR)
    if args.num_threads is None and not torch.cuda.is_available():
        args.num_threads = 1
    return args


def selected_regimes(args: argparse.Namespace) -> list[Regime]:
    """The presets of ``args.regimes`` with the command-line overrides applied."""
    preset = PRESETS["quick" if args.quick else "full"]
    regimes = []
    for name in args.regimes:
        regime = preset[name]
        changes = {
            key: getattr(args, key)
            for key in ("max_train_steps", "checkpointing_steps", "train_batch_size", "learning_rate", "num_samples")
            if getattr(args, key) is not None
        }
        if args.nfes is not None:
            changes["nfes"] = tuple(sorted(args.nfes))
        if args.unet_block_out_channels and regime.kind == "images" and name != "cifar10":
            changes["unet_block_out_channels"] = args.unet_block_out_channels
        if name == "cifar10" and (args.dataset_name or args.train_data_dir or args.image_column):
            extra = list(regime.extra_train_args)
            for flag in ("--dataset_name", "--image_column"):
                index = extra.index(flag)
                del extra[index : index + 2]
            if args.train_data_dir:
                extra += ["--train_data_dir", args.train_data_dir]
            else:
                extra += ["--dataset_name", args.dataset_name or "cifar10"]
            extra += ["--image_column", args.image_column or ("img" if args.dataset_name in (None, "cifar10") else "image")]
            changes["extra_train_args"] = tuple(extra)
        regime = replace(regime, **changes)
        if regime.checkpointing_steps > regime.max_train_steps or regime.max_train_steps % regime.checkpointing_steps:
            raise ValueError(
                f"regime {name}: --max_train_steps {regime.max_train_steps} must be a multiple of "
                f"--checkpointing_steps {regime.checkpointing_steps}"
            )
        regimes.append(regime)
    return regimes


def regime_methods(regime: Regime, args: argparse.Namespace) -> list[str]:
    """The methods a regime runs: ``--methods``, plus the controls where ``--controls_in`` asks for them."""
    return list(args.methods) + [c for c in CONTROLS if regime.name in args.controls_in and c not in args.methods]


def main(input_args: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(input_args)
    started = time.perf_counter()
    # Computed once: runs are keyed on the code that trains and evaluates them.
    args.code_version = code_version()
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    # Training-script logs go to each run's speedup_train.log; only warnings reach the console.
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING)
    logging.basicConfig(handlers=[console], level=logging.INFO)
    progress = not args.no_progress
    regimes = selected_regimes(args)
    command = command_line([str(Path(__file__).resolve()), *input_args]) if input_args is not None else command_line()
    report: dict[str, Any] = {
        "provenance": provenance(command),
        "threads": f"{args.num_threads} torch thread(s)" if args.num_threads else "torch's default threads",
        "preset": "quick" if args.quick else "full",
        "seeds": args.seeds,
        "target_fractions": args.target_fractions,
        "regimes": [],
    }
    fingerprints_agree = True
    all_runs = []
    digits_metric = None
    for regime in regimes:
        methods = regime_methods(regime, args)
        runs: dict[str, dict[int, dict[str, Any]]] = {method: {} for method in methods}
        if regime.kind == "toy":
            data = toy_data(regime.num_samples)
            anchors = toy_anchors(data, regime.num_samples, args.eval_seed)
            metric_info = {}
        else:
            if regime.metric == "digits_fd":
                digits_metric = digits_metric or build_metric("digits_fd", seed=args.eval_seed, progress=progress)
                metric = digits_metric
            else:
                metric = build_metric(
                    "fid", seed=args.eval_seed, device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
                    inception_weights=args.inception_weights, reference=args.fid_reference,
                    reference_column=args.fid_reference_column, max_reference_images=args.max_reference_images,
                    cache_dir=args.output_dir,
                )
            anchor_values = metric.anchors(regime.resolution, regime.num_channels, regime.num_samples)
            anchors = {name: value for name, (value, _) in anchor_values.items()}
            anchors.setdefault("floor", float("nan"))
            metric_info = metric.describe()
        jobs = [(method, seed) for seed in args.seeds for method in methods]
        for method, seed in tqdm(jobs, desc=regime.name, disable=not progress):
            if regime.kind == "toy":
                runs[method][seed] = toy_run(regime, method, seed, args, data, progress)
            else:
                runs[method][seed] = image_run(regime, method, seed, args, metric, progress)
            all_runs.append(runs[method][seed])
        if regime.kind == "images":
            for seed in args.seeds:
                for key in ("batch_fingerprint", "noise_fingerprint"):
                    if len({runs[m][seed][key] for m in methods}) != 1:
                        fingerprints_agree = False
        by_nfe = {}
        for nfe in regime.nfes:
            curves = {m: {s: run["curves"][nfe] for s, run in by_seed.items()} for m, by_seed in runs.items()}
            points = {m: {s: [(p[0], p[1]) for p in curve] for s, curve in by_seed.items()} for m, by_seed in curves.items()}
            # A target before the first checkpoint cannot be located on the curves: it is left out (shown as "–").
            first_step = min(p[0] for by_seed in points.values() for curve in by_seed.values() for p in curve)
            fractions = [f for f in args.target_fractions if f * regime.max_train_steps >= first_step]
            targets = steps_to_target(points, fractions, regime.max_train_steps)
            by_nfe[nfe] = {
                "statistics": {m: curve_statistics(by_seed) for m, by_seed in curves.items()},
                "targets": targets,
                "verdicts": nfe_verdicts(curves, targets, regime.max_train_steps),
            }
        regime_report = {
            "name": regime.name,
            "recipe": regime.recipe,
            "description": regime.description,
            "dimension": regime.dimension,
            "train_batch_size": regime.train_batch_size,
            "max_train_steps": regime.max_train_steps,
            "metric": regime.metric,
            "metric_label": METRIC_LABELS[regime.metric],
            "metric_info": metric_info,
            "settings": asdict(regime),
            "methods": methods,
            "nfes": list(regime.nfes),
            "anchors": anchors,
            "curves": {m: {s: run["curves"] for s, run in by_seed.items()} for m, by_seed in runs.items()},
            "by_nfe": by_nfe,
            "distance_reduction": {m: float(np.mean([r["distance_reduction"] for r in by_seed.values()])) for m, by_seed in runs.items()},
            "timing": {
                m: {
                    "seconds_per_step": float(np.mean([r["seconds_per_step"] for r in by_seed.values()])),
                    "assign_seconds_per_step": float(np.mean([r["assign_seconds_per_step"] for r in by_seed.values()])),
                }
                for m, by_seed in runs.items()
            },
        }
        report["regimes"].append(regime_report)
        # Written after every regime: a benchmark stopped later still leaves the finished regimes' results.
        report["complete"] = len(report["regimes"]) == len(regimes)
        report["same_batches"] = "yes" if fingerprints_agree else "NO — the runs are not comparable"
        report["elapsed_minutes"] = (time.perf_counter() - started) / 60
        report["reused_runs"] = sum(bool(run.get("reused")) for run in all_runs)
        report["total_runs"] = len(all_runs)
        # Small, stable paths for the docs: verdicts.<regime>.nfe<N>.<method>.{verdict, final_mean, ...}.
        report["verdicts"] = {
            r["name"]: {f"nfe{nfe}": r["by_nfe"][nfe]["verdicts"] for nfe in r["nfes"]} for r in report["regimes"]
        }
        report["verdict_lines"] = [verdict_line(r, nfe) for r in report["regimes"] for nfe in r["nfes"]]
        paths = write_report(report, Path(args.output_dir))
    print(summary_markdown(report))
    print("Wrote " + ", ".join(str(p) for p in paths.values()))
    return report


if __name__ == "__main__":
    main()
