"""Immiscible Diffusion for Hugging Face diffusers: batch noise assignment for faster diffusion training."""

from .assignment import (
    AssignmentStats,
    assign_noise,
    cost_matrix,
    linear_assignment_permutation,
    solve_linear_assignment,
)
from .schedulers import (
    ImmiscibleCMStochasticIterativeScheduler,
    ImmiscibleDDIMScheduler,
    ImmiscibleDDPMScheduler,
    ImmiscibleDPMSolverMultistepScheduler,
    ImmiscibleEulerDiscreteScheduler,
    ImmiscibleFlowMatchEulerDiscreteScheduler,
    ImmiscibleLCMScheduler,
    ImmiscibleNoiseScheduler,
    make_immiscible,
)

__version__ = "0.1.0"

__all__ = [
    "AssignmentStats",
    "ImmiscibleCMStochasticIterativeScheduler",
    "ImmiscibleDDIMScheduler",
    "ImmiscibleDDPMScheduler",
    "ImmiscibleDPMSolverMultistepScheduler",
    "ImmiscibleEulerDiscreteScheduler",
    "ImmiscibleFlowMatchEulerDiscreteScheduler",
    "ImmiscibleLCMScheduler",
    "ImmiscibleNoiseScheduler",
    "assign_noise",
    "cost_matrix",
    "linear_assignment_permutation",
    "make_immiscible",
    "solve_linear_assignment",
]
