"""Model cards (``README.md``) for the pipelines the training scripts save.

The card's YAML metadata carries what the Hub indexes (``library_name``, ``pipeline_tag``, ``tags``,
``datasets``, ``license``, ``base_model``) plus a custom ``immiscible_diffusers:`` dict with the
training configuration that evaluation and publishing read back (``read_card_metadata``). Evaluation
scores go both into that dict (``metrics``) and into ``model-index`` (``record_scores_in_card``), the only
place the Hub shows evaluation results from.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

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
KNN_CITATION = """\
@article{li2025improved,
  title   = {Improved Immiscible Diffusion: Accelerate Diffusion Training by Reducing Its Miscibility},
  author  = {Li, Yiheng and Liang, Feng and Kondratyuk, Dan and Tomizuka, Masayoshi and Keutzer, Kurt
             and Xu, Chenfeng},
  journal = {arXiv preprint arXiv:2505.18521},
  year    = {2025}
}"""

# The evaluation section sits between these markers so that a later evaluation replaces it.
EVALUATION_START = "<!-- immiscible-diffusers:evaluation:start -->"
EVALUATION_END = "<!-- immiscible-diffusers:evaluation:end -->"
EVALUATION_FOLDER = "evaluation"
# What `python -m immiscible_diffusers.evaluate` writes to its --output_dir (see evaluate.py).
EVALUATION_FILES = ("quality.png", "quality.md", "quality.csv")

_METHOD_DESCRIPTIONS = {
    "linear": (
        "**linear assignment** (Immiscible Diffusion, arXiv:2406.12303): before noising, each batch's Gaussian "
        "noise was re-paired with its images by the permutation that minimises the total image-noise distance; "
        "every noisy input (and, where the objective uses the noise, the training target) was built from the "
        "assigned noise."
    ),
    "knn": (
        "**KNN assignment** (Improved Immiscible Diffusion, arXiv:2505.18521): for each image the nearest of "
        "`knn_k` Gaussian noise candidates was kept, and every noisy input (and, where the objective uses the "
        "noise, the training target) was built from it."
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


def _citation_section(method: str) -> str:
    section = f"## Citation\n\n```bibtex\n{PAPER_CITATION}\n```"
    if method == "knn":
        section += f"\n\nThe KNN assignment comes from the follow-up paper:\n\n```bibtex\n{KNN_CITATION}\n```"
    return section


def evaluation_section(
    plot: str | None = None, table: str | None = None, metrics: Mapping[str, Any] | None = None, csv: str | None = None
) -> str:
    """The card's "Sample quality vs training steps" section, between the evaluation markers.

    Args:
        plot: path of the quality-vs-steps plot relative to the card (``evaluation/quality.png``).
        table: the Markdown tables written by the evaluator (``quality.md``).
        metrics: this model's last scores, the ``metrics`` dict that ``evaluate --update_model_cards`` adds.
        csv: path of the raw scores relative to the card.
    """
    if not (plot or table or metrics):
        raise ValueError("evaluation_section needs at least one of plot, table or metrics")
    parts = [
        EVALUATION_START,
        "## Sample quality vs training steps",
        "Every checkpoint of the run(s) below was sampled with the same starting noise and scored with "
        "`python -m immiscible_diffusers.evaluate` (lower is better).",
    ]
    if metrics:
        scores = [
            f"- `{name}`: **{score.get('value')}** at step {score.get('step')} ({score.get('sampler')}, "
            f"{score.get('num_inference_steps')} steps, {score.get('num_samples')} samples)"
            for name, score in metrics.items()
            if isinstance(score, Mapping)
        ]
        if scores:
            parts.append("This model's last evaluated scores:\n\n" + "\n".join(scores))
    if plot:
        parts.append(f"![sample quality vs training steps]({plot})")
    if table:
        # The evaluator's headings are level 3; keep them below this section's level-2 heading.
        parts.append(re.sub(r"^#{1,2} ", "### ", table.strip(), flags=re.MULTILINE))
    if csv:
        parts.append(f"Every score, per checkpoint: [{csv}]({csv}).")
    parts.append(EVALUATION_END)
    return "\n\n".join(parts)


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
    evaluation_plot: str | None = None,
    evaluation_table: str | None = None,
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
        license: the ``license:`` metadata (a Hub license id).
        evaluation_plot: path of the evaluator's quality-vs-steps plot relative to the card, if it ran.
        evaluation_table: the evaluator's Markdown tables (``quality.md``), if it ran.
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
    has_evaluation = evaluation_plot or evaluation_table or metadata.get("metrics")
    sections = [
        f"# {title}",
        summary,
        f"Trained with {_METHOD_DESCRIPTIONS.get(method, f'assignment `{method}`.')}",
        "Inference does not depend on how the noise was paired during training: the UNet and scheduler are stock "
        "diffusers classes (a pipeline class outside diffusers ships its code as `pipeline.py`).",
        f"## Usage\n\n```python\n{usage_code.strip()}\n```",
        f"## Samples\n\n![samples]({sample_grid})" if sample_grid else "",
        evaluation_section(evaluation_plot, evaluation_table, metadata.get("metrics")) if has_evaluation else "",
        f"## Training configuration\n\n| setting | value |\n|---|---|\n{rows}",
        f"Trained with the immiscible-diffusers script `{metadata['script']}`: "
        f"{metadata['global_step']} optimizer steps on `{metadata['dataset']}`.",
        _citation_section(method),
    ]
    body = "\n\n".join(section for section in sections if section)
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}\n")


def _save_card_atomically(card: ModelCard, path: Path) -> Path:
    partial = path.with_name(path.name + ".tmp")
    card.save(partial)
    os.replace(partial, path)
    return path


def write_model_card(output_dir: str | os.PathLike, **card_arguments: Any) -> Path:
    """Build the card (see ``build_model_card`` for the arguments) and save it as ``output_dir/README.md``."""
    return _save_card_atomically(build_model_card(**card_arguments), Path(output_dir) / "README.md")


def read_card_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The YAML metadata of a saved card (a folder holding ``README.md``, or the file itself) as a dict."""
    path = Path(path)
    if path.is_dir():
        path = path / "README.md"
    return ModelCard.load(path).data.to_dict()


def add_evaluation_to_card(output_dir: str | os.PathLike, evaluation_dir: str | os.PathLike) -> Path:
    """Copy the evaluator's plot and tables into ``output_dir/evaluation/`` and show them in the card.

    ``evaluation_dir`` is the ``--output_dir`` of ``python -m immiscible_diffusers.evaluate`` (``quality.png``,
    ``quality.md``, ``quality.csv``). The section replaces an earlier one; the rest of the card is kept.
    Returns the card's path.
    """
    output_dir, evaluation_dir = Path(output_dir), Path(evaluation_dir)
    card_path = output_dir / "README.md"
    if not card_path.is_file():
        raise ValueError(f"output folder {str(output_dir)!r} has no model card (README.md) to add the evaluation to")
    found = [name for name in EVALUATION_FILES if (evaluation_dir / name).is_file()]
    if not found:
        raise ValueError(
            f"evaluation_dir {str(evaluation_dir)!r} holds none of {list(EVALUATION_FILES)}: pass the --output_dir "
            "of `python -m immiscible_diffusers.evaluate`"
        )
    target = output_dir / EVALUATION_FOLDER
    target.mkdir(exist_ok=True)
    for name in found:
        shutil.copyfile(evaluation_dir / name, target / name)
    card = ModelCard.load(card_path)
    metrics = (getattr(card.data, CARD_METADATA_KEY, None) or {}).get("metrics")
    section = evaluation_section(
        plot=f"{EVALUATION_FOLDER}/quality.png" if "quality.png" in found else None,
        table=(evaluation_dir / "quality.md").read_text() if "quality.md" in found else None,
        metrics=metrics,
        csv=f"{EVALUATION_FOLDER}/quality.csv" if "quality.csv" in found else None,
    )
    card.text = _replace_evaluation_section(card.text, section)
    return _save_card_atomically(card, card_path)


def _card_model_name(card: ModelCard, card_path: Path) -> str:
    """The name ``model-index`` needs: the card's ``model_name``, else its first heading, else the folder name."""
    if getattr(card.data, "model_name", None):
        return card.data.model_name
    heading = re.search(r"^# (.+)$", card.text, re.MULTILINE)
    return heading.group(1).strip() if heading else card_path.parent.resolve().name


def record_scores_in_card(
    card_path: str | os.PathLike,
    scores: Mapping[str, Mapping[str, Any]],
    metric_labels: Mapping[str, str] | None = None,
) -> Path:
    """Write a run's evaluation scores into its card, replacing earlier ones; return the card's path.

    ``scores`` maps a metric (``digits_fd``, ``fid``) to ``{"value", "step", "sampler", "num_inference_steps",
    "num_samples"}``. They go under ``immiscible_diffusers: metrics:`` (read back by the Space and by
    ``add_evaluation_to_card``) and into ``model-index`` as ``huggingface_hub.EvalResult`` entries (task: the
    card's ``pipeline_tag``; dataset: the training dataset; the sampling settings as ``metric_args``).
    """
    card_path = Path(card_path)
    card = ModelCard.load(card_path)
    block = dict(getattr(card.data, CARD_METADATA_KEY, None) or {})
    block["metrics"] = {name: dict(score) for name, score in scores.items()}
    setattr(card.data, CARD_METADATA_KEY, block)
    dataset = str(block.get("dataset") or "unknown")
    task = card.data.pipeline_tag or "unconditional-image-generation"
    labels = metric_labels or {}
    card.data.eval_results = [
        EvalResult(
            task_type=task,
            dataset_type=dataset,
            dataset_name=dataset,
            metric_type=name,
            metric_value=score["value"],
            metric_name=labels.get(name, name),
            metric_args={
                key: score[key] for key in ("step", "sampler", "num_inference_steps", "num_samples") if key in score
            },
        )
        for name, score in scores.items()
    ] or None
    card.data.model_name = _card_model_name(card, card_path)
    return _save_card_atomically(card, card_path)


def _replace_evaluation_section(text: str, section: str) -> str:
    start, end = text.find(EVALUATION_START), text.find(EVALUATION_END)
    if start != -1 and end > start:
        return text[:start] + section + text[end + len(EVALUATION_END) :]
    # A new section goes before the training configuration (or the citation), like build_model_card puts it.
    for heading in ("## Training configuration", "## Citation"):
        index = text.find(f"\n{heading}")
        if index != -1:
            return f"{text[: index + 1]}{section}\n\n{text[index + 1 :]}"
    return f"{text.rstrip()}\n\n{section}\n"


# Relative links and images in the card body, e.g. ![samples](samples/step_000100.png).
_MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def card_relative_links(text: str) -> list[str]:
    """Paths of the files the card body links to or embeds, relative to the card (URLs and anchors left out)."""
    links = []
    for target in _MARKDOWN_LINK.findall(text):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith(("#", "/")):
            continue
        links.append(target.split("#", 1)[0])
    return list(dict.fromkeys(link for link in links if link))


def check_model_card(path: str | os.PathLike, available_files: Collection[str] | None = None) -> ModelCard:
    """Load ``path`` with ``ModelCard.load`` and check what publishing needs; return the card.

    Raises ``ValueError`` listing every problem: metadata that is not a YAML mapping, ``library_name`` other
    than ``diffusers``, a missing ``pipeline_tag``/``license``/``tags`` (with ``immiscible-diffusion``),
    malformed ``datasets``/``base_model``, an ``immiscible_diffusers:`` dict without the required keys, and
    (when ``available_files`` lists the paths that will be published) images or links to files not among them.
    This is the structural part of the Hub's own check, which needs the network (``ModelCard.validate``).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"there is no model card at {str(path)!r}")
    try:
        card = ModelCard.load(path)
    except Exception as error:  # yaml errors and malformed metadata both end up here
        raise ValueError(f"model card {str(path)!r} cannot be loaded with ModelCard.load: {error}") from error
    metadata = card.data.to_dict()
    problems = []
    if not metadata:
        problems.append("it has no YAML metadata block (--- ... --- at the top)")
    if metadata.get("library_name") != "diffusers":
        problems.append(f"library_name is {metadata.get('library_name')!r}, expected 'diffusers'")
    for key in ("pipeline_tag", "license"):
        if not isinstance(metadata.get(key), str) or not metadata[key]:
            problems.append(f"{key} is missing")
    tags = metadata.get("tags")
    if not (isinstance(tags, list) and all(isinstance(tag, str) for tag in tags)):
        problems.append("tags must be a list of strings")
    elif "immiscible-diffusion" not in tags:
        problems.append("tags lack 'immiscible-diffusion'")
    datasets = metadata.get("datasets")
    if datasets is not None and not (isinstance(datasets, list) and all(isinstance(d, str) for d in datasets)):
        problems.append("datasets must be a list of Hub dataset ids")
    base_model = metadata.get("base_model")
    if base_model is not None and not isinstance(base_model, (str, list)):
        problems.append("base_model must be a Hub model id")
    training = metadata.get(CARD_METADATA_KEY)
    if not isinstance(training, dict):
        problems.append(f"the {CARD_METADATA_KEY}: dict is missing")
    else:
        missing = [key for key in REQUIRED_CARD_KEYS if key not in training]
        if missing:
            problems.append(f"{CARD_METADATA_KEY}: lacks {missing}")
    if available_files is not None:
        absent = [link for link in card_relative_links(card.text) if link not in available_files]
        if absent:
            problems.append(f"it links to files that would not be published: {absent}")
    if problems:
        raise ValueError(f"model card {str(path)!r} is not ready to publish: " + "; ".join(problems))
    return card
