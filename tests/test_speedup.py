"""benchmarks/speedup.py: the steps-to-target arithmetic on synthetic curves, and a tiny end-to-end run."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speedup.py"


@pytest.fixture(scope="module")
def speedup():
    spec = importlib.util.spec_from_file_location("benchmark_speedup", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def linear_curve(start: float, slope: float, steps=range(100, 1001, 100)) -> list[tuple[int, float]]:
    return [(s, start - slope * s) for s in steps]


def test_first_step_reaching_interpolates_between_checkpoints(speedup):
    curve = [(100, 50.0), (200, 30.0), (300, 20.0)]
    assert speedup.first_step_reaching(curve, 40.0) == pytest.approx(150.0)
    assert speedup.first_step_reaching(curve, 20.0) == pytest.approx(300.0)
    assert speedup.first_step_reaching(curve, 60.0) == 100.0  # already there at the first checkpoint
    assert speedup.first_step_reaching(curve, 10.0) is None
    # Not monotonic: the first crossing counts.
    assert speedup.first_step_reaching([(1, 10.0), (2, 4.0), (3, 8.0), (4, 2.0)], 5.0) == pytest.approx(1 + 5 / 6)


def test_a_method_twice_as_fast_has_ratio_two(speedup):
    # Each seed's vanilla curve falls linearly at its own rate; the method's falls twice as fast.
    slopes = {0: 0.45, 1: 0.5, 2: 0.55}
    curves = {
        "none": {seed: linear_curve(1000.0, slope) for seed, slope in slopes.items()},
        "linear": {seed: linear_curve(1000.0, 2 * slope) for seed, slope in slopes.items()},
    }
    rows = speedup.steps_to_target(curves, [0.5, 1.0], max_steps=1000)
    by_key = {(r["method"], r["target_fraction"]): r for r in rows}
    for fraction in (0.5, 1.0):
        row = by_key[("linear", fraction)]
        assert row["target_value"] == pytest.approx(1000.0 - 500.0 * fraction)
        assert row["vanilla_steps"] == pytest.approx(1000 * fraction)
        assert row["method_steps"] == pytest.approx(500 * fraction)
        assert row["ratio"].kind == "=" and row["ratio"].value == pytest.approx(2.0)
        assert by_key[("none", fraction)]["ratio"].value == pytest.approx(1.0)
    # At q(0.5) every seed pair reaches the target: each ratio is exactly 2.
    half = by_key[("linear", 0.5)]
    assert [r.kind for r in half["per_seed_ratios"]] == ["="] * 3
    assert [r.value for r in half["per_seed_ratios"]] == pytest.approx([2.0, 2.0, 2.0])
    # At q(1) the slowest vanilla seed never gets there within 1,000 steps: a lower bound, 1000 / 555.6.
    final = by_key[("linear", 1.0)]
    assert [str(r) for r in final["per_seed_ratios"]] == [">1.80", "2.00", "2.00"]
    assert final["seeds_reached"] == 3


def test_never_reaching_the_target_is_a_bound_not_a_number(speedup):
    curves = {
        "none": {0: linear_curve(1000.0, 0.5), 1: linear_curve(1000.0, 0.5)},
        # Seed 0 plateaus above vanilla's final quality; seed 1 gets there in 833 steps; their mean never does.
        "knn": {0: [(s, max(900.0, 1000.0 - s)) for s in range(100, 1001, 100)], 1: linear_curve(1000.0, 0.6)},
    }
    row = next(r for r in speedup.steps_to_target(curves, [1.0], 1000) if r["method"] == "knn")
    assert [str(r) for r in row["per_seed_ratios"]] == ["<1.00", "1.20"]
    assert row["method_steps"] is None and str(row["ratio"]) == "<1.00"
    assert row["seeds_reached"] == 1
    assert str(speedup.steps_ratio(None, 250.0, 1000)) == ">4.00"
    assert str(speedup.steps_ratio(None, None, 1000)) == "n/a"


def test_targets_need_vanilla_and_a_located_step(speedup):
    with pytest.raises(ValueError, match="vanilla"):
        speedup.steps_to_target({"linear": {0: linear_curve(10.0, 0.001)}}, [1.0], 1000)
    with pytest.raises(ValueError, match="outside the evaluated steps"):
        speedup.steps_to_target({"none": {0: linear_curve(10.0, 0.001)}}, [0.05], 1000)


def test_curve_statistics_across_seeds(speedup):
    stats = speedup.curve_statistics({0: [(10, 1.0, 0.5), (20, 3.0, 0.4)], 1: [(10, 3.0, 0.7), (20, 5.0, None)]})
    assert stats[0] == {"step": 10, "mean": 2.0, "std": pytest.approx(2**0.5), "min": 1.0, "max": 3.0, "train_loss": pytest.approx(0.6)}
    assert stats[1]["train_loss"] == pytest.approx(0.4)


def test_bad_options_are_rejected(speedup, tmp_path):
    with pytest.raises(SystemExit):
        speedup.parse_args(["--output_dir", str(tmp_path), "--methods", "linear", "knn"])
    with pytest.raises(SystemExit):
        speedup.parse_args(["--output_dir", str(tmp_path), "--target_fractions", "1.5"])
    with pytest.raises(SystemExit):
        speedup.parse_args(["--output_dir", str(tmp_path), "--nfes", "0", "2"])
    with pytest.raises(SystemExit):
        speedup.parse_args(["--output_dir", str(tmp_path), "--regimes", "toy2d", "--controls_in", "digits8"])
    args = speedup.parse_args(["--output_dir", str(tmp_path), "--regimes", "digits8", "--max_train_steps", "250", "--checkpointing_steps", "100"])
    with pytest.raises(ValueError, match="multiple of --checkpointing_steps"):
        speedup.selected_regimes(args)


def test_every_recipe_has_digits_regimes_and_an_nfe_axis(speedup, tmp_path):
    args = speedup.parse_args(["--output_dir", str(tmp_path)])
    regimes = {r.name: r for r in speedup.selected_regimes(args)}
    assert {r.recipe for r in regimes.values() if r.name.startswith("digits8")} == set(speedup.RECIPES)
    for regime in regimes.values():
        assert regime.nfes[:4] == (1, 2, 4, 8) and regime.nfes[-1] > 8
    # The controls run where the assignment shortens distances most (the toys), not elsewhere by default.
    assert args.controls_in == ["toy2d", "toy2d_flow"]
    assert speedup.regime_methods(regimes["toy2d_flow"], args) == ["none", "linear", "knn", "shuffle", "norm_matched"]
    assert speedup.regime_methods(regimes["digits8_cm"], args) == ["none", "linear", "knn"]
    flags = speedup.training_arguments(regimes["digits8_flow"], "linear", 0, 4, tmp_path)
    assert "--eval_scheduler" not in flags and regimes["digits8_flow"].train_script == "train_flow_matching.py"


def test_final_quality_comparison_needs_a_difference_beyond_the_noise(speedup):
    assert speedup.compare_final([10.0, 10.2, 9.8], [5.0, 5.1, 4.9]) == "better"
    assert speedup.compare_final([10.0, 10.2, 9.8], [15.0, 15.1, 14.9]) == "worse"
    assert speedup.compare_final([10.0, 14.0, 6.0], [9.0, 13.0, 5.0]) == "same"  # within the seed spread
    assert speedup.compare_final([10.0, 10.01, 9.99], [9.8, 9.81, 9.79]) == "same"  # significant but under 5%


@pytest.mark.parametrize("recipe", ["ddpm", "flow"])
def test_toy_samplers_spend_every_step(speedup, recipe):
    torch.manual_seed(0)
    model = speedup.ToyDenoiser()
    samples = {n: speedup.sample_toy(model, recipe, 64, n, seed=3) for n in (1, 2, 3)}
    assert not torch.allclose(samples[1], samples[2], atol=1e-4)
    assert not torch.allclose(samples[2], samples[3], atol=1e-4)
    torch.testing.assert_close(samples[2], speedup.sample_toy(model, recipe, 64, 2, seed=3))


@pytest.mark.slow
def test_quick_mode_runs_end_to_end_on_a_tiny_configuration(speedup, tmp_path, monkeypatch):
    monkeypatch.setenv("IMMISCIBLE_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    args = [
        "--quick", "--output_dir", str(tmp_path / "out"), "--runs_dir", str(tmp_path / "runs"),
        "--regimes", "toy2d", "digits8", "--seeds", "0", "1", "--max_train_steps", "20", "--checkpointing_steps", "10",
        "--num_samples", "48", "--nfes", "1", "3", "--unet_block_out_channels", "8,16", "--no_progress",
    ]
    try:
        report = speedup.main(args)
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "out"
    for name in ("speedup.csv", "speedup_summary.csv", "speedup.md", "speedup_summary.md", "speedup.png", "speedup.json"):
        assert (out / name).is_file(), name
    with open(out / "speedup.csv", newline="") as handle:
        points = list(csv.DictReader(handle))
    # toy2d: 5 methods (with the controls), digits8: 3; x 2 seeds x 2 checkpoints x 2 NFEs
    assert len(points) == (5 + 3) * 2 * 2 * 2
    assert {p["nfe"] for p in points} == {"1", "3"}
    assert {(p["regime"], p["method"]) for p in points} == {
        *(("toy2d", m) for m in ("vanilla", "linear", "knn", "shuffle", "norm-matched")),
        *(("digits8", m) for m in ("vanilla", "linear", "knn")),
    }
    assert report["same_batches"] == "yes"
    toy = next(r for r in report["regimes"] if r["name"] == "toy2d")
    # The shuffle control re-pairs at random (no shorter on average); norm_matched is exactly as close as linear.
    assert abs(toy["distance_reduction"]["shuffle"]) < 0.05
    assert toy["distance_reduction"]["norm_matched"] == pytest.approx(toy["distance_reduction"]["linear"], abs=1e-4)
    digits = next(r for r in report["regimes"] if r["name"] == "digits8")
    assert digits["distance_reduction"]["none"] == 0.0
    assert 0.0 < digits["distance_reduction"]["knn"] < 0.5 and 0.0 < digits["distance_reduction"]["linear"] < 0.5
    assert digits["anchors"]["floor"] < digits["anchors"]["ceiling"]
    markdown = (out / "speedup.md").read_text()
    assert "| digits8 | DDPM (DDIM sampling) | 64 | 3 | linear |" in markdown and "Same batches across methods: yes" in markdown
    summary = json.loads((out / "speedup.json").read_text())
    assert summary["regimes"][0]["by_nfe"]["1"]["targets"][0]["ratio"]  # serialised as text ("1.00", ">1.20", ...)
    assert summary["provenance"]["code_version"] and "benchmarks/speedup.py" in summary["provenance"]["command"]
    assert summary["verdicts"]["digits8"]["nfe3"]["linear"]["verdict"] in ("helps", "hurts", "no clear difference")
    assert len(summary["verdict_lines"]) == 4
    assert "code version" in (out / "speedup_summary.md").read_text()
    assert json.loads((out / "speedup.csv.json").read_text())["provenance"] == summary["provenance"]

    # Run again: finished runs and their evaluations are reused, nothing is retrained.
    run_records = sorted((tmp_path / "runs").glob("digits8/*/speedup_run.json"))
    assert len(run_records) == 6
    before = {p: p.stat().st_mtime_ns for p in run_records}
    try:
        again = speedup.main(args)
    finally:
        torch.set_num_threads(threads)
    assert {p: p.stat().st_mtime_ns for p in run_records} == before
    assert again["regimes"][1]["curves"] == report["regimes"][1]["curves"]
    assert report["reused_runs"] == 0 and again["reused_runs"] == again["total_runs"] == 16
    assert again["regimes"][0]["curves"] == report["regimes"][0]["curves"]
    assert "reused 16 of 16 runs" in (out / "speedup.md").read_text()

    # Other code: nothing is reused (runs are keyed on the code version, not only on the arguments).
    monkeypatch.setattr(speedup, "code_version", lambda: "0123456789abcdef")
    try:
        third = speedup.main([*args, "--regimes", "toy2d", "--seeds", "0"])
    finally:
        torch.set_num_threads(threads)
    assert third["reused_runs"] == 0


@pytest.mark.slow
def test_consistency_and_flow_regimes_run_end_to_end(speedup, tmp_path, monkeypatch):
    """digits8_cm and digits8_flow, tiny, scored at two NFEs."""
    monkeypatch.setenv("IMMISCIBLE_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    args = [
        "--quick", "--output_dir", str(tmp_path / "out"), "--runs_dir", str(tmp_path / "runs"),
        "--regimes", "digits8_cm", "digits8_flow", "--methods", "none", "linear", "--seeds", "0",
        "--max_train_steps", "4", "--checkpointing_steps", "2", "--train_batch_size", "16",
        "--num_samples", "16", "--nfes", "1", "2", "--unet_block_out_channels", "8,16", "--no_progress",
    ]
    regimes = {r.name: r for r in speedup.selected_regimes(speedup.parse_args(args))}
    assert regimes["digits8_flow"].sampler == "flow_euler" and regimes["digits8_cm"].sampler == "consistency"
    for name, script in (("digits8_cm", "train_consistency.py"), ("digits8_flow", "train_flow_matching.py")):
        flags = speedup.training_arguments(regimes[name], "none", 0, 4, tmp_path / "x")
        assert "--eval_scheduler" not in flags and "--ddpm_num_inference_steps" not in flags
        assert regimes[name].train_script == script
    try:
        report = speedup.main(args)
    finally:
        torch.set_num_threads(threads)
    with open(tmp_path / "out" / "speedup.csv", newline="") as handle:
        points = list(csv.DictReader(handle))
    assert {(p["regime"], p["method"]) for p in points} == {
        (r, m) for r in ("digits8_cm", "digits8_flow") for m in ("vanilla", "linear")
    }
    # 2 regimes x 2 methods x 1 seed x 2 checkpoints x 2 NFEs
    assert len(points) == 16 and all(p["value"] not in ("", "nan") for p in points)
    for regime in report["regimes"]:  # the 1- and 2-step samples differ
        curves = regime["curves"]["none"][0]
        assert curves[1] != curves[2]
    assert report["same_batches"] == "yes"


@pytest.mark.slow
def test_sampler_spacings_benchmark_shows_the_stock_flow_spacing_wastes_the_second_step(tmp_path, monkeypatch):
    from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel

    monkeypatch.setenv("IMMISCIBLE_CACHE", str(tmp_path / "cache"))
    spec = importlib.util.spec_from_file_location("speedup_samplers", SCRIPT.with_name("speedup_samplers.py"))
    samplers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(samplers)
    run = tmp_path / "digits8_flow" / "vanilla-seed0"
    torch.manual_seed(0)
    UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8,
    ).save_pretrained(run / "checkpoint-10" / "unet")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000).save_pretrained(run / "checkpoint-10" / "scheduler")
    (run / "training_config.json").write_text(json.dumps({"dataset": "sklearn-digits", "script": "train_flow_matching.py"}))
    report = samplers.main([str(run), "--output_dir", str(tmp_path / "out"), "--nfes", "1", "2", "--num_samples", "32"])
    scores = {row["spacing"]: row["scores"] for row in report["rows"]}
    assert scores["stock"]["1"] == scores["uniform"]["1"]  # one step is the same Euler step either way
    # Stock: the 2nd step integrates sigma 0.001 -> 0 and changes (almost) nothing; uniform: it covers 0.5 -> 0.
    assert abs(scores["stock"]["2"] - scores["stock"]["1"]) < 0.1 * abs(scores["uniform"]["2"] - scores["uniform"]["1"])
    text = (tmp_path / "out" / "speedup_samplers.md").read_text()
    assert "code version" in text and "| digits8_flow/vanilla-seed0 | stock |" in text
