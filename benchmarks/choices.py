#!/usr/bin/env python
"""The measurements behind two defaults: the solver rule (solvers.py) and the CPU cost dtype rule (precision.py).

    python benchmarks/choices.py --output_dir benchmarks/results      # ~3 min of one core

``solver_choice.md|json``: lapjv and scipy on the same float64 cost, on the costs where they differ most:
the 2-D toy (8 Gaussians, as benchmarks/speedup.py trains on), low-dimensional Gaussians, clustered
samples at image-like dimensions, and degenerate costs (few distinct samples, repeated rows); with the
solver ``choose_solver`` picks and its time against scipy's.
``cost_dtype_cpu.md|json``: ``cost_matrix`` in float32 and bfloat16 on this CPU, with what
``cost_dtype="auto"`` picks here. Times are CPU seconds of one thread (``time.process_time``), medians.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from lapjv import lapjv
from scipy.optimize import linear_sum_assignment

from immiscible_diffusers.assignment import cost_matrix
from immiscible_diffusers.precision import auto_cost_dtype, cpu_has_native_bf16
from immiscible_diffusers.provenance import provenance, provenance_markdown
from immiscible_diffusers.solvers import choose_solver

REPO = Path(__file__).resolve().parents[1]


def cpu_ms(function: Callable[[], object], repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.process_time()
        function()
        times.append(1e3 * (time.process_time() - start))
    return statistics.median(times)


def samples_of(kind: str, batch: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    if kind == "toy2d":  # 8 Gaussians on the unit circle, std 0.1
        angles = torch.randint(0, 8, (batch,), generator=generator).float() * (math.pi / 4)
        return torch.stack([angles.cos(), angles.sin()], dim=1) + 0.1 * torch.randn(batch, 2, generator=generator)
    if kind == "gaussian":
        return torch.randn(batch, dim, generator=generator)
    if kind == "clustered":  # 8 prototypes + noise: image-like structure
        prototypes = torch.rand(8, dim, generator=generator) * 2 - 1
        return prototypes[torch.randint(0, 8, (batch,), generator=generator)] + 0.1 * torch.randn(batch, dim, generator=generator)
    if kind == "repeated":  # 4 distinct samples: identical rows in the cost matrix
        prototypes = torch.rand(4, dim, generator=generator) * 2 - 1
        return prototypes[torch.randint(0, 4, (batch,), generator=generator)]
    raise ValueError(kind)


SOLVER_CASES = (
    [("toy2d", b, 2) for b in (64, 128, 256, 512, 1024)]
    + [("gaussian", b, d) for d in (3, 4, 6, 8) for b in (64, 256, 1024)]
    + [("clustered", b, d) for d in (16, 192, 3072) for b in (64, 256, 1024)]
    + [("repeated", b, 192) for b in (64, 256, 1024)]
)
DTYPE_CASES = [(b, d) for b in (64, 128, 256, 512, 1024) for d in (192, 768, 3072, 16384) if b * b * d <= 1024 * 1024 * 3072]


def measure_solvers(repeats: int) -> list[dict]:
    rows = []
    for kind, batch, dim in SOLVER_CASES:
        g = torch.Generator().manual_seed(batch * 1000 + dim)
        samples, noise = samples_of(kind, batch, dim, g), torch.randn(batch, dim, generator=g)
        matrix = np.ascontiguousarray(cost_matrix(samples, noise).double().numpy())
        reps = repeats if batch <= 256 else max(1, repeats // 2)
        lapjv_ms = cpu_ms(lambda: lapjv(matrix), reps)
        scipy_ms = cpu_ms(lambda: linear_sum_assignment(matrix), reps)
        chosen = choose_solver(batch, dim)
        chosen_ms = lapjv_ms if chosen == "lapjv" else scipy_ms
        rows.append({"data": kind, "batch_size": batch, "dim": dim, "lapjv_ms": lapjv_ms, "scipy_ms": scipy_ms,
                     "chosen": chosen, "chosen_over_scipy": chosen_ms / scipy_ms})  # fmt: skip
        print(f"solver {kind} B={batch} D={dim}: lapjv {lapjv_ms:.2f} scipy {scipy_ms:.2f} -> {chosen}", flush=True)
    return rows


def measure_dtypes(repeats: int) -> list[dict]:
    rows = []
    for batch, dim in DTYPE_CASES:
        g = torch.Generator().manual_seed(batch + dim)
        samples, noise = torch.rand(batch, dim, generator=g) * 2 - 1, torch.randn(batch, dim, generator=g)
        fp32 = cpu_ms(lambda: cost_matrix(samples, noise, "l2", torch.float32), repeats)
        bf16 = cpu_ms(lambda: cost_matrix(samples, noise, "l2", torch.bfloat16), repeats)
        auto = auto_cost_dtype(torch.device("cpu"), batch, dim)
        chosen = bf16 if auto == torch.bfloat16 else fp32
        rows.append({"batch_size": batch, "dim": dim, "float32_ms": fp32, "bfloat16_ms": bf16,
                     "auto": str(auto).removeprefix("torch."), "auto_over_best": chosen / min(fp32, bf16)})  # fmt: skip
        print(f"dtype B={batch} D={dim}: fp32 {fp32:.3f} bf16 {bf16:.3f} -> {auto}", flush=True)
    return rows


def table(columns: list[str], rows: list[dict]) -> str:
    def cell(value: object) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    record = provenance()
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)

    solver_rows = measure_solvers(args.repeats)
    worst = max(solver_rows, key=lambda r: r["chosen_over_scipy"])
    headline = {"max_chosen_over_scipy": worst["chosen_over_scipy"]}
    toy = {r["batch_size"]: r for r in solver_rows if r["data"] == "toy2d"}
    if 256 in toy:
        headline.update(toy_b256_lapjv_ms=toy[256]["lapjv_ms"], toy_b256_scipy_ms=toy[256]["scipy_ms"])
    (output / "solver_choice.json").write_text(json.dumps({"provenance": record, "headline": headline, "rows": solver_rows}, indent=2) + "\n")
    (output / "solver_choice.md").write_text(
        "# Exact solver: lapjv or scipy, per problem\n\n" + provenance_markdown(record) + "\n\n"
        "Both solve the same float64 cost matrix (`cost_matrix` in float32 of the samples against Gaussian noise) "
        "to the same optimum; CPU time of one thread, median. `chosen` is `solvers.choose_solver(B, D)`; "
        "`chosen / scipy` <= 1 (within noise) means the default is never slower than scipy. "
        f"Worst `chosen / scipy` here: {worst['chosen_over_scipy']:.2f} ({worst['data']}, B={worst['batch_size']}, D={worst['dim']}).\n\n"
        + table(["data", "batch_size", "dim", "lapjv_ms", "scipy_ms", "chosen", "chosen_over_scipy"], solver_rows) + "\n"
    )  # fmt: skip

    dtype_rows = measure_dtypes(args.repeats)
    native = cpu_has_native_bf16()
    (output / "cost_dtype_cpu.json").write_text(json.dumps({"provenance": record, "cpu_native_bf16": native, "rows": dtype_rows}, indent=2) + "\n")
    (output / "cost_dtype_cpu.md").write_text(
        "# Cost GEMM dtype on this CPU: float32 or bfloat16\n\n" + provenance_markdown(record) + "\n\n"
        f"Native bf16 matmul on this CPU (AVX512-BF16/AMX-BF16 flag and torch AVX-512 kernels): **{native}**. "
        "`cost_matrix(samples, noise, 'l2', dtype)` (inputs scaled, casts, GEMM, fp32 norms), CPU time of one "
        "thread, median; `auto` is what `cost_dtype=\"auto\"` picks here; `auto / best` is its time over the "
        "faster of the two.\n\n"
        + table(["batch_size", "dim", "float32_ms", "bfloat16_ms", "auto", "auto_over_best"], dtype_rows) + "\n"
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
