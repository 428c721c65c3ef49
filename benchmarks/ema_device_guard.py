#!/usr/bin/env python
"""Run a training script with a check on every EMA update: the EMA weights must sit on the model's device.

    python benchmarks/ema_device_guard.py training_scripts/train_flow_matching.py --use_ema ...

After ``accelerator.load_state`` the EMA weights come back on the CPU; a script that forgets to move
them to the model's device mixes devices on CUDA from the first step after a resume. This wrapper
(used by ``benchmarks/gpu_check.py``) wraps ``diffusers.training_utils.EMAModel.step`` so that such a
step fails with a clear message, and prints ``ema-device-guard: N steps checked`` at exit so that the
caller can tell the check ran. It changes nothing else: the script runs as ``python script.py ...``.
"""

from __future__ import annotations

import atexit
import runpy
import sys

import torch
from diffusers.training_utils import EMAModel

GUARD_PREFIX = "ema-device-guard:"
_checked = 0
_original_step = EMAModel.step


def _guarded_step(self: EMAModel, parameters, *args, **kwargs):
    global _checked
    parameters = list(parameters)
    for shadow, parameter in zip(self.shadow_params, parameters):
        if isinstance(parameter, torch.Tensor) and shadow.device != parameter.device:
            raise RuntimeError(
                f"{GUARD_PREFIX} the EMA weights are on {shadow.device} but the model is on {parameter.device} "
                "(were they moved back to the model's device after accelerator.load_state?)"
            )
    _checked += 1
    return _original_step(self, parameters, *args, **kwargs)


def main() -> None:
    if len(sys.argv) < 2:
        print("error: usage: ema_device_guard.py SCRIPT [ARGS...]", file=sys.stderr)
        sys.exit(2)
    EMAModel.step = _guarded_step
    atexit.register(lambda: print(f"{GUARD_PREFIX} {_checked} steps checked", flush=True))
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
