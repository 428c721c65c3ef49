import json

from immiscible_diffusers import provenance


def test_record_names_command_commit_machine_and_date():
    record = provenance.provenance(command="python benchmarks/x.py --seed 1")
    assert record["command"] == "python benchmarks/x.py --seed 1"
    assert record["git_commit"] is None or len(record["git_commit"].split("-")[0]) == 40
    assert "cores" in record["machine"] and "torch" in record["machine"]
    assert record["date"].endswith("UTC")
    text = provenance.provenance_markdown(record)
    assert "git commit" in text and record["code_version"] in text


def test_code_version_follows_file_content(tmp_path):
    source = tmp_path / "a.py"
    source.write_text("x = 1\n")
    first = provenance.code_version([source])
    assert provenance.code_version([source]) == first
    source.write_text("x = 2\n")
    assert provenance.code_version([source]) != first


def test_command_line_is_relative_to_the_repository():
    script = provenance.REPO_DIR / "benchmarks" / "speedup.py"
    assert provenance.command_line([str(script), "--preset", "full"]) == "python benchmarks/speedup.py --preset full"


def test_record_is_json_serialisable():
    assert json.loads(json.dumps(provenance.provenance()))["code_version"] == provenance.code_version()
