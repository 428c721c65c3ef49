"""Diffusers schedulers with immiscible noise assignment.

``make_immiscible(SchedulerClass)`` returns a subclass whose config carries the assignment settings
and whose ``add_noise`` / ``scale_noise`` assign the caller's noise tensor *in place* before noising.
That is what makes an unmodified diffusers training step correct::

    noise = torch.randn_like(x)
    noisy = scheduler.add_noise(x, noise, t)   # `noise` now holds the assigned noise
    loss = mse(model(noisy, t), noise)         # ... so the target is the assigned noise too

Inference pipelines (img2img, inpainting) call ``add_noise`` as well: turn the drop-in assignment
off with ``drop_in_assignment=False`` in the config, or temporarily with
``with scheduler.drop_in_assignment_disabled(): ...``. ``scheduler.assign_noise(x, noise)`` is the
explicit one-line API and works whatever the switch says.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import weakref
from collections.abc import Iterator
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

from .assignment import DEFAULT_BLOCK_SIZE, AssignmentStats, assign_noise, validate_assignment_options

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
_NOISING_METHODS = {"add_noise": "original_samples", "scale_noise": "sample"}


class ImmiscibleNoiseScheduler:
    """Mixin for a diffusers scheduler: batch noise assignment driven by the scheduler's config.

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
        """Return ``noise`` assigned to ``samples`` with this scheduler's settings (inputs untouched)."""
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

    def _assign_in_place(self, samples: torch.Tensor, noise: torch.Tensor) -> None:
        if not self.config.drop_in_assignment or self.config.assignment == "none":
            return
        if not isinstance(noise, torch.Tensor):
            raise TypeError(f"noise must be a torch.Tensor, got {type(noise).__name__}")
        # The same, unmodified tensor noised again (teacher and student of a consistency step, say)
        # keeps its assignment: re-assigning would draw new KNN candidates and break the pairing.
        last = getattr(self, "_last_assigned", None)
        if last is not None and last[0]() is noise and last[1] == noise._version:
            return
        if noise.requires_grad:
            raise ValueError(
                "noise requires grad, so it cannot be assigned in place; detach it, or call "
                "scheduler.assign_noise(samples, noise) and use the returned tensor"
            )
        if any(stride == 0 and size > 1 for stride, size in zip(noise.stride(), noise.shape)):
            raise ValueError(
                "noise is a broadcast view (stride 0), so it cannot be assigned in place; pass a "
                "materialised tensor (noise.clone()) or use scheduler.assign_noise(samples, noise)"
            )
        assigned = self.assign_noise(samples, noise)
        with torch.no_grad():
            noise.copy_(assigned)
        self._last_assigned = (weakref.ref(noise), noise._version)

    @contextlib.contextmanager
    def drop_in_assignment_disabled(self) -> Iterator[None]:
        """Within this block ``add_noise``/``scale_noise`` leave the noise as it is (for inference)."""
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


def _wrap_noising_method(base_method: Any, samples_argument: str) -> Any:
    signature = inspect.signature(base_method)

    @functools.wraps(base_method)
    def noising_with_assignment(self, *args, **kwargs):
        arguments = signature.bind(self, *args, **kwargs).arguments
        if arguments.get("noise") is not None:
            self._assign_in_place(arguments[samples_argument], arguments["noise"])
        return base_method(self, *args, **kwargs)

    return noising_with_assignment


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
    noising = {
        method: samples_argument
        for method, samples_argument in _NOISING_METHODS.items()
        if callable(getattr(scheduler_class, method, None))
        and "noise" in inspect.signature(getattr(scheduler_class, method)).parameters
    }
    if not noising:
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
    for method, samples_argument in noising.items():
        namespace[method] = _wrap_noising_method(getattr(scheduler_class, method), samples_argument)
    return type(name or f"Immiscible{scheduler_class.__name__}", (ImmiscibleNoiseScheduler, scheduler_class), namespace)


ImmiscibleDDPMScheduler = make_immiscible(DDPMScheduler)
ImmiscibleDDIMScheduler = make_immiscible(DDIMScheduler)
ImmiscibleEulerDiscreteScheduler = make_immiscible(EulerDiscreteScheduler)
ImmiscibleDPMSolverMultistepScheduler = make_immiscible(DPMSolverMultistepScheduler)
ImmiscibleLCMScheduler = make_immiscible(LCMScheduler)
ImmiscibleCMStochasticIterativeScheduler = make_immiscible(CMStochasticIterativeScheduler)
ImmiscibleFlowMatchEulerDiscreteScheduler = make_immiscible(FlowMatchEulerDiscreteScheduler)
