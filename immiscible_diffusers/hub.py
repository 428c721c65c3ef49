"""Publishing a training run's output folder to the Hugging Face Hub.

One path serves every training script's ``--push_to_hub`` and the ``immiscible-diffusers push`` command:

1. ``plan_push`` checks the folder before any network call: a pipeline that stock diffusers loads (no
   custom scheduler class, safetensors weights, no pickles) and a model card that ``ModelCard.load`` reads
   with the metadata the Hub indexes; it lists the files to publish, leaving out checkpoints, logs and
   temporary files.
2. ``push_output_dir`` checks the repo id and the token, creates the repository (and the branch), and
   uploads the files in one commit with ``huggingface_hub``. The local folder is never modified; when the
   Hub cannot be reached, ``HubPushError`` says so and gives the command that retries.
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import json
import logging
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
from huggingface_hub import CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
from huggingface_hub.utils import validate_repo_id

from .checkpoints import CHECKPOINT_PREFIX, PARTIAL_CHECKPOINT_PREFIX, TRAINING_CONFIG_NAME
from .model_card import check_model_card
from .model_index import code_module, pipeline_class_name
from .schedulers import ImmiscibleNoiseScheduler

logger = logging.getLogger(__name__)

# Training state stays local: checkpoints hold optimizer state and are many times the model's size.
CHECKPOINT_PATTERNS = (f"{CHECKPOINT_PREFIX}*", f"{CHECKPOINT_PREFIX}*/**")
# Patterns (fnmatch on paths relative to the output folder, `*` crossing `/`) of what is never pushed:
# checkpoints (unless asked), partial and replaced checkpoints, tensorboard logs, console logs, temporary
# and hidden files. The `logs` folder is the training scripts' default --logging_dir; a run's own
# logging_dir (from training_config.json) is left out too.
PUSH_IGNORE_PATTERNS = (
    *CHECKPOINT_PATTERNS,
    f"{PARTIAL_CHECKPOINT_PREFIX}*",
    f"{PARTIAL_CHECKPOINT_PREFIX}*/**",
    ".old-checkpoint-*",
    ".old-checkpoint-*/**",
    "logs/**",
    "*.log",
    "*.tmp",
    "*.pid",
    "*/__pycache__/*",
    "__pycache__/*",
    ".*",
    "*/.*",
)
# Weights in these formats are pickles: loading them can run arbitrary code. Only safetensors are published.
PICKLE_SUFFIXES = (".bin", ".pkl", ".pickle", ".pt", ".pth", ".ckpt")
# model_index.json libraries that stock diffusers loads (plus `diffusers.pipelines.<name>` modules).
STOCK_LIBRARIES = ("diffusers", "transformers")
# diffusers' file name for LoRA adapter weights, which LoRA runs save instead of a pipeline.
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
DEFAULT_COMMIT_MESSAGE = "Upload pipeline trained with immiscible-diffusers"


class HubPushError(RuntimeError):
    """The Hub could not be reached or refused the upload; the local folder is unchanged.

    ``retry_command`` is the shell command that tries again.
    """

    def __init__(self, message: str, retry_command: str | None = None) -> None:
        super().__init__(message)
        self.retry_command = retry_command


@dataclass
class PushPlan:
    """What ``push_output_dir`` would publish from ``output_dir``."""

    output_dir: Path
    files: list[str]
    left_out: list[str] = field(default_factory=list)
    pipeline_class: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum((self.output_dir / name).stat().st_size for name in self.files)

    def describe(self) -> str:
        """A few lines for the console: the file count and size, what was left out, notes."""
        lines = [f"{len(self.files)} files ({self.total_bytes / 1e6:.1f} MB) from {self.output_dir}"]
        if self.left_out:
            lines.append("left out: " + ", ".join(self.left_out))
        lines += self.notes
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Checks before any network call
# --------------------------------------------------------------------------------------------------


def default_repo_name(output_dir: str | os.PathLike) -> str:
    """The repository name used when no ``--hub_model_id`` is given: the output folder's name."""
    return Path(output_dir).resolve().name


def check_repo_id(repo_id: str, argument: str = "repo_id") -> str:
    """Return ``repo_id`` if it is a valid Hub model id (``name`` or ``namespace/name``), else raise ``ValueError``.

    ``argument`` names the flag in the message (``--repo-id``, ``--hub_model_id``).
    """
    if not isinstance(repo_id, str):
        raise ValueError(f"{argument} must be a string like 'user/name', got {type(repo_id).__name__}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(
            f"{argument} {repo_id!r} is not a valid Hub repository id: expected 'name' or 'namespace/name' made of "
            f"letters, digits, '-', '_' and '.', at most 96 characters ({error})"
        ) from None
    return repo_id


def resolve_token(token: str | None = None, api: HfApi | None = None) -> str:
    """The token to push with: ``token``, ``api``'s, else ``HF_TOKEN`` or the one saved by ``hf auth login``."""
    token = token or (api.token if api is not None and isinstance(api.token, str) else None) or get_token()
    if not token:
        raise ValueError(
            "no Hugging Face token: pass one with --token (--hub_token in the training scripts), set the HF_TOKEN "
            "environment variable, or log in once with `hf auth login`; it needs write access"
        )
    return token


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{what} {str(path)!r} is not readable JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {str(path)!r} does not hold a JSON object")
    return data


def _select_files(output_dir: Path, include_checkpoints: bool) -> tuple[list[str], list[str]]:
    """The files to publish (relative POSIX paths) and a short description of what was left out."""
    ignore = [p for p in PUSH_IGNORE_PATTERNS if p not in CHECKPOINT_PATTERNS]
    config_path = output_dir / TRAINING_CONFIG_NAME
    if config_path.is_file():
        logging_dir = _read_json(config_path, "training config").get("logging_dir")
        if isinstance(logging_dir, str) and logging_dir and not os.path.isabs(logging_dir):
            ignore.append(Path(logging_dir).as_posix().rstrip("/") + "/**")
    files, left_out = [], {}
    for path in sorted(p for p in output_dir.rglob("*") if p.is_file()):
        name = path.relative_to(output_dir).as_posix()
        top = name.split("/", 1)[0] + ("/" if "/" in name else "")
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in ignore):
            left_out[top] = True
        elif any(fnmatch.fnmatchcase(name, pattern) for pattern in CHECKPOINT_PATTERNS) and "/" in name:
            # With --include-checkpoints only the models saved with save_pretrained (checkpoint-N/unet/, ...) and
            # LoRA adapters go; the other files at a checkpoint's top level are accelerate's training state
            # (optimizer, RNG pickles, a copy of the raw model).
            if include_checkpoints and (name.count("/") >= 2 or name.endswith("/" + LORA_WEIGHTS_NAME)):
                files.append(name)
            else:
                left_out[top + (" training state" if include_checkpoints else "")] = True
        else:
            files.append(name)
    return files, list(left_out)


def _check_pipeline(output_dir: Path) -> tuple[str, list[str]]:
    """Check that stock diffusers loads the saved pipeline; return its class name and notes for the user."""
    index = _read_json(output_dir / "model_index.json", "model_index.json")
    pipeline_class = pipeline_class_name(index)
    notes = []
    if pipeline_class is None:
        raise ValueError(
            f"{output_dir / 'model_index.json'} names no pipeline class (_class_name: a class name, or "
            "[module, class] for a pipeline shipped as code)"
        )
    module = code_module(index)
    if module is not None or pipeline_class not in dir(diffusers):
        # A pipeline class outside diffusers loads from the Hub only with its code in the repo, named in
        # model_index.json as [module, class] (diffusers' convention; then trust_remote_code=True loads it).
        code = output_dir / f"{module or 'pipeline'}.py"
        if not (code.is_file() and re.search(rf"^class {re.escape(pipeline_class)}\b", code.read_text(), re.MULTILINE)):
            raise ValueError(
                f"the pipeline class {pipeline_class} (model_index.json) is not a diffusers class and no {code.name} "
                "in the output folder defines it, so nobody could load this folder with plain diffusers"
            )
        if module is None:
            raise ValueError(
                f"model_index.json names the custom pipeline class {pipeline_class} without its module: write "
                f'"_class_name": ["pipeline", "{pipeline_class}"] so that DiffusionPipeline.from_pretrained(repo_id, '
                "trust_remote_code=True) loads it from pipeline.py (save_flow_matching_pipeline does this)"
            )
        notes.append(
            f"{pipeline_class} is a custom pipeline shipped as {code.name}: users load it with "
            "DiffusionPipeline.from_pretrained(repo_id, trust_remote_code=True)"
        )
    for component, spec in index.items():
        # Components are [library, class]; [null, null] is an absent optional one; other values are settings.
        if component.startswith("_") or not isinstance(spec, list) or spec == [None, None]:
            continue
        if not (len(spec) == 2 and all(isinstance(s, str) for s in spec)):
            raise ValueError(f"model_index.json: component {component!r} is {spec!r}, expected [library, class]")
        library, class_name = spec
        stock = library in STOCK_LIBRARIES or (
            "." not in library and importlib.util.find_spec(f"diffusers.pipelines.{library}") is not None
        )
        if not stock:
            hint = (
                f"convert it in place with `immiscible-diffusers stock-scheduler {shlex.quote(str(output_dir))}`"
                if class_name.startswith("Immiscible")
                else f"save {component}/ with a stock diffusers or transformers class"
            )
            raise ValueError(
                f"{component} is {library}.{class_name}, which plain diffusers cannot load from the Hub. Publish the "
                f"stock class (inference does not depend on how the noise was paired in training): {hint}"
            )
        if library == "diffusers" and class_name not in dir(diffusers):
            raise ValueError(f"model_index.json: {component} names {class_name}, which diffusers does not have")
        if not (output_dir / component).is_dir():
            raise ValueError(f"model_index.json lists the component {component!r} but {component}/ is missing")
    scheduler_config = output_dir / "scheduler" / "scheduler_config.json"
    if scheduler_config.is_file():
        scheduler_class = _read_json(scheduler_config, "scheduler config").get("_class_name")
        if scheduler_class not in dir(diffusers):
            raise ValueError(
                f"scheduler/scheduler_config.json names {scheduler_class}, which is not a stock diffusers scheduler: "
                f"convert it with `immiscible-diffusers stock-scheduler {shlex.quote(str(output_dir))}`"
            )
    return pipeline_class, notes


def _check_weights(files: list[str]) -> None:
    pickles = [name for name in files if name.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ValueError(
            f"the output folder holds pickle files that would be published: {pickles[:5]}"
            f"{' ...' if len(pickles) > 5 else ''}. Only safetensors weights are published (pickles can run code "
            "when loaded): save the model with save_pretrained(..., safe_serialization=True) and delete the pickles"
        )
    if not any(name.endswith(".safetensors") for name in files):
        raise ValueError("the output folder holds no .safetensors weights to publish")
    # Every model folder (config.json beside its weights) needs safetensors weights.
    folders = {name.rsplit("/", 1)[0] for name in files if name.endswith("/config.json")}
    for folder in sorted(folders):
        if not any(name.startswith(folder + "/") and ".safetensors" in name for name in files):
            raise ValueError(f"{folder}/ has a config.json but no .safetensors weights")


def plan_push(
    output_dir: str | os.PathLike,
    *,
    required_file: str = "model_index.json",
    include_checkpoints: bool = False,
) -> PushPlan:
    """Check ``output_dir`` without any network call and list what would be published.

    Raises ``ValueError`` with what to fix when the folder holds no loadable pipeline (``required_file``,
    ``model_index.json`` for a pipeline, ``pytorch_lora_weights.safetensors`` for LoRA weights), names a
    class that only this project provides, holds pickles or lacks safetensors weights, or when its model
    card (``README.md``) does not load or lacks the metadata the Hub indexes.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise ValueError(f"output folder {str(output_dir)!r} does not exist")
    if not (output_dir / required_file).is_file():
        raise ValueError(
            f"output folder {str(output_dir)!r} holds no saved pipeline ({required_file}); nothing to push"
        )
    files, left_out = _select_files(output_dir, include_checkpoints)
    pipeline_class, notes = None, []
    if "model_index.json" in files:
        pipeline_class, notes = _check_pipeline(output_dir)
    _check_weights(files)
    if "README.md" not in files:
        raise ValueError(
            f"output folder {str(output_dir)!r} has no model card (README.md); the training scripts write one"
        )
    check_model_card(output_dir / "README.md", available_files=set(files))
    return PushPlan(output_dir, files, left_out, pipeline_class, notes)


# --------------------------------------------------------------------------------------------------
# The pushed card loads the pushed repository
# --------------------------------------------------------------------------------------------------


def _card_references(output_dir: Path) -> tuple[set[str], set[str]]:
    """How the card's usage snippet may name this model: the run's folder paths and repo ids, and bare repo names
    (``--hub_model_id name`` or the default, the folder's name) that the Hub put under the token's user."""
    references = {str(output_dir), output_dir.as_posix(), str(output_dir.resolve())}
    names = set()
    config_path = output_dir / TRAINING_CONFIG_NAME
    if config_path.is_file():
        config = _read_json(config_path, "training config")
        if isinstance(config.get("output_dir"), str):
            references.add(config["output_dir"])
        hub_model_id = config.get("hub_model_id")
        if isinstance(hub_model_id, str) and hub_model_id:
            (references if "/" in hub_model_id else names).add(hub_model_id)
        elif config.get("push_to_hub"):
            names.add(default_repo_name(output_dir))
    return references, names


def card_for_repo(card_text: str, repo_id: str, references: set[str], repo_names: set[str] = frozenset()) -> str:
    """The card text with its usage snippet loading ``repo_id`` instead of what it was written for.

    Only the first argument of ``from_pretrained(...)`` / ``load_lora_weights(...)`` calls changes, and only where
    it is one of ``references`` (local paths, repo ids) or ``<namespace>/<name>`` for a name in ``repo_names``;
    any other id (a base model's) stays.
    """
    targets = [re.escape(reference) for reference in references if reference]
    targets += [rf"[\w.-]+/{re.escape(name)}" for name in repo_names if name]
    if not targets:
        return card_text
    alternatives = "|".join(sorted(targets, key=len, reverse=True))
    pattern = re.compile(rf"((?:from_pretrained|load_lora_weights)\(\s*)([\"'])(?:{alternatives})\2")
    return pattern.sub(lambda match: f"{match.group(1)}{match.group(2)}{repo_id}{match.group(2)}", card_text)


# --------------------------------------------------------------------------------------------------
# The network part
# --------------------------------------------------------------------------------------------------


def retry_command(
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    include_checkpoints: bool = False,
) -> str:
    """The ``immiscible-diffusers push`` command line that publishes ``output_dir`` to ``repo_id``."""
    parts = ["immiscible-diffusers", "push", str(output_dir), "--repo-id", repo_id]
    if private:
        parts.append("--private")
    if revision:
        parts += ["--revision", revision]
    if include_checkpoints:
        parts.append("--include-checkpoints")
    return shlex.join(parts)


def _root_cause(error: BaseException) -> BaseException:
    """The HTTP or connection error behind ``error`` (huggingface_hub wraps some, e.g. failed LFS uploads)."""
    seen = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (HfHubHTTPError, ConnectionError, TimeoutError)) or type(current).__module__.startswith(
            ("httpx", "httpcore")
        ):
            return current
        current = current.__cause__ or current.__context__
    return error


def _explain_hub_error(error: BaseException, endpoint: str, repo_id: str) -> str:
    """One sentence on why the Hub call failed."""
    error = _root_cause(error)
    if isinstance(error, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set, so huggingface_hub makes no network calls: unset it (or set it to 0)"
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        status = error.response.status_code
        server_message = getattr(error, "server_message", None) or ""
        detail = f" ({server_message})" if server_message else ""
        if status == 401:
            return f"the Hub rejected the token (401 Unauthorized){detail}: check it with `hf auth whoami`"
        if status == 403:
            return f"the token may not write to {repo_id} (403 Forbidden){detail}: use a token with write access"
        if status == 404:
            return f"the Hub found no repository or branch {repo_id} for this token (404){detail}"
        return f"the Hub answered {status}{detail}"
    if isinstance(error, (ConnectionError, TimeoutError)) or type(error).__module__.startswith(("httpx", "httpcore")):
        return f"could not reach the Hub at {endpoint} ({type(error).__name__}: {error}); check the network connection"
    return f"the upload failed ({type(error).__name__}: {error})"


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
    this at start-up, as diffusers' examples do, so a bad repo id, a missing token or an unreachable Hub
    fails before hours of training (``ValueError`` / ``HubPushError``).
    """
    repo_id = check_repo_id(repo_id or default_repo_name(output_dir), "repo_id (--hub_model_id / --repo-id)")
    api = api or HfApi()
    token = resolve_token(token, api)
    try:
        return api.create_repo(repo_id, private=private, exist_ok=True, token=token).repo_id
    except Exception as error:
        reason = _explain_hub_error(error, api.endpoint, repo_id)
        raise HubPushError(
            f"could not create the Hub repository {repo_id}: {reason}. To train now and publish later, leave out "
            f"--push_to_hub and run `{retry_command(output_dir, repo_id, private=private)}` when training is done."
        ) from error


def push_output_dir(
    output_dir: str | os.PathLike,
    repo_id: str | None = None,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    api: HfApi | None = None,
    required_file: str = "model_index.json",
    revision: str | None = None,
    include_checkpoints: bool = False,
    plan: PushPlan | None = None,
) -> str:
    """Check ``output_dir``, create (if needed) the model repository and upload the folder in one commit.

    ``repo_id`` defaults to the output folder's name under the token's user. Returns the commit URL.
    ``required_file`` must exist in ``output_dir`` (LoRA runs pass ``"pytorch_lora_weights.safetensors"``).
    ``revision`` names a branch (created from ``main`` when missing). Checkpoints are left out unless
    ``include_checkpoints``, which adds the models saved in them (``checkpoint-*/unet/`` ...), never their
    training state. The endpoint and token come from ``api`` or huggingface_hub's usual settings
    (``HF_ENDPOINT``, ``HF_TOKEN``, ``hf auth login``).

    Raises ``ValueError`` before any network call (see ``plan_push``; a malformed repo id; no token) and
    ``HubPushError`` when the Hub cannot be reached or refuses; ``output_dir`` is never modified.
    """
    output_dir = Path(output_dir)
    plan = plan or plan_push(output_dir, required_file=required_file, include_checkpoints=include_checkpoints)
    repo_id = check_repo_id(repo_id or default_repo_name(output_dir), "repo_id (--repo-id / --hub_model_id)")
    if revision is not None and not revision.strip():
        raise ValueError("revision (--revision) must be a branch name, got an empty string")
    if not commit_message or not commit_message.strip():
        raise ValueError("commit_message (--commit-message) must not be empty")
    api = api or HfApi()
    token = resolve_token(token, api)
    card_path = output_dir / "README.md"

    target = repo_id
    try:
        target = api.create_repo(repo_id, private=private, exist_ok=True, token=token).repo_id
        if revision and revision != "main" and not revision.startswith("refs/"):
            api.create_branch(target, branch=revision, exist_ok=True, token=token)
        card = card_for_repo(card_path.read_text(encoding="utf-8"), target, *_card_references(output_dir))
        operations = [
            CommitOperationAdd(
                path_in_repo=name,
                path_or_fileobj=card.encode("utf-8") if name == "README.md" else str(output_dir / name),
            )
            for name in plan.files
        ]
        logger.info("Pushing %s to %s", plan.describe(), target)
        commit = api.create_commit(
            repo_id=target,
            operations=operations,
            commit_message=commit_message,
            revision=revision,
            token=token,
        )
    except Exception as error:
        reason = _explain_hub_error(error, api.endpoint, target)
        command = retry_command(
            output_dir, target, private=private, revision=revision, include_checkpoints=include_checkpoints
        )
        raise HubPushError(
            f"pushing {output_dir} to {target} failed: {reason}. Nothing in {output_dir} was changed and it still "
            f"holds the complete pipeline; nothing was committed to the Hub. Retry with:\n  {command}",
            retry_command=command,
        ) from error
    return str(commit.commit_url)


def convert_to_stock_scheduler(output_dir: str | os.PathLike) -> str:
    """Rewrite ``output_dir/scheduler/`` and ``model_index.json`` with the stock class of an immiscible scheduler.

    Inference does not depend on how the noise was paired in training, so nothing changes for sampling; the
    assignment settings leave the scheduler config (the model card keeps them). Returns the stock class name.
    """
    output_dir = Path(output_dir)
    index_path = output_dir / "model_index.json"
    if not index_path.is_file():
        raise ValueError(f"output folder {str(output_dir)!r} holds no saved pipeline (model_index.json)")
    index = _read_json(index_path, "model_index.json")
    spec = index.get("scheduler")
    if not (isinstance(spec, list) and len(spec) == 2 and all(isinstance(s, str) for s in spec)):
        raise ValueError(f"{index_path} lists no scheduler component")
    library, class_name = spec
    if library in STOCK_LIBRARIES:
        return class_name
    scheduler_class = getattr(importlib.import_module(library), class_name, None)
    if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, ImmiscibleNoiseScheduler)):
        raise ValueError(f"the scheduler {library}.{class_name} is no immiscible scheduler; save a stock one by hand")
    stock = scheduler_class.from_pretrained(output_dir, subfolder="scheduler").to_stock_scheduler()
    stock.save_pretrained(output_dir / "scheduler")
    index["scheduler"] = ["diffusers", type(stock).__name__]
    partial = index_path.with_name(index_path.name + ".tmp")
    partial.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    os.replace(partial, index_path)
    return type(stock).__name__
