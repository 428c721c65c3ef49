#!/usr/bin/env python
"""The main job: vanilla vs immiscible training on the bundled digits, same seed, scored at few and many steps.

Trains twice on scikit-learn's handwritten digits (offline): ``--assignment none`` (vanilla) and
``--assignment linear`` (Immiscible Diffusion), with the same seed, hence the same batches, noise draws and
timesteps/sigmas. The recipe (``--recipe``) is the one where the speedup benchmark
(``benchmarks/results/speedup.md``) measured the clearest difference between the two: rectified flow
matching (``train_flow_matching.py``) on the digits at their native 8x8, where the assignment pays off in
few-step sampling; ``--recipe ddpm`` trains ``train_unconditional.py`` instead. Every checkpoint of both
runs is then sampled at several step counts (NFE, ``--nfes``: few-step and many-step) from the same
starting noise and scored with the digits Fréchet distance. The two runs go side by side, one CPU thread
each (two processes on a 2-core machine beat one process with two threads), and write:

    <output_dir>/vanilla/        pipeline, model card, checkpoints, samples/, train_log.csv
    <output_dir>/immiscible/     the same for the immiscible run
    <output_dir>/loss_curves.png both training-loss curves and what the assignment did to the distances
    <output_dir>/samples.png     final samples of both runs at the fewest and the most steps (same starting noise)
    <output_dir>/evaluation/     quality.png/.md/.csv: Fréchet distance of every checkpoint at every NFE, both runs
    <output_dir>/summary.json    provenance, durations, final quality per NFE, whether both runs saw the same draws

With ``--results_dir docs/results`` the summary is also written there as ``main_job.json`` and
``main_job.md`` (the committed copy the docs quote).

Usage: ``python training_scripts/demo.py [--output_dir outputs/demo] [--recipe flow] [--max_train_steps 2000]``.
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
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from immiscible_diffusers.arguments import add_debug_arg  # noqa: E402
from immiscible_diffusers.data import DIGITS_NUM_IMAGES  # noqa: E402
from immiscible_diffusers.errors import EXIT_USER_ERROR, run_entry_point  # noqa: E402
from immiscible_diffusers.evaluate import add_metrics_to_model_cards, evaluate_runs, write_results  # noqa: E402
from immiscible_diffusers.provenance import provenance, provenance_markdown  # noqa: E402
from immiscible_diffusers.training import TRAIN_LOG_NAME, read_train_log, relative_reduction  # noqa: E402

SCRIPTS_DIR = Path(__file__).resolve().parent
# recipe -> (training script, the evaluator's sampler)
RECIPES = {"flow": ("train_flow_matching.py", "flow_euler"), "ddpm": ("train_unconditional.py", "ddim")}
RECIPE_NAMES = {"flow": "rectified flow matching, Euler sampling", "ddpm": "DDPM, DDIM sampling"}
# name -> --assignment; both runs share every other flag, the seed included.
RUNS = {"vanilla": "none", "immiscible": "linear"}
# Per run: ~0.07 s/step of flow matching at 8x8 on one core, so both runs plus the evaluation fit in ~10 min.
DEFAULT_MAX_TRAIN_STEPS = 2000
# A difference of the final scores under this share is reported as "about the same" (one seed, no error bar).
SAME_WITHIN = 0.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/demo"))
    parser.add_argument(
        "--recipe",
        choices=tuple(RECIPES),
        default="flow",
        help=(
            "flow: rectified flow matching (the recipe where the benchmark found the clearest difference); "
            "ddpm: DDPM."
        ),
    )
    parser.add_argument("--max_train_steps", type=int, default=DEFAULT_MAX_TRAIN_STEPS, help="Optimizer steps per run.")
    parser.add_argument("--train_batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--resolution", type=int, default=8, help="Image side (the digits are 8x8; larger is upsampled)."
    )
    parser.add_argument(
        "--nfes",
        type=int,
        nargs="+",
        default=[1, 2, 4, 8, 20],
        help="Sampling steps (model evaluations per sample) every checkpoint is scored at: few-step and many-step.",
    )
    parser.add_argument(
        "--unet_block_out_channels", default="32,64", help="UNet widths (as the speedup benchmark's digits8 regimes)."
    )
    parser.add_argument("--num_checkpoints", type=int, default=5, help="Checkpoints per run, evenly spaced.")
    parser.add_argument("--threads_per_run", type=int, default=1, help="torch threads of each training process.")
    parser.add_argument("--sequential", action="store_true", help="Train one run after the other, not side by side.")
    parser.add_argument("--overwrite", action="store_true", help="Delete earlier demo runs instead of resuming them.")
    parser.add_argument(
        "--num_eval_samples",
        type=int,
        default=450,
        help="Samples per checkpoint for the quality-vs-step curves (digits Frechet distance); 0 skips the evaluation.",
    )
    parser.add_argument(
        "--results_dir",
        type=Path,
        default=None,
        help="Also write the summary there as main_job.json and main_job.md (e.g. docs/results, the committed copy).",
    )
    add_debug_arg(parser)
    args = parser.parse_args(argv)
    for name in ("max_train_steps", "train_batch_size", "num_checkpoints", "threads_per_run", "resolution"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if any(n < 1 for n in args.nfes) or len(set(args.nfes)) != len(args.nfes):
        parser.error(f"--nfes must be distinct positive integers, got {args.nfes}")
    if args.num_eval_samples == 1 or args.num_eval_samples < 0:
        parser.error(f"--num_eval_samples must be 0 (no evaluation) or >= 2, got {args.num_eval_samples}")
    args.nfes = sorted(args.nfes)
    return args


def training_command(args: argparse.Namespace, run_dir: Path, assignment: str) -> list[str]:
    """The training script's command line for one run (identical for both but ``--assignment``)."""
    checkpointing_steps = max(1, math.ceil(args.max_train_steps / args.num_checkpoints))
    steps_per_epoch = DIGITS_NUM_IMAGES // args.train_batch_size
    grid_epochs = max(1, math.ceil(args.max_train_steps / steps_per_epoch / 3))  # a few grids per run (~10 s each)
    if args.recipe == "flow":
        grids = ["--num_inference_steps", str(max(args.nfes))]
    else:
        grids = ["--eval_scheduler", "ddim", "--ddpm_num_inference_steps", str(max(args.nfes))]
    return [
        sys.executable, str(SCRIPTS_DIR / RECIPES[args.recipe][0]),
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
        *grids, "--eval_batch_size", "64",
        "--save_images_epochs", str(grid_epochs), "--save_model_epochs", str(10**6),
        "--checkpointing_steps", str(checkpointing_steps),
        "--unet_block_out_channels", args.unet_block_out_channels,
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
            if process.returncode == EXIT_USER_ERROR:
                # The training script refused an option we passed on: the user's, so report its one line.
                lines = Path(results[name]["log"]).read_text().strip().splitlines() or ["(no output)"]
                reason = lines[-1].removeprefix("error: ")
                raise ValueError(f"the {name} training run refused its options: {reason} (log: {results[name]['log']})")
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


def plot_final_samples(grids: dict[str, dict[int, Path]], scores: dict[str, dict[int, float]], path: Path) -> Path:
    """Final samples of each run (rows) at each NFE given (columns), all from the same starting noise."""
    names = list(grids)
    nfes = sorted(grids[names[0]])
    figure, axes = plt.subplots(len(names), len(nfes), figsize=(4.2 * len(nfes), 4.5 * len(names)), squeeze=False)
    for row, name in zip(axes, names):
        for axis, nfe in zip(row, nfes):
            axis.imshow(Image.open(grids[name][nfe]), cmap="gray", interpolation="nearest")
            score = scores.get(name, {}).get(nfe)
            axis.set_title(
                f"{name}, {nfe} step{'s' if nfe > 1 else ''}" + (f": FD {score:.1f}" if score is not None else ""),
                fontsize=10,
            )
            axis.axis("off")
    figure.suptitle(
        "Final checkpoint (EMA), same starting noise; FD = digits Fréchet distance, lower is better", fontsize=10
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def training_grids(run_dirs: dict[str, Path], nfe: int) -> dict[str, dict[int, Path]]:
    """Each run's last sample grid saved by its training script (made with ``nfe`` steps)."""
    return {name: {nfe: sorted((Path(d) / "samples").glob("step_*.png"))[-1]} for name, d in run_dirs.items()}


def quality_by_nfe(results, run_names: list[str]) -> dict[str, Any]:
    """Final-checkpoint scores per NFE of each run, and immiscible vs vanilla at each NFE (one seed: no error bar)."""
    final = results.final_by_nfe("digits_fd")
    scores = {name: {int(nfe): float(value) for nfe, value in final[name]} for name in run_names}
    comparison = {}
    for nfe, vanilla in scores["vanilla"].items():
        immiscible = scores["immiscible"][nfe]
        change = immiscible / vanilla - 1.0
        word = "about the same" if abs(change) < SAME_WITHIN else ("better" if change < 0 else "worse")
        comparison[nfe] = {
            "vanilla": vanilla,
            "immiscible": immiscible,
            "relative_change": change,
            "immiscible_is": word,
        }
    return {"final_step": max(row["step"] for row in results.rows), "scores": scores, "by_nfe": comparison}


def summary_markdown(summary: dict[str, Any]) -> str:
    """The main job's summary as Markdown: provenance, then final quality per NFE of both runs."""
    quality = summary.get("quality")
    lines = [
        "# Main job: vanilla vs immiscible",
        "",
        provenance_markdown(summary["provenance"]),
        "",
        f"Recipe: {RECIPE_NAMES[summary['recipe']]}, digits at {summary['resolution']}x{summary['resolution']}, "
        f"{summary['max_train_steps']} steps at batch {summary['train_batch_size']}, seed {summary['seed']} (one seed: "
        "a demonstration; the 3-seed evidence is in benchmarks/results/speedup.md). Same batches in both runs: "
        f"{summary['same_batches']}; same noise draws before assignment: {summary['same_noise_and_timesteps']}.",
        "",
    ]
    if quality:
        lines += [
            f"Digits Fréchet distance of the final checkpoint (step {quality['final_step']}, EMA, "
            f"{summary['num_eval_samples']} samples from the same starting noise; lower is better):",
            "",
            "| NFE (sampling steps) | vanilla | immiscible | change | immiscible is |",
            "|---:|---:|---:|---:|---|",
        ]
        for nfe, row in sorted(quality["by_nfe"].items(), key=lambda item: int(item[0])):
            lines.append(
                f"| {nfe} | {row['vanilla']:.2f} | {row['immiscible']:.2f} | "
                f"{100 * row['relative_change']:+.1f}% | {row['immiscible_is']} |"
            )
        lines.append("")
    lines.append(f"Wall clock: {summary['wall_seconds'] / 60:.1f} min.")
    return "\n".join(lines) + "\n"


def final_losses(run_dir: Path, last: int = 100) -> dict[str, float]:
    """The last step's loss and the mean loss over the last ``last`` steps."""
    losses = [float(r["loss"]) for r in read_train_log(Path(run_dir) / TRAIN_LOG_NAME)]
    tail = losses[-last:]
    return {"final_loss": losses[-1], f"mean_loss_last_{len(tail)}_steps": sum(tail) / len(tail)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    for name in ("output_dir", "results_dir"):
        folder = getattr(args, name)
        if folder is not None and folder.exists() and not folder.is_dir():
            raise ValueError(f"--{name} {str(folder)!r} is a file, not a folder")
    if args.overwrite:
        for name in RUNS:
            shutil.rmtree(args.output_dir / name, ignore_errors=True)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    print(
        f"Training {RECIPE_NAMES[args.recipe].split(',')[0]}: "
        f"{', '.join(f'{n} (--assignment {a})' for n, a in RUNS.items())} on the bundled digits, "
        f"{args.max_train_steps} steps each, seed {args.seed}{'' if args.sequential else ', side by side'} ..."
    )
    runs = train_runs(args)
    run_dirs = {name: Path(run["output_dir"]) for name, run in runs.items()}

    streams = compare_random_streams(run_dirs)
    loss_plot = plot_loss_curves(run_dirs, args.output_dir / "loss_curves.png")
    evaluation = quality = None
    if args.num_eval_samples > 0:
        sampler = RECIPES[args.recipe][1]
        print(
            f"Scoring every checkpoint of both runs at {args.nfes} sampling steps ({args.num_eval_samples} samples, "
            f"{sampler}, digits Frechet distance) ..."
        )
        torch.set_num_threads(1)
        samples_dir = args.output_dir / "evaluation" / "samples"
        results = evaluate_runs(
            list(run_dirs.values()),
            labels=list(run_dirs),
            scheduler=sampler,
            num_inference_steps=args.nfes,
            num_samples=args.num_eval_samples,
            save_samples_dir=samples_dir,
        )
        evaluation = {name: str(path) for name, path in write_results(results, args.output_dir / "evaluation").items()}
        add_metrics_to_model_cards(results, list(run_dirs.values()))  # both cards: model-index and our metrics
        quality = quality_by_nfe(results, list(run_dirs))
        shown = sorted({args.nfes[0], args.nfes[-1]})
        grids = {
            name: {
                n: samples_dir
                / name
                / f"step_{quality['final_step']:06d}{'' if len(args.nfes) == 1 else f'_nfe{n}'}.png"
                for n in shown
            }
            for name in run_dirs
        }
        samples_plot = plot_final_samples(grids, quality["scores"], args.output_dir / "samples.png")
    else:
        samples_plot = plot_final_samples(training_grids(run_dirs, max(args.nfes)), {}, args.output_dir / "samples.png")

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
        "provenance": provenance(),
        "recipe": args.recipe,
        "resolution": args.resolution,
        "max_train_steps": args.max_train_steps,
        "train_batch_size": args.train_batch_size,
        "seed": args.seed,
        "nfes": args.nfes,
        "num_eval_samples": args.num_eval_samples,
        "wall_seconds": round(time.monotonic() - started, 1),
        "runs": runs,
        **streams,
        "quality": quality,
        "loss_curves": str(loss_plot),
        "samples": str(samples_plot),
        "evaluation": evaluation,
    }
    (args.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.output_dir / "summary.md").write_text(summary_markdown(summary))
    if args.results_dir is not None:
        args.results_dir.mkdir(parents=True, exist_ok=True)
        (args.results_dir / "main_job.json").write_text(json.dumps(summary, indent=2) + "\n")
        (args.results_dir / "main_job.md").write_text(summary_markdown(summary))

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
        print(f"  sample quality vs training step and NFE: {evaluation.get('plot')} and {evaluation.get('markdown')}")
        for nfe, row in sorted(quality["by_nfe"].items()):
            print(
                f"  {nfe:>3} sampling steps: vanilla FD {row['vanilla']:.2f}, immiscible FD {row['immiscible']:.2f} "
                f"({100 * row['relative_change']:+.1f}%, {row['immiscible_is']})"
            )
    print("  Training loss is no quality measure (assigned noise is partly predictable); compare the samples.")
    return summary


if __name__ == "__main__":
    run_entry_point(main)
