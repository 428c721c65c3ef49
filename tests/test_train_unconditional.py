"""training_scripts/train_unconditional.py and the shared training plumbing, end to end and offline.

Every run trains a tiny UNet (widths 8 and 16, 8x8 digits, batches of 8) for a few steps in a
subprocess, as a user would run it; the step function, the checkpoint helpers and the input checks
are also exercised in-process.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import script_env
from immiscible_diffusers import assign_noise
from immiscible_diffusers.model_card import REQUIRED_CARD_KEYS, read_card_metadata
from immiscible_diffusers.training import (
    assignment_generator,
    ema_weights_swapped_in,
    list_checkpoints,
    read_train_log,
    remove_partial_checkpoints,
    reseed_assignment_generator,
    resolve_resume_checkpoint,
    rng_preserved,
    save_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "training_scripts" / "train_unconditional.py"

TINY = [
    "--resolution", "8",
    "--unet_block_out_channels", "8,16",
    "--train_batch_size", "8",
    "--max_train_samples", "64",
    "--eval_batch_size", "2",
    "--eval_scheduler", "ddim",
    "--ddpm_num_inference_steps", "2",
    "--learning_rate", "1e-3",
    "--lr_warmup_steps", "0",
    "--seed", "0",
]  # fmt: skip

# name -> (extra flags, prediction type, assignment); each trains 3 optimizer steps.
RUNS = {
    "none-epsilon": ["--assignment", "none", "--prediction_type", "epsilon"],
    "linear-epsilon": ["--assignment", "linear", "--prediction_type", "epsilon"],
    "knn-v_prediction": [
        "--assignment", "knn", "--knn_k", "3", "--prediction_type", "v_prediction",
        "--use_ema", "--checkpointing_steps", "3",
    ],
    "linear-sample": [
        "--assignment", "linear", "--prediction_type", "sample", "--gradient_accumulation_steps", "2",
        "--assignment_distance", "sqeuclidean", "--assignment_dtype", "bfloat16",
        "--checkpointing_steps", "1", "--checkpoints_total_limit", "2",
    ],
}  # fmt: skip
STEPS = 3


def _run(command: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env=script_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def _train(output_dir: Path, *flags: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return _run([sys.executable, str(SCRIPT), "--output_dir", str(output_dir), *TINY, *flags], timeout)


def _two_process_command(output_dir: Path, *flags: str) -> list[str]:
    """torchrun with 2 processes on this machine (accelerate runs them as one MULTI_CPU job on gloo)."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(SCRIPT), "--output_dir", str(output_dir), *TINY, *flags,
    ]  # fmt: skip


def _log_column(output_dir: Path, column: str) -> list[str]:
    return [row[column] for row in read_train_log(output_dir / "train_log.csv")]


def _load_script():
    spec = importlib.util.spec_from_file_location("train_unconditional_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return _load_script()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train each configuration of RUNS once per module, on first use; return its output folder."""
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            output_dir = tmp_path_factory.mktemp(name) / "out"
            _train(output_dir, "--max_train_steps", str(STEPS), *RUNS[name])
            done[name] = output_dir
        return done[name]

    return get


# --------------------------------------------------------------------------------------------------
# End-to-end runs
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_run_writes_pipeline_card_logs_and_samples(trained, name):
    output_dir = trained(name)
    assignment = RUNS[name][RUNS[name].index("--assignment") + 1]
    prediction_type = RUNS[name][RUNS[name].index("--prediction_type") + 1]

    model_index = json.loads((output_dir / "model_index.json").read_text())
    assert model_index["_class_name"] == "DDPMPipeline"
    assert model_index["scheduler"] == ["diffusers", "DDPMScheduler"]  # the stock class
    scheduler_config = json.loads((output_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler_config["prediction_type"] == prediction_type
    assert "assignment" not in scheduler_config
    assert (output_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()

    config = json.loads((output_dir / "training_config.json").read_text())
    assert config["global_step"] == STEPS and config["assignment"] == assignment
    assert config["num_processes"] == 1 and "hub_token" not in config

    metadata = read_card_metadata(output_dir)
    assert metadata["library_name"] == "diffusers"
    assert metadata["pipeline_tag"] == "unconditional-image-generation"
    assert metadata["license"] == "apache-2.0"
    for tag in ("diffusers", "diffusers-training", "immiscible-diffusion", f"assignment-{assignment}"):
        assert tag in metadata["tags"]
    card = metadata["immiscible_diffusers"]
    assert set(REQUIRED_CARD_KEYS) <= set(card)
    assert card["assignment"] == assignment and card["prediction_type"] == prediction_type
    assert card["global_step"] == STEPS and card["dataset"] == "sklearn-digits" and card["resolution"] == 8
    readme = (output_dir / "README.md").read_text()
    assert "DDIMPipeline.from_pretrained" in readme and "2406.12303" in readme
    assert f"samples/step_{STEPS:06d}.png" in readme

    grid = Image.open(output_dir / "samples" / f"step_{STEPS:06d}.png")
    # two 8x8 grayscale samples, upscaled to 48 px tiles with 2 px gaps around them
    assert grid.size == (2 * (48 + 2) + 2, 48 + 2 * 2) and grid.mode == "L"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (output_dir / "logs").rglob("events.out.tfevents.*")
    tensorboard = EventAccumulator(str(events.parent))
    tensorboard.Reload()
    for tag in ("loss", "lr", "assignment/distance_before", "assignment/distance_after", "assignment/seconds"):
        assert [event.step for event in tensorboard.Scalars(tag)] == list(range(1, STEPS + 1)), tag
    assert "samples" in tensorboard.Tags()["images"]

    rows = read_train_log(output_dir / "train_log.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    before = [float(r["assign_distance_before"]) for r in rows]
    after = [float(r["assign_distance_after"]) for r in rows]
    assert all(math.isfinite(float(r["loss"])) and float(r["assign_seconds"]) >= 0 for r in rows)
    if assignment == "none":
        assert after == before
    else:  # the assignment shortens the image-noise distance of every batch
        assert all(a < b for a, b in zip(after, before, strict=True))


@pytest.mark.slow
def test_checkpoints_hold_plain_unet_folders_and_are_pruned(trained):
    ema_run = trained("knn-v_prediction")
    assert [step for step, _ in list_checkpoints(ema_run)] == [3]
    checkpoint = ema_run / "checkpoint-3"
    for folder in ("unet", "unet_ema"):
        assert (checkpoint / folder / "config.json").is_file()
        assert (checkpoint / folder / "diffusion_pytorch_model.safetensors").is_file()
    from diffusers import UNet2DModel

    trained_weights = UNet2DModel.from_pretrained(checkpoint / "unet").state_dict()
    ema_weights = UNet2DModel.from_pretrained(checkpoint / "unet_ema").state_dict()
    assert any(not torch.equal(trained_weights[k], ema_weights[k]) for k in trained_weights)

    pruned_run = trained("linear-sample")  # a checkpoint every step, at most 2 kept
    assert [step for step, _ in list_checkpoints(pruned_run)] == [2, 3]
    assert not [p for p in pruned_run.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_assignment_none_and_linear_see_the_same_batches_and_random_draws(trained):
    vanilla, linear, knn = trained("none-epsilon"), trained("linear-epsilon"), trained("knn-v_prediction")
    for column in ("batch_hash", "noise_hash", "assign_distance_before"):
        assert _log_column(vanilla, column) == _log_column(linear, column), column
        # KNN draws its extra candidates from its own generator, so its main stream is the same too.
        assert _log_column(vanilla, column) == _log_column(knn, column), column
    assert len(set(_log_column(vanilla, "batch_hash"))) == STEPS  # a new batch every step
    assert len(set(_log_column(vanilla, "noise_hash"))) == STEPS
    # ... and the assignment did change what was trained on.
    assert _log_column(vanilla, "assign_distance_after") != _log_column(linear, "assign_distance_after")
    assert _log_column(vanilla, "loss")[0] != _log_column(linear, "loss")[0]


@pytest.mark.slow
def test_saved_pipeline_loads_and_samples_in_a_fresh_process(trained):
    output_dir = trained("knn-v_prediction")
    code = textwrap.dedent(
        f"""
        import sys
        import numpy as np, torch
        from diffusers import DDIMPipeline, DDPMPipeline
        for cls in (DDPMPipeline, DDIMPipeline):
            pipeline = cls.from_pretrained({str(output_dir)!r})
            images = pipeline(batch_size=2, num_inference_steps=2, output_type="np",
                              generator=torch.Generator().manual_seed(0)).images
            assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all(), images.shape
            print(cls.__name__, type(pipeline.scheduler).__name__, pipeline.scheduler.config.prediction_type)
        assert not [m for m in sys.modules if m.startswith("immiscible_diffusers")]
        """
    )
    result = _run([sys.executable, "-c", code], timeout=120)
    assert "DDPMPipeline DDPMScheduler v_prediction" in result.stdout
    assert "DDIMPipeline DDIMScheduler v_prediction" in result.stdout


# --------------------------------------------------------------------------------------------------
# The training step
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("assignment", ["linear", "knn", "none"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_the_target_is_built_from_the_assigned_noise(script, assignment, prediction_type):
    args = script.parse_args([*TINY, "--assignment", assignment, "--prediction_type", prediction_type, "--knn_k", "4"])
    torch.manual_seed(0)
    unet = script.build_unet(args)
    scheduler = script.DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    clean = torch.rand(16, 1, 8, 8) * 2 - 1

    torch.manual_seed(123)
    step = script.compute_loss(unet, scheduler, clean, args, torch.Generator().manual_seed(7))

    # Recompute independently: the same draws from the main stream, the package's assignment.
    torch.manual_seed(123)
    noise = torch.randn(clean.shape)
    assigned = assign_noise(clean, noise, method=assignment, knn_k=4, generator=torch.Generator().manual_seed(7))
    timesteps = torch.randint(0, 1000, (16,))
    assert torch.equal(step.noise_before_assignment, noise)
    assert torch.equal(step.timesteps, timesteps)
    assert torch.equal(step.noise, assigned)
    if assignment == "none":
        assert torch.equal(assigned, noise)
    else:  # the assignment changed the noise, so a target built from the raw noise would be caught
        assert not torch.equal(assigned, noise)
    assert torch.equal(step.noisy_images, scheduler.add_noise(clean, assigned, timesteps))

    expected_target = {
        "epsilon": assigned,
        "v_prediction": scheduler.get_velocity(clean, assigned, timesteps),
        "sample": clean,
    }[prediction_type]
    assert torch.equal(step.target, expected_target)
    error = (step.model_output.float() - expected_target) ** 2
    if prediction_type == "sample":
        alphas = scheduler.alphas_cumprod[timesteps]
        error = error * (alphas / (1 - alphas)).view(-1, 1, 1, 1)
    torch.testing.assert_close(step.loss, error.mean())
    assert step.loss.requires_grad


# --------------------------------------------------------------------------------------------------
# Reliability: kill and resume, atomic checkpoints, two processes
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_killed_mid_training_resumes_to_the_same_step_count(tmp_path):
    output_dir = tmp_path / "out"
    flags = [
        "--max_train_steps", "100", "--checkpointing_steps", "5", "--checkpoints_total_limit", "2",
        "--save_images_epochs", "1000", "--save_model_epochs", "1000",
        "--assignment", "knn", "--use_ema",  # both add state to the checkpoint (EMA weights, KNN generator)
    ]  # fmt: skip
    command = [sys.executable, str(SCRIPT), "--output_dir", str(output_dir), *TINY, *flags]
    process = subprocess.Popen(
        command, env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO
    )
    try:
        deadline = time.monotonic() + 120
        while not list_checkpoints(output_dir) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (output_dir / "model_index.json").exists()
    killed_at = list_checkpoints(output_dir)[-1][0]
    assert killed_at < 100
    # What a kill during a checkpoint write leaves behind must not be taken for a checkpoint.
    partial = output_dir / ".tmp-checkpoint-95"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"truncated")

    result = _train(output_dir, *flags, "--resume_from_checkpoint", "latest")
    assert "Resuming from checkpoint" in result.stderr + result.stdout
    assert json.loads((output_dir / "training_config.json").read_text())["global_step"] == 100
    assert [int(s) for s in _log_column(output_dir, "step")] == list(range(1, 101))  # every step exactly once
    assert [step for step, _ in list_checkpoints(output_dir)] == [95, 100]
    assert not partial.exists()
    assert (output_dir / "model_index.json").is_file()


# Both resume tests: EMA on (its weights go into every checkpoint), KNN candidates (a generator of their
# own), sample grids and pipelines at every epoch's end (work that a run resumed after it skips), and a
# constant learning rate (a cosine schedule's length is --max_train_steps, which the stopped run shortens).
RESUME_FLAGS = [
    "--assignment", "knn", "--knn_k", "3", "--use_ema", "--lr_scheduler", "constant",
    "--checkpointing_steps", "2", "--save_images_epochs", "1", "--save_model_epochs", "1",
]  # fmt: skip
RESUME_COMPARED_COLUMNS = (
    "step", "epoch", "loss", "lr", "batch_hash", "noise_hash", "assign_distance_before", "assign_distance_after"
)  # fmt: skip


def _assert_trained_alike(run: Path, reference: Path, weight_folders: list[str]) -> None:
    """The same train_log.csv rows (all but the timings) and bit-identical weights in every folder."""
    from safetensors.torch import load_file

    def rows(output_dir: Path) -> list[dict[str, str]]:
        return [{c: row[c] for c in RESUME_COMPARED_COLUMNS} for row in read_train_log(output_dir / "train_log.csv")]

    assert rows(run) == rows(reference)
    for folder in weight_folders:
        weights = load_file(run / folder / "diffusion_pytorch_model.safetensors")
        expected = load_file(reference / folder / "diffusion_pytorch_model.safetensors")
        assert weights.keys() == expected.keys(), folder
        differing = [name for name in expected if not torch.equal(weights[name], expected[name])]
        assert not differing, f"{folder}: {len(differing)} tensors differ, e.g. {differing[:3]}"


@pytest.mark.slow
def test_a_stopped_and_resumed_run_trains_exactly_like_an_uninterrupted_one(tmp_path):
    # 32 images in batches of 8 with 2 micro-batches per step: an epoch every 2 optimizer steps, so the
    # run stopped at step 2 resumes at the start of epoch 1, and the resumed part crosses another boundary.
    flags = [*RESUME_FLAGS, "--max_train_samples", "32", "--gradient_accumulation_steps", "2"]
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    command = [sys.executable, str(SCRIPT), "--output_dir", str(uninterrupted), *TINY, *flags, "--max_train_steps", "5"]
    # The uninterrupted run trains side by side with the other two.
    background = subprocess.Popen(command, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _train(resumed, *flags, "--max_train_steps", "2")
        assert [step for step, _ in list_checkpoints(resumed)] == [2]
        result = _train(resumed, *flags, "--max_train_steps", "5", "--resume_from_checkpoint", "latest")
        stdout, stderr = background.communicate(timeout=180)
    finally:
        if background.poll() is None:
            background.kill()
            background.wait()
    assert background.returncode == 0, f"the uninterrupted run failed:\n{stdout[-3000:]}\n{stderr[-5000:]}"
    assert "Resuming from checkpoint" in result.stderr + result.stdout

    assert [int(step) for step in _log_column(resumed, "step")] == [1, 2, 3, 4, 5]
    assert _log_column(resumed, "epoch") == ["0", "0", "1", "1", "2"]
    # Each epoch draws a new order (all 4 micro-batches of the first 2 epochs differ).
    assert len(set(_log_column(uninterrupted, "batch_hash")[:4])) == 4
    # Training weights and EMA weights of step 4, written by both runs after the resume; the final pipeline's
    # UNet holds the EMA weights of step 5.
    _assert_trained_alike(resumed, uninterrupted, ["checkpoint-4/unet", "checkpoint-4/unet_ema", "unet"])


@pytest.mark.slow
def test_two_processes_resume_exactly_each_with_its_own_knn_candidates(tmp_path):
    # 32 images over 2 processes in batches of 8: an epoch every 2 steps, and checkpoint-2 at its end.
    flags = [*RESUME_FLAGS, "--max_train_samples", "32", "--max_train_steps", "4"]
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    _run(_two_process_command(uninterrupted, *flags), timeout=240)
    # A run killed after its checkpoint at step 2: that checkpoint and the log of its first 2 steps.
    resumed.mkdir()
    shutil.copytree(uninterrupted / "checkpoint-2", resumed / "checkpoint-2")
    shutil.copy(uninterrupted / "train_log.csv", resumed / "train_log.csv")
    result = _run(_two_process_command(resumed, *flags, "--resume_from_checkpoint", "latest"), timeout=240)
    assert "Resuming from checkpoint" in result.stderr + result.stdout

    assert [int(step) for step in _log_column(resumed, "step")] == [1, 2, 3, 4]
    # The loss is the mean over both processes, so it also checks the second process's batches and its
    # KNN candidates; the weights, synchronised by DDP, hold every process's gradients.
    _assert_trained_alike(resumed, uninterrupted, ["checkpoint-4/unet", "checkpoint-4/unet_ema", "unet"])


def test_an_interrupted_checkpoint_write_leaves_the_previous_one_loadable(tmp_path, fresh_accelerate_state):
    from accelerate import Accelerator

    accelerator = Accelerator()
    model = torch.nn.Linear(3, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)

    def save_unet(folder: Path) -> None:
        (folder / "unet").mkdir()
        (folder / "unet" / "weights.bin").write_bytes(b"complete")

    first = save_checkpoint(accelerator, tmp_path, 10, save_unet)
    assert first == tmp_path / "checkpoint-10" and (first / "unet" / "weights.bin").is_file()
    saved_weight = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)

    def killed_while_writing(folder: Path) -> None:
        (folder / "unet").mkdir()
        (folder / "unet" / "weights.bin").write_bytes(b"half")
        raise KeyboardInterrupt("killed while writing the checkpoint")

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, tmp_path, 20, killed_while_writing)
    assert not (tmp_path / "checkpoint-20").exists()
    assert (tmp_path / ".tmp-checkpoint-20").is_dir()
    assert resolve_resume_checkpoint(tmp_path, "latest") == first
    accelerator.load_state(str(first))
    assert torch.equal(model.weight, saved_weight)
    assert remove_partial_checkpoints(tmp_path) == [tmp_path / ".tmp-checkpoint-20"]

    # Saving a step that exists (after resuming from an older checkpoint) replaces it whole.
    save_checkpoint(accelerator, tmp_path, 10, lambda folder: None)
    assert not (tmp_path / "checkpoint-10" / "unet").exists()
    for step in (30, 40):
        save_checkpoint(accelerator, tmp_path, step, total_limit=2)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [30, 40]
    assert resolve_resume_checkpoint(tmp_path, "checkpoint-30") == tmp_path / "checkpoint-30"
    assert resolve_resume_checkpoint(tmp_path, None) is None


def test_checkpointable_generator_round_trips():
    from immiscible_diffusers.training import CheckpointableGenerator, assignment_generator

    generator = assignment_generator(seed=0)
    saved = CheckpointableGenerator(generator).state_dict()
    first = torch.randn(4, generator=generator)
    CheckpointableGenerator(generator).load_state_dict(saved)
    assert torch.equal(torch.randn(4, generator=generator), first)
    # Its own stream: not the global one seeded with the same seed, and one per process.
    torch.manual_seed(0)
    assert not torch.equal(torch.randn(4), first)
    assert not torch.equal(torch.randn(4, generator=assignment_generator(0, process_index=1)), first)


def test_save_checkpoint_leaves_the_random_stream_where_it_was(tmp_path, fresh_accelerate_state):
    from accelerate import Accelerator

    accelerator = Accelerator()
    model = accelerator.prepare(torch.nn.Linear(3, 3))

    def save_a_new_model(folder: Path) -> None:
        # What saving an EMA copy used to do: build a model, whose initialisation draws random numbers.
        torch.save(torch.nn.Linear(16, 16).state_dict(), folder / "copy.pt")

    torch.manual_seed(5)
    state = torch.get_rng_state()
    save_checkpoint(accelerator, tmp_path, 1, save_a_new_model)
    assert torch.equal(torch.get_rng_state(), state)
    # The state saved in the checkpoint is that same state: a resumed run draws what this one draws next.
    accelerator.load_state(str(tmp_path / "checkpoint-1"))
    assert torch.equal(torch.get_rng_state(), state)
    assert model.weight.shape == (3, 3)


def test_rng_preserved_and_ema_weights_swapped_in_leave_no_trace():
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    ema = EMAModel(model.parameters(), decay=0.5, use_ema_warmup=False)
    ema.step(model.parameters())
    with torch.no_grad():
        model.weight.add_(1.0)  # the training weights move on from the average
    training_weights = [p.detach().clone() for p in model.parameters()]

    state = torch.get_rng_state()
    with rng_preserved("cpu"):
        torch.randn(10)
    assert torch.equal(torch.get_rng_state(), state)
    with ema_weights_swapped_in(ema, model) as swapped:
        assert swapped is model
        for param, shadow in zip(model.parameters(), ema.shadow_params, strict=True):
            assert torch.equal(param, shadow)
        assert not torch.equal(model.weight, training_weights[0])
    for param, saved in zip(model.parameters(), training_weights, strict=True):
        assert torch.equal(param, saved)
    assert torch.equal(torch.get_rng_state(), state)  # no model was built to hold the EMA weights


def test_reseeded_assignment_generator_depends_on_seed_process_and_step_only():
    def draws(seed=0, process_index=0, step=7, micro_step=0, generator=None):
        generator = generator or assignment_generator(seed=99, process_index=3)
        return torch.randn(8, generator=reseed_assignment_generator(generator, seed, process_index, step, micro_step))

    torch.manual_seed(0)
    state = torch.get_rng_state()
    used = assignment_generator(seed=0)
    torch.randn(100, generator=used)  # whatever was drawn before does not matter
    assert torch.equal(draws(generator=used), draws())
    assert torch.equal(torch.get_rng_state(), state)  # the global stream is untouched
    others = [draws(seed=1), draws(process_index=1), draws(step=8), draws(micro_step=1), draws(step=0)]
    for other in others:
        assert not torch.equal(other, draws())
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        reseed_assignment_generator(used, 0, 0, -1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    """The same 2-process run (torchrun, accelerate MULTI_CPU on gloo) with global and with local scope."""
    outputs = {}
    for scope in ("global", "local"):
        output_dir = tmp_path_factory.mktemp(f"two-{scope}") / "out"
        flags = ["--max_train_steps", str(STEPS), "--assignment", "linear", "--assignment_scope", scope]
        _run(_two_process_command(output_dir, *flags, "--checkpointing_steps", "2"), timeout=240)
        outputs[scope] = output_dir
    return outputs


@pytest.mark.slow
def test_two_processes_train_together_with_global_and_local_assignment(two_process_runs):
    for scope, output_dir in two_process_runs.items():
        config = json.loads((output_dir / "training_config.json").read_text())
        assert config["num_processes"] == 2 and config["assignment_scope"] == scope
        assert config["global_step"] == STEPS
        assert (output_dir / "model_index.json").is_file()
        assert sorted(p.name for p in (output_dir / "checkpoint-2").glob("random_states_*.pkl")) == [
            "random_states_0.pkl",
            "random_states_1.pkl",
        ]
    global_run, local_run = two_process_runs["global"], two_process_runs["local"]
    # Same seeds, so the same images and noise on each process in both runs ...
    assert _log_column(global_run, "assign_distance_before") == _log_column(local_run, "assign_distance_before")
    # ... and one assignment over the world batch of 16 can only beat two assignments of 8 (their union is
    # one of its candidates): it must be at least as short at every step, and shorter somewhere.
    global_after = [float(v) for v in _log_column(global_run, "assign_distance_after")]
    local_after = [float(v) for v in _log_column(local_run, "assign_distance_after")]
    assert all(g <= loc + 1e-5 for g, loc in zip(global_after, local_after, strict=True))
    assert any(g < loc - 1e-4 for g, loc in zip(global_after, local_after, strict=True))


# --------------------------------------------------------------------------------------------------
# Bad input: clear errors
# --------------------------------------------------------------------------------------------------


def _make_image_folder(folder: Path, count: int = 4) -> Path:
    folder.mkdir(parents=True)
    for index in range(count):
        Image.new("RGB", (12, 12), (index * 40, 0, 0)).save(folder / f"{index}.png")
    return folder


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--train_data_dir", "/definitely/not/here"], "--train_data_dir '/definitely/not/here' does not exist"),
        (["--train_data_dir", "{images}", "--image_column", "img"], "--image_column 'img' is not a column"),
        (["--resolution", "10"], "--resolution 10 cannot be taken by the UNet"),
        (["--model_config_name_or_path", "{config}", "--resolution", "12"], "must be a positive multiple of 8"),
        (["--model_config_name_or_path", "./missing/unet.json"], "does not exist"),
        (["--train_batch_size", "64", "--max_train_samples", "10"], "needs at least 64 training examples"),
        (["--resume_from_checkpoint", "checkpoint-7"], "neither 'latest' nor an existing checkpoint"),
    ],
)
def test_bad_input_gives_a_clear_error(script, tmp_path, fresh_accelerate_state, flags, message):
    images = _make_image_folder(tmp_path / "images")
    config = tmp_path / "unet_config.json"
    config.write_text(
        json.dumps(
            {
                "_class_name": "UNet2DModel",
                "in_channels": 1,
                "out_channels": 1,
                "block_out_channels": [8, 8, 8, 8],
                "norm_num_groups": 8,
                "layers_per_block": 1,
                "down_block_types": ["DownBlock2D"] * 4,
                "up_block_types": ["UpBlock2D"] * 4,
            }
        )
    )
    flags = [f.format(images=images, config=config) for f in flags]
    args = script.parse_args(["--output_dir", str(tmp_path / "out"), "--unet_block_out_channels", "8,16,16", *flags])
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        script.main(args)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--assignment", "hungarian"], "argument --assignment: invalid choice: 'hungarian'"),
        (["--prediction_type", "eps"], "argument --prediction_type: invalid choice: 'eps'"),
        (["--assignment_scope", "world"], "argument --assignment_scope: invalid choice: 'world'"),
        (["--knn_k", "0"], "argument --knn_k: expected an integer >= 1, got '0'"),
        (["--lr_scheduler", "exponential"], "argument --lr_scheduler: invalid choice: 'exponential'"),
        (["--unet_block_out_channels", "32,sixty-four"], "--unet_block_out_channels must be integers"),
    ],
)
def test_unknown_option_values_are_rejected_with_the_choices(script, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_parse_args_defaults_follow_the_dataset(script):
    assert script.parse_args([]).resolution == 16  # the digits default
    assert script.parse_args(["--dataset_name", "cifar10"]).resolution == 64  # diffusers' default
    args = script.parse_args(["--assignment", "none"])
    assert isinstance(args, argparse.Namespace) and args.assignment == "none"


# --------------------------------------------------------------------------------------------------
# Data loading
# --------------------------------------------------------------------------------------------------


def test_digits_default_and_image_transform():
    from immiscible_diffusers.data import DIGITS_NUM_IMAGES, image_transform, load_image_dataset

    digits = load_image_dataset()
    assert len(digits) == DIGITS_NUM_IMAGES and digits[0]["image"].size == (8, 8)
    pixels = torch.stack([torch.from_numpy(np.array(digits[i]["image"])) for i in range(10)])
    assert pixels.min() == 0 and pixels.max() == 255  # the 0-16 gray levels spread over 0-255
    upsampled = image_transform(16, num_channels=1)(digits[0]["image"])
    assert upsampled.shape == (1, 16, 16) and -1 <= upsampled.min() < upsampled.max() <= 1

    wide = Image.new("RGB", (40, 20))
    wide.paste((255, 255, 255), (0, 0, 6, 20))  # a white band on the far left, outside the center crop
    centered = image_transform(8, center_crop=True, num_channels=3)(wide)
    assert centered.shape == (3, 8, 8) and torch.all(centered == -1)
    torch.manual_seed(0)
    crops = [image_transform(8, random_flip=True, num_channels=3)(wide) for _ in range(20)]
    assert any(torch.any(c > 0) for c in crops) and any(torch.all(c == -1) for c in crops)
    with pytest.raises(ValueError, match="num_channels must be one of"):
        image_transform(8, num_channels=2)


def test_image_folder_and_subset(tmp_path):
    from immiscible_diffusers.data import load_image_dataset

    folder = _make_image_folder(tmp_path / "images", count=6)
    dataset = load_image_dataset(train_data_dir=str(folder))
    assert len(dataset) == 6 and dataset[0]["image"].size == (12, 12)
    subset = load_image_dataset(max_train_samples=5, seed=0)
    assert len(subset) == 5 and subset["label"] == load_image_dataset(max_train_samples=5, seed=0)["label"]
    with pytest.raises(ValueError, match="not both"):
        load_image_dataset(dataset_name="cifar10", train_data_dir=str(folder))


def test_push_output_dir_refuses_a_folder_without_a_pipeline(tmp_path):
    from immiscible_diffusers.hub import PUSH_IGNORE_PATTERNS, push_output_dir

    with pytest.raises(ValueError, match="holds no saved pipeline"):
        push_output_dir(tmp_path, "user/model")
    assert "checkpoint-*" in PUSH_IGNORE_PATTERNS and ".tmp-checkpoint-*" in PUSH_IGNORE_PATTERNS
