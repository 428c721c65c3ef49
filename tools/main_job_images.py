#!/usr/bin/env python
"""Copy the main job's final sample grids into docs/images/ for the README, with where they came from.

    python tools/main_job_images.py outputs/demo [--demo_commit SHA] [--demo_command "python training_scripts/demo.py ..."]

Writes ``docs/images/main_job_vanilla.png``, ``docs/images/main_job_immiscible.png`` (each run's last
``samples/step_*.png``: EMA weights, the same starting noise in both runs) and ``docs/images/main_job.json``
(this command's provenance, the demo's command and commit, and the runs' settings). The demo's provenance
is read from its ``summary.json`` when it records one; otherwise pass the commit and command it ran with.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR))  # run as a script from a checkout: use its package

from immiscible_diffusers.provenance import command_line, provenance  # noqa: E402

RUNS = ("vanilla", "immiscible")
OUTPUT_DIR = REPO_DIR / "docs" / "images"


def final_grid(run_dir: Path) -> Path:
    grids = sorted((run_dir / "samples").glob("step_*.png"))
    if not grids:
        raise ValueError(f"{run_dir} has no samples/step_*.png: is it a finished demo run?")
    return grids[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demo_dir", type=Path, help="The --output_dir of training_scripts/demo.py.")
    parser.add_argument("--demo_commit", default=None, help="Git commit the demo ran with (if summary.json lacks it).")
    parser.add_argument("--demo_command", default=None, help="The demo's command line (if summary.json lacks it).")
    parser.add_argument("--output_dir", type=Path, default=OUTPUT_DIR)
    args = parser.parse_args(argv)

    summary_path = args.demo_dir / "summary.json"
    if not summary_path.is_file():
        print(f"error: demo_dir: {summary_path} does not exist (run training_scripts/demo.py to the end first)",
              file=sys.stderr)
        return 2
    summary = json.loads(summary_path.read_text())
    demo = dict(summary.get("provenance") or {})
    demo.setdefault("command", args.demo_command)
    demo.setdefault("git_commit", args.demo_commit)
    if not (demo.get("command") and demo.get("git_commit")):
        print("error: --demo_commit/--demo_command: summary.json records no provenance, so give the commit and "
              "command the demo ran with", file=sys.stderr)
        return 2
    try:
        grids = {name: final_grid(args.demo_dir / name) for name in RUNS}
    except ValueError as error:
        print(f"error: demo_dir: {error}", file=sys.stderr)
        return 2

    args.output_dir.mkdir(parents=True, exist_ok=True)
    images = {}
    for name, grid in grids.items():
        target = args.output_dir / f"main_job_{name}.png"
        Image.open(grid).save(target, optimize=True)
        images[name] = {"file": target.relative_to(REPO_DIR).as_posix(), "source": f"{name}/samples/{grid.name}"}
    record = {
        "provenance": provenance(command_line()),
        "demo": demo,
        "images": images,
        "settings": {key: summary.get(key) for key in ("max_train_steps", "train_batch_size", "seed")},
        "same_batches": summary.get("same_batches"),
        "same_noise_and_timesteps": summary.get("same_noise_and_timesteps"),
        "sampling": "EMA weights, DDIM 50 steps, the same starting noise for both runs (the training script's grid)",
    }
    (args.output_dir / "main_job.json").write_text(json.dumps(record, indent=2) + "\n")
    for path in [*(args.output_dir / f"main_job_{name}.png" for name in RUNS), args.output_dir / "main_job.json"]:
        print(f"wrote {path.relative_to(REPO_DIR)} ({path.stat().st_size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
