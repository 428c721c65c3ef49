#!/usr/bin/env python
"""The GPU check: everything that only a CUDA machine can show, in one run of at most ~8 minutes on one H200.

    make gpu-check                      # on a CUDA machine: writes benchmarks/results/gpu/*.md|csv|json
    make gpu-check ARGS=--dry-run       # every code path on the CPU with tiny sizes (CI; ~2-3 min on 2 cores)

Three parts, each written to ``--output_dir`` with provenance; the exit code is 1 if anything failed:

1. **Training scripts** (``training.md|csv``): each of ``train_unconditional.py``, ``train_consistency.py``,
   ``train_flow_matching.py`` and ``train_text_to_image.py`` (tiny models) trains with ``--mixed_precision
   bf16 --use_ema``, checkpoints, is killed with SIGKILL after the checkpoint, resumes with
   ``--resume_from_checkpoint latest`` to the end, and its saved pipeline samples on the device. Every EMA
   update runs under ``ema_device_guard.py``, which fails a step whose EMA weights are not on the model's
   device (the CUDA-only resume bug); a short fp16 run of each script follows on CUDA.
2. **Assignment on the device** (``assignment.md|csv``): B in {128 ... 8192} x D in {3072, 16384}: the cost
   GEMM in fp32/fp16/bf16, the transfer of the cost to the CPU, the exact solve, and the whole default
   ``assign_noise`` against the paper's path on the same GPU (fp16 ``cdist`` of 0.1-scaled tensors, then
   scipy on the CPU; skipped where its solve is predicted to exceed ``--reference_limit_s``).
3. **Share of a training step** (``step_share.md|csv``): the default assignment as a percentage of one
   training step (bf16 autocast, forward, backward, AdamW) of the CIFAR-10 DDPM UNet
   (``benchmarks/configs/ddpm_cifar10_unet.json``, B=128) and of an SD-sized UNet on 4x64x64 latents
   (B=64; and the assignment of a simulated world batch of 2048 against that per-GPU step).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from immiscible_diffusers import assign_noise
from immiscible_diffusers.assignment import DEFAULT_BLOCK_SIZE, assignment_blocks, cost_matrix
from immiscible_diffusers.evaluate import SamplingOptions, find_checkpoints, read_run, resolve_sampler
from immiscible_diffusers.precision import auto_cost_dtype
from immiscible_diffusers.provenance import provenance, provenance_markdown
from immiscible_diffusers.solvers import choose_solver, solve_linear_assignment
from immiscible_diffusers.training import read_train_log

REPO = Path(__file__).resolve().parents[1]
GUARD = REPO / "benchmarks" / "ema_device_guard.py"
GUARD_PREFIX = "ema-device-guard:"  # what ema_device_guard.py prints (kept in step with it by the dry-run test)
DDPM_CONFIG = REPO / "benchmarks" / "configs" / "ddpm_cifar10_unet.json"
SCRIPTS = ("train_unconditional", "train_consistency", "train_flow_matching", "train_text_to_image")

FULL = {
    "batch_sizes": [128, 512, 1024, 2048, 4096, 8192],
    "dims": [3072, 16384],
    "train_steps": 40,  # a few dozen steps; the checkpoint at 10, the kill soon after
    "checkpoint_step": 10,
    "fp16_steps": 12,
    "repeats": 3,
    "ddpm_batch": 128,
    "latent_batch": 64,
    "world_batch": 2048,
    "block_size": DEFAULT_BLOCK_SIZE,
}
DRY = {
    "batch_sizes": [16, 48],
    "dims": [48, 192],
    "train_steps": 8,
    "checkpoint_step": 2,
    "fp16_steps": 0,  # fp16 mixed precision needs CUDA
    "repeats": 1,
    "ddpm_batch": 4,
    "latent_batch": 2,
    "world_batch": 8,
    "block_size": 32,  # so that the blockwise path runs too
}
# Tiny-model flags of each script (as in tests/), the image-family ones shared by three scripts.
IMAGE_FLAGS = [
    "--resolution", "8", "--unet_block_out_channels", "8,16", "--train_batch_size", "8", "--max_train_samples", "64",
    "--eval_batch_size", "2", "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--seed", "0",
]  # fmt: skip
SCRIPT_FLAGS = {
    "train_unconditional": [*IMAGE_FLAGS, "--eval_scheduler", "ddim", "--ddpm_num_inference_steps", "2",
                            "--assignment", "linear"],
    "train_consistency": [*IMAGE_FLAGS, "--assignment", "linear", "--validation_steps", "1000"],
    "train_flow_matching": [*IMAGE_FLAGS, "--num_inference_steps", "2", "--assignment", "linear"],
    "train_text_to_image": ["--resolution", "16", "--train_batch_size", "8", "--learning_rate", "1e-3",
                            "--lr_warmup_steps", "0", "--seed", "0", "--max_train_samples", "48",
                            "--assignment", "linear", "--foreach_ema"],
}  # fmt: skip
TRAINING_COLUMNS = [
    "script", "mixed_precision", "steps", "checkpoint_step", "killed_after_step", "resumed_to_step",
    "ema_steps_checked", "sample_shape", "sample_finite", "seconds", "status", "error",
]  # fmt: skip
ASSIGNMENT_COLUMNS = [
    "batch_size", "dim", "cost_fp32_ms", "cost_fp16_ms", "cost_bf16_ms", "transfer_ms", "solver", "solve_ms",
    "auto_dtype", "blocks", "ours_total_ms", "reference_cost_ms", "reference_solve_ms", "reference_total_ms",
    "reference_over_ours", "reference_note",
]  # fmt: skip
SHARE_COLUMNS = ["workload", "model_parameters", "step_batch", "step_ms", "assignment_batch", "dim",
                 "assignment_ms", "assignment_percent_of_step"]  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The GPU check (training scripts, assignment, step share).")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="Every code path on the CPU with tiny sizes (for CI); writes the same files.")
    parser.add_argument("--device", default=None, help="Default: cuda (cpu with --dry-run).")
    parser.add_argument("--output_dir", default=None,
                        help="Default: benchmarks/results/gpu (a temporary folder with --dry-run).")
    parser.add_argument("--work_dir", default=None, help="Where the training runs go (default: a temporary folder).")
    parser.add_argument("--parts", nargs="+", default=["training", "assignment", "share"],
                        choices=["training", "assignment", "share"], help="Which parts to run.")
    parser.add_argument("--scripts", nargs="+", default=list(SCRIPTS), choices=SCRIPTS,
                        help="Training scripts of the training part.")
    parser.add_argument("--reference_limit_s", type=float, default=20.0,
                        help="Skip the paper path's scipy solve where it is predicted (cubic growth) to exceed this.")
    parser.add_argument("--script_timeout_s", type=float, default=240.0, help="Limit for one training run.")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device or ("cpu" if args.dry_run else "cuda"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch has no CUDA device; run with --dry-run on a CPU machine")
    if args.output_dir is None:
        args.output_dir = tempfile.mkdtemp(prefix="gpu-check-") if args.dry_run else str(REPO / "benchmarks" / "results" / "gpu")
    args.sizes = DRY if args.dry_run else FULL
    return args


# --------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(function: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall-clock milliseconds of ``function`` (after ``warmup`` untimed calls)."""
    times = []
    for index in range(warmup + repeats):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        if index >= warmup:
            times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def write_table(output_dir: Path, name: str, title: str, notes: str, columns: list[str], rows: list[dict], record: dict) -> None:
    """``name.csv`` and ``name.md`` (provenance at the top of the markdown; the csv's sibling json carries it)."""
    with open(output_dir / f"{name}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    (output_dir / f"{name}.json").write_text(json.dumps({"provenance": record, "rows": rows}, indent=2, default=str) + "\n")

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value).replace("|", "/").replace("\n", " ")[:200]

    lines = [f"# {title}", "", provenance_markdown(record), "", notes, "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    (output_dir / f"{name}.md").write_text("\n".join(lines) + "\n")


def load_module(name: str, path: Path):
    """A module from a file outside the package (a benchmark or test helper), imported once."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------------
# 1. Training scripts: bf16 + EMA, checkpoint, SIGKILL, resume, sampling
# --------------------------------------------------------------------------------------------------


def script_env(device: torch.device) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    if device.type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # accelerate must pick the CPU
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def script_command(script: str, output_dir: Path, steps: int, precision: str, extra: list[str], tiny_sd: Path | None) -> list[str]:
    command = [sys.executable, str(GUARD), str(REPO / "training_scripts" / f"{script}.py"),
               "--output_dir", str(output_dir), *SCRIPT_FLAGS[script], "--max_train_steps", str(steps),
               "--mixed_precision", precision, *extra]  # fmt: skip
    if script == "train_text_to_image":
        command += ["--pretrained_model_name_or_path", str(tiny_sd), "--cache_dir", str(output_dir.parent / "cache")]
    return command


def logged_steps(output_dir: Path) -> int:
    path = output_dir / "train_log.csv"
    try:
        rows = read_train_log(path) if path.exists() else []
    except (OSError, ValueError, KeyError):
        return 0
    return max((int(row["step"]) for row in rows), default=0)


def run_until_killed(command: list[str], output_dir: Path, kill_after: int, env: dict, timeout: float) -> int:
    """Start a training run, SIGKILL it once a step after ``kill_after`` is logged; return that step."""
    log = open(output_dir.parent / f"{output_dir.name}-killed.log", "w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            step = logged_steps(output_dir)
            if step > kill_after:  # checkpoint-<kill_after> is complete once a later step was logged
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
                return step
            if process.poll() is not None:
                raise RuntimeError(
                    f"the run ended (exit {process.returncode}) before it could be killed after step {kill_after}; "
                    f"see {log.name}"
                )
            time.sleep(0.02)
        raise RuntimeError(f"no step after {kill_after} was logged within {timeout:.0f} s; see {log.name}")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


def run_to_end(command: list[str], env: dict, timeout: float) -> str:
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if completed.returncode != 0:
        tail = (completed.stdout + completed.stderr)[-1500:]
        raise RuntimeError(f"exit {completed.returncode}: {tail}")
    return completed.stdout + completed.stderr


def ema_steps_checked(output: str) -> int:
    counts = [int(line.split()[1]) for line in output.splitlines() if line.startswith(GUARD_PREFIX) and "steps checked" in line]
    if not counts:
        raise RuntimeError("the EMA device guard did not report: was the run started under ema_device_guard.py?")
    return counts[-1]


def sample_saved_pipeline(script: str, output_dir: Path, device: torch.device) -> torch.Tensor:
    """Sample 2 images from the run's saved pipeline on ``device`` (2 inference steps)."""
    if script == "train_text_to_image":
        from diffusers import StableDiffusionPipeline

        pipeline = StableDiffusionPipeline.from_pretrained(output_dir, safety_checker=None).to(device)
        pipeline.set_progress_bar_config(disable=True)
        generator = torch.Generator("cpu").manual_seed(0)
        with torch.no_grad():
            return pipeline(["a handwritten digit 3"] * 2, num_inference_steps=2, height=16, width=16,
                            generator=generator, output_type="pt").images.float().cpu()  # fmt: skip
    run = read_run(output_dir)
    final = find_checkpoints(run)[-1]
    options = SamplingOptions(num_images=2, num_inference_steps=2, batch_size=2, device=str(device), progress=False)
    return resolve_sampler(run, None).sample(run, final.model_dir, options)


def check_script(script: str, args: argparse.Namespace, work: Path, tiny_sd: Path | None) -> list[dict]:
    """The bf16 + EMA kill/resume/sample check of one script, then (CUDA only) a short fp16 run."""
    sizes, env, rows = args.sizes, script_env(args.device), []
    steps, checkpoint = sizes["train_steps"], sizes["checkpoint_step"]
    start = time.perf_counter()
    row = {"script": script, "mixed_precision": "bf16", "steps": steps, "checkpoint_step": checkpoint}
    try:
        output_dir = work / f"{script}-bf16"
        extra = ["--use_ema", "--checkpointing_steps", str(checkpoint)]
        command = script_command(script, output_dir, steps, "bf16", extra, tiny_sd)
        row["killed_after_step"] = run_until_killed(command, output_dir, checkpoint, env, args.script_timeout_s)
        output = run_to_end([*command, "--resume_from_checkpoint", "latest"], env, args.script_timeout_s)
        row["ema_steps_checked"] = ema_steps_checked(output)
        row["resumed_to_step"] = logged_steps(output_dir)
        if row["resumed_to_step"] != steps:
            raise RuntimeError(f"the resumed run logged up to step {row['resumed_to_step']}, expected {steps}")
        if row["ema_steps_checked"] < steps - checkpoint:
            raise RuntimeError(f"only {row['ema_steps_checked']} EMA updates were checked after the resume")
        images = sample_saved_pipeline(script, output_dir, args.device)
        row["sample_shape"] = "x".join(map(str, images.shape))
        row["sample_finite"] = bool(torch.isfinite(images).all())
        if not row["sample_finite"]:
            raise RuntimeError("the saved pipeline sampled NaN/Inf")
        row["status"] = "ok"
    except Exception as error:  # one failing script must not hide the others; the row says what failed
        row["status"], row["error"] = "FAILED", f"{type(error).__name__}: {error}"
    row["seconds"] = time.perf_counter() - start
    rows.append(row)
    if sizes["fp16_steps"]:
        start = time.perf_counter()
        row = {"script": script, "mixed_precision": "fp16", "steps": sizes["fp16_steps"]}
        try:
            output_dir = work / f"{script}-fp16"
            run_to_end(script_command(script, output_dir, sizes["fp16_steps"], "fp16", ["--use_ema"], tiny_sd), env,
                       args.script_timeout_s)  # fmt: skip
            images = sample_saved_pipeline(script, output_dir, args.device)
            row["sample_shape"], row["sample_finite"] = "x".join(map(str, images.shape)), bool(torch.isfinite(images).all())
            row["status"] = "ok" if row["sample_finite"] else "FAILED"
        except Exception as error:
            row["status"], row["error"] = "FAILED", f"{type(error).__name__}: {error}"
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
    print(f"[training] {script}: " + ", ".join(f"{r['mixed_precision']} {r['status']}" for r in rows), flush=True)
    return rows


def check_training(args: argparse.Namespace, work: Path) -> list[dict]:
    tiny_sd = None
    if "train_text_to_image" in args.scripts:
        tests = load_module("gpu_check_t2i_helpers", REPO / "tests" / "test_train_text_to_image.py")
        tiny_sd = tests.build_tiny_sd_pipeline(work / "tiny-sd")
    return [row for script in args.scripts for row in check_script(script, args, work, tiny_sd)]


# --------------------------------------------------------------------------------------------------
# 2. The assignment on the device against the paper's path
# --------------------------------------------------------------------------------------------------


def check_assignment(args: argparse.Namespace) -> list[dict]:
    bench = load_module("benchmark_assignment", REPO / "benchmarks" / "assignment.py")
    digits = bench.load_digit_images()
    device, repeats, rows = args.device, args.sizes["repeats"], []
    block_size = args.sizes["block_size"]
    reference_history: list[tuple[int, float]] = []
    for dim in args.sizes["dims"]:
        for batch in args.sizes["batch_sizes"]:
            samples, noise = bench.make_batch(digits, batch, dim, 0, device)
            row = {"batch_size": batch, "dim": dim}
            for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
                row[f"cost_{name}_ms"] = median_ms(lambda: cost_matrix(samples, noise, "l2", dtype), device, repeats)
            # Transfer and solve as the default path does them: per block above DEFAULT_BLOCK_SIZE.
            blocks = with_warnings_off(lambda: assignment_blocks(batch, block_size))
            auto = auto_cost_dtype(device, blocks[0][1] - blocks[0][0], dim)
            costs = [cost_matrix(samples[a:b], noise[a:b], "l2", auto) for a, b in blocks]
            row["auto_dtype"] = str(auto).removeprefix("torch.")
            row["blocks"] = len(blocks)
            row["transfer_ms"] = median_ms(lambda: [c.to("cpu", torch.float64) for c in costs], device, repeats)
            row["solver"] = choose_solver(blocks[0][1] - blocks[0][0], dim)
            cpu_costs = [c.cpu() for c in costs]
            row["solve_ms"] = median_ms(lambda: [solve_linear_assignment(c, dim=dim) for c in cpu_costs],
                                        torch.device("cpu"), 1, 0)  # fmt: skip
            ours = lambda: with_warnings_off(lambda: assign_noise(samples, noise, block_size=block_size))  # noqa: E731
            ours()  # warm-up
            row["ours_total_ms"] = median_ms(ours, device, repeats, 0)
            predicted = bench.predicted_seconds([h for h in reference_history if h[0] <= batch], batch)
            if predicted > args.reference_limit_s:
                row["reference_note"] = f"skipped: scipy predicted {predicted:.0f} s"
            else:
                reference = bench.ReferencePath(samples, noise)
                total = median_ms(reference, device, 1 if batch >= 2048 else repeats, 0 if batch >= 2048 else 1)
                row["reference_cost_ms"] = 1e3 * statistics.median(reference.cost_seconds[-1:])
                row["reference_solve_ms"] = 1e3 * statistics.median(reference.solver_seconds[-1:])
                row["reference_total_ms"] = total
                row["reference_over_ours"] = total / row["ours_total_ms"]
                row["reference_note"] = " + ".join(sorted(reference.distance_methods)) + " + scipy"
                reference_history.append((batch, row["reference_solve_ms"] / 1e3))
            rows.append(row)
            print(f"[assignment] B={batch} D={dim}: ours {row['ours_total_ms']:.1f} ms, "
                  f"reference {row.get('reference_total_ms', float('nan')):.1f} ms", flush=True)  # fmt: skip
    return rows


def with_warnings_off(function: Callable[[], object]) -> object:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the block warning above block_size, expected here
        return function()


# --------------------------------------------------------------------------------------------------
# 3. The assignment's share of a training step
# --------------------------------------------------------------------------------------------------


def training_step_ms(model: torch.nn.Module, batch: torch.Tensor, device: torch.device, repeats: int, **call: object) -> float:
    """Median ms of one bf16-autocast training step: forward, MSE to the noise, backward, clipping, AdamW."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    timesteps = torch.randint(0, 1000, (batch.shape[0],), device=device)
    noise = torch.randn_like(batch)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            prediction = model(batch + noise, timesteps, **call).sample
        F.mse_loss(prediction.float(), noise).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return median_ms(step, device, repeats, warmup=2 if device.type == "cuda" else 1)


def ddpm_unet(dry_run: bool) -> torch.nn.Module:
    from diffusers import UNet2DModel

    config = json.loads(DDPM_CONFIG.read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    if dry_run:
        config.update(block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=8, sample_size=8)
    return UNet2DModel(**config)


def sd_unet(dry_run: bool) -> torch.nn.Module:
    """A Stable-Diffusion-1.x-sized UNet (860M parameters; random weights: only the speed matters)."""
    from diffusers import UNet2DConditionModel

    if dry_run:
        return UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                    cross_attention_dim=16, attention_head_dim=4)  # fmt: skip
    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)


def check_step_share(args: argparse.Namespace) -> list[dict]:
    device, sizes, rows = args.device, args.sizes, []
    repeats = sizes["repeats"]
    g = torch.Generator().manual_seed(0)

    def assignment_ms(batch: int, shape: tuple[int, ...]) -> float:
        samples = (torch.rand((batch, *shape), generator=g) * 2 - 1).to(device)
        noise = torch.randn((batch, *shape), generator=g).to(device)
        ours = lambda: with_warnings_off(lambda: assign_noise(samples, noise, block_size=sizes["block_size"]))  # noqa: E731
        ours()  # warm-up
        return median_ms(ours, device, repeats, 0)

    model = ddpm_unet(args.dry_run).to(device).train()
    side = model.config.sample_size
    batch = sizes["ddpm_batch"]
    images = torch.rand(batch, 3, side, side, generator=g).to(device)
    step = training_step_ms(model, images, device, repeats)
    rows.append(share_row("CIFAR-10 DDPM UNet (pixels)", model, batch, step, batch, (3, side, side), assignment_ms(batch, (3, side, side))))
    del model, images

    model = sd_unet(args.dry_run).to(device).train()
    side = model.config.sample_size
    batch = sizes["latent_batch"]
    latents = torch.randn(batch, 4, side, side, generator=g).to(device)
    context = torch.randn(batch, 77, model.config.cross_attention_dim, generator=g).to(device)
    label = "SD-sized UNet, latents, per-GPU batch"
    try:
        step = training_step_ms(model, latents, device, repeats, encoder_hidden_states=context)
    except torch.cuda.OutOfMemoryError:  # as SD trainers do at this batch: recompute activations
        torch.cuda.empty_cache()
        model.enable_gradient_checkpointing()
        label += " (gradient checkpointing)"
        step = training_step_ms(model, latents, device, repeats, encoder_hidden_states=context)
    shape = (4, side, side)
    rows.append(share_row(label, model, batch, step, batch, shape, assignment_ms(batch, shape)))
    world = sizes["world_batch"]
    rows.append(share_row(f"SD-sized UNet, latents, world batch {world} (global scope, one process)", model, batch,
                          step, world, shape, assignment_ms(world, shape)))  # fmt: skip
    for row in rows:
        print(f"[share] {row['workload']}: {row['assignment_percent_of_step']:.2f}% of a step", flush=True)
    return rows


def share_row(workload: str, model: torch.nn.Module, step_batch: int, step_ms: float, batch: int, shape: tuple, ms: float) -> dict:
    return {
        "workload": workload,
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "step_batch": step_batch,
        "step_ms": step_ms,
        "assignment_batch": batch,
        "dim": int(torch.Size(shape).numel()),
        "assignment_ms": ms,
        "assignment_percent_of_step": 100.0 * ms / step_ms,
    }


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    record = provenance()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    label = "CPU dry run (tiny sizes; not GPU figures)" if args.dry_run else f"device {args.device}"
    failures = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-work-") as scratch:
        work = Path(args.work_dir or scratch)
        work.mkdir(parents=True, exist_ok=True)
        if "training" in args.parts:
            rows = check_training(args, work)
            failures += [f"{r['script']} {r['mixed_precision']}: {r.get('error')}" for r in rows if r["status"] != "ok"]
            write_table(output_dir, "training", f"GPU check: training scripts ({label})",
                        "bf16 + EMA: trained, checkpointed, killed with SIGKILL after the checkpoint, resumed with "
                        "`--resume_from_checkpoint latest` to the end (every EMA update checked to run on the model's "
                        "device), then the saved pipeline sampled on the device. fp16 rows: a short run and a sample.",
                        TRAINING_COLUMNS, rows, record)  # fmt: skip
    for part, function, columns, title, notes in (
        ("assignment", check_assignment, ASSIGNMENT_COLUMNS, "GPU check: the assignment on the device",
         "Cost GEMM (B x B) per dtype on the device; then, per block as the default path does it, the transfer of "
         "the (auto-dtype) cost to the CPU as float64 and the exact solve (solver chosen per problem); the whole "
         f"default `assign_noise` (`cost_dtype=\"auto\"`, exact within blocks of {args.sizes['block_size']} above "
         "that); and the paper's path on the same device: fp16 `cdist` of 0.1-scaled tensors, then scipy on the "
         "whole batch. Above the block size the two solve different problems (blocks vs whole batch). "
         "Wall-clock medians."),
        ("share", check_step_share, SHARE_COLUMNS, "GPU check: the assignment's share of a training step",
         "Training step: bf16 autocast forward, MSE loss, backward, clipping, AdamW, wall-clock median. Assignment: "
         "the default `assign_noise` on the step's device."),
    ):
        if part not in args.parts:
            continue
        try:
            write_table(output_dir, part if part != "share" else "step_share", f"{title} ({label})", notes, columns,
                        function(args), record)  # fmt: skip
        except Exception:  # report and go on: the other parts still tell something
            failures.append(f"{part}: {traceback.format_exc(limit=3)}")
    print(f"results in {output_dir}")
    if failures:
        print("GPU check FAILED:\n" + "\n".join(failures), file=sys.stderr)
        return 1
    print("GPU check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
