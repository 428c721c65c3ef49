"""``FlowMatchingPipeline``: unconditional image generation with a velocity-predicting ``UNet2DModel``.

diffusers has no unconditional flow-matching pipeline for a pixel UNet, so ``train_flow_matching.py`` saves
this one. The file depends on torch and diffusers only: the training script copies it into the output
folder as ``pipeline.py`` and names it ``["pipeline", "FlowMatchingPipeline"]`` in ``model_index.json``, so
the saved pipeline also loads with plain diffusers (and from the Hub)::

    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(folder_or_repo, trust_remote_code=True)
    images = pipeline(batch_size=16, num_inference_steps=50).images

or, with immiscible-diffusers installed, ``FlowMatchingPipeline.from_pretrained(folder_or_repo)``.
"""

import inspect

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor


def uniform_sigma_schedule(scheduler, num_inference_steps: int) -> dict:
    """``set_timesteps`` arguments that spend every step: sigmas ``1, (n-1)/n, ..., 1/n`` (then 0).

    ``FlowMatchEulerDiscreteScheduler.set_timesteps(n)`` alone spaces sigmas from 1 down to
    ``1 / num_train_timesteps`` before the final 0, so with ``n = 2`` the second step integrates from
    0.001 to 0 and 2-step samples equal 1-step ones. Uniform sigmas ending at ``1 / n`` make each of the
    ``n`` Euler steps cover ``1 / n`` of the path (the scheduler's ``shift`` still applies). A scheduler
    whose ``set_timesteps`` takes no ``sigmas`` keeps its own spacing.
    """
    if "sigmas" not in inspect.signature(scheduler.set_timesteps).parameters:
        return {"num_inference_steps": num_inference_steps}
    return {"sigmas": [1.0 - i / num_inference_steps for i in range(num_inference_steps)]}


class FlowMatchingPipeline(DiffusionPipeline):
    """Sample a rectified-flow UNet by integrating its velocity from noise (sigma = 1) to data (sigma = 0).

    The UNet predicts the velocity ``noise - x`` of the path ``x_sigma = (1 - sigma) * x + sigma * noise``
    and takes ``sigma * num_train_timesteps`` as its timestep, as the SD3 recipe trains it; the scheduler
    (``FlowMatchEulerDiscreteScheduler``, or another flow-matching scheduler) integrates that ODE.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: FlowMatchEulerDiscreteScheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @classmethod
    def _dict_from_json_file(cls, json_file):
        # A saved folder names this class ["pipeline", "FlowMatchingPipeline"], which makes diffusers import the
        # folder's pipeline.py as remote code. Calling this class's from_pretrained asks for this class: drop
        # the module so diffusers uses `cls` (both for local folders and in `download` for Hub repos).
        config = super()._dict_from_json_file(json_file)
        name = config.get("_class_name")
        if isinstance(name, list) and len(name) == 2 and name[1] == cls.__name__:
            config["_class_name"] = cls.__name__
        return config

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 50,
        sigmas: list[float] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Generate ``batch_size`` images with ``num_inference_steps`` scheduler steps.

        Args:
            batch_size: number of images.
            generator: makes the starting noise (and a stochastic scheduler's draws) reproducible.
            num_inference_steps: model evaluations (one per Euler step with the default scheduler); the
                sigmas are spaced uniformly from 1 to ``1 / num_inference_steps`` (``uniform_sigma_schedule``).
            sigmas: the scheduler's sigmas instead (descending, without the final 0); overrides
                ``num_inference_steps``. ``numpy.linspace(1, 1 / 1000, n)`` is diffusers' own spacing.
            output_type: ``"pil"`` (a list of PIL images), ``"np"`` (an ``(N, H, W, C)`` array) or
                ``"pt"`` (an ``(N, C, H, W)`` tensor); values in ``[0, 1]``.
            return_dict: return an ``ImagePipelineOutput`` rather than a tuple.
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        sample_size = self.unet.config.sample_size
        if isinstance(sample_size, int):
            sample_size = (sample_size, sample_size)
        shape = (batch_size, self.unet.config.in_channels, *sample_size)
        device = self._execution_device
        image = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)

        if sigmas is not None:
            self.scheduler.set_timesteps(sigmas=list(sigmas), device=device)
        else:
            self.scheduler.set_timesteps(**uniform_sigma_schedule(self.scheduler, num_inference_steps), device=device)
        # Stochastic flow-matching schedulers draw from `generator`; the others take no such argument.
        accepts_generator = "generator" in inspect.signature(self.scheduler.step).parameters
        step_kwargs = {"generator": generator} if accepts_generator else {}
        for t in self.progress_bar(self.scheduler.timesteps):
            # The scheduler's timesteps are sigma * num_train_timesteps: what the UNet was trained with.
            velocity = self.unet(image, t.expand(batch_size)).sample
            image = self.scheduler.step(velocity, t, image, **step_kwargs).prev_sample

        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
