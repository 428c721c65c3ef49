"""Exact linear-assignment solvers and the rule that picks one per problem.

Both solvers return an optimal permutation; they differ only in speed. Jonker-Volgenant (PyPI
``lapjv``) is 3-10x faster than scipy's ``linear_sum_assignment`` on image-like costs, but on
low-dimensional samples (the 2-D toy) the cost matrix is full of near-ties and its augmenting
paths get long: there scipy is up to 4x faster (benchmarks/results/solver_choice.md).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

try:
    from lapjv import lapjv as _lapjv
except ImportError:  # pragma: no cover - lapjv ships wheels for the platforms we test on
    _lapjv = None

SOLVERS = ("lapjv", "scipy")
# Measured single-threaded on this project's CPU (benchmarks/results/solver_choice.md): at D <= 4, lapjv
# took 1.5-4x scipy's time on the 2-D toy (B=64-1024) and 1.65x on 3-D Gaussians at B=1024, and was only
# sometimes faster at D=4; from D=6 up it was faster at every size above B=64. Choosing scipy can never
# be slower than scipy, so doubtful cases go to scipy.
SCIPY_MAX_DIM = 4
# ... and at tiny batches up to this dimension, where lapjv was 1.2x slower (B=64, D=8; both under 0.3 ms).
SCIPY_SMALL_BATCH_MAX_DIM = 8
SCIPY_SMALL_BATCH = 64


def choose_solver(batch_size: int, dim: int | None, *, lapjv_available: bool = True) -> str:
    """The faster exact solver for a ``batch_size`` x ``batch_size`` cost of ``dim``-dimensional samples.

    ``dim=None`` (the samples are unknown) is taken as image-like: lapjv.
    """
    if not lapjv_available:
        return "scipy"
    if dim is None:
        return "lapjv"
    if dim <= SCIPY_MAX_DIM or (dim <= SCIPY_SMALL_BATCH_MAX_DIM and batch_size <= SCIPY_SMALL_BATCH):
        return "scipy"
    return "lapjv"


def solve_linear_assignment(cost: torch.Tensor, dim: int | None = None, solver: str | None = None) -> torch.Tensor:
    """Exact minimum-cost permutation of a square cost matrix: ``perm[i]`` is the column for row i.

    ``solver`` forces ``"lapjv"`` or ``"scipy"``; by default ``choose_solver`` picks one from the
    batch size and ``dim``, the dimension of the samples behind the cost (unknown: treated as large).
    """
    if solver is None:
        solver = choose_solver(cost.shape[0], dim, lapjv_available=_lapjv is not None)
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS} or None, got {solver!r}")
    if solver == "lapjv" and _lapjv is None:
        raise ValueError("solver='lapjv' needs the lapjv package (pip install lapjv)")
    matrix = np.ascontiguousarray(cost.detach().to("cpu", torch.float64).numpy())
    if solver == "lapjv":
        row_to_col = _lapjv(matrix)[0]
    else:
        row_to_col = linear_sum_assignment(matrix)[1]
    return torch.from_numpy(np.asarray(row_to_col, dtype=np.int64)).to(cost.device)
