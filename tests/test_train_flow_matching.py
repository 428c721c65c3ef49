"""training_scripts/train_flow_matching.py and immiscible_diffusers.flow_matching, end to end and offline.

Runs train a tiny UNet (widths 8 and 16, 8x8 digits, batches of 8) for a few steps in a subprocess, as a
user would run it; the training step, the sigma sampling, the pipeline's integrator and the evaluation
sampler are checked in-process against values recomputed from first principles.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import script_env
from immiscible_diffusers import assign_noise
from immiscible_diffusers.flow_matching import (
    WEIGHTING_SCHEMES,
    FlowMatchingPipeline,
    flow_matching_inputs,
    flow_matching_scheduler_config,
    sample_flow_matching,
    sample_training_sigmas,
    training_sigma_grid,
    validate_weighting_options,
)
from immiscible_diffusers.model_card import REQUIRED_CARD_KEYS, read_card_metadata
from immiscible_diffusers.training import list_checkpoints, read_train_log

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "training_scripts" / "train_flow_matching.py"

TINY = [
    "--resolution", "8",
    "--unet_block_out_channels", "8,16",
    "--train_batch_size", "8",
    "--max_train_samples", "64",
    "--eval_batch_size", "2",
    "--num_inference_steps", "2",
    "--learning_rate", "1e-3",
    "--lr_warmup_steps", "0",
    "--seed", "0",
]  # fmt: skip

# Each trains STEPS optimizer steps on the digits default (no dataset flags). The knn run is also the
# uninterrupted reference of the resume test.
KNN_FLAGS = ["--assignment", "knn", "--use_ema", "--checkpointing_steps", "2", "--lr_scheduler", "constant"]
RUNS = {
    "none": ["--assignment", "none"],
    "linear": ["--assignment", "linear", "--checkpointing_steps", "3"],
    "knn": KNN_FLAGS,  # --knn_k defaults to 4
}
STEPS = 4


def _run(command: list[str], timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env=script_env(**env), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def _train(output_dir: Path, *flags: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, str(SCRIPT), "--output_dir", str(output_dir), *TINY, *flags])


def _log_column(output_dir: Path, column: str) -> list[str]:
    return [row[column] for row in read_train_log(output_dir / "train_log.csv")]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_flow_matching_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train each configuration of RUNS once per module, on first use; return its output folder."""
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            output_dir = tmp_path_factory.mktemp(f"flow-{name}") / "out"
            _train(output_dir, "--max_train_steps", str(STEPS), *RUNS[name])
            done[name] = output_dir
        return done[name]

    return get


# --------------------------------------------------------------------------------------------------
# End-to-end runs on the digits default
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_run_writes_pipeline_card_logs_and_samples(trained, name):
    output_dir = trained(name)

    model_index = json.loads((output_dir / "model_index.json").read_text())
    # diffusers' form for a pipeline shipped as code in the folder: module pipeline.py, class FlowMatchingPipeline
    assert model_index["_class_name"] == ["pipeline", "FlowMatchingPipeline"]
    assert model_index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]  # the stock class
    assert model_index["unet"] == ["diffusers", "UNet2DModel"]
    scheduler_config = json.loads((output_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler_config["num_train_timesteps"] == 1000 and scheduler_config["shift"] == 1.0
    assert "assignment" not in scheduler_config
    assert (output_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert "class FlowMatchingPipeline(DiffusionPipeline)" in (output_dir / "pipeline.py").read_text()

    config = json.loads((output_dir / "training_config.json").read_text())
    assert config["global_step"] == STEPS and config["assignment"] == name and config["knn_k"] == 4
    assert config["script"] == "train_flow_matching.py" and config["prediction_type"] == "flow_prediction"
    assert config["weighting_scheme"] == "none" and config["dataset"] == "sklearn-digits"

    metadata = read_card_metadata(output_dir)
    assert metadata["library_name"] == "diffusers"
    assert metadata["pipeline_tag"] == "unconditional-image-generation"
    for tag in ("diffusers", "diffusers-training", "immiscible-diffusion", f"assignment-{name}", "flow-matching"):
        assert tag in metadata["tags"]
    card = metadata["immiscible_diffusers"]
    assert set(REQUIRED_CARD_KEYS) <= set(card)
    assert card["script"] == "train_flow_matching.py" and card["prediction_type"] == "flow_prediction"
    assert card["assignment"] == name and card["global_step"] == STEPS and card["resolution"] == 8
    assert card["weighting_scheme"] == "none" and card["flow_shift"] == 1.0
    readme = (output_dir / "README.md").read_text()
    assert f'DiffusionPipeline.from_pretrained("{output_dir}", trust_remote_code=True)' in readme
    assert "custom_pipeline" not in readme and "2406.12303" in readme
    assert f"samples/step_{STEPS:06d}.png" in readme

    grid = Image.open(output_dir / "samples" / f"step_{STEPS:06d}.png")
    # two 8x8 grayscale samples side by side, shown at 48x48 with 2-px gaps
    assert grid.size == (2 * 50 + 2, 50 + 2) and grid.mode == "L"

    rows = read_train_log(output_dir / "train_log.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    before = [float(r["assign_distance_before"]) for r in rows]
    after = [float(r["assign_distance_after"]) for r in rows]
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    if name == "none":
        assert after == before
    else:  # the assignment shortens the image-noise distance of every batch
        assert all(a < b for a, b in zip(after, before, strict=True))


@pytest.mark.slow
def test_checkpoints_hold_unet_ema_and_scheduler_folders(trained):
    output_dir = trained("knn")
    assert [step for step, _ in list_checkpoints(output_dir)] == [2, 4]
    for folder in ("unet", "unet_ema"):
        assert (output_dir / "checkpoint-4" / folder / "diffusion_pytorch_model.safetensors").is_file()
    assert (output_dir / "checkpoint-4" / "scheduler" / "scheduler_config.json").is_file()
    assert [step for step, _ in list_checkpoints(trained("linear"))] == [3]
    assert not (trained("none") / "checkpoint-4").exists()  # --checkpointing_steps defaults to 500


@pytest.mark.slow
def test_assignment_methods_see_the_same_batches_and_random_draws(trained):
    vanilla, linear, knn = trained("none"), trained("linear"), trained("knn")
    for column in ("batch_hash", "noise_hash", "assign_distance_before"):
        assert _log_column(vanilla, column) == _log_column(linear, column) == _log_column(knn, column), column
    assert len(set(_log_column(vanilla, "noise_hash"))) == STEPS
    assert _log_column(vanilla, "loss")[0] != _log_column(linear, "loss")[0] != _log_column(knn, "loss")[0]


@pytest.mark.slow
def test_saved_pipeline_samples_in_a_fresh_process_with_plain_diffusers(trained, tmp_path):
    output_dir = trained("knn")
    code = textwrap.dedent(
        f"""
        import sys
        import numpy as np, torch
        from diffusers import DiffusionPipeline

        def sample(pipeline):
            generator = torch.Generator().manual_seed(0)
            return pipeline(batch_size=2, num_inference_steps=3, output_type="np", generator=generator).images

        # Without trust_remote_code diffusers itself says what to pass.
        try:
            DiffusionPipeline.from_pretrained({str(output_dir)!r})
        except ValueError as error:
            assert "trust_remote_code=True" in str(error), error
        else:
            raise AssertionError("loaded custom code without trust_remote_code")

        pipeline = DiffusionPipeline.from_pretrained({str(output_dir)!r}, trust_remote_code=True)
        plain = sample(pipeline)
        assert plain.shape == (2, 8, 8, 1) and np.isfinite(plain).all(), plain.shape
        assert plain.min() >= 0 and plain.max() <= 1
        assert not [m for m in sys.modules if m.startswith("immiscible_diffusers")]
        print(type(pipeline).__module__, type(pipeline).__name__, type(pipeline.scheduler).__name__)

        from immiscible_diffusers.flow_matching import FlowMatchingPipeline
        ours_pipeline = FlowMatchingPipeline.from_pretrained({str(output_dir)!r})
        assert type(ours_pipeline) is FlowMatchingPipeline  # this package's class, not the folder's copy
        assert np.array_equal(plain, sample(ours_pipeline))
        """
    )
    result = _run([sys.executable, "-c", code], timeout=120, HF_MODULES_CACHE=str(tmp_path / "modules"))
    # The class came from the folder's pipeline.py (diffusers' dynamic module), not from this package.
    assert "diffusers_modules.local.pipeline FlowMatchingPipeline FlowMatchEulerDiscreteScheduler" in result.stdout


@pytest.mark.slow
def test_a_stopped_run_resumes_to_a_later_step_as_if_never_stopped(trained, tmp_path):
    straight, resumed = trained("knn"), tmp_path / "resumed"
    _train(resumed, *KNN_FLAGS, "--max_train_steps", "2")
    assert [step for step, _ in list_checkpoints(resumed)] == [2]
    result = _train(resumed, *KNN_FLAGS, "--max_train_steps", str(STEPS), "--resume_from_checkpoint", "latest")
    assert "Resuming from checkpoint" in result.stderr + result.stdout

    assert json.loads((resumed / "training_config.json").read_text())["global_step"] == STEPS
    assert [int(s) for s in _log_column(resumed, "step")] == list(range(1, STEPS + 1))  # every step exactly once
    assert [step for step, _ in list_checkpoints(resumed)] == [2, 4]
    # The model, optimizer, EMA, data order, noise and KNN candidates all continue where they stopped
    # (saving the stopped run's checkpoint, EMA copy and sample grid drew nothing from the noise stream).
    for column in ("batch_hash", "noise_hash", "assign_distance_after", "loss"):
        assert _log_column(resumed, column) == _log_column(straight, column), column


# --------------------------------------------------------------------------------------------------
# The training step: the flow target is made of the assigned noise
# --------------------------------------------------------------------------------------------------


def _expected_sigmas(u: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Sigmas from first principles: the scheduler's grid k/N for k = N..1 (shift 1), indexed by int(u * N)."""
    grid = torch.arange(num_train_timesteps, 0, -1, dtype=torch.float32) / num_train_timesteps
    return grid[(u * num_train_timesteps).long()]


@pytest.mark.parametrize("precondition_outputs", [0, 1])
@pytest.mark.parametrize("assignment", ["linear", "knn", "none"])
def test_the_flow_target_is_built_from_the_assigned_noise(script, assignment, precondition_outputs):
    args = script.parse_args([*TINY, "--assignment", assignment, "--precondition_outputs", str(precondition_outputs)])
    torch.manual_seed(0)
    unet = script.build_unet(args)
    grid = training_sigma_grid({"num_train_timesteps": 1000, "shift": 1.0})
    clean = torch.rand(16, 1, 8, 8) * 2 - 1

    torch.manual_seed(123)
    step = script.compute_loss(unet, grid, clean, args, torch.Generator().manual_seed(7))

    # Recompute independently: the same draws from the main stream, the package's assignment (k = 4).
    torch.manual_seed(123)
    noise = torch.randn(clean.shape)
    assigned = assign_noise(clean, noise, method=assignment, knn_k=4, generator=torch.Generator().manual_seed(7))
    sigmas = _expected_sigmas(torch.rand(16))
    assert torch.equal(step.noise_before_assignment, noise)
    assert torch.equal(step.noise, assigned)
    torch.testing.assert_close(step.sigmas, sigmas, rtol=0, atol=1e-6)
    torch.testing.assert_close(step.timesteps, sigmas * 1000)
    if assignment == "none":
        assert torch.equal(assigned, noise)
    else:  # the assignment changed the noise, so a target built from the raw noise would be caught
        assert not torch.equal(assigned, noise)

    s = sigmas.view(-1, 1, 1, 1)
    torch.testing.assert_close(step.noisy_images, (1 - s) * clean + s * assigned)
    velocity = assigned - clean
    raw_output = unet(step.noisy_images, step.timesteps).sample
    if precondition_outputs:
        assert torch.equal(step.target, clean)
        # x_pred - x = s * (velocity - output): the preconditioned loss is the assigned-noise velocity error times s^2.
        expected_loss = (s**2 * (raw_output - velocity) ** 2).mean()
    else:
        torch.testing.assert_close(step.target, velocity, rtol=0, atol=0)
        expected_loss = ((raw_output - velocity) ** 2).mean()
        if assignment != "none":
            assert not torch.allclose(step.target, noise - clean)
    torch.testing.assert_close(step.loss, expected_loss)
    assert step.loss.requires_grad


def test_flow_matching_inputs_interpolate_and_check_shapes():
    clean, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    noisy, target = flow_matching_inputs(clean, noise, torch.tensor([0.0, 0.5, 1.0]))
    assert torch.equal(noisy[0], clean[0]) and torch.equal(noisy[2], noise[2])
    torch.testing.assert_close(noisy[1], (clean[1] + noise[1]) / 2)
    assert torch.equal(target, noise - clean)
    with pytest.raises(ValueError, match=r"sigmas must have shape \(3,\)"):
        flow_matching_inputs(clean, noise, torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="noise must have the shape of clean"):
        flow_matching_inputs(clean, noise[:, :1], torch.ones(3))


# --------------------------------------------------------------------------------------------------
# Weighting schemes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", WEIGHTING_SCHEMES)
def test_every_weighting_scheme_trains_with_its_sigma_density_and_loss_weight(script, scheme):
    args = script.parse_args([*TINY, "--weighting_scheme", scheme, "--assignment", "linear"])
    torch.manual_seed(0)
    unet = script.build_unet(args)
    grid = training_sigma_grid({"num_train_timesteps": 1000})
    step = script.compute_loss(unet, grid, torch.rand(8, 1, 8, 8) * 2 - 1, args)
    assert torch.isfinite(step.loss) and step.loss.requires_grad
    s = step.sigmas
    expected_weighting = {"sigma_sqrt": s**-2, "cosmap": 2 / (math.pi * (1 - 2 * s + 2 * s**2))}.get(
        scheme, torch.ones_like(s)
    )
    torch.testing.assert_close(step.weighting.flatten(), expected_weighting)

    draws = sample_training_sigmas(grid, 4000, scheme, generator=torch.Generator().manual_seed(0))
    assert draws.min() >= 1e-3 and draws.max() <= 1.0
    middle = float(((draws > 0.25) & (draws < 0.75)).float().mean())
    if scheme in ("logit_normal", "mode"):  # both put more mass in the middle than uniform (0.5)
        assert middle > 0.6, middle
    else:  # sigma_sqrt, cosmap and none draw uniformly and weight the loss instead
        assert abs(middle - 0.5) < 0.04, middle


def test_logit_normal_follows_sd3s_direction_and_u_of_one_stays_on_the_grid():
    grid = training_sigma_grid({"num_train_timesteps": 1000})
    generator = torch.Generator().manual_seed(0)
    # As diffusers' SD3 scripts index the descending grid: sigma ~ 1 - sigmoid(n), so a positive mean means less noise.
    low_noise = sample_training_sigmas(grid, 2000, "logit_normal", logit_mean=1.0, generator=generator)
    assert float(low_noise.mean()) < 0.35
    # sigmoid(20) is exactly 1.0 in float32: the index must still fall on the grid (sigma_min).
    edge = sample_training_sigmas(grid, 4, "logit_normal", logit_mean=20.0, logit_std=1e-3)
    torch.testing.assert_close(edge, torch.full((4,), 1e-3))
    shifted = training_sigma_grid({"num_train_timesteps": 1000, "shift": 3.0})
    assert shifted[0] == 1.0 and shifted[500] > grid[500]  # shift > 1 moves the grid toward noise


# --------------------------------------------------------------------------------------------------
# The pipeline and the evaluation sampler
# --------------------------------------------------------------------------------------------------


def _point_mass_velocity_model(target: torch.Tensor, num_train_timesteps: int):
    """The exact velocity field of data that is one image ``target``: v(x, sigma) = (x - target) / sigma."""
    from diffusers import ModelMixin
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.models.unets.unet_2d import UNet2DOutput

    class PointMassVelocity(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, sample_size: int = 4, in_channels: int = 1):
            super().__init__()
            self.register_buffer("target", target.clone())
            self.dummy = torch.nn.Parameter(torch.zeros(()))  # a dtype/device for the pipeline to read

        def forward(self, sample, timestep):
            sigma = (timestep.float() / num_train_timesteps).view(-1, 1, 1, 1)
            return UNet2DOutput(sample=(sample - self.target) / sigma)

    return PointMassVelocity(sample_size=target.shape[-1], in_channels=target.shape[0])


@pytest.mark.parametrize("num_inference_steps", [1, 7])
def test_pipeline_integrates_the_exact_velocity_field_onto_the_data(num_inference_steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    target = torch.linspace(-0.9, 0.9, 16).view(1, 4, 4)
    model = _point_mass_velocity_model(target, 1000)
    pipeline = FlowMatchingPipeline(unet=model, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000))
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(batch_size=3, num_inference_steps=num_inference_steps, output_type="pt").images
    # Euler steps along a straight path are exact: every sample lands on the one data point (in [0, 1]).
    torch.testing.assert_close(images, (target / 2 + 0.5).expand(3, 1, 4, 4), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="output_type must be"):
        pipeline(output_type="latent")


@pytest.mark.slow
def test_evaluator_samples_the_runs_with_the_flow_sampler(trained, monkeypatch):
    from immiscible_diffusers import evaluate

    # The registration evaluate.py carries for flow-matching runs (idempotent if it is there already).
    sampler = evaluate.Sampler(
        "flow_euler", sample_flow_matching, ("FlowMatchingPipeline",), "Euler ODE (FlowMatchEulerDiscreteScheduler)"
    )
    monkeypatch.setitem(evaluate.SAMPLERS, "flow_euler", sampler)
    monkeypatch.setitem(evaluate.DEFAULT_SAMPLERS, "FlowMatchingPipeline", "flow_euler")

    run = evaluate.read_run(trained("knn"))
    assert run.pipeline_class == "FlowMatchingPipeline"
    assert evaluate.resolve_sampler(run, None).name == "flow_euler"
    with pytest.raises(ValueError, match="holds a FlowMatchingPipeline"):
        evaluate.resolve_sampler(run, "ddim")
    checkpoints = evaluate.find_checkpoints(run)
    found = [(c.step, c.weights, c.source) for c in checkpoints]
    assert found == [(2, "ema", "checkpoint-2"), (4, "ema", "checkpoint-4")]

    options = evaluate.SamplingOptions(num_images=5, num_inference_steps=3, seed=7, batch_size=2, progress=False)
    first = sample_flow_matching(run, checkpoints[0].model_dir, options)
    again = sample_flow_matching(run, checkpoints[0].model_dir, options)
    other = sample_flow_matching(run, checkpoints[0].model_dir, evaluate.SamplingOptions(5, 3, seed=8, progress=False))
    assert first.shape == (5, 1, 8, 8) and first.dtype == torch.float32 and -1 <= first.min() < first.max() <= 1
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_scheduler_config_comes_from_the_checkpoint_the_run_or_the_training_settings(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from immiscible_diffusers.evaluate import RunInfo

    FlowMatchEulerDiscreteScheduler(shift=2.0).save_pretrained(tmp_path / "checkpoint-5" / "scheduler")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(tmp_path / "scheduler")
    run = RunInfo(tmp_path, "run", "FlowMatchingPipeline", {"num_train_timesteps": 500, "flow_shift": 1.5}, {})
    assert flow_matching_scheduler_config(run, tmp_path / "checkpoint-5" / "unet")["shift"] == 2.0
    assert flow_matching_scheduler_config(run, tmp_path / "unet")["shift"] == 3.0
    bare = RunInfo(tmp_path / "nowhere", "bare", None, {"num_train_timesteps": 500, "flow_shift": 1.5}, {})
    rebuilt = flow_matching_scheduler_config(bare)
    assert rebuilt["shift"] == 1.5 and rebuilt["num_train_timesteps"] == 500
    with pytest.raises(ValueError, match="no scheduler/ folder and no training config"):
        flow_matching_scheduler_config(RunInfo(tmp_path / "nowhere", "x", None, {}, {}))


# --------------------------------------------------------------------------------------------------
# Bad input: clear errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--weighting_scheme", "uniform"], "argument --weighting_scheme: invalid choice: 'uniform'"),
        (["--logit_std", "0"], "--logit_std must be a finite number > 0, got 0.0"),
        (["--logit_std", "-1"], "--logit_std must be a finite number > 0, got -1.0"),
        (["--logit_mean", "nan"], "--logit_mean must be a finite number"),
        (["--mode_scale", "3"], "--mode_scale must lie in [-1.0, 1.7519]"),
        (["--flow_shift", "0"], "argument --flow_shift: expected a number > 0, got '0'"),
        (["--precondition_outputs", "2"], "argument --precondition_outputs: invalid choice: 2"),
        (["--num_train_timesteps", "0"], "argument --num_train_timesteps: expected an integer >= 1, got '0'"),
        (["--assignment", "hungarian"], "argument --assignment: invalid choice: 'hungarian'"),
        (["--knn_k", "0"], "argument --knn_k: expected an integer >= 1, got '0'"),
    ],
)
def test_bad_flags_are_rejected_with_the_flag_and_what_was_expected(script, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--resolution", "10"], "--resolution 10 cannot be taken by the UNet"),
        (["--train_batch_size", "64", "--max_train_samples", "10"], "needs at least 64 training examples"),
        (["--resume_from_checkpoint", "checkpoint-7"], "neither 'latest' nor an existing checkpoint"),
    ],
)
def test_bad_settings_fail_before_training(script, tmp_path, fresh_accelerate_state, flags, message):
    args = script.parse_args(["--output_dir", str(tmp_path / "out"), "--unet_block_out_channels", "8,16,16", *flags])
    with pytest.raises(ValueError, match=message):
        script.main(args)


def test_package_helpers_reject_bad_input():
    with pytest.raises(ValueError, match="weighting_scheme must be one of"):
        validate_weighting_options("uniform")
    with pytest.raises(ValueError, match="logit_std must be a finite number > 0"):
        sample_training_sigmas(torch.linspace(1, 0.001, 1000), 4, "logit_normal", logit_std=0.0)
    with pytest.raises(ValueError, match="sigma_grid must be a non-empty 1-d tensor"):
        sample_training_sigmas(torch.ones(2, 2), 4)
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        training_sigma_grid({"use_dynamic_shifting": True})
    validate_weighting_options("mode", mode_scale=-1.0)  # the ends of the valid range are valid
    validate_weighting_options("mode", mode_scale=2 / (math.pi - 2))
