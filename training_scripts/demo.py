#!/usr/bin/env python
"""The main job: vanilla vs immiscible DDPM training on the bundled digits, same seeds, on a CPU.

Trains ``train_unconditional.py`` twice on scikit-learn's handwritten digits (offline, 16x16 grayscale):
``--assignment none`` (vanilla) and ``--assignment linear`` (Immiscible Diffusion), with the same seed,
hence the same batches, noise draws and timesteps. The two runs go side by side, one CPU thread each
(two processes on a 2-core machine beat one process with two threads), and write:

    <output_dir>/vanilla/        pipeline (stock DDPM classes), model card, checkpoints, samples/, train_log.csv
    <output_dir>/immiscible/     the same for the immiscible run
    <output_dir>/loss_curves.png both training-loss curves and what the assignment did to the distances
    <output_dir>/samples.png     the final sample grids side by side (same starting noise)
    <output_dir>/evaluation/     quality.png/.md/.csv: digits Frechet distance of every checkpoint, both runs
    <output_dir>/summary.json    durations, final losses, whether both runs saw the same data and draws

Usage: ``python training_scripts/demo.py [--output_dir outputs/demo] [--max_train_steps 1500]``.
A killed demo continues where it stopped when run again (each run resumes from its last checkpoint).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import torch  # noqa: E402

from immiscible_diffusers.data import DIGITS_NUM_IMAGES  # noqa: E402
from immiscible_diffusers.evaluate import add_metrics_to_model_cards, evaluate_runs, write_results  # noqa: E402
from immiscible_diffusers.training import TRAIN_LOG_NAME, read_train_log, relative_reduction  # noqa: E402

TRAIN_SCRIPT = Path(__file__).resolve().parent / "train_unconditional.py"
# name -> --assignment; both runs share every other flag, the seed included.
RUNS = {"vanilla": "none", "immiscible": "linear"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--max_train_steps", type=int, default=1500, help="Optimizer steps per run.")
    parser.add_argument("--train_batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--num_checkpoints", type=int, default=5, help="Checkpoints per run, evenly spaced.")
    parser.add_argument("--threads_per_run", type=int, default=1, help="torch threads of each training process.")
    parser.add_argument("--sequential", action="store_true", help="Train one run after the other, not side by side.")
    parser.add_argument("--overwrite", action="store_true", help="Delete earlier demo runs instead of resuming them.")
    parser.add_argument(
        "--num_eval_samples", type=int, default=450,
        help="Samples per checkpoint for the quality-vs-step curves (digits Frechet distance); 0 skips the evaluation.",
    )
    args = parser.parse_args(argv)
    for name in ("max_train_steps", "train_batch_size", "num_checkpoints", "threads_per_run", "resolution"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def training_command(args: argparse.Namespace, run_dir: Path, assignment: str) -> list[str]:
    """The ``train_unconditional.py`` command line of one run (identical for both but ``--assignment``)."""
    checkpointing_steps = max(1, math.ceil(args.max_train_steps / args.num_checkpoints))
    steps_per_epoch = DIGITS_NUM_IMAGES // args.train_batch_size
    grid_epochs = max(1, math.ceil(args.max_train_steps / steps_per_epoch / 3))  # a few grids per run (~10 s each)
    return [
        sys.executable, str(TRAIN_SCRIPT),
        "--output_dir", str(run_dir),
        "--assignment", assignment,
        "--seed", str(args.seed),
        "--resolution", str(args.resolution),
        "--train_batch_size", str(args.train_batch_size),
        "--max_train_steps", str(args.max_train_steps),
        "--learning_rate", str(args.learning_rate),
        "--lr_scheduler", "cosine",
        "--lr_warmup_steps", str(min(100, args.max_train_steps // 10)),
        "--use_ema", "--ema_max_decay", "0.999",
        "--eval_scheduler", "ddim", "--ddpm_num_inference_steps", "50", "--eval_batch_size", "64",
        "--save_images_epochs", str(grid_epochs), "--save_model_epochs", str(10**6),
        "--checkpointing_steps", str(checkpointing_steps),
        "--resume_from_checkpoint", "latest",
    ]  # fmt: skip


def _steps_logged(run_dir: Path) -> int:
    try:
        with open(run_dir / TRAIN_LOG_NAME) as handle:
            return max(0, sum(1 for _ in handle) - 1)
    except FileNotFoundError:
        return 0


def train_runs(args: argparse.Namespace) -> dict[str, dict]:
    """Run every training of RUNS (side by side unless --sequential); return per run its folder and duration.

    Each run's own output goes to ``<run>/train_output.log``; here, one progress bar per run follows
    its ``train_log.csv``. Raises ``RuntimeError`` (with the log's tail) when a run fails.
    """
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads_per_run), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    results = {}
    batches = [list(RUNS)] if not args.sequential else [[name] for name in RUNS]
    for batch in batches:
        processes = {}
        for name in batch:
            run_dir = args.output_dir / name
            run_dir.mkdir(parents=True, exist_ok=True)
            log_path = run_dir / "train_output.log"
            command = training_command(args, run_dir, RUNS[name])
            with open(log_path, "w") as log:
                processes[name] = (
                    subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env),
                    time.monotonic(),
                )
            results[name] = {"output_dir": str(run_dir), "command": command, "log": str(log_path)}
        bars = {
            name: tqdm(
                total=args.max_train_steps, desc=f"{name:>10} ({RUNS[name]})", position=i, unit="step", mininterval=2
            )
            for i, name in enumerate(batch)
        }
        running = dict(processes)
        while running:
            for name in list(running):
                bars[name].n = _steps_logged(args.output_dir / name)
                bars[name].refresh()
                process, started = running[name]
                # wait4 rather than poll: it also reports the CPU time the run used, which is what its wall
                # time would be on an idle core, whatever else shares the machine.
                pid, status, usage = os.wait4(process.pid, os.WNOHANG)
                if pid:
                    process.returncode = os.waitstatus_to_exitcode(status)
                    results[name]["seconds"] = round(time.monotonic() - started, 1)
                    results[name]["cpu_seconds"] = round(usage.ru_utime + usage.ru_stime, 1)
                    del running[name]
            time.sleep(0.5)
        for bar in bars.values():
            bar.close()
        for name, (process, _) in processes.items():
            if process.returncode != 0:
                tail = Path(results[name]["log"]).read_text()[-3000:]
                raise RuntimeError(f"the {name} run failed (exit code {process.returncode}); end of its log:\n{tail}")
    return results


def compare_random_streams(run_dirs: dict[str, Path]) -> dict[str, bool]:
    """Whether the runs saw the same batches and the same noise/timestep draws, step by step."""
    logs = {name: read_train_log(Path(d) / TRAIN_LOG_NAME) for name, d in run_dirs.items()}
    first, *others = logs.values()
    return {
        "same_batches": all([r["batch_hash"] for r in first] == [r["batch_hash"] for r in o] for o in others),
        "same_noise_and_timesteps": all(
            [r["noise_hash"] for r in first] == [r["noise_hash"] for r in o] for o in others
        ),
    }


def _smooth(values: list[float], weight: float) -> list[float]:
    """Exponential moving average, debiased as tensorboard's (so the first points are not dragged to zero)."""
    smoothed, average = [], 0.0
    for index, value in enumerate(values):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight ** (index + 1)))
    return smoothed


def plot_loss_curves(run_dirs: dict[str, Path], path: Path, smoothing: float = 0.98) -> Path:
    """Both training-loss curves (raw and smoothed) and the assignment's effect on the image-noise distance."""
    figure, (loss_axis, distance_axis) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = {"vanilla": "tab:blue", "immiscible": "tab:orange"}
    for name, run_dir in run_dirs.items():
        rows = read_train_log(Path(run_dir) / TRAIN_LOG_NAME)
        steps = [int(r["step"]) for r in rows]
        losses = [float(r["loss"]) for r in rows]
        color = colors.get(name)
        loss_axis.plot(steps, losses, color=color, alpha=0.15, linewidth=0.6)
        loss_axis.plot(
            steps, _smooth(losses, smoothing), color=color, label=f"{name} (assignment {RUNS.get(name, '?')})"
        )
        reduction = [
            100 * relative_reduction(float(r["assign_distance_before"]), float(r["assign_distance_after"]))
            for r in rows
        ]
        distance_axis.plot(steps, _smooth(reduction, 0.9), color=color, label=name)
    loss_axis.set(xlabel="optimizer step", ylabel="training MSE loss", yscale="log")
    loss_axis.set_title(
        "Training loss (NOT a quality measure: the assigned noise is\n"
        "partly predictable from the image, so its loss is lower by construction)",
        fontsize=10,
    )
    loss_axis.legend()
    loss_axis.grid(alpha=0.3)
    distance_axis.set(xlabel="optimizer step", ylabel="% shorter mean image-noise L2 distance")
    distance_axis.set_title("What the assignment did to each batch (smoothed)", fontsize=10)
    distance_axis.legend()
    distance_axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_final_samples(run_dirs: dict[str, Path], path: Path) -> Path:
    """The final sample grids of the runs side by side (both sampled from the same starting noise)."""
    figure, axes = plt.subplots(1, len(run_dirs), figsize=(5 * len(run_dirs), 5.4))
    for axis, (name, run_dir) in zip(axes, run_dirs.items(), strict=True):
        grid_path = sorted((Path(run_dir) / "samples").glob("step_*.png"))[-1]
        axis.imshow(Image.open(grid_path), cmap="gray", interpolation="nearest")
        axis.set_title(f"{name} ({grid_path.stem.replace('_', ' ')}, EMA, DDIM 50 steps)", fontsize=10)
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def final_losses(run_dir: Path, last: int = 100) -> dict[str, float]:
    """The last step's loss and the mean loss over the last ``last`` steps."""
    losses = [float(r["loss"]) for r in read_train_log(Path(run_dir) / TRAIN_LOG_NAME)]
    tail = losses[-last:]
    return {"final_loss": losses[-1], f"mean_loss_last_{len(tail)}_steps": sum(tail) / len(tail)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.overwrite:
        for name in RUNS:
            shutil.rmtree(args.output_dir / name, ignore_errors=True)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    print(
        f"Training {', '.join(f'{n} (--assignment {a})' for n, a in RUNS.items())} on the bundled digits, "
        f"{args.max_train_steps} steps each, seed {args.seed}{'' if args.sequential else ', side by side'} ..."
    )
    runs = train_runs(args)
    run_dirs = {name: Path(run["output_dir"]) for name, run in runs.items()}

    streams = compare_random_streams(run_dirs)
    loss_plot = plot_loss_curves(run_dirs, args.output_dir / "loss_curves.png")
    samples_plot = plot_final_samples(run_dirs, args.output_dir / "samples.png")
    evaluation = None
    if args.num_eval_samples > 0:
        print(f"Scoring every checkpoint of both runs ({args.num_eval_samples} samples, DDIM 20 steps, digits Frechet distance) ...")
        torch.set_num_threads(1)
        results = evaluate_runs(
            list(run_dirs.values()), labels=list(run_dirs), scheduler="ddim", num_inference_steps=20,
            num_samples=args.num_eval_samples,
        )
        evaluation = {name: str(path) for name, path in write_results(results, args.output_dir / "evaluation").items()}
        add_metrics_to_model_cards(results, list(run_dirs.values()))  # both cards: model-index and our metrics

    for name, run_dir in run_dirs.items():
        runs[name].update(final_losses(run_dir))
        rows = read_train_log(run_dir / TRAIN_LOG_NAME)
        runs[name]["mean_assign_seconds_per_step"] = sum(float(r["assign_seconds"]) for r in rows) / len(rows)
        runs[name]["mean_distance_reduction_percent"] = (
            100
            * sum(
                relative_reduction(float(r["assign_distance_before"]), float(r["assign_distance_after"])) for r in rows
            )
            / len(rows)
        )
    summary = {
        "max_train_steps": args.max_train_steps,
        "train_batch_size": args.train_batch_size,
        "seed": args.seed,
        "wall_seconds": round(time.monotonic() - started, 1),
        "runs": runs,
        **streams,
        "loss_curves": str(loss_plot),
        "samples": str(samples_plot),
        "evaluation": evaluation,
    }
    (args.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    print(
        f"\nDone in {summary['wall_seconds'] / 60:.1f} min. Same batches in both runs: {streams['same_batches']}; "
        f"same noise and timestep draws (before assignment): {streams['same_noise_and_timesteps']}."
    )
    for name, run in runs.items():
        print(
            f"  {name:>10}: {run['output_dir']}/  (pipeline + README.md card, samples/, checkpoint-*/, "
            f"train_log.csv, logs/)\n{'':14}trained in {run['seconds'] / 60:.1f} min "
            f"({run['cpu_seconds'] / 60:.1f} CPU-min); "
            f"final loss {run['final_loss']:.4f}, "
            f"mean distance cut by the assignment {run['mean_distance_reduction_percent']:.2f}%"
        )
    print(
        f"  loss curves: {loss_plot}\n  final samples side by side: {samples_plot}\n  "
        f"summary: {args.output_dir / 'summary.json'}"
    )
    if evaluation:
        print(f"  sample quality vs training step: {evaluation.get('plot')} and {evaluation.get('markdown')}")
    print("  Training loss is no quality measure (assigned noise is partly predictable); compare the samples.")
    return summary


if __name__ == "__main__":
    main()
