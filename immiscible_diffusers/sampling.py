"""Sample grids during training: a pipeline's images, always from the same starting noise."""

from __future__ import annotations

import torch


def sample_images(pipeline, batch_size: int, num_inference_steps: int, device, **call_kwargs) -> list:
    """``batch_size`` PIL images from ``pipeline`` in ``num_inference_steps``, from seed 0 (comparable across steps)."""
    pipeline.set_progress_bar_config(desc="sampling", leave=False)
    generator = torch.Generator(device=device).manual_seed(0)
    return pipeline(
        generator=generator,
        batch_size=batch_size,
        num_inference_steps=num_inference_steps,
        output_type="pil",
        **call_kwargs,
    ).images
