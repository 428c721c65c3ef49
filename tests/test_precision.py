"""cost_dtype="auto": the per-device rule (a pure function of capability facts) and what it keeps."""

import pytest
import torch

from immiscible_diffusers import assign_noise
from immiscible_diffusers.assignment import cost_matrix, validate_assignment_options
from immiscible_diffusers.precision import (
    CPU_BF16_MIN_MULTIPLY_ADDS,
    auto_cost_dtype,
    choose_cost_dtype,
    cpu_flags,
    cpu_has_native_bf16,
)
from immiscible_diffusers.solvers import solve_linear_assignment


@pytest.mark.parametrize("native", [True, False])
def test_cuda_always_takes_fp16(native):
    assert choose_cost_dtype("cuda", 1024, 3072, cpu_native_bf16=native) == torch.float16
    assert choose_cost_dtype("cuda", 8, 2, cpu_native_bf16=native, knn=True) == torch.float16


def test_cpu_takes_bf16_only_with_native_bf16_and_enough_work():
    assert choose_cost_dtype("cpu", 1024, 3072, cpu_native_bf16=True) == torch.bfloat16
    # Emulated bf16 was measured 3.5x slower than fp32 on an AVX2-only CPU.
    assert choose_cost_dtype("cpu", 1024, 3072, cpu_native_bf16=False) == torch.float32
    # Tiny GEMMs: the casts cost more than the bf16 kernel saves.
    assert choose_cost_dtype("cpu", 64, 192, cpu_native_bf16=True) == torch.float32
    assert 64 * 64 * 192 < CPU_BF16_MIN_MULTIPLY_ADDS <= 128 * 128 * 192
    assert choose_cost_dtype("cpu", 128, 192, cpu_native_bf16=True) == torch.bfloat16


def test_cpu_never_takes_fp16_and_knn_stays_fp32_on_cpu():
    for native in (True, False):
        for batch, dim in ((64, 192), (2048, 16384)):
            assert choose_cost_dtype("cpu", batch, dim, cpu_native_bf16=native) != torch.float16
            assert choose_cost_dtype("cpu", batch, dim, cpu_native_bf16=native, knn=True) == torch.float32


def test_unmeasured_devices_keep_float32():
    assert choose_cost_dtype("mps", 1024, 3072, cpu_native_bf16=True) == torch.float32
    assert choose_cost_dtype("xpu", 1024, 3072, cpu_native_bf16=False) == torch.float32


def test_cpu_flags_reads_the_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\nprocessor\t: 1\n")
    assert {"avx2", "avx512_bf16"} <= cpu_flags(info)
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_this_machine_resolves_as_its_capabilities_say():
    expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert auto_cost_dtype(torch.device("cpu"), 1024, 3072) == expected
    if torch.backends.cpu.get_cpu_capability().startswith("AVX512") and "avx512_bf16" in cpu_flags():
        assert cpu_has_native_bf16()


def test_auto_is_the_default_and_validates():
    assert validate_assignment_options(cost_dtype="auto") == "auto"
    assert validate_assignment_options() == "auto"
    with pytest.raises(ValueError, match="'auto'"):
        validate_assignment_options(cost_dtype="int8")
    samples = torch.rand(256, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(256, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    chosen = auto_cost_dtype(samples.device, 256, 192)
    assert torch.equal(cost_matrix(samples, noise, cost_dtype="auto"), cost_matrix(samples, noise, cost_dtype=chosen))
    assert torch.equal(assign_noise(samples, noise), assign_noise(samples, noise, cost_dtype=chosen))


@pytest.mark.parametrize("cost_dtype", ["auto", "bfloat16", "float16"])
def test_quantized_costs_keep_999_per_mille_of_the_optimal_reduction(cost_dtype):
    g = torch.Generator().manual_seed(3)
    prototypes = torch.rand(10, 3, 32, 32, generator=g) * 2 - 1
    samples = (prototypes[torch.randint(0, 10, (256,), generator=g)] + 0.2 * torch.randn(256, 3, 32, 32, generator=g)).clamp(-1, 1)
    noise = torch.randn(256, 3, 32, 32, generator=g)
    exact = torch.cdist(samples.flatten(1).double(), noise.flatten(1).double())
    optimum = solve_linear_assignment(exact)
    rows = torch.arange(256)
    before, best = exact.diagonal().sum(), exact[rows, optimum].sum()
    chosen = solve_linear_assignment(cost_matrix(samples, noise, cost_dtype=cost_dtype if cost_dtype == "auto" else getattr(torch, cost_dtype)))
    kept = float((before - exact[rows, chosen].sum()) / (before - best))
    assert kept >= 0.999, f"{cost_dtype} kept {kept:.5f} of the optimum's reduction"
