"""training_scripts/demo.py (the main job): its command lines, its summary, and a tiny end-to-end run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from conftest import run_command
from immiscible_diffusers.evaluate import EvaluationResults

SCRIPT = Path(__file__).resolve().parents[1] / "training_scripts" / "demo.py"


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("main_job_demo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_both_runs_differ_only_in_the_assignment(demo, tmp_path):
    for recipe, script in (("flow", "train_flow_matching.py"), ("ddpm", "train_unconditional.py")):
        args = demo.parse_args(["--recipe", recipe, "--nfes", "20", "1", "4"])
        assert args.nfes == [1, 4, 20]
        vanilla = demo.training_command(args, tmp_path / "run", "none")
        immiscible = demo.training_command(args, tmp_path / "run", "linear")
        assert vanilla[1].endswith(script)
        differing = [(a, b) for a, b in zip(vanilla, immiscible) if a != b]
        assert differing == [("none", "linear")] and len(vanilla) == len(immiscible)
        # The training script's own grids use the many-step sampler.
        assert "20" in vanilla[vanilla.index("--num_inference_steps" if recipe == "flow" else "--ddpm_num_inference_steps") + 1]


@pytest.mark.parametrize("bad", [["--nfes", "0"], ["--nfes", "2", "2"], ["--num_eval_samples", "1"], ["--recipe", "cm"]])
def test_bad_options_exit_with_code_2(demo, bad, capsys):
    with pytest.raises(SystemExit) as excinfo:
        demo.parse_args(bad)
    assert excinfo.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_summary_compares_the_runs_at_every_nfe(demo):
    results = EvaluationResults()
    for run, values in (("vanilla", {1: 100.0, 20: 10.0}), ("immiscible", {1: 80.0, 20: 10.2})):
        for step in (10, 20):
            for nfe, value in values.items():
                results.rows.append({"run": run, "step": step, "nfe": nfe, "metric": "digits_fd", "value": value + (20 - step)})
    quality = demo.quality_by_nfe(results, ["vanilla", "immiscible"])
    assert quality["final_step"] == 20
    assert quality["by_nfe"][1]["immiscible_is"] == "better" and quality["by_nfe"][1]["relative_change"] == pytest.approx(-0.2)
    assert quality["by_nfe"][20]["immiscible_is"] == "about the same"
    summary = {
        "provenance": {"command": "python training_scripts/demo.py", "git_commit": "abc", "code_version": "0123", "machine": "m", "date": "d"},
        "recipe": "flow", "resolution": 8, "max_train_steps": 20, "train_batch_size": 64, "seed": 0, "same_batches": True,
        "same_noise_and_timesteps": True, "quality": quality, "num_eval_samples": 450, "wall_seconds": 60.0,
    }
    markdown = demo.summary_markdown(summary)
    assert "code version `0123`" in markdown and "| 1 | 100.00 | 80.00 | -20.0% | better |" in markdown


@pytest.mark.slow
def test_a_tiny_main_job_writes_its_summary_with_provenance(demo, tmp_path, monkeypatch):
    monkeypatch.setenv("IMMISCIBLE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    summary = demo.main([
        "--output_dir", str(out), "--max_train_steps", "4", "--num_checkpoints", "2", "--num_eval_samples", "16",
        "--nfes", "1", "2", "--unet_block_out_channels", "8,16", "--results_dir", str(tmp_path / "results"), "--sequential",
    ])
    assert summary["same_batches"] and summary["same_noise_and_timesteps"]
    assert set(summary["quality"]["by_nfe"]) == {1, 2}
    saved = json.loads((tmp_path / "results" / "main_job.json").read_text())
    assert saved["provenance"]["code_version"] and saved["recipe"] == "flow"
    assert "| NFE (sampling steps) |" in (tmp_path / "results" / "main_job.md").read_text()
    assert (out / "samples.png").stat().st_size > 5_000 and (out / "evaluation" / "quality.png").is_file()
    for name in ("vanilla", "immiscible"):
        card = ModelCard.load(out / name / "README.md")
        # The Hub shows evaluation results from model-index only: the main job's scores are there.
        assert card.data.eval_results, name
        assert all(result.metric_type == "digits_fd" for result in card.data.eval_results)


def _demo_command(*flags: str, **env: str):
    return run_command([sys.executable, str(SCRIPT), *flags], timeout=240, check=False, **env)


def test_a_file_as_output_dir_is_one_error_line_and_stays_intact(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me\n")
    result = _demo_command("--output_dir", str(a_file))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: --output_dir {str(a_file)!r} is a file, not a folder"]
    assert a_file.read_text() == "keep me\n"


def test_one_eval_sample_is_refused_before_any_training(tmp_path):
    result = _demo_command("--output_dir", str(tmp_path / "demo"), "--num_eval_samples", "1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith("error: --num_eval_samples must be 0 (no evaluation) or >= 2, got 1")
    assert not (tmp_path / "demo").exists()


def test_a_training_run_refusing_its_options_is_one_error_line(tmp_path):
    """A user error the training script finds (UNet widths vs the attention head size) comes back as one line."""
    flags = ["--output_dir", str(tmp_path / "demo"), "--unet_block_out_channels", "3,5", "--max_train_steps", "2",
             "--num_eval_samples", "0", "--sequential"]  # fmt: skip
    result = _demo_command(*flags)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the vanilla training run refused its options: --unet_block_out_channels 3,5")
    assert not (tmp_path / "demo" / "immiscible").exists()  # the second run never started
