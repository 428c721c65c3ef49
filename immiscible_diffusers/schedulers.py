"""Diffusers schedulers with immiscible noise assignment.

``make_immiscible(SchedulerClass)`` returns a subclass whose config carries the assignment settings and
whose ``add_noise`` / ``scale_noise`` / ``get_velocity`` assign the caller's noise tensor *in place* before
using it. That is what makes an unmodified diffusers training step correct::

    noise = torch.randn_like(x)
    noisy = scheduler.add_noise(x, noise, t)   # `noise` now holds the assigned noise
    loss = mse(model(noisy, t), noise)         # ... so the target is the assigned noise too

The guarantee, exactly: **the tensor you pass to add_noise / scale_noise / get_velocity is assigned in
place; build your target from that tensor.** A tensor derived from it *before* the call (``noise.clone()``,
``noise + perturbation``, ``noise.half()``) is a different tensor, and the scheduler cannot know that the
target comes from the original. Scripts that noise without calling these methods (SD3/Flux-style flow
matching, consistency training with its own ``x + sigma * z``) are not covered at all: add one explicit
``noise = scheduler.assign_noise(x, noise)`` (or ``immiscible_diffusers.assign_noise``). docs/drop-in.md
gives the line(s) for each official diffusers example.

Inference pipelines (img2img, inpainting) call ``add_noise`` as well: turn the drop-in assignment off with
``drop_in_assignment=False`` in the config, or temporarily with ``with scheduler.drop_in_assignment_disabled():``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import (
    CMStochasticIterativeScheduler,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
)
from diffusers.configuration_utils import ConfigMixin

from .assignment import (
    COST_DTYPES,
    DEFAULT_BLOCK_SIZE,
    AssignmentStats,
    assign_noise,
    validate_assignment_options,
)

# Config keys added to the base scheduler's config, with their defaults.
ASSIGNMENT_CONFIG_DEFAULTS: dict[str, Any] = {
    "assignment": "linear",
    "assignment_distance": "l2",
    "assignment_dtype": "auto",
    "knn_k": 4,
    "assignment_scope": "local",
    "assignment_block_size": DEFAULT_BLOCK_SIZE,
    "drop_in_assignment": True,
}
# Wrapped methods: name -> (its samples argument, its role). An "input" builds the model input, a "target"
# the regression target; both must see the same assigned noise.
_DROP_IN_METHODS = {
    "add_noise": ("original_samples", "input"),
    "scale_noise": ("sample", "input"),
    "get_velocity": ("sample", "target"),
}
_NOISING_METHODS = ("add_noise", "scale_noise")
# Pairings remembered per scheduler: enough for teacher + student + target of a step, a few batches deep.
_PAIRING_CACHE_SIZE = 8


def _fingerprint(tensor: torch.Tensor) -> tuple:
    """Shape, dtype, device and per-sample float32 sums: one cheap pass over the tensor.

    It sees writes that bypass ``_version`` (``.data.normal_()``, numpy views) and row permutations;
    it is not a hash, and a change that keeps every row's sum (a swap inside one row) goes unnoticed.
    """
    with torch.no_grad():
        if tensor.ndim == 1:
            sums = tensor.float()
        else:
            sums = tensor.sum(dim=tuple(range(1, tensor.ndim)), dtype=torch.float32)
    return (tuple(tensor.shape), tensor.dtype, tensor.device, sums)


def _same_fingerprint(a: tuple, b: tuple) -> bool:
    return a[:3] == b[:3] and torch.equal(a[3], b[3])


@dataclass
class _Pairing:
    """One assignment the scheduler made: these samples with noise of this content."""

    samples: tuple
    noise: tuple
    noise_ref: weakref.ref  # the tensor that holds it, to tell "same tensor" from "another live tensor"
    role: str  # "input", "target" or "explicit"


def _dtype_name(value: Any) -> Any:
    """``torch.bfloat16`` -> ``"bfloat16"``: configs hold names, so repr and save_pretrained work."""
    if isinstance(value, torch.dtype):
        for name, dtype in COST_DTYPES.items():
            if dtype == value:
                return name
    return value


class ImmiscibleNoiseScheduler:
    """Mixin for a diffusers scheduler: batch noise assignment driven by the scheduler's config.

    Drop-in rules (``drop_in_assignment=True`` and ``assignment != "none"``):

    - The guarantee: **the tensor you pass to add_noise / scale_noise / get_velocity is assigned in place;
      build your target from that tensor.** A tensor derived from it before the call is not assigned.
    - Whichever of those methods sees a (samples, noise) pair first assigns it; a later call with the same
      samples and that same assigned noise reuses the pairing (no second assignment, no new KNN
      candidates), so ``get_velocity`` before or after ``add_noise`` gives a target that matches the input.
    - Samples and noise are recognised by content (a per-sample sum, see ``_fingerprint``), not only by
      identity: the same noise tensor with other samples, or refilled behind autograd's back
      (``noise.data.normal_()``, a numpy view), is assigned again.
    - A call that fails (bad timesteps, say) leaves the caller's noise untouched: the assignment and the
      base method run first, the in-place write comes last.
    - Samples you assigned explicitly with ``scheduler.assign_noise`` keep that pairing: passing the tensor
      it returned is a no-op, passing any other noise for them raises (it would be assigned twice). Turn
      the drop-in off (``drop_in_assignment=False``) when a script assigns explicitly and then derives the
      noise it noises with (``--input_perturbation``).
    - ``get_velocity`` with noise other than the tensor ``add_noise``/``scale_noise`` just assigned for the
      same samples warns: the target would not match the model input.

    Do not subclass by hand; ``make_immiscible`` builds the class so that its config round-trips.
    """

    stock_scheduler_class: type

    def assign_noise(
        self,
        samples: torch.Tensor,
        noise: torch.Tensor,
        generator: torch.Generator | None = None,
        return_stats: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, AssignmentStats]:
        """Return ``noise`` assigned to ``samples`` with this scheduler's settings (inputs untouched).

        Build both the model input and the target from the returned tensor. With the drop-in on, the
        scheduler remembers this pairing: its noising methods leave the returned tensor as it is.
        """
        result = self._assign(samples, noise, generator, return_stats)
        if self._drop_in_active():
            assigned = result[0] if return_stats else result
            self._remember(_fingerprint(samples), assigned, "explicit")
        return result

    def _assign(
        self,
        samples: torch.Tensor,
        noise: torch.Tensor,
        generator: torch.Generator | None = None,
        return_stats: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, AssignmentStats]:
        return assign_noise(
            samples,
            noise,
            method=self.config.assignment,
            distance=self.config.assignment_distance,
            cost_dtype=self.config.assignment_dtype,
            knn_k=self.config.knn_k,
            scope=self.config.assignment_scope,
            block_size=self.config.assignment_block_size,
            generator=generator,
            return_stats=return_stats,
        )

    def _drop_in_active(self) -> bool:
        return bool(self.config.drop_in_assignment) and self.config.assignment != "none"

    def _pairings(self) -> list[_Pairing]:
        if "_immiscible_pairings" not in self.__dict__:
            self._immiscible_pairings = []
        return self._immiscible_pairings

    def _remember(self, samples_print: tuple, noise: torch.Tensor, role: str) -> None:
        pairings = self._pairings()
        pairings.append(_Pairing(samples_print, _fingerprint(noise), weakref.ref(noise), role))
        del pairings[:-_PAIRING_CACHE_SIZE]

    def _drop_in_noise(
        self, samples: torch.Tensor, noise: torch.Tensor, role: str, method: str
    ) -> tuple[tuple, torch.Tensor | None]:
        """The samples' fingerprint and the assigned noise for this call (None when ``noise`` already holds it)."""
        if not isinstance(samples, torch.Tensor) or not isinstance(noise, torch.Tensor):
            raise TypeError(
                f"{method}: samples and noise must be torch.Tensors, got {type(samples).__name__} and "
                f"{type(noise).__name__}"
            )
        if samples.device.type == "meta" or noise.device.type == "meta":
            raise ValueError(f"{method}: meta tensors have no values to assign; use drop_in_assignment_disabled()")
        samples_print = _fingerprint(samples)
        noise_print = _fingerprint(noise)
        same_samples = [p for p in self._pairings() if _same_fingerprint(p.samples, samples_print)]
        if any(_same_fingerprint(p.noise, noise_print) for p in same_samples):
            return samples_print, None  # already assigned to these samples: reuse the pairing
        if same_samples and same_samples[-1].role == "explicit":
            raise ValueError(
                f"{method}: these samples were assigned with scheduler.assign_noise(), but this noise is not the "
                "tensor it returned; the drop-in would assign a second time. Pass the returned tensor, or build "
                "the scheduler with drop_in_assignment=False when you assign explicitly"
            )
        live = [p.noise_ref() for p in same_samples if p.role == "input"]
        other_input = [tensor for tensor in live if tensor is not None and tensor is not noise]
        if role == "target" and other_input:
            warnings.warn(
                f"{method} got noise other than the tensor add_noise/scale_noise assigned for the same samples: "
                "each tensor is assigned on its own, so this target does not match that model input. Build the "
                "input and the target from the same tensor (docs/drop-in.md)",
                UserWarning,
                stacklevel=3,
            )
        if noise.requires_grad:
            raise ValueError(
                f"{method}: noise requires grad, so it cannot be assigned in place; detach it, or call "
                "scheduler.assign_noise(samples, noise) and use the returned tensor"
            )
        if any(stride == 0 and size > 1 for stride, size in zip(noise.stride(), noise.shape)):
            raise ValueError(
                f"{method}: noise is a broadcast view (stride 0), so it cannot be assigned in place; pass a "
                "materialised tensor (noise.clone()) or use scheduler.assign_noise(samples, noise)"
            )
        return samples_print, self._assign(samples, noise)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_immiscible_pairings", None)  # weakrefs do not pickle; a copy starts without pairings
        return state

    @contextlib.contextmanager
    def drop_in_assignment_disabled(self) -> Iterator[None]:
        """Within this block the noising methods leave the noise as it is (for inference)."""
        previous = self.config.drop_in_assignment
        self.register_to_config(drop_in_assignment=False)
        try:
            yield
        finally:
            self.register_to_config(drop_in_assignment=previous)

    def to_stock_scheduler(self) -> Any:
        """The same scheduler as its stock diffusers class, without the assignment settings.

        Publish pipelines with this one: anyone with plain diffusers can load them, and inference
        never depended on how the noise was paired in training.
        """
        config = {k: v for k, v in self.config.items() if k not in ASSIGNMENT_CONFIG_DEFAULTS}
        return self.stock_scheduler_class.from_config(config)


def _wrap_drop_in_method(base_method: Any, samples_argument: str, role: str) -> Any:
    signature = inspect.signature(base_method)

    @functools.wraps(base_method)
    def method_with_assignment(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        noise = bound.arguments.get("noise")
        if noise is None or not self._drop_in_active():
            return base_method(*bound.args, **bound.kwargs)
        samples = bound.arguments.get(samples_argument)
        samples_print, assigned = self._drop_in_noise(samples, noise, role, base_method.__name__)
        if assigned is None:
            return base_method(*bound.args, **bound.kwargs)
        # Compute with the assigned copy first; the caller's tensor changes only once the base method succeeded.
        bound.arguments["noise"] = assigned
        result = base_method(*bound.args, **bound.kwargs)
        with torch.no_grad():
            noise.copy_(assigned)
        self._remember(samples_print, noise, role)
        return result

    return method_with_assignment


def make_immiscible(scheduler_class: type, name: str | None = None) -> type:
    """Build ``Immiscible<SchedulerClass>``: the stock scheduler plus assignment settings in its config.

    The new ``__init__`` has an explicit signature (the base's arguments, then the keyword-only keys of
    ``ASSIGNMENT_CONFIG_DEFAULTS``), so ``save_pretrained``/``from_pretrained``/``from_config`` keep
    every value. Raises ``TypeError`` for a class that is no diffusers scheduler or has neither
    ``add_noise`` nor ``scale_noise`` with a ``noise`` argument.
    """
    if not isinstance(scheduler_class, type) or not issubclass(scheduler_class, ConfigMixin):
        raise TypeError(f"scheduler_class must be a diffusers scheduler class, got {scheduler_class!r}")
    if issubclass(scheduler_class, ImmiscibleNoiseScheduler):
        raise TypeError(f"scheduler_class {scheduler_class.__name__} is already immiscible")
    wrapped = {
        method: spec
        for method, spec in _DROP_IN_METHODS.items()
        if callable(getattr(scheduler_class, method, None))
        and "noise" in inspect.signature(getattr(scheduler_class, method)).parameters
    }
    if not any(method in wrapped for method in _NOISING_METHODS):
        raise TypeError(
            f"scheduler_class {scheduler_class.__name__} has neither add_noise nor scale_noise with a noise "
            "argument, so there is no noising step to assign noise for"
        )

    base_signature = inspect.signature(scheduler_class.__init__)
    base_parameters = list(base_signature.parameters.values())
    var_keyword = [p for p in base_parameters if p.kind is inspect.Parameter.VAR_KEYWORD]
    assignment_parameters = [
        inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=default)
        for key, default in ASSIGNMENT_CONFIG_DEFAULTS.items()
    ]
    regular = [p for p in base_parameters if p.kind is not inspect.Parameter.VAR_KEYWORD]
    signature = base_signature.replace(parameters=regular + assignment_parameters + var_keyword)

    def __init__(self, *args, **kwargs):
        arguments = signature.bind(self, *args, **kwargs).arguments
        arguments.pop("self")
        settings = {key: arguments.pop(key, default) for key, default in ASSIGNMENT_CONFIG_DEFAULTS.items()}
        settings["assignment_dtype"] = _dtype_name(settings["assignment_dtype"])
        validate_assignment_options(
            settings["assignment"],
            settings["assignment_distance"],
            settings["assignment_dtype"],
            settings["knn_k"],
            settings["assignment_scope"],
            settings["assignment_block_size"],
        )
        if not isinstance(settings["drop_in_assignment"], bool):
            raise TypeError(f"drop_in_assignment must be a bool, got {settings['drop_in_assignment']!r}")
        if var_keyword:
            arguments.update(arguments.pop(var_keyword[0].name, {}))
        # Only the arguments the caller gave go to the base, so its `_use_default_values` stays true.
        scheduler_class.__init__(self, **arguments)
        self.register_to_config(**settings)

    __init__.__signature__ = signature
    namespace = {
        "__init__": __init__,
        "__doc__": f"{scheduler_class.__name__} with immiscible noise assignment (see `make_immiscible`).",
        "__module__": __name__,
        "stock_scheduler_class": scheduler_class,
        "_compatibles": [scheduler_class.__name__, *getattr(scheduler_class, "_compatibles", [])],
    }
    for method, (samples_argument, role) in wrapped.items():
        namespace[method] = _wrap_drop_in_method(getattr(scheduler_class, method), samples_argument, role)
    return type(name or f"Immiscible{scheduler_class.__name__}", (ImmiscibleNoiseScheduler, scheduler_class), namespace)


ImmiscibleDDPMScheduler = make_immiscible(DDPMScheduler)
ImmiscibleDDIMScheduler = make_immiscible(DDIMScheduler)
ImmiscibleEulerDiscreteScheduler = make_immiscible(EulerDiscreteScheduler)
ImmiscibleDPMSolverMultistepScheduler = make_immiscible(DPMSolverMultistepScheduler)
ImmiscibleLCMScheduler = make_immiscible(LCMScheduler)
ImmiscibleCMStochasticIterativeScheduler = make_immiscible(CMStochasticIterativeScheduler)
ImmiscibleFlowMatchEulerDiscreteScheduler = make_immiscible(FlowMatchEulerDiscreteScheduler)
