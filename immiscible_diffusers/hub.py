"""Publishing a training run's output folder to the Hugging Face Hub."""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import HfApi

from .training import CHECKPOINT_PREFIX, PARTIAL_CHECKPOINT_PREFIX

# Training state stays local: checkpoints hold optimizer state and are many times the model's size.
PUSH_IGNORE_PATTERNS = (
    f"{CHECKPOINT_PREFIX}*",
    f"{CHECKPOINT_PREFIX}*/**",
    f"{PARTIAL_CHECKPOINT_PREFIX}*",
    f"{PARTIAL_CHECKPOINT_PREFIX}*/**",
    ".old-checkpoint-*",
    ".old-checkpoint-*/**",
    "*.tmp",
)


def default_repo_name(output_dir: str | os.PathLike) -> str:
    """The repository name used when no ``--hub_model_id`` is given: the output folder's name."""
    return Path(output_dir).resolve().name


def create_hub_repo(
    output_dir: str | os.PathLike,
    repo_id: str | None = None,
    *,
    token: str | None = None,
    private: bool = False,
    api: HfApi | None = None,
) -> str:
    """Create the model repository if it does not exist; return its full id (``user/name``).

    ``repo_id`` defaults to the output folder's name under the token's user. Training scripts call
    this at start-up, as diffusers' examples do, so a bad token fails before hours of training.
    """
    api = api or HfApi(token=token)
    return api.create_repo(
        repo_id or default_repo_name(output_dir), private=private, exist_ok=True, token=token
    ).repo_id


def push_output_dir(
    output_dir: str | os.PathLike,
    repo_id: str | None = None,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload pipeline trained with immiscible-diffusers",
    api: HfApi | None = None,
    required_file: str = "model_index.json",
) -> str:
    """Create (if needed) the model repository and upload ``output_dir`` to it, without checkpoints.

    ``repo_id`` defaults to the output folder's name under the token's user. Returns the commit URL.
    ``required_file`` must exist in ``output_dir`` (LoRA runs pass ``"pytorch_lora_weights.safetensors"``).
    The endpoint and token come from ``api`` or huggingface_hub's usual settings (``HF_ENDPOINT``, ``HF_TOKEN``).
    """
    output_dir = Path(output_dir)
    if not (output_dir / required_file).is_file():
        raise ValueError(f"output_dir {str(output_dir)!r} holds no saved pipeline ({required_file}); nothing to push")
    api = api or HfApi(token=token)
    repo_id = create_hub_repo(output_dir, repo_id, token=token, private=private, api=api)
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=output_dir,
        commit_message=commit_message,
        ignore_patterns=list(PUSH_IGNORE_PATTERNS),
        token=token,
    )
    return str(getattr(commit, "commit_url", commit))
