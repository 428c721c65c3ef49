"""benchmarks/gpu_check.py in --dry-run mode (every code path on the CPU, tiny sizes) and its EMA device guard."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers.training_utils import EMAModel

REPO = Path(__file__).resolve().parents[1]
GPU_CHECK = REPO / "benchmarks" / "gpu_check.py"
GUARD = REPO / "benchmarks" / "ema_device_guard.py"


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_dry_run_runs_every_part_and_writes_the_results(tmp_path):
    # One training script here keeps CI quick; `make gpu-check ARGS=--dry-run` runs all four (~2-3 min).
    completed = subprocess.run(
        [sys.executable, str(GPU_CHECK), "--dry-run", "--scripts", "train_flow_matching",
         "--output_dir", str(tmp_path / "out"), "--work_dir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    out = tmp_path / "out"
    for name in ("training", "assignment", "step_share"):
        assert (out / f"{name}.md").read_text().count("- git commit:") == 1  # provenance heads every report
        assert (out / f"{name}.json").is_file()
    (training,) = _rows(out / "training.csv")
    assert training["status"] == "ok" and training["mixed_precision"] == "bf16"
    steps, checkpoint = int(training["steps"]), int(training["checkpoint_step"])
    # Killed after the checkpoint, resumed to the end, every EMA update after the resume checked.
    assert checkpoint < int(training["killed_after_step"]) < steps == int(training["resumed_to_step"])
    assert int(training["ema_steps_checked"]) >= steps - checkpoint
    assert training["sample_finite"] == "True"
    assignment = _rows(out / "assignment.csv")
    assert len(assignment) == 4 and all(float(r["ours_total_ms"]) > 0 and float(r["reference_total_ms"]) > 0 for r in assignment)
    assert len(_rows(out / "step_share.csv")) == 3


def test_guard_fails_an_ema_step_whose_weights_are_off_the_model_device():
    sys.path.insert(0, str(GUARD.parent))
    try:
        import ema_device_guard
    finally:
        sys.path.remove(str(GUARD.parent))
    model = torch.nn.Linear(3, 2)
    ema = EMAModel(model.parameters())
    ema_device_guard._guarded_step(ema, model.parameters())  # same device: fine
    ema.shadow_params = [p.to("meta") for p in ema.shadow_params]  # what a forgotten .to(device) looks like on CUDA
    with pytest.raises(RuntimeError, match="EMA weights are on meta but the model is on cpu"):
        ema_device_guard._guarded_step(ema, model.parameters())


def test_dry_run_refuses_cuda_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    completed = subprocess.run([sys.executable, str(GPU_CHECK), "--parts", "share"], capture_output=True, text=True,
                               timeout=120, cwd=REPO)  # fmt: skip
    assert completed.returncode == 2
    assert "--dry-run" in completed.stderr.strip().splitlines()[-1]
