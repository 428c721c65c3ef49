"""Immiscible schedulers: config round trips and proof that drop-in training uses the assigned noise."""

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    CMStochasticIterativeScheduler,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    UNet2DModel,
)
from diffusers.configuration_utils import ConfigMixin, register_to_config

from immiscible_diffusers import (
    ImmiscibleCMStochasticIterativeScheduler,
    ImmiscibleDDIMScheduler,
    ImmiscibleDDPMScheduler,
    ImmiscibleDPMSolverMultistepScheduler,
    ImmiscibleEulerDiscreteScheduler,
    ImmiscibleFlowMatchEulerDiscreteScheduler,
    ImmiscibleLCMScheduler,
    ImmiscibleNoiseScheduler,
    assign_noise,
    make_immiscible,
)

READY = [
    (ImmiscibleDDPMScheduler, DDPMScheduler, {"num_train_timesteps": 500, "beta_schedule": "squaredcos_cap_v2"}),
    (ImmiscibleDDIMScheduler, DDIMScheduler, {"num_train_timesteps": 500, "prediction_type": "v_prediction"}),
    (ImmiscibleEulerDiscreteScheduler, EulerDiscreteScheduler, {"num_train_timesteps": 500, "use_karras_sigmas": True}),
    (ImmiscibleDPMSolverMultistepScheduler, DPMSolverMultistepScheduler, {"num_train_timesteps": 500, "solver_order": 3}),
    (ImmiscibleLCMScheduler, LCMScheduler, {"num_train_timesteps": 500, "original_inference_steps": 20}),
    (ImmiscibleCMStochasticIterativeScheduler, CMStochasticIterativeScheduler, {"num_train_timesteps": 20, "sigma_max": 40.0}),
    (ImmiscibleFlowMatchEulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, {"num_train_timesteps": 500, "shift": 3.0}),
]
SETTINGS = {"assignment": "knn", "knn_k": 7, "assignment_distance": "sqeuclidean", "assignment_dtype": "bfloat16",
            "assignment_scope": "global", "assignment_block_size": 512, "drop_in_assignment": False}


def _batch(batch=16, shape=(3, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.rand((3, *shape), generator=g) * 2 - 1
    samples = prototypes[torch.randint(0, 3, (batch,), generator=g)] + 0.05 * torch.randn((batch, *shape), generator=g)
    return samples, torch.randn((batch, *shape), generator=g)


@pytest.mark.parametrize("immiscible_cls,stock_cls,base_kwargs", READY, ids=[r[1].__name__ for r in READY])
def test_ready_schedulers_round_trip(tmp_path, immiscible_cls, stock_cls, base_kwargs):
    scheduler = immiscible_cls(**base_kwargs, **SETTINGS)
    assert isinstance(scheduler, stock_cls) and isinstance(scheduler, ImmiscibleNoiseScheduler)
    scheduler.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == immiscible_cls.__name__

    for loaded in (immiscible_cls.from_pretrained(tmp_path), immiscible_cls.from_config(scheduler.config)):
        for key, value in {**base_kwargs, **SETTINGS}.items():
            assert loaded.config[key] == value, key
        # the object, not only its config, uses the loaded values (the **kwargs pitfall)
        reference = stock_cls(**base_kwargs)
        for attribute in ("sigmas", "alphas_cumprod", "timesteps"):
            if hasattr(reference, attribute):
                torch.testing.assert_close(torch.as_tensor(getattr(loaded, attribute)), torch.as_tensor(getattr(reference, attribute)))

    stock = scheduler.to_stock_scheduler()
    assert type(stock) is stock_cls
    assert not any(key in stock.config for key in SETTINGS)
    assert all(stock.config[k] == v for k, v in base_kwargs.items())

    from_stock = immiscible_cls.from_config(stock_cls(**base_kwargs).config)
    assert all(from_stock.config[k] == v for k, v in base_kwargs.items())
    assert from_stock.config.assignment == "linear" and from_stock.config.drop_in_assignment is True

    stock_cls_loaded = stock_cls.from_pretrained(tmp_path)
    assert all(stock_cls_loaded.config[k] == v for k, v in base_kwargs.items())


def test_bad_settings_are_rejected_at_construction():
    with pytest.raises(ValueError, match="method"):
        ImmiscibleDDPMScheduler(assignment="greedy")
    with pytest.raises(ValueError, match="knn_k"):
        ImmiscibleDDPMScheduler(knn_k=0)
    with pytest.raises(TypeError, match="drop_in_assignment"):
        ImmiscibleDDPMScheduler(drop_in_assignment="yes")


def test_make_immiscible_for_any_scheduler_with_add_noise():
    ImmiscibleHeun = make_immiscible(HeunDiscreteScheduler)
    scheduler = ImmiscibleHeun(num_train_timesteps=300)
    assert ImmiscibleHeun.__name__ == "ImmiscibleHeunDiscreteScheduler"
    assert scheduler.config.num_train_timesteps == 300
    samples, noise = _batch()
    expected = assign_noise(samples, noise)
    scheduler.add_noise(samples, noise, scheduler.timesteps[:16])
    assert torch.equal(noise, expected)


def test_make_immiscible_rejects_what_it_cannot_wrap():
    class NoNoising(ConfigMixin):
        config_name = "scheduler_config.json"

        @register_to_config
        def __init__(self, steps: int = 10):
            pass

    with pytest.raises(TypeError, match="neither add_noise nor scale_noise"):
        make_immiscible(NoNoising)
    with pytest.raises(TypeError, match="scheduler_class must be a diffusers scheduler class"):
        make_immiscible(torch.nn.Linear)
    with pytest.raises(TypeError, match="already immiscible"):
        make_immiscible(ImmiscibleDDPMScheduler)


# --- the drop-in path trains on the assigned noise -----------------------------------------------


def _tiny_unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_unmodified_ddpm_training_step_uses_assigned_noise(prediction_type):
    """The diffusers example's step, verbatim in shape: noise = randn; noisy = add_noise; target from noise."""
    scheduler = ImmiscibleDDPMScheduler(num_train_timesteps=100, prediction_type=prediction_type)
    stock = DDPMScheduler(num_train_timesteps=100, prediction_type=prediction_type)
    model = _tiny_unet()
    clean, noise = _batch()
    timesteps = torch.randint(0, 100, (16,), generator=torch.Generator().manual_seed(1))
    expected_noise = assign_noise(clean, noise.clone())
    assert not torch.equal(expected_noise, noise), "the test batch must actually get re-paired"

    # --- the user's unmodified step ---
    noisy = scheduler.add_noise(clean, noise, timesteps)
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(clean, noise, timesteps)
    else:
        target = clean
    pred = model(noisy, timesteps).sample
    loss = F.mse_loss(pred, target)
    # ---

    torch.testing.assert_close(noisy, stock.add_noise(clean, expected_noise, timesteps), rtol=0, atol=0)
    if prediction_type == "epsilon":
        expected_target = expected_noise
    elif prediction_type == "v_prediction":
        expected_target = stock.get_velocity(clean, expected_noise, timesteps)
    else:
        expected_target = clean
    torch.testing.assert_close(target, expected_target, rtol=0, atol=0)
    expected_loss = F.mse_loss(model(stock.add_noise(clean, expected_noise, timesteps), timesteps).sample, expected_target)
    torch.testing.assert_close(loss, expected_loss)


def test_unmodified_flow_matching_step_uses_assigned_noise():
    scheduler = ImmiscibleFlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    clean, noise = _batch()
    expected_noise = assign_noise(clean, noise.clone())
    timestep = scheduler.timesteps[:16]
    noisy = scheduler.scale_noise(clean, timestep, noise)
    target = noise - clean  # the SD3 flow target
    sigma = (timestep / 1000.0).view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, sigma * expected_noise + (1 - sigma) * clean)
    torch.testing.assert_close(target, expected_noise - clean, rtol=0, atol=0)


@pytest.mark.parametrize("immiscible_cls", [ImmiscibleEulerDiscreteScheduler, ImmiscibleCMStochasticIterativeScheduler])
def test_sigma_schedulers_assign_in_add_noise(immiscible_cls):
    scheduler = immiscible_cls()
    clean, noise = _batch()
    expected = assign_noise(clean, noise.clone())
    timesteps = scheduler.timesteps[torch.arange(16) % len(scheduler.timesteps)]
    scheduler.add_noise(clean, noise, timesteps)
    assert torch.equal(noise, expected)


def test_knn_drop_in_assigns_once_for_teacher_and_student():
    scheduler = ImmiscibleCMStochasticIterativeScheduler(assignment="knn", knn_k=8)
    clean, noise = _batch()
    timesteps = scheduler.timesteps[:16]
    scheduler.add_noise(clean, noise, timesteps)
    after_first = noise.clone()
    scheduler.add_noise(clean, noise, scheduler.timesteps[1:17])
    assert torch.equal(noise, after_first), "the second noising of the same tensor must not draw new candidates"
    noise.normal_()  # refilled in place: new noise, assigned again
    refilled = noise.clone()
    scheduler.add_noise(clean, noise, timesteps)
    assert not torch.equal(noise, refilled)


def test_drop_in_switch_off_for_inference():
    samples, noise = _batch()
    untouched = noise.clone()
    stock = DDIMScheduler()
    t = torch.full((16,), 500)

    scheduler = ImmiscibleDDIMScheduler()
    with scheduler.drop_in_assignment_disabled():  # an img2img-style call
        noisy = scheduler.add_noise(samples, noise, t)
    assert torch.equal(noise, untouched) and torch.equal(noisy, stock.add_noise(samples, untouched, t))
    assert scheduler.config.drop_in_assignment is True

    off = ImmiscibleDDIMScheduler(drop_in_assignment=False)
    off.add_noise(samples, noise, t)
    assert torch.equal(noise, untouched)
    # the explicit API still assigns
    assert not torch.equal(off.assign_noise(samples, noise), untouched)

    none = ImmiscibleDDIMScheduler(assignment="none")
    none.add_noise(samples, noise, t)
    assert torch.equal(noise, untouched)


def test_in_place_impossible_raises_clearly():
    scheduler = ImmiscibleDDPMScheduler()
    samples, noise = _batch()
    t = torch.full((16,), 10)
    with pytest.raises(ValueError, match="requires grad"):
        scheduler.add_noise(samples, noise.clone().requires_grad_(), t)
    with pytest.raises(ValueError, match="broadcast view"):
        scheduler.add_noise(samples, noise[:1].expand(16, -1, -1, -1), t)


def test_explicit_api_returns_stats_and_leaves_input():
    scheduler = ImmiscibleDDPMScheduler()
    samples, noise = _batch()
    original = noise.clone()
    assigned, stats = scheduler.assign_noise(samples, noise, return_stats=True)
    assert torch.equal(noise, original)
    assert torch.equal(assigned, assign_noise(samples, noise))
    assert stats.mean_distance_after < stats.mean_distance_before
