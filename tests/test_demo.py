"""The main job (training_scripts/demo.py), shrunk to a few steps: both model cards end with evaluation results."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_tiny_main_job_writes_scores_into_both_model_cards(tmp_path):
    output_dir = tmp_path / "demo"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, str(REPO / "training_scripts" / "demo.py"), "--output_dir", str(output_dir),
         "--max_train_steps", "4", "--num_checkpoints", "2", "--train_batch_size", "16", "--num_eval_samples", "16"],
        env=env, capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["same_batches"] and summary["same_noise_and_timesteps"]
    for name in ("vanilla", "immiscible"):
        card = ModelCard.load(output_dir / name / "README.md")
        # The Hub shows evaluation results from model-index only: the main job's scores are there.
        (score,) = card.data.eval_results
        assert score.metric_type == "digits_fd" and score.metric_args["step"] == 4
        assert score.metric_value == card.data.immiscible_diffusers["metrics"]["digits_fd"]["value"]
        # The sample grid a person reads: 16x16 digits shown at 48 px with gaps between them.
        grid = Image.open(sorted((output_dir / name / "samples").glob("step_*.png"))[-1])
        assert grid.size == (8 * 50 + 2, 8 * 50 + 2)
