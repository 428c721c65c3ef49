#!/usr/bin/env python
"""What does the drop-in scheduler cost on top of the assignment itself?

The drop-in (``ImmiscibleDDPMScheduler.add_noise`` / ``get_velocity``) fingerprints the samples and the noise
(one per-sample sum each) to recognise a pairing it already made. This times, at one batch (default B=128,
D=16384: Stable Diffusion latents at 512 px), the stock ``add_noise``, one fingerprint, the assignment alone,
the drop-in call that assigns, the old drop-in's work (assignment + in-place copy + stock ``add_noise``), and a
``get_velocity`` that reuses the pairing against the stock one. Medians of interleaved rounds.

    OMP_NUM_THREADS=1 python benchmarks/dropin_overhead.py            # writes benchmarks/results/dropin_overhead.{md,json}
    OMP_NUM_THREADS=1 python benchmarks/dropin_overhead.py --quick    # a smoke run, not written unless --output given
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from assignment import CLOCKS, time_interleaved  # benchmarks/assignment.py, next to this script
from diffusers import DDPMScheduler

from immiscible_diffusers import ImmiscibleDDPMScheduler, assign_noise
from immiscible_diffusers.provenance import command_line, provenance, provenance_markdown
from immiscible_diffusers.schedulers import _fingerprint

RESULTS = Path(__file__).resolve().parent / "results" / "dropin_overhead"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--shape", type=int, nargs="+", default=[4, 64, 64], help="per-sample shape (D = product)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu", help="cpu: process time, robust on a shared machine")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="B=16, 5 repeats")
    parser.add_argument("--output", type=Path, default=None, help=f"path stem of the results (default {RESULTS} unless --quick)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.repeats, args.warmup = 16, 5, 1
    if args.output is None and not args.quick:
        args.output = RESULTS
    return args


def measure(args: argparse.Namespace) -> dict[str, float]:
    """Median milliseconds of each operation."""
    generator = torch.Generator().manual_seed(args.seed)
    shape = (args.batch_size, *args.shape)
    prototypes = torch.rand((8, *args.shape), generator=generator) * 2 - 1
    samples = prototypes[torch.randint(0, 8, (args.batch_size,), generator=generator)]
    samples = samples + 0.1 * torch.randn(shape, generator=generator)
    timesteps = torch.randint(0, 1000, (args.batch_size,), generator=generator)
    stock = DDPMScheduler(num_train_timesteps=1000)
    dropin = ImmiscibleDDPMScheduler(num_train_timesteps=1000)
    reusing = ImmiscibleDDPMScheduler(num_train_timesteps=1000)  # its one pairing stays in its cache
    rounds = args.warmup + args.repeats
    fresh = {name: [torch.randn(shape, generator=generator) for _ in range(rounds)] for name in ("dropin", "old")}
    assigned_noise = torch.randn(shape, generator=generator)
    reusing.add_noise(samples, assigned_noise, timesteps)  # assigns in place: the pairing get_velocity reuses

    def dropin_assigning():
        dropin.add_noise(samples, fresh["dropin"].pop(), timesteps)

    def old_dropin():  # what the drop-in did before issue 11: assign, copy into the caller's tensor, add_noise
        noise = fresh["old"].pop()
        noise.copy_(assign_noise(samples, noise))
        stock.add_noise(samples, noise, timesteps)

    functions = {
        "stock add_noise": lambda: stock.add_noise(samples, assigned_noise, timesteps),
        "fingerprint (one tensor)": lambda: _fingerprint(assigned_noise),
        "assign_noise (linear, float32)": lambda: assign_noise(samples, assigned_noise),
        "old drop-in add_noise (assign + copy + add_noise)": old_dropin,
        "drop-in add_noise (assigns)": dropin_assigning,
        "stock get_velocity": lambda: stock.get_velocity(samples, assigned_noise, timesteps),
        "drop-in get_velocity (reuses the pairing)": lambda: reusing.get_velocity(samples, assigned_noise, timesteps),
    }
    seconds = time_interleaved(functions, args.repeats, args.warmup, torch.device("cpu"), CLOCKS[args.clock])
    return {name: 1000.0 * value for name, value in seconds.items()}


def summarise(ms: dict[str, float]) -> dict[str, float]:
    """The headline numbers docs quote."""
    overhead = ms["drop-in add_noise (assigns)"] - ms["old drop-in add_noise (assign + copy + add_noise)"]
    reuse_overhead = ms["drop-in get_velocity (reuses the pairing)"] - ms["stock get_velocity"]
    return {
        "fingerprint_ms": ms["fingerprint (one tensor)"],
        "stock_add_noise_ms": ms["stock add_noise"],
        "assignment_ms": ms["assign_noise (linear, float32)"],
        "dropin_assigning_ms": ms["drop-in add_noise (assigns)"],
        "old_dropin_ms": ms["old drop-in add_noise (assign + copy + add_noise)"],
        "overhead_vs_old_dropin_ms": overhead,
        "overhead_vs_old_dropin_percent": 100.0 * overhead / ms["old drop-in add_noise (assign + copy + add_noise)"],
        "fingerprint_vs_stock_add_noise_percent": 100.0 * ms["fingerprint (one tensor)"] / ms["stock add_noise"],
        "fingerprint_vs_assignment_percent": 100.0 * ms["fingerprint (one tensor)"] / ms["assign_noise (linear, float32)"],
        "reuse_overhead_ms": reuse_overhead,
    }


def markdown(args: argparse.Namespace, ms: dict[str, float], headline: dict[str, float], record: dict) -> str:
    dim = 1
    for size in args.shape:
        dim *= size
    rows = "\n".join(f"| {name} | {value:.2f} |" for name, value in ms.items())
    return f"""# Drop-in scheduler overhead (B={args.batch_size}, D={dim})

{provenance_markdown(record)}
- settings: per-sample shape {tuple(args.shape)}, median of {args.repeats} interleaved rounds ({args.clock} clock), \
{torch.get_num_threads()} torch thread(s), linear assignment, float32 cost

| operation | ms |
|---|---:|
{rows}

One fingerprint (a per-sample sum) costs {headline['fingerprint_ms']:.2f} ms: \
{headline['fingerprint_vs_stock_add_noise_percent']:.0f}% of a stock `add_noise` and \
{headline['fingerprint_vs_assignment_percent']:.1f}% of the assignment. \
The assigning drop-in call costs {headline['overhead_vs_old_dropin_ms']:+.2f} ms \
({headline['overhead_vs_old_dropin_percent']:+.1f}%) against the old drop-in's work (three fingerprints and the \
pairing checks); a `get_velocity` that reuses the pairing costs {headline['reuse_overhead_ms']:+.2f} ms against the stock one.
"""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    ms = measure(args)
    headline = summarise(ms)
    threads = os.environ.get("OMP_NUM_THREADS")
    record = provenance(f"OMP_NUM_THREADS={threads} {command_line()}" if threads else None)
    report = markdown(args, ms, headline, record)
    print(report)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.with_suffix(".md").write_text(report)
        payload = {
            "provenance": record,
            "settings": {"batch_size": args.batch_size, "shape": args.shape, "repeats": args.repeats, "clock": args.clock,
                         "threads": torch.get_num_threads()},
            "ms": ms,
            "headline": headline,
        }
        args.output.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
