"""Publishing to the Hub: the real huggingface_hub client against a local server that records what it is sent.

The Hub is unreachable here, so ``tests/hub_server.py`` answers its upload API on 127.0.0.1. ``HF_ENDPOINT``
and ``HF_HUB_OFFLINE`` are read when huggingface_hub is imported, so every push runs the installed
``immiscible-diffusers`` command in a fresh process pointed at that server. ``HF_HUB_DISABLE_XET=1`` makes
the client upload large files with the LFS protocol the server implements (with hf_xet installed, the real
Hub gets them through Xet storage instead; the commit is the same). Checks that need no network run in process.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, UNet2DModel
from huggingface_hub import ModelCard
from PIL import Image

from hub_server import LocalHubServer
from immiscible_diffusers import cli
from immiscible_diffusers.hub import HubPushError, card_for_repo, create_hub_repo, plan_push, push_output_dir
from immiscible_diffusers.model_card import (
    CARD_METADATA_KEY,
    EVALUATION_START,
    KNN_CITATION,
    PAPER_CITATION,
    REQUIRED_CARD_KEYS,
    build_model_card,
    check_model_card,
    write_model_card,
)

CLI = Path(sys.executable).with_name("immiscible-diffusers")
REPO_ID = "alice/tiny-ddpm"
TOKEN = "hf_local_test_token"
# The files of a training run that are published (everything else stays local).
PUBLISHED = {
    "README.md",
    "model_index.json",
    "scheduler/scheduler_config.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "samples/step_000010.png",
    "training_config.json",
    "train_log.csv",
}
CARD_METADATA = {
    "script": "train_unconditional.py",
    "assignment": "linear",
    "knn_k": 4,
    "assignment_distance": "l2",
    "assignment_dtype": "float32",
    "assignment_scope": "global",
    "prediction_type": "epsilon",
    "train_batch_size": 8,
    "resolution": 8,
    "global_step": 10,
    "seed": 0,
    "dataset": "cifar10",
}


def tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )


def write_card(run_dir: Path, **overrides) -> None:
    arguments = dict(
        title="Unconditional DDPM on cifar10 with immiscible diffusion",
        metadata=CARD_METADATA,
        pipeline_tag="unconditional-image-generation",
        usage_code=f'from diffusers import DDPMPipeline\n\npipeline = DDPMPipeline.from_pretrained("{run_dir}")\n'
        "images = pipeline(batch_size=16).images",
        training_config={"assignment": "linear", "learning_rate": 1e-3, "global_step": 10},
        hub_datasets=["cifar10"],
        extra_tags=("unconditional-image-generation", "ddpm"),
        sample_grid="samples/step_000010.png",
    )
    write_model_card(run_dir, **(arguments | overrides))


def make_run(run_dir: Path) -> Path:
    """A training run's output folder as the training scripts leave it (see .notes/CONTEXT.md)."""
    unet = tiny_unet()
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=50)).save_pretrained(run_dir)
    (run_dir / "samples").mkdir()
    Image.new("L", (16, 16), color=128).save(run_dir / "samples" / "step_000010.png")
    config = CARD_METADATA | {"output_dir": str(run_dir), "hub_model_id": None, "push_to_hub": False}
    (run_dir / "training_config.json").write_text(json.dumps(config | {"logging_dir": "logs"}, indent=2))
    (run_dir / "train_log.csv").write_text("step,loss\n1,0.9\n10,0.5\n")
    (run_dir / "logs" / "train_unconditional").mkdir(parents=True)
    (run_dir / "logs" / "train_unconditional" / "events.out.tfevents.1").write_bytes(b"\x00tensorboard")
    (run_dir / "train_output.log").write_text("step 10 loss 0.5\n")
    checkpoint = run_dir / "checkpoint-10"
    unet.save_pretrained(checkpoint / "unet")
    for name in ("optimizer.bin", "random_states_0.pkl", "scheduler.bin"):
        (checkpoint / name).write_bytes(b"\x80\x04pickle")
    shutil.copyfile(run_dir / "unet" / "diffusion_pytorch_model.safetensors", checkpoint / "model.safetensors")
    (run_dir / ".tmp-checkpoint-20").mkdir()
    (run_dir / ".tmp-checkpoint-20" / "optimizer.bin").write_bytes(b"\x80\x04partial")
    write_card(run_dir)
    return run_dir


def tree_state(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file's content hash and modification time: equal before and after means nothing was touched."""
    return {
        path.relative_to(folder).as_posix(): (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def run_cli(args: list[str], endpoint: str, token: str | None, home: Path) -> subprocess.CompletedProcess:
    """Run the installed console script with huggingface_hub pointed at ``endpoint``."""
    assert CLI.is_file(), f"{CLI} is missing: reinstall the package (pip install -e .)"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGING_FACE_"))}
    env |= {"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(home)}
    env |= {"HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1"}
    if token is not None:
        env["HF_TOKEN"] = token
    return subprocess.run([str(CLI), *args], env=env, capture_output=True, text=True, timeout=120)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("hub") / "tiny-ddpm")


@pytest.fixture()
def run_copy(run_dir, tmp_path) -> Path:
    """A copy of the run to modify."""
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


@pytest.fixture(scope="module")
def pushed(run_dir, tmp_path_factory):
    """``immiscible-diffusers push RUN --repo-id alice/tiny-ddpm`` against the local server, once."""
    before = tree_state(run_dir)
    with LocalHubServer(token=TOKEN) as server:
        result = run_cli(
            ["push", str(run_dir), "--repo-id", REPO_ID], server.url, TOKEN, tmp_path_factory.mktemp("hf_home")
        )
    assert result.returncode == 0, result.stderr
    return server, result, before


# --------------------------------------------------------------------------------------------------
# What a push sends
# --------------------------------------------------------------------------------------------------


def test_push_creates_the_repo_and_commits_once(pushed):
    server, result, _ = pushed
    # huggingface_hub also fetches a registry for its user agent (GET /api/agent-harnesses, best effort).
    calls = [call for call in server.calls() if call != "GET /api/agent-harnesses"]
    lfs_uploads = sorted(call for call in calls if call.startswith("PUT /lfs-storage/"))
    assert calls[:4] == [
        "POST /api/repos/create",
        "POST /api/validate-yaml",
        f"POST /api/models/{REPO_ID}/preupload/main",
        f"POST /{REPO_ID}.git/info/lfs/objects/batch",
    ]
    assert sorted(calls[4:-1]) == sorted(lfs_uploads + [f"POST /{REPO_ID}.git/info/lfs/objects/verify"] * 2)
    assert calls[-1] == f"POST /api/models/{REPO_ID}/commit/main"
    assert len(lfs_uploads) == 2  # the safetensors weights and the sample grid
    for request in server.requests:
        if request.path.startswith("/api/") and request.path != "/api/agent-harnesses":
            assert request.headers["authorization"] == f"Bearer {TOKEN}"
    create = server.requests[[str(r) for r in server.requests].index("POST /api/repos/create")].json()
    assert create["name"] == "tiny-ddpm" and create["organization"] == "alice"
    assert create.get("visibility") != "private" and not server.repos[REPO_ID].private
    assert len(server.commits) == 1 and server.commits[0].summary == "Upload pipeline trained with immiscible-diffusers"
    assert f"Pushed: {server.url}/{REPO_ID}/commit/" in result.stdout
    assert "left out: .tmp-checkpoint-20/, checkpoint-10/, logs/, train_output.log" in result.stdout


def test_push_uploads_every_file_of_the_pipeline_and_no_checkpoint(pushed, run_dir):
    server, _, before = pushed
    commit = server.commits[0]
    assert commit.paths == PUBLISHED
    assert set(commit.lfs_files) == {"unet/diffusion_pytorch_model.safetensors", "samples/step_000010.png"}
    assert not any(path.endswith((".bin", ".pkl", ".log")) or "checkpoint" in path for path in commit.paths)
    files = server.branch_files(REPO_ID)
    for path in PUBLISHED - {"README.md"}:
        assert files[path] == (run_dir / path).read_bytes(), path
    for path, oid in commit.lfs_files.items():
        assert hashlib.sha256(files[path]).hexdigest() == oid
    assert tree_state(run_dir) == before  # the local folder is untouched


def test_pushed_card_has_the_hub_metadata_and_loads_the_repo(pushed, run_dir):
    server, _, _ = pushed
    text = server.branch_files(REPO_ID)["README.md"].decode()
    validated = next(r for r in server.requests if r.path == "/api/validate-yaml").json()
    assert validated == {"content": text, "repoType": "model"}
    card = ModelCard(text)
    metadata = card.data.to_dict()
    assert metadata["library_name"] == "diffusers"
    assert metadata["pipeline_tag"] == "unconditional-image-generation"
    assert metadata["license"] == "apache-2.0" and metadata["datasets"] == ["cifar10"]
    assert {"diffusers", "diffusers-training", "immiscible-diffusion", "assignment-linear"} <= set(metadata["tags"])
    assert set(REQUIRED_CARD_KEYS) <= set(metadata[CARD_METADATA_KEY])
    assert yaml.safe_load(text.split("---")[1]) == metadata  # the YAML block as sent
    # The usage snippet loads the pushed repo (the local card keeps the local path), the sample grid is there.
    assert f'DDPMPipeline.from_pretrained("{REPO_ID}")' in card.text
    assert str(run_dir) not in card.text and f'from_pretrained("{run_dir}")' in (run_dir / "README.md").read_text()
    assert "![samples](samples/step_000010.png)" in card.text
    assert PAPER_CITATION in card.text and KNN_CITATION not in card.text


def test_pushed_pipeline_loads_with_plain_diffusers(pushed, tmp_path):
    """Rebuild the repo from what was committed: diffusers loads it from safetensors with its own classes only."""
    server, _, _ = pushed
    for path, content in server.branch_files(REPO_ID).items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(content)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"] and index["unet"] == ["diffusers", "UNet2DModel"]
    pipeline = DiffusionPipeline.from_pretrained(tmp_path, use_safetensors=True)
    assert type(pipeline) is DDPMPipeline and type(pipeline.scheduler) is DDPMScheduler
    for component in pipeline.components.values():
        assert type(component).__module__.startswith("diffusers."), type(component)
    images = pipeline(batch_size=1, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 8, 8, 1)


def test_push_private_to_a_branch_with_the_checkpoint_models(run_dir, tmp_path):
    with LocalHubServer(token=TOKEN) as server:
        result = run_cli(
            ["push", str(run_dir), "--repo-id", REPO_ID, "--private", "--revision", "experiment",
             "--include-checkpoints", "--commit-message", "Step 10"],
            server.url, TOKEN, tmp_path / "hf_home",
        )
    assert result.returncode == 0, result.stderr
    calls = [call for call in server.calls() if call != "GET /api/agent-harnesses"]
    assert calls[:2] == ["POST /api/repos/create", f"POST /api/models/{REPO_ID}/branch/experiment"]
    assert calls[-1] == f"POST /api/models/{REPO_ID}/commit/experiment"
    assert server.requests[[str(r) for r in server.requests].index("POST /api/repos/create")].json()["visibility"] == (
        "private"
    )
    assert server.repos[REPO_ID].private
    commit = server.commits[0]
    assert commit.revision == "experiment" and commit.summary == "Step 10"
    # The checkpoint's model goes, its training state (optimizer, RNG and accelerate files) stays.
    checkpoint_model = {"checkpoint-10/unet/config.json", "checkpoint-10/unet/diffusion_pytorch_model.safetensors"}
    assert commit.paths == PUBLISHED | checkpoint_model
    assert server.branch_files(REPO_ID, "main") == {}


# --------------------------------------------------------------------------------------------------
# Failures: clear messages, nothing lost
# --------------------------------------------------------------------------------------------------


def test_network_down_leaves_the_folder_complete_and_says_how_to_retry(run_dir, tmp_path):
    before = tree_state(run_dir)
    endpoint = f"http://127.0.0.1:{closed_port()}"
    result = run_cli(
        ["push", str(run_dir), "--repo-id", REPO_ID, "--revision", "v1"], endpoint, TOKEN, tmp_path / "hf_home"
    )
    assert result.returncode == 1
    assert f"could not reach the Hub at {endpoint}" in result.stderr
    assert f"Nothing in {run_dir} was changed and it still holds the complete pipeline" in result.stderr
    assert f"Retry with:\n  immiscible-diffusers push {run_dir} --repo-id {REPO_ID} --revision v1" in result.stderr
    assert "Traceback" not in result.stderr
    assert tree_state(run_dir) == before


def test_a_rejected_token_is_reported_with_the_retry_command(run_dir, tmp_path):
    with LocalHubServer(token=TOKEN) as server:
        result = run_cli(["push", str(run_dir), "--repo-id", REPO_ID], server.url, "hf_wrong", tmp_path / "hf_home")
    assert result.returncode == 1
    assert "the Hub rejected the token (401 Unauthorized)" in result.stderr
    assert f"immiscible-diffusers push {run_dir} --repo-id {REPO_ID}" in result.stderr
    assert server.commits == [] and server.repos == {}


def test_offline_mode_left_on_is_reported_at_start_up_and_at_push(run_dir, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as the test suite runs; no request leaves the process
    with pytest.raises(HubPushError, match="HF_HUB_OFFLINE is set.*leave out --push_to_hub and run `immiscible-"
                                           f"diffusers push {run_dir} --repo-id {REPO_ID} --private`"):
        create_hub_repo(run_dir, REPO_ID, token=TOKEN, private=True)
    with pytest.raises(HubPushError, match="HF_HUB_OFFLINE is set") as error:
        push_output_dir(run_dir, REPO_ID, token=TOKEN, revision="v2")
    assert error.value.retry_command == f"immiscible-diffusers push {run_dir} --repo-id {REPO_ID} --revision v2"


def test_no_token_fails_before_any_network_call(run_dir, monkeypatch, capsys, tmp_path):
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert cli.main(["push", str(run_dir), "--repo-id", REPO_ID]) == 2
    error = capsys.readouterr().err
    assert "no Hugging Face token" in error and "--token" in error and "HF_TOKEN" in error and "hf auth login" in error


@pytest.mark.parametrize("repo_id", ["bad id", "alice/tiny/ddpm", "alice/tiny--ddpm", "alice/model.git", "alice/-x"])
def test_a_malformed_repo_id_names_the_flag(run_dir, capsys, repo_id):
    assert cli.main(["push", str(run_dir), "--repo-id", repo_id]) == 2
    assert f"--repo-id {repo_id!r} is not a valid Hub repository id" in capsys.readouterr().err


def test_push_output_dir_checks_the_repo_id_of_the_training_scripts(run_dir):
    with pytest.raises(ValueError, match=r"repo_id \(--repo-id / --hub_model_id\) 'my model' is not a valid"):
        push_output_dir(run_dir, "my model", token=TOKEN)


def _save_custom_scheduler(run: Path) -> None:
    from immiscible_diffusers import ImmiscibleDDPMScheduler

    DDPMPipeline(unet=tiny_unet(), scheduler=ImmiscibleDDPMScheduler(num_train_timesteps=50)).save_pretrained(run)


def _custom_pipeline_without_code(run: Path, class_name=("pipeline", "FlowMatchingPipeline")) -> None:
    index = json.loads((run / "model_index.json").read_text())
    (run / "model_index.json").write_text(json.dumps(index | {"_class_name": class_name}))


def _custom_pipeline_code_without_module_name(run: Path) -> None:
    _custom_pipeline_without_code(run, "FlowMatchingPipeline")
    shutil.copyfile(Path(__file__).parents[1] / "immiscible_diffusers" / "pipeline_flow_matching.py", run / "pipeline.py")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda run: shutil.rmtree(run), "does not exist"),
        (lambda run: (run / "model_index.json").unlink(), r"holds no saved pipeline \(model_index.json\); nothing"),
        (_save_custom_scheduler, r"scheduler is immiscible_diffusers.schedulers.ImmiscibleDDPMScheduler, which plain "
                                 r"diffusers cannot load.*immiscible-diffusers stock-scheduler"),
        (_custom_pipeline_without_code, "FlowMatchingPipeline .* is not a diffusers class and no pipeline.py"),
        (lambda run: _custom_pipeline_without_code(run, "FlowMatchingPipeline"),
         "FlowMatchingPipeline .* is not a diffusers class and no pipeline.py"),
        (_custom_pipeline_code_without_module_name,
         r'without its module: write "_class_name": \["pipeline", "FlowMatchingPipeline"\]'),
        (lambda run: (run / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04"),
         r"pickle files that would be published: \['unet/diffusion_pytorch_model.bin'\]"),
        (lambda run: (run / "unet" / "diffusion_pytorch_model.safetensors").unlink(), "holds no .safetensors weights"),
        (lambda run: (run / "README.md").unlink(), r"has no model card \(README.md\)"),
        (lambda run: (run / "README.md").write_text("---\ntags: [a\n---\n# Card\n"),
         "cannot be loaded with ModelCard.load"),
        (lambda run: (run / "README.md").write_text("# A card without metadata\n"),
         "no YAML metadata block.*library_name is None.*pipeline_tag is missing"),
        (lambda run: (run / "samples" / "step_000010.png").unlink(),
         r"links to files that would not be published: \['samples/step_000010.png'\]"),
        (lambda run: write_card(run, sample_grid="logs/grid.png"), r"would not be published: \['logs/grid.png'\]"),
    ],
    ids=["no-folder", "no-pipeline", "custom-scheduler", "custom-pipeline", "custom-pipeline-plain-name",
         "custom-pipeline-no-module", "pickle", "no-safetensors", "no-card",
         "card-yaml", "card-metadata", "missing-sample", "excluded-link"],
)
def test_plan_push_refuses_what_plain_diffusers_or_the_hub_cannot_take(run_copy, damage, message):
    damage(run_copy)
    with pytest.raises(ValueError, match=message):
        plan_push(run_copy)


def test_stock_scheduler_command_converts_an_immiscible_scheduler(run_copy, capsys):
    _save_custom_scheduler(run_copy)
    assert cli.main(["push", str(run_copy), "--repo-id", REPO_ID]) == 2
    assert "immiscible-diffusers stock-scheduler" in capsys.readouterr().err
    assert cli.main(["stock-scheduler", str(run_copy)]) == 0
    assert json.loads((run_copy / "model_index.json").read_text())["scheduler"] == ["diffusers", "DDPMScheduler"]
    config = json.loads((run_copy / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "DDPMScheduler" and "assignment" not in config
    assert config["num_train_timesteps"] == 50
    assert plan_push(run_copy).pipeline_class == "DDPMPipeline"


def test_a_custom_pipeline_shipped_as_pipeline_py_is_published_with_a_note(run_copy):
    _custom_pipeline_without_code(run_copy)
    source = Path(__file__).parents[1] / "immiscible_diffusers" / "pipeline_flow_matching.py"
    shutil.copyfile(source, run_copy / "pipeline.py")
    plan = plan_push(run_copy)
    assert "pipeline.py" in plan.files
    assert plan.pipeline_class == "FlowMatchingPipeline"
    assert any("DiffusionPipeline.from_pretrained(repo_id, trust_remote_code=True)" in note for note in plan.notes)


def test_a_pushed_flow_matching_run_loads_with_trust_remote_code(tmp_path):
    """The diffusers way from a pushed repo: model_index names ["pipeline", class], pipeline.py is published."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from immiscible_diffusers.flow_matching import FlowMatchingPipeline, save_flow_matching_pipeline

    run = tmp_path / "flow"
    save_flow_matching_pipeline(FlowMatchingPipeline(unet=tiny_unet(), scheduler=FlowMatchEulerDiscreteScheduler()), run)
    (run / "samples").mkdir()
    Image.new("L", (16, 16), color=128).save(run / "samples" / "step_000010.png")
    write_card(run)
    with LocalHubServer(token=TOKEN) as server:
        result = run_cli(["push", str(run), "--repo-id", "alice/tiny-flow"], server.url, TOKEN, tmp_path / "hf_home")
        assert result.returncode == 0, result.stderr
        files = server.branch_files("alice/tiny-flow")
    assert "pipeline.py" in files
    assert json.loads(files["model_index.json"])["_class_name"] == ["pipeline", "FlowMatchingPipeline"]
    repo = tmp_path / "repo"
    for path, content in files.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_bytes(content)
    pipeline = DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)
    assert type(pipeline).__name__ == "FlowMatchingPipeline" and type(pipeline).__module__.startswith("diffusers_modules")
    assert pipeline(batch_size=1, num_inference_steps=2, output_type="np").images.shape == (1, 8, 8, 1)


def test_a_lora_run_is_recognised_and_its_checkpoint_adapters_can_go(tmp_path, capsys):
    from safetensors.torch import save_file

    run = tmp_path / "lora"
    (run / "checkpoint-2").mkdir(parents=True)
    for folder in (run, run / "checkpoint-2"):
        save_file({"unet.up.lora_A.weight": torch.zeros(2, 2)}, folder / "pytorch_lora_weights.safetensors")
    (run / "checkpoint-2" / "optimizer.bin").write_bytes(b"\x80\x04")
    (run / "samples").mkdir()
    Image.new("L", (16, 16)).save(run / "samples" / "step_000010.png")
    write_card(run, pipeline_tag="text-to-image", base_model="runwayml/stable-diffusion-v1-5")
    assert cli.main(["push", str(run), "--dry-run", "--include-checkpoints"]) == 0
    listed = {line.strip() for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert listed == {
        "README.md", "pytorch_lora_weights.safetensors", "samples/step_000010.png",
        "checkpoint-2/pytorch_lora_weights.safetensors",
    }
    assert "checkpoint-2/pytorch_lora_weights.safetensors" not in plan_push(
        run, required_file="pytorch_lora_weights.safetensors"
    ).files


def test_dry_run_lists_the_files_without_a_token_or_network(run_dir, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert cli.main(["push", str(run_dir), "--dry-run"]) == 0
    output = capsys.readouterr().out
    listed = {line.strip() for line in output.splitlines() if line.startswith("  ")}
    assert listed == PUBLISHED
    assert "left out: .tmp-checkpoint-20/, checkpoint-10/, logs/, train_output.log" in output


# --------------------------------------------------------------------------------------------------
# The model card
# --------------------------------------------------------------------------------------------------


def test_card_for_repo_replaces_only_the_local_references():
    text = (
        'pipeline = StableDiffusionPipeline.from_pretrained("runwayml/stable-diffusion-v1-5")\n'
        "pipeline.load_lora_weights('outputs/lora')\n"
        'other = DDPMPipeline.from_pretrained("bob/lora")\n'
        'see = "outputs/lora"\n'
        'base = DDPMPipeline.from_pretrained("bob/outputs/lora")\n'
    )
    replaced = card_for_repo(text, "alice/lora-v2", {"outputs/lora"}, {"lora"})
    assert "from_pretrained(\"runwayml/stable-diffusion-v1-5\")" in replaced
    assert "load_lora_weights('alice/lora-v2')" in replaced
    assert 'from_pretrained("alice/lora-v2")' in replaced  # the repo it was pushed to before, under any user
    assert 'see = "outputs/lora"' in replaced and 'from_pretrained("bob/outputs/lora")' in replaced
    assert card_for_repo(text, "alice/x", {"lora"}) == text  # a bare name counts only as a repo name


def test_knn_card_cites_both_papers_and_loads_back(tmp_path):
    card = build_model_card(
        title="t", metadata=CARD_METADATA | {"assignment": "knn"}, pipeline_tag="unconditional-image-generation",
        usage_code="x", base_model="google/ddpm-cifar10-32",
    )
    card.save(tmp_path / "README.md")
    loaded = check_model_card(tmp_path / "README.md")
    assert PAPER_CITATION in loaded.text and KNN_CITATION in loaded.text and "2505.18521" in KNN_CITATION
    assert loaded.data.base_model == "google/ddpm-cifar10-32"
    assert "assignment-knn" in loaded.data.tags


def test_card_command_adds_the_evaluators_plot_and_table(run_copy, tmp_path, capsys):
    from immiscible_diffusers.evaluate import EvaluationResults, add_metrics_to_model_cards, write_results

    rows = [
        {"run": "tiny", "run_dir": str(run_copy), "assignment": "linear", "seed": 0, "step": step,
         "checkpoint": f"checkpoint-{step}", "weights": "raw", "sampler": "ddim", "num_inference_steps": 2, "nfe": 2,
         "num_samples": 4, "metric": "digits_fd", "value": value, "train_loss": None}
        for step, value in ((5, 40.0), (10, 25.5))
    ]
    results = EvaluationResults(rows=rows, settings={"num_inference_steps": 2, "num_samples": 4, "seed": 0})
    write_results(results, tmp_path / "eval")
    for _ in range(2):  # a second evaluation replaces the scores in model-index
        add_metrics_to_model_cards(results, [run_copy])
    (result,) = ModelCard.load(run_copy / "README.md").data.eval_results
    assert (result.metric_type, result.metric_value, result.metric_args["step"]) == ("digits_fd", 25.5, 10)
    for _ in range(2):  # a second evaluation replaces the section
        assert cli.main(["card", str(run_copy), "--evaluation-dir", str(tmp_path / "eval")]) == 0
    text = (run_copy / "README.md").read_text()
    assert text.count(EVALUATION_START) == 1
    assert "![sample quality vs training steps](evaluation/quality.png)" in text
    assert "| step | NFE | tiny |" in text and "| 10 | 2 | 25.50 |" in text
    assert "`digits_fd`: **25.5** at step 10 (ddim, 2 steps, 4 samples)" in text
    assert text.index(EVALUATION_START) < text.index("## Training configuration")
    plan = plan_push(run_copy)
    assert {"evaluation/quality.png", "evaluation/quality.md", "evaluation/quality.csv"} <= set(plan.files)
    with open(run_copy / "evaluation" / "quality.csv", newline="") as handle:
        assert [row["value"] for row in csv.DictReader(handle)] == ["40.0", "25.5"]
    assert cli.main(["card", str(run_copy), "--evaluation-dir", str(tmp_path / "missing")]) == 2
    assert "holds none of ['quality.png', 'quality.md', 'quality.csv']" in capsys.readouterr().err


def test_help_describes_the_push_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["push", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--repo-id", "--private", "--revision", "--token", "--commit-message", "--include-checkpoints"):
        assert flag in text
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["push", "somewhere"])
    assert exit_info.value.code == 2
    assert "the following arguments are required: --repo-id" in capsys.readouterr().err


def test_cli_user_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    missing = str(tmp_path / "missing")
    assert cli.main(["push", missing, "--dry-run"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"immiscible-diffusers push: error: output folder {missing!r} does not exist"]
    with pytest.raises(ValueError, match="does not exist"):
        cli.main(["--debug", "push", missing, "--dry-run"])
