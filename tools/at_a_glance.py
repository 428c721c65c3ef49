#!/usr/bin/env python
"""Write the README's "results at a glance" from committed results files.

    python tools/at_a_glance.py            # writes docs/results/at_a_glance.md, main_job_table.md, at_a_glance.json
    python tools/at_a_glance.py --check    # exit 1 when they no longer match their sources

``at_a_glance.md`` (the speedup benchmark per recipe and NFE) and ``main_job_table.md`` (the main job per NFE)
are tables the README includes (``<!-- include: docs/results/at_a_glance.md -->``);
``at_a_glance.json`` holds the few numbers the README's prose quotes (``<!-- value: ...#headline... -->``).
Both record their own provenance and, for every source, the provenance the source recorded.
``tools/docs_sync.py`` then copies them into the docs.

To show other results (e.g. a new benchmark), point ``SOURCES`` at its file and change the ``*_rows`` /
``*_headline`` functions (or add one beside them); nothing else reads the source files.
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
SOURCES = {
    "speedup": "benchmarks/results/speedup.json",
    "main_job": "docs/results/main_job.json",
    "assignment": "benchmarks/results/assignment.json",
}
OUTPUT_DIR = REPO_DIR / "docs" / "results"
# The fragments this script writes (under OUTPUT_DIR), each included by the README, and the sources each shows.
FRAGMENT_SOURCES = {"at_a_glance.md": ("speedup",), "main_job_table.md": ("main_job",)}
METHOD_NAMES = {
    "none": "vanilla",
    "linear": "linear",
    "knn": "KNN",
    "shuffle": "shuffle",
    "norm_matched": "norm-matched",
}
# Regimes in the order the table shows them: the recipes where the assignment pays off first.
REGIME_ORDER = ("digits8_flow", "digits8", "digits8_cm", "toy2d_flow", "toy2d")
# Few-step and many-step sampling: the table's rows per regime (the full sweep is in speedup_summary.md).
SHOWN_NFES = (2, 4, 20)
RECIPE_NAMES = {"flow": "flow matching, Euler", "ddpm": "DDPM, DDIM sampling", "consistency": "consistency training"}
# The assignment benchmark's numbers the docs quote (benchmarks/results/assignment.json#headline).
ASSIGNMENT_KEYS = (
    "b1024_d3072_speedup",
    "b1024_d3072_ms",
    "b1024_d3072_paper_ms",
    "b1024_d3072_dtype",
    "min_scipy_over_our_solver",
    "b128_d3072_percent_of_step",
)


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


def ratio_text(target: dict[str, Any], first_step: float) -> str:
    """A steps-to-target ratio as the docs show it, bounds marked.

    A curve already at the target at its first evaluated checkpoint may have got there earlier, so its
    steps are an upper bound: a method that did so gives a lower bound ``≥ x`` on the ratio, and when
    vanilla did so too the ratio is undetermined (``n/d``). ``>`` / ``<`` come from the benchmark (one of
    the two curves never reached the target).
    """
    ratio = target["ratio"]
    if ratio[:1] in "<>" or ratio == "n/a":
        return ratio.replace(">", "> ").replace("<", "< ")
    method_at_first = target["method_steps"] is not None and target["method_steps"] <= first_step
    vanilla_at_first = target["vanilla_steps"] is not None and target["vanilla_steps"] <= first_step
    if method_at_first and vanilla_at_first:
        return "n/d"
    return f"≥ {ratio}" if method_at_first else ratio


def _q100(regime: dict[str, Any], nfe: str, method: str) -> dict[str, Any]:
    (target,) = [t for t in regime["by_nfe"][nfe]["targets"] if t["method"] == method and t["target_fraction"] == 1.0]
    return target


def _first_step(regime: dict[str, Any]) -> float:
    return float(regime["settings"]["checkpointing_steps"])


def _quality(verdict: dict[str, Any]) -> str:
    return f"{verdict['final_mean']:.3g} ± {verdict['final_sd']:.2g}"


def regime_headline(regime: dict[str, Any]) -> dict[str, Any]:
    """One regime's numbers for the docs' prose: per NFE and method, final quality, verdict and ratio at q(1)."""
    entry: dict[str, Any] = {
        "recipe": regime["recipe"],
        "dimension": regime["dimension"],
        "train_batch_size": regime["train_batch_size"],
        "max_train_steps": regime["max_train_steps"],
        "num_samples": regime["settings"]["num_samples"],
        # The metric's floor (real held-out data scored as samples) and ceiling (pure noise).
        "floor": regime["anchors"]["floor"],
        "ceiling": regime["anchors"]["ceiling"],
        "methods": regime["methods"],
    }
    for method in regime["methods"]:
        if method != "none":
            entry[f"{method}_distance_cut_percent"] = round(100 * regime["distance_reduction"][method], 1)
    for nfe in regime["nfes"]:
        verdicts = regime["by_nfe"][str(nfe)]["verdicts"]
        entry[f"nfe{nfe}"] = {
            method: {
                "mean": round(v["final_mean"], 4),
                "sd": round(v["final_sd"], 4),
                "verdict": v["verdict"],
                "ratio_at_q100": ratio_text(_q100(regime, str(nfe), method), _first_step(regime)),
            }
            for method, v in verdicts.items()
        }
        if {"linear", "norm_matched"} <= set(verdicts):
            # How much of linear's quality gain a norm-matched control (closer noise, no re-pairing) keeps.
            gain = verdicts["none"]["final_mean"] - verdicts["linear"]["final_mean"]
            kept = verdicts["none"]["final_mean"] - verdicts["norm_matched"]["final_mean"]
            entry[f"nfe{nfe}"]["norm_matched_share_of_linear_gain_percent"] = (
                round(100 * kept / gain) if gain > 0 else None
            )
    return entry


def speedup_rows(speedup: dict[str, Any]) -> list[str]:
    """Markdown table: per recipe and NFE (few and many steps), every method's final quality and linear's verdict."""
    regimes = {regime["name"]: regime for regime in speedup["regimes"]}
    methods = list(METHOD_NAMES)
    lines = [
        "| regime (recipe) | NFE | "
        + " | ".join(METHOD_NAMES[m] for m in methods)
        + " | linear vs vanilla: verdict, steps ratio at q(1) | KNN vs vanilla |",
        "|---|---:|" + "---:|" * len(methods) + "---|---|",
    ]
    for name in [n for n in REGIME_ORDER if n in regimes] + [n for n in regimes if n not in REGIME_ORDER]:
        regime = regimes[name]
        for nfe in [n for n in SHOWN_NFES if n in regime["nfes"]]:
            verdicts = regime["by_nfe"][str(nfe)]["verdicts"]
            cells = [_quality(verdicts[m]) if m in verdicts else "–" for m in methods]
            judged = [
                f"{verdicts[m]['verdict']}, {ratio_text(_q100(regime, str(nfe), m), _first_step(regime))}"
                for m in ("linear", "knn")
            ]
            label = f"{name} ({RECIPE_NAMES.get(regime['recipe'], regime['recipe'])})"
            lines.append(f"| {label} | {nfe} | " + " | ".join(cells) + " | " + " | ".join(judged) + " |")
    seeds = ", ".join(str(seed) for seed in speedup["seeds"])
    budgets = ", ".join(f"{n}: {r['max_train_steps']:,} steps" for n, r in regimes.items())
    lines += [
        "",
        f"Final quality (digits: Fréchet distance in a digits classifier's features; toys: W2 to held-out points; "
        f"mean ± sd over seeds {seeds}; lower is better) after the regime's full budget "
        f"({budgets}); same batches and "
        'noise draws in every method; "–": control not run in that regime. Verdict: the final seed means '
        "differ by more than 2 standard errors and 5%. Steps ratio at q(1) = vanilla's training steps to its own "
        "final quality / the method's (above 1: fewer steps); `≥`: the method was already there at the first "
        "checkpoint, so the ratio is a lower bound; `>`/`<`: one curve never got there; n/d: both were there "
        "at the first checkpoint. NFE 1 and 8 and the ratios at q(0.25), q(0.5): "
        "`benchmarks/results/speedup_summary.md`.",
    ]
    return lines


def main_job_rows(main_job: dict[str, Any]) -> list[str]:
    """Markdown table: the main job's final Fréchet distance per NFE, vanilla vs immiscible."""
    quality = main_job["quality"]
    lines = ["| NFE (Euler steps) | vanilla | immiscible | change |", "|---:|---:|---:|---:|"]
    for nfe, row in sorted(quality["by_nfe"].items(), key=lambda item: int(item[0])):
        lines.append(
            f"| {nfe} | {row['vanilla']:.1f} | {row['immiscible']:.1f} | {100 * row['relative_change']:+.0f}% |"
        )
    lines += [
        "",
        f"Digits Fréchet distance (lower is better) of the final checkpoint (step {quality['final_step']:,}, EMA "
        f"weights, {main_job['num_eval_samples']} samples from the same starting noise), one seed "
        f"({main_job['seed']}); `make demo` took {main_job['wall_seconds'] / 60:.0f} min here.",
    ]
    return lines


def main_job_headline(main_job: dict[str, Any]) -> dict[str, Any]:
    """The main job's settings and, per NFE, both runs' final scores."""
    return {
        "recipe": main_job["recipe"],
        "resolution": main_job["resolution"],
        "max_train_steps": main_job["max_train_steps"],
        "train_batch_size": main_job["train_batch_size"],
        "wall_minutes": round(main_job["wall_seconds"] / 60, 1),
        **{
            f"nfe{nfe}": {
                "vanilla": round(row["vanilla"], 2),
                "immiscible": round(row["immiscible"], 2),
                "change_percent": round(100 * row["relative_change"], 1),
            }
            for nfe, row in main_job["quality"]["by_nfe"].items()
        },
    }


def build(root: Path = REPO_DIR) -> tuple[dict[str, str], dict[str, Any]]:
    """Each fragment's markdown body (without provenance) and the headline dict, from ``SOURCES``."""
    sources = {name: json.loads((root / path).read_text()) for name, path in SOURCES.items()}
    speedup = sources["speedup"]
    bodies = {
        "at_a_glance.md": "\n".join(speedup_rows(speedup)),
        "main_job_table.md": "\n".join(main_job_rows(sources["main_job"])),
    }
    headline: dict[str, Any] = {regime["name"]: regime_headline(regime) for regime in speedup["regimes"]}
    accuracy = next(
        (
            r["metric_info"].get("classifier_test_accuracy")
            for r in speedup["regimes"]
            if r["metric_info"].get("classifier_test_accuracy") is not None
        ),
        None,
    )
    if accuracy is not None:
        headline["digits_classifier_test_accuracy"] = accuracy
    headline["main_job"] = main_job_headline(sources["main_job"])
    headline["assignment"] = {key: sources["assignment"]["headline"][key] for key in ASSIGNMENT_KEYS}
    return bodies, {
        "headline": headline,
        "sources": [source_provenance(data, SOURCES[name]) for name, data in sources.items()],
    }


def _source_lines(sources: list[dict[str, Any]]) -> list[str]:
    return [
        f"- source: `{s['file']}` (command `{s['command']}`, git commit "
        f"{'`' + s['git_commit'] + '`' if s['git_commit'] else 'not recorded'}, {s['machine']}, {s['date']})"
        for s in sources
    ]


def write(output_dir: Path = OUTPUT_DIR, root: Path = REPO_DIR) -> list[Path]:
    """Write the fragments and ``at_a_glance.json`` under ``output_dir``; return their paths."""
    bodies, built = build(root)
    record = provenance("python tools/at_a_glance.py")
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, body in bodies.items():
        # Provenance after the table: the fragment is included as it is in the README, where the table comes first.
        path = output_dir / name
        path.write_text(
            f"{body}\n\nGenerated from committed results:\n\n"
            + "\n".join(
                [
                    provenance_markdown(record),
                    *_source_lines(
                        [s for s in built["sources"] if s["file"] in {SOURCES[n] for n in FRAGMENT_SOURCES[name]}]
                    ),
                ]
            )
            + "\n"
        )
        paths.append(path)
    data = output_dir / "at_a_glance.json"
    data.write_text(
        json.dumps(
            {"provenance": record, "headline": built["headline"], "sources": built["sources"]},
            indent=2,
            ensure_ascii=False,
        )
        + "\n"
    )
    return [*paths, data]


def stale(output_dir: Path = OUTPUT_DIR, root: Path = REPO_DIR) -> list[str]:
    """What in the committed fragments differs from what their sources give now (provenance lines aside)."""
    bodies, built = build(root)
    problems = []
    for name, body in bodies.items():
        path = output_dir / name
        if not path.is_file() or not path.read_text().startswith(body + "\n"):
            problems.append(f"{path.relative_to(root)} does not hold the table its sources give")
    data = output_dir / "at_a_glance.json"
    if not data.is_file():
        problems.append(f"{data.relative_to(root)} is missing")
    else:
        saved = json.loads(data.read_text())
        if saved.get("headline") != built["headline"] or saved.get("sources") != built["sources"]:
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
        print("docs/results/at_a_glance.* already match their sources")
        return 0
    for path in write():
        print(f"wrote {path.relative_to(REPO_DIR)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
