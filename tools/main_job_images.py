#!/usr/bin/env python
"""Copy the main job's final sample grids at a few and many sampling steps into docs/images/, with provenance.

    python tools/main_job_images.py outputs/demo [--nfes 2 20] [--num_tiles 32]

Reads the evaluator's grids of the final checkpoint that ``make demo`` saves,
``<demo>/evaluation/samples/<run>/step_<final>_nfe<n>.png`` (EMA weights, the same starting noise for both
runs and every NFE), and writes ``docs/images/main_job_<run>_nfe<n>.png`` for each run and NFE, plus
``docs/images/main_job.json`` (this command's provenance, the demo's provenance from its ``summary.json``,
and the runs' settings). Grids saved without gaps between tiles (older evaluator) are re-tiled with the
package's ``image_grid`` (grey gaps, tiles upscaled to a readable size).
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
from immiscible_diffusers.training import image_grid  # noqa: E402

RUNS = ("vanilla", "immiscible")
OUTPUT_DIR = REPO_DIR / "docs" / "images"
GRID_COLUMNS = 8


def readable_grid(path: Path, tile_size: int, num_tiles: int) -> Image.Image:
    """The first ``num_tiles`` samples of a saved grid, tiled with gaps (a gap-less grid is cut into tiles first)."""
    grid = Image.open(path)
    width, height = grid.size
    if width % tile_size or height % tile_size:
        return grid  # already made by image_grid (gaps and upscaled tiles): keep it as it is
    tiles = [
        grid.crop((x, y, x + tile_size, y + tile_size))
        for y in range(0, height, tile_size)
        for x in range(0, width, tile_size)
    ]
    return image_grid(tiles[:num_tiles], columns=GRID_COLUMNS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demo_dir", type=Path, help="The --output_dir of training_scripts/demo.py.")
    parser.add_argument("--nfes", type=int, nargs="+", default=[2, 20], help="Sampling step counts to show.")
    parser.add_argument("--num_tiles", type=int, default=32, help="Samples per picture.")
    parser.add_argument("--output_dir", type=Path, default=OUTPUT_DIR)
    args = parser.parse_args(argv)

    summary_path = args.demo_dir / "summary.json"
    if not summary_path.is_file():
        print(
            f"error: demo_dir: {summary_path} does not exist (run training_scripts/demo.py to the end first)",
            file=sys.stderr,
        )
        return 2
    summary = json.loads(summary_path.read_text())
    if not (summary.get("provenance") or {}).get("git_commit"):
        print(f"error: demo_dir: {summary_path} records no provenance (git commit): rerun the demo", file=sys.stderr)
        return 2
    final_step = (summary.get("quality") or {}).get("final_step")
    if final_step is None:
        print(
            f"error: demo_dir: {summary_path} has no quality scores (was it run with --num_eval_samples 0?)",
            file=sys.stderr,
        )
        return 2
    missing = [n for n in args.nfes if n not in summary.get("nfes", [])]
    if missing:
        print(f"error: --nfes: the demo sampled at {summary.get('nfes')}, not at {missing}", file=sys.stderr)
        return 2

    args.output_dir.mkdir(parents=True, exist_ok=True)
    images = {}
    for name in RUNS:
        for nfe in args.nfes:
            source = args.demo_dir / "evaluation" / "samples" / name / f"step_{final_step:06d}_nfe{nfe}.png"
            if not source.is_file():
                print(f"error: demo_dir: {source} does not exist", file=sys.stderr)
                return 2
            target = args.output_dir / f"main_job_{name}_nfe{nfe}.png"
            readable_grid(source, summary["resolution"], args.num_tiles).save(target, optimize=True)
            images[f"{name}_nfe{nfe}"] = {
                "file": target.relative_to(REPO_DIR).as_posix(),
                "source": source.relative_to(args.demo_dir).as_posix(),
                "nfe": nfe,
            }
    record = {
        "provenance": provenance(command_line()),
        "demo": summary["provenance"],
        "images": images,
        "settings": {
            key: summary.get(key) for key in ("recipe", "resolution", "max_train_steps", "train_batch_size", "seed")
        },
        "same_batches": summary.get("same_batches"),
        "same_noise_and_timesteps": summary.get("same_noise_and_timesteps"),
        "sampling": f"the evaluator's grids of step {final_step}: EMA weights, Euler with uniform sigmas at each NFE, "
        f"the same starting noise for both runs; the first {args.num_tiles} samples",
    }
    (args.output_dir / "main_job.json").write_text(json.dumps(record, indent=2) + "\n")
    for path in [*(REPO_DIR / image["file"] for image in images.values()), args.output_dir / "main_job.json"]:
        print(f"wrote {path.relative_to(REPO_DIR)} ({path.stat().st_size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
