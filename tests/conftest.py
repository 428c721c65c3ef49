"""Shared runners for the training-script tests: the offline environment, subprocess runs, in-process loading."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "training_scripts"


def script_env(**overrides: str) -> dict[str, str]:
    """The environment of a script run: offline, one thread, unbuffered, one process (no WORLD_SIZE)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    env.update(overrides)
    return {key: value for key, value in env.items() if value}


def run_command(
    command: list[str], timeout: float = 240, check: bool = True, **env: str
) -> subprocess.CompletedProcess:
    """Run ``command`` from the repository root; on a timeout kill its process group and fail the test."""
    process = subprocess.Popen(
        command,
        env=script_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{command} timed out after {timeout} s:\n{stdout[-3000:]}\n{stderr[-5000:]}")
    if check:
        assert process.returncode == 0, f"{command} failed:\n{stdout[-3000:]}\n{stderr[-5000:]}"
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def run_script(name: str, *flags: str, timeout: float = 240, check: bool = True, **env: str):
    """Run ``training_scripts/<name>.py`` with ``flags`` in a subprocess, as a user would."""
    return run_command([sys.executable, str(SCRIPTS / f"{name}.py"), *flags], timeout, check, **env)


def load_script(name: str) -> ModuleType:
    """Import ``training_scripts/<name>.py`` as a module (under a name of its own)."""
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fresh_accelerate_state():
    """accelerate's process-wide state reset before and after the test (for in-process ``main`` runs)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
