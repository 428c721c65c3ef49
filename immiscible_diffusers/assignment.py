"""The noise-assignment engine: pair each sample of a batch with a nearby Gaussian noise sample.

Immiscible Diffusion (Li et al., NeurIPS 2024) replaces the random image-noise pairing of a
mini-batch by a linear assignment that minimises the total image-noise distance; its follow-up
(arXiv 2505.18521) keeps, per image, the nearest of ``k`` noise candidates instead. Either way the
caller trains on the *returned* noise: it is both the noising input and the training target.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .precision import auto_cost_dtype
from .solvers import solve_linear_assignment  # public here too, where it always was

# "shuffle" and "norm_matched" are controls, not methods to train with: "shuffle" is a random re-pairing
# (vanilla in distribution), "norm_matched" brings the noise as close as "linear" does without re-pairing.
METHODS = ("none", "linear", "knn", "shuffle", "norm_matched")
DISTANCES = ("l2", "sqeuclidean")
SCOPES = ("local", "global")
COST_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# cost_dtype="auto" resolves per device and problem size (immiscible_diffusers/precision.py).
AUTO_COST_DTYPE = "auto"
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
    cost_dtype: str | torch.dtype = AUTO_COST_DTYPE,
    knn_k: int = 4,
    scope: str = "local",
    block_size: int | None = DEFAULT_BLOCK_SIZE,
) -> torch.dtype | str:
    """Check the assignment options; return the cost dtype as a ``torch.dtype`` (or ``"auto"``)."""
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
    if cost_dtype == AUTO_COST_DTYPE:
        return AUTO_COST_DTYPE
    if not isinstance(cost_dtype, str):
        raise TypeError(
            f"cost_dtype must be a str or torch.dtype, one of {(AUTO_COST_DTYPE, *COST_DTYPES)}, got {cost_dtype!r}"
        )
    if cost_dtype not in COST_DTYPES:
        raise ValueError(f"cost_dtype must be one of {(AUTO_COST_DTYPE, *COST_DTYPES)}, got {cost_dtype!r}")
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
    # Mixed float dtypes are fine (diffusers' add_noise accepts fp16 samples with fp32 noise): the cost is
    # computed in float32/cost_dtype from both, and the result keeps the noise's dtype.
    if samples.device != noise.device:
        raise ValueError(f"noise must be on the device of samples ({samples.device}), got {noise.device}")
    if samples.device.type == "meta":
        raise ValueError("samples and noise are meta tensors (no data); assignment needs their values")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device.type != noise.device.type:
        raise ValueError(f"generator must be on the device type of noise ({noise.device.type}), got {generator.device}")
    for name, value in (("samples", samples), ("noise", noise)):
        # One fused reduction in the common case; NaN/Inf always make the sum non-finite.
        if not bool(torch.isfinite(value.sum(dtype=torch.float32))) and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name} contains NaN or Inf values")


def cost_matrix(
    samples: torch.Tensor,
    noise: torch.Tensor,
    distance: str = "l2",
    cost_dtype: torch.dtype | str = torch.float32,
) -> torch.Tensor:
    """The (B, B) float32 cost matrix whose entry ``[i, j]`` prices pairing sample i with noise j.

    One GEMM of the flattened tensors in ``cost_dtype`` (fp16/bf16 is the paper's "quantized"
    assignment; ``"auto"`` picks per device and size, see ``precision.choose_cost_dtype``). Both
    inputs are scaled by ``1/sqrt(D)`` first, so fp16 cannot overflow at any dimension D; the scale
    does not change the optimal assignment. Norms are added in float32, because rounding whole
    distances to 16 bits loses most of the tiny differences between them.

    For ``distance="sqeuclidean"`` the per-row and per-column norms cannot change the optimal
    permutation, so the matrix is ``-2 <x_i, n_j>`` alone (squared distance minus those constants).
    """
    batch = samples.shape[0]
    if cost_dtype == AUTO_COST_DTYPE:
        cost_dtype = auto_cost_dtype(samples.device, batch, samples[0].numel())
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
        if cost_dtype != torch.float32:
            raise ValueError(f"the {cost_dtype} cost matrix overflowed; use cost_dtype='float32'")
        largest = max(float(samples.detach().abs().max()), float(noise.detach().abs().max()))
        raise ValueError(
            f"the float32 cost matrix overflowed (largest |value| in samples/noise: {largest:.3g}); "
            "rescale the samples to a range float32 can square, such as [-1, 1]"
        )
    return cost


def linear_assignment_permutation(
    samples: torch.Tensor,
    noise: torch.Tensor,
    distance: str = "l2",
    cost_dtype: torch.dtype | str = torch.float32,
    block_size: int | None = DEFAULT_BLOCK_SIZE,
) -> torch.Tensor:
    """Indices ``perm`` such that ``noise[perm]`` is the assigned noise (row i pairs with sample i).

    Batches larger than ``block_size`` are split into consecutive blocks of near-equal size and
    each block is assigned exactly (noise never leaves its block), with a warning.
    """
    blocks = assignment_blocks(samples.shape[0], block_size)
    return torch.cat([_solve_block(samples[s:e], noise[s:e], distance, cost_dtype) + s for s, e in blocks])


def assignment_blocks(batch: int, block_size: int | None) -> list[tuple[int, int]]:
    """The ``(start, end)`` of each block that a batch of ``batch`` is assigned in (one block up to ``block_size``).

    Warns when there is more than one block: the assignment is then exact within blocks only.
    """
    if block_size is None or batch <= block_size:
        return [(0, batch)]
    num_blocks = math.ceil(batch / block_size)
    warnings.warn(
        f"a batch of {batch} is larger than block_size={block_size}: assigning exactly within "
        f"{num_blocks} blocks instead of over the whole batch (pass block_size=None to force one exact solve)",
        stacklevel=4,
    )
    # Near-equal consecutive blocks, the larger ones first (as torch.tensor_split cuts them).
    bounds = [0]
    for index in range(num_blocks):
        bounds.append(bounds[-1] + batch // num_blocks + (1 if index < batch % num_blocks else 0))
    return list(zip(bounds[:-1], bounds[1:]))


def _solve_block(
    samples: torch.Tensor, noise: torch.Tensor, distance: str, cost_dtype: torch.dtype | str
) -> torch.Tensor:
    return solve_linear_assignment(cost_matrix(samples, noise, distance, cost_dtype), dim=samples[0].numel())


def _rank_offsets(tensor: torch.Tensor) -> list[int]:
    """Where each rank's batch starts in the world batch, and its end (ranks may hold different batch sizes)."""
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    offsets = [0]
    for value in sizes:
        offsets.append(offsets[-1] + int(value))
    return offsets


def _block_spans(offsets: list[int], start: int, end: int) -> list[tuple[int, int]]:
    """Per rank, the rows of world block ``[start, end)`` it holds, in its own batch's indices (may be empty)."""
    spans = []
    for rank in range(len(offsets) - 1):
        first, last = max(start, offsets[rank]), min(end, offsets[rank + 1])
        spans.append((first - offsets[rank], max(last, first) - offsets[rank]))
    return spans


def _gather_block(tensor: torch.Tensor, spans: list[tuple[int, int]], owner: int) -> torch.Tensor | None:
    """The block's rows of every rank, concatenated on rank ``owner`` only (``None`` elsewhere)."""
    rank = dist.get_rank()
    rows = max(e - s for s, e in spans)
    mine = tensor[spans[rank][0] : spans[rank][1]]
    padded = tensor.new_zeros((rows, *tensor.shape[1:]))
    padded[: mine.shape[0]] = mine
    parts = [torch.empty_like(padded) for _ in spans] if rank == owner else None
    dist.gather(padded, parts, dst=owner)
    if rank != owner:
        return None
    return torch.cat([part[: e - s] for part, (s, e) in zip(parts, spans)])


def _scatter_block(
    block: torch.Tensor | None, like: torch.Tensor, spans: list[tuple[int, int]], owner: int
) -> torch.Tensor:
    """Send each rank its rows of ``block`` (held by ``owner``); return this rank's rows."""
    rank = dist.get_rank()
    rows = max(e - s for s, e in spans)
    received = like.new_empty((rows, *like.shape[1:]))
    parts = None
    if rank == owner:
        parts, first = [], 0
        for s, e in spans:
            part = like.new_zeros((rows, *like.shape[1:]))
            part[: e - s] = block[first : first + e - s]
            parts.append(part)
            first += e - s
    dist.scatter(received, parts, src=owner)
    return received[: spans[rank][1] - spans[rank][0]]


def _global_linear_assignment(
    samples: torch.Tensor, noise: torch.Tensor, distance: str, cost_dtype: torch.dtype | str, block_size: int | None
) -> torch.Tensor:
    """Assign the world batch, blocks solved in parallel (rank r solves blocks r, r + W, ...); return this rank's slice.

    Only what the solvers need moves: each block's samples and noise go to the rank that solves it
    (every row to one rank, not to all), and each rank gets back just its rows' assigned noise. All
    gathers are issued before any solve, so the ranks solve their blocks at the same time. The result
    equals ``linear_assignment_permutation`` of the world batch in one process.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    offsets = _rank_offsets(samples)
    blocks = [(index % world, _block_spans(offsets, start, end))
              for index, (start, end) in enumerate(assignment_blocks(offsets[-1], block_size))]  # fmt: skip
    gathered = [(_gather_block(samples, spans, owner), _gather_block(noise, spans, owner)) for owner, spans in blocks]
    assigned = [
        block_noise[_solve_block(block_samples, block_noise, distance, cost_dtype)] if owner == rank else None
        for (owner, _), (block_samples, block_noise) in zip(blocks, gathered)
    ]
    mine = [_scatter_block(block, noise, spans, owner) for (owner, spans), block in zip(blocks, assigned)]
    return torch.cat(mine)


def _available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device`` (None where we cannot tell)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def _check_knn_memory(noise: torch.Tensor, knn_k: int, cost_dtype: torch.dtype) -> None:
    """Refuse a ``knn_k`` whose candidates cannot fit, before allocating them (an OOM helps nobody)."""
    # Peak of _knn_assignment: the k-1 draws, their concatenation with `noise`, the scaled float32 copy,
    # its cost_dtype copy and the float32 squares: all k x noise.numel() elements.
    per_element = 2 * noise.element_size() + 8 + torch.empty((), dtype=cost_dtype).element_size()
    needed = knn_k * noise.numel() * per_element
    available = _available_memory(noise.device)
    if available is not None and needed > available:
        raise ValueError(
            f"knn_k={knn_k} needs about {needed / 2**30:.1f} GiB for the candidates of a noise batch of shape "
            f"{tuple(noise.shape)}, but only {available / 2**30:.1f} GiB is available on {noise.device}; lower knn_k"
        )


def _knn_assignment(
    samples: torch.Tensor,
    noise: torch.Tensor,
    knn_k: int,
    cost_dtype: torch.dtype | str,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Per sample, the nearest of ``knn_k`` candidates: ``noise`` itself plus ``knn_k - 1`` fresh draws."""
    batch = samples.shape[0]
    if cost_dtype == AUTO_COST_DTYPE:
        cost_dtype = auto_cost_dtype(samples.device, batch, samples[0].numel(), knn=True)
    _check_knn_memory(noise, knn_k, cost_dtype)
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
    cost_dtype: str | torch.dtype = AUTO_COST_DTYPE,
    knn_k: int = 4,
    scope: str = "local",
    block_size: int | None = DEFAULT_BLOCK_SIZE,
    generator: torch.Generator | None = None,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, AssignmentStats]:
    """Return ``noise`` re-paired with ``samples``; train on the result (it is also the target).

    Args:
        samples: clean samples (images or latents), shape ``(B, ...)``.
        noise: Gaussian noise of the same shape and device (any float dtype; the result keeps it). Never modified.
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
        cost_dtype: precision of the cost GEMM: ``"auto"`` (default) picks the fastest that keeps
            >= 99.9% of the optimum's distance reduction on this device (fp16 on CUDA, bf16 on CPUs
            with native bf16, float32 otherwise; see ``precision.choose_cost_dtype``), or
            ``"float32"``, ``"float16"``/``"bfloat16"`` (the paper's quantized assignment). The solve is exact.
        knn_k: number of candidates per sample for ``method="knn"``.
        scope: ``"local"`` assigns this process's batch; ``"global"`` assigns the whole world batch
            under ``torch.distributed`` once and returns this rank's slice (same as ``"local"`` when
            no process group is running). Its blocks are solved in parallel, rank r solving blocks
            r, r + W, ...; the result equals the one-process assignment of the world batch.
        block_size: batches larger than this are assigned exactly within blocks (see
            ``linear_assignment_permutation``); ``None`` always solves the whole batch.
        generator: random generator for the KNN candidates.
        return_stats: also return an ``AssignmentStats`` of this rank's mean sample-noise distance.
    """
    dtype = validate_assignment_options(method, distance, cost_dtype, knn_k, scope, block_size)
    _validate_tensors(samples, noise, generator)
    if noise.numel() == 0:  # no samples, or samples without values: there is nothing to pair
        return (noise, AssignmentStats(0.0, 0.0)) if return_stats else noise
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
