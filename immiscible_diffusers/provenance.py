"""Where a number came from: the code version, command, machine and date recorded with every result.

Every results file the project commits (benchmarks, the main job, evaluations) carries ``provenance()``;
benchmarks that reuse earlier runs key them on ``code_version()``, so a change to the code that produced a
run invalidates it.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
# Sources whose content decides the numbers a training run or benchmark produces.
CODE_GLOBS = ("immiscible_diffusers/*.py", "training_scripts/*.py", "benchmarks/*.py")


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", *args], cwd=REPO_DIR, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def git_commit() -> str | None:
    """The checkout's commit, with ``-dirty`` when tracked source files differ from it; None outside git."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return None
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", *CODE_GLOBS)
    return f"{commit}-dirty" if dirty else commit


def code_version(paths: Iterable[str | os.PathLike] | None = None) -> str:
    """A short hash of the source files that produce the numbers (default: package, scripts, benchmarks).

    Unlike the git commit it ignores edits to docs and tests, and it sees uncommitted edits to the code.
    """
    if paths is None:
        files = sorted({p for pattern in CODE_GLOBS for p in REPO_DIR.glob(pattern)})
    else:
        files = sorted(Path(p).resolve() for p in paths)
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(REPO_DIR) if path.is_relative_to(REPO_DIR) else path.name).encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def machine_description() -> str:
    """One line naming the processor, core count, torch build and, if any, the GPU."""
    processor = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    processor = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    parts = [
        processor,
        f"{os.cpu_count()} cores",
        f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()})",
    ]
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name(0)}")
    return ", ".join(parts)


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that is running, as a shell would take it (script path relative to the repository)."""
    argv = list(sys.argv if argv is None else argv)
    if argv:
        script = Path(argv[0])
        if script.is_absolute() and script.is_relative_to(REPO_DIR):
            argv[0] = str(script.relative_to(REPO_DIR))
    return "python " + shlex.join(argv) if argv else "python"


def provenance(command: str | None = None) -> dict[str, str | None]:
    """The record every results file carries: command, git commit, code version, machine and date (UTC)."""
    return {
        "command": command or command_line(),
        "git_commit": git_commit(),
        "code_version": code_version(),
        "machine": machine_description(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def provenance_markdown(record: dict[str, str | None]) -> str:
    """The provenance record as the lines that head a results markdown file."""
    return "\n".join(
        [
            f"- command: `{record['command']}`",
            f"- git commit: `{record['git_commit']}` (code version `{record['code_version']}`)",
            f"- machine: {record['machine']}",
            f"- date: {record['date']}",
        ]
    )
