"""Which precision the assignment's cost GEMM uses when ``cost_dtype="auto"``.

The rule keeps the solve exact and only picks the GEMM's input precision (norms stay float32,
see ``assignment.cost_matrix``): on that inner-product matrix fp16 and bf16 keep >= 99.9% of the
optimum's distance reduction (benchmarks/assignment.py, "kept of optimum"). What is *fast* differs
by machine, so the choice is made from the device's capabilities, never from one machine's table:

- CUDA: float16. Tensor cores run fp16 and bf16 alike; fp16 has 3 more mantissa bits, and the
  ``1/sqrt(D)`` input scaling rules out fp16 overflow at any D.
- CPU: bfloat16 only where the CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16) and the GEMM
  is big enough to repay the casts; elsewhere bf16 is emulated and was measured 3.5x *slower*
  than fp32 (an AVX2-only EPYC, B=1024, D=3072). fp16 is never chosen on CPU (no fast kernel).
- Anything else (MPS, XPU, ...): float32, the safe default until measured.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

# CPU flags (as /proc/cpuinfo spells them) that mean a native bf16 dot product.
NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
# Below this many multiply-adds (B * B * D) the casts to bf16 cost more than the faster GEMM saves: on an
# AVX512-BF16 EPYC, bf16 was slower at B=64 x D=192 (0.8M), on par at 3.1M (B=64 x D=768, B=128 x D=192)
# and faster beyond, up to 2.6x (benchmarks/results/cost_dtype_cpu.md).
CPU_BF16_MIN_MULTIPLY_ADDS = 2_000_000


def choose_cost_dtype(
    device_type: str,
    batch_size: int,
    dim: int,
    *,
    cpu_native_bf16: bool,
    knn: bool = False,
) -> torch.dtype:
    """The cost-GEMM dtype for a ``batch_size`` x ``batch_size`` cost of ``dim``-sized samples on ``device_type``.

    ``knn=True`` asks for the KNN variant's (k, B) candidate scores instead, a batched matrix-vector
    product that is memory-bound on CPU: there the bf16 casts cost more than they save (on par or
    up to 1.5x slower at every D >= 3072 cell of benchmarks/results/assignment.md as of commit
    cc789da, which timed KNN in both dtypes), so it stays float32 on CPU.
    A pure function of the facts it is given, so that the rule can be tested for any machine.
    """
    if device_type == "cuda":
        return torch.float16
    if knn:
        return torch.float32
    if device_type == "cpu" and cpu_native_bf16 and batch_size * batch_size * dim >= CPU_BF16_MIN_MULTIPLY_ADDS:
        return torch.bfloat16
    return torch.float32


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The feature flags of the first CPU listed in ``cpuinfo`` (empty where the file does not exist)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16) and torch uses AVX-512 kernels."""
    # torch dispatches to its AVX-512 kernels only where it detected AVX-512; "DEFAULT"/"AVX2" builds or
    # CPUs take the emulated bf16 path even if the flag is present.
    capability = torch.backends.cpu.get_cpu_capability()
    return capability.startswith("AVX512") and bool(NATIVE_BF16_CPU_FLAGS & cpu_flags())


def auto_cost_dtype(device: torch.device, batch_size: int, dim: int, knn: bool = False) -> torch.dtype:
    """``choose_cost_dtype`` with this machine's facts: what ``cost_dtype="auto"`` resolves to."""
    native = cpu_has_native_bf16() if device.type == "cpu" else False
    return choose_cost_dtype(device.type, batch_size, dim, cpu_native_bf16=native, knn=knn)
