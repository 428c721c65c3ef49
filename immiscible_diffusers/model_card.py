"""Model cards (``README.md``) for the pipelines the training scripts save.

The card's YAML metadata carries what the Hub indexes (``library_name``, ``pipeline_tag``, ``tags``,
``datasets``, ``license``, ``base_model``) plus a custom ``immiscible_diffusers:`` dict with the
training configuration that evaluation and publishing read back (``read_card_metadata``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

CARD_METADATA_KEY = "immiscible_diffusers"
# Keys every card's `immiscible_diffusers:` dict has (evaluation adds `metrics`).
REQUIRED_CARD_KEYS = (
    "script",
    "assignment",
    "knn_k",
    "assignment_distance",
    "assignment_dtype",
    "assignment_scope",
    "prediction_type",
    "train_batch_size",
    "resolution",
    "global_step",
    "seed",
    "dataset",
)
BASE_TAGS = ("diffusers", "diffusers-training", "immiscible-diffusion")

PAPER_CITATION = """\
@inproceedings{li2024immiscible,
  title     = {Immiscible Diffusion: Accelerating Diffusion Training with Noise Assignment},
  author    = {Li, Yiheng and Jiang, Heyang and Kodaira, Akio and Tomizuka, Masayoshi and Keutzer, Kurt
               and Xu, Chenfeng},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2024},
  eprint    = {2406.12303},
  archivePrefix = {arXiv}
}"""

_METHOD_DESCRIPTIONS = {
    "linear": (
        "**linear assignment** (Immiscible Diffusion, arXiv:2406.12303): before noising, each batch's Gaussian "
        "noise was re-paired with its images by the permutation that minimises the total image-noise distance; "
        "the assigned noise was both the noising input and the training target."
    ),
    "knn": (
        "**KNN assignment** (Improved Immiscible Diffusion, arXiv:2505.18521): for each image the nearest of "
        "`knn_k` Gaussian noise candidates was kept; that noise was both the noising input and the training target."
    ),
    "none": (
        "**no assignment** (the vanilla baseline): the noise was paired with the images at random, as in standard "
        "diffusion training. It was trained with the same seeds as its immiscible counterpart, for comparison."
    ),
}


def training_card_metadata(args: Any, *, script: str, global_step: int, dataset: str, **extra: Any) -> dict[str, Any]:
    """The ``immiscible_diffusers:`` dict for a run: the required keys read from ``args``, then ``extra``."""
    values = vars(args) if not isinstance(args, Mapping) else dict(args)
    metadata = {"script": script, "global_step": global_step, "dataset": dataset}
    for key in REQUIRED_CARD_KEYS:
        if key not in metadata:
            if key not in values:
                raise ValueError(f"args has no {key!r}, which the model card metadata needs")
            metadata[key] = values[key]
    metadata.update(extra)
    return metadata


def _format_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def build_model_card(
    *,
    title: str,
    metadata: Mapping[str, Any],
    pipeline_tag: str,
    usage_code: str,
    summary: str = "",
    training_config: Mapping[str, Any] | None = None,
    hub_datasets: Iterable[str] = (),
    base_model: str | None = None,
    extra_tags: Iterable[str] = (),
    sample_grid: str | None = None,
    license: str = "apache-2.0",
) -> ModelCard:
    """A ``ModelCard`` for a pipeline trained by one of our scripts.

    Args:
        title: the card's heading.
        metadata: the ``immiscible_diffusers:`` dict; must contain every key of ``REQUIRED_CARD_KEYS``.
        pipeline_tag: the Hub task, e.g. ``"unconditional-image-generation"``.
        usage_code: a Python snippet that loads and runs the pipeline with stock diffusers.
        summary: a paragraph about the model, placed before the method description.
        training_config: the table of training settings shown in the body (defaults to ``metadata``).
        hub_datasets: Hub dataset ids for the ``datasets:`` metadata (leave empty for local data).
        base_model: the Hub id of the model fine-tuned, if any.
        extra_tags: tags beyond ``diffusers``, ``diffusers-training``, ``immiscible-diffusion`` and
            ``assignment-<method>``.
        sample_grid: path of a sample image relative to the card, shown in the body.
    """
    missing = [key for key in REQUIRED_CARD_KEYS if key not in metadata]
    if missing:
        raise ValueError(f"metadata is missing the keys {missing} (required: {list(REQUIRED_CARD_KEYS)})")
    method = metadata["assignment"]
    tags = list(dict.fromkeys([*BASE_TAGS, f"assignment-{method}", *extra_tags]))
    card_data = ModelCardData(
        library_name="diffusers",
        pipeline_tag=pipeline_tag,
        license=license,
        tags=tags,
        datasets=list(hub_datasets) or None,
        base_model=base_model,
        **{CARD_METADATA_KEY: dict(metadata)},
    )
    rows = "\n".join(f"| `{key}` | {_format_value(value)} |" for key, value in (training_config or metadata).items())
    sections = [
        f"# {title}",
        summary,
        f"Trained with {_METHOD_DESCRIPTIONS.get(method, f'assignment `{method}`.')}",
        "Inference does not depend on how the noise was paired during training: the pipeline uses the stock "
        "diffusers classes and loads without this project installed.",
        f"## Usage\n\n```python\n{usage_code.strip()}\n```",
        f"## Samples\n\n![samples]({sample_grid})" if sample_grid else "",
        f"## Training configuration\n\n| setting | value |\n|---|---|\n{rows}",
        f"Trained with the immiscible-diffusers script `{metadata['script']}`: "
        f"{metadata['global_step']} optimizer steps on `{metadata['dataset']}`.",
        f"## Citation\n\n```bibtex\n{PAPER_CITATION}\n```"
        + ("\n\nKNN assignment: *Improved Immiscible Diffusion*, arXiv:2505.18521." if method == "knn" else ""),
    ]
    body = "\n\n".join(section for section in sections if section)
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}\n")


def write_model_card(output_dir: str | os.PathLike, **card_arguments: Any) -> Path:
    """Build the card (see ``build_model_card`` for the arguments) and save it as ``output_dir/README.md``."""
    path = Path(output_dir) / "README.md"
    partial = path.with_name("README.md.tmp")
    build_model_card(**card_arguments).save(partial)
    os.replace(partial, path)
    return path


def read_card_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The YAML metadata of a saved card (a folder holding ``README.md``, or the file itself) as a dict."""
    path = Path(path)
    if path.is_dir():
        path = path / "README.md"
    return ModelCard.load(path).data.to_dict()
