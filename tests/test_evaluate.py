"""Sample-quality metrics and the checkpoint evaluator, offline.

The Fréchet distance is checked against closed forms; the digits classifier is trained once into a
temporary cache and must reach its stated accuracy; the evaluator runs on run folders laid out as the
training scripts write them, with tiny UNets saved by ``save_pretrained``.
"""

from __future__ import annotations

import ast
import csv
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from conftest import run_command
from immiscible_diffusers import evaluate
from immiscible_diffusers.evaluate import (
    DigitsFrechetMetric,
    RunInfo,
    SamplingOptions,
    evaluate_runs,
    find_checkpoints,
    read_run,
    resolve_sampler,
    write_results,
)
from immiscible_diffusers.metrics import (
    DIGITS_CLASSIFIER_MIN_ACCURACY,
    DigitsClassifierConfig,
    DigitsFeatureSpace,
    GaussianStatistics,
    InceptionFeatureSpace,
    digits_split,
    frechet_distance,
    frechet_distance_between,
    real_digits,
    to_digits_classifier_input,
    wasserstein2,
)

# --------------------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------------------


def test_frechet_distance_equals_the_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    s1, s2 = rng.uniform(0.1, 3.0, size=16), rng.uniform(0.1, 3.0, size=16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2.0 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_equals_the_closed_form_for_scaled_full_covariances():
    # For sigma2 = c * sigma1: Tr((sigma1 sigma2)^(1/2)) = sqrt(c) Tr(sigma1), with any (non-diagonal) sigma1.
    rng = np.random.default_rng(1)
    a = rng.normal(size=(12, 12))
    sigma1 = a @ a.T + 0.1 * np.eye(12)
    c = 2.5
    mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
    expected = np.sum((mu1 - mu2) ** 2) + (1 + c - 2 * math.sqrt(c)) * np.trace(sigma1)
    assert frechet_distance(mu1, sigma1, mu2, c * sigma1) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_agrees_with_the_scipy_sqrtm_formula():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(10, 10)), rng.normal(size=(10, 10))
    sigma1, sigma2 = a @ a.T + np.eye(10), b @ b.T + np.eye(10)
    mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    reference = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * covmean)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(reference, rel=1e-8)


def test_identical_sample_sets_give_zero_even_with_a_singular_covariance():
    features = np.random.default_rng(3).normal(size=(20, 64))  # 20 samples in 64-d: rank-deficient covariance
    stats = GaussianStatistics.from_features(features)
    assert frechet_distance_between(stats, GaussianStatistics.from_features(features.copy())) < 1e-8


def test_frechet_distance_of_two_samples_of_one_gaussian_is_small():
    rng = np.random.default_rng(4)
    first = GaussianStatistics.from_features(rng.normal(size=(20000, 4)))
    second = GaussianStatistics.from_features(rng.normal(size=(20000, 4)))
    shifted = GaussianStatistics.from_features(rng.normal(size=(20000, 4)) + 1.0)
    assert frechet_distance_between(first, second) < 0.01
    assert frechet_distance_between(first, shifted) == pytest.approx(4.0, rel=0.05)


def test_frechet_distance_rejects_mismatched_or_invalid_input():
    with pytest.raises(ValueError, match="same length"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="sigma2 must have shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.array([np.nan, 0.0]), np.eye(2), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="N >= 2"):
        GaussianStatistics.from_features(np.zeros((1, 3)))


def test_statistics_round_trip_through_npz_in_pytorch_fid_layout(tmp_path):
    stats = GaussianStatistics.from_features(np.random.default_rng(5).normal(size=(50, 6)))
    path = stats.save(tmp_path / "stats.npz")
    with np.load(path) as data:
        assert {"mu", "sigma"} <= set(data)
    loaded = GaussianStatistics.load(path)
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert loaded.count == 50
    np.savez(tmp_path / "bad.npz", mean=stats.mu)
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        GaussianStatistics.load(tmp_path / "bad.npz")


def test_wasserstein2_is_exact_for_a_translation():
    points = torch.randn(200, 2, generator=torch.Generator().manual_seed(0))
    shift = torch.tensor([0.3, -0.4])
    assert wasserstein2(points, points + shift) == pytest.approx(0.5, abs=1e-6)  # float32 points
    assert wasserstein2(points, points[torch.randperm(200)]) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="same shape"):
        wasserstein2(points, points[:10])


# --------------------------------------------------------------------------------------------------
# Digits classifier
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_space(tmp_path_factory):
    return DigitsFeatureSpace.load(cache_dir=tmp_path_factory.mktemp("classifier_cache"), progress=False)


def test_digits_classifier_reaches_its_stated_accuracy(digits_space):
    assert digits_space.test_accuracy >= DIGITS_CLASSIFIER_MIN_ACCURACY
    # Measured 0.9889 with the default configuration (899 held-out digits).
    assert digits_space.test_accuracy >= 0.975


def test_digits_classifier_is_cached_by_its_configuration(digits_space, monkeypatch):
    assert digits_space.cache_path.is_file()
    monkeypatch.setattr(
        "immiscible_diffusers.metrics.train_digits_classifier", lambda *a, **k: pytest.fail("retrained despite the cache")
    )
    cached = DigitsFeatureSpace.load(cache_dir=digits_space.cache_path.parent)
    assert cached.test_accuracy == digits_space.test_accuracy
    for name, tensor in digits_space.model.state_dict().items():
        torch.testing.assert_close(cached.model.state_dict()[name], tensor, rtol=0, atol=0)
    other = DigitsClassifierConfig(train_seed=1)
    assert other.cache_key() != DigitsClassifierConfig().cache_key()


def test_digits_split_is_disjoint_and_covers_the_dataset():
    split = digits_split()
    sets = [set(split.classifier_train), set(split.reference), set(split.floor)]
    assert sum(len(s) for s in sets) == 1797 == len(set.union(*sets))
    assert len(split.reference) >= 440 and len(split.floor) >= 440
    np.testing.assert_array_equal(split.reference, digits_split().reference)  # seeded


def test_images_of_any_size_and_channels_become_8x8_grayscale():
    base = torch.rand(3, 1, 8, 8) * 2 - 1
    upsampled = base.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3).expand(-1, 3, -1, -1)
    converted = to_digits_classifier_input(upsampled)
    assert converted.shape == (3, 1, 8, 8)
    torch.testing.assert_close(converted, base)
    assert to_digits_classifier_input(torch.full((1, 1, 16, 16), 5.0)).max() == 1.0
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        to_digits_classifier_input(torch.zeros(8, 8))


def test_digits_metric_anchors_bracket_real_data(digits_space):
    metric = DigitsFrechetMetric(digits_space)
    anchors = metric.anchors(resolution=16, num_channels=1, num_samples=450)
    floor, ceiling = anchors["floor"][0], anchors["ceiling"][0]
    assert anchors["floor"][1] == 450
    assert 0 < floor < 10 < 100 < ceiling
    # The reference digits scored against their own statistics: ~0.
    images, _ = real_digits(16, 1)
    assert metric.score(images[digits_space.split.reference]) < 1e-6


# --------------------------------------------------------------------------------------------------
# Inception FID: clear errors, no download, no fallback
# --------------------------------------------------------------------------------------------------


def test_inception_fid_without_weights_names_the_flag_and_the_file():
    with pytest.raises(ValueError, match=r"--inception_weights.*weights-inception-2015-12-05-6726825d\.pth"):
        InceptionFeatureSpace(None)


def test_inception_fid_with_a_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="is not a file"):
        InceptionFeatureSpace(tmp_path / "missing.pth")


def test_inception_fid_without_torch_fidelity_says_what_to_install(tmp_path, monkeypatch):
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"not read before the import")
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # makes `import torch_fidelity...` fail
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    with pytest.raises(ImportError, match=r"immiscible-diffusers\[eval\]"):
        InceptionFeatureSpace(weights)


def test_fid_metric_needs_a_reference(tmp_path):
    with pytest.raises(ValueError, match="--fid_reference"):
        evaluate.build_metric("fid", inception_weights=None, reference=None)


# --------------------------------------------------------------------------------------------------
# The evaluator on run folders
# --------------------------------------------------------------------------------------------------


def tiny_unet(seed: int) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8,
    )


def make_run(root: Path, name: str = "run", dataset: str = "sklearn-digits", ema_at: tuple[int, ...] = (20,)) -> Path:
    """A run folder as train_unconditional.py writes it: checkpoints 10 and 20, the final pipeline, configs, log."""
    run = root / name
    for step in (10, 20):
        tiny_unet(step).save_pretrained(run / f"checkpoint-{step}" / "unet")
        if step in ema_at:
            tiny_unet(step + 1).save_pretrained(run / f"checkpoint-{step}" / "unet_ema")
    scheduler = DDPMScheduler(num_train_timesteps=100)
    DDPMPipeline(unet=tiny_unet(20), scheduler=scheduler).save_pretrained(run)
    config = {"dataset": dataset, "assignment": "linear", "seed": 3, "global_step": 30, "use_ema": False,
              "script": "train_unconditional.py"}
    (run / "training_config.json").write_text(json.dumps(config))
    with open(run / "train_log.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "loss"])
        writer.writerows([[step, 1.0 / step] for step in range(1, 31)])
    return run


def test_checkpoints_prefer_ema_weights_and_include_the_final_model(tmp_path):
    run = read_run(make_run(tmp_path))
    found = find_checkpoints(run)
    assert [(c.step, c.weights, c.source) for c in found] == [(10, "raw", "checkpoint-10"), (20, "ema", "checkpoint-20"), (30, "raw", "final")]
    raw = find_checkpoints(run, use_ema=False, include_final=False)
    assert [(c.step, c.model_dir.name) for c in raw] == [(10, "unet"), (20, "unet")]


def test_sampler_registry_picks_by_pipeline_class(tmp_path):
    run = read_run(make_run(tmp_path))
    assert run.pipeline_class == "DDPMPipeline"
    assert resolve_sampler(run, None).name == "ddim"
    assert resolve_sampler(run, "ddpm").name == "ddpm"
    with pytest.raises(ValueError, match="--scheduler must be one of"):
        resolve_sampler(run, "euler")
    for pipeline_class, sampler in (("ConsistencyModelPipeline", "consistency"), ("FlowMatchingPipeline", "flow_euler")):
        assert resolve_sampler(RunInfo(tmp_path, "run", pipeline_class, {}, {}), None).name == sampler
    alien = RunInfo(tmp_path, "alien", "StableDiffusionPipeline", {}, {})
    with pytest.raises(ValueError, match="no default sampler"):
        resolve_sampler(alien, None)
    with pytest.raises(ValueError, match="holds a StableDiffusionPipeline"):
        resolve_sampler(alien, "ddim")


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_samplers_start_from_the_same_noise_for_the_same_seed(tmp_path, sampler):
    run = read_run(make_run(tmp_path))
    sample = evaluate.SAMPLERS[sampler].sample
    options = SamplingOptions(num_images=5, num_inference_steps=3, seed=7, batch_size=2, progress=False)
    first = sample(run, run.run_dir / "checkpoint-10" / "unet", options)
    again = sample(run, run.run_dir / "checkpoint-10" / "unet", options)
    other = sample(run, run.run_dir / "checkpoint-10" / "unet", SamplingOptions(5, 3, seed=8, batch_size=2, progress=False))
    assert first.shape == (5, 1, 8, 8) and first.min() >= -1 and first.max() <= 1
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)


def test_evaluate_runs_writes_csv_markdown_plot_and_card_metrics(tmp_path, digits_space):
    from immiscible_diffusers.model_card import read_card_metadata, write_model_card

    first = make_run(tmp_path, "first")
    second = tmp_path / "second"
    shutil.copytree(first, second)
    metadata = {key: 1 for key in ("knn_k", "train_batch_size", "resolution", "global_step", "seed")}
    metadata |= {"script": "train_unconditional.py", "assignment": "linear", "assignment_distance": "l2",
                 "assignment_dtype": "float32", "assignment_scope": "local", "prediction_type": "epsilon",
                 "dataset": "sklearn-digits"}
    write_model_card(first, title="t", metadata=metadata, pipeline_tag="unconditional-image-generation", usage_code="x")

    results = evaluate_runs(
        [first, second], metrics=[DigitsFrechetMetric(digits_space)], num_samples=24, num_inference_steps=2,
        batch_size=16, progress=False,
    )
    assert {(r["run"], r["step"]) for r in results.rows} == {(n, s) for n in ("first", "second") for s in (10, 20, 30)}
    by_key = {(r["run"], r["step"]): r for r in results.rows}
    for step in (10, 20, 30):  # the same weights and the same starting noise: the same score
        assert by_key[("first", step)]["value"] == by_key[("second", step)]["value"]
    assert by_key[("first", 20)]["weights"] == "ema"
    assert by_key[("first", 20)]["train_loss"] == pytest.approx(np.mean([1.0 / s for s in range(1, 21)]))
    assert {a["anchor"] for a in results.anchors} == {"floor", "ceiling"}

    paths = write_results(results, tmp_path / "eval")
    with open(paths["csv"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 and rows[0]["metric"] == "digits_fd"
    markdown = paths["markdown"].read_text()
    assert "| step | NFE | first | second |" in markdown and "floor" in markdown and "0.98" in markdown
    assert paths["plot"].stat().st_size > 10_000

    evaluate.add_metrics_to_model_cards(results, [first, second])
    metrics = read_card_metadata(first)["immiscible_diffusers"]["metrics"]
    assert metrics["digits_fd"]["step"] == 30
    assert metrics["digits_fd"]["value"] == pytest.approx(by_key[("first", 30)]["value"], abs=1e-4)
    # The Hub shows evaluation results only from model-index: the same score is there.
    from huggingface_hub import ModelCard

    card_data = ModelCard.load(first / "README.md").data
    (result,) = card_data.eval_results
    assert result.metric_type == "digits_fd" and result.metric_value == metrics["digits_fd"]["value"]
    assert result.task_type == "unconditional-image-generation" and result.dataset_type == "sklearn-digits"
    assert result.metric_args == {"step": 30, "sampler": "ddim", "num_inference_steps": 2, "num_samples": 24}
    assert card_data.model_name == "t"
    assert not (second / "README.md").exists()


def test_evaluate_runs_rejects_bad_input(tmp_path, digits_space):
    run = make_run(tmp_path, dataset="cifar10")
    with pytest.raises(ValueError, match="needs runs trained on the bundled digits"):
        evaluate_runs([run], metrics=[DigitsFrechetMetric(digits_space)], progress=False)
    with pytest.raises(ValueError, match="num_samples must be an integer >= 2"):
        evaluate_runs([run], num_samples=1)
    with pytest.raises(ValueError, match="does not exist"):
        evaluate_runs([tmp_path / "nowhere"])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "training_config.json").write_text(json.dumps({"dataset": "sklearn-digits", "script": "train_unconditional.py"}))
    with pytest.raises(ValueError, match="no checkpoint to evaluate"):
        evaluate_runs([empty], metrics=[DigitsFrechetMetric(digits_space)], progress=False)


def test_command_line_evaluates_a_run(tmp_path, digits_space, monkeypatch, capsys):
    monkeypatch.setenv("IMMISCIBLE_CACHE", str(digits_space.cache_path.parent))
    run = make_run(tmp_path)
    out = tmp_path / "eval"
    evaluate.main([str(run), "--output_dir", str(out), "--num_samples", "16", "--num_inference_steps", "2", "--steps", "20"])
    assert "| 20 |" in capsys.readouterr().out
    summary = json.loads((out / "evaluation.json").read_text())
    assert [row["step"] for row in summary["rows"]] == [20]
    assert summary["metrics"][0]["classifier_test_accuracy"] == digits_space.test_accuracy


# --------------------------------------------------------------------------------------------------
# The NFE axis: several step counts per checkpoint, and few-step samplers that spend every step
# --------------------------------------------------------------------------------------------------


def test_evaluate_runs_scores_every_checkpoint_at_every_nfe(tmp_path, digits_space):
    from immiscible_diffusers.model_card import read_card_metadata, write_model_card

    run = make_run(tmp_path)
    metadata = {key: 1 for key in ("knn_k", "train_batch_size", "resolution", "global_step", "seed")}
    metadata |= {"script": "train_unconditional.py", "assignment": "linear", "assignment_distance": "l2",
                 "assignment_dtype": "float32", "assignment_scope": "local", "prediction_type": "epsilon",
                 "dataset": "sklearn-digits"}
    write_model_card(run, title="t", metadata=metadata, pipeline_tag="unconditional-image-generation", usage_code="x")
    metric = DigitsFrechetMetric(digits_space)
    results = evaluate_runs([run], metrics=[metric], num_samples=24, num_inference_steps=[1, 2, 4], batch_size=16, progress=False)
    assert sorted((r["step"], r["nfe"]) for r in results.rows) == [(s, n) for s in (10, 20, 30) for n in (1, 2, 4)]
    assert results.nfes() == [1, 2, 4]
    by_key = {(r["step"], r["nfe"]): r["value"] for r in results.rows}
    assert len({by_key[(30, n)] for n in (1, 2, 4)}) == 3  # each step count gives other samples
    # Every NFE starts from the same noise: a single-NFE evaluation reproduces the sweep's score.
    single = evaluate_runs([run], metrics=[metric], num_samples=24, num_inference_steps=2, batch_size=16, steps=[20], progress=False)
    assert single.rows[0]["value"] == by_key[(20, 2)]
    with pytest.raises(ValueError, match="several NFEs"):
        results.curves("digits_fd")
    assert results.curves("digits_fd", 4)["run"] == [(s, by_key[(s, 4)]) for s in (10, 20, 30)]
    assert results.final_by_nfe("digits_fd")["run"] == [(n, by_key[(30, n)]) for n in (1, 2, 4)]

    paths = write_results(results, tmp_path / "eval")
    with open(paths["csv"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 9 and {row["nfe"] for row in rows} == {"1", "2", "4"}
    markdown = paths["markdown"].read_text()
    assert "Quality vs NFE" in markdown and "| step | NFE | run |" in markdown and "| 30 | 4 |" in markdown
    assert paths["plot"].stat().st_size > 10_000
    evaluate.add_metrics_to_model_cards(results, [run])
    card = read_card_metadata(run)["immiscible_diffusers"]["metrics"]["digits_fd"]
    assert card["num_inference_steps"] == 4 and card["value"] == pytest.approx(by_key[(30, 4)], abs=1e-4)
    assert card["by_nfe"] == {n: pytest.approx(by_key[(30, n)], abs=1e-4) for n in (1, 2, 4)}
    with pytest.raises(ValueError, match="must be distinct"):
        evaluate_runs([run], metrics=[metric], num_inference_steps=[2, 2], progress=False)


def test_command_line_takes_several_step_counts_and_rejects_bad_ones(tmp_path, digits_space, monkeypatch, capsys):
    monkeypatch.setenv("IMMISCIBLE_CACHE", str(digits_space.cache_path.parent))
    run = make_run(tmp_path)
    out = tmp_path / "eval"
    evaluate.main([str(run), "--output_dir", str(out), "--num_samples", "16", "--num_inference_steps", "1", "2", "--steps", "20"])
    summary = json.loads((out / "evaluation.json").read_text())
    assert [(row["step"], row["nfe"]) for row in summary["rows"]] == [(20, 1), (20, 2)]
    for bad in (["0", "2"], ["2", "2"]):
        with pytest.raises(SystemExit) as excinfo:
            evaluate.parse_args([str(run), "--output_dir", str(out), "--num_inference_steps", *bad])
        assert excinfo.value.code == 2
    assert "--num_inference_steps must be distinct positive integers" in capsys.readouterr().err


def test_ddim_sampler_starts_from_the_last_training_timestep(tmp_path):
    """trailing spacing: 1-step DDIM is the x0 prediction at t = T-1 (diffusers' default "leading" uses t = 0)."""
    run = read_run(make_run(tmp_path))
    unet = UNet2DModel.from_pretrained(run.run_dir / "checkpoint-10" / "unet").eval()
    images = evaluate.sample_ddim(run, run.run_dir / "checkpoint-10" / "unet", SamplingOptions(4, 1, seed=5, progress=False))
    noise = torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(5))
    alpha_bar = DDPMScheduler(num_train_timesteps=100).alphas_cumprod[99]
    with torch.no_grad():
        epsilon = unet(noise, torch.full((4,), 99)).sample
    expected = ((noise - (1 - alpha_bar).sqrt() * epsilon) / alpha_bar.sqrt()).clamp(-1, 1)
    torch.testing.assert_close(images, expected, atol=1e-4, rtol=0)
    previous = None
    for n in (1, 2, 3, 4):
        current = evaluate.sample_ddim(run, run.run_dir / "checkpoint-10" / "unet", SamplingOptions(4, n, seed=5, progress=False))
        if previous is not None:
            assert (current - previous).abs().max() > 0.05, f"{n} steps give the samples of {n - 1}"
        previous = current


def test_flow_pipeline_spends_every_step():
    """Uniform sigmas: 2-step samples differ from 1-step ones (the stock spacing's 2nd step covers sigma 0.001 -> 0)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from immiscible_diffusers.pipeline_flow_matching import FlowMatchingPipeline, uniform_sigma_schedule

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    assert uniform_sigma_schedule(scheduler, 4) == {"sigmas": [1.0, 0.75, 0.5, 0.25]}
    pipeline = FlowMatchingPipeline(unet=tiny_unet(0), scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    samples = {
        n: pipeline(batch_size=4, num_inference_steps=n, output_type="pt", generator=torch.Generator().manual_seed(1)).images
        for n in (1, 2, 3, 4)
    }
    assert scheduler.sigmas.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    for n in (2, 3, 4):
        assert (samples[n] - samples[n - 1]).abs().max() > 0.01, f"{n} steps give the samples of {n - 1}"
    # The control: the stock spacing (sigmas 1, 0.001, 0) gives 2-step samples within 0.01 of 1-step ones.
    stock = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    stock.set_timesteps(2)
    noise = torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        one = noise - pipeline.unet(noise, torch.full((4,), 1000.0)).sample
        two = one + (0.0 - stock.sigmas[1]) * pipeline.unet(one, stock.timesteps[1].expand(4)).sample
    assert (two - one).abs().max() < 0.01


def test_consistency_sampler_spends_every_step(tmp_path):
    from diffusers import CMStochasticIterativeScheduler

    CMStochasticIterativeScheduler(num_train_timesteps=41).save_pretrained(tmp_path / "scheduler")
    tiny_unet(0).save_pretrained(tmp_path / "unet")
    run = RunInfo(tmp_path, "cm", "ConsistencyModelPipeline", {}, {})
    sample = evaluate.SAMPLERS["consistency"].sample
    samples = {n: sample(run, tmp_path / "unet", SamplingOptions(4, n, seed=2, progress=False)) for n in (1, 2, 3, 4)}
    for n in (2, 3, 4):
        assert (samples[n] - samples[n - 1]).abs().max() > 0.05, f"{n} steps give the samples of {n - 1}"


# --------------------------------------------------------------------------------------------------
# One error path and no import cycles
# --------------------------------------------------------------------------------------------------


def _evaluate_command(*flags: str, **env: str):
    return run_command([sys.executable, "-m", "immiscible_diffusers.evaluate", *flags], timeout=180, check=False, **env)


def _assert_one_error_line(result, starts_with: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(starts_with), result.stderr[-3000:]


def test_evaluator_user_errors_are_one_line_with_exit_code_2(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me\n")
    _assert_one_error_line(_evaluate_command(str(tmp_path / "missing"), "--output_dir", str(tmp_path / "eval")),
                           "error: run folder")  # fmt: skip
    _assert_one_error_line(_evaluate_command(str(run_dir), "--output_dir", str(a_file)), "error: --output_dir")
    assert a_file.read_text() == "keep me\n"
    # The traceback is there for bug reports, on request.
    debug = _evaluate_command(str(run_dir), "--output_dir", str(a_file), IMMISCIBLE_DEBUG="1")
    assert debug.returncode == 1 and "Traceback" in debug.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where cuda is not usable")
def test_evaluator_refuses_an_unusable_device_in_one_line(tmp_path):
    (tmp_path / "run").mkdir()
    result = _evaluate_command(str(tmp_path / "run"), "--output_dir", str(tmp_path / "eval"), "--device", "cuda")
    _assert_one_error_line(result, "error: --device 'cuda' is not usable here")
    with pytest.raises(ValueError, match="--device"):
        evaluate.resolve_device("cuda")
    assert evaluate.resolve_device(None) == "cpu" and evaluate.resolve_device("cpu") == "cpu"


def test_no_package_module_imports_the_evaluator():
    """The recipe samplers and the evaluator share ``runs``; nothing in the package imports ``evaluate`` back."""
    package = Path(evaluate.__file__).parent
    for path in package.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [alias.name for alias in node.names]
                assert not any(name.split(".")[-1] == "evaluate" for name in names), f"{path.name} imports evaluate"


def test_hub_imports_no_unet():
    code = "import sys, immiscible_diffusers.hub; print(sorted(m for m in sys.modules if 'unet_2d' in m))"
    result = run_command([sys.executable, "-c", code], timeout=180)
    assert result.stdout.strip() == "[]"
