#!/usr/bin/env python
"""How each sampler spends a small step budget: the timestep spacings compared on trained checkpoints.

For every run given, its final checkpoint (EMA weights) is sampled at each step count from the same starting
noise and scored with the digits Fréchet distance, once per spacing:

- DDPM runs (DDIM, eta = 0): ``timestep_spacing`` "leading" (diffusers' default: 1-step sampling starts at
  t = 0), "trailing" (starts at t = T-1; the evaluator's choice) and "linspace";
- flow-matching runs (Euler): diffusers' own sigmas ``linspace(1, 1/N_train, n)`` then 0 ("stock": with
  n = 2 the second step covers sigma 0.001 -> 0) and uniform sigmas ``1, (n-1)/n, ..., 1/n`` then 0
  ("uniform", ``uniform_sigma_schedule``: the pipeline's and the evaluator's choice);
- consistency runs: diffusers' multistep schedule (the only one offered: each step re-noises to a lower level).

    python benchmarks/speedup_samplers.py RUN_DIR [RUN_DIR ...] --output_dir benchmarks/results

Writes ``speedup_samplers.json`` and ``speedup_samplers.md`` (with their provenance) to ``--output_dir``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMPipeline, DDIMScheduler, FlowMatchEulerDiscreteScheduler

from immiscible_diffusers.evaluate import (
    SAMPLERS,
    DigitsFrechetMetric,
    SamplingOptions,
    _ddpm_family_scheduler_config,
    find_checkpoints,
    load_unet,
    read_run,
    run_image_pipeline,
)
from immiscible_diffusers.flow_matching import flow_matching_scheduler_config
from immiscible_diffusers.pipeline_flow_matching import FlowMatchingPipeline
from immiscible_diffusers.provenance import provenance, provenance_markdown

DDIM_SPACINGS = ("leading", "trailing", "linspace")


def sample_with_spacing(run, model_dir: Path, spacing: str, options: SamplingOptions) -> torch.Tensor:
    """Samples of one checkpoint with one spacing (see the module docstring), ``[-1, 1]``, on the CPU."""
    if run.pipeline_class in ("DDPMPipeline", "DDIMPipeline"):
        config = {k: v for k, v in _ddpm_family_scheduler_config(run).items() if k != "_use_default_values"}
        scheduler = DDIMScheduler.from_config(config, timestep_spacing=spacing)
        return run_image_pipeline(DDIMPipeline(unet=load_unet(model_dir, options.device), scheduler=scheduler), options, eta=0.0)
    if run.pipeline_class == "FlowMatchingPipeline":
        config = flow_matching_scheduler_config(run, model_dir)
        pipeline = FlowMatchingPipeline(unet=load_unet(model_dir, options.device), scheduler=FlowMatchEulerDiscreteScheduler.from_config(config))
        if spacing == "uniform":
            return run_image_pipeline(pipeline, options)
        stock = np.linspace(1.0, 1.0 / config["num_train_timesteps"], options.num_inference_steps).tolist()
        return run_image_pipeline(pipeline, options, sigmas=stock)
    return SAMPLERS["consistency"].sample(run, model_dir, options)


def spacings_for(pipeline_class: str | None) -> tuple[str, ...]:
    if pipeline_class in ("DDPMPipeline", "DDIMPipeline"):
        return DDIM_SPACINGS
    if pipeline_class == "FlowMatchingPipeline":
        return ("stock", "uniform")
    if pipeline_class == "ConsistencyModelPipeline":
        return ("diffusers multistep",)
    raise ValueError(f"no spacings to compare for pipeline class {pipeline_class!r}")


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Few-step samplers: which timestep spacing spends every step",
        "",
        provenance_markdown(report["provenance"]),
        "",
        f"Digits Fréchet distance (lower is better) of each run's final checkpoint (EMA), {report['num_samples']} samples "
        "from the same starting noise per cell.",
        "",
        "| run | sampler spacing | " + " | ".join(f"{n} step{'s' if n > 1 else ''}" for n in report["nfes"]) + " |",
        "|---|---|" + "---:|" * len(report["nfes"]),
    ]
    for row in report["rows"]:
        lines.append(f"| {row['run']} | {row['spacing']} | " + " | ".join(f"{row['scores'][str(n)]:.1f}" for n in report["nfes"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", help="Training runs' output folders (DDPM, flow matching or consistency).")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--nfes", type=int, nargs="+", default=[1, 2, 3, 4, 8, 20])
    parser.add_argument("--num_samples", type=int, default=450)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.nfes):
        parser.error(f"--nfes must be positive integers, got {args.nfes}")
    torch.set_num_threads(1)
    metric = DigitsFrechetMetric(progress=False)
    runs = [read_run(path) for path in args.run_dirs]
    for run in runs:
        metric.check_run(run)
        spacings_for(run.pipeline_class)
    report: dict[str, Any] = {"provenance": provenance(), "nfes": args.nfes, "num_samples": args.num_samples, "rows": []}
    for run in runs:
        checkpoint = find_checkpoints(run)[-1]
        for spacing in spacings_for(run.pipeline_class):
            scores = {}
            for nfe in args.nfes:
                options = SamplingOptions(args.num_samples, nfe, args.seed, 512, "cpu", False)
                scores[str(nfe)] = metric.score(sample_with_spacing(run, checkpoint.model_dir, spacing, options))
            report["rows"].append(
                {"run": f"{Path(run.run_dir).parent.name}/{run.label}", "pipeline_class": run.pipeline_class,
                 "step": checkpoint.step, "spacing": spacing, "scores": scores}
            )
            print(markdown(report).splitlines()[-1], flush=True)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "speedup_samplers.json").write_text(json.dumps(report, indent=1) + "\n")
    (output_dir / "speedup_samplers.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
