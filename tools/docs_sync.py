#!/usr/bin/env python
"""Keep the numbers in the docs equal to the committed results files they come from.

Two markers, in README.md, docs/**/*.md and training_scripts/README.md:

* a block include of a whole committed markdown file (a results table or a generated fragment)::

      <!-- include: docs/results/at_a_glance.md -->
      ... the file's content, written by this tool ...
      <!-- /include -->

* an inline value from a JSON results file (dotted key path, list indexes as numbers, an optional
  Python format spec after ``|``)::

      <!-- value: docs/results/at_a_glance.json#headline.toy2d_ratio|.2f -->3.21<!-- /value -->

Every file a marker points at must carry provenance (the command and the git commit that produced it):
a JSON file a top-level ``"provenance"`` object with non-empty ``command`` and ``git_commit``; a markdown
file a ``command:`` line and a ``git commit:`` line (``provenance.provenance_markdown`` writes both); a CSV
file a sibling ``.json`` or ``.md`` of the same stem that does.

    python tools/docs_sync.py           # rewrite every marked region from its file
    python tools/docs_sync.py --check   # exit 1 listing every stale region (file:line, expected vs found)

Bad markers, missing files or keys and files without provenance are errors (exit 2), in both modes.
Markers inside fenced code blocks are examples and are left alone.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_DIR = Path(__file__).resolve().parents[1]
DOC_GLOBS = ("README.md", "docs/**/*.md", "training_scripts/README.md")

# One pattern for both markers, so that a value marker inside an include block is taken as included text.
MARKER = re.compile(
    r"<!-- include: (?P<include>[^\s>]+) -->(?P<block>.*?)<!-- /include -->"
    r"|<!-- value: (?P<value>[^\s>|#]+)#(?P<key>[^\s>|]+)(?:\|(?P<fmt>[^\s>]*))? -->(?P<inline>[^\n]*?)<!-- /value -->",
    re.DOTALL,
)
# Opening markers, to catch ones the pattern above could not pair with a closing marker.
OPENING = re.compile(r"<!-- (include|value):[^>]*-->")
# Fenced code blocks: markers shown there are examples, not regions.
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
PROVENANCE_MD = (
    re.compile(r"^\W*command:", re.IGNORECASE | re.MULTILINE),
    re.compile(r"^\W*git commit:", re.IGNORECASE | re.MULTILINE),
)


class DocsSyncError(Exception):
    """A marker that cannot be resolved: bad syntax, a missing file or key, a file without provenance."""


@dataclass
class Region:
    """One marked region of a doc: where it is, what it holds and what its file says it should hold."""

    doc: Path
    line: int
    source: str
    found: str
    expected: str

    @property
    def stale(self) -> bool:
        return self.found != self.expected


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def doc_files(root: Path = REPO_DIR) -> list[Path]:
    """The docs the markers may live in, sorted."""
    return sorted({path for pattern in DOC_GLOBS for path in root.glob(pattern) if path.is_file()})


def check_provenance(path: Path, root: Path = REPO_DIR) -> None:
    """Raise ``DocsSyncError`` unless the results file ``path`` records its command and git commit."""
    name = _relative(path, root)
    if path.suffix == ".json":
        record = json.loads(path.read_text()).get("provenance")
        if not (isinstance(record, dict) and record.get("command") and record.get("git_commit")):
            raise DocsSyncError(
                f'{name} has no provenance: expected a top-level "provenance" with command and git_commit'
            )
    elif path.suffix == ".md":
        text = path.read_text()
        if not all(pattern.search(text) for pattern in PROVENANCE_MD):
            raise DocsSyncError(f"{name} has no provenance: expected a 'command:' line and a 'git commit:' line")
    elif path.suffix == ".csv":
        siblings = [path.with_suffix(suffix) for suffix in (".json", ".md") if path.with_suffix(suffix).is_file()]
        if not siblings:
            raise DocsSyncError(f"{name} has no provenance: a CSV needs a sibling .json or .md that records it")
        errors = []
        for sibling in siblings:
            try:
                return check_provenance(sibling, root)
            except DocsSyncError as error:
                errors.append(str(error))
        raise DocsSyncError(f"{name} has no provenance: " + "; ".join(errors))
    else:
        raise DocsSyncError(f"{name}: a results file must be .json, .md or .csv")


def _results_file(doc: Path, line: int, target: str, root: Path) -> Path:
    path = (root / target).resolve()
    where = f"{_relative(doc, root)}:{line}"
    if not path.is_relative_to(root):
        raise DocsSyncError(f"{where}: {target} is outside the repository")
    if not path.is_file():
        raise DocsSyncError(f"{where}: {target} does not exist")
    try:
        check_provenance(path, root)
    except DocsSyncError as error:
        raise DocsSyncError(f"{where}: {error}") from None
    return path


def lookup(data: Any, key: str) -> Any:
    """``data`` at the dotted ``key`` (``a.b.0.c``: numbers index lists); ``KeyError`` naming the missing part."""
    value = data
    for depth, part in enumerate(key.split(".")):
        walked = ".".join(key.split(".")[:depth]) or "the top level"
        if isinstance(value, dict):
            if part not in value:
                raise KeyError(f"no key {part!r} at {walked} (keys: {', '.join(sorted(map(str, value)))})")
            value = value[part]
        elif isinstance(value, list):
            if not re.fullmatch(r"-?\d+", part) or not -len(value) <= int(part) < len(value):
                raise KeyError(f"no index {part!r} at {walked} (a list of {len(value)})")
            value = value[int(part)]
        else:
            raise KeyError(f"{walked} is a {type(value).__name__}, not an object or list, so it has no {part!r}")
    return value


def format_value(value: Any, fmt: str | None) -> str:
    """The text a value marker shows: ``format(value, fmt)``, or ``str(value)`` without a spec."""
    if isinstance(value, (dict, list)):
        raise ValueError(f"the key holds a {type(value).__name__}, not a single value")
    return format(value, fmt) if fmt else str(value)


def include_text(content: str) -> str:
    """What an include block holds between its markers: the file's text on lines of its own."""
    return "\n" + content.strip("\n") + "\n"


def scan(doc: Path, root: Path = REPO_DIR) -> tuple[str, list[Region]]:
    """The doc's text with every region regenerated, and the regions (found vs expected)."""
    text = doc.read_text()
    regions: list[Region] = []
    json_cache: dict[Path, Any] = {}

    fences = [match.span() for match in FENCE.finditer(text)]

    def in_fence(position: int) -> bool:
        return any(start <= position < end for start, end in fences)

    def replace(match: re.Match) -> str:
        if in_fence(match.start()):
            return match.group(0)
        line = text.count("\n", 0, match.start()) + 1
        where = f"{_relative(doc, root)}:{line}"
        if match.group("include") is not None:
            target = match.group("include")
            path = _results_file(doc, line, target, root)
            expected = include_text(path.read_text())
            regions.append(Region(doc, line, target, match.group("block"), expected))
            return f"<!-- include: {target} -->{expected}<!-- /include -->"
        target, key, fmt = match.group("value"), match.group("key"), match.group("fmt")
        path = _results_file(doc, line, target, root)
        if path.suffix != ".json":
            raise DocsSyncError(f"{where}: value markers read JSON files, got {target}")
        if path not in json_cache:
            json_cache[path] = json.loads(path.read_text())
        try:
            expected = format_value(lookup(json_cache[path], key), fmt)
        except KeyError as error:
            raise DocsSyncError(f"{where}: {target} has no {key}: {error.args[0]}") from None
        except ValueError as error:
            raise DocsSyncError(f"{where}: {target}#{key}{'|' + fmt if fmt else ''}: {error}") from None
        regions.append(Region(doc, line, f"{target}#{key}", match.group("inline"), expected))
        suffix = f"|{fmt}" if fmt is not None else ""
        return f"<!-- value: {target}#{key}{suffix} -->{expected}<!-- /value -->"

    # An opening marker outside every matched region has no closing marker (or a malformed one).
    spans = [match.span() for match in MARKER.finditer(text)]
    for opening in OPENING.finditer(text):
        if not in_fence(opening.start()) and not any(start <= opening.start() < end for start, end in spans):
            line = text.count("\n", 0, opening.start()) + 1
            raise DocsSyncError(
                f"{_relative(doc, root)}:{line}: {opening.group(0)} is malformed or has no closing marker "
                "(<!-- /include -->, or <!-- /value --> on the same line)"
            )
    new_text = MARKER.sub(replace, text)
    return new_text, regions


def describe(region: Region, root: Path = REPO_DIR) -> str:
    """One line saying where a stale region is (the first differing line of a block) and what it should hold."""
    doc = _relative(region.doc, root)
    if "#" in region.source:
        return f"{doc}:{region.line}: {region.source}: expected {region.expected!r}, found {region.found!r}"
    # Line i of the block (0: the rest of the marker's own line) is line region.line + i of the doc.
    found, expected = region.found.split("\n"), region.expected.split("\n")
    for index, (a, b) in enumerate(zip(found, expected, strict=False)):
        if a != b:
            return f"{doc}:{region.line + index}: include {region.source}: expected {b!r}, found {a!r}"
    return f"{doc}:{region.line}: include {region.source}: expected {len(expected)} lines, found {len(found)}"


def sync(root: Path = REPO_DIR, check: bool = False, docs: list[Path] | None = None) -> list[Region]:
    """Regenerate (or, with ``check``, only compare) every marked region; return the stale ones.

    All docs are scanned before anything is written, so an error leaves every file as it was.
    """
    results = [(doc, *scan(doc, root)) for doc in (docs if docs is not None else doc_files(root))]
    stale = [region for _, _, regions in results for region in regions if region.stale]
    if not check:
        for doc, new_text, regions in results:
            if any(region.stale for region in regions):
                doc.write_text(new_text)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="Change nothing; exit 1 listing every stale region.")
    parser.add_argument("--root", type=Path, default=REPO_DIR, help="Repository root (default: this checkout).")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    try:
        stale = sync(root, check=args.check)
    except DocsSyncError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.check and stale:
        print(f"{len(stale)} region(s) differ from their results files (run `python tools/docs_sync.py`):")
        for region in stale:
            print("  " + describe(region, root))
        return 1
    if not args.check:
        print(f"rewrote {len(stale)} region(s)" if stale else "docs already match their results files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
