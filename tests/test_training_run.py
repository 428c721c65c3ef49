"""The shared training plumbing (issue 12): one resume path, one error path, and the bugs the copies had.

- a resume from an older checkpoint sets the newer ones aside, so that a later ``latest`` resumes the new
  history (the kill/resume sequence of the issue) and ``train_log.csv`` ends with every step once;
- a checkpoint records its recipe and a resume with another script is refused;
- the EMA follows the model's device after every resume (not only after ``prepare``), in every script;
- a user error in any training script prints one ``error:`` line and exits 2, files intact (traceback with --debug);
- inputs are checked before the first step: corrupt images, UNet widths, Hub ids offline.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import SCRIPTS, load_script, run_script, script_env
from immiscible_diffusers.checkpoints import SUPERSEDED_DIR, list_checkpoints
from immiscible_diffusers.errors import run_entry_point
from immiscible_diffusers.models import build_unet
from immiscible_diffusers.training import read_train_log

TINY = [
    "--resolution", "8", "--unet_block_out_channels", "8,16", "--train_batch_size", "8", "--max_train_samples", "64",
    "--eval_batch_size", "2", "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--seed", "0",
    "--lr_scheduler", "constant",
]  # fmt: skip
SAMPLER = {
    "train_unconditional": ["--eval_scheduler", "ddim", "--ddpm_num_inference_steps", "2"],
    "train_flow_matching": ["--num_inference_steps", "2"],
    "train_consistency": ["--validation_steps", "1000"],
}
COMPARED = ("step", "loss", "batch_hash", "noise_hash")


def _rows(output_dir: Path) -> list[tuple]:
    return [tuple(row[key] for key in COMPARED) for row in read_train_log(output_dir / "train_log.csv")]


def _snapshot(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime for p in folder.rglob("*")} if folder.exists() else {}


# --------------------------------------------------------------------------------------------------
# One resume path
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resuming_an_older_checkpoint_then_latest_after_a_kill_follows_the_new_history(tmp_path):
    """The issue's sequence: a full run; a restart from an old checkpoint, killed; then `latest`."""
    flags = [*TINY, *SAMPLER["train_unconditional"], "--checkpointing_steps", "2", "--max_train_steps", "12"]
    reference, output_dir = tmp_path / "reference", tmp_path / "out"
    run_script("train_unconditional", "--output_dir", str(reference), *flags)
    run_script("train_unconditional", "--output_dir", str(output_dir), *flags)

    # Restart from checkpoint-4 and kill the run once it has logged step 7 (and so saved its own checkpoint-6).
    command = [sys.executable, str(SCRIPTS / "train_unconditional.py"), "--output_dir", str(output_dir), *flags,
               "--resume_from_checkpoint", "checkpoint-4"]  # fmt: skip
    process = subprocess.Popen(command, env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, restarted = time.monotonic() + 240, False
    while time.monotonic() < deadline and process.poll() is None:
        rows = len(read_train_log(output_dir / "train_log.csv"))
        restarted = restarted or rows < 12  # the restart cut the log back to its checkpoint's step
        if restarted and rows >= 7:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the restarted run ended before it could be killed"
    process.kill()
    process.wait()
    # The newer checkpoints of the first run were moved aside when the restart began.
    assert [step for step, _ in list_checkpoints(output_dir)][-1] <= 8
    assert (output_dir / SUPERSEDED_DIR / "checkpoint-12").is_dir()

    run_script("train_unconditional", "--output_dir", str(output_dir), *flags, "--resume_from_checkpoint", "latest")
    assert _rows(output_dir) == _rows(reference)  # 12 rows, each step once, as the uninterrupted run
    config = json.loads((output_dir / "training_config.json").read_text())
    assert config["global_step"] == 12
    assert [step for step, _ in list_checkpoints(output_dir)] == [2, 4, 6, 8, 10, 12]


@pytest.mark.slow
def test_a_checkpoint_of_another_script_is_refused_with_one_line(tmp_path):
    ddpm = tmp_path / "ddpm"
    run_script("train_unconditional", "--output_dir", str(ddpm), *TINY, *SAMPLER["train_unconditional"],
               "--max_train_steps", "2", "--checkpointing_steps", "2")  # fmt: skip
    recipe = json.loads((ddpm / "checkpoint-2" / "recipe.json").read_text())
    assert recipe["script"] == "train_unconditional.py" and recipe["prediction_type"] == "epsilon"
    assert recipe["model_config"]["block_out_channels"] == [8, 16]

    flow = tmp_path / "flow"
    result = run_script("train_flow_matching", "--output_dir", str(flow), *TINY, *SAMPLER["train_flow_matching"],
                        "--max_train_steps", "4", "--resume_from_checkpoint", str(ddpm / "checkpoint-2"),
                        check=False)  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: --resume_from_checkpoint")
    assert "train_unconditional.py" in result.stderr and "Traceback" not in result.stderr
    assert not (flow / "model_index.json").exists() and not (flow / "train_log.csv").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["train_unconditional", "train_flow_matching", "train_consistency"])
def test_the_ema_follows_the_model_device_after_a_resume(name, tmp_path, monkeypatch, fresh_accelerate_state):
    """`EMAModel.to(device)` after `load_state` (a CUDA resume would otherwise mix devices)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from diffusers.training_utils import EMAModel

    script = load_script(name)
    flags = ["--output_dir", str(tmp_path / "out"), *TINY, *SAMPLER[name], "--use_ema", "--checkpointing_steps", "1"]
    script.main(script.parse_args([*flags, "--max_train_steps", "1"]))
    AcceleratorState._reset_state(reset_partial_state=True)

    events = []
    original_load, original_to = Accelerator.load_state, EMAModel.to
    def load_state(self, *args, **kwargs):
        events.append("load")
        return original_load(self, *args, **kwargs)

    def ema_to(self, *args, **kwargs):
        events.append("ema.to")
        return original_to(self, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "load_state", load_state)
    monkeypatch.setattr(EMAModel, "to", ema_to)
    script.main(script.parse_args([*flags, "--max_train_steps", "2", "--resume_from_checkpoint", "latest"]))
    assert "load" in events and "ema.to" in events[events.index("load"):]


# --------------------------------------------------------------------------------------------------
# One error path
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def a_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("file") / "not-a-folder"
    path.write_text("keep me\n")
    return path


ERRORS = {  # script -> flags that are a user error found after argument parsing
    "train_unconditional": [*TINY, "--train_data_dir", "/definitely/not/here"],
    "train_flow_matching": [*TINY, "--resume_from_checkpoint", "checkpoint-7"],
    "train_consistency": [*TINY, "--train_batch_size", "128", "--max_train_samples", "10"],
    "train_text_to_image": ["--pretrained_model_name_or_path", "./no/such/pipeline", "--resolution", "16"],
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_a_user_error_prints_one_line_and_exits_2_in_every_script(name, tmp_path):
    output_dir = tmp_path / "out"
    result = run_script(name, "--output_dir", str(output_dir), *ERRORS[name], check=False, timeout=180)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --")

    debug = run_script(name, "--output_dir", str(output_dir), *ERRORS[name], check=False, timeout=180,
                       IMMISCIBLE_DEBUG="1")  # fmt: skip
    assert debug.returncode == 1 and "Traceback" in debug.stderr


@pytest.mark.parametrize("name", ["train_unconditional", "train_consistency"])
def test_a_file_as_output_dir_is_an_error_and_stays_intact(name, a_file):
    result = run_script(name, "--output_dir", str(a_file), *TINY, check=False, timeout=180)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: --output_dir {str(a_file)!r} is a file, not a folder"
    assert a_file.read_text() == "keep me\n"


def test_run_entry_point_turns_user_errors_into_one_line(capsys, monkeypatch):
    def bad():
        raise ValueError("--knn_k must be\n  positive")

    monkeypatch.setattr(sys, "argv", ["prog"])
    with pytest.raises(SystemExit) as exit_info:
        run_entry_point(bad)
    assert exit_info.value.code == 2 and capsys.readouterr().err == "error: --knn_k must be positive\n"
    monkeypatch.setattr(sys, "argv", ["prog", "--debug"])
    with pytest.raises(ValueError):
        run_entry_point(bad)


# --------------------------------------------------------------------------------------------------
# Inputs checked before the first step
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_corrupt_images_are_skipped_with_a_count_before_training(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for index in range(9):
        Image.new("RGB", (12, 12), (index * 20, 0, 0)).save(images / f"{index}.png")
    (images / "broken.png").write_bytes(b"not a png")
    output_dir = tmp_path / "out"
    flags = [*TINY, *SAMPLER["train_unconditional"], "--train_data_dir", str(images), "--max_train_steps", "1"]
    result = run_script("train_unconditional", "--output_dir", str(output_dir), *flags, "--cache_dir", str(tmp_path))
    assert "skipped 1 unreadable image(s) of 10 in --train_data_dir: broken.png" in result.stderr
    assert len(read_train_log(output_dir / "train_log.csv")) == 1


def _unet_args(**overrides) -> argparse.Namespace:
    values = dict(model_config_name_or_path=None, unet_block_out_channels=(8, 16), unet_layers_per_block=1,
                  resolution=8, num_channels=None, dataset_name=None, train_data_dir=None)  # fmt: skip
    return argparse.Namespace(**(values | overrides))


def test_unet_widths_are_checked_against_the_attention_head_size():
    with pytest.raises(ValueError, match="last width 5 holds the attention layers"):
        build_unet(_unet_args(unet_block_out_channels=(3, 5)))
    assert build_unet(_unet_args(unet_block_out_channels=(8, 12))).config.block_out_channels == (8, 12)


def test_a_hub_id_model_config_is_taken_for_one_and_explained_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="is no local folder or file, and the Hub is offline"):
        build_unet(_unet_args(model_config_name_or_path="google/ddpm-cifar10-32"))
    with pytest.raises(ValueError, match="does not exist"):
        build_unet(_unet_args(model_config_name_or_path="./missing/unet.json"))


def test_digits_grids_use_ddim_50_and_datasets_keep_diffusers_defaults():
    script = load_script("train_unconditional")
    digits = script.parse_args([])
    assert (digits.eval_scheduler, digits.ddpm_num_inference_steps) == ("ddim", 50)
    cifar = script.parse_args(["--dataset_name", "cifar10"])
    assert (cifar.eval_scheduler, cifar.ddpm_num_inference_steps) == ("ddpm", 1000)
    assert script.parse_args(["--eval_scheduler", "ddpm"]).ddpm_num_inference_steps == 50


@pytest.mark.parametrize(
    "name", ["train_unconditional", "train_flow_matching", "train_consistency", "train_text_to_image"]
)
def test_every_script_takes_report_to_all(name):
    script = load_script(name)
    extra = ["--pretrained_model_name_or_path", "x/y"] if name == "train_text_to_image" else []
    args = script.parse_args([*extra, "--report_to", "all"])
    assert (getattr(args, "logger", None) or args.report_to) == "all"


def test_flow_script_takes_the_sd3_scripts_memory_and_optimizer_flags():
    script = load_script("train_flow_matching")
    args = script.parse_args(["--gradient_checkpointing", "--allow_tf32", "--optimizer", "AdamW", "--use_8bit_adam"])
    assert args.gradient_checkpointing and args.allow_tf32 and args.use_8bit_adam and args.optimizer == "adamw"
