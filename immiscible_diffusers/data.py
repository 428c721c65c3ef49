"""Image datasets for the training scripts: a Hub dataset, a local image folder, or the offline default.

``load_image_dataset`` mirrors how diffusers' training examples load data (``--dataset_name`` or
``--train_data_dir`` as an ``imagefolder``) and adds an offline default: scikit-learn's bundled
handwritten digits (1,797 grayscale 8x8 images, values 0-16), so a run needs no network at all.
``image_transform`` turns one PIL image into a ``[-1, 1]`` tensor (resize, crop, flip), and
``with_image_transform`` applies it lazily to a ``datasets.Dataset``.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable

import datasets
import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits

logger = logging.getLogger(__name__)

# The name the digits default goes by in model cards and training configs.
DIGITS_DATASET_NAME = "sklearn-digits"
DIGITS_DEFAULT_RESOLUTION = 16
DIGITS_NUM_IMAGES = 1797
CHANNEL_MODES = {1: "L", 3: "RGB"}


def load_digits_dataset():
    """scikit-learn's handwritten digits as a ``datasets.Dataset`` with ``image`` (PIL, mode L, 8x8) and ``label``.

    The 17 gray levels (0-16) are spread over 0-255; the data ships with scikit-learn, so nothing is downloaded.
    """
    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(p, mode="L") for p in pixels], "label": digits.target.tolist()},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )


def load_image_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | None = None,
    image_column: str = "image",
    cache_dir: str | None = None,
    max_train_samples: int | None = None,
    seed: int | None = None,
):
    """The training split as a ``datasets.Dataset`` whose ``image_column`` holds images.

    Exactly one source is used: ``dataset_name`` (a Hub dataset, or a local dataset directory),
    ``train_data_dir`` (a folder of images, read with the ``imagefolder`` builder), or, when both are
    ``None``, the scikit-learn digits (column ``image``). ``max_train_samples`` keeps that many
    examples after a shuffle with ``seed``, as diffusers' examples do.

    Raises ``ValueError`` for a ``train_data_dir`` that is not a directory, a missing ``image_column``,
    or a ``max_train_samples`` below 1.
    """
    if dataset_name is not None and train_data_dir is not None:
        raise ValueError("give either --dataset_name or --train_data_dir, not both")
    if max_train_samples is not None and max_train_samples < 1:
        raise ValueError(f"--max_train_samples must be >= 1, got {max_train_samples}")
    if train_data_dir is not None:
        if not os.path.isdir(train_data_dir):
            raise ValueError(f"--train_data_dir {train_data_dir!r} does not exist or is not a directory")
        dataset = datasets.load_dataset("imagefolder", data_dir=train_data_dir, cache_dir=cache_dir, split="train")
        dataset = drop_unreadable_images(dataset, image_column)
    elif dataset_name is not None:
        dataset = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, split="train")
    else:
        dataset = load_digits_dataset()
    if image_column not in dataset.column_names:
        raise ValueError(
            f"--image_column {image_column!r} is not a column of the dataset; its columns are {dataset.column_names}"
        )
    if max_train_samples is not None and max_train_samples < len(dataset):
        dataset = dataset.shuffle(seed=seed).select(range(max_train_samples))
    return dataset


def drop_unreadable_images(dataset, image_column: str = "image"):
    """``dataset`` without the examples whose image cannot be decoded, with a warning that counts them.

    Every image is decoded once, up front, so that a corrupt file in an image folder is found before training
    starts rather than crashing it later (with no checkpoint). Raises ``ValueError`` when none is readable.
    """
    if image_column not in dataset.column_names:
        return dataset  # load_image_dataset reports the missing column
    raw = dataset.cast_column(image_column, datasets.Image(decode=False))[image_column]
    readable, unreadable = [], []
    for index, item in enumerate(raw):
        source = io.BytesIO(item["bytes"]) if item.get("bytes") else item.get("path")
        try:
            with Image.open(source) as image:
                image.load()
            readable.append(index)
        except (OSError, SyntaxError, ValueError):
            unreadable.append(os.path.basename(item.get("path") or f"#{index}"))
    if not unreadable:
        return dataset
    if not readable:
        raise ValueError(f"none of the {len(raw)} images of --train_data_dir could be decoded")
    logger.warning(
        f"skipped {len(unreadable)} unreadable image(s) of {len(raw)} in --train_data_dir: "
        + ", ".join(unreadable[:5]) + (" ..." if len(unreadable) > 5 else "")
    )
    return dataset.select(readable)


def dataset_display_name(dataset_name: str | None, train_data_dir: str | None) -> str:
    """What a model card and a training config call the data: the Hub id, the folder, or the digits default."""
    if dataset_name is not None:
        return dataset_name
    if train_data_dir is not None:
        return os.path.abspath(train_data_dir)
    return DIGITS_DATASET_NAME


def image_transform(
    resolution: int, center_crop: bool = False, random_flip: bool = False, num_channels: int = 3
) -> Callable[[Image.Image], torch.Tensor]:
    """A function from a PIL image to a ``(num_channels, resolution, resolution)`` tensor in ``[-1, 1]``.

    As diffusers' unconditional example: resize the shorter side to ``resolution`` (bilinear), then a
    center or random crop, an optional random horizontal flip, and scaling to ``[-1, 1]``. Random crops
    and flips draw from torch's global generator (as torchvision does), so a seeded run repeats them.
    """
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
    if num_channels not in CHANNEL_MODES:
        raise ValueError(f"num_channels must be one of {tuple(CHANNEL_MODES)}, got {num_channels!r}")
    mode = CHANNEL_MODES[num_channels]

    def transform(image: Image.Image) -> torch.Tensor:
        image = image.convert(mode)
        width, height = image.size
        scale = resolution / min(width, height)
        size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        if size != image.size:
            image = image.resize(size, Image.Resampling.BILINEAR)
        width, height = image.size
        if center_crop:
            left, top = (width - resolution) // 2, (height - resolution) // 2
        else:  # no draw when there is nothing to choose, as torchvision's RandomCrop
            left = int(torch.randint(0, width - resolution + 1, ())) if width > resolution else 0
            top = int(torch.randint(0, height - resolution + 1, ())) if height > resolution else 0
        image = image.crop((left, top, left + resolution, top + resolution))
        if random_flip and bool(torch.rand(()) < 0.5):
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32).reshape(resolution, resolution, num_channels)
        return torch.from_numpy(array).permute(2, 0, 1).div(127.5).sub(1.0)

    return transform


def with_image_transform(dataset, image_column: str, transform: Callable[[Image.Image], torch.Tensor]):
    """``dataset`` yielding ``{"input": tensor}`` examples, transformed on access (no copy of the data)."""

    def transform_batch(examples: dict) -> dict:
        return {"input": [transform(image) for image in examples[image_column]]}

    return dataset.with_transform(transform_batch)
