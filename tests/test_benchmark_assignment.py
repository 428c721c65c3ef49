"""The assignment benchmark runs end to end in its --quick mode and writes sane tables."""

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "assignment.py"


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_assignment", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_quick_run_writes_complete_tables(benchmark, tmp_path):
    threads = torch.get_num_threads()
    try:  # one thread: cheapest on a shared machine, and main() sets it process-wide
        benchmark.main(["--quick", "--num_threads", "1", "--output_dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)

    rows = read_csv(tmp_path / "assignment.csv")
    assert list(rows[0]) == benchmark.CSV_COLUMNS
    expected_cells = {
        (b, d, dtype)
        for b in benchmark.QUICK_BATCH_SIZES
        for d in benchmark.QUICK_DIMS
        for dtype in ("auto",)
    }
    assert {(int(r["batch_size"]), int(r["dim"]), r["cost_dtype"]) for r in rows} == expected_cells
    assert len(rows) == len(expected_cells)

    positive = [
        "cost_matrix_ms",
        "solver_ms",
        "exact_total_ms",
        "knn_ms",
        "reference_cost_ms",
        "reference_solver_ms",
        "reference_total_ms",
        "reference_over_exact",
        "step_ms",
        "exact_percent_of_step",
        "knn_percent_of_step",
        "optimum_reduction",
        "exact_reduction",
        "knn_reduction",
        "scipy_on_our_cost_ms",
        "scipy_over_our_solver",
        "cdist_same_dtype_ms",
        "cdist_over_our_cost",
    ]
    for row in rows:
        # The parts of our path are timed inside the calls of its total: they cannot add up to more.
        # (The CSV keeps 6 significant digits, hence the tolerance.)
        assert float(row["cost_matrix_ms"]) + float(row["solver_ms"]) <= float(row["exact_total_ms"]) * (1 + 1e-5), row
        assert float(row["reference_cost_ms"]) + float(row["reference_solver_ms"]) <= float(row["reference_total_ms"]) * (1 + 1e-5), row
        assert row["resolved_dtype"] in ("float32", "bfloat16") and row["solver"] in ("lapjv", "scipy")
        for column in positive:
            value = float(row[column])
            assert math.isfinite(value) and value > 0, (column, row)
        assert row["step_source"] in ("measured", "extrapolated")
        assert (row["clock"], row["num_threads"]) == ("wall", "1")
        # The exact solve of our cost reaches the float64 optimum (bf16 within rounding of near-ties).
        assert 0.99 <= float(row["exact_kept_of_optimum"]) <= 1.0 + 1e-9, row
        assert 0.0 < float(row["reference_kept_of_optimum"]) <= 1.0 + 1e-9, row
        assert float(row["exact_reduction"]) == pytest.approx(float(row["optimum_reduction"]), rel=0.02)

    scaling = read_csv(tmp_path / "assignment_solver_scaling.csv")
    assert [int(r["batch_size"]) for r in scaling] == benchmark.QUICK_STALL_SIZES
    for row in scaling:
        for column in ("cost_matrix_ms", "lapjv_digits_ms", "lapjv_distinct_ms", "lapjv_gaussian_ms", "scipy_digits_ms"):
            assert math.isfinite(float(row[column])) and float(row[column]) > 0, (column, row)
        # Solving two halves exactly can never beat solving the whole batch exactly.
        assert float(row["reduction_whole"]) >= float(row["reduction_two_blocks"]) - 1e-6

    headline = json.loads((tmp_path / "assignment.json").read_text())
    assert set(headline["provenance"]) >= {"command", "git_commit", "code_version", "machine", "date"}
    assert headline["headline"]["min_paper_over_ours"] == pytest.approx(min(float(r["reference_over_exact"]) for r in rows), rel=1e-5)

    report = (tmp_path / "assignment.md").read_text()
    assert f"DEFAULT_BLOCK_SIZE = {benchmark.DEFAULT_BLOCK_SIZE}" in report
    assert "| B | D (shape) | cost dtype |" in report
    assert "extrapolated" in report
    assert (tmp_path / "assignment.png").stat().st_size > 0


def test_step_fit_recovers_a_line_and_marks_extrapolation(benchmark):
    steps = benchmark.StepTimes.fit({8: 0.5 + 8 * 0.1, 16: 0.5 + 16 * 0.1, 32: 0.5 + 32 * 0.1})
    assert steps.intercept == pytest.approx(0.5)
    assert steps.slope == pytest.approx(0.1)
    assert steps.r_squared == pytest.approx(1.0)
    assert steps.seconds(16) == (pytest.approx(2.1), "measured")
    assert steps.seconds(128) == (pytest.approx(0.5 + 12.8), "extrapolated")


def test_sample_shape_rejects_dimensions_without_a_square_image(benchmark):
    assert benchmark.sample_shape(3072) == (3, 32, 32)
    assert benchmark.sample_shape(4 * 16 * 16) == (4, 16, 16)
    with pytest.raises(ValueError, match="D=1000"):
        benchmark.sample_shape(1000)
