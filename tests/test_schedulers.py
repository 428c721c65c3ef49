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


# --- issue 11: patterns that trained on unassigned or mismatched noise ------------------------------


def _noise_inside(noisy, clean, scheduler, timesteps):
    """The noise a DDPM-family model input was built from: (noisy - sqrt(a) x) / sqrt(1 - a)."""
    alphas = scheduler.alphas_cumprod[timesteps].view(-1, *([1] * (clean.ndim - 1)))
    return (noisy - alphas.sqrt() * clean) / (1 - alphas).sqrt()


def test_pattern1_input_perturbation_with_explicit_assignment_and_drop_in_raises():
    """Pattern 1: noise assigned explicitly, then a derived tensor handed to the drop-in: loud, not a 2nd assignment."""
    scheduler = ImmiscibleDDPMScheduler(num_train_timesteps=100)
    clean, noise = _batch()
    t = torch.randint(0, 100, (16,), generator=torch.Generator().manual_seed(1))
    noise = scheduler.assign_noise(clean, noise)
    new_noise = noise + 0.1 * torch.randn_like(noise)
    untouched = new_noise.clone()
    with pytest.raises(ValueError, match="assigned with scheduler.assign_noise"):
        scheduler.add_noise(clean, new_noise, t)
    assert torch.equal(new_noise, untouched)
    # the tensor assign_noise returned is recognised: no second assignment
    before = noise.clone()
    scheduler.add_noise(clean, noise, t)
    assert torch.equal(noise, before)


def test_pattern1_v_prediction_target_from_another_tensor_warns():
    """Pattern 1 with v-prediction: model input from new_noise, target from noise: the drop-in says so."""
    scheduler = ImmiscibleDDPMScheduler(num_train_timesteps=100, prediction_type="v_prediction")
    clean, noise = _batch()
    t = torch.randint(0, 100, (16,), generator=torch.Generator().manual_seed(1))
    new_noise = noise + 0.1 * torch.randn_like(noise)
    scheduler.add_noise(clean, new_noise, t)
    with pytest.warns(UserWarning, match="does not match that model input"):
        scheduler.get_velocity(clean, noise, t)


@pytest.mark.parametrize("method", ["linear", "knn"])
def test_pattern2_explicit_result_passed_as_a_copy_is_not_assigned_again(method):
    """Pattern 2: add_noise(x, noise.clone()) after explicit assignment keeps the pairing (KNN draws nothing new)."""
    scheduler = ImmiscibleDDPMScheduler(num_train_timesteps=100, assignment=method, knn_k=8)
    clean, noise = _batch()
    t = torch.randint(0, 100, (16,), generator=torch.Generator().manual_seed(1))
    target = scheduler.assign_noise(clean, noise, generator=torch.Generator().manual_seed(3))
    copy = target.clone()
    noisy = scheduler.add_noise(clean, copy, t)
    assert torch.equal(copy, target)
    torch.testing.assert_close(_noise_inside(noisy, clean, scheduler, t), target, rtol=1e-4, atol=1e-4)


def test_pattern2_half_samples_with_float_noise_assign_the_callers_noise():
    """Pattern 2 (x.half()): mixed dtypes are accepted, so the target tensor itself is what gets assigned."""
    scheduler = ImmiscibleDDPMScheduler(num_train_timesteps=100)
    stock = DDPMScheduler(num_train_timesteps=100)
    clean, noise = _batch()
    t = torch.randint(0, 100, (16,), generator=torch.Generator().manual_seed(1))
    expected = assign_noise(clean.half(), noise.clone())
    assert not torch.equal(expected, noise)
    noisy = scheduler.add_noise(clean.half(), noise, t)
    target = noise
    assert torch.equal(target, expected)
    assert torch.equal(noisy, stock.add_noise(clean.half(), expected, t))


@pytest.mark.parametrize("immiscible_cls", [ImmiscibleDDPMScheduler, ImmiscibleDDIMScheduler, ImmiscibleLCMScheduler])
def test_pattern3_get_velocity_before_add_noise(immiscible_cls):
    """Pattern 3: the v-target computed first assigns the noise; add_noise reuses that pairing."""
    scheduler = immiscible_cls(num_train_timesteps=100, prediction_type="v_prediction")
    clean, noise = _batch()
    t = torch.randint(0, 100, (16,), generator=torch.Generator().manual_seed(1))
    expected = assign_noise(clean, noise.clone())
    assert not torch.equal(expected, noise)
    target = scheduler.get_velocity(clean, noise, t)
    noisy = scheduler.add_noise(clean, noise, t)
    assert torch.equal(noise, expected)
    stock = scheduler.to_stock_scheduler()
    assert torch.equal(target, stock.get_velocity(clean, expected, t))
    assert torch.equal(noisy, stock.add_noise(clean, expected, t))


def test_pattern3_knn_either_order_gives_one_pairing():
    scheduler = ImmiscibleDDPMScheduler(num_train_timesteps=100, prediction_type="v_prediction", assignment="knn", knn_k=8)
    clean, noise = _batch()
    t = torch.randint(0, 100, (16,), generator=torch.Generator().manual_seed(1))
    target = scheduler.get_velocity(clean, noise, t)
    assigned = noise.clone()
    noisy = scheduler.add_noise(clean, noise, t)
    assert torch.equal(noise, assigned), "add_noise must reuse the pairing get_velocity made"
    torch.testing.assert_close(_noise_inside(noisy, clean, scheduler, t), assigned, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(target, scheduler.to_stock_scheduler().get_velocity(clean, assigned, t))


def test_pattern4_flow_scheduler_docstring_makes_no_claim_for_inline_noising():
    """Pattern 4: scripts that never call scale_noise are not covered; the docs say so and give the line."""
    import immiscible_diffusers.schedulers as module

    guarantee = "the tensor you pass to add_noise / scale_noise / get_velocity is assigned in place; build your target from that tensor"
    for doc in (module.__doc__, ImmiscibleNoiseScheduler.__doc__):
        assert guarantee in " ".join(doc.replace("*", "").split())
    assert "are not covered" in module.__doc__ and "noise = scheduler.assign_noise(x, noise)" in module.__doc__


def test_pattern5_same_noise_tensor_for_other_samples_is_assigned_again():
    scheduler = ImmiscibleDDPMScheduler(num_train_timesteps=100)
    clean, noise = _batch()
    other, _ = _batch(seed=5)
    t = torch.randint(0, 100, (16,), generator=torch.Generator().manual_seed(1))
    scheduler.add_noise(clean, noise, t)
    expected = assign_noise(other, noise.clone())
    assert not torch.equal(expected, noise)
    scheduler.add_noise(other, noise, t)
    assert torch.equal(noise, expected)


@pytest.mark.parametrize("refill", ["data", "numpy"])
def test_pattern5_refill_that_bypasses_version_is_noticed(refill):
    scheduler = ImmiscibleDDPMScheduler(num_train_timesteps=100)
    clean, noise = _batch()
    t = torch.randint(0, 100, (16,), generator=torch.Generator().manual_seed(1))
    scheduler.add_noise(clean, noise, t)
    version = noise._version
    fresh = torch.randn(noise.shape, generator=torch.Generator().manual_seed(9))
    if refill == "data":
        noise.data.copy_(fresh)
    else:
        noise.numpy()[...] = fresh.numpy()
    assert noise._version == version, "the refill must bypass _version for this test to mean anything"
    expected = assign_noise(clean, fresh)
    assert not torch.equal(expected, fresh)
    scheduler.add_noise(clean, noise, t)
    assert torch.equal(noise, expected)


@pytest.mark.parametrize("method", ["add_noise", "get_velocity"])
def test_pattern6_a_failing_call_leaves_the_noise_untouched(method):
    scheduler = ImmiscibleDDPMScheduler(num_train_timesteps=100)
    clean, noise = _batch()
    untouched = noise.clone()
    bad_t = torch.full((16,), 10_000)  # beyond num_train_timesteps: IndexError in the base method
    with pytest.raises(IndexError):
        getattr(scheduler, method)(clean, noise, bad_t)
    assert torch.equal(noise, untouched)


def test_pattern6_scale_noise_failing_leaves_the_noise_untouched():
    scheduler = ImmiscibleFlowMatchEulerDiscreteScheduler()
    clean, noise = _batch()
    untouched = noise.clone()
    with pytest.raises(Exception):
        scheduler.scale_noise(clean, torch.full((16,), -123.0), noise)  # not a timestep of the schedule
    assert torch.equal(noise, untouched)


def test_pattern7_fp16_samples_with_fp32_noise_like_stock_diffusers():
    scheduler = ImmiscibleDDPMScheduler(num_train_timesteps=100, assignment_dtype="bfloat16")
    stock = DDPMScheduler(num_train_timesteps=100)
    clean, noise = _batch()
    t = torch.randint(0, 100, (16,), generator=torch.Generator().manual_seed(1))
    expected = assign_noise(clean.half(), noise.clone(), cost_dtype="bfloat16")
    noisy = scheduler.add_noise(clean.half(), noise, t)
    assert noise.dtype == torch.float32 and torch.equal(noise, expected)
    reference = stock.add_noise(clean.half(), expected, t)
    assert noisy.dtype == reference.dtype and torch.equal(noisy, reference)


def test_pattern7_dtype_objects_in_the_config_are_stored_by_name(tmp_path):
    scheduler = ImmiscibleDDPMScheduler(assignment_dtype=torch.bfloat16)
    assert scheduler.config.assignment_dtype == "bfloat16"
    assert "bfloat16" in repr(scheduler)
    scheduler.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "scheduler_config.json").read_text())["assignment_dtype"] == "bfloat16"
    assert ImmiscibleDDPMScheduler.from_pretrained(tmp_path).config.assignment_dtype == "bfloat16"
    with pytest.raises(ValueError, match="cost_dtype"):
        ImmiscibleDDPMScheduler(assignment_dtype=torch.float64)


def test_drop_in_rejects_meta_tensors_clearly():
    scheduler = ImmiscibleDDPMScheduler(num_train_timesteps=100)
    meta = torch.empty(4, 3, 8, 8, device="meta")
    with pytest.raises(ValueError, match="meta tensors"):
        scheduler.add_noise(meta, torch.empty_like(meta), torch.zeros(4, dtype=torch.long, device="meta"))


def test_a_scheduler_that_paired_noise_still_pickles_and_deep_copies():
    import copy
    import pickle

    scheduler = ImmiscibleDDPMScheduler(num_train_timesteps=100)
    clean, noise = _batch()
    scheduler.add_noise(clean, noise, torch.zeros(16, dtype=torch.long))
    for clone in (pickle.loads(pickle.dumps(scheduler)), copy.deepcopy(scheduler)):
        assert clone.config == scheduler.config
        fresh = torch.randn(noise.shape)
        expected = assign_noise(clean, fresh)
        clone.add_noise(clean, fresh, torch.zeros(16, dtype=torch.long))
        assert torch.equal(fresh, expected)
