"""training_scripts/train_consistency.py and immiscible_diffusers.consistency, end to end and offline.

Every run trains a tiny UNet (widths 8 and 16, 8x8 digits, batches of 8) for a few steps in a subprocess, as a
user would run it; the consistency step, the iCT pieces and the input checks are also exercised in-process.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
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
from safetensors.torch import load_file

from conftest import run_command, script_env
from immiscible_diffusers import assign_noise
from immiscible_diffusers.consistency import (
    ConsistencyDiscretization,
    boundary_condition_scalings,
    consistency_function,
    consistency_loss_weights,
    default_huber_c,
    discretization_steps,
    infer_num_classes,
    karras_sigmas,
    lognormal_index_weights,
    pseudo_huber_distance,
    sample_consistency,
    update_teacher,
)
from immiscible_diffusers.model_card import REQUIRED_CARD_KEYS, read_card_metadata
from immiscible_diffusers.training import list_checkpoints, read_train_log

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "training_scripts" / "train_consistency.py"

TINY = [
    "--resolution", "8",
    "--unet_block_out_channels", "8,16",
    "--train_batch_size", "8",
    "--max_train_samples", "64",
    "--eval_batch_size", "2",
    "--learning_rate", "1e-3",
    "--lr_warmup_steps", "0",
    "--validation_steps", "1000",
    "--seed", "0",
]  # fmt: skip

# name -> (optimizer steps, extra flags)
RUNS = {
    "none": (3, ["--assignment", "none"]),
    "linear": (3, ["--assignment", "linear", "--checkpointing_steps", "2"]),
    # 40 steps = 5 epochs of the 64 digits, through the whole curriculum; also the reference of the resume test.
    "knn": (40, [
        "--assignment", "knn", "--knn_k", "3", "--class_conditional",
        "--use_ema", "--ema_max_decay", "0.9", "--teacher_ema_decay", "0.5",
        "--checkpointing_steps", "5", "--checkpoints_total_limit", "2", "--validation_steps", "20",
    ]),
}  # fmt: skip


def _run(command: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    """Run ``command``; on a timeout kill its whole process group (torchrun's workers too), then fail."""
    return run_command(command, timeout)


def _command(output_dir: Path, name: str) -> list[str]:
    steps, flags = RUNS[name]
    training = ["--output_dir", str(output_dir), *TINY, "--max_train_steps", str(steps), *flags]
    return [sys.executable, str(SCRIPT), *training]


def _log_column(output_dir: Path, column: str) -> list[str]:
    return [row[column] for row in read_train_log(output_dir / "train_log.csv")]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_consistency_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """On first use, start every configuration of RUNS at once (subprocesses); return a run's folder when done."""
    root = tmp_path_factory.mktemp("runs")
    processes: dict[str, subprocess.Popen] = {}
    finished: set[str] = set()

    def get(name: str) -> Path:
        if not processes:
            for run in RUNS:
                log = open(root / f"{run}.log", "w")
                processes[run] = subprocess.Popen(
                    _command(root / run, run), env=script_env(), stdout=log, stderr=subprocess.STDOUT, cwd=REPO
                )
                log.close()
        if name not in finished:
            returncode = processes[name].wait(timeout=300)
            assert returncode == 0, f"run {name} failed:\n{(root / f'{name}.log').read_text()[-5000:]}"
            finished.add(name)
        return root / name

    yield get
    for process in processes.values():
        if process.poll() is None:
            process.kill()
            process.wait()


def _tiny_unet(in_channels: int = 1, **kwargs):
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=8, in_channels=in_channels, out_channels=in_channels, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, **kwargs,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# The iCT pieces
# --------------------------------------------------------------------------------------------------


def test_karras_sigmas_are_the_stock_schedulers_levels_ascending():
    from diffusers import CMStochasticIterativeScheduler

    for n in (2, 11, 1281):
        scheduler = CMStochasticIterativeScheduler(num_train_timesteps=n, sigma_min=0.002, sigma_max=80.0, rho=7.0)
        sigmas = karras_sigmas(n, 0.002, 80.0, 7.0)
        assert torch.equal(sigmas, scheduler.sigmas.flip(0))
        assert sigmas[0] == pytest.approx(0.002) and sigmas[-1] == pytest.approx(80.0)
        assert bool((sigmas.diff() > 0).all())


def test_discretization_curriculum_doubles_from_s0_to_s1():
    # K = 8000, s0 = 10, s1 = 1280: log2(128) + 1 = 8 stages of K' = 1000 steps.
    expected = {0: 11, 999: 11, 1000: 21, 2000: 41, 3500: 81, 6999: 641, 7000: 1281, 8000: 1281, 10**9: 1281}
    assert {k: discretization_steps(k, 8000, 10, 1280) for k in expected} == expected
    assert discretization_steps(5000, 8000, 10, 1280, constant=True) == 11
    assert discretization_steps(3, 5, 10, 1280) == 81  # runs shorter than the stages still go through them
    assert discretization_steps(7, 100, 7, 7) == 8  # s0 = s1: a constant curriculum


def test_lognormal_weights_and_loss_weights():
    from scipy.stats import norm

    sigmas = karras_sigmas(41, 0.002, 80.0, 7.0)
    weights = lognormal_index_weights(sigmas, p_mean=-1.1, p_std=2.0)
    assert weights.shape == (40,) and bool((weights > 0).all())
    # erf differences are twice the normal CDF differences; they telescope to the mass on [sigma_min, sigma_max].
    mass = norm.cdf((math.log(80.0) + 1.1) / 2.0) - norm.cdf((math.log(0.002) + 1.1) / 2.0)
    assert float(weights.sum()) == pytest.approx(2 * mass, rel=1e-9)
    # ... and each pair's weight is the lognormal mass between its two levels.
    cdf = norm.cdf((np.log(sigmas.numpy()) + 1.1) / 2.0)
    np.testing.assert_allclose(weights.numpy(), 2 * np.diff(cdf), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(consistency_loss_weights(sigmas), 1.0 / (sigmas[1:] - sigmas[:-1]))
    assert lognormal_index_weights(sigmas, skip_steps=3).shape == (38,)
    assert consistency_loss_weights(sigmas, skip_steps=3).shape == (38,)


def test_pseudo_huber_distance_is_l2_far_and_quadratic_near():
    a = torch.zeros(3, 1, 4, 4)
    b = torch.zeros(3, 1, 4, 4)
    b[0, 0, 0, 0], b[1, 0, 0, 0] = 100.0, 1e-4
    c = 0.01
    distance = pseudo_huber_distance(a, b, c)
    assert distance[0] == pytest.approx(100.0, rel=1e-3)
    assert distance[1] == pytest.approx(1e-8 / (2 * c), rel=1e-3)
    assert distance[2] == 0
    assert default_huber_c(256) == pytest.approx(0.00054 * 16)
    with pytest.raises(ValueError, match="must be a positive finite number"):
        pseudo_huber_distance(a, b, 0.0)


def test_boundary_condition_holds_exactly_at_sigma_min():
    c_skip, c_out = boundary_condition_scalings(torch.tensor([0.002, 1.0, 80.0]), sigma_min=0.002)
    assert c_skip[0] == 1 and c_out[0] == 0
    unet = _tiny_unet()
    noisy = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(consistency_function(unet, noisy, torch.full((4,), 0.002)), noisy)


@pytest.mark.parametrize("timestep", [None, 6])  # sigma_max, and an intermediate level
def test_consistency_function_is_what_the_stock_pipeline_computes(timestep):
    """Training uses the parameterization the saved pipeline samples with (c_in, c_noise, c_skip, c_out)."""
    from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline

    torch.manual_seed(0)
    unet = _tiny_unet(in_channels=3).eval()  # the pipeline's `latents` check assumes 3 channels
    scheduler = CMStochasticIterativeScheduler(num_train_timesteps=11)
    pipeline = ConsistencyModelPipeline(unet=unet, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    latents = torch.randn(3, 3, 8, 8)
    kwargs = {"num_inference_steps": 1} if timestep is None else {"timesteps": [timestep]}
    images = pipeline(batch_size=3, latents=latents, output_type="pt", **kwargs).images

    sigma = float(karras_sigmas(11).flip(0)[timestep or 0])
    with torch.no_grad():
        denoised = consistency_function(unet, latents * 80.0, torch.full((3,), sigma))
    torch.testing.assert_close(images, (denoised.clamp(-1, 1) / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=1e-5)


def test_ema_teacher_update_is_a_lerp_toward_the_student():
    teacher, student = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = teacher.weight.detach().clone()
    update_teacher(teacher, student, decay=0.75)
    torch.testing.assert_close(teacher.weight, 0.75 * before + 0.25 * student.weight.detach())


def test_discretization_rejects_bad_settings():
    with pytest.raises(ValueError, match="skip_steps must be an integer in"):
        ConsistencyDiscretization.build(11, skip_steps=11)
    with pytest.raises(ValueError, match="put no probability on the noise levels"):
        ConsistencyDiscretization.build(11, p_mean=60.0, p_std=0.5)
    with pytest.raises(ValueError, match="sigma_min must be smaller than sigma_max"):
        karras_sigmas(11, sigma_min=2.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="num_sigmas must be an integer >= 2"):
        karras_sigmas(1)


def test_class_labels_are_read_from_the_dataset():
    import datasets

    from immiscible_diffusers.data import load_image_dataset

    assert infer_num_classes(load_image_dataset(max_train_samples=200, seed=0), "label") == 10
    named = datasets.Dataset.from_dict(
        {"label": [0, 1]}, features=datasets.Features({"label": datasets.ClassLabel(names=["a", "b", "c"])})
    )
    assert infer_num_classes(named, "label") == 3
    with pytest.raises(ValueError, match="--class_label_column 'y' is not a column"):
        infer_num_classes(named, "y")
    with pytest.raises(ValueError, match="must hold integer class labels >= 0"):
        infer_num_classes(datasets.Dataset.from_dict({"label": [0, -1]}), "label")


# --------------------------------------------------------------------------------------------------
# The training step: one assigned noise drives the teacher and the student
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("assignment", ["linear", "knn", "none"])
def test_teacher_and_student_inputs_use_the_same_assigned_noise(script, assignment):
    args = script.parse_args([*TINY, "--assignment", assignment, "--knn_k", "4"])
    torch.manual_seed(0)
    unet = script.build_unet(args, None)
    discretization = ConsistencyDiscretization.build(41)
    clean = torch.rand(16, 1, 8, 8) * 2 - 1

    step = script.compute_loss(
        unet, unet, clean, None, discretization, 0.01, args,
        noise_generator=torch.Generator().manual_seed(123), knn_generator=torch.Generator().manual_seed(7),
    )  # fmt: skip

    # Recompute independently: the same draws from the main stream, the package's assignment.
    main_stream = torch.Generator().manual_seed(123)
    noise = torch.randn(clean.shape, generator=main_stream)
    assigned = assign_noise(clean, noise, method=assignment, knn_k=4, generator=torch.Generator().manual_seed(7))
    indices = torch.multinomial(discretization.index_weights, 16, replacement=True, generator=main_stream)
    assert torch.equal(step.noise_before_assignment, noise)
    assert torch.equal(step.noise, assigned)
    assert torch.equal(step.pair_indices, indices)
    if assignment == "none":
        assert torch.equal(assigned, noise)
    else:  # the assignment changed the noise, so inputs built from the raw noise would be caught below
        assert not torch.equal(assigned, noise)

    sigmas = karras_sigmas(41).float()
    teacher_sigma, student_sigma = sigmas[indices], sigmas[indices + 1]
    assert torch.equal(step.teacher_sigmas, teacher_sigma) and torch.equal(step.student_sigmas, student_sigma)
    assert bool((step.teacher_sigmas < step.student_sigmas).all())
    view = (-1, 1, 1, 1)
    assert torch.equal(step.teacher_noisy_images, clean + teacher_sigma.view(view) * assigned)
    assert torch.equal(step.student_noisy_images, clean + student_sigma.view(view) * assigned)
    # Both inputs lie on the trajectory of the one assigned noise of each image.
    for noisy, sigma in ((step.teacher_noisy_images, teacher_sigma), (step.student_noisy_images, student_sigma)):
        recovered = (noisy - clean) / sigma.view(view)
        torch.testing.assert_close(recovered, assigned, atol=2e-3, rtol=1e-3)
        if assignment != "none":
            assert not torch.allclose(recovered, noise, atol=1e-2)

    with torch.no_grad():
        expected_teacher = consistency_function(unet, clean + teacher_sigma.view(view) * assigned, teacher_sigma)
    torch.testing.assert_close(step.teacher_denoised, expected_teacher)
    assert not step.teacher_denoised.requires_grad and step.student_denoised.requires_grad
    weights = 1.0 / (sigmas[indices + 1] - sigmas[indices])
    expected_loss = (weights * pseudo_huber_distance(step.student_denoised, expected_teacher, 0.01)).mean()
    torch.testing.assert_close(step.loss, expected_loss)
    step.loss.backward()
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in unet.parameters())


def test_teacher_and_student_share_the_dropout_mask(script):
    args = script.parse_args([*TINY, "--assignment", "linear", "--unet_dropout", "0.5"])
    torch.manual_seed(0)
    unet = script.build_unet(args, None).train()
    discretization = ConsistencyDiscretization.build(11)
    clean = torch.rand(8, 1, 8, 8) * 2 - 1
    torch.manual_seed(5)
    step = script.compute_loss(unet, unet, clean, None, discretization, 0.01, args)

    torch.manual_seed(5)
    torch.randn(clean.shape)
    torch.multinomial(discretization.index_weights, 8, replacement=True)
    state = torch.get_rng_state()
    with torch.no_grad():
        teacher = consistency_function(unet, step.teacher_noisy_images, step.teacher_sigmas)
    torch.set_rng_state(state)
    student = consistency_function(unet, step.student_noisy_images, step.student_sigmas)
    torch.testing.assert_close(step.teacher_denoised, teacher)
    torch.testing.assert_close(step.student_denoised, student)
    # ... and dropout is really active: another mask gives another output.
    assert not torch.allclose(consistency_function(unet, step.student_noisy_images, step.student_sigmas), student)


# --------------------------------------------------------------------------------------------------
# End-to-end runs
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_run_writes_pipeline_card_logs_and_samples(trained, name):
    output_dir = trained(name)
    steps, flags = RUNS[name]
    assignment = flags[flags.index("--assignment") + 1]

    model_index = json.loads((output_dir / "model_index.json").read_text())
    assert model_index["_class_name"] == "ConsistencyModelPipeline"
    assert model_index["scheduler"] == ["diffusers", "CMStochasticIterativeScheduler"]  # the stock class
    scheduler_config = json.loads((output_dir / "scheduler" / "scheduler_config.json").read_text())
    assert "assignment" not in scheduler_config and scheduler_config["sigma_max"] == 80.0
    config = json.loads((output_dir / "training_config.json").read_text())
    assert config["global_step"] == steps and config["assignment"] == assignment
    assert config["script"] == "train_consistency.py" and config["num_processes"] == 1
    # The saved scheduler has the curriculum's noise levels at the end of training.
    assert scheduler_config["num_train_timesteps"] == config["num_discretization_steps"]
    assert config["num_discretization_steps"] == discretization_steps(steps, steps, 10, 1280)

    metadata = read_card_metadata(output_dir)
    assert metadata["library_name"] == "diffusers" and metadata["license"] == "apache-2.0"
    tags = ("diffusers", "diffusers-training", "immiscible-diffusion", f"assignment-{assignment}", "consistency-models")
    for tag in tags:
        assert tag in metadata["tags"]
    card = metadata["immiscible_diffusers"]
    assert set(REQUIRED_CARD_KEYS) <= set(card)
    assert card["script"] == "train_consistency.py" and card["prediction_type"] == "sample"
    assert card["global_step"] == steps and card["dataset"] == "sklearn-digits" and card["resolution"] == 8
    assert card["huber_c"] == pytest.approx(0.00054 * 8)
    readme = (output_dir / "README.md").read_text()
    assert "ConsistencyModelPipeline.from_pretrained" in readme and "2406.12303" in readme
    assert f"samples/step_{steps:06d}.png" in readme

    grid = Image.open(output_dir / "samples" / f"step_{steps:06d}.png")
    # rows: one-step and two-step samples, 2 images each; 8x8 tiles shown at 48x48 with 2-px gaps
    assert grid.size == (2 * 50 + 2, 2 * 50 + 2) and grid.mode == "L"
    (events,) = (output_dir / "logs").rglob("events.out.tfevents.*")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tensorboard = EventAccumulator(str(events.parent))
    tensorboard.Reload()
    for tag in ("loss", "lr", "assignment/distance_after", "consistency/num_discretization_steps"):
        assert [event.step for event in tensorboard.Scalars(tag)] == list(range(1, steps + 1)), tag

    rows = read_train_log(output_dir / "train_log.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, steps + 1))
    before = [float(r["assign_distance_before"]) for r in rows]
    after = [float(r["assign_distance_after"]) for r in rows]
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    if assignment == "none":
        assert after == before
    else:  # the assignment shortens the image-noise distance of every batch
        assert all(a < b for a, b in zip(after, before, strict=True))


@pytest.mark.slow
def test_checkpoints_hold_plain_unet_folders(trained):
    run = trained("knn")
    assert [step for step, _ in list_checkpoints(run)] == [35, 40]
    assert (run / "samples" / "step_000020.png").is_file()  # --validation_steps 20
    from diffusers import UNet2DModel

    raw = UNet2DModel.from_pretrained(run / "checkpoint-40" / "unet")
    ema = UNet2DModel.from_pretrained(run / "checkpoint-40" / "unet_ema")
    assert raw.config.num_class_embeds == 10  # --class_conditional on the digits' labels
    assert any(not torch.equal(raw.state_dict()[k], ema.state_dict()[k]) for k in raw.state_dict())
    # The final pipeline holds the EMA weights.
    final = load_file(run / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(final[k], v) for k, v in ema.state_dict().items())


@pytest.mark.slow
def test_assignment_none_and_linear_see_the_same_batches_and_random_draws(trained):
    vanilla, linear = trained("none"), trained("linear")
    for column in ("batch_hash", "noise_hash", "assign_distance_before"):
        assert _log_column(vanilla, column) == _log_column(linear, column), column
    assert len(set(_log_column(vanilla, "noise_hash"))) == RUNS["none"][0]
    assert _log_column(vanilla, "assign_distance_after") != _log_column(linear, "assign_distance_after")
    assert _log_column(vanilla, "loss") != _log_column(linear, "loss")


@pytest.mark.slow
def test_saved_pipeline_samples_in_one_and_two_steps_in_a_fresh_process(trained):
    output_dir = trained("knn")
    code = textwrap.dedent(
        f"""
        import sys
        import numpy as np, torch
        from diffusers import ConsistencyModelPipeline
        pipeline = ConsistencyModelPipeline.from_pretrained({str(output_dir)!r})
        results = {{}}
        for steps in (1, 2):
            images = pipeline(batch_size=3, class_labels=[0, 5, 9], num_inference_steps=steps, output_type="np",
                              generator=torch.Generator().manual_seed(0)).images
            assert images.shape == (3, 8, 8, 1) and np.isfinite(images).all(), images.shape
            results[steps] = images
        assert not np.allclose(results[1], results[2])
        print(type(pipeline.scheduler).__name__, pipeline.unet.config.num_class_embeds)
        assert not [m for m in sys.modules if m.startswith("immiscible_diffusers")]
        """
    )
    result = _run([sys.executable, "-c", code], timeout=120)
    assert "CMStochasticIterativeScheduler 10" in result.stdout


@pytest.mark.slow
def test_evaluator_samples_consistency_runs_at_one_and_two_steps(trained, monkeypatch):
    from immiscible_diffusers import evaluate

    monkeypatch.setitem(evaluate.SCRIPT_PIPELINES, "train_consistency.py", "ConsistencyModelPipeline")
    # What evaluate.py registers for consistency runs (set here too, so this test does not depend on the wiring).
    monkeypatch.setitem(
        evaluate.SAMPLERS,
        "consistency",
        evaluate.Sampler("consistency", sample_consistency, ("ConsistencyModelPipeline",), "consistency model"),
    )
    monkeypatch.setitem(evaluate.DEFAULT_SAMPLERS, "ConsistencyModelPipeline", "consistency")

    run = evaluate.read_run(trained("knn"))
    assert run.pipeline_class == "ConsistencyModelPipeline"
    assert evaluate.resolve_sampler(run, None).name == "consistency"
    assert [c.step for c in evaluate.find_checkpoints(run)] == [35, 40]
    images = {}
    for steps in (1, 2):
        options = evaluate.SamplingOptions(5, steps, seed=3, batch_size=3, progress=False)
        images[steps] = sample_consistency(run, run.run_dir / "checkpoint-40" / "unet_ema", options)
        assert images[steps].shape == (5, 1, 8, 8) and float(images[steps].abs().max()) <= 1.0
        again = sample_consistency(run, run.run_dir / "checkpoint-40" / "unet_ema", options)
        assert torch.equal(images[steps], again)  # the same seed, the same samples
    assert not torch.equal(images[1], images[2])
    with pytest.raises(ValueError, match="num_inference_steps must be at most the run's 1281 noise levels"):
        sample_consistency(run, run.run_dir / "unet", evaluate.SamplingOptions(4, 5000, progress=False))

    class MeanIntensity:  # a real (if crude) statistic: the metric plumbing is not what is tested here
        name = "mean_intensity"

        def check_run(self, run):
            pass

        def score(self, images):
            return float(images.mean())

        def anchors(self, resolution, num_channels, num_samples):
            return {}

        def describe(self):
            return {"metric": self.name}

    results = evaluate.evaluate_runs(
        [trained("knn")], metrics=[MeanIntensity()], num_inference_steps=1, num_samples=4, progress=False
    )
    assert [(row["step"], row["sampler"]) for row in results.rows] == [(35, "consistency"), (40, "consistency")]


# --------------------------------------------------------------------------------------------------
# Reliability: kill and resume, two processes
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_killed_run_resumes_and_finishes_exactly_as_an_uninterrupted_one(tmp_path, trained):
    output_dir = tmp_path / "out"
    command = _command(output_dir, "knn")
    process = subprocess.Popen(
        command, env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO
    )
    try:
        deadline = time.monotonic() + 120
        while not list_checkpoints(output_dir) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (output_dir / "model_index.json").exists()
    killed_at = list_checkpoints(output_dir)[-1][0]
    assert killed_at < 40

    result = _run([*command, "--resume_from_checkpoint", "latest"])
    assert "Resuming from checkpoint" in result.stderr + result.stdout
    assert [int(s) for s in _log_column(output_dir, "step")] == list(range(1, 41))  # every step exactly once
    # The EMA teacher, the EMA weights, the KNN generator, the RNG, the curriculum and the data order of every
    # epoch were restored: the resumed run is the uninterrupted run, step for step and bit for bit.
    reference = trained("knn")
    for column in ("batch_hash", "noise_hash", "loss", "assign_distance_after"):
        assert _log_column(output_dir, column) == _log_column(reference, column), column
    resumed = load_file(output_dir / "unet" / "diffusion_pytorch_model.safetensors")
    uninterrupted = load_file(reference / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_together_with_global_assignment(tmp_path):
    output_dir = tmp_path / "out"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(SCRIPT), "--output_dir", str(output_dir), *TINY, "--max_train_steps", "3",
        "--assignment", "linear", "--assignment_scope", "global", "--checkpointing_steps", "2",
    ]  # fmt: skip
    _run(command, timeout=240)
    config = json.loads((output_dir / "training_config.json").read_text())
    assert config["num_processes"] == 2 and config["assignment_scope"] == "global" and config["global_step"] == 3
    assert (output_dir / "model_index.json").is_file()
    assert sorted(p.name for p in (output_dir / "checkpoint-2").glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    rows = read_train_log(output_dir / "train_log.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(float(r["assign_distance_after"]) < float(r["assign_distance_before"]) for r in rows)


# --------------------------------------------------------------------------------------------------
# Bad input: clear errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--assignment", "hungarian"], "argument --assignment: invalid choice: 'hungarian'"),
        (["--prediction_type", "epsilon"], "argument --prediction_type: invalid choice: 'epsilon'"),
        (["--optimizer_type", "sgd"], "argument --optimizer_type: invalid choice: 'sgd'"),
        (["--discretization_s_0", "2000"], "discretization_s_0 must not exceed discretization_s_1"),
        (["--discretization_s_0", "0"], "argument --discretization_s_0: expected an integer >= 1, got '0'"),
        (["--sigma_min", "80", "--sigma_max", "1"], "sigma_min must be smaller than sigma_max"),
        (["--sigma_min", "0"], "argument --sigma_min: expected a number > 0, got '0'"),
        (["--huber_c", "0"], "argument --huber_c: expected a number > 0, got '0'"),
        (["--huber_c", "-0.1"], "argument --huber_c: expected a number > 0, got '-0.1'"),
        (["--p_std", "0"], "argument --p_std: expected a number > 0, got '0'"),
        (["--p_mean", "60", "--p_std", "0.5"], "put no probability on the noise levels"),
        (["--skip_steps", "11"], "skip_steps must be at most discretization_s_0"),
        (["--teacher_ema_decay", "1"], "argument --teacher_ema_decay: expected a number in [0, 1), got '1'"),
        (["--ema_min_decay", "0.99", "--ema_max_decay", "0.9"], "--ema_min_decay 0.99 must not exceed"),
        (["--num_classes", "10"], "--num_classes and --class_embed_type need --class_conditional"),
        (["--eval_num_inference_steps", "1,two"], "--eval_num_inference_steps must be integers"),
        (["--unet_block_out_channels", "8,0"], "--unet_block_out_channels must be positive integers"),
    ],
)
def test_bad_flags_are_rejected_with_a_clear_message(script, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_programmatic_arguments_are_checked_too(script, fresh_accelerate_state):
    args = script.parse_args([])
    args.sigma_max = 0.001  # set after parsing: main() checks again
    with pytest.raises(ValueError, match="sigma_min must be smaller than sigma_max"):
        script.main(args)


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--class_conditional", "--train_data_dir", "{images}", "--train_batch_size", "2"],
            "--class_label_column 'label' is not a column",
        ),
        (["--class_conditional", "--num_classes", "5"], "--num_classes 5 is too small"),
        (["--resolution", "10"], "--resolution 10 cannot be taken by the UNet"),
        (["--train_batch_size", "64", "--max_train_samples", "10"], "needs at least 64 training examples"),
        (["--resume_from_checkpoint", "checkpoint-7"], "neither 'latest' nor an existing checkpoint"),
        (["--model_config_name_or_path", "./missing/unet.json"], "does not exist"),
    ],
)
def test_bad_data_or_model_input_gives_a_clear_error(script, tmp_path, fresh_accelerate_state, flags, message):
    images = tmp_path / "images"
    images.mkdir()
    for index in range(4):
        Image.new("RGB", (12, 12), (index * 40, 0, 0)).save(images / f"{index}.png")
    flags = [f.format(images=images) for f in flags]
    args = script.parse_args(["--output_dir", str(tmp_path / "out"), "--unet_block_out_channels", "8,16,16", *flags])
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        script.main(args)


def test_defaults_follow_the_example_and_the_dataset(script):
    args = script.parse_args([])
    assert args.resolution == 16 and args.assignment == "linear" and args.prediction_type == "sample"
    assert (args.sigma_min, args.sigma_max, args.rho, args.p_mean, args.p_std) == (0.002, 80.0, 7.0, -1.1, 2.0)
    assert (args.discretization_s_0, args.discretization_s_1, args.skip_steps) == (10, 1280, 1)
    assert (args.huber_c, args.teacher_ema_decay, args.use_ema) == (None, 0.0, False)
    assert script.parse_args(["--dataset_name", "cifar10"]).resolution == 64
    # The example's flag names are accepted as aliases.
    aliased = script.parse_args(
        ["--dataset_image_column_name", "img", "--num_train_epochs", "3", "--report_to", "wandb"]
    )
    assert (aliased.image_column, aliased.num_epochs, aliased.logger) == ("img", 3, "wandb")
    assert script.epoch_seed(0, 1) == script.epoch_seed(0, 1) != script.epoch_seed(1, 0)
