#!/usr/bin/env python
"""Write the README's "results at a glance" from committed results files.

    python tools/at_a_glance.py            # writes docs/results/at_a_glance.md and .json
    python tools/at_a_glance.py --check    # exit 1 when they no longer match their sources

``at_a_glance.md`` is a table the README includes (``<!-- include: docs/results/at_a_glance.md -->``);
``at_a_glance.json`` holds the few numbers the README's prose quotes (``<!-- value: ...#headline... -->``).
Both record their own provenance and, for every source, the provenance the source recorded.
``tools/docs_sync.py`` then copies them into the docs.

To show other results (e.g. a new benchmark), point ``SOURCES`` at its file and change ``speedup_rows`` /
``speedup_headline`` (or add a function beside them); nothing else reads the source files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR))  # run as a script from a checkout: use its package

from immiscible_diffusers.provenance import provenance, provenance_markdown  # noqa: E402

# name -> committed results file this page is built from.
SOURCES = {"speedup": "benchmarks/results/speedup.json"}
OUTPUT_DIR = REPO_DIR / "docs" / "results"
METHOD_NAMES = {"none": "vanilla", "linear": "linear", "knn": "KNN"}
# Target fractions q(f) of the speedup benchmark, and the names their ratios get in the headline JSON.
FRACTIONS = {0.25: "ratio_at_q25", 0.5: "ratio_at_q50", 1.0: "ratio_at_q100"}


def source_provenance(data: dict[str, Any], path: str) -> dict[str, Any]:
    """The provenance a source recorded; for files written before provenance records, what they do say."""
    if isinstance(data.get("provenance"), dict):
        return {"file": path, **data["provenance"]}
    return {
        "file": path,
        "command": data.get("command"),
        "git_commit": None,  # not recorded by the code that wrote this file
        "machine": data.get("machine"),
        "date": data.get("date"),
    }


def _ratio(regime: dict[str, Any], method: str, fraction: float) -> str:
    (target,) = [t for t in regime["targets"] if t["method"] == method and t["target_fraction"] == fraction]
    return target["ratio"]


def _final(regime: dict[str, Any], method: str) -> str:
    last = regime["statistics"][method][-1]
    return f"{last['mean']:.3g} ± {last['std']:.2g}"


def speedup_rows(speedup: dict[str, Any]) -> list[str]:
    """Markdown table: per regime, what the assignment did to the distance, steps ratios and final quality."""
    lines = [
        "| regime | D | batch, steps | sampler | distance cut (linear / KNN) | steps ratio linear, at q(0.5) / q(1) "
        "| steps ratio KNN, at q(0.5) / q(1) | final quality vanilla / linear / KNN (lower is better) |",
        "|---|---:|---|---|---|---|---|---|",
    ]
    for regime in speedup["regimes"]:
        cut = regime["distance_reduction"]
        lines.append(
            f"| {regime['name']}: {regime['description']} | {regime['dimension']:,} "
            f"| {regime['train_batch_size']}, {regime['max_train_steps']:,} "
            f"| DDIM {regime['settings']['num_inference_steps']} steps "
            f"| {100 * cut['linear']:.1f}% / {100 * cut['knn']:.1f}% "
            f"| {_ratio(regime, 'linear', 0.5)} / {_ratio(regime, 'linear', 1.0)} "
            f"| {_ratio(regime, 'knn', 0.5)} / {_ratio(regime, 'knn', 1.0)} "
            f"| {regime['metric_label']}: {' / '.join(_final(regime, m) for m in ('none', 'linear', 'knn'))} |"
        )
    seeds = ", ".join(str(seed) for seed in speedup["seeds"])
    lines += [
        "",
        f"Steps ratio = vanilla's steps / the method's steps to reach vanilla's seed-mean quality at a fraction of the "
        f"budget (above 1: fewer steps than vanilla; `<`: never reached); seeds {seeds}, same batches and noise draws "
        "in every method. One sampler and step count per regime: these ratios say nothing about other step counts.",
    ]
    return lines


def speedup_headline(speedup: dict[str, Any]) -> dict[str, Any]:
    """Per regime and method: distance cut (percent) and the steps ratios, for the docs' prose."""
    headline = {}
    for regime in speedup["regimes"]:
        headline[regime["name"]] = {
            METHOD_NAMES[method].lower(): {
                "distance_cut_percent": round(100 * regime["distance_reduction"][method], 1),
                **{name: _ratio(regime, method, fraction) for fraction, name in FRACTIONS.items()},
            }
            for method in ("linear", "knn")
        } | {
            "dimension": regime["dimension"],
            "num_inference_steps": regime["settings"]["num_inference_steps"],
            "num_samples": regime["settings"]["num_samples"],
            # The metric's floor (real held-out data scored as samples) and ceiling (pure noise).
            "floor": regime["anchors"]["floor"],
            "ceiling": regime["anchors"]["ceiling"],
        }
        accuracy = regime["metric_info"].get("classifier_test_accuracy")
        if accuracy is not None:
            headline["digits_classifier_test_accuracy"] = accuracy
    return headline


def build(root: Path = REPO_DIR) -> tuple[str, dict[str, Any]]:
    """The fragment's markdown body (without provenance) and the headline dict, from ``SOURCES``."""
    sources = {name: json.loads((root / path).read_text()) for name, path in SOURCES.items()}
    body = "\n".join(speedup_rows(sources["speedup"]))
    headline = {
        "speedup": speedup_headline(sources["speedup"]),
        "sources": [source_provenance(data, SOURCES[name]) for name, data in sources.items()],
    }
    return body, headline


def _source_lines(sources: list[dict[str, Any]]) -> list[str]:
    return [
        f"- source: `{s['file']}` (command `{s['command']}`, git commit "
        f"{'`' + s['git_commit'] + '`' if s['git_commit'] else 'not recorded'}, {s['machine']}, {s['date']})"
        for s in sources
    ]


def write(output_dir: Path = OUTPUT_DIR, root: Path = REPO_DIR) -> list[Path]:
    """Write ``at_a_glance.md`` and ``at_a_glance.json`` under ``output_dir``; return their paths."""
    body, headline = build(root)
    record = provenance("python tools/at_a_glance.py")
    output_dir.mkdir(parents=True, exist_ok=True)
    markdown = output_dir / "at_a_glance.md"
    # Provenance after the table: this file is included as it is in the README, where the table comes first.
    markdown.write_text(
        f"{body}\n\nGenerated from committed results:\n\n"
        + "\n".join([provenance_markdown(record), *_source_lines(headline["sources"])])
        + "\n"
    )
    data = output_dir / "at_a_glance.json"
    data.write_text(json.dumps({"provenance": record, "headline": headline["speedup"], "sources": headline["sources"]},
                               indent=2, ensure_ascii=False) + "\n")
    return [markdown, data]


def stale(output_dir: Path = OUTPUT_DIR, root: Path = REPO_DIR) -> list[str]:
    """What in the committed fragment differs from what its sources give now (provenance lines aside)."""
    body, headline = build(root)
    problems = []
    markdown, data = output_dir / "at_a_glance.md", output_dir / "at_a_glance.json"
    if not markdown.is_file() or not markdown.read_text().startswith(body + "\n"):
        problems.append(f"{markdown.relative_to(root)} does not hold the table its sources give")
    if not data.is_file():
        problems.append(f"{data.relative_to(root)} is missing")
    else:
        saved = json.loads(data.read_text())
        if saved.get("headline") != headline["speedup"] or saved.get("sources") != headline["sources"]:
            problems.append(f"{data.relative_to(root)} does not hold the numbers its sources give")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="Write nothing; exit 1 when the files are stale.")
    args = parser.parse_args(argv)
    if args.check:
        problems = stale()
        for problem in problems:
            print(problem + " (run `python tools/at_a_glance.py`, then `python tools/docs_sync.py`)")
        return 1 if problems else 0
    if not stale():  # rewriting would only change the date and commit of an unchanged page
        print("docs/results/at_a_glance.md and .json already match their sources")
        return 0
    for path in write():
        print(f"wrote {path.relative_to(REPO_DIR)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
