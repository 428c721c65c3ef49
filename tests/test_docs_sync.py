"""Docs numbers are generated from committed results files: tools/docs_sync.py and tools/at_a_glance.py."""

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


docs_sync = _load("docs_sync")
at_a_glance = _load("at_a_glance")

PROVENANCE = {"command": "python bench.py", "git_commit": "0123abc", "machine": "m", "date": "d"}
TABLE_MD = "# Bench\n\n- command: `python bench.py`\n- git commit: `0123abc`\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"


def test_the_repositorys_docs_match_their_results_files():
    """What CI runs: a number edited by hand in README.md or docs/ fails here."""
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "docs_sync.py"), "--check"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert docs_sync.doc_files(REPO)[0] == REPO / "README.md"
    regions = [region for doc in docs_sync.doc_files(REPO) for region in docs_sync.scan(doc, REPO)[1]]
    assert any(region.doc.name == "README.md" for region in regions), "the README quotes no results file"


def test_the_at_a_glance_fragment_matches_its_sources():
    assert at_a_glance.stale() == []


@pytest.fixture
def repo(tmp_path):
    """A tiny checkout: results with provenance and a README quoting them."""
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "bench.json").write_text(
        json.dumps({"provenance": PROVENANCE, "headline": {"speedup": 5.6123, "runs": [{"ms": 76.04}]}})
    )
    (tmp_path / "results" / "bench.md").write_text(TABLE_MD)
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(
        textwrap.dedent(
            """\
            # Project

            The solver is <!-- value: results/bench.json#headline.speedup|.1f -->5.6<!-- /value -->x faster,
            <!-- value: results/bench.json#headline.runs.0.ms -->76.04<!-- /value --> ms per call.

            <!-- include: results/bench.md -->
            """
        )
        + TABLE_MD
        + "<!-- /include -->\n"
    )
    return tmp_path


def _run(root: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "docs_sync.py"), "--root", str(root), *flags],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_docs_in_sync_pass_the_check(repo):
    result = _run(repo, "--check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_number_edited_by_hand_fails_the_check_with_file_line_expected_and_found(repo):
    readme = repo / "README.md"
    readme.write_text(readme.read_text().replace("-->5.6<!--", "-->6.4<!--").replace("| 1 | 2 |", "| 1 | 3 |"))
    before = readme.read_text()
    result = _run(repo, "--check")
    assert result.returncode == 1
    assert "README.md:3: results/bench.json#headline.speedup: expected '5.6', found '6.4'" in result.stdout
    assert "README.md:14: include results/bench.md: expected '| 1 | 2 |', found '| 1 | 3 |'" in result.stdout
    assert readme.read_text() == before  # --check changes nothing


def test_the_default_mode_regenerates_every_region(repo):
    readme = repo / "README.md"
    readme.write_text(
        readme.read_text().replace("-->5.6<!--", "--><!--").replace("-->76.04<!--", "-->1<!--").replace("| 1 | 2 |\n", "")
    )
    assert _run(repo).returncode == 0
    text = readme.read_text()
    assert "-->5.6<!-- /value -->x faster" in text and "-->76.04<!-- /value --> ms" in text
    assert f"<!-- include: results/bench.md -->\n{TABLE_MD}<!-- /include -->" in text
    assert _run(repo, "--check").returncode == 0
    # A changed results file flows into the docs on the next run.
    data = json.loads((repo / "results" / "bench.json").read_text())
    data["headline"]["speedup"] = 3.96
    (repo / "results" / "bench.json").write_text(json.dumps(data))
    assert _run(repo, "--check").returncode == 1
    assert _run(repo).returncode == 0 and "-->4.0<!-- /value -->x faster" in readme.read_text()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("#headline.speedup", "#headline.speed"),
         "error: README.md:3: results/bench.json has no headline.speed: no key 'speed' at headline (keys: runs, speedup)"),
        (lambda t: t.replace("runs.0.ms", "runs.3.ms"), "no index '3' at headline.runs (a list of 1)"),
        (lambda t: t.replace("results/bench.md", "results/gone.md"), "error: README.md:6: results/gone.md does not exist"),
        (lambda t: t.replace("#headline.speedup|.1f", "#headline|.1f"), "the key holds a dict, not a single value"),
        (lambda t: t.replace("<!-- /include -->", ""), "README.md:6: <!-- include: results/bench.md --> is malformed or "
                                                      "has no closing marker"),
    ],
    ids=["missing-key", "missing-index", "missing-file", "not-a-value", "unclosed"],
)
def test_bad_markers_are_errors_that_change_nothing(repo, edit, message):
    readme = repo / "README.md"
    readme.write_text(edit(readme.read_text()).replace("-->5.6<!--", "-->9<!--"))
    before = readme.read_text()
    for flags in ((), ("--check",)):
        result = _run(repo, *flags)
        assert result.returncode == 2 and message in result.stderr, result.stderr
    assert readme.read_text() == before


@pytest.mark.parametrize(
    ("path", "content", "message"),
    [
        ("results/bench.json", json.dumps({"headline": {"speedup": 1}}), 'has no provenance: expected a top-level "provenance"'),
        ("results/bench.json", json.dumps({"provenance": {"command": "x"}, "headline": {"speedup": 1}}),
         "has no provenance"),
        ("results/bench.md", "| a | b |\n- command: `x`\n", "expected a 'command:' line and a 'git commit:' line"),
    ],
    ids=["json-without", "json-without-commit", "md-without-commit"],
)
def test_results_files_without_provenance_are_refused(repo, path, content, message):
    (repo / path).write_text(content)
    result = _run(repo, "--check")
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_markers_in_fenced_code_blocks_are_examples(repo):
    readme = repo / "README.md"
    example = "```markdown\n<!-- value: nowhere.json#a|.1f -->1<!-- /value --> <!-- include: gone.md -->\n```\n"
    readme.write_text(readme.read_text() + example)
    assert _run(repo, "--check").returncode == 0
    assert _run(repo).returncode == 0 and readme.read_text().endswith(example)


def test_a_csv_carries_provenance_through_a_sibling(tmp_path):
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    with pytest.raises(docs_sync.DocsSyncError, match="a CSV needs a sibling .json or .md"):
        docs_sync.check_provenance(tmp_path / "table.csv", tmp_path)
    (tmp_path / "table.md").write_text(TABLE_MD)
    docs_sync.check_provenance(tmp_path / "table.csv", tmp_path)


def test_docs_are_found_in_readme_docs_and_the_training_scripts_readme(repo):
    (repo / "docs" / "sub").mkdir()
    for path in ("docs/a.md", "docs/sub/b.md", "training_scripts/README.md", "other/c.md"):
        (repo / path).parent.mkdir(exist_ok=True)
        (repo / path).write_text("x\n")
    names = [path.relative_to(repo).as_posix() for path in docs_sync.doc_files(repo)]
    assert names == ["README.md", "docs/a.md", "docs/sub/b.md", "training_scripts/README.md"]


@pytest.mark.parametrize(
    "ratio, vanilla_steps, method_steps, shown",
    [
        ("2.17", 434.0, 200.0, "≥ 2.17"),  # the method was there at the first checkpoint: a lower bound
        ("2.17", 434.0, 200.1, "2.17"),
        ("1.00", 200.0, 200.0, "n/d"),  # both there at the first checkpoint: nothing measured
        (">5.00", None, 200.0, "> 5.00"),  # bounds the benchmark marked stay bounds
        ("<1.00", 800.0, None, "< 1.00"),
        ("n/a", None, None, "n/a"),
    ],
)
def test_ratios_from_the_first_checkpoint_are_shown_as_bounds(ratio, vanilla_steps, method_steps, shown):
    target = {"ratio": ratio, "vanilla_steps": vanilla_steps, "method_steps": method_steps}
    assert at_a_glance.ratio_text(target, first_step=200.0) == shown


def test_the_readme_shows_few_and_many_step_quality_of_every_recipe():
    body = at_a_glance.build()[0]["at_a_glance.md"]
    speedup = json.loads((REPO / at_a_glance.SOURCES["speedup"]).read_text())
    for regime in speedup["regimes"]:
        for nfe in at_a_glance.SHOWN_NFES:
            label = f"{regime['name']} ({at_a_glance.RECIPE_NAMES[regime['recipe']]})"
            assert f"| {label} | {nfe} | " in body, (label, nfe)
