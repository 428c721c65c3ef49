"""Sample-quality metrics: Fréchet distances in a digits classifier's or Inception's feature space, and W2 in 2-D.

- ``frechet_distance``: the Fréchet (2-Wasserstein) distance between two Gaussians, computed through
  symmetric eigen-decompositions so that it stays real and finite for singular covariances.
- ``DigitsFeatureSpace``: the offline metric for the bundled digits. A small CNN is trained on a seeded
  half of scikit-learn's digits (cached on disk, keyed by a hash of its training configuration); its
  penultimate layer is the feature space, and its accuracy on the other half is reported. The Fréchet
  reference is that held-out half, so the classifier never saw the digits it is compared against.
- ``InceptionFeatureSpace``: the standard FID features (torch-fidelity's TensorFlow-compatible InceptionV3,
  2048-d pool features) from a local weights file; nothing is downloaded.
- ``wasserstein2``: the exact 2-Wasserstein distance between two equally sized point clouds (an optimal
  matching), for the 2-D toy benchmark, where a Gaussian fit would miss collapsed modes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from tqdm.auto import tqdm

from .assignment import solve_linear_assignment
from .data import image_transform, load_digits_dataset

# --------------------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------------------


def _symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The PSD square root of a symmetric matrix; round-off negative eigenvalues are clipped to 0."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2})``, the FID formula.

    ``Tr((sigma1 sigma2)^{1/2})`` equals ``Tr((s1 sigma2 s1)^{1/2})`` with ``s1 = sigma1^{1/2}``: that matrix is
    symmetric PSD, so its eigenvalues are real and non-negative (up to round-off, clipped). Unlike
    ``scipy.linalg.sqrtm`` of the non-symmetric product, this needs no ``eps`` on the diagonal and never
    returns an imaginary part, even for the rank-deficient covariances of a few hundred samples.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"mu1 and mu2 must be vectors of the same length, got shapes {mu1.shape} and {mu2.shape}")
    dim = mu1.shape[0]
    for name, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):
        if sigma.shape != (dim, dim):
            raise ValueError(f"{name} must have shape {(dim, dim)} to match the means, got {sigma.shape}")
    for name, value in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
        if not np.isfinite(value).all():
            raise ValueError(f"{name} contains NaN or Inf values")
    root1 = _symmetric_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2.0), 0.0, None)).sum()
    difference = mu1 - mu2
    distance = difference @ difference + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
    return float(max(distance, 0.0))


@dataclass(frozen=True)
class GaussianStatistics:
    """Mean and covariance of a set of feature vectors (what FID compares)."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int

    @classmethod
    def from_features(cls, features: np.ndarray | torch.Tensor) -> GaussianStatistics:
        """Statistics of an ``(N, D)`` array of features, N >= 2 (unbiased covariance, as pytorch-fid)."""
        if isinstance(features, torch.Tensor):
            features = features.detach().cpu().double().numpy()
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError(f"features must have shape (N, D) with N >= 2, got {features.shape}")
        return cls(features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False)), features.shape[0])

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``mu``, ``sigma`` (and ``count``) to an ``.npz`` file, readable by pytorch-fid too."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".tmp.npz")
        np.savez(partial, mu=self.mu, sigma=self.sigma, count=np.int64(self.count))
        os.replace(partial, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> GaussianStatistics:
        """Read an ``.npz`` with arrays ``mu`` and ``sigma`` (ours, or pytorch-fid's precomputed statistics)."""
        with np.load(path) as data:
            missing = [key for key in ("mu", "sigma") if key not in data]
            if missing:
                raise ValueError(f"{str(path)!r} has no {missing} array(s); expected an .npz with 'mu' and 'sigma'")
            count = int(data["count"]) if "count" in data else -1
            return cls(np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64), count)


def frechet_distance_between(first: GaussianStatistics, second: GaussianStatistics) -> float:
    """The Fréchet distance between two sets of statistics."""
    return frechet_distance(first.mu, first.sigma, second.mu, second.sigma)


# --------------------------------------------------------------------------------------------------
# 2-D toy metric
# --------------------------------------------------------------------------------------------------


def wasserstein2(first: np.ndarray | torch.Tensor, second: np.ndarray | torch.Tensor) -> float:
    """Exact 2-Wasserstein distance between two empirical distributions of the same size N.

    The optimal transport plan between two uniform point clouds of equal size is a permutation, found
    exactly by the linear-assignment solver of the package: ``sqrt(mean ||a_i - b_perm(i)||^2)``.
    """
    a = torch.as_tensor(np.asarray(first), dtype=torch.float64)
    b = torch.as_tensor(np.asarray(second), dtype=torch.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"first and second must be (N, D) arrays of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    cost = torch.cdist(a, b).pow(2)
    perm = solve_linear_assignment(cost, dim=a.shape[1])  # the solver suited to D (scipy for 2-D points)
    return float(cost[torch.arange(a.shape[0]), perm].mean().sqrt())


# --------------------------------------------------------------------------------------------------
# The digits classifier and its feature space
# --------------------------------------------------------------------------------------------------

DIGITS_SIDE = 8
# The accuracy the cached classifier must reach on its held-out digits (tests assert it; measured ~0.98).
DIGITS_CLASSIFIER_MIN_ACCURACY = 0.95


def immiscible_cache_dir() -> Path:
    """``$IMMISCIBLE_CACHE``, else ``$XDG_CACHE_HOME/immiscible_diffusers``, else ``~/.cache/immiscible_diffusers``."""
    if os.environ.get("IMMISCIBLE_CACHE"):
        return Path(os.environ["IMMISCIBLE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "immiscible_diffusers"


@dataclass(frozen=True)
class DigitsClassifierConfig:
    """Everything that determines the classifier's weights (its hash names the cache file)."""

    split_seed: int = 0
    train_seed: int = 0
    heldout_fraction: float = 0.5
    feature_dim: int = 64
    epochs: int = 40
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    max_shift: int = 1  # random translations of up to this many pixels while training
    version: int = 1  # bump when the architecture or the training loop changes

    def cache_key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


class DigitsClassifier(nn.Module):
    """A small CNN for 1x8x8 digits in ``[-1, 1]``; ``features`` is its penultimate (post-ReLU) layer."""

    def __init__(self, feature_dim: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.hidden = nn.Linear(64 * 4 * 4, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.hidden(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass(frozen=True)
class DigitsSplit:
    """Indices into scikit-learn's 1,797 digits: the classifier's training half, and the held-out half.

    The held-out half is split again into the Fréchet ``reference`` set and a disjoint ``floor`` set
    (the real digits scored like a model's samples, which gives the best score a model can expect).
    """

    classifier_train: np.ndarray
    reference: np.ndarray
    floor: np.ndarray

    @property
    def heldout(self) -> np.ndarray:
        return np.concatenate([self.reference, self.floor])


def digits_split(config: DigitsClassifierConfig = DigitsClassifierConfig()) -> DigitsSplit:
    """The seeded, class-stratified split of the digits used by the classifier and the Fréchet reference."""
    labels = load_digits().target
    indices = np.arange(len(labels))
    train, heldout = train_test_split(
        indices, test_size=config.heldout_fraction, stratify=labels, random_state=config.split_seed
    )
    reference, floor = train_test_split(
        heldout, test_size=0.5, stratify=labels[heldout], random_state=config.split_seed
    )
    return DigitsSplit(np.sort(train), np.sort(reference), np.sort(floor))


def real_digits(resolution: int = DIGITS_SIDE, num_channels: int = 1) -> tuple[torch.Tensor, np.ndarray]:
    """All 1,797 digits as the training scripts see them: ``(N, C, resolution, resolution)`` in ``[-1, 1]``, and labels.

    The images go through the package's training transform (``data.image_transform``), so the Fréchet
    reference at 16x16 or 32x32 is made of the very images a model at that resolution was trained on.
    """
    dataset = load_digits_dataset()
    transform = image_transform(resolution, center_crop=True, random_flip=False, num_channels=num_channels)
    images = torch.stack([transform(image) for image in dataset["image"]])
    return images, np.asarray(dataset["label"])


def to_digits_classifier_input(images: torch.Tensor) -> torch.Tensor:
    """Images in ``[-1, 1]`` of any size and channel count -> ``(N, 1, 8, 8)`` grayscale in ``[-1, 1]``.

    Channels are averaged, the side is brought to 8 by area interpolation (average pooling when it is a
    multiple of 8), and values are clamped to ``[-1, 1]`` as a pipeline's output is.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(f"images must be a (N, C, H, W) tensor, got {getattr(images, 'shape', type(images).__name__)}")
    gray = images.float().mean(dim=1, keepdim=True)
    if gray.shape[-2:] != (DIGITS_SIDE, DIGITS_SIDE):
        gray = F.interpolate(gray, size=(DIGITS_SIDE, DIGITS_SIDE), mode="area")
    return gray.clamp(-1.0, 1.0)


def _random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (background is -1)."""
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    side = images.shape[-1]
    offsets = torch.randint(0, 2 * max_shift + 1, (images.shape[0], 2), generator=generator)
    return torch.stack([p[:, dy : dy + side, dx : dx + side] for p, (dy, dx) in zip(padded, offsets.tolist())])


def train_digits_classifier(
    config: DigitsClassifierConfig = DigitsClassifierConfig(), progress: bool = True
) -> tuple[DigitsClassifier, float]:
    """Train the classifier on its half of the digits; return it (in eval mode) and its held-out accuracy."""
    split = digits_split(config)
    images, labels = real_digits()
    labels = torch.from_numpy(labels)
    train_x, train_y = images[split.classifier_train], labels[split.classifier_train]
    test_x, test_y = images[split.heldout], labels[split.heldout]
    generator = torch.Generator().manual_seed(config.train_seed)
    with torch.random.fork_rng(devices=[]):  # seed the weight init without touching the caller's RNG
        torch.manual_seed(config.train_seed)
        model = DigitsClassifier(config.feature_dim)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    model.train()
    for _ in tqdm(range(config.epochs), desc="digits classifier", disable=not progress, leave=False):
        order = torch.randperm(len(train_x), generator=generator)
        for batch in order.split(config.batch_size):
            x = _random_shift(train_x[batch], config.max_shift, generator) if config.max_shift else train_x[batch]
            loss = F.cross_entropy(model(x), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(test_x).argmax(1) == test_y).float().mean())
    return model, accuracy


@dataclass
class DigitsFeatureSpace:
    """The trained digits classifier, its held-out accuracy, and the split it was trained with."""

    model: DigitsClassifier
    test_accuracy: float
    config: DigitsClassifierConfig
    cache_path: Path | None = None

    @classmethod
    def load(
        cls,
        config: DigitsClassifierConfig = DigitsClassifierConfig(),
        cache_dir: str | os.PathLike | None = None,
        progress: bool = True,
    ) -> DigitsFeatureSpace:
        """The cached classifier for ``config`` (trained, and cached atomically, on first use)."""
        cache_dir = Path(cache_dir) if cache_dir is not None else immiscible_cache_dir()
        path = cache_dir / f"digits_classifier-{config.cache_key()}.pt"
        if path.exists():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            model = DigitsClassifier(config.feature_dim)
            model.load_state_dict(saved["state_dict"])
            model.eval()
            return cls(model, float(saved["test_accuracy"]), config, path)
        model, accuracy = train_digits_classifier(config, progress=progress)
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save({"state_dict": model.state_dict(), "test_accuracy": accuracy, "config": asdict(config)}, partial)
        os.replace(partial, path)
        return cls(model, accuracy, config, path)

    @property
    def split(self) -> DigitsSplit:
        return digits_split(self.config)

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 1024) -> np.ndarray:
        """Penultimate-layer features, ``(N, feature_dim)`` float64, of images in ``[-1, 1]`` (any size/channels)."""
        inputs = to_digits_classifier_input(images.cpu())
        return torch.cat([self.model.features(batch) for batch in inputs.split(batch_size)]).double().numpy()


# --------------------------------------------------------------------------------------------------
# Inception features (standard FID)
# --------------------------------------------------------------------------------------------------

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"


class InceptionFeatureSpace:
    """torch-fidelity's TensorFlow-compatible InceptionV3 (the FID network), loaded from a local file.

    Args:
        weights_path: the PyTorch state dict torch-fidelity uses, ``weights-inception-2015-12-05-6726825d.pth``
            (a conversion of the 2015 TensorFlow Inception weights that FID is defined with). It is never
            downloaded here: fetch it once where there is network and pass its path.
        device: where the network runs.
    """

    def __init__(self, weights_path: str | os.PathLike | None, device: str | torch.device = "cpu") -> None:
        if weights_path is None:
            raise ValueError(
                "Inception FID needs --inception_weights PATH: the InceptionV3 weights file that torch-fidelity "
                f"uses ({INCEPTION_WEIGHTS_FILE}, from torch-fidelity's GitHub releases). Nothing is downloaded at run "
                "time, and the digits metric is not used in its place."
            )
        weights_path = Path(weights_path)
        if not weights_path.is_file():
            raise ValueError(
                f"--inception_weights {str(weights_path)!r} is not a file; expected torch-fidelity's InceptionV3 "
                f"state dict {INCEPTION_WEIGHTS_FILE}"
            )
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except Exception as error:  # torchvision built for another torch fails with RuntimeError, not ImportError
            raise ImportError(
                "Inception FID needs torch-fidelity and a torchvision build that matches your torch: "
                "pip install 'immiscible-diffusers[eval]' (with the torchvision wheel for your torch build); "
                f"importing it failed with: {type(error).__name__}: {error}"
            ) from error
        self.weights_path = weights_path
        self.device = torch.device(device)
        self.model = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights_path)
        ).to(self.device)

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """2048-d pool features, ``(N, 2048)`` float64, of images in ``[-1, 1]`` (1 or 3 channels, any size).

        Images are quantised to 8 bits first, as FID's reference implementations see saved PNGs.
        """
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be (N, 1 or 3, H, W), got {tuple(images.shape)}")
        uint8 = ((images.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
        if uint8.shape[1] == 1:
            uint8 = uint8.expand(-1, 3, -1, -1)
        chunks = [self.model(batch.to(self.device))[0].double().cpu() for batch in uint8.split(batch_size)]
        return torch.cat(chunks).numpy()


def feature_statistics(space, images: torch.Tensor) -> GaussianStatistics:
    """``GaussianStatistics`` of ``space.features(images)`` for any feature space above."""
    return GaussianStatistics.from_features(space.features(images))


__all__: Sequence[str] = (
    "DIGITS_CLASSIFIER_MIN_ACCURACY",
    "DigitsClassifier",
    "DigitsClassifierConfig",
    "DigitsFeatureSpace",
    "DigitsSplit",
    "GaussianStatistics",
    "InceptionFeatureSpace",
    "digits_split",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_between",
    "immiscible_cache_dir",
    "real_digits",
    "to_digits_classifier_input",
    "train_digits_classifier",
    "wasserstein2",
)
