"""The Gradio Space (spaces_app/): sampling, the API, the error paths, and a real headless Chromium.

Tiny pipelines (8x8 grayscale UNets with random weights) are built from configs and saved with model
cards; one tiny DDPM model is trained for real (``train_unconditional.py``, ~20 s) to count saturated tiles
per sampler. The app is started with its own command line (``python spaces_app/app.py --vanilla ... --port``)
on 127.0.0.1, once locally and once in Space mode (``SPACE_ID`` set, its models in a Hub cache made here:
the real cache layout, read offline), and driven through its API with ``gradio_client`` and through the
page with playwright and Debian's ``chromium`` (``make browser-deps`` installs it; ``SKIP_BROWSER_TESTS=1``
skips those tests). Screenshots land in ``test-artifacts/``.
"""

from __future__ import annotations

import ast
import concurrent.futures
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    CMStochasticIterativeScheduler,
    ConsistencyModelPipeline,
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UNet2DModel,
)
from huggingface_hub import EvalResult, ModelCard
from PIL import Image

from immiscible_diffusers.flow_matching import FlowMatchingPipeline, save_flow_matching_pipeline
from immiscible_diffusers.model_card import write_model_card

REPO = Path(__file__).resolve().parents[1]
SPACE_DIR = REPO / "spaces_app"
APP_FILE = SPACE_DIR / "app.py"
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
# Work the test server allows per request: both tiny models at 4 images x 20 steps (see test_request_is_capped).
BUDGET_IMAGE_STEPS = 4 * 20
TRAIN_SCRIPT = REPO / "training_scripts" / "train_unconditional.py"
# Hub ids of the Space-mode server's models (put in its Hub cache by the `hub_cache` fixture).
HUB_MODELS = {"vanilla": "tiny/ddpm-vanilla", "immiscible": "tiny/ddpm-immiscible", "flow_code": "tiny/flow-code"}


def _load_app():
    spec = importlib.util.spec_from_file_location("space_app", APP_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


space = _load_app()
torch.set_num_threads(1)  # tiny models; the app under test runs in its own process


# --------------------------------------------------------------------------------------------------
# Tiny pipelines
# --------------------------------------------------------------------------------------------------


def tiny_unet(seed: int) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()  # fmt: skip


def card_metadata(assignment: str, **extra) -> dict:
    return {
        "script": "train_unconditional.py", "assignment": assignment, "knn_k": 4, "assignment_distance": "l2",
        "assignment_dtype": "float32", "assignment_scope": "global", "prediction_type": "epsilon",
        "train_batch_size": 8, "resolution": 8, "global_step": 30, "seed": 0, "dataset": "sklearn-digits", **extra,
    }  # fmt: skip


def save_card(folder: Path, assignment: str, **extra) -> None:
    write_model_card(
        folder, title=f"tiny {assignment}", metadata=card_metadata(assignment, **extra),
        pipeline_tag="unconditional-image-generation", usage_code="pipeline = DDPMPipeline.from_pretrained('x')",
    )  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("space_models")
    names = ("vanilla", "immiscible", "cm_a", "cm_b", "flow", "flow_code", "unsupported", "empty")
    folders = {name: root / name for name in names}
    DDPMPipeline(unet=tiny_unet(0), scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(
        folders["vanilla"]
    )
    save_card(folders["vanilla"], "none")
    card = ModelCard.load(folders["vanilla"] / "README.md")  # a model-index, as the Hub shows quality figures
    card.data.model_name = "tiny none"
    card.data.eval_results = [
        EvalResult(task_type="unconditional-image-generation", dataset_type="sklearn-digits",
                   dataset_name="digits", dataset_split="test", metric_type="frechet_distance",
                   metric_name="digits FD", metric_value=3.21),
    ]  # fmt: skip
    card.save(folders["vanilla"] / "README.md")
    DDPMPipeline(unet=tiny_unet(1), scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(
        folders["immiscible"]
    )
    metrics = {
        "digits_fd": {"value": 12.3456, "step": 30, "sampler": "ddim", "num_inference_steps": 50, "num_samples": 256}
    }
    save_card(folders["immiscible"], "linear", metrics=metrics)
    for name, seed in (("cm_a", 2), ("cm_b", 3)):  # no cards: the app must do without
        ConsistencyModelPipeline(
            unet=tiny_unet(seed), scheduler=CMStochasticIterativeScheduler(num_train_timesteps=40)
        ).save_pretrained(folders[name])
    save_flow_matching_pipeline(
        FlowMatchingPipeline(unet=tiny_unet(4), scheduler=FlowMatchEulerDiscreteScheduler()), folders["flow"]
    )
    # The pipeline shipped as code beside the model: diffusers loads it with trust_remote_code.
    save_flow_matching_pipeline(
        FlowMatchingPipeline(unet=tiny_unet(5), scheduler=FlowMatchEulerDiscreteScheduler()), folders["flow_code"]
    )
    index = json.loads((folders["flow_code"] / "model_index.json").read_text())
    index["_class_name"] = ["pipeline", "FlowMatchingPipeline"]
    (folders["flow_code"] / "model_index.json").write_text(json.dumps(index))
    folders["unsupported"].mkdir()
    (folders["unsupported"] / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    folders["empty"].mkdir()
    return folders


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_app(tmp_path_factory, vanilla: str, immiscible: str, **env_vars: str):
    """The app, started as a user starts it (its command line), on 127.0.0.1; yields its URL."""
    num_parameters = sum(p.numel() for p in tiny_unet(0).parameters())
    budget = 2 * num_parameters * 8 * 8 * BUDGET_IMAGE_STEPS
    port = _free_port()
    log_path = tmp_path_factory.mktemp("space_log") / "app.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", OMP_NUM_THREADS="1")
    for name in ("SPACE_ID", "ALLOWED_MODELS", "VANILLA_MODEL", "IMMISCIBLE_MODEL"):
        env.pop(name, None)
    env.update(env_vars)
    command = [
        sys.executable, str(APP_FILE), "--vanilla", vanilla, "--immiscible", immiscible,
        "--host", "127.0.0.1", "--port", str(port), "--compute_budget", str(budget), "--max_queue", "4",
    ]  # fmt: skip
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(
                f"the app did not start (exit code {process.poll()}); its log:\n{log_path.read_text()[-4000:]}"
            )
        time.sleep(0.5)
    yield url
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    yield from _start_app(tmp_path_factory, str(models["vanilla"]), str(models["immiscible"]))


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False)


@pytest.fixture(scope="module")
def hub_cache(models, tmp_path_factory) -> Path:
    """A Hub cache holding three of the tiny models under Hub ids, in the layout huggingface_hub reads offline
    (``models--owner--name/refs/main`` naming a ``snapshots/<commit>/`` folder)."""
    cache = tmp_path_factory.mktemp("hub_cache")
    for name, repo_id in HUB_MODELS.items():
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        commit = hashlib.sha1(repo_id.encode()).hexdigest()
        shutil.copytree(models[name], repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
    return cache


@pytest.fixture(scope="module")
def space_server(hub_cache, tmp_path_factory):
    """The app as it runs on a Space: SPACE_ID set, its models Hub ids (from the cache, offline)."""
    yield from _start_app(
        tmp_path_factory, HUB_MODELS["vanilla"], HUB_MODELS["immiscible"], SPACE_ID="someone/immiscible",
        HF_HUB_CACHE=str(hub_cache),
    )  # fmt: skip


@pytest.fixture(scope="module")
def space_client(space_server):
    from gradio_client import Client

    return Client(space_server, verbose=False)


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory) -> Path:
    """A tiny DDPM model trained for real with the main job's script and schedule (1000 linear timesteps,
    epsilon, clip_sample): 300 steps at 8x8, ~20 s. Untrained weights would not show saturation."""
    output_dir = tmp_path_factory.mktemp("trained") / "ddpm"
    command = [
        sys.executable, str(TRAIN_SCRIPT), "--output_dir", str(output_dir), "--resolution", "8",
        "--unet_block_out_channels", "8,16", "--train_batch_size", "32", "--max_train_steps", "300",
        "--learning_rate", "3e-3", "--lr_warmup_steps", "0", "--seed", "0", "--eval_batch_size", "2",
        "--eval_scheduler", "ddim", "--ddpm_num_inference_steps", "2", "--assignment", "none",
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


def gallery_arrays(gallery) -> list[np.ndarray]:
    return [np.asarray(Image.open(item["image"])) for item in gallery]


def generate(client, vanilla, immiscible, sampler="DDIM", steps=5, seed=0, num_images=3):
    return client.predict(str(vanilla), str(immiscible), sampler, steps, seed, num_images, api_name="/generate")


# --------------------------------------------------------------------------------------------------
# Sampling, in process
# --------------------------------------------------------------------------------------------------


def test_sampling_loops_match_the_stock_pipelines(models):
    """Our loops (run so that both models share one noise tensor) give what the stock pipelines give."""
    seed, num_images = 5, 2
    ddpm = space.load_model(str(models["vanilla"]))
    noise = space.initial_noise(seed, num_images, ddpm.image_shape)
    ours = space.sample_model(ddpm, "DDIM", 6, noise, seed)
    # The app samples DDPM-family models with trailing timesteps (the first step at t = T - 1 at any count).
    ddim = DDIMScheduler.from_config({**ddpm.scheduler_config, "timestep_spacing": "trailing"})
    stock = DDIMPipeline(unet=ddpm.unet, scheduler=ddim)(
        batch_size=num_images, generator=torch.Generator().manual_seed(seed), num_inference_steps=6, output_type="np"
    ).images
    np.testing.assert_allclose(ours.permute(0, 2, 3, 1).numpy(), stock, atol=1e-5)

    # The stock ConsistencyModelPipeline takes `latents` for RGB models only: compare on an RGB UNet.
    scheduler = CMStochasticIterativeScheduler(num_train_timesteps=40)
    rgb_unet = UNet2DModel(**{**tiny_unet(2).config, "in_channels": 3, "out_channels": 3})
    cm = space.LoadedModel("rgb", "consistency", "ConsistencyModelPipeline", rgb_unet.eval(), dict(scheduler.config))
    rgb_noise = space.initial_noise(seed, num_images, cm.image_shape)
    ours = space.sample_model(cm, "Consistency few-step", 3, rgb_noise, seed)  # stochastic: same step noise
    stock = ConsistencyModelPipeline(unet=rgb_unet, scheduler=scheduler)(
        batch_size=num_images, latents=rgb_noise, generator=torch.Generator().manual_seed(seed), num_inference_steps=3,
        output_type="np",
    ).images  # fmt: skip
    np.testing.assert_allclose(ours.permute(0, 2, 3, 1).numpy(), stock, atol=1e-5)

    flow = space.load_model(str(models["flow"]))
    assert flow.kind == "flow" and flow.pipeline_class == "FlowMatchingPipeline"
    ours = space.sample_model(flow, "Flow Euler", 4, noise, seed)
    pipeline = FlowMatchingPipeline(
        unet=flow.unet, scheduler=FlowMatchEulerDiscreteScheduler.from_config(flow.scheduler_config)
    )
    stock = pipeline(
        batch_size=num_images, generator=torch.Generator().manual_seed(seed), num_inference_steps=4, output_type="np"
    ).images
    np.testing.assert_allclose(ours.permute(0, 2, 3, 1).numpy(), stock, atol=1e-5)


@pytest.mark.parametrize("sampler", ["DDPM", "Euler", "DPM-Solver"])
def test_other_diffusion_samplers_denoise(models, sampler):
    model = space.load_model(str(models["vanilla"]))
    noise = space.initial_noise(0, 2, model.image_shape)
    for steps in (1, 3):
        images = space.sample_model(model, sampler, steps, noise, 0)
        assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
        assert 0 <= images.min() and images.max() <= 1


def saturated_tiles(images: torch.Tensor) -> int:
    """Tiles (images in [0, 1]) with more than 90% of their pixels at 0 or 1: clipped noise, not a digit."""
    clipped = ((images <= 0) | (images >= 1)).flatten(1).float().mean(1)
    return int((clipped > 0.9).sum())


def test_no_sampler_gives_saturated_tiles_on_a_trained_ddpm_model(trained_model):
    """On a DDPM-trained model (the main job's schedule), unclipped Euler and DPM-Solver turned most of 64 tiles
    into saturated noise (49 and 44 of 64 here at 50 and 20 steps); every sampler must give none."""
    model = space.load_model(str(trained_model))
    assert model.kind == "diffusion" and model.max_steps == 1000
    noise = space.initial_noise(0, 64, model.image_shape)
    counts = {}
    for name in [name for name, sampler in space.SAMPLERS.items() if sampler.kind == "diffusion"]:
        for steps in (5, space.SAMPLERS[name].default_steps, 50):
            counts[name, steps] = saturated_tiles(space.sample_model(model, name, steps, noise, 0))
    assert all(count == 0 for count in counts.values()), counts
    # The clipping is what does it: Euler without it (the stock scheduler on the saved config) saturates.
    euler = EulerDiscreteScheduler.from_config({**model.scheduler_config, "timestep_spacing": "trailing"})
    euler.set_timesteps(50)
    sample = noise * euler.init_noise_sigma
    with torch.no_grad():
        for t in euler.timesteps:
            output = model.unet(euler.scale_model_input(sample, t), t).sample
            sample = euler.step(output, t, sample).prev_sample
    assert saturated_tiles((sample / 2 + 0.5).clamp(0, 1)) > 16


def test_every_sampler_works_at_its_most_steps(trained_model, models):
    """The steps range the UI offers works to its end: DPM-Solver at 1000 steps raised an IndexError."""
    for source, names in [
        (trained_model, ["DPM-Solver", "DDIM", "Euler", "DDPM"]),
        (models["cm_a"], ["Consistency one-step", "Consistency few-step"]),
    ]:
        model = space.load_model(str(source))
        noise = space.initial_noise(0, 2, model.image_shape)
        for name in names:
            images = space.sample_model(model, name, model.max_steps, noise, 0)
            assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all(), name
    assert space.load_model(str(models["cm_a"])).max_steps == 40
    assert space.load_model(str(models["flow"])).max_steps == space.MAX_STEPS


def test_default_sampling_is_one_constant():
    for kind, (sampler, steps) in space.DEFAULT_SAMPLING.items():
        assert space.SAMPLERS[sampler].kind == kind and space.SAMPLERS[sampler].min_steps <= steps
    assert space.DEFAULT_SAMPLING["diffusion"] == ("DDIM", 50)
    # Few-step flow sampling, where the main job's models differ most (docs/results/main_job.md).
    assert space.DEFAULT_SAMPLING["flow"] == ("Flow Euler", 2)


def test_flow_sampling_spends_every_step(models):
    """The app uses the package's uniform sigmas: each of n Euler steps covers 1/n of the path, so n-step images
    differ from (n-1)-step ones. diffusers' stock spacing ends at sigma 1/1000, so its 2-step images are the 1-step
    ones moved by a thousandth of a velocity (a default of 2 steps would show 1-step images)."""
    flow = space.load_model(str(models["flow"]))  # untrained tiny UNet: only the spacing matters here
    noise = space.initial_noise(0, 2, flow.image_shape)
    images = {n: space.sample_model(flow, "Flow Euler", n, noise, 0) for n in (1, 2, 3)}
    # Uniform spacing: ~0.04-0.1 here (the untrained UNet's velocity barely depends on sigma); stock: < 0.002.
    assert (images[2] - images[1]).abs().max() > 0.01
    assert (images[3] - images[2]).abs().max() > 0.01


def test_space_mode_refuses_local_paths_without_looking(models, monkeypatch, tmp_path):
    """Space mode: whatever is not a Hub id gets one message, existing or not, and the filesystem is not
    touched (a message that differed would let a visitor map the server's folders)."""
    public = space.ModelPolicy(public=True)
    attempts = [str(models["vanilla"]), "/no/such/folder", "../../etc", "/etc", "~", "outputs/demo/vanilla/",
                "./vanilla", "C:\\Windows", "a/b/c", "owner/..", " "]  # fmt: skip

    def no_filesystem(*args, **kwargs):
        raise AssertionError(f"the filesystem was looked at: {args}")

    messages = set()
    with monkeypatch.context() as patch:
        for name in ("is_dir", "exists", "is_file", "stat", "expanduser"):
            patch.setattr(Path, name, no_filesystem)
        patch.setattr(os.path, "exists", no_filesystem)
        patch.setattr(os.path, "isdir", no_filesystem)
        for source in attempts[:-1]:
            with pytest.raises(space.SpaceError) as error:
                space.load_model(source, policy=public)
            messages.add(str(error.value))
    assert messages == {space.PUBLIC_REFUSAL}
    # An id-shaped text that is also a folder here is still a Hub id: the folder is not loaded.
    monkeypatch.chdir(tmp_path)
    shutil.copytree(models["vanilla"], tmp_path / "owner" / "name")
    with pytest.raises(space.SpaceError, match="Could not reach the Hub to load `owner/name`"):
        space.load_model("owner/name", policy=public)
    assert space.load_model("owner/name").source == "owner/name"  # locally, folders keep working
    # An allow-list refuses other ids with one message.
    allowed = space.ModelPolicy(public=True, allowed=frozenset({"a/b"}))
    for source in ("c/d", str(models["vanilla"])):
        with pytest.raises(space.SpaceError, match=r"This Space loads only these models: a/b\.|Hub only"):
            space.load_model(source, policy=allowed)
    # The command line: --public or SPACE_ID; the operator's models must be Hub ids there.
    monkeypatch.setenv("SPACE_ID", "someone/space")
    args = space.parse_args(["--allowed_models", "a/b, c/d"])
    assert args.public and args.allowed_models == ["a/b", "c/d"]
    policy = space.model_policy(args, "x/vanilla", "x/immiscible")
    assert policy.allowed == {"a/b", "c/d", "x/vanilla", "x/immiscible"} and policy.trusted == {"x/vanilla", "x/immiscible"}
    with pytest.raises(SystemExit) as exit_info:
        space.model_policy(args, str(models["vanilla"]), "x/immiscible")
    assert exit_info.value.code == 2
    monkeypatch.delenv("SPACE_ID")
    assert not space.parse_args([]).public and space.parse_args(["--public"]).public
    for flags in (["--public", "--allowed_models", "/etc"], ["--allowed_models", "a/b"]):
        with pytest.raises(SystemExit):
            space.parse_args(flags)


def test_flow_pipeline_shipped_as_code_loads(models):
    """model_index `_class_name: ["pipeline", "FlowMatchingPipeline"]`: loaded with diffusers' trust_remote_code;
    in Space mode only for the operator's models."""
    model = space.load_model(str(models["flow_code"]))
    assert (model.kind, model.pipeline_class) == ("flow", "FlowMatchingPipeline")
    noise = space.initial_noise(0, 2, model.image_shape)
    assert torch.isfinite(space.sample_model(model, "Flow Euler", 3, noise, 0)).all()
    public = space.ModelPolicy(public=True, trusted=frozenset({"x/y"}))
    assert public.may_run_code("x/y") and not public.may_run_code("x/z") and space.ModelPolicy().may_run_code("x/z")


def test_loading_refuses_what_it_cannot_sample(models):
    with pytest.raises(space.SpaceError, match=r"too large for this Space: [\d,]+ UNet parameters \(limit 1,000,"):
        space.load_model(str(models["vanilla"]), max_parameters=1000)
    with pytest.raises(space.SpaceError, match="StableDiffusionPipeline.*unconditional pixel-space"):
        space.load_model(str(models["unsupported"]))
    with pytest.raises(space.SpaceError, match="no `model_index.json`"):
        space.load_model(str(models["empty"]))
    with pytest.raises(space.SpaceError, match="not found. Run `make demo` first"):
        space.load_model("outputs/demo/no-such-run")
    with pytest.raises(space.SpaceError, match="No model given"):
        space.load_model("  ")


def test_request_checks_and_cap(models):
    assert space.check_request("DDIM", 50.0, 3, 16) == ("DDIM", 50, 3, 16)
    assert space.check_request("Consistency one-step", 999, 0, 1)[1] == 1  # one-step ignores the steps control
    for args, message in [
        (("DDIM", 0, 0, 4), "Steps for DDIM must be a whole number between 1 and 1000, got 0"),
        (("DDIM", 2.5, 0, 4), "Steps .* got 2.5"),
        (("Consistency few-step", 1, 0, 4), "between 2 and 1000"),
        (("DDIM", 10, -1, 4), "Seed must be"),
        (("DDIM", 10, 0, 17), "Number of images must be a whole number between 1 and 16, got 17"),
        (("DDIM", "ten", 0, 4), "got 'ten'"),
        (("Heun", 10, 0, 4), "Unknown sampler 'Heun'"),
    ]:
        with pytest.raises(space.SpaceError, match=message):
            space.check_request(*args)
    model = space.load_model(str(models["vanilla"]))
    cost = model.cost_per_image_step
    assert space.cap_request([model], 10, 4, budget=cost * 40) == (10, 4, "")
    steps, num_images, note = space.cap_request([model, model], 10, 16, budget=cost * 2 * 40)
    assert (steps, num_images) == (10, 4) and "capped to 4 images x 10 steps (asked: 16 x 10)" in note
    steps, num_images, note = space.cap_request([model], 1000, 16, budget=cost * 50)
    assert (steps, num_images) == (50, 1) and "1 image x 50 steps" in note


def test_default_models(monkeypatch, tmp_path):
    for variable in ("VANILLA_MODEL", "IMMISCIBLE_MODEL", "SPACE_ID"):
        monkeypatch.delenv(variable, raising=False)
    assert space.default_model("vanilla", None) == "outputs/demo/vanilla"  # the main job's output
    assert space.default_model("immiscible", None) == "outputs/demo/immiscible"
    monkeypatch.setenv("SPACE_ID", "someone/space")  # on a Space: the README's models
    listed = space.space_models()
    assert len(listed) == 2 and space.default_model("immiscible", None) == listed[1]
    monkeypatch.setenv("IMMISCIBLE_MODEL", "me/my-model")
    assert space.default_model("immiscible", None) == "me/my-model"
    assert space.default_model("immiscible", "./run") == "./run"  # the flag wins
    for flags in (["--max_queue", "0"], ["--threads", "0"], ["--compute_budget", "-1"]):
        with pytest.raises(SystemExit):
            space.parse_args(flags)
    assert 1 <= space.available_cpus() <= (os.cpu_count() or 1)


def test_card_facts(models):
    facts = space.card_facts_markdown(space.load_model(str(models["immiscible"])))
    assert "| assignment | linear |" in facts and "| training steps | 30 |" in facts
    assert "| digits_fd | **12.3456** (step 30, sampler ddim, steps 50, samples 256) |" in facts
    facts = space.card_facts_markdown(space.load_model(str(models["cm_a"])))
    assert "ConsistencyModelPipeline" in facts and "no `immiscible_diffusers` training facts" in facts
    # The card's model-index (the Hub's place for quality figures) is shown when present.
    facts = space.card_facts_markdown(space.load_model(str(models["vanilla"])))
    assert "| quality (card's model-index) | value | dataset |" in facts and "| digits FD | **3.21** | digits (test) |" in facts


# --------------------------------------------------------------------------------------------------
# The Space folder
# --------------------------------------------------------------------------------------------------


def test_space_folder_is_pushable_as_is():
    import gradio
    from huggingface_hub import metadata_load
    from packaging.requirements import Requirement

    meta = metadata_load(SPACE_DIR / "README.md")
    assert meta["sdk"] == "gradio" and (SPACE_DIR / meta["app_file"]).is_file()
    assert meta["sdk_version"] == gradio.__version__, "sdk_version should be the gradio version the app is tested with"
    assert meta["license"] == "apache-2.0" and "immiscible-diffusion" in meta["tags"] and len(meta["models"]) == 2
    # Every requirement is installed here at a version it allows (what the tests ran with).
    requirements = [
        Requirement(line) for line in (SPACE_DIR / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "-"))
    ]  # fmt: skip
    for requirement in requirements:
        assert requirement.specifier.contains(importlib.metadata.version(requirement.name), prereleases=True), (
            requirement
        )
    # The app imports only the standard library, gradio and its requirements (not immiscible_diffusers).
    provided = {"gradio", "torch", "diffusers", "huggingface_hub", "PIL"}
    assert {r.name.lower().replace("-", "_") for r in requirements} >= {
        "torch",
        "diffusers",
        "huggingface_hub",
        "pillow",
    }
    assert not any(path.is_symlink() for path in SPACE_DIR.iterdir()), "a link breaks when the folder is pushed"
    imported = set()
    for node in ast.walk(ast.parse(APP_FILE.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert imported - provided <= set(sys.stdlib_module_names), imported - provided - set(sys.stdlib_module_names)


# --------------------------------------------------------------------------------------------------
# The running app, through its API
# --------------------------------------------------------------------------------------------------


def test_api_load_models_shows_training_facts(client, models):
    vanilla_facts, immiscible_facts, status, sampler, steps = client.predict(
        str(models["vanilla"]), str(models["immiscible"]), "DDIM", api_name="/load_models"
    )
    assert "none (vanilla pairing)" in vanilla_facts and "| assignment | linear |" in immiscible_facts
    assert "**12.3456**" in immiscible_facts and "Both models loaded" in status
    assert sampler["value"] == "DDIM" and sampler["info"] == "For these models: DDIM, DPM-Solver, Euler, DDPM."
    assert [choice[0] for choice in sampler["choices"]] == ["DDIM", "DPM-Solver", "Euler", "DDPM"]
    assert steps["maximum"] == 100 and steps["value"] == 50  # the tiny models have 100 training timesteps
    assert "| digits FD | **3.21** | digits (test) |" in vanilla_facts  # the card's model-index


def test_api_generates_both_side_by_side(client, models):
    vanilla, vanilla_time, immiscible, immiscible_time, status = generate(
        client, models["vanilla"], models["immiscible"]
    )
    assert len(vanilla) == len(immiscible) == 3
    for image in gallery_arrays(vanilla) + gallery_arrays(immiscible):
        assert image.shape == (128, 128)  # 8x8 shown enlarged 16x, nearest neighbour
        assert len(np.unique(image[::16, ::16])) > 1
    for timing in (vanilla_time, immiscible_time):
        assert re.search(r"\*\*\d+\.\d\d s\*\* for 3 images, DDIM, 5 steps \(\d+ ms per step\)", timing), timing
    assert "Seed 0: both models sampled from the same starting noise." in status
    assert not np.array_equal(gallery_arrays(vanilla)[0], gallery_arrays(immiscible)[0])  # different weights


def test_api_same_seed_same_noise(client, models):
    """One model on both sides, with the stochastic DDPM sampler: identical images, so both sides got the same
    starting noise and the same per-step noise; the seed changes them."""
    first = generate(client, models["vanilla"], models["vanilla"], sampler="DDPM", steps=10, seed=7, num_images=2)
    assert all(np.array_equal(a, b) for a, b in zip(gallery_arrays(first[0]), gallery_arrays(first[2]), strict=True))
    again = generate(client, models["vanilla"], models["vanilla"], sampler="DDPM", steps=10, seed=7, num_images=2)
    assert all(np.array_equal(a, b) for a, b in zip(gallery_arrays(first[0]), gallery_arrays(again[0]), strict=True))
    other = generate(client, models["vanilla"], models["vanilla"], sampler="DDPM", steps=10, seed=8, num_images=2)
    assert not np.array_equal(gallery_arrays(first[0])[0], gallery_arrays(other[0])[0])


@pytest.mark.parametrize(
    "pair, sampler, steps",
    [(("vanilla", "immiscible"), "Euler", 3), (("vanilla", "immiscible"), "DPM-Solver", 3),
     (("cm_a", "cm_b"), "Consistency one-step", 1), (("cm_a", "cm_b"), "Consistency few-step", 3),
     (("flow", "flow"), "Flow Euler", 3), (("flow_code", "flow"), "Flow Euler", 3)],
)  # fmt: skip
def test_api_samplers(client, models, pair, sampler, steps):
    vanilla, vanilla_time, immiscible, _, _ = generate(client, models[pair[0]], models[pair[1]], sampler, steps, 1, 2)
    assert len(vanilla) == len(immiscible) == 2 and f"{sampler}, {steps} step" in vanilla_time


def test_api_loading_flow_models_opens_at_the_few_step_default(client, models):
    *_, sampler, steps = client.predict(str(models["flow"]), str(models["flow_code"]), "DDIM", api_name="/load_models")
    assert (sampler["value"], steps["value"]) == space.DEFAULT_SAMPLING["flow"] == ("Flow Euler", 2)


def test_api_load_offers_the_samplers_of_the_models(client, models):
    *_, status, sampler, steps = client.predict(
        str(models["cm_a"]), str(models["cm_b"]), "DDIM", api_name="/load_models"
    )
    assert "Both models loaded" in status
    assert sampler["info"] == "For these models: Consistency one-step, Consistency few-step."
    assert [choice[0] for choice in sampler["choices"]] == ["Consistency one-step", "Consistency few-step"]
    assert sampler["value"] == "Consistency one-step" and steps["value"] == 1 and steps["interactive"] is False


def test_api_request_is_capped(client, models):
    vanilla, _, immiscible, _, status = generate(client, models["vanilla"], models["immiscible"], "DDIM", 20, 0, 16)
    assert len(vanilla) == len(immiscible) == 4
    assert "**Capped:** Request capped to 4 images x 20 steps (asked: 16 x 20)" in status


def test_api_error_paths(client, models):
    from gradio_client.exceptions import AppError

    good = str(models["vanilla"])
    # Bad controls, of the wrong value or the wrong type: one clear message (no Gradio "upstream app raised an
    # exception"), no images.
    for sampler, steps, seed, num_images, message in [
        ("DDIM", 0, 0, 2, "Steps for DDIM must be a whole number between 1 and 1000, got 0."),
        ("DDIM", 5000, 0, 2, "Steps for DDIM must be a whole number between 1 and 1000, got 5000."),
        ("DDIM", 5, 0, 40, "Number of images must be a whole number between 1 and 16, got 40."),
        ("DDIM", 5, -3, 2, "Seed must be a whole number between 0 and 4294967295, got -3."),
        ("DDIM", 2.5, 0, 2, "Steps for DDIM must be a whole number between 1 and 1000, got 2.5."),
        ("DDIM", "ten", 0, 2, "Steps for DDIM must be a whole number between 1 and 1000, got 'ten'."),
        ("DDIM", 5, "abc", 2, "Seed must be a whole number between 0 and 4294967295, got 'abc'."),
        ("DDIM", 5, [1], 2, "Seed must be a whole number between 0 and 4294967295, got [1]."),
        ("DDIM", 5, 0, None, "Number of images must be a whole number between 1 and 16, got None."),
        (5, 5, 0, 2, "Unknown sampler 5; choose one of DDIM, DPM-Solver"),
        ("Consistency few-step", 1, 0, 2, "Steps for Consistency few-step must be a whole number between 2 and 1000"),
        ("DDIM", 200, 0, 2, "was trained with 100 timesteps: use at most that many steps."),
    ]:
        with pytest.raises(AppError, match=re.escape(message)) as error:
            generate(client, good, good, sampler, steps, seed, num_images)
        assert "`" not in str(error.value)  # toasts show Markdown's backticks as typed
    with pytest.raises(AppError, match=re.escape("A model must be given as text (a Hub id or a folder), got 3.")):
        client.predict(3, 4, "DDIM", 5, 0, 2, api_name="/generate")
    with pytest.raises(AppError, match="sample it with Consistency one-step or Consistency few-step, not DDIM"):
        generate(client, models["cm_a"], models["cm_b"], "DDIM", 5, 0, 2)
    # Both models missing: an error; one missing: the other is still sampled, with the reason shown.
    with pytest.raises(AppError, match="Local folder outputs/demo/missing-run not found. Run make demo first"):
        generate(client, "outputs/demo/missing-run", "/no/such/folder")
    vanilla, vanilla_time, immiscible, immiscible_time, status = generate(client, "/no/such/folder", good)
    assert vanilla == [] and len(immiscible) == 3
    assert "Not sampled." in vanilla_time and "`/no/such/folder` not found" in status
    assert "Seed 0: only the immiscible model sampled." in status
    # Loading: a Hub id while offline, an unsupported pipeline, a folder that holds no pipeline.
    vanilla_facts, immiscible_facts, status, *_ = client.predict(
        "someone/not-a-model", str(models["unsupported"]), "DDIM", api_name="/load_models"
    )
    assert "Could not reach the Hub to load `someone/not-a-model`" in vanilla_facts
    assert "StableDiffusionPipeline" in immiscible_facts and "Vanilla model" in status and "Immiscible model" in status
    facts, *_ = client.predict(str(models["empty"]), good, "DDIM", api_name="/load_models")
    assert "has no `model_index.json`" in facts
    # ... and the app still works.
    vanilla, *_ = generate(client, good, good, "DDIM", 2, 0, 1)
    assert len(vanilla) == 1


def test_api_eight_concurrent_requests_are_answered_or_cleanly_rejected(client, models):
    """One request samples at a time and 4 may wait (the test server's --max_queue): of 8 at once, each gets its
    images or a clear "queue is full", and the app serves the next request normally."""
    def one(seed: int):
        job = client.submit(str(models["vanilla"]), str(models["immiscible"]), "DDIM", 20, seed, 4, api_name="/generate")
        try:
            return "answered", job.result(timeout=300)
        except Exception as error:  # noqa: BLE001 - what the client raises for a rejected request
            return "rejected", str(error)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    answered = [result for kind, result in results if kind == "answered"]
    rejected = [result for kind, result in results if kind == "rejected"]
    assert len(answered) >= 5 and len(answered) + len(rejected) == 8, results
    for vanilla, *_, status in answered:
        assert len(vanilla) == 4 and "both models sampled from the same starting noise" in status
    for message in rejected:
        assert re.search("queue is full", message, re.IGNORECASE), message
    assert len(generate(client, models["vanilla"], models["immiscible"])[0]) == 3


def test_api_space_mode(space_client, models):
    """On a Space (SPACE_ID set): Hub ids load and sample; every local path gets one message, existing or not."""
    from gradio_client.exceptions import AppError

    vanilla_facts, immiscible_facts, status, sampler, _ = space_client.predict(
        HUB_MODELS["vanilla"], HUB_MODELS["immiscible"], "DDIM", 50, api_name="/load_models"
    )
    assert "Both models loaded" in status and "| assignment | linear |" in immiscible_facts
    vanilla, _, immiscible, _, status = space_client.predict(
        HUB_MODELS["vanilla"], HUB_MODELS["immiscible"], "DDIM", 5, 0, 2, api_name="/generate"
    )
    assert len(vanilla) == len(immiscible) == 2
    refusals = set()
    for path in (str(models["vanilla"]), str(models["empty"]), "/no/such/folder", "../../etc", "/etc", "spaces_app/"):
        facts, *_ = space_client.predict(path, HUB_MODELS["immiscible"], "DDIM", 50, api_name="/load_models")
        refusals.add(facts)
        with pytest.raises(AppError) as error:
            space_client.predict(path, path, "DDIM", 5, 0, 2, api_name="/generate")
        refusals.add(str(error.value))
    assert refusals == {f"**Not loaded.** {space.PUBLIC_REFUSAL}", space.plain(f"Vanilla model: {space.PUBLIC_REFUSAL}"
                        f" Immiscible model: {space.PUBLIC_REFUSAL}")}, refusals  # fmt: skip
    # A pipeline that ships its own code runs it only for the operator's models.
    facts, *_ = space_client.predict(HUB_MODELS["flow_code"], HUB_MODELS["immiscible"], "DDIM", 50, api_name="/load_models")
    assert "ships its own pipeline code (`pipeline.py`)" in facts


# --------------------------------------------------------------------------------------------------
# The running app, in a real headless Chromium
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if os.environ.get("SKIP_BROWSER_TESTS") == "1":
        pytest.skip("SKIP_BROWSER_TESTS=1")
    if shutil.which("chromium") is None or not os.path.exists(CHROMIUM):
        pytest.fail(
            f"Debian's chromium is not installed at {CHROMIUM}: run `make browser-deps` (or set SKIP_BROWSER_TESTS=1)"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@contextlib.contextmanager
def loaded_page(browser, url: str, height: int, failure_png: str):
    """A page of the app once both models show as loaded; a screenshot named ``failure_png`` if the test fails."""
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1280, "height": height})
    try:
        page.goto(url)
        expect(page.locator("#status")).to_contain_text("Both models loaded", timeout=60_000)
        yield page
    except Exception:
        page.screenshot(path=str(ARTIFACTS / failure_png), full_page=True)
        raise
    finally:
        page.close()


def fill_model_box(page, accordion: str, side: str, text: str) -> None:
    """Type a model into a side's box, opening the Models panel first if needed (and waiting until it is open:
    text typed while the panel is still opening can be lost)."""
    from playwright.sync_api import expect

    box = page.locator(f"#{side}-model textarea")
    if not box.is_visible():
        page.get_by_text(accordion).click()
        expect(box).to_be_visible()
        expect(box).to_have_value(re.compile(".+"))
    # A reply to an earlier request can still rewrite the box just after we type (the app echoes the loaded
    # models back): type again until the text stays.
    for _ in range(5):
        box.fill(text)
        box.press("Tab")
        page.wait_for_timeout(500)
        if box.input_value() == text:
            break
    expect(box).to_have_value(text)


@pytest.mark.browser
def test_browser_generate_and_errors(browser, server, models):
    from playwright.sync_api import expect

    with loaded_page(browser, server, 1400, "space_app_failure.png") as page:
        expect(page.locator("#immiscible-facts")).to_contain_text("12.3456")
        expect(page.locator("#vanilla-facts")).to_contain_text("digits FD")  # the card's model-index
        expect(page.locator("#vanilla-facts")).to_contain_text("3.21")
        # Only the samplers of DDPM-family models are offered.
        expect(page.locator("#sampler input[type=radio]")).to_have_count(4)
        assert page.locator("#sampler").get_by_label("Flow Euler", exact=True).count() == 0

        expect(page.locator("#steps input[type=number]")).to_have_value("50")  # DDIM's default
        page.locator("#sampler").get_by_label("DPM-Solver", exact=True).check()
        # Choosing a sampler sets the steps to its default (a server round trip): wait for it before typing.
        expect(page.locator("#steps input[type=number]")).to_have_value("20")
        page.locator("#steps input[type=number]").fill("4")
        page.locator("#steps input[type=number]").press("Enter")
        page.locator("#seed input").fill("11")
        page.locator("#seed input").press("Enter")
        page.locator("#num-images input[type=number]").fill("4")
        page.locator("#num-images input[type=number]").press("Enter")
        # Record every text the progress strip and the immiscible panel show while sampling.
        page.evaluate("""() => {
            window.seen = {progress: [], immiscible: [], overlaps: []};
            const record = () => {
                const progress = document.querySelector('#progress');
                const panel = document.querySelector('#immiscible-gallery').closest('.column');
                if (progress) {
                    window.seen.progress.push(progress.innerText);
                    // Nothing the progress shows (text, bar) may reach into the status line below it.
                    const statusTop = document.querySelector('#status').getBoundingClientRect().top;
                    for (const element of progress.querySelectorAll('*')) {
                        const box = element.getBoundingClientRect();
                        if (box.height > 0 && box.bottom > statusTop + 1) window.seen.overlaps.push(element.className);
                    }
                }
                window.seen.immiscible.push(panel.innerText);
            };
            window.observer = new MutationObserver(record);
            window.observer.observe(document.body, {subtree: true, childList: true, characterData: true});
        }""")
        page.locator("#generate-button").click()
        for side in ("vanilla", "immiscible"):
            expect(page.locator(f"#{side}-gallery .thumbnail-item img")).to_have_count(4, timeout=60_000)
            expect(page.locator(f"#{side}-time")).to_contain_text("for 4 images, DPM-Solver, 4 steps")
        seen = page.evaluate("window.observer.disconnect() || window.seen")
        assert any("Sampling the vanilla model: step" in text for text in seen["progress"]), seen["progress"][-5:]
        assert not any("vanilla" in text.lower() for text in seen["immiscible"]), seen["immiscible"]
        assert seen["overlaps"] == [], seen["overlaps"]
        expect(page.locator("#status")).to_contain_text("Seed 11: both models sampled from the same starting noise.")
        for image in page.locator("#vanilla-gallery .thumbnail-item img").all():
            assert image.evaluate("img => img.complete && img.naturalWidth") == 128
        page.screenshot(path=str(ARTIFACTS / "space_app.png"), full_page=True)

        # A missing folder: a clear message on the page, and the page keeps working.
        fill_model_box(page, "Models (Hub ids or local folders)", "vanilla", "outputs/demo/missing-run")
        page.locator("#load-button").click()
        expect(page.locator("#status")).to_contain_text(
            "Run make demo first", timeout=30_000
        )  # Markdown renders the backticks as code
        expect(page.locator("#vanilla-facts")).to_contain_text("Not loaded.")
        page.locator("#generate-button").click()
        expect(page.locator("#vanilla-time")).to_contain_text("Not sampled.", timeout=60_000)
        expect(page.locator("#immiscible-gallery .thumbnail-item img")).to_have_count(4)
        page.screenshot(path=str(ARTIFACTS / "space_app_missing_model.png"), full_page=True)

        # A request that fails (neither model loads): the timings of the run before go, the status says why,
        # the toast shows no Markdown backticks, and Gradio's error badge does not cover the status text.
        fill_model_box(page, "Models (Hub ids or local folders)", "immiscible", "/no/such/folder")
        page.locator("#generate-button").click()
        expect(page.locator("#status")).to_contain_text("Not sampled:", timeout=60_000)
        expect(page.locator("#status")).to_contain_text("/no/such/folder not found")
        for side in ("vanilla", "immiscible"):
            expect(page.locator(f"#{side}-time")).to_have_text("")
            expect(page.locator(f"#{side}-gallery .thumbnail-item img")).to_have_count(0)
        toast = page.locator(".toast-body").filter(has_text="Local folder")
        expect(toast.first).to_be_visible()
        assert "`" not in toast.first.inner_text()
        status_box = page.locator("#status").bounding_box()
        badges = page.get_by_text("Error", exact=True)
        for index in range(badges.count()):
            if badges.nth(index).is_visible():
                badge = badges.nth(index).bounding_box()
                overlaps = not (
                    badge["x"] + badge["width"] <= status_box["x"] or status_box["x"] + status_box["width"] <= badge["x"]
                    or badge["y"] + badge["height"] <= status_box["y"]
                    or status_box["y"] + status_box["height"] <= badge["y"]
                )  # fmt: skip
                assert not overlaps, (badge, status_box)
        page.screenshot(path=str(ARTIFACTS / "space_app_failed_request.png"), full_page=True)


@pytest.mark.browser
def test_browser_space_mode_refuses_local_paths(browser, space_server, models):
    """On a Space, a visitor who types a folder that exists and one that does not sees the same message."""
    from playwright.sync_api import expect

    with loaded_page(browser, space_server, 1200, "space_app_space_mode_failure.png") as page:
        shown = []
        for path in (str(models["vanilla"]), "/no/such/folder"):
            fill_model_box(page, "Models (Hub ids)", "vanilla", path)
            page.locator("#load-button").click()
            expect(page.locator("#vanilla-facts")).to_contain_text("Not loaded.", timeout=30_000)
            shown.append(page.locator("#vanilla-facts").inner_text())
            fill_model_box(page, "Models (Hub ids)", "vanilla", HUB_MODELS["vanilla"])
            page.locator("#load-button").click()
            expect(page.locator("#vanilla-facts")).to_contain_text("DDPMPipeline", timeout=30_000)
        assert shown[0] == shown[1] and "Hugging Face Hub only" in shown[0], shown
        fill_model_box(page, "Models (Hub ids)", "vanilla", "/etc")
        page.locator("#load-button").click()
        expect(page.locator("#vanilla-facts")).to_have_text(shown[0], timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "space_app_space_mode.png"), full_page=True)
