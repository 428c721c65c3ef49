"""The noise-assignment engine: pair each sample of a batch with a nearby Gaussian noise sample.

Immiscible Diffusion (Li et al., NeurIPS 2024) replaces the random image-noise pairing of a
mini-batch by a linear assignment that minimises the total image-noise distance; its follow-up
(arXiv 2505.18521) keeps, per image, the nearest of ``k`` noise candidates instead. Either way the
caller trains on the *returned* noise: it is both the noising input and the training target.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

try:  # Jonker-Volgenant; 3-6x faster than scipy at the batch sizes that matter (benchmarks/assignment.py)
    from lapjv import lapjv as _lapjv
except ImportError:  # pragma: no cover - lapjv ships wheels for the platforms we test on
    _lapjv = None
from scipy.optimize import linear_sum_assignment

# "shuffle" and "norm_matched" are controls, not methods to train with: "shuffle" is a random re-pairing
# (vanilla in distribution), "norm_matched" brings the noise as close as "linear" does without re-pairing.
METHODS = ("none", "linear", "knn", "shuffle", "norm_matched")
DISTANCES = ("l2", "sqeuclidean")
SCOPES = ("local", "global")
COST_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Above this many samples an exact solve costs seconds per step (lapjv on upsampled digits, D=3072:
# 0.26-0.62 s at 2,048, 1.6-4.9 s at 4,096; benchmarks/assignment.py), so larger batches are assigned
# exactly within blocks of at most this size (two blocks keep ~98% of the distance reduction).
DEFAULT_BLOCK_SIZE = 2048


@dataclass(frozen=True)
class AssignmentStats:
    """Mean L2 distance between each sample and its noise, before and after assignment."""

    mean_distance_before: float
    mean_distance_after: float

    @property
    def relative_reduction(self) -> float:
        """Fraction by which the assignment shortened the mean sample-noise distance."""
        if self.mean_distance_before == 0:
            return 0.0
        return 1.0 - self.mean_distance_after / self.mean_distance_before


def validate_assignment_options(
    method: str = "linear",
    distance: str = "l2",
    cost_dtype: str | torch.dtype = "float32",
    knn_k: int = 4,
    scope: str = "local",
    block_size: int | None = DEFAULT_BLOCK_SIZE,
) -> torch.dtype:
    """Check the assignment options; return the cost dtype as a ``torch.dtype``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if isinstance(knn_k, bool) or not isinstance(knn_k, int) or knn_k < 1:
        raise ValueError(f"knn_k must be an integer >= 1, got {knn_k!r}")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"block_size must be None or an integer >= 1, got {block_size!r}")
    if isinstance(cost_dtype, torch.dtype):
        if cost_dtype not in COST_DTYPES.values():
            raise ValueError(f"cost_dtype must be one of {tuple(COST_DTYPES)}, got {cost_dtype}")
        return cost_dtype
    if cost_dtype not in COST_DTYPES:
        raise ValueError(f"cost_dtype must be one of {tuple(COST_DTYPES)}, got {cost_dtype!r}")
    return COST_DTYPES[cost_dtype]


def _validate_tensors(samples: torch.Tensor, noise: torch.Tensor, generator: torch.Generator | None) -> None:
    for name, value in (("samples", samples), ("noise", noise)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.ndim == 0:
            raise ValueError(f"{name} must have a batch dimension (shape (B, ...)), got a 0-d tensor")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if samples.shape != noise.shape:
        raise ValueError(f"noise must have the shape of samples {tuple(samples.shape)}, got {tuple(noise.shape)}")
    if samples.dtype != noise.dtype:
        raise TypeError(f"noise must have the dtype of samples ({samples.dtype}), got {noise.dtype}")
    if samples.device != noise.device:
        raise ValueError(f"noise must be on the device of samples ({samples.device}), got {noise.device}")
    if generator is not None and generator.device.type != noise.device.type:
        raise ValueError(f"generator must be on the device type of noise ({noise.device.type}), got {generator.device}")
    for name, value in (("samples", samples), ("noise", noise)):
        # One fused reduction in the common case; NaN/Inf always make the sum non-finite.
        if not bool(torch.isfinite(value.sum(dtype=torch.float32))) and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name} contains NaN or Inf values")


def cost_matrix(
    samples: torch.Tensor, noise: torch.Tensor, distance: str = "l2", cost_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The (B, B) float32 cost matrix whose entry ``[i, j]`` prices pairing sample i with noise j.

    One GEMM of the flattened tensors in ``cost_dtype`` (fp16/bf16 is the paper's "quantized"
    assignment). Both inputs are scaled by ``1/sqrt(D)`` first, so fp16 cannot overflow at any
    dimension D; the scale does not change the optimal assignment. Norms are added in float32,
    because rounding whole distances to 16 bits loses most of the tiny differences between them.

    For ``distance="sqeuclidean"`` the per-row and per-column norms cannot change the optimal
    permutation, so the matrix is ``-2 <x_i, n_j>`` alone (squared distance minus those constants).
    """
    batch = samples.shape[0]
    scale = 1.0 / math.sqrt(samples[0].numel())
    x = samples.reshape(batch, -1).float() * scale
    n = noise.reshape(batch, -1).float() * scale
    inner = (x.to(cost_dtype) @ n.to(cost_dtype).T).float()
    if distance == "sqeuclidean":
        cost = -2.0 * inner
    else:
        squared = x.pow(2).sum(1, keepdim=True) + n.pow(2).sum(1)[None, :] - 2.0 * inner
        cost = squared.clamp_min_(0.0).sqrt_()
    if not bool(torch.isfinite(cost).all()):
        raise ValueError(f"the {cost_dtype} cost matrix overflowed; use cost_dtype='float32'")
    return cost


def solve_linear_assignment(cost: torch.Tensor) -> torch.Tensor:
    """Exact minimum-cost permutation of a square cost matrix: ``perm[i]`` is the column for row i."""
    matrix = np.ascontiguousarray(cost.detach().to("cpu", torch.float64).numpy())
    if _lapjv is not None:
        row_to_col = _lapjv(matrix)[0]
    else:  # pragma: no cover
        row_to_col = linear_sum_assignment(matrix)[1]
    return torch.from_numpy(np.asarray(row_to_col, dtype=np.int64)).to(cost.device)


def linear_assignment_permutation(
    samples: torch.Tensor,
    noise: torch.Tensor,
    distance: str = "l2",
    cost_dtype: torch.dtype = torch.float32,
    block_size: int | None = DEFAULT_BLOCK_SIZE,
) -> torch.Tensor:
    """Indices ``perm`` such that ``noise[perm]`` is the assigned noise (row i pairs with sample i).

    Batches larger than ``block_size`` are split into consecutive blocks of near-equal size and
    each block is assigned exactly (noise never leaves its block), with a warning.
    """
    batch = samples.shape[0]
    if block_size is None or batch <= block_size:
        return solve_linear_assignment(cost_matrix(samples, noise, distance, cost_dtype))
    num_blocks = math.ceil(batch / block_size)
    warnings.warn(
        f"a batch of {batch} is larger than block_size={block_size}: assigning exactly within "
        f"{num_blocks} blocks instead of over the whole batch (pass block_size=None to force one exact solve)",
        stacklevel=3,
    )
    perms = []
    for block in torch.arange(batch, device=samples.device).tensor_split(num_blocks):
        start = int(block[0])
        end = start + block.numel()
        local = solve_linear_assignment(cost_matrix(samples[start:end], noise[start:end], distance, cost_dtype))
        perms.append(local + start)
    return torch.cat(perms)


def _all_gather_batches(tensor: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Concatenate every rank's batch (ranks may hold different batch sizes)."""
    world = dist.get_world_size()
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([g[:s] for g, s in zip(gathered, sizes)]), sizes


def _global_linear_assignment(
    samples: torch.Tensor, noise: torch.Tensor, distance: str, cost_dtype: torch.dtype, block_size: int | None
) -> torch.Tensor:
    """Assign the world batch once (rank 0 solves, as the paper's multi-GPU code); return this rank's slice."""
    world_samples, sizes = _all_gather_batches(samples)
    world_noise, _ = _all_gather_batches(noise)
    if dist.get_rank() == 0:
        perm = linear_assignment_permutation(world_samples, world_noise, distance, cost_dtype, block_size)
    else:
        perm = torch.empty(world_samples.shape[0], dtype=torch.int64, device=samples.device)
    dist.broadcast(perm, src=0)
    start = sum(sizes[: dist.get_rank()])
    return world_noise[perm[start : start + samples.shape[0]]]


def _knn_assignment(
    samples: torch.Tensor, noise: torch.Tensor, knn_k: int, cost_dtype: torch.dtype, generator: torch.Generator | None
) -> torch.Tensor:
    """Per sample, the nearest of ``knn_k`` candidates: ``noise`` itself plus ``knn_k - 1`` fresh draws."""
    batch = samples.shape[0]
    extra = torch.randn((knn_k - 1, *noise.shape), generator=generator, device=noise.device, dtype=noise.dtype)
    candidates = torch.cat([noise[None], extra]).reshape(knn_k, batch, -1)
    scale = 1.0 / math.sqrt(candidates.shape[-1])
    c = (candidates.float() * scale).to(cost_dtype)
    x = (samples.reshape(batch, -1).float() * scale).to(cost_dtype)
    # ||c - x||^2 = ||c||^2 - 2 <c, x> + const(x): the argmin over candidates needs no (k, B, D) difference tensor.
    score = c.float().pow(2).sum(-1) - 2.0 * torch.einsum("kbd,bd->kb", c, x).float()
    nearest = score.argmin(dim=0)
    return candidates[nearest, torch.arange(batch, device=noise.device)].reshape(noise.shape)


def _random_permutation(size: int, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else "cpu"
    return torch.randperm(size, generator=generator, device=device)


def _norm_matched_noise(
    samples: torch.Tensor, noise: torch.Tensor, distance: str, dtype: torch.dtype, block_size: int | None
) -> torch.Tensor:
    """``noise + a * (samples - noise)``: each noise moved toward its own sample, none re-paired.

    Every sample-noise distance shrinks by the factor ``1 - a``; ``a`` is the relative reduction of the
    mean distance that the linear assignment achieves on this batch, so both controls are equally close.
    """
    before = _mean_distance(samples, noise)
    after = _mean_distance(samples, noise[linear_assignment_permutation(samples, noise, distance, dtype, block_size)])
    a = 0.0 if before == 0 else 1.0 - after / before
    return noise + a * (samples.to(noise.dtype) - noise)


def _mean_distance(samples: torch.Tensor, noise: torch.Tensor) -> float:
    return float((samples.float() - noise.float()).reshape(samples.shape[0], -1).norm(dim=1).mean())


def assign_noise(
    samples: torch.Tensor,
    noise: torch.Tensor,
    *,
    method: str = "linear",
    distance: str = "l2",
    cost_dtype: str | torch.dtype = "float32",
    knn_k: int = 4,
    scope: str = "local",
    block_size: int | None = DEFAULT_BLOCK_SIZE,
    generator: torch.Generator | None = None,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, AssignmentStats]:
    """Return ``noise`` re-paired with ``samples``; train on the result (it is also the target).

    Args:
        samples: clean samples (images or latents), shape ``(B, ...)``.
        noise: Gaussian noise of the same shape, dtype and device. Never modified.
        method: ``"linear"`` — exact linear assignment minimising the total distance; the result is
            a permutation of ``noise``, so the batch stays exactly Gaussian as a multiset.
            ``"knn"`` — per sample, the nearest of ``knn_k`` candidates (``noise`` and ``knn_k - 1``
            fresh draws from ``generator``); no batch coupling, works at batch 1, but the result is
            no longer exactly N(0, I): it is slightly shorter and leans toward the sample.
            ``"none"`` — the vanilla pairing: ``noise`` is returned as it is.
            Controls: ``"shuffle"`` — a random permutation of ``noise`` from ``generator`` (vanilla in
            distribution); ``"norm_matched"`` — ``noise + a (samples - noise)`` with ``a`` the linear
            assignment's relative mean-distance reduction on this batch: as close, but not re-paired.
        distance: ``"l2"`` (the paper's) or ``"sqeuclidean"`` (the optimal-transport convention).
        cost_dtype: precision of the cost GEMM: ``"float32"``, or ``"float16"``/``"bfloat16"`` for
            the paper's quantized assignment (fp16 is fast on GPUs, bf16 on CPUs). The solve is exact.
        knn_k: number of candidates per sample for ``method="knn"``.
        scope: ``"local"`` assigns this process's batch; ``"global"`` assigns the whole world batch
            under ``torch.distributed`` once and returns this rank's slice (same as ``"local"`` when
            no process group is running).
        block_size: batches larger than this are assigned exactly within blocks (see
            ``linear_assignment_permutation``); ``None`` always solves the whole batch.
        generator: random generator for the KNN candidates.
        return_stats: also return an ``AssignmentStats`` of this rank's mean sample-noise distance.
    """
    dtype = validate_assignment_options(method, distance, cost_dtype, knn_k, scope, block_size)
    _validate_tensors(samples, noise, generator)
    with torch.no_grad():
        if method == "knn" and knn_k > 1:
            assigned = _knn_assignment(samples, noise, knn_k, dtype, generator)
        elif method == "linear" and scope == "global" and dist.is_available() and dist.is_initialized():
            assigned = _global_linear_assignment(samples, noise, distance, dtype, block_size)
        elif method == "linear" and samples.shape[0] > 1:
            assigned = noise[linear_assignment_permutation(samples, noise, distance, dtype, block_size)]
        elif method == "shuffle":
            assigned = noise[_random_permutation(noise.shape[0], generator).to(noise.device)]
        elif method == "norm_matched" and samples.shape[0] > 1:
            assigned = _norm_matched_noise(samples, noise, distance, dtype, block_size)
        else:
            assigned = noise
    if not return_stats:
        return assigned
    return assigned, AssignmentStats(_mean_distance(samples, noise), _mean_distance(samples, assigned))
