"""training_scripts/train_text_to_image.py and immiscible_diffusers.latent, end to end and offline.

No weights are downloaded: a tiny Stable Diffusion pipeline (a VAE, a CLIP text encoder and a BPE
tokenizer, a UNet2DConditionModel, a PNDM scheduler; about 115k parameters in all) is built from configs
once per module and saved to a temporary folder; the script then fine-tunes it for a few steps at 16x16
in a subprocess, as a user would run it, on an imagefolder of digits with captions in a metadata.jsonl
or on the bundled digits. The noising order (assignment, offset, perturbation, target) is proven in-process.
"""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import script_env
from immiscible_diffusers import assign_noise
from immiscible_diffusers.latent import prepare_noise_and_target, snr_weighted_mse
from immiscible_diffusers.model_card import REQUIRED_CARD_KEYS, read_card_metadata
from immiscible_diffusers.training import list_checkpoints, read_train_log

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "training_scripts" / "train_text_to_image.py"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
CROSS_ATTENTION_DIM = 16
NUM_IMAGES = 16

COMMON = [
    "--resolution", "16",
    "--train_batch_size", "8",
    "--learning_rate", "1e-3",
    "--lr_warmup_steps", "0",
    "--seed", "0",
]  # fmt: skip

# name -> (extra flags, optimizer steps). "{images}" is the captioned imagefolder.
RUNS = {
    "epsilon": (
        [
            "--train_data_dir", "{images}", "--assignment", "linear", "--use_ema", "--foreach_ema",
            "--gradient_checkpointing", "--snr_gamma", "5", "--noise_offset", "0.1", "--input_perturbation", "0.1",
            "--validation_prompts", "a handwritten digit 3", "a handwritten digit 7",
            "--validation_inference_steps", "2", "--validation_epochs", "1", "--checkpointing_steps", "2",
        ],
        3,
    ),
    "v_prediction": (  # on the bundled digits (no data flag), from a base that predicts epsilon
        [
            "--max_train_samples", "48", "--prediction_type", "v_prediction", "--assignment", "knn", "--knn_k", "3",
            "--gradient_accumulation_steps", "2", "--checkpointing_steps", "1", "--checkpoints_total_limit", "2",
        ],
        3,
    ),
    "lora": (
        [
            "--train_data_dir", "{images}", "--rank", "4", "--mixed_precision", "bf16", "--assignment", "linear",
            "--noise_offset", "0.05", "--checkpointing_steps", "2",
            "--validation_prompts", "a handwritten digit 5", "--validation_inference_steps", "2",
        ],
        4,
    ),
}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# A tiny Stable Diffusion pipeline and a captioned imagefolder, built offline
# --------------------------------------------------------------------------------------------------


def build_tiny_sd_pipeline(folder: Path) -> Path:
    """Save a randomly initialised, tiny Stable Diffusion pipeline to ``folder`` (16x16 images, 8x8 latents)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    # A byte-level BPE vocabulary of single characters (each also as a word end) and one merged word.
    characters = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in [*characters, *(c + "</w>" for c in characters), "di", "dig", "digi", "digit</w>"]:
        vocab[token] = len(vocab)
    merges = [("d", "i"), ("di", "g"), ("dig", "i"), ("digi", "t</w>")]
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)

    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=CROSS_ATTENTION_DIM,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=CROSS_ATTENTION_DIM,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=CROSS_ATTENTION_DIM,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder)
    return folder


def make_captioned_digits(folder: Path, count: int = NUM_IMAGES, captions: bool = True) -> Path:
    """An imagefolder of ``count`` digits (8x8 upsampled to 16x16 RGB) with a metadata.jsonl of captions."""
    from immiscible_diffusers.data import load_digits_dataset

    digits = load_digits_dataset()
    folder.mkdir(parents=True)
    rows = []
    for index in range(count):
        example = digits[index]
        name = f"{index:02d}.png"
        example["image"].convert("RGB").resize((16, 16), Image.Resampling.NEAREST).save(folder / name)
        rows.append(json.dumps({"file_name": name, "text": f"a handwritten digit {example['label']}"}))
    if captions:
        (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny-sd") / "pipeline")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_captioned_digits(tmp_path_factory.mktemp("captioned") / "digits")


def _run(command: list[str], timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env=script_env(**env), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def _flags(name: str, tiny_sd: Path, images: Path, output_dir: Path) -> list[str]:
    flags, steps = RUNS[name]
    return [
        "--pretrained_model_name_or_path", str(tiny_sd), "--output_dir", str(output_dir),
        "--cache_dir", str(output_dir.parent / "cache"), *COMMON, "--max_train_steps", str(steps),
        *(f.format(images=images) for f in flags),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def hub():
    """A local stand-in for the Hub's servers (tests/hub_server.py), which the LoRA run pushes to."""
    from hub_server import LocalHubServer

    with LocalHubServer() as server:
        yield server


LORA_REPO = "alice/tiny-sd-lora"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_sd, images, hub):
    """Train each configuration of RUNS once per module, on first use; return its output folder.

    The LoRA run also pushes to the local Hub (the real huggingface_hub client, offline).
    """
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            output_dir = tmp_path_factory.mktemp(name) / "out"
            command = [sys.executable, str(SCRIPT), *_flags(name, tiny_sd, images, output_dir)]
            env = {}
            if name == "lora":
                command += ["--push_to_hub", "--hub_model_id", LORA_REPO]
                env = {"HF_HUB_OFFLINE": "", "HF_ENDPOINT": hub.url, "HF_TOKEN": hub.token, "HF_HUB_DISABLE_XET": "1"}
            _run(command, **env)
            done[name] = output_dir
        return done[name]

    return get


def _load_script():
    spec = importlib.util.spec_from_file_location("train_text_to_image_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return _load_script()


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def _same_weights(a: Path, b: Path) -> bool:
    first, second = _weights(a), _weights(b)
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


# --------------------------------------------------------------------------------------------------
# The noising order: assignment on the latents, then offset, then perturbation; the target
# --------------------------------------------------------------------------------------------------


def _ddpm():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _latents(batch: int = 16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(11)
    # Structured like VAE latents: a per-channel mean and spread, not standard normal.
    return torch.randn(batch, 4, 8, 8, generator=generator) * torch.tensor([0.9, 1.1, 0.7, 1.3]).view(1, 4, 1, 1) + 0.2


@pytest.mark.parametrize("method", ["linear", "knn"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_noise_is_assigned_on_the_latents_then_offset_then_perturbed(method, prediction_type):
    scheduler, latents = _ddpm(), _latents()
    offset_scale, perturbation_scale = 0.5, 0.1

    torch.manual_seed(5)
    noised = prepare_noise_and_target(
        latents,
        scheduler,
        prediction_type=prediction_type,
        assignment={"method": method, "knn_k": 4},
        noise_offset=offset_scale,
        input_perturbation=perturbation_scale,
        knn_generator=torch.Generator().manual_seed(1),
    )

    # Recompute independently, with the documented order of draws from the global generator.
    torch.manual_seed(5)
    raw = torch.randn(latents.shape)
    offset = torch.randn(16, 4, 1, 1)
    perturbation = torch.randn(latents.shape)
    timesteps = torch.randint(0, 1000, (16,))
    assigned = assign_noise(latents, raw, method=method, knn_k=4, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(assigned, raw)  # the assignment changed the pairing, so a mix-up would be caught
    for name, expected in [
        ("noise_before_assignment", raw),
        ("assigned_noise", assigned),
        ("offset", offset),
        ("perturbation", perturbation),
        ("timesteps", timesteps),
    ]:
        assert torch.equal(getattr(noised, name), expected), name

    # The offset is added to the assigned noise (after the assignment) and is part of the target ...
    noise = assigned + offset_scale * offset
    assert torch.equal(noised.noise, noise)
    offset_first = assign_noise(
        latents, raw + offset_scale * offset, method=method, knn_k=4, generator=torch.Generator().manual_seed(1)
    )
    assert not torch.allclose(offset_first, noise)  # the other order would give other noise
    # ... the perturbation is in the noisy input only ...
    perturbed = noise + perturbation_scale * perturbation
    assert torch.equal(noised.noisy_latents, scheduler.add_noise(latents, perturbed, timesteps))
    assert not torch.allclose(noised.noisy_latents, scheduler.add_noise(latents, noise, timesteps))
    # ... and the target is built from the assigned noise with its offset, without the perturbation.
    if prediction_type == "epsilon":
        expected_target = noise
    else:
        expected_target = scheduler.get_velocity(latents, noise, timesteps)
        unassigned = raw + offset_scale * offset
        assert not torch.allclose(noised.target, scheduler.get_velocity(latents, unassigned, timesteps))
    assert torch.equal(noised.target, expected_target)
    if prediction_type == "epsilon":
        assert not torch.allclose(noised.target, perturbed)
    else:
        assert not torch.allclose(noised.target, scheduler.get_velocity(latents, perturbed, timesteps))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_without_offset_or_perturbation_the_target_is_built_from_the_assigned_noise(prediction_type):
    scheduler, latents = _ddpm(), _latents()
    torch.manual_seed(9)
    noised = prepare_noise_and_target(
        latents, scheduler, prediction_type=prediction_type, assignment={"method": "linear"}
    )
    torch.manual_seed(9)
    raw = torch.randn(latents.shape)
    timesteps = torch.randint(0, 1000, (16,))  # nothing else is drawn when offset and perturbation are 0
    assigned = assign_noise(latents, raw)
    assert noised.offset is None and noised.perturbation is None
    assert torch.equal(noised.noise, assigned) and torch.equal(noised.timesteps, timesteps)
    assert torch.equal(noised.noisy_latents, scheduler.add_noise(latents, assigned, timesteps))
    if prediction_type == "epsilon":
        assert torch.equal(noised.target, assigned)
    else:
        assert torch.equal(noised.target, scheduler.get_velocity(latents, assigned, timesteps))
        assert not torch.allclose(noised.target, scheduler.get_velocity(latents, raw, timesteps))
    assert noised.assignment_stats.mean_distance_after < noised.assignment_stats.mean_distance_before


def test_assignment_none_is_vanilla_and_every_method_sees_the_same_draws():
    scheduler, latents = _ddpm(), _latents()
    results = {}
    for method in ("none", "linear", "knn"):
        torch.manual_seed(2)
        results[method] = prepare_noise_and_target(
            latents,
            scheduler,
            prediction_type="epsilon",
            assignment={"method": method},
            noise_offset=0.1,
            input_perturbation=0.1,
            knn_generator=torch.Generator().manual_seed(0),
        )
    vanilla = results["none"]
    assert torch.equal(vanilla.assigned_noise, vanilla.noise_before_assignment)
    for method in ("linear", "knn"):
        for name in ("noise_before_assignment", "offset", "perturbation", "timesteps"):
            assert torch.equal(getattr(results[method], name), getattr(vanilla, name)), (method, name)
        assert not torch.equal(results[method].target, vanilla.target)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_snr_weighted_mse_is_min_snr_weighting(prediction_type):
    scheduler = _ddpm()
    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(6, 4, 8, 8, generator=generator), torch.randn(6, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([0, 10, 100, 400, 800, 999])
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    weights = torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr if prediction_type == "epsilon" else snr + 1)
    expected = (((prediction - target) ** 2).mean(dim=(1, 2, 3)) * weights).mean()
    weighted = snr_weighted_mse(prediction, target, scheduler, timesteps, prediction_type, 5.0)
    torch.testing.assert_close(weighted, expected)
    torch.testing.assert_close(
        snr_weighted_mse(prediction, target, scheduler, timesteps, prediction_type), ((prediction - target) ** 2).mean()
    )
    if prediction_type == "epsilon":  # low-noise steps are down-weighted, high-noise ones keep weight 1
        assert weights[0] < 0.01 and weights[-1] == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prediction_type": "sample"}, "prediction_type must be one of"),
        ({"noise_offset": -0.1}, "noise_offset must be a number >= 0"),
        ({"input_perturbation": float("nan")}, "input_perturbation must be a number >= 0"),
        ({"latents": torch.zeros(2, 16)}, r"latents must be a \(batch, channels, height, width\) tensor"),
    ],
)
def test_prepare_noise_and_target_rejects_bad_input(kwargs, message):
    arguments = {"latents": _latents(4), "prediction_type": "epsilon", **kwargs}
    latents = arguments.pop("latents")
    with pytest.raises(ValueError, match=message):
        prepare_noise_and_target(latents, _ddpm(), assignment={"method": "linear"}, **arguments)


# --------------------------------------------------------------------------------------------------
# The script's training step, LoRA adapters and captions, in-process
# --------------------------------------------------------------------------------------------------


def _components(tiny_sd: Path):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return (
        UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet"),
        AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae"),
        CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder"),
        CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer"),
        DDPMScheduler.from_pretrained(tiny_sd, subfolder="scheduler"),
    )


def test_the_training_step_encodes_assigns_and_predicts_the_assigned_noise_target(script, tiny_sd):
    from immiscible_diffusers.training import assignment_kwargs

    unet, vae, text_encoder, tokenizer, scheduler = _components(tiny_sd)
    args = script.parse_args(
        ["--pretrained_model_name_or_path", str(tiny_sd), "--prediction_type", "v_prediction",
         "--noise_offset", "0.1", "--input_perturbation", "0.1", "--snr_gamma", "5"]
    )  # fmt: skip
    scheduler.register_to_config(prediction_type="v_prediction")
    captions = [f"a handwritten digit {i}" for i in range(8)]
    batch = {
        "pixel_values": torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1,
        "input_ids": script.tokenize_captions(tokenizer, captions, "text"),
    }
    torch.manual_seed(3)
    step = script.compute_loss(unet, vae, text_encoder, scheduler, batch, args)

    torch.manual_seed(3)
    with torch.no_grad():
        latents = vae.encode(batch["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
    noised = prepare_noise_and_target(
        latents,
        scheduler,
        prediction_type="v_prediction",
        assignment=assignment_kwargs(args),
        noise_offset=0.1,
        input_perturbation=0.1,
    )
    assert torch.equal(step.latents, latents) and latents.shape == (8, 4, 8, 8)
    assert torch.equal(step.noised.noisy_latents, noised.noisy_latents)
    assert torch.equal(step.noised.target, scheduler.get_velocity(latents, noised.noise, noised.timesteps))
    with torch.no_grad():
        hidden = text_encoder(batch["input_ids"])[0]
        prediction = unet(noised.noisy_latents, noised.timesteps, hidden).sample
    assert torch.equal(step.encoder_hidden_states, hidden)
    expected = snr_weighted_mse(prediction, noised.target, scheduler, noised.timesteps, "v_prediction", 5.0)
    torch.testing.assert_close(step.loss, expected)
    step.loss.backward()
    assert all(p.grad is not None for p in unet.parameters() if p.requires_grad)
    assert all(p.grad is None for p in (*vae.parameters(), *text_encoder.parameters()))


def test_lora_adapters_are_the_only_trainable_weights_and_round_trip(script, tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    base_count = sum(p.numel() for p in unet.parameters())
    trainable = script.add_lora_adapter(unet, rank=2)
    names = [name for name, p in unet.named_parameters() if p.requires_grad]
    assert len(names) == len(trainable) > 0
    assert all(".lora_A." in n or ".lora_B." in n for n in names)
    targets = ("to_q", "to_k", "to_v", "to_out.0")
    assert all(any(f".{m}.lora_" in n for m in targets) for n in names)  # only the attention projections ...
    assert {m for n in names for m in targets if f".{m}.lora_" in n} == set(targets)  # ... and all of them
    assert all(2 in p.shape for p in trainable)  # rank 2
    assert sum(p.numel() for p in unet.parameters()) - sum(p.numel() for p in trainable) == base_count

    with torch.no_grad():  # stand-in for training: LoRA's B starts at zero, so the adapters would do nothing
        for parameter in trainable:
            generator = torch.Generator().manual_seed(parameter.numel())
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    saved = script.save_lora_weights(tmp_path, unet)
    assert saved.name == LORA_WEIGHTS
    keys = list(_weights(saved))
    assert len(keys) == len(names) and all(k.startswith("unet.") and ".lora" in k for k in keys)

    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    timesteps = torch.tensor([10, 500])
    hidden = torch.randn(2, 77, CROSS_ATTENTION_DIM, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        adapted = unet(sample, timesteps, hidden).sample
        pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd)
        base = pipeline.unet(sample, timesteps, hidden).sample
        pipeline.load_lora_weights(tmp_path)  # as a user loads them
        torch.testing.assert_close(pipeline.unet(sample, timesteps, hidden).sample, adapted)
        assert not torch.allclose(base, adapted)
        # ... and as a resumed run loads them into fresh adapters.
        resumed = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
        script.add_lora_adapter(resumed, rank=2)
        script.load_lora_weights_into(resumed, tmp_path)
        torch.testing.assert_close(resumed(sample, timesteps, hidden).sample, adapted)


def test_captions_strings_or_lists_and_clear_errors(script, tiny_sd):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    ids = script.tokenize_captions(tokenizer, [["a digit 1", "b"], "a digit 1"], "text", is_train=False)
    assert ids.shape == (2, 77) and torch.equal(ids[0], ids[1])  # of a list, validation takes the first
    random.seed(0)
    random_choices = {
        tuple(script.tokenize_captions(tokenizer, [["a", "b"]], "text")[0, :3].tolist()) for _ in range(40)
    }
    assert len(random_choices) == 2  # in training, one at random
    for bad in (3, [], ["a", 3], None):
        with pytest.raises(ValueError, match="--caption_column 'text' must hold strings or lists of strings"):
            script.tokenize_captions(tokenizer, [bad], "text")


# --------------------------------------------------------------------------------------------------
# End-to-end runs
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["epsilon", "v_prediction"])
def test_full_fine_tune_saves_a_stock_pipeline_card_and_logs(trained, tiny_sd, images, name):
    output_dir = trained(name)
    steps = RUNS[name][1]
    prediction_type = name
    assignment = "linear" if name == "epsilon" else "knn"

    model_index = json.loads((output_dir / "model_index.json").read_text())
    assert model_index["_class_name"] == "StableDiffusionPipeline"
    assert model_index["scheduler"] == ["diffusers", "PNDMScheduler"]  # the base's stock inference scheduler
    scheduler_config = json.loads((output_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler_config["prediction_type"] == prediction_type  # the base predicts epsilon: updated for v
    assert "assignment" not in scheduler_config
    # The frozen VAE and text encoder are saved exactly as loaded; the UNet has trained.
    for frozen in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert _same_weights(output_dir / frozen, tiny_sd / frozen), frozen
    trained_unet = "unet/diffusion_pytorch_model.safetensors"
    assert not _same_weights(output_dir / trained_unet, tiny_sd / trained_unet)

    config = json.loads((output_dir / "training_config.json").read_text())
    assert config["global_step"] == steps and config["prediction_type"] == prediction_type
    assert config["script"] == "train_text_to_image.py" and "hub_token" not in config

    metadata = read_card_metadata(output_dir)
    assert metadata["pipeline_tag"] == "text-to-image" and metadata["library_name"] == "diffusers"
    assert "base_model" not in metadata  # a local folder is no Hub id; the card names it below
    for tag in ("diffusers", "diffusers-training", "immiscible-diffusion", f"assignment-{assignment}", "text-to-image"):
        assert tag in metadata["tags"]
    card = metadata["immiscible_diffusers"]
    assert set(REQUIRED_CARD_KEYS) <= set(card)
    assert card["pretrained_model_name_or_path"] == str(tiny_sd) and card["rank"] is None
    assert card["prediction_type"] == prediction_type and card["global_step"] == steps and card["resolution"] == 16
    assert card["dataset"] == (str(images.resolve()) if name == "epsilon" else "sklearn-digits")
    assert "StableDiffusionPipeline.from_pretrained" in (output_dir / "README.md").read_text()

    rows = read_train_log(output_dir / "train_log.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, steps + 1))
    assert all(float(r["assign_distance_after"]) < float(r["assign_distance_before"]) for r in rows)
    assert len({r["noise_hash"] for r in rows}) == steps


@pytest.mark.slow
def test_checkpoints_hold_the_unet_once_in_diffusers_format(trained):
    ema_run = trained("epsilon")
    checkpoint = ema_run / "checkpoint-2"
    for folder in ("unet", "unet_ema"):
        assert (checkpoint / folder / "diffusion_pytorch_model.safetensors").is_file()
    # accelerate's own copy of the UNet is skipped: the checkpoint holds it once, in unet/.
    assert not list(checkpoint.glob("model*.safetensors")) and not list(checkpoint.glob("pytorch_model*.bin"))
    weights = "diffusion_pytorch_model.safetensors"
    assert not _same_weights(checkpoint / "unet" / weights, checkpoint / "unet_ema" / weights)

    pruned = trained("v_prediction")  # a checkpoint every step, at most 2 kept
    assert [step for step, _ in list_checkpoints(pruned)] == [2, 3]
    assert not (pruned / "checkpoint-3" / "unet_ema").exists()


@pytest.mark.slow
def test_validation_images_are_saved_and_logged(trained):
    output_dir = trained("epsilon")  # two prompts, validated after each epoch (16 images: 2 steps) and at the end
    for step in (2, 3):
        grid = Image.open(output_dir / "samples" / f"step_{step:06d}.png")
        assert grid.size == (2 * (48 + 2) + 2, 48 + 2 * 2) and grid.mode == "RGB"
    assert "samples/step_000003.png" in (output_dir / "README.md").read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (output_dir / "logs").rglob("events.out.tfevents.*")
    tensorboard = EventAccumulator(str(events.parent))
    tensorboard.Reload()
    assert "validation" in tensorboard.Tags()["images"]
    assert [e.step for e in tensorboard.Scalars("assignment/distance_after")] == [1, 2, 3]
    assert not (trained("v_prediction") / "samples").exists()  # no --validation_prompts, no samples


@pytest.mark.slow
def test_lora_run_saves_only_the_adapters_loadable_with_load_lora_weights(trained, tiny_sd, hub):
    from diffusers import StableDiffusionPipeline

    output_dir = trained("lora")
    # --push_to_hub published the adapters, card and samples, never checkpoints or logs.
    pushed = hub.branch_files(LORA_REPO)
    assert {LORA_WEIGHTS, "README.md", "samples/step_000004.png", "training_config.json"} <= set(pushed)
    assert not [name for name in pushed if name.startswith(("checkpoint-", "logs/"))]
    assert pushed[LORA_WEIGHTS] == (output_dir / LORA_WEIGHTS).read_bytes()
    assert (output_dir / LORA_WEIGHTS).is_file()
    assert not (output_dir / "model_index.json").exists() and not (output_dir / "unet").exists()
    keys = list(_weights(output_dir / LORA_WEIGHTS))
    assert keys and all(".lora" in k for k in keys)
    checkpoint = output_dir / "checkpoint-2"
    assert (checkpoint / LORA_WEIGHTS).is_file() and not (checkpoint / "unet").exists()
    assert not list(checkpoint.glob("model*.safetensors"))  # no full UNet copy in LoRA checkpoints
    assert (output_dir / "samples" / "step_000004.png").is_file()  # sampled from the base + the saved file

    metadata = read_card_metadata(output_dir)
    assert "lora" in metadata["tags"] and metadata["pipeline_tag"] == "text-to-image"
    assert metadata["immiscible_diffusers"]["rank"] == 4
    assert metadata["immiscible_diffusers"]["assignment"] == "linear"
    readme = (output_dir / "README.md").read_text()
    assert f'from_pretrained("{tiny_sd}"' in readme and f'load_lora_weights("{LORA_REPO}")' in readme

    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(1, 77, CROSS_ATTENTION_DIM, generator=torch.Generator().manual_seed(1))
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd)
    with torch.no_grad():
        base = pipeline.unet(sample, torch.tensor([500]), hidden).sample
        pipeline.load_lora_weights(output_dir)
        adapted = pipeline.unet(sample, torch.tensor([500]), hidden).sample
    assert not torch.allclose(base, adapted)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["epsilon", "lora"])
def test_a_run_resumed_from_a_checkpoint_ends_bitwise_where_an_uninterrupted_one_does(
    trained, tiny_sd, images, tmp_path, name
):
    straight = trained(name)
    resumed = tmp_path / "out"
    resumed.mkdir()
    # What a run killed after step 2 leaves behind (the epsilon run's checkpoint sits at an epoch boundary,
    # with EMA; the LoRA one mid-epoch).
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    flags = [*_flags(name, tiny_sd, images, resumed), "--resume_from_checkpoint", "latest"]
    result = _run([sys.executable, str(SCRIPT), *flags])
    assert "Resuming from checkpoint" in result.stdout + result.stderr

    weights = LORA_WEIGHTS if name == "lora" else "unet/diffusion_pytorch_model.safetensors"
    assert _same_weights(straight / weights, resumed / weights)
    # The same batches and random draws after the resume (the log restarts at step 3).
    expected = [r for r in read_train_log(straight / "train_log.csv") if int(r["step"]) > 2]
    got = read_train_log(resumed / "train_log.csv")
    for column in ("step", "loss", "batch_hash", "noise_hash", "assign_distance_after"):
        assert [r[column] for r in got] == [r[column] for r in expected], column


@pytest.mark.slow
def test_saved_pipeline_generates_in_a_fresh_process_without_this_package(trained):
    output_dir = trained("v_prediction")
    code = textwrap.dedent(
        f"""
        import sys
        import numpy as np, torch
        from diffusers import StableDiffusionPipeline
        pipeline = StableDiffusionPipeline.from_pretrained({str(output_dir)!r})
        images = pipeline(["a handwritten digit 1", "a handwritten digit 2"], num_inference_steps=2,
                          output_type="np", generator=torch.Generator().manual_seed(0)).images
        assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all(), images.shape
        print(type(pipeline.scheduler).__name__, pipeline.scheduler.config.prediction_type)
        assert not [m for m in sys.modules if m.startswith("immiscible_diffusers")]
        """
    )
    result = _run([sys.executable, "-c", code], timeout=120)
    assert "PNDMScheduler v_prediction" in result.stdout


# --------------------------------------------------------------------------------------------------
# Model card for a Hub base model
# --------------------------------------------------------------------------------------------------


def test_card_of_a_lora_fine_tune_of_a_hub_model(script, tmp_path):
    args = script.parse_args(
        ["--pretrained_model_name_or_path", "stable-diffusion-v1-5/stable-diffusion-v1-5", "--rank", "8",
         "--dataset_name", "lambdalabs/naruto-blip-captions", "--validation_prompts", "a ninja",
         "--assignment", "knn", "--prediction_type", "v_prediction"]
    )  # fmt: skip
    script.save_run_files(tmp_path, args, 1000, None, base_prediction_type="epsilon", hub_repo_id="me/naruto-lora")
    metadata = read_card_metadata(tmp_path)
    assert metadata["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert metadata["datasets"] == ["lambdalabs/naruto-blip-captions"]
    assert metadata["license"] == "creativeml-openrail-m"
    assert {"lora", "assignment-knn", "stable-diffusion"} <= set(metadata["tags"])
    readme = (tmp_path / "README.md").read_text()
    assert 'StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5"' in readme
    assert 'pipeline.load_lora_weights("me/naruto-lora")' in readme
    # LoRA weights carry no scheduler: the snippet tells the base's scheduler what the UNet now predicts.
    assert 'prediction_type="v_prediction"' in readme and "'a ninja'" in readme
    assert json.loads((tmp_path / "training_config.json").read_text())["global_step"] == 1000


# --------------------------------------------------------------------------------------------------
# Bad input: clear errors
# --------------------------------------------------------------------------------------------------


def _sample_predicting_base(tiny_sd: Path, folder: Path) -> Path:
    shutil.copytree(tiny_sd, folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "prediction_type": "sample"}))
    return folder


@pytest.mark.parametrize(
    "flags, error, message",
    [
        (["--train_data_dir", "{no_captions}"], ValueError, r"not a column of the dataset \(an imagefolder takes captions from a metadata.jsonl"),  # noqa: E501
        (["--train_data_dir", "{images}", "--caption_column", "caption"], ValueError, "--caption_column 'caption' is not a column"),  # noqa: E501
        (["--train_data_dir", "{images}", "--image_column", "img"], ValueError, "--image_column 'img' is not a column"),
        (["--caption_column", "label"], ValueError, "'label' must hold strings or lists of strings, got int"),
        (["--resolution", "15"], ValueError, "--resolution 15 is not a multiple of the VAE's downsampling factor 2"),
        (["--train_data_dir", "{images}", "--train_batch_size", "64"], ValueError, "needs at least 64 training examples"),  # noqa: E501
        (["--resume_from_checkpoint", "checkpoint-7"], ValueError, "neither 'latest' nor an existing checkpoint"),
        (["--pretrained_model_name_or_path", "./missing/sd"], ValueError, r"'./missing/sd' is not a folder"),
        (["--pretrained_model_name_or_path", "{sample_base}"], ValueError, "scheduler predicts 'sample'; pass --prediction_type"),  # noqa: E501
        (["--use_8bit_adam"], ImportError, "--use_8bit_adam needs bitsandbytes"),
        (["--enable_xformers_memory_efficient_attention"], ValueError, "needs xformers"),
    ],
)  # fmt: skip
def test_bad_input_gives_a_clear_error(
    script, tiny_sd, images, tmp_path, fresh_accelerate_state, flags, error, message
):
    if "--use_8bit_adam" in flags and importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed")
    if "--enable_xformers_memory_efficient_attention" in flags and importlib.util.find_spec("xformers") is not None:
        pytest.skip("xformers is installed")
    substitutions = {"images": images, "no_captions": tmp_path / "plain", "sample_base": tmp_path / "sample-base"}
    if "{no_captions}" in flags:
        make_captioned_digits(tmp_path / "plain", count=4, captions=False)
    if "{sample_base}" in flags:
        _sample_predicting_base(tiny_sd, tmp_path / "sample-base")
    flags = [f.format(**substitutions) for f in flags]
    args = script.parse_args(
        ["--pretrained_model_name_or_path", str(tiny_sd), "--output_dir", str(tmp_path / "out"),
         "--cache_dir", str(tmp_path / "cache"), "--resolution", "16", "--train_batch_size", "4",
         "--max_train_steps", "1", *flags]
    )  # fmt: skip
    with pytest.raises(error, match=message):
        script.main(args)
    assert not (tmp_path / "out" / "train_log.csv").exists()  # it failed before training


@pytest.mark.parametrize(
    "flags, message",
    [
        ([], "the following arguments are required: --pretrained_model_name_or_path"),
        (["--rank", "4", "--use_ema"], "--use_ema applies to full fine-tuning; it cannot be combined with --rank"),
        (["--prediction_type", "sample"], "argument --prediction_type: invalid choice: 'sample'"),
        (["--noise_offset", "-0.1"], "argument --noise_offset: expected a number >= 0, got '-0.1'"),
        (["--input_perturbation", "nan"], "argument --input_perturbation: expected a number >= 0, got 'nan'"),
        (["--snr_gamma", "0"], "argument --snr_gamma: expected a number > 0, got '0'"),
        (["--rank", "0"], "argument --rank: expected an integer >= 1, got '0'"),
        (["--assignment", "hungarian"], "argument --assignment: invalid choice: 'hungarian'"),
    ],
)
def test_bad_flags_are_rejected_by_the_parser(script, capsys, flags, message):
    required = [] if not flags else ["--pretrained_model_name_or_path", "some/model"]
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args([*required, *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_outputs_pass_the_publishing_checks_of_push_to_hub(trained):
    from immiscible_diffusers.hub import plan_push

    full = plan_push(trained("epsilon"))  # what --push_to_hub checks before any network call
    expected = {"README.md", "model_index.json", "unet/diffusion_pytorch_model.safetensors", "samples/step_000003.png"}
    assert expected <= set(full.files)
    assert not [name for name in full.files if name.startswith(("checkpoint-", "logs/"))]
    lora = plan_push(trained("lora"), required_file=LORA_WEIGHTS)
    assert LORA_WEIGHTS in lora.files and "model_index.json" not in lora.files
    with pytest.raises(ValueError, match=r"holds no saved pipeline \(model_index.json\)"):
        plan_push(trained("lora"))  # which is why the script passes required_file for LoRA runs
