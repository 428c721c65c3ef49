"""Golden train logs: a tiny fixed-seed run of each training script writes the same ``train_log.csv``.

The golden files under ``tests/golden/`` were written by the code before the training loop moved into
``immiscible_diffusers.run`` (issue 12); a refactor that changes what the scripts compute (data order,
noise, timesteps, assignment, losses, learning rates) changes them. Timings (``assign_seconds``) are left
out. Losses are compared to a tight relative tolerance (another CPU may round differently); the batch and
noise fingerprints exactly.

Regenerate (only when a change is meant to alter the numbers, and say why in the commit):
    IMMISCIBLE_UPDATE_GOLDEN=1 python -m pytest tests/test_golden_logs.py
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from immiscible_diffusers.training import read_train_log

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden"
COLUMNS = ("step", "epoch", "loss", "lr", "assign_distance_before", "assign_distance_after", "batch_hash", "noise_hash")
EXACT = ("step", "epoch", "batch_hash", "noise_hash")

TINY_UNET = ["--resolution", "8", "--unet_block_out_channels", "8,16", "--max_train_samples", "64",
             "--eval_batch_size", "2"]  # fmt: skip
COMMON = ["--train_batch_size", "8", "--learning_rate", "1e-3", "--lr_warmup_steps", "0",
          "--seed", "0", "--assignment", "knn", "--knn_k", "3", "--gradient_accumulation_steps", "2"]  # fmt: skip

# script -> flags (the text-to-image run also gets a tiny Stable Diffusion pipeline)
RUNS = {
    "train_unconditional": [*TINY_UNET, *COMMON, "--max_train_steps", "3", "--use_ema", "--prediction_type",
                            "v_prediction", "--eval_scheduler", "ddim", "--ddpm_num_inference_steps", "2"],
    "train_flow_matching": [*TINY_UNET, *COMMON, "--max_train_steps", "3", "--use_ema", "--num_inference_steps", "2"],
    "train_consistency": [*TINY_UNET, *COMMON, "--max_train_steps", "3", "--use_ema", "--class_conditional",
                          "--validation_steps", "1000"],
    "train_text_to_image": ["--resolution", "16", "--max_train_samples", "48", *COMMON, "--max_train_steps", "3",
                            "--use_ema", "--prediction_type", "v_prediction"],
}  # fmt: skip


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


def _rows(path: Path) -> list[dict[str, str]]:
    return [{key: row[key] for key in COLUMNS} for row in read_train_log(path)]


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    from test_train_text_to_image import build_tiny_sd_pipeline

    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("golden-sd") / "pipeline")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_tiny_run_writes_the_golden_train_log(name, tmp_path, request):
    output_dir = tmp_path / "out"
    flags = list(RUNS[name])
    if name == "train_text_to_image":
        flags += ["--pretrained_model_name_or_path", str(request.getfixturevalue("tiny_sd"))]
    command = [sys.executable, str(REPO / "training_scripts" / f"{name}.py"), "--output_dir", str(output_dir), *flags]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    rows = _rows(output_dir / "train_log.csv")
    golden = GOLDEN / f"{name}.csv"
    if os.environ.get("IMMISCIBLE_UPDATE_GOLDEN") == "1":
        with open(golden, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    expected = _rows(golden)
    assert len(rows) == len(expected) == 3
    for got, want in zip(rows, expected):
        assert {k: got[k] for k in EXACT} == {k: want[k] for k in EXACT}
        for key in sorted(set(COLUMNS) - set(EXACT)):
            assert math.isclose(float(got[key]), float(want[key]), rel_tol=1e-5, abs_tol=1e-9), (key, got, want)
