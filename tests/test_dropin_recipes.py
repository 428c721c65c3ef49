"""docs/drop-in.md recipes: each replays an official diffusers example's noise/target logic with the documented lines.

The lines are read from the doc and executed, so the doc cannot drift from what is tested. The loops below are
written here from the examples' structure (noise, timesteps, model input, target); they are not copies. Each test
proves that the model input and the target were built from the same *assigned* noise.
"""

import re
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import CMStochasticIterativeScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from immiscible_diffusers import assign_noise

DOC = Path(__file__).resolve().parents[1] / "docs" / "drop-in.md"
BATCH = 8
STEPS = 100


def recipe(name: str) -> str:
    """The python block that follows ``<!-- recipe: name -->`` in docs/drop-in.md."""
    match = re.search(rf"<!-- recipe: {re.escape(name)} -->\s*```python\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert match, f"docs/drop-in.md has no recipe {name!r}"
    return match.group(1)


def run_recipe(name: str, **variables) -> dict:
    namespace = dict(variables)
    exec(compile(recipe(name), f"docs/drop-in.md:{name}", "exec"), namespace)
    return namespace


def _latents(seed=0, shape=(4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.rand((3, *shape), generator=g) * 2 - 1
    return prototypes[torch.randint(0, 3, (BATCH,), generator=g)] + 0.05 * torch.randn((BATCH, *shape), generator=g)


def _noise_inside(noisy, clean, scheduler, timesteps):
    """The noise a DDPM-family model input was built from: (noisy - sqrt(a) x) / sqrt(1 - a)."""
    alphas = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    return (noisy - alphas.sqrt() * clean) / (1 - alphas).sqrt()


def _pretrained(tmp_path, **config):
    """A stock scheduler folder like a Stable Diffusion checkpoint's ``scheduler/``."""
    DDPMScheduler(num_train_timesteps=STEPS, beta_schedule="scaled_linear", **config).save_pretrained(tmp_path / "scheduler")
    return str(tmp_path)


def _assert_same_assigned_noise(input_noise, target_noise, clean, original):
    torch.testing.assert_close(input_noise, target_noise, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(target_noise, original), "the batch must actually get re-paired"
    # the pairing is the assignment's: a permutation of the draw with a shorter total distance
    assert sorted(target_noise.flatten(1).sum(1).tolist()) == pytest.approx(sorted(original.flatten(1).sum(1).tolist()), abs=1e-3)
    distance = lambda n: float((clean - n).flatten(1).norm(dim=1).sum())  # noqa: E731
    assert distance(target_noise) < distance(original)


# --- unconditional_image_generation/train_unconditional.py ---------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_unconditional(prediction_type):
    args = types.SimpleNamespace(ddpm_num_steps=STEPS, ddpm_beta_schedule="linear", prediction_type=prediction_type)
    noise_scheduler = run_recipe("unconditional", args=args)["noise_scheduler"]
    clean_images = _latents(shape=(3, 8, 8))

    # the example's step: its own randn, one add_noise, target noise (epsilon) or the clean images (sample)
    noise = torch.randn(clean_images.shape)
    original = noise.clone()
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (BATCH,)).long()
    noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
    target = noise if prediction_type == "epsilon" else clean_images

    input_noise = _noise_inside(noisy_images, clean_images, noise_scheduler, timesteps)
    _assert_same_assigned_noise(input_noise, noise, clean_images, original)
    torch.testing.assert_close(noise, assign_noise(clean_images, original))
    if prediction_type == "epsilon":
        assert target is noise


# --- text_to_image/train_text_to_image.py and train_text_to_image_lora.py --------------------------------------


def _text_to_image_step(noise_scheduler, latents, noise_offset, input_perturbation, explicit=None):
    """Noise, optional offset, optional input perturbation, add_noise, target: the examples' order."""
    noise = torch.randn_like(latents)
    original = noise.clone()
    if explicit is not None:
        noise = run_recipe(explicit, noise_scheduler=noise_scheduler, latents=latents, noise=noise)["noise"]
    if noise_offset:
        noise += noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1))
    if input_perturbation:
        perturbation = input_perturbation * torch.randn_like(noise)
        new_noise = noise + perturbation
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
    if input_perturbation:
        noisy_latents = noise_scheduler.add_noise(latents, new_noise, timesteps)
    else:
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    input_noise = _noise_inside(noisy_latents, latents, noise_scheduler, timesteps)
    if input_perturbation:
        input_noise = input_noise - perturbation
    return original, noise, input_noise, target, timesteps


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("noise_offset", [0.0, 0.1])
@pytest.mark.parametrize("name", ["text-to-image", "text-to-image-lora"])
def test_text_to_image_and_lora(tmp_path, name, noise_offset, prediction_type):
    args = types.SimpleNamespace(pretrained_model_name_or_path=_pretrained(tmp_path), prediction_type=prediction_type)
    noise_scheduler = run_recipe(name, args=args)["noise_scheduler"]
    noise_scheduler.register_to_config(prediction_type=args.prediction_type)  # the examples' --prediction_type
    latents = _latents()

    original, noise, input_noise, target, timesteps = _text_to_image_step(noise_scheduler, latents, noise_offset, 0.0)

    _assert_text_to_image_pairing(noise_scheduler, latents, prediction_type, noise_offset, original, noise, input_noise, target, timesteps)


def _assert_text_to_image_pairing(noise_scheduler, latents, prediction_type, noise_offset, original, noise, input_noise, target, timesteps):
    """The model input and the (epsilon or v) target come from the same assigned noise."""
    torch.testing.assert_close(input_noise, noise, rtol=1e-4, atol=1e-4)
    if prediction_type == "epsilon":
        assert target is noise
    else:
        torch.testing.assert_close(target, DDPMScheduler.from_config(noise_scheduler.config).get_velocity(latents, noise, timesteps))
    if not noise_offset:
        _assert_same_assigned_noise(input_noise, noise, latents, original)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("noise_offset", [0.0, 0.1])
def test_text_to_image_input_perturbation(tmp_path, noise_offset, prediction_type):
    args = types.SimpleNamespace(pretrained_model_name_or_path=_pretrained(tmp_path), prediction_type=prediction_type)
    noise_scheduler = run_recipe("text-to-image-input-perturbation-scheduler", args=args)["noise_scheduler"]
    noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    latents = _latents()

    original, noise, input_noise, target, timesteps = _text_to_image_step(
        noise_scheduler, latents, noise_offset, 0.1, explicit="text-to-image-input-perturbation-noise"
    )

    # the model input holds target noise + perturbation: the same assigned noise under both
    _assert_text_to_image_pairing(noise_scheduler, latents, prediction_type, noise_offset, original, noise, input_noise, target, timesteps)


def test_text_to_image_input_perturbation_without_the_recipe_is_loud(tmp_path):
    """Keeping the drop-in on while assigning explicitly raises instead of assigning the derived tensor again."""
    args = types.SimpleNamespace(pretrained_model_name_or_path=_pretrained(tmp_path))
    noise_scheduler = run_recipe("text-to-image", args=args)["noise_scheduler"]
    with pytest.raises(ValueError, match="drop_in_assignment=False"):
        _text_to_image_step(noise_scheduler, _latents(), 0.0, 0.1, explicit="text-to-image-input-perturbation-noise")


# --- SD3 / Flux flow matching (train_dreambooth_sd3.py, train_dreambooth_flux.py and their LoRA variants) ------


def test_sd3_flux_flow_matching():
    noise_scheduler_copy = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    model_input = _latents(shape=(16, 8, 8))

    noise = torch.randn_like(model_input)
    original = noise.clone()
    noise = run_recipe("flow-matching", model_input=model_input, noise=noise)["noise"]
    indices = torch.randint(0, noise_scheduler_copy.config.num_train_timesteps, (BATCH,))
    timesteps = noise_scheduler_copy.timesteps[indices]
    # sigmas looked up from the scheduler's timesteps, as the scripts' get_sigmas does
    step_indices = [(noise_scheduler_copy.timesteps == t).nonzero().item() for t in timesteps]
    sigmas = noise_scheduler_copy.sigmas[step_indices].flatten().view(-1, 1, 1, 1)
    noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
    target = noise - model_input

    input_noise = (noisy_model_input - (1.0 - sigmas) * model_input) / sigmas
    _assert_same_assigned_noise(input_noise, target + model_input, model_input, original)
    torch.testing.assert_close(noise, assign_noise(model_input, original))


# --- consistency distillation: LCM (train_lcm_distill_sd_wds.py) and consistency training ---------------------


def test_latent_consistency_distillation(tmp_path):
    args = types.SimpleNamespace(pretrained_teacher_model=_pretrained(tmp_path), teacher_revision=None)
    noise_scheduler = run_recipe("lcm-distillation", args=args)["noise_scheduler"]
    latents = _latents()
    alphas = noise_scheduler.alphas_cumprod

    noise = torch.randn_like(latents)
    original = noise.clone()
    start_timesteps = torch.randint(20, STEPS, (BATCH,))
    timesteps = start_timesteps - 20
    noisy_model_input = noise_scheduler.add_noise(latents, noise, start_timesteps)
    # student and teacher both start from noisy_model_input; the teacher's DDIM step to `timesteps` with a
    # perfect epsilon prediction must land on x_prev built from the same assigned noise
    a_t, a_prev = (alphas[t].view(-1, 1, 1, 1) for t in (start_timesteps, timesteps))
    teacher_eps = noise
    pred_x0 = (noisy_model_input - (1 - a_t).sqrt() * teacher_eps) / a_t.sqrt()
    x_prev = a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * teacher_eps

    _assert_same_assigned_noise(_noise_inside(noisy_model_input, latents, noise_scheduler, start_timesteps), noise, latents, original)
    torch.testing.assert_close(x_prev, noise_scheduler.to_stock_scheduler().add_noise(latents, noise, timesteps), rtol=1e-4, atol=1e-4)


def test_consistency_training():
    scheduler = CMStochasticIterativeScheduler(num_train_timesteps=40)
    sigmas = scheduler.sigmas.flip(0).float()  # ascending Karras sigmas, as the CT script indexes them
    clean_images = _latents(shape=(3, 8, 8))

    noise = torch.randn_like(clean_images)
    original = noise.clone()
    noise = run_recipe("consistency-training", clean_images=clean_images, noise=noise)["noise"]
    index = torch.randint(0, len(sigmas) - 1, (BATCH,))
    sigma, sigma_next = sigmas[index].view(-1, 1, 1, 1), sigmas[index + 1].view(-1, 1, 1, 1)
    teacher_input = clean_images + sigma * noise
    student_input = clean_images + sigma_next * noise

    _assert_same_assigned_noise((teacher_input - clean_images) / sigma, (student_input - clean_images) / sigma_next, clean_images, original)
    torch.testing.assert_close(noise, assign_noise(clean_images, original))


def test_every_recipe_in_the_doc_is_tested():
    names = set(re.findall(r"<!-- recipe: ([\w-]+) -->", DOC.read_text()))
    tested = {
        "unconditional", "text-to-image", "text-to-image-lora", "text-to-image-input-perturbation-scheduler",
        "text-to-image-input-perturbation-noise", "flow-matching", "lcm-distillation", "consistency-training",
    }
    assert names == tested


def test_doc_states_the_guarantee():
    text = " ".join(DOC.read_text().replace("*", "").split()).lower()
    assert "the tensor you pass to add_noise / scale_noise / get_velocity is assigned in place; build your target from that tensor" in text


def test_recipe_loss_is_the_assigned_noise_loss():
    """End to end for one recipe: the loss the drop-in loop computes equals the explicit immiscible loss."""
    args = types.SimpleNamespace(ddpm_num_steps=STEPS, ddpm_beta_schedule="linear", prediction_type="epsilon")
    noise_scheduler = run_recipe("unconditional", args=args)["noise_scheduler"]
    stock = noise_scheduler.to_stock_scheduler()
    model = torch.nn.Conv2d(3, 3, 3, padding=1)
    clean = _latents(shape=(3, 8, 8))
    noise = torch.randn(clean.shape)
    timesteps = torch.randint(0, STEPS, (BATCH,))
    assigned = assign_noise(clean, noise.clone())
    loss = F.mse_loss(model(noise_scheduler.add_noise(clean, noise, timesteps)), noise)
    torch.testing.assert_close(loss, F.mse_loss(model(stock.add_noise(clean, assigned, timesteps)), assigned))


def test_latent_recipe_refuses_a_drop_in_scheduler_that_would_assign_twice():
    from immiscible_diffusers import ImmiscibleDDPMScheduler
    from immiscible_diffusers.latent import prepare_noise_and_target

    latents = torch.randn(4, 4, 8, 8)
    scheduler = ImmiscibleDDPMScheduler(num_train_timesteps=100)
    with pytest.raises(ValueError, match="assigns the noise itself"):
        prepare_noise_and_target(latents, scheduler, prediction_type="epsilon", assignment={"method": "linear"})
    # The stock scheduler, or the drop-in switched off, is the supported pairing.
    for stock in (scheduler.to_stock_scheduler(), ImmiscibleDDPMScheduler(num_train_timesteps=100, drop_in_assignment=False)):
        result = prepare_noise_and_target(latents, stock, prediction_type="epsilon", assignment={"method": "linear"})
        assert torch.equal(result.target, result.assigned_noise)
